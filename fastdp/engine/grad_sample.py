"""PrivateModule: wraps a model so its backward records per-sample gradient information.

Every submodule with trainable parameters gets its forward replaced (on the instance, not the
class) by its registered rule (fastdp.engine.rules); the model itself is otherwise unchanged
and trains as before. BatchNorm is refused (it mixes samples); modules the rules do not know
go through the generic torch.func path, or are refused with an error naming them. A layer with a
fast rule is refused too when the rule would not cover its trainable parameters (weight norm,
parametrizations: the rule's `weight` is then computed from other parameters).

The plan is top-down: the outermost module with trainable parameters of its own and no rule
(nn.MultiheadAttention, an RNN, a ViT block owning a position embedding) is one generic unit with
its whole subtree, whose submodules are then not patched (their parameters go through the unit's
torch.func pass; MultiheadAttention uses out_proj's weight without calling out_proj).

Several calls of the private model before one backward are one batch (see tape.py): row i of
each call is privacy unit i, all calls need the same batch size.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from fastdp.engine import host_allocator
from fastdp.engine.errors import UnsupportedModuleError
from fastdp.engine.rules import GENERIC_RULE, Call, ConvTuner, Rule, default_conv_method, rule_for, supported_names
from fastdp.engine.rules.generic import generic_batch_size
from fastdp.engine.tape import Tape


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


def _and(names: tuple[str, ...]) -> str:
    return " and ".join(names) if len(names) <= 2 else ", ".join(names[:-1]) + " and " + names[-1]


def _check_rule_params(name: str, module: nn.Module, rule: Rule) -> None:
    """Refuses a module with a fast rule whose trainable parameters are not exactly the registered
    leaves the rule records per-sample gradients for (rule.params, default weight / bias; legacy
    weight_norm and spectral_norm register weight_g / weight_v or weight_orig and compute `weight`
    in a hook)."""
    covered = rule.params
    registered = {id(module._parameters[a]) for a in covered if module._parameters.get(a) is not None}
    stray = [n for n, p in module._parameters.items() if p is not None and p.requires_grad and id(p) not in registered]
    computed = [
        a
        for a in covered
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
            parts.append(f"its trainable parameter(s) {', '.join(stray)} are not the rule's {'/'.join(covered)}")
        what = "; ".join(parts)
        fix = f"Make {_and(covered)} the module's only trainable parameters, registered as leaves"
    raise UnsupportedModuleError(
        f"fastdp: module '{name}' ({type(module).__name__}): {what}. fastdp's {rule.module_class.__name__} rule "
        f"gives per-sample gradients for the layer's registered {_and(covered)} only, so the other parameters "
        f"would get noise only and never learn. {fix}, or freeze those parameters (requires_grad_(False))."
    )


def _check_module(name: str, module: nn.Module, allow_generic: bool, in_unit: bool) -> Rule | None:
    """The rule `module` runs through: its registered rule, GENERIC_RULE, or None when it has no
    trainable parameters of its own or lies inside a generic unit (left as it is). Refuses what no
    rule can make exact."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise UnsupportedModuleError(
            f"fastdp: module '{name}' is {type(module).__name__}: BatchNorm mixes the samples of a batch, "
            "so per-sample gradients (and DP) are not defined. Replace it with GroupNorm: "
            "model = fastdp.fix_batchnorm(model)."
        )
    _check_parametrized(name, module)
    _check_batch_first(name, module)
    rule = rule_for(module)
    if rule is not None:
        _check_rule_params(name, module, rule)
    own = [p for p in module.parameters(recurse=False) if p.requires_grad]
    if not own or in_unit:
        return None
    if rule is not None:
        return rule
    if not allow_generic:
        raise UnsupportedModuleError(
            f"fastdp: module '{name}' ({type(module).__name__}) has trainable parameters the engine has no "
            "per-sample rule for, and the generic torch.func path is disabled (allow_generic=False). "
            f"Supported layers: {', '.join(supported_names())}. Freeze its parameters (requires_grad_(False)), "
            "register a rule (fastdp.register_rule) or allow the generic path."
        )
    return GENERIC_RULE


def _check_batch_first(name: str, module: nn.Module) -> None:
    """Refuses transformer layers laid out [T, B, E]: their Linear and LayerNorm layers would take the
    sequence dim for the batch."""
    if (
        isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer))
        and not module.self_attn.batch_first
    ):
        raise UnsupportedModuleError(
            f"fastdp: module '{name}' ({type(module).__name__}) has batch_first=False: its feed-forward Linear "
            "and LayerNorm layers then get [T, B, E] inputs, and the engine takes dim 0 for the samples. Build it "
            "with batch_first=True and pass [B, T, E] inputs."
        )


