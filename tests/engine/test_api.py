"""PrivacyEngine API: Opacus-style training loop, Poisson sampling, batch memory manager,
accounting through the engine, budget limit, and bad input (clear errors, no corrupted state)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _helpers import fastdp_step
from _helpers import small_data as _data
from _helpers import small_model as _model
from _helpers import snapshot as _snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdp
import fastdp.accountants
from fastdp.engine import (
    BatchMemoryManager,
    DPDataLoader,
    PrivacyBudgetExceeded,
    PrivacyStepError,
    UnsupportedModuleError,
)


@pytest.mark.parametrize("opt_cls", [torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW])
def test_training_loop_and_accounting(opt_cls):
    torch.manual_seed(0)
    model = _model()
    loader = DataLoader(_data(), batch_size=8)
    engine = fastdp.PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=opt_cls(model.parameters(), lr=1e-2),
        data_loader=loader,
        noise_multiplier=1.1,
        max_grad_norm=1.0,
    )
    assert isinstance(loader, DPDataLoader) and loader.sample_rate == pytest.approx(1 / 5)
    crit = nn.CrossEntropyLoss()
    before = _snapshot(model._module)
    sizes = []
    for x, y in loader:
        sizes.append(x.shape[0])
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()
    assert len(sizes) == 5
    after = _snapshot(model._module)
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert engine.get_epsilon(1e-5) == pytest.approx(fastdp.compute_epsilon(0.2, 1.1, 5, 1e-5))
    state = json.loads(json.dumps(engine.state_dict()))
    other = fastdp.PrivacyEngine(accountant="rdp")  # a state loads into an engine of its mechanism
    other.load_state_dict(state)
    assert other.get_epsilon(1e-5) == engine.get_epsilon(1e-5)


def test_poisson_batches_vary_and_can_be_empty():
    ds = _data(20)
    loader = DPDataLoader(ds, sample_rate=0.05, steps=200, generator=torch.Generator().manual_seed(1))
    sizes = [x.shape[0] for x, _ in loader]
    assert len(sizes) == 200 and 0 in sizes and max(sizes) >= 3
    assert abs(sum(sizes) / 200 - 1.0) < 0.3
    x, y = next(x for x in loader if x[0].shape[0] == 0)
    assert x.shape == (0, 1, 6, 6) and y.shape == (0,)


def test_secure_mode_sampling_and_noise_not_replayable():
    ds = _data(20)
    a = [b[0].shape[0] for b in DPDataLoader(ds, 0.5, steps=30, secure_mode=True)]
    b = [b[0].shape[0] for b in DPDataLoader(ds, 0.5, steps=30, secure_mode=True)]
    assert a != b
    x, y = torch.randn(4, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    base = _model().double()
    crit = nn.CrossEntropyLoss()
    g1, e1, _ = fastdp_step(copy.deepcopy(base), x, y, crit, 1.0, sigma=1.0, seed=5)
    g2, _, _ = fastdp_step(copy.deepcopy(base), x, y, crit, 1.0, sigma=1.0, seed=5)
    assert all(torch.equal(g1[n], g2[n]) for n in g1)  # reproducible from the seed
    s1, _, _ = fastdp_step(copy.deepcopy(base), x, y, crit, 1.0, sigma=1.0, seed=5, secure_mode=True)
    s2, _, _ = fastdp_step(copy.deepcopy(base), x, y, crit, 1.0, sigma=1.0, seed=5, secure_mode=True)
    assert all(not torch.equal(s1[n], s2[n]) for n in s1)  # CSPRNG seeds: not replayable


def test_batch_memory_manager_equals_one_logical_batch():
    torch.manual_seed(0)
    base = _model().double()
    x, y = torch.randn(10, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (10,))
    crit = nn.CrossEntropyLoss()
    expected, _, _ = fastdp_step(copy.deepcopy(base), x, y, crit, 0.5)

    class Fixed:  # a "loader" yielding the one logical batch
        def __iter__(self):
            yield x, y

        def __len__(self):
            return 1

    model = copy.deepcopy(base)
    loader = DataLoader(TensorDataset(torch.zeros(10, 1), torch.zeros(10)), batch_size=10)
    engine = fastdp.PrivacyEngine()
    pm, opt, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=0.5,
        poisson_sampling=False,
    )
    with BatchMemoryManager(data_loader=Fixed(), max_physical_batch_size=3, optimizer=opt) as phys:
        n_phys = 0
        for xb, yb in phys:
            assert xb.shape[0] <= 3
            n_phys += 1
            opt.zero_grad()
            crit(pm(xb), yb).backward()
            opt.step()
    assert n_phys == 4
    assert engine.accountant.steps == 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_make_private_with_epsilon(accountant):
    model = _model()
    loader = DataLoader(_data(), batch_size=8)
    engine = fastdp.PrivacyEngine(accountant=accountant)
    _, opt, _ = engine.make_private_with_epsilon(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        target_epsilon=5.0,
        target_delta=1e-5,
        epochs=3,
        max_grad_norm=1.0,
    )
    eps = fastdp.compute_epsilon(1 / 5, opt.noise_multiplier, 15, 1e-5, accountant)  # 3 epochs of 5 steps
    assert 4.9 <= eps <= 5.0


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_max_epsilon_raises_before_update(accountant):
    torch.manual_seed(0)
    model = _model()
    loader = DataLoader(_data(), batch_size=8)
    engine = fastdp.PrivacyEngine(accountant=accountant)
    max_eps = fastdp.compute_epsilon(0.2, 1.0, 2, 1e-5, accountant) * 1.0001
    pm, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        max_epsilon=max_eps,
        target_delta=1e-5,
    )
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))
    crit = nn.CrossEntropyLoss()
    for _ in range(2):
        opt.zero_grad()
        crit(pm(x), y).backward()
        opt.step()
    before = _snapshot(model)
    opt.zero_grad()
    crit(pm(x), y).backward()
    with pytest.raises(PrivacyBudgetExceeded, match="max_epsilon"):
        opt.step()
    assert engine.accountant.steps == 2
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    # The steps that fit are counted down, not re-searched; a replaced history is searched again:
    # with the accountant reset to no steps, two more steps fit.
    engine.accountant.load_state_dict(fastdp.accountants.create_accountant(accountant).state_dict())
    for _ in range(2):
        opt.zero_grad()
        crit(pm(x), y).backward()
        opt.step()
    opt.zero_grad()
    crit(pm(x), y).backward()
    with pytest.raises(PrivacyBudgetExceeded, match="max_epsilon"):
        opt.step()
    assert engine.accountant.steps == 2


# ------------------------------------------------------------------------------ bad input


def _private(model, **kw):
    loader = DataLoader(_data(), batch_size=8)
    return fastdp.PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
        **kw,
    )


def test_batchnorm_refused_and_fixed():
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(128, 3))
    with pytest.raises(UnsupportedModuleError, match=r"'1'.*BatchNorm2d.*fix_batchnorm"):
        _private(model)
    model = fastdp.fix_batchnorm(model)
    assert isinstance(model[1], nn.GroupNorm)
    pm, opt, _ = _private(model)
    nn.CrossEntropyLoss()(pm(torch.randn(4, 1, 6, 6)), torch.randint(0, 3, (4,))).backward()
    opt.step()


class Custom(nn.Module):
    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1))
        self.inner = nn.Linear(3, 3)

    def forward(self, x):
        return self.inner(x) * self.alpha


def test_unsupported_module_named():
    # A module with own parameters and trainable children trains as one generic unit; without the
    # generic path it is refused by name.
    _private(nn.Sequential(nn.Linear(3, 3), Custom()))
    with pytest.raises(UnsupportedModuleError, match=r"'1' \(Custom\)"):
        _private(nn.Sequential(nn.Linear(3, 3), Custom()), allow_generic=False)


def test_generic_refused_when_disabled():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.s

    with pytest.raises(UnsupportedModuleError, match=r"'0' \(Scale\)"):
        _private(nn.Sequential(Scale(), nn.Linear(3, 2)), allow_generic=False)


def test_nan_loss_clear_error_no_state_change():
    torch.manual_seed(0)
    model = _model()
    pm, opt, _ = _private(model)
    engine_acc = opt.accountant
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,))
    x[1] = float("nan")
    before = _snapshot(model)
    opt.zero_grad()
    nn.CrossEntropyLoss()(pm(x), y).backward()
    with pytest.raises(PrivacyStepError, match="non-finite per-sample gradient norm for samples \\[1\\]"):
        opt.step()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert engine_acc.steps == 0 and all(p.grad is None for p in model.parameters())
    x[1] = 0.0
    opt.zero_grad()
    nn.CrossEntropyLoss()(pm(x), y).backward()
    opt.step()  # recovers
    assert engine_acc.steps == 1


def test_model_called_twice_before_backward():
    pm, opt, _ = _private(_model())
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,))
    pm(x)
    pm(x)  # calls before one backward are one batch (row i of each call is privacy unit i)
    with pytest.raises(ValueError, match="every call needs the same batch size"):
        pm(x[:2])
    opt.zero_grad()  # discards the pending forwards
    nn.CrossEntropyLoss()(pm(x), y).backward()
    opt.step()
    with torch.no_grad():  # evaluation does not record
        pm(x)
        pm(x)


def test_wrong_loss_shapes():
    pm, opt, _ = _private(_model())
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,))
    per_sample = nn.CrossEntropyLoss(reduction="none")(pm(x), y)
    with pytest.raises(RuntimeError, match="scalar"):
        per_sample.backward()  # a [B] loss: torch refuses; nothing recorded
    opt.zero_grad()
    nn.CrossEntropyLoss()(pm(x), y).backward()
    opt.step()

    class BatchFlattener(nn.Module):  # mixes the batch into one "sample"
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2 * 36, 3)

        def forward(self, x):
            return self.lin(x.reshape(x.shape[0] // 2, -1))

    pm, opt, _ = _private(nn.Sequential(nn.Conv2d(1, 1, 1), BatchFlattener()))
    with pytest.raises(ValueError, match=r"batch size 2.*'0' got 4"):
        pm(torch.randn(4, 1, 6, 6))


def test_gradient_bypassing_hooks_is_refused():
    model = _model()
    pm, opt, _ = _private(model)
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,))
    loss = nn.CrossEntropyLoss()(pm(x), y) + model[4].weight.sum()  # parameter used outside its module
    loss.backward()
    with pytest.raises(PrivacyStepError, match="'4.weight'"):
        opt.step()


def test_lr_scheduler_works():
    pm, opt, _ = _private(_model())
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = torch.randn(4, 1, 6, 6), torch.randint(0, 3, (4,))
    opt.zero_grad()
    nn.CrossEntropyLoss()(pm(x), y).backward()
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
