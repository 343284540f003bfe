"""Federated learning: Sites (hospitals) with local DP-SGD and their own budgets, strategies, a simulator.

    sites = [Site("site_a", train_a, val_a, unet_small, dp=DPConfig(target_epsilon=8), planned_rounds=5), ...]
    history = Simulation(sites, FedAvg(), unet_small, test_data=test, rounds=5, out_dir="runs/x").run()

The Flower adapter (fastdp.flower, extra fastdp[flower]) runs the same Site and Strategy
as Flower ClientApps / ServerApp.
"""

from fastdp.federated.dp_config import DPConfig
from fastdp.federated.history import History
from fastdp.federated.simulation import Simulation, initial_global_state
from fastdp.federated.site import Site, SiteUpdate, evaluate_model
from fastdp.federated.strategies import DPFedAvg, FedAvg, FedProx, Strategy
from fastdp.federated.validation import check_update, screen_updates

__all__ = [
    "DPConfig",
    "DPFedAvg",
    "FedAvg",
    "FedProx",
    "History",
    "Simulation",
    "Site",
    "SiteUpdate",
    "Strategy",
    "check_update",
    "evaluate_model",
    "initial_global_state",
    "screen_updates",
]
