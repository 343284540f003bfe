"""DP-SGD engine: Opacus-compatible PrivacyEngine with one-backward book-keeping clipping."""

from fastdp.accounting import PrivacyBudgetExceeded
from fastdp.engine.batch_memory_manager import BatchMemoryManager
from fastdp.engine.batchnorm import fix_batchnorm
from fastdp.engine.data_loader import DPDataLoader, PoissonBatchSampler
from fastdp.engine.errors import PrivacyStepError, UnsupportedModuleError
from fastdp.engine.grad_sample import PrivateModule
from fastdp.engine.optimizer import DPOptimizer
from fastdp.engine.privacy_engine import PrivacyEngine
from fastdp.engine.rules import register_rule, unregister_rule

__all__ = [
    "BatchMemoryManager",
    "DPDataLoader",
    "DPOptimizer",
    "PoissonBatchSampler",
    "PrivacyBudgetExceeded",
    "PrivacyEngine",
    "PrivacyStepError",
    "PrivateModule",
    "UnsupportedModuleError",
    "fix_batchnorm",
    "register_rule",
    "unregister_rule",
]
