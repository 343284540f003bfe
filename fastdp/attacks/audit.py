"""Empirical privacy audit of fastdp's DP-SGD: a membership game with a gradient canary.

The auditor plays many rounds of a distinguishing game (Jagielski et al. 2020; Nasr et al.
2021). In each trial a coin decides whether a canary sample is in the training set; the model is
trained with fastdp's real engine (PrivacyEngine, per-sample clipping, fused noise, Poisson
sampling); the auditor, seeing the trained model, guesses whether the canary was in. The canary
is the strongest kind the DP-SGD threat model allows: a *gradient canary* (a Dirac canary) whose
per-sample gradient is a fixed vector of norm >= C along a coordinate that no other sample
touches, so after clipping it adds exactly C * lr / E[B] to that coordinate per step where it is
sampled, and the auditor's statistic is that coordinate's change.

An (epsilon, delta)-DP mechanism forces every test to satisfy FPR + e^eps FNR >= 1 - delta and
FNR + e^eps FPR >= 1 - delta (Kairouz et al. 2015). With Clopper-Pearson upper bounds on the
observed FPR and FNR this gives an epsilon lower bound that holds with confidence 1 - alpha. The
threshold is chosen on one half of the trials and the bound is computed on the other half, so the
choice cannot inflate it. A correct mechanism keeps the bound below the accountant's epsilon; a
broken one (noise off, clipping off) drives it to the largest value the number of trials allows.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from fastdp.accounting import compute_epsilon
from fastdp.engine import PrivacyEngine


def clopper_pearson(successes: int, trials: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact two-sided (1 - alpha) Clopper-Pearson interval for a binomial proportion.

    Args:
        successes: k observed successes out of ``trials`` (n > 0).
        alpha: 1 - confidence (each tail gets alpha / 2).
    Returns: (lower, upper) bounds in [0, 1].
    """
    from scipy.stats import beta

    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials > 0, got {successes}/{trials}")
    lo = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    hi = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return lo, hi


def epsilon_from_rates(fpr: float, fnr: float, delta: float) -> float:
    """Largest epsilon the (epsilon, delta)-DP hypothesis-testing inequalities force for these rates.

    max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR)), 0 if neither is positive,
    inf when a rate is 0 and the other leaves room (a perfect test).
    """
    out = 0.0
    for a, b in ((fpr, fnr), (fnr, fpr)):
        num = 1.0 - delta - a
        if num <= 0:
            continue
        out = max(out, math.inf if b <= 0 else math.log(num / b))
    return out


def epsilon_lower_bound(
    false_positives: int, negatives: int, false_negatives: int, positives: int, delta: float, alpha: float = 0.05
) -> float:
    """Epsilon lower bound with confidence 1 - alpha from a test's error counts.

    The FPR and FNR are replaced by their Clopper-Pearson upper bounds (alpha / 2 in the upper
    tail each, so both hold together with probability >= 1 - alpha) before
    :func:`epsilon_from_rates`. Finite for any finite number of trials.

    Args:
        false_positives: trials without the canary that the test called "in", out of ``negatives``.
        false_negatives: trials with the canary called "out", out of ``positives``.
        delta: the mechanism's delta.
    """
    fpr_hi = clopper_pearson(false_positives, negatives, alpha)[1]
    fnr_hi = clopper_pearson(false_negatives, positives, alpha)[1]
    return epsilon_from_rates(fpr_hi, fnr_hi, delta)


