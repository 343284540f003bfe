"""How close a reconstruction is to the truth, and how well trivial guesses do on the same slice.

Whole-image SSIM flatters CT slices: the air around the body is a large constant region that a
blank image matches, so an all-black guess already scores 0.3-0.5. The attack is therefore
scored with SSIM inside the body (the SSIM map averaged over body pixels only), PSNR and MSE,
each next to the same metric for trivial guesses that need no attack at all.

SSIM and PSNR come from MONAI (Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03, data range 1).
"""

from __future__ import annotations

import torch

from fastdp.models.metrics import dice_per_sample, mse_per_sample, psnr_per_sample, ssim_per_sample


def body_mask(images: torch.Tensor, threshold: float = 0.02) -> torch.Tensor:
    """Pixels inside the patient: intensity above ``threshold`` ([B, 1, H, W] in [0, 1] -> bool).

    Windowed to [-150, 200] HU, air is exactly 0 and fat is about 0.14, so a small threshold
    separates the body from the air around it.
    """
    return images > threshold


@torch.no_grad()
def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win_size: int = 11) -> torch.Tensor:
    """Local SSIM map (MONAI ``compute_ssim_and_cs``): x, y [B, 1, H, W] -> [B, 1, H-w+1, W-w+1].

    Valid positions only (the window inside the image): the mean of the map is the whole-image
    SSIM of :func:`fastdp.models.ssim_per_sample`.
    """
    from monai.metrics.regression import compute_ssim_and_cs

    ssim, _ = compute_ssim_and_cs(
        x.float(), y.float(), spatial_dims=2, kernel_size=[win_size] * 2, kernel_sigma=[1.5] * 2, data_range=data_range
    )
    return ssim


@torch.no_grad()
def body_ssim(
    x: torch.Tensor, y: torch.Tensor, body: torch.Tensor | None = None, data_range: float = 1.0, win_size: int = 11
) -> torch.Tensor:
    """SSIM averaged over the windows centred inside the body: x, y [B, 1, H, W] -> [B].

    Args:
        x: reconstruction; y: truth.
        body: bool [B, 1, H, W] (default :func:`body_mask` of the truth ``y``).
    A sample without body pixels scores NaN.
    """
    body = body_mask(y) if body is None else body
    smap = ssim_map(x, y, data_range, win_size)
    r = win_size // 2
    inner = body[..., r : body.shape[-2] - r, r : body.shape[-1] - r].float()
    return (smap * inner).flatten(1).sum(1) / inner.flatten(1).sum(1)


@torch.no_grad()
def reconstruction_metrics(
    recon: torch.Tensor, truth: torch.Tensor, *, mask_probs: torch.Tensor | None = None, masks=None
) -> dict[str, list[float]]:
    """Per-sample metrics of a reconstruction.

    Args:
        recon, truth: images [B, 1, H, W] in [0, 1], in the same order.
        mask_probs: reconstructed mask probabilities [B, K, H, W] (when the mask was optimised).
        masks: true masks [B, H, W] (needed for ``mask_dice``).
    Returns: {"body_ssim", "ssim", "psnr" (dB), "mse", the scale-fair "aligned_body_ssim",
        "aligned_psnr" and "ncc" (:func:`aligned_metrics`), and "mask_dice" if both masks given}
        -> [B] lists.
    """
    out = {
        "body_ssim": body_ssim(recon, truth).tolist(),
        "ssim": ssim_per_sample(recon, truth).tolist(),
        "psnr": psnr_per_sample(recon, truth).tolist(),
        "mse": mse_per_sample(recon, truth).tolist(),
        **aligned_metrics(recon, truth),
    }
    if mask_probs is not None and masks is not None:
        out["mask_dice"] = dice_per_sample(mask_probs, masks, num_classes=mask_probs.shape[1]).tolist()
    return out


