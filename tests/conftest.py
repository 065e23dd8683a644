"""Shared fixtures: run configs from pyproject defaults, a small AG-News-shaped folder,
Flower contexts and messages built the way the runtime builds them."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest
from flwr.app import Context, Message, MessageType, RecordDict

from flwr.supercore.task_identity import TaskIdentity

from pwff_app.config import app_defaults

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Outside a running app Flower has no task identity; building a Message needs one.
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0

_WORDS = {
    0: "president election minister war government treaty embassy parliament",
    1: "match goal season coach team league championship player",
    2: "stocks market shares profit earnings bank investors economy",
    3: "software internet computer space research scientists chip network",
}


def write_ag_news(folder: Path, n_train: int = 400, n_test: int = 200, seed: int = 0) -> Path:
    """A folder laid out like shared/data with synthetic, learnable AG-News-style rows."""
    rng = random.Random(seed)
    (folder / "ag_news").mkdir(parents=True, exist_ok=True)

    def text(label: int) -> str:
        words = _WORDS[label].split() + "the a of in on today new report says".split()
        return " ".join(rng.choice(words) for _ in range(12))

    with (folder / "ag_news" / "noisyag_samples10000valMed.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "gt", "text", "group"])
        for i in range(n_train):
            y = i % 4
            w.writerow([rng.randrange(4), y, text(y), 0])
    with (folder / "ag_news" / "test.csv").open("w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        for i in range(n_test):
            y = i % 4
            w.writerow([y + 1, "title", text(y)])
    return folder


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: on 2 shared cores, two threads contend and run several times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ag_news(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    path = os.environ.get("PWFF_DATA_DIR", "")
    if not path or not (Path(path) / "ag_news" / "test.csv").is_file():
        pytest.skip("PWFF_DATA_DIR with ag_news not set")
    return Path(path)


def run_config(**overrides) -> dict:
    """pyproject defaults with overrides given as python names (task_lr -> task.lr)."""
    rc = app_defaults(ROOT)
    for key, value in overrides.items():
        flat = key.replace("__", ".").replace("_", "-")
        assert flat in rc, f"unknown run-config key {flat}"
        rc[flat] = value
    return rc


def tiny_config(data_dir: Path, results_dir: Path, **overrides) -> dict:
    base = dict(data_dir=str(data_dir), results_dir=str(results_dir), task__num_rounds=2,
                task__max_train_samples=32, task__max_test_samples=32, task__batch_size=16,
                task__max_length=32, task__global_test_samples=16, wireless__enabled=False)
    base.update(overrides)
    return run_config(**base)


def make_context(rc: dict, partition_id: int, num_partitions: int = 4, **node_config) -> Context:
    return Context(run_id=1, node_id=100 + partition_id,
                   node_config={"partition-id": partition_id, "num-partitions": num_partitions, **node_config},
                   state=RecordDict(), run_config=rc)


def stand_in_evaluation(msg: Message, context: Context, accuracy: float, loss: float = 1.0,
                        global_accuracy: float = 0.25) -> dict:
    """The metrics of a model-free stand-in task client's evaluate reply, as the real client sends
    them: own split (5 rows), and when the message asks (``global-eval``) the global test set's
    fields, with the shared part alone's where the method has that view (PFTT)."""
    from pwff_app.federation.checks import GLOBAL_EVAL
    from pwff_app.methods import METHODS

    metrics = {"num-examples": 5, "accuracy": accuracy, "loss": loss}
    if msg.content["config"].get(GLOBAL_EVAL, False):
        metrics.update({"global-accuracy": global_accuracy, "global-loss": 1.3})
        if METHODS[str(context.run_config["method"])].shared_only_view:
            metrics.update({"shared-only-accuracy": 0.3, "shared-only-loss": 1.2})
    return metrics


def make_message(content: RecordDict, message_type: str = MessageType.TRAIN, dst: int = 100) -> Message:
    return Message(content=content, dst_node_id=dst, message_type=message_type)
