"""U-Nets: output shapes, parameter counts, only DP-compatible layers."""

import pytest
import torch
from torch import nn

from fastdp.models import UNet, build_model, count_parameters, unet_paper, unet_small
from fastdp.models.unet import unet_tiny

_ALLOWED = (
    nn.Conv2d,
    nn.ConvTranspose2d,
    nn.GroupNorm,
    nn.PReLU,
    nn.ReLU,
    nn.LeakyReLU,
    nn.Upsample,
    nn.MaxPool2d,
)


def _leaf_types(model):
    return {type(m) for m in model.modules() if not list(m.children())}


@pytest.mark.parametrize("size", [64, 128])
def test_small_unet_shapes_and_size(size):
    model = unet_small()
    out = model(torch.rand(2, 1, size, size))
    assert out.shape == (2, 2, size, size)
    assert 100_000 <= count_parameters(model) <= 500_000


def test_tiny_unet_is_a_quarter_of_small():
    # Half the channels at every level: about a quarter of the weights (the demo's DP model).
    tiny = unet_tiny()
    assert tiny(torch.rand(2, 1, 64, 64)).shape == (2, 2, 64, 64)
    assert 100_000 <= count_parameters(tiny) <= 150_000
    assert 0.2 < count_parameters(tiny) / count_parameters(unet_small()) < 0.3
    assert type(build_model("unet_tiny")) is UNet


@pytest.mark.parametrize("up", ["transpose", "upsample"])
@pytest.mark.parametrize("act", ["prelu", "relu", "leaky_relu"])
def test_unet_variants_use_only_dp_layers(up, act):
    model = UNet(base_channels=8, depth=2, up=up, act=act)
    assert _leaf_types(model) <= set(_ALLOWED)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm | nn.Dropout) for m in model.modules())
    assert model(torch.rand(1, 1, 64, 64)).shape == (1, 2, 64, 64)
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.affine


def test_paper_unet_parameter_count():
    model = unet_paper()
    assert 5_000_000 <= count_parameters(model) <= 10_000_000
    assert model(torch.rand(1, 1, 64, 64)).shape == (1, 2, 64, 64)


def test_bad_input_size_raises():
    with pytest.raises(ValueError, match="divisible by 8"):
        unet_small()(torch.rand(1, 1, 60, 60))
    with pytest.raises(KeyError):
        build_model("resnet")


@pytest.mark.parametrize("name", ["monai_unet", "monai_basic_unet"])
def test_monai_unets(name):
    pytest.importorskip("monai")
    model = build_model(name)
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 2, 64, 64)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # BasicUNet always inserts Dropout modules; with p = 0 they are the identity.
    assert all(m.p == 0 for m in model.modules() if isinstance(m, nn.Dropout))


@pytest.fixture
def one_thread():
    # Many small convolutions: on a shared 2-core machine one thread is much faster than two.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_unet_learns_one_batch(one_thread):
    torch.manual_seed(0)
    from fastdp.data import render_slices
    from fastdp.models import dice_ce_criterion

    batch = render_slices("site_a", range(4), 64)
    model, crit = UNet(base_channels=8, depth=2), dice_ce_criterion()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    first = None
    for _ in range(12):
        loss = crit(model(batch.image), batch.mask)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
