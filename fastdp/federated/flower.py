"""Flower adapter (flwr 1.42 Message API): fastdp Sites as Flower ClientApps, the fastdp Strategy in a ServerApp.

Both the in-process :class:`~fastdp.federated.Simulation` and the Flower deployment build their
Sites, Strategy, model and test set from one flat *run config* (``DEFAULT_RUN_CONFIG``) through
the same builder functions (:func:`build_site`, :func:`build_strategy`, ...), so the two paths
train identical Sites. The ServerApp runs fastdp's own round loop (a :class:`Simulation` whose
sites are remote): select -> send the global state and ``site_config`` -> receive SiteUpdates ->
``screen_updates`` -> ``strategy.aggregate`` -> evaluate, and writes the same history files.

Flower starts a fresh ClientApp process for every message, so a site's optimizer, accountant,
sampler RNG and noise stream live in a per-site state file (``state-dir``); it is written
atomically, and before the reply with the update leaves the site (privacy spent is never lost).

    run = launch_local(num_nodes=3, run_config={"rounds": 2, "dp": True})   # all on 127.0.0.1
    run.global_state, run.history

Separate machines: docs/flower.md. Needs the extra: ``pip install fastdp[flower]``.
"""

from __future__ import annotations

import json
import logging
import math
import os

# Flower sends telemetry and checks for updates unless told not to; fastdp keeps it offline.
# These must be set before flwr is imported and are inherited by every process started here.
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
os.environ.update(OFFLINE_ENV)

import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable, Mapping  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import ConcatDataset, Dataset  # noqa: E402

try:
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
    from flwr.clientapp import ClientApp  # noqa: E402
    from flwr.serverapp import Grid, ServerApp  # noqa: E402
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("fastdp.federated.flower needs Flower: pip install 'fastdp[flower]' (flwr==1.42.*)") from e

from fastdp.accounting import PrivacyBudgetExceeded  # noqa: E402
from fastdp.federated.atomic import atomic_torch_save  # noqa: E402
from fastdp.federated.simulation import Simulation  # noqa: E402
from fastdp.federated.site import DPConfig, Site, SiteUpdate, evaluate_model  # noqa: E402
from fastdp.federated.strategies import DPFedAvg, FedAvg, FedProx, Strategy  # noqa: E402

log = logging.getLogger("fastdp.federated.flower")

__all__ = [
    "DEFAULT_RUN_CONFIG",
    "OFFLINE_ENV",
    "FlowerRun",
    "FlowerRunError",
    "build_model_fn",
    "build_simulation",
    "build_site",
    "build_strategy",
    "build_test_data",
    "client_app",
    "launch_local",
    "resolve_config",
    "server_app",
    "write_app",
]

# --------------------------------------------------------------------------------------------
# Run config and the shared builders
# --------------------------------------------------------------------------------------------

