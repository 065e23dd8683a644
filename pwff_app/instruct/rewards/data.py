"""HH-RLHF preference data for the PFIT reward models.

Anthropic HH-RLHF preference pairs, ``hh-rlhf/helpful-base/test.jsonl.gz`` for helpfulness and
``hh-rlhf/harmless-base/test.jsonl.gz`` for safety, under the data folder (``--data-dir`` or
``$PWFF_DATA_DIR``); without a data folder, the same official *test* splits of the Hub data set
(``instruct.preference-dataset``, default ``Anthropic/hh-rlhf``, data dirs ``helpful-base`` /
``harmless-base``). Only the test files are available offline, so each is split into train /
held-out parts with a fixed seed (:func:`split_indices`), and a validation part is carved from
train for early stopping.

Chosen and rejected share the dialogue and differ in the final Assistant turn, so a side
becomes (last Human turn, final Assistant response); that is also what the PPO client scores
(instruction, generated response).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pwff_app.sources import DataNotFoundError, hub_dataset

#: Objective name -> HH-RLHF file under the data folder.
HH_FILES: dict[str, Path] = {
    "helpfulness": Path("hh-rlhf") / "helpful-base" / "test.jsonl.gz",
    "safety": Path("hh-rlhf") / "harmless-base" / "test.jsonl.gz",
}
HH_HUB_ID = "Anthropic/hh-rlhf"  # = the default of 'instruct.preference-dataset'
#: Objective name -> data dir of the Hub data set (its ``test`` split is the file above).
HH_HUB_DIRS: dict[str, str] = {"helpfulness": "helpful-base", "safety": "harmless-base"}
_ASSISTANT = "\n\nAssistant:"
_HUMAN = re.compile(r"\n\nHumans?:")  # a few HH dialogues misspell the marker as "Humans:"


@dataclass(frozen=True)
class PreferencePair:
    """One human preference: the chosen and the rejected (prompt, response)."""

    chosen_prompt: str
    chosen: str
    rejected_prompt: str
    rejected: str


def split_dialogue(text: str) -> tuple[str, str]:
    """``(last Human turn, final Assistant response)`` of an HH-RLHF dialogue, both stripped."""
    cut = text.rfind(_ASSISTANT)
    if cut < 0:
        return "", text.strip()
    context, response = text[:cut], text[cut + len(_ASSISTANT):]
    turns = _HUMAN.split(context)
    return turns[-1].strip(), response.strip()


def hh_file(data_dir: str | Path, objective: str) -> Path:
    """The HH-RLHF file for ``objective``; a one-line :class:`DataNotFoundError` if it is missing."""
    path = Path(data_dir).expanduser() / HH_FILES[objective]
    if not path.is_file():
        raise DataNotFoundError(
            f"HH-RLHF file {path} not found: set PWFF_DATA_DIR (or pass --data-dir) to a folder "
            f"laid out like the shared data folder (with {HH_FILES['helpfulness']} and {HH_FILES['safety']})"
        )
    return path


def load_preference_pairs(path: str | Path) -> list[PreferencePair]:
    """Read HH-RLHF JSON lines ``{chosen, rejected}`` (gzip or plain) into preference pairs.

    Chosen and rejected are parsed separately: in a few dialogues they diverge before the last
    turn. Pairs whose two sides are identical carry no preference and are dropped.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return pairs_from_rows(json.loads(line) for line in f if line.strip())


def pairs_from_rows(rows: Iterable[Mapping[str, str]]) -> list[PreferencePair]:
    """Preference pairs from HH-RLHF rows ``{chosen, rejected}`` (see :func:`load_preference_pairs`)."""
    pairs = []
    for row in rows:
        (cp, c), (rp, r) = split_dialogue(row["chosen"]), split_dialogue(row["rejected"])
        if (cp, c) != (rp, r):
            pairs.append(PreferencePair(cp, c, rp, r))
    return pairs


def _local(data_dir: str | Path | None) -> bool:
    return bool(data_dir)  # a data folder set: its files win, as for AG News


@functools.lru_cache(maxsize=4)
def _hub_rows(dataset: str, objective: str) -> tuple[tuple[str, str], ...]:
    """(chosen, rejected) of the Hub data set's test split for ``objective`` (cached per process)."""
    rows = hub_dataset(dataset, f"HH-RLHF ({HH_HUB_DIRS[objective]})", data_dir=HH_HUB_DIRS[objective], split="test")
    return tuple((r["chosen"], r["rejected"]) for r in rows)


def objective_pairs(data_dir: str | Path | None, objective: str, dataset: str = HH_HUB_ID) -> list[PreferencePair]:
    """``objective``'s preference pairs: the data folder's file if ``data_dir`` is set, else the Hub test split."""
    if _local(data_dir):
        return load_preference_pairs(hh_file(data_dir, objective))
    return pairs_from_rows({"chosen": c, "rejected": r} for c, r in _hub_rows(dataset, objective))


def objective_fingerprint(data_dir: str | Path | None, objective: str,
                          dataset: str = HH_HUB_ID) -> dict[str, str | int]:
    """What the reward-model cache key records of ``objective``'s data: the file's size and SHA-256,
    or the Hub id, data dir, row count and SHA-256 of the rows."""
    if _local(data_dir):
        return file_fingerprint(hh_file(data_dir, objective))
    rows = _hub_rows(dataset, objective)
    digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    return {"hub": dataset, "data_dir": HH_HUB_DIRS[objective], "rows": len(rows), "sha256": digest}


#: Seed of the one split of each HH-RLHF file into the training reward models' half and the judges'
#: half. Fixed (not a run or recipe seed), so the two kinds never see each other's pairs.
HALF_SEED = 15
#: Which half each kind of model learns from.
HALVES = ("reward-model", "judge")


def half_of(pairs: list[PreferencePair], half: str) -> list[PreferencePair]:
    """``half`` (:data:`HALVES`) of a file's pairs, in file order: :func:`split_indices` with
    :data:`HALF_SEED` cuts the file in two (``round(n / 2)`` pairs for the training reward models,
    the rest for the judges); the two halves are disjoint."""
    if half not in HALVES:
        raise ValueError(f"half must be one of {HALVES}, got {half!r}")
    judge_idx, rm_idx = split_indices(len(pairs), 0.5, HALF_SEED)
    return [pairs[i] for i in (rm_idx if half == "reward-model" else judge_idx)]


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Shuffle ``range(n)`` with ``seed``; return (rest, part) with ``part`` ~``fraction`` of n."""
    order = list(range(n))
    random.Random(seed).shuffle(order)  # stdlib RNG: the same split on every platform/version
    k = min(n - 1, max(1, round(n * fraction))) if n > 1 else 0
    return sorted(order[k:]), sorted(order[:k])


def file_fingerprint(path: Path) -> dict[str, str | int]:
    """Size and SHA-256 of a file, for the cache key."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"size": path.stat().st_size, "sha256": digest}
