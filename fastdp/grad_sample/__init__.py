"""Opacus's `opacus.grad_sample` names: GradSampleModule is fastdp's PrivateModule.

    from fastdp.grad_sample import GradSampleModule   # instead of: from opacus.grad_sample import ...
    model = GradSampleModule(model, batch_first=True, loss_reduction="mean")

Its state_dict keys carry the "_module." prefix, as Opacus's do, so checkpoints move between the
two libraries. `fastdp.grad_sample.functorch.make_functional` is Opacus's helper for computing
per-sample gradients with torch.func (grad_sample_mode="no_op").
"""

from __future__ import annotations

from torch import nn

from fastdp.engine.grad_sample import PrivateModule
from fastdp.engine.privacy_engine import UserGradSampleModule

__all__ = ["GradSampleModule", "GradSampleModuleNoOp", "PrivateModule"]


class GradSampleModule(PrivateModule):
    """PrivateModule with Opacus's constructor: GradSampleModule(m, batch_first=True, loss_reduction="mean").

    Args:
        m: the model (its submodules' forwards are patched in place).
        batch_first: must be True (dim 0 of every input is the sample).
        loss_reduction: "mean" or "sum".
        strict, force_functorch: Opacus's; fastdp always checks every module and has one path.
        allow_generic, conv_method: PrivateModule's.
    """

    def __init__(
        self,
        m: nn.Module,
        *,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        strict: bool = True,
        force_functorch: bool = False,
        allow_generic: bool = True,
        conv_method: str | None = None,
    ) -> None:
        if not batch_first:
            raise ValueError("fastdp needs batch_first=True (dim 0 of every input is the sample)")
        super().__init__(m, loss_reduction, allow_generic, conv_method)


class GradSampleModuleNoOp(UserGradSampleModule):
    """Opacus's no-op wrapper (grad_sample_mode="no_op"): you set p.grad_sample yourself."""

    def __init__(self, m: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean") -> None:
        if not batch_first:
            raise ValueError("fastdp needs batch_first=True (dim 0 of every input is the sample)")
        super().__init__(m, loss_reduction)
