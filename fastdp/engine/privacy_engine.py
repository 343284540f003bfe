"""PrivacyEngine: Opacus-compatible entry point (change one import to switch).

    engine = fastdp.PrivacyEngine(accountant="prv", secure_mode=False)
    model, optimizer, train_loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=train_loader,
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=True)
    ...
    eps = engine.get_epsilon(delta=1e-5)
    engine.save_checkpoint(path="ckpt.pt", module=model, optimizer=optimizer)

Opacus's arguments, and how fastdp treats them:
- grad_sample_mode "hooks", "functorch", "ew": fastdp's one-backward book-keeping (one path).
  "ghost": the same path (it already computes norms the ghost way); make_private returns
  (model, optimizer, criterion, data_loader) as Opacus does, the criterion giving an ordinary
  loss tensor (loss.backward() is the one backward). "no_op": the model is wrapped without
  patching and you set p.grad_sample yourself (per-sample gradients of the per-sample losses);
  optimizer.step() clips and noises those.
- clipping "flat" (max_grad_norm a float) and "per_layer" (a list, one bound per trainable
  parameter of the optimizer; noise std sigma * sqrt(sum C_k^2)); "adaptive" is refused.
- refused with what to do instead: wrap_model=False, rand_on_empty=True, noise_generator,
  batch_first=False, distributed (DDP) models, optimizer parameters that are not the model's,
  unknown arguments.
Differences by design: gradient accumulation (several forward/backward passes, or several
Poisson batches, per optimizer step) is refused, since each sample must be clipped once per
accounted step: large logical batches go through BatchMemoryManager. The expected batch size
is q * N (Opacus: int(q * N)). Checkpoints (save_checkpoint / load_checkpoint) carry Opacus's
keys plus fastdp's noise stream position, so a non-secure run resumes bit for bit.
"""

from __future__ import annotations

import copy
import os
import pickle
import warnings
from typing import IO, Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fastdp.accountants import create_accountant
from fastdp.accounting import get_noise_multiplier
from fastdp.atomic import atomic_write
from fastdp.engine.batchnorm import fix_batchnorm
from fastdp.engine.data_loader import DPDataLoader
from fastdp.engine.errors import UnsupportedModuleError
from fastdp.engine.grad_sample import PrivateModule, _check_module
from fastdp.engine.optimizer import DPOptimizer, per_parameter_bounds
from fastdp.engine.rules import GENERIC_RULE
from fastdp.engine.tape import Tape
from fastdp.noise import NoiseSource

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost", "no_op")
CLIPPINGS = ("flat", "per_layer")
# Opacus passes these to its AdaClipDPOptimizer (clipping="adaptive").
ADAPTIVE_ARGUMENTS = (
    "target_unclipped_quantile",
    "clipbound_learning_rate",
    "max_clipbound",
    "min_clipbound",
    "unclipped_num_std",
)
# The checkpoint entry with fastdp's noise stream position (Opacus's keys are kept as they are).
NOISE_STATE_KEY = "fastdp_noise_state_dict"


class IllegalModuleConfigurationError(UnsupportedModuleError):
    """A module that could be made private but is not set up for it (e.g. in eval mode)."""


def module_errors(module: nn.Module, allow_generic: bool = True) -> list[UnsupportedModuleError]:
    """Every reason `module` cannot be made private, one error per module (empty: it can).

    The checks PrivateModule runs when it wraps a model (BatchNorm, parametrizations, rules that
    would not cover a layer's parameters, layers no rule covers), collected for each submodule
    instead of stopping at the first; plus Opacus's check that the model is in training mode.
    """
    errors: list[UnsupportedModuleError] = []
    if not module.training:
        errors.append(
            IllegalModuleConfigurationError(
                "fastdp: the model is in eval mode; training (and per-sample gradients) needs model.train()."
            )
        )
    units: list[str] = []  # generic units: their subtrees go through the unit (PrivateModule's plan)
    refused: list[str] = []
    for name, m in module.named_modules():  # pre-order: a unit is seen before its submodules
        # A refused parametrized layer's own parametrization modules would repeat its error.
        if any(name.startswith(f"{r}.parametrizations" if r else "parametrizations") for r in refused):
            continue
        in_unit = any(u == "" or name.startswith(u + ".") for u in units)
        try:
            rule = _check_module(name or type(module).__name__, m, allow_generic, in_unit)
        except UnsupportedModuleError as exc:
            errors.append(exc)
            refused.append(name)
            continue
        if rule is GENERIC_RULE:
            units.append(name)
    return errors


