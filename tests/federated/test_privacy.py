"""Hostile tests of the federated deployment's privacy: the server (who writes the config and sees
every update) is the adversary. Each test is an attack that worked on an earlier fastdp."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from _fl_helpers import phantom, tiny_unet
from torch import nn
from torch.utils.data import Dataset

from fastdp import ops
from fastdp.experiment import ExperimentConfig
from fastdp.experiment.builders import build_simulation, build_site, build_strategy, find_run, model_factory
from fastdp.experiment.data import build_data
from fastdp.federated import DPConfig, DPFedAvg, FedAvg, Simulation, Site, SiteUpdate, initial_global_state
from fastdp.federated.simulation import FederationError
from fastdp.federated.site import stable_seed
from fastdp.federated.state_files import StateFileError, load_state, save_state
from fastdp.noise import ReproducibleNoiseWarning

CONFIG = {
    "name": "privacy-test",
    "seed": 4,
    "threads": 1,
    "modes": ["dp"],
    "data": {"image_size": 64, "slices_per_site": 24, "val_slices_per_site": 4, "test_slices": 4},
    "model": {"name": "unet_small", "kwargs": {"base_channels": 4, "depth": 2}},
    "federated": {"rounds": 2, "local_steps": 2, "batch_size": 8, "lr": 0.1, "optimizer": "sgd"},
    "dp": {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
    "attack": {"enabled": False},
}


def _cfg(**overrides) -> ExperimentConfig:
    return ExperimentConfig.from_dict(CONFIG).replace(**overrides)


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


# --- 1. the server regenerates a site's noise from the config ----------------------------------


def _denoising_attack(cfg: ExperimentConfig) -> float:
    """||update - guessed noise - noiseless update|| / ||noise|| for site 0 of the config's DP run.

    The adversary knows what the server knows: the config (seeds, site names, sigma, C, lr, the
    architecture) and the update. It regenerates the noise the way fastdp once seeded it
    (stable_seed("noise", site seed, site name), offsets 0, 1, ...) and subtracts it. The noiseless
    reference trains the same batches without noise (the test copies the real site's sampler state);
    one local step, so that the reference also starts its step from the same weights.
    """
    cfg = cfg.replace(**{"federated.local_steps": 1})
    run = find_run(cfg, "dp")
    data = build_data(cfg.data, cfg.seed)
    make = model_factory(cfg)
    g0 = initial_global_state(make, cfg.seed)
    site = build_site(cfg, run, data, 0)
    reference = build_site(cfg.replace(**{"dp.noise_multiplier": 0.0}), run, data, 0)
    reference.generator.set_state(site.generator.get_state())
    update, clean = site.local_update(g0), reference.local_update(g0)

    fed, dp = cfg.federated, cfg.dp
    guessed_seed = stable_seed("noise", cfg.seed * 1000 + 0, cfg.data.sites[0])
    params = [(n, p) for n, p in make().named_parameters() if p.requires_grad]
    expected_batch = fed.batch_size  # q * N
    guessed = {n: torch.zeros_like(p) for n, p in params}
    for step in range(fed.local_steps):
        noise = [torch.zeros_like(p) for _, p in params]
        ops.add_noise_scale_(noise, dp.noise_multiplier * dp.max_grad_norm, 1.0 / expected_batch, guessed_seed, step)
        for (n, _), z in zip(params, noise, strict=True):
            guessed[n] += fed.lr * z  # SGD: delta = -lr * sum_t (clipped_t + noise_t) / E[B]
    residual = [update.delta[n] + guessed[n] - clean.delta[n] for n, _ in params]
    true_noise = [update.delta[n] - clean.delta[n] for n, _ in params]
    return _norm(residual) / _norm(true_noise)


def test_server_cannot_subtract_a_sites_noise_by_default():
    assert _denoising_attack(_cfg()) > 1.0  # subtracting a wrong guess only adds noise (about sqrt 2)


def test_reproducible_noise_is_subtractable_and_says_so():
    with pytest.warns(ReproducibleNoiseWarning, match="NOT private"):
        ratio = _denoising_attack(_cfg(**{"dp.reproducible_noise": True}))
    assert ratio < 1e-3  # the attack works: why the option is for tests only


def test_server_noise_of_dp_fedavg_is_not_predictable_from_the_config():
    cfg = _cfg(**{"federated.strategy": "dp-fedavg", "federated.server_noise_multiplier": 1.0})
    glob = initial_global_state(model_factory(cfg), cfg.seed)
    run = find_run(cfg, "dp")
    real = build_strategy(cfg, run).aggregate(glob, [], 1)
    with pytest.warns(ReproducibleNoiseWarning):
        twin = DPFedAvg(clip_norm=1.0, noise_multiplier=1.0, sample_rate=1.0, num_sites=3, seed=cfg.seed)
    guess = twin.aggregate(glob, [], 1)  # how the old server seeded it: from the config's seed
    assert not any(torch.equal(real[k], guess[k]) for k in glob if glob[k].is_floating_point())
    with pytest.warns(ReproducibleNoiseWarning):
        repro = build_strategy(cfg.replace(**{"dp.reproducible_noise": True}), run).aggregate(glob, [], 1)
    assert all(torch.equal(repro[k], guess[k]) for k in glob)


def test_history_and_report_say_whether_a_run_is_private(tmp_path):
    from fastdp.report import write_report

    cfg = _cfg(**{"federated.rounds": 1, "federated.local_steps": 1})
    run = find_run(cfg, "dp")
    data = build_data(cfg.data, cfg.seed)
    private = build_simulation(cfg, run, data, progress=False, out_dir=tmp_path / "dp").run()
    assert private.privacy["private"] is True and set(private.privacy["site_noise"].values()) == {"os-csprng"}
    with pytest.warns(ReproducibleNoiseWarning):
        sim = build_simulation(
            cfg.replace(**{"dp.reproducible_noise": True}), run, data, progress=False, out_dir=tmp_path / "dp_test"
        )
    history = sim.run()
    assert history.privacy["private"] is False
    assert any("reproducible" in r for r in history.privacy["not_private_reasons"])
    report = write_report(tmp_path, plots=False).read_text()
    assert "**dp_test: NOT PRIVATE.**" in report and "**dp: NOT PRIVATE" not in report
    assert "train_loss" not in report.split("## Privacy")[1].split("##")[0]


# --- 2. un-noised statistics of the training data ----------------------------------------------


class _OneMaskInverted(Dataset):
    """A neighbouring dataset: sample `index`'s mask inverted, everything else equal."""

    def __init__(self, base: Dataset, index: int = 0) -> None:
        self.base, self.index = base, index

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (x, 1 - y) if i == self.index else (x, y)


def _released(update: SiteUpdate) -> dict:
    return {k: v for k, v in vars(update).items() if k != "delta"}


@pytest.mark.filterwarnings("ignore::fastdp.noise.ReproducibleNoiseWarning")
def test_a_dp_site_releases_nothing_but_the_update_that_depends_on_its_data():
    # Same seeds (reproducible streams) so only the data differs: every released field other than
    # the (noised) delta must be equal between the neighbouring datasets. The old train_loss was not.
    train = phantom("site_a", 24)
    dp = DPConfig(noise_multiplier=1.0, reproducible_noise=True)
    kw = dict(batch_size=24, local_steps=2, lr=0.1, optimizer="sgd", dp=dp, seed=1)  # q = 1: sample 0 in every batch
    g0 = initial_global_state(tiny_unet, 1)
    a = Site("site_a", train, None, tiny_unet, **kw).local_update(g0)
    b = Site("site_a", _OneMaskInverted(train), None, tiny_unet, **kw).local_update(g0)
    assert _released(a) == _released(b)
    assert a.train_loss is None
    assert not all(torch.equal(a.delta[k], b.delta[k]) for k in a.delta)  # the data did matter to the update
    nonprivate = Site("site_a", train, None, tiny_unet, batch_size=8, local_steps=1).local_update(g0)
    assert nonprivate.train_loss is not None  # a non-private site still reports it


def test_a_dp_sites_failure_message_does_not_leave_the_site():
    class Leaky(Site):
        def local_update(self, *a, **k):
            raise RuntimeError("sample 17 (patient 0042) has a NaN loss")

    sites = [
        Leaky("site_a", phantom("site_a", 16), None, tiny_unet, batch_size=8, local_steps=1, dp=DPConfig(1.0)),
        Site("site_b", phantom("site_b", 16), None, tiny_unet, batch_size=8, local_steps=1, dp=DPConfig(1.0)),
    ]
    history = Simulation(sites, FedAvg(), tiny_unet, rounds=1, progress=False).run()
    (failure,) = history.rounds[0]["failed"]
    assert failure["site"] == "site_a" and "RuntimeError" in failure["error"]
    assert "patient" not in failure["error"] and "17" not in failure["error"]
    assert history.rounds[0]["sites"]["site_b"]["train_loss"] is None
    assert "train_loss" not in history.privacy["releases"]["site_b"]


# --- 5. DP-FedAvg keeps its sensitivity ----------------------------------------------------------


class _FixedSite:
    """A site whose update is given (what a malicious or unusual site sends): a FederatedSite."""

    is_private, noise_is_private, epsilon_budget = False, None, None

    def __init__(self, site_id: str, delta: dict, num_samples: int = 10) -> None:
        self.site_id, self.delta, self.num_samples = site_id, delta, num_samples

    def within_budget(self) -> bool:
        return True

    def epsilon(self) -> float:
        return math.inf

    def releases(self) -> list[str]:
        return ["delta", "num_samples", "steps"]

    def persist_state_to(self, path) -> None:
        pass

    def local_update(self, global_state, round=0, config=None) -> SiteUpdate:
        return SiteUpdate(self.site_id, {k: v.clone() for k, v in self.delta.items()}, self.num_samples, 1, None)

    def evaluate(self, global_state) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state) -> None:
        pass


