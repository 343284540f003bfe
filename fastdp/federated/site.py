"""A Site (hospital): its data, its local training (DP-SGD or not) and its own privacy accountant.

What leaves a site is a :class:`SiteUpdate`: the change of the model's floating-point state after
`local_steps` optimizer steps, the training-set size (the FedAvg weight), the number of steps and,
with DP, the site's epsilon. A non-private site also reports its mean training loss; a DP site does
not (it is an un-noised statistic of the training data, see docs/privacy.md). Images and masks
never leave a site.

A DP site's noise and Poisson sampling are seeded from the operating system's CSPRNG: nothing the
server knows (the config, the experiment seed, the site's name) lets it predict or subtract them.
``DPConfig(reproducible_noise=True)`` derives them from ``seed`` instead, for tests only: such a
run is not private, and says so (:class:`fastdp.noise.ReproducibleNoiseWarning`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fastdp.accounting import Accountant
from fastdp.data import DEFAULT_BATCH_KEYS, image_and_label
from fastdp.engine import DPDataLoader, PrivacyEngine
from fastdp.federated.dp_config import DPConfig
from fastdp.federated.state_files import StateFileError, load_state, save_state
from fastdp.models import dice_ce_criterion, dice_global
from fastdp.noise import ReproducibleNoiseWarning

log = logging.getLogger("fastdp.federated")


@dataclass
class SiteUpdate:
    """Exactly what a site sends to the server after local training.

    delta: local_state - global_state for every floating-point entry of model.state_dict()
        (same keys and shapes as the global state).
    num_samples: the site's training-set size (FedAvg weight).
    steps: local optimizer steps taken.
    train_loss: mean training loss over the local steps (nan if no step saw a sample); None from a
        DP site, which does not release it (an un-noised statistic of its training data).
    epsilon: the site's sample-level epsilon after this update at its delta (None when non-private).
    """

    site_id: str
    delta: dict[str, torch.Tensor]
    num_samples: int
    steps: int
    train_loss: float | None
    epsilon: float | None = None

    def norm(self) -> float:
        """L2 norm of the whole delta (all tensors flattened together)."""
        return math.sqrt(sum(float(d.double().pow(2).sum()) for d in self.delta.values()))


def site_releases(dp: bool) -> list[str]:
    """What a site sends the server, DP (update, public metadata, validation metrics) or not (also its loss)."""
    base = ["delta", "num_samples", "steps", "val_dice", "val_loss"]
    return base + (["epsilon", "within_budget"] if dp else ["train_loss"])


def floating_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """Keys of the entries that training changes and FedAvg averages (floating-point tensors)."""
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()]


def stable_seed(*parts) -> int:
    """A 63-bit seed from any printable parts; stable across processes (unlike hash())."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


#: The local optimizers a Site (and the experiment config's federated.optimizer) can use.
OPTIMIZERS = ("adam", "sgd", "sgdm")


def _make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}: expected 'adam', 'sgd' or 'sgdm'")


