"""Privacy accounting for DP-SGD, on Google's dp-accounting library (no hand-written RDP or PLD).

A DP-SGD step with Poisson sampling rate q and noise multiplier sigma is the dp-accounting event
PoissonSampled(q, Gaussian(sigma)); T steps are that event self-composed T times. Accountants
(`ACCOUNTANTS`, Opacus's names where Opacus has one):

- "rdp": Renyi DP over Opacus's orders. Equal to Opacus's RDPAccountant where the best order is
  an integer; at fractional orders dp-accounting's series bound is looser, so fastdp is up to
  ~0.5% higher (more conservative).
- "prv": Opacus's default, a numerical accountant (privacy random variables, Gopi et al. 2021).
  fastdp answers it with dp-accounting's privacy loss distribution (PLD) accountant for the same
  Poisson-subsampled Gaussian: the same numerical composition with the same meaning (a tight
  upper bound on epsilon), its discretisation sized to the answer for speed. It equals Opacus's
  PRV estimate to ~2.5e-4; Opacus reports estimate + eps_error (0.01), so fastdp's number is
  0.010-0.011 lower. The name stays "prv" so state dicts and `mechanism()` read as Opacus's.
- "pld": the PLD accountant with dp-accounting's defaults (within 1e-4 relative of "prv", slower).
- "gdp": Gaussian DP by the central limit theorem (Bu et al. 2020), as Opacus's
  GaussianAccountant: mu = q sqrt(T (exp(1/sigma^2) - 1)), then epsilon from mu and delta. An
  approximation, not an upper bound (it underestimates epsilon for few steps): it warns
  (GDPApproximationWarning).

The accountant state is a short history of (noise_multiplier, sample_rate, steps) entries:
serialisable to JSON and restorable. fastdp.accountants has Opacus-shaped classes on top of it.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any

import dp_accounting
from dp_accounting import pld as _pld
from dp_accounting import rdp as _rdp
from scipy import optimize as _optimize
from scipy import special as _special

# Opacus's RDP orders (opacus/accountants/rdp.py): using the same grid makes epsilons agree.
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))

ACCOUNTANTS = ("rdp", "pld", "prv", "gdp")

# Opacus's ceiling for the calibration search (opacus/accountants/utils.py MAX_SIGMA).
MAX_SIGMA = 1e6

# Options a caller may pass on to an accountant's epsilon (Opacus's get_epsilon keyword arguments).
_EPSILON_OPTIONS = {"rdp": {"alphas"}, "gdp": {"poisson"}, "prv": {"eps_error", "delta_error"}, "pld": set()}

History = list[tuple[float, float, int]]


class _DropNonConvergedOrders(logging.Filter):
    """dp-accounting logs a warning each time a small RDP order (alpha < 2) fails to converge for
    a small sigma and drops that order; calibration probes such sigmas dozens of times, flooding
    the console. The result is still a valid upper bound (the order is excluded), so drop them."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropNonConvergedOrders())


class PrivacyBudgetExceeded(RuntimeError):
    """Raised before a DP-SGD step whose privacy cost would exceed the configured max_epsilon."""


class GDPApproximationWarning(UserWarning):
    """accountant="gdp" is a central-limit approximation: it can underestimate epsilon."""


def _warn_gdp(stacklevel: int = 3) -> None:
    warnings.warn(
        "accountant='gdp' approximates the privacy of DP-SGD by the central limit theorem (Gaussian DP); it is "
        "not an upper bound and underestimates epsilon, notably for few steps. Use 'prv' (Opacus's default, "
        "numerical) or 'rdp' for a guarantee. See https://arxiv.org/abs/2106.02848.",
        GDPApproximationWarning,
        stacklevel=stacklevel,
    )


def check_mechanism(accountant: str) -> str:
    """The accountant name lower-cased; ValueError listing ACCOUNTANTS for anything else."""
    if not isinstance(accountant, str):
        raise ValueError(f"accountant must be a name, one of {', '.join(map(repr, ACCOUNTANTS))}; got {accountant!r}")
    name = accountant.lower()
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {accountant!r}; expected one of {', '.join(map(repr, ACCOUNTANTS))}")
    return name


