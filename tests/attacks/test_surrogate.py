"""The smooth surrogate: same parameters, tends to the real network, and is what lets a search
that starts near the truth return to it on a PReLU / max-pool network."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fastdp.attacks import invert_gradients, simulate_update
from fastdp.attacks.inversion import _into_unit_box, _smoothing_stages
from fastdp.attacks.metrics import body_ncc
from fastdp.attacks.surrogate import SoftMaxPool2d, SoftPReLU, kinked_modules, smooth_surrogate
from fastdp.data import PhantomDataset
from fastdp.models import build_model


class KinkedNet(nn.Module):
    """conv -> GroupNorm -> PReLU -> max-pool -> conv -> GroupNorm -> LeakyReLU (-> ReLU) -> upsample
    -> 1x1 head: a U-Net's kinks, each after a normalisation as there (so beta 10 is a mild change)."""

    def __init__(self, relu: bool = True):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.n1 = nn.GroupNorm(4, 8)
        self.a1 = nn.PReLU(8)
        self.pool = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.n2 = nn.GroupNorm(4, 8)
        self.a2 = nn.Sequential(nn.LeakyReLU(0.1), *([nn.ReLU()] if relu else []))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        h = self.a1(self.n1(self.c1(x)))
        h = self.a2(self.n2(self.c2(self.pool(h))))
        return self.head(F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False))


def test_surrogate_keeps_parameter_names_and_takes_the_original_parameters():
    torch.manual_seed(0)
    net = KinkedNet()
    sur = smooth_surrogate(net, 10.0)
    assert kinked_modules(net) == ["a1", "pool", "a2.0", "a2.1"]
    assert kinked_modules(sur) == []
    assert {k: v.shape for k, v in sur.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    assert isinstance(sur.a1, SoftPReLU) and isinstance(sur.pool, SoftMaxPool2d)
    # functional_call with the original's tensors: the attack simulates through the surrogate this way.
    params = {n: p.detach() * 1.5 for n, p in net.named_parameters()}
    x = torch.rand(2, 1, 8, 8)
    out = functional_call(sur, params, (x,))
    with torch.no_grad():
        sur.a1.weight.mul_(1.5)
        for n, p in sur.named_parameters():
            if n != "a1.weight":
                p.copy_(params[n])
    torch.testing.assert_close(out, sur(x))
    assert isinstance(net.a1, nn.PReLU)  # the original is untouched


def test_surrogate_tends_to_the_real_network_as_beta_grows():
    torch.manual_seed(0)
    net = KinkedNet().double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    ref = net(x)
    errs = [(smooth_surrogate(net, b)(x) - ref).abs().max().item() for b in (3.0, 30.0, 3000.0)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-3, errs


def test_soft_pieces_match_their_limits():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(SoftMaxPool2d(2, 1e4)(x), F.max_pool2d(x, 2), atol=1e-4, rtol=0)
    w = torch.tensor([0.25, 0.1, 0.5], dtype=torch.float64)
    torch.testing.assert_close(SoftPReLU(1e4, weight=w)(x), F.prelu(x, w), atol=1e-4, rtol=0)
    # Smooth: the derivative of the soft ReLU at 0 is 1/2, between the kinked one's 0 and 1.
    z = torch.zeros(1, requires_grad=True)
    SoftPReLU(5.0, slope=0.0)(z).sum().backward()
    assert math.isclose(z.grad.item(), 0.5, rel_tol=1e-9)


def test_unsupported_pool_and_bad_beta_are_refused():
    with pytest.raises(ValueError, match="non-overlapping MaxPool2d"):
        smooth_surrogate(nn.Sequential(nn.MaxPool2d(3, stride=2)), 10.0)
    with pytest.raises(ValueError, match="beta must be > 0"):
        smooth_surrogate(KinkedNet(), 0.0)
    with pytest.raises(ValueError, match="smoothing"):
        _smoothing_stages(KinkedNet(), (-1.0,), 10)
    with pytest.raises(ValueError, match="fewer than"):
        _smoothing_stages(KinkedNet(), (3.0, 10.0, 30.0), 2)


def test_stages_split_the_iterations_and_zero_means_the_real_network():
    net = KinkedNet()
    stages = _smoothing_stages(net, (3.0, 10.0, 0.0), 11)
    assert [n for _, n in stages] == [3, 4, 4]
    assert stages[2][0] is net and isinstance(stages[0][0].a1, SoftPReLU)
    assert _smoothing_stages(net, None, 7) == [(net, 7)]


def test_into_unit_box_keeps_images_inside_and_maps_others_affinely():
    inside = torch.rand(1, 1, 4, 4)
    outside = 3.0 * torch.rand(1, 1, 4, 4) - 1.0
    out = _into_unit_box(torch.cat([inside, outside]))
    torch.testing.assert_close(out[0], inside[0])
    assert out[1].min().item() == 0.0 and out[1].max().item() == 1.0
    assert body_ncc(out[1:], outside, body=torch.ones_like(outside, dtype=torch.bool)).item() > 0.999999


def test_smoothing_lets_a_search_near_the_truth_return_to_it():
    """The measured reason for the surrogate (docs/attacks.md), on unet_tiny (GroupNorm, PReLU,
    max-pool) and a phantom slice at 32x32: from the truth plus noise, L-BFGS on the real network's
    gradient stalls at its kinks; through the surrogate schedule it returns to the truth, scored by
    correlation (the net is blind to scale)."""
    torch.manual_seed(0)
    net = build_model("unet_tiny")
    x64, m64 = PhantomDataset("site_a", 8, 64, 0).tensors()
    i = int(m64.flatten(1).sum(1).argmax())
    x = F.avg_pool2d(x64[i : i + 1], 2)
    m = (F.avg_pool2d(m64[i : i + 1, None].float(), 2)[:, 0] > 0.5).long()
    params = {n: p.detach() for n, p in net.named_parameters()}
    g = simulate_update(net, params, x, F.one_hot(m, 2).movedim(-1, 1).float(), create_graph=False)
    start = (x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    kw = dict(image_shape=(1, 32, 32), masks=m, optimizer="lbfgs", lr=1.0, tv_weight=0.0, init=start, iterations=6)
    real = body_ncc(invert_gradients(net, g, **kw).images, x).item()
    smooth = body_ncc(invert_gradients(net, g, smoothing=(10.0, 30.0, 100.0), **kw).images, x).item()
    # Measured: start 0.960, real network 0.967, surrogate schedule 0.994.
    assert smooth > 0.985 and smooth > real + 0.015, (real, smooth)
