"""Engine test setup: the helper modules on sys.path and a float64 fixture for exactness tests."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def float64():
    """Default dtype float64 and seed 0 for the test: exactness is tested in float64 (fp32
    rounding order alone differs by ~5e-4 relative on single U-Net parameters)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)