def check_history(entries: Any) -> History:
    """Validated copy of an accountant history.

    Args:
        entries: iterable of (noise_multiplier sigma >= 0, sample_rate q in (0, 1], steps int >= 0).
    Returns:
        [(float sigma, float q, int steps)].
    Raises:
        ValueError naming the bad entry.
    """
    if isinstance(entries, (str, bytes, dict)):
        raise ValueError(
            f"accountant history must be a list of (noise_multiplier, sample_rate, steps), got {entries!r}"
        )
    history = []
    for entry in entries:
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise ValueError(f"accountant history entry {entry!r} is not (noise_multiplier, sample_rate, steps)")
        s, q, n = entry
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"accountant history entry {entry!r}: steps must be an integer >= 0")
        s, q = float(s), float(q)
        if not (math.isfinite(s) and s >= 0 and 0 < q <= 1):
            raise ValueError(f"accountant history entry {entry!r}: needs sigma >= 0 and 0 < q <= 1")
        history.append((s, q, int(n)))
    return history


def _event(history: History) -> dp_accounting.DpEvent:
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


def _new_accountant(name: str, alphas=None) -> dp_accounting.PrivacyAccountant:
    if name == "rdp":
        return _rdp.RdpAccountant(orders=list(RDP_ORDERS if alphas is None else alphas))
    # "pld": dp-accounting's defaults (privacy loss discretised at 1e-4, pessimistic: an upper bound).
    return _pld.PLDAccountant()


# "prv": the PLD accountant with the discretisation interval sized to the answer, as Opacus's PRV
# sizes its mesh from its error budget. The cost of a PLD grows with (loss range / interval), so
# dp-accounting's fixed 1e-4 spends seconds on the large epsilons that every calibration probes.
# A pessimistic PLD is an upper bound on epsilon at any interval; its excess over the 1e-4 answer
# grows about quadratically with the interval (measured at epsilon ~ 1: 3e-5 at 2e-4, 2.3e-4 at
# 5e-4, 1e-3 at 1e-3). Interval 2e-4 * epsilon, clipped to [1e-4, 1e-3], from a first pass at 1e-3,
# keeps "prv" within ~1e-4 relative of "pld" (2e-5 measured on the test grid) at a fraction of the cost.
_PRV_COARSE_INTERVAL = 1e-3
_PRV_MIN_INTERVAL = 1e-4
_PRV_INTERVAL_PER_EPSILON = 2e-4


def _pld_epsilon(event: dp_accounting.DpEvent, delta: float, interval: float) -> float:
    acc = _pld.PLDAccountant(value_discretization_interval=interval)
    if not acc.supports(event):
        return math.inf
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def _prv_refine(event: dp_accounting.DpEvent, delta: float, coarse: float) -> float:
    interval = min(max(_PRV_INTERVAL_PER_EPSILON * coarse, _PRV_MIN_INTERVAL), _PRV_COARSE_INTERVAL)
    if interval >= _PRV_COARSE_INTERVAL or math.isinf(coarse):
        return coarse
    # Both are upper bounds on epsilon: the smaller is one too.
    return min(coarse, _pld_epsilon(event, delta, interval))


def _prv_epsilon(event: dp_accounting.DpEvent, delta: float) -> float:
    return _prv_refine(event, delta, _pld_epsilon(event, delta, _PRV_COARSE_INTERVAL))


# ----------------------------------------------------------------------------- Gaussian DP (CLT)


def gdp_mu(history: History, poisson: bool = True) -> float:
    """mu of mu-GDP that the central limit theorem assigns to a DP-SGD history (Bu et al. 2020).

    One phase of T steps at rate q and noise multiplier sigma has mu^2 = q^2 T (exp(1/sigma^2) - 1)
    with Poisson sampling, mu^2 = 2 q^2 T (exp(1/sigma^2) Phi(1.5/sigma) + 3 Phi(-0.5/sigma) - 2)
    with uniform sampling (Opacus's formulas); phases add their mu^2 (the same CLT sums the
    per-step terms, so one phase reduces exactly to Opacus's GaussianAccountant).

    Args:
        history: [(noise_multiplier sigma, sample_rate q, steps)].
        poisson: Poisson (True) or uniform (False) subsampling.
    Returns:
        mu >= 0 (inf without noise).
    """
    total = 0.0
    for sigma, q, steps in history:
        if steps <= 0:
            continue
        if sigma <= 0:
            return math.inf
        inv2 = 1.0 / sigma**2
        if inv2 > 700:  # exp overflows: so little noise that the approximation has no finite mu
            return math.inf
        if poisson:
            per_step = math.expm1(inv2)
        else:
            per_step = 2 * (math.exp(inv2) * _special.ndtr(1.5 / sigma) + 3 * _special.ndtr(-0.5 / sigma) - 2)
        total += q * q * steps * per_step
    return math.sqrt(total)


