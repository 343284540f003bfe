"""Segmentation and reconstruction metrics, per sample, via MONAI.

All functions return one value per sample ([B] float tensors, no grad) so callers can
average, filter (e.g. only slices that contain the organ) or report spread.
"""

from __future__ import annotations

import torch


def _monai_metrics():
    try:
        from monai import metrics
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fastdp.models.metrics needs monai: pip install monai") from exc
    return metrics


def _labels(x: torch.Tensor) -> torch.Tensor:
    """Logits [B, C, H, W] -> argmax labels [B, H, W]; labels [B, H, W] / [B, 1, H, W] pass."""
    if x.dim() == 4 and x.shape[1] > 1:
        return x.argmax(1)
    if x.dim() == 4:
        return x[:, 0].long()
    if x.dim() == 3:
        return x.long()
    raise ValueError(f"expected logits [B, C, H, W] or labels [B, H, W], got {tuple(x.shape)}")


@torch.no_grad()
def dice_per_sample(pred: torch.Tensor, target: torch.Tensor, num_classes: int = 2, empty_score: float = 1.0):
    """Dice of the foreground classes per sample (MONAI ``compute_dice``), averaged over classes.

    Args:
        pred: logits [B, C, H, W] or predicted labels [B, H, W].
        target: labels [B, H, W] or [B, 1, H, W].
        num_classes: classes including background.
        empty_score: the score when a class is absent from both prediction and target (a
            correct empty prediction); MONAI then returns NaN, replaced by this value.
    Returns: [B] float.
    """
    metrics = _monai_metrics()
    p, t = _labels(pred), _labels(target)
    oh = lambda y: torch.nn.functional.one_hot(y, num_classes).permute(0, 3, 1, 2).float()  # noqa: E731
    d = metrics.compute_dice(oh(p), oh(t), include_background=False, ignore_empty=True)  # [B, C-1]
    both_empty = torch.stack([(p != c).all((1, 2)) & (t != c).all((1, 2)) for c in range(1, num_classes)], 1)
    d = torch.where(both_empty, torch.full_like(d, empty_score), torch.nan_to_num(d, nan=0.0))
    return d.mean(1)


@torch.no_grad()
def dice_global(pred: torch.Tensor, target: torch.Tensor, foreground: int = 1) -> float:
    """Dice of one class over all pixels of the batch (2 |P & T| / (|P| + |T|)); 1.0 if both empty."""
    p, t = _labels(pred) == foreground, _labels(target) == foreground
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2 * (p & t).sum() / denom)


@torch.no_grad()
def ssim_per_sample(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11):
    """SSIM per sample (MONAI ``SSIMMetric``, Gaussian window): x, y [B, C, H, W] -> [B]."""
    metrics = _monai_metrics()
    m = metrics.SSIMMetric(spatial_dims=2, data_range=data_range, win_size=win_size, reduction="none")
    return m(x.float(), y.float()).reshape(x.shape[0], -1).mean(1)


@torch.no_grad()
def psnr_per_sample(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0):
    """PSNR in dB per sample (MONAI ``PSNRMetric``): x, y [B, C, H, W] -> [B]."""
    metrics = _monai_metrics()
    m = metrics.PSNRMetric(max_val=data_range, reduction="none")
    return m(x.float(), y.float()).reshape(x.shape[0], -1).mean(1)


@torch.no_grad()
def mse_per_sample(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample: [B, ...] -> [B]."""
    return (x.float() - y.float()).square().reshape(x.shape[0], -1).mean(1)
