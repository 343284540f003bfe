"""Privacy accounting for DP-SGD on Google's dp-accounting library (no hand-written RDP).

A DP-SGD step with Poisson sampling rate q and noise multiplier sigma is the dp-accounting event
PoissonSampled(q, Gaussian(sigma)); T steps are that event self-composed T times. Two
accountants: "rdp" (Renyi DP, the default, with Opacus's orders so the numbers agree) and
"pld" (privacy loss distributions, tighter). The accountant state is a short history of
(noise_multiplier, sample_rate, steps) entries: serialisable to JSON and restorable.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

import dp_accounting
from dp_accounting import pld as _pld
from dp_accounting import rdp as _rdp

# Opacus's RDP orders (opacus/accountants/rdp.py): using the same grid makes epsilons agree.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))

ACCOUNTANTS = ("rdp", "pld")


class _DropNonConvergedOrders(logging.Filter):
    """dp-accounting logs a warning each time a small RDP order (alpha < 2) fails to converge for
    a small sigma and drops that order; calibration probes such sigmas dozens of times, flooding
    the console. The result is still a valid upper bound (the order is excluded), so drop them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropNonConvergedOrders())


class PrivacyBudgetExceeded(RuntimeError):
    """Raised before a DP-SGD step whose privacy cost would exceed the configured max_epsilon."""


def _check_mechanism(accountant: str) -> str:
    name = accountant.lower()
    if name == "prv":
        raise ValueError("accountant='prv' is not provided by fastdp; use 'rdp' (default) or 'pld'")
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; expected one of {ACCOUNTANTS}")
    return name


def _event(history: list[tuple[float, float, int]]) -> dp_accounting.DpEvent:
    events = []
    for sigma, q, steps in history:
        if steps <= 0:
            continue
        if sigma <= 0 and q > 0:
            # No noise: no finite privacy guarantee.
            events.append(dp_accounting.NonPrivateDpEvent())
            continue
        gauss = dp_accounting.GaussianDpEvent(sigma)
        step_event = gauss if q >= 1.0 else dp_accounting.PoissonSampledDpEvent(q, gauss)
        events.append(dp_accounting.SelfComposedDpEvent(step_event, int(steps)))
    return dp_accounting.ComposedDpEvent(events)


def _new_accountant(accountant: str) -> dp_accounting.PrivacyAccountant:
    name = _check_mechanism(accountant)
    if name == "rdp":
        return _rdp.RdpAccountant(orders=list(RDP_ORDERS))
    return _pld.PLDAccountant()


def epsilon_for_history(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon after a sequence of DP-SGD phases.

    Args:
        history: [(noise_multiplier sigma, sample_rate q in (0, 1], steps)] entries.
        delta: target delta in (0, 1).
        accountant: "rdp" or "pld".
    Returns:
        epsilon (float; 0 for an empty history, inf without noise).
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if sum(s for _, _, s in history) == 0:
        return 0.0
    acc = _new_accountant(accountant)
    event = _event(history)
    if not acc.supports(event):
        return math.inf
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def compute_epsilon(
    sample_rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """Epsilon of `steps` Poisson-sampled Gaussian steps (sample rate q, noise multiplier sigma) at delta."""
    return epsilon_for_history([(float(noise_multiplier), float(sample_rate), int(steps))], delta, accountant)


def get_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
    max_sigma: float = 1e4,
) -> float:
    """Smallest noise multiplier sigma (to `epsilon_tolerance`) with epsilon(sigma) <= target_epsilon.

    Bisection on sigma: epsilon decreases monotonically in sigma.
    """
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    lo, hi = 0.0, 1.0
    while compute_epsilon(sample_rate, hi, steps, target_delta, accountant) > target_epsilon:
        lo, hi = hi, 2 * hi
        if hi > max_sigma:
            raise ValueError(f"no noise multiplier <= {max_sigma} reaches epsilon {target_epsilon}")
    eps_hi = compute_epsilon(sample_rate, hi, steps, target_delta, accountant)
    while target_epsilon - eps_hi > epsilon_tolerance and hi - lo > 1e-6:
        mid = (lo + hi) / 2
        eps_mid = compute_epsilon(sample_rate, mid, steps, target_delta, accountant)
        if eps_mid <= target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi


@dataclass
class Accountant:
    """Tracks the DP-SGD steps taken and converts them to (epsilon, delta).

    Attributes:
        mechanism: "rdp" or "pld".
        history: [(noise_multiplier, sample_rate, steps)], consecutive equal steps merged.
    """

    mechanism: str = "rdp"
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mechanism = _check_mechanism(self.mechanism)
        self.history = [(float(s), float(q), int(n)) for s, q, n in self.history]

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Records `steps` DP-SGD steps with these parameters."""
        if self.history and self.history[-1][:2] == (float(noise_multiplier), float(sample_rate)):
            s, q, n = self.history[-1]
            self.history[-1] = (s, q, n + steps)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at this delta."""
        return epsilon_for_history(self.history, delta, self.mechanism)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, delta: float, steps: int = 1) -> float:
        """Epsilon if `steps` more steps with these parameters were taken (state unchanged)."""
        trial = Accountant(self.mechanism, list(self.history))
        trial.step(noise_multiplier, sample_rate, steps)
        return trial.get_epsilon(delta)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def __len__(self) -> int:
        return self.steps

    def state_dict(self) -> dict:
        return {"mechanism": self.mechanism, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """Restores state_dict(); ValueError when an entry is not (sigma >= 0, q in (0, 1], steps >= 0)."""
        mechanism = _check_mechanism(state["mechanism"])
        history = []
        for entry in state["history"]:
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise ValueError(f"accountant history entry {entry!r} is not (noise_multiplier, sample_rate, steps)")
            s, q, n = entry
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"accountant history entry {entry!r}: steps must be an integer >= 0")
            s, q = float(s), float(q)
            if not (math.isfinite(s) and s >= 0 and 0 < q <= 1):
                raise ValueError(f"accountant history entry {entry!r}: needs sigma >= 0 and 0 < q <= 1")
            history.append((s, q, n))
        self.mechanism, self.history = mechanism, history

    def to_json(self) -> str:
        return json.dumps(self.state_dict())

    @classmethod
    def from_json(cls, text: str) -> Accountant:
        state = json.loads(text)
        return cls(state["mechanism"], state["history"])
