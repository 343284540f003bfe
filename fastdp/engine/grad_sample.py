"""PrivateModule: wraps a model so its backward records per-sample gradient information.

Every submodule with trainable parameters gets its forward replaced (on the instance, not the
class) by a per-layer rule from fastdp.engine.layers; the model itself is otherwise unchanged
and trains as before. BatchNorm is refused (it mixes samples); modules the rules do not know
go through the generic torch.func path, or are refused with an error naming them.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from fastdp.engine import layers
from fastdp.engine.errors import UnsupportedModuleError
from fastdp.engine.tape import Tape


def _check_module(name: str, module: nn.Module, allow_generic: bool):
    """Returns the forward rule for `module` ('skip' when it has no trainable parameters)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        raise UnsupportedModuleError(
            f"fastdp: module '{name}' is {type(module).__name__}: BatchNorm mixes the samples of a batch, "
            "so per-sample gradients (and DP) are not defined. Replace it with GroupNorm: "
            "model = fastdp.fix_batchnorm(model)."
        )
    own = [p for p in module.parameters(recurse=False) if p.requires_grad]
    if not own:
        return "skip"
    rule = layers.rule_for(module)
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
            raise RuntimeError(
                "fastdp: the model was called twice before backward. Each training forward must be "
                "followed by loss.backward() (and optimizer.step()); call optimizer.zero_grad() to "
                "discard a forward whose loss you do not backpropagate, or run evaluation under "
                "torch.no_grad() / model.eval()."
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
