"""The ClientApp: one fastdp Site per SuperNode, built from the run config's experiment and the node's partition-id.

Flower starts a fresh ClientApp process for every message, so a site's optimizer, accountant,
sampler RNG and noise stream live in a per-site state file (``state-dir``); it is written
atomically, and before the reply with the update leaves the site (privacy spent is never lost).
The file is keyed by experiment name, run label and site, not by Flower's run id: a rerun of the
same experiment (after a crash, say) continues each site's accountant instead of starting at 0.
A DP site's noise seed is drawn from the OS CSPRNG when its state file is first written and
never leaves the site; a DP site's failure is reported by error type only (the message could
describe its data; the details go to the site's own log).

Flower loads this module's ``app`` (a module-level assignment, which Flower's app check requires).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fastdp.accounting import PrivacyBudgetExceeded
from fastdp.experiment.builders import RunSpec, build_site, resolve_device
from fastdp.experiment.config import ExperimentConfig
from fastdp.experiment.data import build_data
from fastdp.federated.simulation import public_error
from fastdp.federated.site import Site
from fastdp.federated.state_files import StateFileError, load_state, save_state
from fastdp.flower.config import load_experiment, resolve_config
from fastdp.flower.records import record_to_state, update_to_content

__all__ = ["app", "open_site", "state_path"]

log = logging.getLogger("fastdp.flower")

app = ClientApp()


def _partition_id(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("the SuperNode needs --node-config 'partition-id=K' (0-based site number)")
    return int(context.node_config["partition-id"])


def _path_part(name: str) -> str:
    """A file-name-safe form of an experiment name or run label (letters, digits, -_. kept)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "_"


def state_path(state_dir: str | Path, experiment: ExperimentConfig, run: RunSpec, site_id: str) -> Path:
    """Where a site keeps its state: keyed by experiment, run and site, so reruns continue its privacy spend."""
    return Path(state_dir) / _path_part(experiment.name) / _path_part(run.label) / f"{_path_part(site_id)}.pt"


def _state_dir(cfg: Mapping, context: Context) -> str:
    # A site's own state directory may be set per SuperNode (each hospital its own disk).
    root = str(context.node_config.get("state-dir", "") or cfg["state-dir"])
    if not root:
        raise ValueError(
            "run config 'state-dir' (or node config 'state-dir') is required: Flower starts a new "
            "ClientApp process per message, and the site's optimizer, accountant and RNG state must persist"
        )
    return root


def open_site(context: Context) -> Site:
    """The node's Site with its saved state (if any); site.state_path set so local_update persists it.

    Site partition-id of the run in the run config's experiment, on exactly the data
    fastdp.experiment.data.build_data gives that site (sites in ``data.sites`` order).
    """
    cfg = resolve_config(context.run_config)
    experiment, run = load_experiment(cfg)
    torch.set_num_threads(experiment.threads)
    data = build_data(experiment.data, experiment.seed)
    site = build_site(experiment, run, data, _partition_id(context), device=resolve_device(experiment))
    site.state_path = state_path(_state_dir(cfg, context), experiment, run, site.site_id)
    if site.state_path.exists():
        state = load_state(site.state_path, "site state file")
        try:
            site.load_state_dict(state)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise StateFileError(f"site state file {site.state_path}: {type(exc).__name__}: {exc}") from None
    elif site.engine is not None:
        # The first message of a DP site fixes its CSPRNG-drawn noise seed on its own disk, so every
        # later ClientApp process continues the same secret stream.
        save_state(site.state_dict(), site.state_path)
    return site


@app.query()
def _describe(msg: Message, context: Context) -> Message:
    """Tells the server which site this node is: id, partition, size, DP settings, budget status."""
    site = open_site(context)
    info = {
        "site-id": site.site_id,
        "partition-id": _partition_id(context),
        "repr": repr(site),
        "dp": site.dp is not None,
        "has-val": site.val_data is not None and len(site.val_data) > 0,
        "epsilon-budget": 0.0 if site.dp is None or site.dp.epsilon_budget is None else site.dp.epsilon_budget,
        "noise-private": site.noise_is_private is not False,
    }
    metrics = {"num-samples": site.num_samples, "within-budget": int(site.within_budget())}
    if site.engine is not None:
        metrics["epsilon"] = site.epsilon()
    return Message(RecordDict({"site": ConfigRecord(info), "metrics": MetricRecord(metrics)}), reply_to=msg)


def _error_reply(msg: Message, kind: str, error: BaseException, dp: bool) -> Message:
    # A budget refusal says only what the accountant says; any other error of a DP site is named by type.
    text = f"{type(error).__name__}: {error}" if kind == "budget" else public_error(error, dp)
    return Message(RecordDict({"error": ConfigRecord({"kind": kind, "message": text})}), reply_to=msg)


@app.train()
def _train(msg: Message, context: Context) -> Message:
    """Site.local_update from the received global state; replies with the SiteUpdate (delta + metrics)."""
    site = open_site(context)
    global_state = record_to_state(msg.content["global"])
    config = dict(msg.content["config"])
    round = int(config.pop("round"))
    try:
        update = site.local_update(global_state, round, config)  # saves the site state before returning
    except Exception as e:
        # Steps taken before the failure spent privacy: keep them (the in-process site keeps them too).
        save_state(site.state_dict(), site.state_path)
        log.error("site %s failed in round %d:\n%s", site.site_id, round, traceback.format_exc())
        kind = "budget" if isinstance(e, PrivacyBudgetExceeded) else "error"
        return _error_reply(msg, kind, e, dp=site.engine is not None)
    return Message(update_to_content(update, site), reply_to=msg)


@app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    """Site.evaluate of the received global state on the site's validation data."""
    site = open_site(context)
    metrics = site.evaluate(record_to_state(msg.content["global"]))
    return Message(RecordDict({"metrics": MetricRecord({k: float(v) for k, v in metrics.items()})}), reply_to=msg)
