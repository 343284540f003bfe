"""`from fastdp.accountants.utils import get_noise_multiplier`, as from opacus.accountants.utils.

The same function as fastdp.accounting.get_noise_multiplier: Opacus's keyword signature
(target_epsilon=, target_delta=, sample_rate=, epochs= or steps=, accountant="rdp",
epsilon_tolerance=0.01, **kwargs for the accountant's get_epsilon) and Opacus's search.
"""

from __future__ import annotations

from fastdp.accounting import MAX_SIGMA, get_noise_multiplier

__all__ = ["MAX_SIGMA", "get_noise_multiplier"]
