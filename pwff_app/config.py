"""One validated run configuration, built from Flower's flat ``run_config``.

Every key lives in ``[tool.flwr.app.config]`` of ``pyproject.toml`` (Flower rejects unknown
keys on the command line). Keys are grouped: top level (method, seed, where results go),
``task.*`` (PFTT and its contenders) and ``wireless.*`` (read by :mod:`pwff_app.wireless.channel`).
Validation happens before any work, and each problem is one line naming the key and what is
allowed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pwff_app.methods import METHODS

Scalar = int | float | str | bool
AGGREGATOR_NAMES = ("fedavg", "median", "trimmed-mean")


class ConfigError(ValueError):
    """A run-config value is missing or out of range; the message names the key."""


def read_key(rc: Mapping[str, Scalar], key: str, kind: type, default: Scalar | None = None) -> Scalar:
    """A run-config value of the given type (ints widen to floats); ``default`` if absent."""
    if key not in rc:
        if default is None:
            raise ConfigError(f"run config: missing key '{key}'")
        return default
    value = rc[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"run config: '{key}' must be {kind.__name__}, got {value!r}")
    return value


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"run config: '{key}' must be > 0, got {value!r}")


def _non_negative(key: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"run config: '{key}' must be >= 0, got {value!r}")


def float_list(key: str, text: str) -> tuple[float, ...]:
    """Parse a comma list such as ``"1.0,0.8"``; one clear error if malformed."""
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"run config: '{key}' must be a comma list of numbers, got {text!r}") from None
    if not values:
        raise ConfigError(f"run config: '{key}' must list at least one number")
    return values


@dataclass(frozen=True)
class TaskConfig:
    """Task tuning (PFTT and contenders): model, data, local training."""

    num_rounds: int
    model_name: str
    dataset: str
    alpha: float
    max_train_samples: int
    max_test_samples: int
    max_length: int
    batch_size: int
    local_epochs: int
    lr: float
    backbone_lr: float
    adapter_size: int
    lora_rank: int
    lora_alpha: int
    resource_levels: tuple[float, ...]

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Scalar]) -> TaskConfig:
        cfg = cls(
            num_rounds=read_key(rc, "task.num-rounds", int),
            model_name=read_key(rc, "task.model-name", str, ""),
            dataset=read_key(rc, "task.dataset", str, "fancyzhx/ag_news"),
            alpha=read_key(rc, "task.alpha", float),
            max_train_samples=read_key(rc, "task.max-train-samples", int),
            max_test_samples=read_key(rc, "task.max-test-samples", int),
            max_length=read_key(rc, "task.max-length", int),
            batch_size=read_key(rc, "task.batch-size", int),
            local_epochs=read_key(rc, "task.local-epochs", int),
            lr=read_key(rc, "task.lr", float),
            backbone_lr=read_key(rc, "task.backbone-lr", float, 5e-5),
            adapter_size=read_key(rc, "task.adapter-size", int),
            lora_rank=read_key(rc, "task.lora-rank", int),
            lora_alpha=read_key(rc, "task.lora-alpha", int),
            resource_levels=float_list("task.resource-levels", read_key(rc, "task.resource-levels", str)),
        )
        for key, value in [
            ("task.num-rounds", cfg.num_rounds),
            ("task.alpha", cfg.alpha),
            ("task.max-length", cfg.max_length),
            ("task.batch-size", cfg.batch_size),
            ("task.local-epochs", cfg.local_epochs),
            ("task.lr", cfg.lr),
            ("task.backbone-lr", cfg.backbone_lr),
            ("task.adapter-size", cfg.adapter_size),
            ("task.lora-rank", cfg.lora_rank),
            ("task.lora-alpha", cfg.lora_alpha),
        ]:
            _positive(key, value)
        _non_negative("task.max-train-samples", cfg.max_train_samples)
        _non_negative("task.max-test-samples", cfg.max_test_samples)
        if any(not 0 < r <= 1 for r in cfg.resource_levels):
            raise ConfigError(
                f"run config: 'task.resource-levels' values must be in (0, 1], got {cfg.resource_levels}"
            )
        return cfg

    def resource_level(self, client_id: int) -> float:
        """Resource level of a client in (0, 1]; the list is cycled over client ids."""
        return self.resource_levels[client_id % len(self.resource_levels)]


@dataclass(frozen=True)
class RunConfig:
    """The whole run: which method, where data and results live, and the method's settings."""

    method: str
    seed: int
    num_clients: int
    results_dir: Path
    run_name: str
    data_dir: Path | None
    resume: bool
    client_state_dir: str
    aggregator: str
    trim_fraction: float
    max_update_norm: float
    min_survivors: int
    dp_noise_multiplier: float
    dp_clipping_norm: float
    task: TaskConfig
    raw: Mapping[str, Scalar] = field(repr=False, compare=False)

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Scalar]) -> RunConfig:
        method = read_key(rc, "method", str)
        if method not in METHODS:
            raise ConfigError(f"run config: 'method' must be one of {sorted(METHODS)}, got {method!r}")
        num_clients = read_key(rc, "num-clients", int)
        _positive("num-clients", num_clients)
        aggregator = read_key(rc, "aggregator", str, "fedavg")
        if aggregator not in AGGREGATOR_NAMES:
            raise ConfigError(f"run config: 'aggregator' must be one of {list(AGGREGATOR_NAMES)}, got {aggregator!r}")
        trim = read_key(rc, "trim-fraction", float, 0.2)
        if not 0 <= trim < 0.5:
            raise ConfigError(f"run config: 'trim-fraction' must be in [0, 0.5), got {trim!r}")
        cfg = cls(
            method=method,
            seed=read_key(rc, "seed", int),
            num_clients=num_clients,
            results_dir=resolve_results_dir(read_key(rc, "results-dir", str, "")),
            run_name=read_key(rc, "run-name", str, ""),
            data_dir=resolve_data_dir(read_key(rc, "data-dir", str, "")),
            resume=read_key(rc, "resume", bool, False),
            client_state_dir=read_key(rc, "client-state-dir", str, ""),
            aggregator=aggregator,
            trim_fraction=trim,
            max_update_norm=read_key(rc, "max-update-norm", float, 0.0),
            min_survivors=read_key(rc, "min-survivors", int, 1),
            dp_noise_multiplier=read_key(rc, "dp.noise-multiplier", float, 0.0),
            dp_clipping_norm=read_key(rc, "dp.clipping-norm", float, 1.0),
            task=TaskConfig.from_run_config(rc),
            raw=dict(rc),
        )
        _non_negative("max-update-norm", cfg.max_update_norm)
        _positive("min-survivors", cfg.min_survivors)
        _non_negative("dp.noise-multiplier", cfg.dp_noise_multiplier)
        _positive("dp.clipping-norm", cfg.dp_clipping_norm)
        if cfg.resume and not cfg.run_name:
            raise ConfigError("run config: 'resume' needs 'run-name' (the run to continue)")
        return cfg


