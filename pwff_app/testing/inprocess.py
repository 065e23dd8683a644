"""An in-process Grid: the real ServerApp and ClientApp (mods included), no Ray, no SuperLink.

Fast enough for multi-round tests of resume, hostile replies and lossy links. The one real
``flwr run`` test (tests/test_e2e.py) covers the runtime itself.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from pwff_app import client_app, server_app


class InProcessGrid(Grid):
    """Delivers each message (train, evaluate, query) to a ClientApp in this process; one
    Context per node persists.

    ``tamper(client_id, reply) -> reply`` lets a test play a hostile client: it sees every
    reply without an error to a message of the types in ``tamper_types`` (train replies by
    default). ``node_ids[i]`` is the node id of the node that runs client ``i`` (default
    ``1000 + i``); real node ids are random, so a test can shuffle them.
    """

    def __init__(self, run_config: dict, num_nodes: int, app: ClientApp = client_app.app,
                 tamper: Callable[[int, Message], Message] | None = None,
                 node_config: Callable[[int], dict] | None = None,
                 tamper_types: tuple[str, ...] = (MessageType.TRAIN,),
                 node_ids: Sequence[int] | None = None) -> None:
        self.app, self.tamper, self.tamper_types = app, tamper, tamper_types
        ids = list(node_ids) if node_ids is not None else [1000 + i for i in range(num_nodes)]
        self.contexts = {
            ids[i]: Context(run_id=1, node_id=ids[i],
                            node_config={"partition-id": i, "num-partitions": num_nodes,
                                         **(node_config(i) if node_config else {})},
                            state=RecordDict(), run_config=dict(run_config))
            for i in range(num_nodes)
        }

    def set_run(self, run) -> None:  # not used in-process
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError("use send_and_receive")

    def pull_messages(self, message_ids):
        raise NotImplementedError("use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            # A real transport hands each node its own deserialized copy.
            delivered = Message(content=copy.deepcopy(msg.content), dst_node_id=node,
                                message_type=msg.metadata.message_type)
            try:
                reply = self.app(delivered, self.contexts[node])
            except Exception as err:  # the runtime turns a ClientApp exception into an error reply
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=delivered)
            tampered = self.tamper is not None and delivered.metadata.message_type in self.tamper_types
            if tampered and not reply.has_error():
                reply = self.tamper(self.contexts[node].node_config["partition-id"], reply)
            replies.append(reply)
        return replies


def run_server(run_config: dict, grid: Grid) -> None:
    """Run the real ServerApp main on a grid."""
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                  run_config=dict(run_config)))