class PrivateModule(nn.Module):
    """A model whose training backward records per-sample gradient information for DP-SGD.

    Args:
        module: the model; its submodules' forwards are patched in place.
        loss_reduction: "mean" (loss = mean of per-sample losses) or "sum".
        allow_generic: let unknown modules with own parameters use the torch.func path.
        conv_method: how per-sample conv weight gradients are computed: "auto" (timed per layer
            shape, the fastest kept), or a fixed "grouped", "loop" or "unfold" (runs compared for
            equality across processes need a fixed one: the methods agree to float rounding).
            None: $FASTDP_CONV_METHOD if set, else "auto" (read now, not at import).
    """

    def __init__(
        self,
        module: nn.Module,
        loss_reduction: str = "mean",
        allow_generic: bool = True,
        conv_method: str | None = None,
    ) -> None:
        super().__init__()
        # DP steps free tens of MB per step: keep it in the process instead of faulting it back in
        # every step (see host_allocator; FASTDP_HOST_ALLOCATOR=default opts out).
        host_allocator.tune()
        self._module = module
        self.tape = Tape(loss_reduction)
        self.conv_tuner = ConvTuner(default_conv_method() if conv_method is None else conv_method)
        self._in_forward = False
        plan, units = [], []  # units: names of generic units (their subtrees are theirs)
        for n, m in module.named_modules():  # pre-order: a unit is seen before its submodules
            in_unit = any(u == "" or n.startswith(u + ".") for u in units)
            rule = _check_module(n or type(module).__name__, m, allow_generic, in_unit)
            if rule is GENERIC_RULE:
                units.append(n)
            plan.append((n, m, rule))
        self._patched: list[nn.Module] = []
        for name, m, rule in plan:
            if rule is not None:
                self._patch(name or type(module).__name__, m, rule)
        self.trainable = [p for p in module.parameters() if p.requires_grad]
        self.trainable_names = [n for n, p in module.named_parameters() if p.requires_grad]

    def _patch(self, name: str, m: nn.Module, rule: Rule) -> None:
        orig = m.forward
        tape, tuner = self.tape, self.conv_tuner
        owner = self

        def forward(mod, *args, **kwargs):
            if getattr(mod, "_fastdp_bypass", False) or not owner._recording():
                return orig(*args, **kwargs)
            if rule is GENERIC_RULE:
                current = tape.current.batch_size if tape.current is not None else None
                B = generic_batch_size(mod, name, args, kwargs, current)
            elif not args or not isinstance(args[0], torch.Tensor):
                raise ValueError(f"fastdp: module '{name}' needs a batch-first tensor as first argument")
            else:
                B = args[0].shape[0]
            call = Call(mod, name, tape, tape.note_forward(name, B), tuner)
            return rule.forward(mod, call, *args, **kwargs)

        m._fastdp_orig_forward = orig
        m._fastdp_bypass = False
        m.forward = types.MethodType(forward, m)
        self._patched.append(m)

    def _recording(self) -> bool:
        return self._in_forward and self.training and torch.is_grad_enabled() and not self.tape.in_unit

    def forward(self, *args, **kwargs):
        """The model's forward; in training with grad enabled, recorded for the DP step. A call before
        the backward of an earlier one joins its batch (row i of each call is privacy unit i)."""
        if not (self.training and torch.is_grad_enabled()):
            return self._module(*args, **kwargs)
        continuing = self.tape.begin_forward()
        self._in_forward = True
        try:
            return self._module(*args, **kwargs)
        except BaseException:
            # Do not leave a half-recorded forward behind (a continued batch keeps the earlier calls).
            if not continuing:
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
        """The model's state_dict with keys '_module.<name>', as Opacus's GradSampleModule (and
        named_parameters()) has them; the plain model's keys: private._module.state_dict()."""
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Loads either form: '_module.'-prefixed keys (state_dict(), an Opacus GradSampleModule's)
        or the plain model's keys (model.state_dict() before it was made private). The form is the
        one more of the keys match (a model may itself have a submodule named `_module`)."""
        keys = set(state_dict.keys())
        prefixed = len(keys & set(super().state_dict(keep_vars=True)))
        plain = len(keys & set(self._module.state_dict(keep_vars=True)))
        if plain > prefixed or (plain == prefixed and not all(k.startswith("_module.") for k in keys)):
            return self._module.load_state_dict(state_dict, strict=strict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
