"""AG News for task tuning: load (Hub id or local folder), split non-IID, tokenize.

Local folder layout (``PWFF_DATA_DIR`` or run-config ``data-dir``), as in ``shared/data``:
``ag_news/noisyag_samples10000valMed.csv`` (train sample; header ``label,gt,text,group``: the
clean label is ``gt``, 0-3) and ``ag_news/test.csv`` (the official test split; no header:
``class`` 1-4, ``title``, ``description``). Both become ``{"text", "label"}`` with labels 0-3.

Non-IID split: one :class:`flwr_datasets.partitioner.DirichletPartitioner` over labels runs on
train and test *together* (a ``split`` column tells them apart), so each client's test rows
follow the same label mix as its train rows and personalised accuracy is measured on the
client's own distribution.

Global test set (:func:`global_test_split`): ``task.global-test-samples`` rows of the *test*
split, the same number of each label, drawn with a fixed seed of its own
(:data:`GLOBAL_TEST_SEED`, not the run's seed), so every client, method and seed is measured on
the same rows; it measures how a personalised model does outside its own label mix. Clients
never train on test rows, so it shares nothing with any client's training rows (it may share
rows with some client's own test split: both are held out).
"""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets, disable_progress_bars
from flwr_datasets.partitioner import DirichletPartitioner
from torch.utils.data import DataLoader, TensorDataset
from transformers import PreTrainedTokenizerBase

from pwff_app.config import RunConfig
from pwff_app.sources import DataNotFoundError, encoder_path, hub_dataset
from pwff_app.task_tuning.model import load_tokenizer

# Worker logs would drown in per-call progress bars of small data-set operations.
disable_progress_bars()

AG_NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")
_TRAIN_FILE = Path("ag_news") / "noisyag_samples10000valMed.csv"
_TEST_FILE = Path("ag_news") / "test.csv"


GLOBAL_TEST_SEED = 18_000_018
"""Seed of the global test set's draw: fixed, independent of the run's seed and its Dirichlet split."""

__all__ = ["AG_NEWS_CLASSES", "DataNotFoundError", "GLOBAL_TEST_SEED", "batches", "client_rows", "client_split",
           "global_rows", "global_test_split", "label_distribution", "label_skew", "load_ag_news", "preflight",
           "tokenize"]


def _read_local(data_dir: Path) -> tuple[Dataset, Dataset]:
    train_path, test_path = data_dir / _TRAIN_FILE, data_dir / _TEST_FILE
    for path in (train_path, test_path):
        if not path.is_file():
            raise DataNotFoundError(
                f"AG News file {path} not found: set PWFF_DATA_DIR (or run config 'data-dir') "
                f"to a folder holding {_TRAIN_FILE} and {_TEST_FILE}"
            )
    with train_path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    train = Dataset.from_dict({"text": [r["text"] for r in rows], "label": [int(r["gt"]) for r in rows]})
    with test_path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    test = Dataset.from_dict(
        {"text": [f"{t} . {d}" for _, t, d in rows], "label": [int(c) - 1 for c, _, _ in rows]}
    )
    return train, test


def _read_hub(dataset_id: str) -> tuple[Dataset, Dataset]:
    ds = hub_dataset(dataset_id, "AG News")
    return ds["train"].select_columns(["text", "label"]), ds["test"].select_columns(["text", "label"])


@functools.lru_cache(maxsize=4)
def load_ag_news(data_dir: Path | None, dataset_id: str) -> tuple[Dataset, Dataset]:
    """AG News train and test as ``{"text", "label"}`` datasets, labels 0-3."""
    return _read_local(data_dir) if data_dir is not None else _read_hub(dataset_id)


def preflight(cfg: RunConfig) -> list[str]:
    """Before round 1: AG News loads (local folder or Hub id) and the encoder resolves; what was checked.

    AG News is read whole (seconds; from the Hub it is the download the clients need anyway, into
    the shared cache); of the encoder only the config is resolved, the server loads the weights later.
    Raises :class:`~pwff_app.sources.SourceNotFoundError` with one line.
    """
    train, test = load_ag_news(cfg.data_dir, cfg.task.dataset)
    where = f"folder {cfg.data_dir}" if cfg.data_dir is not None else f"Hub {cfg.task.dataset!r}"
    path = encoder_path(cfg.task.model_name, "encoder", "set 'task.model-name' to a local folder or a Hub id")
    checked = [f"AG News ({where}: {len(train)} train / {len(test)} test rows)", f"encoder {path}"]
    if cfg.task.global_test_samples:
        global_test_split(cfg.data_dir, cfg.task.dataset, cfg.task.global_test_samples)
        checked.append(f"global test set ({cfg.task.global_test_samples} balanced test rows)")
    return checked


@functools.lru_cache(maxsize=4)
def _partitioner(data_dir: Path | None, dataset_id: str, num_partitions: int, alpha: float,
                 seed: int) -> DirichletPartitioner:
    train, test = load_ag_news(data_dir, dataset_id)
    # The partitioner cuts each class's rows in order, so shuffle first: otherwise train rows
    # would fill the first partitions and test rows the last.
    both = concatenate_datasets([
        train.add_column("split", ["train"] * len(train)),
        test.add_column("split", ["test"] * len(test)),
    ]).shuffle(seed=seed).flatten_indices()
    partitioner = DirichletPartitioner(num_partitions=num_partitions, partition_by="label",
                                       alpha=alpha, min_partition_size=10, self_balancing=False, seed=seed)
    partitioner.dataset = both
    return partitioner


