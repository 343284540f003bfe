import math

import pytest
import torch
from _fl_helpers import phantom, tiny_unet

from fastdp.federated import DPConfig, Site, initial_global_state
from fastdp.federated.site import stable_seed
from fastdp.models import dice_ce_criterion


def _site(dp=None, **kw):
    kw.setdefault("batch_size", 8)
    kw.setdefault("local_steps", 1)
    kw.setdefault("lr", 0.1)
    kw.setdefault("optimizer", "sgd")
    return Site("site_a", phantom("site_a", 40), phantom("site_a", 8, start=1000), tiny_unet, dp=dp, **kw)


def _first_poisson_batch(site: Site, seed: int = 0, rng_state=None):
    """The site's first Poisson batch: from its sampler state before training (a DP site's is secret),
    or from the seed a non-private site's sampler is derived from."""
    gen = torch.Generator()
    if rng_state is not None:
        gen.set_state(rng_state)
    else:
        gen.manual_seed(stable_seed("sampling", seed, site.site_id))
    idx = torch.nonzero(torch.rand(site.num_samples, generator=gen) < site.sample_rate).flatten()
    x, y = site.train_data.tensors()
    return x[idx], y[idx]


def _mean_grad(state, x, y):
    model = tiny_unet()
    model.load_state_dict(state)
    loss = dice_ce_criterion()(model(x), y)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def test_nonprivate_one_sgd_step_is_minus_lr_times_the_batch_gradient():
    site = _site()
    g0 = initial_global_state(tiny_unet, seed=1)
    update = site.local_update(g0, round=1)
    x, y = _first_poisson_batch(site)
    ref = _mean_grad(g0, x, y)
    assert update.steps == 1 and update.epsilon is None and update.num_samples == 40
    assert set(update.delta) == set(g0)
    for name, g in ref.items():
        torch.testing.assert_close(update.delta[name], -0.1 * g, rtol=1e-4, atol=1e-6)


def test_dp_without_noise_and_clipping_is_the_sum_over_expected_batch():
    # sigma = 0, C huge: DP-SGD's step is the sum of per-sample gradients / E[B] (not / |B|).
    site = _site(dp=DPConfig(noise_multiplier=0.0, max_grad_norm=1e6))
    g0 = initial_global_state(tiny_unet, seed=1)
    rng = site.generator.get_state()
    update = site.local_update(g0)
    x, y = _first_poisson_batch(site, rng_state=rng)
    ref = _mean_grad(g0, x, y)
    factor = len(x) / (site.sample_rate * site.num_samples)
    for name, g in ref.items():
        torch.testing.assert_close(update.delta[name], -0.1 * g * factor, rtol=1e-4, atol=1e-6)


def test_dp_update_is_clipped_and_noised():
    g0 = initial_global_state(tiny_unet, seed=1)
    site = _site(dp=DPConfig(noise_multiplier=0.0, max_grad_norm=1e-3))
    rng = site.generator.get_state()
    clipped = site.local_update(g0)
    # every per-sample gradient has norm <= C, so the step is at most lr * |B| * C / E[B]
    x, _ = _first_poisson_batch(site, rng_state=rng)
    bound = 0.1 * len(x) * 1e-3 / (site.sample_rate * site.num_samples)
    assert clipped.norm() <= bound * (1 + 1e-4)
    noisy = _site(dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1e-3)).local_update(g0)
    # noise std per coordinate = lr * sigma * C / E[B]
    n_params = sum(d.numel() for d in noisy.delta.values())
    expected = 0.1 * 1.0 * 1e-3 / (site.sample_rate * site.num_samples) * math.sqrt(n_params)
    assert noisy.norm() == pytest.approx(expected, rel=0.1)


def test_epsilon_budget_and_accounting():
    site = _site(dp=DPConfig(noise_multiplier=1.5, epsilon_budget=3.5), local_steps=5)
    assert site.epsilon() == 0.0
    g0 = initial_global_state(tiny_unet, seed=1)
    eps = []
    while site.within_budget():
        eps.append(site.local_update(g0).epsilon)
        assert eps[-1] <= 3.5
    assert len(eps) >= 1 and eps == sorted(eps)
    assert len(eps) == 3  # 2.25, 2.88, 3.39; a 4th round would reach 3.82
    assert site.epsilon_after_round() > 3.5
    assert site.accountant.steps == 5 * len(eps)


def test_target_epsilon_is_calibrated_over_planned_rounds():
    site = _site(dp=DPConfig(target_epsilon=4.0), local_steps=3, planned_rounds=4)
    g0 = initial_global_state(tiny_unet, seed=1)
    for _ in range(4):
        site.local_update(g0)
    assert site.epsilon() == pytest.approx(4.0, rel=0.02)
    with pytest.raises(ValueError, match="planned_rounds"):
        _site(dp=DPConfig(target_epsilon=4.0))


@pytest.mark.filterwarnings("ignore::fastdp.noise.ReproducibleNoiseWarning")
def test_state_round_trip_continues_exactly():
    g0 = initial_global_state(tiny_unet, seed=1)
    dp = DPConfig(noise_multiplier=1.0, reproducible_noise=True)  # two sites with the same streams
    straight = _site(dp=dp, optimizer="adam", local_steps=2)
    straight.local_update(g0)
    want = straight.local_update(g0)

    first = _site(dp=dp, optimizer="adam", local_steps=2)
    first.local_update(g0)
    second = _site(dp=dp, optimizer="adam", local_steps=2)
    second.load_state_dict(first.state_dict())
    got = second.local_update(g0)
    for k in want.delta:
        torch.testing.assert_close(got.delta[k], want.delta[k], rtol=0, atol=0)
    assert got.epsilon == want.epsilon


def test_fedprox_pull_shrinks_the_update():
    g0 = initial_global_state(tiny_unet, seed=1)
    free = _site(local_steps=4).local_update(g0)
    pulled = _site(local_steps=4).local_update(g0, config={"proximal_mu": 5.0})
    assert pulled.norm() < 0.9 * free.norm()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="exactly one"):
        DPConfig()
    with pytest.raises(ValueError, match="max_grad_norm"):
        DPConfig(noise_multiplier=1.0, max_grad_norm=0)
    with pytest.raises(ValueError, match="optimizer"):
        _site(optimizer="rmsprop")
    with pytest.raises(ValueError, match="empty training set"):
        Site("x", phantom("site_a", 0), None, tiny_unet)


def test_evaluate_reports_dice_and_loss():
    site = _site()
    m = site.evaluate(initial_global_state(tiny_unet, seed=1))
    assert set(m) == {"dice", "loss"} and 0.0 <= m["dice"] <= 1.0 and m["loss"] > 0


def test_local_epochs_set_the_steps_per_round():
    site = _site(local_epochs=2.0)  # 40 slices, batch 8: 5 steps per epoch
    assert site.local_steps == 10
    assert site.local_update(initial_global_state(tiny_unet, seed=1)).steps == 10
    with pytest.raises(ValueError, match="local_epochs"):
        _site(local_epochs=0)