def _linear():
    return nn.Linear(4, 1, bias=False)


def _direction(norm: float, k: int) -> dict:
    w = torch.zeros(1, 4)
    w[0, k % 4] = norm
    return {"weight": w}


def _one_round(sites, strategy) -> torch.Tensor:
    init = {"weight": torch.zeros(1, 4)}
    sim = Simulation(sites, strategy, _linear, initial_state=init, rounds=1, progress=False, max_update_norm=None)
    sim.run_round(1)
    return sim.global_state["weight"]


def test_a_fixed_site_is_a_federated_site():
    from fastdp.federated.site_protocol import FederatedSite

    assert isinstance(_FixedSite("a", _direction(1, 0)), FederatedSite)
    assert isinstance(Site("site_a", phantom("site_a", 8), None, tiny_unet, batch_size=4), FederatedSite)


def test_dp_fedavg_sum_moves_by_at_most_S_when_one_site_is_added():
    # a, b: norm 1; c: norm 150, just outside 100 x the median of three; d: norm 2. Adding d moves the
    # median so that c would pass a median-based screen: the old server's sum moved by 1.9 with S = 1.
    S = 1.0
    base = [_FixedSite("a", _direction(1, 0)), _FixedSite("b", _direction(1, 1)), _FixedSite("c", _direction(150, 2))]
    added = base + [_FixedSite("d", _direction(2, 3))]

    def clipped_sum(sites):
        strategy = DPFedAvg(clip_norm=S, noise_multiplier=0.0, sample_rate=1.0, num_sites=4)
        return _one_round(sites, strategy) * 4  # the average over q * N = 4 expected sites, times 4

    moved = float((clipped_sum(added) - clipped_sum(base)).norm())
    assert moved <= S * (1 + 1e-6)
    assert moved == pytest.approx(S)  # d itself, clipped; c's clipped update is in both sums


