"""The config tree: pyproject defaults = section defaults, one line per problem, refusals before any folder."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from pwff_app import server_app
from pwff_app.config import (
    AggregationConfig,
    ChannelConfig,
    ConfigError,
    DPConfig,
    FedbertConfig,
    InstructConfig,
    RunConfig,
    TaskConfig,
)
from tests.conftest import run_config


def test_pyproject_defaults_are_the_section_defaults() -> None:
    cfg = RunConfig.from_run_config(run_config())
    assert (cfg.aggregation, cfg.dp, cfg.task, cfg.instruct, cfg.fedbert, cfg.wireless) == (
        AggregationConfig(), DPConfig(), TaskConfig(), InstructConfig(), FedbertConfig(), ChannelConfig())


def test_every_problem_is_one_line_naming_its_key() -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig.from_run_config(run_config(seed="7", task__alpha=-1.0, wireless__loss_model="erasure",
                                             aggregator="mean", fedbert__train="half"))
    lines = str(info.value).splitlines()
    assert len(lines) == 5
    for key in ("'seed'", "'task.alpha'", "'wireless.loss-model'", "'aggregator'", "'fedbert.train'"):
        assert sum(key in line for line in lines) == 1, (key, lines)
    assert any("'packet', 'outage' or 'none'" in line for line in lines)  # the allowed values


def test_unknown_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown key 'task.learning-rate'"):
        RunConfig.from_run_config({**run_config(), "task.learning-rate": 0.1})


REFUSED = [
    ({"method": "fedbert", "dp.noise-multiplier": 1.0}, "'dp.noise-multiplier' > 0 is not supported for 'fedbert'"),
    ({"method": "pfit", "dp.noise-multiplier": 1.0}, "'dp.noise-multiplier' > 0 is not supported for 'pfit'"),
    ({"method": "local", "dp.noise-multiplier": 1.0}, "'dp.noise-multiplier' > 0 is not supported for 'local'"),
    ({"method": "local", "aggregator": "median"}, "'local' aggregates nothing"),
    ({"aggregator": "trimmed-mean"}, "trims int(0.2 x 4) = 0 replies per side"),
    ({"aggregator": "trimmed-mean", "trim-fraction": 0.25, "num-clients": 8, "clients-per-round": 2},
     "with 2 clients a round trims int(0.25 x 2) = 0 replies per side"),
    ({"clients-per-round": 5}, "'clients-per-round' 5 > 'num-clients' 4"),
    ({"method": "fedbert", "resume": True, "run-name": "x"}, "'resume' is not supported for 'fedbert'"),
    ({"method": "shepherd", "resume": True, "run-name": "x"}, "'resume' is not supported for 'shepherd'"),
    ({"method": "pfl", "instruct.sparsity": "0.3"}, "'instruct.sparsity' is fixed to (0.0,) by method 'pfl'"),
    ({"method": "sfl", "instruct.reward-weights": "0.5:0.5"},
     "'instruct.reward-weights' is fixed to ((1.0, 0.0),) by method 'sfl'"),
    ({"method": "pfit", "instruct.reward-models": "helpfulness", "instruct.reward-weights": "0.5:0.5"},
     "'instruct.reward-weights' has no effect with 'instruct.reward-models' = 'helpfulness'"),
]


@pytest.mark.parametrize(("overrides", "message"), REFUSED)
def test_refused_combination_is_one_line_before_any_folder(tmp_path, overrides, message) -> None:
    """The ServerApp stops with the one line before it creates the results folder."""
    rc = {**run_config(results_dir=str(tmp_path / "results"), run_name="refused"), **overrides}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc)
    with pytest.raises(ConfigError) as info:
        server_app.main(grid=None, context=context)  # type: ignore[arg-type]  (never reached)
    assert message in str(info.value)
    assert len(str(info.value).splitlines()) == 1
    assert not (tmp_path / "results").exists()


def test_trimmed_mean_that_trims_is_accepted() -> None:
    cfg = RunConfig.from_run_config(run_config(aggregator="trimmed-mean", trim_fraction=0.25))
    assert cfg.aggregation.trimmed_per_side(cfg.num_clients) == 1


def test_device_auto_is_the_cpu_here_and_cuda_without_cuda_is_one_line(tmp_path) -> None:
    import torch

    from pwff_app.device import compute_dtype, resolve_device

    cfg = RunConfig.from_run_config(run_config())
    assert cfg.device == "auto" and cfg.precision == "auto"
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        assert compute_dtype("auto", resolve_device("auto")) == torch.float32
        rc = {**run_config(results_dir=str(tmp_path / "results")), "device": "cuda"}
        context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc)
        with pytest.raises(ConfigError) as info:
            server_app.main(grid=None, context=context)  # type: ignore[arg-type]
        assert str(info.value).splitlines() == [
            "run config: 'device' is 'cuda' but this machine has 0 CUDA device(s): use 'auto' or 'cpu'"]
        assert not (tmp_path / "results").exists()
    with pytest.raises(ConfigError, match="'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        RunConfig.from_run_config(run_config(device="gpu"))
