"""Runs an experiment end to end: data -> one federated run per mode -> attack -> report.

    from fastdp.experiment import load_config
    from fastdp.experiment.runner import run_experiment
    run_dir = run_experiment(load_config("configs/demo.toml"))

The run folder (``config.out_dir``)::

    config.toml                   the resolved config
    <run>/history.json, .csv      per run ("nonprivate", "dp", "centralised", "dp_eps<e>"), from Simulation
    <run>/checkpoints/            Simulation's per-round checkpoints (a rerun resumes from them)
    <run>/global_model.pt         the final global model's state_dict
    <run>/flower/                 federated.backend = "flower": app folder, process logs, site state files
    attack/attack.json, *.png     the gradient-inversion attack's metrics and reconstruction grid
    report.md, plots/*.png        the report

Training uses :mod:`fastdp.federated` (Site, strategies, Simulation; built by
:mod:`fastdp.experiment.builders`) in process; the attack uses :mod:`fastdp.attacks` and the
report :mod:`fastdp.report`. Training over Flower (``federated.backend = "flower"``) is
:func:`fastdp.flower.run_experiment`, which passes its trainer to :func:`run_experiment`: the
Flower adapter sits above this package and is never imported from here.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from fastdp.atomic import atomic_torch_save, atomic_write_text
from fastdp.attacks.experiment import run_attack_experiment
from fastdp.engine import host_allocator
from fastdp.experiment.builders import RunSpec, build_simulation, model_factory, planned_runs, resolve_device
from fastdp.experiment.config import ConfigError, ExperimentConfig
from fastdp.experiment.data import ExperimentData, build_data
from fastdp.federated import initial_global_state
from fastdp.federated.state_files import StateFileError, check_model_state
from fastdp.report import write_report

__all__ = [
    "RunSpec",
    "TrainRun",
    "model_factory",
    "planned_noise_multiplier",
    "planned_runs",
    "run_attack",
    "run_experiment",
    "run_mode",
    "train_in_process",
]

log = logging.getLogger("fastdp.experiment")


def planned_noise_multiplier(cfg: ExperimentConfig, n_train: int, target_epsilon: float | None = None) -> float:
    """sigma of a DP site with ``n_train`` slices: the configured one, or calibrated to the target epsilon.

    Calibrated over every planned step (rounds * local_steps) at sample rate batch_size / n_train,
    as a site that takes part in every round spends it (the Site's own calibration, DPConfig.noise_multiplier_for).
    """
    fed = cfg.federated
    q = min(1.0, fed.batch_size / max(1, n_train))
    dp = cfg.dp.for_site(cfg.data.sites[0], target_epsilon)
    return dp.noise_multiplier_for(q, fed.rounds * fed.local_steps)


#: How one run is trained: (cfg, run, data, run_dir, progress=) -> path of its global_model.pt.
TrainRun = Callable[..., Path]


def train_in_process(
    cfg: ExperimentConfig, run: RunSpec, data: ExperimentData, run_dir: Path, *, progress: bool = True
) -> Path:
    """Trains one run with the in-process Simulation into ``run_dir/run.label``.

    Writes history.json/.csv, checkpoints/ (resumed if present) and the final global model's
    state_dict as global_model.pt (atomically). Returns the global_model.pt path.
    """
    make_model = model_factory(cfg)
    out = run_dir / run.label
    torch.manual_seed(cfg.seed)
    simulation = build_simulation(
        cfg,
        run,
        data,
        make_model=make_model,
        device=resolve_device(cfg),
        checkpoint_dir=out / "checkpoints",
        out_dir=out,
        progress=progress,
    )
    simulation.run(resume=True)  # FederationError when no site ever contributed: no model is written
    path = out / "global_model.pt"
    # atomic, like the checkpoints: `fastdp attack` never loads half a file
    atomic_torch_save({k: v.detach().cpu() for k, v in simulation.global_state.items()}, path)
    return path


def run_mode(
    cfg: ExperimentConfig,
    run: RunSpec,
    data: ExperimentData,
    run_dir: Path,
    *,
    progress: bool = True,
    train: TrainRun | None = None,
) -> Path:
    """Trains one run into ``run_dir/run.label``: with ``train`` when given, else in process.

    ``federated.backend = "flower"`` needs the Flower trainer, which lives above this package:
    :func:`fastdp.flower.run_experiment` (and the ``fastdp`` CLI) pass it. Returns the global_model.pt path.
    """
    if train is None:
        if cfg.federated.backend == "flower":
            raise ConfigError(
                "federated.backend = 'flower': run it with fastdp.flower.run_experiment(cfg) or the `fastdp run` "
                "command (fastdp.experiment trains in process only)"
            )
        train = train_in_process
    return train(cfg, run, data, run_dir, progress=progress)


def run_attack(
    cfg: ExperimentConfig, data: ExperimentData, run_dir: Path, model_path: Path | None = None, *, progress: bool = True
) -> dict:
    """Gradient inversion on one site's update, non-private and DP, of the same slices.

    The attacked model is the global model at ``model_path`` (a state_dict; None: the initial
    global model of the runs, i.e. what every site receives in round 1, seeded by cfg.seed).
    Calls ``fastdp.attacks.run_attack_experiment`` and writes its result dict (metrics table,
    reconstruction-grid PNG paths) to ``run_dir/attack/attack.json``; returns that dict.
    ``cfg.attack.update = "federated"`` attacks the run's own local training (optimizer, local
    steps, lr) instead of one SGD step; identification uses phantom distractors (image side >= 64).
    """
    make_model = model_factory(cfg)
    model = make_model()
    if model_path is not None:
        try:
            state = torch.load(model_path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise StateFileError(f"global model {model_path} cannot be read safely: {type(exc).__name__}") from None
        model.load_state_dict(check_model_state(state, model.state_dict(), model_path, "global model"))
    else:
        model.load_state_dict(initial_global_state(make_model, cfg.seed))
    site = cfg.attack.site or cfg.data.sites[0]
    train = data.train[site]
    n = max(cfg.attack.batch_sizes) * cfg.attack.batches
    # A fixed, seeded choice of slices: the non-private and the DP attack see the same ones.
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[:n].tolist()
    images = torch.stack([train[i][0] for i in idx])
    masks = torch.stack([train[i][1] for i in idx])
    sigmas = [0.0]
    if "dp" in cfg.modes:
        sigmas.append(planned_noise_multiplier(cfg, len(train)))
    sigmas += [s for s in cfg.attack.sigmas if s not in sigmas]
    # The attacked site's local training: one SGD step (the attacker's best case) or the run's own.
    local = {"local_steps": 1, "local_lr": 0.1, "local_optimizer": "sgd"}
    if cfg.attack.update == "federated":
        local = {
            "local_steps": cfg.federated.local_steps,
            "local_lr": cfg.federated.lr,
            "local_optimizer": cfg.federated.optimizer,
        }
    out = run_dir / "attack"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = dict(
        run_attack_experiment(
            model,
            images,
            masks,
            batch_sizes=list(cfg.attack.batch_sizes),
            sigmas=sigmas,
            max_grad_norm=cfg.dp.max_grad_norm,
            steps=cfg.attack.steps,
            lr=cfg.attack.lr,
            tv_weight=cfg.attack.tv_weight,
            restarts=cfg.attack.restarts,
            known_mask=cfg.attack.known_mask,
            batches=cfg.attack.batches,
            # Distractors are phantom slices of other patients: meaningful for phantom data only.
            pool_size=cfg.attack.pool_size if cfg.data.source == "phantom" and cfg.data.image_size >= 64 else 0,
            pool_candidates=400,
            **local,
            seed=cfg.seed,
            out_dir=out,
            # One thread: the attack's many small double-backward passes run several times faster
            # than on two threads of a shared CPU (docs/attacks.md), whatever the training used.
            threads=1,
            progress=progress,
        )
    )
    result.setdefault("seconds", time.perf_counter() - start)
    result.setdefault("site", site)
    _write_json(out / "attack.json", result)
    return result


def _write_json(path: Path, data: dict) -> None:
    def default(o):
        if isinstance(o, Path):
            return str(o)
        if isinstance(o, torch.Tensor):
            return o.tolist()
        return repr(o)

    atomic_write_text(path, json.dumps(data, indent=2, default=default))


def _prepare_run_dir(cfg: ExperimentConfig, run_dir: Path, fresh: bool) -> None:
    """Resuming is only safe with the config that wrote the checkpoints: refuse a different one."""
    checkpoints = [run_dir / r.label / "checkpoints" for r in planned_runs(cfg)]
    if fresh:
        for c in checkpoints:
            shutil.rmtree(c, ignore_errors=True)
        return
    old = run_dir / "config.toml"
    if old.exists() and any(c.exists() for c in checkpoints) and old.read_text() != cfg.to_toml():
        raise ConfigError(
            f"{run_dir} holds checkpoints of a run with a different config ({old}); rerun with --fresh to "
            "start over, or choose another --out-dir"
        )


def run_experiment(
    config: ExperimentConfig,
    *,
    progress: bool = True,
    report: bool = True,
    fresh: bool = False,
    train: TrainRun | None = None,
) -> Path:
    """Trains every configured run, attacks, writes the report; returns the run folder.

    Steps: write config.toml -> build the sites' data -> for each run (planned_runs) train it
    (run_mode: with ``train``, else in process) -> if attack.enabled, attack the final non-private
    model's updates without and with DP noise -> report.md. A rerun with the same out_dir resumes
    the runs from their checkpoints (refused if the config changed; fresh=True starts over). An
    attack that fails is recorded in attack/attack.json and in the report; training results
    are kept.
    """
    cfg = config.validate()
    torch.set_num_threads(cfg.threads)
    # A private run sets these when its model is made private; set them first so that every run,
    # non-private too, trains under the same malloc settings (comparable s / round).
    host_allocator.tune()
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _prepare_run_dir(cfg, run_dir, fresh)
    atomic_write_text(run_dir / "config.toml", cfg.to_toml())
    start = time.perf_counter()
    data = build_data(cfg.data, cfg.seed)
    models: dict[str, Path | None] = {}
    for run in planned_runs(cfg):
        log.info("run %s (%s)", run.label, run.mode)
        t0 = time.perf_counter()
        models[run.label] = run_mode(cfg, run, data, run_dir, progress=progress, train=train)
        log.info("run %s done in %.1f s", run.label, time.perf_counter() - t0)
    if cfg.attack.enabled:
        # The attacked update is computed from the round-1 global model (what the server sends
        # first, the same in every run) or from the final non-private global model.
        model_path = None
        if cfg.attack.target == "final":
            model_path = models.get("nonprivate") or next((p for p in models.values() if p is not None), None)
        try:
            run_attack(cfg, data, run_dir, model_path, progress=progress)
        except Exception as exc:  # the report shows the failure; training results stay
            (run_dir / "attack").mkdir(exist_ok=True)
            _write_json(
                run_dir / "attack" / "attack.json",
                {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()},
            )
            log.warning("attack failed: %s", exc)
    if report:
        write_report(run_dir, title=f"{cfg.name}: fastdp experiment")
    log.info("experiment done in %.1f s: %s", time.perf_counter() - start, run_dir)
    return run_dir
