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
    tuner = ConvTuner("auto", table=TuningTable(), refine_calls=0)  # refinement: its own test
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


def _fake_timer(tuner, seconds: dict[str, list[float]], timed: list[str]):
    """Replaces tuner.time_method: method m's k-th timing is seconds[m][k] (per call, batch of 1)."""

    def time_method(name, g, x, w, s, methods=None):
        timed.append(name)
        out = methods[name](g, x, w, s)
        return out, seconds[name][timed.count(name) - 1]

    tuner.time_method = time_method


def test_close_methods_are_timed_again_before_the_choice():
    # loop's one warm time was slowed (1.25 against grouped's 1.0; the first calls pay for kernels):
    # the methods within REFINE_RATIO of the fastest are timed on refine_calls more calls, in
    # alternating order, and loop's true time (0.9) wins; unfold (3.0) is not timed again.
    tuner, timed = ConvTuner("auto", table=TuningTable(), tune_calls=2, refine_calls=2), []
    conv = torch.nn.Conv2d(3, 4, 1)
    spec = ConvSpec(stride=[1, 1], padding=[0, 0], dilation=[1, 1], transposed=False, output_padding=[0, 0], groups=1)
    assert ConvTuner.candidates(torch.randn(2, 3, 4, 4), conv.weight, spec) == ["loop", "grouped", "unfold"]
    times = {"loop": [5.0, 1.25, 0.9, 0.95], "grouped": [5.0, 1.0, 1.1, 1.05], "unfold": [5.0, 3.0]}
    _fake_timer(tuner, times, timed)
    x, g = torch.randn(1, 3, 4, 4), torch.randn(1, 4, 4, 4)
    x2, g2 = torch.cat([x, x]), torch.cat([g, g])
    for _ in range(4):
        got = tuner.per_sample_weight(g2, x2, conv.weight, spec, 0, 2)
        torch.testing.assert_close(got[0], torch.nn.grad.conv2d_weight(x, conv.weight.shape, g))
    assert timed == ["loop", "grouped", "unfold"] * 2 + ["grouped", "loop", "loop", "grouped"]
    assert list(tuner.choices.values()) == ["loop"] and not tuner.table.finalists
    # Nothing within the ratio: kept after tune_calls, nothing timed again.
    tuner, timed = ConvTuner("auto", table=TuningTable(), tune_calls=2, refine_calls=2), []
    _fake_timer(tuner, {"loop": [5.0, 1.0], "grouped": [5.0, 2.0], "unfold": [5.0, 3.0]}, timed)
    for _ in range(3):
        tuner.per_sample_weight(g2, x2, conv.weight, spec, 0, 2)
    assert len(timed) == 6 and list(tuner.choices.values()) == ["loop"]


def _conv_model():
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2))


def test_each_private_model_has_its_method_and_auto_models_share_what_was_tuned(monkeypatch):
    SHARED_TABLE.clear()
    a, b = PrivateModule(_conv_model(), conv_method="auto"), PrivateModule(_conv_model(), conv_method="loop")
    assert a.conv_tuner is not b.conv_tuner
    assert (a.conv_tuner.method, b.conv_tuner.method) == ("auto", "loop")
    # tune_calls (+ refine_calls where methods are close) calls of one shape: "auto" has tuned it,
    # "loop" tunes nothing
    for model in (a, b) * (a.conv_tuner.tune_calls + a.conv_tuner.refine_calls):
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


@pytest.mark.parametrize(
    "shape",
    [  # (C_in, C_out, k, stride, padding, dilation, H, W)
        (3, 5, 3, 1, 1, 1, 6, 6),
        (4, 2, (3, 2), (2, 1), (1, 0), 1, 7, 5),
        (2, 3, 3, 1, 2, 2, 5, 6),
        (6, 4, 1, 1, 0, 1, 4, 4),
    ],
)
def test_ghost_norms_equal_the_norms_of_formed_gradients(shape):
    """The ghost norm <U^T U, G^T G> is the squared norm of the per-sample weight gradient G U^T
    (float64), and the tuner's sq-norm entry point agrees with it under every mode."""
    from fastdp.engine.rules import conv_tuner
    from fastdp.engine.rules.conv_tuner import _ghost_sq_norms, _ps_loop

    c_in, c_out, k, stride, padding, dilation, h, w_ = shape
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation).double()
    x = torch.randn(4, c_in, h, w_, dtype=torch.float64)
    g = torch.randn_like(conv(x))
    s = ConvSpec(list(conv.stride), list(conv.padding), list(conv.dilation), False, [0, 0], 1)
    formed = _ps_loop(g, x, conv.weight, s).flatten(1).pow(2).sum(1)
    torch.testing.assert_close(_ghost_sq_norms(g, x, conv.weight, s), formed, rtol=1e-12, atol=1e-12)
    assert _ghost_sq_norms(g, x, conv.weight, s).dtype == torch.float64
    for mode in ("always", "never", "auto"):
        old = conv_tuner.GHOST_NORMS
        conv_tuner.GHOST_NORMS = mode
        try:
            tuner = ConvTuner("auto", table=TuningTable())
            for _ in range(3):  # tuning calls, then the kept choice
                got = tuner.per_sample_sq_norms(g, x, conv.weight, s, 1, 4)
                torch.testing.assert_close(got, formed[1:], rtol=1e-12, atol=1e-12)
        finally:
            conv_tuner.GHOST_NORMS = old


