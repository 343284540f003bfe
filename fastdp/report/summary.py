"""Reading a run folder and summarising each run's history.json (schema: the federated contract).

A run folder holds one sub-folder per run (``nonprivate/``, ``dp/``, ``dp_eps1/``, ...), each
with a ``history.json``; a folder that itself holds ``history.json`` is read as a single run.
Every value may be missing or null (no test set, a non-private site's epsilon, a site that
never took part): summaries then hold None, never raise.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from fastdp.federated.records import RoundRecord, SiteRecord

__all__ = [
    "ModeSummary",
    "RunHistory",
    "as_number",
    "find_runs",
    "load_history",
    "site_record",
    "summarize",
    "summarize_all",
]

# Runs are listed non-private first (the baseline every ratio refers to), then DP runs.
_ORDER = {"centralised": 0, "nonprivate": 1, "dp": 2}
PHASES = ("local_training", "aggregation", "evaluation")


@dataclass
class RunHistory:
    """One run: ``label`` is its folder name, ``mode`` the history's own mode field."""

    label: str
    path: Path
    mode: str
    rounds: list[RoundRecord]
    config: dict = field(default_factory=dict)
    privacy: dict = field(default_factory=dict)

    @property
    def sites(self) -> list[str]:
        """Site names in order of first appearance."""
        seen: dict[str, None] = {}
        for r in self.rounds:
            for s in (r.get("sites") or {}).keys():
                seen.setdefault(s, None)
        return list(seen)


@dataclass
class ModeSummary:
    """Headline numbers of one run (None where the history has nothing to say).

    Attributes:
        final_test_dice: test Dice of the last round that evaluated on the test set.
        site_val_dice: per site, validation Dice of its last evaluated round.
        site_test_dice: per part of the test set (each site's own held-out patients, or the test
            site), the final global model's test Dice; empty when the test set is not split.
        site_epsilon: per site, its epsilon after its last update (None: non-private).
        server_epsilon: DP-FedAvg user-level epsilon after the last round.
        mean_round_s / total_s: wall-clock seconds per round (mean) and in all.
        mean_phase_s: mean seconds per round of each phase (local_training, aggregation, evaluation).
        time_ratio: mean_round_s over the non-private run's (None without one, or for itself).
        site_status: per site, a short note: rounds taken part, rejections, failures, budget stop.
        not_private_reasons: why a run that spends epsilon is nevertheless not private (e.g. its
            noise was reproducible from the config); empty when its guarantee holds.
        releases: per site, what it sent the server (the history's privacy record).
    """

    label: str
    mode: str
    rounds: int
    final_test_dice: float | None
    site_val_dice: dict[str, float | None]
    site_epsilon: dict[str, float | None]
    server_epsilon: float | None
    mean_round_s: float | None
    total_s: float | None
    mean_phase_s: dict[str, float]
    time_ratio: float | None = None
    site_status: dict[str, str] = field(default_factory=dict)
    not_private_reasons: list[str] = field(default_factory=list)
    releases: dict[str, list[str]] = field(default_factory=dict)
    site_test_dice: dict[str, float | None] = field(default_factory=dict)

    @property
    def is_private(self) -> bool:
        return self.server_epsilon is not None or any(e is not None for e in self.site_epsilon.values())

    @property
    def max_epsilon(self) -> float | None:
        """The largest per-site epsilon (the run's sample-level guarantee), or None."""
        eps = [e for e in self.site_epsilon.values() if e is not None]
        return max(eps) if eps else None


