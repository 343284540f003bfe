"""Attacks on what a site shares: gradient inversion and an empirical privacy audit."""

from fastdp.attacks.audit import AuditResult, audit_dp_sgd, clopper_pearson, epsilon_lower_bound
from fastdp.attacks.experiment import build_attack_model, run_attack_experiment, site_update
from fastdp.attacks.inversion import (
    InversionResult,
    PCAImagePrior,
    gradient_distance,
    invert_gradients,
    layer_weights_geometric,
    rank_references,
    recover_linear_input,
    simulate_update,
    soft_dice_ce,
    total_variation,
)

__all__ = [
    "AuditResult",
    "audit_dp_sgd",
    "clopper_pearson",
    "epsilon_lower_bound",
    "build_attack_model",
    "run_attack_experiment",
    "site_update",
    "PCAImagePrior",
    "InversionResult",
    "gradient_distance",
    "invert_gradients",
    "layer_weights_geometric",
    "rank_references",
    "recover_linear_input",
    "simulate_update",
    "soft_dice_ce",
    "total_variation",
]
