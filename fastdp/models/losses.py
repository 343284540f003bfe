"""Per-sample segmentation losses (MONAI Dice, torch cross-entropy) for DP training.

DP-SGD clips each sample's gradient, so the loss of a batch must be a sum (or mean) of
losses that each depend on one sample only. Dice is therefore computed per sample (reduced
over the pixels and classes of that sample, never over the batch): MONAI's ``DiceLoss``
with ``batch=False`` and ``reduction="none"``. The batch criterion is the mean of the
per-sample losses, which equals MONAI's ``DiceCELoss`` with its default reduction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _monai_dice(include_background: bool, smooth: float):
    try:
        from monai.losses import DiceLoss
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fastdp.models.losses needs monai: pip install monai") from exc
    return DiceLoss(
        include_background=include_background,
        to_onehot_y=True,
        softmax=True,
        batch=False,  # per sample: DP needs it
        reduction="none",
        smooth_nr=smooth,
        smooth_dr=smooth,
    )


def _target_bchw(target: torch.Tensor) -> torch.Tensor:
    """[B, H, W] or [B, 1, H, W] integer labels -> [B, 1, H, W]."""
    if target.dim() == 3:
        return target.unsqueeze(1)
    if target.dim() == 4 and target.shape[1] == 1:
        return target
    raise ValueError(f"target must be [B, H, W] or [B, 1, H, W] class indices, got {tuple(target.shape)}")


class PerSampleDiceCE(nn.Module):
    """Soft Dice (MONAI, softmax, per sample) plus pixel-mean cross-entropy, per sample.

    ``forward(logits, target)`` returns the batch mean (a scalar);
    ``per_sample(logits, target)`` returns the [B] losses whose mean that is.

    Args:
        dice_weight, ce_weight: weights of the two terms (MONAI's lambda_dice, lambda_ce).
        include_background: Dice over the background class too (MONAI's default, True).
        smooth: MONAI's smooth_nr = smooth_dr, keeps empty-organ slices finite.

    Shapes: logits [B, C, H, W]; target [B, H, W] or [B, 1, H, W] int class indices.
    """

    def __init__(
        self,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        include_background: bool = True,
        smooth: float = 1e-5,
    ):
        super().__init__()
        self.dice_weight, self.ce_weight = dice_weight, ce_weight
        self.dice = _monai_dice(include_background, smooth)

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """[B] loss of each sample (reduced over its own pixels and classes only)."""
        t = _target_bchw(target).long()
        loss = logits.new_zeros(logits.shape[0])
        # flatten(1), not reshape(B, -1): an empty Poisson batch (B = 0) is a noise-only DP step
        if self.dice_weight:
            loss = loss + self.dice_weight * self.dice(logits, t).flatten(1).mean(1)
        if self.ce_weight:
            ce = F.cross_entropy(logits, t[:, 0], reduction="none")  # [B, H, W]
            loss = loss + self.ce_weight * ce.flatten(1).mean(1)
        return loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.per_sample(logits, target).mean()


_DEFAULT: PerSampleDiceCE | None = None


def per_sample_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice of each sample: logits [B, C, H, W], target [B, H, W] -> [B]."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = PerSampleDiceCE()
    return _DEFAULT.per_sample(logits, target)


def dice_ce_criterion(**kwargs) -> PerSampleDiceCE:
    """The training criterion (mean of :func:`per_sample_loss`); kwargs go to PerSampleDiceCE."""
    return PerSampleDiceCE(**kwargs)
