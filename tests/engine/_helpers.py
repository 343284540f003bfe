"""Shared helpers for the engine tests: one fastdp step on a fixed batch."""

from __future__ import annotations

import torch
from _reference import clipped_mean, per_sample_grads
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdp


def fastdp_step(
    model, x, y, batch_loss, max_grad_norm, sigma=0.0, seed=0, expected_batch_size=None, secure_mode=False, **kw
):
    """Wraps `model` (in place), takes one DP step (lr 0) on (x, y).

    Returns ({name: p.grad}, engine, optimizer)."""
    n = int(expected_batch_size or x.shape[0])
    ds = TensorDataset(torch.zeros(n, 1), torch.zeros(n))
    loader = DataLoader(ds, batch_size=n)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    engine = fastdp.PrivacyEngine(seed=seed, secure_mode=secure_mode)
    pm, popt, _ = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=sigma,
        max_grad_norm=max_grad_norm,
        poisson_sampling=False,
        **kw,
    )
    popt.zero_grad()
    batch_loss(pm(x), y).backward()
    popt.step()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return grads, engine, popt


def reference_and_clip(model, x, y, per_sample_loss, quantile=0.5):
    """Microbatch-of-one per-sample grads of `model` (not yet wrapped), norms, and a clip bound
    that clips some samples but not others."""
    grads, norms = per_sample_grads(model, per_sample_loss, x, y)
    C = float(torch.quantile(norms, quantile))
    return grads, norms, C


def check_against_reference(model, x, y, per_sample_loss, batch_loss, rtol=1e-5, quantile=0.5, **make_private_kw):
    ref_grads, norms, C = reference_and_clip(model, x, y, per_sample_loss, quantile)
    expected = clipped_mean(ref_grads, norms, C, x.shape[0])
    got, _, _ = fastdp_step(model, x, y, batch_loss, C, **make_private_kw)
    assert set(got) == set(expected)
    # parameters whose true gradient is ~0 (a conv bias before a norm) are compared at the model's scale
    floor = 1e-3 * max(float(e.abs().max()) for e in expected.values())
    for name in expected:
        g = got[name]
        assert g is not None, f"{name} got no gradient"
        scale = expected[name].abs().max().clamp(min=floor)
        err = float((g - expected[name]).abs().max().detach() / scale.detach())
        assert err < rtol, f"{name}: relative error {err:.3g}"
    return C


def mse_per_sample(out, target):
    return ((out - target) ** 2).mean()


def mse_batch(out, target):
    # mean over the batch of per-sample means (equal sizes): nn.MSELoss(reduction="mean")
    return nn.functional.mse_loss(out, target)


def check_noise_and_coverage(model, x, y, per_sample_loss, sigma=1.3, expected_batch_size=4.0, seed=7):
    """p.grad - clipped mean must be N(0, (sigma C / E[B])^2) on every element of every trainable
    parameter (a parameter left out of the noise would be exact and fail), and stay on x's device."""
    ref_grads, norms = per_sample_grads(model, per_sample_loss, x, y)
    clip = float(norms.median())
    clipped = clipped_mean(ref_grads, norms, clip, expected_batch_size)
    got, _, _ = fastdp_step(
        model, x, y, per_sample_loss, clip, sigma=sigma, seed=seed, expected_batch_size=expected_batch_size
    )
    std = sigma * clip / expected_batch_size
    z = []
    for name, g in got.items():
        assert g.device == x.device, f"{name}: gradient on {g.device}, data on {x.device}"
        noise = (g - clipped[name]).flatten()
        assert (noise.abs() > 1e-9 * std).all(), f"parameter {name} not noised"
        z.append(noise / std)
    z = torch.cat(z)
    n = z.numel()
    assert n > 500
    assert abs(float(z.mean())) < 5 / n**0.5
    assert abs(float(z.std()) - 1) < 5 / (2 * n) ** 0.5


def small_model():
    """A conv + GroupNorm + PReLU + Linear classifier for 1x6x6 inputs (every fast rule family but embedding)."""
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.PReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def small_data(n=40):
    """n seeded (image [1, 6, 6], label in 0..2) pairs for small_model."""
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g))


def snapshot(model):
    """{name: a copy of the parameter}."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}
