"""PrivateModule: wraps a model so its backward records per-sample gradient information.

Every submodule with trainable parameters gets its forward replaced (on the instance, not the
class) by a per-layer rule from fastdp.engine.layers; the model itself is otherwise unchanged
and trains as before. BatchNorm is refused (it mixes samples); modules the rules do not know
go through the generic torch.func path, or are refused with an error naming them. A layer with a
fast rule is refused too when the rule would not cover its trainable parameters (weight norm,
parametrizations: the rule's `weight` is then computed from other parameters).
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from fastdp.engine import layers
from fastdp.engine.errors import PrivacyStepError, UnsupportedModuleError
from fastdp.engine.tape import Tape

# The attributes a fast rule reads its parameters from (layers.*_forward: module.weight, module.bias).
RULE_PARAMS = ("weight", "bias")


def _kind(module: nn.Module) -> str:
    """The module's class name as a user wrote it (Conv2d, not the ParametrizedConv2d subclass)."""
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__name__.startswith("Parametrized"):
        cls = cls.__bases__[0]
    return cls.__name__


def _check_parametrized(name: str, module: nn.Module) -> None:
    """Refuses a module with torch.nn.utils.parametrize parametrizations of trainable tensors: the
    engine would give per-sample gradients for the computed tensor (or none at all), never for the
    parameters it is computed from."""
    if isinstance(module, parametrize.ParametrizationList) and any(p.requires_grad for p in module.parameters()):
        raise UnsupportedModuleError(
            f"fastdp: module '{name}' is a parametrization (torch.nn.utils.parametrize) of a module's tensor; "
            "the engine cannot give per-sample gradients for the parameters a parametrized tensor is computed "
            "from. Remove the parametrization (torch.nn.utils.parametrize.remove_parametrizations) or freeze "
            "its parameters (requires_grad_(False))."
        )
    if not parametrize.is_parametrized(module):
        return
    trained = {
        tensor: [f"parametrizations.{tensor}.{n}" for n, p in plist.named_parameters() if p.requires_grad]
        for tensor, plist in module.parametrizations.items()
    }
    trained = {t: ps for t, ps in trained.items() if ps}
    if not trained:
        return  # only frozen tensors are parametrized: what trains are the module's own leaves
    what = "; ".join(f"{t} is computed from {', '.join(ps)}" for t, ps in trained.items())
    weight_norm = any(type(m).__name__ == "_WeightNorm" for plist in module.parametrizations.values() for m in plist)
    how = "torch.nn.utils.parametrizations.weight_norm" if weight_norm else "torch.nn.utils.parametrize"
    raise UnsupportedModuleError(
        f"fastdp: module '{name}' ({_kind(module)}) is parametrized ({how}): {what}. The engine gives "
        "per-sample gradients for the computed tensor, not for the parameters it is computed from, which "
        "would get noise only and never learn. Remove the parametrization "
        f"(torch.nn.utils.parametrize.remove_parametrizations(module, {next(iter(trained))!r})) or freeze "
        "its parameters (requires_grad_(False))."
    )


def _check_rule_params(name: str, module: nn.Module) -> None:
    """Refuses a module with a fast rule whose trainable parameters are not exactly the registered
    leaf `weight` / `bias` the rule records per-sample gradients for (legacy weight_norm and
    spectral_norm register weight_g / weight_v or weight_orig and compute `weight` in a hook)."""
    registered = {id(module._parameters[a]) for a in RULE_PARAMS if module._parameters.get(a) is not None}
    stray = [n for n, p in module._parameters.items() if p is not None and p.requires_grad and id(p) not in registered]
    computed = [
        a
        for a in RULE_PARAMS
        if isinstance(getattr(module, a, None), torch.Tensor)
        and getattr(module, a).requires_grad
        and getattr(module, a) is not module._parameters.get(a)
    ]
    if not stray and not computed:
        return
    hooks = list(module._forward_pre_hooks.values())
    wn = [h for h in hooks if isinstance(h, WeightNorm)]
    sn = [h for h in hooks if isinstance(h, SpectralNorm)]
    if wn:
        what = "; ".join(f"{h.name} is computed from {h.name}_g, {h.name}_v (weight_norm)" for h in wn)
        fix = "Remove the weight norm (torch.nn.utils.remove_weight_norm(module))"
    elif sn:
        what = "; ".join(f"{h.name} is computed from {h.name}_orig (spectral_norm)" for h in sn)
        fix = "Remove the spectral norm (torch.nn.utils.remove_spectral_norm(module))"
    else:
        parts = []
        if computed:
            parts.append(
                f"{', '.join(computed)} {'is' if len(computed) == 1 else 'are'} not the registered leaf "
                "Parameter the rule expects (computed or replaced, e.g. by a forward pre-hook)"
            )
        if stray:
            parts.append(f"its trainable parameter(s) {', '.join(stray)} are not the rule's weight/bias")
        what = "; ".join(parts)
        fix = "Make weight and bias the module's only trainable parameters, registered as leaves"
    supported = set(layers.supported_names())
    rule = next((c.__name__ for c in type(module).__mro__ if c.__name__ in supported), type(module).__name__)
    raise UnsupportedModuleError(
        f"fastdp: module '{name}' ({type(module).__name__}): {what}. fastdp's {rule} rule gives per-sample "
        "gradients for the layer's registered weight and bias only, so the other parameters would get noise "
        f"only and never learn. {fix}, or freeze those parameters (requires_grad_(False))."
    )


