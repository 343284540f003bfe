"""Clopper-Pearson against known values; the canary audit's bound with and without noise."""

import math

import pytest

from fastdp.attacks.audit import audit_dp_sgd, clopper_pearson, epsilon_from_rates, epsilon_lower_bound


def test_clopper_pearson_known_values():
    # Textbook values (e.g. R's binom.test): 5/10 -> [0.1871, 0.8129] at 95 %.
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.18709, abs=1e-4) and hi == pytest.approx(0.81291, abs=1e-4)
    # Closed forms at the edges: 0/n -> upper 1 - (alpha/2)^(1/n); n/n -> lower (alpha/2)^(1/n).
    assert clopper_pearson(0, 10) == (0.0, pytest.approx(1 - 0.025 ** (1 / 10)))
    assert clopper_pearson(20, 20, alpha=0.1) == (pytest.approx(0.05 ** (1 / 20)), 1.0)
    with pytest.raises(ValueError):
        clopper_pearson(3, 2)


def test_epsilon_from_rates_hand_values():
    assert epsilon_from_rates(0.1, 0.2, 0.0) == pytest.approx(math.log(0.8 / 0.1))
    assert epsilon_from_rates(0.5, 0.5, 0.0) == 0.0  # a coin flip proves nothing
    assert epsilon_from_rates(0.0, 0.0, 1e-5) == math.inf
    # With no errors in n trials the bound is finite and grows like log(n).
    b100 = epsilon_lower_bound(0, 100, 0, 100, 1e-5)
    b1000 = epsilon_lower_bound(0, 1000, 0, 1000, 1e-5)
    assert b100 == pytest.approx(math.log((1 - 1e-5 - (1 - 0.025**0.01)) / (1 - 0.025**0.01)))
    assert b1000 > b100 + 2


def test_audit_bound_small_with_noise_and_large_without():
    noisy = audit_dp_sgd(noise_multiplier=2.0, trials=200, seed=1)
    assert 0 < noisy.accountant_epsilon < 3
    assert noisy.epsilon_lower <= noisy.accountant_epsilon and not noisy.violation
    broken = audit_dp_sgd(noise_multiplier=0.0, claimed_noise_multiplier=2.0, trials=200, seed=1)
    # Noise off: the canary is always detected; the bound hits its ceiling for 100 evaluation trials.
    assert broken.fpr == 0 and broken.fnr == 0
    assert broken.epsilon_lower == pytest.approx(epsilon_lower_bound(0, 100, 0, 100, 1e-5))
    assert broken.epsilon_lower > broken.accountant_epsilon and broken.violation


def test_audit_with_subsampling_and_several_steps():
    r = audit_dp_sgd(noise_multiplier=1.0, trials=60, steps=4, sample_rate=0.25, seed=2)
    assert r.steps == 4 and len(r.scores_in) == len(r.scores_out) == 60
    assert r.epsilon_lower <= r.accountant_epsilon
    with pytest.raises(ValueError):
        audit_dp_sgd(sample_rate=0.3, trials=8)