def _gdp_delta(eps: float, mu: float) -> float:
    # delta(eps) of mu-GDP = Phi(-eps/mu + mu/2) - exp(eps) Phi(-eps/mu - mu/2); the second term in
    # logs, since exp(eps) alone overflows for large eps.
    a = _special.ndtr(-eps / mu + mu / 2)
    b = math.exp(eps + _special.log_ndtr(-eps / mu - mu / 2))
    return float(a - b)


def gdp_epsilon(mu: float, delta: float) -> float:
    """Smallest epsilon with mu-GDP => (epsilon, delta)-DP (the mu-GDP / (eps, delta) duality).

    Args:
        mu: the GDP parameter (>= 0).
        delta: in (0, 1).
    Returns:
        epsilon >= 0: 0 when mu-GDP already gives (0, delta) (Opacus raises there); inf for mu = inf.
    """
    if math.isinf(mu):
        return math.inf
    if mu <= 0 or _gdp_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while _gdp_delta(hi, mu) > delta:  # delta(eps) decreases in eps: bracket the root
        hi *= 2
        if hi > 1e6:
            return math.inf
    return float(_optimize.brentq(lambda e: _gdp_delta(e, mu) - delta, 0.0, hi, xtol=1e-12, rtol=1e-12))


# ----------------------------------------------------------------------------- epsilon


