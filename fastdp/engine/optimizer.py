"""DPOptimizer: turns the recorded per-sample information into clipped, noised gradients.

optimizer.step() (1) refuses the step if it would exceed max_epsilon, (2) for each recorded
batch sums the per-layer squared norms into per-sample norms, clip factors
c_i = min(1, C / (||g_i|| + 1e-6)), and adds sum_i c_i g_i into a running clipped sum (fused
op for stored per-sample gradients, one c-scaled weight-gradient computation for deferred
layers), (3) unless the step is a skipped virtual step (BatchMemoryManager), adds
N(0, sigma^2 C^2) and scales by 1/E[B] in one fused op, records the step with the accountant
and runs the wrapped optimizer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastdp import ops
from fastdp.accounting import Accountant, PrivacyBudgetExceeded
from fastdp.engine.errors import PrivacyStepError
from fastdp.engine.grad_sample import PrivateModule
from fastdp.engine.tape import Batch, Deferred, Stored
from fastdp.noise import NoiseSource


class DPOptimizer(torch.optim.Optimizer):
    """Wraps any torch.optim optimizer so that step() applies DP-SGD's clip + noise first.

    Args:
        optimizer: the wrapped optimizer (SGD, Adam, AdamW, ...), over the model's parameters.
        module: the PrivateModule whose backward records per-sample information.
        noise_multiplier: sigma; the noise std is sigma * max_grad_norm.
        max_grad_norm: clipping bound C (L2 norm of each sample's full gradient).
        expected_batch_size: E[B] = sample_rate * N; gradients are divided by it ("mean").
        sample_rate: Poisson sampling rate q, for the accountant.
        accountant: where steps are recorded; None records nothing.
        noise_source: (seed, offset) pairs for the noise op.
        max_epsilon, target_delta: refuse steps after which epsilon(target_delta) > max_epsilon.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        module: PrivateModule,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: float,
        sample_rate: float,
        accountant: Accountant | None,
        noise_source: NoiseSource,
        loss_reduction: str = "mean",
        max_epsilon: float | None = None,
        target_delta: float | None = None,
    ) -> None:
        if max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if noise_multiplier < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if max_epsilon is not None and target_delta is None:
            raise ValueError("max_epsilon needs target_delta")
        self.original_optimizer = optimizer
        self.module = module
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        self.expected_batch_size = float(expected_batch_size)
        self.sample_rate = float(sample_rate)
        self.accountant = accountant
        self.noise_source = noise_source
        self.loss_reduction = loss_reduction
        self.max_epsilon = max_epsilon
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

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears p.grad and discards recorded but unstepped batches; the clipped sum of skipped
        (virtual) steps is kept until the real step."""
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        self.module.tape.clear()
        if not self._accumulating:
            self._summed = {}

    def _check_bypass(self) -> None:
        for p in self.params:
            if p.grad is not None and p.grad is not self._assigned.get(id(p)):
                raise PrivacyStepError(
                    f"fastdp: parameter '{self._names[id(p)]}' received a gradient that did not go through "
                    "the per-sample hooks (used outside its module, model run in eval mode, or a backward "
                    "through an unwrapped copy). Call optimizer.zero_grad() and train through the private "
                    "model."
                )

    def _batch_terms(self, batch: Batch):
        """(stored params, stored per-sample grads, deferred contributions, sq_norms [B])."""
        contribs = list(batch.contributions)
        counts: dict[int, int] = {}
        for cont in contribs:
            for p in cont.params:
                counts[id(p)] = counts.get(id(p), 0) + 1
        stored: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        deferred: list[Deferred] = []
        for cont in contribs:
            if isinstance(cont, Deferred) and any(counts[id(p)] > 1 for p in cont.params):
                cont = Stored(cont.params, cont.materialize())
            if isinstance(cont, Deferred):
                deferred.append(cont)
                continue
            for p, g in zip(cont.params, cont.grads, strict=True):
                if id(p) in stored:
                    stored[id(p)] = (p, stored[id(p)][1] + g)
                else:
                    stored[id(p)] = (p, g)
        sp = [p for p, _ in stored.values()]
        sg = [g.contiguous() for _, g in stored.values()]
        B = batch.batch_size
        device = self.params[0].device if self.params else torch.device("cpu")
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32
        sq = ops.per_sample_sq_norms(sg).to(dtype) if sg else torch.zeros(B, dtype=dtype, device=device)
        for d in deferred:
            sq = sq + d.sq_norms.to(dtype)
        return sp, sg, deferred, sq

    def _buffer(self, p: torch.Tensor) -> torch.Tensor:
        buf = self._summed.get(id(p))
        if buf is None:
            buf = torch.zeros_like(p, memory_format=torch.contiguous_format)
            self._summed[id(p)] = buf
        return buf

    def accumulate_clipped(self) -> None:
        """Clips the recorded batches and adds their clipped sums into the running sum."""
        tape = self.module.tape
        if tape.awaiting_backward:
            tape.clear()
            raise PrivacyStepError("fastdp: optimizer.step() after a forward without backward; batch discarded")
        terms = [self._batch_terms(b) for b in tape.batches]
        for i, (_, _, _, sq) in enumerate(terms):
            if not torch.isfinite(sq).all():
                bad = torch.nonzero(~torch.isfinite(sq)).flatten().tolist()[:8]
                tape.clear()
                raise PrivacyStepError(
                    f"fastdp: non-finite per-sample gradient norm for samples {bad} of batch {i} (NaN or inf "
                    "loss?). The step was not taken and no gradient, optimizer or accountant state changed."
                )
        for sp, sg, deferred, sq in terms:
            fresh = [id(p) not in self._summed for p in sp]
            if sg:
                outs = [self._buffer(p) if f else torch.zeros_like(p) for p, f in zip(sp, fresh, strict=True)]
                c = ops.clip_accumulate_noise(sg, sq, outs, self.max_grad_norm, 0.0, 1.0, 0, 0)
                for p, f, o in zip(sp, fresh, outs, strict=True):
                    if not f:
                        self._summed[id(p)].add_(o)
            else:
                c = (self.max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
            for d in deferred:
                for p, s in zip(d.params, d.clipped_sum(c), strict=True):
                    self._buffer(p).add_(s)
        tape.clear()

    def pre_step(self) -> bool:
        """Everything DP before the wrapped optimizer's step; False when the step is skipped."""
        if self.max_epsilon is not None and self.accountant is not None and not self._skip_next:
            eps = self.accountant.epsilon_after(self.noise_multiplier, self.sample_rate, self.target_delta)
            if eps > self.max_epsilon:
                raise PrivacyBudgetExceeded(
                    f"fastdp: this step would spend epsilon {eps:.4g} > max_epsilon {self.max_epsilon} at "
                    f"delta {self.target_delta}; no update was applied."
                )
        self._check_bypass()
        self.accumulate_clipped()
        if self._skip_next:
            self._skip_next = False
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
