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
import time
from pathlib import Path
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
from fastdp.flower.credentials import make_node_key  # noqa: E402
from fastdp.flower.processes import flwr_cli, free_ports, json_out  # noqa: E402

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
    assert run.status == "finished:completed" and run.secure and not run.node_exits
    sim = _simulation(EXPERIMENT, "nonprivate")
    _assert_same(run.global_state, run.history, sim)
    assert all(s["epsilon"] is None for s in run.history["rounds"][-1]["sites"].values())
    assert run.history["rounds"][-1]["test"]["dice"] is not None
    # The default federation is TLS with registered SuperNodes: the SuperLink was told so.
    link_cmd = (run.work_dir / "logs" / "superlink.log").read_text().splitlines()[0]
    assert "--ssl-certfile" in link_cmd and "--enable-supernode-auth" in link_cmd and "--insecure" not in link_cmd
    node_cmd = (run.work_dir / "logs" / "supernode-0.log").read_text().splitlines()[0]
    assert "--root-certificates" in node_cmd and "--auth-supernode-private-key" in node_cmd


@pytest.mark.slow
def test_flower_backend_of_the_runner_dp_sgd_matches_simulation(tmp_path, monkeypatch):
    """`fastdp run --set federated.backend="flower"`: the run folder the report reads, same numbers as in-process."""
    from fastdp.flower import run_experiment

    for k, v in CHILD_ENV.items():
        monkeypatch.setenv(k, v)  # inherited by every Flower process the runner starts
    # Adam: its moments must survive between the ClientApp processes of round 1 and round 2.
    cfg = EXPERIMENT.replace(
        modes=["dp"],
        out_dir=str(tmp_path / "run"),
        **{"federated.optimizer": "adam", "federated.lr": 0.01, "federated.backend": "flower"},
    )
    run_dir = run_experiment(cfg, progress=False, report=True)
    assert (run_dir / "report.md").exists() and (run_dir / "dp" / "history.csv").exists()
    assert (run_dir / "dp" / "checkpoints" / "checkpoint.pt").exists()  # the in-process layout
    global_state = torch.load(run_dir / "dp" / "global_model.pt", weights_only=True)
    history = json.loads((run_dir / "dp" / "history.json").read_text())
    # The in-process run of the same config differs only in the backend it names.
    sim = _simulation(cfg.replace(**{"federated.backend": "simulation"}), "dp")
    sim.history.config["federated"]["backend"] = "flower"
    _assert_same(global_state, history, sim)
    last = history["rounds"][-1]["sites"]
    assert all(0 < s["epsilon"] < math.inf for s in last.values())
    # Every site kept its own state file; its accountant counts the steps of both rounds.
    state_dir = run_dir / "dp" / "flower" / "state" / cfg.name / "dp"
    assert _steps_on_record(state_dir) == {sid: 2 * cfg.federated.local_steps for sid in last}


def _steps_on_record(state_dir) -> dict:
    """{site: DP-SGD steps its own accountant has recorded} from the sites' state files."""
    return {
        f.stem: sum(n for _, _, n in load_state(f)["engine"]["accountant"]["history"])
        for f in sorted(state_dir.glob("*.pt"))
    }


# DP-FedAvg with 2 of 3 sites per round on average: Poisson site selection, server clipping, server
# noise and the server's accountant run through Flower too (on top of DP-SGD at the sites).
DP_FEDAVG = EXPERIMENT.replace(
    modes=["dp"],
    **{"federated.strategy": "dp-fedavg", "federated.sites_per_round": 2, "federated.server_clip_norm": 0.05},
)


@pytest.mark.slow
def test_flower_run_resumes_from_its_checkpoint(tmp_path):
    """A run stopped after round 1 and run again continues from the checkpoint, and equals an uninterrupted run."""
    run_config = flower.run_config_for(DP_FEDAVG, "dp", stop_after=1)
    first = flower.launch_local(3, run_config, work_dir=tmp_path / "flower", env=CHILD_ENV, timeout=900)
    assert [r["round"] for r in first.history["rounds"]] == [1]
    ckpt = load_state(first.out_dir / "checkpoints" / "checkpoint.pt")
    assert ckpt["round"] == 1 and ckpt["strategy"]["accountant"]["history"]  # the server's accountant is in it
    # A new federation (new processes, a new Flower run id), the same out-dir and state-dir.
    again = flower.launch_local(3, {**run_config, "stop-after": 0}, work_dir=tmp_path / "flower", env=CHILD_ENV)
    assert again.run_id != first.run_id
    assert [r["round"] for r in again.history["rounds"]] == [1, 2]
    assert again.history["rounds"][0] == first.history["rounds"][0]  # round 1 comes from the checkpoint
    sim = _simulation(DP_FEDAVG, "dp")
    _assert_same(again.global_state, again.history, sim)
    server_eps = [r["server_epsilon"] for r in again.history["rounds"]]
    assert server_eps == [r["server_epsilon"] for r in sim.history.to_dict()["rounds"]] and 0 < server_eps[0]
    rounds_in = {sid: sum(r["sites"][sid]["participated"] for r in again.history["rounds"]) for sid in sim.sites}
    state_dir = Path(run_config["state-dir"] or tmp_path / "flower" / "state") / DP_FEDAVG.name / "dp"
    assert _steps_on_record(state_dir) == {sid: n * DP_FEDAVG.federated.local_steps for sid, n in rounds_in.items()}


