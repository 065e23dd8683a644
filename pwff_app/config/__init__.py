"""One validated config tree for every section (see :mod:`pwff_app.config.run`).

``RunConfig.from_run_config(context.run_config)`` is read once, before any work; a bad value
or a combination the method cannot honour raises :class:`ConfigError`, one line per problem.
"""

from pwff_app.config.base import AGGREGATOR_NAMES, DOWNLINK_MISS, LOSS_MODELS, MASK_RULES, TRAIN_MODES, ConfigError
from pwff_app.config.run import RunConfig, app_defaults, method_conflicts
from pwff_app.config.sections import (
    AggregationConfig,
    ChannelConfig,
    CompressionConfig,
    DPConfig,
    FedbertConfig,
    InstructConfig,
    TaskConfig,
)

__all__ = [
    "AGGREGATOR_NAMES", "DOWNLINK_MISS", "LOSS_MODELS", "MASK_RULES", "TRAIN_MODES", "AggregationConfig",
    "ChannelConfig", "CompressionConfig", "ConfigError", "DPConfig", "FedbertConfig", "InstructConfig", "RunConfig", "TaskConfig",
    "app_defaults", "method_conflicts",
]
