"""The one place that says, per method, what is trained, what is sent and what is kept.

A model's trainable parameters fall into named *groups* (see :func:`param_group`). A method
is a :class:`MethodSpec`: which modules the model gets, which groups a client trains, and
which of those it shares (uploads; the server aggregates and broadcasts them). Whatever a
client trains but does not share is private: it stays on the client, in no message and no log.
Baselines are rows of :data:`METHODS`, not forks of the code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

# Parameter groups of the task-tuning model (pwff_app.task_tuning.model), matched on parameter names.
_GROUP_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("lora", re.compile(r"\.lora_(A|B)\.")),
    ("adapter", re.compile(r"\.adapter\.")),
    ("head", re.compile(r"^head\.")),
)
GROUPS = ("adapter", "lora", "head", "backbone")


def param_group(name: str) -> str:
    """Group of a parameter name: ``adapter``, ``lora``, ``head`` or ``backbone``."""
    for group, pattern in _GROUP_PATTERNS:
        if pattern.search(name):
            return group
    return "backbone"


@dataclass(frozen=True)
class MethodSpec:
    """What a method trains, sends and keeps.

    Attributes:
        name: the run-config value of ``method``.
        family: ``task`` (encoder classification) or ``instruct`` (causal LM with PPO).
        modules: modules inserted into the pretrained model (``adapter``, ``lora``).
        trained: parameter groups a client updates locally.
        shared: groups uploaded by clients and aggregated by the server (subset of trained).
        personal_lora: LoRA rank and depth follow each client's resource level; only possible
            when LoRA is private (shared tensors must have one shape on every client).
        protocol: ``fedavg`` (weighted FedAvg of ``shared``), ``local`` (no federation),
            ``split`` (split learning: activations up, gradients down; see pwff_app/split.py).
        summary: one line for docs and logs.
        instruct_overrides: instruct-family settings the method fixes (sparsity, reward
            objectives, LoRA, personal start); the user's ``instruct.*`` value for these keys
            must stay at its default (:func:`pwff_app.config.method_conflicts`).
    """

    name: str
    family: Literal["task", "instruct"]
    modules: frozenset[str]
    trained: frozenset[str]
    shared: frozenset[str]
    personal_lora: bool
    protocol: Literal["fedavg", "local", "split"]
    summary: str
    instruct_overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.shared <= self.trained:
            raise ValueError(f"{self.name}: shared groups {set(self.shared)} must be trained")
        if self.personal_lora and "lora" in self.shared:
            raise ValueError(f"{self.name}: a shared LoRA cannot have per-client shapes")

    @property
    def resumable(self) -> bool:
        """Whether ``resume`` works: the server checkpoints the task family's FedAvg loop only."""
        return self.family == "task" and self.protocol in ("fedavg", "local")

    @property
    def dp(self) -> bool:
        """Whether client-side DP applies: a task-family method that FedAvgs a shared part."""
        return self.family == "task" and self.protocol == "fedavg" and bool(self.shared)

    @property
    def private(self) -> frozenset[str]:
        """Groups trained but never sent."""
        return self.trained - self.shared

    @property
    def shared_only_view(self) -> bool:
        """Whether "the shared part alone" is a model of its own: a shared part beside a private
        LoRA (PFTT). It is the global shared part + the client's head with the LoRA path off."""
        return self.family == "task" and bool(self.shared) and "lora" in self.private

    def is_shared(self, name: str) -> bool:
        return param_group(name) in self.shared

    def is_trained(self, name: str) -> bool:
        return param_group(name) in self.trained

    def is_private(self, name: str) -> bool:
        return param_group(name) in self.private


def _spec(name: str, family: str, modules: set[str], trained: set[str], shared: set[str],
          personal_lora: bool, protocol: str, summary: str, **instruct_overrides: Any) -> MethodSpec:
    return MethodSpec(name, family, frozenset(modules), frozenset(trained), frozenset(shared),
                      personal_lora, protocol, summary, instruct_overrides)  # type: ignore[arg-type]


METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in [
        # Paper IV-D: shared adapters, private LoRA sized by resources. The head is private
        # too: the paper aggregates adapters only, and a per-client head is what absorbs
        # each client's label mix (FedPer, Arivazhagan et al. 2019).
        _spec("pftt", "task", {"adapter", "lora"}, {"adapter", "lora", "head"}, {"adapter"},
              True, "fedavg", "PFTT: shared adapters aggregated; LoRA and head private"),
        # Paper V-C, vanilla FL [1]: adapters and LoRA both uploaded and aggregated.
        _spec("vanilla-fl", "task", {"adapter", "lora"}, {"adapter", "lora", "head"},
              {"adapter", "lora", "head"}, False, "fedavg",
              "Vanilla FL: adapters, LoRA and head all aggregated"),
        # Paper V-C, FedLoRA [8]: LoRA only, aggregated.
        _spec("fedlora", "task", {"lora"}, {"lora", "head"}, {"lora", "head"}, False, "fedavg",
              "FedLoRA: LoRA and head aggregated, no adapters"),
        # Paper V-C, FedBert [3]: federated split learning (SplitFed-V2). The client bottom
        # (embeddings + first layers) is FedAvg'd; the server top is trained by the server.
        # This row is fedbert.train = "full"; pwff_app.task_tuning.fedbert.model.split_spec gives the other modes.
        _spec("fedbert", "task", set(), {"backbone", "head"}, {"backbone"}, False, "split",
              "FedBert: split learning; client bottoms FedAvg'd, server top trained in turn"),
        # Reference point: plain FedAvg of every weight, the usual Flower way.
        _spec("fedavg-full", "task", set(), {"backbone", "head"}, {"backbone", "head"}, False,
              "fedavg", "FedAvg of the full model (no PEFT)"),
        # Reference point: PFTT's model, no federation.
        _spec("local", "task", {"adapter", "lora"}, {"adapter", "lora", "head"}, set(), True,
              "local", "Local only: each client trains alone, nothing is sent"),
        # ---- instruct family (paper IV-C, Fig. 4; run by pwff_app/instruct). Groups on the causal LM:
        # "backbone" = the last two blocks (the only unfrozen LM weights), "lora" = LoRA on
        # their attention projections, "head" = the PPO value head (private: the critic of one
        # client's reward mix). The keyword overrides are what a method fixes of the instruct.*
        # settings: trainer (ppo on reward models | sft on Alpaca outputs), reward objectives,
        # how much of the attention update is sent (sparsity), LoRA, personal start, and whose
        # model is evaluated. Every method is evaluated with the same judges and training RMs.
        _spec("pfit", "instruct", set(), {"backbone", "head"}, {"backbone"}, False, "fedavg",
              "PFIT: PPO on the last two blocks; personalised rewards (w_help, w_safe per client); "
              "sparse attention update (s = instruct.sparsity, 0.4); evaluates the personal model"),
        _spec("pfl", "instruct", set(), {"backbone", "head"}, {"backbone"}, False, "fedavg",
              "PFL (paper V-B): PPO, personalised rewards, no sparse attention (dense upload)", sparsity=(0.0,)),
        _spec("sfl", "instruct", set(), {"backbone", "head"}, {"backbone"}, False, "fedavg",
              "SFL (paper V-B): PPO on the helpfulness reward model only (every client), 20% sparse attention",
              sparsity=(0.2,), reward_models="helpfulness", reward_weights=((1.0, 0.0),)),
        # Shepherd (Zhang et al. 2023, "Towards Building the Federated GPT"): supervised LoRA
        # instruction tuning on each client's Alpaca (instruction, output) pairs, FedAvg of the
        # LoRA, no reward model in training, nothing private; every client is evaluated with
        # the aggregated global LoRA. LoRA on the attention projections (q, k, v, o) of the
        # last two blocks: the blocks the other methods train (the paper's LoRA is on attention).
        _spec("shepherd", "instruct", {"lora"}, {"lora"}, {"lora"}, False, "fedavg",
              "Shepherd (Zhang et al. 2023): supervised LoRA (last two blocks' attention) on Alpaca outputs, "
              "FedAvg'd; no reward in training; evaluates the global",
              trainer="sft", eval_model="global", sparsity=(0.0,), mu=0.0, use_lora=True, personal_start=False),
    ]
}
