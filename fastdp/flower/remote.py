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
    history are Simulation's. A site whose node is offline, or goes away while asked, is a failed
    site for that round (recorded in the history); the others go on, and it is asked again in the
    next round.

    Args:
        timeout: seconds to wait for replies (a site not back by then has failed this round).
        poll_s: seconds between pulls of replies; node_check_s: between checks of the nodes' liveness.
    """

    def __init__(
        self,
        sites: list[RemoteSite],
        strategy: Strategy,
        model_fn,
        *,
        grid: Grid,
        timeout: float,
        poll_s: float = 1.0,
        node_check_s: float = 5.0,
        **kw,
    ):
        super().__init__(sites, strategy, model_fn, **kw)
        self.grid, self.timeout = grid, float(timeout)
        self.poll_s, self.node_check_s = float(poll_s), float(node_check_s)

    def _online_nodes(self) -> dict[int, str]:
        """{node id: when the SuperLink last activated it} for the nodes online now."""
        get_nodes = getattr(self.grid, "get_nodes", None)
        if get_nodes is None:  # a Grid without node details: ids only
            return {int(n): "" for n in self.grid.get_node_ids()}
        return {int(n.node_id): str(n.last_activated_at) for n in get_nodes()}

    def _ask(self, sids: list[str], message_type: str, content: Callable[[], RecordDict], round: int) -> dict:
        """Sends one message per site and waits; {site_id: reply Message, or why none came (str)}.

        Replies are matched to messages by id. A site whose node is offline is not sent anything;
        a site whose node goes offline or restarts while its message is out (its SuperNode was
        killed: the message died with it) is failed at once instead of waiting for the timeout.
        """
        self.refresh_nodes()
        online = self._online_nodes()
        out: dict = {sid: "its node is offline" for sid in sids}
        send = [sid for sid in sids if self.sites[sid].node_id in online]
        msgs = [
            self.grid.create_message(content(), message_type, self.sites[sid].node_id, str(round), self.timeout)
            for sid in send
        ]
        ids = list(self.grid.push_messages(msgs)) if msgs else []
        waiting = {mid: sid for sid, mid in zip(send, ids, strict=True) if mid}
        for sid in set(send) - set(waiting.values()):
            out[sid] = "the message could not be sent"
        deadline = time.monotonic() + self.timeout
        next_check = time.monotonic() + self.node_check_s
        while waiting:
            for reply in self.grid.pull_messages(list(waiting)):
                sid = waiting.pop(reply.metadata.reply_to_message_id, None)
                if sid is not None:
                    out[sid] = reply
            if not waiting:
                break
            now = time.monotonic()
            if now > deadline:
                for sid in waiting.values():
                    out[sid] = f"no reply within {self.timeout:g} s"
                break
            if now >= next_check:
                current = self._online_nodes()
                for mid, sid in list(waiting.items()):
                    node = self.sites[sid].node_id
                    if current.get(node) != online[node]:
                        why = "went offline" if node not in current else "restarted"
                        out[sid] = f"its node {why} while the message was out"
                        del waiting[mid]
                next_check = now + self.node_check_s
            time.sleep(self.poll_s)
        return out

    def refresh_nodes(self) -> None:
        """Maps sites to nodes that joined since the last message (a restarted SuperNode without a registered key).

        With SuperNode authentication a restarted node keeps its registered node id and nothing
        changes; without it, it comes back under a new id and tells which site it is when asked.
        """
        known = {s.node_id for s in self.sites.values()}
        new = [n for n in self.grid.get_node_ids() if n not in known]
        if not new:
            return
        by_partition = {s.partition_id: s for s in self.sites.values()}
        msgs = [self.grid.create_message(RecordDict(), "query", n, "connect", self.timeout) for n in new]
        for reply in self.grid.send_and_receive(msgs, timeout=min(self.timeout, 120.0)):
            if reply.has_error():
                continue
            info = reply.content["site"]
            site = by_partition.get(int(info["partition-id"]))
            if site is not None and site.site_id == str(info["site-id"]):
                log.info("site %s is now node %d (was %d)", site.site_id, reply.metadata.src_node_id, site.node_id)
                site.node_id = int(reply.metadata.src_node_id)

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
        if isinstance(reply, str):
            return TrainResult(error=reply)
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
            ok = reply is not None and not isinstance(reply, str) and not reply.has_error()
            out[sid] = dict(reply.content["metrics"]) if ok else {}
        return out
