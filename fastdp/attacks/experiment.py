"""The attack experiment: invert the non-private and the DP update of the same CT slices.

One global model (a lightly trained ``unet_small``), one site batch (1 or 4 phantom slices),
the update that site would send without DP and with DP-SGD at several noise multipliers (same
batch, same clipping bound), the same attack on each, metrics against the truth next to the
trivial guesses, a PNG grid and timings.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastdp.accounting import compute_epsilon
from fastdp.attacks.inversion import invert_gradients, rank_references
from fastdp.attacks.metrics import (
    best_trivial,
    identification_ranks,
    identification_summary,
    reconstruction_metrics,
    similar_mask_pool,
    trivial_guess_metrics,
    trivial_guesses,
)
from fastdp.data import PhantomDataset
from fastdp.engine import PrivacyEngine
from fastdp.federated import DPConfig, Site
from fastdp.models import build_model, dice_ce_criterion
from fastdp.models.batchnorm_unet import bn_unet_small, calibrate_batchnorm, freeze_batchnorm, to_groupnorm
from fastdp.noise import ReproducibleNoiseWarning


def pretrain(
    model: nn.Module, images: torch.Tensor, masks: torch.Tensor, steps: int, batch_size: int = 8, lr: float = 3e-3
) -> nn.Module:
    """Lightly trains ``model`` in place (Adam, Dice+CE) on images [N, 1, H, W], masks [N, H, W].

    A server attacks a model that has trained for a while, and an untrained net's gradients
    carry less of the image (measured in the issue); a few dozen steps are enough for that.
    """
    crit = dice_ce_criterion()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        opt.zero_grad(set_to_none=True)
        crit(model(images[idx]), masks[idx]).backward()
        opt.step()
    return model


def site_update(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    noise_multiplier: float | None = None,
    max_grad_norm: float = 1.0,
    local_steps: int = 1,
    lr: float = 0.1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """What a site holding exactly this batch sends: ``delta = local - global`` after local SGD.

    Every local step uses the whole batch (a site whose data is the batch, Poisson rate 1), plain
    SGD without momentum, the Dice+CE criterion. ``noise_multiplier=None`` trains without DP;
    otherwise through ``fastdp.PrivacyEngine`` (per-sample clipping to ``max_grad_norm``, noise
    std ``noise_multiplier * max_grad_norm``, divided by the batch size): exactly the DP-SGD step
    of a fastdp site. The model is not modified.

    Args:
        model: the global model.
        images: [B, 1, H, W] in [0, 1]; masks: [B, H, W] int.
        local_steps, lr: the site's local SGD.
        seed: the DP noise seed.
    Returns: name -> delta for every floating-point entry of ``model.state_dict()``.
    """
    local = plain = copy.deepcopy(model)  # plain: the model's own keys (a private model's have "_module.")
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(local.parameters(), lr=lr)
    crit = dice_ce_criterion()
    loader = DataLoader(TensorDataset(images, masks), batch_size=images.shape[0])
    if noise_multiplier is not None:
        engine = PrivacyEngine(seed=seed)
        local, opt, loader = engine.make_private(
            module=local,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,  # rate 1: every step takes the whole batch, as a one-batch site does
        )
    for _ in range(local_steps):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            crit(local(x), y).backward()
            opt.step()
    state = plain.state_dict()
    return {k: (state[k] - v).detach() for k, v in global_state.items() if v.is_floating_point()}


def federated_site_update(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    noise_multiplier: float | None = None,
    max_grad_norm: float = 1.0,
    local_steps: int = 1,
    lr: float = 0.1,
    seed: int = 0,
    optimizer: str = "sgd",
) -> dict[str, torch.Tensor]:
    """:func:`site_update` through ``fastdp.federated.Site.local_update`` (``SiteUpdate.delta``).

    The site holds exactly this batch, takes ``local_steps`` plain-SGD steps with expected
    batch size B (Poisson rate 1: the whole batch each step) and DP-SGD when ``noise_multiplier``
    is set (:func:`site_update` computes the same update with the engine directly).
    ``optimizer``: the site's local optimiser ("sgd", or "adam" as in the demo config).
    """
    # Seeded noise keeps the attack experiment repeatable; the attack never uses the seed, so this
    # does not help it (a deployed site draws its seed from the CSPRNG, docs/privacy.md).
    dp = (
        None
        if noise_multiplier is None
        else DPConfig(noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, reproducible_noise=True)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReproducibleNoiseWarning)
        site = Site(
            "attacked",
            TensorDataset(images, masks),
            None,
            lambda: copy.deepcopy(model),
            batch_size=images.shape[0],
            local_steps=local_steps,
            lr=lr,
            optimizer=optimizer,
            dp=dp,
            seed=seed,
            planned_rounds=1,
        )
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return dict(site.local_update(global_state, 1).delta)


DEFAULT_ATTACK = {
    "objective": "cosine",
    "optimizer": "adam",
    "lr": 0.1,
    "tv_weight": 0.1,
    "restarts": 1,
    "init": "random",
    # Each layer's gradient weighted by 1 / its norm: on unet_small this beat the plain cosine with
    # scanner-like candidate noise (noise_std 0.05, TV 0.5), the previous best (docs/attacks.md).
    "layer_weights": "inverse_norm",
    "noise_std": 0.0,
}

#: Models the experiment builds by name besides :func:`fastdp.models.build_model`'s: the paper-like
#: BatchNorm U-Net attacked in eval mode (BatchNorm frozen to its running statistics, calibrated on
#: public site_b slices) and the GroupNorm conversion of the same weights.
ATTACK_MODELS = ("bn_unet_small", "bn_unet_small_gn")


def build_attack_model(name: str, seed: int = 0, size: int = 64) -> nn.Module:
    """The attacked global model by name, seeded (``seed``): a ``build_model`` name, or one of
    :data:`ATTACK_MODELS` (BatchNorm statistics from 64 public ``site_b`` slices of side ``size``)."""
    torch.manual_seed(seed)
    if name not in ATTACK_MODELS:
        return build_model(name)
    bn = calibrate_batchnorm(bn_unet_small(), PhantomDataset("site_b", 64, size, seed + 1).tensors()[0])
    return freeze_batchnorm(bn) if name == "bn_unet_small" else to_groupnorm(bn)


def identification_pool(
    masks: torch.Tensor, size: int, pool_size: int = 20, candidates: int = 400, site: str = "site_a", seed: int = 0
) -> torch.Tensor:
    """Distractor slices for identification: [B, pool_size, 1, size, size].

    For each mask [B, H, W] the ``pool_size`` slices (of ``candidates`` phantom slices of other
    patients of ``site``, indices 2000 on, so disjoint from the attacked ones) whose liver masks
    best match it: the labels alone cannot tell the truth from them.
    """
    px, pm = PhantomDataset(site, candidates, size, seed, start=2000).tensors()
    return px[similar_mask_pool(masks.long(), pm.long(), pool_size)]


def gradient_identification_rank(
    model: nn.Module,
    shared: Mapping[str, torch.Tensor],
    truth: torch.Tensor,
    mask: torch.Tensor,
    distractors: torch.Tensor,
    **kw,
) -> int:
    """Rank of the truth [1, 1, H, W] among itself and ``distractors`` [P, 1, H, W] by the distance of
    each candidate's simulated update to ``shared`` (:func:`fastdp.attacks.rank_references`): a
    server that holds a candidate set (e.g. a hospital's archive) asks which one was trained on.
    Ties count against the attack. kw go to ``rank_references``."""
    dists, _ = rank_references(model, shared, torch.cat([truth, distractors], 0), mask, **kw)
    return int((dists[1:] <= dists[0]).sum())


def _slices_with_organ(dataset, count: int, min_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = dataset.tensors()
    keep = [i for i in range(len(images)) if int(masks[i].sum()) >= min_pixels][:count]
    if len(keep) < count:
        raise ValueError(f"only {len(keep)} of {len(images)} slices have >= {min_pixels} organ pixels")
    return images[keep], masks[keep]


def _mean(v: Sequence[float]) -> float:
    v = [x for x in v if not math.isnan(x)]
    return sum(v) / len(v) if v else math.nan


def save_attack_grid(path: str | Path, truth: torch.Tensor, recons: dict[str, torch.Tensor], scores: dict) -> Path:
    """PNG grid: one row per image, columns truth then each reconstruction (titled with body SSIM).

    Args:
        truth: [B, 1, H, W] in [0, 1]; recons: column title -> [B, 1, H, W]; scores: title -> [B] body SSIM.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg as canvas_cls
        from matplotlib.figure import Figure as figure_cls
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the attack PNG needs matplotlib: pip install matplotlib") from exc
    cols = {"truth": truth, **recons}
    b = truth.shape[0]
    fig = figure_cls(figsize=(2.0 * len(cols), 2.1 * b))
    canvas_cls(fig)
    for i in range(b):
        for j, (name, imgs) in enumerate(cols.items()):
            ax = fig.add_subplot(b, len(cols), i * len(cols) + j + 1)
            ax.imshow(imgs[i, 0].detach().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if name in scores:
                ax.set_title(f"{name}\nbody SSIM {scores[name][i]:.2f}", fontsize=7)
            elif i == 0:
                ax.set_title(name, fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def run_attack_experiment(
    model: nn.Module | str | None = None,
    images: torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    *,
    out_dir: str | Path | None = "attack_out",
    batch_sizes: Sequence[int] = (1, 4),
    sigmas: Sequence[float] = (0.1, 1.0),
    max_grad_norm: float = 1.0,
    steps: int = 100,
    lr: float = 0.1,
    tv_weight: float = 0.1,
    restarts: int = 1,
    known_mask: bool = True,
    local_steps: int = 1,
    local_lr: float = 0.1,
    size: int = 64,
    pretrain_steps: int = 0,
    attack: Mapping | None = None,
    mode: str = "pixels",
    references: int = 256,
    top_k: int = 3,
    batches: int = 1,
    local_optimizer: str = "sgd",
    pool_size: int = 20,
    pool_candidates: int = 400,
    gradient_identification: bool = True,
    seed: int = 0,
    threads: int | None = 1,
    progress: bool = True,
) -> dict:
    """Attacks the non-private and the DP update of the same CT slices; scores, plots, times.

    For each batch size B the first B of ``images`` are one site's data. The update that site
    sends (``fastdp.federated.Site.local_update(...).delta`` when that package is present, else
    the same computation through ``fastdp.PrivacyEngine``; plain SGD, ``local_steps`` steps on
    the whole batch) is computed without DP and with DP-SGD at every ``sigmas`` value (clipping
    C = ``max_grad_norm``). The same attack (:func:`fastdp.attacks.invert_gradients`, same
    settings; on DP updates it also simulates the clipping, since the server knows C) runs on
    each. Metrics per image: body SSIM, SSIM, PSNR (dB), MSE (and mask Dice when the mask is
    optimised), next to the trivial guesses of :func:`fastdp.attacks.metrics.trivial_guesses`.

    Args:
        model: the global model (an ``nn.Module``, not modified), or a ``build_model`` name / None
            (``"unet_small"``): then built with ``seed`` and trained ``pretrain_steps`` Adam steps
            (batch 8) on 64 ``site_b`` phantom slices (0: the round-1 global model, untrained, which
            the pixel attack inverted best in docs/attacks.md).
        images: [N, 1, H, W] in [0, 1] with N >= max(batch_sizes); masks: [N, H, W] int. None:
            ``site_a`` phantom slices of side ``size`` with at least 64 liver pixels.
        out_dir: where ``attack_B{B}.png`` and ``attack_results.json`` go (None: nothing written).
        batch_sizes: images per attacked update.
        sigmas: DP noise multipliers (noise std sigma * C on the sum of clipped gradients). The
            non-private update is always attacked; 0 or None entries mean it and are not repeated.
        max_grad_norm: DP clipping bound C.
        steps: attack optimisation steps per update. More steps raise the NCC slowly (docs/attacks.md:
            0.23 at 150, 0.29 at 500, 0.38 at 2000 steps on one slice). One step costs about
            0.06-0.1 s at B = 1 and 0.3 s at B = 4, 64x64, ``unet_small``, one thread.
        lr, tv_weight, restarts: the attack's step size, total-variation weight and random restarts.
        known_mask: the attacker knows the masks; False optimises them jointly (soft logits).
        local_steps, local_lr: the site's local SGD; more than one step is attacked by unrolling.
        batches: disjoint batches attacked per batch size B (images ``[j B, (j + 1) B)``, each its own
            site update); the metrics pool all ``B * batches`` images.
        local_optimizer: the site's local optimiser, ``"sgd"`` or ``"adam"`` (the demo's; unrolled by
            the attack, :func:`fastdp.attacks.simulate_update`).
        size, pretrain_steps: the phantom side and the pretraining when model/images are not given.
        attack: further ``invert_gradients`` arguments over :data:`DEFAULT_ATTACK` (cosine objective
            with inverse-norm layer weights, signed Adam), e.g. ``{"objective": "l2", "optimizer": "lbfgs"}``.
        mode: ``"pixels"``: the pixel-space Inverting Gradients attack (``steps`` steps).
            ``"retrieval"``: for single-image updates, gradient-guided retrieval with a CT prior —
            the attacker ranks ``references`` public phantom slices (``site_b``, other patients and
            scanner) by the distance of their simulated update to the shared one under the known mask
            and returns the mean of the ``top_k`` best (:func:`fastdp.attacks.rank_references`);
            batches of more than one image, or an unknown mask, use the pixel attack.
        references, top_k: the retrieval's reference slices and how many best matches are averaged.
            They also add the trivial guesses ``ref_mean`` and ``ref_mask_match`` (the same
            retrieval by the masks alone, without the gradient).
        pool_size: identification: each attacked slice is ranked among itself and ``pool_size``
            other patients' slices with the most similar liver masks (:func:`identification_pool`)
            by NCC to the reconstruction (:func:`fastdp.attacks.metrics.identification_ranks`),
            for the attack and every trivial guess alike. 0: off. Needs phantom data (or images
            whose masks the phantom pool can match, side >= 64).
        pool_candidates: phantom slices the distractors are chosen from.
        gradient_identification: for B = 1 also rank the same candidates by the distance of their
            simulated update to the shared one (:func:`gradient_identification_rank`).
        seed: seeds the model, the DP noise and the attack's starting points.
        threads: torch threads during the run (None: leave as is). One is the default: the attack's
            many small double-backward passes ran several times faster on one thread than on two
            of a shared 2-core CPU.
        progress: print one line per attack.
    Returns: {"config": {...}, "runs": [{"batch_size", "sigma" (None: non-private), "mode" ("retrieval"
        or "pixels"), "epsilon" (of this one update at delta 1e-5; None: non-private), "metrics":
        {name: [B]}, "mean": {name: float}, "best_trivial": {"name", "body_ssim"}, "margin_body_ssim"
        (mean body SSIM minus the best trivial guess's), "best_trivial_aligned" and
        "margin_aligned_body_ssim" (the same on aligned body SSIM), "identification" (NCC top-1 rate,
        Clopper-Pearson interval, chance, ranks), "gradient_identification" (B = 1), "attack_seconds"
        (all batches), "seconds_per_image", "objective"}, ...], "trivial_identification": {"B": {guess: summary}},
        "trivial": {"B": {guess: {metric: [B]}}}, "pngs": [paths], "shared_by", "seconds"}.
    """
    start = time.perf_counter()
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model_name = model if isinstance(model, str) else ("unet_small" if model is None else type(model).__name__)
        if model is None or isinstance(model, str):
            net = build_attack_model(model_name, seed, images.shape[-1] if images is not None else size)
            if images is not None:
                size = images.shape[-1]
            pre_x, pre_m = PhantomDataset("site_b", 64, size, seed + 1).tensors()
            pretrain(net, pre_x, pre_m, pretrain_steps)
            if progress:
                print(f"[attack] {model_name}: pretrained {pretrain_steps} steps ({time.perf_counter() - start:.1f} s)")
        else:
            net = model
        if images is None:
            images, masks = _slices_with_organ(PhantomDataset("site_a", 64, size, seed), max(batch_sizes) * batches, 64)
        elif masks is None or len(images) < max(batch_sizes) * batches:
            raise ValueError("give masks with the images, and at least max(batch_sizes) * batches of each")
        if mode not in ("retrieval", "pixels"):
            raise ValueError(f"mode must be 'retrieval' or 'pixels', got {mode!r}")
        ref_x = ref_m = None
        if mode == "retrieval" and references > 0:
            ref_x, ref_m = PhantomDataset("site_b", references, images.shape[-1], seed + 7, start=5000).tensors()
        dp_sigmas = [float(s) for s in sigmas if s]
        dp_sigmas = list(dict.fromkeys(dp_sigmas))
        cfg = {**DEFAULT_ATTACK, "lr": lr, "tv_weight": tv_weight, "restarts": restarts, **(attack or {})}
        runs, pngs, trivial_all, trivial_id = [], [], {}, {}
        shared_by = "fastdp.federated.Site"
        for b in batch_sizes:
            x, m = images[: b * batches].float(), masks[: b * batches].long()
            if m.dim() == 4:
                m = m[:, 0]
            ref_kw = {} if ref_x is None else {"references": ref_x, "reference_masks": ref_m, "top_k": top_k}
            trivial = trivial_guess_metrics(x, m, **ref_kw)
            trivial_all[str(b)] = trivial
            best_name, best_val = best_trivial(trivial)
            best_al_name, best_al_val = best_trivial(trivial, "aligned_body_ssim")
            distractors = (
                identification_pool(m, x.shape[-1], pool_size, pool_candidates, seed=seed) if pool_size else None
            )
            if distractors is not None:
                trivial_id[str(b)] = {
                    k: identification_summary(identification_ranks(g, x, distractors), pool_size)
                    for k, g in trivial_guesses(x, m, **ref_kw).items()
                }
            recons, scores = {}, {}
            for sigma in [None, *dp_sigmas]:
                clip = None if sigma is None else max_grad_norm
                parts, objectives, grad_ranks, seconds, run_mode = [], [], [], 0.0, "pixels"
                for j in range(batches):
                    xj, mj = x[j * b : (j + 1) * b], m[j * b : (j + 1) * b]
                    delta = federated_site_update(
                        net,
                        xj,
                        mj,
                        seed=seed,
                        noise_multiplier=sigma,
                        max_grad_norm=max_grad_norm,
                        local_steps=local_steps,
                        lr=local_lr,
                        optimizer=local_optimizer,
                    )
                    sim = dict(
                        shared_kind="update",
                        local_steps=local_steps,
                        local_lr=local_lr,
                        max_grad_norm=clip,
                        local_optimizer=local_optimizer,
                    )
                    t0 = time.perf_counter()
                    if ref_x is not None and b == 1 and known_mask:
                        run_mode = "retrieval"
                        dists, order = rank_references(
                            net, delta, ref_x, mj, objective=cfg.get("objective", "cosine"), **sim
                        )
                        parts.append((ref_x[order[:top_k]].mean(0, keepdim=True), None))
                        objectives.append(float(dists[order[0]]))
                    else:
                        res = invert_gradients(
                            net,
                            delta,
                            image_shape=tuple(x.shape[1:]),
                            num_images=b,
                            masks=mj if known_mask else None,
                            iterations=steps,
                            seed=seed,
                            **sim,
                            **cfg,
                        )
                        parts.append((res.images, None if known_mask else res.mask_probs))
                        objectives.append(res.loss)
                    seconds += time.perf_counter() - t0
                    if distractors is not None and gradient_identification and b == 1:
                        grad_ranks.append(gradient_identification_rank(net, delta, xj, mj, distractors[j], **sim))
                recon = torch.cat([r for r, _ in parts])
                mask_probs = None if known_mask else torch.cat([q for _, q in parts])
                objective = _mean(objectives)
                met = reconstruction_metrics(recon, x, mask_probs=mask_probs, masks=m)
                ident = grad_ident = None
                if distractors is not None:
                    ranks = identification_ranks(recon, x, distractors)
                    ident = {**identification_summary(ranks, pool_size), "ranks": ranks}
                    if grad_ranks:
                        grad_ident = {**identification_summary(grad_ranks, pool_size), "ranks": grad_ranks}
                label = "non-private" if sigma is None else f"DP sigma={sigma:g}"
                recons[label], scores[label] = recon, met["body_ssim"]
                mean = {k: _mean(v) for k, v in met.items()}
                eps = None if sigma is None else compute_epsilon(1.0, sigma, local_steps, 1e-5)
                runs.append(
                    {
                        "batch_size": b,
                        "sigma": sigma,
                        "mode": run_mode,
                        "epsilon": eps,
                        "metrics": met,
                        "mean": mean,
                        "best_trivial": {"name": best_name, "body_ssim": best_val},
                        "margin_body_ssim": mean["body_ssim"] - best_val,
                        "best_trivial_aligned": {"name": best_al_name, "aligned_body_ssim": best_al_val},
                        "margin_aligned_body_ssim": mean["aligned_body_ssim"] - best_al_val,
                        "identification": ident,
                        "gradient_identification": grad_ident,
                        "attack_seconds": seconds,
                        "seconds_per_image": seconds / (b * batches),
                        "objective": objective,
                    }
                )
                if progress:
                    top1 = "" if ident is None else f", top-1 {ident['top1']:.2f} (chance {ident['chance']:.2f})"
                    print(
                        f"[attack] B={b} {label:16s} aligned body SSIM {mean['aligned_body_ssim']:.3f} (best "
                        f"trivial {best_al_name} {best_al_val:.3f}), NCC {mean['ncc']:.2f}{top1}, "
                        f"PSNR {mean['psnr']:.1f} dB, {run_mode}, {seconds:.1f} s",
                        flush=True,
                    )
            if out_dir is not None:
                recons[f"guess: {best_name}"] = trivial_guesses(x, m, **ref_kw)[best_name]
                scores[f"guess: {best_name}"] = trivial[best_name]["body_ssim"]
                pngs.append(str(save_attack_grid(Path(out_dir) / f"attack_B{b}.png", x, recons, scores)))
        result = {
            "config": {
                "model": model_name,
                "image_size": list(images.shape[-2:]),
                "batch_sizes": list(batch_sizes),
                "sigmas": dp_sigmas,
                "max_grad_norm": max_grad_norm,
                "pretrain_steps": pretrain_steps if model is None or isinstance(model, str) else None,
                "local_steps": local_steps,
                "local_lr": local_lr,
                "local_optimizer": local_optimizer,
                "batches": batches,
                "steps": steps,
                "known_mask": known_mask,
                "mode": mode,
                "references": references if ref_x is not None else 0,
                "top_k": top_k,
                "pool_size": pool_size,
                "attack": cfg,
                "seed": seed,
                "threads": torch.get_num_threads(),
            },
            "runs": runs,
            "trivial": trivial_all,
            "trivial_identification": trivial_id,
            "pngs": pngs,
            "shared_by": shared_by,
            "seconds": time.perf_counter() - start,
        }
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            with open(Path(out_dir) / "attack_results.json", "w") as f:
                json.dump(result, f, indent=1)
        return result
    finally:
        torch.set_num_threads(old_threads)
