"""A client's private state: what it trains but never sends, kept across rounds.

In simulation Flower keeps ``context.state`` across rounds of one run. On a real SuperNode that
lives in memory only, and a resumed run is a new run, so when a state folder is configured
(node config ``state-dir``, or run config ``client-state-dir`` in simulation) the arrays are
also written there after every round (temp file + rename, never half a file) and read back.

State is tagged with the round that produced it, so round ``r`` always starts from the state
after round ``r - 1`` — also after a restart or a resume from a server checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context

from pwff_app.files import write_npz_atomic



def state_dir(context: Context, client_id: int) -> Path | None:
    """Where this client's private state is persisted, or None (in memory only)."""
    if context.node_config.get("state-dir"):
        return Path(str(context.node_config["state-dir"]))
    base, run_name = context.run_config.get("client-state-dir", ""), context.run_config.get("run-name", "")
    if base:
        return Path(str(base)) / (str(run_name) or "default") / f"client-{client_id}"
    return None


class PrivateStore:
    """Private arrays of one client, by round, in ``context.state`` and optionally on disk.

    ``name`` keeps separate stores apart (``private``: what the learner keeps; ``residual``: the
    error-feedback residual of :mod:`pwff_app.compression.mod`), in the same folder.
    """

    def __init__(self, context: Context, client_id: int, name: str = "private") -> None:
        self.context = context
        self.dir = state_dir(context, client_id)
        self.name = name
        self._arrays, self._meta = f"pwff.{name}", f"pwff.{name}-meta"
        self._pattern = re.compile(rf"{re.escape(name)}-(\d{{5}})\.npz$")

    def _files(self) -> dict[int, Path]:
        if self.dir is None or not self.dir.is_dir():
            return {}
        return {int(m.group(1)): p for p in self.dir.iterdir() if (m := self._pattern.search(p.name))}

    def load(self, upto_round: int | None = None) -> dict[str, np.ndarray] | None:
        """The newest state saved at a round <= ``upto_round`` (None = newest of all)."""
        limit = upto_round if upto_round is not None else 10**9
        meta = self.context.state.config_records.get(self._meta)
        in_memory = int(meta["round"]) if meta is not None else None
        on_disk = max((r for r in self._files() if r <= limit), default=None)
        if in_memory is not None and in_memory <= limit and (on_disk is None or in_memory >= on_disk):
            return {k: v.numpy() for k, v in self.context.state.array_records[self._arrays].items()}
        if on_disk is None:
            return None
        with np.load(self._files()[on_disk]) as f:
            return {k: f[k] for k in f.files}

    def save(self, arrays: dict[str, np.ndarray], server_round: int) -> None:
        self.context.state[self._arrays] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        self.context.state[self._meta] = ConfigRecord({"round": server_round})
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{self.name}-{server_round:05d}.npz"
        write_npz_atomic(path, arrays)
        # Keep the last two rounds: enough to resume from a checkpoint one round behind.
        for r, old in self._files().items():
            if r < server_round - 1:
                old.unlink(missing_ok=True)
