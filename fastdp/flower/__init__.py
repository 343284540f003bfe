"""Flower adapter (flwr 1.42 Message API): fastdp Sites as Flower ClientApps, the fastdp Strategy in a ServerApp.

The Flower run config carries an :class:`~fastdp.experiment.ExperimentConfig` (as TOML text) and
the label of one of its runs; the ServerApp and every ClientApp build that run's Strategy, Sites,
model and data with :mod:`fastdp.experiment.builders`, the same builders as the in-process
:class:`~fastdp.federated.Simulation`, so both train identical Sites. SuperNode ``partition-id``
k is site k of ``data.sites``. The ServerApp runs fastdp's own round loop (a Simulation whose
sites are remote): select -> send the global state and ``site_config`` -> receive SiteUpdates ->
``screen_updates`` -> ``strategy.aggregate`` -> evaluate, and writes the same files as the
experiment runner (global_model.pt, history.json/.csv).

    run = launch_local(run_config=run_config_for(load_config("configs/demo.toml"), "dp"))  # on 127.0.0.1
    run.global_state, run.history

or ``fastdp.flower.run_experiment(cfg)`` / ``fastdp run configs/demo.toml --set federated.backend="flower"``
(the experiment runner with each run trained over Flower). Separate machines:
docs/flower.md. Needs the extra: ``pip install fastdp[flower]``.

Modules: config (the run config), records (states and SiteUpdates as Flower records),
clientapp / serverapp (the apps; ``app`` in each), remote (RemoteSite, FlowerSimulation),
app_files (write_app), launcher + processes (launch_local).
"""

# First: Flower must not phone home, and reads these when flwr is imported.
from fastdp.flower.offline import OFFLINE_ENV

try:
    import flwr  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("fastdp.flower needs Flower: pip install 'fastdp[flower]' (flwr==1.42.*)") from e

from fastdp.flower.app_files import APP_PACKAGE, write_app  # noqa: E402
from fastdp.flower.clientapp import app as client_app  # noqa: E402
from fastdp.flower.clientapp import open_site  # noqa: E402
from fastdp.flower.config import (  # noqa: E402
    DEFAULT_RUN_CONFIG,
    FLOWER_KEYS,
    load_experiment,
    resolve_config,
    run_config_for,
)
from fastdp.flower.experiment import run_experiment, train_over_flower  # noqa: E402
from fastdp.flower.launcher import FlowerRun, FlowerRunError, launch_local  # noqa: E402
from fastdp.flower.records import (  # noqa: E402
    record_to_state,
    state_to_record,
    update_from_content,
    update_to_content,
)
from fastdp.flower.remote import FlowerSimulation, RemoteSite  # noqa: E402
from fastdp.flower.serverapp import app as server_app  # noqa: E402
from fastdp.flower.serverapp import connect_sites  # noqa: E402

__all__ = [
    "APP_PACKAGE",
    "DEFAULT_RUN_CONFIG",
    "FLOWER_KEYS",
    "OFFLINE_ENV",
    "FlowerRun",
    "FlowerRunError",
    "FlowerSimulation",
    "RemoteSite",
    "client_app",
    "connect_sites",
    "launch_local",
    "load_experiment",
    "open_site",
    "record_to_state",
    "resolve_config",
    "run_config_for",
    "run_experiment",
    "server_app",
    "state_to_record",
    "train_over_flower",
    "update_from_content",
    "update_to_content",
    "write_app",
]
