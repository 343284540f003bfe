"""Opacus's `opacus.data_loader` name: DPDataLoader, Poisson sampling (fastdp.engine's)."""

from fastdp.engine.data_loader import DPDataLoader, PoissonBatchSampler

__all__ = ["DPDataLoader", "PoissonBatchSampler"]
