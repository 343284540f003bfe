"""The generic path: any other module with its own parameters, per-sample gradients by torch.func
(vmap of a batch-of-one vjp), refused when its forward draws random numbers or mixes samples.

It is not in the registry: the private model falls back to GENERIC_RULE for a module with its own
trainable parameters that no registered rule covers (when allow_generic). Such a module is one
unit with its whole subtree: the parameters of its submodules (nn.MultiheadAttention's out_proj,
a ViT's blocks under a module that owns the cls token) go through torch.func with its own, and its
submodules are not patched separately (grad_sample plans the patching top-down).

Forward arguments and outputs may be any (nested) tuples, lists and dicts of tensors and other
values. What is per-sample in each tensor is its batch dim, decided by `batch_layout`:

- a small per-class table: RNN family (nn.RNN / nn.GRU / nn.LSTM and subclasses): input dim 0
  (batch_first) or 1, hidden states (h_0, c_0, h_n, c_n) dim 1; nn.MultiheadAttention: query /
  key / value / attn_output dim 0 (batch_first) or 1, key_padding_mask and attention weights
  dim 0, a 3-D attn_mask [B*num_heads, T, S] folded (rows of sample i are i*heads ...), a 2-D
  attn_mask shared; MONAI's WindowAttention: windows folded in dim 0 ([B*nW, N, C], sample-major,
  as monai's window_partition lays them out), the shift mask shared;
- otherwise: the first tensor argument's dim 0 is the batch size B; every other tensor argument
  with dim 0 == B is batched in dim 0, any other is shared by all samples (its gradient, if it
  needs one, is the sum over samples); every tensor output must have dim 0 == B.

Whatever the layout says, exactness is checked where it can be: the per-sample recomputation must
give the batched outputs (else refused as sample-mixing), so a tensor wrongly taken as batched or
shared is refused rather than trained on wrong gradients (a module that uses only row i of a
shared [B, ...] tensor for sample i is exact either way).

A multi-layer RNN with dropout between its layers (training) runs layer by layer: each layer is one
unit, the dropout between layers is applied to the batch outside the units, as for an nn.Dropout
module between single-layer RNNs, so it is exact too. Dropout inside any other unit (attention
dropout, an nn.Dropout child of a module with parameters) is refused.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from fastdp.engine.errors import UnsupportedModuleError
from fastdp.engine.rules.base import Call
from fastdp.engine.rules.registry import Rule
from fastdp.engine.tape import Stored

# ------------------------------------------------------------------------------- batch layout


@dataclass(frozen=True)
class Fold:
    """A tensor whose dim 0 holds k rows per sample, sample-major: rows [i*k, (i+1)*k) are sample i's
    (MultiheadAttention's [B*heads, T, S] mask, Swin's [B*windows, N, C] windows)."""

    k: int


# int d: batched in dim d; Fold(k): dim 0 is B*k, sample-major; None: shared by all samples.
BatchDim = int | Fold | None
# In a Layout's arguments: each tensor inside is batched in dim 0 if its dim 0 is B, else shared.
AUTO = "auto"


@dataclass
class Layout:
    """Where the batch is in one call: batch_size B, a BatchDim (or AUTO) per top-level positional
    argument and keyword argument (applied to every tensor inside it), and outputs(out_leaves) -> a
    BatchDim per tensor leaf of the output (None: refused, an output must be per sample)."""

    batch_size: int
    args: list[BatchDim | str]
    kwargs: dict[str, BatchDim | str]
    outputs: Callable[[list[torch.Tensor]], list[BatchDim]]


def _refuse(name: str, module: nn.Module, why: str) -> None:
    raise UnsupportedModuleError(
        f"fastdp: module '{name}' ({type(module).__name__}) goes through the generic torch.func per-sample "
        f"path, which {why}"
    )


def _bound_names(module: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """The forward's parameter names of the positional arguments (by the module's own signature)."""
    try:
        params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return [f"arg{i}" for i in range(len(args))]
    names = []
    for i in range(len(args)):
        if i < len(params) and params[i].kind in (params[i].POSITIONAL_ONLY, params[i].POSITIONAL_OR_KEYWORD):
            names.append(params[i].name)
        else:
            names.append(f"arg{i}")
    return names


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for a in (*args, *kwargs.values()):
        for leaf in tree_flatten(a)[0]:
            if isinstance(leaf, torch.Tensor):
                return leaf
    return None


def _rnn_layout(module: nn.RNNBase, name: str, args: tuple, kwargs: dict, current: int | None) -> Layout:
    """nn.RNN / GRU / LSTM (and fastdp.layers' DPRNN / DPGRU / DPLSTM): forward(input, hx)."""
    if any(isinstance(a, nn.utils.rnn.PackedSequence) for a in (*args, *kwargs.values())):
        _refuse(
            name,
            module,
            "does not take PackedSequence inputs (its batch is not a tensor dimension). Pass the padded "
            "batch (torch.nn.utils.rnn.pad_sequence(..., batch_first=True)) and, for per-sample lengths, pick "
            "each sample's last valid output (output[torch.arange(B), lengths - 1]).",
        )
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        _refuse(name, module, "needs a batched 3-D input [B, T, D] (batch_first) or [T, B, D].")
    bd = 0 if module.batch_first else 1
    names = _bound_names(module, args, kwargs)
    return Layout(
        x.shape[bd],
        [bd if i == 0 else 1 for i in range(len(names))],  # after the input: the hidden state
        {k: (bd if k == "input" else 1) for k in kwargs},
        lambda outs: [bd] + [1] * (len(outs) - 1),  # output, then h_n (and c_n)
    )


def _mha_layout(module: nn.MultiheadAttention, name: str, args: tuple, kwargs: dict, current: int | None) -> Layout:
    """nn.MultiheadAttention: forward(query, key, value, key_padding_mask, need_weights, attn_mask, ...)."""
    if module.training and module.dropout > 0:
        _refuse(
            name,
            module,
            f"cannot reproduce its attention dropout (dropout={module.dropout} draws random numbers inside the "
            "unit). Set dropout=0.0 on the attention (dropout on its output, outside it, is fine), or freeze "
            "its parameters.",
        )
    bd = 0 if module.batch_first else 1
    names = _bound_names(module, args, kwargs)
    q = args[0] if args else kwargs.get("query")
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        _refuse(name, module, "needs batched 3-D query/key/value ([B, T, E] with batch_first, else [T, B, E]).")
    B = q.shape[bd]

    def dim(arg: str, value) -> BatchDim:
        if arg in ("query", "key", "value"):
            return bd
        if arg == "key_padding_mask":
            return 0
        if arg == "attn_mask" and isinstance(value, torch.Tensor):
            return Fold(module.num_heads) if value.dim() == 3 else None
        return None

    return Layout(
        B,
        [dim(n, a) for n, a in zip(names, args, strict=True)],
        {k: dim(k, v) for k, v in kwargs.items()},
        lambda outs: [bd] + [0] * (len(outs) - 1),  # attn_output, then the attention weights [B, ...]
    )


def _window_attention_layout(module: nn.Module, name: str, args: tuple, kwargs: dict, current: int | None) -> Layout:
    """MONAI's Swin WindowAttention: forward(x [B*nW, N, C], mask [nW, N, N] or None)."""
    x = args[0] if args else kwargs.get("x")
    if current is None or not isinstance(x, torch.Tensor) or x.dim() == 0 or (current and x.shape[0] % current):
        _refuse(
            name,
            module,
            "needs the batch size from an earlier layer of the same forward, and its input's dim 0 a multiple "
            "of it (windows of each sample, sample-major).",
        )
    fold = Fold(x.shape[0] // current if current else 1)  # an empty batch: no windows to fold
    names = _bound_names(module, args, kwargs)
    return Layout(
        current,
        [fold if n == "x" else None for n in names],
        {k: (fold if k == "x" else None) for k in kwargs},
        lambda outs: [fold] * len(outs),
    )


def _default_layout(module: nn.Module, name: str, args: tuple, kwargs: dict, current: int | None) -> Layout:
    """The first tensor argument's dim 0 is B; tensors with dim 0 == B are batched in dim 0."""
    x = _first_tensor(args, kwargs)
    if x is None or x.dim() == 0:
        _refuse(name, module, "needs a batch-first tensor argument (dim 0 = samples).")
    B = x.shape[0]
    return Layout(
        B,
        [AUTO] * len(args),
        dict.fromkeys(kwargs, AUTO),
        lambda outs: [0 if o.dim() >= 1 and o.shape[0] == B else None for o in outs],
    )


def _is_monai_window_attention(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "WindowAttention" and cls.__module__.startswith("monai.")


def batch_layout(module: nn.Module, name: str, args: tuple, kwargs: dict, current: int | None) -> Layout:
    """Where the batch is in this call of `module` (see the module docstring). current: the batch
    size noted by an earlier layer of the same forward, or None."""
    if isinstance(module, nn.RNNBase):
        return _rnn_layout(module, name, args, kwargs, current)
    if isinstance(module, nn.MultiheadAttention):
        return _mha_layout(module, name, args, kwargs, current)
    if _is_monai_window_attention(module):
        return _window_attention_layout(module, name, args, kwargs, current)
    return _default_layout(module, name, args, kwargs, current)


# ---------------------------------------------------------- moving between batched and one sample


def _in_dim(d: BatchDim) -> int | None:
    return 0 if isinstance(d, Fold) else d


def _to_vmap(t: torch.Tensor, d: BatchDim, B: int) -> torch.Tensor:
    """The batched tensor as vmap takes it: a Fold's dim 0 split into [B, k]."""
    return t.reshape(B, d.k, *t.shape[1:]) if isinstance(d, Fold) else t


def _from_vmap(t: torch.Tensor, d: BatchDim) -> torch.Tensor:
    return t.flatten(0, 1) if isinstance(d, Fold) else t


def _has_batch(t: torch.Tensor, d: BatchDim, B: int) -> bool:
    """Whether t has a batch dimension of size B where d puts it."""
    if isinstance(d, Fold):
        return t.dim() > 0 and t.shape[0] == B * d.k
    return t.dim() > d and t.shape[d] == B


def _one(t: torch.Tensor, d: BatchDim) -> torch.Tensor:
    """A sample's slice (inside vmap) as the module takes a batch of one."""
    return t.unsqueeze(d) if isinstance(d, int) else t


def _unone(t: torch.Tensor, d: BatchDim) -> torch.Tensor:
    return t.squeeze(d) if isinstance(d, int) else t


_CONSTANT_OUTPUTS = (type(None), bool, int, float, str, torch.Size, torch.dtype, torch.device)


@dataclass
class _Plan:
    """One call, flattened: the tensor leaves of (args, kwargs) with their BatchDims, and how to
    rebuild the arguments from them."""

    module: nn.Module
    call: Call
    layout: Layout
    arg_trees: list  # (leaves with tensors replaced by None, treespec) per positional argument
    kw_trees: dict
    dims: list[BatchDim]  # one per tensor leaf, in order
    names: list[str]  # the unit's trainable parameters (qualified names inside the module)
    out_tree: object = None  # the output's treespec, set by the batched forward
    out_constants: list | None = None  # output leaves, tensors replaced by None
    out_is_tensor: list[bool] | None = None
    fixed: dict | None = None  # frozen parameters to pass as well (a layer view of an RNN has none of its own)
    out_dims: list[BatchDim] | None = None  # one per tensor output leaf
    float_out: list[bool] | None = None

    def rebuild(self, tensors) -> tuple[tuple, dict]:
        it = iter(tensors)

        def fill(tree):
            leaves, spec = tree
            return tree_unflatten([next(it) if isinstance(v, _Slot) else v for v in leaves], spec)

        args = tuple(fill(t) for t in self.arg_trees)
        kwargs = {k: fill(t) for k, t in self.kw_trees.items()}
        return args, kwargs

    def run(self, pdict: dict, tensors) -> list[torch.Tensor]:
        """The module on these argument tensors with these parameters: its tensor output leaves."""
        args, kwargs = self.rebuild(tensors)
        tape = self.call.tape
        tape.in_unit += 1  # the module's patched forward (and any patched module inside) runs as is
        try:
            pd = {**self.fixed, **pdict} if self.fixed else pdict
            out = torch.func.functional_call(self.module, pd, args, kwargs, strict=False)
        finally:
            tape.in_unit -= 1
        leaves, spec = tree_flatten(out)
        if self.out_tree is None:
            bad = [type(v).__name__ for v in leaves if not isinstance(v, (torch.Tensor, *_CONSTANT_OUTPUTS))]
            if bad:
                msg = (
                    f"returns a {bad[0]}; it needs outputs that are tensors or (nested) tuples, lists and dicts "
                    "of tensors. Return those (e.g. a tuple instead of a dataclass), or freeze its parameters."
                )
                _refuse(self.call.name, self.module, msg)
            self.out_tree = spec
            self.out_constants = [None if isinstance(v, torch.Tensor) else v for v in leaves]
            self.out_is_tensor = [isinstance(v, torch.Tensor) for v in leaves]
        return [v for v in leaves if isinstance(v, torch.Tensor)]


class _Slot:
    """Marks where a tensor leaf was in a flattened argument."""


_SLOT = _Slot()


def _flatten_call(args: tuple, kwargs: dict, layout: Layout):
    """(tensor leaves, their BatchDims, per-argument trees with slots)."""
    tensors, dims, arg_trees, kw_trees = [], [], [], {}

    def take(value, d):
        leaves, spec = tree_flatten(value)
        out = []
        for v in leaves:
            if isinstance(v, torch.Tensor):
                tensors.append(v)
                if isinstance(d, str):  # AUTO
                    d_v = 0 if v.dim() > 0 and v.shape[0] == layout.batch_size else None
                else:
                    d_v = d if v.dim() > 0 else None
                dims.append(d_v)
                out.append(_SLOT)
            else:
                out.append(v)
        return out, spec

    for a, d in zip(args, layout.args, strict=True):
        arg_trees.append(take(a, d))
    for k, v in kwargs.items():
        kw_trees[k] = take(v, layout.kwargs[k])
    return tensors, dims, arg_trees, kw_trees


# ------------------------------------------------------------------------------- the Function


def _output_tolerance(out: torch.Tensor) -> tuple[float, float]:
    """(rtol, atol) for per-sample vs batched outputs of the same computation, which differ by
    rounding only (other kernels, other summation order): relative to max|out|."""
    if out.dtype in (torch.float16, torch.bfloat16):
        return (1e-2 if out.dtype == torch.float16 else 4e-2), 1e-3
    if out.dtype == torch.float32 and out.device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
        if tf32 or torch.get_float32_matmul_precision() != "highest":
            return 1e-2, 1e-5  # TF32 / bf16-pass matmuls: ~10 mantissa bits
    return 1e-4, 1e-6


def _has_rnn(module: nn.Module) -> bool:
    return any(isinstance(m, nn.RNNBase) for m in module.modules())


def _vmappable_kernels(module: nn.Module, inputs) -> contextlib.ExitStack:
    """Kernels with vmap rules for the per-sample recomputation (same math, rounding aside): no
    cuDNN or oneDNN RNN kernels (no vmap rules), and on CPU the math attention (the CPU flash attention has
    none: vmap would loop over samples)."""
    stack = contextlib.ExitStack()
    if _has_rnn(module):
        c = torch.backends.cudnn  # cudnn.flags resets the settings it is not given: pass them as they are
        stack.enter_context(
            c.flags(enabled=False, benchmark=c.benchmark, deterministic=c.deterministic, allow_tf32=c.allow_tf32)
        )
        m = torch.backends.mkldnn  # nor oneDNN's (CPU float32); its other settings as they are
        stack.enter_context(m.flags(enabled=False, deterministic=m.deterministic, allow_tf32=m.allow_tf32))
    if inputs and all(t.device.type == "cpu" for t in inputs):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
    return stack


class _GenericFn(torch.autograd.Function):
    """A module with its own parameters (and its subtree's): per-sample gradients by torch.func
    (vmap of a batch-of-one vjp). Recomputes the module's forward in backward, per sample.

    That recomputation is only the batched forward if the module treats samples independently
    and draws no random numbers, so the backward checks both: randomness makes vmap fail
    (randomness="error"), and the recomputed per-sample outputs must equal the batched outputs
    (kept from the forward, copies of the module's outputs) to rounding. Otherwise the module is
    refused (UnsupportedModuleError, raised from loss.backward(); the tape is cleared).

    Inputs: the plan, the number n of argument tensors, then n argument tensors and the unit's
    parameters. Outputs: the module's tensor output leaves (rebuilt into its structure outside)."""

    @staticmethod
    def forward(ctx, plan: _Plan, n: int, *tensors):
        ctx.plan, ctx.n = plan, n
        ctx.save_for_backward(*tensors)
        inputs, params = tensors[:n], tensors[n:]
        outs = plan.run(dict(zip(plan.names, params, strict=True)), inputs)
        plan.float_out = [o.is_floating_point() or o.is_complex() for o in outs]
        ctx.mark_non_differentiable(*[o for o, f in zip(outs, plan.float_out, strict=True) if not f])
        dims = plan.layout.outputs(outs)
        for o, d in zip(outs, dims, strict=True):
            if d is None or not _has_batch(o, d, plan.layout.batch_size):
                _refuse(
                    plan.call.name,
                    plan.module,
                    f"needs every tensor output per sample; an output of shape {tuple(o.shape)} has no batch "
                    f"dimension of size {plan.layout.batch_size} where expected. Return only per-sample tensors "
                    "from the module with parameters (compute batch statistics outside it), or freeze its parameters.",
                )
        plan.out_dims = dims
        # copies: later in-place ops on the outputs must not change what the backward compares with
        ctx.outs = [o.detach().clone() for o, f in zip(outs, plan.float_out, strict=True) if f]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *gouts):
        plan: _Plan = ctx.plan
        call, n = plan.call, ctx.n
        saved = ctx.saved_tensors
        inputs, params = saved[:n], saved[n:]
        B = plan.layout.batch_size
        kind = type(call.module).__name__
        pdict = {k: p.detach() for k, p in zip(plan.names, params, strict=True)}
        diff = [i for i in range(n) if ctx.needs_input_grad[2 + i]]
        rest = [i for i in range(n) if i not in diff]
        fo = [i for i, f in enumerate(plan.float_out) if f]
        odims = [plan.out_dims[i] for i in fo]
        gs = [gouts[i] if gouts[i] is not None else torch.zeros_like(ctx.outs[j]) for j, i in enumerate(fo)]

        def one(pd, dx, rx, gi):
            def f(pd, dx):
                leaves = [None] * n
                for i, t in zip(diff, dx, strict=True):
                    leaves[i] = _one(t, plan.dims[i])
                for i, t in zip(rest, rx, strict=True):
                    leaves[i] = _one(t, plan.dims[i])
                outs = plan.run(pd, leaves)
                return tuple(_unone(outs[i], d) for i, d in zip(fo, odims, strict=True))

            out_i, vjp_fn = torch.func.vjp(f, pd, tuple(dx))
            gp, gx = vjp_fn(tuple(gi))
            return out_i, gp, gx

        in_dims = (
            None,
            tuple(_in_dim(plan.dims[i]) for i in diff),
            tuple(_in_dim(plan.dims[i]) for i in rest),
            tuple(_in_dim(d) for d in odims),
        )
        # a shared (non-batched) input's per-sample input gradients are stacked in dim 0, then summed
        gx_dims = tuple(0 if plan.dims[i] is None else _in_dim(plan.dims[i]) for i in diff)
        out_dims = (tuple(_in_dim(d) for d in odims), 0, gx_dims)
        dx = tuple(_to_vmap(inputs[i].detach(), plan.dims[i], B) for i in diff)
        rx = tuple(_to_vmap(inputs[i].detach(), plan.dims[i], B) for i in rest)
        gv = tuple(_to_vmap(g, d, B) for g, d in zip(gs, odims, strict=True))
        if B == 0:
            call.tape.record(call.batch, Stored(list(params), [p.new_zeros((0, *p.shape)) for p in params]))
            grads = [torch.zeros_like(inputs[i]) if i in diff else None for i in range(n)]
            return (None, None, *grads) + (None,) * len(params)
        try:
            # cuDNN's RNN kernels have no vmap rule: the per-sample recomputation uses the native ones
            with torch.enable_grad(), _vmappable_kernels(plan.module, inputs):
                per_sample_out, gp, gx = torch.func.vmap(one, in_dims, out_dims, randomness="error")(pdict, dx, rx, gv)
        except Exception as e:
            if isinstance(e, UnsupportedModuleError):
                call.tape.abort(str(e))
                raise
            if not isinstance(e, RuntimeError) or isinstance(e, torch.cuda.OutOfMemoryError):
                call.tape.abort(f"the backward of module '{call.name}' ({kind}) raised {type(e).__name__}: {e}.")
                raise
            if "random operation" in str(e) or "randomness error mode" in str(e):
                msg = (
                    f"fastdp: module '{call.name}' ({kind}) draws random numbers in its forward (dropout, "
                    "torch.rand, ...); the generic per-sample path recomputes the forward per sample and cannot "
                    "reproduce the batched forward's random draws, so its per-sample gradients would not be those "
                    "of the loss that was computed. Move the randomness out of the module with parameters (e.g. "
                    "an nn.Dropout submodule of the parent, applied to its output; for a module's own dropout "
                    "argument, dropout=0) or freeze its parameters (requires_grad_(False))."
                )
            else:
                msg = (
                    f"fastdp: module '{call.name}' ({kind}) goes through the generic torch.func per-sample path "
                    f"(vmap of a batch-of-one vjp), which failed for it: {e} Make its forward work on a batch "
                    "of one sample under torch.func.vmap, or freeze its parameters (requires_grad_(False))."
                )
            call.tape.abort(msg)
            raise UnsupportedModuleError(msg) from e
        for ps, bt, d in zip(per_sample_out, ctx.outs, odims, strict=True):
            _check_same_outputs(call, kind, _from_vmap(ps, d), bt)
        scale = call.tape.loss_scale(B)
        call.tape.record(call.batch, Stored(list(params), [gp[k] * scale for k in plan.names]))
        grads: list[torch.Tensor | None] = [None] * n
        for i, g in zip(diff, gx, strict=True):
            grads[i] = g.sum(0) if plan.dims[i] is None else _from_vmap(g, plan.dims[i])
        return (None, None, *grads) + (None,) * len(params)


def _check_same_outputs(call: Call, kind: str, per_sample: torch.Tensor, batched: torch.Tensor) -> None:
    """Refuses a module whose per-sample recomputation is not its batched forward (it mixes samples)."""
    if per_sample.shape != batched.shape:
        bad = f"its per-sample outputs have shape {tuple(per_sample.shape)}, its batched output {tuple(batched.shape)}"
    elif batched.numel() == 0:
        return
    else:
        acc = torch.float64 if batched.dtype == torch.float64 else torch.float32
        ps, bt = per_sample.to(acc), batched.to(acc)
        finite = torch.isfinite(bt)
        # A NaN/inf sample (NaN loss) is the optimizer's to refuse; here only where it appears matters.
        same_nonfinite = torch.equal(finite, torch.isfinite(ps))
        ps, bt = ps[finite], bt[finite]
        diff = float((ps - bt).abs().max()) if bt.numel() else 0.0
        rtol, atol = _output_tolerance(batched)
        bound = rtol * (float(bt.abs().max()) if bt.numel() else 0.0) + atol
        if same_nonfinite and diff <= bound:
            return
        bad = f"its per-sample outputs differ from its batched outputs (max abs difference {diff:.3g} > {bound:.3g})"
        if not same_nonfinite:
            bad = "its per-sample outputs are NaN/inf where its batched outputs are not, or the reverse"
    msg = (
        f"fastdp: module '{call.name}' ({kind}) goes through the generic torch.func per-sample path, but {bad}: "
        "it mixes the samples of a batch (like BatchNorm: a mean or other statistic over dim 0), so "
        "per-sample gradients (and DP) are not defined for it, nor for the layers before it. Make its "
        "forward treat each sample independently (freezing its parameters does not help: it would still "
        "mix the samples' gradients). A tensor argument whose batch dimension is not dim 0 (or that is "
        "shared but has dim 0 equal to the batch size) is also taken for mixing: pass such tensors batch-first."
    )
    call.tape.abort(msg)
    raise UnsupportedModuleError(msg)


def _with_rnn_state(module: nn.RNNBase, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call with an omitted (None) initial state replaced by the zeros torch would use: torch
    makes them for the batch of one under vmap, unbatched, and then writes batched values into them."""
    key = next((k for k in ("hx", "state_init") if k in kwargs), None)
    if key is not None and kwargs[key] is not None or len(args) > 1 and args[1] is not None:
        return args, kwargs
    x = args[0] if args else kwargs["input"]
    B = x.shape[0 if module.batch_first else 1]
    L = module.num_layers * (2 if module.bidirectional else 1)
    h_size = module.proj_size or module.hidden_size
    h0 = x.new_zeros(L, B, h_size)
    state = (h0, x.new_zeros(L, B, module.hidden_size)) if isinstance(module, nn.LSTM) else h0
    if key is not None:
        return args, {**kwargs, key: state}
    return (args[0], state, *args[2:]) if len(args) > 1 else (*args, state), kwargs


def generic_batch_size(module: nn.Module, name: str, args: tuple, kwargs: dict, current: int | None) -> int:
    """The batch size B of this call (for the tape's batch-size check); refuses what the generic path
    cannot take (see batch_layout)."""
    return batch_layout(module, name, args, kwargs, current).batch_size


def generic_forward(module: nn.Module, call: Call, *args, **kwargs):
    """module(*args, **kwargs) through _GenericFn: per-sample gradients of all trainable parameters of
    the module and its submodules. Tensors are batched as batch_layout says; returns the module's
    output (same structure). A multi-layer RNN with dropout between its layers runs layer by layer
    (each layer one unit, the dropout between them on the batch, outside the units: exact)."""
    if isinstance(module, nn.RNNBase):
        args, kwargs = _with_rnn_state(module, args, kwargs)
        if module.training and module.dropout > 0 and module.num_layers > 1:
            return _rnn_by_layer(module, call, args, kwargs)
    names = [k for k, p in module.named_parameters() if p.requires_grad]
    params = [p for _, p in module.named_parameters() if p.requires_grad]
    return _unit(module, call, args, kwargs, names, params, None)


def _unit(module: nn.Module, call: Call, args: tuple, kwargs: dict, names, params, fixed: dict | None):
    """One call of `module` through _GenericFn, with parameters names -> params (plus `fixed`)."""
    layout = batch_layout(module, call.name, args, kwargs, call.batch.batch_size)
    tensors, dims, arg_trees, kw_trees = _flatten_call(args, kwargs, layout)
    B = layout.batch_size
    for t, d in zip(tensors, dims, strict=True):
        if d is not None and not _has_batch(t, d, B):
            _refuse(
                call.name,
                call.module,
                f"found an argument of shape {tuple(t.shape)} without a batch dimension of size {B} where its "
                "layout puts it. Pass batched tensors batch-first (or as the module documents), or freeze its "
                "parameters.",
            )
    plan = _Plan(module, call, layout, arg_trees, kw_trees, dims, list(names), fixed=fixed)
    outs = iter(_GenericFn.apply(plan, len(tensors), *tensors, *params))
    leaves = [next(outs) if t else v for t, v in zip(plan.out_is_tensor, plan.out_constants, strict=True)]
    return tree_unflatten(leaves, plan.out_tree)


_LAYER_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layer_views(module: nn.RNNBase) -> list[tuple[nn.RNNBase, dict[str, str]]]:
    """Per layer l: a single-layer RNN of the same kind on the meta device (it owns no storage: every
    parameter is passed to functional_call) and {its parameter name: the module's} (_l0 -> _l{l})."""
    views = _LAYER_VIEWS.get(module)
    if views is not None:
        return views
    base = next(c for c in (nn.LSTM, nn.GRU, nn.RNN) if isinstance(module, c))
    D = 2 if module.bidirectional else 1
    out = (getattr(module, "proj_size", 0) or module.hidden_size) * D
    views = []
    for layer in range(module.num_layers):
        kw = dict(
            input_size=module.input_size if layer == 0 else out,
            hidden_size=module.hidden_size,
            num_layers=1,
            bias=module.bias,
            batch_first=module.batch_first,
            bidirectional=module.bidirectional,
            device="meta",
            dtype=module.all_weights[0][0].dtype,
        )
        if base is nn.LSTM:
            kw["proj_size"] = module.proj_size
        if base is nn.RNN:
            kw["nonlinearity"] = module.nonlinearity
        view = base(**kw)
        names = {n: n.replace("_l0", f"_l{layer}") for n, _ in view.named_parameters()}
        views.append((view, names))
    _LAYER_VIEWS[module] = views
    return views


def _rnn_by_layer(module: nn.RNNBase, call: Call, args: tuple, kwargs: dict):
    """module(input, state) for a multi-layer RNN with dropout p between layers, as torch defines it:
    layer l's output, dropped out (training), is layer l+1's input; layer l's states are rows
    [l*D, (l+1)*D) of h_0 / c_0 and of h_n / c_n (D = 2 if bidirectional)."""
    key = next((k for k in ("hx", "state_init") if k in kwargs), None)
    x = args[0] if args else kwargs["input"]
    state = kwargs[key] if key is not None else args[1]
    lstm = isinstance(module, nn.LSTM)
    D = 2 if module.bidirectional else 1
    own = dict(module.named_parameters())
    inp, hs, cs = x, [], []
    for layer, (view, names) in enumerate(_layer_views(module)):
        rows = slice(layer * D, (layer + 1) * D)
        st = (state[0][rows], state[1][rows]) if lstm else state[rows]
        trained = [n for n, orig in names.items() if own[orig].requires_grad]
        fixed = {n: own[orig] for n, orig in names.items() if not own[orig].requires_grad}
        out, hidden = _unit(view, call, (inp, st), {}, trained, [own[names[n]] for n in trained], fixed)
        hs.append(hidden[0] if lstm else hidden)
        if lstm:
            cs.append(hidden[1])
        inp = torch.nn.functional.dropout(out, module.dropout, training=True) if layer < module.num_layers - 1 else out
    h_n = torch.cat(hs, 0)
    return out, ((h_n, torch.cat(cs, 0)) if lstm else h_n)


# Every trainable parameter of the module and its submodules (not a fixed weight/bias pair).
GENERIC_RULE = Rule(nn.Module, generic_forward, params=())
