"""The report's attack table carries the scale-fair numbers of fastdp.attacks' experiment."""

from __future__ import annotations

from pathlib import Path

from fastdp.report.markdown import _attack_section, attack_metric_rows


def _run(sigma, aligned, top1):
    return {
        "batch_size": 1,
        "sigma": sigma,
        "epsilon": None if sigma is None else 4.7,
        "metrics": {"body_ssim": [0.2]},
        "mean": {"body_ssim": 0.2, "aligned_body_ssim": aligned, "ncc": 0.5},
        "best_trivial": {"name": "grey", "body_ssim": 0.28},
        "best_trivial_aligned": {"name": "mask_mean", "aligned_body_ssim": 0.3},
        "margin_body_ssim": -0.08,
        "margin_aligned_body_ssim": aligned - 0.3,
        "identification": {"top1": top1, "top1_low": 0.1, "top1_high": 0.9, "chance": 1 / 21, "ranks": [0]},
        "gradient_identification": None,
    }


def test_attack_rows_put_aligned_margin_identification_and_chance_side_by_side():
    rows = attack_metric_rows({"runs": [_run(None, 0.55, 0.75), _run(1.0, 0.25, 0.0)]})
    assert rows[0]["best aligned trivial"] == "mask_mean" and rows[0]["its aligned_body_ssim"] == 0.3
    assert rows[0]["top-1 (NCC)"] == "0.75 [0.10, 0.90]" and abs(rows[0]["chance"] - 1 / 21) < 1e-12
    assert "top-1 (update)" not in rows[0]  # None: not measured, no column invented
    assert list(rows[1])[-1] == "margin_aligned_body_ssim" and abs(rows[1]["margin_aligned_body_ssim"] + 0.05) < 1e-12


def test_attack_section_renders_the_table_and_the_scoring_note(tmp_path: Path):
    lines = _attack_section({"runs": [_run(None, 0.55, 0.75)]}, [tmp_path], tmp_path, tmp_path, tmp_path)
    text = "\n".join(lines)
    assert "top-1 (NCC)" in text and "margin_aligned_body_ssim" in text and "a >= 0" in text
