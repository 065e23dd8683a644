"""Client side of task tuning (FedAvg-style and local methods): Flower messages in and out.

Train: load private state, take the global shared arrays from the message, train locally,
keep what is private, reply with exactly the shared arrays. Evaluate: the same model
(global shared + own private parts) on the client's own test split, and where the message's
config sets :data:`~pwff_app.federation.checks.GLOBAL_EVAL`, also on the global test set
(:func:`~pwff_app.task_tuning.train.generalization`).
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from pwff_app.config import RunConfig
from pwff_app.federation.checks import GLOBAL_EVAL
from pwff_app.federation.state import PrivateStore
from pwff_app.task_tuning.model import count_params, group_params
from pwff_app.task_tuning.train import (
    ClientTask, evaluate_model, generalization, local_lr, prepared_task, train_local,
)


def _prepare(msg: Message, context: Context, private_upto: int) -> tuple[RunConfig, int, int, ClientTask, PrivateStore]:
    cfg = RunConfig.from_run_config(context.run_config)
    client_id, num_partitions = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    server_round = int(msg.content["config"]["server-round"])
    store = PrivateStore(context, client_id)
    # The global shared part: exactly the keys this method shares, nothing else.
    incoming = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    task = prepared_task(cfg, client_id, num_partitions, server_round, incoming,
                         store.load(upto_round=server_round + private_upto))
    return cfg, client_id, server_round, task, store


def train(msg: Message, context: Context) -> Message:
    """One round of local training; the reply carries exactly the shared arrays."""
    # Round r trains from the private state left by round r - 1.
    cfg, client_id, server_round, task, store = _prepare(msg, context, private_upto=-1)
    stats = train_local(task.model, task.train_loader, cfg.task.local_epochs, local_lr(cfg, task.spec),
                        task.device, task.dtype)
    store.save(group_params(task.model, task.spec.private), server_round)
    shared = group_params(task.model, task.spec.shared)
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in shared.items()}),
        "metrics": MetricRecord({"num-examples": task.num_train, "train-loss": stats["train-loss"]}),
        "info": ConfigRecord({"client-id": client_id, "server-round": server_round,
                              "compute-s": stats["compute-s"],
                              "private-params": count_params(task.model, task.spec.private)}),
    })
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    """Accuracy and loss of global shared + own private parts on the client's own test split
    (and on the global test set when the message asks: ``global-*``, ``shared-only-*``)."""
    # Evaluation after round r uses the private state that round r's training left.
    cfg, client_id, server_round, task, _ = _prepare(msg, context, private_upto=0)
    metrics = evaluate_model(task.model, task.test_loader, task.device, task.dtype)
    if msg.content["config"].get(GLOBAL_EVAL, False) is True:
        metrics.update(generalization(cfg, task))
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": task.num_test, **metrics}),
        "info": ConfigRecord({"client-id": client_id, "server-round": server_round}),
    })
    return Message(content=content, reply_to=msg)
