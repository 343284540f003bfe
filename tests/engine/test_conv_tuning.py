"""The per-sample conv method is tuned once per layer shape and reference batch size, not per batch
size, by the ConvTuner of each private model; its method is set per private model, and what "auto"
learns is shared by every private model of the process (one TuningTable) unless a table is given."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastdp.engine import PrivateModule
from fastdp.engine.rules import ConvTuner
from fastdp.engine.rules.conv_tuner import SHARED_TABLE, ConvSpec, TuningTable


def test_batch_sizes_in_one_bucket_share_the_tuned_method(monkeypatch):
    tuner = ConvTuner("auto", table=TuningTable())
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    spec = ConvSpec(stride=[1, 1], padding=[1, 1], dilation=[1, 1], transposed=False, output_padding=[0, 0], groups=1)
    timed = []
    real = tuner.time_method
    monkeypatch.setattr(tuner, "time_method", lambda *a: timed.append(a[0]) or real(*a))
    # Poisson batch sizes around E[B] = 16 (10..31, across the old power-of-two edge at 16): all
    # within a factor 2 of the first size, 16, so tuning runs on the first TUNE_CALLS calls only,
    # then every size reuses the choice; each result is still the exact gradient.
    for batch in [16, *range(10, 32)]:
        x = torch.randn(batch, 3, 8, 8)
        g = torch.randn(batch, 4, 8, 8)
        got = tuner.per_sample_weight(g, x, conv.weight, spec, 0, batch)
        want = torch.stack(
            [
                torch.nn.grad.conv2d_weight(x[i : i + 1], conv.weight.shape, g[i : i + 1], padding=1)
                for i in range(batch)
            ]
        )
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(tuner.choices) == 1
    n_candidates = len(ConvTuner.candidates(x, conv.weight, spec))
    assert len(timed) == tuner.tune_calls * n_candidates
    # A size more than a factor 2 from every reference is a new reference (and tuned); the nearest wins.
    fresh, shape = ConvTuner("auto", table=TuningTable()), ((3, 8, 8),)
    assert fresh._key(16, *shape) == (16, *shape) and fresh._key(32, *shape) == (16, *shape)
    assert fresh._key(33, *shape) == (33, *shape) and len(fresh.table.refs[shape]) == 2
    assert fresh._key(20, *shape) == (16, *shape) and fresh._key(30, *shape) == (33, *shape)
    assert fresh._key(7, *shape) == (7, *shape)


def _conv_model():
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2))


def test_each_private_model_has_its_method_and_auto_models_share_what_was_tuned(monkeypatch):
    SHARED_TABLE.clear()
    a, b = PrivateModule(_conv_model(), conv_method="auto"), PrivateModule(_conv_model(), conv_method="loop")
    assert a.conv_tuner is not b.conv_tuner
    assert (a.conv_tuner.method, b.conv_tuner.method) == ("auto", "loop")
    for model in (a, b, a, b):  # two calls of one shape: "auto" has tuned it, "loop" tunes nothing
        model(torch.randn(4, 2, 4, 4)).sum().backward()
        model.tape.clear()
    assert len(a.conv_tuner.choices) == 1 and a.conv_tuner.table is SHARED_TABLE
    # A second "auto" model (another site of a federation) reuses the tuned choice: nothing is timed.
    c = PrivateModule(_conv_model(), conv_method="auto")
    timed = []
    monkeypatch.setattr(c.conv_tuner, "time_method", lambda *args: timed.append(args[0]))
    c(torch.randn(5, 2, 4, 4)).sum().backward()
    assert timed == [] and c.conv_tuner.choices is a.conv_tuner.choices
    # An own table learns alone.
    own = ConvTuner("auto", table=TuningTable())
    assert not own.choices and own.table is not SHARED_TABLE
    SHARED_TABLE.clear()
    assert not a.conv_tuner.choices


def test_default_method_read_from_the_environment_at_creation(monkeypatch):
    monkeypatch.setenv("FASTDP_CONV_METHOD", "grouped")
    assert PrivateModule(_conv_model()).conv_tuner.method == "grouped"
    assert PrivateModule(_conv_model(), conv_method="unfold").conv_tuner.method == "unfold"  # explicit wins
    monkeypatch.delenv("FASTDP_CONV_METHOD")
    assert PrivateModule(_conv_model()).conv_tuner.method == "auto"
    monkeypatch.setenv("FASTDP_CONV_METHOD", "fastest")
    with pytest.raises(ValueError, match="FASTDP_CONV_METHOD='fastest'"):
        PrivateModule(_conv_model())
    with pytest.raises(ValueError, match="conv_method='im2col'"):
        PrivateModule(_conv_model(), conv_method="im2col")


def test_make_private_sets_the_conv_method():
    import fastdp

    model = _conv_model()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 1)), batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = fastdp.PrivacyEngine()
    private, _, _ = engine.make_private(
        module=model,
        optimizer=opt,
        data_loader=loader,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        conv_method="grouped",
    )
    assert private.conv_tuner.method == "grouped"
    with pytest.raises(ValueError, match="already wrapped with conv_method='grouped'"):
        engine.make_private(
            module=private,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            conv_method="loop",
        )
