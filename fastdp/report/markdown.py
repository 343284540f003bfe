"""report.md for a run folder: summary table first, then plots, per-site detail, the attack, the config.

Attack results come in as a plain dict so the report adapts to what the attack code returns:

    {"metrics": [{"target": "nonprivate", "batch_size": 1, "ssim_body": 0.41, ...}, ...]
                 (or {"name": {"metric": value}}),
     "grid": "attack/grid.png"            (or "grids": [...]; absolute, or relative to the attack
                                           JSON's folder or the run folder),
     "time_s": 75.2, "error": "...",      (optional)
     ...any other list of row dicts is rendered as a table, any other scalar as a line}

The result dict of ``fastdp.attacks.experiment.run_attack_experiment`` is read as well: its
``runs`` (one per batch size and sigma, with ``mean`` metrics) become the metrics table, its
``pngs`` the grids and ``seconds`` the time.

Without an explicit dict, ``RUN_DIR/attack/attack.json`` (or ``RUN_DIR/attack.json``) is read.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from fastdp.atomic import atomic_write_text
from fastdp.report.plots import plot_dice, plot_epsilon, plot_privacy_utility, plot_round_times
from fastdp.report.summary import ModeSummary, RunHistory, find_runs, summarize_all

__all__ = ["attack_metric_rows", "load_attack_results", "markdown_table", "write_report"]


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "—"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        return f"{v:.{digits}f}" if abs(v) >= 10**-digits or v == 0 else f"{v:.2e}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A GitHub Markdown table from row dicts (columns: union of keys in first-seen order)."""
    if not rows:
        return "_(no rows)_\n"
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _per_site(values: dict[str, float | None], digits: int) -> str:
    if not values:
        return "—"
    return "<br>".join(f"{site} {_fmt(v, digits)}" for site, v in values.items())


def _summary_rows(summaries: list[ModeSummary]) -> list[dict]:
    rows = []
    for s in summaries:
        eps = _per_site(s.site_epsilon, 2) if s.is_private else "— (non-private)"
        if s.server_epsilon is not None:
            eps += f"<br>server (user-level) {_fmt(s.server_epsilon, 2)}"
        if s.not_private_reasons:
            eps = "**NOT PRIVATE** (reproducible noise, see Privacy)<br>" + eps
        rows.append(
            {
                "run": s.label,
                "rounds": str(s.rounds),
                "final test Dice": _fmt(s.final_test_dice),
                "val Dice per site": _per_site(s.site_val_dice, 3),
                "epsilon per site": eps,
                "mean s / round": _fmt(s.mean_round_s, 1),
                "total s": _fmt(s.total_s, 1),
                "time x non-private": f"{s.time_ratio:.2f}x" if s.time_ratio is not None else "—",
            }
        )
    return rows


def _phase_rows(summaries: list[ModeSummary]) -> list[dict]:
    base = next((s for s in summaries if s.label == "nonprivate"), None) or next(
        (s for s in summaries if s.mode == "nonprivate" and s.label != "centralised"), None
    )
    rows = []
    for s in summaries:
        row = {"run": s.label}
        for name, v in s.mean_phase_s.items():
            row[f"{name.replace('_', ' ')} s"] = _fmt(v, 2)
        local, base_local = s.mean_phase_s.get("local_training"), base and base.mean_phase_s.get("local_training")
        if s is not base and local is not None and base_local:
            row["local training x non-private"] = f"{local / base_local:.2f}x"
        rows.append(row)
    return rows


def _fairness_rows(summaries: list[ModeSummary]) -> list[dict]:
    """Per run: each site's val / test Dice, the spread of test Dice over sites and, for a DP run,
    the largest drop against the non-private FL run (which site a DP model serves worst)."""
    base = next((s for s in summaries if s.label == "nonprivate"), None)
    sites = list(dict.fromkeys(k for s in summaries for k in [*s.site_val_dice, *s.site_test_dice]))
    rows = []
    for s in summaries:
        row = {"run": s.label}
        for site in sites:
            row[f"{site} val / test"] = f"{_fmt(s.site_val_dice.get(site))} / {_fmt(s.site_test_dice.get(site))}"
        tests = [v for v in s.site_test_dice.values() if v is not None]
        row["test spread (max - min)"] = _fmt(max(tests) - min(tests)) if len(tests) > 1 else "—"
        drops = {
            site: base.site_test_dice[site] - v
            for site, v in s.site_test_dice.items()
            if base is not None and s.is_private and v is not None and base.site_test_dice.get(site) is not None
        }
        if drops:
            worst = max(drops, key=drops.get)
            row["largest test drop vs non-private"] = f"{worst} {_fmt(drops[worst])}"
        rows.append(row)
    return rows


def _site_rows(summaries: list[ModeSummary]) -> list[dict]:
    return [
        {
            "run": s.label,
            "site": site,
            "val Dice": _fmt(s.site_val_dice.get(site)),
            "test Dice (own held-out patients)": _fmt(s.site_test_dice.get(site)),
            "epsilon": _fmt(s.site_epsilon.get(site), 2) if s.site_epsilon.get(site) is not None else "—",
            "status": s.site_status.get(site, ""),
        }
        for s in summaries
        for site in s.site_val_dice
    ]


