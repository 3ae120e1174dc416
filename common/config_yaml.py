"""The YAML dialect of fedlora's configs: PyYAML's safe loader with YAML 1.2 numbers and no aliases.

PyYAML follows YAML 1.1, where ``1e-5``, ``1E5`` and ``1.0e38`` are strings (a float needs a dot and a
signed exponent), while every DP practitioner writes ``delta: 1e-5``. A resolver on a SafeLoader
subclass reads them as YAML 1.2 does; the dumper resolves the same way, so a string that looks like
a YAML 1.2 number is written quoted and reads back as the string it was. Aliases are refused: a
config never needs one, and nested aliases ("billion laughs") expand into exponentially many values
wherever the mapping is walked.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

# YAML 1.2 core schema floats (https://yaml.org/spec/1.2.2/#1032-tag-resolution) that YAML 1.1 leaves
# strings: an exponent without a dot or sign, a leading dot with a sign. Plain integers never match
# (PyYAML's int resolver comes first and the pattern needs a dot or an exponent).
YAML12_FLOAT = re.compile(
    r"^[-+]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+|[0-9]+\.[0-9]*|\.[0-9]+)$"
)
FLOAT_TAG = "tag:yaml.org,2002:float"


class ConfigLoader(yaml.SafeLoader):
    """Safe loading, YAML 1.2 floats, and an alias refused where the parser meets it."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None,
                None,
                f"alias *{event.anchor} refused: a config may not repeat values by reference "
                "(write the value out)",
                event.start_mark,
            )
        return super().compose_node(parent, index)


class ConfigDumper(yaml.SafeDumper):
    """Safe dumping that quotes every string ConfigLoader would read as a number."""


for _cls in (ConfigLoader, ConfigDumper):
    _cls.add_implicit_resolver(FLOAT_TAG, YAML12_FLOAT, list("-+0123456789."))


def parse_yaml(text: str) -> Any:
    """The value of a YAML document in fedlora's dialect; raises yaml.YAMLError."""
    return yaml.load(text, Loader=ConfigLoader)


def dump_yaml_text(data: Any) -> str:
    """``data`` as YAML that ``parse_yaml`` reads back to the same values, in the given key order."""
    return yaml.dump(data, Dumper=ConfigDumper, sort_keys=False)
