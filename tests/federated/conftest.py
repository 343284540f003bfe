import pytest
import torch

from fastdp.engine import layers


@pytest.fixture(autouse=True)
def fixed_conv_method(monkeypatch):
    # Timed per-layer method choice can differ between two runs and the methods agree only to
    # float rounding; runs compared for equality need one fixed method.
    monkeypatch.setattr(layers, "CONV_METHOD", "grouped")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
