"""Noise off: fastdp's p.grad equals a microbatch-of-one reference, layer by layer (float64)."""

from __future__ import annotations

import pytest
import torch
from _helpers import check_against_reference, mse_batch, mse_per_sample
from torch import nn

from fastdp.engine.rules import base

pytestmark = pytest.mark.usefixtures("float64")

B = 5


def _run(module, in_shape, requires_grad_input=False, **make_private_kw):
    model = nn.Sequential(module)
    x = torch.randn(B, *in_shape)
    with torch.no_grad():
        y = torch.randn_like(model(x))
    check_against_reference(model, x, y, mse_per_sample, mse_batch, **make_private_kw)


CONV_CASES = {
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), (3, 11)),
    "conv1d_dil_groups": (lambda: nn.Conv1d(4, 6, 3, dilation=2, groups=2), (4, 12)),
    "conv2d": (lambda: nn.Conv2d(2, 4, 3, padding=1), (2, 8, 8)),
    "conv2d_stride_nobias": (
        lambda: nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), bias=False),
        (3, 9, 7),
    ),
    "conv2d_groups_dilation": (lambda: nn.Conv2d(4, 8, 3, dilation=2, groups=4, padding=2), (4, 9, 9)),
    "conv2d_reflect": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (2, 6, 6)),
    "conv2d_circular": (lambda: nn.Conv2d(2, 3, 3, padding=2, padding_mode="circular"), (2, 6, 6)),
    "conv2d_replicate": (lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="replicate"), (2, 6, 6)),
    "conv2d_same": (lambda: nn.Conv2d(2, 3, 4, padding="same"), (2, 7, 7)),
    "conv2d_valid": (lambda: nn.Conv2d(2, 3, 3, padding="valid"), (2, 7, 7)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 3, stride=2, padding=1), (2, 5, 6, 5)),
    "convT1d": (lambda: nn.ConvTranspose1d(3, 2, 3, stride=2), (3, 6)),
    "convT2d": (
        lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2),
        (4, 5, 5),
    ),
    "convT2d_dil": (lambda: nn.ConvTranspose2d(2, 3, 2, stride=2, dilation=2), (2, 4, 4)),
    "convT3d": (lambda: nn.ConvTranspose3d(2, 3, 2, stride=2), (2, 3, 3, 3)),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv(case):
    make, shape = CONV_CASES[case]
    _run(make(), shape)  # method chosen by timing


@pytest.mark.parametrize("method", ["loop", "grouped", "unfold"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_per_sample_methods(case, method):
    """Each per-sample weight-gradient method gives the same (exact) result."""
    if method == "unfold" and (len(CONV_CASES[case][1]) != 3 or "T" in case):
        pytest.skip("unfold path is 2-d, non-transposed only")
    make, shape = CONV_CASES[case]
    _run(make(), shape, conv_method=method)


@pytest.mark.parametrize("case", ["conv2d", "convT2d", "conv3d"])
def test_conv_deferred_path(case, monkeypatch):
    """Large-weight path: norms from per-sample grads, clipped sum from one c-scaled weight gradient."""
    monkeypatch.setattr(base, "STORE_RATIO", 0.0)
    make, shape = CONV_CASES[case]
    _run(make(), shape)


GHOST_CASES = ["conv2d", "conv2d_stride_nobias", "conv2d_reflect", "conv2d_same", "conv2d_valid"]


@pytest.mark.parametrize("ghost", ["always", "never"])
@pytest.mark.parametrize("case", GHOST_CASES + ["conv2d_groups_dilation", "convT2d"])
def test_conv_deferred_ghost_norms(case, ghost, monkeypatch):
    """Large-weight path with the per-sample norms by the ghost norm (Gram matrices of the im2col
    columns and of the output gradient; grouped and transposed convs fall back) or formed."""
    from fastdp.engine.rules import conv_tuner

    monkeypatch.setattr(base, "STORE_RATIO", 0.0)
    monkeypatch.setattr(conv_tuner, "GHOST_NORMS", ghost)
    make, shape = CONV_CASES[case]
    _run(make(), shape, conv_method="grouped")


@pytest.mark.parametrize(
    "shape",
    [(6,), (3, 6), (2, 10, 6)],  # T=1 ghost, T=3 ghost (2T^2 < pd), T=20 stored
)
def test_linear(shape):
    _run(nn.Linear(6, 8), shape)


def test_linear_large_deferred(monkeypatch):
    monkeypatch.setattr(base, "STORE_RATIO", 0.0)
    _run(nn.Linear(4, 3), (10, 4))  # not ghost (2T^2 > pd) and "large": per-sample norms + recompute


def test_linear_no_bias_frozen_bias():
    lin = nn.Linear(5, 4)
    lin.bias.requires_grad_(False)
    _run(lin, (5,))
    _run(nn.Linear(5, 4, bias=False), (3, 5))


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: nn.GroupNorm(2, 4), (4, 5, 5)),
        (lambda: nn.GroupNorm(3, 6), (6, 7)),
        (lambda: nn.GroupNorm(1, 2), (2, 3, 3, 3)),
        (lambda: nn.InstanceNorm2d(3, affine=True), (3, 5, 5)),
        (lambda: nn.InstanceNorm1d(3, affine=True), (3, 7)),
        (lambda: nn.InstanceNorm3d(2, affine=True, track_running_stats=True), (2, 3, 3, 3)),
        (lambda: nn.LayerNorm(6), (6,)),
        (lambda: nn.LayerNorm([3, 4]), (2, 3, 4)),
        (lambda: nn.LayerNorm(5, bias=False), (4, 5)),
        (lambda: nn.PReLU(), (3, 4, 4)),
        (lambda: nn.PReLU(3), (3, 4, 4)),
        (lambda: nn.PReLU(4), (4,)),
        (lambda: nn.PReLU(), (5,)),
        (lambda: nn.PReLU(2), (2, 3, 3, 3)),
    ],
)
def test_norms_and_activations(make, shape):
    module = make()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()  # non-trivial affine parameters
    _run(module, shape)


