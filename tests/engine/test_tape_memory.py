"""A DP step must free its batch: nothing recorded for it may outlive optimizer.step()."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

import fastdp


def _model() -> nn.Module:
    # 64 channels at 2x2: the second conv takes the Deferred path (norms now, clipped sum later),
    # whose closures hold the PReLU output and with it the autograd graph of the forward.
    return nn.Sequential(nn.Conv2d(1, 64, 3, padding=1), nn.PReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.Flatten())


def test_step_frees_the_recorded_batch_and_its_graph():
    torch.manual_seed(0)
    model = _model()
    data = torch.utils.data.TensorDataset(torch.randn(64, 1, 2, 2))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    engine = fastdp.PrivacyEngine(secure_mode=False)
    model, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    from fastdp.engine.tape import Deferred

    batches, activations = [], []
    for (x,) in loader:
        if len(x) == 0:
            continue
        opt.zero_grad()
        out = model(x)
        activations.append(weakref.ref(out))
        out.pow(2).sum(1).mean().backward()
        batch = model.tape.batches[0]
        assert any(isinstance(c, Deferred) for c in batch.contributions)  # the case that leaked
        batches.append(weakref.ref(batch))
        opt.step()
        # The clipped sums are computed without autograd: no gradient may carry the forward's graph.
        assert all(
            p.grad is not None and p.grad.grad_fn is None and not p.grad.requires_grad for p in model.parameters()
        )
        del out, batch
    gc.collect()
    assert batches and all(ref() is None for ref in batches)
    assert all(ref() is None for ref in activations)
