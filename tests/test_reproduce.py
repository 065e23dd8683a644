"""`pwff reproduce pftt`: aggregation, outputs, resume and CLI parsing (no `flwr run`)."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import pytest

from pwff_app.experiments import cli, launch, profiles, reproduce, tables

# method -> seed -> (final accuracy, uplink bytes/round, ergodic delay, total energy, per-round acc)
FAKE = {
    "pftt": {1: (0.80, 1000, 0.5, 6.0, [0.5, 0.7, 0.80]), 2: (0.90, 1000, 0.7, 9.0, [0.6, 0.8, 0.90])},
    "fedlora": {1: (0.60, 300, 0.1, 3.0, [0.4, 0.5, 0.60]), 2: (0.70, 500, 0.3, 6.0, [0.4, 0.6, 0.70])},
}


def _fake_run(runs_dir: Path, name: str, seed: int, acc: float, up: int, delay: float, energy: float,
              curve: list[float], key: str | None = None, method: str | None = None) -> Path:
    """A finished run folder of variant ``name`` (running ``method``, default ``name``); ``key`` is the
    summary's ``run_key`` (None: a run from before keys)."""
    method = method or name
    d = runs_dir / f"{name}-seed{seed}"
    d.mkdir(parents=True)
    summary = {
        "method": method, "num_rounds": len(curve), "num_clients": 2,
        "accuracy": {"mean": acc, "per_client": {"0": acc, "1": acc}},
        "comm": {"uplink_bytes_per_round": {"per_client": {"0": up // 2, "1": up // 2}, "total": up},
                 "downlink_bytes_per_round": {"per_client": {"0": up, "1": up}, "total": 2 * up}},
        "wireless": {"rounds": len(curve), "ergodic_uplink_delay_s": delay, "mean_uplink_delay_s": 10 * delay,
                     "median_uplink_delay_s": delay / 2, "total_energy_j": energy, "mean_round_latency_s": 1.0},
        "config": {"seed": seed, "method": method},
        **({"run_key": key} if key else {}),
    }
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "rounds.jsonl").write_text("".join(
        json.dumps({"round": i + 1, "accuracy_mean": a, "uplink_bytes": up, "downlink_bytes": 2 * up,
                    "wireless": {"latency_s": 1.0, "mean_delay_up_s": delay, "energy_j": energy / len(curve)}}) + "\n"
        for i, a in enumerate(curve)))
    return d


@pytest.fixture
def fake_out(tmp_path: Path) -> Path:
    for method, seeds in FAKE.items():
        for seed, values in seeds.items():
            _fake_run(tmp_path / "runs", method, seed, *values)
    (tmp_path / "runs" / "pftt-seed3").mkdir()  # unfinished run: no summary.json, ignored
    return tmp_path


def test_aggregate_exact_means_and_stds(fake_out):
    rows = tables.aggregate_runs(tables.find_run_dirs(fake_out))
    assert [r["method"] for r in rows] == ["pftt", "fedlora"]  # ALL_METHODS order
    pftt, fedlora = rows
    assert pftt["n_seeds"] == 2 and pftt["seeds"] == [1, 2]
    assert pftt["accuracy_mean"] == pytest.approx(0.85)
    assert pftt["accuracy_std"] == pytest.approx(statistics.stdev([0.8, 0.9]))  # sample std, ~0.0707
    assert pftt["uplink_bytes_per_round_mean"] == 1000 and pftt["uplink_bytes_per_round_std"] == 0
    assert fedlora["uplink_bytes_per_round_mean"] == 400
    assert fedlora["uplink_bytes_per_round_std"] == pytest.approx(141.42135623730951)
    assert fedlora["downlink_bytes_per_round_mean"] == 800
    assert pftt["ergodic_uplink_delay_s_mean"] == pytest.approx(0.6)
    assert pftt["ergodic_uplink_delay_s_std"] == pytest.approx(0.1414213562)
    assert pftt["mean_uplink_delay_s_mean"] == pytest.approx(6.0)
    assert pftt["median_uplink_delay_s_mean"] == pytest.approx(0.3)
    # energy per round = total / rounds: (2, 3) J and (1, 2) J
    assert pftt["energy_per_round_j_mean"] == pytest.approx(2.5)
    assert fedlora["energy_per_round_j_mean"] == pytest.approx(1.5)
    assert fedlora["energy_per_round_j_std"] == pytest.approx(statistics.stdev([1.0, 2.0]))
    # curve: (round, mean, std, n)
    assert [c[0] for c in pftt["curve"]] == [1, 2, 3]
    assert pftt["curve"][0][1] == pytest.approx(0.55) and pftt["curve"][2][1] == pytest.approx(0.85)
    assert pftt["curve"][1][2] == pytest.approx(statistics.stdev([0.7, 0.8])) and pftt["curve"][1][3] == 2


def test_single_seed_std_is_zero_and_missing_is_none(tmp_path):
    d = _fake_run(tmp_path / "runs", "local", 7, 0.5, 0, 0.0, 0.0, [0.5])
    s = json.loads((d / "summary.json").read_text())
    s["wireless"]["ergodic_uplink_delay_s"] = None
    (d / "summary.json").write_text(json.dumps(s))
    (row,) = tables.aggregate_runs([d])
    assert row["accuracy_mean"] == 0.5 and row["accuracy_std"] == 0.0 and row["n_seeds"] == 1
    assert row["ergodic_uplink_delay_s_mean"] is None and row["uplink_bytes_per_round_mean"] == 0


def test_outputs_written(fake_out):
    rows = tables.aggregate_runs(tables.find_run_dirs(fake_out))
    files = tables.write_outputs(fake_out, rows)
    names = {p.name for p in files}
    assert {"comparison.csv", "comparison.md", "accuracy_vs_round.png", "uplink_bytes_per_round.png",
            "uplink_delay_per_round.png"} <= names
    with (fake_out / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["pftt", "fedlora"]
    assert float(table[0]["accuracy_mean"]) == pytest.approx(0.85) and table[0]["n_seeds"] == "2"
    md = (fake_out / "comparison.md").read_text()
    assert "| `pftt` | 0.8500 ± 0.0707 | 1,000 ± 0 |" in md and "ergodic" in md
    for p in files:
        if p.suffix == ".png":
            data = p.read_bytes()
            assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def _key(run_config: str, data_dir: Path | None = None) -> str:
    """The run key the ServerApp would write for this run config (what a real launch leaves)."""
    return reproduce.expected_run_key(reproduce.APP_DIR, run_config, data_dir)


def _launcher(runs_dir: Path, calls: list[str], fail: tuple[str, ...] = (), key=_key,
              resources_seen: list[str] | None = None):
    """A stand-in for `flwr run`: writes the run folder with ``key(run_config)``; ``fail`` methods exit 1."""
    resources_seen = [] if resources_seen is None else resources_seen

    def fake_launch(app_dir, run_config, flwr_home, log, data_dir, timeout_s, ports=None, resources=None):
        calls.append(run_config)
        resources_seen.append(resources)
        method = run_config.split("method='")[1].split("'")[0]
        name = run_config.split("run-name='")[1].split("-seed")[0]
        seed = int(run_config.split(" seed=")[1].split()[0])
        if method in fail:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("boom: something broke\n")
            return 1  # a failed run is reported, the others go on
        shutil.rmtree(runs_dir / f"{name}-seed{seed}", ignore_errors=True)  # the server overwrites
        _fake_run(runs_dir, name, seed, 0.7, 500, 0.2, 3.0, [0.7], key=key(run_config, data_dir), method=method)
        return 0

    return fake_launch


def test_resume_skips_finished_runs(tmp_path):
    _fake_run(tmp_path / "runs", "pftt", 42, 0.8, 1000, 0.5, 6.0, [0.8],
              key=_key(profiles.build_run_config("pftt", 42, tmp_path / "runs", "quick")))
    calls = []
    fake_launch = _launcher(tmp_path / "runs", calls, fail=("fedlora",))

    res = reproduce.run_all(tmp_path, ["pftt", "fedlora", "local"], [42, 43], "quick", launch=fake_launch)
    status = {(r.name, r.seed): r.status for r in res}
    assert status == {("pftt", 42): "skipped", ("fedlora", 42): "failed", ("local", 42): "done",
                      ("pftt", 43): "done", ("fedlora", 43): "failed", ("local", 43): "done"}
    assert len(calls) == 5
    failed = [r for r in res if r.status == "failed"][0]
    assert "boom" in failed.error and failed.log.exists()
    # the run config carries the profile, method, seed, results dir and run name
    rc = calls[0]
    assert "task.num-rounds=3" in rc and "method='fedlora'" in rc and "seed=42" in rc
    assert f"results-dir='{(tmp_path / 'runs').resolve()}'" in rc and "run-name='fedlora-seed42'" in rc
    # second pass: everything finished is skipped, only the failed ones are retried
    calls.clear()
    res = reproduce.run_all(tmp_path, ["pftt", "fedlora", "local"], [42, 43], "quick", launch=fake_launch)
    assert len(calls) == 2 and all("fedlora" in c for c in calls)


def test_full_profile_is_the_paper():
    rc = profiles.build_run_config("pftt", 1, Path("/tmp/x"), "full")
    assert "task.num-rounds=40" in rc and "max-train-samples" not in rc and "wireless" not in rc


def test_cli_reproduce_quick(monkeypatch, tmp_path):
    seen = {}

    def fake(out, variants, profile, seeds, app_dir, data_dir, client_cpus, client_gpus, title):
        seen.update(out=out, profile=profile, seeds=seeds, methods=variants, app_dir=app_dir, data_dir=data_dir,
                    resources=launch.federation_config(4, client_cpus, client_gpus))
        return reproduce.ReproduceResult(Path(out))

    monkeypatch.setattr(reproduce, "reproduce", fake)
    rc = cli.main(["reproduce", "pftt", "--quick", "--methods", "pftt", "fedlora", "--seeds", "2",
                   "--out", str(tmp_path), "--data-dir", "/data"])
    assert rc == 0
    assert seen == {"out": tmp_path, "profile": "quick", "seeds": [42, 43], "methods": ["pftt", "fedlora"],
                    "app_dir": None, "data_dir": Path("/data"), "resources": launch.FEDERATION_CONFIG}
    seen.clear()
    assert cli.main(["reproduce", "pftt", "--seed-base", "1", "--client-cpus", "2", "--client-gpus", "0.25"]) == 0
    assert seen["profile"] == "full" and seen["seeds"] == [1, 2, 3] and seen["methods"] == list(reproduce.ALL_METHODS)
    assert seen["resources"] == "num-supernodes=4 client-resources-num-cpus=2 client-resources-num-gpus=0.25"


def test_cli_adapter_widths_and_medium_profile(monkeypatch, tmp_path, capsys):
    seen = {}

    def fake(out, variants, profile, seeds, app_dir, data_dir, client_cpus, client_gpus, title):
        seen.update(out=out, profile=profile, variants=variants, title=title)
        return reproduce.ReproduceResult(Path(out))

    monkeypatch.setattr(reproduce, "reproduce", fake)
    # The width sweep: PFTT once per width, beside FedLoRA and local (the defaults with widths).
    assert cli.main(["reproduce", "pftt", "--quick", "--adapter-sizes", "8", "16", "32", "64"]) == 0
    assert seen["profile"] == "quick" and seen["out"] == Path("pwff-reproduce/pftt-widths-quick")
    assert seen["variants"] == [profiles.Variant(f"pftt-a{n}", "pftt", {"task.adapter-size": n})
                                for n in (8, 16, 32, 64)] + ["fedlora", "local"]
    assert seen["title"] == tables.WIDTHS_TITLE
    rc = profiles.build_run_config(seen["variants"][0], 42, tmp_path / "runs", "quick")
    assert "task.adapter-size=8" in rc and "method='pftt'" in rc and "run-name='pftt-a8-seed42'" in rc
    # --methods names the contenders; pftt among them is replaced by the widths.
    assert cli.main(["reproduce", "pftt", "--adapter-sizes", "16", "--methods", "pftt", "vanilla-fl"]) == 0
    assert [getattr(v, "name", v) for v in seen["variants"]] == ["pftt-a16", "vanilla-fl"]
    assert seen["profile"] == "full"
    # The medium profile and its four methods.
    assert cli.main(["reproduce", "pftt", "--medium"]) == 0
    assert seen["profile"] == "medium" and seen["variants"] == list(profiles.MEDIUM_METHODS)
    assert seen["out"] == Path("pwff-reproduce/pftt-medium")
    medium = profiles.PROFILES["medium"]
    assert medium["task.num-rounds"] >= 10 and medium["task.max-train-samples"] == 200
    assert set(profiles.MEDIUM_METHODS) == {"pftt", "local", "fedlora", "vanilla-fl"}
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "pftt", "--quick", "--medium"])
    assert "not allowed with" in capsys.readouterr().err
    assert cli.main(["reproduce", "pftt", "--adapter-sizes", "0"]) == 2