def load_attack_results(run_dir: str | Path) -> tuple[dict | None, Path | None]:
    """(attack dict, the folder it was read from) from RUN_DIR/attack/attack.json or RUN_DIR/attack.json."""
    run_dir = Path(run_dir)
    for path in (run_dir / "attack" / "attack.json", run_dir / "attack.json"):
        if path.is_file():
            try:
                return json.loads(path.read_text()), path.parent
            except ValueError as exc:
                return {"error": f"could not read {path}: {exc}"}, path.parent
    return None, None


def _resolve_image(ref: str, bases: list[Path], run_dir: Path, plots_dir: Path) -> Path | None:
    """The image inside run_dir (copied into plots/ when it lives elsewhere), or None if not found."""
    p = Path(ref)
    # As written (absolute, or relative to the working directory the attack ran in), relative to
    # the attack's folder or the run folder, or by file name next to the attack's JSON: a run
    # folder that was moved still finds its grids.
    candidates = [p] + [b / p for b in bases] + [b / p.name for b in bases]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        return None
    found = found.resolve()
    if not found.is_relative_to(run_dir.resolve()):
        plots_dir.mkdir(parents=True, exist_ok=True)
        found = Path(shutil.copy2(found, plots_dir / f"attack_{found.name}"))
    return found


def attack_metric_rows(attack: dict) -> list[dict]:
    """The attack's metrics as flat table rows: ``metrics`` as given, or one row per entry of ``runs``.

    A ``runs`` entry (fastdp.attacks' experiment) gives batch size, sigma ("—" = non-private),
    the single update's epsilon, its mean metrics, the best trivial guess and the margin over it;
    when present also the scale-fair numbers next to each other: aligned body SSIM, the best
    aligned trivial guess and the margin over it, NCC, and top-1 identification (by NCC to the
    reconstruction, and by the update itself) with its chance rate.
    """
    metrics = attack.get("metrics")
    if isinstance(metrics, dict):
        return [{"run": k, **v} if isinstance(v, dict) else {"run": k, "value": v} for k, v in metrics.items()]
    if isinstance(metrics, list):
        return [m for m in metrics if isinstance(m, dict)]
    rows = []
    for run in attack.get("runs") or []:
        if not isinstance(run, dict):
            continue
        row = {k: v for k, v in run.items() if not isinstance(v, (dict, list))}
        row.update((run.get("mean") or {}) if isinstance(run.get("mean"), dict) else {})
        best = run.get("best_trivial")
        if isinstance(best, dict):
            row["best trivial guess"] = best.get("name")
            row["its body_ssim"] = best.get("body_ssim")
        best_al = run.get("best_trivial_aligned")
        if isinstance(best_al, dict):
            row["best aligned trivial"] = best_al.get("name")
            row["its aligned_body_ssim"] = best_al.get("aligned_body_ssim")
        for key, label in (("identification", "top-1 (NCC)"), ("gradient_identification", "top-1 (update)")):
            ident = run.get(key)
            if isinstance(ident, dict) and "top1" in ident:
                row[label] = f"{ident['top1']:.2f} [{ident.get('top1_low', 0):.2f}, {ident.get('top1_high', 1):.2f}]"
                row["chance"] = ident.get("chance")
        # The margins over the trivial guesses are the numbers to read: keep them last.
        for key in ("margin_body_ssim", "margin_aligned_body_ssim"):
            if key in row:
                row[key] = row.pop(key)
        rows.append(row)
    return rows


def _attack_section(attack: dict, bases: list[Path], run_dir: Path, plots_dir: Path, report_dir: Path) -> list[str]:
    out = ["## Gradient-inversion attack", ""]
    if attack.get("error"):
        out += [f"**The attack did not complete:** {_fmt(attack['error'])}", ""]
    rows = attack_metric_rows(attack)
    if rows:
        out += [markdown_table(rows)]
    refs = attack.get("grids") or attack.get("pngs") or ([attack["grid"]] if attack.get("grid") else [])
    for ref in refs if isinstance(refs, list) else [refs]:
        img = _resolve_image(str(ref), bases, run_dir, plots_dir)
        if img is None:
            out += [f"_(reconstruction grid {ref} not found)_", ""]
        else:
            rel = Path(os.path.relpath(img, report_dir)).as_posix()
            out += [f"![attack reconstructions]({rel})", ""]
    if attack.get("runs"):
        out += [
            "Aligned metrics fit r' = a r + b (a >= 0) over the body before SSIM/PSNR, for the attack and the "
            "trivial guesses alike (a GroupNorm U-Net's gradient cannot see intensity scale); identification ranks "
            "the true slice among other patients' slices with similar masks (docs/attacks.md).",
            "",
        ]
    skip = {"metrics", "runs", "grid", "grids", "pngs", "error", "traceback"}
    for key, value in attack.items():
        if key in skip:
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            out += [f"**{key.replace('_', ' ')}**", "", markdown_table(value)]
        elif not isinstance(value, (list, dict)):
            out += [f"- {key.replace('_', ' ')}: {_fmt(value)}"]
    if attack.get("traceback"):
        out += ["", "<details><summary>traceback</summary>", "", "```", str(attack["traceback"]).rstrip(), "```"]
        out += ["", "</details>"]
    out.append("")
    return out


