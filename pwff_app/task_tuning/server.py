"""Server side of task tuning for the FedAvg-style and local methods: Flower's strategy over the shared part."""

from __future__ import annotations

from typing import Any

from flwr.app import Array, ArrayRecord
from flwr.serverapp import Grid

from pwff_app.compression.server import CompressionPlan
from pwff_app.config import RunConfig
from pwff_app.federation.checkpoint import checkpoint_meta
from pwff_app.federation.checks import example_bounds
from pwff_app.federation.privacy import with_dp
from pwff_app.federation.results import RunRecorder
from pwff_app.federation.roster import Roster, RoundSampler
from pwff_app.federation.strategy import AGGREGATORS
from pwff_app.task_tuning.model import count_params, group_params
from pwff_app.task_tuning.train import build_model_for


def run_fedavg(grid: Grid, cfg: RunConfig, recorder: RunRecorder, resumed: ArrayRecord | None,
               roster: Roster) -> dict[str, Any]:
    """Run the configured aggregator over the method's shared parameters; returns the summary block.

    ``resumed``: the checkpointed global arrays when resuming (``recorder`` then holds the
    rounds already done). ``roster``: node -> client, fixed before round 1. ``local`` runs the
    same loop with an empty shared set: nothing travels, every client trains alone, and the
    evaluation rounds are measured alike.
    """
    spec, agg = cfg.spec, cfg.aggregation
    model = build_model_for(cfg, client_id=None)
    initial = resumed or ArrayRecord({k: Array(v) for k, v in group_params(model, spec.shared).items()})
    done = len(recorder.rounds)
    strategy = AGGREGATORS[agg.aggregator](
        recorder=recorder, sampler=RoundSampler.for_run(cfg, roster, cfg.task.num_rounds, grid),
        example_bounds=example_bounds(cfg), min_survivors=agg.min_survivors,
        max_update_norm=agg.max_update_norm, round_offset=done, checkpoint_meta=checkpoint_meta(cfg),
        compression=CompressionPlan(cfg.compression, cfg.wireless, recorder.client),
        global_eval=cfg.task.global_eval, shared_only=spec.shared_only_view,
        min_train_nodes=cfg.num_clients, min_evaluate_nodes=cfg.num_clients, min_available_nodes=cfg.num_clients,
        **({"beta": agg.trim_fraction} if agg.aggregator == "trimmed-mean" else {}))
    strategy, privacy = with_dp(strategy, cfg.dp, cfg.round_size)
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.task.num_rounds - done)
    return {
        "num_clients": cfg.num_clients,
        "params": {"shared": count_params(model, spec.shared), "private": recorder.private_params()},
        "aggregator": agg.aggregator,
        "privacy": privacy,
    }
