"""Per-sample losses (mean equals MONAI's DiceCELoss), metrics, figure helper."""

import pytest
import torch

pytest.importorskip("monai")

from monai.losses import DiceCELoss  # noqa: E402

from fastdp.models import (  # noqa: E402
    PerSampleDiceCE,
    dice_ce_criterion,
    dice_global,
    dice_per_sample,
    mse_per_sample,
    per_sample_loss,
    psnr_per_sample,
    ssim_per_sample,
)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 2, 16, 16, generator=g)
    target = torch.randint(0, 2, (5, 16, 16), generator=g)
    target[2] = 0  # an empty-organ slice
    return logits, target


def test_per_sample_shape_and_mean_equals_monai(batch):
    logits, target = batch
    ps = per_sample_loss(logits, target)
    assert ps.shape == (5,)
    torch.testing.assert_close(dice_ce_criterion()(logits, target), ps.mean())
    ref = DiceCELoss(to_onehot_y=True, softmax=True)(logits, target.unsqueeze(1))
    torch.testing.assert_close(ps.mean(), ref)
    torch.testing.assert_close(per_sample_loss(logits, target.unsqueeze(1)), ps)


def test_per_sample_loss_depends_only_on_its_sample(batch):
    logits, target = batch
    logits = logits.clone().requires_grad_(True)
    per_sample_loss(logits, target)[1].backward()
    g = logits.grad
    assert g[1].abs().sum() > 0
    assert g[[0, 2, 3, 4]].abs().sum() == 0
    # Each sample's loss equals the loss of that sample alone.
    alone = torch.stack([per_sample_loss(logits[i : i + 1], target[i : i + 1])[0] for i in range(5)])
    torch.testing.assert_close(per_sample_loss(logits, target), alone)


def test_loss_weights(batch):
    logits, target = batch
    ce = PerSampleDiceCE(dice_weight=0.0).per_sample(logits, target)
    ref = torch.nn.functional.cross_entropy(logits, target, reduction="none").mean((1, 2))
    torch.testing.assert_close(ce, ref)


def test_dice_metrics():
    t = torch.zeros(3, 8, 8, dtype=torch.long)
    t[0, 2:6, 2:6] = 1
    t[1, 0:4, 0:4] = 1
    p = t.clone()
    p[1] = 0  # a missed organ
    d = dice_per_sample(p, t)
    torch.testing.assert_close(d, torch.tensor([1.0, 0.0, 1.0]))  # slice 2: both empty -> 1
    assert dice_global(p, t) == pytest.approx(2 * 16 / (16 + 32))
    logits = torch.nn.functional.one_hot(t, 2).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(dice_per_sample(logits, t), torch.ones(3))


def test_image_metrics():
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    y = (x + 0.1).clamp(0, 1)
    assert ssim_per_sample(x, x).shape == (4,)
    torch.testing.assert_close(ssim_per_sample(x, x), torch.ones(4))
    assert (ssim_per_sample(x, y) < 1).all()
    psnr = psnr_per_sample(x, y)
    mse = mse_per_sample(x, y)
    torch.testing.assert_close(psnr, 10 * torch.log10(1.0 / mse), rtol=1e-4, atol=1e-4)


def test_figure_helper_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    from fastdp.data import render_slices
    from fastdp.viz import save_segmentation_grid

    s = render_slices("site_a", range(3), 64)
    path = save_segmentation_grid(tmp_path / "fig" / "grid.png", s.image, s.mask, torch.randn(3, 2, 64, 64))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path2 = save_segmentation_grid(tmp_path / "g2.png", s.image[:, 0], s.mask, titles=["a", "b", "c"])
    assert path2.stat().st_size > 1000
