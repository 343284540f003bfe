"""Scale-fair scoring: affine alignment, body NCC and identification against hand-made cases."""

import pytest
import torch

from fastdp.attacks.metrics import (
    affine_align,
    aligned_metrics,
    body_ncc,
    identification_ranks,
    identification_summary,
    reconstruction_metrics,
    similar_mask_pool,
    trivial_guesses,
)


def _slice(seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(1, 1, 32, 32)
    y[..., 4:28, 4:28] = 0.3 + 0.5 * torch.rand(1, 1, 24, 24, generator=g)
    return y


def test_affine_align_recovers_a_scaled_shifted_copy_exactly():
    y = _slice()
    body = y > 0.02
    r = torch.where(body, 0.25 * y + 0.1, torch.zeros_like(y))  # low contrast, wrong brightness
    al = affine_align(r, y)
    torch.testing.assert_close(al[body], y[body], atol=1e-5, rtol=0)
    m = aligned_metrics(r, y)
    assert m["ncc"][0] == pytest.approx(1.0, abs=1e-5)
    # Raw SSIM punishes the contrast loss; the aligned one does not.
    assert reconstruction_metrics(r, y)["body_ssim"][0] < 0.9 < m["aligned_body_ssim"][0]


def test_constant_and_anticorrelated_guesses_become_the_body_mean():
    y = _slice(1)
    body = y > 0.02
    mean = y[body].mean()
    for r in (torch.full_like(y, 0.5), 1.0 - y):
        al = affine_align(r, y)
        torch.testing.assert_close(al[body], torch.full_like(al[body], float(mean)), atol=1e-5, rtol=0)
    assert body_ncc(torch.full_like(y, 0.5), y)[0] == 0.0
    assert body_ncc(1.0 - y, y)[0] == pytest.approx(-1.0, abs=1e-5)


def test_mask_guess_becomes_the_best_two_level_image():
    y = _slice(2)
    mask = torch.zeros(1, 32, 32, dtype=torch.long)
    mask[:, 10:20, 10:20] = 1
    y[..., 10:20, 10:20] += 0.15  # a brighter organ (a darker one would get a = 0: a constant)
    guess = trivial_guesses(y, mask)["mask_mean"]
    al = affine_align(guess, y)
    body = (y > 0.02)[0, 0]
    inside = body & (mask[0] == 1)
    outside = body & (mask[0] == 0)
    # Least squares with two levels: each level is the truth's mean over its region.
    assert al[0, 0][inside].mean() == pytest.approx(float(y[0, 0][inside].mean()), abs=1e-5)
    assert al[0, 0][outside].mean() == pytest.approx(float(y[0, 0][outside].mean()), abs=1e-5)
    assert len(torch.unique(al[0, 0][body].round(decimals=5))) == 2


def test_identification_ranks_and_similar_mask_pool():
    truth = torch.stack([_slice(s)[0] for s in range(2)])
    distractors = torch.stack([torch.stack([_slice(10 + 5 * i + j)[0] for j in range(5)]) for i in range(2)])
    g = torch.Generator().manual_seed(9)
    noisy = truth + 0.05 * torch.randn(truth.shape, generator=g)
    assert identification_ranks(noisy, truth, distractors) == [0, 0]
    # A constant reconstruction ties with every candidate: the tie counts against it.
    assert identification_ranks(torch.full_like(truth, 0.5), truth, distractors) == [5, 5]
    # Also a constant whose value is a float mean (rounding must not create a correlation).
    const = truth.mean((1, 2, 3), keepdim=True).expand_as(truth).clone()
    assert identification_ranks(const, truth, distractors) == [5, 5]
    # A distractor as the reconstruction ranks the truth below it.
    assert identification_ranks(distractors[:, 0], truth, distractors)[0] >= 1
    s = identification_summary([0, 0, 3, 0], pool_size=20)
    assert s["top1"] == 0.75 and s["chance"] == pytest.approx(1 / 21) and s["top1_low"] < 0.75 < s["top1_high"]
    masks = torch.zeros(3, 8, 8, dtype=torch.long)
    masks[0, :4] = 1
    masks[1, :, :4] = 1
    masks[2, :3] = 1
    idx = similar_mask_pool(masks[:1], masks, size=2)
    assert idx.tolist() == [[0, 2]]
    with pytest.raises(ValueError):
        similar_mask_pool(masks[:1], masks, size=4)
