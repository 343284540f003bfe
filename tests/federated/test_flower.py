"""The Flower adapter: a real SuperLink and three SuperNodes (separate processes, 127.0.0.1) against the simulator.

Both paths build their Sites, Strategy and model from the same run config through
fastdp.federated.flower's builders, run the same fastdp code, and exchange float32 tensors
as numpy .npy bytes (exact), so the final global models must be bit-identical: tolerance 0.
What could break that: a different per-sample conv method (FASTDP_CONV_METHOD=grouped in the
child processes; conftest fixes it in-process), a different thread count (OMP_NUM_THREADS=1
there, torch.set_num_threads(1) here), a site state that does not survive the new ClientApp
process of round 2 (optimizer, sampler RNG, noise stream), or updates aggregated in another order.
"""

import math

import pytest
import torch

pytest.importorskip("flwr", reason="the Flower adapter needs the extra: pip install 'fastdp[flower]'")

from fastdp.federated import flower  # noqa: E402
from fastdp.federated.site import SiteUpdate  # noqa: E402

# The tiny sizes of tests/federated: 64x64 phantom slices, a 4-channel depth-2 U-Net.
BASE = {
    "num-sites": 3,
    "rounds": 2,
    "image-size": 64,
    "train-size": 40,
    "val-size": 8,
    "test-size": 8,
    "batch-size": 8,
    "local-steps": 2,
    "lr": 0.1,
    "optimizer": "sgd",
    "seed": 3,
}
CHILD_ENV = {"FASTDP_CONV_METHOD": "grouped", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _compare(cfg: dict, tmp_path) -> tuple:
    run = flower.launch_local(3, cfg, work_dir=tmp_path / "flower", env=CHILD_ENV, timeout=900)
    sim = flower.build_simulation(cfg, progress=False)
    sim.run()
    assert run.status == "finished:completed"
    assert list(run.global_state) == list(sim.global_state)
    max_diff = max(float((run.global_state[k].double() - v.double()).abs().max()) for k, v in sim.global_state.items())
    assert max_diff == 0.0, f"Flower and in-process global models differ by up to {max_diff}"
    want = sim.history.to_dict()["rounds"]
    got = run.history["rounds"]
    assert len(got) == len(want) == cfg["rounds"]
    for g, w in zip(got, want, strict=True):
        assert g["participants"] == w["participants"]
        assert g["test"] == w["test"]
        for sid, ws in w["sites"].items():
            gs = g["sites"][sid]
            for key in ("participated", "train_loss", "val_dice", "val_loss", "epsilon", "steps", "num_samples"):
                assert gs[key] == ws[key], (g["round"], sid, key)
    return run, sim


@pytest.mark.slow
def test_flower_fedavg_matches_simulation(tmp_path):
    run, sim = _compare(dict(BASE), tmp_path)
    assert all(s["epsilon"] is None for s in run.history["rounds"][-1]["sites"].values())
    assert run.history["rounds"][-1]["test"]["dice"] is not None


@pytest.mark.slow
def test_flower_dp_sgd_sites_match_simulation(tmp_path):
    # Adam: its moments must survive between the ClientApp processes of round 1 and round 2.
    cfg = {**BASE, "dp": True, "noise-multiplier": 1.0, "max-grad-norm": 1.0, "optimizer": "adam", "lr": 0.01}
    run, sim = _compare(cfg, tmp_path)
    last = run.history["rounds"][-1]["sites"]
    assert all(0 < s["epsilon"] < math.inf for s in last.values())
    # Every site kept its own state file; its accountant counts both rounds' steps.
    files = sorted((tmp_path / "flower" / "state").glob("run-*/*.pt"))
    assert [f.stem for f in files] == sorted(last)
    for f in files:
        state = torch.load(f, weights_only=False)
        assert sum(n for _, _, n in state["engine"]["accountant"]["history"]) == 2 * cfg["local-steps"]


# --- the pieces, without processes ------------------------------------------------------------


def test_records_round_trip_exactly():
    state = flower.build_model_fn(BASE)().state_dict()
    back = flower.record_to_state(flower.state_to_record(state))
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)


def test_update_content_round_trip():
    site = flower.build_site(BASE, 1)
    g0 = flower.build_simulation(BASE, progress=False).global_state
    update = site.local_update(g0, round=1)
    back = flower._update_from_content(flower._update_content(update, site), site.site_id)
    assert isinstance(back, SiteUpdate) and back.site_id == update.site_id
    assert (back.num_samples, back.steps, back.epsilon) == (update.num_samples, update.steps, update.epsilon)
    assert back.train_loss == update.train_loss
    assert all(torch.equal(back.delta[k], update.delta[k]) for k in update.delta)


def test_build_site_is_deterministic_and_matches_the_simulation():
    sim = flower.build_simulation(BASE, progress=False)
    for k, sid in enumerate(sim.sites):
        site = flower.build_site(BASE, k)
        assert site.site_id == sid and repr(site) == repr(sim.sites[sid])
        assert torch.equal(site.generator.get_state(), sim.sites[sid].generator.get_state())


def test_run_config_is_checked():
    with pytest.raises(ValueError, match="unknown run config key"):
        flower.resolve_config({"round": 2})
    with pytest.raises(ValueError, match="expected int"):
        flower.resolve_config({"rounds": "2"})
    with pytest.raises(ValueError, match="partition-id 3 out of range"):
        flower.build_site(BASE, 3)
    with pytest.raises(ValueError, match="strategy"):
        flower.build_strategy({"strategy": "fedsgd"})
    assert flower.resolve_config({"lr": 1})["lr"] == 1.0


def test_written_app_passes_flowers_checks(tmp_path):
    from flwr.common.config import validate_config

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    app = flower.write_app(tmp_path / "app", {**BASE, "dp": True, "out-dir": "/x y/out"})
    config = tomllib.loads((app / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(config, check_module=True, project_dir=app)
    assert ok, errors
    run_config = config["tool"]["flwr"]["app"]["config"]
    assert flower.resolve_config(run_config)["out-dir"] == "/x y/out" and run_config["dp"] is True
