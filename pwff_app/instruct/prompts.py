"""Alpaca prompts for PFIT: loading, formatting, the fixed train / validation / test split, and each
client's training share and evaluation prompts.

Alpaca comes from the local data folder (``alpaca/alpaca_5000.json``, 5,000 records) when one
is set, else from the Hub id ``instruct.prompt-dataset`` (``tatsu-lab/alpaca``, 52k records).
"""

from __future__ import annotations

import functools
import json
import os
import random
from collections.abc import Mapping
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from pwff_app.sources import DataNotFoundError, hub_dataset

MAX_PROMPT_CHARS = 400  # Alpaca records whose instruction + input is longer are dropped
ALPACA_HUB_ID = "tatsu-lab/alpaca"  # = the default of 'instruct.prompt-dataset'
ALPACA_FILE = Path("alpaca") / "alpaca_5000.json"
_FIELDS = ("instruction", "input", "output")


def load_alpaca(data_dir: Path | str | None = None, dataset: str = ALPACA_HUB_ID) -> list[dict[str, str]]:
    """Alpaca records ``{instruction, input, output}``.

    From ``<data_dir>/alpaca/alpaca_5000.json`` when a data folder is given (``data_dir``, else
    ``$PWFF_DATA_DIR``): the local file wins, as for AG News. Without one, the ``train`` split of
    the Hub data set ``dataset``. A missing source raises :class:`DataNotFoundError` (one line).
    """
    root = data_dir or os.environ.get("PWFF_DATA_DIR", "")
    if not root:
        return [dict(r) for r in _hub_alpaca(dataset)]
    path = Path(root).expanduser() / ALPACA_FILE
    if not path.is_file():
        raise DataNotFoundError(f"Alpaca file {path} not found: set PWFF_DATA_DIR (or run config 'data-dir') to "
                                f"a folder holding {ALPACA_FILE}, or leave both unset to use the Hub ({dataset!r})")
    with path.open() as f:
        return json.load(f)


@functools.lru_cache(maxsize=2)
def _hub_alpaca(dataset: str) -> tuple[dict[str, str], ...]:
    """The Hub data set's records (cached per process: every client message reads them)."""
    rows = hub_dataset(dataset, "Alpaca", split="train")
    return tuple({k: str(r.get(k) or "") for k in _FIELDS} for r in rows)


def format_prompt(instruction: str, input: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The model's chat template (user turn + generation prompt) if it has one, else the Alpaca format."""
    if tokenizer.chat_template:
        content = f"{instruction}\n\n{input}" if input else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    if input:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def _raw_prompt(record: Mapping[str, str]) -> str:
    """The record's instruction (and input) without any template: what the reward models score."""
    return f"{record['instruction']}\n\n{record['input']}" if record.get("input") else record["instruction"]


#: Seed of the one train / validation / test split of the Alpaca records. Fixed, NOT the run seed:
#: every run, seed and method sees the same test prompts, and no setting is chosen on them.
SPLIT_SEED = 20231
#: Shares of the (short) Alpaca records held out for choosing settings and for reporting.
VALIDATION_FRACTION, TEST_FRACTION = 0.05, 0.05
EVAL_SPLITS = ("test", "validation")


def prompt_splits(data_dir: Path | None, dataset: str = ALPACA_HUB_ID) -> dict[str, list[dict]]:
    """The short Alpaca records split once, with :data:`SPLIT_SEED`, into ``train`` (clients' shares),
    ``validation`` (for choosing settings) and ``test`` (for reporting only); disjoint by record.

    Records with the same instruction and input fall in one part (a duplicate prompt cannot leak
    from training into evaluation).
    """
    records = [r for r in load_alpaca(data_dir, dataset) if len(_raw_prompt(r)) <= MAX_PROMPT_CHARS]
    prompts = sorted({_raw_prompt(r) for r in records})
    random.Random(SPLIT_SEED).shuffle(prompts)  # stdlib RNG: the same split on every platform
    n_val, n_test = round(len(prompts) * VALIDATION_FRACTION), round(len(prompts) * TEST_FRACTION)
    part = {p: "test" for p in prompts[:n_test]}
    part.update({p: "validation" for p in prompts[n_test:n_test + n_val]})
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for r in records:
        splits[part.get(_raw_prompt(r), "train")].append(r)
    return splits


def client_prompts(data_dir: Path | None, client_id: int, num_clients: int, seed: int,
                   n_eval: int, dataset: str = ALPACA_HUB_ID, eval_split: str = "test") -> tuple[list[dict], list[dict]]:
    """(train share, evaluation prompts) of a client.

    The training share: the ``train`` part of :func:`prompt_splits`, shuffled with the run's
    ``seed`` and cut into ``num_clients`` disjoint shares. The evaluation prompts: the first
    ``n_eval`` records of ``eval_split`` (``test`` for reporting, ``validation`` for choosing
    settings), in the fixed split order: the same for every client, seed and method (clients
    with different reward weights are compared on equal prompts) and never trained on.
    """
    if eval_split not in EVAL_SPLITS:
        raise ValueError(f"eval split must be one of {EVAL_SPLITS}, got {eval_split!r}")
    splits = prompt_splits(data_dir, dataset)
    train = list(splits["train"])
    random.Random(seed).shuffle(train)
    held_out, share = splits[eval_split][:n_eval], train[client_id::num_clients]
    if len(held_out) < n_eval or not share:
        raise ValueError(f"client {client_id}: the Alpaca {eval_split} split has {len(splits[eval_split])} prompts and "
                         f"the training split {len(train)}: cannot give {n_eval} evaluation prompts and a training "
                         f"share to each of {num_clients} clients")
    return share, held_out


def _round_prompts(train: list[dict], server_round: int, n: int) -> list[dict]:
    """The ``n`` training records of a round: the next ``n`` of the share, wrapping around."""
    start = (server_round - 1) * n
    return [train[(start + i) % len(train)] for i in range(n)]