@dataclass
class AuditResult:
    """Outcome of :func:`audit_dp_sgd`.

    Attributes:
        epsilon_lower: epsilon lower bound (confidence 1 - alpha) on the evaluation half.
        epsilon_point: the same without confidence intervals (observed FPR, FNR).
        accountant_epsilon: what fastdp's accountant reports for the configuration the
            mechanism *claims* (``claimed_noise_multiplier``), at ``delta``; inf without noise.
        violation: epsilon_lower > accountant_epsilon (the mechanism leaks more than it claims).
        fpr, fnr: observed rates on the evaluation half; threshold: the chosen decision threshold.
        trials: trials per world (with and without the canary), both halves together.
        seconds: wall time.
        scores_in, scores_out: the statistic in every trial with / without the canary.
    """

    epsilon_lower: float
    epsilon_point: float
    accountant_epsilon: float
    violation: bool
    fpr: float
    fnr: float
    threshold: float
    trials: int
    noise_multiplier: float
    claimed_noise_multiplier: float
    max_grad_norm: float
    steps: int
    sample_rate: float
    delta: float
    alpha: float
    seconds: float
    scores_in: list[float] = field(repr=False, default_factory=list)
    scores_out: list[float] = field(repr=False, default_factory=list)

    def to_dict(self, with_scores: bool = False) -> dict:
        """JSON-friendly dict (infinities as the string "inf")."""
        d = asdict(self)
        if not with_scores:
            d.pop("scores_in")
            d.pop("scores_out")
        return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}


def _linear_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Loss -<w, x>: each sample's gradient is -x whatever w is, so the canary's gradient is
    # exactly the crafted vector (a gradient canary) and no training dynamics blur the test.
    return -(output.squeeze(-1) * target).mean()


def _world(with_canary: bool, dim: int, n: int, canary_norm: float, gen: torch.Generator):
    # Ordinary samples live in the first dim - 1 coordinates; the canary only in the last one.
    x = torch.randn(n, dim, generator=gen)
    x[:, -1] = 0.0
    if with_canary:
        canary = torch.zeros(1, dim)
        canary[0, -1] = canary_norm
        x = torch.cat([x, canary])
    return TensorDataset(x, torch.ones(x.shape[0]))


def _choose_threshold(scores_in: torch.Tensor, scores_out: torch.Tensor, delta: float) -> float:
    """Threshold (predict "in" when score > t) with the largest point epsilon on these scores."""
    cands = torch.cat([scores_in, scores_out]).unique()
    best_t, best_eps = float(cands[0]) - 1.0, -1.0
    for t in cands.tolist():
        fpr = float((scores_out > t).float().mean())
        fnr = float((scores_in <= t).float().mean())
        # Rates are smoothed by one pseudo-count so a perfect split on few trials does not win by
        # an infinite estimate over one that merely looks better on this half.
        eps = epsilon_from_rates(
            (fpr * len(scores_out) + 1) / (len(scores_out) + 2),
            (fnr * len(scores_in) + 1) / (len(scores_in) + 2),
            delta,
        )
        if eps > best_eps:
            best_t, best_eps = t, eps
    return best_t