#: Every key the Flower app and build_simulation understand (Flower run configs are flat
#: key -> bool/int/float/str maps). 0 / "" mean "unset" where a value is optional.
DEFAULT_RUN_CONFIG: dict[str, bool | int | float | str] = {
    # federation
    "num-sites": 3,  # sites (= SuperNodes, partition-id 0..num-sites-1)
    "rounds": 2,
    "seed": 0,
    "eval-every": 1,
    # phantom data: site k is fastdp.data.site_profiles(num-sites, seed)[k]
    "image-size": 64,  # pixels (H = W)
    "train-size": 40,  # training slices per site
    "val-size": 8,  # validation slices per site (0: none)
    "test-size": 8,  # held-out test slices per site, evaluated at the server (0: none)
    # model: fastdp.models.UNet(1, 2, base_channels, depth)
    "base-channels": 4,
    "depth": 2,
    # local training (Site)
    "batch-size": 8,  # expected Poisson batch size
    "local-steps": 2,
    "lr": 0.1,
    "optimizer": "sgd",  # adam | sgd | sgdm
    # sample-level DP-SGD at every site (DPConfig)
    "dp": False,
    "noise-multiplier": 1.0,  # sigma (used when target-epsilon is 0)
    "target-epsilon": 0.0,  # > 0: calibrate sigma to reach it after `rounds` rounds
    "max-grad-norm": 1.0,  # C
    "delta": 1e-5,
    "epsilon-budget": 0.0,  # > 0: a site stops before a round that would pass it
    "accountant": "rdp",
    # server strategy
    "strategy": "fedavg",  # fedavg | fedprox | dp-fedavg
    "fraction-fit": 1.0,
    "min-sites": 1,
    "server-lr": 1.0,
    "proximal-mu": 0.01,  # FedProx
    "server-clip-norm": 1.0,  # DP-FedAvg S
    "server-noise-multiplier": 1.0,  # DP-FedAvg sigma
    "site-sample-rate": 1.0,  # DP-FedAvg q
    # update screening (validation.screen_updates); 0 disables
    "max-update-norm": 0.0,
    "outlier-factor": 100.0,
    # Flower deployment
    "state-dir": "",  # where each site keeps its state file (node config "state-dir" overrides)
    "out-dir": "",  # where the ServerApp writes global_state.pt and history.json/.csv
    "node-wait-s": 120.0,  # how long the ServerApp waits for num-sites SuperNodes
    "round-timeout-s": 3600.0,  # replies not back by then count as failed sites
}


