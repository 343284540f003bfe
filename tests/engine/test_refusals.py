"""The engine refuses what it cannot make exact: several forwards or loader batches under one step,
generic layers that draw random numbers or mix samples, and fast-rule layers whose weight is
computed from other parameters (weight norm, parametrizations). Each refusal names the module or
says what to do instead, and leaves no gradient, optimizer or accountant state changed; the
legitimate loops (one batch per step, BatchMemoryManager, early break) keep working."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict

import pytest
import torch
from _helpers import check_against_reference, fastdp_step, mse_batch, mse_per_sample
from _helpers import small_data as _data
from _helpers import small_model as _model
from _helpers import snapshot as _snapshot
from _reference import clipped_mean, per_sample_grads
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

import fastdp
from fastdp.engine import BatchMemoryManager, DPDataLoader, PrivacyStepError, UnsupportedModuleError

ONE_PASS = r"exactly one forward and one backward per optimizer step"


def _unchanged(model, before, opt, engine):
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    assert len(opt.state) == 0  # Adam state is created on its first step
    assert engine.accountant.steps == 0


def _private(model, poisson=True, batch_size=8, n=40, opt_cls=torch.optim.Adam, lr=0.1, sigma=1.0, **kw):
    engine = fastdp.PrivacyEngine(seed=0)
    pm, opt, loader = engine.make_private(
        module=model,
        optimizer=opt_cls(model.parameters(), lr=lr),
        data_loader=DataLoader(_data(n), batch_size=batch_size),
        noise_multiplier=sigma,
        max_grad_norm=1.0,
        poisson_sampling=poisson,
        **kw,
    )
    return pm, opt, loader, engine


def _step(pm, opt, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(pm(x), y).backward()
    opt.step()


# ----------------------------------------------------------- one forward, one backward, one step


@pytest.mark.parametrize("poisson", [False, True])
@pytest.mark.parametrize("second", ["same batch", "next batch"])
def test_two_forward_backward_before_one_step_refused(poisson, second):
    torch.manual_seed(0)
    model = _model()
    pm, opt, loader, engine = _private(model, poisson=poisson)
    it = iter(loader)
    x, y = next(it)
    x2, y2 = (x, y) if second == "same batch" else next(it)
    before = _snapshot(model)
    opt.zero_grad()
    nn.functional.cross_entropy(pm(x), y).backward()
    nn.functional.cross_entropy(pm(x2), y2).backward()  # gradient accumulation
    with pytest.raises(PrivacyStepError, match=ONE_PASS) as err:
        opt.step()
    assert "not compatible with gradient accumulation" in str(err.value)
    assert "BatchMemoryManager" in str(err.value)
    _unchanged(model, before, opt, engine)
    assert pm.tape.batches == [] and not pm.tape.awaiting_backward
    _step(pm, opt, *next(it))  # the loop goes on with the next batch
    assert engine.accountant.steps == 1
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_two_loader_batches_concatenated_refused():
    torch.manual_seed(0)
    model = _model()
    pm, opt, loader, engine = _private(model)
    before = _snapshot(model)
    it = iter(loader)
    (x1, y1), (x2, y2) = next(it), next(it)
    opt.zero_grad()
    nn.functional.cross_entropy(pm(torch.cat([x1, x2])), torch.cat([y1, y2])).backward()  # one forward
    with pytest.raises(PrivacyStepError, match=r"2 batches were drawn from the Poisson DPDataLoader") as err:
        opt.step()
    assert ONE_PASS in str(err.value) and "BatchMemoryManager" in str(err.value)
    _unchanged(model, before, opt, engine)
    _step(pm, opt, *next(it))  # the refused batches are discarded; the next one is a step
    assert engine.accountant.steps == 1
    # zip over the loader twice: two batches per step as well
    for (a, b), (c, d) in zip(loader, loader, strict=False):
        opt.zero_grad()
        nn.functional.cross_entropy(pm(torch.cat([a, c])), torch.cat([b, d])).backward()
        with pytest.raises(PrivacyStepError, match="batches were drawn"):
            opt.step()
        break
    assert engine.accountant.steps == 1


def test_skipped_steps_over_two_loader_batches_refused():
    """signal_skip_step by hand to accumulate over loader batches: refused at the real step."""
    torch.manual_seed(0)
    model = _model()
    pm, opt, loader, engine = _private(model)
    before = _snapshot(model)
    with pytest.raises(PrivacyStepError, match="2 batches were drawn"):
        for i, (x, y) in enumerate(loader):
            opt.signal_skip_step(i == 0)
            _step(pm, opt, x, y)
    _unchanged(model, before, opt, engine)


def test_plain_loader_not_checked():
    """An optimizer whose loader is not a DPDataLoader (poisson_sampling=False) has no loader check."""
    model = _model()
    pm, opt, loader, engine = _private(model, poisson=False)
    assert not isinstance(loader, DPDataLoader)
    it = iter(loader)
    (x1, y1), (x2, y2) = next(it), next(it)
    _step(pm, opt, torch.cat([x1, x2]), torch.cat([y1, y2]))
    assert engine.accountant.steps == 1


def test_training_loops_still_work():
    torch.manual_seed(0)
    model = _model()
    pm, opt, loader, engine = _private(model)
    for _ in range(2):  # Site-style epochs
        for x, y in loader:
            _step(pm, opt, x, y)
    assert engine.accountant.steps == 2 * len(loader)
    for x, y in loader:  # break after a step
        _step(pm, opt, x, y)
        break
    steps = 3  # break at the top of the loop (fastdp.attacks.audit): a drawn batch is abandoned
    for _ in range(2):
        done = 0
        while done < steps:
            for x, y in loader:
                if done == steps:
                    break
                _step(pm, opt, x, y)
                done += 1
    x, y = next(iter(loader))  # one batch with next(iter(...)) is one step
    _step(pm, opt, x, y)
    assert engine.accountant.steps == 2 * len(loader) + 1 + 2 * steps + 1


def test_loader_with_workers_counts_in_main_process():
    """With num_workers > 0 the batch sampler runs ahead (prefetch); only batches handed out count."""
    torch.manual_seed(0)
    model = _model()
    engine = fastdp.PrivacyEngine(seed=0)
    pm, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(), batch_size=8, num_workers=2, prefetch_factor=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert loader.num_workers == 2
    for x, y in loader:
        _step(pm, opt, x, y)
    assert engine.accountant.steps == len(loader)
    it = iter(loader)
    (x1, y1), (x2, y2) = next(it), next(it)
    opt.zero_grad()
    nn.functional.cross_entropy(pm(torch.cat([x1, x2])), torch.cat([y1, y2])).backward()
    with pytest.raises(PrivacyStepError, match="2 batches were drawn"):
        opt.step()
    del it


def _grad_of_first_logical_batch(base, physical: int | None, break_first: bool = False):
    """p.grad after the first real step (sigma 0, lr 0) on Poisson batches of a seeded loader,
    one forward per logical batch (physical None) or split by BatchMemoryManager."""
    model = copy.deepcopy(base)
    engine = fastdp.PrivacyEngine(seed=0)
    ds = TensorDataset(*(t.double() if t.is_floating_point() else t for t in _data(20).tensors))
    dl = DPDataLoader(ds, sample_rate=0.5, steps=4, generator=torch.Generator().manual_seed(3))
    pm, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=dl,
        noise_multiplier=0.0,
        max_grad_norm=0.5,
    )
    sizes = []
    if physical is None:
        x, y = next(iter(loader))
        if break_first:
            x, y = next(iter(loader))
        sizes.append(x.shape[0])
        _step(pm, opt, x, y)
    else:
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=opt) as phys:
            if break_first:  # leave the loop after one (virtual) step of the first logical batch
                for x, y in phys:
                    _step(pm, opt, x, y)
                    break
            for x, y in phys:
                sizes.append(x.shape[0])
                _step(pm, opt, x, y)
                if engine.accountant.steps == 1:
                    break
    assert engine.accountant.steps == 1
    return {n: p.grad.clone() for n, p in model.named_parameters()}, sizes


@pytest.mark.parametrize("break_first", [False, True])
def test_batch_memory_manager_equals_one_big_batch(break_first):
    torch.manual_seed(0)
    base = _model().double()
    expected, big = _grad_of_first_logical_batch(base, None, break_first)
    got, sizes = _grad_of_first_logical_batch(base, 3, break_first)
    assert sum(sizes) == big[0] and len(sizes) > 2  # the logical batch was split into physical ones
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-10, atol=1e-13)


# -------------------------------------------------------------------------- two forwards, one backward


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x).squeeze(1)


def test_gan_two_forwards_before_backward_different_sizes_refused_same_size_and_concatenated_train():
    """Calls before one backward are one batch (row i of each call is unit i): allowed with equal
    batch sizes (Opacus's dcgan.py), refused otherwise; one concatenated forward also trains."""
    torch.manual_seed(0)
    disc = Discriminator()
    engine = fastdp.PrivacyEngine(seed=0)
    real_ds = TensorDataset(torch.randn(32, 6))
    pm, opt, loader = engine.make_private(
        module=disc,
        optimizer=torch.optim.SGD(disc.parameters(), lr=0.1),
        data_loader=DataLoader(real_ds, batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    bce = nn.functional.binary_cross_entropy_with_logits
    it = iter(loader)
    (real,) = next(it)
    fake = torch.randn(len(real) + 1, 6)
    before = _snapshot(disc)
    opt.zero_grad()
    out_real = pm(real)
    with pytest.raises(ValueError, match="every call needs the same batch size") as err:
        pm(fake)
    assert "torch.cat" in str(err.value) and "optimizer.zero_grad()" in str(err.value)
    assert pm.tape.batches and pm.tape.awaiting_backward  # the first call is still there
    with pytest.raises(PrivacyStepError, match="forward without backward"):
        opt.step()
    _unchanged(disc, before, opt, engine)
    del out_real
    (real,) = next(it)
    opt.zero_grad()
    errD = bce(pm(real), torch.ones(len(real))) + bce(pm(torch.randn(len(real), 6)), torch.zeros(len(real)))
    errD.backward()
    assert len(pm.tape.batches) == 1 and pm.tape.batches[0].calls == 2
    opt.step()
    assert engine.accountant.steps == 1
    assert all(not torch.equal(before[n], p) for n, p in disc.named_parameters())
    (real,) = next(it)
    fake = torch.randn(5, 6)
    opt.zero_grad()
    out = pm(torch.cat([real, fake]))  # one forward: each sample clipped once
    labels = torch.cat([torch.ones(len(real)), torch.zeros(len(fake))])
    bce(out, labels).backward()
    opt.step()
    assert engine.accountant.steps == 2


def test_forward_backward_then_forward_backward_is_still_two_batches():
    """A second call after the first one's backward is gradient accumulation: refused at the step."""
    torch.manual_seed(0)
    pm, opt, loader, engine = _private(_model(), poisson=False)
    x, y = next(iter(loader))
    opt.zero_grad()
    nn.functional.cross_entropy(pm(x), y).backward()
    out = pm(x)
    nn.functional.cross_entropy(out, y).backward()
    with pytest.raises(PrivacyStepError, match=ONE_PASS):
        opt.step()
    assert engine.accountant.steps == 0


# ---------------------------------------------------------------------------- generic torch.func path


class NoisyScale(nn.Module):
    """Own parameters and randomness in its forward: the generic path cannot reproduce it."""

    def __init__(self, kind="dropout"):
        super().__init__()
        self.s = nn.Parameter(torch.ones(4))
        self.kind = kind
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        h = x * self.s
        if self.kind == "dropout":
            return self.drop(h)
        return h + 0.1 * torch.randn_like(h) if self.kind == "randn" else h


@pytest.mark.parametrize("kind", ["dropout", "randn"])
def test_generic_randomness_refused(kind):
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(block=nn.Sequential(NoisyScale(kind)), head=nn.Linear(4, 3)))
    pm, opt, _, engine = _private(model, poisson=False, n=16, batch_size=4)
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    before = _snapshot(model)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(pm(x), y)
    with pytest.raises(UnsupportedModuleError, match=r"'block\.0' \(NoisyScale\) draws random numbers") as err:
        loss.backward()
    assert "nn.Dropout submodule of the parent" in str(err.value)
    assert pm.tape.batches == [] and not pm.tape.awaiting_backward  # the half-recorded batch is gone
    with pytest.raises(PrivacyStepError, match="backward that failed"):
        opt.step()  # a step taken anyway is refused, not a noise-only step
    _unchanged(model, before, opt, engine)
    if kind == "dropout":
        model.block[0].drop.eval()  # no randomness any more: the module trains
    else:
        model.block[0].kind = "none"
    _step(pm, opt, x, y)
    assert engine.accountant.steps == 1


class Centered(nn.Module):
    """Mixes the samples of a batch: subtracts the batch mean."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))
        self.center = True

    def forward(self, x):
        h = x * self.w
        return h - h.mean(0) if self.center else h


def test_generic_sample_mixing_refused():
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(lin=nn.Linear(4, 4), mix=Centered(), head=nn.Linear(4, 3)))
    pm, opt, _, engine = _private(model, poisson=False, n=16, batch_size=4)
    x, y = torch.randn(4, 4), torch.randint(0, 3, (4,))
    before = _snapshot(model)
    opt.zero_grad()
    loss = nn.functional.cross_entropy(pm(x), y)
    with pytest.raises(UnsupportedModuleError, match=r"'mix' \(Centered\).*per-sample outputs differ") as err:
        loss.backward()
    assert "mixes the samples of a batch" in str(err.value)
    assert pm.tape.batches == []
    with pytest.raises(PrivacyStepError, match="backward that failed"):
        opt.step()
    _unchanged(model, before, opt, engine)
    model.mix.center = False  # sample-independent now: the same private model trains
    _step(pm, opt, x, y)
    assert engine.accountant.steps == 1


class Gate(nn.Module):
    """Sample-independent, no rule: the generic path."""

    def __init__(self, c):
        super().__init__()
        self.a = nn.Parameter(torch.randn(c))
        self.b = nn.Parameter(torch.randn(c))

    def forward(self, x):
        return torch.sigmoid(x * self.a[:, None, None]) * x + self.b[:, None, None]


@pytest.mark.usefixtures("float64")
def test_generic_well_behaved_matches_reference_with_inplace_after():
    """Output modified in place afterwards (ReLU(inplace)): the kept copy is the forward's output."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), Gate(3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(48, 2))
    x, y = torch.randn(5, 2, 6, 6), torch.randn(5, 2)
    check_against_reference(model, x, y, mse_per_sample, mse_batch)


def test_generic_with_dropout_in_parent_trains():
    """The suggested fix: randomness in a parameter-free parent, not in the generic layer."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = Gate(4)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(self.gate(x))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), Block(), nn.Flatten(), nn.Linear(64, 3))
    pm, opt, _, engine = _private(model, poisson=False)
    _step(pm, opt, torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,)))
    assert engine.accountant.steps == 1


def test_generic_nan_sample_is_the_optimizers_refusal_and_retain_graph_works():
    """A NaN sample is not taken for sample mixing; a second backward (retain_graph) still checks."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), Gate(4), nn.Flatten(), nn.Linear(64, 3))
    pm, opt, _, engine = _private(model, poisson=False)
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,))
    x[2] = float("nan")
    opt.zero_grad()
    nn.functional.cross_entropy(pm(x), y).backward()
    with pytest.raises(PrivacyStepError, match=r"non-finite per-sample gradient norm for samples \[2\]"):
        opt.step()
    x[2] = 0.0
    opt.zero_grad()
    loss = nn.functional.cross_entropy(pm(x), y)
    loss.backward(retain_graph=True)
    loss.backward()  # the gradient of 2 * loss: one forward, clipped once
    opt.step()
    assert engine.accountant.steps == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_generic_no_false_refusal_low_precision(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), Gate(4), nn.Flatten(), nn.Linear(64, 3)).to(dtype)
    pm, opt, _, engine = _private(model, poisson=False, opt_cls=torch.optim.SGD)
    for _ in range(3):
        _step(pm, opt, torch.randn(8, 1, 6, 6, dtype=dtype), torch.randint(0, 3, (8,)))
    assert engine.accountant.steps == 3


