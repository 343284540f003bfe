"""Gradient inversion: reconstruct training images (and masks) from what a site shares.

Threat model: an honest-but-curious server that knows the global model (architecture and
weights), the loss, the site's local optimiser settings (SGD learning rate and number of local
steps) and sees the site's shared object: a one-step gradient or a multi-step update
``delta = local - global`` (:class:`fastdp.federated.SiteUpdate.delta`). It searches for a
candidate batch (images x' in [0, 1], masks m') whose simulated gradient or update matches the
observed one:

* ``objective="cosine"`` — Inverting Gradients (Geiping et al. 2020): 1 - cosine similarity of
  the (layer-weighted) gradients over all layers, plus ``tv_weight`` * total variation of x',
  minimised with Adam on the *signs* of the gradients, a box constraint [0, 1], a step
  learning-rate decay and several restarts (the best by final objective is kept).
* ``objective="l2"`` — Deep Leakage from Gradients (Zhu et al. 2019): squared L2 distance of the
  gradients, usually with L-BFGS (``optimizer="lbfgs"``).

For a multi-step update the local SGD steps are unrolled with ``torch.func.functional_call``
(Geiping's FedAvg variant) so the candidate is scored on the update it would produce, not on one
gradient. With ``max_grad_norm`` the simulation also clips each candidate sample's gradient as
DP-SGD does (the server knows C); the noise is the one thing it cannot simulate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fastdp.attacks.surrogate import smooth_surrogate

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def soft_dice_ce(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Per-sample soft Dice + cross-entropy that accepts soft (probability) targets.

    Equals :func:`fastdp.models.per_sample_loss` (MONAI Dice with softmax over all classes,
    ``batch=False``, smooth 1e-5, plus pixel-mean cross-entropy) when ``target`` is one-hot, and
    stays differentiable in ``target`` so a mask can be optimised jointly with the image.

    Args:
        logits: [B, C, H, W].
        target: class probabilities [B, C, H, W] (one-hot for a known mask).
    Returns: [B] per-sample losses.
    """
    p = logits.softmax(1)
    dims = tuple(range(2, logits.dim()))
    inter = (p * target).sum(dims)
    denom = p.sum(dims) + target.sum(dims)
    dice = 1.0 - (2.0 * inter + smooth) / (denom + smooth)  # [B, C]
    ce = -(target * logits.log_softmax(1)).sum(1)  # [B, H, W]
    return dice.mean(1) + ce.reshape(logits.shape[0], -1).mean(1)


def layer_weights_geometric(names: Sequence[str], decay: float) -> dict[str, float]:
    """Weights ``decay**i`` for the i-th parameter (in model order): decay < 1 favours the first layers.

    The first layers see the input at full resolution, so their gradients carry most of the image;
    the deep layers of a U-Net mostly carry the label.
    """
    return {n: float(decay**i) for i, n in enumerate(names)}


def _resolve_layer_weights(
    layer_weights: Mapping[str, float] | str | None, names: Sequence[str], target: Sequence[torch.Tensor]
) -> Mapping[str, float]:
    """``"inverse_norm"``: w_l = 1 / ||g_l|| of the shared gradient (every layer's direction counts
    about equally in the one cosine, not just the first block's large-norm layers); a mapping as
    given; None: all 1."""
    if layer_weights is None:
        return {}
    if isinstance(layer_weights, str):
        if layer_weights != "inverse_norm":
            raise ValueError(f"layer_weights must be a mapping, None or 'inverse_norm', got {layer_weights!r}")
        return {n: 1.0 / (float(t.norm()) + 1e-12) for n, t in zip(names, target, strict=True)}
    return layer_weights


@dataclass
class InversionResult:
    """Output of :func:`invert_gradients`.

    Attributes:
        images: best reconstruction [B, C_in, H, W] in [0, 1].
        mask_probs: class probabilities of the reconstructed masks [B, num_classes, H, W]
            (the given one-hot masks when the mask was known).
        loss: final objective of the best restart (gradient-matching term + prior).
        losses: final objective of every restart.
        history: (iteration, objective) pairs of the best restart, every ``log_every`` iterations.
        seconds: wall time of the whole attack (all restarts).
    """

    images: torch.Tensor
    mask_probs: torch.Tensor
    loss: float
    losses: list[float] = field(default_factory=list)
    history: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0


