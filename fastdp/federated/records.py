"""Typed records of a federated run: what a round did, per site. Shared by the Simulation, the
Flower server (the same Simulation), the History files and the report.

A record is a dataclass; ``to_dict()`` is its JSON form (history.json) and ``from_dict`` reads it
back, tolerating keys an older history lacks. ``record["key"]`` and ``record.get("key")`` read
a field too, for scripts written against the plain dicts of earlier versions.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RoundRecord", "SiteRecord", "TrainResult"]


class _ReadsLikeADict:
    """``rec["field"]`` and ``rec.get("field", default)`` for a dataclass record."""

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


def _known(cls, d: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


@dataclass
class SiteRecord(_ReadsLikeADict):
    """One site in one round.

    Attributes:
        participated: its update was accepted and aggregated.
        train_loss: mean training loss it reported (None: not reported, always for a DP site).
        val_dice, val_loss: the global model on its validation slices after the round (None: not evaluated).
        epsilon: its sample-level epsilon after the round (None: non-private).
        steps: local steps it took; num_samples: its training-set size; local_s: seconds of local training.
    """

    participated: bool = False
    train_loss: float | None = None
    val_dice: float | None = None
    val_loss: float | None = None
    epsilon: float | None = None
    steps: int = 0
    num_samples: int = 0
    local_s: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SiteRecord:
        return cls(**_known(cls, d))


@dataclass
class RoundRecord(_ReadsLikeADict):
    """One round of a federated run.

    Attributes:
        round: its number (1-based).
        sites: {site_id: SiteRecord} for every site of the federation.
        participants: the sites whose updates were aggregated.
        rejected: [{"site", "reason"}] updates refused by the server's screening.
        failed: [{"site", "error"}] sites that did not deliver an update.
        stopped_budget: sites that no longer take part (epsilon budget).
        test: {"dice", "loss"} of the global model on the test set, or None.
        server_epsilon: DP-FedAvg's user-level epsilon after the round (None: no server noise).
        phase_s: seconds per phase ("local_training", "aggregation", "evaluation"); wall_s: the round's seconds.
    """

    round: int
    sites: dict[str, SiteRecord] = field(default_factory=dict)
    participants: list[str] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    stopped_budget: list[str] = field(default_factory=list)
    test: dict | None = None
    server_epsilon: float | None = None
    phase_s: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0

    @classmethod
    def start(cls, round: int, site_sizes: dict[str, int]) -> RoundRecord:
        """An empty record for `round` with one SiteRecord per site."""
        return cls(round, {sid: SiteRecord(num_samples=n) for sid, n in site_sizes.items()})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["sites"] = {sid: s.to_dict() for sid, s in self.sites.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RoundRecord:
        known = _known(cls, d)
        known["sites"] = {sid: SiteRecord.from_dict(s or {}) for sid, s in (d.get("sites") or {}).items()}
        for key in ("participants", "rejected", "failed", "stopped_budget"):
            known[key] = list(known.get(key) or [])
        known["phase_s"] = dict(known.get("phase_s") or {})
        return cls(**known)


@dataclass
class TrainResult:
    """What asking one site to train gave: an update, or why there is none.

    Attributes:
        update: the SiteUpdate (None when the site failed).
        error: why there is no update, as the server may record it (None on success).
        budget_stop: the site refused because the round would pass its epsilon budget.
        seconds: how long the site took.
    """

    update: Any = None
    error: str | None = None
    budget_stop: bool = False
    seconds: float = 0.0
