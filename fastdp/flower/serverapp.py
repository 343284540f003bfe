"""The ServerApp: connects the run's SuperNodes and runs fastdp's round loop (FlowerSimulation) over them.

It builds the run's Strategy, model and test set from the run config's experiment with
:mod:`fastdp.experiment.builders` (as the in-process Simulation does) and writes
``global_model.pt`` and ``history.json`` / ``history.csv`` to the run config's ``out-dir``.
After every round it writes an atomic checkpoint (global model, the server's accountant and
selection RNG, the round, the history) to ``out-dir/checkpoints`` in the simulator's format;
a new Flower run of the same experiment and out-dir continues from it.

Flower loads this module's ``app`` (a module-level assignment, which Flower's app check requires).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import torch
from flwr.app import Context, RecordDict
from flwr.serverapp import Grid, ServerApp

from fastdp.atomic import atomic_torch_save
from fastdp.experiment.builders import build_strategy, model_factory, resolve_device, simulation_options
from fastdp.experiment.data import build_data
from fastdp.flower.config import load_experiment, resolve_config
from fastdp.flower.remote import FlowerSimulation, RemoteSite

__all__ = ["app", "connect_sites"]

app = ServerApp()


def connect_sites(grid: Grid, cfg: Mapping) -> list[RemoteSite]:
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


@app.main()
def _main(grid: Grid, context: Context) -> None:
    """Runs the run config's run; writes global_model.pt and history.json/.csv to out-dir."""
    cfg = resolve_config(context.run_config)
    if not cfg["out-dir"]:
        raise ValueError("run config 'out-dir' is required: the ServerApp writes the global model and history there")
    experiment, run = load_experiment(cfg)
    torch.set_num_threads(experiment.threads)
    out = Path(str(cfg["out-dir"]))
    data = build_data(experiment.data, experiment.seed)
    sites = connect_sites(grid, cfg)
    # The nodes build their sites from the same experiment: a different one (another fastdp, a
    # node config pointing elsewhere) shows up here as other site names.
    want = ["pooled"] if run.mode == "centralised" else list(data.train)
    if [s.site_id for s in sites] != want:
        raise RuntimeError(f"the SuperNodes are sites {[s.site_id for s in sites]}, the experiment's are {want}")
    device = resolve_device(experiment)
    sim = FlowerSimulation(
        sites,
        build_strategy(experiment, run),
        model_factory(experiment),
        grid=grid,
        timeout=float(cfg["round-timeout-s"]),
        out_dir=out,
        # the in-process runner's layout and format: a rerun continues after the last finished round
        checkpoint_dir=out / "checkpoints",
        **simulation_options(experiment, run, data, device),
    )
    sim.run(resume=True, stop_after=int(cfg["stop-after"]) or None)
    atomic_torch_save({k: v.detach().cpu() for k, v in sim.global_state.items()}, out / "global_model.pt")