def test_cli_rejects_unknown_method(capsys):
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "pftt", "--methods", "nope"])


def test_cli_train_rewards_forwards(monkeypatch):
    from pwff_app.instruct import rewards

    got = []
    monkeypatch.setattr(rewards, "main", lambda argv: got.append(argv) or 0)
    assert cli.main(["train-rewards", "--help-me", "x"]) == 0
    assert got == [["--help-me", "x"]]


def test_cli_aggregate_only(fake_out, capsys):
    rc = cli.main(["reproduce", "pftt", "--aggregate-only", "--out", str(fake_out), "--seeds", "2",
                   "--seed-base", "1"])
    assert rc == 0 and (fake_out / "comparison.md").exists()
    assert "`fedlora`" in capsys.readouterr().out


# ---- runs keyed by what produced them --------------------------------------------------------


def test_run_with_another_config_is_rerun_never_reused(tmp_path):
    calls: list[str] = []
    launch = _launcher(tmp_path / "runs", calls)
    first = reproduce.run_all(tmp_path, ["pftt"], [42], "quick", launch=launch)
    assert [r.status for r in first] == ["done"] and len(calls) == 1
    assert [r.status for r in reproduce.run_all(tmp_path, ["pftt"], [42], "quick", launch=launch)] == ["skipped"]
    # The same run name under a changed config (here one learning rate): rerun, the old folder set aside.
    lr = profiles.Variant("pftt", "pftt", {"task.lr": 0.01})
    changed = reproduce.run_all(tmp_path, [lr], [42], "quick", launch=launch)
    assert [r.status for r in changed] == ["done"] and len(calls) == 2 and "task.lr=0.01" in calls[-1]
    (stale,) = (tmp_path / "stale").iterdir()
    assert stale.name.startswith("pftt-seed42-") and (stale / "summary.json").exists()
    summary = json.loads((tmp_path / "runs" / "pftt-seed42" / "summary.json").read_text())
    assert summary["run_key"] == _key(calls[-1]) != _key(calls[0])
    again = reproduce.run_all(tmp_path, [lr], [42], "quick", launch=launch)
    assert [r.status for r in again] == ["skipped"] and len(calls) == 2
    # Another profile or another data folder is another config too.
    assert [r.status for r in reproduce.run_all(tmp_path, ["pftt"], [42], "full", launch=launch)] == ["done"]
    data = tmp_path / "data"
    data.mkdir()
    rerun = reproduce.run_all(tmp_path, ["pftt"], [42], "full", data_dir=data, launch=launch)
    assert [r.status for r in rerun] == ["done"] and len(calls) == 4


