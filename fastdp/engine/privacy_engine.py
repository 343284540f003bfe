"""PrivacyEngine: Opacus-compatible entry point (change one import to switch).

    engine = fastdp.PrivacyEngine(accountant="rdp", secure_mode=False)
    model, optimizer, train_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=train_loader,
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True)
    ...
    eps = engine.get_epsilon(delta=1e-5)

Differences from Opacus, by design: grad_sample_mode is accepted and ignored (fastdp always
uses its one-backward book-keeping); only flat clipping; `make_private` returns the model
wrapped in a PrivateModule whose state_dict is the original model's (no "_module." prefix);
gradient accumulation (several forward/backward passes, or several Poisson batches, per
optimizer step) is refused, since each sample must be clipped once per accounted step: large
logical batches go through BatchMemoryManager.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.utils.data import DataLoader

from fastdp.accounting import Accountant, get_noise_multiplier
from fastdp.engine.data_loader import DPDataLoader
from fastdp.engine.grad_sample import PrivateModule
from fastdp.engine.optimizer import DPOptimizer
from fastdp.noise import NoiseSource


class PrivacyEngine:
    """Makes a model, optimizer and data loader differentially private (DP-SGD).

    Args:
        accountant: "rdp" (default) or "pld", both via dp-accounting.
        secure_mode: noise seeds and Poisson sampling seeds from the OS CSPRNG (noise cannot be
            replayed from a saved state); otherwise reproducible from `seed`.
        seed: noise seed when not in secure mode (None: random).
    """

    def __init__(self, accountant: str = "rdp", secure_mode: bool = False, seed: int | None = None) -> None:
        self.accountant = Accountant(accountant)
        self.secure_mode = secure_mode
        self.noise_source = NoiseSource(seed=seed, secure_mode=secure_mode)
        self.optimizers: list[DPOptimizer] = []

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator=None,
        grad_sample_mode: str = "hooks",
        criterion: nn.Module | None = None,
        max_epsilon: float | None = None,
        target_delta: float | None = None,
        allow_generic: bool = True,
        conv_method: str | None = None,
        **kwargs,
    ):
        """Returns (private model, DP optimizer, Poisson-sampling data loader).

        Args:
            module: the model (patched in place and wrapped).
            optimizer: any torch.optim optimizer over the model's parameters.
            data_loader: the training loader; with poisson_sampling it becomes a DPDataLoader
                with sample rate q = 1/len(data_loader).
            noise_multiplier: sigma (noise std = sigma * max_grad_norm, before / E[B]).
            max_grad_norm: per-sample L2 clipping bound C over all parameters.
            loss_reduction: "mean" (loss averaged over the batch) or "sum".
            poisson_sampling: Poisson batches (required by the accountant's analysis). The optimizer
                then refuses a step after more than one batch was drawn from the returned loader
                since the previous step (batches concatenated, or gradient accumulation).
            clipping: only "flat".
            grad_sample_mode: accepted for Opacus compatibility and ignored.
            criterion: accepted for Opacus (ghost mode) compatibility and ignored.
            max_epsilon, target_delta: refuse (PrivacyBudgetExceeded) any step after which
                epsilon at target_delta would exceed max_epsilon, before updating.
            allow_generic: unknown layers with own parameters use a torch.func path (else refused).
            conv_method: per-sample conv method of this private model: "auto" (timed per layer
                shape), "grouped", "loop" or "unfold"; None: $FASTDP_CONV_METHOD, else "auto".
        """
        if kwargs:
            warnings.warn(f"fastdp.make_private ignores arguments {sorted(kwargs)}", stacklevel=2)
        if clipping != "flat":
            raise ValueError(f"fastdp supports clipping='flat' only, got {clipping!r}")
        if not batch_first:
            raise ValueError("fastdp needs batch_first=True (dim 0 of every input is the sample)")
        if noise_generator is not None:
            raise ValueError("fastdp draws noise from its own Philox stream; pass seed= to PrivacyEngine instead")
        if isinstance(max_grad_norm, (list, tuple)):
            raise ValueError("per-layer max_grad_norm (clipping='per_layer') is not supported")
        if self.secure_mode and not poisson_sampling:
            warnings.warn("secure_mode without Poisson sampling: the accounting assumes Poisson", stacklevel=2)
        if isinstance(module, PrivateModule):
            private = module
        else:
            private = PrivateModule(module, loss_reduction, allow_generic, conv_method)
        if private.tape.loss_reduction != loss_reduction:
            raise ValueError("module was already wrapped with another loss_reduction")
        if conv_method is not None and private.conv_tuner.method != conv_method:
            raise ValueError(f"module was already wrapped with conv_method={private.conv_tuner.method!r}")
        opt_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [n for n, p in zip(private.trainable_names, private.trainable, strict=True) if id(p) not in opt_ids]
        if missing:
            warnings.warn(
                f"fastdp: trainable parameters not in the optimizer are not updated: {missing[:5]}",
                stacklevel=2,
            )
        dataset_size = len(data_loader.dataset)  # type: ignore[arg-type]
        if poisson_sampling:
            loader = DPDataLoader.from_data_loader(data_loader, secure_mode=self.secure_mode)
            sample_rate = loader.sample_rate
            expected_batch_size = sample_rate * dataset_size
        else:
            loader = data_loader
            sample_rate = 1.0 / len(data_loader)
            expected_batch_size = float(data_loader.batch_size or sample_rate * dataset_size)
        dp_opt = DPOptimizer(
            optimizer,
            private,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            sample_rate=sample_rate,
            accountant=self.accountant,
            noise_source=self.noise_source,
            loss_reduction=loss_reduction,
            max_epsilon=max_epsilon,
            target_delta=target_delta,
            data_loader=loader if poisson_sampling else None,
        )
        self.optimizers.append(dp_opt)
        return private, dp_opt, loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float,
        epsilon_tolerance: float = 0.01,
        **kwargs,
    ):
        """make_private with sigma calibrated so that `epochs` epochs spend target_epsilon at target_delta."""
        sample_rate = 1.0 / len(data_loader)
        sigma = get_noise_multiplier(
            target_epsilon,
            target_delta,
            sample_rate,
            steps=int(epochs * len(data_loader)),
            accountant=self.accountant.mechanism,
            epsilon_tolerance=epsilon_tolerance,
        )
        return self.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            **kwargs,
        )

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent by all steps so far at this delta."""
        return self.accountant.get_epsilon(delta)

    def state_dict(self) -> dict:
        """JSON-serialisable: accountant history and noise stream position."""
        return {"accountant": self.accountant.state_dict(), "noise": self.noise_source.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.accountant.load_state_dict(state["accountant"])
        self.noise_source.load_state_dict(state["noise"])
