"""A client's private state: what it trains but never sends, kept across rounds.

In simulation Flower keeps ``context.state`` across rounds. On a real SuperNode that lives in
memory only, so when the node config has ``state-dir`` the arrays are also written there
after every round (temp file + rename, never half a file) and read back on start.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context

_KEY = "pwff.private"


class PrivateStore:
    """Private arrays of one client, in ``context.state`` and optionally on disk."""

    def __init__(self, context: Context) -> None:
        self.context = context
        state_dir = context.node_config.get("state-dir")
        self.path = Path(str(state_dir)) / "private.npz" if state_dir else None

    def load(self) -> dict[str, np.ndarray] | None:
        if _KEY in self.context.state.array_records:
            return {k: v.numpy() for k, v in self.context.state.array_records[_KEY].items()}
        if self.path is not None and self.path.is_file():
            with np.load(self.path) as f:
                return {k: f[k] for k in f.files}
        return None

    def save(self, arrays: dict[str, np.ndarray]) -> None:
        self.context.state[_KEY] = ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            with tmp.open("wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, self.path)