class PCAImagePrior:
    """A CT image prior: images as the mean plus a few principal components of reference slices.

    The attacker fits it on public CT slices (other patients, another scanner); the inversion
    then searches over ``components`` coefficients instead of every pixel, which turns an
    under-determined problem (4096 pixels, a gradient blind to some directions) into a
    well-posed one. The mean image is itself a guess that needs no gradient: score attacks that
    use a prior against it (``fastdp.attacks.metrics.trivial_guesses(..., reference_mean=...)``).

    Args:
        reference: [N, C, H, W] reference images in [0, 1] (not the attacked ones).
        components: number K of principal components kept (at most N).

    Coefficients are whitened: ``decode(z)`` with z ~ N(0, I) has the reference's spread.
    """

    def __init__(self, reference: torch.Tensor, components: int = 64):
        flat = reference.detach().float().flatten(1)
        if components > flat.shape[0]:
            raise ValueError(f"components={components} > number of reference images {flat.shape[0]}")
        self.shape = tuple(reference.shape[1:])
        self.mean = flat.mean(0)
        _, s, vh = torch.linalg.svd(flat - self.mean, full_matrices=False)
        # Rows of `basis` are principal directions times the reference's std along them.
        self.basis = vh[:components] * (s[:components, None] / math.sqrt(max(flat.shape[0] - 1, 1)))
        self.components = components

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Coefficients [B, K] -> images [B, C, H, W] (not clamped)."""
        return (self.mean + z @ self.basis).reshape(z.shape[0], *self.shape)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] -> least-squares coefficients [B, K]."""
        r = images.float().flatten(1) - self.mean
        return torch.linalg.lstsq(self.basis.T, r.T).solution.T

    def mean_image(self) -> torch.Tensor:
        """The reference mean [C, H, W]: the prior's guess before seeing any gradient."""
        return self.mean.reshape(self.shape).clone()


def _trainable(model: nn.Module, state: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """The attacked parameters (trainable ones, in model order), detached, from ``state`` if given."""
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            out[n] = (state[n] if state is not None else p).detach().clone()
    return out


def simulate_update(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    local_steps: int = 1,
    local_lr: float = 1.0,
    max_grad_norm: float | None = None,
    criterion: Criterion = soft_dice_ce,
    create_graph: bool = True,
    local_optimizer: Literal["sgd", "adam"] = "sgd",
) -> dict[str, torch.Tensor]:
    """What a site would share for this batch: the gradient (1 step) or the SGD update (several).

    With ``local_steps == 1`` it returns the mean gradient g (the update is ``-local_lr * g``);
    with more it returns the update ``delta = theta_K - theta_0`` of ``local_steps`` plain SGD
    steps on the same full batch, differentiable in ``images`` and ``targets`` (the steps are
    unrolled, so the cost is about ``local_steps`` times a one-step attack).

    Args:
        model: the architecture (its own parameters are not used).
        params: name -> tensor of the trainable parameters at the global model.
        images: [B, C_in, H, W]; targets: [B, num_classes, H, W] class probabilities.
        local_steps, local_lr: the site's local SGD (no momentum).
        max_grad_norm: clip each sample's gradient to this L2 norm, then average (DP-SGD without
            noise); None: plain mean gradient.
        criterion: per-sample loss ``(logits, target_probs) -> [B]``.
        create_graph: keep the graph for a backward through the result.
        local_optimizer: ``"sgd"`` (plain) or ``"adam"`` (torch.optim.Adam's defaults: betas 0.9,
            0.999, eps 1e-8, bias-corrected, fresh state): with Adam the result is always the update
            ``delta``, also for one step (Adam's first step is about ``-local_lr * sign(g)``).
    Returns: name -> tensor with the parameters' shapes.
    """
    names = list(params)
    theta = dict(params)
    if local_optimizer == "adam":
        m = {n: torch.zeros_like(t) for n, t in theta.items()}
        v = {n: torch.zeros_like(t) for n, t in theta.items()}
        for k in range(1, local_steps + 1):
            grads = _batch_gradient(model, theta, names, images, targets, max_grad_norm, criterion, create_graph)
            new = {}
            for n, g in zip(names, grads, strict=True):
                m[n] = 0.9 * m[n] + 0.1 * g
                v[n] = 0.999 * v[n] + 0.001 * g * g
                # sqrt of v + tiny: differentiable where a gradient entry is exactly 0.
                denom = torch.sqrt(v[n] / (1 - 0.999**k) + 1e-30) + 1e-8
                new[n] = theta[n] - local_lr * (m[n] / (1 - 0.9**k)) / denom
            theta = new
        return {n: theta[n] - params[n] for n in names}
    if local_optimizer != "sgd":
        raise ValueError(f"local_optimizer must be 'sgd' or 'adam', got {local_optimizer!r}")
    for _ in range(local_steps):
        grads = _batch_gradient(model, theta, names, images, targets, max_grad_norm, criterion, create_graph)
        if local_steps == 1:
            return dict(zip(names, grads, strict=True))
        theta = {n: theta[n] - local_lr * g for n, g in zip(names, grads, strict=True)}
    return {n: theta[n] - params[n] for n in names}


def _batch_gradient(model, theta, names, images, targets, max_grad_norm, criterion, create_graph):
    tensors = [theta[n] for n in names]
    if not create_graph:
        tensors = [t.detach().requires_grad_(True) for t in tensors]
    elif not all(t.requires_grad for t in tensors):
        tensors = [t if t.requires_grad else t.detach().requires_grad_(True) for t in tensors]
    call = dict(zip(names, tensors, strict=True))
    if max_grad_norm is None:
        loss = criterion(functional_call(model, call, (images,)), targets).mean()
        return torch.autograd.grad(loss, tensors, create_graph=create_graph)
    # Per-sample gradients, each clipped to max_grad_norm, then averaged: DP-SGD without its noise.
    total = None
    b = images.shape[0]
    for i in range(b):
        loss = criterion(functional_call(model, call, (images[i : i + 1],)), targets[i : i + 1]).sum()
        g = torch.autograd.grad(loss, tensors, create_graph=create_graph)
        norm = torch.sqrt(sum(x.square().sum() for x in g))
        c = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0)
        g = [c * x / b for x in g]
        total = g if total is None else [a + x for a, x in zip(total, g, strict=True)]
    return total


