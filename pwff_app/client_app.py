"""The ClientApp: thin glue between Flower messages and the task code.

Train: load private state, take the global shared arrays from the message, train locally,
keep what is private, reply with exactly the shared arrays. Evaluate: the same model
(global shared + own private parts) on the client's own test split.
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.app import MessageType
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from pwff_app.config import RunConfig
from pwff_app.methods import METHODS
from pwff_app.task_tuning.model import count_params, group_params, load_params
from pwff_app.instruct.pfit import handle_pfit_evaluate, handle_pfit_train
from pwff_app.task_tuning.fedbert.model import handle_split_message
from pwff_app.federation.state import PrivateStore
from pwff_app.task_tuning.train import ClientTask, evaluate, load_client_task, train_local
from pwff_app.wireless.link import uplink_mod

# The link is a mod around every message: the learning code below never sees the channel.
app = ClientApp(mods=[uplink_mod])


def dp_clipping_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's client-side clipping, active when the server's DP wrapper sends a clip norm.

    Inside the link mod, so what crosses the channel is the clipped update.
    """
    config = msg.content.config_records.get("config")
    if msg.metadata.message_type == MessageType.TRAIN and config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def _family(context: Context) -> str:
    return METHODS[str(context.run_config["method"])].family


def _is_split(context: Context) -> bool:
    return METHODS[str(context.run_config["method"])].protocol == "split"


def _prepare(msg: Message, context: Context, private_upto: int) -> tuple[RunConfig, int, int, ClientTask, PrivateStore]:
    cfg = RunConfig.from_run_config(context.run_config)
    client_id, num_partitions = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    server_round = int(msg.content["config"]["server-round"])
    task = load_client_task(cfg, client_id, num_partitions, server_round)
    store = PrivateStore(context, client_id)
    private = store.load(upto_round=server_round + private_upto)
    if private is not None:
        load_params(task.model, private)
    # The global shared part: exactly the keys this method shares, nothing else.
    incoming = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    expected = set(group_params(task.model, task.spec.shared))
    if set(incoming) != expected:
        raise ValueError(f"global arrays do not match the shared set of '{cfg.method}' "
                         f"({len(incoming)} keys, expected {len(expected)})")
    load_params(task.model, incoming)
    return cfg, client_id, server_round, task, store


@app.train(mods=[dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    if _family(context) == "instruct":
        return handle_pfit_train(msg, context)
    if _is_split(context):
        return handle_split_message(msg, context)
    # Round r trains from the private state left by round r - 1.
    cfg, client_id, server_round, task, store = _prepare(msg, context, private_upto=-1)
    lr = cfg.task.backbone_lr if "backbone" in task.spec.trained else cfg.task.lr
    stats = train_local(task.model, task.train_loader, cfg.task.local_epochs, lr)
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


@app.evaluate()
def evaluate_(msg: Message, context: Context) -> Message:
    if _family(context) == "instruct":
        return handle_pfit_evaluate(msg, context)
    if _is_split(context):
        return handle_split_message(msg, context)
    # Evaluation after round r uses the private state that round r's training left.
    _, client_id, server_round, task, _ = _prepare(msg, context, private_upto=0)
    metrics = evaluate(task.model, task.test_loader)
    content = RecordDict({
        "metrics": MetricRecord({"num-examples": task.num_test, **metrics}),
        "info": ConfigRecord({"client-id": client_id, "server-round": server_round}),
    })
    return Message(content=content, reply_to=msg)