# ------------------------------------------------------------------- weight norm, parametrizations


def _legacy_weight_norm(m):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of parametrizations.weight_norm
        return torch.nn.utils.weight_norm(m)


def test_legacy_weight_norm_conv_refused():
    enc = nn.Sequential(_legacy_weight_norm(nn.Conv2d(1, 4, 3)), nn.PReLU())
    model = nn.Sequential(OrderedDict(enc=enc, flat=nn.Flatten(), head=nn.Linear(64, 3)))
    with pytest.raises(
        UnsupportedModuleError, match=r"'enc\.0' \(Conv2d\): weight is computed from weight_g, weight_v \(weight_norm\)"
    ) as err:
        _private(model)
    assert "never learn" in str(err.value) and "remove_weight_norm" in str(err.value)
    torch.nn.utils.remove_weight_norm(model.enc[0])  # the suggested fix
    pm, opt, _, engine = _private(model, poisson=False)
    _step(pm, opt, torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,)))
    assert engine.accountant.steps == 1


def test_legacy_spectral_norm_linear_refused():
    model = nn.Sequential(nn.Linear(4, 4), torch.nn.utils.spectral_norm(nn.Linear(4, 3)))
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(Linear\): weight is computed from weight_orig"):
        _private(model)


@pytest.mark.parametrize("bias", [True, False])
def test_parametrizations_weight_norm_refused(bias):
    conv = torch.nn.utils.parametrizations.weight_norm(nn.Conv2d(1, 4, 3, bias=bias))
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(
        UnsupportedModuleError,
        match=r"'0' \(Conv2d\) is parametrized \(torch.nn.utils.parametrizations.weight_norm\): weight is computed "
        r"from parametrizations\.weight\.original0, parametrizations\.weight\.original1",
    ) as err:
        _private(model)
    assert "remove_parametrizations" in str(err.value)


