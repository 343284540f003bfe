"""Runner pieces that need no training: the planned runs, sigma calibration, the data split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fastdp.experiment import ConfigError, ExperimentConfig
from fastdp.experiment.data import build_data
from fastdp.experiment.runner import model_factory, planned_noise_multiplier, planned_runs


def test_planned_runs_expand_an_epsilon_sweep():
    cfg = ExperimentConfig().replace(modes=["centralised", "nonprivate", "dp"], **{"dp.epsilon_sweep": [1, 8.5]})
    runs = planned_runs(cfg)
    assert [r.label for r in runs] == ["centralised", "nonprivate", "dp_eps1", "dp_eps8.5"]
    assert [r.target_epsilon for r in runs] == [None, None, 1.0, 8.5]


def test_planned_noise_multiplier(monkeypatch):
    from fastdp.federated import dp_config

    calls = []  # the one calibration: DPConfig.noise_multiplier_for, as the Site calls it
    monkeypatch.setattr(dp_config, "get_noise_multiplier", lambda *a: calls.append(a) or 0.5)
    cfg = ExperimentConfig().replace(**{"federated.rounds": 2, "federated.local_steps": 5, "dp.accountant": "pld"})
    # Calibrated over every planned step (rounds * local_steps) at sample rate batch_size / n.
    assert planned_noise_multiplier(cfg, 320) == 0.5
    assert calls == [(8.0, 1e-5, 32 / 320, 10, "pld")]
    assert planned_noise_multiplier(cfg, 320, target_epsilon=2.0) == 0.5 and calls[-1][0] == 2.0
    assert planned_noise_multiplier(cfg.replace(**{"dp.noise_multiplier": 1.7}), 320) == 1.7
    assert len(calls) == 2


def test_phantom_data_split():
    cfg = ExperimentConfig().replace(
        **{"data.slices_per_site": 5, "data.val_slices_per_site": 2, "data.test_slices": 7, "data.image_size": 64}
    )
    data = build_data(cfg.data, seed=0)
    assert list(data.train) == ["site_a", "site_b", "site_c"]
    assert [len(d) for d in data.train.values()] == [5, 5, 5]
    assert [len(d) for d in data.val.values()] == [2, 2, 2]
    assert len(data.test) == 7
    image, mask = data.test[6]
    assert image.shape == (1, 64, 64) and mask.shape == (64, 64)
    # Validation slices are other patients than training slices.
    assert not (data.train["site_a"][0][0] == data.val["site_a"][0][0]).all()
    train, val = data.pooled()
    assert len(train) == 15 and len(val) == 6
    unseen = build_data(cfg.replace(**{"data.test_site": "site_7"}).data, seed=0)
    assert unseen.test.site == "site_7" and len(unseen.test) == 7
    assert list(unseen.test_parts) == ["site_7"] and unseen.test_parts["site_7"] is unseen.test


def test_pooled_test_set_is_split_by_site_for_fairness():
    cfg = ExperimentConfig().replace(**{"data.slices_per_site": 2, "data.test_slices": 7, "data.image_size": 64})
    data = build_data(cfg.data, seed=0)
    # Each part is the site's own held-out patients, and the parts are exactly the pooled test set.
    assert list(data.test_parts) == ["site_a", "site_b", "site_c"]
    assert [len(p) for p in data.test_parts.values()] == [3, 2, 2]
    assert [p.site for p in data.test_parts.values()] == ["site_a", "site_b", "site_c"]
    torch.testing.assert_close(data.test[3][0], data.test_parts["site_b"][0][0])
    # Two test slices only: the third site has no held-out patients and no part.
    small = build_data(cfg.replace(**{"data.test_slices": 2}).data, seed=0)
    assert list(small.test_parts) == ["site_a", "site_b"] and len(small.test) == 2


def test_bad_model_kwargs_name_the_key():
    with pytest.raises(ConfigError, match="model.kwargs"):
        model_factory(ExperimentConfig().replace(**{"model.kwargs": {"no_such_arg": 1}}))


def test_resume_is_refused_when_the_config_changed(tmp_path):
    from fastdp.experiment.config import ConfigError
    from fastdp.experiment.runner import _prepare_run_dir

    cfg = ExperimentConfig()
    (tmp_path / "config.toml").write_text(cfg.to_toml())
    (tmp_path / "nonprivate" / "checkpoints").mkdir(parents=True)
    _prepare_run_dir(cfg, tmp_path, fresh=False)  # same config: resuming is fine
    changed = cfg.replace(**{"federated.lr": 0.02})
    with pytest.raises(ConfigError, match="--fresh"):
        _prepare_run_dir(changed, tmp_path, fresh=False)
    _prepare_run_dir(changed, tmp_path, fresh=True)
    assert not (tmp_path / "nonprivate" / "checkpoints").exists()


def test_backend_is_validated():
    assert ExperimentConfig().federated.backend == "simulation"
    with pytest.raises(ConfigError, match="federated.backend: unknown value 'flwr'"):
        ExperimentConfig().replace(**{"federated.backend": "flwr"})


def test_flower_backend_needs_the_flower_runner():
    cfg = ExperimentConfig().replace(**{"federated.backend": "flower"})
    from fastdp.experiment.runner import run_mode

    with pytest.raises(ConfigError, match="fastdp.flower.run_experiment"):
        run_mode(cfg, planned_runs(cfg)[0], None, Path("/nonexistent"), progress=False)