# --- 6. FedAvg cannot be hijacked by a claim ------------------------------------------------------


GLOBAL = {"weight": torch.zeros(1, 4)}


@pytest.mark.parametrize(
    "num_samples, delta, reason",
    [
        (10**12, {"weight": torch.ones(1, 4)}, "more than the 10 the site registered"),
        (10.0, {"weight": torch.ones(1, 4)}, "integer"),
        ("10", {"weight": torch.ones(1, 4)}, "integer"),
        (True, {"weight": torch.ones(1, 4)}, "integer"),
        (0, {"weight": torch.ones(1, 4)}, ">= 1"),
        (10, {"weight": torch.full((1, 4), math.nan)}, "non-finite"),
        (10, {"weight": torch.full((1, 4), 1e39, dtype=torch.float64)}, "non-finite"),
    ],
)
def test_fedavg_rejects_lying_or_broken_updates(num_samples, delta, reason):
    honest = _FixedSite("a", _direction(1, 0))
    liar = _FixedSite("b", delta)
    liar.local_update = lambda *a, **k: SiteUpdate("b", delta, num_samples, 1, None)  # type: ignore[method-assign]
    sim = Simulation([honest, liar], FedAvg(), _linear, initial_state=dict(GLOBAL), rounds=1, progress=False)
    record = sim.run_round(1)
    assert record["participants"] == ["a"]
    assert record["rejected"][0]["site"] == "b" and reason in record["rejected"][0]["reason"]
    torch.testing.assert_close(sim.global_state["weight"], _direction(1, 0)["weight"])  # a's update alone