def client_split(
    data_dir: Path | None,
    dataset_id: str,
    partition_id: int,
    num_partitions: int,
    alpha: float,
    seed: int,
    max_train: int = 0,
    max_test: int = 0,
) -> tuple[Dataset, Dataset]:
    """One client's train and test rows: Dirichlet(alpha) over labels, capped (0 = no cap).

    Caps draw a uniform random subset (seeded), which keeps the client's label mix.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition id {partition_id} not in [0, {num_partitions})")
    part = _partitioner(data_dir, dataset_id, num_partitions, alpha, seed).load_partition(partition_id)
    splits = np.asarray(part["split"])
    out = []
    for name, cap in (("train", max_train), ("test", max_test)):
        idx = np.flatnonzero(splits == name)
        if cap and len(idx) > cap:
            rng = np.random.default_rng([seed, partition_id, name == "test"])
            idx = np.sort(rng.choice(idx, size=cap, replace=False))
        out.append(part.select(idx).remove_columns("split"))
    return out[0], out[1]


def label_distribution(labels: list[int] | np.ndarray, num_classes: int = len(AG_NEWS_CLASSES)) -> np.ndarray:
    """Share of each class, shape [num_classes], summing to 1."""
    counts = np.bincount(np.asarray(labels, dtype=int), minlength=num_classes).astype(float)
    return counts / max(counts.sum(), 1.0)


def label_skew(distributions: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label mix and their average (0..1)."""
    mean = np.mean(distributions, axis=0)
    return float(np.mean([0.5 * np.abs(d - mean).sum() for d in distributions]))


def tokenize(ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> TensorDataset:
    """``(input_ids, attention_mask, labels)`` of every row, padded to the longest row (at most ``max_length``).

    No rows: tensors of shapes [0, 1], [0, 1] and [0].
    """
    if len(ds) == 0:
        empty = torch.zeros(0, 1, dtype=torch.long)
        return TensorDataset(empty, empty.clone(), torch.zeros(0, dtype=torch.long))
    enc = tokenizer(list(ds["text"]), truncation=True, max_length=max_length, padding=True,
                    return_tensors="pt")
    return TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(ds["label"]))


def batches(rows: TensorDataset, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """Batches of tokenized rows; a shuffled order is drawn from a fresh generator seeded with ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, generator=generator)


@functools.lru_cache(maxsize=1024)
def client_rows(data_dir: Path | None, dataset_id: str, tokenizer_name: str, partition_id: int,
                num_partitions: int, alpha: float, seed: int, max_train: int, max_test: int,
                max_length: int) -> tuple[TensorDataset, TensorDataset]:
    """One client's train and test rows (:func:`client_split`), tokenized once per worker process.

    Keyed by everything that defines the rows, so a worker serving many clients or runs keeps
    them apart; batch size and order are not part of it (:func:`batches` applies them per
    message). Callers must not write into the tensors. Memory: the clients of one partitioning
    hold disjoint rows, so their entries together are at most the tokenized data set (rows x
    ``max_length`` x 16 bytes: 18 MB for the local AG News files at 64 tokens, whatever the
    number of clients); at most 1024 entries are kept.
    """
    train, test = client_split(data_dir, dataset_id, partition_id, num_partitions, alpha, seed, max_train, max_test)
    tokenizer = load_tokenizer(tokenizer_name)
    return tokenize(train, tokenizer, max_length), tokenize(test, tokenizer, max_length)


def global_test_split(data_dir: Path | None, dataset_id: str, num_rows: int) -> Dataset:
    """``num_rows`` rows of AG News's test split, ``num_rows / 4`` of each label (in test-split order).

    Drawn without replacement with :data:`GLOBAL_TEST_SEED`: the same rows for every client, run
    and seed. Raises :class:`DataNotFoundError` (one line) when ``num_rows`` is not a multiple of
    the labels or a label has fewer test rows than asked.
    """
    per_label, rest = divmod(num_rows, len(AG_NEWS_CLASSES))
    if rest or num_rows <= 0:
        raise DataNotFoundError(f"global test set: {num_rows} rows is not a positive multiple of "
                                f"{len(AG_NEWS_CLASSES)} labels ('task.global-test-samples')")
    _, test = load_ag_news(data_dir, dataset_id)
    labels = np.asarray(test["label"])
    rng = np.random.default_rng(GLOBAL_TEST_SEED)
    chosen = []
    for label in range(len(AG_NEWS_CLASSES)):
        rows = np.flatnonzero(labels == label)
        if len(rows) < per_label:
            raise DataNotFoundError(f"global test set: {per_label} rows of label {label} asked "
                                    f"('task.global-test-samples' = {num_rows}), the test split has {len(rows)}")
        chosen.append(rng.choice(rows, size=per_label, replace=False))
    return test.select(np.sort(np.concatenate(chosen)))


@functools.lru_cache(maxsize=4)
def global_rows(data_dir: Path | None, dataset_id: str, tokenizer_name: str, num_rows: int,
                max_length: int) -> TensorDataset:
    """The global test set (:func:`global_test_split`), tokenized once per worker process.

    Keyed by everything that defines it; the same object serves every client of the process.
    Callers must not write into the tensors.
    """
    return tokenize(global_test_split(data_dir, dataset_id, num_rows), load_tokenizer(tokenizer_name), max_length)