@torch.no_grad()
def trivial_guesses(
    truth: torch.Tensor,
    masks: torch.Tensor,
    references: torch.Tensor | None = None,
    reference_masks: torch.Tensor | None = None,
    top_k: int = 3,
) -> dict[str, torch.Tensor]:
    """Guesses that need no attack, [B, 1, H, W] each.

    * ``grey``: 0.5 everywhere (a blank mid-grey image);
    * ``mean``: the slice's own mean intensity everywhere (an oracle constant);
    * ``zeros``: all black;
    * ``mask_mean``: the known organ mask filled with the slice's mean intensity inside it,
      0 elsewhere (what a server that knows the labels can draw without the gradient).
    With an attacker's reference slices [N, 1, H, W] (and their masks [N, H, W]) also:

    * ``ref_mean``: the mean reference slice (a prior's guess before any gradient);
    * ``ref_mask_match``: the mean of the ``top_k`` references whose masks best match the known
      mask (Dice): what retrieval by the labels alone gives, without the gradient.

    The oracle means use the truth, so they are upper bounds on what a blind guess could do.
    """
    m = masks.reshape(truth.shape[0], 1, *truth.shape[-2:]).to(truth.dtype)
    mean = truth.mean((1, 2, 3), keepdim=True)
    organ_mean = (truth * m).sum((1, 2, 3), keepdim=True) / m.sum((1, 2, 3), keepdim=True).clamp(min=1)
    out = {
        "grey": torch.full_like(truth, 0.5),
        "mean": mean.expand_as(truth).clone(),
        "zeros": torch.zeros_like(truth),
        "mask_mean": m * organ_mean,
    }
    if references is not None:
        out["ref_mean"] = references.float().mean(0, keepdim=True).expand_as(truth).clone()
        if reference_masks is not None:
            rm = reference_masks.reshape(references.shape[0], -1).float()
            tm = m.reshape(truth.shape[0], -1)
            inter = tm @ rm.T  # [B, N]
            dice = 2 * inter / (tm.sum(1, keepdim=True) + rm.sum(1)[None]).clamp(min=1)
            idx = dice.topk(min(top_k, references.shape[0]), dim=1).indices  # [B, k]
            out["ref_mask_match"] = references.float()[idx].mean(1)
    return out


@torch.no_grad()
def trivial_guess_metrics(truth: torch.Tensor, masks: torch.Tensor, **kwargs) -> dict[str, dict[str, list[float]]]:
    """:func:`reconstruction_metrics` of every :func:`trivial_guesses` entry: name -> metric -> [B].

    kwargs go to :func:`trivial_guesses` (references, reference_masks, top_k).
    """
    return {name: reconstruction_metrics(g, truth) for name, g in trivial_guesses(truth, masks, **kwargs).items()}


def best_trivial(trivial: dict[str, dict[str, list[float]]], metric: str = "body_ssim") -> tuple[str, float]:
    """The trivial guess with the highest batch-mean ``metric`` (lowest for ``mse``): (name, value)."""
    sign = -1.0 if metric == "mse" else 1.0
    scores = {k: sum(v[metric]) / len(v[metric]) for k, v in trivial.items()}
    name = max(scores, key=lambda k: sign * scores[k])
    return name, scores[name]


# ---- scale-fair scoring: affine alignment, NCC, identification --------------------------------
#
# A network whose gradient cannot see intensity scale (GroupNorm after a bias-free first
# convolution) leaks the image only up to r -> a r + b. Scoring the raw reconstruction would
# measure the prior's guess of brightness, not the leak, so the attack and every trivial guess
# get the same best affine fit to the truth before SSIM and PSNR.


@torch.no_grad()
def affine_align(recon: torch.Tensor, truth: torch.Tensor, body: torch.Tensor | None = None) -> torch.Tensor:
    """Best fit ``a * recon + b`` (a >= 0, least squares over body pixels), clamped to [0, 1].

    Args:
        recon, truth: [B, 1, H, W]; body: bool [B, 1, H, W] (default :func:`body_mask` of ``truth``).
    Returns: [B, 1, H, W]. The fit is computed over the body and applied to the whole image. A
    constant ``recon`` (or one anti-correlated with the truth) gets a = 0 and becomes the truth's
    body mean; a two-level image (a filled mask) becomes the best two-level image of that shape.
    """
    body = body_mask(truth) if body is None else body
    w = body.float()
    n = w.flatten(1).sum(1).clamp(min=1)[:, None, None, None]
    r, t = recon.float(), truth.float()
    rm = (r * w).flatten(1).sum(1)[:, None, None, None] / n
    tm = (t * w).flatten(1).sum(1)[:, None, None, None] / n
    cov = ((r - rm) * (t - tm) * w).flatten(1).sum(1)[:, None, None, None]
    var = ((r - rm).square() * w).flatten(1).sum(1)[:, None, None, None]
    a = torch.where(var > 1e-12, cov / var.clamp(min=1e-12), torch.zeros_like(var)).clamp(min=0)
    return (a * (r - rm) + tm).clamp(0, 1)


