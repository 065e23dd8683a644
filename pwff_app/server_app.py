"""The ServerApp: validate the config, prepare results, the roster and the link, run the method's server loop."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pwff_app.config import RunConfig
from pwff_app.federation.checkpoint import checkpoint_meta, resume_point
from pwff_app.federation.results import RunRecorder, default_run_name
from pwff_app.federation.roster import query_roster
from pwff_app.provenance import code_version, run_key
from pwff_app.protocols import protocol_of
from pwff_app.wireless.link import WirelessGrid

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = RunConfig.from_run_config(context.run_config)  # every problem, before any folder exists
    protocol = protocol_of(cfg.spec)
    protocol.check_sources(cfg)  # data and models can be had: fail in seconds, before any folder
    out_dir = cfg.results_dir / (cfg.run_name or default_run_name(cfg.method, cfg.seed))
    done, resumed = resume_point(out_dir, checkpoint_meta(cfg)) if cfg.resume else (0, None)
    if cfg.resume:
        print(f"[pwff] resuming {out_dir} after round {done}", flush=True)
    recorder = RunRecorder(out_dir, cfg.method, score_key=protocol.score_key, keep_rounds=done)
    roster = query_roster(grid, cfg.num_clients, recorder)  # node -> client, fixed before round 1
    if cfg.wireless.enabled:
        # The downlink wraps the Grid; the uplink is the ClientApp's mod.
        grid = WirelessGrid(grid, cfg.wireless, roster, num_clients=cfg.num_clients)
        recorder.extra["wireless"] = grid.round_stats
    summary = protocol.run_server(grid, cfg, recorder, resumed, roster)
    wireless = grid.summary_block() if cfg.wireless.enabled else {"enabled": False}
    path = recorder.finish({**summary, "wireless": wireless, "config": dict(cfg.raw),
                            "run_key": run_key(cfg), "code": code_version()})  # what produced these results
    print(f"[pwff] results: {path}", flush=True)
