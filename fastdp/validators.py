"""Opacus's `opacus.validators` names: ModuleValidator checks and fixes a model for DP training.

    from fastdp.validators import ModuleValidator   # instead of: from opacus.validators import ...
    errors = ModuleValidator.validate(model, strict=False)
    model = ModuleValidator.fix(model)               # BatchNorm -> GroupNorm, on a copy

The checks are the ones fastdp's PrivateModule runs when it wraps a model (BatchNorm,
parametrized or weight-normed layers, layers no rule covers, transformer layers that are not
batch-first), collected for every module, plus Opacus's "model in training mode". Opacus's
other fixes (LSTM -> DPLSTM, MultiheadAttention -> DPMultiheadAttention) are not needed:
fastdp trains nn.LSTM and nn.MultiheadAttention as they are.
"""

from __future__ import annotations

from torch import nn

from fastdp.engine.errors import UnsupportedModuleError
from fastdp.engine.privacy_engine import IllegalModuleConfigurationError, fix_module, module_errors

__all__ = ["IllegalModuleConfigurationError", "ModuleValidator", "UnsupportedModuleError"]


class ModuleValidator:
    """Validation and fixes of a model for fastdp (Opacus's ModuleValidator API, classmethods)."""

    @classmethod
    def validate(cls, module: nn.Module, *, strict: bool = False) -> list[UnsupportedModuleError]:
        """The errors of every module fastdp cannot make private (empty list: valid).

        strict=True raises one UnsupportedModuleError with all of them instead (its `errors`
        attribute holds the list)."""
        errors = module_errors(module)
        if strict and errors:
            exc = UnsupportedModuleError("\n".join(str(e) for e in errors))
            exc.errors = errors
            raise exc
        return errors

    @classmethod
    def is_valid(cls, module: nn.Module) -> bool:
        """True when validate(module) finds nothing."""
        return not cls.validate(module)

    @classmethod
    def fix(cls, module: nn.Module, **kwargs) -> nn.Module:
        """A copy of `module` with every BatchNorm replaced by GroupNorm(gcd(C, 32), C) (the input is
        not modified, as in Opacus). kwargs: num_groups=G (fixed group count), replace_bn_with_in=True
        (InstanceNorm instead), max_groups (fastdp.fix_batchnorm's)."""
        return fix_module(module, **kwargs)

    @classmethod
    def fix_and_validate(cls, module: nn.Module, **kwargs) -> nn.Module:
        """fix(module), then validate(strict=True) the fixed copy; returns it."""
        fixed = cls.fix(module, **kwargs)
        cls.validate(fixed, strict=True)
        return fixed
