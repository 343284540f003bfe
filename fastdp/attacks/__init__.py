"""Attacks on what a site shares: gradient inversion and an empirical privacy audit."""

from fastdp.attacks.inversion import (
    InversionResult,
    PCAImagePrior,
    gradient_distance,
    invert_gradients,
    layer_weights_geometric,
    recover_linear_input,
    simulate_update,
    soft_dice_ce,
    total_variation,
)

__all__ = [
    "PCAImagePrior",
    "InversionResult",
    "gradient_distance",
    "invert_gradients",
    "layer_weights_geometric",
    "recover_linear_input",
    "simulate_update",
    "soft_dice_ce",
    "total_variation",
]
