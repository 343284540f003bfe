"""The one way to build a federation from an :class:`ExperimentConfig`: runs, model, Sites, Strategy, Simulation.

Both training backends use these builders: the in-process :class:`fastdp.federated.Simulation`
(:func:`build_simulation`) and the Flower deployment (:mod:`fastdp.flower`, whose
ClientApp calls :func:`build_site` with its SuperNode's partition id and whose ServerApp calls
:func:`build_strategy` and :func:`simulation_options`). Everything but a DP site's noise
and sampling seeds (from the OS CSPRNG unless dp.reproducible_noise) is deterministic in
(config, run, site index), so the two backends train identical Sites.

    cfg = load_config("configs/demo.toml")
    run = find_run(cfg, "dp")
    data = build_data(cfg.data, cfg.seed)
    sim = build_simulation(cfg, run, data, progress=False)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastdp.experiment.config import ConfigError, ExperimentConfig
from fastdp.experiment.data import ExperimentData
from fastdp.federated import DPConfig, DPFedAvg, FedAvg, FedProx, Simulation, Site, Strategy
from fastdp.models import build_model

__all__ = [
    "RunSpec",
    "build_simulation",
    "build_site",
    "build_sites",
    "build_strategy",
    "find_run",
    "history_config",
    "model_factory",
    "num_sites",
    "planned_runs",
    "resolve_device",
    "simulation_options",
]


@dataclass(frozen=True)
class RunSpec:
    """One training run of an experiment.

    Attributes:
        label: its folder name and its name in the report.
        mode: "centralised", "nonprivate" or "dp".
        target_epsilon: the per-site epsilon a DP run calibrates sigma to (None: use the config).
    """

    label: str
    mode: str
    target_epsilon: float | None = None


def planned_runs(cfg: ExperimentConfig) -> list[RunSpec]:
    """The runs ``cfg.modes`` asks for, in order; an epsilon sweep expands "dp" into one run per epsilon."""
    runs = []
    for mode in cfg.modes:
        if mode == "dp" and cfg.dp.epsilon_sweep:
            runs += [RunSpec(f"dp_eps{eps:g}", "dp", eps) for eps in cfg.dp.epsilon_sweep]
        else:
            runs.append(RunSpec(mode, mode))
    return runs


def find_run(cfg: ExperimentConfig, label: str) -> RunSpec:
    """The planned run called ``label`` (e.g. "nonprivate", "dp", "dp_eps8"); ConfigError if there is none."""
    runs = planned_runs(cfg)
    for run in runs:
        if run.label == label:
            return run
    raise ConfigError(f"run {label!r}: not a run of this config; its runs are {[r.label for r in runs]}")


def resolve_device(cfg: ExperimentConfig) -> str:
    """The torch device of ``cfg.device`` ("auto": cuda when available)."""
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' but torch sees no CUDA device; set device = 'cpu' or 'auto'")
    return cfg.device


def model_factory(cfg: ExperimentConfig) -> Callable[[], nn.Module]:
    """A zero-argument function building a fresh model of the configured kind (what Site and Simulation take)."""
    name, kwargs = cfg.model.name, dict(cfg.model.kwargs)

    def make() -> nn.Module:
        return build_model(name, **kwargs)

    try:
        make()  # fail here, naming the config key, rather than inside the first round
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model.kwargs: {name} does not accept {kwargs}: {exc}") from None
    return make


def num_sites(cfg: ExperimentConfig, run: RunSpec) -> int:
    """How many Sites the run has: one pooled site when centralised, else one per ``cfg.data.sites``."""
    return 1 if run.mode == "centralised" else len(cfg.data.sites)


def _site_dp(cfg: ExperimentConfig, run: RunSpec, site: str) -> DPConfig | None:
    """The DPConfig of one site in a DP run (None outside DP runs)."""
    return cfg.dp.for_site(site, run.target_epsilon) if run.mode == "dp" else None


def build_strategy(cfg: ExperimentConfig, run: RunSpec) -> Strategy:
    """The server strategy of the run: FedAvg, FedProx, or DP-FedAvg (only in the "dp" run)."""
    fed = cfg.federated
    n_sites = num_sites(cfg, run)
    # sites_per_round k of N sites: FedAvg asks round(k/N * N) = k sites; DP-FedAvg samples each
    # site with probability k/N (Poisson, as its accountant assumes), k on average.
    fraction = 1.0 if fed.sites_per_round is None or run.mode == "centralised" else fed.sites_per_round / n_sites
    # User-level DP at the server belongs to the DP run; the non-private baseline averages plainly.
    if fed.strategy == "dp-fedavg" and run.mode == "dp":
        return DPFedAvg(
            clip_norm=fed.server_clip_norm,
            noise_multiplier=fed.server_noise_multiplier,
            sample_rate=fraction,
            num_sites=n_sites,
            delta=cfg.dp.delta,
            accountant=cfg.dp.accountant,
            # None: the server noise comes from the OS CSPRNG, unpredictable to anyone reading the config.
            seed=cfg.seed if cfg.dp.reproducible_noise else None,
        )
    if fed.strategy == "fedprox":
        return FedProx(mu=fed.fedprox_mu, fraction_fit=fraction)
    return FedAvg(fraction_fit=fraction)


def build_site(
    cfg: ExperimentConfig,
    run: RunSpec,
    data: ExperimentData,
    index: int,
    make_model: Callable[[], nn.Module] | None = None,
    device: str | torch.device = "cpu",
) -> Site:
    """Site number ``index`` (0-based, in ``cfg.data.sites`` order) of the run, on ``data`` from build_data.

    Deterministic in (cfg, run, index) except for a DP site's noise and sampling seeds, which come
    from the OS CSPRNG (dp.reproducible_noise derives them from the config, for tests): a Flower
    SuperNode with partition-id ``index`` builds the same Site (data, sigma, and with reproducible
    noise the same seeds) as the in-process Simulation.
    """
    n = num_sites(cfg, run)
    if not 0 <= index < n:
        raise ValueError(f"site index {index} out of range: run {run.label!r} has {n} site(s)")
    make_model = make_model if make_model is not None else model_factory(cfg)
    fed = cfg.federated
    common = dict(
        batch_size=fed.batch_size, lr=fed.lr, optimizer=fed.optimizer, planned_rounds=fed.rounds, device=device
    )
    if run.mode == "centralised":
        # One site with everything; as many steps per round as all sites together, so the
        # compute matches the federated runs.
        train, val = data.pooled()
        steps = fed.local_steps * len(data.train)
        return Site("pooled", train, val, make_model, local_steps=steps, seed=cfg.seed, **common)
    name = list(data.train)[index]
    return Site(
        name,
        data.train[name],
        data.val[name],
        make_model,
        local_steps=fed.local_steps,
        dp=_site_dp(cfg, run, name),
        seed=cfg.seed * 1000 + index,  # the same per-site sampling stream in every run: paired comparison
        **common,
    )


def build_sites(
    cfg: ExperimentConfig,
    run: RunSpec,
    data: ExperimentData,
    make_model: Callable[[], nn.Module] | None = None,
    device: str | torch.device = "cpu",
) -> list[Site]:
    """Every Site of the run, in ``cfg.data.sites`` order (one "pooled" site when centralised)."""
    make_model = make_model if make_model is not None else model_factory(cfg)
    n = 1 if run.mode == "centralised" else len(data.train)
    return [build_site(cfg, run, data, k, make_model, device) for k in range(n)]


def history_config(cfg: ExperimentConfig, run: RunSpec) -> dict:
    """What the run's history.json records as its config: the experiment, the run, the whole config."""
    return {"experiment": cfg.name, "run": run.label, "target_epsilon": run.target_epsilon, **cfg.to_dict()}


def simulation_options(cfg: ExperimentConfig, run: RunSpec, data: ExperimentData, device: str = "cpu") -> dict:
    """Simulation keyword arguments of the run besides sites, strategy and model (both backends use them)."""
    return dict(
        test_data=data.test,
        test_parts=data.test_parts,
        rounds=cfg.federated.rounds,
        seed=cfg.seed,
        config=history_config(cfg, run),
        device=device,
        max_update_norm=cfg.federated.max_update_norm or None,
    )


def build_simulation(
    cfg: ExperimentConfig,
    run: RunSpec,
    data: ExperimentData,
    *,
    make_model: Callable[[], nn.Module] | None = None,
    device: str | None = None,
    **kwargs,
) -> Simulation:
    """The in-process Simulation of the run. kwargs (out_dir, checkpoint_dir, progress, ...) go to Simulation."""
    make_model = make_model if make_model is not None else model_factory(cfg)
    device = device if device is not None else resolve_device(cfg)
    options = simulation_options(cfg, run, data, device)
    options.update(kwargs)
    return Simulation(build_sites(cfg, run, data, make_model, device), build_strategy(cfg, run), make_model, **options)
