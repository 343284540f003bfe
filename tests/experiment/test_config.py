"""Experiment config: defaults, TOML round trip, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from fastdp.experiment import MODEL_NAMES, ConfigError, ExperimentConfig, apply_overrides, load_config
from fastdp.experiment.tomlio import dumps, loads, parse_value

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _write(tmp_path: Path, text: str, name: str = "c.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_the_demo():
    cfg = ExperimentConfig().validate()
    assert cfg.data.source == "phantom" and cfg.data.sites == ["site_a", "site_b", "site_c"]
    assert cfg.data.image_size == 64 and cfg.model.name == "unet_tiny"
    assert cfg.modes == ["nonprivate", "dp"]
    assert cfg.dp.target_epsilon == 8.0 and cfg.dp.delta == 1e-5 and cfg.dp.noise_multiplier is None
    assert cfg.attack.enabled
    assert load_config(CONFIGS / "demo.toml") == cfg


@pytest.mark.parametrize("name", ["demo.toml", "paper_liver_256.toml", "privacy_utility.toml"])
def test_shipped_configs_load_and_round_trip(tmp_path, name):
    cfg = load_config(CONFIGS / name)
    again = load_config(_write(tmp_path, cfg.to_toml()))
    assert again == cfg


def test_round_trip_of_every_value_kind(tmp_path):
    cfg = ExperimentConfig().replace(
        **{
            "dp.noise_multiplier": 1.3,
            "dp.epsilon_budget": {"site_a": 2.5, "site_b": 4.0},
            "model.kwargs": {"base_channels": 8, "up": "upsample"},
            "federated.sites_per_round": 2,
            "attack.sigmas": [0.01, 0.1],
            "data.test_site": "site_4",
            "name": 'quote " and \\ backslash',
        }
    )
    assert cfg.dp.target_epsilon is None  # sigma given: no calibration to the default epsilon
    assert load_config(_write(tmp_path, cfg.to_toml())) == cfg


def test_setting_sigma_in_a_file_clears_the_default_epsilon(tmp_path):
    cfg = load_config(_write(tmp_path, "[dp]\nnoise_multiplier = 0.9\n"))
    assert cfg.dp.noise_multiplier == 0.9 and cfg.dp.target_epsilon is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[federated]\nrounds = -1\n", "federated.rounds: must be a positive integer, got -1"),
        ("[federated]\nrounds = 2.5\n", "federated.rounds: must be an integer"),
        ("[dp]\nsigmaa = 1.0\n", "unknown key 'dp.sigmaa' (did you mean 'dp.noise_multiplier'?)"),
        ("[federated]\nround = 3\n", "did you mean 'federated.rounds'"),
        ("[federated]\nepsilon_budget = 3\n", "did you mean 'dp.epsilon_budget'"),
        ("[data]\nimage_size = 60\n", "data.image_size: must be a multiple of 8"),
        ("[data]\nsites = ['site_a', 3]\n", "data.sites[1]: must be a string"),
        ("[data]\nsites = ['hospital']\n", "data.sites[0]: phantom sites are"),
        ("[data]\nsource = 'msd'\n", "data.msd_path: is required"),
        ("[model]\nname = 'unet_smal'\n", "model.name: unknown value 'unet_smal' (did you mean 'unet_small'?)"),
        ("[dp]\ndelta = 1.5\n", "dp.delta: must be in (0, 1)"),
        ("[dp]\nnoise_multiplier = 1.0\ntarget_epsilon = 3.0\n", "dp: give noise_multiplier or target_epsilon"),
        ("[dp]\nepsilon_budget = {site_z = 2.0}\n", "dp.epsilon_budget.site_z: unknown site"),
        ("[dp]\nenabled = 'yes'\n", "dp.enabled: must be true or false"),
        ("[dp]\nenabled = false\n", "modes: 'dp' is listed but dp.enabled = false"),
        ("modes = ['dpsgd']\n", "modes[0]: unknown value 'dpsgd'"),
        ("[federated]\nsites_per_round = 4\n", "federated.sites_per_round: 4 is more than the 3 sites"),
        ("[federated]\noptimizer = 'adamw'\n", "federated.optimizer: unknown value 'adamw'"),
        ("[attack]\nsite = 'site_d'\n", "attack.site: unknown value 'site_d'"),
        ("[attack]\nbatch_sizes = [1, 0]\n", "attack.batch_sizes[1]: must be a positive integer, got 0"),
        ("dp = 3\n", "dp: must be a table of keys"),
        ("colour = 'red'\n", "unknown key 'colour'; valid keys: name, seed"),
    ],
)
def test_errors_name_the_key(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)  # the file is named too


def test_bad_syntax_and_formats(tmp_path):
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(_write(tmp_path, "[dp\n"))
    with pytest.raises(ConfigError, match="unknown config format '.json'"):
        load_config(_write(tmp_path, "{}", "c.json"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")


def test_yaml(tmp_path):
    path = _write(tmp_path, "federated:\n  rounds: 3\ndp:\n  target_epsilon: 2\n", "c.yaml")
    try:
        import yaml  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install pyyaml"):
            load_config(path)
        return
    cfg = load_config(path)
    assert cfg.federated.rounds == 3 and cfg.dp.target_epsilon == 2.0


def test_overrides():
    cfg = load_config(None, ["federated.rounds=3", "modes=['dp']", "federated.strategy=fedprox", "dp.target_epsilon=2"])
    assert cfg.federated.rounds == 3 and cfg.modes == ["dp"] and cfg.federated.strategy == "fedprox"
    assert cfg.dp.target_epsilon == 2.0
    cfg = apply_overrides(cfg, ["dp.noise_multiplier=1.5"])
    assert cfg.dp.noise_multiplier == 1.5 and cfg.dp.target_epsilon is None
    with pytest.raises(ConfigError, match="federated.rounds: must be a positive integer, got 0"):
        load_config(None, ["federated.rounds=0"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["federated.rounds"])


def test_model_names_build():
    from fastdp.models import build_model

    # Every name the config accepts is one build_model knows (tiny widths: this checks names, not models).
    tiny = {
        "unet_tiny": {"base_channels": 2},
        "unet_small": {"base_channels": 2},
        "unet_paper": {"base_channels": 2},
        "monai_unet": {"channels": (2, 4), "num_groups": 1},
        "monai_basic_unet": {"features": (2, 2, 2, 2, 2, 2), "num_groups": 1},
    }
    assert set(tiny) == set(MODEL_NAMES)
    for name in MODEL_NAMES:
        build_model(name, **tiny[name])


def test_tomlio():
    data = {"a": 1, "b": [1.5, float("inf")], "c": {"d": "x y", "e": None, "f": {"g": True}}, "h k": {}}
    text = dumps(data)
    assert loads(text) == {"a": 1, "b": [1.5, float("inf")], "c": {"d": "x y", "f": {"g": True}}, "h k": {}}
    assert parse_value("3") == 3 and parse_value("[1, 4]") == [1, 4] and parse_value("fedprox") == "fedprox"
