"""How a round's clients share the cell's band (``wireless.allocation``): equal or proportional-fair.

The base station (the server) decides once per round, for the clients the round schedules, what
share of ``wireless.bandwidth-hz`` each holds for its uplink; the shares sum to 1.

* ``equal``: 1 / k each (:func:`equal_shares`).
* ``proportional-fair``: Sionna's :class:`sionna.sys.PFSchedulerSUMIMO` (Jalali et al. 2000)
  run over a window of :data:`PF_SLOTS` slots: each slot goes to the client of highest
  ``achievable rate / discounted past throughput``; a client's share is the fraction of the
  window's slots it won (at least one slot each). The scheduler's past throughputs carry over
  from round to round, so a client that was served little (not scheduled, or a poor channel)
  wins more slots when it is scheduled again. Achievable rates come from what the base station
  knows (the average SINR of each link, never the coming fade).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

PF_SLOTS = 40  # slots of the PF scheduling window per round (shares are multiples of 1/40)


def equal_shares(clients: Sequence[int]) -> dict[int, float]:
    """1 / k of the band for each of the k ``clients``."""
    return {cid: 1.0 / len(clients) for cid in clients}


class ProportionalFair:
    """Sionna's PF scheduler over the run's ``num_clients`` clients, its state kept across rounds.

    ``shares(rates)`` with ``rates``: client id -> achievable rate in bit/s of each client the
    round schedules (unscheduled clients achieve 0 and their past throughput decays).
    """

    def __init__(self, num_clients: int, beta: float = 0.98) -> None:
        from pwff_app.wireless.cell import _sionna

        self.num_clients = num_clients
        self._pf = _sionna().sys.PFSchedulerSUMIMO(num_clients, num_freq_res=1, num_ofdm_sym=1, beta=beta)
        self._last: Any = None  # rate achieved in the last slot, [num_clients]

    def shares(self, rates: Mapping[int, float]) -> dict[int, float]:
        """Fraction of the window's slots each scheduled client wins (sum 1, each >= 1 slot)."""
        import torch

        achievable = torch.zeros(self.num_clients, dtype=torch.float64)
        for cid, rate in rates.items():
            achievable[cid] = rate
        last = self._last if self._last is not None else torch.zeros_like(achievable)
        wins = torch.zeros(self.num_clients, dtype=torch.float64)
        for _ in range(PF_SLOTS):
            scheduled = self._pf(last, achievable.view(1, 1, -1))[0, 0, :, 0]
            last = torch.where(scheduled, achievable, torch.zeros_like(achievable))
            wins += scheduled.to(torch.float64)
        self._last = last
        won = {cid: max(1.0, float(wins[cid])) for cid in rates}
        total = sum(won.values())
        return {cid: w / total for cid, w in won.items()}