def test_unkeyed_or_other_code_runs_are_rerun(tmp_path, monkeypatch):
    _fake_run(tmp_path / "runs", "pftt", 42, 0.8, 1000, 0.5, 6.0, [0.8])  # no run_key: from before keys
    calls: list[str] = []
    res = reproduce.run_all(tmp_path, ["pftt"], [42], "quick", launch=_launcher(tmp_path / "runs", calls))
    assert [r.status for r in res] == ["done"] and len(calls) == 1
    # Other code (the source digest is in the key): rerun as well.
    from pwff_app import provenance

    monkeypatch.setattr(provenance, "source_digest", lambda: "edited")
    res = reproduce.run_all(tmp_path, ["pftt"], [42], "quick", launch=_launcher(tmp_path / "runs", calls))
    assert [r.status for r in res] == ["done"] and len(calls) == 2


def test_launch_that_writes_another_key_fails(tmp_path):
    launch = _launcher(tmp_path / "runs", [], key=lambda rc, data_dir: "0" * 20)
    (res,) = reproduce.run_all(tmp_path, ["pftt"], [42], "quick", launch=launch)
    assert res.status == "failed" and "run_key 00000000000000000000 !=" in res.error


def test_aggregate_only_warns_about_runs_of_another_config(fake_out, capsys):
    assert cli.main(["reproduce", "pftt", "--aggregate-only", "--out", str(fake_out), "--seeds", "2",
                     "--seed-base", "1"]) == 0
    err = capsys.readouterr().err
    assert "4 run(s) tabulated were made by another config or code version" in err and "pftt-seed1" in err


