"""Alpaca prompts for PFIT: loading, formatting, and each client's training share and held-out set.

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


def client_prompts(data_dir: Path | None, client_id: int, num_clients: int, seed: int,
                   n_eval: int, dataset: str = ALPACA_HUB_ID) -> tuple[list[dict], list[dict]]:
    """(train, held-out eval) Alpaca records of a client.

    A seeded shuffle of the short records; the first ``n_eval`` are the held-out set, the same
    for every client (so clients with different reward weights can be compared on equal
    prompts) and never trained on; the rest is cut into ``num_clients`` disjoint training shares.
    """
    records = [r for r in load_alpaca(data_dir, dataset) if len(_raw_prompt(r)) <= MAX_PROMPT_CHARS]
    random.Random(seed).shuffle(records)
    held_out, share = records[:n_eval], records[n_eval:][client_id::num_clients]
    if len(held_out) < n_eval or not share:
        raise ValueError(f"client {client_id}: {len(records)} Alpaca prompts cannot give {n_eval} held-out "
                         f"prompts and a training share to each of {num_clients} clients")
    return share, held_out


def _round_prompts(train: list[dict], server_round: int, n: int) -> list[dict]:
    """The ``n`` training records of a round: the next ``n`` of the share, wrapping around."""
    start = (server_round - 1) * n
    return [train[(start + i) % len(train)] for i in range(n)]
