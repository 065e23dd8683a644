"""HH-RLHF preference data for the PFIT reward models.

Anthropic HH-RLHF preference pairs, ``hh-rlhf/helpful-base/test.jsonl.gz`` for helpfulness and
``hh-rlhf/harmless-base/test.jsonl.gz`` for safety, under the data folder (``--data-dir`` or
``$PWFF_DATA_DIR``). Only these official *test* files are available offline, so each is split
into train / held-out parts with a fixed seed (:func:`split_indices`), and a validation part is
carved from train for early stopping.

Chosen and rejected share the dialogue and differ in the final Assistant turn, so a side
becomes (last Human turn, final Assistant response); that is also what the PPO client scores
(instruction, generated response).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

#: Objective name -> HH-RLHF file under the data folder.
HH_FILES: dict[str, Path] = {
    "helpfulness": Path("hh-rlhf") / "helpful-base" / "test.jsonl.gz",
    "safety": Path("hh-rlhf") / "harmless-base" / "test.jsonl.gz",
}
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
    """The HH-RLHF file for ``objective``; a one-line FileNotFoundError if it is missing."""
    path = Path(data_dir).expanduser() / HH_FILES[objective]
    if not path.is_file():
        raise FileNotFoundError(
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
    pairs = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            (cp, c), (rp, r) = split_dialogue(row["chosen"]), split_dialogue(row["rejected"])
            if (cp, c) != (rp, r):
                pairs.append(PreferencePair(cp, c, rp, r))
    return pairs


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
