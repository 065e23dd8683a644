"""The ServerApp: build the method's shared parameters, run the strategy, write results."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

from pwff_app.federation.checkpoint import load_checkpoint
from pwff_app.config import ConfigError, RunConfig
from pwff_app.methods import METHODS
from pwff_app.task_tuning.model import count_params, group_params
from pwff_app.instruct.pfit import run_pfit
from pwff_app.federation.results import RunRecorder, default_run_name
from pwff_app.federation.strategy import AGGREGATORS
from pwff_app.task_tuning.fedbert.model import split_param_counts
from pwff_app.task_tuning.fedbert.server import run_split_learning
from pwff_app.task_tuning.train import build_model_for
from pwff_app.wireless.link import WirelessGrid

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_run_config(context.run_config)
    spec = METHODS[cfg.method]
    out_dir = cfg.results_dir / (cfg.run_name or default_run_name(cfg.method, cfg.seed))
    if spec.family == "instruct":
        if cfg.resume:
            raise ConfigError(f"run config: 'resume' is not supported for '{cfg.method}' (instruct methods) yet")
        recorder = RunRecorder(out_dir, cfg.method, score_key="reward")
        channel = cfg.wireless
        if channel.enabled:
            grid = WirelessGrid(grid, channel)
            recorder.extra["wireless"] = grid.round_stats
        summary = run_pfit(grid, cfg, context, recorder)
        path = recorder.finish({
            **summary,
            "wireless": grid.summary_block() if channel.enabled else {"enabled": False},
            "config": dict(cfg.raw),
        })
        print(f"[pwff] results: {path}", flush=True)
        return

    model = build_model_for(cfg, client_id=None)
    initial = ArrayRecord({k: Array(v) for k, v in group_params(model, spec.shared).items()})
    done = 0
    if cfg.resume:
        checkpoint = load_checkpoint(out_dir)
        if checkpoint is None:
            raise ConfigError(f"run config: 'resume' is set but {out_dir} holds no checkpoint")
        done, initial, meta = checkpoint
        if meta.get("method") != cfg.method or meta.get("seed") != cfg.seed:
            raise ConfigError(f"run config: checkpoint in {out_dir} is {meta}, not method={cfg.method} seed={cfg.seed}")
        print(f"[pwff] resuming {out_dir} after round {done}", flush=True)
    recorder = RunRecorder(out_dir, cfg.method, score_key="accuracy", keep_rounds=done)
    channel = cfg.wireless
    if channel.enabled:
        grid = WirelessGrid(grid, channel)
        recorder.extra["wireless"] = grid.round_stats

    wireless_block = grid.summary_block if channel.enabled else (lambda: {"enabled": False})

    if spec.protocol == "split":
        run_split_learning(grid, cfg, recorder, cfg.task.num_rounds)
        counts = split_param_counts(cfg)
        path = recorder.finish({
            "num_clients": cfg.num_clients,
            "params": {"shared": counts["client_bottom"], "server": counts["server_top"], "private": {}},
            "wireless": wireless_block(),
            "config": dict(cfg.raw),
        })
        print(f"[pwff] results: {path}", flush=True)
        return

    kwargs = {"beta": cfg.aggregation.trim_fraction} if cfg.aggregation.aggregator == "trimmed-mean" else {}
    strategy = AGGREGATORS[cfg.aggregation.aggregator](
        recorder=recorder,
        min_survivors=cfg.aggregation.min_survivors,
        max_update_norm=cfg.aggregation.max_update_norm,
        round_offset=done,
        checkpoint_meta={"method": cfg.method, "seed": cfg.seed},
        min_train_nodes=cfg.num_clients,
        min_evaluate_nodes=cfg.num_clients,
        min_available_nodes=cfg.num_clients,
        **kwargs,
    )
    privacy = {"enabled": False}
    if cfg.dp.noise_multiplier > 0:
        # Clipped on the client (dp_clipping_mod), noised on the server after aggregation.
        strategy = DifferentialPrivacyClientSideFixedClipping(
            strategy, noise_multiplier=cfg.dp.noise_multiplier, clipping_norm=cfg.dp.clipping_norm,
            num_sampled_clients=cfg.num_clients)
        privacy = {"enabled": True, "mechanism": "client-side fixed clipping + Gaussian noise (Flower)",
                   "noise_multiplier": cfg.dp.noise_multiplier, "clipping_norm": cfg.dp.clipping_norm,
                   "num_sampled_clients": cfg.num_clients}
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.task.num_rounds - done)

    path = recorder.finish({
        "num_clients": cfg.num_clients,
        "params": {"shared": count_params(model, spec.shared), "private": recorder.private_params()},
        "aggregator": cfg.aggregation.aggregator,
        "wireless": wireless_block(),
        "privacy": privacy,
        "config": dict(cfg.raw),
    })
    print(f"[pwff] results: {path}", flush=True)
