"""Experiment configuration: small dataclasses, loaded from TOML or YAML and validated.

A config file mirrors the dataclasses: top-level keys (``name``, ``seed``, ``threads``,
``device``, ``out_dir``, ``modes``) and one table per section (``[data]``, ``[model]``,
``[federated]``, ``[dp]``, ``[attack]``). Every key is optional: the defaults are the built-in
demo (three phantom CT sites, unet_small at 64x64, non-private FL vs DP-FL at epsilon 8 with
delta 1e-5, then the gradient-inversion attack). A key that is not a field, or a value of the
wrong type or range, raises :class:`ConfigError` naming the full key path, e.g.
``federated.rounds: must be a positive integer, got -1``.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastdp.experiment import tomlio
from fastdp.federated.dp_config import DPConfig
from fastdp.federated.site import OPTIMIZERS

__all__ = [
    "AttackConfig",
    "ConfigError",
    "DPSettings",
    "DataConfig",
    "ExperimentConfig",
    "FederatedConfig",
    "MODES",
    "MODEL_NAMES",
    "ModelConfig",
    "apply_overrides",
    "load_config",
]

MODES = ("centralised", "nonprivate", "dp")
MODEL_NAMES = ("unet_tiny", "unet_small", "unet_paper", "monai_unet", "monai_basic_unet")
STRATEGIES = ("fedavg", "fedprox", "dp-fedavg")
BACKENDS = ("simulation", "flower")
_PHANTOM_SITE = re.compile(r"^site_(?:[a-c]|\d+)$")


class ConfigError(ValueError):
    """A bad experiment config: the message starts with the key path (``section.key: ...``)."""


# ----------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    """Where the CT slices come from and how they are split into sites.

    Attributes:
        source: ``"phantom"`` (built-in generator, no download) or ``"msd"`` (a Medical
            Segmentation Decathlon task folder, e.g. Task03_Liver).
        msd_path: the MSD task folder (holding ``dataset.json``); needed when source is msd.
        msd_cache_dir: where preprocessed MSD slices are cached (None: in memory only).
        msd_organ_margin: keep MSD slices within this many slices of the organ (None: all).
        image_size: slice side in pixels (images are image_size x image_size).
        sites: site names. Phantom: built-in ``site_a``/``site_b``/``site_c`` or ``site_<k>``
            (a random scanner profile). MSD: labels for a random patient-level split.
        slices_per_site: training slices per site (phantom; for MSD a cap, 0 = all).
        val_slices_per_site: validation slices per site (phantom: disjoint patients; MSD:
            taken from the site's own slices).
        test_slices: held-out test slices.
        test_site: None: the test set pools held-out slices of every site. A site name: the
            test set is that site only (phantom: may be a site not in ``sites``, an unseen
            scanner). MSD: ignored, the test set is a held-out group of patients.
    """

    source: str = "phantom"
    msd_path: str | None = None
    msd_cache_dir: str | None = None
    msd_organ_margin: int | None = None
    image_size: int = 64
    sites: list[str] = field(default_factory=lambda: ["site_a", "site_b", "site_c"])
    slices_per_site: int = 4800
    val_slices_per_site: int = 48
    test_slices: int = 192
    test_site: str | None = None

    def validate(self, p: str) -> None:
        _choice(f"{p}.source", self.source, ("phantom", "msd"))
        _positive_int(f"{p}.image_size", self.image_size)
        _check(
            f"{p}.image_size",
            self.image_size % 8 == 0,
            "must be a multiple of 8 (the U-Nets halve it 3 times)",
            self.image_size,
        )
        _check(f"{p}.sites", len(self.sites) >= 1, "must name at least one site", self.sites)
        _check(f"{p}.sites", len(set(self.sites)) == len(self.sites), "site names must be unique", self.sites)
        for i, s in enumerate(self.sites):
            _check(f"{p}.sites[{i}]", bool(s), "must be a non-empty name", s)
        _non_negative_int(f"{p}.slices_per_site", self.slices_per_site)
        _non_negative_int(f"{p}.val_slices_per_site", self.val_slices_per_site)
        _non_negative_int(f"{p}.test_slices", self.test_slices)
        if self.source == "phantom":
            _check(
                f"{p}.image_size", 64 <= self.image_size <= 512, "phantom slices are 64 to 512 pixels", self.image_size
            )
            _positive_int(f"{p}.slices_per_site", self.slices_per_site)
            for i, s in enumerate(self.sites):
                _check(
                    f"{p}.sites[{i}]",
                    bool(_PHANTOM_SITE.match(s)),
                    "phantom sites are 'site_a', 'site_b', 'site_c' or 'site_<number>'",
                    s,
                )
            if self.test_site is not None:
                _check(
                    f"{p}.test_site",
                    bool(_PHANTOM_SITE.match(self.test_site)),
                    "phantom sites are 'site_a', 'site_b', 'site_c' or 'site_<number>'",
                    self.test_site,
                )
        else:
            _check(f"{p}.msd_path", bool(self.msd_path), "is required when data.source = 'msd'", self.msd_path)
            if self.msd_organ_margin is not None:
                _non_negative_int(f"{p}.msd_organ_margin", self.msd_organ_margin)


@dataclass
class ModelConfig:
    """The segmentation network: a name from :func:`fastdp.models.build_model` and its kwargs."""

    name: str = "unet_tiny"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self, p: str) -> None:
        _choice(f"{p}.name", self.name, MODEL_NAMES)


@dataclass
class FederatedConfig:
    """Federated training: rounds of local training at each site, then aggregation.

    Attributes:
        rounds: communication rounds.
        local_steps: optimizer steps per site per round.
        batch_size: (expected, under Poisson sampling) batch size of a local step.
        lr: local learning rate.
        optimizer: ``"adam"``, ``"sgd"`` or ``"sgdm"`` (SGD with momentum 0.9).
        sites_per_round: sites sampled each round (None: all take part every round).
        strategy: ``"fedavg"`` (weighted by samples), ``"fedprox"`` or ``"dp-fedavg"``
            (user-level DP at the server; only in the "dp" mode, the "nonprivate" run uses FedAvg).
        fedprox_mu: FedProx proximal weight.
        server_clip_norm: DP-FedAvg: each site update is clipped to this L2 norm.
        server_noise_multiplier: DP-FedAvg: noise std at the server is this times the clip norm.
        max_update_norm: FedAvg / FedProx: the server rejects a site update whose L2 norm is above
            this (a site cannot move the global model arbitrarily far; 0 turns the bound off).
            Ignored under DP-FedAvg, whose clipping to ``server_clip_norm`` bounds every update.
        backend: ``"simulation"`` (every site in this process, checkpointed, resumable) or
            ``"flower"`` (a Flower SuperLink and one SuperNode per site as separate processes on
            127.0.0.1, via :func:`fastdp.flower.launch_local`; needs ``fastdp[flower]``).
            Both train the same Sites and write the same run folder.
    """

    rounds: int = 10
    local_steps: int = 20
    batch_size: int = 32
    lr: float = 1e-2
    optimizer: str = "adam"
    sites_per_round: int | None = None
    strategy: str = "fedavg"
    fedprox_mu: float = 0.01
    server_clip_norm: float = 1.0
    server_noise_multiplier: float = 1.0
    max_update_norm: float = 100.0
    backend: str = "simulation"

    def validate(self, p: str) -> None:
        _positive_int(f"{p}.rounds", self.rounds)
        _positive_int(f"{p}.local_steps", self.local_steps)
        _positive_int(f"{p}.batch_size", self.batch_size)
        _positive_float(f"{p}.lr", self.lr)
        _choice(f"{p}.optimizer", self.optimizer, OPTIMIZERS)
        if self.sites_per_round is not None:
            _positive_int(f"{p}.sites_per_round", self.sites_per_round)
        _choice(f"{p}.strategy", self.strategy, STRATEGIES)
        _non_negative_float(f"{p}.fedprox_mu", self.fedprox_mu)
        _positive_float(f"{p}.server_clip_norm", self.server_clip_norm)
        _non_negative_float(f"{p}.server_noise_multiplier", self.server_noise_multiplier)
        _non_negative_float(f"{p}.max_update_norm", self.max_update_norm)
        _choice(f"{p}.backend", self.backend, BACKENDS)


@dataclass
class DPSettings(DPConfig):
    """Sample-level DP-SGD at every site (the "dp" mode), accounted per site: the ``[dp]`` section.

    The fields of :class:`fastdp.federated.DPConfig` (validated there), plus the experiment-wide
    ones below; :meth:`for_site` gives each site its DPConfig. Give either ``noise_multiplier``
    (sigma) or ``target_epsilon`` (sigma is then calibrated so that each site reaches it after
    all planned rounds); setting one in a file clears the other's default.

    Attributes:
        enabled: master switch; the "dp" mode needs it on.
        target_epsilon: epsilon each site reaches at the end of training, at ``delta`` (default 8).
        epsilon_budget: a site stops taking part once its epsilon would pass this; a number
            for every site or a table ``{site = budget}`` (None: no budget).
        epsilon_sweep: when not empty, the "dp" mode runs once per target epsilon here
            (a privacy-utility curve); the run folders are ``dp_eps<epsilon>``.
        reproducible_noise: derive every DP site's noise and sampling seeds (and the DP-FedAvg
            server's noise seed) from ``seed``, for bit-exact tests. Anyone who knows the config
            (the server writes it) can then regenerate and subtract the noise: the run is NOT
            private, warns, and its report says so. Default false: seeds from the OS CSPRNG.
    """

    enabled: bool = True
    target_epsilon: float | None = 8.0
    epsilon_budget: float | dict[str, float] | None = None
    epsilon_sweep: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        pass  # validated by validate(), which names the key path (ExperimentConfig.validate)

    def validate(self, p: str) -> None:
        need_one = self.enabled and not self.epsilon_sweep
        for key, message in self.problems(need_sigma_or_epsilon=need_one):
            # "give exactly one of ..." is about the pair, not one key: name the section.
            where = p if message.startswith("give") else f"{p}.{key}"
            raise ConfigError(f"{where}: {message}")
        if self.noise_multiplier is not None and self.epsilon_sweep:
            raise ConfigError(f"{p}.epsilon_sweep: sweeps target epsilons; remove dp.noise_multiplier")
        if isinstance(self.epsilon_budget, dict):
            for site, budget in self.epsilon_budget.items():
                _positive_float(f"{p}.epsilon_budget.{site}", budget)
        for i, eps in enumerate(self.epsilon_sweep):
            _positive_float(f"{p}.epsilon_sweep[{i}]", eps)

    def budget_for(self, site: str) -> float | None:
        """The epsilon budget of one site (None: unlimited)."""
        if isinstance(self.epsilon_budget, dict):
            return self.epsilon_budget.get(site)
        return self.epsilon_budget

    def for_site(self, site: str, target_epsilon: float | None = None) -> DPConfig:
        """The DPConfig of one site; ``target_epsilon`` (a sweep's point) replaces the configured sigma/epsilon."""
        sigma = self.noise_multiplier if target_epsilon is None else None
        return DPConfig(
            noise_multiplier=sigma,
            target_epsilon=None if sigma is not None else (target_epsilon or self.target_epsilon),
            max_grad_norm=self.max_grad_norm,
            delta=self.delta,
            epsilon_budget=self.budget_for(site),
            accountant=self.accountant,
            reproducible_noise=self.reproducible_noise,
            conv_method=self.conv_method,
        )


@dataclass
class AttackConfig:
    """Gradient inversion (Geiping et al.) on what a site shares, non-private vs DP.

    Attributes:
        enabled: run the attack after training.
        site: the attacked site (None: the first one).
        steps: optimisation steps of the attack.
        lr: the attack's learning rate.
        tv_weight: weight of the total-variation prior.
        restarts: random restarts (the best by loss is kept).
        batch_sizes: batch sizes of the attacked update (the paper's point: 1 is easiest).
        sigmas: extra noise multipliers to attack besides the DP run's own (e.g. [0.01, 0.1]).
        known_mask: the attacker knows the segmentation mask (otherwise optimised jointly).
        target: the model whose update is attacked: "round1" (the initial global model the
            server sends in round 1: the update the server sees first, and the easiest to invert,
            see docs/attacks.md) or "final" (the final non-private global model).
        update: what the attacked site computes: "sgd_step" (one plain-SGD step at lr 0.1 on the
            batch: the attacker's best case, docs/attacks.md) or "federated" (the run's own local
            training: federated.optimizer, federated.local_steps and federated.lr, unrolled by the
            attack; the demo's is Adam, 20 steps, and costs about local_steps times more per step).
        batches: disjoint batches attacked per batch size (each its own update; metrics pool them).
        pool_size: identification: other patients' slices with similar masks the true slice is
            ranked among (0: off).
    """

    enabled: bool = True
    site: str | None = None
    # The defaults are the demo's (configs/demo.toml): the recipe of docs/attacks.md (issue 15).
    steps: int = 100
    lr: float = 0.1
    tv_weight: float = 0.1
    restarts: int = 1
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    sigmas: list[float] = field(default_factory=list)
    known_mask: bool = True
    target: str = "round1"
    update: str = "sgd_step"
    batches: int = 4
    pool_size: int = 20

    def validate(self, p: str) -> None:
        _check(f"{p}.target", self.target in ("round1", "final"), "must be 'round1' or 'final'", self.target)
        ok = self.update in ("sgd_step", "federated")
        _check(f"{p}.update", ok, "must be 'sgd_step' or 'federated'", self.update)
        _positive_int(f"{p}.steps", self.steps)
        _positive_int(f"{p}.batches", self.batches)
        ok = isinstance(self.pool_size, int) and not isinstance(self.pool_size, bool) and self.pool_size >= 0
        _check(f"{p}.pool_size", ok, "must be an integer >= 0", self.pool_size)
        _positive_float(f"{p}.lr", self.lr)
        _non_negative_float(f"{p}.tv_weight", self.tv_weight)
        _positive_int(f"{p}.restarts", self.restarts)
        _check(f"{p}.batch_sizes", len(self.batch_sizes) >= 1, "must list at least one batch size", self.batch_sizes)
        for i, b in enumerate(self.batch_sizes):
            _positive_int(f"{p}.batch_sizes[{i}]", b)
        for i, s in enumerate(self.sigmas):
            _non_negative_float(f"{p}.sigmas[{i}]", s)


@dataclass
class ExperimentConfig:
    """One experiment: data, model, federated training, DP, which runs, the attack.

    Attributes:
        name: a label for the run (report title).
        seed: global seed (data, model init, sampling, noise).
        threads: torch CPU threads (2 suits the 2-core default machine).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (cuda when available).
        out_dir: the run folder: config, per-mode histories and checkpoints, report.
        modes: which runs to do: ``"nonprivate"`` (FL without DP), ``"dp"`` (FL with DP-SGD at
            every site), ``"centralised"`` (all training data pooled at one site, no DP).
    """

    name: str = "demo"
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    out_dir: str = "runs/demo"
    modes: list[str] = field(default_factory=lambda: ["nonprivate", "dp"])
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federated: FederatedConfig = field(default_factory=FederatedConfig)
    dp: DPSettings = field(default_factory=DPSettings)
    attack: AttackConfig = field(default_factory=AttackConfig)

    def validate(self) -> ExperimentConfig:
        """Checks every value; raises ConfigError naming the key. Returns self."""
        _check("name", bool(self.name), "must be a non-empty string", self.name)
        _non_negative_int("seed", self.seed)
        _positive_int("threads", self.threads)
        _choice("device", self.device, ("cpu", "cuda", "auto"))
        _check("out_dir", bool(self.out_dir), "must be a non-empty path", self.out_dir)
        _check("modes", len(self.modes) >= 1, "must list at least one run", self.modes)
        for i, m in enumerate(self.modes):
            _choice(f"modes[{i}]", m, MODES)
        _check("modes", len(set(self.modes)) == len(self.modes), "must not repeat a mode", self.modes)
        for name in _SECTIONS:
            getattr(self, name).validate(name)
        if "dp" in self.modes and not self.dp.enabled:
            raise ConfigError("modes: 'dp' is listed but dp.enabled = false; enable DP or drop the mode")
        fed = self.federated
        if fed.sites_per_round is not None and fed.sites_per_round > len(self.data.sites):
            raise ConfigError(
                f"federated.sites_per_round: {fed.sites_per_round} is more than the {len(self.data.sites)} sites"
            )
        if self.attack.site is not None:
            _choice("attack.site", self.attack.site, tuple(self.data.sites))
        if isinstance(self.dp.epsilon_budget, dict):
            for site in self.dp.epsilon_budget:
                _choice(f"dp.epsilon_budget.{site}", site, tuple(self.data.sites), what="site")
        return self

    # --------------------------------------------------------------- conversions

    @classmethod
    def from_dict(cls, data: dict) -> ExperimentConfig:
        """Builds and validates a config from nested dicts (as parsed from TOML/YAML)."""
        return _build(cls, data, "").validate()

    def to_dict(self) -> dict:
        """Nested plain dicts (JSON- and TOML-able; None values kept)."""
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The config as TOML text that :func:`load_config` reads back to an equal config."""
        return tomlio.dumps(self.to_dict())

    def replace(self, **overrides: Any) -> ExperimentConfig:
        """A validated copy with dotted-key overrides, e.g. ``replace(**{"federated.rounds": 2})``."""
        data = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(data, key, value)
        return ExperimentConfig.from_dict(tomlio.drop_none(data))


_SECTIONS = ("data", "model", "federated", "dp", "attack")


# ------------------------------------------------------------------ loading


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Reads a TOML (``.toml``) or YAML (``.yaml``/``.yml``) config; None gives the built-in demo.

    Args:
        path: the config file.
        overrides: ``"section.key=value"`` strings applied on top (values in TOML syntax:
            ``federated.rounds=3``, ``modes=["dp"]``, ``dp.target_epsilon=2``).
    Raises:
        ConfigError: unreadable file, bad syntax, unknown key or bad value (message names it).
    """
    data = _read_file(Path(path)) if path is not None else {}
    _apply_overrides(data, overrides or [])
    try:
        return ExperimentConfig.from_dict(data)
    except ConfigError as exc:
        where = f"{path}: " if path is not None else ""
        raise ConfigError(f"{where}{exc}") from None


def _read_file(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"{path}: YAML configs need PyYAML (pip install pyyaml), or use TOML") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        data = {} if data is None else data
    elif suffix == ".toml":
        try:
            data = tomlio.loads(text)
        except tomlio.tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    else:
        raise ConfigError(f"{path}: unknown config format {suffix!r}; use .toml, .yaml or .yml")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a table of keys, got {type(data).__name__}")
    return data


def apply_overrides(config: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """A validated copy of ``config`` with ``"section.key=value"`` overrides (TOML values)."""
    data = tomlio.drop_none(config.to_dict())
    _apply_overrides(data, overrides)
    return ExperimentConfig.from_dict(data)


def _apply_overrides(data: dict, overrides: list[str]) -> None:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected section.key=value")
        _set_dotted(data, key.strip(), tomlio.parse_value(value.strip()))


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{key}: {part!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value
    # Setting sigma clears the calibrated-epsilon default and vice versa (DPSettings' rule).
    if parts[:-1] == ["dp"] and parts[-1] in _EXCLUSIVE:
        node.pop(_EXCLUSIVE[parts[-1]], None)


_EXCLUSIVE = {"noise_multiplier": "target_epsilon", "target_epsilon": "noise_multiplier"}


# --------------------------------------------------------- dict -> dataclasses


def _build(cls: type, data: Any, path: str):
    """Constructs dataclass ``cls`` from a dict, converting each field by its type hint."""
    where = path or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a table of keys, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ConfigError(_unknown_key_message(key, path, names))
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else key
        kwargs[key] = _convert(hints[key], value, full)
    if cls is DPSettings and "target_epsilon" not in data and ("noise_multiplier" in data or data.get("epsilon_sweep")):
        kwargs["target_epsilon"] = None  # sigma or a sweep given: the default epsilon does not apply
    return cls(**kwargs)


def _convert(hint: Any, value: Any, path: str):
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, path)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{path}: must be {_describe(hint)}, got {_show(value)}")
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: must be a list of {_describe(item)}, got {_show(value)}")
        return [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: must be a table, got {_show(value)}")
        return {str(k): _convert(item, v, f"{path}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: must be true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: must be an integer, got {_show(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: must be a number, got {_show(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a string, got {_show(value)}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {path}")  # a bug in this module, not in the file


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint) if a is not type(None))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a table"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _all_keys(cls: type = None, prefix: str = "") -> list[str]:
    cls = cls or ExperimentConfig
    out = []
    for f in dataclasses.fields(cls):
        full = f"{prefix}.{f.name}" if prefix else f.name
        out.append(full)
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            out.extend(_all_keys(hint, full))
    return out


_ALIASES = {
    "sigma": "noise_multiplier",
    "noise": "noise_multiplier",
    "epsilon": "target_epsilon",
    "eps": "target_epsilon",
    "clip": "max_grad_norm",
    "clip_norm": "max_grad_norm",
    "budget": "epsilon_budget",
    "epochs": "rounds",
    "learning_rate": "lr",
    "size": "image_size",
    "model": "name",
    "iterations": "steps",
}


def _unknown_key_message(key: str, path: str, names: list[str]) -> str:
    full = f"{path}.{key}" if path else key
    # Common names for a field (sigma, epsilon, ...) are matched too, so "sigmaa" finds noise_multiplier.
    aliases = {a: n for a, n in _ALIASES.items() if n in names}
    matches = difflib.get_close_matches(key, names + list(aliases), n=3, cutoff=0.6)
    close = list(dict.fromkeys(f"{path}.{aliases.get(m, m)}" if path else aliases.get(m, m) for m in matches))
    # A key put in the wrong section (e.g. [federated] epsilon_budget) is found by its last part.
    elsewhere = [k for k in _all_keys() if k.rsplit(".", 1)[-1] == key and k != full]
    hints = close + [k for k in elsewhere if k not in close]
    msg = f"unknown key '{full}'"
    if hints:
        msg += " (did you mean " + " or ".join(f"'{h}'" for h in hints) + "?)"
    else:
        msg += f"; valid keys{' in [' + path + ']' if path else ''}: {', '.join(names)}"
    return msg


# ------------------------------------------------------------------ checks


def _check(path: str, ok: bool, must: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{path}: {must}, got {value!r}")


def _positive_int(path: str, v: int) -> None:
    _check(path, isinstance(v, int) and not isinstance(v, bool) and v > 0, "must be a positive integer", v)


def _non_negative_int(path: str, v: int) -> None:
    _check(path, isinstance(v, int) and not isinstance(v, bool) and v >= 0, "must be a non-negative integer", v)


def _positive_float(path: str, v: float) -> None:
    _check(path, math.isfinite(v) and v > 0, "must be a positive finite number", v)


def _non_negative_float(path: str, v: float) -> None:
    _check(path, math.isfinite(v) and v >= 0, "must be a non-negative finite number", v)


def _choice(path: str, v: str, options: tuple[str, ...], what: str = "value") -> None:
    if v not in options:
        close = difflib.get_close_matches(str(v), options, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}: unknown {what} {v!r}{hint}; choose from {', '.join(map(repr, options))}")
