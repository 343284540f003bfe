"""Opacus's `opacus.optimizers` name: DPOptimizer (fastdp.engine's).

One class does flat and per-layer clipping (max_grad_norm a float or a list), so Opacus's
DPPerLayerOptimizer is the same class. It wraps a torch optimizer for a PrivateModule:
DPOptimizer(optimizer, module, noise_multiplier=..., max_grad_norm=..., expected_batch_size=...,
sample_rate=..., accountant=..., noise_source=...); PrivacyEngine.make_private builds it.
"""

from fastdp.engine.optimizer import DPOptimizer

DPPerLayerOptimizer = DPOptimizer

__all__ = ["DPOptimizer", "DPPerLayerOptimizer"]