def audit_dp_sgd(
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    *,
    trials: int = 1000,
    steps: int = 1,
    sample_rate: float = 1.0,
    dataset_size: int = 16,
    dim: int = 8,
    lr: float = 1.0,
    delta: float = 1e-5,
    alpha: float = 0.05,
    canary_norm: float = 10.0,
    claimed_noise_multiplier: float | None = None,
    seed: int = 0,
    progress: bool = False,
) -> AuditResult:
    """Audits fastdp's DP-SGD with a gradient canary; returns an epsilon lower bound.

    Each trial trains a fresh ``nn.Linear(dim, 1, bias=False)`` from zero for ``steps`` DP-SGD
    steps (fastdp.PrivacyEngine, plain SGD at ``lr``, Poisson sampling at ``sample_rate``) on
    ``dataset_size`` ordinary samples, plus the canary in the "in" world. The statistic is the
    final weight on the canary's coordinate. ``trials`` trials are run in each world; the first
    half picks the threshold, the second half gives the bound.

    Args:
        noise_multiplier: sigma the engine really uses (0 switches the noise off: a broken mechanism).
        max_grad_norm: clipping bound C.
        trials: trials per world (>= 4); the bound can reach about log(trials / 7) at most.
        steps: DP-SGD steps per trial; sample_rate: Poisson rate q (1: every sample every step).
        dataset_size: ordinary samples; dim: input size (the canary uses the last coordinate).
        lr: SGD learning rate (the statistic's scale only).
        delta: the delta of the claimed guarantee and of the bound.
        alpha: 1 - confidence of the bound.
        canary_norm: norm of the canary's gradient before clipping (>= C: clipped to exactly C).
        claimed_noise_multiplier: the sigma the accountant is told (default: ``noise_multiplier``);
            set it to audit a mechanism that claims more noise than it adds.
        seed: seeds the data, the Poisson sampling and the noise.
        progress: a tqdm bar of the trials (elapsed, rate, time left) on stderr.
    Returns: :class:`AuditResult`. Runtime: a few ms per trial and step on a CPU.
    """
    if trials < 4:
        raise ValueError(f"need trials >= 4, got {trials}")
    claimed = noise_multiplier if claimed_noise_multiplier is None else claimed_noise_multiplier
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    k = round(1 / sample_rate)
    if not 0 < sample_rate <= 1 or abs(k * sample_rate - 1) > 1e-9:
        raise ValueError(f"sample_rate must be 1/k for an integer k >= 1, got {sample_rate}")
    # make_private samples at rate 1 / len(loader): a batch size that gives k batches for both
    # the n ordinary samples and n + 1 with the canary keeps q the same in the two worlds.
    batch = math.ceil((dataset_size + 1) / k)
    if math.ceil(dataset_size / batch) != k:
        raise ValueError(f"sample_rate 1/{k} needs a larger dataset_size than {dataset_size}")
    setups = {}
    for world in (True, False):
        data = _world(world, dim, dataset_size, canary_norm, gen)
        model = nn.Linear(dim, 1, bias=False)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        engine = PrivacyEngine(seed=seed * 2 + int(world))
        model, opt, loader = engine.make_private(
            module=model,
            optimizer=opt,
            data_loader=DataLoader(data, batch_size=batch),
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
        )
        setups[world] = (model, opt, loader)
    scores: dict[bool, list[float]] = {True: [], False: []}
    for _ in tqdm(range(trials), desc=f"audit sigma={noise_multiplier:g}", unit="trial", disable=not progress):
        for world, (model, opt, loader) in setups.items():
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            done = 0
            while done < steps:
                for x, y in loader:
                    if done == steps:
                        break
                    opt.zero_grad(set_to_none=True)
                    _linear_loss(model(x), y).backward()
                    opt.step()
                    done += 1
            w = next(model.parameters())
            scores[world].append(float(w.detach().reshape(-1)[-1]))
    s_in, s_out = torch.tensor(scores[True]), torch.tensor(scores[False])
    half = trials // 2
    t = _choose_threshold(s_in[:half], s_out[:half], delta)
    ev_in, ev_out = s_in[half:], s_out[half:]
    fp, fn = int((ev_out > t).sum()), int((ev_in <= t).sum())
    fpr, fnr = fp / len(ev_out), fn / len(ev_in)
    eps_lb = epsilon_lower_bound(fp, len(ev_out), fn, len(ev_in), delta, alpha)
    eps_acc = math.inf if claimed <= 0 else compute_epsilon(sample_rate, claimed, steps, delta)
    return AuditResult(
        epsilon_lower=eps_lb,
        epsilon_point=epsilon_from_rates(fpr, fnr, delta),
        accountant_epsilon=eps_acc,
        violation=eps_lb > eps_acc,
        fpr=fpr,
        fnr=fnr,
        threshold=t,
        trials=trials,
        noise_multiplier=noise_multiplier,
        claimed_noise_multiplier=claimed,
        max_grad_norm=max_grad_norm,
        steps=steps,
        sample_rate=sample_rate,
        delta=delta,
        alpha=alpha,
        seconds=time.perf_counter() - start,
        scores_in=scores[True],
        scores_out=scores[False],
    )
