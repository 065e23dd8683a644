"""`pwff reproduce pfit`: profiles, CLI, and the PFIT comparison table and plots, from real
(tiny, in-process) run folders and from exact fake ones (no `flwr run`)."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from pwff_app.experiments import cli, launch, profiles, reproduce, tables
from tests.test_pfit import _rc, _run, tiny_pfit  # noqa: F401  (tiny_pfit: fixture)
from tests.test_reproduce import _launcher

# method -> seed -> (final judge combined, uplink bytes / round, judge curve by round)
FAKE = {
    "pfit": {1: (0.30, 600, [0.0, 0.1, 0.30]), 2: (0.50, 600, [0.0, 0.2, 0.50])},
    "pfl": {1: (0.20, 1000, [0.0, 0.1, 0.20]), 2: (0.30, 1000, [0.0, 0.2, 0.30])},
}


def _fake_pfit_run(runs_dir: Path, method: str, seed: int, judge: float, up: int, curve: list[float]) -> None:
    d = runs_dir / f"{method}-seed{seed}"
    d.mkdir(parents=True)
    means = {"judge_combined": judge, "judge_helpfulness": judge + 1, "judge_safety": judge - 1,
             "combined": 2 * judge, "helpfulness": 0.1, "safety": -0.1, "kl": 0.5, "response_tokens": 20.0,
             "refusal_share": 0.25}
    summary = {"method": method, "num_rounds": len(curve) - 1, "num_clients": 2,
               "reward": {"mean": 2 * judge, "means": means, "per_client": {}},
               "comm": {"uplink_bytes_per_round": {"total": up}, "downlink_bytes_per_round": {"total": 2 * up}},
               "wireless": {"rounds": len(curve) - 1, "ergodic_uplink_delay_s": up / 1000, "total_energy_j": 4.0},
               "config": {"seed": seed, "method": method}}
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "rounds.jsonl").write_text("".join(
        json.dumps({"round": r, "uplink_bytes": up if r else 0,
                    "clients": {"0": {"judge_combined": v - 0.1}, "1": {"judge_combined": v + 0.1}}}) + "\n"
        for r, v in enumerate(curve)))


def test_pfit_table_means_stds_columns_and_plots(tmp_path: Path) -> None:
    for method, seeds in FAKE.items():
        for seed, values in seeds.items():
            _fake_pfit_run(tmp_path / "runs", method, seed, *values)
    rows, files = reproduce.tabulate(tmp_path, ["pfit", "pfl"], [1, 2], "pfit-quick", tables.PFIT_TITLE)
    by = {r["method"]: r for r in rows}
    assert by["pfit"]["judge_combined_mean"] == pytest.approx(0.4)
    assert by["pfit"]["judge_combined_std"] == pytest.approx(statistics.stdev([0.3, 0.5]))
    assert by["pfl"]["train_rm_reward_mean"] == pytest.approx(0.5)
    assert by["pfit"]["uplink_bytes_per_round_mean"] == 600 and by["pfit"]["accuracy_mean"] is None
    assert by["pfit"]["judge_curve"][2] == (2, pytest.approx(0.4), pytest.approx(statistics.stdev([0.3, 0.5])), 2)
    names = {p.name for p in files}
    assert {"comparison.csv", "comparison.md", "judge_reward_vs_round.png", "uplink_bytes_per_round.png"} <= names
    assert "accuracy_vs_round.png" not in names
    header = next(csv.reader((tmp_path / "comparison.csv").open()))
    assert "judge_combined_mean" in header and "judge_safety_std" in header and "accuracy_mean" not in header
    md = (tmp_path / "comparison.md").read_text()
    assert md.startswith("# PFIT vs contenders (Fig. 4)") and "judge reward (combined)" in md
    assert "| `pfit` | 0.4 ± 0.14 |" in md and "refusal-like" in md and "25% ± 0%" in md
    printed = tables.markdown_table(rows)  # what reproduce and report print: the judge columns first
    assert printed.startswith("| method | judge reward (combined) |") and "| `pfit` | 0.4 ± 0.14 |" in printed


def test_pfit_profiles_validate_for_every_method() -> None:
    for profile in ("pfit-quick", "pfit-full"):
        for method in profiles.PFIT_METHODS:
            rc = profiles.build_run_config(method, 42, Path("/tmp/x"), profile)
            cfg = reproduce.expected_config(reproduce.APP_DIR, rc, None)  # the config the ServerApp will get
            assert cfg.method == method
    quick = reproduce.expected_config(reproduce.APP_DIR, profiles.build_run_config("pfit", 1, Path("/t"), "pfit-quick"),
                                      None)
    assert (quick.num_clients, quick.instruct.num_rounds, quick.instruct.eval_split) == (2, 3, "test")
    full = reproduce.expected_config(reproduce.APP_DIR, profiles.build_run_config("pfit", 1, Path("/t"), "pfit-full"),
                                     None)
    assert (full.num_clients, full.instruct.num_rounds, full.wireless.snr_db, full.wireless.enabled) == (
        4, 40, (5.0,), True)


def test_cli_reproduce_pfit(monkeypatch, tmp_path: Path) -> None:
    seen = {}

    def fake(out, variants, profile, seeds, app_dir, data_dir, client_cpus, client_gpus, title):
        seen.update(out=out, profile=profile, seeds=seeds, methods=variants, title=title)
        return reproduce.ReproduceResult(Path(out))

    monkeypatch.setattr(reproduce, "reproduce", fake)
    assert cli.main(["reproduce", "pfit", "--quick", "--out", str(tmp_path)]) == 0
    assert seen == {"out": tmp_path, "profile": "pfit-quick", "seeds": [42, 43, 44],
                    "methods": ["pfit", "pfl", "sfl", "shepherd"], "title": tables.PFIT_TITLE}
    assert cli.main(["reproduce", "pfit", "--methods", "pfit", "shepherd"]) == 0
    assert seen["profile"] == "pfit-full" and seen["out"] == Path("pwff-reproduce") / "pfit-full"
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "pfit", "--methods", "pftt"])


def test_run_all_pfit_methods_resume(tmp_path: Path) -> None:
    calls: list[str] = []
    resources: list[str] = []
    fake = _launcher(tmp_path / "runs", calls, resources_seen=resources)
    res = reproduce.run_all(tmp_path, profiles.PFIT_METHODS, [42], "pfit-quick", launch=fake)
    assert [r.status for r in res] == ["done"] * 4 and len(calls) == 4
    assert "method='shepherd'" in calls[3] and "instruct.num-rounds=3" in calls[3]
    assert resources == [launch.federation_config(2)] * 4  # one SuperNode per client of the quick profile
    res = reproduce.run_all(tmp_path, profiles.PFIT_METHODS, [42], "pfit-quick", launch=fake)
    assert [r.status for r in res] == ["skipped"] * 4 and len(calls) == 4


def test_table_from_real_tiny_runs(tiny_pfit) -> None:
    """Run folders the instruct ServerApp really writes (tiny, in-process) tabulate with a std over seeds."""
    out = tiny_pfit / "out"
    for method in ("pfit", "shepherd"):
        for seed in (1, 2):
            rc = _rc(tiny_pfit, method, f"{method}-seed{seed}", num_rounds=1, lr=0.05)  # moves the tiny policy
            rc.update({"seed": seed, "results-dir": str(out / "runs")})
            _run(rc)
    rows, files = reproduce.tabulate(out, ["pfit", "shepherd"], [1, 2], "pfit-quick", tables.PFIT_TITLE)
    assert [r["method"] for r in rows] == ["pfit", "shepherd"] and all(r["n_seeds"] == 2 for r in rows)
    for row in rows:
        for key in ("judge_combined", "judge_helpfulness", "judge_safety", "train_rm_reward", "response_tokens"):
            assert row[f"{key}_mean"] is not None, (row["method"], key)
        assert row["kl_std"] > 0  # seeds train differently (shares, masks); the tiny stubs' scores barely move
        assert [r for r, *_ in row["judge_curve"]] == [0, 1]
        assert row["judge_curve"][0][2] == 0.0  # round 0: the same pretrained policy for every seed
    assert rows[0]["uplink_bytes_per_round_mean"] != rows[1]["uplink_bytes_per_round_mean"]
    assert (out / "judge_reward_vs_round.png").stat().st_size > 0
