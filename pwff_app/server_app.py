"""The ServerApp: build the method's shared parameters, run the strategy, write results."""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp

from pwff_app.config import RunConfig
from pwff_app.methods import METHODS
from pwff_app.models import count_params, group_params
from pwff_app.results import RunRecorder, default_run_name
from pwff_app.strategies import PartialFedAvg
from pwff_app.task import build_model_for

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_run_config(context.run_config)
    spec = METHODS[cfg.method]
    out_dir = cfg.results_dir / (cfg.run_name or default_run_name(cfg.method, cfg.seed))
    recorder = RunRecorder(out_dir, cfg.method, score_key="accuracy")

    model = build_model_for(cfg, client_id=None)
    initial = ArrayRecord({k: Array(v) for k, v in group_params(model, spec.shared).items()})
    strategy = PartialFedAvg(
        recorder=recorder,
        min_train_nodes=cfg.num_clients,
        min_evaluate_nodes=cfg.num_clients,
        min_available_nodes=cfg.num_clients,
    )
    strategy.start(grid=grid, initial_arrays=initial, num_rounds=cfg.task.num_rounds)

    private = {}
    for record in recorder.rounds:
        for cid, c in record["clients"].items():
            if "private_params" in c:
                private[cid] = c["private_params"]
    path = recorder.finish({
        "num_clients": cfg.num_clients,
        "params": {"shared": count_params(model, spec.shared), "private": private},
        "config": dict(cfg.raw),
    })
    print(f"[pwff] results: {path}", flush=True)
