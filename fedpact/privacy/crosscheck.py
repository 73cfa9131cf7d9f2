"""Recompute a job's ε with Google's `dp-accounting` (RDP and PLD), independently of Opacus.

A reviewer can take the recorded (noise multiplier, sampling rate, steps) of any partner and get
the same guarantee from a second implementation: RDP should agree with Opacus' RDP figure to a
few percent (different order grids); PLD is tighter (smaller ε) and is reported beside it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant


class _ExcludedOrders(logging.Filter):
    """dp-accounting logs a warning per fractional RDP order whose series does not converge at
    large sampling rates and leaves that order out; the bound from the remaining orders stays
    valid (only possibly looser), so the warning is not shown to users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_ExcludedOrders())

RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512, 1024]


def _event(history: list[tuple[float, float, int]]) -> dp_accounting.DpEvent:
    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.GaussianDpEvent(sigma) if q >= 1.0 else  # an unsampled release
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), int(steps))
        for sigma, q, steps in history if steps > 0
    ]
    return dp_accounting.ComposedDpEvent(events)


@dataclass
class CrossCheck:
    opacus_rdp: float
    google_rdp: float
    google_pld: float

    @property
    def rdp_relative_gap(self) -> float:
        return abs(self.opacus_rdp - self.google_rdp) / max(self.google_rdp, 1e-12)

    def to_dict(self) -> dict:
        return {"opacus_rdp": self.opacus_rdp, "google_rdp": self.google_rdp,
                "google_pld": self.google_pld, "rdp_relative_gap": self.rdp_relative_gap}


def google_epsilons(history: list[tuple[float, float, int]], delta: float) -> tuple[float, float]:
    """(RDP ε, PLD ε) from dp-accounting for a DP-SGD history at δ."""
    if not history:
        return 0.0, 0.0
    event = _event(history)
    rdp = rdp_privacy_accountant.RdpAccountant(RDP_ORDERS)
    rdp.compose(event)
    pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(event)
    return float(rdp.get_epsilon(delta)), float(pld.get_epsilon(delta))


def cross_check(history: list[tuple[float, float, int]], delta: float, opacus_epsilon: float) -> CrossCheck:
    rdp, pld = google_epsilons(history, delta)
    return CrossCheck(float(opacus_epsilon), rdp, pld)
