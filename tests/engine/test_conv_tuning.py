"""The per-sample conv method is tuned once per layer shape and batch-size bucket, not per batch size."""

from __future__ import annotations

import torch

from fastdp.engine import layers


def test_batch_sizes_in_one_bucket_share_the_tuned_method(monkeypatch):
    monkeypatch.setattr(layers, "CONV_METHOD", None)
    monkeypatch.setattr(layers, "_conv_choice", {})
    monkeypatch.setattr(layers, "_conv_trials", {})
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    spec = layers.ConvSpec(
        stride=[1, 1], padding=[1, 1], dilation=[1, 1], transposed=False, output_padding=[0, 0], groups=1
    )
    timed = []
    real = layers._timed
    monkeypatch.setattr(layers, "_timed", lambda *a: timed.append(a[0]) or real(*a))
    # Poisson batch sizes 20..31 all fall in the 32 bucket: tuning runs on the first TUNE_CALLS
    # calls only, then every size reuses the choice; each result is still the exact gradient.
    for batch in range(20, 32):
        x = torch.randn(batch, 3, 8, 8)
        g = torch.randn(batch, 4, 8, 8)
        got = layers._per_sample_conv_weight(g, x, conv.weight, spec, 0, batch)
        want = torch.stack(
            [
                torch.nn.grad.conv2d_weight(x[i : i + 1], conv.weight.shape, g[i : i + 1], padding=1)
                for i in range(batch)
            ]
        )
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert len(layers._conv_choice) == 1
    n_candidates = len(layers._ps_candidates(x, conv.weight, spec))
    assert len(timed) == layers.TUNE_CALLS * n_candidates
    assert layers._batch_bucket(20) == layers._batch_bucket(31) == 32
    assert layers._batch_bucket(33) == 64 and layers._batch_bucket(1) == 1
