"""Shared test fixtures: the devices the compiled ops are tested on."""

import pytest
import torch


def available_devices() -> list[str]:
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    return devices


@pytest.fixture(params=available_devices())
def device(request) -> str:
    return request.param


# Packages whose tests compare whole training runs for equality (resume, Flower vs in-process).
_BIT_EXACT_DIRS = ("federated", "flower")


@pytest.fixture(autouse=True)
def fixed_conv_method(request, monkeypatch):
    """In tests/federated and tests/flower: one per-sample conv method and one thread.

    The timed per-layer method choice can differ between two runs and the methods agree only to
    float rounding; runs compared for equality need one fixed method. A private model reads
    FASTDP_CONV_METHOD when it is created (when no conv_method is given), so setting it here
    fixes the method of every site the test builds.
    """
    if request.path.parent.name not in _BIT_EXACT_DIRS:
        yield
        return
    monkeypatch.setenv("FASTDP_CONV_METHOD", "grouped")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
