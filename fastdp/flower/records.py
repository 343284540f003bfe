"""What crosses the wire: model states and SiteUpdates as Flower records, exactly (numpy .npy bytes)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fastdp.federated.site import Site, SiteUpdate

__all__ = ["record_to_state", "state_to_record", "update_from_content", "update_to_content"]


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A state_dict (or an update's delta) as an ArrayRecord (numpy .npy bytes: dtype and shape kept exactly)."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Inverse of state_to_record (same key order)."""
    return {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()}


def update_to_content(update: SiteUpdate, site: Site) -> RecordDict:
    """A site's reply to a train message: the delta, its metrics, its budget status and its id."""
    metrics = {
        "num-samples": int(update.num_samples),
        "steps": int(update.steps),
        # the server's budget check for the next round (Simulation asks Site.within_budget())
        "within-budget": int(site.within_budget()),
    }
    if update.train_loss is not None:  # a DP site does not release its (un-noised) training loss
        metrics["train-loss"] = float(update.train_loss)
    if update.epsilon is not None:
        metrics["epsilon"] = float(update.epsilon)
    return RecordDict(
        {
            "delta": state_to_record(update.delta),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"site-id": site.site_id}),
        }
    )


def update_from_content(content: RecordDict, site_id: str) -> SiteUpdate:
    """The SiteUpdate in a train reply; ValueError when it comes from another site than ``site_id``."""
    m = content["metrics"]
    got = content["site"]["site-id"]
    if got != site_id:
        raise ValueError(f"reply from site {got!r} where {site_id!r} was asked")
    return SiteUpdate(
        site_id=site_id,
        delta=record_to_state(content["delta"]),
        num_samples=int(m["num-samples"]),
        steps=int(m["steps"]),
        train_loss=float(m["train-loss"]) if "train-loss" in m else None,
        epsilon=float(m["epsilon"]) if "epsilon" in m else None,
    )
