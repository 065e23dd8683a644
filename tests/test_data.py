"""The non-IID split: Dirichlet over labels, same mix in a client's train and test rows."""

from __future__ import annotations

import numpy as np
import pytest

from pwff_app.config import ConfigError, RunConfig
from pwff_app.task_tuning.data import DataNotFoundError, client_split, label_distribution, label_skew, load_ag_news
from tests.conftest import run_config


def _skew(data_dir, alpha: float, n: int = 4) -> float:
    dists = [label_distribution(client_split(data_dir, "", i, n, alpha, seed=1)[0]["label"]) for i in range(n)]
    return label_skew(dists)


def test_label_skew_grows_as_alpha_falls(real_data_dir):
    skews = [_skew(real_data_dir, a) for a in (100.0, 1.0, 0.1)]
    assert skews[0] < 0.05  # near IID
    assert skews[0] < skews[1] < skews[2]
    assert skews[2] > 0.4  # strongly skewed


def test_client_test_rows_follow_its_train_mix(real_data_dir):
    for cid in range(4):
        train, test = client_split(real_data_dir, "", cid, 4, 0.5, seed=3)
        tv = 0.5 * np.abs(label_distribution(train["label"]) - label_distribution(test["label"])).sum()
        assert len(test) > 100 and tv < 0.1, (cid, tv)


def test_partition_is_deterministic_disjoint_and_capped(tiny_data_dir):
    parts = [client_split(tiny_data_dir, "", i, 3, 0.5, seed=7) for i in range(3)]
    again = client_split(tiny_data_dir, "", 1, 3, 0.5, seed=7)
    assert again[0]["text"] == parts[1][0]["text"]
    train_texts = [set(p[0]["text"]) for p in parts]
    assert sum(len(t) for t in train_texts) == len(set().union(*train_texts))
    train, test = client_split(tiny_data_dir, "", 0, 3, 0.5, seed=7, max_train=20, max_test=10)
    assert len(train) == 20 and len(test) == 10


def test_local_files_map_labels_to_0_3(real_data_dir):
    train, test = load_ag_news(real_data_dir, "")
    assert set(train["label"]) == set(test["label"]) == {0, 1, 2, 3}
    assert len(train) == 10_000 and len(test) == 7_600
    assert " . " in test[0]["text"]


def test_missing_data_names_what_to_set(tmp_path):
    with pytest.raises(DataNotFoundError, match="PWFF_DATA_DIR"):
        load_ag_news(tmp_path, "")


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="'method' must be one of"):
        RunConfig.from_run_config(run_config(method="nope"))
    with pytest.raises(ConfigError, match="'task.alpha' must be > 0"):
        RunConfig.from_run_config(run_config(task__alpha=0.0))
    with pytest.raises(ConfigError, match="resource-levels"):
        RunConfig.from_run_config(run_config(task__resource_levels="1.0,abc"))
    with pytest.raises(ConfigError, match="absolute"):
        RunConfig.from_run_config(run_config(results_dir="relative/path"))
    with pytest.raises(ConfigError, match="not a folder"):
        RunConfig.from_run_config(run_config(data_dir=str(tmp_path / "missing")))
