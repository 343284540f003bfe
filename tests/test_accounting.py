"""Accounting: equals dp-accounting's direct computation and agrees with Opacus's RDP accountant."""

from __future__ import annotations

import json

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from fastdp.accounting import RDP_ORDERS, Accountant, compute_epsilon, epsilon_for_history, get_noise_multiplier

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


def test_noise_calibration():
    q, steps, delta, target = 0.01, 2000, 1e-5, 3.0
    for mech in ("rdp", "pld"):
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
