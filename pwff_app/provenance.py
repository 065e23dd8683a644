"""What produced a run: one key over its full validated config and the code that ran it.

``summary.json`` carries ``run_key`` (and ``code``), so a finished run is reused only for the
same config and code: ``pwff reproduce`` reruns a run whose key differs. Left out of the key is
only where the run is written (``results-dir``, ``run-name``): moving a reproduction does not
change what its runs measured.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from pwff_app import __version__
from pwff_app.config import RunConfig

_PACKAGE = Path(__file__).resolve().parent
_NOT_KEYED = {"raw", "results_dir", "run_name"}


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """SHA-256 over the package's Python files (relative path and bytes, sorted by path).

    The same in the repository and in the copy Flower installs from the app bundle, which holds
    the same ``.py`` files; any code change changes it.
    """
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(_PACKAGE).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def code_version() -> dict[str, str]:
    """The ``code`` block of ``summary.json``: package version and source digest."""
    return {"version": __version__, "source_sha256": source_digest()}


def run_key(cfg: RunConfig) -> str:
    """Hex key (20 characters) over the full validated config (every section, defaults included,
    ``data_dir`` resolved) and :func:`code_version`."""
    tree: dict[str, Any] = TypeAdapter(RunConfig).dump_python(cfg, mode="json", exclude=_NOT_KEYED)
    blob = json.dumps({"config": tree, "code": code_version()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]