def resolve_config(run_config: Mapping | None = None) -> dict:
    """DEFAULT_RUN_CONFIG updated with `run_config`; unknown keys and wrong types are errors."""
    cfg = dict(DEFAULT_RUN_CONFIG)
    for key, value in (run_config or {}).items():
        if key not in cfg:
            raise ValueError(f"unknown run config key {key!r}; known keys: {sorted(cfg)}")
        default = cfg[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ValueError(f"run config {key!r}: expected {type(default).__name__}, got {value!r}")
        cfg[key] = value
    if cfg["num-sites"] < 1 or cfg["rounds"] < 1:
        raise ValueError("run config: num-sites and rounds must be >= 1")
    return cfg


def build_model_fn(cfg: Mapping) -> Callable[[], nn.Module]:
    """The architecture: a 2-class fastdp U-Net on 1-channel slices."""
    from fastdp.models import UNet

    cfg = resolve_config(cfg)
    base, depth = int(cfg["base-channels"]), int(cfg["depth"])

    def model_fn() -> nn.Module:
        return UNet(1, 2, base_channels=base, depth=depth)

    return model_fn


# First phantom slice of each split: far apart, so train, validation and test never overlap.
_VAL_START, _TEST_START = 10**6, 2 * 10**6


def _profiles(cfg: Mapping) -> list:
    from fastdp.data import site_profiles

    return site_profiles(int(cfg["num-sites"]), int(cfg["seed"]))


def _dp_config(cfg: Mapping) -> DPConfig | None:
    if not cfg["dp"]:
        return None
    target = float(cfg["target-epsilon"])
    return DPConfig(
        noise_multiplier=None if target > 0 else float(cfg["noise-multiplier"]),
        target_epsilon=target if target > 0 else None,
        max_grad_norm=float(cfg["max-grad-norm"]),
        delta=float(cfg["delta"]),
        epsilon_budget=float(cfg["epsilon-budget"]) or None,
        accountant=str(cfg["accountant"]),
    )


def build_site(cfg: Mapping, partition_id: int, device: str | torch.device = "cpu") -> Site:
    """Site number `partition_id` (0-based) of the federation in `cfg`: phantom data of its scanner profile.

    Deterministic in (cfg, partition_id): the Flower ClientApp and build_simulation call this
    with the same arguments and get the same Site (data, sampling and noise seeds, sigma).
    """
    cfg = resolve_config(cfg)
    n = int(cfg["num-sites"])
    if not 0 <= partition_id < n:
        raise ValueError(f"partition-id {partition_id} out of range for num-sites={n}")
    from fastdp.data import PhantomDataset

    profile = _profiles(cfg)[partition_id]
    size, seed = int(cfg["image-size"]), int(cfg["seed"])
    train = PhantomDataset(profile, int(cfg["train-size"]), size, seed)
    val = PhantomDataset(profile, int(cfg["val-size"]), size, seed, start=_VAL_START) if cfg["val-size"] else None
    return Site(
        profile.name,
        train,
        val,
        build_model_fn(cfg),
        batch_size=int(cfg["batch-size"]),
        local_steps=int(cfg["local-steps"]),
        lr=float(cfg["lr"]),
        optimizer=str(cfg["optimizer"]),
        dp=_dp_config(cfg),
        seed=seed,
        planned_rounds=int(cfg["rounds"]),
        device=device,
    )


def build_strategy(cfg: Mapping) -> Strategy:
    """The server strategy named by cfg["strategy"]."""
    cfg = resolve_config(cfg)
    name = cfg["strategy"]
    common = dict(fraction_fit=float(cfg["fraction-fit"]), min_sites=int(cfg["min-sites"]))
    if name == "fedavg":
        return FedAvg(**common, server_lr=float(cfg["server-lr"]))
    if name == "fedprox":
        return FedProx(mu=float(cfg["proximal-mu"]), **common, server_lr=float(cfg["server-lr"]))
    if name == "dp-fedavg":
        return DPFedAvg(
            clip_norm=float(cfg["server-clip-norm"]),
            noise_multiplier=float(cfg["server-noise-multiplier"]),
            sample_rate=float(cfg["site-sample-rate"]),
            num_sites=int(cfg["num-sites"]),
            delta=float(cfg["delta"]),
            accountant=str(cfg["accountant"]),
            seed=int(cfg["seed"]),
            server_lr=float(cfg["server-lr"]),
        )
    raise ValueError(f"run config strategy {name!r}: expected 'fedavg', 'fedprox' or 'dp-fedavg'")


def build_test_data(cfg: Mapping) -> Dataset | None:
    """The held-out test set: test-size slices of every site's profile (None when test-size is 0)."""
    cfg = resolve_config(cfg)
    if not cfg["test-size"]:
        return None
    from fastdp.data import PhantomDataset

    size, seed = int(cfg["image-size"]), int(cfg["seed"])
    return ConcatDataset(
        [PhantomDataset(p, int(cfg["test-size"]), size, seed, start=_TEST_START) for p in _profiles(cfg)]
    )


def _screening(cfg: Mapping) -> dict:
    return dict(
        max_update_norm=float(cfg["max-update-norm"]) or None,
        outlier_factor=float(cfg["outlier-factor"]) or None,
    )


def build_simulation(run_config: Mapping | None = None, **kwargs) -> Simulation:
    """The in-process Simulation of the federation the Flower app runs for the same run config.

    kwargs go to Simulation (e.g. out_dir, checkpoint_dir, progress) and override the config.
    """
    cfg = resolve_config(run_config)
    sites = [build_site(cfg, k) for k in range(int(cfg["num-sites"]))]
    options = dict(
        test_data=build_test_data(cfg),
        rounds=int(cfg["rounds"]),
        seed=int(cfg["seed"]),
        eval_every=int(cfg["eval-every"]),
        config=_history_config(cfg),
        **_screening(cfg),
    )
    options.update(kwargs)
    return Simulation(sites, build_strategy(cfg), build_model_fn(cfg), **options)


def _history_config(cfg: Mapping) -> dict:
    # Paths differ between runs and machines; the history keeps what determines the result.
    return {k: v for k, v in cfg.items() if k not in ("state-dir", "out-dir", "node-wait-s", "round-timeout-s")}


# --------------------------------------------------------------------------------------------
# Records: what crosses the wire
# --------------------------------------------------------------------------------------------


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A state_dict (or an update's delta) as an ArrayRecord (numpy .npy bytes: dtype and shape kept exactly)."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Inverse of state_to_record (same key order)."""
    return {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()}


def _update_content(update: SiteUpdate, site: Site) -> RecordDict:
    metrics = {
        "num-samples": int(update.num_samples),
        "steps": int(update.steps),
        "train-loss": float(update.train_loss),
        # the server's budget check for the next round (Simulation asks Site.within_budget())
        "within-budget": int(site.within_budget()),
    }
    if update.epsilon is not None:
        metrics["epsilon"] = float(update.epsilon)
    return RecordDict(
        {
            "delta": state_to_record(update.delta),
            "metrics": MetricRecord(metrics),
            "site": ConfigRecord({"site-id": site.site_id}),
        }
    )


def _update_from_content(content: RecordDict, site_id: str) -> SiteUpdate:
    m = content["metrics"]
    got = content["site"]["site-id"]
    if got != site_id:
        raise ValueError(f"reply from site {got!r} where {site_id!r} was asked")
    return SiteUpdate(
        site_id=site_id,
        delta=record_to_state(content["delta"]),
        num_samples=int(m["num-samples"]),
        steps=int(m["steps"]),
        train_loss=float(m["train-loss"]),
        epsilon=float(m["epsilon"]) if "epsilon" in m else None,
    )


# --------------------------------------------------------------------------------------------
# ClientApp: one fastdp Site per SuperNode
# --------------------------------------------------------------------------------------------

client_app = ClientApp()


def _partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("the SuperNode needs --node-config 'partition-id=K' (0-based site number)")
    return int(context.node_config["partition-id"])


def _state_path(cfg: Mapping, context: Context, site_id: str) -> Path:
    # A site's own state directory may be set per SuperNode (each hospital its own disk).
    root = str(context.node_config.get("state-dir", "") or cfg["state-dir"])
    if not root:
        raise ValueError(
            "run config 'state-dir' (or node config 'state-dir') is required: Flower starts a new "
            "ClientApp process per message, and the site's optimizer, accountant and RNG state must persist"
        )
    # One file per run: a new run starts fresh, as a new Simulation does.
    return Path(root) / f"run-{context.run_id}" / f"{site_id}.pt"


def _open_site(context: Context) -> tuple[dict, Site]:
    """The node's Site with its saved state (if any); site.state_path set so local_update persists it."""
    cfg = resolve_config(context.run_config)
    site = build_site(cfg, _partition_id(context))
    site.state_path = _state_path(cfg, context, site.site_id)
    if site.state_path.exists():
        site.load_state_dict(torch.load(site.state_path, weights_only=False))
    return cfg, site


@client_app.query()
def _client_describe(msg: Message, context: Context) -> Message:
    """Tells the server which site this node is: id, partition, size, DP settings, budget status."""
    _, site = _open_site(context)
    info = {
        "site-id": site.site_id,
        "partition-id": _partition_id(context),
        "repr": repr(site),
        "dp": site.dp is not None,
        "has-val": site.val_data is not None and len(site.val_data) > 0,
        "epsilon-budget": 0.0 if site.dp is None or site.dp.epsilon_budget is None else site.dp.epsilon_budget,
    }
    metrics = {"num-samples": site.num_samples, "within-budget": int(site.within_budget())}
    if site.engine is not None:
        metrics["epsilon"] = site.epsilon()
    return Message(RecordDict({"site": ConfigRecord(info), "metrics": MetricRecord(metrics)}), reply_to=msg)


def _error_reply(msg: Message, kind: str, error: BaseException) -> Message:
    text = f"{type(error).__name__}: {error}"
    return Message(RecordDict({"error": ConfigRecord({"kind": kind, "message": text})}), reply_to=msg)


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    """Site.local_update from the received global state; replies with the SiteUpdate (delta + metrics)."""
    _, site = _open_site(context)
    global_state = record_to_state(msg.content["global"])
    config = dict(msg.content["config"])
    round = int(config.pop("round"))
    try:
        update = site.local_update(global_state, round, config)  # saves the site state before returning
    except Exception as e:
        # Steps taken before the failure spent privacy: keep them (the in-process site keeps them too).
        atomic_torch_save(site.state_dict(), site.state_path)
        log.error("site %s failed in round %d:\n%s", site.site_id, round, traceback.format_exc())
        return _error_reply(msg, "budget" if isinstance(e, PrivacyBudgetExceeded) else "error", e)
    return Message(_update_content(update, site), reply_to=msg)


@client_app.evaluate()
def _client_evaluate(msg: Message, context: Context) -> Message:
    """Site.evaluate of the received global state on the site's validation data."""
    _, site = _open_site(context)
    metrics = site.evaluate(record_to_state(msg.content["global"]))
    return Message(RecordDict({"metrics": MetricRecord({k: float(v) for k, v in metrics.items()})}), reply_to=msg)


# --------------------------------------------------------------------------------------------
# ServerApp: fastdp's round loop with remote sites
# --------------------------------------------------------------------------------------------


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
        self._epsilon = float(metrics.get("epsilon", 0.0))
        self._within_budget = bool(metrics["within-budget"])
        self.state_path = None

    @property
    def engine(self):
        """Not None exactly when the site trains with DP (the Simulation reads only that)."""
        return None if self.dp is None else self

    def epsilon(self) -> float:
        return self._epsilon if self.dp is not None else math.inf

    def within_budget(self) -> bool:
        return self._within_budget

    def record_update(self, metrics: Mapping) -> None:
        if "epsilon" in metrics:
            self._epsilon = float(metrics["epsilon"])
        self._within_budget = bool(metrics["within-budget"])

    def state_dict(self) -> dict:
        # The site's real state stays at the site; a server checkpoint only names it.
        return {"site_id": self.site_id, "remote": True}

    def load_state_dict(self, state: dict) -> None:
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
        # Same budget check and selection as Simulation._local_phase, on the sites' reported status.
        available = []
        for sid, s in self.sites.items():
            if sid in self.stopped_budget:
                continue
            if not s.within_budget():
                self.stopped_budget.append(sid)
                log.warning("site %s stops: the next round would pass its epsilon budget %s", sid, s.dp.epsilon_budget)
                self._say(f"  site {sid} stops taking part: epsilon budget {s.dp.epsilon_budget} reached")
                continue
            available.append(sid)
        record["stopped_budget"] = list(self.stopped_budget)
        selected = self.strategy.select(available, round, self.generator)
        record["participants"] = []
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
                    update = _update_from_content(reply.content, sid)
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
            eps = "" if update.epsilon is None else f"  epsilon {update.epsilon:.3f}"
            self._say(f"  site {sid}: {update.steps} steps  loss {update.train_loss:.4f}{eps}")
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
        if self.test_data is not None:
            if self._test_model is None:
                self._test_model = self.model_fn().to(self.device)
            record["test"] = evaluate_model(
                self._test_model, self.global_state, self.test_data, self.criterion, self.device
            )


server_app = ServerApp()


def _connect_sites(grid: Grid, cfg: Mapping) -> list[RemoteSite]:
    """Waits for num-sites SuperNodes, asks each which site it is; RemoteSites in partition order."""
    n, deadline = int(cfg["num-sites"]), time.monotonic() + float(cfg["node-wait-s"])
    while len(node_ids := list(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(node_ids)} of {n} SuperNodes connected within {cfg['node-wait-s']} s")
        time.sleep(0.5)
    msgs = [grid.create_message(RecordDict(), "query", node, "connect") for node in node_ids]
    replies = list(grid.send_and_receive(msgs, timeout=float(cfg["round-timeout-s"])))
    sites = []
    for r in replies:
        if r.has_error():
            raise RuntimeError(f"node {r.metadata.src_node_id} could not build its site: {r.error.reason}")
        sites.append(RemoteSite(r.metadata.src_node_id, r.content["site"], r.content["metrics"]))
    sites.sort(key=lambda s: s.partition_id)
    got = [s.partition_id for s in sites]
    if got != list(range(n)):
        raise RuntimeError(f"expected one SuperNode per partition-id 0..{n - 1}, got partition ids {got}")
    return sites


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    """Runs the federation of the run config; writes global_state.pt and history.json/.csv to out-dir."""
    cfg = resolve_config(context.run_config)
    if not cfg["out-dir"]:
        raise ValueError("run config 'out-dir' is required: the ServerApp writes the global model and history there")
    out = Path(str(cfg["out-dir"]))
    sites = _connect_sites(grid, cfg)
    sim = FlowerSimulation(
        sites,
        build_strategy(cfg),
        build_model_fn(cfg),
        grid=grid,
        timeout=float(cfg["round-timeout-s"]),
        test_data=build_test_data(cfg),
        rounds=int(cfg["rounds"]),
        seed=int(cfg["seed"]),
        eval_every=int(cfg["eval-every"]),
        out_dir=out,
        config=_history_config(cfg),
        **_screening(cfg),
    )
    sim.run(resume=False)
    atomic_torch_save(sim.global_state, out / "global_state.pt")


# --------------------------------------------------------------------------------------------
# The app folder Flower ships, and a local launcher
# --------------------------------------------------------------------------------------------

APP_PACKAGE = "fastdp_flower_app"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_app(app_dir: str | os.PathLike, run_config: Mapping | None = None) -> Path:
    """Writes the Flower app folder: pyproject.toml (run config defaults) and a two-module package.

    The modules only re-export fastdp's apps: the code that runs is the installed fastdp on
    every machine (the SuperLink ships just this folder, as a FAB).
    """
    cfg = resolve_config(run_config)
    app_dir = Path(app_dir)
    pkg = app_dir / APP_PACKAGE
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""fastdp Flower app: fastdp.federated.flower\'s ServerApp and ClientApp."""\n')
    # `app = ...` (an assignment, not an import alias): Flower checks the module's syntax tree for it.
    (pkg / "server_app.py").write_text("from fastdp.federated.flower import server_app\n\napp = server_app\n")
    (pkg / "client_app.py").write_text("from fastdp.federated.flower import client_app\n\napp = client_app\n")
    config = "\n".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in cfg.items())
    (app_dir / "pyproject.toml").write_text(
        f"""[project]
name = "fastdp-flower-app"
version = "0.1.0"
description = "fastdp Sites and Strategy on Flower"
license = "Apache-2.0"
dependencies = ["fastdp[flower]"]

[tool.flwr.app]
publisher = "fastdp"

[tool.flwr.app.components]
serverapp = "{APP_PACKAGE}.server_app:app"
clientapp = "{APP_PACKAGE}.client_app:app"

[tool.flwr.app.config]
{config}
"""
    )
    return app_dir


class FlowerRunError(RuntimeError):
    """A Flower run that did not finish:completed; the message ends with the tails of the process logs."""


@dataclass
class FlowerRun:
    """What launch_local returns.

    global_state: the final global model's state_dict.
    history: the History as a dict (history.json).
    out_dir, work_dir: where results and logs (work_dir/logs/*.log) are.
    run_id, status: Flower's run id and final status ("finished:completed").
    wall_s: seconds from the first process start to the end of the run.
    """

    global_state: dict[str, torch.Tensor]
    history: dict
    out_dir: Path
    work_dir: Path
    run_id: int
    status: str
    wall_s: float
    logs: dict[str, Path] = field(default_factory=dict)


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open while choosing so the n ports differ; the OS may still hand one to
    # someone else before our process binds it (unlikely on loopback in a test).
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tool(name: str) -> str:
    """A Flower console script next to this Python (the venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install the extra, pip install 'fastdp[flower]'")
    return found


def _wait_port(port: int, proc: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerRunError(f"process exited with {proc.returncode} before listening:\n{_tail(log_path)}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FlowerRunError(f"nothing listens on 127.0.0.1:{port} after {timeout} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"({path}: no log)"
    return f"--- {path.name} ---\n" + "\n".join(text[-lines:])


def _descendants(roots: list[int]) -> dict[int, str]:
    """{pid: cmdline} of every live descendant of `roots` (Linux /proc; {} elsewhere)."""
    parent, cmd = {}, {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
            parent[int(d.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
            cmd[int(d.name)] = (d / "cmdline").read_text()
        except (OSError, ValueError):
            continue
    found, frontier = {}, set(roots)
    while frontier:
        children = {pid for pid, ppid in parent.items() if ppid in frontier and pid not in found}
        found.update({pid: cmd[pid] for pid in children})
        frontier = children
    return found


def _signal_if_same(pid: int, cmdline: str, sig: int) -> None:
    # A pid seen moments ago may have exited; only signal it if it is still the same program.
    try:
        if Path(f"/proc/{pid}/cmdline").read_text() == cmdline:
            os.kill(pid, sig)
    except (OSError, ProcessLookupError):
        pass


def _stop(procs: list[subprocess.Popen], grace: float = 15.0) -> None:
    """Stops every process started here and every process they started, by pid.

    SIGTERM first (a SuperLink / SuperNode then stops its own SuperExec and app processes,
    which Flower starts in sessions of their own), SIGKILL whatever is left after `grace` s.
    """
    children = _descendants([p.pid for p in procs])
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
    for pid, cmdline in children.items():
        _signal_if_same(pid, cmdline, signal.SIGTERM)
    time.sleep(0.5 if children else 0)
    for pid, cmdline in _descendants_alive(children).items():
        _signal_if_same(pid, cmdline, signal.SIGKILL)


def _descendants_alive(pids: dict[int, str]) -> dict[int, str]:
    return {pid: c for pid, c in pids.items() if Path(f"/proc/{pid}").exists()}


def _flwr(args: list[str], env: dict, timeout: float = 60.0) -> str:
    res = subprocess.run([_tool("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise FlowerRunError(f"flwr {' '.join(args)} exited {res.returncode}:\n{res.stdout}\n{res.stderr}")
    return res.stdout


def _json_out(text: str) -> dict:
    # flwr may print log lines before the JSON object.
    start = text.find("{")
    if start < 0:
        raise FlowerRunError(f"no JSON in flwr output:\n{text}")
    return json.loads(text[start:])


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def launch_local(
    num_nodes: int | None = None,
    run_config: Mapping | None = None,
    work_dir: str | os.PathLike | None = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 600.0,
    start_timeout: float = 60.0,
    status_every: float = 15.0,
) -> FlowerRun:
    """Runs the fastdp Flower app on this machine: one SuperLink and `num_nodes` SuperNodes, each a
    separate process on 127.0.0.1 (insecure, offline), then `flwr run`; stops them all afterwards.

    Args:
        num_nodes: SuperNodes (partition-id 0..num_nodes-1); default run_config["num-sites"].
        run_config: run config (see DEFAULT_RUN_CONFIG); state-dir and out-dir default to
            work_dir/state and work_dir/out.
        work_dir: app folder, FLWR_HOME, logs, results (default: a new temporary folder).
        env: extra environment for every process (e.g. FASTDP_CONV_METHOD, OMP_NUM_THREADS).
        timeout: seconds the run may take once submitted.
        start_timeout: seconds each process may take to start listening.
        status_every: seconds between `flwr ls` status checks while the run has no result yet.
    Returns: FlowerRun. Raises FlowerRunError when the run does not finish:completed.
    """
    cfg = dict(run_config or {})
    cfg.setdefault("num-sites", num_nodes if num_nodes is not None else DEFAULT_RUN_CONFIG["num-sites"])
    num_nodes = int(cfg["num-sites"]) if num_nodes is None else int(num_nodes)
    work = Path(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="fastdp-flower-"))
    work = work.resolve()
    cfg.setdefault("state-dir", str(work / "state"))
    cfg.setdefault("out-dir", str(work / "out"))
    cfg = resolve_config(cfg)
    app_dir = write_app(work / "app", cfg)
    logs_dir = work / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    home = work / "flwr-home"
    home.mkdir(exist_ok=True)

    link_port, *node_ports = _free_ports(1 + num_nodes)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    penv = {
        **os.environ,
        **OFFLINE_ENV,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        # the SuperLink and SuperNodes start flower-superexec and the app processes from PATH
        "PATH": os.pathsep.join([str(Path(_tool("flower-superlink")).parent), os.environ.get("PATH", "")]),
        **(env or {}),
    }
    procs: list[subprocess.Popen] = []
    names: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        logs[name] = logs_dir / f"{name}.log"
        with open(logs[name], "wb") as f:
            p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=penv)
        procs.append(p)
        names[name] = p
        return p

    # A SIGTERM (a CI timeout, kill PID) must still reach the finally clause that stops the processes.
    in_main = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGTERM, _raise_exit) if in_main else None
    t0 = time.perf_counter()
    try:
        link = start(
            "superlink",
            [
                _tool("flower-superlink"),
                "--insecure",
                "--isolation",
                "subprocess",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
            ],
        )
        _wait_port(link_port, link, logs["superlink"], start_timeout)
        for k, port in enumerate(node_ports):
            start(
                f"supernode-{k}",
                [
                    _tool("flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--isolation",
                    "subprocess",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--node-config",
                    f"partition-id={k} num-partitions={num_nodes}",
                ],
            )
        out = _json_out(_flwr(["run", str(app_dir), "local", "--format", "json"], penv))
        if not out.get("success") or out.get("run-id") is None:
            raise FlowerRunError(f"flwr run did not start a run: {out}")
        run_id = int(out["run-id"])
        # flwr run exits 0 whatever happens to the run: its status says how it ended. Each flwr
        # call is a new Python process (seconds of CPU), so between status checks watch for the
        # ServerApp's result file, which appears when the run is about to finish.
        result = Path(str(cfg["out-dir"])) / "global_state.pt"
        deadline, status, details, next_ls = time.monotonic() + timeout, "", "", 0.0
        while True:
            for name, p in names.items():
                if p.poll() is not None:
                    raise FlowerRunError(f"{name} exited early ({p.returncode}):\n{_tail(logs[name])}")
            if time.monotonic() >= next_ls or result.exists():
                runs = _json_out(_flwr(["ls", "local", "--run-id", str(run_id), "--format", "json"], penv))["runs"]
                status, details = runs[0]["status"], runs[0].get("status-details", "")
                if status.startswith("finished"):
                    break
                next_ls = time.monotonic() + status_every
            if time.monotonic() > deadline:
                _flwr(["stop", str(run_id), "local"], penv)
                raise FlowerRunError(f"run {run_id} still {status!r} after {timeout} s")
            time.sleep(0.5)
        if status != "finished:completed":
            tails = "\n".join(_tail(p) for p in logs.values())
            raise FlowerRunError(f"run {run_id} ended {status!r} ({details}):\n{tails}")
        wall = time.perf_counter() - t0
    finally:
        _stop(procs)
        if in_main:
            signal.signal(signal.SIGTERM, old_handler)
    out_dir = Path(str(cfg["out-dir"]))
    return FlowerRun(
        global_state=torch.load(out_dir / "global_state.pt", weights_only=True),
        history=json.loads((out_dir / "history.json").read_text()),
        out_dir=out_dir,
        work_dir=work,
        run_id=run_id,
        status=status,
        wall_s=wall,
        logs=logs,
    )
