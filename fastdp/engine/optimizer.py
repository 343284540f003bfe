"""DPOptimizer: turns the recorded per-sample information into clipped, noised gradients.

optimizer.step() (1) refuses the step unless it rests on exactly one forward and one backward
of the private model (and, for the optimizer make_private made for a DPDataLoader, on at most
one batch drawn from that loader since the previous real step), or if it would exceed
max_epsilon, (2) sums the per-layer squared norms of the recorded batch into per-sample norms,
clip factors c_i = min(1, C / (||g_i|| + 1e-6)), and adds sum_i c_i g_i into a running clipped
sum (fused op for stored per-sample gradients, one c-scaled weight-gradient computation for
deferred layers), (3) unless the step is a skipped virtual step (BatchMemoryManager), adds
N(0, sigma^2 C^2) and scales by 1/E[B] in one fused op, records the step with the accountant
and runs the wrapped optimizer.

Why one forward per step: each sample must be clipped once per step. Two batches clipped
separately and summed (gradient accumulation) let a sample drawn into both contribute 2C while
the accountant records one step at rate q.

Two Opacus variants go through the same clip + noise:
- per-layer clipping (max_grad_norm a list, one bound C_k per parameter of the optimizer, in
  param_groups order): each parameter's per-sample gradient is clipped to its own C_k, and the
  noise std is sigma * sqrt(sum_k C_k^2) (the flat bound of the concatenated clipped gradient,
  as Opacus's DPPerLayerOptimizer). A deferred layer with several parameters (weight and bias)
  gives one squared norm for both, so its per-sample gradients are materialized.
- user-computed per-sample gradients (grad_sample_mode="no_op": the module has
  computes_grad_sample = False): step() reads each trainable parameter's p.grad_sample
  ([B, *p.shape], gradients of the per-sample losses, as Opacus defines them) instead of the
  tape, and refuses a step where one is missing or the batch sizes differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from fastdp import ops
from fastdp.accounting import Accountant, PrivacyBudgetExceeded
from fastdp.engine.data_loader import DPDataLoader
from fastdp.engine.errors import PrivacyStepError
from fastdp.engine.grad_sample import PrivateModule
from fastdp.engine.tape import Batch, Deferred, Stored
from fastdp.noise import NoiseSource

ONE_PASS_PER_STEP = (
    "DP-SGD needs exactly one forward and one backward per optimizer step: each sample is clipped "
    "once per step and the accountant records one step at sample rate q. Poisson sampling is not "
    "compatible with gradient accumulation; for a logical batch larger than memory use "
    "fastdp.BatchMemoryManager(data_loader=..., max_physical_batch_size=..., optimizer=...), which "
    "splits one Poisson batch into physical batches (one forward, one backward and one step() each)."
)
NOT_TAKEN = "The step was not taken; no gradient, optimizer or accountant state changed."


def per_parameter_bounds(optimizer: torch.optim.Optimizer, max_grad_norm) -> dict[int, float]:
    """{id(p): C_k} for per-layer clipping: one bound per trainable parameter of `optimizer`, in
    param_groups order (Opacus's). ValueError saying what to pass when the list does not fit."""
    order = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    if len(max_grad_norm) != len(order):
        raise ValueError(
            f"per-layer clipping: max_grad_norm has {len(max_grad_norm)} bounds but the optimizer has "
            f"{len(order)} trainable parameters; give one bound per parameter, in param_groups order "
            "(e.g. [C / n ** 0.5] * n keeps the total bound C)"
        )
    bounds = [float(c) for c in max_grad_norm]
    bad = [i for i, c in enumerate(bounds) if not (math.isfinite(c) and c > 0)]
    if bad:
        raise ValueError(f"per-layer clipping: every max_grad_norm must be finite and > 0; entries {bad} are not")
    return {id(p): c for p, c in zip(order, bounds, strict=True)}


class DPOptimizer(torch.optim.Optimizer):
    """Wraps any torch.optim optimizer so that step() applies DP-SGD's clip + noise first.

    Args:
        optimizer: the wrapped optimizer (SGD, Adam, AdamW, ...), over the model's parameters.
        module: the PrivateModule whose backward records per-sample information.
        noise_multiplier: sigma; the noise std is sigma * max_grad_norm.
        max_grad_norm: clipping bound C (L2 norm of each sample's full gradient); or a list of
            bounds C_k, one per trainable parameter of `optimizer` in param_groups order (per-layer
            clipping; the noise std is then sigma * sqrt(sum_k C_k^2)).
        expected_batch_size: E[B] = sample_rate * N; gradients are divided by it ("mean").
        sample_rate: Poisson sampling rate q, for the accountant.
        accountant: where steps are recorded; None records nothing.
        noise_source: (seed, offset) pairs for the noise op.
        max_epsilon, target_delta: refuse steps after which epsilon(target_delta) > max_epsilon.
        data_loader: the DPDataLoader the steps' batches come from (make_private passes it); each
            real step then checks that at most one batch was drawn from it since the last one.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        module: PrivateModule,
        noise_multiplier: float,
        max_grad_norm: float | list[float],
        expected_batch_size: float,
        sample_rate: float,
        accountant: Accountant | None,
        noise_source: NoiseSource,
        loss_reduction: str = "mean",
        max_epsilon: float | None = None,
        target_delta: float | None = None,
        data_loader: DPDataLoader | None = None,
    ) -> None:
        # Per-layer clipping: one bound per trainable parameter of the optimizer (Opacus's order).
        self.max_grad_norms: list[float] | None = None
        self._clip_of: dict[int, float] = {}
        if isinstance(max_grad_norm, (list, tuple)):
            self._clip_of = per_parameter_bounds(optimizer, max_grad_norm)
            self.max_grad_norms = list(self._clip_of.values())
            # The concatenated clipped gradient has norm <= sqrt(sum C_k^2): the sensitivity the noise covers.
            max_grad_norm = math.sqrt(sum(c * c for c in self.max_grad_norms))
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if max_epsilon is not None and target_delta is None:
            raise ValueError("max_epsilon needs target_delta")
        self.original_optimizer = optimizer
        self.module = module
        # grad_sample_mode="no_op": the per-sample gradients are the user's p.grad_sample.
        self.user_grad_sample = not getattr(module, "computes_grad_sample", True)
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.sample_rate = float(sample_rate)
        self.accountant = accountant
        self.noise_source = noise_source
        self.loss_reduction = loss_reduction
        self.max_epsilon = max_epsilon
        # (settings, accountant history when computed, steps that fit then): see _exceeds_budget.
        self._budget: tuple | None = None
        self.target_delta = target_delta
        opt_params = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.params = [p for p in module.trainable if id(p) in opt_params]
        self._names = {
            id(p): n for n, p in zip(module.trainable_names, module.trainable, strict=True) if id(p) in opt_params
        }
        self._summed: dict[int, torch.Tensor] = {}
        self._assigned: dict[int, torch.Tensor] = {}
        self._skip_next = False
        self._accumulating = False
        self.data_loader = data_loader if isinstance(data_loader, DPDataLoader) else None
        self._accumulated_draw = 0  # the loader's draw count when the skipped steps began
        self.step_hook: Callable[[DPOptimizer], None] | None = None

    # --- torch.optim.Optimizer interface, delegated --------------------------------------------
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @state.setter
    def state(self, value):
        self.original_optimizer.state = value

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.original_optimizer.defaults = value

    def add_param_group(self, param_group: dict) -> None:
        raise RuntimeError("fastdp: adding parameter groups to a private optimizer is not supported")

    def state_dict(self):
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"DPOptimizer(sigma={self.noise_multiplier}, C={self.max_grad_norm}, {self.original_optimizer!r})"

    # --- DP ----------------------------------------------------------------------------------
    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Makes the next step() accumulate clipped gradients without updating (virtual step)."""
        self._skip_next = do_skip

    def attach_step_hook(self, fn: Callable[[DPOptimizer], None]) -> None:
        """Opacus's name: fn(optimizer) runs after every real (noised) step, before the update."""
        self.step_hook = fn

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears p.grad (and p.grad_sample in grad_sample_mode="no_op") and discards recorded but
        unstepped batches; the clipped sum of skipped (virtual) steps is kept until the real step."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        self.module.tape.clear()
        if self.user_grad_sample:
            for p in self.params:
                p.grad_sample = None
        if not self._accumulating:
            self._summed = {}

    def discard_accumulated(self) -> None:
        """Drops the clipped sums of skipped (virtual) steps: a logical batch left unfinished."""
        self._summed = {}
        self._accumulating = False

    def _refuse(self, message: str) -> None:
        """Discards what the refused step would have used (recorded passes, the clipped sums of
        its logical batch) and raises; p.grad, the optimizer and the accountant are untouched."""
        self.module.tape.clear()
        self.discard_accumulated()
        raise PrivacyStepError(message)

    def _exceeds_budget(self) -> bool:
        """Whether one more step would take epsilon(target_delta) past max_epsilon.

        An epsilon per step costs 0.1-0.5 s with the numerical accountants ("prv", "pld"), so the
        number of steps that fit is searched once (Accountant.steps_within) and counted down; it is
        searched again when sigma, q or the budget change or the accountant's history is not the
        one it was computed from plus this optimizer's own steps (a loaded or shared accountant)."""
        key = (self.noise_multiplier, self.sample_rate, self.target_delta, self.max_epsilon)
        history = [tuple(h) for h in self.accountant.history]
        taken = None if self._budget is None or self._budget[0] != key else _steps_since(self._budget[1], history, key)
        if taken is None:
            fit = self.accountant.steps_within(
                self.noise_multiplier, self.sample_rate, self.target_delta, self.max_epsilon
            )
            self._budget, taken = (key, history, fit), 0
        return taken + 1 > self._budget[2]

    def _check_one_pass(self, real: bool) -> None:
        """Refuses a step that does not rest on exactly one forward + backward of one batch."""
        tape = self.module.tape
        if tape.failure is not None:
            self._refuse(
                f"fastdp: optimizer.step() after a backward that failed: {tape.failure} Call "
                f"optimizer.zero_grad() and take the next step from a new forward and backward. {NOT_TAKEN}"
            )
        if len(tape.batches) > 1:
            self._refuse(
                f"fastdp: optimizer.step() after {len(tape.batches)} training forward passes of the private "
                f"model (each with its backward) since the last step. {ONE_PASS_PER_STEP} The recorded passes "
                f"were discarded. {NOT_TAKEN}"
            )
        loader = self.data_loader
        if loader is None:
            return
        if real and loader.batches_since_step > 1:
            self._refuse(
                f"fastdp: {loader.batches_since_step} batches were drawn from the Poisson DPDataLoader since "
                f"the last optimizer step. {ONE_PASS_PER_STEP} Each batch drawn from the DP data loader is one "
                "step: do not concatenate batches, do not skip a batch without taking its step (an empty batch "
                "gives a noise-only step), and draw evaluation batches from a separate DataLoader. "
                f"The batches were discarded. {NOT_TAKEN}"
            )
        if self._accumulating and loader.draws != self._accumulated_draw:
            self._refuse(
                "fastdp: the skipped (virtual) steps since the last real step used a batch drawn from the "
                "DPDataLoader before the current one, so one logical step would mix two Poisson batches. "
                f"{ONE_PASS_PER_STEP} The clipped sums of the skipped steps were discarded. {NOT_TAKEN}"
            )

    def _check_bypass(self) -> None:
        for p in self.params:
            if p.grad is not None and p.grad is not self._assigned.get(id(p)):
                if self.user_grad_sample:
                    raise PrivacyStepError(
                        f"fastdp: parameter '{self._names[id(p)]}' has a p.grad that fastdp did not set (a "
                        "loss.backward() through the model?). With grad_sample_mode='no_op' the step uses only "
                        "p.grad_sample (per-sample gradients you compute); call optimizer.zero_grad() and do not "
                        "backpropagate through the model, or use grad_sample_mode='hooks' to let fastdp compute "
                        "them from loss.backward()."
                    )
                raise PrivacyStepError(
                    f"fastdp: parameter '{self._names[id(p)]}' received a gradient that did not go through "
                    "the per-sample hooks (used outside its module, model run in eval mode, or a backward "
                    "through an unwrapped copy). Call optimizer.zero_grad() and train through the private "
                    "model."
                )

    def _batch_terms(self, batch: Batch):
        """(stored params, stored grads sg, their loss scale s, deferred contributions, sq_norms [B]).

        The per-sample gradients of stored parameter k are s * sg[k]: one scale common to every
        stored contribution is left to the fused clip (its final multiplier) and to the norms
        (times s^2), so no pass over the per-sample gradients applies it; contributions whose
        scales differ are scaled here instead (s = 1)."""
        contribs = list(batch.contributions)
        counts = _param_counts(contribs)
        kept: list[Stored] = []
        deferred: list[Deferred] = []
        for cont in contribs:
            if isinstance(cont, Deferred) and any(counts[id(p)] > 1 for p in cont.params):
                cont = Stored(cont.params, cont.materialize())
            if isinstance(cont, Deferred):
                deferred.append(cont)
            else:
                kept.append(cont)
        scales = {cont.scale for cont in kept}
        common = scales.pop() if len(scales) == 1 else 1.0
        stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for cont in kept:
            grads = cont.grads if cont.scale == common else cont.scaled()
            for p, g in zip(cont.params, grads, strict=True):
                if id(p) in stored:
                    stored[id(p)] = (p, stored[id(p)][1] + g)
                else:
                    stored[id(p)] = (p, g)
        sp = [p for p, _ in stored.values()]
        sg = [g.contiguous() for _, g in stored.values()]
        B = batch.batch_size
        device = self.params[0].device if self.params else torch.device("cpu")
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        if sg:
            sq = ops.per_sample_sq_norms(sg).to(dtype)
            if common != 1.0:
                sq = sq * (common * common)
        else:
            sq = torch.zeros(B, dtype=dtype, device=device)
        for d in deferred:
            sq = sq + d.sq_norms.to(dtype)
        return sp, sg, common, deferred, sq

    def _buffer(self, p: torch.Tensor) -> torch.Tensor:
        buf = self._summed.get(id(p))
        if buf is None:
            buf = torch.zeros_like(p, memory_format=torch.contiguous_format)
            self._summed[id(p)] = buf
        return buf

    # No autograd in the DP step: a Deferred layer's clipped sum is computed from the layer's input,
    # which still carries the forward's graph, so with grad enabled p.grad would come out with a
    # grad_fn, keeping that graph (activations, the recorded batch) alive until the next step and
    # spending autograd book-keeping on every clipped sum.
    @torch.no_grad()
    def accumulate_clipped(self) -> None:
        """Clips the recorded batch and adds its clipped sum into the running sum.

        More than one recorded batch is refused (see _check_one_pass); none is a noise-only step.
        In grad_sample_mode="no_op" the batch is the parameters' p.grad_sample instead."""
        tape = self.module.tape
        if self.user_grad_sample:
            batch = self._user_grad_sample_batch()
        else:
            if tape.awaiting_backward:
                tape.clear()
                raise PrivacyStepError("fastdp: optimizer.step() after a forward without backward; batch discarded")
            if len(tape.batches) > 1:
                tape.clear()
                raise PrivacyStepError(f"fastdp: {ONE_PASS_PER_STEP}")
            if not tape.batches:
                return
            batch = tape.batches[0]
        if self.max_grad_norms is not None:
            self._accumulate_per_parameter(batch)
            tape.clear()
            return
        sp, sg, stored_scale, deferred, sq = self._batch_terms(batch)
        if not torch.isfinite(sq).all():
            bad = torch.nonzero(~torch.isfinite(sq)).flatten().tolist()[:8]
            tape.clear()
            raise PrivacyStepError(
                f"fastdp: non-finite per-sample gradient norm for samples {bad} (NaN or inf loss?). The step "
                "was not taken and no gradient, optimizer or accountant state changed."
            )
        if sg:
            # uninitialised: the fused op writes every element
            outs = [torch.empty_like(p, memory_format=torch.contiguous_format) for p in sp]
            c = ops.clip_accumulate_noise(sg, sq, outs, self.max_grad_norm, 0.0, stored_scale, 0, 0)
            for p, o in zip(sp, outs, strict=True):
                self._add_to_sum(p, o)
        else:
            c = (self.max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        for d in deferred:
            for p, s in zip(d.params, d.clipped_sum(c), strict=True):
                self._add_to_sum(p, s)
        tape.clear()

    def _add_to_sum(self, p: torch.Tensor, s: torch.Tensor) -> None:
        """Adds a clipped sum s (a tensor of this step's own, p's shape) into p's running sum; the
        first one becomes the sum itself (no zero-filled buffer to add it to)."""
        buf = self._summed.get(id(p))
        if buf is None:
            self._summed[id(p)] = s.to(p.dtype).contiguous()
        else:
            buf.add_(s)

    def _user_grad_sample_batch(self) -> Batch:
        """grad_sample_mode="no_op": the batch made of every trainable parameter's p.grad_sample.

        p.grad_sample: [B, *p.shape] (or a list of such, concatenated along dim 0), the gradients of
        the per-sample losses (Opacus's definition: no 1/B for loss_reduction="mean"; the step divides
        the clipped sum by E[B]). Consumed here: a later step needs new ones."""
        missing = [self._names[id(p)] for p in self.params if getattr(p, "grad_sample", None) is None]
        if missing:
            self._refuse(
                f"fastdp: grad_sample_mode='no_op': trainable parameter(s) {missing[:8]} have no p.grad_sample. "
                "In this mode you compute the per-sample gradients yourself: before optimizer.step() set "
                "p.grad_sample = the gradients of each sample's own loss, shape [B, *p.shape], for every trainable "
                "parameter (e.g. torch.func.vmap(torch.func.grad(loss of one sample))), or freeze the parameter "
                f"(requires_grad_(False)); or use grad_sample_mode='hooks'. {NOT_TAKEN}"
            )
        grads = []
        for p in self.params:
            g = p.grad_sample
            if isinstance(g, (list, tuple)):
                g = torch.cat(list(g), dim=0)
            if not isinstance(g, torch.Tensor) or tuple(g.shape[1:]) != tuple(p.shape):
                shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
                self._refuse(
                    f"fastdp: grad_sample_mode='no_op': p.grad_sample of '{self._names[id(p)]}' is {shape}; it must "
                    f"be [B, *p.shape] = [B, {', '.join(map(str, p.shape))}] (one gradient per sample). {NOT_TAKEN}"
                )
            grads.append(g.detach().to(device=p.device, dtype=p.dtype).contiguous())
        sizes = {self._names[id(p)]: g.shape[0] for p, g in zip(self.params, grads, strict=True)}
        if len(set(sizes.values())) > 1:
            self._refuse(
                f"fastdp: grad_sample_mode='no_op': the p.grad_sample batch sizes differ ({sizes}); every trainable "
                f"parameter needs the per-sample gradients of the same batch. {NOT_TAKEN}"
            )
        for p in self.params:
            p.grad_sample = None
        B = next(iter(sizes.values())) if sizes else 0
        return Batch(B, "grad_sample", [Stored(list(self.params), grads)] if grads else [])

    def _accumulate_per_parameter(self, batch: Batch) -> None:
        """Per-layer clipping: each parameter's per-sample gradient g_ik is clipped to its own C_k,
        c_ik = min(1, C_k / (||g_ik|| + 1e-6)), and sum_i c_ik g_ik added into the running sum.

        A deferred contribution with one parameter gives that parameter's norms and clipped sum
        directly; one with several (weight and bias: one norm for both) or a shared parameter is
        materialized. Parameters without a bound (not in the optimizer) are not updated: skipped."""
        contribs = list(batch.contributions)
        counts = _param_counts(contribs)
        stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        single: list[tuple[torch.Tensor, Deferred]] = []
        for cont in contribs:
            if isinstance(cont, Deferred) and (len(cont.params) > 1 or counts[id(cont.params[0])] > 1):
                cont = Stored(cont.params, cont.materialize())
            if isinstance(cont, Deferred):
                single.append((cont.params[0], cont))
                continue
            for p, g in zip(cont.params, cont.scaled(), strict=True):
                stored[id(p)] = (p, stored[id(p)][1] + g) if id(p) in stored else (p, g)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        terms = [
            (p, g.contiguous(), ops.per_sample_sq_norms([g.contiguous()]).to(dtype), None)
            for p, g in stored.values()
            if id(p) in self._clip_of
        ]
        terms += [(p, None, d.sq_norms.to(dtype), d) for p, d in single if id(p) in self._clip_of]
        device = self.params[0].device if self.params else torch.device("cpu")
        total = sum((sq for _, _, sq, _ in terms), torch.zeros(batch.batch_size, dtype=dtype, device=device))
        if not torch.isfinite(total).all():
            bad = torch.nonzero(~torch.isfinite(total)).flatten().tolist()[:8]
            self.module.tape.clear()
            raise PrivacyStepError(
                f"fastdp: non-finite per-sample gradient norm for samples {bad} (NaN or inf loss?). The step "
                "was not taken and no gradient, optimizer or accountant state changed."
            )
        for p, g, sq, d in terms:
            bound = self._clip_of[id(p)]
            if d is None:
                out = torch.zeros_like(p, memory_format=torch.contiguous_format)
                ops.clip_accumulate_noise([g], sq, [out], bound, 0.0, 1.0, 0, 0)
                self._buffer(p).add_(out)
            else:
                c = (bound / (sq.sqrt() + 1e-6)).clamp(max=1.0)
                self._buffer(p).add_(d.clipped_sum(c)[0])

    @torch.no_grad()
    def pre_step(self) -> bool:
        """Everything DP before the wrapped optimizer's step; False when the step is skipped.

        A refused real step (PrivacyStepError, PrivacyBudgetExceeded) also ends the loader's
        count: the batch it drew is discarded, so the loop may go on with the next one."""
        real = not self._skip_next
        try:
            self._check_one_pass(real)
            if self.max_epsilon is not None and self.accountant is not None and real and self._exceeds_budget():
                eps = self.accountant.epsilon_after(self.noise_multiplier, self.sample_rate, self.target_delta)
                if eps > self.max_epsilon:
                    raise PrivacyBudgetExceeded(
                        f"fastdp: this step would spend epsilon {eps:.4g} > max_epsilon {self.max_epsilon} at "
                        f"delta {self.target_delta}; no update was applied."
                    )
            self._check_bypass()
            self.accumulate_clipped()
        except (PrivacyStepError, PrivacyBudgetExceeded):
            if real and self.data_loader is not None:
                self.data_loader.end_step()
            raise
        if not real:
            self._skip_next = False
            if not self._accumulating and self.data_loader is not None:
                self._accumulated_draw = self.data_loader.draws
            self._accumulating = True
            return False
        grads = [self._buffer(p) for p in self.params]
        scale = 1.0 / self.expected_batch_size if self.loss_reduction == "mean" else 1.0
        seed, offset = self.noise_source.next()
        ops.add_noise_scale_(grads, self.noise_multiplier * self.max_grad_norm, scale, seed, offset)
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        self._assigned = {id(p): g for p, g in zip(self.params, grads, strict=True)}
        self._summed = {}
        self._accumulating = False
        if self.accountant is not None:
            self.accountant.step(self.noise_multiplier, self.sample_rate)
        if self.data_loader is not None:
            self.data_loader.end_step()
        if self.step_hook is not None:
            self.step_hook(self)
        return True

    def step(self, closure: Callable | None = None):
        """DP step: clip, noise, scale, then the wrapped optimizer's step. Returns its result."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        if self.pre_step():
            return self.original_optimizer.step()
        return None


def _steps_since(before: list[tuple], now: list[tuple], key: tuple) -> int | None:
    """Steps at (sigma, q) = key[:2] added to accountant history `before` to give `now`; None when
    `now` is not `before` plus such steps (the history was replaced, or other steps were added)."""
    sigma_q = (float(key[0]), float(key[1]))
    if now == before:
        return 0
    if len(now) == len(before) + 1 and now[:-1] == before and tuple(now[-1][:2]) == sigma_q:
        return int(now[-1][2])
    if before and len(now) == len(before) and now[:-1] == before[:-1] and tuple(now[-1][:2]) == sigma_q:
        grown = int(now[-1][2]) - int(before[-1][2])
        return grown if tuple(before[-1][:2]) == sigma_q and grown >= 0 else None
    return None


def _param_counts(contribs: list) -> dict[int, int]:
    """id(parameter) -> how many contributions record it (more than one: a shared parameter)."""
    counts: dict[int, int] = {}
    for cont in contribs:
        for p in cont.params:
            counts[id(p)] = counts.get(id(p), 0) + 1
    return counts