def resolve_data_dir(configured: str) -> Path | None:
    """The local data folder: run-config ``data-dir``, else ``$PWFF_DATA_DIR``, else None (Hub)."""
    text = configured or os.environ.get("PWFF_DATA_DIR", "")
    if not text:
        return None
    path = Path(text).expanduser().resolve()
    if not path.is_dir():
        source = "run config 'data-dir'" if configured else "PWFF_DATA_DIR"
        raise ConfigError(f"{source} points at {path}, which is not a folder")
    return path


def resolve_results_dir(configured: str) -> Path:
    """Absolute results folder: ``results-dir``, else ``$PWFF_RESULTS_DIR``, else ``~/.pwff/results``.

    The ServerApp runs in the SuperLink's working directory, not the app's, so a relative
    path would land somewhere surprising: it is refused.
    """
    text = configured or os.environ.get("PWFF_RESULTS_DIR", "") or str(Path.home() / ".pwff" / "results")
    path = Path(text).expanduser()
    if not path.is_absolute():
        raise ConfigError(f"run config: 'results-dir' must be an absolute path, got {text!r}")
    return path


def app_defaults(project_dir: Path | str = ".") -> dict[str, Scalar]:
    """The flat ``[tool.flwr.app.config]`` defaults of a project's ``pyproject.toml``."""
    import tomllib

    from flwr.common.config import flatten_dict

    with (Path(project_dir) / "pyproject.toml").open("rb") as f:
        return dict(flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"]))
