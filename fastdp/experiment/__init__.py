"""Experiments end to end: a validated config (TOML/YAML) and the runner that trains, attacks and reports."""

from fastdp.experiment.config import (
    MODEL_NAMES,
    MODES,
    AttackConfig,
    ConfigError,
    DataConfig,
    DPSettings,
    ExperimentConfig,
    FederatedConfig,
    ModelConfig,
    apply_overrides,
    load_config,
)

__all__ = [
    "MODEL_NAMES",
    "MODES",
    "AttackConfig",
    "ConfigError",
    "DPSettings",
    "DataConfig",
    "ExperimentConfig",
    "FederatedConfig",
    "ModelConfig",
    "apply_overrides",
    "load_config",
]
