"""Per-sample weight gradients of a convolution, three ways, and the ConvTuner that picks one.

The fastest method depends on the layer and the machine (measured on a 2-core CPU: a batch-1
loop at high resolution, the batch folded into groups elsewhere), so by default ("auto") each
layer shape is timed on its first calls and the fastest method kept (in a TuningTable that every
"auto" private model of the process shares). The methods agree only to float rounding, so runs
compared for equality across processes fix one method.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdp.engine.rules.base import acc_dtype, acc_sq

aten = torch.ops.aten

METHODS = ("auto", "loop", "grouped", "unfold")
TUNE_CALLS = 2  # timed calls per layer shape before the fastest method is kept
# The first call of a method on a new shape pays for its kernels (oneDNN primitives), so the
# TUNE_CALLS give one warm time per method; on the noisy 2-core CPU one sample picked a method 20-30%
# slower than the best in about one layer of unet_small per run. Methods within REFINE_RATIO of the
# fastest are timed on REFINE_CALLS more calls (only those, in alternating order) before the choice.
REFINE_RATIO = 1.3
REFINE_CALLS = 2
# The batch-1 loop's time is the sum of its samples' (at 8x8 it is 2-3x the other methods' on the
# 2-core CPU): while tuning it is timed on this many samples of a larger batch.
LOOP_TRIAL_SAMPLES = 4
ENV_VAR = "FASTDP_CONV_METHOD"


@dataclass
class ConvSpec:
    """The hyper-parameters of one convolution, as aten.convolution takes them."""

    stride: list[int]
    padding: list[int]
    dilation: list[int]
    transposed: bool
    output_padding: list[int]
    groups: int


def conv_backward(g, x, w, s: ConvSpec, mask: list[bool], bias_sizes: list[int] | None = None):
    """aten.convolution_backward of output gradient g w.r.t. (input x, weight w, bias), only the
    parts `mask` asks for: (grad_x | None, grad_w | None, grad_b | None)."""
    return aten.convolution_backward(
        g, x, w, bias_sizes, s.stride, s.padding, s.dilation, s.transposed, s.output_padding, s.groups, mask
    )


def _weight_grad(g, x, w, s: ConvSpec) -> torch.Tensor:
    return conv_backward(g, x, w, s, [False, True, False])[1]


def _ps_loop(g, x, w, s: ConvSpec) -> torch.Tensor:
    """A loop of batch-1 weight-gradient convolutions (no im2col buffer)."""
    out = torch.empty((x.shape[0], *w.shape), dtype=w.dtype, device=w.device)
    for i in range(x.shape[0]):
        out[i] = _weight_grad(g[i : i + 1], x[i : i + 1], w, s)
    return out


def _ps_grouped(g, x, w, s: ConvSpec) -> torch.Tensor:
    """One grouped weight-gradient convolution with the batch folded into the groups."""
    n = x.shape[0]
    xg = x.reshape(1, n * x.shape[1], *x.shape[2:])
    gg = g.reshape(1, n * g.shape[1], *g.shape[2:])
    # Only the weight's shape matters for a weight-gradient-only backward (its values are never
    # read), so an uninitialised tensor: w.repeat copied n weights, and a zero-stride view was
    # copied by aten into a contiguous one (0.1-0.4 ms per layer at B = 32 on the 2-core CPU).
    wg = w.new_empty((n * w.shape[0], *w.shape[1:]))
    folded = ConvSpec(s.stride, s.padding, s.dilation, s.transposed, s.output_padding, s.groups * n)
    return _weight_grad(gg, xg, wg, folded).view(n, *w.shape)


def im2col(x: torch.Tensor, kernel, dilation, padding, stride) -> torch.Tensor:
    """F.unfold of a 2-d input x [n, C, H, W]: [n, C * kh * kw, T] (T output positions), bitwise
    equal, as one copy of a strided view of the zero-padded input (about 2x faster than
    F.unfold on the 2-core CPU: 2.4 vs 4.5 ms for [32, 128, 8, 8] and a 3x3 kernel)."""
    n, c = x.shape[:2]
    kh, kw = kernel
    if any(padding):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    oh = (x.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (x.shape[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    sn, sc, sh, sw = x.stride()
    patches = x.as_strided(
        (n, c, kh, kw, oh, ow), (sn, sc, sh * dilation[0], sw * dilation[1], sh * stride[0], sw * stride[1])
    )
    return patches.reshape(n, c * kh * kw, oh * ow)


def _ps_unfold(g, x, w, s: ConvSpec) -> torch.Tensor:
    """im2col + batched matmul (2-d, not transposed; cheap when C_in * k * k is small)."""
    n, G = x.shape[0], s.groups
    cols = im2col(x, w.shape[2:], s.dilation, s.padding, s.stride)  # [n, C_in*k*k, T]
    cols = cols.view(n, G, -1, cols.shape[-1])
    gg = g.reshape(n, G, w.shape[0] // G, -1)
    return torch.einsum("bgot,bgit->bgoi", gg, cols).reshape(n, *w.shape)


_PS_METHODS = {"loop": _ps_loop, "grouped": _ps_grouped, "unfold": _ps_unfold}

# Per-sample squared norms of the weight gradient without forming it (the "ghost norm"):
# "auto" (time it against the per-sample methods where its arithmetic is not larger, or, for a
# fixed method, use it where it is clearly cheaper), "always" (wherever it applies), "never".
# Read at call time as `conv_tuner.GHOST_NORMS`, so that tests can force either path.
GHOST_NORMS = "auto"
GHOST_FLOP_RATIO = 0.5  # fixed methods: ghost when its multiply-adds are at most this share of theirs


def ghost_applies(x, w, s: ConvSpec) -> bool:
    """Whether the ghost norm handles this convolution: 2-d, not transposed, one group, floating."""
    return x.dim() == 4 and not s.transposed and s.groups == 1 and x.is_floating_point()


def _padded_size(x, s: ConvSpec) -> int:
    """Positions of x's zero-padded spatial grid (2-d)."""
    return (x.shape[2] + 2 * s.padding[0]) * (x.shape[3] + 2 * s.padding[1])


