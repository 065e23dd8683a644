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
        server: the server loop ``(grid, cfg, recorder, resumed, roster) -> summary block``;
            ``resumed`` holds the checkpointed global arrays when resuming, else None;
            ``roster`` maps node id -> client id (:mod:`pwff_app.federation.roster`).
        score_key: what ``rounds.jsonl`` and ``summary.json`` report per client.
        preflight: ``(cfg) -> list of what was checked``; raises a one-line
            :class:`~pwff_app.sources.SourceNotFoundError` when a data set or model of the
            family cannot be had. The server runs it before round 1 and before any folder.
        sent_masks: ``(msg, reply, context) -> {name: bool mask}`` of the reply arrays sent in
            packed form (the kept entries of a dense tensor); "" = every array is sent dense.
            The compression mod (:mod:`pwff_app.compression.mod`) takes updates in that form.
    """

    train: str
    evaluate: str
    server: str
    score_key: str
    preflight: str
    sent_masks: str = ""

    def masks(self, msg: Any, reply: Any, context: Any) -> dict[str, Any]:
        """:attr:`sent_masks` of a train reply ({} when every array is sent dense)."""
        return _load(self.sent_masks)(msg, reply, context) if self.sent_masks else {}

    def handler(self, kind: str) -> Callable[..., Any]:
        """The client handler for ``kind`` (``train`` or ``evaluate``)."""
        return _load(getattr(self, kind))

    def run_server(self, *args: Any) -> dict[str, Any]:
        return _load(self.server)(*args)

    def check_sources(self, cfg: Any) -> None:
        """Run the family's preflight: one ``[pwff] preflight`` line, or the one-line error, then raise.

        The ServerApp's exception ends the run as failed (Flower logs it, the simulation exits 700).
        """
        from pwff_app.sources import SourceNotFoundError

        try:
            checked = _load(self.preflight)(cfg)
        except SourceNotFoundError as err:
            print(f"[pwff] preflight failed: {err}", flush=True)
            raise
        print(f"[pwff] preflight ok: {'; '.join(checked)}", flush=True)


def _load(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


_TASK_PREFLIGHT = "pwff_app.task_tuning.data:preflight"
_TASK = Protocol("pwff_app.task_tuning.client:train", "pwff_app.task_tuning.client:evaluate",
                 "pwff_app.task_tuning.server:run_fedavg", "accuracy", _TASK_PREFLIGHT)
_SPLIT = "pwff_app.task_tuning.fedbert.client:handle_split_message"

PROTOCOLS: dict[tuple[str, str], Protocol] = {
    ("task", "fedavg"): _TASK,
    ("task", "local"): _TASK,  # the FedAvg loop over an empty shared set
    ("task", "split"): Protocol(_SPLIT, _SPLIT, "pwff_app.task_tuning.fedbert.server:run_fedbert", "accuracy",
                                _TASK_PREFLIGHT),
    ("instruct", "fedavg"): Protocol("pwff_app.instruct.client:handle_pfit_train",
                                     "pwff_app.instruct.client:handle_pfit_evaluate",
                                     "pwff_app.instruct.server:run_pfit", "reward",
                                     "pwff_app.instruct.runtime:preflight",
                                     "pwff_app.instruct.client:sent_masks"),
}


def protocol_of(spec: MethodSpec) -> Protocol:
    """The code that runs a method."""
    return PROTOCOLS[(spec.family, spec.protocol)]
