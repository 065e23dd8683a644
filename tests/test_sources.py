"""Every PFIT data set takes a Hub id or the local data folder; the Hub is replaced at its boundary
(``datasets.load_dataset``), so nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from pwff_app.config import InstructConfig, RunConfig
from pwff_app.instruct import prompts
from pwff_app.instruct.rewards import cache, cli
from pwff_app.instruct.rewards import data as hh
from pwff_app.sources import DataNotFoundError
from tests.conftest import run_config
from tests.test_rewards import _write_synthetic

ALPACA_ROWS = [{"instruction": f"Say {i}", "input": "x" if i % 2 else "", "output": "ok", "text": "t"} for i in range(30)]


@pytest.fixture()
def fake_hub(monkeypatch, tmp_path):
    """``datasets.load_dataset`` serving Alpaca and HH-RLHF (from synthetic files); records its calls."""
    _write_synthetic(tmp_path / "hh")
    calls = []

    def load_dataset(dataset_id, **kwargs):
        calls.append((dataset_id, kwargs))
        if dataset_id.endswith("alpaca"):
            return Dataset.from_list(ALPACA_ROWS)
        objective = {v: k for k, v in hh.HH_HUB_DIRS.items()}[kwargs["data_dir"]]
        return Dataset.from_list([json.loads(line) for line in _gz_lines(tmp_path / "hh" / hh.HH_FILES[objective])])

    monkeypatch.setattr("datasets.load_dataset", load_dataset)
    monkeypatch.delenv("PWFF_DATA_DIR", raising=False)
    monkeypatch.setattr(prompts, "_hub_alpaca", prompts._hub_alpaca.__wrapped__)  # no cache across tests
    monkeypatch.setattr(hh, "_hub_rows", hh._hub_rows.__wrapped__)
    return calls, tmp_path / "hh"


def _gz_lines(path: Path) -> list[str]:
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line for line in f if line.strip()]


def test_config_has_the_hub_ids() -> None:
    cfg = InstructConfig()
    assert (cfg.prompt_dataset, cfg.preference_dataset) == ("tatsu-lab/alpaca", "Anthropic/hh-rlhf")
    assert RunConfig.from_run_config(run_config(instruct__prompt_dataset="me/alpaca")).instruct.prompt_dataset == \
        "me/alpaca"


def test_alpaca_from_the_hub_without_a_data_folder(fake_hub) -> None:
    calls, _ = fake_hub
    records = prompts.load_alpaca(None, "someone/alpaca")
    assert calls == [("someone/alpaca", {"split": "train"})]
    assert records[1] == {"instruction": "Say 1", "input": "x", "output": "ok"}  # the three Alpaca fields
    train, held_out = prompts.client_prompts(None, 0, 2, 42, 2, "someone/alpaca")
    assert len(held_out) == 2 and len(train) == 13  # 30 records: 2 test, 2 validation, 26 train for 2 clients


def test_a_data_folder_wins_over_the_hub(fake_hub, tmp_path) -> None:
    calls, _ = fake_hub
    (tmp_path / "data" / "alpaca").mkdir(parents=True)
    local = [{"instruction": "local", "input": "", "output": ""}]
    (tmp_path / "data" / "alpaca" / "alpaca_5000.json").write_text(json.dumps(local))
    assert prompts.load_alpaca(tmp_path / "data", "someone/alpaca") == local
    with pytest.raises(DataNotFoundError, match="HH-RLHF file"):  # its files missing: no fallback to the Hub
        hh.objective_pairs(tmp_path / "data", "safety", "someone/hh")
    assert calls == []


def test_preference_pairs_from_the_hub_equal_the_files(fake_hub) -> None:
    calls, files = fake_hub
    for objective, sub in hh.HH_HUB_DIRS.items():
        pairs = hh.objective_pairs(None, objective, "someone/hh")
        assert pairs == hh.load_preference_pairs(files / hh.HH_FILES[objective]) and len(pairs) == 64
        assert ("someone/hh", {"data_dir": sub, "split": "test"}) in calls
    fingerprint = hh.objective_fingerprint(None, "safety", "someone/hh")
    assert fingerprint["hub"] == "someone/hh" and fingerprint["data_dir"] == "harmless-base" and fingerprint["rows"] == 64


def test_reward_cache_key_tracks_the_hub_source(fake_hub) -> None:
    _, files = fake_hub
    config = cache.RewardConfig()
    key = cache.cache_key(config, "enc", None, "someone/hh")
    assert key == cache.cache_key(config, "enc", None, "someone/hh")
    assert key != cache.cache_key(config, "enc", None, "other/hh")  # another Hub id: other data
    assert key != cache.cache_key(config, "enc", files)  # the same rows read from files: another source


def test_hub_failure_is_one_line_naming_the_data_folder(monkeypatch, tmp_path, capsys) -> None:
    def offline(dataset_id, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr("datasets.load_dataset", offline)
    monkeypatch.delenv("PWFF_DATA_DIR", raising=False)
    with pytest.raises(DataNotFoundError) as info:
        prompts.load_alpaca(None, "nobody/none")
    assert "\n" not in str(info.value) and "PWFF_DATA_DIR" in str(info.value) and "ConnectionError" in str(info.value)
    # `pwff train-rewards` without a data folder tries the Hub; offline that is exit 2 with the line.
    assert cli.main(["--data-dir", "", "--dataset", "nobody/hh", "--cache-dir", str(tmp_path)]) == 2
    assert "could not load HH-RLHF (helpful-base) 'nobody/hh'" in capsys.readouterr().err