def _gram_work(x, w, s: ConvSpec, t: int) -> tuple[int, int]:
    """Multiply-adds per sample of U^T U ([T, T]) from the im2col columns (T^2 K) and from the
    Gram of the padded input's positions (P^2 C_in; see _gram_u)."""
    k = w.numel() // w.shape[0]
    return t * t * k, _padded_size(x, s) ** 2 * x.shape[1]


def ghost_flop_ratio(g, w, x=None, s: ConvSpec | None = None) -> float:
    """Multiply-adds of the ghost norm over those of forming the per-sample weight gradients, per
    sample: (U^T U + T^2 C_out) against T K C_out, with T output positions, K = C_in * k * k and
    U^T U the cheaper of its two forms when x and s are given (else T^2 K)."""
    t = g.shape[2:].numel()
    k = w.numel() // w.shape[0]  # not w[0].numel(): indexing a parameter costs ~0.1 ms here
    gram = t * t * k if x is None or s is None else min(_gram_work(x, w, s, t))
    return (gram + t * t * w.shape[0]) / (t * k * w.shape[0])


def _gram_u(x, w, s: ConvSpec, oh: int, ow: int, by_positions: bool | None = None) -> torch.Tensor:
    """[n, T, T] U_i^T U_i for each sample's im2col columns U_i [K, T] (K = C_in * kh * kw), x already
    in the accumulation dtype.

    Entry (t, t') sums x_pad[c, p_t + o] * x_pad[c, p_t' + o] over channels c and kernel offsets o
    (p_t: output position t's corner in the padded input). Summing over c first gives the Gram of
    the padded input's positions, [P, P] with P = (H + 2 pad_h) (W + 2 pad_w), and U^T U is then the
    sum over the kh * kw offsets of its strided sub-grids: P^2 C_in multiply-adds instead of T^2 K and
    no im2col copy. For a stride-1 3x3 convolution at 8x8 that is 0.27 of the work (2.1 vs 4.8 ms
    for [32, 128, 8, 8] on the 2-core CPU); at stride 2 it is more, and the columns are used.
    by_positions: force either form (tests); None takes the one with fewer multiply-adds."""
    n, c = x.shape[:2]
    kh, kw = w.shape[2:]
    t = oh * ow
    if by_positions is None:
        work_cols, work_positions = _gram_work(x, w, s, t)
        by_positions = work_positions < work_cols
    if not by_positions:
        cols = im2col(x, (kh, kw), s.dilation, s.padding, s.stride)  # [n, K, T]
        return torch.bmm(cols.transpose(1, 2), cols)
    if any(s.padding):
        x = F.pad(x, (s.padding[1], s.padding[1], s.padding[0], s.padding[0]))
    hp, wp = x.shape[2:]
    flat = x.reshape(n, c, hp * wp)
    gram = torch.bmm(flat.transpose(1, 2), flat)  # [n, P, P]: position (r, q) at r * wp + q
    sn, row = gram.stride(0), gram.stride(1)
    # dims (n, i, j, i', j') of output positions (i, j), (i', j'): rows of the first, columns of the second
    size = (n, oh, ow, oh, ow)
    stride = (sn, wp * row * s.stride[0], row * s.stride[1], wp * s.stride[0], s.stride[1])
    out = None
    for a in range(kh):
        for b in range(kw):
            shift = a * s.dilation[0] * wp + b * s.dilation[1]  # the offset's position shift
            part = gram.as_strided(size, stride, gram.storage_offset() + shift * (row + 1))
            out = part.clone(memory_format=torch.contiguous_format) if out is None else out.add_(part)
    return out.view(n, t, t)