def test_instance_norm_running_stats_updated():
    m = nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    ref = nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    x = torch.randn(B, 3, 5, 5)
    ref(x)
    _run(m, (3, 5, 5))  # runs one training forward on a different x; check the update rule separately
    m2 = nn.Sequential(nn.InstanceNorm2d(3, affine=True, track_running_stats=True))
    from _helpers import fastdp_step

    fastdp_step(m2, x, torch.randn(B, 3, 5, 5), mse_batch, 1.0)
    torch.testing.assert_close(m2[0].running_mean, ref.running_mean)
    torch.testing.assert_close(m2[0].running_var, ref.running_var)


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding(padding_idx):
    emb = nn.Embedding(7, 4, padding_idx=padding_idx)
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(12, 3))
    x = torch.randint(0, 7, (B, 3))
    x[0] = torch.tensor([2, 2, 0])  # repeated tokens and the padding token
    y = torch.randn(B, 3)
    check_against_reference(model, x, y, mse_per_sample, mse_batch)


class ScaleShift(nn.Module):
    """A module the engine has no rule for: goes through the generic torch.func path."""

    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(c, 1, 1))
        self.shift = nn.Parameter(torch.randn(c))

    def forward(self, x):
        return torch.tanh(x * self.scale) + self.shift[:, None, None]


def test_generic_module():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), ScaleShift(3))
    x = torch.randn(B, 2, 6, 6)
    y = torch.randn(B, 3, 4, 4)
    check_against_reference(model, x, y, mse_per_sample, mse_batch)


class Tied(nn.Module):
    """One Linear applied twice (shared parameters across calls)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


@pytest.mark.parametrize("store_ratio", [4.0, 0.0])
def test_layer_called_twice_in_one_forward(store_ratio, monkeypatch):
    monkeypatch.setattr(base, "STORE_RATIO", store_ratio)
    x = torch.randn(B, 4)
    check_against_reference(Tied(), x, torch.randn(B, 2), mse_per_sample, mse_batch)


def test_loss_reduction_sum():
    from _helpers import fastdp_step
    from _reference import per_sample_grads

    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2))
    x, y = torch.randn(B, 2, 4, 4), torch.randn(B, 2)
    grads, norms = per_sample_grads(model, lambda o, t: ((o - t) ** 2).sum(), x, y)
    C = float(norms.median())
    c = (C / (norms + 1e-6)).clamp(max=1)
    got, _, _ = fastdp_step(model, x, y, lambda o, t: ((o - t) ** 2).sum(), C, loss_reduction="sum")
    for n, g in grads.items():  # "sum": no division by E[B], as Opacus
        torch.testing.assert_close(got[n], torch.einsum("i,i...->...", c, g), rtol=1e-5, atol=1e-12)