def test_duplicate_and_unknown_site_ids_are_refused():
    from fastdp.federated import screen_updates

    a = SiteUpdate("a", _direction(1, 0), 10, 1, None)
    accepted, rejected = screen_updates([a, a], GLOBAL, site_sizes={"a": 10})
    assert accepted == [] and all("2 updates" in r["reason"] for r in rejected)
    accepted, rejected = screen_updates([SiteUpdate("z", _direction(1, 0), 10, 1, None)], GLOBAL, site_sizes={"a": 10})
    assert accepted == [] and "not a site of this federation" in rejected[0]["reason"]


def test_the_cli_bounds_update_norms_by_default():
    cfg = _cfg(modes=["nonprivate"])
    assert cfg.federated.max_update_norm > 0
    sim = build_simulation(cfg, find_run(cfg, "nonprivate"), build_data(cfg.data, cfg.seed), progress=False)
    assert sim.max_update_norm == cfg.federated.max_update_norm
    huge = _FixedSite("a", _direction(10 * cfg.federated.max_update_norm, 0))
    ok = _FixedSite("b", _direction(1, 1))
    init = {"weight": torch.zeros(1, 4)}
    sim = Simulation([huge, ok], FedAvg(), _linear, initial_state=init, rounds=1, progress=False, max_update_norm=100.0)
    assert sim.run_round(1)["participants"] == ["b"]


# --- 7. checkpoints and state files are not trusted ---------------------------------------------