def _ghost_sq_norms(g, x, w, s: ConvSpec) -> torch.Tensor:
    """[n] squared Frobenius norms of the per-sample weight gradients G_i U_i^T of a 2-d convolution,
    as <U_i^T U_i, G_i^T G_i> (U_i: the sample's im2col columns [K, T], G_i: its output gradient
    [C_out, T]), in float64 for float64 inputs, else float32. Cheaper than forming the gradients
    when T (output positions) is small against C_out: deep, low-resolution layers."""
    dt = acc_dtype(x)
    n = x.shape[0]
    gram_u = _gram_u(x.to(dt), w, s, g.shape[2], g.shape[3])  # [n, T, T]
    gg = g.to(dt).reshape(n, g.shape[1], -1)  # [n, C_out, T]
    gram_g = torch.bmm(gg.transpose(1, 2), gg)
    return (gram_u * gram_g).flatten(1).sum(1)


def _sq_via_weights(method: str):
    def sq(g, x, w, s: ConvSpec, chunk: int | None = None) -> torch.Tensor:
        n = x.shape[0]
        if chunk is None or chunk >= n:
            return acc_sq(_PS_METHODS[method](g, x, w, s))
        # at most `chunk` samples' gradients formed at a time (the caller's memory bound)
        parts = [acc_sq(_PS_METHODS[method](g[i : i + chunk], x[i : i + chunk], w, s)) for i in range(0, n, chunk)]
        return torch.cat(parts)

    return sq


def _ghost_any_chunk(g, x, w, s: ConvSpec, chunk: int | None = None) -> torch.Tensor:
    """The ghost norm on the whole batch: it forms no per-sample gradient, so `chunk` does not apply."""
    return _ghost_sq_norms(g, x, w, s)


_SQ_METHODS = {**{m: _sq_via_weights(m) for m in _PS_METHODS}, "ghost": _ghost_any_chunk}


@functools.lru_cache(maxsize=64)
def _sq_methods(chunk: int) -> dict:
    """_SQ_METHODS with `chunk` bound (built once per chunk size, not on every call)."""
    return {name: functools.partial(fn, chunk=chunk) for name, fn in _SQ_METHODS.items()}


def default_conv_method() -> str:
    """The method when none is given: $FASTDP_CONV_METHOD if set (a whole process, e.g. the Flower
    child processes, on one fixed method), else "auto". Read when a private model is created."""
    method = os.environ.get(ENV_VAR) or "auto"
    if method not in METHODS:
        raise ValueError(f"{ENV_VAR}={method!r}: expected one of {list(METHODS)}")
    return method


class TuningTable:
    """What "auto" tuning has learnt: the kept choice per tuning key, the trials still running,
    and the reference batch sizes per layer shape (see ConvTuner._key).

    The fastest method depends on the layer shape, batch size and machine, not on the model's
    weights or data, so every "auto" private model of a process shares one table (SHARED_TABLE)
    by default: in a federated simulation ten sites' models (and every round's) tune each layer
    shape once between them instead of once each.
    """

    def __init__(self) -> None:
        self.choices: dict[tuple, str] = {}
        self.trials: dict[tuple, dict[str, float]] = {}  # best seconds per sample per method, while tuning
        self.calls: dict[tuple, int] = {}  # timed calls so far, while tuning
        self.finalists: dict[tuple, list[str]] = {}  # the close methods timed again (REFINE_CALLS)
        self.refs: dict[tuple, list[int]] = {}  # reference batch sizes per layer shape

    def clear(self) -> None:
        """Forgets everything (the next calls of every shape are timed again)."""
        self.__init__()


