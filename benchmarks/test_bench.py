"""pytest-benchmark harness: a few small, fixed cases that track fastdp's speed across commits.

    pytest benchmarks/ --benchmark-json=out.json          # run, write the numbers
    pytest benchmarks/ --benchmark-autosave                # run, save under .bench/pytest-benchmark/
    pytest benchmarks/ --benchmark-compare                 # run, compare with the last saved run

Cases (CPU, whatever torch threads FASTDP_BENCH_THREADS sets; see conftest.py):
- the fused clip + sum + noise op (bench_ops.py's case, B=16, P=2M over 60 tensors);
- one fixed Poisson sequence of STEPS steps of unet_small at 64x64 (E[B]=16 of N=600, seed 0:
  the same sizes and slices on every commit), trained non-private and with fastdp, each
  - warm: a model that already ran the sequence once (tuned conv methods, oneDNN primitives);
  - cold: a fresh model per round, made private inside the round, so fastdp's per-model first-call
    costs (make_private, conv tuning on each new shape) are timed. Process-wide caches (oneDNN)
    stay warm, so "cold" is per model, not per process.
One round is the whole sequence; its time (s) is what is compared. Not part of the test suite
(pyproject's testpaths is tests/); no assertion on speed: the numbers are for comparing.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench_ops import tensor_sizes  # noqa: E402
from bench_poisson import Case, batch_of, make_runner  # noqa: E402
from common import poisson_batches  # noqa: E402

import fastdp  # noqa: E402
from fastdp import ops  # noqa: E402
from fastdp.models import build_model  # noqa: E402

CASE = Case(model="unet_small", size=64, expected_batch=16, dataset_size=600, steps=6, seed=0)
ROUNDS = 3


@pytest.fixture(scope="module")
def compiled_core() -> None:
    """The benchmarks time the compiled core; on the reference path they would time something else."""
    if not fastdp.has_kernel("cpu"):
        pytest.fail(f"fastdp has no compiled CPU kernels: {fastdp.compiled_error()}")


@pytest.fixture(scope="module")
def sequence() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """CASE's Poisson batches: (x [B_t, 1, 64, 64] float32, y [B_t, 64, 64] int64) per step."""
    batches = poisson_batches(CASE.dataset_size, CASE.expected_batch, CASE.steps, CASE.seed)
    assert all(len(idx) for idx in batches), "an empty Poisson batch: change CASE.seed"
    return [batch_of(CASE, idx, "cpu") for idx in batches]


def _train(runner, sequence) -> None:
    for x, y in sequence:
        runner.step(x, y)


def _describe(benchmark, sequence) -> None:
    benchmark.extra_info.update(
        batch_sizes=[len(x) for x, _ in sequence],
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        compiled_core=fastdp.compiled_available(),
    )


@pytest.mark.benchmark(group="fused-op")
def test_fused_clip_accumulate_noise(benchmark, compiled_core) -> None:
    batch, total = 16, 2_000_000
    grads = [torch.randn(batch, s) for s in tensor_sizes(total)]
    outs = [torch.empty(g.shape[1]) for g in grads]
    noise = fastdp.NoiseSource(seed=0)

    def fused() -> None:
        seed, offset = noise.next()
        sq_norms = ops.per_sample_sq_norms(grads)
        ops.clip_accumulate_noise(grads, sq_norms, outs, 1.0, 1.0, 1.0 / batch, seed, offset)

    benchmark.extra_info.update(B=batch, P=total, tensors=len(grads), torch_threads=torch.get_num_threads())
    benchmark(fused)


@pytest.mark.benchmark(group="unet_small-64-poisson-warm")
@pytest.mark.parametrize("mode", ["nonprivate", "fastdp"])
def test_step_sequence_warm(benchmark, compiled_core, sequence, mode) -> None:
    torch.manual_seed(CASE.seed)
    runner = make_runner(mode, build_model(CASE.model), CASE, "cpu")
    _train(runner, sequence)  # warm-up: conv tuning and oneDNN primitives for every shape
    _describe(benchmark, sequence)
    benchmark.pedantic(_train, args=(runner, sequence), rounds=ROUNDS, iterations=1)


@pytest.mark.benchmark(group="unet_small-64-poisson-cold")
@pytest.mark.parametrize("mode", ["nonprivate", "fastdp"])
def test_step_sequence_cold(benchmark, compiled_core, sequence, mode) -> None:
    torch.manual_seed(CASE.seed)
    base = build_model(CASE.model)
    _train(make_runner("nonprivate", base, CASE, "cpu"), sequence[:1])  # once-per-process imports

    def fresh_model_then_train() -> None:
        _train(make_runner(mode, base, CASE, "cpu"), sequence)

    _describe(benchmark, sequence)
    benchmark.pedantic(fresh_model_then_train, rounds=ROUNDS, iterations=1)
