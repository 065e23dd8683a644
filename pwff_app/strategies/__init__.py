"""Server-side strategies built on ``flwr.serverapp.strategy``."""

from pwff_app.strategies.partial import AGGREGATORS, PartialFedAvg, PartialFedMedian, PartialFedTrimmedAvg

__all__ = ["AGGREGATORS", "PartialFedAvg", "PartialFedMedian", "PartialFedTrimmedAvg"]
