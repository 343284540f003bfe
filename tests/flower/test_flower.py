"""The Flower adapter: a real SuperLink and three SuperNodes (separate processes, 127.0.0.1) against the simulator.

Both paths build their Sites, Strategy, model and data from one ExperimentConfig through
fastdp.experiment.builders (the Flower run config carries the config's TOML text and the run
label), run the same fastdp code, and exchange float32 tensors as numpy .npy bytes (exact), so
the final global models must be bit-identical: tolerance 0.
What could break that: a different per-sample conv method (FASTDP_CONV_METHOD=grouped in the
child processes; conftest fixes it in-process), a different thread count (OMP_NUM_THREADS=1 and
threads = 1 there, torch.set_num_threads(1) here), a site state that does not survive the new
ClientApp process of round 2 (optimizer, sampler RNG, noise stream), or updates aggregated in
another order.
"""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from fastdp.noise import ReproducibleNoiseWarning

pytest.importorskip("flwr", reason="the Flower adapter needs the extra: pip install 'fastdp[flower]'")

from fastdp import flower  # noqa: E402
from fastdp.experiment import ExperimentConfig  # noqa: E402
from fastdp.experiment.builders import build_simulation, build_site, find_run, model_factory, planned_runs  # noqa: E402, E501
from fastdp.experiment.data import build_data  # noqa: E402
from fastdp.federated.simulation import initial_global_state  # noqa: E402
from fastdp.federated.site import SiteUpdate  # noqa: E402
from fastdp.federated.state_files import load_state  # noqa: E402

