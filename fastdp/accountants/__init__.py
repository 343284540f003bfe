"""Opacus-shaped privacy accountants: `from fastdp.accountants import RDPAccountant` as from opacus.accountants.

    acc = create_accountant("prv")            # or RDPAccountant(), PRVAccountant(), GaussianAccountant()
    acc.step(noise_multiplier=1.0, sample_rate=0.01)
    acc.get_epsilon(delta=1e-5); acc.history; acc.mechanism(); acc.state_dict()

Each class is a thin view on a fastdp.accounting.Accountant (`.core`), which holds the history
and does the arithmetic (dp-accounting for "rdp"/"prv"/"pld", the CLT formula for "gdp"). The
view adds Opacus's surface: `mechanism()` is a classmethod (on the core, `mechanism` is the name
string), `history` may be assigned as Opacus code does, `state_dict()` has Opacus's keys (the same
keys as the core's, so either loads the other's), `get_privacy_spent` for RDP. It also keeps the
core's methods (`step(sigma, q, steps=1)` positionally, `epsilon_after`, `steps`), so a view can
stand wherever a core Accountant is expected.

Differences from Opacus, by design:
- `len(acc)` is the number of steps (what Opacus's IAccountant documents), not Opacus's number of
  history entries; `acc.steps` is the same number.
- "prv" is computed by dp-accounting's PLD accountant (same meaning: numerical composition, an
  upper bound on epsilon); PRVAccountant.get_epsilon accepts Opacus's eps_error / delta_error and
  does not need them. Opacus reports its PRV estimate + eps_error (0.01); fastdp equals the estimate
  to ~2.5e-4, so its "prv" number is 0.010-0.011 lower than Opacus's.
- "rdp" equals Opacus's where the best order is an integer; at fractional orders dp-accounting's
  bound on the series is looser, so fastdp's epsilon is up to ~0.5% higher (more conservative).
- GaussianAccountant accepts a change of noise multiplier or sample rate (the CLT's mu^2 add
  over phases) where Opacus raises; it warns at construction, as Opacus does.
- `load_state_dict` validates the history entries (sigma >= 0, 0 < q <= 1, integer steps).
- PLDAccountant ("pld") has no Opacus counterpart; there is no register_accountant.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, ClassVar

from fastdp.accounting import Accountant, check_history, check_mechanism

__all__ = [
    "IAccountant",
    "RDPAccountant",
    "PRVAccountant",
    "PLDAccountant",
    "GaussianAccountant",
    "create_accountant",
    "as_opacus",
]


class IAccountant:
    """Base of the Opacus-shaped accountants: a view on a fastdp.accounting.Accountant.

    Args:
        core: the Accountant to view (its mechanism must be this class's); None: a new empty one.

    Attributes:
        core: the fastdp Accountant that holds the state (share it with fastdp code that expects one).
        history: [(noise_multiplier, sample_rate, num_steps)], as Opacus; assignable.
    """

    _MECHANISM: ClassVar[str] = ""

    def __init__(self, core: Accountant | None = None) -> None:
        if not self._MECHANISM:
            raise TypeError(
                "IAccountant is abstract: use create_accountant(name) or RDPAccountant(), PRVAccountant()..."
            )
        if core is None:
            core = Accountant(self._MECHANISM)
        elif core.mechanism != self._MECHANISM:
            raise ValueError(f"{type(self).__name__} views a {self._MECHANISM!r} Accountant, got {core.mechanism!r}")
        self.core = core

    @classmethod
    def mechanism(cls) -> str:
        """Accounting mechanism name ("rdp", "prv", "gdp", "pld")."""
        return cls._MECHANISM

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return self.core.history

    @history.setter
    def history(self, entries) -> None:
        # Opacus code (its get_noise_multiplier, user scripts) assigns [(sigma, q, steps)] directly.
        self.core.history = check_history(entries)

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Records `steps` (default one) optimisation steps with noise multiplier sigma and sample rate q.

        Opacus calls it with keywords (step(noise_multiplier=..., sample_rate=...)); positional works too.
        """
        self.core.step(noise_multiplier, sample_rate, steps)

    def get_epsilon(self, delta: float, **kwargs: Any) -> float:
        """Epsilon spent so far at `delta` (kwargs: this accountant's options, see subclasses)."""
        return self.core.get_epsilon(delta, **kwargs)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, delta: float, steps: int = 1) -> float:
        """Epsilon if `steps` more steps with these parameters were taken (state unchanged)."""
        return self.core.epsilon_after(noise_multiplier, sample_rate, delta, steps)

    def steps_within(self, noise_multiplier: float, sample_rate: float, delta: float, max_epsilon: float) -> int:
        """Most further steps with these parameters that keep epsilon <= max_epsilon (see Accountant)."""
        return self.core.steps_within(noise_multiplier, sample_rate, delta, max_epsilon)

    @property
    def steps(self) -> int:
        """Number of steps recorded."""
        return self.core.steps

    def __len__(self) -> int:
        return self.core.steps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(history={self.history!r})"

    def state_dict(self, destination: dict | None = None) -> dict:
        """{"history": [(sigma, q, steps)], "mechanism": name}, as Opacus (JSON-serialisable).

        Args:
            destination: a mapping to fill; None: a new OrderedDict.
        """
        if destination is None:
            destination = OrderedDict()
        destination["history"] = list(self.history)
        destination["mechanism"] = self.mechanism()
        return destination

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores state_dict() (Opacus's or fastdp's Accountant's, same keys).

        Raises:
            ValueError: empty state, a missing key, another mechanism, or a bad history entry.
        """
        if not state_dict:
            raise ValueError("the accountant state dict is None or empty: pass what state_dict() returned")
        for key in ("history", "mechanism"):
            if key not in state_dict:
                raise ValueError(f"the accountant state dict has no key {key!r}: pass what state_dict() returned")
        if str(state_dict["mechanism"]).lower() != self.mechanism():
            raise ValueError(
                f"a {state_dict['mechanism']!r} accountant state cannot be loaded into {type(self).__name__} "
                f"({self.mechanism()!r}): use create_accountant({state_dict['mechanism']!r})"
            )
        self.core.history = check_history(state_dict["history"])


class RDPAccountant(IAccountant):
    """Renyi DP accountant (dp-accounting's, over Opacus's orders DEFAULT_ALPHAS)."""

    _MECHANISM = "rdp"
    DEFAULT_ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))

    def get_privacy_spent(self, *, delta: float, alphas=None) -> tuple[float, float]:
        """(epsilon, the RDP order alpha that attains it) so far at `delta`; (0.0, 0.0) before any step.

        Args:
            delta: in (0, 1).
            alphas: orders (> 1) to optimise over; None: DEFAULT_ALPHAS.
        """
        return self.core.get_privacy_spent(delta, alphas)

    def get_epsilon(self, delta: float, alphas=None, **kwargs: Any) -> float:
        """Epsilon spent so far at `delta`, optimised over `alphas` (None: DEFAULT_ALPHAS)."""
        return self.get_privacy_spent(delta=delta, alphas=alphas)[0]


class PRVAccountant(IAccountant):
    """Opacus's default name "prv": numerical composition, here dp-accounting's PLD accountant."""

    _MECHANISM = "prv"

    def get_epsilon(
        self, delta: float, *, eps_error: float = 0.01, delta_error: float | None = None, **kwargs
    ) -> float:
        """Epsilon spent so far at `delta` (an upper bound).

        eps_error / delta_error: Opacus's discretisation budgets, accepted for compatibility; the PLD
        accountant's pessimistic estimate is an upper bound without them.
        """
        return self.core.get_epsilon(delta)


class PLDAccountant(IAccountant):
    """dp-accounting's PLD accountant at its default discretisation (fastdp's "pld"; within 1e-4 of "prv")."""

    _MECHANISM = "pld"


class GaussianAccountant(IAccountant):
    """Gaussian DP by the central limit theorem (Opacus's "gdp"): an approximation, NOT an upper bound.

    Warns (fastdp.accounting.GDPApproximationWarning) at construction, as Opacus does.
    """

    _MECHANISM = "gdp"

    def get_epsilon(self, delta: float, poisson: bool = True, **kwargs: Any) -> float:
        """CLT epsilon so far at `delta`; poisson=False uses the uniform-sampling formula."""
        return self.core.get_epsilon(delta, poisson=poisson)


_CLASSES: dict[str, type[IAccountant]] = {
    c._MECHANISM: c for c in (RDPAccountant, PRVAccountant, PLDAccountant, GaussianAccountant)
}


def create_accountant(mechanism: str) -> IAccountant:
    """A new empty accountant for `mechanism` ("rdp", "prv", "gdp", "pld"), as opacus.accountants.create_accountant.

    Raises:
        ValueError listing the valid names.
    """
    return _CLASSES[check_mechanism(mechanism)]()


def as_opacus(core: Accountant) -> IAccountant:
    """The Opacus-shaped view on an existing fastdp Accountant (shares its state)."""
    return _CLASSES[core.mechanism](core)
