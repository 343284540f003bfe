"""The engine on a CUDA device: same gradients as the microbatch reference, noise on every parameter.

Runs only where a GPU exists (the CPU engine tests cover the same semantics elsewhere); these
catch device bugs: CPU-only buffers, host syncs that lose data, kernels that skip tensors.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import check_against_reference, check_noise_and_coverage
from test_models import MODELS, _batch, _make, seg_loss_per_sample

import fastdp

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("float64"),
]


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
    check_noise_and_coverage(model, x, y, seg_loss_per_sample, sigma=1.3, expected_batch_size=4.0, seed=3)
