"""fastdp: fast differentially private deep learning for multi-site medical image segmentation."""

from fastdp import ops, reference
from fastdp._core import compiled_available, compiled_error, has_kernel
from fastdp.noise import NoiseSource

__version__ = "0.1.0"

__all__ = [
    "NoiseSource",
    "compiled_available",
    "compiled_error",
    "has_kernel",
    "ops",
    "reference",
]
