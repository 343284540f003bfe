"""The engine on a CUDA device: same gradients as the microbatch reference, noise on every parameter.

Runs only where a GPU exists (the CPU engine tests cover the same semantics elsewhere); these
catch device bugs: CPU-only buffers, host syncs that lose data, kernels that skip tensors.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import check_against_reference, fastdp_step
from _reference import clipped_mean, per_sample_grads
from test_models import MODELS, _batch, _make, seg_loss_per_sample

import fastdp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)


def test_compiled_cuda_kernels_present():
    assert fastdp.has_kernel("cuda"), "fastdp was built without CUDA kernels on a CUDA machine"


@pytest.mark.parametrize("name", MODELS)
def test_unet_on_cuda_matches_microbatch_reference(name):
    model = _make(name).cuda()
    x, y = (t.cuda() for t in _batch())
    check_against_reference(model, x, y, seg_loss_per_sample, seg_loss_per_sample)


def test_noise_on_cuda_covers_every_parameter():
    model = _make("small_unet").cuda()
    x, y = (t.cuda() for t in _batch())
    sigma, expected_b = 1.3, 4.0
    ref_grads, norms = per_sample_grads(model, seg_loss_per_sample, x, y)
    clip = float(norms.median())
    clipped = clipped_mean(ref_grads, norms, clip, expected_b)
    got, _, _ = fastdp_step(model, x, y, seg_loss_per_sample, clip, sigma=sigma, seed=3, expected_batch_size=expected_b)
    std = sigma * clip / expected_b
    z = []
    for name, g in got.items():
        assert g.is_cuda, f"{name}: gradient left the GPU"
        noise = (g - clipped[name]).flatten()
        assert (noise.abs() > 1e-9 * std).all(), f"parameter {name} not noised"
        z.append(noise / std)
    z = torch.cat(z)
    n = z.numel()
    assert abs(float(z.mean())) < 5 / n**0.5
    assert abs(float(z.std()) - 1) < 5 / (2 * n) ** 0.5
