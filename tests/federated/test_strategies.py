import math

import pytest
import torch

from fastdp.federated import DPFedAvg, FedAvg, FedProx, SiteUpdate, screen_updates
from fastdp.federated.validation import check_update

GLOBAL = {"w": torch.zeros(3, 4), "b": torch.zeros(4), "steps": torch.tensor(7)}


def _update(site, w, b, n=10):
    return SiteUpdate(site, {"w": w, "b": b}, num_samples=n, steps=1, train_loss=0.5)


def test_fedavg_is_the_sample_weighted_mean():
    u1 = _update("a", torch.ones(3, 4), torch.ones(4), n=10)
    u2 = _update("b", torch.full((3, 4), 4.0), torch.zeros(4), n=30)
    new = FedAvg().aggregate(GLOBAL, [u1, u2], round=1)
    torch.testing.assert_close(new["w"], torch.full((3, 4), (10 * 1 + 30 * 4) / 40))
    torch.testing.assert_close(new["b"], torch.full((4,), 10 / 40))
    assert new["steps"] is GLOBAL["steps"]  # non-float entries are kept, not averaged
    assert FedAvg().aggregate(GLOBAL, [], 1)["w"] is GLOBAL["w"]


def test_fedavg_partial_participation_is_seeded():
    ids = [f"s{i}" for i in range(10)]
    pick = lambda seed: FedAvg(fraction_fit=0.3).select(ids, 1, torch.Generator().manual_seed(seed))  # noqa: E731
    assert len(pick(0)) == 3 and pick(0) == pick(0)
    assert len({tuple(pick(s)) for s in range(20)}) > 1
    assert FedAvg().select(ids, 1, torch.Generator()) == ids
    assert FedProx(mu=0.1).site_config(1) == {"proximal_mu": 0.1}


def test_dpfedavg_without_noise_clips_each_site_and_divides_by_expected_sites():
    s = DPFedAvg(clip_norm=1.0, noise_multiplier=0.0, sample_rate=0.5, num_sites=4)
    big = _update("a", torch.full((3, 4), 3.0), torch.zeros(4))  # norm sqrt(12) * 3 > 1: clipped
    small = _update("b", torch.zeros(3, 4), torch.full((4,), 0.1))  # norm 0.2: kept
    new = s.aggregate(GLOBAL, [big, small], 1)
    expected_w = big.delta["w"] / big.norm() / 2.0  # clipped to norm 1, / (q N = 2)
    torch.testing.assert_close(new["w"], expected_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(new["b"], small.delta["b"] / 2.0, rtol=1e-5, atol=1e-6)
    assert s.last_clip_factors[1] == pytest.approx(1.0)
    assert s.last_clip_factors[0] == pytest.approx(1 / big.norm(), rel=1e-5)
    assert s.accountant.steps == 1


@pytest.mark.filterwarnings("ignore::fastdp.noise.ReproducibleNoiseWarning")
def test_dpfedavg_noise_has_the_promised_std_and_is_accounted():
    glob = {"w": torch.zeros(200_000)}
    s = DPFedAvg(clip_norm=2.0, noise_multiplier=1.5, sample_rate=0.25, num_sites=8, seed=3)
    new = s.aggregate(glob, [], 1)  # no site sampled: the server still adds the noise
    assert new["w"].std().item() == pytest.approx(1.5 * 2.0 / (0.25 * 8), rel=0.02)
    assert abs(new["w"].mean().item()) < 0.02
    again = s.aggregate(glob, [], 2)
    assert not torch.equal(new["w"], again["w"])  # fresh noise every round
    eps = s.epsilon()
    assert 0 < eps < math.inf and s.accountant.steps == 2
    restored = DPFedAvg(clip_norm=2.0, noise_multiplier=1.5, sample_rate=0.25, num_sites=8, seed=99)
    restored.load_state_dict(s.state_dict())
    assert restored.epsilon() == eps
    torch.testing.assert_close(restored.aggregate(glob, [], 3)["w"], s.aggregate(glob, [], 3)["w"])


def test_dpfedavg_poisson_selection_rate():
    s = DPFedAvg(clip_norm=1.0, noise_multiplier=1.0, sample_rate=0.3)
    gen = torch.Generator().manual_seed(0)
    counts = [len(s.select([f"s{i}" for i in range(10)], r, gen)) for r in range(400)]
    assert s.num_sites == 10
    assert sum(counts) / len(counts) == pytest.approx(3.0, rel=0.1)
    assert min(counts) < 3 < max(counts)


@pytest.mark.parametrize(
    "delta, reason",
    [
        ({"w": torch.full((3, 4), math.nan), "b": torch.zeros(4)}, "non-finite"),
        ({"w": torch.zeros(3, 4), "b": torch.full((4,), math.inf)}, "non-finite"),
        ({"w": torch.zeros(4, 3), "b": torch.zeros(4)}, "shape"),
        ({"w": torch.zeros(3, 4)}, "keys differ"),
        ({"w": torch.zeros(3, 4), "b": torch.zeros(4, dtype=torch.long)}, "dtype"),
    ],
)
def test_malformed_updates_are_rejected_with_a_reason(delta, reason):
    bad = SiteUpdate("evil", delta, 10, 1, 0.1)
    assert reason in check_update(bad, GLOBAL)
    good = _update("ok", torch.ones(3, 4), torch.ones(4))
    accepted, rejected = screen_updates([good, bad], GLOBAL)
    assert accepted == [good]
    assert rejected[0]["site"] == "evil" and reason in rejected[0]["reason"]


def test_implausible_norms_are_rejected():
    ups = [_update(f"s{i}", torch.full((3, 4), 0.1 * (i + 1)), torch.zeros(4)) for i in range(3)]
    huge = _update("huge", torch.full((3, 4), 1e4), torch.zeros(4))
    accepted, rejected = screen_updates(ups + [huge], GLOBAL, outlier_factor=100.0)
    assert [u.site_id for u in accepted] == ["s0", "s1", "s2"]
    assert rejected[0]["site"] == "huge" and "median" in rejected[0]["reason"]
    accepted, rejected = screen_updates(ups, GLOBAL, max_update_norm=0.5)
    assert [u.site_id for u in accepted] == ["s0"] and len(rejected) == 2
    assert "max_update_norm" in rejected[0]["reason"]
