"""Compiled ops against the pure-PyTorch reference (fastdp.reference), opcheck, edge cases, errors."""

from __future__ import annotations

import pytest
import torch

import fastdp
from fastdp import reference as ref

OPS = torch.ops.fastdp if fastdp.compiled_available() else None


def test_compiled_core_is_built():
    # Fails loudly (never skips) when fastdp._C was not built: the kernels are the product.
    assert fastdp.compiled_available(), f"fastdp._C did not load: {fastdp.compiled_error()}"
    assert fastdp.has_kernel("cpu")


def _grads(shapes, batch, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((batch, *s), generator=gen, dtype=torch.float32).to(dtype=dtype, device=device) for s in shapes]


def _tol(dtype):
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    }[dtype]


MODEL_LIKE = [(16, 1, 3, 3), (16,), (32, 16, 3, 3), (32,), (2, 32, 1, 1), (2,), (10, 7), (5,)]


# ---------------------------------------------------------------- per_sample_sq_norms


@pytest.mark.parametrize("batch", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_sq_norms_match_reference(device, batch, dtype):
    grads = _grads(MODEL_LIKE, batch, dtype, device)
    got = OPS.per_sample_sq_norms(grads)
    want = ref.per_sample_sq_norms(grads)
    assert got.shape == (batch,)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Accumulation is fp32 even for half inputs: compare against the fp32 sum of the same half values.
    torch.testing.assert_close(got, want, rtol=1e-5 if dtype != torch.float64 else 1e-12, atol=0)


def test_sq_norms_edge_shapes(device):
    # One large tensor, 200 small tensors, a 1-D per-sample tensor ([B]), B=0 and non-contiguous.
    big = _grads([(1 << 20,)], 2, device=device)
    torch.testing.assert_close(OPS.per_sample_sq_norms(big), ref.per_sample_sq_norms(big), rtol=1e-5, atol=0)
    many = _grads([(i % 7 + 1, 3) for i in range(200)], 4, device=device)
    torch.testing.assert_close(OPS.per_sample_sq_norms(many), ref.per_sample_sq_norms(many), rtol=1e-5, atol=0)
    scalar_per_sample = [torch.randn(5, device=device)]
    torch.testing.assert_close(OPS.per_sample_sq_norms(scalar_per_sample), scalar_per_sample[0] ** 2)
    empty = _grads([(3, 4), (7,)], 0, device=device)
    assert OPS.per_sample_sq_norms(empty).shape == (0,)
    base = torch.randn(6, 8, 10, device=device)
    non_contig = [base.transpose(1, 2), base[:, ::2, 1:]]
    assert not non_contig[0].is_contiguous()
    torch.testing.assert_close(
        OPS.per_sample_sq_norms(non_contig), ref.per_sample_sq_norms(non_contig), rtol=1e-5, atol=0
    )


# ---------------------------------------------------------------- clip_accumulate_noise


def _run_both(grads, max_norm, noise_std, scale, seed, offset, out_dtype=None):
    sq = ref.per_sample_sq_norms(grads)
    out_dtype = out_dtype or grads[0].dtype
    out_c = [torch.empty(g.shape[1:], dtype=out_dtype, device=g.device) for g in grads]
    out_r = [torch.empty_like(o) for o in out_c]
    c_c = OPS.clip_accumulate_noise(grads, sq, out_c, max_norm, noise_std, scale, seed, offset)
    c_r = ref.clip_accumulate_noise(grads, sq, out_r, max_norm, noise_std, scale, seed, offset)
    return c_c, c_r, out_c, out_r


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("noise_std", [0.0, 0.8])
def test_clip_accumulate_noise_matches_reference(device, dtype, noise_std):
    grads = _grads(MODEL_LIKE, 7, dtype, device)
    # Clip norms around the per-sample norms so some samples are clipped and some are not.
    norms = ref.per_sample_sq_norms(grads).sqrt()
    max_norm = float(norms.median())
    c_c, c_r, out_c, out_r = _run_both(grads, max_norm, noise_std, 1 / 7, seed=1234, offset=9)
    torch.testing.assert_close(c_c, c_r.to(c_c.dtype), rtol=1e-6, atol=1e-7)
    assert (c_c < 1).any() and (c_c == 1).any()
    # The noise itself is float32 (Box-Muller polynomials vs torch's log/sin/cos): 1e-6 abs.
    tol = _tol(dtype) if noise_std == 0 or dtype != torch.float64 else dict(rtol=1e-6, atol=1e-6)
    for a, b in zip(out_c, out_r, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_clip_accumulate_noise_half_inputs_accumulate_in_fp32(device):
    # fp16 per-sample gradients into fp32 outputs: the sum must be the fp32 sum of the fp16 values.
    grads = _grads([(4096,)], 64, torch.float16, device)
    c_c, c_r, out_c, out_r = _run_both(grads, 1e9, 0.0, 1.0, 0, 0, out_dtype=torch.float32)
    exact = grads[0].double().sum(0)
    torch.testing.assert_close(out_c[0].double(), exact, rtol=1e-5, atol=1e-5)


def test_clip_accumulate_noise_edge_cases(device):
    # B = 0: an empty Poisson batch gives noise only.
    empty = _grads([(3, 4), (5,)], 0, device=device)
    c_c, _, out_c, out_r = _run_both(empty, 1.0, 2.0, 0.5, 7, 3)
    assert c_c.shape == (0,)
    for a, b in zip(out_c, out_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert a.abs().sum() > 0
    # B = 1, one large tensor, 200 small tensors, a numel not a multiple of the noise block.
    for shapes, batch in [
        (MODEL_LIKE, 1),
        ([(1 << 20,)], 2),
        ([(i % 5 + 1, 3) for i in range(200)], 3),
        ([(13,)], 5),
    ]:
        grads = _grads(shapes, batch, device=device)
        _, _, out_c, out_r = _run_both(grads, 1.0, 1.0, 0.25, 99, 1)
        for a, b in zip(out_c, out_r, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_clip_accumulate_noise_non_contiguous_inputs(device):
    base = torch.randn(6, 10, 8, device=device)
    grads = [base.transpose(1, 2), base[:, 1::2, :3]]
    _, _, out_c, out_r = _run_both(grads, 0.5, 0.3, 1.0, 5, 2)
    for a, b in zip(out_c, out_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_clip_accumulate_noise_clips_to_max_norm(device):
    # With one sample and no noise the output is the sample scaled to norm <= C.
    grads = [torch.full((1, 100), 3.0, device=device)]
    out = [torch.empty(100, device=device)]
    sq = OPS.per_sample_sq_norms(grads)
    OPS.clip_accumulate_noise(grads, sq, out, 1.0, 0.0, 1.0, 0, 0)
    assert abs(out[0].norm().item() - 1.0) < 1e-5


# ---------------------------------------------------------------- add_noise_scale_


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_add_noise_scale_matches_reference(device, dtype):
    shapes = [(3, 5), (1000,), (7,), (2, 2, 2)]
    a = [torch.randn(s, device=device).to(dtype) for s in shapes]
    b = [t.clone() for t in a]
    OPS.add_noise_scale_(a, 1.5, 0.1, 42, 17)
    ref.add_noise_scale_(b, 1.5, 0.1, 42, 17)
    tol = _tol(dtype) if dtype != torch.float64 else dict(rtol=1e-6, atol=1e-6)  # float32 noise
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, **tol)


def test_add_noise_scale_non_contiguous_in_place(device):
    base = torch.zeros(8, 6, device=device)
    view = base.t()  # non-contiguous view: must be updated in place through the view
    expected = ref.gaussian_noise(48, 3, 4, device=device).reshape(6, 8)
    OPS.add_noise_scale_([view], 1.0, 2.0, 3, 4)
    torch.testing.assert_close(base.t(), 2.0 * expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- noise statistics


def _noise(n, seed, offset, device="cpu"):
    x = [torch.zeros(n, device=device)]
    OPS.add_noise_scale_(x, 1.0, 1.0, seed, offset)
    return x[0].double().cpu()


def test_noise_is_standard_normal(device):
    from scipy import stats

    z = _noise(1_000_000, 2024, 0, device)
    # mean: std error 1e-3; std: std error ~7e-4. Bounds at ~5 standard errors.
    assert abs(z.mean().item()) < 5e-3
    assert abs(z.std().item() - 1.0) < 4e-3
    ks = stats.kstest(z[:200_000].numpy(), "norm")
    assert ks.pvalue > 1e-3, ks
    # Tails: fraction beyond 3 sigma close to 0.27%.
    frac = (z.abs() > 3).double().mean().item()
    assert 0.0022 < frac < 0.0032


def test_noise_is_reproducible_and_offsets_independent(device):
    a = _noise(100_000, 7, 5, device)
    b = _noise(100_000, 7, 5, device)
    assert torch.equal(a, b)
    c = _noise(100_000, 7, 6, device)
    d = _noise(100_000, 8, 5, device)
    for other in (c, d):
        corr = torch.corrcoef(torch.stack([a, other]))[0, 1].item()
        assert abs(corr) < 0.015  # 100k pairs: std error 0.003
    # Adjacent elements inside one Philox block are independent too.
    pairs = torch.corrcoef(torch.stack([a[0::2], a[1::2]]))[0, 1].item()
    assert abs(pairs) < 0.02


def test_noise_matches_reference_stream(device):
    z = _noise(4099, 11, 3, device)
    want = ref.gaussian_noise(4099, 11, 3).double()
    torch.testing.assert_close(z, want, rtol=1e-5, atol=2e-6)


def test_noise_source_advances_and_secure_mode():
    src = fastdp.NoiseSource(seed=5)
    assert src.next() == (5, 0)
    assert src.next() == (5, 1)
    state = src.state_dict()
    other = fastdp.NoiseSource(seed=0)
    other.load_state_dict(state)
    assert other.next() == (5, 2)
    secure = fastdp.NoiseSource(secure_mode=True)
    seeds = {secure.next()[0] for _ in range(4)}
    assert len(seeds) == 4


# ---------------------------------------------------------------- opcheck


def test_opcheck(device):
    grads = _grads([(3, 4), (5,)], 4, device=device)
    torch.library.opcheck(OPS.per_sample_sq_norms.default, (grads,))
    sq = ref.per_sample_sq_norms(grads)
    out = [torch.empty(g.shape[1:], device=device) for g in grads]
    torch.library.opcheck(OPS.clip_accumulate_noise.default, (grads, sq, out, 1.0, 0.5, 0.25, 3, 1))
    torch.library.opcheck(OPS.add_noise_scale_.default, ([torch.randn(3, 4, device=device)], 0.5, 2.0, 3, 1))


# ---------------------------------------------------------------- errors


def test_errors_say_what_is_wrong():
    g = _grads([(3,), (4,)], 2)
    sq = ref.per_sample_sq_norms(g)
    out = [torch.empty(3), torch.empty(4)]
    with pytest.raises(ValueError, match="at least one tensor"):
        fastdp.ops.per_sample_sq_norms([])
    with pytest.raises(RuntimeError, match=r"grads\[1\] has batch size 3 but expected 2"):
        OPS.per_sample_sq_norms([torch.randn(2, 3), torch.randn(3, 3)])
    with pytest.raises(RuntimeError, match=r"grads\[0\] has dtype Long"):
        OPS.per_sample_sq_norms([torch.ones(2, 3, dtype=torch.long)])
    with pytest.raises(RuntimeError, match=r"0-d"):
        OPS.per_sample_sq_norms([torch.tensor(1.0)])
    with pytest.raises(RuntimeError, match=r"out\[1\] has shape \[5\] but grads\[1\] has per-sample shape \[4\]"):
        OPS.clip_accumulate_noise(g, sq, [torch.empty(3), torch.empty(5)], 1.0, 0.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="2 gradient tensors but 1 output"):
        OPS.clip_accumulate_noise(g, sq, out[:1], 1.0, 0.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="sq_norms has 3 entries"):
        OPS.clip_accumulate_noise(g, torch.ones(3), out, 1.0, 0.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="max_norm must be finite and > 0"):
        OPS.clip_accumulate_noise(g, sq, out, 0.0, 0.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="noise_std must be finite and >= 0"):
        OPS.clip_accumulate_noise(g, sq, out, 1.0, -1.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        OPS.clip_accumulate_noise([torch.randn(2, 3, 2)], sq, [torch.empty(2, 3).t()], 1.0, 0.0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match="offset must be >= 0"):
        OPS.add_noise_scale_([torch.randn(3)], 1.0, 1.0, 0, -1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_wrong_device_error():
    g = [torch.randn(2, 3), torch.randn(2, 3, device="cuda")]
    with pytest.raises(RuntimeError, match=r"grads\[1\] is on cuda"):
        OPS.per_sample_sq_norms(g)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_draw_the_same_noise():
    torch.testing.assert_close(_noise(10_000, 3, 2, "cpu"), _noise(10_000, 3, 2, "cuda"), rtol=1e-5, atol=2e-6)


def test_wrappers_use_compiled_ops_and_match():
    # fastdp.ops is the public entry point; with the build present it must not fall back.
    grads = _grads(MODEL_LIKE, 4)
    torch.testing.assert_close(fastdp.ops.per_sample_sq_norms(grads), OPS.per_sample_sq_norms(grads))
