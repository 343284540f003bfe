"""One torch thread for the attack tests: their many tiny double-backward passes run several times
faster without OpenMP threads that spin while other jobs share the CPU."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
