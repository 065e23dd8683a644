"""Which code runs a method: its family and protocol pick the client handlers and the server loop.

A method row (:mod:`pwff_app.methods`) says *what* is trained, sent and kept; this table says
*which code* carries it out. Entries are ``"module:function"`` paths, imported on first use,
so a PFTT client never imports the causal-LM stack and the config stays torch-free.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pwff_app.methods import MethodSpec


@dataclass(frozen=True)
class Protocol:
    """The code of one (family, protocol) pair.

    Attributes:
        train, evaluate: client handlers ``(msg, context) -> reply``.
        server: the server loop ``(grid, cfg, recorder, resumed) -> summary block``; ``resumed``
            holds the checkpointed global arrays when resuming, else None.
        score_key: what ``rounds.jsonl`` and ``summary.json`` report per client.
    """

    train: str
    evaluate: str
    server: str
    score_key: str

    def handler(self, kind: str) -> Callable[..., Any]:
        """The client handler for ``kind`` (``train`` or ``evaluate``)."""
        return _load(getattr(self, kind))

    def run_server(self, *args: Any) -> dict[str, Any]:
        return _load(self.server)(*args)


def _load(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


_TASK = Protocol("pwff_app.task_tuning.client:train", "pwff_app.task_tuning.client:evaluate",
                 "pwff_app.task_tuning.server:run_fedavg", "accuracy")
_SPLIT = "pwff_app.task_tuning.fedbert.client:handle_split_message"

PROTOCOLS: dict[tuple[str, str], Protocol] = {
    ("task", "fedavg"): _TASK,
    ("task", "local"): _TASK,  # the FedAvg loop over an empty shared set
    ("task", "split"): Protocol(_SPLIT, _SPLIT, "pwff_app.task_tuning.fedbert.server:run_fedbert", "accuracy"),
    ("instruct", "fedavg"): Protocol("pwff_app.instruct.client:handle_pfit_train",
                                     "pwff_app.instruct.client:handle_pfit_evaluate",
                                     "pwff_app.instruct.server:run_pfit", "reward"),
}


def protocol_of(spec: MethodSpec) -> Protocol:
    """The code that runs a method."""
    return PROTOCOLS[(spec.family, spec.protocol)]
