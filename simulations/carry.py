"""What a virtual institution writes, carried to the driver's run folder when it runs on a Ray cluster.

Ray actors on another node cannot write into the driver's folder, and fedlora assumes no shared disk.
So on a cluster each message runs in a scratch folder on the actor's node: the institution's files
(ledger, audit log, error log, canaries: ``client-N.*`` under ledgers/, audit/, canaries/) are first
copied in from the driver's run folder, the ClientApp runs on them as it would on the run folder, and
what it changed is written durably into the run folder by `RunFolderKeeper`, a Ray actor pinned to
the driver's node, before the reply leaves: the outermost mod waits for that write, so a ledger entry
is in the run folder before the update it pays for leaves the institution (and a write that fails
turns the reply into an error). The run folder stays the record: a file edited or removed there
(a lost ledger) is what the next message sees.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Message
from flwr.clientapp.typing import Mod

from fedlora.client.app import ClientSetup
from fedlora.common import protocol as P
from fedlora.common.config import FedloraConfig
from fedlora.common.durable import write_durably
from fedlora.simulations.virtual_client import simulation_setup

if TYPE_CHECKING:
    from ray.actor import ActorHandle

FOLDERS = ("ledgers", "audit", "canaries")
Files = dict[str, bytes]


def own_files(root: Path, pid: int) -> Files:
    """Institution ``pid``'s files under ``root``, by path relative to it (lock files left out: a lock
    holds nothing)."""
    found: Files = {}
    for folder in FOLDERS:
        for path in sorted((root / folder).glob(f"client-{pid}[.-]*")):
            if path.is_file() and path.suffix != ".lock":
                found[f"{folder}/{path.name}"] = path.read_bytes()
    return found


def is_own(relative: str, pid: int) -> bool:
    """Whether ``relative`` names one of institution ``pid``'s files: the keeper writes nothing else."""
    return re.fullmatch(rf"({'|'.join(FOLDERS)})/client-{pid}[.-][^/]*", relative) is not None


class RunFolderKeeper:
    """The driver node's owner of the run folder's institution files (a Ray actor)."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = Path(run_dir)

    def files(self, pid: int) -> Files:
        return own_files(self.run_dir, pid)

    def keep(self, pid: int, files: Files) -> None:
        for relative, payload in files.items():
            if not is_own(relative, pid):
                raise ValueError(f"institution {pid} may not write {relative!r}")
            write_durably(self.run_dir / relative, payload)


def start_keeper(run_dir: Path) -> ActorHandle:
    """A `RunFolderKeeper` on the node this driver is attached to (needing no CPU of it)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(RunFolderKeeper).options(num_cpus=0, scheduling_strategy=here).remote(str(run_dir))


def scratch_folder(scratch: str, pid: int) -> Path:
    return Path(tempfile.gettempdir()) / scratch / f"client-{pid}"


def carry_mod(keeper: ActorHandle, scratch: str) -> Mod:
    """The outermost mod of a virtual institution on a cluster: its files in from the driver, the
    message handled in the node's scratch folder, what changed back to the driver before the reply
    leaves, the scratch folder removed."""

    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        import ray

        pid = int(context.node_config[P.PARTITION_ID])
        folder = scratch_folder(scratch, pid)
        shutil.rmtree(folder, ignore_errors=True)
        before = ray.get(keeper.files.remote(pid))
        for relative, payload in before.items():
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).write_bytes(payload)
        try:
            reply = call_next(msg, context)
            changed = {k: v for k, v in own_files(folder, pid).items() if before.get(k) != v}
            if changed:
                ray.get(keeper.keep.remote(pid, changed))
            return reply
        finally:
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # another institution's message still uses it
                folder.parent.rmdir()

    return mod


def carried_setup(
    cfg: FedloraConfig, scratch: str, context: Context, canaries: tuple[int, int] | None = None
) -> ClientSetup:
    """`simulation_setup` with the scratch folder of this node standing in for the run folder."""
    pid = int(context.node_config[P.PARTITION_ID])
    return simulation_setup(cfg, scratch_folder(scratch, pid), context, canaries)