def fix_module(module: nn.Module, **kwargs) -> nn.Module:
    """A copy of `module` with every BatchNorm replaced (Opacus's ModuleValidator.fix: the input is
    not modified). kwargs: fix_batchnorm's (max_groups, num_groups, replace_bn_with_in)."""
    return fix_batchnorm(copy.deepcopy(module), **kwargs)


class UserGradSampleModule(PrivateModule):
    """grad_sample_mode="no_op": the model wrapped but not patched; the per-sample gradients are
    the user's (p.grad_sample on every trainable parameter, [B, *p.shape]), which the DPOptimizer
    clips and noises. Forward is the model's own. BatchNorm is still refused (it mixes samples).

    Args:
        module: the model (not modified).
        loss_reduction: "mean" (the clipped sum is divided by E[B]) or "sum".
    """

    computes_grad_sample = False

    def __init__(self, module: nn.Module, loss_reduction: str = "mean") -> None:
        nn.Module.__init__(self)
        for name, m in module.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                raise UnsupportedModuleError(
                    f"fastdp: module '{name or type(module).__name__}' is {type(m).__name__}: BatchNorm mixes the "
                    "samples of a batch, so per-sample gradients (and DP) are not defined. Replace it with "
                    "GroupNorm: model = fastdp.fix_batchnorm(model)."
                )
        self._module = module
        self.tape = Tape(loss_reduction)  # stays empty: the DPOptimizer reads p.grad_sample instead
        self.conv_tuner = None
        self._in_forward = False
        self._patched: list[nn.Module] = []
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self.trainable_names = [n for n, p in module.named_parameters() if p.requires_grad]

    def forward(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    def remove_hooks(self) -> nn.Module:
        return self._module


class GhostCriterion(nn.Module):
    """The criterion make_private returns in grad_sample_mode="ghost" (Opacus returns a wrapper
    that runs its two ghost-clipping backward passes inside loss.backward()).

    fastdp needs no second pass, so calling this gives the user's criterion's loss, an ordinary
    scalar tensor: loss.backward(), loss.item(), loss * w + other all work. Like Opacus it checks
    that the criterion's reduction is make_private's loss_reduction, and takes `shape=` (logits'
    [B, T, V] shape, for a loss over flattened sequence tokens): the loss is then each sequence's
    mean over its tokens (ignore_index tokens left out) or sum, reduced over the batch.
    """

    def __init__(self, criterion, loss_reduction: str = "mean") -> None:
        super().__init__()
        reduction = getattr(criterion, "reduction", None)
        if reduction is not None and reduction != loss_reduction:
            raise ValueError(
                f"fastdp: the criterion's reduction is {reduction!r} but make_private has loss_reduction="
                f"{loss_reduction!r}; they must agree (the gradient scale depends on it): pass "
                f"loss_reduction={reduction!r} or a criterion with reduction={loss_reduction!r}."
            )
        self.criterion = criterion
        self.loss_reduction = loss_reduction

    def forward(self, *args, shape=None, **kwargs) -> torch.Tensor:
        """The loss: criterion(*args, **kwargs); with shape=(B, T, ...) the per-sequence form."""
        if shape is None:
            return self.criterion(*args, **kwargs)
        if getattr(self.criterion, "reduction", None) is None:
            raise ValueError("fastdp: shape= needs a criterion with a `reduction` attribute (a torch.nn loss)")
        old = self.criterion.reduction
        self.criterion.reduction = "none"
        try:
            per_token = self.criterion(*args, **kwargs)
        finally:
            self.criterion.reduction = old
        B, T = int(shape[0]), int(shape[1])
        if per_token.numel() != B * T:
            raise ValueError(f"fastdp: the per-token loss has {per_token.numel()} entries, shape= says {B} x {T}")
        per_token = per_token.reshape(B, T)
        if self.loss_reduction == "sum":
            return per_token.sum()
        targets = kwargs.get("target", args[1] if len(args) >= 2 else None)
        ignore_index = getattr(self.criterion, "ignore_index", None)
        if ignore_index is not None and isinstance(targets, torch.Tensor):
            valid = (targets.reshape(B, T) != ignore_index).sum(dim=1).clamp(min=1)
            return (per_token.sum(dim=1) / valid).mean()
        return per_token.mean(dim=1).mean()


def _is_distributed(module: nn.Module) -> bool:
    return isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel))


