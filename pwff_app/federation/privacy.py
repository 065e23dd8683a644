"""Client-side differential privacy of the shared update, with Flower's own parts.

The client clips its update (Flower's ``fixedclipping_mod``) before it crosses the link; the
server adds Gaussian noise to the aggregate (``DifferentialPrivacyClientSideFixedClipping``,
std = noise multiplier x clipping norm / clients). Which methods allow it is their row's
``dp`` property (:mod:`pwff_app.methods`); the config refuses the others up front.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from flwr.app import ArrayRecord, Context, Message, MessageType, MetricRecord
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from pwff_app.config import DPConfig

if TYPE_CHECKING:  # the strategy module is the server's; clients import this module for the mod
    from pwff_app.federation.strategy import _PartialMixin


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side clipping, active when the server's DP wrapper sends a clip norm.

    Placed inside the link mod, so what crosses the channel is the clipped update.
    """
    config = msg.content.config_records.get("config")
    if msg.metadata.message_type == MessageType.TRAIN and config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


class _ScreenedDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's DP wrapper, which skips a round with any failed reply before the inner strategy
    sees one: the inner strategy's checks screen such a round first (events, round-1 rule)."""

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if any(msg.has_error() for msg in replies):
            self.strategy.screen_train(server_round + self.strategy.round_offset, replies)
            self.strategy.recorder.event("kept-global", reason="a failed reply: Flower's DP wrapper skips the round")
        return super().aggregate_train(server_round, replies)


def with_dp(strategy: _PartialMixin, dp: DPConfig, num_clients: int) -> tuple[Strategy, dict[str, Any]]:
    """``strategy`` wrapped for client-side DP when ``dp`` is enabled, and the ``privacy`` summary block."""
    if not dp.enabled:
        return strategy, {"enabled": False}
    wrapped = _ScreenedDP(
        strategy, noise_multiplier=dp.noise_multiplier, clipping_norm=dp.clipping_norm,
        num_sampled_clients=num_clients)
    return wrapped, {"enabled": True, "mechanism": "client-side fixed clipping + Gaussian noise (Flower)",
                     "noise_multiplier": dp.noise_multiplier, "clipping_norm": dp.clipping_norm,
                     "num_sampled_clients": num_clients}