def _privacy_section(summaries: list[ModeSummary]) -> list[str]:
    """What each run's sites released, and which DP runs do not hold their guarantee (docs/privacy.md)."""
    lines = ["## Privacy", ""]
    for s in summaries:
        if s.not_private_reasons:
            lines.append(f"- **{s.label}: NOT PRIVATE.** " + "; ".join(s.not_private_reasons) + ".")
    released = {(s.label, tuple(v)) for s in summaries for v in s.releases.values()}
    for label, items in sorted(released):
        sites = [site for s in summaries if s.label == label for site, v in s.releases.items() if tuple(v) == items]
        lines.append(f"- {label}: {', '.join(sites)} sent the server: {', '.join(items)}.")
    if len(lines) == 2:
        return []
    lines += [
        "",
        "A DP site's update is covered by its epsilon; its sample count, step count and epsilon are public "
        "metadata; its validation metrics describe its held-out slices, which DP does not cover. A DP site does "
        "not release its training loss. See docs/privacy.md.",
        "",
    ]
    return lines


def write_report(
    run_dir: str | Path,
    attack: dict | None = None,
    *,
    title: str | None = None,
    attack_dir: str | Path | None = None,
    plots: bool = True,
) -> Path:
    """Writes RUN_DIR/report.md and RUN_DIR/plots/*.png from every run's history.json.

    Args:
        run_dir: the run folder (one sub-folder per run, each with a history.json).
        attack: attack results as a plain dict (see the module docstring); None reads
            RUN_DIR/attack/attack.json if there is one; no attack leaves the section out.
        title: report heading (default: the run folder's name).
        attack_dir: where relative image paths in ``attack`` are looked up first.
        plots: draw the PNG plots (False: tables only, much faster).
    Returns:
        the path of report.md.
    Raises:
        FileNotFoundError: no history.json anywhere in run_dir.
    """
    run_dir = Path(run_dir)
    runs: list[RunHistory] = find_runs(run_dir)
    if not runs:
        raise FileNotFoundError(f"no history.json in {run_dir} or its sub-folders: nothing to report")
    if attack is None:
        attack, attack_dir = load_attack_results(run_dir)
    plots_dir = run_dir / "plots"
    summaries = summarize_all(runs)

    lines = [f"# {title or run_dir.resolve().name}", "", "## Summary", ""]
    lines += [markdown_table(_summary_rows(summaries))]
    lines += [
        "Dice: validation Dice of each site's own held-out slices after its last evaluated round, and test Dice "
        "of the final global model. epsilon: each site's sample-level epsilon spent (at the run's delta). "
        "Time: wall-clock seconds per round, and relative to the non-private run.",
        "",
    ]
    lines += _privacy_section(summaries)
    figures = []
    if plots:
        figures = [
            ("Dice per round", plot_dice(runs, plots_dir / "dice.png")),
            ("Privacy spent per round", plot_epsilon(runs, plots_dir / "epsilon.png")),
            ("Time per round by phase", plot_round_times(runs, plots_dir / "round_time.png")),
            ("Privacy-utility", plot_privacy_utility(summaries, plots_dir / "privacy_utility.png")),
        ]
    for heading, path in figures:
        if path is not None:
            lines += [f"## {heading}", "", f"![{heading}]({path.relative_to(run_dir).as_posix()})", ""]
    lines += ["## Mean time per round by phase", "", markdown_table(_phase_rows(summaries))]
    lines += ["## Sites", "", markdown_table(_site_rows(summaries))]
    if any(s.site_test_dice for s in summaries):
        lines += ["## Per-site fairness", "", markdown_table(_fairness_rows(summaries))]
        lines += [
            "val: the global model on each site's own validation slices; test: on the held-out test patients "
            "of that site (the test set split by origin). A DP model that serves one scanner worse than the "
            "others shows as a larger drop at that site.",
            "",
        ]
    if attack:
        bases = [Path(attack_dir)] if attack_dir is not None else []
        lines += _attack_section(attack, [*bases, run_dir, run_dir / "attack"], run_dir, plots_dir, run_dir)
    lines += ["## Files", ""]
    for run in runs:
        rel = run.path.parent.relative_to(run_dir).as_posix() if run.path.parent != run_dir else "."
        csv = " and history.csv" if (run.path.parent / "history.csv").is_file() else ""
        lines.append(f"- `{rel}/`: history.json{csv}")
    config = run_dir / "config.toml"
    if config.is_file():
        lines += ["", "<details><summary>config.toml</summary>", "", "```toml", config.read_text().rstrip(), "```"]
        lines += ["", "</details>"]
    out = run_dir / "report.md"
    atomic_write_text(out, "\n".join(lines) + "\n")  # a report being regenerated is never seen half-written
    return out