class _Payload:
    """Unpickling this runs code (what a planted file could do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _dp_sim(tmp_path, rounds=2):
    sites = [
        Site(s, phantom(s, 16), None, tiny_unet, batch_size=8, local_steps=1, dp=DPConfig(noise_multiplier=1.0))
        for s in ("site_a", "site_b")
    ]
    return Simulation(sites, FedAvg(), tiny_unet, rounds=rounds, checkpoint_dir=tmp_path / "ckpt", progress=False)


@pytest.mark.parametrize("target", ["checkpoint.pt", "sites/site_a.pt"])
def test_a_planted_pickle_is_refused_and_never_run(tmp_path, target):
    _dp_sim(tmp_path).run(stop_after=1)
    marker = tmp_path / "pwned"
    torch.save({"fastdp_state": 1, "sha256": "", "state": _Payload(str(marker))}, tmp_path / "ckpt" / target)
    with pytest.raises(StateFileError, match=target.replace("/", ".")):
        _dp_sim(tmp_path).run()
    assert not marker.exists()


def test_an_altered_checkpoint_is_refused(tmp_path):
    _dp_sim(tmp_path).run(stop_after=1)
    path = tmp_path / "ckpt" / "checkpoint.pt"
    raw = torch.load(path, weights_only=True)
    key = next(iter(raw["state"]["global_state"]))
    raw["state"]["global_state"][key] += 1000.0  # finite garbage: resuming would silently go on from it
    torch.save(raw, path)
    with pytest.raises(StateFileError, match="does not match its digest"):
        _dp_sim(tmp_path).run()


def test_nan_in_a_checkpoint_is_refused_by_name(tmp_path):
    _dp_sim(tmp_path).run(stop_after=1)
    path = tmp_path / "ckpt" / "checkpoint.pt"
    state = load_state(path)
    key = next(iter(state["global_state"]))
    state["global_state"][key][0] = math.nan
    save_state(state, path)  # even with a valid digest: NaN weights are refused, not trained from
    with pytest.raises(StateFileError, match=f"non-finite values .* in '{key}'"):
        _dp_sim(tmp_path).run()


@pytest.mark.parametrize("damage", ["truncate", "garble", "pickle-of-other-type"])
def test_broken_files_give_an_error_naming_the_file(tmp_path, damage):
    _dp_sim(tmp_path).run(stop_after=1)
    path = tmp_path / "ckpt" / "sites" / "site_b.pt"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garble":
        path.write_bytes(bytes(b ^ 0x5A for b in data))
    else:
        path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(StateFileError, match="site_b.pt"):
        _dp_sim(tmp_path).run()


def test_a_site_state_that_does_not_fit_is_refused(tmp_path):
    sim = _dp_sim(tmp_path)
    sim.run(stop_after=1)
    path = tmp_path / "ckpt" / "checkpoint.pt"
    state = load_state(path)
    state["sites"]["site_a"]["engine"]["accountant"]["history"] = [[1.0, 2.0, 5]]  # q = 2 is no sample rate
    save_state(state, path)
    with pytest.raises(StateFileError, match="checkpoint .*checkpoint.pt.*0 < q <= 1"):
        _dp_sim(tmp_path).run()


def test_a_run_where_every_site_fails_exits_with_an_error():
    class Broken(Site):
        def local_update(self, *a, **k):
            raise RuntimeError("disk on fire")

    sites = [Broken(s, phantom(s, 16), None, tiny_unet, batch_size=8, local_steps=1) for s in ("site_a", "site_b")]
    with pytest.raises(FederationError, match="no site contributed an update in any of the 2 rounds.*disk on fire"):
        Simulation(sites, FedAvg(), tiny_unet, rounds=2, progress=False).run()


def test_a_budget_smaller_than_one_round_exits_with_an_error():
    dp = DPConfig(noise_multiplier=1.0, epsilon_budget=0.01)
    sites = [Site(s, phantom(s, 16), None, tiny_unet, batch_size=8, local_steps=1, dp=dp) for s in ("site_a",)]
    with pytest.raises(FederationError, match="epsilon budget is smaller than one round"):
        Simulation(sites, FedAvg(), tiny_unet, rounds=2, progress=False).run()


def test_a_dp_site_whose_buffers_move_is_refused():
    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_unet()
            self.register_buffer("mean_seen", torch.zeros(()))

        def forward(self, x):
            if self.training:
                self.mean_seen += x.detach().mean()  # a statistic of the data, not noised
            return self.net(x)

    site = Site("site_a", phantom("site_a", 16), None, Counting, batch_size=8, local_steps=1, dp=DPConfig(1.0))
    with pytest.raises(RuntimeError, match=r"buffers \['mean_seen'\] changed during DP training"):
        site.local_update(initial_global_state(Counting, 0))
