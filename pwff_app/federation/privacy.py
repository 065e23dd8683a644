"""Client-side differential privacy of the shared update, with Flower's own parts.

The client clips its update (Flower's ``fixedclipping_mod``) before it crosses the link; the
server adds Gaussian noise to the aggregate (``DifferentialPrivacyClientSideFixedClipping``,
std = noise multiplier x clipping norm / clients). Which methods allow it is their row's
``dp`` property (:mod:`pwff_app.methods`); the config refuses the others up front.
"""

from __future__ import annotations

from typing import Any

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from pwff_app.config import DPConfig


def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side clipping, active when the server's DP wrapper sends a clip norm.

    Placed inside the link mod, so what crosses the channel is the clipped update.
    """
    config = msg.content.config_records.get("config")
    if msg.metadata.message_type == MessageType.TRAIN and config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def with_dp(strategy: Strategy, dp: DPConfig, num_clients: int) -> tuple[Strategy, dict[str, Any]]:
    """``strategy`` wrapped for client-side DP when ``dp`` is enabled, and the ``privacy`` summary block."""
    if not dp.enabled:
        return strategy, {"enabled": False}
    wrapped = DifferentialPrivacyClientSideFixedClipping(
        strategy, noise_multiplier=dp.noise_multiplier, clipping_norm=dp.clipping_norm,
        num_sampled_clients=num_clients)
    return wrapped, {"enabled": True, "mechanism": "client-side fixed clipping + Gaussian noise (Flower)",
                     "noise_multiplier": dp.noise_multiplier, "clipping_norm": dp.clipping_norm,
                     "num_sampled_clients": num_clients}
