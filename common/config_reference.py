"""The configuration reference page (docs/configuration.md), generated from the schema.

Every key's type, default, allowed values, personas and help come from its field in common.config
(``fedlora.common.config.key_docs``, what ``python -m fedlora.common.config <persona>`` prints), so
the page cannot drift from the code; tests/test_docs.py fails when the committed page is stale.
Regenerate it with ``python -m fedlora.common.config_reference > docs/configuration.md``.
"""

from __future__ import annotations

import itertools
from typing import Any

from fedlora.common.config import PERSONAS, KeyDoc, key_docs

COMMAND = "python -m fedlora.common.config_reference > docs/configuration.md"

_INTRO = f"""\
# Configuration reference

Generated from the schema (`common/config.py`); do not edit it by hand (`tests/test_docs.py`
fails when it is stale). Regenerate it with:

```bash
{COMMAND}
```

The same list, per persona, on a terminal: `python -m fedlora.common.config {{{"|".join(PERSONAS)}}}`.

A config is one YAML file of these sections, read for one persona: an **institution**
(`fedlora-client`), the **coordinator** (`fedlora-server`) or a **simulation** (`fedlora-simulate`).
A key outside the persona's own is refused in one line naming the file and the key, and so is a
value of the wrong type, outside its range or not among its choices. Relative paths are relative to
the YAML file; numbers are read as YAML 1.2 (`1e-5` is a number) and must be finite. A command that
reads a config (all but `start`, `status` and `stop`, which hand the file to Flower's processes as it
is) takes `--set key=value` to override a key (`--set privacy.epsilon=4`). `null` in a "default" column
means unset: for the training values marked "recipe manual", `training.recipe: auto` plans them
(`fedlora-client check` prints each planned value and why) and `recipe: manual` gives the value shown.
"""


def _value(value: Any) -> str:
    """A default as YAML writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if value == "":
        return '""'
    return str(value)


def _cell(text: str) -> str:
    """Help text safe in a Markdown table cell: no column break, no stray emphasis or HTML."""
    return text.replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")


def _allowed(doc: KeyDoc) -> str:
    if doc.choices:
        return ", ".join(f"`{choice}`" for choice in doc.choices)
    return ", ".join(f"{sign} {bound}" for sign, bound in doc.bounds)


def _row(doc: KeyDoc) -> str:
    default = f"`{_value(doc.default)}`"
    if doc.manual is not None:
        default += f" (recipe manual: `{_value(doc.manual)}`)"
    personas = "all" if len(doc.personas) == len(PERSONAS) else ", ".join(doc.personas)
    cells = [f"`{doc.path}`", doc.type, default, _allowed(doc), personas, _cell(doc.help)]
    return "| " + " | ".join(cells) + " |"


def reference_markdown() -> str:
    """The whole page: the introduction, then one table per section in the schema's order."""
    lines = [_INTRO]
    for section, docs in itertools.groupby(key_docs(), key=lambda d: d.path.rpartition(".")[0]):
        lines += [
            f"## {f'`{section}`' if section else 'Top level'}",
            "",
            "| key | type | default | allowed | personas | help |",
            "|---|---|---|---|---|---|",
            *(_row(doc) for doc in docs),
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
