"""Synthetic histories in the federated contract's history.json schema."""

from __future__ import annotations

import json
from pathlib import Path

SITES = ("site_a", "site_b", "site_c")


def make_history(mode: str, rounds: int = 3, private: bool = False, wall: float = 10.0, with_test: bool = True) -> dict:
    """A history where val Dice of site k in round r is 0.5 + 0.1 r + 0.01 k and epsilon is r (private)."""
    out = []
    for r in range(1, rounds + 1):
        local = wall * 0.8
        out.append(
            {
                "round": r,
                "wall_s": wall,
                "phase_s": {"local_training": local, "aggregation": 0.1, "evaluation": wall * 0.15},
                "participants": list(SITES),
                "rejected": [],
                "failed": [],
                "stopped_budget": [],
                "test": {"dice": 0.4 + 0.1 * r, "loss": 1.0 / r} if with_test else None,
                "server_epsilon": None,
                "sites": {
                    s: {
                        "participated": True,
                        "train_loss": 1.0 / r,
                        "val_dice": 0.5 + 0.1 * r + 0.01 * k,
                        "val_loss": 1.0 / r,
                        "epsilon": float(r) + k if private else None,
                        "steps": 10,
                        "num_samples": 100,
                        "local_s": local / 3,
                    }
                    for k, s in enumerate(SITES)
                },
            }
        )
    return {"config": {"mode": mode}, "mode": mode, "rounds": out}


def write_run(run_dir: Path, label: str, history: dict) -> Path:
    folder = run_dir / label
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "history.json").write_text(json.dumps(history))
    return folder