def _plain_numbers(obj):
    """`obj` with numpy scalars (an LR set from a numpy schedule, as Opacus's cifar10.py does) made
    Python numbers, so that the file loads with weights_only=True; tensors and the rest unchanged."""
    if isinstance(obj, dict):
        return {k: _plain_numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain_numbers(v) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_plain_numbers(v) for v in obj)
    if type(obj).__module__ == "numpy" and getattr(obj, "ndim", None) == 0:
        return obj.item()
    return obj


def _unprefixed(state: dict) -> dict:
    """A GradSampleModule / PrivateModule state_dict ('_module.' keys) for the plain model."""
    if state and all(k.startswith("_module.") for k in state):
        return {k[len("_module.") :]: v for k, v in state.items()}
    return state


class PrivacyEngine:
    """Makes a model, optimizer and data loader differentially private (DP-SGD).

    Args:
        accountant: the accounting mechanism's name: "prv" (the default, as in Opacus 1.6: a
            numerical accountant, here dp-accounting's privacy-loss distribution), "rdp", "gdp"
            (Gaussian DP, a CLT approximation: warns) or "pld". `engine.accountant` is an
            Opacus-shaped accountant (fastdp.accountants: mechanism(), history, get_epsilon).
        secure_mode: noise seeds and Poisson sampling seeds from the OS CSPRNG (noise cannot be
            replayed from a saved state); otherwise reproducible from `seed`.
        seed: noise seed when not in secure mode (None: random).
    """

    def __init__(self, accountant: str = "prv", secure_mode: bool = False, seed: int | None = None) -> None:
        self.accountant = create_accountant(accountant)
        self.secure_mode = secure_mode
        self.noise_source = NoiseSource(seed=seed, secure_mode=secure_mode)
        self.optimizers: list[DPOptimizer] = []

    def _check_arguments(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        max_grad_norm,
        batch_first: bool,
        clipping: str,
        noise_generator,
        grad_sample_mode: str,
        wrap_model: bool,
        rand_on_empty: bool,
        kwargs: dict,
    ) -> None:
        """Refuses, before anything is changed, what fastdp cannot do, saying what to do instead."""
        if clipping == "adaptive":
            raise ValueError(
                "fastdp does not implement adaptive clipping (clipping='adaptive', AdaClip): use "
                "clipping='flat' with a fixed max_grad_norm (or clipping='per_layer' with a list of bounds)."
            )
        if clipping not in CLIPPINGS:
            raise ValueError(f"clipping must be one of {CLIPPINGS} (or Opacus's 'adaptive', refused), got {clipping!r}")
        if kwargs:
            adaptive = sorted(set(kwargs) & set(ADAPTIVE_ARGUMENTS))
            hint = (
                f" ({adaptive} are arguments of clipping='adaptive', which fastdp does not implement)"
                if adaptive
                else ""
            )
            raise TypeError(
                f"fastdp.make_private got unexpected arguments {sorted(kwargs)}{hint}. It takes Opacus's "
                "make_private arguments plus max_epsilon, target_delta, allow_generic and conv_method."
            )
        per_layer = isinstance(max_grad_norm, (list, tuple))
        if clipping == "flat" and per_layer:
            raise ValueError(
                "a list of max_grad_norm bounds is per-layer clipping: pass clipping='per_layer' with it, or "
                "one float for flat clipping"
            )
        if clipping == "per_layer" and not per_layer:
            raise ValueError(
                "clipping='per_layer' needs max_grad_norm as a list, one bound per trainable parameter of the "
                "optimizer in param_groups order (e.g. [C / n ** 0.5] * n for n parameters keeps the total bound C)"
            )
        if per_layer:
            per_parameter_bounds(optimizer, max_grad_norm)  # refused here, before the model is patched
        if grad_sample_mode in ("ghost_fsdp", "fsdp") or _is_distributed(module):
            raise ValueError(
                "fastdp does not support distributed training (DDP / FSDP, grad_sample_mode='ghost_fsdp'): make "
                "the plain model private and train in one process (a federated site per process: fastdp.federated)."
            )
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
        if not wrap_model:
            raise ValueError(
                "fastdp always wraps the model (wrap_model=False is not supported): train with the model "
                "make_private returns; calling the original model does not record per-sample gradients."
            )
        if rand_on_empty:
            raise ValueError(
                "fastdp handles empty Poisson batches (tensors with 0 rows give a noise-only step): pass "
                "rand_on_empty=False"
            )
        if not batch_first:
            raise ValueError("fastdp needs batch_first=True (dim 0 of every input is the sample)")
        if noise_generator is not None:
            raise ValueError("fastdp draws noise from its own Philox stream; pass seed= to PrivacyEngine instead")
        model_params = {id(p) for p in module.parameters()}
        foreign = [
            i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]) if id(p) not in model_params
        ]
        if foreign:
            raise ValueError(
                f"the optimizer has parameters (indices {foreign[:5]} in param_groups order) that are not the "
                "module's: they would be updated without clipping or noise. Build the optimizer from "
                "module.parameters()."
            )

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float | list[float],
        criterion=None,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator=None,
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
        rand_on_empty: bool = False,
        max_epsilon: float | None = None,
        target_delta: float | None = None,
        allow_generic: bool = True,
        conv_method: str | None = None,
        **kwargs,
    ):
        """Returns (private model, DP optimizer, Poisson-sampling data loader); in
        grad_sample_mode="ghost" (model, optimizer, criterion, data_loader), as Opacus.

        Args:
            module: the model (patched in place and wrapped; in "no_op" mode wrapped only).
            optimizer: any torch.optim optimizer over the model's parameters.
            data_loader: the training loader; with poisson_sampling it becomes a DPDataLoader
                with sample rate q = 1/len(data_loader).
            noise_multiplier: sigma (noise std = sigma * max_grad_norm, before / E[B]).
            max_grad_norm: per-sample L2 clipping bound C over all parameters ("flat"), or a list
                of bounds, one per trainable parameter of the optimizer in param_groups order
                ("per_layer": noise std sigma * sqrt(sum C_k^2)).
            criterion: the loss, used in "ghost" mode only (default nn.CrossEntropyLoss(), as Opacus).
            loss_reduction: "mean" (loss averaged over the batch) or "sum".
            poisson_sampling: Poisson batches (required by the accountant's analysis). The optimizer
                then refuses a step after more than one batch was drawn from the returned loader
                since the previous step (batches concatenated, or gradient accumulation).
            clipping: "flat" or "per_layer" ("adaptive" is refused).
            grad_sample_mode: "hooks", "functorch", "ew" or "ghost" (fastdp's one path; "ghost"
                also returns the criterion), or "no_op" (you set p.grad_sample).
            wrap_model, rand_on_empty, noise_generator, batch_first: Opacus's; only the defaults.
            max_epsilon, target_delta: refuse (PrivacyBudgetExceeded) any step after which
                epsilon at target_delta would exceed max_epsilon, before updating.
            allow_generic: unknown layers with own parameters use a torch.func path (else refused).
            conv_method: per-sample conv method of this private model: "auto" (timed per layer
                shape), "grouped", "loop" or "unfold"; None: $FASTDP_CONV_METHOD, else "auto".
        """
        self._check_arguments(
            module,
            optimizer,
            max_grad_norm,
            batch_first,
            clipping,
            noise_generator,
            grad_sample_mode,
            wrap_model,
            rand_on_empty,
            kwargs,
        )
        ghost = None
        if grad_sample_mode == "ghost":
            ghost = GhostCriterion(criterion if criterion is not None else nn.CrossEntropyLoss(), loss_reduction)
        no_op = grad_sample_mode == "no_op"
        if self.secure_mode and not poisson_sampling:
            warnings.warn("secure_mode without Poisson sampling: the accounting assumes Poisson", stacklevel=2)
        if isinstance(module, PrivateModule):
            private = module
            if no_op != (not getattr(private, "computes_grad_sample", True)):
                raise ValueError(
                    f"module was already wrapped for another grad_sample_mode than {grad_sample_mode!r}; pass the "
                    "plain model (private._module)"
                )
        elif no_op:
            private = UserGradSampleModule(module, loss_reduction)
        else:
            private = PrivateModule(module, loss_reduction, allow_generic, conv_method)
        if private.tape.loss_reduction != loss_reduction:
            raise ValueError("module was already wrapped with another loss_reduction")
        if conv_method is not None and not no_op and private.conv_tuner.method != conv_method:
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
        if ghost is not None:
            return private, dp_opt, ghost, loader
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
        max_grad_norm: float | list[float],
        epsilon_tolerance: float = 0.01,
        **kwargs,
    ):
        """make_private with sigma calibrated so that `epochs` epochs (epochs * len(data_loader)
        steps at q = 1/len(data_loader)) spend target_epsilon at target_delta. kwargs: make_private's."""
        sample_rate = 1.0 / len(data_loader)
        try:
            spent = len(self.accountant)
        except TypeError:
            spent = 0
        if spent > 0:
            warnings.warn(
                "make_private_with_epsilon with privacy already spent: the noise multiplier is calibrated for "
                "the new steps alone, so the total epsilon will be higher than target_epsilon.",
                stacklevel=2,
            )
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=sample_rate,
            epochs=epochs,  # steps = int(epochs / sample_rate), as Opacus counts them
            accountant=self.accountant.mechanism(),
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

    # --- Opacus's validation API -------------------------------------------------------------
    def is_compatible(self, *, module: nn.Module, optimizer=None, data_loader=None) -> bool:
        """True when `module` can be made private (see validate)."""
        return not module_errors(module)

    def validate(self, *, module: nn.Module, optimizer=None, data_loader=None) -> None:
        """Raises UnsupportedModuleError listing every module that cannot be made private."""
        errors = module_errors(module)
        if errors:
            raise UnsupportedModuleError("\n".join(str(e) for e in errors))

    @classmethod
    def get_compatible_module(cls, module: nn.Module) -> nn.Module:
        """A fixed copy of `module` (BatchNorm -> GroupNorm), validated."""
        fixed = fix_module(module)
        errors = module_errors(fixed)
        if errors:
            raise UnsupportedModuleError("\n".join(str(e) for e in errors))
        return fixed

    # --- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(
        self,
        *,
        path: str | os.PathLike | IO[bytes],
        module: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        noise_scheduler=None,
        grad_clip_scheduler=None,
        checkpoint_dict: dict[str, Any] | None = None,
        module_state_dict_kwargs: dict[str, Any] | None = None,
        torch_save_kwargs: dict[str, Any] | None = None,
    ) -> None:
        """Saves model, optimizer, accountant (and schedulers) as Opacus does, plus the noise stream.

        Keys: module_state_dict (module.state_dict(): '_module.'-prefixed for a private model, as
        Opacus), privacy_accountant_state_dict, optimizer_state_dict (the wrapped optimizer's),
        noise_scheduler_state_dict, grad_clip_scheduler_state_dict (when given), the entries of
        checkpoint_dict, and fastdp_noise_state_dict (seed and offset of the noise stream; only
        meaningful outside secure mode). Numpy scalars in the optimizer or scheduler states and in
        checkpoint_dict (a learning rate set from a numpy schedule) are saved as Python numbers, so
        the file loads with weights_only=True. A path is written atomically; a file object directly.
        """
        checkpoint = _plain_numbers(dict(checkpoint_dict or {}))
        checkpoint["module_state_dict"] = module.state_dict(**(module_state_dict_kwargs or {}))
        checkpoint["privacy_accountant_state_dict"] = self.accountant.state_dict()
        if optimizer is not None:
            checkpoint["optimizer_state_dict"] = _plain_numbers(optimizer.state_dict())
        if noise_scheduler is not None:
            checkpoint["noise_scheduler_state_dict"] = _plain_numbers(noise_scheduler.state_dict())
        if grad_clip_scheduler is not None:
            checkpoint["grad_clip_scheduler_state_dict"] = _plain_numbers(grad_clip_scheduler.state_dict())
        checkpoint[NOISE_STATE_KEY] = self.noise_source.state_dict()
        save_kwargs = torch_save_kwargs or {}
        if isinstance(path, (str, os.PathLike)):
            atomic_write(path, lambda f: torch.save(checkpoint, f, **save_kwargs))
        else:
            torch.save(checkpoint, path, **save_kwargs)

    def load_checkpoint(
        self,
        *,
        path: str | os.PathLike | IO[bytes],
        module: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        noise_scheduler=None,
        grad_clip_scheduler=None,
        module_load_dict_kwargs: dict[str, Any] | None = None,
        torch_load_kwargs: dict[str, Any] | None = None,
    ) -> dict:
        """Restores a save_checkpoint (or Opacus) checkpoint; returns the checkpoint dict without the
        optimizer, scheduler and noise entries (as Opacus, which pops the same).

        Loads with weights_only=True (tensors, numbers, strings and containers only); pass
        torch_load_kwargs={"weights_only": False} for a trusted file with other objects. The
        accountant continues from the saved history; outside secure mode the noise stream continues
        from the saved position (in secure mode noise seeds stay fresh CSPRNG draws).
        """
        load_kwargs = {"weights_only": True, **(torch_load_kwargs or {})}
        try:
            checkpoint = torch.load(path, **load_kwargs)
        except pickle.UnpicklingError as exc:
            raise pickle.UnpicklingError(
                f"fastdp.load_checkpoint: {path} holds objects other than tensors, numbers, strings and containers "
                '(refused by weights_only=True). If you trust the file, pass torch_load_kwargs={"weights_only": False}.'
            ) from exc
        state = checkpoint["module_state_dict"]
        if not isinstance(module, PrivateModule):
            state = _unprefixed(state)
        module.load_state_dict(state, **(module_load_dict_kwargs or {}))
        self.accountant.load_state_dict(checkpoint["privacy_accountant_state_dict"])
        optimizer_state = checkpoint.pop("optimizer_state_dict", {})
        if optimizer is not None and optimizer_state:
            optimizer.load_state_dict(optimizer_state)
        elif (optimizer is not None) != bool(optimizer_state):
            warnings.warn(
                f"fastdp.load_checkpoint: the checkpoint has {'an' if optimizer_state else 'no'} optimizer state "
                f"but {'an' if optimizer is not None else 'no'} optimizer was given; nothing loaded into it.",
                stacklevel=2,
            )
        noise_scheduler_state = checkpoint.pop("noise_scheduler_state_dict", {})
        if noise_scheduler is not None and noise_scheduler_state:
            noise_scheduler.load_state_dict(noise_scheduler_state)
        clip_scheduler_state = checkpoint.pop("grad_clip_scheduler_state_dict", {})
        if grad_clip_scheduler is not None and clip_scheduler_state:
            grad_clip_scheduler.load_state_dict(clip_scheduler_state)
        noise = checkpoint.pop(NOISE_STATE_KEY, None)
        if noise is not None and not self.secure_mode:
            # Never let a checkpoint switch this engine's secure mode.
            self.noise_source.load_state_dict({**noise, "secure_mode": False})
        return checkpoint

    def state_dict(self) -> dict:
        """JSON-serialisable: accountant history and noise stream position."""
        return {"accountant": self.accountant.state_dict(), "noise": self.noise_source.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restores state_dict(); the engine keeps its own secure_mode (a saved state never turns
        CSPRNG noise into a replayable stream)."""
        self.accountant.load_state_dict(state["accountant"])
        self.noise_source.load_state_dict({**state["noise"], "secure_mode": self.secure_mode})
