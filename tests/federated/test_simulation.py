import csv
import json

import pytest
import torch
from _fl_helpers import phantom, tiny_unet

from fastdp.federated import DPConfig, DPFedAvg, FedAvg, Simulation, Site, SiteUpdate
from fastdp.federated.site import evaluate_model
from fastdp.federated.state_files import load_state

SITES = ("site_a", "site_b", "site_c")


def _sites(dp=None, cls=Site, **kw):
    """Three tiny sites; `cls` builds site_c only (a failing or malicious site in some tests)."""
    out = []
    for name in SITES:
        out.append(
            (cls if name == "site_c" else Site)(
                name,
                phantom(name, 24),
                phantom(name, 8, start=1000),
                tiny_unet,
                batch_size=8,
                local_steps=2,
                lr=1e-2,
                dp=dp,
                seed=5,
                **kw,
            )
        )
    return out


def _sim(sites, tmp_path=None, rounds=3, strategy=None, **kw):
    return Simulation(
        sites,
        strategy or FedAvg(),
        tiny_unet,
        test_data=phantom("site_c", 8, start=2000),
        rounds=rounds,
        seed=11,
        checkpoint_dir=None if tmp_path is None else tmp_path / "ckpt",
        out_dir=None if tmp_path is None else tmp_path / "out",
        progress=False,
        **kw,
    )


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.filterwarnings("ignore::fastdp.noise.ReproducibleNoiseWarning")
def test_resumed_run_equals_uninterrupted_run(tmp_path):
    dp = DPConfig(noise_multiplier=1.0, reproducible_noise=True)  # bit-exact needs the test-only option
    straight = _sim(_sites(dp=dp), tmp_path / "a")
    straight.run()
    # stop after round 1, then a fresh process-like restart (new Sites, new Simulation) resumes
    _sim(_sites(dp=dp), tmp_path / "b").run(stop_after=1)
    resumed = _sim(_sites(dp=dp), tmp_path / "b")
    history = resumed.run()
    _assert_same_state(straight.global_state, resumed.global_state)
    assert [r["round"] for r in history.rounds] == [1, 2, 3]
    for sid in SITES:
        assert resumed.sites[sid].epsilon() == straight.sites[sid].epsilon()
        assert resumed.sites[sid].accountant.steps == 3 * 2


def test_resume_with_private_noise_continues_each_sites_secret_stream(tmp_path):
    # Default (CSPRNG) noise: a resumed run continues the accountant and the noise stream where the
    # checkpoint left them, with the seed that never left the site, not a new one.
    dp = DPConfig(noise_multiplier=1.0)
    first = _sim(_sites(dp=dp), tmp_path)
    first.run(stop_after=1)
    saved = {sid: s.engine.noise_source.state_dict() for sid, s in first.sites.items()}
    resumed = _sim(_sites(dp=dp), tmp_path)
    fresh_seeds = {sid: s.engine.noise_source.seed for sid, s in resumed.sites.items()}
    assert resumed.load_checkpoint() == 1
    for sid, s in resumed.sites.items():
        assert s.engine.noise_source.state_dict() == saved[sid]
        assert saved[sid]["offset"] == 2 and saved[sid]["seed"] != fresh_seeds[sid]
        assert s.accountant.steps == 2
    resumed.run()
    assert all(s.accountant.steps == 3 * 2 for s in resumed.sites.values())