# The tiny sizes of tests/federated: 64x64 phantom slices, a 4-channel depth-2 U-Net, 2 rounds of 2 steps.
# dp.reproducible_noise: the bit-exact comparison needs both backends to draw the same noise (test-only;
# test_open_site_keeps_a_secret_noise_seed_across_messages checks the private default).
EXPERIMENT = ExperimentConfig.from_dict(
    {
        "name": "flower-test",
        "seed": 3,
        "threads": 1,
        "modes": ["nonprivate", "dp"],
        "data": {"image_size": 64, "slices_per_site": 40, "val_slices_per_site": 8, "test_slices": 24},
        "model": {"name": "unet_small", "kwargs": {"base_channels": 4, "depth": 2}},
        "federated": {"rounds": 2, "local_steps": 2, "batch_size": 8, "lr": 0.1, "optimizer": "sgd"},
        "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "reproducible_noise": True},
        "attack": {"enabled": False},
    }
)
pytestmark = pytest.mark.filterwarnings("ignore::fastdp.noise.ReproducibleNoiseWarning")
CHILD_ENV = {"FASTDP_CONV_METHOD": "grouped", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _simulation(cfg: ExperimentConfig, label: str):
    sim = build_simulation(cfg, find_run(cfg, label), build_data(cfg.data, cfg.seed), progress=False)
    sim.run()
    return sim


def _assert_same(global_state: dict, history: dict, sim) -> float:
    """Flower's result equals the in-process Simulation's: global state bit for bit, every round record."""
    assert list(global_state) == list(sim.global_state)
    max_diff = max(float((global_state[k].double() - v.double()).abs().max()) for k, v in sim.global_state.items())
    assert max_diff == 0.0, f"Flower and in-process global models differ by up to {max_diff}"
    want = sim.history.to_dict()
    assert history["mode"] == want["mode"]
    assert history["config"] == json.loads(json.dumps(want["config"]))
    got_rounds, want_rounds = history["rounds"], want["rounds"]
    assert len(got_rounds) == len(want_rounds) == sim.rounds
    for g, w in zip(got_rounds, want_rounds, strict=True):
        assert g["participants"] == w["participants"]
        assert g["test"] == w["test"]
        for sid, ws in w["sites"].items():
            gs = g["sites"][sid]
            for key in ("participated", "train_loss", "val_dice", "val_loss", "epsilon", "steps", "num_samples"):
                assert gs[key] == ws[key], (g["round"], sid, key)
    print(f"max |flower - simulation| over the global state: {max_diff}")
    return max_diff


@pytest.mark.slow
def test_flower_fedavg_matches_simulation(tmp_path):
    run_config = flower.run_config_for(EXPERIMENT, "nonprivate")
    run = flower.launch_local(3, run_config, work_dir=tmp_path / "flower", env=CHILD_ENV, timeout=900)
    assert run.status == "finished:completed"
    sim = _simulation(EXPERIMENT, "nonprivate")
    _assert_same(run.global_state, run.history, sim)
    assert all(s["epsilon"] is None for s in run.history["rounds"][-1]["sites"].values())
    assert run.history["rounds"][-1]["test"]["dice"] is not None


@pytest.mark.slow
def test_flower_backend_of_the_runner_dp_sgd_matches_simulation(tmp_path, monkeypatch):
    """`fastdp run --set federated.backend="flower"`: the run folder the report reads, same numbers as in-process."""
    from fastdp.flower import run_experiment

    for k, v in CHILD_ENV.items():
        monkeypatch.setenv(k, v)  # inherited by every Flower process the runner starts
    # Adam: its moments must survive between the ClientApp processes of round 1 and round 2.
    # DP-FedAvg with 2 of 3 sites per round on average: Poisson site selection, server clipping,
    # server noise and the server's accountant also run through Flower (on top of DP-SGD at the sites).
    cfg = EXPERIMENT.replace(
        modes=["dp"],
        out_dir=str(tmp_path / "run"),
        **{
            "federated.optimizer": "adam",
            "federated.lr": 0.01,
            "federated.backend": "flower",
            "federated.strategy": "dp-fedavg",
            "federated.sites_per_round": 2,
            "federated.server_clip_norm": 0.05,
        },
    )
    run_dir = run_experiment(cfg, progress=False, report=True)
    assert (run_dir / "report.md").exists() and (run_dir / "dp" / "history.csv").exists()
    global_state = torch.load(run_dir / "dp" / "global_model.pt", weights_only=True)
    history = json.loads((run_dir / "dp" / "history.json").read_text())
    # The in-process run of the same config differs only in the backend it names.
    sim = _simulation(cfg.replace(**{"federated.backend": "simulation"}), "dp")
    sim.history.config["federated"]["backend"] = "flower"
    _assert_same(global_state, history, sim)
    assert history["mode"] == "dp-fedavg"
    server_eps = [r["server_epsilon"] for r in history["rounds"]]
    assert server_eps == [r["server_epsilon"] for r in sim.history.to_dict()["rounds"]]
    assert 0 < server_eps[0] < server_eps[1]
    last = history["rounds"][-1]["sites"]
    assert all(0 < s["epsilon"] < math.inf for s in last.values() if s["steps"])
    # Every site that trained kept its own state file; its accountant counts the steps of the rounds it took part in.
    rounds_in = {sid: sum(r["sites"][sid]["participated"] for r in history["rounds"]) for sid in last}
    state_dir = run_dir / "dp" / "flower" / "state" / cfg.name / "dp"

    def steps_on_record() -> dict:
        # A DP site writes its state on its first message (its secret noise seed), so all three have one.
        files = sorted(state_dir.glob("*.pt"))
        assert [f.stem for f in files] == sorted(last)
        return {f.stem: sum(n for _, _, n in load_state(f)["engine"]["accountant"]["history"]) for f in files}

    first = steps_on_record()
    assert first == {sid: n * cfg.federated.local_steps for sid, n in rounds_in.items()}
    # A rerun of the same experiment (after a crash, say) is a new Flower run id; the sites' updates of
    # the first run reached the server, so their accountants go on from there instead of from 0.
    run_experiment(cfg, progress=False, report=False)
    assert steps_on_record() == {sid: 2 * n for sid, n in first.items()}
    rerun = json.loads((run_dir / "dp" / "history.json").read_text())
    for sid, n in rounds_in.items():
        if n:
            first_eps = [r["sites"][sid]["epsilon"] for r in history["rounds"] if r["sites"][sid]["participated"]]
            again = [r["sites"][sid]["epsilon"] for r in rerun["rounds"] if r["sites"][sid]["participated"]]
            assert again[0] > first_eps[-1]


# --- the pieces, without processes ------------------------------------------------------------


def _context(run_config: dict, partition_id: int, run_id: int = 7) -> SimpleNamespace:
    # What open_site reads of a Flower Context.
    return SimpleNamespace(run_id=run_id, node_config={"partition-id": partition_id}, run_config=run_config)


def test_records_round_trip_exactly():
    state = model_factory(EXPERIMENT)().state_dict()
    back = flower.record_to_state(flower.state_to_record(state))
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_update_content_round_trip():
    run = find_run(EXPERIMENT, "dp")
    site = build_site(EXPERIMENT, run, build_data(EXPERIMENT.data, EXPERIMENT.seed), 1)
    update = site.local_update(initial_global_state(model_factory(EXPERIMENT), EXPERIMENT.seed), round=1)
    back = flower.update_from_content(flower.update_to_content(update, site), site.site_id)
    assert isinstance(back, SiteUpdate) and back.site_id == update.site_id
    assert (back.num_samples, back.steps, back.epsilon) == (update.num_samples, update.steps, update.epsilon)
    assert back.train_loss == update.train_loss
    assert all(torch.equal(back.delta[k], update.delta[k]) for k in update.delta)
    with pytest.raises(ValueError, match="where 'site_a' was asked"):
        flower.update_from_content(flower.update_to_content(update, site), "site_a")


@pytest.mark.parametrize("label", ["nonprivate", "dp"])
def test_partition_id_picks_the_simulations_site_on_build_datas_data(tmp_path, label):
    run_config = flower.run_config_for(EXPERIMENT, label, state_dir=str(tmp_path))
    sim = build_simulation(EXPERIMENT, find_run(EXPERIMENT, label), build_data(EXPERIMENT.data, EXPERIMENT.seed))
    data = build_data(EXPERIMENT.data, EXPERIMENT.seed)
    for k, sid in enumerate(EXPERIMENT.data.sites):
        site = flower.open_site(_context(run_config, k))
        want = sim.sites[sid]
        assert site.site_id == sid and repr(site) == repr(want)
        assert torch.equal(site.generator.get_state(), want.generator.get_state())
        assert (site.dp is None) == (label == "nonprivate") and site.dp == want.dp
        # keyed by experiment, run and site (not Flower's run id): a rerun continues the privacy spent
        assert site.state_path == tmp_path / "flower-test" / label / f"{sid}.pt"
        for mine, theirs in ((site.train_data, data.train[sid]), (site.val_data, data.val[sid])):
            assert len(mine) == len(theirs)
            for i in (0, len(theirs) - 1):
                assert all(torch.equal(a, b) for a, b in zip(mine[i], theirs[i], strict=True))
    with pytest.raises(ValueError, match="site index 3 out of range"):
        flower.open_site(_context(run_config, 3))


def test_open_site_keeps_a_secret_noise_seed_across_messages(tmp_path):
    # Default noise: each ClientApp process builds the site anew (a fresh CSPRNG seed); the seed drawn
    # at the site's first message is kept in its own state file, so later messages continue that stream,
    # and it is not the seed the config would give.
    cfg = EXPERIMENT.replace(**{"dp.reproducible_noise": False})
    run_config = flower.run_config_for(cfg, "dp", state_dir=str(tmp_path))
    first = flower.open_site(_context(run_config, 0, run_id=1))
    later = flower.open_site(_context(run_config, 0, run_id=2))
    assert later.engine.noise_source.state_dict() == first.engine.noise_source.state_dict()
    assert torch.equal(later.generator.get_state(), first.generator.get_state())
    with pytest.warns(ReproducibleNoiseWarning):
        predictable = build_site(EXPERIMENT, find_run(EXPERIMENT, "dp"), build_data(cfg.data, cfg.seed), 0)
    assert first.engine.noise_source.seed != predictable.engine.noise_source.seed
    other = flower.open_site(_context(run_config, 1))
    assert other.engine.noise_source.seed != first.engine.noise_source.seed


def test_run_config_is_checked():
    good = flower.run_config_for(EXPERIMENT, "dp")
    assert flower.resolve_config(good) == good and good["num-sites"] == 3
    exp, run = flower.load_experiment(good)
    assert exp == EXPERIMENT and run == find_run(EXPERIMENT, "dp")
    with pytest.raises(ValueError, match="unknown run config key"):
        flower.resolve_config({**good, "rounds": 2})
    with pytest.raises(ValueError, match="expected float"):
        flower.resolve_config({**good, "node-wait-s": "2"})
    with pytest.raises(ValueError, match="'experiment' is required"):
        flower.resolve_config({"run": "dp"})
    with pytest.raises(ValueError, match="'run' is required"):
        flower.resolve_config({"experiment": good["experiment"]})
    with pytest.raises(ValueError, match="not a run of this config"):
        flower.resolve_config({**good, "run": "centralised"})
    with pytest.raises(ValueError, match="federated.rounds"):
        flower.resolve_config({**good, "experiment": good["experiment"].replace("rounds = 2", "rounds = -1")})
    with pytest.raises(ValueError, match="'num-sites' = 2, but run 'dp' has 3"):
        flower.run_config_for(EXPERIMENT, "dp", num_sites=2)
    with pytest.raises(ValueError, match="must be > 0"):
        flower.run_config_for(EXPERIMENT, "dp", round_timeout_s=0)
    assert flower.resolve_config({**good, "node-wait-s": 5})["node-wait-s"] == 5.0
    pooled = flower.run_config_for(EXPERIMENT.replace(modes=["centralised"]), "centralised")
    assert pooled["num-sites"] == 1


def test_written_app_passes_flowers_checks(tmp_path):
    from flwr.common.config import validate_config

    from fastdp.experiment import tomlio

    cfg = EXPERIMENT.replace(name='it\'s "quoted" ü')
    app = flower.write_app(tmp_path / "app", flower.run_config_for(cfg, "dp", out_dir="/x y/out"))
    config = tomlio.loads((app / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(config, check_module=True, project_dir=app)
    assert ok, errors
    run_config = config["tool"]["flwr"]["app"]["config"]
    assert run_config["experiment"] == cfg.to_toml()  # the multi-line experiment text survives exactly
    resolved = flower.resolve_config(run_config)
    assert resolved["out-dir"] == "/x y/out" and flower.load_experiment(resolved)[0] == cfg


def test_flower_backend_builds_the_run_config(tmp_path, monkeypatch):
    """run_mode with the Flower trainer hands launch_local the experiment and the run (no processes)."""
    from fastdp.experiment.runner import run_mode
    from fastdp.flower import experiment as flower_experiment

    calls = []

    def fake_launch_local(num_nodes=None, run_config=None, work_dir=None, **kwargs):
        calls.append((num_nodes, run_config, work_dir, kwargs))
        return flower.FlowerRun({}, {}, tmp_path, tmp_path, run_id=1, status="finished:completed", wall_s=0.0)

    monkeypatch.setattr(flower_experiment, "launch_local", fake_launch_local)
    cfg = ExperimentConfig().replace(
        modes=["centralised", "nonprivate", "dp"],
        **{"federated.backend": "flower", "dp.epsilon_sweep": [2, 8], "data.sites": ["site_a", "site_b"]},
    )
    data = build_data(cfg.data, cfg.seed)
    runs = planned_runs(cfg)
    paths = [run_mode(cfg, run, data, tmp_path, progress=False, train=flower.train_over_flower) for run in runs]
    assert paths == [tmp_path.resolve() / r.label / "global_model.pt" for r in runs]
    assert len(calls) == len(runs)
    for run, (num_nodes, run_config, work_dir, kwargs) in zip(runs, calls, strict=True):
        out = tmp_path.resolve() / run.label
        assert run_config == flower.resolve_config(run_config)  # a complete, valid run config
        assert set(run_config) == set(flower.DEFAULT_RUN_CONFIG)
        experiment, spec = flower.load_experiment(run_config)
        assert experiment == cfg and spec == run
        assert run_config["run"] == run.label
        assert run_config["num-sites"] == (1 if run.mode == "centralised" else 2)
        assert run_config["out-dir"] == str(out)
        assert run_config["state-dir"] == str(out / "flower" / "state")
        assert work_dir == out / "flower" and num_nodes is None
        assert kwargs["timeout"] is None  # a long experiment is not cut off
