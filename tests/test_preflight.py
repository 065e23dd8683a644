"""The ServerApp's preflight: a missing data set or model stops the run before round 1, in one line."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict
from flwr.app import Context, RecordDict

from pwff_app import server_app
from pwff_app.config import RunConfig
from pwff_app.instruct import runtime
from pwff_app.protocols import PROTOCOLS
from pwff_app.sources import DataNotFoundError, ModelNotFoundError
from pwff_app.task_tuning import data as task_data
from tests.conftest import run_config
from tests.test_e2e import flwr, private_superlink, run_args
from tests.test_rewards import _write_synthetic

LINE = "[pwff] preflight failed: "


def _main(rc: dict) -> None:
    server_app.main(grid=None, context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                                               run_config=rc))  # type: ignore[arg-type]  (never reached)


def test_every_protocol_has_a_preflight() -> None:
    assert {p.preflight for p in PROTOCOLS.values()} == {"pwff_app.task_tuning.data:preflight",
                                                         "pwff_app.instruct.runtime:preflight"}


@pytest.mark.parametrize("method", ["pftt", "fedbert", "pfit"])
def test_empty_data_folder_stops_before_any_folder(tmp_path, capsys, method) -> None:
    (tmp_path / "empty").mkdir()
    rc = run_config(method=method, data_dir=str(tmp_path / "empty"), results_dir=str(tmp_path / "results"))
    with pytest.raises(DataNotFoundError) as info:
        _main(rc)
    assert "\n" not in str(info.value) and "PWFF_DATA_DIR" in str(info.value)
    assert not (tmp_path / "results").exists()
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith(LINE)]
    assert lines == [LINE + str(info.value)]


def test_pfit_names_the_missing_preference_data(tmp_path) -> None:
    (tmp_path / "alpaca").mkdir()
    (tmp_path / "alpaca" / "alpaca_5000.json").write_text(json.dumps([{"instruction": "hi", "input": "", "output": ""}]))
    cfg = RunConfig.from_run_config(run_config(method="pfit", data_dir=str(tmp_path)))
    with pytest.raises(DataNotFoundError, match=r"HH-RLHF file .*helpful-base"):
        runtime.preflight(cfg)


def test_missing_models_are_one_line(tmp_path, tiny_data_dir) -> None:
    cfg = RunConfig.from_run_config(run_config(data_dir=str(tiny_data_dir), task__model_name=str(tmp_path / "none")))
    with pytest.raises(ModelNotFoundError, match="task.model-name") as info:
        task_data.preflight(cfg)
    assert "\n" not in str(info.value)
    data = tmp_path / "data"
    (data / "alpaca").mkdir(parents=True)
    (data / "alpaca" / "alpaca_5000.json").write_text(json.dumps([{"instruction": "hi", "input": "", "output": ""}]))
    _write_synthetic(data)  # HH-RLHF files: only the policy is missing now
    for name, message in [(str(tmp_path / "m.Q4_1.gguf"), "policy GGUF file .* not found"),
                          (str(tmp_path / "no-model"), "could not resolve policy .*instruct.policy-name")]:
        cfg = RunConfig.from_run_config(run_config(method="pfit", data_dir=str(data), instruct__policy_name=name))
        with pytest.raises(ModelNotFoundError, match=message) as info:
            runtime.preflight(cfg)
        assert "\n" not in str(info.value)


def test_task_preflight_reads_the_hub_when_no_folder_is_set(monkeypatch) -> None:
    calls = []

    def fake_load_dataset(dataset_id, **kwargs):
        calls.append((dataset_id, kwargs))
        rows = Dataset.from_dict({"text": ["a", "b"], "label": [0, 1], "extra": [1, 2]})
        return DatasetDict({"train": rows, "test": rows})

    monkeypatch.delenv("PWFF_DATA_DIR", raising=False)
    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    cfg = RunConfig.from_run_config(run_config(task__dataset="someone/news", task__global_test_samples=0))
    checked = task_data.preflight(cfg)
    assert calls == [("someone/news", {})]
    assert "Hub 'someone/news': 2 train / 2 test rows" in checked[0] and "minilm" in checked[1].lower()
    assert len(checked) == 2  # no global test set asked for
    # The default global test set (50 rows of each label) cannot be drawn from 2 test rows: one line.
    with pytest.raises(task_data.DataNotFoundError, match=r"global test set: 50 rows of label 0 .* has 1$"):
        task_data.preflight(RunConfig.from_run_config(run_config(task__dataset="someone/news")))


def test_flwr_run_with_an_empty_data_folder_fails_fast(tmp_path) -> None:
    """A real `flwr run`: ends in well under a minute, prints the one line, and the run is failed.

    `flwr run --stream` itself exits 0 whatever the run's end (Flower 1.41 only streams the
    logs); what shows the failure is the ServerApp's exception: the simulation's exit code 700
    in the stream and the run's status in `flwr ls`.
    """
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = f"data-dir='{empty}' results-dir='{tmp_path / 'results'}' run-name='x'"
    with private_superlink(tmp_path / "flwr-home", None) as env:
        env.pop("PWFF_DATA_DIR", None)
        t0 = time.monotonic()
        proc = flwr(run_args(rc, supernodes=2), env, timeout=120)
        wall = time.monotonic() - t0
        out = proc.stdout + proc.stderr
        run_id = re.search(r"Successfully started run (\d+)", out).group(1)
        listed = flwr(["ls", "--run-id", run_id, "--format", "json"], env, timeout=60)
    print(f"flwr run with an empty data folder: {wall:.1f} s")
    assert wall < 60, out[-3000:]
    lines = [ln for ln in out.splitlines() if ln.startswith(LINE)]
    assert len(lines) == 1 and "ag_news/noisyag_samples10000valMed.csv not found" in lines[0], out[-3000:]
    assert "[pwff] round" not in out and not (tmp_path / "results").exists()
    assert "Exit Code: 700" in out  # the simulation's exit code for a ServerApp exception
    runs = json.loads(listed.stdout)["runs"]
    assert [r["status"] for r in runs] == ["finished:failed"], listed.stdout
    assert proc.returncode == 0  # Flower's `flwr run --stream`: the CLI's own exit does not carry the run's end
