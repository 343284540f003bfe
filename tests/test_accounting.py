"""Accounting: equals dp-accounting's direct computation and agrees with Opacus's RDP accountant."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from scipy.stats import norm

from fastdp.accounting import (
    RDP_ORDERS,
    Accountant,
    GDPApproximationWarning,
    check_history,
    compute_epsilon,
    epsilon_for_history,
    gdp_epsilon,
    gdp_mu,
    get_noise_multiplier,
    rdp_privacy_spent,
    steps_for,
)

CASES = [(0.01, 1.0, 1000, 1e-5), (0.004, 0.8, 5000, 1e-5), (0.1, 2.0, 100, 1e-6)]


def _direct(acc, q, sigma, steps, delta):
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("q,sigma,steps,delta", CASES)
def test_rdp_equals_dp_accounting(q, sigma, steps, delta):
    expected = _direct(rdp.RdpAccountant(orders=list(RDP_ORDERS)), q, sigma, steps, delta)
    assert compute_epsilon(q, sigma, steps, delta, "rdp") == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("q,sigma,steps,delta", CASES[:2])
def test_pld_equals_dp_accounting_and_is_tighter(q, sigma, steps, delta):
    expected = _direct(pld.PLDAccountant(), q, sigma, steps, delta)
    eps = compute_epsilon(q, sigma, steps, delta, "pld")
    assert eps == pytest.approx(expected, rel=1e-9)
    assert eps <= compute_epsilon(q, sigma, steps, delta, "rdp")


@pytest.mark.parametrize("q,sigma,steps,delta", CASES)
def test_rdp_agrees_with_opacus(q, sigma, steps, delta):
    accountants = pytest.importorskip("opacus.accountants")
    acc = accountants.RDPAccountant()
    acc.history = [(sigma, q, steps)]
    assert compute_epsilon(q, sigma, steps, delta) == pytest.approx(acc.get_epsilon(delta), rel=1e-3)


def test_history_composition_and_json_roundtrip():
    acc = Accountant("rdp")
    for _ in range(3):
        acc.step(1.0, 0.01)
    acc.step(2.0, 0.02, steps=5)
    assert acc.history == [(1.0, 0.01, 3), (2.0, 0.02, 5)]
    assert acc.steps == 8
    restored = Accountant.from_json(json.dumps(json.loads(acc.to_json())))
    assert restored.history == acc.history and restored.mechanism == "rdp"
    assert restored.get_epsilon(1e-5) == acc.get_epsilon(1e-5)
    assert acc.get_epsilon(1e-5) == pytest.approx(epsilon_for_history(acc.history, 1e-5))
    before = acc.get_epsilon(1e-5)
    assert acc.epsilon_after(1.0, 0.01, 1e-5) > before
    assert acc.steps == 8  # epsilon_after does not change the state


@pytest.mark.parametrize("mech", ["rdp", "prv", pytest.param("pld", marks=pytest.mark.slow)])  # pld: ~7 s
def test_noise_calibration(mech):
    q, steps, delta, target = 0.01, 2000, 1e-5, 3.0
    sigma = get_noise_multiplier(target, delta, q, steps, accountant=mech, epsilon_tolerance=0.01)
    eps = compute_epsilon(q, sigma, steps, delta, mech)
    assert target - 0.01 <= eps <= target
    assert compute_epsilon(q, sigma * 0.97, steps, delta, mech) > target


def test_edge_cases():
    assert compute_epsilon(0.01, 1.0, 0, 1e-5) == 0.0
    assert compute_epsilon(0.01, 0.0, 10, 1e-5) == float("inf")
    with pytest.raises(ValueError, match="accountant"):
        Accountant("moments")
    with pytest.raises(ValueError, match="delta"):
        compute_epsilon(0.01, 1.0, 10, 0.0)


# ----------------------------------------------------------------------------- Opacus's names and signature


def test_unknown_accountant_lists_the_valid_names():
    for bad in ("moments", "PRV2", 3):
        with pytest.raises(ValueError, match="'rdp', 'pld', 'prv', 'gdp'"):
            Accountant(bad)
    with pytest.raises(ValueError, match="'rdp', 'pld', 'prv', 'gdp'"):
        compute_epsilon(0.01, 1.0, 10, 1e-5, "moments")
    with pytest.raises(ValueError, match="'rdp', 'pld', 'prv', 'gdp'"):
        get_noise_multiplier(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.01, steps=10, accountant="x")


def test_prv_is_the_numerical_pld_accountant():
    # "prv" keeps Opacus's name and the meaning (numerical composition, an upper bound) on dp-accounting's PLD.
    q, sigma, steps, delta = 0.01, 1.0, 1000, 1e-5
    expected = _direct(pld.PLDAccountant(), q, sigma, steps, delta)
    assert compute_epsilon(q, sigma, steps, delta, "prv") == pytest.approx(expected, rel=1e-4)
    acc = Accountant("PRV")
    acc.step(sigma, q, steps)
    assert acc.mechanism == "prv" and acc.get_epsilon(delta) == pytest.approx(expected, rel=1e-4)
    assert json.loads(acc.to_json())["mechanism"] == "prv"


def test_gdp_is_the_clt_formula_and_warns():
    q, sigma, steps, delta = 0.05, 1.0, 1000, 1e-5
    mu = gdp_mu([(sigma, q, steps)])
    assert mu == pytest.approx(q * math.sqrt(steps * (math.exp(1 / sigma**2) - 1)), rel=1e-14)
    with pytest.warns(GDPApproximationWarning, match="not an upper bound"):
        eps = compute_epsilon(q, sigma, steps, delta, "gdp")
    assert eps == gdp_epsilon(mu, delta) > 0
    # The (epsilon, delta) dual of mu-GDP at that epsilon is the target delta.
    dual = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
    assert dual == pytest.approx(delta, rel=1e-8)
    # Two phases add their mu^2; a phase of equal steps is the same as one merged phase.
    assert gdp_mu([(sigma, q, 400), (sigma, q, 600)]) == pytest.approx(mu, rel=1e-14)
    two = gdp_mu([(1.0, 0.05, 10), (2.0, 0.01, 20)])
    assert two**2 == pytest.approx(gdp_mu([(1.0, 0.05, 10)]) ** 2 + gdp_mu([(2.0, 0.01, 20)]) ** 2, rel=1e-14)
    # mu so small that (0, delta) already holds; no noise.
    assert gdp_epsilon(1e-9, delta) == 0.0
    assert gdp_mu([(0.0, q, 5)]) == math.inf and gdp_epsilon(math.inf, delta) == math.inf
    with pytest.warns(GDPApproximationWarning):
        acc = Accountant("gdp")
    acc.step(sigma, q, steps)
    assert acc.get_epsilon(delta) == eps
    assert acc.get_epsilon(delta, poisson=False) != eps  # Opacus's uniform-sampling formula


def test_get_noise_multiplier_opacus_signature_epochs_and_steps():
    q, delta, target = 0.01, 1e-5, 3.0
    by_epochs = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, epochs=3)
    # Opacus: steps = int(epochs / sample_rate), truncating: 7 / 0.035 is 199.99999999999997 in floating point.
    assert steps_for(q, epochs=3) == 300 and steps_for(0.035, epochs=7) == 199 and steps_for(q, steps=7) == 7
    assert by_epochs == get_noise_multiplier(target, delta, q, 300)  # fastdp's positional form
    assert by_epochs == get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=300)
    eps = compute_epsilon(q, by_epochs, 300, delta)
    assert target - 0.01 <= eps <= target
    for bad in ({}, {"epochs": 1, "steps": 100}):
        with pytest.raises(ValueError, match="exactly one of steps= and epochs="):
            get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, **bad)
    with pytest.raises(ValueError, match="at least one step"):
        get_noise_multiplier(target, delta, q, 0)
    with pytest.raises(ValueError, match="raise the budget"):
        get_noise_multiplier(1e-6, delta, 0.5, 1000, max_sigma=100)


def test_accountant_options():
    q, sigma, steps, delta = 0.01, 1.0, 100, 1e-5
    few = compute_epsilon(q, sigma, steps, delta, "rdp", alphas=[2, 4, 8])
    assert few >= compute_epsilon(q, sigma, steps, delta, "rdp")  # fewer orders: a looser bound
    # Opacus's PRV options are accepted (the PLD estimate is an upper bound without them).
    assert compute_epsilon(q, sigma, steps, delta, "prv", eps_error=0.1) == compute_epsilon(
        q, sigma, steps, delta, "prv"
    )
    with pytest.raises(TypeError, match="alphas"):
        compute_epsilon(q, sigma, steps, delta, "rdp", eps_error=0.1)
    sigma_few = get_noise_multiplier(
        target_epsilon=2.0, target_delta=delta, sample_rate=q, steps=steps, accountant="rdp", alphas=[2, 4, 8]
    )
    assert sigma_few >= get_noise_multiplier(2.0, delta, q, steps)


def test_privacy_spent_and_history_validation():
    acc = Accountant("rdp")
    assert acc.get_privacy_spent(1e-5) == (0.0, 0.0)
    acc.step(1.0, 0.01, 1000)
    eps, alpha = acc.get_privacy_spent(1e-5)
    assert eps == acc.get_epsilon(1e-5) and alpha in RDP_ORDERS
    assert rdp_privacy_spent([(0.0, 0.01, 3)], 1e-5)[0] == math.inf
    with pytest.raises(ValueError, match="RDP"):
        Accountant("pld").get_privacy_spent(1e-5)
    for bad in ([[1.0, 2.0, 5]], [[1.0, 0.1, 1.5]], [[-1.0, 0.1, 5]], [[1.0, 0.1]], "rdp"):
        with pytest.raises(ValueError, match="history"):
            check_history(bad)
    assert check_history([[1, 0.5, 3]]) == [(1.0, 0.5, 3)]


def test_steps_within_is_the_step_budget():
    acc = Accountant("rdp")
    acc.step(1.0, 0.02, 100)
    max_eps, delta = 2.0, 1e-5
    n = acc.steps_within(1.0, 0.02, delta, max_eps)
    assert n > 0 and acc.steps == 100  # state unchanged
    assert acc.epsilon_after(1.0, 0.02, delta, n) <= max_eps < acc.epsilon_after(1.0, 0.02, delta, n + 1)
    assert acc.steps_within(1.0, 0.02, delta, acc.get_epsilon(delta) * 0.999) == 0
    assert acc.steps_within(100.0, 0.02, delta, max_eps, limit=50) == 50
