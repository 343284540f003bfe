"""Whole models: U-Nets (MONAI UNet / BasicUNet, a GroupNorm U-Net) against the microbatch reference,
Opacus's gradients, noise statistics and coverage of every trainable parameter."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import check_against_reference, check_noise_and_coverage, fastdp_step
from torch import nn

pytestmark = pytest.mark.usefixtures("float64")

B = 3


def seg_loss_per_sample(logits, target):
    """Cross-entropy + soft Dice, reduced over pixels inside each sample, mean over the batch."""
    ce = nn.functional.cross_entropy(logits, target, reduction="none").flatten(1).mean(1)
    prob = logits.softmax(1)
    onehot = nn.functional.one_hot(target, logits.shape[1]).movedim(-1, 1).to(prob.dtype)
    inter = (prob * onehot).flatten(2).sum(2)
    denom = (prob + onehot).flatten(2).sum(2)
    dice = 1 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean(1)
    return (ce + dice).mean()


class SmallUNet(nn.Module):
    """2-level GroupNorm U-Net with ConvTranspose up path."""

    def __init__(self, c=4):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(2, o), nn.PReLU())

        self.enc1, self.enc2 = block(1, c), block(c, 2 * c)
        self.down = nn.MaxPool2d(2)
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec = block(2 * c, c)
        self.out = nn.Conv2d(c, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(self.down(e1))
        return self.out(self.dec(torch.cat([self.up(e2), e1], 1)))


def _monai_models():
    monai_nets = pytest.importorskip("monai.networks.nets")
    return {
        "monai_unet_group": lambda: monai_nets.UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=2,
            channels=(4, 8, 16),
            strides=(2, 2),
            num_res_units=1,
            norm=("group", {"num_groups": 2}),
        ),
        "monai_unet_instance": lambda: monai_nets.UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=2,
            channels=(4, 8),
            strides=(2,),
            num_res_units=2,
            norm=("instance", {"affine": True}),
            dropout=0.0,
        ),
        "monai_basicunet_group": lambda: monai_nets.BasicUNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=2,
            features=(4, 4, 8, 8, 16, 4),
            norm=("group", {"num_groups": 2}),
        ),
    }


MODELS = ["small_unet", "monai_unet_group", "monai_unet_instance", "monai_basicunet_group"]


def _make(name):
    if name == "small_unet":
        return SmallUNet()
    return _monai_models()[name]()


def _batch(size=16):
    x = torch.randn(B, 1, size, size)
    y = (x[:, 0] > 0.3).long()
    return x, y


@pytest.mark.parametrize("name", MODELS)
def test_unet_matches_microbatch_reference(name):
    model = _make(name)
    x, y = _batch()
    check_against_reference(model, x, y, seg_loss_per_sample, seg_loss_per_sample)


@pytest.mark.parametrize("name", ["small_unet", "monai_unet_group"])
def test_noise_statistics_and_coverage(name):
    """p.grad - clipped mean is N(0, (sigma C / E[B])^2) for every trainable parameter."""
    torch.manual_seed(1)
    model = _make(name)
    x, y = _batch()
    check_noise_and_coverage(model, x, y, seg_loss_per_sample, sigma=1.3, expected_batch_size=4.0, seed=7)


def test_frozen_and_unused_parameters():
    model = SmallUNet()
    model.enc1[0].weight.requires_grad_(False)
    extra = nn.Linear(3, 3)  # never used in forward: noise only
    model.unused = extra
    before = model.enc1[0].weight.detach().clone()
    x, y = _batch()
    got, _, _ = fastdp_step(model, x, y, seg_loss_per_sample, 1.0, sigma=1.0, expected_batch_size=3)
    assert model.enc1[0].weight.grad is None
    assert torch.equal(model.enc1[0].weight, before)
    assert got["unused.weight"].abs().min() > 0  # noise-only gradient


def test_matches_opacus():
    opacus = pytest.importorskip("opacus")
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.InstanceNorm2d(4, affine=True),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 6),
        nn.LayerNorm(6),
        nn.Linear(6, 3),
    )
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    crit = nn.CrossEntropyLoss()
    C = 0.3
    m_op = copy.deepcopy(model)
    opt = torch.optim.SGD(m_op.parameters(), lr=0.0)
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    pe = opacus.PrivacyEngine()
    m_op, opt, _ = pe.make_private(
        module=m_op,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=C,
        poisson_sampling=False,
    )
    opt.zero_grad()
    crit(m_op(x), y).backward()
    opt.step()
    expected = {n.removeprefix("_module."): p.grad for n, p in m_op.named_parameters()}
    got, _, _ = fastdp_step(model, x, y, crit, C)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("loss", ["test's", "fastdp's"])
def test_empty_batch_noise_only(loss):
    from fastdp.models import dice_ce_criterion

    model = SmallUNet()
    x = torch.zeros(0, 1, 16, 16)
    y = torch.zeros(0, 16, 16, dtype=torch.long)
    crit = seg_loss_per_sample if loss == "test's" else dice_ce_criterion()  # fastdp's training criterion too
    got, _, _ = fastdp_step(model, x, y, crit, 1.0, sigma=1.0, seed=3, expected_batch_size=4)
    z = torch.cat([g.flatten() for g in got.values()]) / (1.0 / 4)
    assert z.numel() == sum(p.numel() for p in model.parameters())
    assert abs(float(z.std()) - 1) < 0.1