# ---- labels from each run's own config; delay and latency spread ------------------------------


def _relabel(run_dir: Path, changes: dict) -> None:
    """Update a run's summary.json: blocks are merged (``{"config": {"num-clients": 2}}``), values set."""
    path = run_dir / "summary.json"
    summary = json.loads(path.read_text())
    for key, value in changes.items():
        summary[key] = {**summary.get(key, {}), **value} if isinstance(value, dict) else value
    path.write_text(json.dumps(summary))


def test_labels_come_from_the_runs_configs(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        d = _fake_run(runs, "pftt", seed, 0.8, 1000, 0.5, 6.0, [0.8])
        _relabel(d, {"config": {"num-clients": 2, "wireless.snr-db": "10,0"}})
    rows = tables.aggregate_runs(tables.find_run_dirs(tmp_path))
    assert rows[0]["num_clients"] == [2] and rows[0]["channel"] == ["10/0 dB Rayleigh"]
    assert tables.setting_labels(rows) == ("2 clients", "10/0 dB Rayleigh")
    seen = []
    from pwff_app.experiments import plots

    monkeypatch.setattr(plots, "_bar", lambda rows, key, path, ylabel, title, **kw: seen.append((ylabel, title)))
    plots.plot_uplink_bytes(rows, tmp_path / "a.png")
    plots.plot_uplink_delay(rows, tmp_path / "b.png")
    assert seen == [("uplink bytes / round (2 clients, log)", "Uplink payload per round"),
                    ("uplink delay / round, ergodic (s, log)", "Uplink delay per round, 10/0 dB Rayleigh")]
    md = tables.write_markdown(rows, tmp_path / "comparison.md").read_text()
    assert "2 clients, 10/0 dB Rayleigh" in md and "4 clients" not in md and "5 dB" not in md
    # A run without a link, and runs that differ, say so.
    off = _fake_run(runs, "local", 1, 0.5, 0, 0.0, 0.0, [0.5])
    _relabel(off, {"num_clients": 4, "wireless": {"enabled": False}})
    rows = tables.aggregate_runs(tables.find_run_dirs(tmp_path))
    assert tables.setting_labels(rows) == ("2/4 clients", "10/0 dB Rayleigh | ideal link")


def test_delay_and_latency_tables_show_median_and_p95(fake_out):
    for d in tables.find_run_dirs(fake_out):
        if (d / "summary.json").exists():
            _relabel(d, {"wireless": {"p95_uplink_delay_s": 7.0, "median_round_latency_s": 0.9,
                                      "p95_round_latency_s": 3.0}})
    rows = tables.aggregate_runs(tables.find_run_dirs(fake_out))
    assert rows[0]["p95_uplink_delay_s_mean"] == 7.0 and rows[0]["p95_round_latency_s_mean"] == 3.0
    tables.write_outputs(fake_out, rows)
    md = (fake_out / "comparison.md").read_text()
    assert "## Delay and latency" in md and "uplink delay, p95 (s)" in md and "round latency, median (s)" in md
    assert "| `pftt` | 0.6 ± 0.14 | 6 ± 1.4 | 0.3 ± 0.071 | 7 ± 0 | 1 ± 0 | 0.9 ± 0 | 3 ± 0 |" in md
    with (fake_out / "comparison.csv").open() as f:
        first = next(csv.DictReader(f))
    assert float(first["p95_uplink_delay_s_mean"]) == 7.0 and float(first["median_round_latency_s_mean"]) == 0.9


def test_stopping_a_flwr_home_ends_its_processes_only(tmp_path):
    import os
    import subprocess
    import time

    ours = subprocess.Popen(["sleep", "60"], env={**os.environ, "FLWR_HOME": str(tmp_path.resolve())})
    other = subprocess.Popen(["sleep", "60"], env={**os.environ, "FLWR_HOME": str(tmp_path / "elsewhere")})
    try:
        time.sleep(0.2)
        assert launch.stop_local_superlink(tmp_path) == [ours.pid]
        assert ours.wait(timeout=5) == -15 and other.poll() is None
    finally:
        ours.kill()
        other.kill()


# ---- variants: a method plus overrides, one row each -------------------------------------------


def test_variants_run_with_their_overrides_and_tabulate_as_rows(tmp_path):
    calls: list[str] = []
    resources: list[str] = []
    variants = [profiles.Variant("pftt-a8", "pftt", {"task.adapter-size": 8}),
                profiles.Variant("pftt-8c", "pftt", {"num-clients": 8}), "fedlora"]
    res = reproduce.run_all(tmp_path, variants, [42, 43], "quick",
                            launch=_launcher(tmp_path / "runs", calls, resources_seen=resources))
    assert [r.status for r in res] == ["done"] * 6
    assert "task.adapter-size=8" in calls[0] and "run-name='pftt-a8-seed42'" in calls[0] and "method='pftt'" in calls[0]
    # one SuperNode per client of the run: 8 for the variant that asks for 8
    assert resources[:3] == [launch.federation_config(4), launch.federation_config(8), launch.federation_config(4)]
    rows, files = reproduce.tabulate(tmp_path, variants, [42, 43], "quick", title="Widths")
    assert [r["method"] for r in rows] == ["pftt-a8", "pftt-8c", "fedlora"]
    assert rows[0]["methods"] == ["pftt"] and rows[0]["n_seeds"] == 2
    assert (tmp_path / "comparison.md").read_text().startswith("# Widths")


def test_variant_label_of_a_run_folder():
    assert profiles.variant_of("pftt-a8-seed42") == "pftt-a8"
    assert profiles.variant_of("pftt-seed42-20261202-1200") == "pftt"
    assert profiles.variant_of("my-run") == "my-run"


def test_out_dir_inside_the_app_must_be_ignored(tmp_path, capsys):
    app = tmp_path / "app"
    app.mkdir()
    (app / ".gitignore").write_text("/pwff-reproduce/\n")
    reproduce.check_out_dir(app / "pwff-reproduce" / "pftt-quick", app)  # ignored: fine
    reproduce.check_out_dir(tmp_path / "elsewhere", app)  # outside: fine
    with pytest.raises(ValueError, match="inside the Flower app"):
        reproduce.check_out_dir(app / "out", app)
    # the CLI says it in one line and runs nothing
    assert cli.main(["reproduce", "pftt", "--quick", "--app", str(app), "--out", str(app / "out")]) == 2
    assert "inside the Flower app" in capsys.readouterr().err
    # this project's own default output folder is ignored
    reproduce.check_out_dir(reproduce.APP_DIR / "pwff-reproduce" / "pftt-quick", reproduce.APP_DIR)


def test_generalization_columns_and_accuracy_vs_bytes_plot(fake_out):
    """Runs that measured the global test set get its columns; PFTT also the shared part alone."""
    for method, seed, glob, shared in (("pftt", 1, 0.6, 0.5), ("pftt", 2, 0.7, 0.4), ("fedlora", 1, 0.55, None),
                                       ("fedlora", 2, 0.65, None)):
        path = fake_out / "runs" / f"{method}-seed{seed}" / "summary.json"
        summary = json.loads(path.read_text())
        summary["accuracy"]["global_mean"] = glob
        if shared is not None:
            summary["accuracy"]["shared_only_mean"] = shared
        path.write_text(json.dumps(summary))
    rows = tables.aggregate_runs(tables.find_run_dirs(fake_out))
    pftt, fedlora = rows
    assert pftt["global_accuracy_mean"] == pytest.approx(0.65)
    assert pftt["global_accuracy_std"] == pytest.approx(statistics.stdev([0.6, 0.7]))
    assert pftt["shared_only_accuracy_mean"] == pytest.approx(0.45) and fedlora["shared_only_accuracy_mean"] is None
    files = tables.write_outputs(fake_out, rows)
    md = (fake_out / "comparison.md").read_text()
    assert "| method | final personalized accuracy | global test set accuracy | shared part alone, global test set |" in md
    assert "| `pftt` | 0.8500 ± 0.0707 | 0.6500 ± 0.0707 | 0.4500 ± 0.0707 | 1,000 ± 0 |" in md
    assert "| `fedlora` | 0.6500 ± 0.0707 | 0.6000 ± 0.0707 | n/a | 400 ± 141 |" in md
    assert "final held-out reward" not in md  # no run has one: no column
    png = fake_out / "accuracy_vs_uplink_bytes_per_round.png"
    assert png in files and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
