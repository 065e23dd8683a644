"""The whole run: top-level keys, the sections, and the combinations a method cannot honour."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from flwr.common.config import unflatten_dict
from pydantic import BeforeValidator, field_validator, model_validator

from pwff_app.config.base import (
    AGGREGATION_KEYS, Bool, Int, NonNegativeInt, PositiveInt, Scalar, Section, Selection, Str, section, validated,
)
from pwff_app.config.sections import (
    AggregationConfig,
    ChannelConfig,
    CompressionConfig,
    DPConfig,
    FedbertConfig,
    InstructConfig,
    TaskConfig,
)
from pwff_app.methods import METHODS


def _path_text(value: Any) -> Any:
    return str(value) if isinstance(value, Path) else value


@section
class RunConfig(Section):
    """Method, seed, clients, where data and results live, and every section of the tree.

    ``results_dir`` is absolute: ``results-dir``, else ``$PWFF_RESULTS_DIR``, else
    ``~/.pwff/results`` (the ServerApp runs in the SuperLink's working directory, so a
    relative path would land somewhere surprising). ``data_dir``: ``data-dir``, else
    ``$PWFF_DATA_DIR``, else None (the Hugging Face Hub).
    """

    method: Str = "pftt"
    seed: Int = 42
    num_clients: PositiveInt = 4  # the server waits for this many SuperNodes
    clients_per_round: NonNegativeInt = 0  # 0 = all; else this many clients selected per round
    selection: Selection = "random"  # how a round picks its clients_per_round (federation/roster.py)
    results_dir: Annotated[Path, BeforeValidator(_path_text)] = Path()
    run_name: Str = ""
    data_dir: Annotated[Path | None, BeforeValidator(_path_text)] = None
    resume: Bool = False
    client_state_dir: Str = ""
    device: Str = "auto"  # auto (CUDA when visible, else CPU) | cpu | cuda | cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 frozen weights on CUDA, fp32 on CPU
    aggregation: AggregationConfig = dataclasses.field(default_factory=AggregationConfig)
    dp: DPConfig = dataclasses.field(default_factory=DPConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    instruct: InstructConfig = dataclasses.field(default_factory=InstructConfig)
    fedbert: FedbertConfig = dataclasses.field(default_factory=FedbertConfig)
    wireless: ChannelConfig = dataclasses.field(default_factory=ChannelConfig)
    compression: CompressionConfig = dataclasses.field(default_factory=CompressionConfig)
    # The flat keys as given, for summary.json.
    raw: dict[str, Scalar] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Scalar]) -> RunConfig:
        """Validate Flower's flat run config into the tree; :class:`ConfigError` lists every problem."""
        tree: dict[str, Any] = unflatten_dict({k: v for k, v in rc.items() if k not in AGGREGATION_KEYS})
        tree["aggregation"] = AggregationConfig.section_input(rc)
        tree.setdefault("wireless", {}).update({k: rc[k] for k in ChannelConfig.TOP_LEVEL if k in rc})
        tree["raw"] = dict(rc)
        return validated(cls, tree)

    @field_validator("method", mode="after")
    @classmethod
    def _known_method(cls, method: str) -> str:
        if method not in METHODS:
            raise ValueError(f"must be one of {sorted(METHODS)}, got {method!r}")
        return method

    @field_validator("device", mode="after")
    @classmethod
    def _device(cls, name: str) -> str:
        if name in ("auto", "cpu"):
            return name
        kind, _, index = name.partition(":")
        if kind != "cuda" or not (index == "" or index.isdigit()):
            raise ValueError(f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
        import torch  # only for a CUDA request: the config stays light otherwise

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or int(index or 0) >= count:
            raise ValueError(f"is {name!r} but this machine has {count} CUDA device(s): use 'auto' or 'cpu'")
        return name

    @field_validator("results_dir", mode="before")
    @classmethod
    def _results_dir(cls, text: str) -> Path:
        text = text or os.environ.get("PWFF_RESULTS_DIR", "") or str(Path.home() / ".pwff" / "results")
        path = Path(text).expanduser()
        if not path.is_absolute():
            raise ValueError(f"must be an absolute path, got {text!r}")
        return path

    @field_validator("data_dir", mode="before")
    @classmethod
    def _data_dir(cls, text: str | None) -> Path | None:
        configured = text or ""
        text = configured or os.environ.get("PWFF_DATA_DIR", "")
        if not text:
            return None
        path = Path(text).expanduser().resolve()
        if not path.is_dir():
            source = "" if configured else " (from PWFF_DATA_DIR)"
            raise ValueError(f"points at {path}{source}, which is not a folder")
        return path

    @model_validator(mode="after")
    def _method_can_honour(self) -> RunConfig:
        problems = method_conflicts(self)
        if problems:
            raise ValueError("\nrun config: ".join(problems))
        return self

    @property
    def round_size(self) -> int:
        """How many clients a round trains: ``clients-per-round``, or all when it is 0."""
        return self.clients_per_round or self.num_clients

    @property
    def spec(self):
        """The method's row of :data:`pwff_app.methods.METHODS`."""
        return METHODS[self.method]


def method_conflicts(cfg: RunConfig) -> list[str]:
    """Settings the configured method would ignore or cannot honour, one sentence each.

    Refused up front, before any folder is created, rather than silently ignored.
    """
    spec, agg, problems = cfg.spec, cfg.aggregation, []
    if cfg.resume and not cfg.run_name:
        problems.append("'resume' needs 'run-name' (the run to continue)")
    if cfg.resume and not spec.resumable:
        problems.append(f"'resume' is not supported for '{cfg.method}' (methods that resume: "
                        f"{sorted(m for m, s in METHODS.items() if s.resumable)})")
    if cfg.dp.enabled and not spec.dp:
        problems.append(f"'dp.noise-multiplier' > 0 is not supported for '{cfg.method}': set it to 0, or use one "
                        f"of {sorted(m for m, s in METHODS.items() if s.dp)}")
    # The reply checks (min-survivors, max-num-examples) apply to local too; the rest is aggregation.
    if spec.protocol == "local" and agg != AggregationConfig(min_survivors=agg.min_survivors,
                                                             max_num_examples=agg.max_num_examples):
        problems.append(f"'{cfg.method}' aggregates nothing: leave 'aggregator', 'trim-fraction' and "
                        f"'max-update-norm' at their defaults")
    if cfg.clients_per_round > cfg.num_clients:
        problems.append(f"'clients-per-round' {cfg.clients_per_round} > 'num-clients' {cfg.num_clients}: "
                        f"sample at most every client (0 = all)")
    link = cfg.wireless
    if cfg.selection == "all" and cfg.clients_per_round:
        problems.append(f"'selection' = 'all' trains every client: set 'clients-per-round' = 0 (got "
                        f"{cfg.clients_per_round}) or pick another selection")
    if cfg.selection not in ("all", "random") and not cfg.clients_per_round:
        problems.append(f"'selection' = '{cfg.selection}' picks 'clients-per-round' clients a round: set it > 0 "
                        f"(0 trains every client)")
    if cfg.selection in ("best-channel", "proportional-fair", "age") and not link.enabled:
        problems.append(f"'selection' = '{cfg.selection}' ranks clients by what the link recorded: "
                        f"it needs 'wireless.enabled' = true")
    if link.enabled and link.ignored():
        problems.append(f"{', '.join(repr(k) for k in link.ignored())} not used with 'wireless.scenario' = "
                        f"'{link.scenario}': leave at the default (docs/radio.md)")
    if link.deadline_s > 0 and spec.protocol == "split":
        problems.append(f"'wireless.deadline-s' is not supported for '{cfg.method}' (split learning exchanges "
                        f"many messages a round): set it to 0")
    if link.deadline_s > 0 and link.realtime:
        problems.append("'wireless.deadline-s' with 'wireless.realtime' = true: the deadline is applied to the "
                        "simulated times only; set one of them off")
    per_round = cfg.round_size
    if agg.aggregator == "trimmed-mean" and agg.trimmed_per_side(per_round) == 0:
        problems.append(f"'trim-fraction' {agg.trim_fraction} with {per_round} clients a round trims "
                        f"int({agg.trim_fraction} x {per_round}) = 0 replies per side: use a "
                        f"'trim-fraction' >= {1 / per_round:.3g} (and < 0.5), or more clients a round")
    problems += _compression_conflicts(cfg)
    default = InstructConfig()
    if cfg.instruct.reward_models == "helpfulness" and cfg.instruct.reward_weights != default.reward_weights:
        problems.append("'instruct.reward-weights' has no effect with 'instruct.reward-models' = 'helpfulness' "
                        "(every client scores helpfulness only): leave it at its default")
    for name, value in spec.instruct_overrides.items():
        if getattr(cfg.instruct, name) != getattr(default, name):
            key = "instruct." + name.replace("_", "-")
            problems.append(f"'{key}' is fixed to {value!r} by method '{cfg.method}' (its row in methods.py): "
                            f"leave it at its default")
    return problems


def _compression_conflicts(cfg: RunConfig) -> list[str]:
    """What ``compression.*`` (and ``instruct.sparsity = "adaptive"``) cannot honour for this run."""
    comp, spec, problems = cfg.compression, cfg.spec, []
    if comp.enabled and spec.protocol != "fedavg":
        why = ("sends activations and gradients every step, not one update a round"
               if spec.protocol == "split" else "sends nothing")
        problems.append(f"'compression.uplink' / 'compression.downlink' have no effect with '{cfg.method}' "
                        f"(it {why}): leave them at 'none'")
    adaptive_s = spec.family == "instruct" and cfg.instruct.adaptive_sparsity
    if comp.adaptive or adaptive_s:
        key = "compression.uplink" if comp.adaptive else "instruct.sparsity"
        if not cfg.wireless.enabled:
            problems.append(f"'{key}' = 'adaptive' needs the wireless link ('wireless.enabled' = true): "
                            f"there is no channel to adapt to")
        if cfg.wireless.deadline_s <= 0 and comp.target_delay_s <= 0:
            problems.append(f"'{key}' = 'adaptive' needs a time to fit: 'wireless.deadline-s' or "
                            f"'compression.target-delay-s' > 0")
    if comp.adaptive and adaptive_s:
        problems.append("'compression.uplink' and 'instruct.sparsity' cannot both be 'adaptive': "
                        "choose which one follows the channel")
    if (comp.downlink != "none" and spec.family == "instruct" and cfg.instruct.mask_rule == "magnitude"
            and not cfg.instruct.for_method(cfg.method).use_lora):
        problems.append(f"'compression.downlink' = '{comp.downlink}' with '{cfg.method}' and 'instruct.mask-rule' = "
                        f"'magnitude': the server rebuilds each client's update mask from the exact global it "
                        f"holds, a cast copy would pick other entries; use 'instruct.mask-rule' = 'random'")
    if comp.target_delay_s > 0 and not (comp.adaptive or adaptive_s):
        problems.append("'compression.target-delay-s' is used only by 'adaptive' choices: leave it at 0")
    if cfg.dp.enabled and not comp.sent_norm_bounded():
        problems.append(f"'compression.uplink' = '{comp.uplink}' with DP: rounding and error feedback can "
                        f"raise the sent update's norm above 'dp.clipping-norm' (DP's sensitivity); use "
                        f"'none' or 'topk:<f>' with 'compression.error-feedback' = false")
    return problems


def app_defaults(project_dir: Path | str = ".") -> dict[str, Scalar]:
    """The flat ``[tool.flwr.app.config]`` defaults of a project's ``pyproject.toml``."""
    import tomllib

    from flwr.common.config import flatten_dict

    with (Path(project_dir) / "pyproject.toml").open("rb") as f:
        return dict(flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"]))
