"""`pwff sweep`: the grid, the variants, the table and plots (no `flwr run`: fake finished runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pwff_app.experiments import cli, reproduce, sweep, tables
from pwff_app.experiments.profiles import Variant


def test_grid_and_values_parse_as_the_run_config_reads_them() -> None:
    assert sweep.parse_grid("wireless.deadline-s=0,20,60") == ("wireless.deadline-s", [0, 20, 60])
    assert sweep.parse_grid("selection=random,best-channel") == ("selection", ["random", "best-channel"])
    assert sweep.parse_grid("wireless.snr-db=5,0;10,5") == ("wireless.snr-db", ["5,0", "10,5"])
    assert sweep.parse_value("2.5") == 2.5 and sweep.parse_value("true") is True and sweep.parse_value("uma") == "uma"
    for bad in ("wireless.deadline-s", "=1,2", "x=1,1"):
        with pytest.raises(ValueError):
            sweep.parse_grid(bad)


def test_one_variant_per_value_with_the_base_under_it() -> None:
    variants = sweep.sweep_variants("pftt", "wireless.deadline-s", [0, 20.5], {"num-clients": 8})
    assert variants == [Variant("deadline-s=0", "pftt", {"num-clients": 8, "wireless.deadline-s": 0}),
                        Variant("deadline-s=20.5", "pftt", {"num-clients": 8, "wireless.deadline-s": 20.5})]
    with pytest.raises(ValueError, match="also in --base"):
        sweep.sweep_variants("pftt", "num-clients", [4, 8], {"num-clients": 8})


def _fake_run(runs_dir: Path, name: str, seed: int, acc: list[float], delays: list[tuple[float, float]],
              late: int, jain: float) -> None:
    """A finished run: two clients a round with (downlink, uplink) delays, 1 J uplink energy a round."""
    d = runs_dir / f"{name}-seed{seed}"
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({
        "method": "pftt", "num_rounds": len(acc), "num_clients": 2, "accuracy": {"mean": acc[-1]},
        "wireless": {"rounds": len(acc), "fairness": {"jain_updates_delivered": jain}, "config": {}},
        "config": {"seed": seed}}))
    rounds = []
    for i, a in enumerate(acc):
        clients = {str(c): {"delay_down_s": down, "delay_up_s": up} for c, (down, up) in enumerate(delays)}
        rounds.append({"round": i + 1, "accuracy_mean": a, "wireless": {
            "clients": clients, "latency_s": 5.0, "energy_up_j": 1.0, "participants": 2, "late": late}})
    (d / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))


def test_sweep_table_and_plots_from_finished_runs(tmp_path: Path) -> None:
    variants = sweep.sweep_variants("pftt", "wireless.deadline-s", [0, 3], {})
    for seed in (1, 2):
        # No deadline: the slowest client's air time is 1 + 6 = 7 s, capped by the 5 s latency.
        _fake_run(tmp_path / "runs", "deadline-s=0", seed, [0.5, 0.6 + seed / 100], [(1.0, 6.0), (1.0, 2.0)], 0, 1.0)
        _fake_run(tmp_path / "runs", "deadline-s=3", seed, [0.5, 0.55], [(1.0, 1.0), (0.5, 1.0)], 1, 0.5)
    rows, _ = reproduce.tabulate(tmp_path, variants, [1, 2], "quick", "sweep")
    files = sweep.write_sweep(tmp_path, rows, variants, "wireless.deadline-s", [0, 3])
    free, tight = rows
    assert free["air_time_s_mean"] == pytest.approx(10.0) and tight["air_time_s_mean"] == pytest.approx(4.0)
    assert free["uplink_energy_j_mean"] == pytest.approx(2.0)
    assert free["late_rate_mean"] == 0 and tight["late_rate_mean"] == pytest.approx(0.5)
    assert free["accuracy_mean"] == pytest.approx(0.615) and tight["jain_delivered_mean"] == 0.5
    assert [c[:3] for c in free["link_curve"]] == [(1, 5.0, 1.0), (2, 10.0, 2.0)]
    text = (tmp_path / "sweep.md").read_text()
    assert text.index("`deadline-s=0`") < text.index("`deadline-s=3`") and "50% ± 0%" in text
    assert {f.name for f in files} == {"sweep.md", "sweep_accuracy.png", "accuracy_vs_airtime.png",
                                       "accuracy_vs_uplink_energy.png"}
    assert all(f.stat().st_size > 0 for f in files)


def test_cli_sweep_runs_the_variants_and_writes_the_sweep(monkeypatch, tmp_path, capsys) -> None:
    seen = {}

    def fake(out, variants, profile, seeds, app_dir, data_dir, client_cpus, client_gpus, title):
        seen.update(variants=variants, profile=profile, seeds=seeds)
        for v in variants:
            for s in seeds:
                _fake_run(Path(out) / "runs", v.name, s, [0.5], [(1.0, 1.0)], 0, 1.0)
        return reproduce.ReproduceResult(Path(out))

    monkeypatch.setattr(reproduce, "reproduce", fake)
    rc = cli.main(["sweep", "--method", "pftt", "--set", "wireless.deadline-s=0,20,60", "--seeds", "2", "--base",
                   "wireless.scenario=uma", "num-clients=8", "clients-per-round=4", "--quick", "--out", str(tmp_path)])
    assert rc == 0 and seen["profile"] == "quick" and seen["seeds"] == [42, 43]
    assert [v.overrides for v in seen["variants"]] == [
        {"wireless.scenario": "uma", "num-clients": 8, "clients-per-round": 4, "wireless.deadline-s": d}
        for d in (0, 20, 60)]
    assert (tmp_path / "sweep.md").exists() and "deadline-s=60" in capsys.readouterr().out


def test_cli_sweep_refuses_a_value_the_config_refuses(capsys) -> None:
    assert cli.main(["sweep", "--set", "selection=random,best", "--quick"]) == 2
    assert "'selection' must be one of" in capsys.readouterr().err


def test_air_time_is_the_slowest_link_capped_by_the_round() -> None:
    rnd = {"clients": {"0": {"delay_down_s": 1.0, "delay_up_s": 2.0}, "1": {"delay_down_s": 0.5, "delay_up_s": 9.0}},
           "latency_s": 20.0}
    assert tables.air_time_s(rnd) == 9.5
    assert tables.air_time_s({**rnd, "latency_s": 4.0}) == 4.0
