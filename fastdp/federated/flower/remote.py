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

from fastdp.federated.flower.records import state_to_record, update_from_content
from fastdp.federated.simulation import Simulation, update_note
from fastdp.federated.site import DPConfig
from fastdp.federated.strategies import Strategy

__all__ = ["FlowerSimulation", "RemoteSite"]

log = logging.getLogger("fastdp.federated.flower")


class RemoteSite:
    """The server's view of a site behind a SuperNode: what the Simulation asks a Site, from its replies.

    Holds the node id, the site's size and DP settings (from its query reply), and its latest
    epsilon and budget status (from its latest update).
    """

    def __init__(self, node_id: int, info: Mapping, metrics: Mapping) -> None:
        self.node_id = int(node_id)
        self.site_id = str(info["site-id"])
        self.partition_id = int(info["partition-id"])
        self.num_samples = int(metrics["num-samples"])
        self._repr = str(info["repr"])
        self.has_val = bool(info["has-val"])
        budget = float(info["epsilon-budget"]) or None
        # Only the budget is read on the server (for the "site stops" message).
        self.dp = DPConfig(noise_multiplier=0.0, epsilon_budget=budget) if info["dp"] else None
        # As the site declares it (the server cannot check; the report says which runs are not private).
        self.noise_is_private = bool(info.get("noise-private", True)) if info["dp"] else None
        self._epsilon = float(metrics.get("epsilon", 0.0))
        self._within_budget = bool(metrics["within-budget"])
        self.state_path = None

    @property
    def engine(self):
        """Not None exactly when the site trains with DP (the Simulation reads only that)."""
        return None if self.dp is None else self

    def epsilon(self) -> float:
        """The site's epsilon spent so far, as last reported (inf for a non-DP site, as Site does)."""
        return self._epsilon if self.dp is not None else math.inf

    def within_budget(self) -> bool:
        """Whether the site can take another round within its epsilon budget, as last reported."""
        return self._within_budget

    def record_update(self, metrics: Mapping) -> None:
        """Takes the epsilon and budget status from a train reply's metrics."""
        if "epsilon" in metrics:
            self._epsilon = float(metrics["epsilon"])
        self._within_budget = bool(metrics["within-budget"])

    def state_dict(self) -> dict:
        """A placeholder: the site's state lives at the site."""
        # The site's real state stays at the site; a server checkpoint only names it.
        return {"site_id": self.site_id, "remote": True}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore on the server (see state_dict)."""
        pass

    def __repr__(self) -> str:
        return self._repr


class FlowerSimulation(Simulation):
    """A Simulation whose sites are RemoteSites: local training and validation go out as Flower messages.

    Only the two phases that talk to sites are replaced (all selected sites are asked at once,
    replies are used in selection order so aggregation sums in the same order as in-process);
    selection, budgets, screening, aggregation, test evaluation and the history are Simulation's.
    """

    def __init__(self, sites: list[RemoteSite], strategy: Strategy, model_fn, *, grid: Grid, timeout: float, **kw):
        super().__init__(sites, strategy, model_fn, **kw)  # type: ignore[arg-type]
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

    def _local_phase(self, round: int, record: dict) -> list:
        # The same budget check and selection as Simulation, on the sites' reported status.
        selected = self._select_sites(round, record)
        config = {**self.strategy.site_config(round), "round": round}
        t0 = time.perf_counter()
        replies = self._ask(selected, "train", self._global_content(config), round)
        dt = time.perf_counter() - t0  # sites train in parallel: each one's time is the phase's
        updates = []
        for sid in selected:
            reply, error = replies[sid], None
            if reply is None:
                error = f"no reply within {self.timeout:g} s"
            elif reply.has_error():
                error = f"Flower error {reply.error.code}: {reply.error.reason}"
            elif "error" in reply.content:
                err = reply.content["error"]
                if err["kind"] == "budget":
                    self.stopped_budget.append(sid)
                    record["failed"].append({"site": sid, "error": err["message"]})
                    log.warning("site %s refused a step beyond its budget: %s", sid, err["message"])
                    continue
                error = err["message"]
            if error is None:
                try:
                    update = update_from_content(reply.content, sid)
                    self.sites[sid].record_update(reply.content["metrics"])
                except Exception as e:  # a malformed reply is a failed site, not a failed round
                    error = f"malformed reply: {type(e).__name__}: {e}"
            if error is not None:
                record["failed"].append({"site": sid, "error": error})
                log.error("site %s failed in round %d: %s", sid, round, error)
                self._say(f"  site {sid} FAILED: {error}")
                continue
            record["participants"].append(sid)
            record["sites"][sid].update(participated=True, train_loss=update.train_loss, steps=update.steps, local_s=dt)
            updates.append(update)
            self._say(f"  site {sid}: {update.steps} steps{update_note(update)}")
        return updates

    def _evaluate(self, record: dict) -> None:
        # A site without validation data answers {} (as Site.evaluate does): no message needed.
        with_val = [sid for sid, s in self.sites.items() if s.has_val]
        replies = self._ask(with_val, "evaluate", self._global_content(), record["round"])
        for sid in self.sites:
            reply = replies.get(sid)
            metrics = {} if reply is None or reply.has_error() else dict(reply.content["metrics"])
            record["sites"][sid]["val_dice"] = metrics.get("dice")
            record["sites"][sid]["val_loss"] = metrics.get("loss")
        self._evaluate_test(record)