def _epsilon(history: History, delta: float, name: str, options: dict | None = None) -> float:
    options = options or {}
    if name == "gdp":
        return gdp_epsilon(gdp_mu(history, poisson=bool(options.get("poisson", True))), delta)
    event = _event(history)
    if name == "prv":
        return _prv_epsilon(event, delta)
    acc = _new_accountant(name, options.get("alphas"))
    if not acc.supports(event):
        return math.inf
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def _check_options(name: str, options: dict) -> None:
    unknown = set(options) - _EPSILON_OPTIONS[name]
    if unknown:
        allowed = ", ".join(sorted(_EPSILON_OPTIONS[name])) or "none"
        raise TypeError(f"accountant {name!r} takes no option(s) {sorted(unknown)}; its options: {allowed}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


def epsilon_for_history(history: History, delta: float, accountant: str = "rdp", **options) -> float:
    """Epsilon after a sequence of DP-SGD phases.

    Args:
        history: [(noise_multiplier sigma, sample_rate q in (0, 1], steps)] entries.
        delta: target delta in (0, 1).
        accountant: one of ACCOUNTANTS.
        options: Opacus's get_epsilon options: alphas (rdp: the RDP orders), poisson (gdp:
            False for uniform sampling), eps_error / delta_error (prv: accepted and unused, the
            PLD estimate is already an upper bound).
    Returns:
        epsilon (float; 0 for an empty history, inf without noise).
    """
    name = check_mechanism(accountant)
    _check_options(name, options)
    _check_delta(delta)
    if name == "gdp":
        _warn_gdp()
    if sum(s for _, _, s in history) == 0:
        return 0.0
    return _epsilon(history, delta, name, options)


def compute_epsilon(
    sample_rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str = "rdp", **options
) -> float:
    """Epsilon of `steps` Poisson-sampled Gaussian steps (sample rate q, noise multiplier sigma) at delta.

    options: as epsilon_for_history.
    """
    history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    return epsilon_for_history(history, delta, accountant, **options)


def rdp_privacy_spent(history: History, delta: float, alphas=None) -> tuple[float, float]:
    """(epsilon, optimal RDP order) of a history under RDP, as Opacus's RDPAccountant.get_privacy_spent.

    Args:
        history: [(sigma, q, steps)].
        delta: in (0, 1).
        alphas: RDP orders (> 1) to optimise over; None: RDP_ORDERS (Opacus's DEFAULT_ALPHAS).
    Returns:
        (epsilon, alpha): (0.0, 0.0) for an empty history (as Opacus), (inf, nan) without noise.
    """
    _check_delta(delta)
    if sum(s for _, _, s in history) == 0:
        return 0.0, 0.0
    acc = _new_accountant("rdp", alphas)
    event = _event(history)
    if not acc.supports(event):
        return math.inf, math.nan
    acc.compose(event)
    eps, order = acc.get_epsilon_and_optimal_order(delta)
    return float(eps), float(order)


# ----------------------------------------------------------------------------- calibration


def steps_for(sample_rate: float, epochs: float | None = None, steps: int | None = None) -> int:
    """Number of steps from exactly one of `steps` and `epochs`, as Opacus: int(epochs / sample_rate).

    Opacus truncates the float quotient, so e.g. 7 epochs at q = 0.035 are 199 steps
    (7 / 0.035 = 199.99999999999997); fastdp does the same so calibrations agree.
    """
    if (steps is None) == (epochs is None):
        raise ValueError("get_noise_multiplier takes exactly one of steps= and epochs= (steps = epochs / sample_rate)")
    if steps is None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        return int(epochs / sample_rate)
    return int(steps)


def get_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int | None = None,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
    max_sigma: float = MAX_SIGMA,
    *,
    epochs: float | None = None,
    **options,
) -> float:
    """Smallest noise multiplier sigma (to `epsilon_tolerance`) with epsilon(sigma) <= target_epsilon.

    Accepts Opacus's signature (opacus.accountants.utils.get_noise_multiplier, all keywords) and
    fastdp's older positional one (target_epsilon, target_delta, sample_rate, steps, accountant).
    The search is Opacus's: sigma_high doubles from 20 until epsilon <= target, then bisection
    on [0, sigma_high] until target - epsilon(sigma_high) <= epsilon_tolerance; with the same
    epsilon function it returns the same sigma as Opacus.

    Args:
        target_epsilon, target_delta: the (epsilon, delta) budget.
        sample_rate: Poisson sampling rate q.
        steps: number of steps; or
        epochs: number of epochs, steps = int(epochs / sample_rate) (exactly one of the two).
        accountant: one of ACCOUNTANTS.
        epsilon_tolerance: the result spends between target - tolerance and target.
        max_sigma: give up (ValueError) above this sigma.
        options: passed to the accountant's epsilon (see epsilon_for_history).
    Returns:
        sigma (float).
    """
    name = check_mechanism(accountant)
    _check_options(name, options)
    _check_delta(target_delta)
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    n_steps = steps_for(sample_rate, epochs, steps)
    if n_steps < 1:
        raise ValueError(f"get_noise_multiplier needs at least one step, got steps={n_steps} (epochs={epochs})")
    if name == "gdp":
        _warn_gdp()

    def eps(sigma: float) -> float:
        history = [(sigma, float(sample_rate), n_steps)]
        if name != "prv":
            return _epsilon(history, target_delta, name, options)
        event = _event(history)
        coarse = _pld_epsilon(event, target_delta, _PRV_COARSE_INTERVAL)
        if coarse <= target_epsilon - epsilon_tolerance:
            # The "prv" epsilon is <= coarse, so every decision of the search below (below the
            # target, not yet within tolerance) is the same with coarse as with the refined value.
            return coarse
        return _prv_refine(event, target_delta, coarse)

    lo, hi, eps_hi = 0.0, 10.0, math.inf
    while eps_hi > target_epsilon:
        hi *= 2
        if hi > max_sigma:
            raise ValueError(
                f"no noise multiplier <= {max_sigma:g} reaches epsilon {target_epsilon} at delta {target_delta} in "
                f"{n_steps} steps at sample rate {sample_rate}: raise the budget or lower the sample rate / steps"
            )
        eps_hi = eps(hi)
    # hi - lo > 1e-9: a guard for epsilon functions with plateaus (no endless loop); never binding otherwise.
    while target_epsilon - eps_hi > epsilon_tolerance and hi - lo > 1e-9:
        mid = (lo + hi) / 2
        eps_mid = eps(mid)
        if eps_mid < target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi


# ----------------------------------------------------------------------------- the accountant


