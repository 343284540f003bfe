"""Run history: one record per round (schema in docs/federated.md), written as JSON and CSV."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from fastdp.atomic import atomic_write_text
from fastdp.federated.records import RoundRecord

CSV_COLUMNS = [
    "round",
    "site",
    "participated",
    "train_loss",
    "val_dice",
    "val_loss",
    "epsilon",
    "local_s",
    "test_dice",
    "site_test_dice",
    "server_epsilon",
    "round_wall_s",
]


def _json_safe(x):
    """NaN and inf become null (JSON has neither)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


@dataclass
class History:
    """Per-round records of a federated run.

    rounds[i]: a RoundRecord (fastdp.federated.records: round, wall_s, phase_s, participants,
    rejected, failed, stopped_budget, test, server_epsilon, sites: {id: SiteRecord}); its JSON form
    is RoundRecord.to_dict(). Times in seconds. A DP site's train_loss is null: it does not
    release it (docs/privacy.md).

    privacy: {"private": whether every DP release of the run is covered by its guarantee,
    "not_private_reasons": [...], "site_noise": {id: "os-csprng" | "reproducible" | null},
    "server_noise": "os-csprng" | "reproducible" | null, "releases": {id: [what the site sends]}}.
    """

    config: dict = field(default_factory=dict)
    mode: str = "nonprivate"
    rounds: list[RoundRecord] = field(default_factory=list)
    privacy: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        rounds = [r.to_dict() for r in self.rounds]
        return _json_safe({"config": self.config, "mode": self.mode, "privacy": self.privacy, "rounds": rounds})

    @classmethod
    def from_dict(cls, d: dict) -> History:
        return cls(
            config=d.get("config", {}),
            mode=d.get("mode", "nonprivate"),
            rounds=[RoundRecord.from_dict(r) for r in d.get("rounds", []) if isinstance(r, dict)],
            privacy=dict(d.get("privacy", {})),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> History:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def csv_text(self) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
        w.writeheader()
        for r in self.to_dict()["rounds"]:  # the JSON-safe form: NaN/inf already null
            test = r.get("test") or {}
            for site, s in sorted(r.get("sites", {}).items()):
                w.writerow(
                    {
                        "round": r["round"],
                        "site": site,
                        "participated": int(bool(s.get("participated"))),
                        "train_loss": s.get("train_loss"),
                        "val_dice": s.get("val_dice"),
                        "val_loss": s.get("val_loss"),
                        "epsilon": s.get("epsilon"),
                        "local_s": s.get("local_s"),
                        "test_dice": test.get("dice"),
                        "site_test_dice": ((test.get("by_site") or {}).get(site) or {}).get("dice"),
                        "server_epsilon": r.get("server_epsilon"),
                        "round_wall_s": r.get("wall_s"),
                    }
                )
        return buf.getvalue()

    def save(self, out_dir: str | os.PathLike) -> None:
        """Writes out_dir/history.json and out_dir/history.csv (atomically)."""
        out_dir = Path(out_dir)
        atomic_write_text(out_dir / "history.json", json.dumps(self.to_dict(), indent=1))
        atomic_write_text(out_dir / "history.csv", self.csv_text())

    def final(self, key: str = "dice") -> float | None:
        """The last round's test metric (None when there is none)."""
        for r in reversed(self.rounds):
            if r.test:
                return r.test.get(key)
        return None
