"""fastdp's round loop with remote sites: RemoteSite (the server's view of a SuperNode) and FlowerSimulation.

FlowerSimulation is a :class:`~fastdp.federated.Simulation` whose sites are behind Flower
SuperNodes: selection, budgets, screening, aggregation, test evaluation and the history are
Simulation's own; only the phases that talk to sites go out as Flower messages over a Grid.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping

from flwr.app import ConfigRecord, RecordDict
from flwr.serverapp import Grid

from fastdp.federated.records import TrainResult
from fastdp.federated.simulation import Simulation
from fastdp.federated.site import site_releases
from fastdp.federated.strategies import Strategy
from fastdp.flower.records import state_to_record, update_from_content

__all__ = ["FlowerSimulation", "RemoteSite"]

log = logging.getLogger("fastdp.flower")


class RemoteSite:
    """The server's view of a site behind a SuperNode (a FederatedSite, from the site's replies).

    Holds the node id, the site's size and DP settings (from its registration query), and its
    latest epsilon and budget status (from its latest update). Training and evaluation are
    messages (FlowerSimulation.train_sites / evaluate_sites), never calls on this object.
    """

    def __init__(self, node_id: int, info: Mapping, metrics: Mapping) -> None:
        self.node_id = int(node_id)
        self.site_id = str(info["site-id"])
        self.partition_id = int(info["partition-id"])
        self.num_samples = int(metrics["num-samples"])
        self._repr = str(info["repr"])
        self.has_val = bool(info["has-val"])
        self._private = bool(info["dp"])
        self._budget = (float(info["epsilon-budget"]) or None) if self._private else None
        # As the site declares it (the server cannot check; the report says which runs are not private).
        self._noise_private = bool(info.get("noise-private", True)) if self._private else None
        self._epsilon = float(metrics.get("epsilon", 0.0))
        self._within_budget = bool(metrics["within-budget"])

    @property
    def is_private(self) -> bool:
        return self._private

    @property
    def noise_is_private(self) -> bool | None:
        return self._noise_private

    @property
    def epsilon_budget(self) -> float | None:
        return self._budget

    def epsilon(self) -> float:
        """The site's epsilon spent so far, as last reported (inf for a non-DP site, as Site does)."""
        return self._epsilon if self._private else math.inf

    def within_budget(self) -> bool:
        """Whether the site can take another round within its epsilon budget, as last reported."""
        return self._within_budget

    def releases(self) -> list[str]:
        return site_releases(self._private)

    def record_update(self, metrics: Mapping) -> None:
        """Takes the epsilon and budget status from a train reply's metrics."""
        if "epsilon" in metrics:
            self._epsilon = float(metrics["epsilon"])
        self._within_budget = bool(metrics["within-budget"])

    def local_update(self, global_state, round: int = 0, config: dict | None = None):
        raise TypeError(f"site {self.site_id!r} is remote: FlowerSimulation.train_sites asks it by message")

    def evaluate(self, global_state) -> dict[str, float]:
        raise TypeError(f"site {self.site_id!r} is remote: FlowerSimulation.evaluate_sites asks it by message")

    def persist_state_to(self, path) -> None:
        """Nothing on the server: the site keeps its own state file at the site (its node's state-dir)."""

    def state_dict(self) -> dict:
        """Only the site's name: its real state stays at the site."""
        return {"site_id": self.site_id, "remote": True}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore on the server (see state_dict)."""

    def __repr__(self) -> str:
        return self._repr


class FlowerSimulation(Simulation):
    """A Simulation whose sites are RemoteSites: local training and validation go out as Flower messages.

    Only the two hooks that talk to sites are replaced (train_sites, evaluate_sites: all sites are
    asked at once, replies are used in selection order so aggregation sums in the same order as
    in-process); selection, budgets, book-keeping, screening, aggregation, test evaluation and the
    history are Simulation's.
    """

    def __init__(self, sites: list[RemoteSite], strategy: Strategy, model_fn, *, grid: Grid, timeout: float, **kw):
        super().__init__(sites, strategy, model_fn, **kw)
        self.grid, self.timeout = grid, float(timeout)

    def _ask(self, sids: list[str], message_type: str, content: Callable[[], RecordDict], round: int) -> dict:
        """Sends one message per site and waits; {site_id: reply Message or None when none came back}."""
        msgs = {
            sid: self.grid.create_message(content(), message_type, self.sites[sid].node_id, str(round)) for sid in sids
        }
        replies = list(self.grid.send_and_receive(list(msgs.values()), timeout=self.timeout)) if msgs else []
        by_node = {r.metadata.src_node_id: r for r in replies}
        return {sid: by_node.get(self.sites[sid].node_id) for sid in sids}

    def _global_content(self, extra: dict | None = None) -> Callable[[], RecordDict]:
        def make() -> RecordDict:
            records = {"global": state_to_record(self.global_state)}
            if extra is not None:
                records["config"] = ConfigRecord(extra)
            return RecordDict(records)

        return make

    def train_sites(self, site_ids: list[str], round: int, config: dict) -> dict[str, TrainResult]:
        t0 = time.perf_counter()
        replies = self._ask(site_ids, "train", self._global_content({**config, "round": round}), round)
        dt = time.perf_counter() - t0  # sites train in parallel: each one's time is the phase's
        return {sid: self._train_result(sid, replies[sid], dt) for sid in site_ids}

    def _train_result(self, sid: str, reply, seconds: float) -> TrainResult:
        if reply is None:
            return TrainResult(error=f"no reply within {self.timeout:g} s")
        if reply.has_error():
            return TrainResult(error=f"Flower error {reply.error.code}: {reply.error.reason}")
        if "error" in reply.content:
            err = reply.content["error"]
            return TrainResult(error=err["message"], budget_stop=err["kind"] == "budget")
        try:
            update = update_from_content(reply.content, sid)
            self.sites[sid].record_update(reply.content["metrics"])
        except Exception as e:  # a malformed reply is a failed site, not a failed round
            return TrainResult(error=f"malformed reply: {type(e).__name__}: {e}")
        return TrainResult(update=update, seconds=seconds)

    def evaluate_sites(self, site_ids: list[str]) -> dict[str, dict[str, float]]:
        # A site without validation data answers {} (as Site.evaluate does): no message needed.
        with_val = [sid for sid in site_ids if self.sites[sid].has_val]
        replies = self._ask(with_val, "evaluate", self._global_content(), len(self.history.rounds) + 1)
        out = {}
        for sid in site_ids:
            reply = replies.get(sid)
            out[sid] = {} if reply is None or reply.has_error() else dict(reply.content["metrics"])
        return out
