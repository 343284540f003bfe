"""Server strategies: which sites train each round, and how their updates become the next global model.

- FedAvg: sites sampled without replacement (fraction_fit), updates averaged weighted by samples.
- FedProx: FedAvg plus a proximal pull towards the global model during local training (mu).
- DP-FedAvg (user-level DP, McMahan et al. 2018): sites Poisson-sampled with rate q; each update
  clipped to L2 norm S; Gaussian noise of std sigma * S added to the sum; divided by the expected
  number of sites q * N. The clip + sum + noise + scale is fastdp's fused clip_accumulate_noise
  op with the site updates as its rows; the server's accountant counts one step per round.
"""

from __future__ import annotations

import math
import warnings

import torch

from fastdp import ops
from fastdp.accounting import Accountant
from fastdp.federated.site import SiteUpdate, floating_keys, stable_seed
from fastdp.noise import NoiseSource, ReproducibleNoiseWarning


class Strategy:
    """Base class. Subclasses implement aggregate(); select() and site_config() have defaults."""

    name = "strategy"
    #: Whether the server may screen updates by their norms (see validation.screen_updates).
    norm_screening = True

    def select(self, site_ids: list[str], round: int, generator: torch.Generator) -> list[str]:
        """The sites asked to train this round (default: all)."""
        return list(site_ids)

    def site_config(self, round: int) -> dict:
        """Per-round settings sent to the sites with the global model."""
        return {}

    def aggregate(
        self, global_state: dict[str, torch.Tensor], updates: list[SiteUpdate], round: int
    ) -> dict[str, torch.Tensor]:
        """The next global state from the current one and the accepted updates."""
        raise NotImplementedError

    def epsilon(self) -> float | None:
        """Server-side (user-level) epsilon spent so far; None when the strategy adds no noise."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def describe(self) -> dict:
        """JSON-serialisable description for run histories."""
        return {"name": self.name}


class FedAvg(Strategy):
    """Federated averaging weighted by each site's training-set size.

    Args:
        fraction_fit: fraction of the sites asked each round (at least min_sites, sampled
            uniformly without replacement).
        min_sites: lower bound on the sites per round.
        server_lr: global step size on the averaged update (1.0 = plain FedAvg).
    """

    name = "fedavg"

    def __init__(self, fraction_fit: float = 1.0, min_sites: int = 1, server_lr: float = 1.0) -> None:
        if not 0 < fraction_fit <= 1:
            raise ValueError(f"fraction_fit must be in (0, 1], got {fraction_fit}")
        if min_sites < 1 or not server_lr > 0:
            raise ValueError("min_sites must be >= 1 and server_lr > 0")
        self.fraction_fit, self.min_sites, self.server_lr = fraction_fit, min_sites, server_lr

    def select(self, site_ids: list[str], round: int, generator: torch.Generator) -> list[str]:
        k = min(len(site_ids), max(self.min_sites, int(round_half_up(self.fraction_fit * len(site_ids)))))
        if k >= len(site_ids):
            return list(site_ids)
        chosen = torch.randperm(len(site_ids), generator=generator)[:k].sort().values
        return [site_ids[i] for i in chosen.tolist()]

    def aggregate(self, global_state, updates, round):
        new = dict(global_state)
        if not updates:
            return new
        total = sum(u.num_samples for u in updates)
        for key in floating_keys(global_state):
            avg = sum(u.delta[key].double() * (u.num_samples / total) for u in updates)
            new[key] = (global_state[key].double() + self.server_lr * avg).to(global_state[key].dtype)
        return new

    def describe(self) -> dict:
        return {"name": self.name, "fraction_fit": self.fraction_fit, "server_lr": self.server_lr}


class FedProx(FedAvg):
    """FedAvg whose sites add a proximal pull mu * (w - w_global) to their local steps (Li et al. 2020)."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        if mu < 0:
            raise ValueError(f"FedProx mu must be >= 0, got {mu}")
        self.mu = mu

    def site_config(self, round: int) -> dict:
        return {"proximal_mu": self.mu}

    def describe(self) -> dict:
        return {**super().describe(), "mu": self.mu}