def test_custom_parametrization_refused_and_frozen_one_allowed():
    class Symmetric(nn.Module):
        def forward(self, w):
            return w.triu() + w.triu(1).t()

    lin = nn.Linear(4, 4)
    parametrize.register_parametrization(lin, "weight", Symmetric())
    model = nn.Sequential(OrderedDict(sym=lin, head=nn.Linear(4, 2)))
    with pytest.raises(
        UnsupportedModuleError, match=r"'sym' \(Linear\) is parametrized \(torch.nn.utils.parametrize\)"
    ):
        _private(model)
    # A frozen parametrized weight: what trains (the bias) is a registered leaf; exact.
    lin.parametrizations.weight.original.requires_grad_(False)
    model = model.double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    check_against_reference(model, x, y, mse_per_sample, mse_batch)


def test_rule_module_with_extra_parameter_refused():
    class ScaledLinear(nn.Linear):  # keeps Linear.forward: the Linear rule would apply
        def __init__(self):
            super().__init__(4, 3)
            self.gain = nn.Parameter(torch.ones(3))

    with pytest.raises(
        UnsupportedModuleError, match=r"'1' \(ScaledLinear\): its trainable parameter\(s\) gain .*Linear rule"
    ):
        _private(nn.Sequential(nn.Linear(4, 4), ScaledLinear()))


@pytest.mark.usefixtures("float64")
def test_plain_conv_linear_model_unaffected():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2))
    x, y = torch.randn(5, 2, 6, 6), torch.randn(5, 2)
    ref, norms = per_sample_grads(model, mse_per_sample, x, y)
    C = float(norms.median())
    expected = clipped_mean(ref, norms, C, 5)
    got, _, _ = fastdp_step(model, x, y, mse_batch, C)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-12)
