"""DPConfig: the one type for a site's sample-level DP-SGD settings, and the one sigma calibration.

The experiment config's ``[dp]`` section (:class:`fastdp.experiment.config.DPSettings`) extends it
with experiment-wide keys (per-site budgets, an epsilon sweep) and turns it into one DPConfig per
site; the Site, the runner and the attack all calibrate sigma with :meth:`DPConfig.noise_multiplier_for`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastdp.accounting import ACCOUNTANTS, get_noise_multiplier
from fastdp.engine.rules.conv_tuner import METHODS as CONV_METHODS

__all__ = ["DPConfig"]


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class DPConfig:
    """Sample-level DP-SGD at a site (per-sample clipping to max_grad_norm, noise sigma * C).

    Give either noise_multiplier (sigma) or target_epsilon; the latter is calibrated by
    noise_multiplier_for so that the site's planned steps spend it at `delta`.

    Attributes:
        noise_multiplier: sigma; the noise std is sigma * max_grad_norm.
        target_epsilon: the epsilon the planned steps should spend.
        max_grad_norm: C, the L2 bound on each sample's gradient.
        delta: the delta of (epsilon, delta)-DP.
        epsilon_budget: the site stops taking part before a round that would take it past this.
        accountant: "rdp" (the default of federated runs), "pld", "prv" (numerical; PrivacyEngine's
            default) or "gdp" (a CLT approximation, warns).
        reproducible_noise: derive the noise and sampling seeds from the Site's `seed` and name
            instead of the OS CSPRNG. For tests only: anyone who knows the seed (the server writes
            the config) can regenerate and subtract the noise, so the run is NOT private.
        conv_method: how the engine forms per-sample conv gradients: "auto" (timed per layer
            shape), "grouped", "loop" or "unfold"; None: $FASTDP_CONV_METHOD, else "auto". The
            methods agree to float rounding; runs compared bit for bit need one fixed method.
    """

    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    epsilon_budget: float | None = None
    accountant: str = "rdp"
    reproducible_noise: bool = False
    conv_method: str | None = None

    def __post_init__(self) -> None:
        for key, message in self.problems():
            raise ValueError(f"DPConfig.{key}: {message}")

    def problems(self, need_sigma_or_epsilon: bool = True) -> list[tuple[str, str]]:
        """[(field, what is wrong)] for every bad value (empty when all are valid).

        need_sigma_or_epsilon: require exactly one of noise_multiplier and target_epsilon (the
        experiment's [dp] section relaxes this when DP is off or an epsilon sweep sets them).
        """
        out = []
        sigma, eps = self.noise_multiplier, self.target_epsilon
        if sigma is not None and eps is not None:
            out.append(("noise_multiplier", "give noise_multiplier or target_epsilon, not both (exactly one of them)"))
        elif need_sigma_or_epsilon and sigma is None and eps is None:
            out.append(("noise_multiplier", "give noise_multiplier or target_epsilon (exactly one of them)"))
        if sigma is not None and not (_number(sigma) and sigma >= 0):
            out.append(("noise_multiplier", f"must be a finite number >= 0, got {sigma!r}"))
        if eps is not None and not (_number(eps) and eps > 0):
            out.append(("target_epsilon", f"must be a finite number > 0, got {eps!r}"))
        if not (_number(self.max_grad_norm) and self.max_grad_norm > 0):
            out.append(("max_grad_norm", f"must be a finite number > 0, got {self.max_grad_norm!r}"))
        if not (_number(self.delta) and 0 < self.delta < 1):
            out.append(("delta", f"must be in (0, 1), got {self.delta!r}"))
        budget = self.epsilon_budget
        if budget is not None and not isinstance(budget, dict) and not (_number(budget) and budget > 0):
            out.append(("epsilon_budget", f"must be a finite number > 0, got {budget!r}"))
        if self.accountant not in ACCOUNTANTS:
            out.append(("accountant", f"must be one of {', '.join(map(repr, ACCOUNTANTS))}, got {self.accountant!r}"))
        if self.conv_method is not None and self.conv_method not in CONV_METHODS:
            choices = ", ".join(map(repr, CONV_METHODS))
            out.append(("conv_method", f"must be one of {choices}, got {self.conv_method!r}"))
        if not isinstance(self.reproducible_noise, bool):
            out.append(("reproducible_noise", f"must be true or false, got {self.reproducible_noise!r}"))
        return out

    def noise_multiplier_for(self, sample_rate: float, steps: int) -> float:
        """sigma: the given one, or the smallest that spends target_epsilon in `steps` steps at rate q.

        Args:
            sample_rate: q = E[B] / N, the Poisson sampling rate.
            steps: the DP-SGD steps the site is planned to take (rounds * local steps).
        """
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        if self.target_epsilon is None:
            raise ValueError("DPConfig: give noise_multiplier or target_epsilon")
        return get_noise_multiplier(self.target_epsilon, self.delta, sample_rate, int(steps), self.accountant)
