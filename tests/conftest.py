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
