"""`pwff report`: per-round tables and plots of finished runs, several overlaid."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pwff_app.experiments import cli, report
from pwff_app.testing.inprocess import InProcessGrid, run_server
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PNGS = {"accuracy_vs_round.png", "uplink_bytes_per_round.png", "uplink_delay_per_round.png",
        "accuracy_vs_uplink_bytes.png", "accuracy_vs_uplink_bytes_per_round.png"}


@pytest.fixture(scope="module")
def two_runs(tiny_data_dir, tmp_path_factory) -> list[Path]:
    """Two finished tiny runs through the real ServerApp and ClientApp: PFTT over the wireless
    link, FedLoRA on an ideal link (2 clients, 2 rounds each)."""
    results = tmp_path_factory.mktemp("results")
    runs = []
    for name, method, wireless in (("pftt-tiny", "pftt", True), ("fedlora-tiny", "fedlora", False)):
        rc = tiny_config(tiny_data_dir, results, run_name=name, method=method, num_clients=2,
                         wireless__enabled=wireless)
        run_server(rc, InProcessGrid(rc, 2))
        runs.append(results / name)
    return runs


def test_report_of_two_runs_writes_tables_and_plots(two_runs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert cli.main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for run in ("pftt-tiny", "fedlora-tiny"):
        assert f"## {run}" in printed
    header = next(line for line in printed.splitlines() if line.startswith("| round"))
    assert "| client 0 | client 1 | accuracy mean | global mean |" in header
    assert "shared-only mean" in printed  # pftt's table has the shared part alone
    rounds = [json.loads(line) for line in (two_runs[0] / "rounds.jsonl").read_text().splitlines()]
    last = rounds[-1]
    row = f"| 2 | {last['clients']['0']['accuracy']:.4f} | {last['clients']['1']['accuracy']:.4f} | " \
          f"{last['accuracy_mean']:.4f} | {last['global_accuracy_mean']:.4f} |"
    assert row in printed
    assert f"| {last['uplink_bytes']:,} | {last['downlink_bytes']:,} | {last['wireless']['latency_s']:.2f} |" in printed

    names = {p.name for p in out.iterdir()}
    assert {"rounds.md", "comparison.csv", "comparison.md"} | PNGS <= names
    for png in PNGS:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with (out / "comparison.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == ["pftt-tiny", "fedlora-tiny"]  # one row per run: overlaid
    summary = json.loads((two_runs[0] / "summary.json").read_text())
    assert float(table[0]["accuracy_mean"]) == pytest.approx(summary["accuracy"]["mean"])
    assert float(table[0]["global_accuracy_mean"]) == pytest.approx(summary["accuracy"]["global_mean"])
    assert float(table[0]["shared_only_accuracy_mean"]) == pytest.approx(summary["accuracy"]["shared_only_mean"])
    assert table[1]["shared_only_accuracy_mean"] == ""  # fedlora has no shared-only view
    md = (out / "comparison.md").read_text()
    assert md.startswith("# Run report") and "| `pftt-tiny` |" in md and "| `fedlora-tiny` |" in md
    assert "global test set accuracy" in md
    assert (out / "rounds.md").read_text().count("| round |") == 2


def test_report_of_one_run_writes_into_its_folder(two_runs, capsys):
    run = two_runs[1]
    text, files = report.report([run])
    assert {p.parent for p in files} == {run.resolve()}
    assert (run / "rounds.md").exists() and (run / "accuracy_vs_round.png").exists()
    assert "## fedlora-tiny" in text and "shared-only" not in text


def test_report_refuses_a_folder_without_rounds(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pwff: ") and "no rounds.jsonl" in err and "\n" not in err
    (tmp_path / "runs").mkdir()  # a reproduction's output folder: say where its runs are
    assert cli.main(["report", str(tmp_path)]) == 2
    assert f"runs are its {tmp_path / 'runs'}/<name>-seed<S> folders" in capsys.readouterr().err


def test_report_of_an_instruct_run_shows_rewards(tmp_path):
    """PFIT runs score clients by held-out reward: the table and plot use it."""
    run = tmp_path / "pfit-seed1"
    run.mkdir()
    rounds = [{"round": r, "reward_mean": -0.2 + r / 10, "reward_min": -0.4, "uplink_bytes": 10 * r,
               "downlink_bytes": 20 * r, "events": [],
               "clients": {"0": {"reward": -0.4 + r / 10, "helpfulness": 0.1}, "1": {"reward": r / 10}},
               "wireless": {"latency_s": 3.0, "median_delay_up_s": 1.0, "energy_j": 2.0, "lost_updates": 1}}
              for r in (0, 1)]
    (run / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))
    (run / "summary.json").write_text(json.dumps({
        "method": "pfit", "num_rounds": 1, "num_clients": 2, "reward": {"mean": -0.1, "per_client": {}},
        "comm": {"uplink_bytes_per_round": {"total": 10}, "downlink_bytes_per_round": {"total": 20}},
        "wireless": {"rounds": 1, "total_energy_j": 2.0}}))
    text, files = report.report([run], tmp_path / "out")
    assert "| round | client 0 | client 1 | reward mean |" in text
    assert "| 1 | -0.3000 | 0.1000 | -0.1000 | 10 | 20 | 3.00 | 1.00 | 2.00 | 1 | – | 0 |" in text
    # the instruct layout (docs/fig4.md): reward curves, no accuracy plots
    assert {p.name for p in files} >= {"train_rm_reward_vs_round.png", "judge_reward_vs_round.png", "comparison.md"}
    assert not {"accuracy_vs_round.png", "accuracy_vs_uplink_bytes_per_round.png"} & {p.name for p in files}
    md = (tmp_path / "out" / "comparison.md").read_text()
    assert "| method | training-RM reward (combined) |" in md and "| `pfit-seed1` | -0.1 ± 0 |" in md
