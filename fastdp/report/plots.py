"""PNG plots of federated runs: Dice and epsilon per round per site, time per round by phase.

matplotlib's object API on the Agg canvas (no pyplot state, no display needed). Each function
returns the path written, or None when the runs hold nothing to plot (e.g. epsilon without
a DP run), so a report can leave the figure out instead of drawing an empty one.
"""

from __future__ import annotations

import math
from pathlib import Path

from fastdp.report.summary import PHASES, ModeSummary, RunHistory, as_number, site_record

__all__ = ["plot_dice", "plot_epsilon", "plot_privacy_utility", "plot_round_times"]

_PHASE_COLORS = {"local_training": "#4c72b0", "aggregation": "#dd8452", "evaluation": "#55a868", "other": "#bbbbbb"}


def _figure(n_panels: int, width: float = 4.2, height: float = 3.2, sharey: bool = True):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fastdp.report needs matplotlib: pip install matplotlib") from exc
    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=sharey).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    return path


def _round_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _site_colors(runs: list[RunHistory]) -> dict[str, str]:
    names: dict[str, None] = {}
    for run in runs:
        for s in run.sites:
            names.setdefault(s, None)
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
    return {s: palette[i % len(palette)] for i, s in enumerate(names)}


def _series(run: RunHistory, get) -> tuple[list[int], list[float]]:
    """(round numbers, values) with NaN where a value is null, so lines show gaps."""
    xs, ys = [], []
    for r in run.rounds:
        xs.append(int(r.get("round", len(xs) + 1)))
        v = as_number(get(r))
        ys.append(math.nan if v is None else v)
    return xs, ys


def plot_dice(runs: list[RunHistory], path: str | Path) -> Path | None:
    """One panel per run: validation Dice per site per round (solid) and test Dice (dashed black)."""
    runs = [r for r in runs if r.rounds]
    if not runs:
        return None
    colors = _site_colors(runs)
    fig, axes = _figure(len(runs))
    for ax, run in zip(axes, runs, strict=True):
        for site in run.sites:
            xs, ys = _series(run, lambda r, s=site: site_record(r, s).get("val_dice"))
            ax.plot(xs, ys, marker="o", ms=3, color=colors[site], label=f"{site} (val)")
        xs, ys = _series(run, lambda r: (r.get("test") or {}).get("dice"))
        if any(not math.isnan(y) for y in ys):
            ax.plot(xs, ys, "k--", marker="s", ms=3, label="test")
        ax.set_title(run.label)
        _round_axis(ax)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("Dice")
    return _save(fig, path)


def plot_epsilon(runs: list[RunHistory], path: str | Path) -> Path | None:
    """Epsilon per site per round of every private run (one panel each); None if no run is private."""
    private = []
    for run in runs:
        has_site = any(as_number(site_record(r, s).get("epsilon")) is not None for r in run.rounds for s in run.sites)
        has_server = any(as_number(r.get("server_epsilon")) is not None for r in run.rounds)
        if has_site or has_server:
            private.append(run)
    if not private:
        return None
    colors = _site_colors(private)
    fig, axes = _figure(len(private))
    for ax, run in zip(axes, private, strict=True):
        for site in run.sites:
            xs, ys = _series(run, lambda r, s=site: site_record(r, s).get("epsilon"))
            if any(not math.isnan(y) for y in ys):
                ax.plot(xs, ys, marker="o", ms=3, color=colors[site], label=site)
        xs, ys = _series(run, lambda r: r.get("server_epsilon"))
        if any(not math.isnan(y) for y in ys):
            ax.plot(xs, ys, "k--", marker="s", ms=3, label="server (user-level)")
        ax.set_title(run.label)
        _round_axis(ax)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("epsilon spent")
    return _save(fig, path)


def plot_round_times(runs: list[RunHistory], path: str | Path) -> Path | None:
    """Wall time per round as stacked phases (local training, aggregation, evaluation, other), one panel per run.

    Panels share the y axis so DP and non-private bars compare directly.
    """
    runs = [r for r in runs if any(as_number(x.get("wall_s")) is not None for x in r.rounds)]
    if not runs:
        return None
    fig, axes = _figure(len(runs))
    top = 0.0
    for ax, run in zip(axes, runs, strict=True):
        xs = [int(r.get("round", i + 1)) for i, r in enumerate(run.rounds)]
        bottom = [0.0] * len(xs)
        parts = {}
        for name in PHASES:
            parts[name] = [as_number((r.get("phase_s") or {}).get(name)) or 0.0 for r in run.rounds]
        # Whatever the phases do not cover (checkpointing, logging) is drawn as "other".
        parts["other"] = [
            max(0.0, (as_number(r.get("wall_s")) or 0.0) - sum(parts[p][i] for p in PHASES))
            for i, r in enumerate(run.rounds)
        ]
        for name, vals in parts.items():
            if any(v > 0 for v in vals):
                ax.bar(xs, vals, bottom=bottom, color=_PHASE_COLORS[name], label=name.replace("_", " "))
                bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        ax.set_title(run.label)
        _round_axis(ax)
        ax.legend(fontsize=7, loc="upper center", ncol=2)
        top = max(top, max(bottom, default=0.0))
    # Shared y with headroom for the legend above the tallest bar.
    axes[0].set_ylim(0, 1.35 * top if top > 0 else 1.0)
    axes[0].set_ylabel("seconds per round")
    return _save(fig, path)


def plot_privacy_utility(summaries: list[ModeSummary], path: str | Path) -> Path | None:
    """Final test Dice against epsilon for the private runs, non-private runs as horizontal lines.

    Needs at least two private runs (a sweep) with both a test Dice and an epsilon; otherwise returns None.
    """
    points = sorted(
        (s.max_epsilon if s.max_epsilon is not None else s.server_epsilon, s.final_test_dice, s.label)
        for s in summaries
        if s.is_private and s.final_test_dice is not None
    )
    points = [p for p in points if p[0] is not None and math.isfinite(p[0])]
    if len(points) < 2:  # one point is no curve; the summary table already holds it
        return None
    fig, axes = _figure(1, width=5.0, height=3.6)
    ax = axes[0]
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color="#d62728", label="DP runs")
    for eps, dice, label in points:
        ax.annotate(label, (eps, dice), fontsize=7, xytext=(3, 3), textcoords="offset points")
    styles = iter(["--", ":", "-."])
    for s in summaries:
        if not s.is_private and s.final_test_dice is not None:
            ax.axhline(s.final_test_dice, ls=next(styles, "--"), color="k", lw=1, label=s.label)
    ax.set_xscale("log")
    ax.set_xlabel("epsilon (largest over sites)")
    ax.set_ylabel("final test Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)