@pytest.mark.parametrize(
    "c_in, size, kernel, stride, padding, dilation",
    [
        (16, (8, 8), (3, 3), (1, 1), (1, 1), (1, 1)),  # the deep unet_small layer shape
        (3, (7, 9), (3, 2), (2, 1), (1, 0), (1, 1)),
        (2, (9, 8), (3, 3), (1, 2), (2, 1), (2, 3)),
        (4, (6, 6), (1, 1), (2, 2), (0, 0), (1, 1)),
        (5, (5, 7), (5, 3), (1, 1), (2, 1), (1, 1)),
    ],
)
def test_gram_of_padded_positions_equals_the_im2col_gram(c_in, size, kernel, stride, padding, dilation):
    """U^T U from the Gram of the padded input's positions, summed over kernel offsets, is the Gram
    of the im2col columns (float64, every stride / dilation / padding), and the cheaper form is the default."""
    from fastdp.engine.rules.conv_tuner import _gram_u, _gram_work, im2col

    torch.manual_seed(0)
    x = torch.randn(3, c_in, *size, dtype=torch.float64)
    w = torch.randn(4, c_in, *kernel, dtype=torch.float64)
    s = ConvSpec(list(stride), list(padding), list(dilation), False, [0, 0], 1)
    out = torch.nn.functional.conv2d(x, w, stride=stride, padding=padding, dilation=dilation)
    oh, ow = out.shape[2:]
    cols = im2col(x, kernel, dilation, padding, stride)
    want = torch.bmm(cols.transpose(1, 2), cols)
    for forced in (True, False, None):
        torch.testing.assert_close(_gram_u(x, w, s, oh, ow, by_positions=forced), want, rtol=1e-12, atol=1e-12)
    by_cols, by_positions = _gram_work(x, w, s, oh * ow)
    assert (by_positions < by_cols) == (stride == (1, 1) and kernel != (1, 1))


def test_ghost_norms_are_a_tuning_candidate_only_where_they_apply():
    """Deep low-resolution layers time the ghost norm; transposed or grouped ones never use it,
    and a fixed method takes it where its arithmetic is clearly smaller."""
    from fastdp.engine.rules.conv_tuner import ghost_applies, ghost_flop_ratio

    s = ConvSpec([1, 1], [1, 1], [1, 1], False, [0, 0], 1)
    x, w = torch.randn(3, 64, 4, 4), torch.randn(128, 64, 3, 3)
    g = torch.randn(3, 128, 4, 4)
    assert ghost_applies(x, w, s) and ghost_flop_ratio(g, w) < 0.5
    tuner = ConvTuner("auto", table=TuningTable())
    tuner.per_sample_sq_norms(g, x, w, s, 0, 3)
    (trials,) = tuner.table.trials.values()
    assert "ghost" in trials
    assert not ghost_applies(x, w, ConvSpec([1, 1], [1, 1], [1, 1], True, [0, 0], 1))
    assert not ghost_applies(x, torch.randn(128, 32, 3, 3), ConvSpec([1, 1], [1, 1], [1, 1], False, [0, 0], 2))
    hi_res = torch.randn(3, 128, 32, 32)
    assert ghost_flop_ratio(hi_res, w) > 1.0  # T = 1024 output positions: forming is cheaper
    with pytest.raises(ValueError, match="GHOST_NORMS"):
        from fastdp.engine.rules import conv_tuner

        old, conv_tuner.GHOST_NORMS = conv_tuner.GHOST_NORMS, "sometimes"
        try:
            tuner.per_sample_sq_norms(g, x, w, s, 0, 3)
        finally:
            conv_tuner.GHOST_NORMS = old


@pytest.mark.parametrize(
    "channels, size, kernel, dilation, padding, stride",
    [
        (128, 8, (3, 3), (1, 1), (1, 1), (1, 1)),
        (3, 17, (3, 2), (2, 1), (2, 0), (2, 3)),
        (5, 9, (1, 1), (1, 1), (0, 0), (2, 2)),
        (4, 10, (5, 5), (1, 1), (2, 2), (1, 1)),
    ],
)
def test_im2col_is_bitwise_f_unfold(channels, size, kernel, dilation, padding, stride):
    from fastdp.engine.rules.conv_tuner import im2col

    base = torch.randn(4, channels, size, size + 1, dtype=torch.float64)
    # contiguous, a batch slice (non-zero storage offset, as the tuner's chunks pass) and channels-last
    for x in (base, base[1:], base.contiguous(memory_format=torch.channels_last)):
        want = torch.nn.functional.unfold(x, kernel, dilation, padding, stride)
        got = im2col(x, kernel, dilation, padding, stride)
        assert got.shape == want.shape
        assert torch.equal(got, want)
