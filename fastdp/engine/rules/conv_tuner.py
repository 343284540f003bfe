"""Per-sample weight gradients of a convolution, three ways, and the ConvTuner that picks one.

The fastest method depends on the layer and the machine (measured on a 2-core CPU: a batch-1
loop at high resolution, the batch folded into groups elsewhere), so by default ("auto") each
layer shape is timed on its first calls and the fastest method kept (in a TuningTable that every
"auto" private model of the process shares). The methods agree only to float rounding, so runs
compared for equality across processes fix one method.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdp.engine.rules.base import acc_dtype, acc_sq

aten = torch.ops.aten

METHODS = ("auto", "loop", "grouped", "unfold")
TUNE_CALLS = 2  # timed calls per layer shape before the fastest method is kept
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
    # Only the weight's shape matters for a weight-gradient-only backward: a zero-stride view
    # instead of w.repeat, which copied n weights (the same time within noise on the 2-core CPU,
    # and no n-fold weight copy in memory).
    wg = w.new_zeros(()).expand(n * w.shape[0], *w.shape[1:])
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


def ghost_flop_ratio(g, w) -> float:
    """Multiply-adds of the ghost norm over those of forming the per-sample weight gradients, per
    sample: T^2 (K + C_out) against T K C_out, with T output positions and K = C_in * k * k."""
    t = g.shape[2:].numel()
    k = w[0].numel()
    return t * (k + w.shape[0]) / (k * w.shape[0])


def _ghost_sq_norms(g, x, w, s: ConvSpec) -> torch.Tensor:
    """[n] squared Frobenius norms of the per-sample weight gradients G_i U_i^T of a 2-d convolution,
    as <U_i^T U_i, G_i^T G_i> (U_i: the sample's im2col columns [K, T], G_i: its output gradient
    [C_out, T]), in float64 for float64 inputs, else float32. Cheaper than forming the gradients
    when T (output positions) is small against C_out: deep, low-resolution layers."""
    dt = acc_dtype(x)
    n = x.shape[0]
    cols = im2col(x.to(dt), w.shape[2:], s.dilation, s.padding, s.stride)  # [n, K, T]
    gg = g.to(dt).reshape(n, g.shape[1], -1)  # [n, C_out, T]
    gram_u = torch.bmm(cols.transpose(1, 2), cols)  # [n, T, T]
    gram_g = torch.bmm(gg.transpose(1, 2), gg)
    return (gram_u * gram_g).flatten(1).sum(1)


def _sq_via_weights(method: str):
    def sq(g, x, w, s: ConvSpec) -> torch.Tensor:
        return acc_sq(_PS_METHODS[method](g, x, w, s))

    return sq


_SQ_METHODS = {**{m: _sq_via_weights(m) for m in _PS_METHODS}, "ghost": _ghost_sq_norms}


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
    """

    def __init__(self, method: str = "auto", tune_calls: int = TUNE_CALLS, table: TuningTable | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"conv_method={method!r}: expected one of {list(METHODS)}")
        self.method = method
        self.tune_calls = tune_calls
        self.table = SHARED_TABLE if table is None else table

    @property
    def choices(self) -> dict[tuple, str]:
        """Tuning key -> kept method ("auto"; the table's, shared unless a table was given)."""
        return self.table.choices

    def per_sample_weight(self, g, x, w, s: ConvSpec, lo: int, hi: int) -> torch.Tensor:
        """[hi-lo, *w.shape] per-sample weight gradients of samples lo..hi-1.

        g: [B, C_out, *T] output gradient; x: [B, C_in, *S] the layer's (padded) input; w: weight.
        """
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

    def per_sample_sq_norms(self, g, x, w, s: ConvSpec, lo: int, hi: int) -> torch.Tensor:
        """[hi-lo] squared norms of the per-sample weight gradients of samples lo..hi-1 (float64 for
        float64, else float32), by the ghost norm or from per-sample gradients (see GHOST_NORMS);
        "auto" times the candidates per layer shape as per_sample_weight does. Arguments as there."""
        if GHOST_NORMS not in ("auto", "always", "never"):
            raise ValueError(f"GHOST_NORMS={GHOST_NORMS!r}: expected 'auto', 'always' or 'never'")
        g, x = g[lo:hi], x[lo:hi]
        applies = ghost_applies(x, w, s) and GHOST_NORMS != "never"
        if applies and GHOST_NORMS == "always":
            return _ghost_sq_norms(g, x, w, s)
        if self.method != "auto" or x.shape[0] <= 1:
            if applies and ghost_flop_ratio(g, w) <= GHOST_FLOP_RATIO:
                return _ghost_sq_norms(g, x, w, s)
            return _SQ_METHODS[self.method if self.method != "auto" else "loop"](g, x, w, s)
        cands = self.candidates(x, w, s) + (["ghost"] if applies and ghost_flop_ratio(g, w) <= 1.0 else [])
        return self._tuned(self._layer_key("sq_norms", x, w, s), cands, _SQ_METHODS, g, x, w, s)

    def _layer_key(self, what: str, x, w, s: ConvSpec) -> tuple:
        """The tuning key of computing `what` ("weights" or "sq_norms") for this call's layer shape."""
        shape = (tuple(x.shape[1:]), tuple(w.shape), tuple(s.stride), tuple(s.padding), tuple(s.dilation))
        return self._key(x.shape[0], what, *shape, s.transposed, s.groups, x.dtype, x.device.type)

    def _tuned(self, key: tuple, cands: list[str], methods: dict, g, x, w, s: ConvSpec) -> torch.Tensor:
        """methods[choice](g, x, w, s) for the kept choice of `key`, or while tuning: every candidate
        timed (per sample), the first one's result returned, the fastest kept after tune_calls."""
        table = self.table
        choice = table.choices.get(key)
        if choice is not None:
            return methods[choice](g, x, w, s)
        trials = table.trials.setdefault(key, {})
        result = None
        for name in cands:
            out, dt = self.time_method(name, g, x, w, s, methods)
            # per sample: the calls of one trial may have different batch sizes (within a factor 2)
            trials[name] = min(trials.get(name, float("inf")), dt / x.shape[0])
            result = out if result is None else result
        table.calls[key] = table.calls.get(key, 0) + 1
        if table.calls[key] >= self.tune_calls:
            table.choices[key] = min(trials, key=trials.__getitem__)
            del table.trials[key], table.calls[key]
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