class Site:
    """One hospital: local data, local (DP-)training on a private model copy, its own accountant.

    Args:
        site_id: a name unique in the federation.
        train_data: a Dataset of (image [1, H, W] float, mask [H, W] int) pairs, or of MONAI-style dicts
            {"image": [1, H, W], "label": [1, H, W] or [H, W], ...} (keys: batch_keys; other keys are ignored).
        val_data: the site's validation Dataset (same format) or None.
        model_fn: builds the model architecture (weights come from the global state each round).
        batch_size: expected batch size; batches are Poisson-sampled with rate batch_size / N
            (for DP the accountant's analysis needs it; without DP the same batches keep runs comparable).
        local_steps: optimizer steps per round.
        local_epochs: instead of local_steps, passes over the site's data per round (steps =
            round(local_epochs * N / batch_size), at least 1; an epoch of Poisson batches sees N
            samples on average).
        lr: local learning rate.
        optimizer: "adam", "sgd" or "sgdm" (SGD with momentum 0.9). Its state stays at the site.
        dp: DPConfig for DP-SGD, None for non-private training.
        criterion: per-sample-capable loss (default: fastdp.models.dice_ce_criterion()).
        seed: seeds the batch sampling of a non-private site (with site_id); a DP site's sampling
            and noise come from the OS CSPRNG unless dp.reproducible_noise is set.
        planned_rounds: rounds the site is expected to train (for calibrating dp.target_epsilon).
        device: torch device for local training and evaluation.
        eval_batch_size: slices per forward pass in evaluate().
        secure_mode: DP noise and sampling seeds from the OS CSPRNG (not replayable; resume then
            keeps privacy accounting but not bit-exact results).
        batch_keys: (image key, label key) of dict items; tuple items are read by position.
    """

    def __init__(
        self,
        site_id: str,
        train_data: Dataset,
        val_data: Dataset | None,
        model_fn: Callable[[], nn.Module],
        *,
        batch_size: int = 16,
        local_steps: int = 10,
        local_epochs: float | None = None,
        lr: float = 1e-3,
        optimizer: str = "adam",
        dp: DPConfig | None = None,
        criterion: nn.Module | None = None,
        seed: int = 0,
        planned_rounds: int | None = None,
        device: str | torch.device = "cpu",
        eval_batch_size: int = 64,
        secure_mode: bool = False,
        batch_keys: tuple[str, str] = DEFAULT_BATCH_KEYS,
    ) -> None:
        n = len(train_data)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError(f"site {site_id!r}: empty training set")
        if local_epochs is not None:
            if not local_epochs > 0:
                raise ValueError(f"site {site_id!r}: local_epochs must be > 0, got {local_epochs}")
            local_steps = max(1, round(local_epochs * n / max(1, batch_size)))
        if batch_size < 1 or local_steps < 1:
            raise ValueError(f"site {site_id!r}: batch_size and local_steps must be >= 1")
        if not lr > 0:
            raise ValueError(f"site {site_id!r}: lr must be > 0, got {lr}")
        self.site_id = site_id
        self.train_data, self.val_data = train_data, val_data
        self.num_samples = n
        self.local_steps, self.lr, self.batch_size = int(local_steps), float(lr), int(batch_size)
        self.dp = None if dp is None else replace(dp)  # a copy: sites must not share a mutable budget
        self.device = torch.device(device)
        self.eval_batch_size = eval_batch_size
        self.batch_keys = (str(batch_keys[0]), str(batch_keys[1]))
        self.criterion = criterion if criterion is not None else dice_ce_criterion()
        self.sample_rate = min(1.0, batch_size / n)
        # Where the site persists its own state (accountant first of all) before an update leaves it.
        self.state_path: Path | None = None

        # A DP site's sampling is part of the mechanism (amplification by sampling assumes nobody
        # knows which samples were drawn): secret unless reproducibility was asked for.
        private_streams = dp is not None and not dp.reproducible_noise
        sampling_seed = secrets.randbits(63) if private_streams else stable_seed("sampling", seed, site_id)
        self.generator = torch.Generator().manual_seed(sampling_seed)
        # steps=local_steps: one pass over the loader is one round of local training.
        loader = DPDataLoader(train_data, self.sample_rate, steps=self.local_steps, generator=self.generator)
        model = model_fn().to(self.device)
        # The model itself, also once it is made private: its state_dict has the global model's keys
        # whatever a private wrapper's own state_dict adds (Opacus's "_module." prefix), same tensors.
        self._plain_model = model
        opt = _make_optimizer(optimizer, model.parameters(), lr)
        self.engine: PrivacyEngine | None = None
        self.noise_multiplier: float | None = None
        if dp is not None:
            if dp.noise_multiplier is None and planned_rounds is None:
                raise ValueError(f"site {site_id!r}: DPConfig.target_epsilon needs planned_rounds")
            steps = int(planned_rounds or 0) * self.local_steps
            self.noise_multiplier = dp.noise_multiplier_for(self.sample_rate, steps)
            if dp.reproducible_noise:
                msg = (
                    f"site {site_id!r}: dp.reproducible_noise is set: its DP noise and sampling are derived "
                    "from the config's seed, so anyone who knows the config can subtract the noise. "
                    "This run is NOT private; use it for tests only."
                )
                warnings.warn(msg, ReproducibleNoiseWarning, stacklevel=2)
                log.warning(msg)
            noise_seed = stable_seed("noise", seed, site_id) if dp.reproducible_noise else None  # None: CSPRNG
            self.engine = PrivacyEngine(accountant=dp.accountant, secure_mode=secure_mode, seed=noise_seed)
            model, opt, loader = self.engine.make_private(
                module=model,
                optimizer=opt,
                data_loader=loader,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                poisson_sampling=True,
                max_epsilon=dp.epsilon_budget,
                target_delta=dp.delta,
                conv_method=dp.conv_method,
            )
        self.model, self.optimizer, self.loader = model, opt, loader
        self._eval_model = model_fn().to(self.device)

    # --- privacy -------------------------------------------------------------------------------
    @property
    def is_private(self) -> bool:
        """True when the site trains with DP-SGD."""
        return self.engine is not None

    @property
    def epsilon_budget(self) -> float | None:
        """The epsilon the site stops at (None: no budget, or not private)."""
        return None if self.dp is None else self.dp.epsilon_budget

    @property
    def accountant(self) -> Accountant | None:
        return None if self.engine is None else self.engine.accountant

    def epsilon(self) -> float:
        """Sample-level epsilon spent so far at dp.delta (0.0 before training; inf when non-private)."""
        if self.engine is None:
            return math.inf
        return self.engine.get_epsilon(self.dp.delta) if self.engine.accountant.steps else 0.0

    def epsilon_after_round(self) -> float:
        """The epsilon one more round of local_steps would bring the site to (inf when non-private)."""
        if self.engine is None:
            return math.inf
        return self.engine.accountant.epsilon_after(
            self.noise_multiplier, self.sample_rate, self.dp.delta, steps=self.local_steps
        )

    def within_budget(self) -> bool:
        """False when the next round would take the site past dp.epsilon_budget."""
        if self.dp is None or self.dp.epsilon_budget is None:
            return True
        return self.epsilon_after_round() <= self.dp.epsilon_budget

    # --- training ------------------------------------------------------------------------------
    def _load_global(self, model: nn.Module, global_state: dict[str, torch.Tensor]) -> None:
        model.load_state_dict({k: v.to(self.device) for k, v in global_state.items()})

    def local_update(
        self, global_state: dict[str, torch.Tensor], round: int = 0, config: dict | None = None
    ) -> SiteUpdate:
        """Trains `local_steps` steps from global_state and returns the update (the only thing that leaves).

        Args:
            global_state: the server's model state_dict.
            round: round number (for logging).
            config: per-round settings from the strategy; "proximal_mu" (FedProx) pulls the weights
                towards global_state after every step by w -= lr * mu * (w - w_global). That pull
                does not look at data, so it is post-processing of the DP step and keeps DP.
        """
        config = config or {}
        mu = float(config.get("proximal_mu", 0.0))
        self._load_global(self._plain_model, global_state)
        self.model.train()
        anchors = None
        if mu > 0:
            anchors = {k: v.detach().to(self.device) for k, v in global_state.items()}
        params = dict(self.model.named_parameters())
        losses, steps = [], 0
        for batch in self.loader:
            x, y = image_and_label(batch, self.batch_keys)
            x, y = x.to(self.device), y.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            if len(x) == 0 and self.engine is None:
                steps += 1  # an empty Poisson batch: nothing to learn from, no privacy to spend
                continue
            loss = self.criterion(self.model(x), y)
            loss.backward()
            self.optimizer.step()
            steps += 1
            if len(x):
                losses.append(float(loss.detach()))
            if anchors is not None:
                with torch.no_grad():
                    for name, p in params.items():
                        if p.requires_grad and name in anchors:
                            p.sub_(self.lr * mu * (p - anchors[name]))
        local = self._plain_model.state_dict()
        delta = {k: (local[k].detach() - global_state[k].to(self.device)).cpu() for k in floating_keys(global_state)}
        if self.engine is not None:
            self._check_buffers_unchanged(delta)
        update = SiteUpdate(
            site_id=self.site_id,
            delta=delta,
            num_samples=self.num_samples,
            steps=steps,
            # A DP site keeps its training loss: it is not noised, so releasing it is not DP.
            train_loss=None if self.engine is not None else (sum(losses) / len(losses) if losses else math.nan),
            epsilon=None if self.engine is None else self.epsilon(),
        )
        # Privacy spent is never lost: persist the accountant before the update leaves the site.
        if self.state_path is not None:
            save_state(self.state_dict(), self.state_path)
        return update

    def _check_buffers_unchanged(self, delta: dict[str, torch.Tensor]) -> None:
        """A DP site's update may only move parameters (trained through the DP step): a floating-point
        buffer that changed (running statistics and the like) is an un-noised function of the data."""
        params = {k for k, v in self._plain_model.state_dict(keep_vars=True).items() if isinstance(v, nn.Parameter)}
        moved = [k for k, d in delta.items() if k not in params and bool(d.ne(0).any())]
        if moved:
            raise RuntimeError(
                f"site {self.site_id!r}: buffers {moved[:5]} changed during DP training; their change is an "
                "un-noised statistic of the training data and would leave the site with the update. "
                "Use a model whose forward does not update buffers in training."
            )

    def releases(self) -> list[str]:
        """What this site sends the server (docs/privacy.md lists what each one means for privacy)."""
        return site_releases(self.engine is not None)

    @property
    def noise_is_private(self) -> bool | None:
        """True when the site's DP noise is unpredictable to the server; None for a non-private site."""
        return None if self.dp is None else not self.dp.reproducible_noise

    @torch.no_grad()
    def evaluate(self, global_state: dict[str, torch.Tensor]) -> dict[str, float]:
        """Liver Dice over all validation pixels and the mean loss of the global model; {} without val data."""
        if self.val_data is None or len(self.val_data) == 0:  # type: ignore[arg-type]
            return {}
        return evaluate_model(
            self._eval_model,
            global_state,
            self.val_data,
            self.criterion,
            self.device,
            self.eval_batch_size,
            keys=self.batch_keys,
        )

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything the site needs to continue exactly: optimizer, accountant, noise stream, sampler RNG."""
        return {
            "site_id": self.site_id,
            "optimizer": self.optimizer.state_dict(),
            "engine": None if self.engine is None else self.engine.state_dict(),
            "sampler_rng": self.generator.get_state(),
            "noise_multiplier": self.noise_multiplier,
            "dp": None if self.dp is None else asdict(self.dp),
        }

    def persist_state_to(self, path: str | Path) -> None:
        """Keeps the site's state file at `path`: written before every update leaves the site."""
        self.state_path = Path(path)

    def load_state_dict(self, state: dict) -> None:
        """Restores a state_dict(); ValueError saying what is wrong when it does not fit this site.

        A site saves its accountant before its update leaves it; if a run died after that but
        before the server's checkpoint, the site's own state file has spent more privacy than
        `state`: the larger spend is kept, so privacy spent is never forgotten.
        """
        _check_site_state(state, self)
        if state["site_id"] != self.site_id:
            raise ValueError(f"state of site {state['site_id']!r} loaded into site {self.site_id!r}")
        if (state["engine"] is None) != (self.engine is None):
            raise ValueError(f"site {self.site_id!r}: checkpoint and site disagree on whether DP is on")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.engine is not None:
            self.engine.load_state_dict(state["engine"])
            self.noise_multiplier = float(state["noise_multiplier"])
            self._keep_newer_accounting()
        self.generator.set_state(state["sampler_rng"])

    def _keep_newer_accounting(self) -> None:
        if self.state_path is None or not self.state_path.exists():
            return
        own = load_state(self.state_path, "site state file")
        accountant = Accountant()
        try:
            accountant.load_state_dict(own["engine"]["accountant"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StateFileError(f"site state file {self.state_path}: {type(exc).__name__}: {exc}") from None
        if accountant.steps > self.engine.accountant.steps:
            log.warning("site %s: its own state has spent more privacy than the checkpoint; keeping it", self.site_id)
            self.engine.accountant.load_state_dict(accountant.state_dict())

    def __repr__(self) -> str:
        dp = "non-private" if self.dp is None else f"DP sigma={self.noise_multiplier:.3g} C={self.dp.max_grad_norm}"
        return f"Site({self.site_id!r}, n={self.num_samples}, steps/round={self.local_steps}, {dp})"


def _check_site_state(state, site: Site) -> None:
    """ValueError naming the first entry of a site state that is missing, of the wrong kind or not finite."""
    if not isinstance(state, dict):
        raise ValueError(f"a site state is a table, got {type(state).__name__}")
    for key in ("site_id", "optimizer", "engine", "sampler_rng", "noise_multiplier"):
        if key not in state:
            raise ValueError(f"site state has no {key!r} entry")
    if not isinstance(state["site_id"], str):
        raise ValueError(f"site state 'site_id' is a {type(state['site_id']).__name__}, not a name")
    rng = state["sampler_rng"]
    if not (torch.is_tensor(rng) and rng.dtype == torch.uint8 and rng.shape == site.generator.get_state().shape):
        raise ValueError("site state 'sampler_rng' is not a torch.Generator state")
    sigma = state["noise_multiplier"]
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma >= 0):
        raise ValueError(f"site state 'noise_multiplier' must be a number >= 0, got {sigma!r}")
    if sigma is not None and not math.isfinite(sigma):
        raise ValueError(f"site state 'noise_multiplier' must be finite, got {sigma!r}")
    opt = state["optimizer"]
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict) or "param_groups" not in opt:
        raise ValueError("site state 'optimizer' is not an optimizer state_dict")
    params = [p for g in site.optimizer.param_groups for p in g["params"]]
    for idx, entries in opt["state"].items():
        if not isinstance(idx, int) or not 0 <= idx < len(params) or not isinstance(entries, dict):
            raise ValueError(f"site state 'optimizer' has an entry for parameter {idx!r} the model does not have")
        for name, v in entries.items():
            if not torch.is_tensor(v):
                continue
            if v.numel() > 1 and tuple(v.shape) != tuple(params[idx].shape):
                raise ValueError(
                    f"site state optimizer entry {name!r} of parameter {idx} has shape {tuple(v.shape)}, "
                    f"the parameter has {tuple(params[idx].shape)}"
                )
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise ValueError(f"site state optimizer entry {name!r} of parameter {idx} has NaN or inf values")


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    data: Dataset,
    criterion: nn.Module,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    keys: tuple[str, str] = DEFAULT_BATCH_KEYS,
) -> dict[str, float]:
    """{"dice": liver Dice over all pixels, "loss": mean per-slice loss} of `model` with `state` on `data`.

    data: (image, mask) items or dicts with the image and label at `keys` (see image_and_label).
    """
    model.load_state_dict({k: v.to(device) for k, v in state.items()})
    model.eval()
    preds, targets, loss_sum, n = [], [], 0.0, 0
    for batch in DataLoader(data, batch_size=batch_size, shuffle=False):
        x, y = image_and_label(batch, keys)
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(criterion(logits, y)) * len(x)
        n += len(x)
        preds.append(logits.argmax(1).cpu())
        targets.append(y.cpu())
    return {"dice": dice_global(torch.cat(preds), torch.cat(targets)), "loss": loss_sum / max(n, 1)}


def timed(fn, *args, **kwargs):
    """(fn(*args, **kwargs), seconds)."""
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