@dataclass
class Accountant:
    """Tracks the DP-SGD steps taken and converts them to (epsilon, delta).

    fastdp's own accountant (used by the engine, the Sites and the strategies). `mechanism` is a
    string here; the Opacus-shaped classes in fastdp.accountants (RDPAccountant, PRVAccountant,
    ...) are views on one of these, where `mechanism()` is a classmethod as in Opacus.

    Attributes:
        mechanism: one of ACCOUNTANTS ("rdp", "pld", "prv", "gdp").
        history: [(noise_multiplier, sample_rate, steps)], consecutive equal steps merged.
    """

    mechanism: str = "rdp"
    history: History = field(default_factory=list)

    def __post_init__(self) -> None:
        self.mechanism = check_mechanism(self.mechanism)
        self.history = [(float(s), float(q), int(n)) for s, q, n in self.history]
        if self.mechanism == "gdp":
            _warn_gdp()

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Records `steps` DP-SGD steps with these parameters."""
        if self.history and self.history[-1][:2] == (float(noise_multiplier), float(sample_rate)):
            s, q, n = self.history[-1]
            self.history[-1] = (s, q, n + steps)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def get_epsilon(self, delta: float, **options) -> float:
        """Epsilon spent so far at this delta (options: as epsilon_for_history)."""
        _check_options(self.mechanism, options)
        _check_delta(delta)
        if self.steps == 0:
            return 0.0
        return _epsilon(self.history, delta, self.mechanism, options)

    def get_privacy_spent(self, delta: float, alphas=None) -> tuple[float, float]:
        """(epsilon, optimal RDP order) so far; the "rdp" accountant only (see rdp_privacy_spent)."""
        if self.mechanism != "rdp":
            raise ValueError(f"get_privacy_spent is RDP's (epsilon, best alpha); this accountant is {self.mechanism!r}")
        return rdp_privacy_spent(self.history, delta, alphas)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, delta: float, steps: int = 1) -> float:
        """Epsilon if `steps` more steps with these parameters were taken (state unchanged)."""
        trial = Accountant.__new__(Accountant)  # no __post_init__: no second gdp warning
        trial.mechanism, trial.history = self.mechanism, list(self.history)
        trial.step(noise_multiplier, sample_rate, steps)
        return trial.get_epsilon(delta)

    def steps_within(
        self, noise_multiplier: float, sample_rate: float, delta: float, max_epsilon: float, limit: int = 10**7
    ) -> int:
        """Most further steps with these parameters that keep epsilon at `delta` <= max_epsilon.

        One search (exponential, then bisection: about 2 log2(n) epsilon evaluations) instead of an
        epsilon_after per step, which costs ~0.1-0.5 s with the numerical accountants. Epsilon grows
        with the number of steps, so "step k is allowed" is "k <= steps_within(...)".

        Args:
            noise_multiplier, sample_rate: sigma and q of the coming steps.
            delta: in (0, 1).
            max_epsilon: the budget.
            limit: the search stops here (returned when even `limit` steps fit).
        Returns:
            n >= 0 (0: not even one more step fits).
        """
        if self.epsilon_after(noise_multiplier, sample_rate, delta, 1) > max_epsilon:
            return 0
        lo, hi = 1, 2  # invariant: lo steps fit
        while hi <= limit and self.epsilon_after(noise_multiplier, sample_rate, delta, hi) <= max_epsilon:
            lo, hi = hi, 2 * hi
        if hi > limit:
            hi = limit + 1
            if self.epsilon_after(noise_multiplier, sample_rate, delta, limit) <= max_epsilon:
                return limit
        while hi - lo > 1:  # lo fits, hi does not
            mid = (lo + hi) // 2
            if self.epsilon_after(noise_multiplier, sample_rate, delta, mid) <= max_epsilon:
                lo = mid
            else:
                hi = mid
        return lo

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def __len__(self) -> int:
        return self.steps

    def state_dict(self) -> dict:
        return {"mechanism": self.mechanism, "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        """Restores state_dict(); ValueError when an entry is not (sigma >= 0, q in (0, 1], steps >= 0)."""
        mechanism = check_mechanism(state["mechanism"])
        history = check_history(state["history"])
        self.mechanism, self.history = mechanism, history

    def to_json(self) -> str:
        return json.dumps(self.state_dict())

    @classmethod
    def from_json(cls, text: str) -> Accountant:
        state = json.loads(text)
        return cls(state["mechanism"], state["history"])