def _wait_for_rounds(path, n: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(json.loads(path.read_text())["rounds"]) >= n:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{path} did not reach {n} rounds in {timeout} s")


@pytest.mark.slow
def test_a_killed_site_misses_rounds_and_rejoins_and_strangers_are_refused(tmp_path):
    """Kill one SuperNode (and everything it started) after round 1: the round goes on without it, it rejoins.

    Meanwhile a SuperNode with an unregistered key and a plain-text SuperNode try to join as site 1:
    the SuperLink refuses both, and a plain-text flwr client cannot talk to it either.
    """
    cfg = EXPERIMENT.replace(modes=["dp"], **{"federated.rounds": 4})
    run_config = flower.run_config_for(cfg, "dp", round_timeout_s=300)
    seen: dict = {}

    def adversity(fed, run_id):
        try:
            stranger = make_node_key(tmp_path / "stranger", "stranger")
            port_a, port_b = free_ports(2)
            # a few retries, then they give up (exit) instead of retrying until the test stops them
            give_up = ["--max-retries", "3"]
            cmd_a, cmd_b = (
                fed.node_command(1, key=stranger, port=port_a),
                fed.node_command(1, insecure=True, port=port_b),
            )
            seen["unregistered"] = fed.start_process("unregistered", cmd_a + give_up)
            seen["plain"] = fed.start_process("plain", cmd_b + give_up)
            plain_home = tmp_path / "plain-home"
            plain_home.mkdir()
            (plain_home / "config.toml").write_text(
                f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{fed.address}"\ninsecure = true\n'
            )
            try:  # flwr exits 0 here; json_out reads its "success": false
                json_out(flwr_cli(["ls", "local", "--format", "json"], {**fed.env, "FLWR_HOME": str(plain_home)}))
                seen["plain_flwr"] = "answered"
            except flower.FlowerRunError as e:
                seen["plain_flwr"] = str(e)
            _wait_for_rounds(Path(run_config["out-dir"] or tmp_path / "flower" / "out") / "history.json", 1)
            seen["pids"] = fed.node_pids(1)
            fed.kill_node(1)
            seen["nodes"] = json_nodes(fed)
        except Exception as e:  # reported by the test below
            seen["error"] = repr(e)

    def json_nodes(fed):
        return json.loads(fed.flwr(["supernode", "ls", "local", "--format", "json"]))["nodes"]

    run = flower.launch_local(
        3, run_config, work_dir=tmp_path / "flower", env=CHILD_ENV, timeout=1200, on_start=adversity
    )
    assert "error" not in seen, seen["error"]
    assert run.status == "finished:completed"
    # The strangers never joined: they exited (refused), and only the 3 registered nodes were ever listed.
    assert seen["unregistered"].poll() not in (None, 0) and seen["plain"].poll() not in (None, 0)
    assert len(seen["nodes"]) == 3
    assert "unavailable" in seen["plain_flwr"], seen["plain_flwr"]
    assert "Failed to activate" in (run.work_dir / "logs" / "unregistered.log").read_text()
    for stranger in ("unregistered", "plain"):
        assert "SuperNode ID" not in (run.work_dir / "logs" / f"{stranger}.log").read_text()
    # The killed node was noticed and restarted; every process of its tree was gone.
    assert [e.node for e in run.node_exits][:1] == [1] and len(seen["pids"]) >= 2
    rounds = run.history["rounds"]
    site = cfg.data.sites[1]
    missed = [r["round"] for r in rounds if not r["sites"][site]["participated"]]
    assert missed and missed[0] >= 2, missed
    for r in rounds:
        others = [s for s in cfg.data.sites if s != site]
        assert all(r["sites"][s]["participated"] for s in others), r  # the others go on
        if r["round"] in missed:
            assert [f["site"] for f in r["failed"]] == [site]
    assert rounds[-1]["sites"][site]["participated"], "the restarted site rejoined"
    # Its privacy state survived: its accountant counts at least the rounds it delivered (a round it
    # was killed in may have spent privacy too, never less).
    state_dir = tmp_path / "flower" / "state" / cfg.name / "dp"
    delivered = sum(r["sites"][site]["participated"] for r in rounds)
    assert _steps_on_record(state_dir)[site] >= delivered * cfg.federated.local_steps
    eps = [r["sites"][site]["epsilon"] for r in rounds if r["sites"][site]["participated"]]
    assert eps == sorted(eps) and eps[0] < eps[-1]


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
