"""The Opacus API pieces users call: ghost mode's 4 return values, grad_sample_mode="no_op"
(user-computed per-sample gradients), per-layer clipping (exact, float64, vs a hand-computed
reference and vs Opacus), checkpoints that resume bit for bit, state_dict keys that round-trip
with Opacus's GradSampleModule, ModuleValidator, and make_private's refusals."""

from __future__ import annotations

import copy

import opacus
import pytest
import torch
from _helpers import fastdp_step, mse_batch
from _helpers import small_model as _model
from _reference import clipped_mean, per_sample_grads
from torch import nn
from torch.func import grad, vmap
from torch.utils.data import DataLoader, TensorDataset

import fastdp
from fastdp.engine import PrivacyStepError, PrivateModule, UnsupportedModuleError
from fastdp.engine.privacy_engine import NOISE_STATE_KEY, GhostCriterion
from fastdp.grad_sample import GradSampleModule
from fastdp.grad_sample.functorch import make_functional
from fastdp.validators import IllegalModuleConfigurationError, ModuleValidator


def _batch(n=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)


def _opacus_model():
    """Layers Opacus has its own per-sample rules for (no PReLU); Linear(bias=False) gives fastdp a
    one-parameter deferred contribution, Conv and the last Linear two-parameter ones."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8, bias=False), nn.Linear(8, 3)
    )


def _make_private(model, n, **kw):
    """make_private on a loader of n samples in one batch (E[B] = n, q = 1), SGD lr 0."""
    loader = DataLoader(TensorDataset(torch.zeros(n, 1), torch.zeros(n)), batch_size=n)
    engine = fastdp.PrivacyEngine(seed=kw.pop("seed", 0))
    kw.setdefault("noise_multiplier", 0.0)
    kw.setdefault("max_grad_norm", 1.0)
    out = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=loader,
        poisson_sampling=False,
        **kw,
    )
    return engine, out


# ------------------------------------------------------------------------------ ghost mode


def test_ghost_mode_returns_four_values_and_the_same_gradient(float64):
    x, y = _batch()
    base = _model()
    expected, _, _ = fastdp_step(copy.deepcopy(base), x, y, nn.CrossEntropyLoss(), 0.5)
    model = copy.deepcopy(base)
    _, out = _make_private(model, 6, max_grad_norm=0.5, grad_sample_mode="ghost", criterion=nn.CrossEntropyLoss())
    assert len(out) == 4
    pm, opt, criterion, loader = out
    loss = criterion(pm(x), y)  # an ordinary scalar tensor: backward, item, arithmetic work
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and isinstance(loss.item(), float)
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-12, atol=1e-15)


def test_ghost_mode_default_criterion_and_reduction_mismatch():
    _, (_, _, criterion, _) = _make_private(_model(), 6, grad_sample_mode="ghost")
    assert isinstance(criterion.criterion, nn.CrossEntropyLoss)  # Opacus's default criterion
    model = _model()
    with pytest.raises(ValueError, match="reduction is 'sum'.*loss_reduction='mean'"):
        _make_private(model, 6, grad_sample_mode="ghost", criterion=nn.CrossEntropyLoss(reduction="sum"))
    assert "forward" not in model[0].__dict__  # refused before the model was patched


def test_ghost_criterion_sequence_shape_form(float64):
    B, T, V = 3, 5, 7
    logits = torch.randn(B, T, V)
    targets = torch.randint(0, V, (B, T))
    targets[0, :2] = -100  # ignored tokens leave each sequence's mean
    loss = GhostCriterion(nn.CrossEntropyLoss(), "mean")(logits.view(-1, V), targets.view(-1), shape=logits.shape)
    per_token = nn.functional.cross_entropy(logits.view(-1, V), targets.view(-1), reduction="none").view(B, T)
    valid = (targets != -100).sum(1)
    torch.testing.assert_close(loss, (per_token.sum(1) / valid).mean())
    total = GhostCriterion(nn.CrossEntropyLoss(reduction="sum"), "sum")(
        logits.view(-1, V), targets.view(-1), shape=logits.shape
    )
    torch.testing.assert_close(total, per_token.sum())


# ------------------------------------------------------------------------------ no_op mode


def _user_grad_samples(pm, x, y, per_sample_loss):
    """Opacus's cifar10.py no_op block: vmap(grad) of one sample's loss, assigned to p.grad_sample."""
    fmodel, _ = make_functional(pm)
    params = list(pm.parameters())

    def loss_of_one(ps, sample, target):
        return per_sample_loss(fmodel(ps, sample.unsqueeze(0)), target.unsqueeze(0))

    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(params, x, y)
    for p, g in zip(params, grads, strict=True):
        p.grad_sample = g.detach()


def test_no_op_clips_and_noises_user_grad_samples_exactly(float64):
    x, y = _batch()
    base = _model()
    crit = nn.CrossEntropyLoss()
    ref, norms = per_sample_grads(copy.deepcopy(base), crit, x, y)
    C = float(norms.median())
    expected = clipped_mean(ref, norms, C, 6)
    model = copy.deepcopy(base)
    engine, (pm, opt, _) = _make_private(model, 6, max_grad_norm=C, grad_sample_mode="no_op")
    assert "forward" not in model[0].__dict__  # wrapped, not patched
    pm(x)  # the script's own forward: records nothing
    _user_grad_samples(pm, x, y, crit)
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-10, atol=1e-14)
    assert engine.accountant.steps == 1
    assert all(p.grad_sample is None for p in model.parameters())  # consumed by the step


def test_no_op_refusals(float64):
    x, y = _batch()
    model = _model()
    engine, (pm, opt, _) = _make_private(model, 6, grad_sample_mode="no_op")
    crit = nn.CrossEntropyLoss()
    with pytest.raises(PrivacyStepError, match=r"\['0.weight', '0.bias'.*no p.grad_sample"):
        opt.step()
    _user_grad_samples(pm, x, y, crit)
    model[4].weight.grad_sample = None
    with pytest.raises(PrivacyStepError, match=r"\['4.weight'\] have no p.grad_sample"):
        opt.step()
    opt.zero_grad()
    _user_grad_samples(pm, x, y, crit)
    model[4].bias.grad_sample = model[4].bias.grad_sample[:4]
    with pytest.raises(PrivacyStepError, match="batch sizes differ"):
        opt.step()
    _user_grad_samples(pm, x, y, crit)
    model[2].weight.grad_sample = model[2].weight.grad_sample.sum(0)
    with pytest.raises(PrivacyStepError, match=r"'2.weight' is \(1,\); it must be \[B, \*p.shape\]"):
        opt.step()
    opt.zero_grad()
    crit(pm(x), y).backward()  # a non-private backward through the unpatched model
    _user_grad_samples(pm, x, y, crit)
    with pytest.raises(PrivacyStepError, match="did not set"):
        opt.step()
    assert engine.accountant.steps == 0
    opt.zero_grad()
    _user_grad_samples(pm, x, y, crit)
    opt.step()
    assert engine.accountant.steps == 1
    with pytest.raises(PrivacyStepError, match="no p.grad_sample"):
        opt.step()  # the grad samples were consumed: a stale one is never reused


def test_no_op_refuses_batchnorm():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(UnsupportedModuleError, match="'1' is BatchNorm2d"):
        _make_private(model, 6, grad_sample_mode="no_op")


# ------------------------------------------------------------------------------ per-layer clipping


def _per_layer_reference(model, x, y, crit, quantile=0.5):
    """Bounds C_k (a per-parameter norm quantile: some samples clipped) and {name: (sum_i c_ik g_ik) / B}
    by hand from microbatch-of-one gradients."""
    ref, _ = per_sample_grads(model, crit, x, y)
    bounds, expected = [], {}
    for n, _ in model.named_parameters():
        g = ref[n]
        norms = g.flatten(1).norm(dim=1)
        C = float(torch.quantile(norms, quantile))
        c = (C / (norms + 1e-6)).clamp(max=1.0)
        bounds.append(C)
        expected[n] = torch.einsum("i,i...->...", c, g) / x.shape[0]
    return bounds, expected


@pytest.mark.parametrize("make", [_model, _opacus_model], ids=["prelu_model", "opacus_model"])
def test_per_layer_clipping_exact(float64, make):
    x, y = _batch()
    base = make()
    crit = nn.CrossEntropyLoss()
    bounds, expected = _per_layer_reference(copy.deepcopy(base), x, y, crit)
    model = copy.deepcopy(base)
    _, (pm, opt, _) = _make_private(model, 6, max_grad_norm=bounds, clipping="per_layer")
    assert opt.max_grad_norms == bounds
    assert opt.max_grad_norm == pytest.approx(sum(c * c for c in bounds) ** 0.5)
    crit(pm(x), y).backward()
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-10, atol=1e-14)


def test_per_layer_clipping_equals_opacus(float64):
    x, y = _batch()
    base = _opacus_model()
    crit = nn.CrossEntropyLoss()
    bounds, _ = _per_layer_reference(copy.deepcopy(base), x, y, crit)
    model = copy.deepcopy(base)
    _, (pm, opt, _) = _make_private(model, 6, max_grad_norm=bounds, clipping="per_layer")
    crit(pm(x), y).backward()
    opt.step()
    om = copy.deepcopy(base)
    loader = DataLoader(TensorDataset(x, y), batch_size=6)
    with pytest.warns(UserWarning):  # Opacus: secure RNG off
        engine = opacus.PrivacyEngine(accountant="rdp")
    om, oopt, _ = engine.make_private(
        module=om,
        optimizer=torch.optim.SGD(om.parameters(), lr=0.0),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=bounds,
        clipping="per_layer",
        poisson_sampling=False,
    )
    crit(om(x), y).backward()
    oopt.step()
    for (n, p), (_, q) in zip(model.named_parameters(), om.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14, msg=n)


def test_per_layer_noise_std(float64):
    x, y = _batch(8)
    base = _model()
    crit = nn.CrossEntropyLoss()
    bounds, expected = _per_layer_reference(copy.deepcopy(base), x, y, crit)
    model = copy.deepcopy(base)
    _, (pm, opt, _) = _make_private(model, 8, max_grad_norm=bounds, clipping="per_layer", noise_multiplier=1.3)
    crit(pm(x), y).backward()
    opt.step()
    std = 1.3 * sum(c * c for c in bounds) ** 0.5 / 8  # sigma * sqrt(sum C_k^2) / E[B]
    z = torch.cat([((p.grad - expected[n]) / std).flatten() for n, p in model.named_parameters()])
    n = z.numel()
    assert n > 200 and (z != 0).all()
    assert abs(float(z.mean())) < 5 / n**0.5
    assert abs(float(z.std()) - 1) < 5 / (2 * n) ** 0.5


def test_clipping_argument_refusals():
    n_params = len(list(_model().parameters()))
    with pytest.raises(ValueError, match="has 2 bounds but the optimizer has"):
        _make_private(_model(), 6, max_grad_norm=[1.0, 1.0], clipping="per_layer")
    with pytest.raises(ValueError, match="every max_grad_norm must be finite and > 0"):
        _make_private(_model(), 6, max_grad_norm=[1.0] * (n_params - 1) + [0.0], clipping="per_layer")
    with pytest.raises(ValueError, match="pass clipping='per_layer'"):
        _make_private(_model(), 6, max_grad_norm=[1.0] * n_params)
    with pytest.raises(ValueError, match="needs max_grad_norm as a list"):
        _make_private(_model(), 6, max_grad_norm=1.0, clipping="per_layer")
    with pytest.raises(ValueError, match="adaptive clipping.*use clipping='flat'"):
        _make_private(_model(), 6, clipping="adaptive", target_unclipped_quantile=0.5)
    with pytest.raises(TypeError, match=r"unexpected arguments \['target_unclipped_quantile'\].*adaptive"):
        _make_private(_model(), 6, target_unclipped_quantile=0.5)


def test_make_private_refusals_say_what_to_do():
    for kw, match in [
        ({"wrap_model": False}, "train with the model make_private returns"),
        ({"rand_on_empty": True}, "pass rand_on_empty=False"),
        ({"grad_sample_mode": "ghost_fsdp"}, "does not support distributed"),
        ({"grad_sample_mode": "vmap"}, "grad_sample_mode must be one of"),
        ({"noise_generator": torch.Generator()}, "pass seed= to PrivacyEngine"),
    ]:
        model = _model()
        with pytest.raises(ValueError, match=match):
            _make_private(model, 6, **kw)
        assert "forward" not in model[0].__dict__
    model = _model()
    extra = nn.Parameter(torch.zeros(3))
    loader = DataLoader(TensorDataset(torch.zeros(6, 1), torch.zeros(6)), batch_size=6)
    with pytest.raises(ValueError, match="not the module's: they would be updated without clipping"):
        fastdp.PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD([*model.parameters(), extra], lr=0.1),
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
def test_opacus_modes_are_the_one_path(mode):
    _, (pm, opt, _) = _make_private(_model(), 6, grad_sample_mode=mode)
    assert type(pm) is PrivateModule
    x, y = _batch(dtype=torch.float32)
    nn.CrossEntropyLoss()(pm(x), y).backward()
    opt.step()


# ------------------------------------------------------------------------------ checkpoints


def _train(pm, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        mse_batch(pm(x), nn.functional.one_hot(y, 3).to(x.dtype)).backward()
        opt.step()


def _private_adam(seed_model, engine_seed):
    torch.manual_seed(seed_model)
    model = _model()
    engine = fastdp.PrivacyEngine(seed=engine_seed)
    loader = DataLoader(TensorDataset(torch.zeros(40, 1), torch.zeros(40)), batch_size=8)
    pm, opt, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        conv_method="grouped",
    )
    return engine, pm, opt


def test_checkpoint_resumes_accountant_noise_and_optimizer_bit_for_bit(tmp_path):
    batches = [_batch(8, seed=s, dtype=torch.float32) for s in range(6)]
    engine, pm, opt = _private_adam(0, engine_seed=3)
    _train(pm, opt, batches[:2])
    path = tmp_path / "ckpt.pt"
    engine.save_checkpoint(path=path, module=pm, optimizer=opt, checkpoint_dict={"epoch": 1})
    _train(pm, opt, batches[2:4])
    want = {n: p.detach().clone() for n, p in pm.named_parameters()}

    engine2, pm2, opt2 = _private_adam(1, engine_seed=99)  # other init, other noise seed
    ckpt = engine2.load_checkpoint(path=path, module=pm2, optimizer=opt2)
    assert ckpt["epoch"] == 1 and "optimizer_state_dict" not in ckpt and NOISE_STATE_KEY not in ckpt
    assert all(k.startswith("_module.") for k in ckpt["module_state_dict"])
    assert engine2.accountant.steps == 2
    _train(pm2, opt2, batches[2:4])
    for n, p in pm2.named_parameters():
        assert torch.equal(p, want[n]), n
    assert engine2.get_epsilon(1e-5) == engine.get_epsilon(1e-5)
    _train(pm2, opt2, batches[4:])
    assert engine2.accountant.steps == 6
    assert engine2.get_epsilon(1e-5) == pytest.approx(fastdp.compute_epsilon(0.2, 1.0, 6, 1e-5, "prv"))

    saved = torch.load(path, weights_only=True)
    assert {"module_state_dict", "privacy_accountant_state_dict", "optimizer_state_dict", NOISE_STATE_KEY} <= set(saved)


def test_checkpoint_never_switches_secure_mode(tmp_path):
    engine, pm, opt = _private_adam(0, engine_seed=3)
    engine.save_checkpoint(path=tmp_path / "c.pt", module=pm)
    secure = fastdp.PrivacyEngine(secure_mode=True)
    model = _model()
    with pytest.warns(UserWarning, match="no optimizer state"):
        secure.load_checkpoint(path=tmp_path / "c.pt", module=model, optimizer=torch.optim.SGD(model.parameters()))
    assert secure.noise_source.secure_mode  # the saved (seed, offset) is not loaded into a secure engine


# ------------------------------------------------------------------------------ state_dict keys


def test_state_dict_keys_round_trip_with_opacus_grad_sample_module():
    torch.manual_seed(0)
    om = opacus.GradSampleModule(_opacus_model())
    pm = PrivateModule(_opacus_model())  # another init
    assert list(pm.state_dict()) == list(om.state_dict())
    assert all(k.startswith("_module.") for k in pm.state_dict())
    assert [n for n, _ in pm.named_parameters()] == list(pm.state_dict())
    pm.load_state_dict(om.state_dict())  # Opacus -> fastdp
    assert all(torch.equal(a, b) for a, b in zip(pm.parameters(), om.parameters(), strict=True))
    other = opacus.GradSampleModule(_opacus_model())
    other.load_state_dict(PrivateModule(copy.deepcopy(pm._module)).state_dict())  # fastdp -> Opacus
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), pm.parameters(), strict=True))
    plain = _opacus_model()
    pm.load_state_dict(plain.state_dict())  # the plain model's keys load too
    assert all(torch.equal(a, b) for a, b in zip(pm.parameters(), plain.parameters(), strict=True))
    with pytest.raises(RuntimeError, match="Missing key"):
        pm.load_state_dict({k: v for k, v in list(om.state_dict().items())[1:]})


def test_grad_sample_module_has_opacus_constructor():
    gsm = GradSampleModule(_model(), batch_first=True, loss_reduction="sum")
    assert isinstance(gsm, PrivateModule) and gsm.tape.loss_reduction == "sum"
    with pytest.raises(ValueError, match="batch_first=True"):
        GradSampleModule(_model(), batch_first=False)


# ------------------------------------------------------------------------------ validators


def test_module_validator_lists_fixes_and_validates():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        torch.nn.utils.parametrizations.weight_norm(nn.Linear(64, 3)),
    )
    errors = ModuleValidator.validate(model)
    assert len(errors) == 2
    assert "'1' is BatchNorm2d" in str(errors[0]) and "'4' (Linear) is parametrized" in str(errors[1])
    assert not ModuleValidator.is_valid(model)
    with pytest.raises(UnsupportedModuleError) as info:
        ModuleValidator.validate(model, strict=True)
    assert [str(e) for e in info.value.errors] == [str(e) for e in errors]
    fixed = ModuleValidator.fix(model)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(fixed[1], nn.GroupNorm)  # a fixed copy
    assert fixed[1].num_groups == 4
    with pytest.raises(UnsupportedModuleError, match="'4' \\(Linear\\) is parametrized"):
        ModuleValidator.fix_and_validate(model)  # weight norm has no fix

    ok = ModuleValidator.fix_and_validate(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten()))
    assert ModuleValidator.is_valid(ok) and fastdp.PrivacyEngine().is_compatible(
        module=ok, optimizer=None, data_loader=None
    )
    assert isinstance(ModuleValidator.fix(nn.BatchNorm2d(6), num_groups=2), nn.GroupNorm)
    assert isinstance(ModuleValidator.fix(nn.BatchNorm3d(6), replace_bn_with_in=True), nn.InstanceNorm3d)
    assert isinstance(fastdp.PrivacyEngine.get_compatible_module(nn.BatchNorm1d(6)), nn.GroupNorm)
    ok.eval()
    (err,) = ModuleValidator.validate(ok)
    assert isinstance(err, IllegalModuleConfigurationError) and "model.train()" in str(err)


def test_per_layer_clipping_through_batch_memory_manager(float64):
    # Physical batches of one logical batch: their per-layer clipped sums add up to the logical one.
    x, y = _batch(7)
    base = _model()
    crit = nn.CrossEntropyLoss()
    bounds, expected = _per_layer_reference(copy.deepcopy(base), x, y, crit)
    model = copy.deepcopy(base)
    engine, (pm, opt, _) = _make_private(model, 7, max_grad_norm=bounds, clipping="per_layer")
    with fastdp.BatchMemoryManager(data_loader=[(x, y)], max_physical_batch_size=3, optimizer=opt) as batches:
        for xb, yb in batches:
            opt.zero_grad()
            # mean over the physical batch: the engine takes per-sample gradients of it (x B)
            crit(pm(xb), yb).backward()
            opt.step()
    assert engine.accountant.steps == 1
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-10, atol=1e-14)
