"""MONAI's transformer segmentation nets train privately: UNETR (a ViT encoder whose patch
embedding owns learnable position embeddings) and SwinUNETR (window attention with relative
position bias tables, windows of all samples folded into dim 0), small 2-D configurations,
dropout 0. Exact in float64 against the microbatch-of-one reference, and a few private steps."""

from __future__ import annotations

import pytest
import torch
from _helpers import check_against_reference
from torch.utils.data import DataLoader, TensorDataset

import fastdp

monai_nets = pytest.importorskip("monai.networks.nets")


def _unetr():
    return monai_nets.UNETR(
        in_channels=1,
        out_channels=2,
        img_size=(32, 32),
        spatial_dims=2,
        feature_size=8,
        hidden_size=48,
        mlp_dim=96,
        num_heads=4,
        dropout_rate=0.0,
    )


def _swin_unetr():
    return monai_nets.SwinUNETR(
        in_channels=1,
        out_channels=2,
        spatial_dims=2,
        feature_size=12,
        depths=(2, 2, 2, 2),
        num_heads=(3, 3, 3, 3),
        window_size=4,
        drop_rate=0.0,
        attn_drop_rate=0.0,
        dropout_path_rate=0.0,
    )


def _seg_loss(out, target):
    """Per-sample soft cross-entropy, mean over pixels (and over the batch for a batch)."""
    return torch.nn.functional.cross_entropy(out, target)


NETS = {"unetr": _unetr, "swin_unetr": _swin_unetr}
# SwinUNETR halves the image 5 times, and its deepest InstanceNorm needs more than one pixel
SIZE = {"unetr": 32, "swin_unetr": 64}


@pytest.mark.slow
@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("name", NETS)
def test_monai_transformer_net_exact(name):
    torch.manual_seed(0)
    model = NETS[name]()
    s = SIZE[name]
    x = torch.randn(3, 1, s, s)
    y = torch.randint(0, 2, (3, s, s))
    check_against_reference(model, x, y, _seg_loss, _seg_loss, rtol=1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("name", NETS)
def test_monai_transformer_net_trains_privately(name):
    torch.manual_seed(0)
    model = NETS[name]()
    g = torch.Generator().manual_seed(0)
    s = SIZE[name]
    ds = TensorDataset(torch.randn(12, 1, s, s, generator=g), torch.randint(0, 2, (12, s, s), generator=g))
    engine = fastdp.PrivacyEngine(seed=0)
    pm, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        data_loader=DataLoader(ds, batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        conv_method="grouped",  # no per-shape timing of the conv methods in a test
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for x, y in loader:
        opt.zero_grad()
        loss = _seg_loss(pm(x), y)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert engine.accountant.steps == 3 and engine.get_epsilon(1e-5) > 0
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    units = {type(m).__name__ for m in pm._patched} - {
        "Conv2d",
        "ConvTranspose2d",
        "Linear",
        "LayerNorm",
        "InstanceNorm2d",
        "PReLU",
    }
    assert units == ({"PatchEmbeddingBlock"} if name == "unetr" else {"WindowAttention"}), units