SHARED_TABLE = TuningTable()


class ConvTuner:
    """Chooses, per layer shape, how one private model computes per-sample conv weight gradients.

    method: "auto" (time the candidates on the first `tune_calls` calls of each layer shape and
    reference batch size, keep the fastest per sample; sizes within a factor 2 of a reference
    share it) or a fixed "loop", "grouped" or "unfold" ("unfold" only for 2-d, non-transposed
    convolutions). table: where "auto" keeps what it learnt; None: the process-wide SHARED_TABLE
    (pass TuningTable() for a tuner that learns on its own). `choices` holds the kept choices.
    refine_calls: more calls timing only the methods within REFINE_RATIO of the fastest, where
    there are such (0: keep the fastest after tune_calls).
    """

    def __init__(
        self,
        method: str = "auto",
        tune_calls: int = TUNE_CALLS,
        table: TuningTable | None = None,
        refine_calls: int = REFINE_CALLS,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"conv_method={method!r}: expected one of {list(METHODS)}")
        self.method = method
        self.tune_calls = tune_calls
        self.refine_calls = refine_calls
        self.table = SHARED_TABLE if table is None else table

    @property
    def choices(self) -> dict[tuple, str]:
        """Tuning key -> kept method ("auto"; the table's, shared unless a table was given)."""
        return self.table.choices

    def per_sample_weight(self, g, x, w, s: ConvSpec, lo: int, hi: int) -> torch.Tensor:
        """[hi-lo, *w.shape] per-sample weight gradients of samples lo..hi-1.

        g: [B, C_out, *T] output gradient; x: [B, C_in, *S] the layer's (padded) input; w: weight.
        """
        if lo != 0 or hi != x.shape[0]:
            g, x = g[lo:hi], x[lo:hi]
        if self.method != "auto":
            return _PS_METHODS[self.method](g, x, w, s)
        if x.shape[0] <= 1:
            return _ps_loop(g, x, w, s)
        return self._tuned(self._layer_key("weights", x, w, s), self.candidates(x, w, s), _PS_METHODS, g, x, w, s)

    @staticmethod
    def candidates(x, w, s: ConvSpec) -> list[str]:
        """The methods worth timing for this layer (unfold only where its im2col buffer is small)."""
        cands = ["loop", "grouped"]
        if not s.transposed and x.dim() == 4 and x.is_floating_point():
            kk = w.shape[1] * w.shape[2] * w.shape[3]  # C_in/groups * k * k
            one_by_one = w.shape[2] * w.shape[3] == 1  # im2col is the input itself
            if one_by_one or kk <= 2 * w.shape[0] // s.groups:  # im2col at most twice the output gradient
                cands.append("unfold")
        return cands

    #: Batch sizes within this factor of a tuned (or tuning) batch size share its result.
    BATCH_FACTOR = 2.0

    def _key(self, batch: int, *shape) -> tuple:
        """The tuning key of a call: the layer shape and the reference batch size it shares a result with.

        Poisson sampling gives a different batch size nearly every step; timing every candidate
        for each new size made a 64x64 U-Net's DP step 1.5x non-private instead of 1.1x. Fixed
        power-of-two buckets put their edges on common expected batch sizes (E[B] = 16 or 32
        sends about half the steps to each side, and both get tuned), so the reference sizes
        are the sizes met first: a size within BATCH_FACTOR of one reuses it (the nearest, in
        ratio), any other size becomes a new reference.
        """
        refs = self.table.refs.setdefault(shape, [])
        near = [r for r in refs if max(r, batch) <= self.BATCH_FACTOR * min(r, batch)]
        if near:
            ref = min(near, key=lambda r: max(r, batch) / min(r, batch))
        else:
            ref = int(batch)
            refs.append(ref)
        return (ref, *shape)

    def per_sample_sq_norms(self, g, x, w, s: ConvSpec, lo: int, hi: int, chunk: int | None = None) -> torch.Tensor:
        """[hi-lo] squared norms of the per-sample weight gradients of samples lo..hi-1 (float64 for
        float64, else float32), by the ghost norm or from per-sample gradients (see GHOST_NORMS);
        "auto" times the candidates per layer shape as per_sample_weight does. Arguments as there;
        chunk: form the per-sample gradients of at most this many samples at a time (a memory
        bound; the ghost norm forms none and takes the whole batch at once)."""
        if GHOST_NORMS not in ("auto", "always", "never"):
            raise ValueError(f"GHOST_NORMS={GHOST_NORMS!r}: expected 'auto', 'always' or 'never'")
        if lo != 0 or hi != x.shape[0]:
            g, x = g[lo:hi], x[lo:hi]
        applies = ghost_applies(x, w, s) and GHOST_NORMS != "never"
        if applies and GHOST_NORMS == "always":
            return _ghost_sq_norms(g, x, w, s)
        methods = _sq_methods(chunk) if chunk is not None and chunk < x.shape[0] else _SQ_METHODS
        if self.method != "auto" or x.shape[0] <= 1:
            if applies and ghost_flop_ratio(g, w, x, s) <= GHOST_FLOP_RATIO:
                return _ghost_sq_norms(g, x, w, s)
            return methods[self.method if self.method != "auto" else "loop"](g, x, w, s)
        cands = self.candidates(x, w, s) + (["ghost"] if applies and ghost_flop_ratio(g, w, x, s) <= 1.0 else [])
        return self._tuned(self._layer_key("sq_norms", x, w, s), cands, methods, g, x, w, s)

    def _layer_key(self, what: str, x, w, s: ConvSpec) -> tuple:
        """The tuning key of computing `what` ("weights" or "sq_norms") for this call's layer shape."""
        shape = (tuple(x.shape[1:]), tuple(w.shape), tuple(s.stride), tuple(s.padding), tuple(s.dilation))
        return self._key(x.shape[0], what, *shape, s.transposed, s.groups, x.dtype, x.device.type)

    def _tuned(self, key: tuple, cands: list[str], methods: dict, g, x, w, s: ConvSpec) -> torch.Tensor:
        """methods[choice](g, x, w, s) for the kept choice of `key`, or while tuning: every candidate
        timed (per sample), the first one's result returned, the fastest kept after tune_calls (or,
        where others are within REFINE_RATIO of it, after REFINE_CALLS more calls timing only those)."""
        table = self.table
        choice = table.choices.get(key)
        if choice is not None:
            return methods[choice](g, x, w, s)
        trials = table.trials.setdefault(key, {})
        calls = table.calls.get(key, 0)
        finalists = table.finalists.get(key)
        if finalists is not None:
            # alternate the order: the second of two back-to-back methods finds warmer caches
            cands = finalists if calls % 2 == 0 else finalists[::-1]
        result = None
        n, whole = x.shape[0], any(name != "loop" for name in cands)
        for name in cands:
            # The loop's cost is per sample: timed on a few samples when another method gives the result.
            k = LOOP_TRIAL_SAMPLES if name == "loop" and whole and n > LOOP_TRIAL_SAMPLES else n
            out, dt = self.time_method(name, g[:k], x[:k], w, s, methods)
            # per sample: the calls of one trial may have different batch sizes (within a factor 2)
            trials[name] = min(trials.get(name, float("inf")), dt / k)
            if result is None and k == n:
                result = out
        calls = table.calls[key] = calls + 1
        if calls >= self.tune_calls:
            ranked = sorted(trials, key=trials.__getitem__)
            close = [m for m in ranked[1:] if trials[m] <= REFINE_RATIO * trials[ranked[0]]]
            if finalists is None and close and self.refine_calls > 0:
                table.finalists[key] = [ranked[0], *close]
            elif finalists is None or calls >= self.tune_calls + self.refine_calls:
                table.choices[key] = ranked[0]
                del table.trials[key], table.calls[key]
                table.finalists.pop(key, None)
        return result

    def time_method(self, name: str, g, x, w, s: ConvSpec, methods: dict | None = None) -> tuple[torch.Tensor, float]:
        """(what method `name` of `methods` (default: the per-sample weight methods) gives, seconds it took)."""
        methods = _PS_METHODS if methods is None else methods
        sync = x.device.type == "cuda"
        if sync:
            torch.cuda.synchronize(x.device)
        t0 = time.perf_counter()
        out = methods[name](g, x, w, s)
        if sync:
            torch.cuda.synchronize(x.device)
        return out, time.perf_counter() - t0