def test_same_seed_same_result_and_history_files(tmp_path):
    a = _sim(_sites(), tmp_path)
    ha = a.run(resume=False)
    b = _sim(_sites())
    b.run()
    _assert_same_state(a.global_state, b.global_state)
    data = json.loads((tmp_path / "out" / "history.json").read_text())
    assert data["mode"] == "nonprivate" and len(data["rounds"]) == 3
    r = data["rounds"][-1]
    assert set(r["phase_s"]) == {"local_training", "aggregation", "evaluation"}
    assert r["participants"] == list(SITES) and r["test"]["dice"] == ha.final()
    assert all(s["epsilon"] is None and s["val_dice"] is not None for s in r["sites"].values())
    rows = list(csv.DictReader(open(tmp_path / "out" / "history.csv")))
    assert len(rows) == 9 and {row["site"] for row in rows} == set(SITES)
    assert (tmp_path / "ckpt" / "checkpoint.pt").exists()
    assert not [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")]  # no temp files left


class FailingSite(Site):
    def local_update(self, global_state, round=0, config=None):
        raise RuntimeError("disk full")


class PoisonSite(Site):
    def local_update(self, global_state, round=0, config=None):
        u = super().local_update(global_state, round, config)
        key = next(iter(u.delta))
        u.delta[key] = torch.full_like(u.delta[key], float("nan"))
        return u


class ShapeSite(Site):
    def local_update(self, global_state, round=0, config=None):
        u = super().local_update(global_state, round, config)
        key = next(iter(u.delta))
        u.delta[key] = torch.zeros(3)
        return u


@pytest.mark.parametrize(
    "cls, kind, text",
    [(FailingSite, "failed", "disk full"), (PoisonSite, "rejected", "non-finite"), (ShapeSite, "rejected", "shape")],
)
def test_a_bad_site_does_not_stop_the_round(cls, kind, text):
    sim = _sim(_sites(cls=cls), rounds=2)
    history = sim.run()
    honest = _sim(_sites()[:2], rounds=2)
    honest.run()
    for r in history.rounds:
        assert r["participants"] == ["site_a", "site_b"]
        assert r[kind][0]["site"] == "site_c" and text in (r[kind][0].get("error") or r[kind][0].get("reason"))
        assert r["sites"]["site_c"]["participated"] is False
    # the global model is what the two honest sites alone give
    _assert_same_state(sim.global_state, honest.global_state)


def test_sites_over_budget_stop_and_the_others_go_on():
    dp = DPConfig(noise_multiplier=1.5, epsilon_budget=100.0)
    sites = _sites(dp=dp)
    # site_c: q = 1/3, 2 steps per round: epsilon 2.38, 3.09, 3.64, 4.11 after rounds 1-4
    sites[2] = Site(
        "site_c",
        phantom("site_c", 24),
        None,
        tiny_unet,
        batch_size=8,
        local_steps=2,
        dp=DPConfig(noise_multiplier=1.5, epsilon_budget=3.3),
        seed=5,
    )
    assert sites[0].dp.epsilon_budget == 100.0
    sim = _sim(sites, rounds=4)
    history = sim.run()
    parts = [r["participants"] for r in history.rounds]
    assert parts[0] == list(SITES)
    assert parts[-1] == ["site_a", "site_b"]
    assert parts[1] == list(SITES) and parts[2] == ["site_a", "site_b"]
    assert all("site_c" in r["stopped_budget"] for r in history.rounds[2:])
    assert sim.sites["site_c"].epsilon() == pytest.approx(3.09, abs=0.01)
    assert sim.sites["site_a"].accountant.steps == 4 * 2


@pytest.mark.filterwarnings("ignore::fastdp.noise.ReproducibleNoiseWarning")
def test_dp_fedavg_run_reports_server_epsilon():
    strategy = DPFedAvg(clip_norm=0.5, noise_multiplier=1.0, sample_rate=1.0, seed=0)
    history = _sim(_sites(), rounds=2, strategy=strategy).run()
    assert history.mode == "dp-fedavg"
    eps = [r["server_epsilon"] for r in history.rounds]
    assert 0 < eps[0] < eps[1]
    assert max(strategy.last_clip_factors) <= 1.0


def test_site_state_file_is_written_before_the_update_leaves(tmp_path):
    site = _sites(dp=DPConfig(noise_multiplier=1.0))[0]
    site.state_path = tmp_path / "site_a.pt"
    sim = _sim([site], rounds=1)
    assert isinstance(site.local_update(sim.global_state), SiteUpdate)
    saved = load_state(site.state_path)
    assert saved["engine"]["accountant"]["history"][0][2] == 2  # both local steps already on record


def test_bad_simulation_arguments():
    with pytest.raises(ValueError, match="unique"):
        Simulation(_sites()[:1] * 2, FedAvg(), tiny_unet)
    with pytest.raises(ValueError, match="model_fn"):
        Simulation(_sites()[:1], FedAvg(), None)


def test_test_parts_give_each_sites_test_dice_next_to_the_pooled_one(tmp_path):
    parts = {name: phantom(name, 4, start=2000) for name in SITES}
    pooled = torch.utils.data.ConcatDataset(list(parts.values()))
    sim = Simulation(
        _sites(), FedAvg(), tiny_unet, test_data=pooled, test_parts=parts, rounds=1, out_dir=tmp_path, progress=False
    )
    history = sim.run()
    test = history.rounds[-1].test
    assert set(test["by_site"]) == set(SITES)
    for name in SITES:
        alone = evaluate_model(tiny_unet(), sim.global_state, parts[name], sim.criterion)
        assert test["by_site"][name]["dice"] == pytest.approx(alone["dice"])
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    by_site = {r["site"]: float(r["site_test_dice"]) for r in rows}
    assert by_site == pytest.approx({n: test["by_site"][n]["dice"] for n in SITES})


def test_test_parts_without_the_test_data_are_refused():
    with pytest.raises(ValueError, match="test_parts"):
        Simulation(_sites(), FedAvg(), tiny_unet, test_parts={"site_a": phantom("site_a", 2)}, progress=False)
