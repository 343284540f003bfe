"""Experiments over Flower: the experiment runner with each run trained by a local Flower federation.

    from fastdp.flower import run_experiment
    run_dir = run_experiment(load_config("configs/demo.toml").replace(**{"federated.backend": "flower"}))

``fastdp run CONFIG --set federated.backend="flower"`` calls this. The runner
(:func:`fastdp.experiment.runner.run_experiment`) does everything else (data, attack, report)
exactly as in process; only how each run is trained differs (:func:`train_over_flower`).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from fastdp.experiment.builders import RunSpec
from fastdp.experiment.config import ExperimentConfig
from fastdp.experiment.data import ExperimentData
from fastdp.experiment.runner import run_experiment as run_experiment_with
from fastdp.flower.config import run_config_for
from fastdp.flower.launcher import launch_local

__all__ = ["run_experiment", "train_over_flower"]


def train_over_flower(
    cfg: ExperimentConfig,
    run: RunSpec,
    data: ExperimentData | None,
    run_dir: Path,
    *,
    progress: bool = True,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    insecure: bool = False,
) -> Path:
    """Trains one run over Flower on this machine: a SuperLink and one SuperNode per site on 127.0.0.1.

    The Flower run config carries the experiment config (its TOML text) and the run label, so the
    ServerApp and every ClientApp build the run's Strategy and Sites with the same builders as the
    in-process Simulation (``data`` is not used: each SuperNode builds its own site's data). The
    ServerApp writes ``run_dir/run.label``/history.json/.csv and global_model.pt; Flower's app
    folder, credentials, logs and the sites' state files go to its ``flower/`` sub-folder. The
    federation uses TLS and registered SuperNodes unless ``insecure``. The ServerApp checkpoints
    every round to ``run_dir/run.label/checkpoints`` (the in-process layout): a rerun resumes
    there, and the sites' state files (privacy spent) persist across reruns. Returns the
    global_model.pt path.
    """
    out = (run_dir / run.label).resolve()
    work = out / "flower"
    run_config = run_config_for(cfg, run.label, out_dir=str(out), state_dir=str(work / "state"))
    if progress:
        print(
            f"[{run.label}] Flower: {run_config['num-sites']} SuperNodes on 127.0.0.1, logs in {work / 'logs'}",
            file=sys.stderr,
        )
    result = launch_local(run_config=run_config, work_dir=work, env=env, timeout=timeout, insecure=insecure)
    if progress:
        print(f"[{run.label}] Flower run {result.run_id} {result.status} in {result.wall_s:.0f} s", file=sys.stderr)
    return out / "global_model.pt"


def run_experiment(config: ExperimentConfig, *, insecure: bool = False, **kwargs) -> Path:
    """:func:`fastdp.experiment.runner.run_experiment` with every run trained over Flower (kwargs go there).

    insecure: plain-text Flower connections without SuperNode authentication (warns).
    """
    train = functools.partial(train_over_flower, insecure=insecure) if insecure else train_over_flower
    return run_experiment_with(config, train=train, **kwargs)
