"""Errors the DP engine raises."""

from __future__ import annotations

from fastdp.accounting import PrivacyBudgetExceeded


class UnsupportedModuleError(ValueError):
    """A module whose trainable parameters the engine cannot give per-sample gradients for."""


class PrivacyStepError(RuntimeError):
    """A DP step that cannot be taken (NaN loss, gradient that bypassed the engine, ...).

    Raised before any gradient, optimizer or accountant state is changed.
    """


__all__ = ["PrivacyBudgetExceeded", "PrivacyStepError", "UnsupportedModuleError"]
