"""fastdp: fast differentially private deep learning for multi-site medical image segmentation."""

from fastdp import ops, reference
from fastdp._core import compiled_available, compiled_error, has_kernel
from fastdp.accounting import Accountant, PrivacyBudgetExceeded, compute_epsilon, get_noise_multiplier
from fastdp.engine import BatchMemoryManager, PrivacyEngine, fix_batchnorm, register_rule
from fastdp.noise import NoiseSource

__version__ = "0.1.0"

__all__ = [
    "Accountant",
    "BatchMemoryManager",
    "PrivacyBudgetExceeded",
    "PrivacyEngine",
    "compute_epsilon",
    "fix_batchnorm",
    "get_noise_multiplier",
    "NoiseSource",
    "compiled_available",
    "compiled_error",
    "has_kernel",
    "ops",
    "reference",
    "register_rule",
]
