"""A user's own layer gets a fast rule with fastdp.register_rule (the example in the docstring of
fastdp/engine/rules/__init__.py): it is used instead of the generic path, its per-sample gradients
are those of a microbatch-of-one loop, and supported_names lists it while it is registered."""

from __future__ import annotations

import pytest
import torch
from _helpers import check_against_reference, mse_batch, mse_per_sample
from _reference import per_sample_grads
from torch import nn

import fastdp
from fastdp.engine import PrivateModule, UnsupportedModuleError, unregister_rule
from fastdp.engine.rules import Call, Stored, rule_for, supported_names

pytestmark = pytest.mark.usefixtures("float64")

B = 5


class ChannelScale(nn.Module):
    """out[b, c, ...] = x[b, c, ...] * weight[c]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(channels))

    def forward(self, x):
        return x * self.weight.view(1, -1, *[1] * (x.dim() - 2))


class _ChannelScaleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, call: Call):
        ctx.call = call
        ctx.save_for_backward(x, weight)
        return x * weight.view(1, -1, *[1] * (x.dim() - 2))

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        call = ctx.call
        if w.requires_grad:
            raw = (g * x).flatten(2).sum(2)  # [B, C], of autograd's (1/B-scaled) output gradient
            scale = call.tape.loss_scale(x.shape[0])
            if style["scale_in_stored"]:  # the loss scale left to the DP step
                call.tape.record(call.batch, Stored([w], [raw], scale))
            else:
                call.tape.record(call.batch, Stored([w], [raw * scale]))
        return g * w.view(1, -1, *[1] * (x.dim() - 2)), None, None


calls = []
style = {"scale_in_stored": False}


def channel_scale_forward(module: ChannelScale, call: Call, x: torch.Tensor) -> torch.Tensor:
    calls.append(call.name)
    return _ChannelScaleFn.apply(x, module.weight, call)


@pytest.fixture
def registered():
    """ChannelScale's rule registered for one test, removed after it (other tests see no trace)."""
    fastdp.register_rule(ChannelScale, params=("weight",))(channel_scale_forward)
    calls.clear()
    yield
    unregister_rule(ChannelScale)


def _model():
    return nn.Sequential(nn.Conv2d(2, 3, 3), ChannelScale(3), nn.Flatten(), nn.Linear(48, 2))


def test_registered_rule_is_used_and_listed(registered):
    assert "ChannelScale" in supported_names()
    assert rule_for(ChannelScale(3)).forward is channel_scale_forward
    assert rule_for(type("Sub", (ChannelScale,), {})(3)).forward is channel_scale_forward  # keeps forward
    model = _model()
    pm = PrivateModule(model)
    pm(torch.randn(B, 2, 6, 6)).sum().backward()
    assert calls == ["1"]  # the rule ran, not the generic torch.func path
    (contribution,) = [c for c in pm.tape.batches[0].contributions if c.params[0] is model[1].weight]
    assert isinstance(contribution, Stored) and contribution.grads[0].shape == (B, 3)


@pytest.mark.parametrize("scale_in_stored", [False, True])
def test_registered_rule_per_sample_grads_match_reference(registered, scale_in_stored, monkeypatch):
    # Either way of applying the loss scale gives the same clipped sum; with the custom rule's
    # scale 1.0 and the conv rule's scale B in one batch, the step also handles mixed scales.
    monkeypatch.setitem(style, "scale_in_stored", scale_in_stored)
    model = _model()
    x = torch.randn(B, 2, 6, 6)
    y = torch.randn(B, 2)
    ref, _ = per_sample_grads(model, mse_per_sample, x, y)
    pm = PrivateModule(model)
    mse_batch(pm(x), y).backward()
    (got,) = [c.scaled()[0] for c in pm.tape.batches[0].contributions if c.params[0] is model[1].weight]
    torch.testing.assert_close(got, ref["1.weight"], rtol=1e-10, atol=1e-12)
    scales = {c.scale for c in pm.tape.batches[0].contributions if isinstance(c, Stored)}
    assert scales == ({float(B)} if scale_in_stored else {1.0, float(B)})
    pm.remove_hooks()
    assert calls == ["1"]
    check_against_reference(model, x, y, mse_per_sample, mse_batch)  # clipped, summed, as p.grad


def test_rule_params_contract(registered):
    class ChannelScaleShift(ChannelScale):  # keeps ChannelScale.forward, adds a parameter it ignores
        def __init__(self, channels):
            super().__init__(channels)
            self.shift = nn.Parameter(torch.zeros(channels))

    model = nn.Sequential(nn.Conv2d(2, 3, 3), ChannelScaleShift(3))
    with pytest.raises(
        UnsupportedModuleError,
        match=r"'1' \(ChannelScaleShift\): its trainable parameter\(s\) shift .*ChannelScale rule",
    ):
        PrivateModule(model)


def test_unregistered_layer_goes_generic():
    assert "ChannelScale" not in supported_names() and rule_for(ChannelScale(3)) is None
    calls.clear()
    model = _model()
    x, y = torch.randn(B, 2, 6, 6), torch.randn(B, 2)
    check_against_reference(model, x, y, mse_per_sample, mse_batch)  # the generic path, still exact
    assert calls == []
    with pytest.raises(KeyError, match="ChannelScale"):
        unregister_rule(ChannelScale)


def test_register_rule_refuses_non_modules():
    with pytest.raises(TypeError, match="at least one module class"):
        fastdp.register_rule()
    with pytest.raises(TypeError, match="nn.Module subclasses"):
        fastdp.register_rule(int)