def _check_module(name: str, module: nn.Module, allow_generic: bool):
    """Returns the forward rule for `module` ('skip' when it has no trainable parameters)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise UnsupportedModuleError(
            f"fastdp: module '{name}' is {type(module).__name__}: BatchNorm mixes the samples of a batch, "
            "so per-sample gradients (and DP) are not defined. Replace it with GroupNorm: "
            "model = fastdp.fix_batchnorm(model)."
        )
    _check_parametrized(name, module)
    rule = layers.rule_for(module)
    if rule is not None:
        _check_rule_params(name, module)
    own = [p for p in module.parameters(recurse=False) if p.requires_grad]
    if not own:
        return "skip"
    if rule is not None:
        return rule
    children_trainable = any(p.requires_grad for c in module.children() for p in c.parameters())
    if children_trainable or not allow_generic:
        why = (
            "it also has submodules with trainable parameters"
            if children_trainable
            else "the generic torch.func path is disabled (generic=False)"
        )
        raise UnsupportedModuleError(
            f"fastdp: module '{name}' ({type(module).__name__}) has trainable parameters the engine has no "
            f"per-sample rule for, and {why}. Supported layers: {', '.join(layers.supported_names())}. "
            "Freeze its parameters (requires_grad_(False)) or restructure it."
        )
    return "generic"


class PrivateModule(nn.Module):
    """A model whose training backward records per-sample gradient information for DP-SGD.

    Args:
        module: the model; its submodules' forwards are patched in place.
        loss_reduction: "mean" (loss = mean of per-sample losses) or "sum".
        allow_generic: let unknown modules with own parameters use the torch.func path.
    """

    def __init__(self, module: nn.Module, loss_reduction: str = "mean", allow_generic: bool = True) -> None:
        super().__init__()
        self._module = module
        self.tape = Tape(loss_reduction)
        self._in_forward = False
        plan = [(n, m, _check_module(n or type(module).__name__, m, allow_generic)) for n, m in module.named_modules()]
        self._patched: list[nn.Module] = []
        for name, m, rule in plan:
            if rule != "skip":
                self._patch(name or type(module).__name__, m, rule)
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self.trainable_names = [n for n, p in module.named_parameters() if p.requires_grad]

    def _patch(self, name: str, m: nn.Module, rule) -> None:
        orig = m.forward
        tape = self.tape
        owner = self

        def forward(mod, *args, **kwargs):
            if getattr(mod, "_fastdp_bypass", False) or not owner._recording():
                return orig(*args, **kwargs)
            if not args or not isinstance(args[0], torch.Tensor):
                raise ValueError(f"fastdp: module '{name}' needs a batch-first tensor as first argument")
            call = layers.Call(mod, name, tape, tape.note_forward(name, args[0].shape[0]))
            if rule == "generic":
                return layers.generic_forward(mod, call, orig, *args, **kwargs)
            return rule(mod, call, *args, **kwargs)

        m._fastdp_orig_forward = orig
        m._fastdp_bypass = False
        m.forward = types.MethodType(forward, m)
        self._patched.append(m)

    def _recording(self) -> bool:
        return self._in_forward and self.training and torch.is_grad_enabled()

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return self._module(*args, **kwargs)
        if self.tape.awaiting_backward:
            raise PrivacyStepError(
                "fastdp: the model was called twice before backward. DP-SGD needs exactly one forward and "
                "one backward per optimizer step, so that each sample is clipped once: to run the model on "
                "several inputs (e.g. a GAN discriminator on real and fake samples), concatenate them into "
                "one batch (torch.cat([real, fake])), run one forward and split its output. Call "
                "optimizer.zero_grad() to discard a forward whose loss you do not backpropagate, and "
                "evaluate under torch.no_grad() / model.eval()."
            )
        self.tape.begin_forward()
        self._in_forward = True
        try:
            return self._module(*args, **kwargs)
        except BaseException:
            # Do not leave a half-recorded forward behind.
            if self.tape.current is not None and self.tape.current in self.tape.batches:
                self.tape.batches.remove(self.tape.current)
            self.tape.current = None
            self.tape.awaiting_backward = False
            raise
        finally:
            self._in_forward = False

    def remove_hooks(self) -> nn.Module:
        """Restores the original forwards and returns the unwrapped model."""
        for m in self._patched:
            if "forward" in m.__dict__:
                del m.forward
            for attr in ("_fastdp_orig_forward", "_fastdp_bypass"):
                if attr in m.__dict__:
                    delattr(m, attr)
        self._patched = []
        self.tape.clear()
        return self._module

    def to_standard_module(self) -> nn.Module:
        return self.remove_hooks()

    def state_dict(self, *args, **kwargs):
        return self._module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self._module.load_state_dict(*args, **kwargs)