def recover_linear_input(weight_grad: torch.Tensor, bias_grad: torch.Tensor, min_ratio: float = 1e-3) -> torch.Tensor:
    """Analytic recovery of a fully connected layer's input from its weight and bias gradients.

    For one sample, y = W x + b gives dL/dW = (dL/dy) x^T and dL/db = dL/dy, so every row i with
    dL/db_i != 0 holds x exactly: x = dL/dW_i / dL/db_i. Averaging the rows weighted by
    |dL/db_i| (rows below ``min_ratio`` of the largest are dropped) reduces rounding error. With a
    batch it returns a mix of the samples' inputs. A convolution's bias gives only weighted patch
    averages, and fastdp's U-Nets have no bias in their first convolution, so this applies to
    fully connected first layers only.

    Args:
        weight_grad: [out, in]; bias_grad: [out].
    Returns: [in], the recovered input.
    """
    scale = bias_grad.abs()
    keep = scale >= min_ratio * scale.max()
    rows = weight_grad[keep] / bias_grad[keep, None]
    w = scale[keep] / scale[keep].sum()
    return (w[:, None] * rows).sum(0)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (anisotropic TV): [B, C, H, W] -> scalar."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def gradient_distance(
    candidate: Sequence[torch.Tensor],
    target: Sequence[torch.Tensor],
    weights: Sequence[float],
    objective: Literal["cosine", "layer_cosine", "l2"],
) -> torch.Tensor:
    """Distance between two gradients given layer by layer.

    ``cosine``: 1 - <g', g>_w / (||g'||_w ||g||_w) with <a, b>_w = sum_l w_l <a_l, b_l> (one
    cosine over all layers, Geiping et al.); ``layer_cosine``: sum_l w_l (1 - cos(g'_l, g_l)) /
    sum_l w_l (each layer's direction counts equally, whatever its norm); ``l2``: sum_l w_l ||g'_l - g_l||^2 (DLG).
    Returns a scalar tensor (differentiable in ``candidate``).
    """
    if objective == "cosine":
        dot = cand_sq = targ_sq = 0.0
        for c, t, w in zip(candidate, target, weights, strict=True):
            if w == 0:
                continue
            dot = dot + w * (c * t).sum()
            cand_sq = cand_sq + w * c.square().sum()
            targ_sq = targ_sq + w * t.square().sum()
        return 1.0 - dot / (torch.sqrt(cand_sq) * math.sqrt(float(targ_sq)) + 1e-12)
    if objective == "layer_cosine":
        # Mean of per-layer cosine distances: every layer counts, not just the few with the largest
        # gradient norm (on unet_small the first block's norms dominate one global cosine yet barely
        # tell slices apart, while the deep blocks' directions do: docs/attacks.md).
        out, total = 0.0, 0.0
        for c, t, w in zip(candidate, target, weights, strict=True):
            tn = float(t.norm())
            if w == 0 or tn == 0:
                continue
            out = out + w * (1.0 - (c * t).sum() / (c.norm() * tn + 1e-12))
            total += w
        return out / max(total, 1e-12)
    if objective == "l2":
        out = 0.0
        for c, t, w in zip(candidate, target, weights, strict=True):
            if w:
                out = out + w * (c - t).square().sum()
        return out
    raise ValueError(f"objective must be 'cosine', 'layer_cosine' or 'l2', got {objective!r}")


