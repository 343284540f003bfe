"""The Flower run config: an experiment config, the run to train, and the deployment keys.

Flower run configs are flat ``key -> bool/int/float/str`` maps. fastdp's carries the whole
:class:`~fastdp.experiment.ExperimentConfig` as TOML text (key ``experiment``) and the label of
one of its planned runs (``run``: "nonprivate", "dp", "dp_eps8", "centralised"); the ServerApp
and every ClientApp rebuild the run's Strategy, Sites, model and data from it with
:mod:`fastdp.experiment.builders`, exactly as the in-process Simulation does. The other keys are
Flower-only: where state and results go, how long to wait.

    run_config = run_config_for(load_config("configs/demo.toml"), "dp", out_dir="/srv/out", state_dir="/srv/state")
"""

from __future__ import annotations

from collections.abc import Mapping

from fastdp.experiment import ConfigError, ExperimentConfig, tomlio
from fastdp.experiment.builders import RunSpec, find_run, num_sites

__all__ = ["DEFAULT_RUN_CONFIG", "FLOWER_KEYS", "load_experiment", "resolve_config", "run_config_for"]

#: Every key the Flower app understands, with its default. "" / 0 mean "unset" where optional.
DEFAULT_RUN_CONFIG: dict[str, bool | int | float | str] = {
    "experiment": "",  # the ExperimentConfig as TOML text (ExperimentConfig.to_toml()); required
    "run": "",  # the label of one of its planned runs; required
    "num-sites": 0,  # SuperNodes = sites of the run (partition-id 0..num-sites-1); 0: from the experiment
    "state-dir": "",  # where each site keeps its state file (node config "state-dir" overrides)
    "out-dir": "",  # where the ServerApp writes global_model.pt and history.json/.csv
    "node-wait-s": 120.0,  # how long the ServerApp waits for num-sites SuperNodes
    "round-timeout-s": 3600.0,  # replies not back by then count as failed sites
    "stop-after": 0,  # stop after this round (a later run resumes from the checkpoint); 0: run every round
}

#: The keys that describe the deployment rather than the experiment (not part of the result).
FLOWER_KEYS = ("num-sites", "state-dir", "out-dir", "node-wait-s", "round-timeout-s", "stop-after")


def _parse_experiment(text: str) -> ExperimentConfig:
    if not text:
        raise ValueError(
            "run config 'experiment' is required: the TOML text of an ExperimentConfig (see run_config_for)"
        )
    try:
        return ExperimentConfig.from_dict(tomlio.loads(text))
    except tomlio.tomllib.TOMLDecodeError as exc:
        raise ValueError(f"run config 'experiment': invalid TOML: {exc}") from None
    except ConfigError as exc:
        raise ValueError(f"run config 'experiment': {exc}") from None


def resolve_config(run_config: Mapping | None = None) -> dict:
    """DEFAULT_RUN_CONFIG updated with ``run_config``, checked; ``num-sites`` filled in from the experiment.

    Unknown keys, wrong types, an experiment config that does not load, a run it does not plan,
    or a num-sites other than the run's number of sites are ValueErrors naming the key.
    """
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
    experiment, run = load_experiment(cfg)
    n = num_sites(experiment, run)
    if cfg["num-sites"] == 0:
        cfg["num-sites"] = n
    elif cfg["num-sites"] != n:
        raise ValueError(f"run config 'num-sites' = {cfg['num-sites']}, but run {run.label!r} has {n} site(s)")
    for key in ("node-wait-s", "round-timeout-s"):
        if not cfg[key] > 0:
            raise ValueError(f"run config {key!r} must be > 0, got {cfg[key]}")
    if cfg["stop-after"] < 0:
        raise ValueError(f"run config 'stop-after' must be >= 0 (0: every round), got {cfg['stop-after']}")
    return cfg


def load_experiment(run_config: Mapping) -> tuple[ExperimentConfig, RunSpec]:
    """The ExperimentConfig and the RunSpec a run config names (ValueError when either is missing or bad)."""
    experiment = _parse_experiment(str(run_config.get("experiment", "")))
    label = str(run_config.get("run", ""))
    if not label:
        raise ValueError("run config 'run' is required: the label of a planned run, e.g. 'nonprivate' or 'dp'")
    try:
        return experiment, find_run(experiment, label)
    except ConfigError as exc:
        raise ValueError(f"run config 'run': {exc}") from None


def run_config_for(experiment: ExperimentConfig, run: str | RunSpec, **flower_keys) -> dict:
    """The Flower run config that trains run ``run`` of ``experiment``; resolved and checked.

    flower_keys: the deployment keys with underscores, e.g. ``out_dir="/srv/out"``,
    ``state_dir=...``, ``node_wait_s=300``, ``round_timeout_s=...``, ``num_sites=3``.
    """
    label = run.label if isinstance(run, RunSpec) else str(run)
    config = {"experiment": experiment.validate().to_toml(), "run": label}
    config.update({k.replace("_", "-"): v for k, v in flower_keys.items()})
    return resolve_config(config)
