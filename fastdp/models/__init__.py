"""Segmentation models (GroupNorm U-Nets, MONAI U-Nets), per-sample losses and metrics."""

from fastdp.models.losses import PerSampleDiceCE, dice_ce_criterion, per_sample_loss
from fastdp.models.metrics import (
    dice_global,
    dice_per_sample,
    mse_per_sample,
    psnr_per_sample,
    ssim_per_sample,
)
from fastdp.models.unet import (
    ConvBlock,
    UNet,
    build_model,
    count_parameters,
    monai_basic_unet,
    monai_unet,
    unet_paper,
    unet_small,
    unet_tiny,
)

__all__ = [
    "ConvBlock",
    "PerSampleDiceCE",
    "UNet",
    "build_model",
    "count_parameters",
    "dice_ce_criterion",
    "dice_global",
    "dice_per_sample",
    "monai_basic_unet",
    "monai_unet",
    "mse_per_sample",
    "per_sample_loss",
    "psnr_per_sample",
    "ssim_per_sample",
    "unet_paper",
    "unet_small",
    "unet_tiny",
]