def as_number(x) -> float | None:
    """A finite-or-inf float, or None for null / missing / non-numeric."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return None if math.isnan(x) else float(x)


def load_history(path: str | Path, label: str | None = None) -> RunHistory:
    """Reads one history.json (``path`` is the file or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "history.json"
    data = json.loads(path.read_text())
    raw = [r for r in data.get("rounds") or [] if isinstance(r, dict)]
    rounds = [RoundRecord.from_dict({"round": i + 1, **r}) for i, r in enumerate(raw)]
    rounds.sort(key=lambda r: r.round)
    return RunHistory(
        label=label or path.parent.name,
        path=path,
        mode=str(data.get("mode") or label or path.parent.name),
        rounds=rounds,
        config=data.get("config") or {},
        privacy=data.get("privacy") or {},
    )


def find_runs(run_dir: str | Path) -> list[RunHistory]:
    """Every run in a run folder, non-private first; unreadable histories are skipped."""
    run_dir = Path(run_dir)
    candidates = [run_dir] if (run_dir / "history.json").is_file() else []
    candidates += sorted(p for p in run_dir.iterdir() if (p / "history.json").is_file()) if run_dir.is_dir() else []
    runs = []
    for folder in candidates:
        try:
            runs.append(load_history(folder, label=folder.name))
        except (OSError, ValueError):  # a run killed while writing its history: report the rest
            continue

    def order(r: RunHistory) -> tuple:
        key = r.label.split("_eps")[0]
        eps = r.label.split("_eps")[1] if "_eps" in r.label else ""
        try:
            eps_val = float(eps) if eps else 0.0
        except ValueError:
            eps_val = 0.0
        return (_ORDER.get(key, 3), eps_val, r.label)

    return sorted(runs, key=order)


def _last(rounds: list[RoundRecord], get) -> float | None:
    for r in reversed(rounds):
        v = as_number(get(r))
        if v is not None:
            return v
    return None


def site_record(r: RoundRecord, site: str) -> SiteRecord:
    """The round's record of `site` (an empty SiteRecord when the round does not list it)."""
    return r.sites.get(site) or SiteRecord()


def _status(run: RunHistory, site: str) -> str:
    taken = sum(1 for r in run.rounds if site_record(r, site).get("participated"))
    notes = [f"{taken}/{len(run.rounds)} rounds"]
    rejected = [x for r in run.rounds for x in r.get("rejected") or [] if x.get("site") == site]
    failed = [x for r in run.rounds for x in r.get("failed") or [] if x.get("site") == site]
    stopped = [r.get("round") for r in run.rounds if site in (r.get("stopped_budget") or [])]
    if rejected:
        notes.append(f"{len(rejected)} rejected ({rejected[-1].get('reason', '?')})")
    if failed:
        notes.append(f"{len(failed)} failed ({failed[-1].get('error', '?')})")
    if stopped:
        notes.append(f"budget reached at round {stopped[0]}")
    return "; ".join(notes)


def _site_test_dice(rounds: list[RoundRecord]) -> dict[str, float | None]:
    """Each test part's Dice in the last round that evaluated the split test set."""
    for r in reversed(rounds):
        by_site = (r.get("test") or {}).get("by_site")
        if by_site:
            return {name: as_number((m or {}).get("dice")) for name, m in by_site.items()}
    return {}


def summarize(run: RunHistory) -> ModeSummary:
    """Headline numbers of one run."""
    walls = [w for w in (as_number(r.get("wall_s")) for r in run.rounds) if w is not None]
    phases = {}
    for name in PHASES:
        vals = [v for v in (as_number((r.get("phase_s") or {}).get(name)) for r in run.rounds) if v is not None]
        if vals:
            phases[name] = statistics.fmean(vals)
    return ModeSummary(
        label=run.label,
        mode=run.mode,
        rounds=len(run.rounds),
        final_test_dice=_last(run.rounds, lambda r: (r.get("test") or {}).get("dice")),
        site_val_dice={s: _last(run.rounds, lambda r, s=s: site_record(r, s).get("val_dice")) for s in run.sites},
        site_epsilon={s: _last(run.rounds, lambda r, s=s: site_record(r, s).get("epsilon")) for s in run.sites},
        server_epsilon=_last(run.rounds, lambda r: r.get("server_epsilon")),
        mean_round_s=statistics.fmean(walls) if walls else None,
        total_s=sum(walls) if walls else None,
        mean_phase_s=phases,
        site_status={s: _status(run, s) for s in run.sites},
        # "no DP" is what a non-private run is anyway; the report flags DP runs whose guarantee fails.
        not_private_reasons=[r for r in run.privacy.get("not_private_reasons", []) if not r.startswith("no DP")],
        releases=dict(run.privacy.get("releases") or {}),
        site_test_dice=_site_test_dice(run.rounds),
    )


def summarize_all(runs: list[RunHistory]) -> list[ModeSummary]:
    """Summaries of every run, with each run's round time relative to the non-private run."""
    out = [summarize(r) for r in runs]
    base = next((s for s in out if s.label == "nonprivate"), None) or next(
        (s for s in out if s.mode == "nonprivate" and s.label != "centralised"), None
    )
    if base is not None and base.mean_round_s:
        for s in out:
            if s is not base and s.mean_round_s is not None:
                s.time_ratio = s.mean_round_s / base.mean_round_s
    return out