@torch.no_grad()
def body_ncc(x: torch.Tensor, y: torch.Tensor, body: torch.Tensor | None = None) -> torch.Tensor:
    """Pearson correlation of x and y over body pixels: [B, 1, H, W] x2 -> [B] in [-1, 1].

    Invariant to any affine change of either image with a positive scale; a constant image scores 0.
    ``body`` defaults to :func:`body_mask` of ``y``.
    """
    body = body_mask(y) if body is None else body
    w = body.float().flatten(1)
    n = w.sum(1).clamp(min=1)
    xf, yf = x.float().flatten(1), y.float().flatten(1)
    xc = xf - (xf * w).sum(1, keepdim=True) / n[:, None]
    yc = yf - (yf * w).sum(1, keepdim=True) / n[:, None]
    num = (xc * yc * w).sum(1)
    vx, vy = (xc.square() * w).sum(1), (yc.square() * w).sum(1)
    # A constant image (up to float rounding of its mean) has no correlation with anything.
    flat = (vx / n < 1e-10) | (vy / n < 1e-10)
    den = torch.sqrt(vx * vy).clamp(min=1e-30)
    return torch.where(flat, torch.zeros_like(num), num / den)


@torch.no_grad()
def aligned_metrics(recon: torch.Tensor, truth: torch.Tensor) -> dict[str, list[float]]:
    """Scale-fair metrics: ``aligned_body_ssim``, ``aligned_psnr`` (dB) after :func:`affine_align`,
    and ``ncc`` (:func:`body_ncc`). recon, truth [B, 1, H, W] -> name -> [B] lists."""
    al = affine_align(recon, truth)
    return {
        "aligned_body_ssim": body_ssim(al, truth).tolist(),
        "aligned_psnr": psnr_per_sample(al, truth).tolist(),
        "ncc": body_ncc(recon, truth).tolist(),
    }


def similar_mask_pool(
    masks: torch.Tensor, pool_masks: torch.Tensor, size: int = 20, exclude: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices of the ``size`` pool slices whose organ masks best match each mask (Dice).

    Identification among these cannot succeed from the labels alone: the distractors have the
    attacked slice's mask shape, so a reconstruction that is only its mask ranks the truth near
    chance. Args: masks [B, H, W]; pool_masks [N, H, W]; exclude: bool [B, N] entries never chosen
    (e.g. the same patient). Returns: [B, size] int64.
    """
    tm = masks.reshape(masks.shape[0], -1).float()
    pm = pool_masks.reshape(pool_masks.shape[0], -1).float()
    dice = 2 * (tm @ pm.T) / (tm.sum(1, keepdim=True) + pm.sum(1)[None]).clamp(min=1)
    if exclude is not None:
        dice = dice.masked_fill(exclude, -1.0)
    if size > pm.shape[0]:
        raise ValueError(f"pool of {pm.shape[0]} slices is smaller than size={size}")
    return dice.topk(size, dim=1).indices


@torch.no_grad()
def identification_ranks(recon: torch.Tensor, truth: torch.Tensor, distractors: torch.Tensor) -> list[int]:
    """Rank of the true slice among itself and its distractors by NCC to the reconstruction.

    Each candidate c (the truth and every distractor) is scored by :func:`body_ncc` of the
    reconstruction with c over c's own body; rank 0 means the truth scored highest (top-1
    identification). Ties count against the attack (the truth is ranked below equal scores).

    Args:
        recon, truth: [B, 1, H, W]; distractors: [B, P, 1, H, W] (other patients' slices).
    Returns: [B] ranks in 0..P (chance of rank 0 is 1 / (P + 1)).
    """
    ranks = []
    for i in range(recon.shape[0]):
        cands = torch.cat([truth[i : i + 1], distractors[i]], 0)  # [P + 1, 1, H, W]
        s = body_ncc(recon[i : i + 1].expand_as(cands), cands)
        ranks.append(int((s[1:] >= s[0]).sum()))
    return ranks


def identification_summary(ranks: list[int], pool_size: int, alpha: float = 0.05) -> dict[str, float]:
    """Top-1 rate of :func:`identification_ranks` with its Clopper-Pearson (1 - alpha) interval.

    ``pool_size`` is the number of distractors P; ``chance`` = 1 / (P + 1).
    Returns: {"top1", "top1_low", "top1_high", "chance", "mean_rank", "n"}.
    """
    from fastdp.attacks.audit import clopper_pearson

    k, n = sum(r == 0 for r in ranks), len(ranks)
    lo, hi = clopper_pearson(k, n, alpha)
    return {
        "top1": k / n,
        "top1_low": lo,
        "top1_high": hi,
        "chance": 1.0 / (pool_size + 1),
        "mean_rank": sum(ranks) / n,
        "n": n,
    }
