"""Report from synthetic run folders: files exist, the summary table holds the right numbers."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from _histories import make_history, write_run

from fastdp.report import find_runs, markdown_table, summarize_all, write_report
from fastdp.report.plots import plot_epsilon, plot_privacy_utility


def _table_row(report: str, run: str) -> list[str]:
    """The cells of the summary-table row of `run` (the first table in the report)."""
    for line in report.splitlines():
        if line.startswith(f"| {run} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no summary row for {run}")


def _png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_two_runs(run_dir):
    path = write_report(run_dir)
    text = path.read_text()
    assert path == run_dir / "report.md"
    assert text.index("## Summary") < text.index("## Dice per round")  # the table comes first
    for name in ("dice", "epsilon", "round_time"):
        assert _png(run_dir / "plots" / f"{name}.png")
        assert f"(plots/{name}.png)" in text
    assert not (run_dir / "plots" / "privacy_utility.png").exists()  # one DP run is no curve
    nonprivate, dp = _table_row(text, "nonprivate"), _table_row(text, "dp")
    # run | rounds | final test Dice | val Dice per site | epsilon per site | mean s | total s | ratio
    assert nonprivate[1] == "3" and nonprivate[2] == "0.700"
    assert nonprivate[3] == "site_a 0.800<br>site_b 0.810<br>site_c 0.820"
    assert nonprivate[4] == "— (non-private)"
    assert nonprivate[5:] == ["10.0", "30.0", "—"]
    assert dp[4] == "site_a 3.00<br>site_b 4.00<br>site_c 5.00"
    assert dp[5:] == ["15.0", "45.0", "1.50x"]
    assert "Gradient-inversion attack" not in text  # no attack results: no section


def test_summaries(run_dir):
    runs = find_runs(run_dir)
    assert [r.label for r in runs] == ["nonprivate", "dp"]  # non-private first whatever the folder order
    base, dp = summarize_all(runs)
    assert base.time_ratio is None and dp.time_ratio == pytest.approx(1.5)
    assert dp.mean_phase_s["local_training"] == pytest.approx(12.0)
    assert dp.max_epsilon == 5.0 and base.max_epsilon is None and not base.is_private


def test_single_run_without_test_set_or_epsilon(tmp_path):
    (tmp_path / "history.json").write_text(json.dumps(make_history("nonprivate", with_test=False)))
    assert plot_epsilon(find_runs(tmp_path), tmp_path / "plots" / "epsilon.png") is None
    text = write_report(tmp_path, plots=False).read_text()
    row = _table_row(text, tmp_path.name)
    assert row[2] == "—" and row[7] == "—"
    assert not (tmp_path / "plots" / "epsilon.png").exists()


def test_failed_rejected_and_budget_stopped_sites(tmp_path):
    h = make_history("dp-sgd", rounds=3, private=True)
    last = h["rounds"][-1]
    last["failed"] = [{"site": "site_b", "error": "RuntimeError: boom"}]
    last["rejected"] = [{"site": "site_a", "reason": "non-finite values in delta[head.weight]"}]
    last["stopped_budget"] = ["site_c"]
    for s in ("site_a", "site_b", "site_c"):
        last["sites"][s].update(participated=False, epsilon=None, val_dice=None)
    last["test"] = None
    last["phase_s"] = {}
    write_run(tmp_path, "dp", h)
    text = write_report(tmp_path, plots=False).read_text()
    row = _table_row(text, "dp")
    assert row[2] == "0.600"  # the last test Dice there was (round 2)
    assert row[4] == "site_a 2.00<br>site_b 3.00<br>site_c 4.00"  # epsilon after each site's last update
    assert re.search(r"\| dp \| site_a \| .*1 rejected \(non-finite values", text)
    assert re.search(r"\| dp \| site_b \| .*1 failed \(RuntimeError: boom\)", text)
    assert re.search(r"\| dp \| site_c \| .*budget reached at round 3", text)


def test_attack_section_from_a_plain_dict(run_dir, tmp_path_factory):
    grid_dir = tmp_path_factory.mktemp("attack_elsewhere")
    (grid_dir / "grid.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(16))  # the report copies it, never decodes it
    attack = {
        "metrics": [
            {"target": "nonprivate", "batch_size": 1, "sigma": 0.0, "ssim_body": 0.41, "psnr": 17.2},
            {"target": "dp", "batch_size": 1, "sigma": 0.76, "ssim_body": 0.02, "psnr": 8.1},
        ],
        "grid": "grid.png",
        "baselines": [{"guess": "blank grey", "ssim_body": 0.05}],
        "time_s": 75.2,
    }
    text = write_report(run_dir, attack, attack_dir=grid_dir, plots=False).read_text()
    assert "## Gradient-inversion attack" in text
    assert "| nonprivate | 1 | 0.000 | 0.410 | 17.200 |" in text
    assert "| blank grey | 0.050 |" in text
    assert "- time s: 75.200" in text
    # The grid lived outside the run folder: it is copied into plots/ and linked from there.
    assert _png(run_dir / "plots" / "attack_grid.png")
    assert "![attack reconstructions](plots/attack_grid.png)" in text


def test_attack_json_in_the_run_folder_and_errors(run_dir):
    (run_dir / "attack").mkdir()
    (run_dir / "attack" / "attack.json").write_text(json.dumps({"error": "ImportError: no attack", "grid": "nope.png"}))
    text = write_report(run_dir, plots=False).read_text()
    assert "**The attack did not complete:** ImportError: no attack" in text
    assert "_(reconstruction grid nope.png not found)_" in text


def test_privacy_utility_plot_for_a_sweep(tmp_path):
    write_run(tmp_path, "nonprivate", make_history("nonprivate"))
    for eps in (1, 8):
        h = make_history("dp-sgd", private=True)
        for r in h["rounds"]:
            for site in r["sites"].values():
                site["epsilon"] = float(eps)
        write_run(tmp_path, f"dp_eps{eps}", h)
    runs = find_runs(tmp_path)
    assert [r.label for r in runs] == ["nonprivate", "dp_eps1", "dp_eps8"]
    path = plot_privacy_utility(summarize_all(runs), tmp_path / "pu.png")
    assert path is not None and _png(path)


def test_no_history_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no history.json"):
        write_report(tmp_path)


def test_markdown_table_formats():
    text = markdown_table([{"a": 1.0, "b": None}, {"a": math.inf, "c": "x|y", "b": True}])
    assert text.splitlines()[0] == "| a | b | c |"
    assert "| 1.000 | — | — |" in text and "| ∞ | yes | x\\|y |" in text


def test_attack_results_of_fastdp_attacks_experiment(run_dir):
    """The dict fastdp.attacks.experiment.run_attack_experiment returns is read as it is."""
    (run_dir / "attack").mkdir()
    (run_dir / "attack" / "attack_B1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(16))
    run = {
        "batch_size": 1,
        "sigma": None,
        "epsilon": None,
        "metrics": {"body_ssim": [0.5]},
        "mean": {"body_ssim": 0.5, "psnr": 18.0},
        "best_trivial": {"name": "grey", "body_ssim": 0.12},
        "margin_body_ssim": 0.38,
        "attack_seconds": 20.0,
    }
    dp_run = {**run, "sigma": 0.76, "epsilon": 9.1, "mean": {"body_ssim": 0.01, "psnr": 6.0}, "margin_body_ssim": -0.11}
    result = {"config": {"steps": 3}, "runs": [run, dp_run], "trivial": {"1": {}}, "pngs": ["attack/attack_B1.png"]}
    result["seconds"] = 41.0
    text = write_report(run_dir, result, plots=False).read_text()
    header = "| batch_size | sigma | epsilon | attack_seconds | body_ssim | psnr | best trivial guess | its body_ssim |"
    assert header + " margin_body_ssim |" in text
    assert "| 1 | — | — | 20.000 | 0.500 | 18.000 | grey | 0.120 | 0.380 |" in text
    assert "| 1 | 0.760 | 9.100 | 20.000 | 0.010 | 6.000 | grey | 0.120 | -0.110 |" in text
    assert "![attack reconstructions](attack/attack_B1.png)" in text
    assert "- seconds: 41.000" in text


def test_attack_grid_found_by_name_when_written_relative_to_another_directory(run_dir):
    """run_attack_experiment records PNG paths relative to the working directory of the run."""
    (run_dir / "attack").mkdir()
    (run_dir / "attack" / "attack_B1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(16))
    result = {"runs": [], "pngs": ["runs/elsewhere/attack/attack_B1.png"]}
    text = write_report(run_dir, result, plots=False).read_text()
    assert "![attack reconstructions](attack/attack_B1.png)" in text
    assert "not found" not in text