class DPFedAvg(Strategy):
    """User-level DP federated averaging with server-side clipping and noise.

    Args:
        clip_norm: S, the L2 bound on each site's whole update.
        noise_multiplier: sigma; the noise added to the sum of clipped updates has std sigma * S.
        sample_rate: q, each site takes part in a round independently with probability q
            (Poisson sampling, which the accountant's analysis assumes).
        num_sites: N, used for the fixed denominator q * N (the expected number of sites); set
            by the Simulation when left None.
        delta: for reporting epsilon.
        seed: None (default): the server noise is seeded from the OS CSPRNG, so no one who sees the
            global model can predict it. An int: reproducible noise, for tests only; whoever knows
            the seed can subtract the noise, so the run is NOT private (warns).
        secure_mode: a fresh CSPRNG seed for every round (not resumable to the same noise).
        server_lr: global step size on the noised average.

    Only format checks may drop an update under DP-FedAvg (norm_screening is False): clipping to
    S is the defence, and a screen that compares sites would change the mechanism's sensitivity.
    """

    name = "dp-fedavg"
    norm_screening = False

    def __init__(
        self,
        clip_norm: float,
        noise_multiplier: float,
        sample_rate: float = 1.0,
        num_sites: int | None = None,
        delta: float = 1e-5,
        accountant: str = "rdp",
        seed: int | None = None,
        secure_mode: bool = False,
        server_lr: float = 1.0,
    ) -> None:
        if not clip_norm > 0 or noise_multiplier < 0 or not 0 < sample_rate <= 1:
            raise ValueError("DPFedAvg needs clip_norm > 0, noise_multiplier >= 0 and sample_rate in (0, 1]")
        self.clip_norm, self.noise_multiplier, self.sample_rate = clip_norm, noise_multiplier, sample_rate
        self.num_sites, self.delta, self.server_lr = num_sites, delta, server_lr
        self.accountant = Accountant(accountant)
        self.reproducible_noise = seed is not None
        if self.reproducible_noise:
            msg = (
                "DPFedAvg: seed is set, so the server noise is reproducible from it: anyone who knows the seed "
                "can subtract it. This run is NOT private; use it for tests only."
            )
            warnings.warn(msg, ReproducibleNoiseWarning, stacklevel=2)
        noise_seed = None if seed is None else stable_seed("server", seed)
        self.noise_source = NoiseSource(seed=noise_seed, secure_mode=secure_mode)
        self.last_clip_factors: list[float] = []

    def select(self, site_ids: list[str], round: int, generator: torch.Generator) -> list[str]:
        if self.num_sites is None:
            self.num_sites = len(site_ids)
        mask = torch.rand(len(site_ids), generator=generator) < self.sample_rate
        return [s for s, m in zip(site_ids, mask.tolist(), strict=True) if m]

    def aggregate(self, global_state, updates, round):
        if self.num_sites is None:
            raise ValueError("DPFedAvg.num_sites is unset: pass it or let the Simulation select the sites")
        keys = floating_keys(global_state)
        # One "sample" per site: rows of the per-key tensors [n_sites, *shape].
        rows = [
            torch.stack([u.delta[k].float() for u in updates])
            if updates
            else torch.zeros(0, *global_state[k].shape, dtype=torch.float32)
            for k in keys
        ]
        sq_norms = ops.per_sample_sq_norms(rows)
        out = [torch.zeros(global_state[k].shape, dtype=torch.float32) for k in keys]
        seed, offset = self.noise_source.next()
        expected_sites = self.sample_rate * self.num_sites
        noise_std = self.noise_multiplier * self.clip_norm
        scale = 1.0 / expected_sites
        clip = ops.clip_accumulate_noise(rows, sq_norms, out, self.clip_norm, noise_std, scale, seed, offset)
        self.last_clip_factors = clip.tolist()
        self.accountant.step(self.noise_multiplier, self.sample_rate)
        new = dict(global_state)
        for k, o in zip(keys, out, strict=True):
            new[k] = (global_state[k].float() + self.server_lr * o).to(global_state[k].dtype)
        return new

    def epsilon(self) -> float | None:
        return self.accountant.get_epsilon(self.delta) if self.accountant.steps else 0.0

    def state_dict(self) -> dict:
        return {
            "accountant": self.accountant.state_dict(),
            "noise": self.noise_source.state_dict(),
            "num_sites": self.num_sites,
        }

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.noise_source.load_state_dict(state["noise"])
        self.num_sites = state["num_sites"]

    def describe(self) -> dict:
        return {
            "name": self.name,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "delta": self.delta,
            "reproducible_noise": self.reproducible_noise,
        }


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))
