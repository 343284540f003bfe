"""The report's per-site fairness: each site's val and own-patients test Dice, per run."""

from __future__ import annotations

from _histories import SITES, make_history, write_run

from fastdp.report import write_report
from fastdp.report.markdown import _fairness_rows
from fastdp.report.summary import find_runs, summarize_all


def _with_site_tests(history: dict, test_dice: dict[str, float]) -> dict:
    for r in history["rounds"]:
        r["test"]["by_site"] = {s: {"dice": d, "loss": 0.5} for s, d in test_dice.items()}
    return history


def test_fairness_table_names_the_site_dp_serves_worst(tmp_path):
    write_run(
        tmp_path,
        "nonprivate",
        _with_site_tests(make_history("nonprivate"), dict(zip(SITES, (0.90, 0.91, 0.88), strict=True))),
    )
    write_run(
        tmp_path,
        "dp",
        _with_site_tests(make_history("dp-sgd", private=True), dict(zip(SITES, (0.87, 0.90, 0.80), strict=True))),
    )
    summaries = summarize_all(find_runs(tmp_path))
    dp = next(s for s in summaries if s.label == "dp")
    assert dp.site_test_dice == {"site_a": 0.87, "site_b": 0.90, "site_c": 0.80}
    rows = {r["run"]: r for r in _fairness_rows(summaries)}
    assert rows["dp"]["largest test drop vs non-private"] == "site_c 0.080"
    assert rows["dp"]["test spread (max - min)"] == "0.100"
    assert rows["nonprivate"]["site_a val / test"] == "0.800 / 0.900"  # val Dice of round 3, site 0
    assert "largest test drop vs non-private" not in rows["nonprivate"]
    text = write_report(tmp_path, plots=False).read_text()
    assert "## Per-site fairness" in text and "site_c 0.080" in text
    assert "test Dice (own held-out patients)" in text


def test_no_fairness_section_without_a_split_test_set(run_dir):
    text = write_report(run_dir, plots=False).read_text()
    assert "## Per-site fairness" not in text
