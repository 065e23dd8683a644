"""Config building blocks: value types, the section base class, one error type and its lines."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

Scalar = int | float | str | bool

Aggregator = Literal["fedavg", "median", "trimmed-mean"]
MaskRule = Literal["magnitude", "random"]
LossModel = Literal["packet", "outage", "none"]
DownlinkMiss = Literal["stale", "skip"]
FedbertTrain = Literal["full", "all", "adapter"]
Scenario = Literal["rayleigh", "uma", "umi", "rma"]
Allocation = Literal["equal", "proportional-fair"]
Selection = Literal["all", "random", "best-channel", "proportional-fair", "age"]
AGGREGATOR_NAMES: tuple[str, ...] = get_args(Aggregator)
MASK_RULES: tuple[str, ...] = get_args(MaskRule)
LOSS_MODELS: tuple[str, ...] = get_args(LossModel)
DOWNLINK_MISS: tuple[str, ...] = get_args(DownlinkMiss)
TRAIN_MODES: tuple[str, ...] = get_args(FedbertTrain)
# The top-level keys that form the ``aggregation`` section of the tree.
AGGREGATION_KEYS = ("aggregator", "trim-fraction", "max-update-norm", "max-num-examples", "min-survivors")


class ConfigError(ValueError):
    """A run-config value is missing, out of range or refused for the method; one line per problem."""


# ---------------------------------------------------------------- value types


def _integral(value: Any) -> Any:
    """TOML and ``--run-config`` give ``4096.0`` for an integer written ``4096.0``: accept it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _number_list(value: Any) -> Any:
    """``"1.0,0.8"`` (or a bare number from a CLI override) -> a tuple of floats."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),)
    if isinstance(value, str):
        try:
            values = tuple(float(x) for x in value.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"must be a comma list of numbers, e.g. \"1.0,0.8\", got {value!r}") from None
        if not values:
            raise ValueError("must list at least one number")
        return values
    return value


def _weight_pairs(value: Any) -> Any:
    """``"0.8:0.2,0.2:0.8"`` -> ((0.8, 0.2), (0.2, 0.8)): per-client (w_help, w_safe)."""
    if not isinstance(value, str):
        return value
    out = []
    for item in (x.strip() for x in value.split(",") if x.strip()):
        try:
            pair = tuple(float(p) for p in item.split(":"))
        except ValueError:
            pair = ()
        if len(pair) != 2 or min(pair) < 0 or sum(pair) <= 0:
            raise ValueError(f"must be a comma list of 'w_help:w_safe' pairs of non-negative numbers "
                             f"(not both 0), got {item!r}")
        out.append(pair)
    if not out:
        raise ValueError("must list at least one 'w_help:w_safe' pair")
    return tuple(out)


# Strict: "42" is no integer and 1 is no boolean; an integral float is an integer (see _integral).
Int = Annotated[int, BeforeValidator(_integral), Strict()]
PositiveInt = Annotated[int, BeforeValidator(_integral), Strict(), Field(gt=0)]
NonNegativeInt = Annotated[int, BeforeValidator(_integral), Strict(), Field(ge=0)]
Float = Annotated[float, Strict()]
Positive = Annotated[float, Strict(), Field(gt=0)]
NonNegative = Annotated[float, Strict(), Field(ge=0)]
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
NumberList = Annotated[tuple[float, ...], BeforeValidator(_number_list)]

# Every section is a frozen pydantic dataclass with these settings (dash-case keys, no NaN/inf).
section = dataclass(config=ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False,
                                      alias_generator=lambda name: name.replace("_", "-")), frozen=True)


class Section:
    """Base of the sections (each decorated with :data:`section`): flat keys ``<SECTION>.<field-name>``."""

    SECTION: ClassVar[str] = ""  # "" = the keys have no prefix
    TOP_LEVEL: ClassVar[tuple[str, ...]] = ()  # top-level keys this section reads too (e.g. seed)

    @classmethod
    def section_input(cls, rc: Mapping[str, Scalar]) -> dict[str, Scalar]:
        """This section's keys from the flat run config, without the prefix."""
        prefix = cls.SECTION + "."
        own = {k[len(prefix):]: v for k, v in rc.items() if k.startswith(prefix)}
        return own | {k: rc[k] for k in cls.TOP_LEVEL if k in rc}

    @classmethod
    def from_run_config(cls, rc: Mapping[str, Scalar]) -> Any:
        """This section from the flat run config; a missing key takes the default."""
        return validated(cls, cls.section_input(rc), section=cls.SECTION)


# ---------------------------------------------------------------- error lines

_ALLOWED = {
    "int_type": "an integer", "int_from_float": "an integer", "int_parsing": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "bool_type": "true or false", "string_type": "a string", "tuple_type": "a comma list",
}


def flat_key(loc: list[str]) -> str:
    """The flat run-config key of a location in the tree (``["task", "alpha"]`` -> ``task.alpha``)."""
    if loc and loc[0] == "aggregation":
        loc = loc[1:]  # the aggregation section's keys are top-level
    if loc[:2] == ["wireless", "seed"]:
        loc = loc[1:]  # the link reads the run's seed
    return ".".join(loc)


def _line(error: Mapping[str, Any], section: str) -> str:
    """One line for one pydantic error: the flat key, what it allows, what it got."""
    field = [str(p) for p in error["loc"] if not isinstance(p, int)]
    key = flat_key(([section] if section else []) + field)
    kind, ctx, got = error["type"], error.get("ctx", {}), error.get("input")
    if kind == "value_error" and not field:  # a rule over several keys names them itself
        return f"run config: {ctx.get('error', error['msg'])}"
    if kind == "missing":
        return f"run config: missing key '{key}'"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        return f"run config: unknown key '{key}' (not in [tool.flwr.app.config])"
    if kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
        return f"run config: '{key}' {message}" if key else f"run config: {message}"
    bounds = {"greater_than": "> {gt}", "greater_than_equal": ">= {ge}", "less_than": "< {lt}",
              "less_than_equal": "<= {le}", "literal_error": "one of {expected}"}
    shown = {k: f"{v:g}" if isinstance(v, (int, float)) else v for k, v in ctx.items()}
    allowed = bounds[kind].format(**shown) if kind in bounds else _ALLOWED.get(kind, error["msg"].lower())
    return f"run config: '{key}' must be {allowed}, got {got!r}"


def validated(model: type, data: Mapping[str, Any], section: str = "") -> Any:
    """``model`` validated from ``data``; :class:`ConfigError` with one line per problem."""
    try:
        return TypeAdapter(model).validate_python(dict(data))
    except ValidationError as err:
        lines = dict.fromkeys(_line(e, section) for e in err.errors())  # ordered, no repeats
        raise ConfigError("\n".join(lines)) from None


