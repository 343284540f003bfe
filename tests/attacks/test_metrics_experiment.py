"""Reconstruction metrics against hand-computed values; the experiment end to end on a tiny net."""

import json
import math

import pytest
import torch

from fastdp.attacks import run_attack_experiment
from fastdp.attacks.metrics import best_trivial, body_ssim, reconstruction_metrics, ssim_map, trivial_guesses
from fastdp.models import UNet

C1, C2 = 0.01**2, 0.03**2


def test_ssim_of_constant_images_matches_the_formula():
    # Constant x = a, y = b: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) * C2 / C2.
    a, b = 0.3, 0.6
    x, y = torch.full((1, 1, 16, 16), a), torch.full((1, 1, 16, 16), b)
    expected = (2 * a * b + C1) / (a * a + b * b + C1)
    m = reconstruction_metrics(x, y)
    assert m["ssim"][0] == pytest.approx(expected, rel=1e-4)
    assert m["mse"][0] == pytest.approx(0.09, rel=1e-5)
    assert m["psnr"][0] == pytest.approx(10 * math.log10(1 / 0.09), rel=1e-4)


def test_body_ssim_only_counts_windows_inside_the_body():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(1, 1, 32, 32, generator=g)
    x = y.clone()
    x[..., 20:] = 0.0  # wrong outside the left part
    body = torch.zeros_like(y, dtype=torch.bool)
    body[..., :10] = True  # windows centred in columns < 10 reach column 14 at most: all correct
    assert body_ssim(x, y, body).item() == pytest.approx(1.0, abs=1e-5)
    assert reconstruction_metrics(x, y)["ssim"][0] < 0.9
    # With the whole image as the body it is the ordinary SSIM (the map's mean).
    full = torch.ones_like(body)
    assert body_ssim(x, y, full).item() == pytest.approx(ssim_map(x, y).mean().item(), rel=1e-5)


def test_trivial_guesses_values():
    y = torch.zeros(1, 1, 16, 16)
    y[..., 4:12, 4:12] = 0.5
    y[..., 6:10, 6:10] = 0.9
    mask = (y[:, 0] > 0.7).long()
    g = trivial_guesses(y, mask)
    assert torch.all(g["zeros"] == 0) and torch.all(g["grey"] == 0.5)
    assert g["mean"][0, 0, 0, 0].item() == pytest.approx(y.mean().item())
    assert g["mask_mean"][0, 0, 7, 7].item() == pytest.approx(0.9) and g["mask_mean"][0, 0, 0, 0] == 0
    trivial = {k: reconstruction_metrics(v, y) for k, v in g.items()}
    name, value = best_trivial(trivial, "mse")
    assert value == min(sum(t["mse"]) for t in trivial.values())


def test_run_attack_experiment_end_to_end_on_a_tiny_net(tmp_path):
    torch.manual_seed(0)
    model = UNet(base_channels=2, depth=1)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 1, 16, 16, generator=g)
    masks = (images[:, 0] > 0.6).long()
    res = run_attack_experiment(
        model,
        images,
        masks,
        out_dir=tmp_path,
        batch_sizes=(1, 2),
        sigmas=(0.0, 1.0),
        steps=3,
        progress=False,
        pool_size=0,
    )
    assert [(r["batch_size"], r["sigma"]) for r in res["runs"]] == [(1, None), (1, 1.0), (2, None), (2, 1.0)]
    for r in res["runs"]:
        assert len(r["metrics"]["body_ssim"]) == r["batch_size"]
        assert r["margin_body_ssim"] == pytest.approx(r["mean"]["body_ssim"] - r["best_trivial"]["body_ssim"])
    assert res["runs"][1]["epsilon"] > 0 and res["runs"][0]["epsilon"] is None
    assert all((tmp_path / f"attack_B{b}.png").stat().st_size > 1000 for b in (1, 2))
    saved = json.loads((tmp_path / "attack_results.json").read_text())
    assert saved["runs"][0]["mean"]["psnr"] == pytest.approx(res["runs"][0]["mean"]["psnr"])


def test_run_attack_experiment_scores_aligned_metrics_and_identification():
    torch.manual_seed(0)
    res = run_attack_experiment(
        UNet(base_channels=2, depth=1),
        out_dir=None,
        batch_sizes=(1,),
        sigmas=(1.0,),
        steps=2,
        pool_size=3,
        pool_candidates=8,
        progress=False,
    )
    for r in res["runs"]:
        assert set(r["mean"]) >= {"aligned_body_ssim", "aligned_psnr", "ncc"}
        assert r["margin_aligned_body_ssim"] == pytest.approx(
            r["mean"]["aligned_body_ssim"] - r["best_trivial_aligned"]["aligned_body_ssim"]
        )
        ident = r["identification"]
        assert ident["chance"] == pytest.approx(0.25) and len(ident["ranks"]) == 1 and 0 <= ident["ranks"][0] <= 3
        assert 0 <= r["gradient_identification"]["ranks"][0] <= 3
    # Trivial guesses are scored the same way; a constant ties with every candidate (rank 3).
    triv = res["trivial_identification"]["1"]
    assert triv["grey"]["mean_rank"] == 3 and triv["grey"]["top1"] == 0
    assert "aligned_body_ssim" in res["trivial"]["1"]["mask_mean"]
