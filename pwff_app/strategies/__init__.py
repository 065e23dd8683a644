"""Server-side strategies built on ``flwr.serverapp.strategy``."""

from pwff_app.strategies.partial import PartialFedAvg

__all__ = ["PartialFedAvg"]