@torch.no_grad()
def rank_references(
    model: nn.Module,
    shared: Mapping[str, torch.Tensor],
    references: torch.Tensor,
    masks: torch.Tensor,
    *,
    num_classes: int = 2,
    global_state: Mapping[str, torch.Tensor] | None = None,
    shared_kind: Literal["gradient", "update"] = "gradient",
    local_steps: int = 1,
    local_lr: float = 1.0,
    max_grad_norm: float | None = None,
    objective: Literal["cosine", "layer_cosine", "l2"] = "cosine",
    layer_weights: Mapping[str, float] | str | None = None,
    criterion: Criterion = soft_dice_ce,
    local_optimizer: Literal["sgd", "adam"] = "sgd",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient-guided retrieval: scores every reference image as the one image behind ``shared``.

    An attacker with public CT slices (other patients, another scanner) simulates each one's
    gradient or update under the known mask and ranks them by the distance to the shared one;
    the best match is a starting point (``invert_gradients(init=...)``) or a reconstruction of its
    own. Single-image updates only (batch size 1).

    Args:
        references: [N, C_in, H, W] candidate images in [0, 1].
        masks: the attacked sample's known mask [1, H, W] (or [H, W]).
        Other arguments as in :func:`invert_gradients`.
    Returns: (distances [N], indices [N] sorting them, best first). Cost: N gradient evaluations.
    """
    params = _trainable(model, global_state)
    names = list(params)
    unroll = shared_kind == "update" and (local_steps > 1 or local_optimizer != "sgd")
    if shared_kind == "update" and not unroll:
        target = [-shared[n].detach().float() / local_lr for n in names]
    else:
        target = [shared[n].detach().float() for n in names]
    lw = _resolve_layer_weights(layer_weights, names, target)
    weights = [float(lw.get(n, 1.0)) for n in names]
    probs = F.one_hot(masks.reshape(1, *references.shape[-2:]).long(), num_classes).movedim(-1, 1).float()
    dists = torch.empty(references.shape[0])
    with torch.enable_grad():
        for i in range(references.shape[0]):
            cand = simulate_update(
                model,
                params,
                references[i : i + 1].float(),
                probs,
                local_steps=local_steps if unroll else 1,
                local_lr=local_lr,
                max_grad_norm=max_grad_norm,
                criterion=criterion,
                create_graph=unroll,
                local_optimizer=local_optimizer if unroll else "sgd",
            )
            dists[i] = float(gradient_distance([cand[n].detach() for n in names], target, weights, objective))
    return dists, dists.argsort()


def _smoothing_stages(
    model: nn.Module, smoothing: Sequence[float] | None, iterations: int
) -> list[tuple[nn.Module, int]]:
    """(network, iterations) per stage of a sharpness schedule: the iterations split evenly (the
    last stages get the remainder); beta 0 or inf is the real network."""
    if not smoothing:
        return [(model, iterations)]
    betas = [float(b) for b in smoothing]
    if any(b < 0 or math.isnan(b) for b in betas):
        raise ValueError(f"smoothing sharpnesses must be > 0 (0 or inf: the real network), got {smoothing}")
    if iterations < len(betas):
        raise ValueError(f"iterations={iterations} is fewer than the {len(betas)} smoothing stages")
    base, extra = divmod(iterations, len(betas))
    counts = [base + (1 if i >= len(betas) - extra else 0) for i in range(len(betas))]
    return [
        (model if b == 0 or math.isinf(b) else smooth_surrogate(model, b), n)
        for b, n in zip(betas, counts, strict=True)
    ]


def _into_unit_box(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, H, W] mapped per image into [0, 1]: unchanged if it already lies there, else by the
    positive affine map of its min and max onto 0 and 1 (the gradient cannot see intensity scale, so
    an unconstrained search may leave the box; a clamp would cut off structure, this keeps it)."""
    flat = x.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    inside = (lo >= 0) & (hi <= 1)
    scaled = (flat - lo[:, None]) / (hi - lo).clamp(min=1e-12)[:, None]
    return torch.where(inside[:, None], flat, scaled).view_as(x)


def invert_gradients(
    model: nn.Module,
    shared: Mapping[str, torch.Tensor],
    *,
    image_shape: tuple[int, ...],
    num_images: int = 1,
    num_classes: int = 2,
    masks: torch.Tensor | None = None,
    global_state: Mapping[str, torch.Tensor] | None = None,
    shared_kind: Literal["gradient", "update"] = "gradient",
    local_steps: int = 1,
    local_lr: float = 1.0,
    max_grad_norm: float | None = None,
    objective: Literal["cosine", "layer_cosine", "l2"] = "cosine",
    optimizer: Literal["adam", "lbfgs"] = "adam",
    iterations: int = 1000,
    lr: float = 0.1,
    tv_weight: float = 0.1,
    layer_weights: Mapping[str, float] | str | None = "inverse_norm",
    restarts: int = 1,
    signed: bool = True,
    lr_decay: bool = True,
    init: Literal["random", "grey"] | torch.Tensor = "random",
    criterion: Criterion = soft_dice_ce,
    prior: PCAImagePrior | None = None,
    prior_weight: float = 0.0,
    noise_std: float = 0.0,
    intensity: tuple[float, float] | None = None,
    downsample: int = 1,
    local_optimizer: Literal["sgd", "adam"] = "sgd",
    smoothing: Sequence[float] | None = None,
    seed: int = 0,
    log_every: int = 100,
    callback: Callable[[int, int, float], None] | None = None,
) -> InversionResult:
    """Reconstructs a site's training batch from its shared gradient or update.

    Args:
        model: the global model's architecture; its parameters are the global model unless
            ``global_state`` is given.
        shared: name -> tensor as the site shares it: a gradient (``shared_kind="gradient"``) or an
            update ``local - global`` (``"update"``, e.g. ``SiteUpdate.delta``). Keys that are not
            trainable parameters (buffers) are ignored.
        image_shape: (C_in, H, W) of one image.
        num_images: batch size B to reconstruct (the attacker knows it, e.g. from num_samples).
        num_classes: segmentation classes.
        masks: the known masks [B, H, W] int (attacker knows the labels); None: optimised
            jointly as soft logits.
        global_state: the global model's state dict (default: the model's current parameters).
        shared_kind: see ``shared``. An update of one SGD step is turned into a gradient
            (g = -delta / local_lr); with ``local_steps > 1`` the local steps are unrolled.
        local_steps, local_lr: the site's local SGD steps and learning rate.
        max_grad_norm: simulate DP-SGD's per-sample clipping to C in the candidate's gradient.
        objective: "cosine" (Inverting Gradients) or "l2" (DLG).
        optimizer: "adam" (on signed gradients when ``signed``) or "lbfgs".
        iterations: optimisation steps per restart (L-BFGS: outer steps of up to 20 evaluations).
        lr: initial step size (Adam: about 0.1 for signed steps in [0, 1] images).
        tv_weight: weight of the total-variation prior on the image.
        layer_weights: name -> weight of each layer's term (missing names weigh 1; 0 drops it);
            ``"inverse_norm"`` (the default): 1 / ||g_l|| of the shared gradient per layer, so the
            one cosine is not decided by the first block's few large-norm layers, which barely tell
            slices apart on unet_small (docs/attacks.md); None: all 1 (Geiping et al.'s plain cosine).
        restarts: independent random starts; the one with the lowest final objective is kept.
        signed: Adam sees sign(gradient) (Geiping et al.); False: raw gradients.
        lr_decay: multiply the learning rate by 0.1 at 3/8, 5/8 and 7/8 of the iterations.
        init: "random" (uniform [0, 1]), "grey" (0.5 plus small noise) or a tensor [B, C_in, H, W] of
            starting images (e.g. a prior's mean; restarts after the first add noise of std 0.05).
        criterion: the site's per-sample loss ``(logits, target_probs [B, K, H, W]) -> [B]``.
        prior: search images as ``prior.decode(z)`` (a :class:`PCAImagePrior`) instead of pixels;
            the start is the prior's mean (restart 0) or a random draw from it (later restarts).
        prior_weight: weight of ``mean(z**2)`` (a Gaussian prior on the coefficients).
        noise_std: add fresh Gaussian pixel noise of this std to the candidate before every
            gradient simulation, so the search explains the gradient with a clean image plus
            scanner-like noise instead of fitting one noise pattern (0: off). The returned image
            is the clean one.
        smoothing: a schedule of sharpnesses beta (e.g. ``(3, 10, 30)``): the iterations are split
            evenly over the stages and in each the candidate's gradient is simulated through
            :func:`fastdp.attacks.surrogate.smooth_surrogate` (PReLU / ReLU / max-pool kinks softened;
            the shared gradient is still the real network's). The real network's gradient is a
            discontinuous function of the image, which stalls the search (docs/attacks.md); a stage
            of ``0`` or ``inf`` uses the real network. None or empty: the real network throughout.
            With L-BFGS and a schedule the image is not clamped between steps (a clamp breaks the
            curvature pairs); the result is mapped affinely into [0, 1] if it left it.
        seed: seeds the starting points.
        log_every: history sampling interval (iterations).
        callback: called as ``callback(restart, iteration, objective)`` every ``log_every``.
    Returns: :class:`InversionResult` with images [B, C_in, H, W] in [0, 1] and mask probabilities.
    """
    if shared_kind not in ("gradient", "update"):
        raise ValueError(f"shared_kind must be 'gradient' or 'update', got {shared_kind!r}")
    if local_steps < 1:
        raise ValueError(f"local_steps must be >= 1, got {local_steps}")
    if shared_kind == "gradient" and local_steps != 1:
        raise ValueError("a shared gradient is one step: use shared_kind='update' for local_steps > 1")
    params = _trainable(model, global_state)
    names = [n for n in params if n in shared]
    missing = [n for n in params if n not in shared]
    if missing:
        raise KeyError(f"shared object lacks trainable parameters {missing[:5]}")
    params = {n: params[n] for n in names}
    # What is compared: a gradient (one step, cosine is scale-free; the L2 objective needs the true
    # scale, hence -delta / lr) or the unrolled multi-step update.
    if shared_kind == "update" and local_steps == 1 and local_optimizer == "sgd":
        target = [-shared[n].detach().float() / local_lr for n in names]
        unroll = False
    else:
        target = [shared[n].detach().float() for n in names]
        unroll = shared_kind == "update"
    lw = _resolve_layer_weights(layer_weights, names, target)
    weights = [float(lw.get(n, 1.0)) for n in names]
    stages = _smoothing_stages(model, smoothing, iterations)
    box_each_step = optimizer == "adam" or not smoothing
    dev = target[0].device
    known = masks is not None
    if known:
        if masks.shape[0] != num_images:
            raise ValueError(f"masks has {masks.shape[0]} entries for num_images={num_images}")
        mask_probs = F.one_hot(masks.long().to(dev), num_classes).movedim(-1, 1).float()

    start = time.perf_counter()
    best: InversionResult | None = None
    losses = []
    for r in range(restarts):
        gen = torch.Generator().manual_seed(1_000_003 * (seed + 1) + r)
        shape = (num_images, image_shape[0], *(s // downsample for s in image_shape[1:]))
        if prior is not None:
            z = (0.0 if r == 0 else 0.5) * torch.randn(num_images, prior.components, generator=gen)
            x = z.to(dev).requires_grad_(True)  # the optimised variable; images are decode(z)
        elif isinstance(init, torch.Tensor):
            x0 = init.detach().float()
            if downsample > 1:
                x0 = F.avg_pool2d(x0, downsample)
            x0 = x0.expand(shape) + (0.05 * torch.randn(shape, generator=gen) if r else 0.0)
            x = x0.clamp(0, 1).to(dev).requires_grad_(True)
        elif init == "grey":
            x = (0.5 + 0.05 * torch.randn(shape, generator=gen)).clamp(0, 1).to(dev).requires_grad_(True)
        else:
            x = torch.rand(shape, generator=gen).to(dev).requires_grad_(True)
        variables = [x]
        if not known:
            logits = (0.1 * torch.randn((num_images, num_classes, *image_shape[1:]), generator=gen)).to(dev)
            logits.requires_grad_(True)
            variables.append(logits)

        def to_images(v=x):
            if downsample > 1:
                # A coarse search grid: fewer unknowns than the gradient's effective rank, and none in the
                # high frequencies the gradient cannot pin down (the scanner noise).
                v = F.interpolate(v, scale_factor=downsample, mode="bilinear", align_corners=False)
            if prior is not None:
                return prior.decode(v).clamp(0, 1)
            if intensity is not None:
                # Fixed intensity scale: the gradient cannot see x -> a x, so the search may not move
                # along it (TV would shrink contrast to grey for free); mean and std come from public CT.
                c = v - v.mean((1, 2, 3), keepdim=True)
                c = c / (c.square().mean((1, 2, 3), keepdim=True).sqrt() + 1e-8)
                return (intensity[0] + intensity[1] * c).clamp(0, 1)
            return v

        def objective_fn(x=x, variables=variables, net=model):
            probs = mask_probs if known else variables[1].softmax(1)
            images = to_images(x)
            seen = images + noise_std * torch.randn_like(images) if noise_std else images
            cand = simulate_update(
                net,
                params,
                seen,
                probs,
                local_steps=local_steps if unroll else 1,
                local_lr=local_lr,
                max_grad_norm=max_grad_norm,
                criterion=criterion,
                local_optimizer=local_optimizer if unroll else "sgd",
            )
            out = gradient_distance([cand[n] for n in names], target, weights, objective)
            if tv_weight:
                out = out + tv_weight * total_variation(images)
            if prior is not None and prior_weight:
                out = out + prior_weight * x.square().mean()
            return out

        history = []
        if optimizer not in ("adam", "lbfgs"):
            raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
        it = 0
        if optimizer == "adam":
            # One Adam state and one step schedule over all stages: a surrogate changes the
            # objective slightly, not the scale of its gradient.
            opt = torch.optim.Adam(variables, lr=lr)
            milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)] if lr_decay else []
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        for net, stage_iterations in stages:
            if optimizer == "lbfgs":
                # A fresh history per stage: curvature pairs of another surrogate would mislead it.
                opt = torch.optim.LBFGS(variables, lr=lr, max_iter=20, history_size=100, line_search_fn="strong_wolfe")

                def closure(opt=opt, objective_fn=objective_fn, net=net):
                    opt.zero_grad(set_to_none=True)
                    loss = objective_fn(net=net)
                    loss.backward()
                    return loss

            for _ in range(stage_iterations):
                if optimizer == "adam":
                    opt.zero_grad(set_to_none=True)
                    loss = objective_fn(net=net)
                    loss.backward()
                    if signed:
                        for v in variables:
                            v.grad.sign_()
                    opt.step()
                    sched.step()
                else:
                    loss = opt.step(closure)
                if prior is None and intensity is None and box_each_step:
                    with torch.no_grad():
                        x.clamp_(0, 1)
                if it % log_every == 0 or it == iterations - 1:
                    history.append((it, float(loss.detach())))
                    if callback is not None:
                        callback(r, it, history[-1][1])
                it += 1
        if not box_each_step and prior is None and intensity is None:
            with torch.no_grad():
                x.copy_(_into_unit_box(x))
        # The objective differentiates the candidate's loss, so it needs autograd even here.
        final = float(objective_fn().detach())
        if not math.isfinite(final):
            final = math.inf
        losses.append(final)
        if best is None or final < best.loss:
            probs = mask_probs if known else variables[1].detach().softmax(1)
            best = InversionResult(to_images(x).detach().clone(), probs.detach().clone(), final, history=history)
    best.losses = losses
    best.seconds = time.perf_counter() - start
    return best
