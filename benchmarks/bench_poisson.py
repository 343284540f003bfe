"""Poisson-batch training benchmark: a whole DP-SGD run's step sequence, non-private vs fastdp vs Opacus.

A DP-SGD run draws a Poisson batch per step: each of the N samples joins with probability
q = E[B] / N, so batch sizes vary (Binomial(N, q)) and every new size is a new shape for the
kernels, oneDNN and fastdp's per-layer conv tuner. This benchmark trains one seeded sequence of
such batches (same sizes, same phantom CT slices: fastdp.data.PhantomDataset, site_a) three
ways from the same initial weights:

- nonprivate: plain torch (SGD, lr 1e-3);
- fastdp: fastdp.PrivacyEngine, sigma = 1, C = 1, noise on, q = E[B] / N;
- opacus: Opacus hooks mode (its functorch fallback for layers it has no hook for), same settings.

Steps are interleaved in one process (step t runs one step of every mode, in an order rotated
by t) so background load hits all modes alike. Reported per mode: the total time of ALL steps
(first-call costs included: oneDNN primitives and fastdp's conv tuning for each new shape, what
a user pays), the total of the second half of the steps (closer to steady state), both as
multiples of non-private, setup time (model copy + make_private), and peak extra memory of 3
steps at the sequence's largest batch (fresh subprocess per mode; see bench_step.py).

Models: unet4 (bench_step.py's 4-level GroupNorm U-Net, 16/32/64/128 channels, CE + soft Dice)
and unet_small (fastdp.models.build_model("unet_small"): 3 levels, 16 base channels, PReLU,
ConvTranspose2d, 0.47M parameters, fastdp's per-sample MONAI Dice + CE, as in the demos).
Both take [B, 1, S, S] slices and predict 2 classes.

    python benchmarks/bench_poisson.py                         # default grid (minutes on 2 cores)
    python benchmarks/bench_poisson.py --steps 4 --sizes 64 --expected-batch 8 --threads 1
    python benchmarks/bench_poisson.py --scaling --json scaling.json   # fastdp / non-private grid
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import Mode, SegLoss, UNet  # noqa: E402
from common import (  # noqa: E402
    describe_machine,
    machine_info,
    markdown_table,
    peak_extra_mb,
    poisson_batches,
    rotated,
    run_memory_worker,
    synchronize,
)

import fastdp  # noqa: E402
from fastdp.data import PhantomDataset  # noqa: E402
from fastdp.models import build_model, dice_ce_criterion  # noqa: E402

warnings.filterwarnings("ignore")

MODE_NAMES = {"nonprivate": "nonprivate", "fastdp": "fastdp", "opacus": "opacus-hooks"}  # ours -> bench_step's
SCALING_SIZES = (64, 128, 256)
SCALING_BATCHES = (8, 16, 32, 64)
MEMORY_STEPS = 3  # fastdp's conv tuner times candidates on the first 2 calls of a shape: 3 include a tuned one


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: its constructor, its (per-sample, batch-mean) criterion, a description."""

    build: Callable[[], nn.Module]
    criterion: Callable[[], nn.Module]
    about: str


MODELS = {
    "unet4": ModelSpec(UNet, SegLoss, "bench_step's 4-level GroupNorm U-Net 16/32/64/128, CE + soft Dice"),
    "unet_small": ModelSpec(
        lambda: build_model("unet_small"), dice_ce_criterion, "fastdp unet_small (3 levels, 16 base), Dice + CE"
    ),
}


@dataclass(frozen=True)
class Case:
    """One cell of the grid: model, input side S (slices [1, S, S]), E[B], N, steps, seed."""

    model: str
    size: int
    expected_batch: int
    dataset_size: int
    steps: int
    seed: int = 0

    def encode(self) -> str:
        return ",".join(str(v) for v in (self.model, self.size, self.expected_batch, self.dataset_size, self.steps))

    @classmethod
    def decode(cls, text: str, seed: int) -> Case:
        model, *nums = text.split(",")
        size, expected, n, steps = (int(v) for v in nums)
        return cls(model, size, expected, n, steps, seed)


_DATA: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def phantom_data(size: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """N phantom CT slices of site_a: images [N, 1, S, S] float32 in [0, 1], masks [N, S, S] uint8.

    Cached per (S, N, seed) for the process; masks are kept as uint8 (an 8x smaller resident
    dataset) and widened to int64 per batch.
    """
    key = (size, n, seed)
    if key not in _DATA:
        images, masks = PhantomDataset("site_a", n, size, seed).tensors()
        _DATA[key] = (images, masks.to(torch.uint8))
    return _DATA[key]


def batch_of(case: Case, idx: torch.Tensor, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The slices `idx` of the case's dataset: x [B, 1, S, S] float32, y [B, S, S] int64, on `device`."""
    images, masks = phantom_data(case.size, case.dataset_size, case.seed)
    return images[idx].to(device), masks[idx].long().to(device)


def make_runner(mode: str, base: nn.Module, case: Case, device: str) -> Mode:
    """bench_step's Mode for `mode`, made private for Poisson sampling with q = E[B] / N."""
    spec = MODELS[case.model]
    return Mode(
        MODE_NAMES[mode],
        base,
        case.expected_batch,
        device,
        dataset_size=case.dataset_size,
        poisson=True,
        criterion=spec.criterion(),
    )


def time_case(case: Case, modes: list[str], device: str) -> dict:
    """Trains the case's Poisson sequence in every mode, interleaved; per-step seconds per mode.

    Empty batches (probability (1 - q)^N per step, about e^-E[B]) are skipped by every mode and
    counted in `empty_steps`: what an empty step means differs (noise-only in DP), and the
    per-sample losses here are undefined on 0 samples.
    """
    batches = poisson_batches(case.dataset_size, case.expected_batch, case.steps, case.seed)
    phantom_data(case.size, case.dataset_size, case.seed)  # render before any timing
    torch.manual_seed(case.seed)
    base = MODELS[case.model].build()
    # Once-per-process costs are no one mode's setup: the first torch.optim optimizer imports
    # torch._dynamo (seconds), the first Dice criterion imports MONAI.
    make_runner("nonprivate", base, case, device)
    setup_s, runners = {}, {}
    for mode in modes:
        start = time.perf_counter()
        runners[mode] = make_runner(mode, base, case, device)
        setup_s[mode] = time.perf_counter() - start
    times: dict[str, list[float]] = {m: [] for m in modes}
    sizes, empty = [], 0
    for t, idx in enumerate(batches):
        if len(idx) == 0:
            empty += 1
            continue
        x, y = batch_of(case, idx, device)
        sizes.append(len(idx))
        for mode in rotated(modes, t):
            synchronize(device)
            start = time.perf_counter()
            runners[mode].step(x, y)
            synchronize(device)
            times[mode].append(time.perf_counter() - start)
    return {"times_s": times, "setup_s": setup_s, "batch_sizes": sizes, "empty_steps": empty}


def memory_worker(case: Case, mode: str, device: str) -> float:
    """Peak extra memory (MiB) of MEMORY_STEPS steps at the case's largest batch, in this fresh process.

    Only that batch's slices are rendered (PhantomDataset without its cache, item by item): no
    dataset-sized allocation precedes the steps (it would set the peak where the kernel refuses
    to reset it; see common.peak_extra_mb).
    """
    batches = poisson_batches(case.dataset_size, case.expected_batch, case.steps, case.seed)
    idx = max(batches, key=len)
    ds = PhantomDataset("site_a", case.dataset_size, case.size, case.seed, cache=False)
    items = [ds[int(i)] for i in idx]
    x = torch.stack([img for img, _ in items]).to(device)
    y = torch.stack([msk for _, msk in items]).long().to(device)
    torch.manual_seed(case.seed)
    run = make_runner(mode, MODELS[case.model].build(), case, device)

    def steps() -> None:
        for _ in range(MEMORY_STEPS):
            run.step(x, y)

    return peak_extra_mb(steps, device)


def measure_memory(case: Case, mode: str, device: str, threads: int) -> float | None:
    """memory_worker in a fresh interpreter, so neither the dataset nor what the allocator kept from
    other modes is counted or reused; None if it failed."""
    cmd = [sys.executable, __file__, "--_mem", f"{case.encode()},{mode}", "--seed", str(case.seed)]
    cmd += ["--device", device, "--threads", str(threads)]
    return run_memory_worker(cmd, f"{mode} {case}", timeout=1800)


def summarise(case: Case, timed: dict, memory: dict[str, float | None]) -> list[dict]:
    """One result row per mode: totals (all steps, second half), ratios to non-private, memory."""
    times = timed["times_s"]
    half = len(timed["batch_sizes"]) // 2
    base_all, base_half = sum(times["nonprivate"]), sum(times["nonprivate"][half:])
    base_mem = memory.get("nonprivate")
    rows = []
    for mode, ts in times.items():
        mem = memory.get(mode)
        rows.append(
            {
                "model": case.model,
                "size": case.size,
                "expected_batch": case.expected_batch,
                "dataset_size": case.dataset_size,
                "steps": case.steps,
                "mode": mode,
                "total_s": sum(ts),
                "ratio": sum(ts) / base_all if base_all else float("nan"),
                "second_half_s": sum(ts[half:]),
                "second_half_ratio": sum(ts[half:]) / base_half if base_half else float("nan"),
                "first_step_s": ts[0] if ts else float("nan"),
                "setup_s": timed["setup_s"][mode],
                "peak_extra_mb": mem,
                "memory_ratio": mem / base_mem if mem and base_mem else None,
                "times_s": ts,
                "batch_sizes": timed["batch_sizes"],
                "empty_steps": timed["empty_steps"],
            }
        )
    return rows


def results_table(results: list[dict]) -> str:
    """The main grid as Markdown: one row per (model, S, E[B], mode)."""
    header = [
        "model",
        "input",
        "E[B]",
        "mode",
        "total s (all steps)",
        "x non-private",
        "total s (2nd half)",
        "x non-private",
        "1st step s",
        "setup s",
        "peak extra MB",
        "x non-private mem",
    ]
    rows = [
        [
            r["model"],
            f"{r['size']}x{r['size']}",
            r["expected_batch"],
            r["mode"],
            f"{r['total_s']:.2f}",
            f"{r['ratio']:.2f}",
            f"{r['second_half_s']:.2f}",
            f"{r['second_half_ratio']:.2f}",
            f"{r['first_step_s']:.2f}",
            f"{r['setup_s']:.2f}",
            "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f}",
            "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}",
        ]
        for r in results
    ]
    return markdown_table(header, rows)


def scaling_table(results: list[dict]) -> str:
    """fastdp / non-private as an S x E[B] grid per model; each cell "all steps / second half"."""
    tables = []
    for model in dict.fromkeys(r["model"] for r in results):
        dp = [r for r in results if r["mode"] == "fastdp" and r["model"] == model]
        sizes = sorted({r["size"] for r in dp})
        batches = sorted({r["expected_batch"] for r in dp})
        cell = {(r["size"], r["expected_batch"]): f"{r['ratio']:.2f} / {r['second_half_ratio']:.2f}" for r in dp}
        rows = [[model, f"{s}x{s}"] + [cell.get((s, b), "-") for b in batches] for s in sizes]
        tables.append(markdown_table(["model", "input"] + [f"E[B]={b}" for b in batches], rows))
    return "\n\n".join(tables)


def heading(info: dict, args: argparse.Namespace, models: list[str], what: str, memory: bool) -> str:
    """The lines above a table: what, machine, fastdp build, the sequence's settings, the models."""
    core = "compiled core" if fastdp.compiled_available() else "NO compiled core (reference path)"
    setup = (
        f"Poisson batches: N = {args.dataset_size}, {args.steps} steps, q = E[B] / N, seed {args.seed}, identical "
        "sizes and slices in every mode; sigma = 1, C = 1; steps interleaved, order rotated each step"
    )
    if memory:
        setup += f"; peak extra memory: {MEMORY_STEPS} steps at the largest drawn batch, fresh process per mode"
    lines = [f"{what}. Machine: {describe_machine(info)}; fastdp {fastdp.__version__} ({core}).", setup + "."]
    lines += [f"- {m}: {MODELS[m].about}" for m in models]
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="unet4,unet_small", help=f"comma-separated, of {sorted(MODELS)}")
    ap.add_argument(
        "--sizes", default=None, help="comma-separated input sides S (default 64,128; --scaling 64,128,256)"
    )
    ap.add_argument("--expected-batch", default=None, help="comma-separated E[B] (default 16,32; --scaling 8,16,32,64)")
    ap.add_argument("--steps", type=int, default=60, help="steps per sequence (the ratios use all, and the 2nd half)")
    ap.add_argument("--dataset-size", type=int, default=600, help="N (600: one site of the federated demo)")
    ap.add_argument("--seed", type=int, default=0, help="seeds the batch sequence, the data and the weights")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-opacus", action="store_true", help="time non-private and fastdp only")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument(
        "--scaling", action="store_true", help="fastdp / non-private only, unet_small, S 64/128/256 x E[B] 8/16/32/64"
    )
    ap.add_argument("--json", default=None, help="write results, machine and Markdown to this path")
    ap.add_argument("--_mem", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args._mem:
        text, mode = args._mem.rsplit(",", 1)
        print(f"MEM {memory_worker(Case.decode(text, args.seed), mode, args.device):.1f}")
        return
    if args.device == "cpu" and not fastdp.compiled_available():
        print(f"warning: fastdp runs on its reference path: {fastdp.compiled_error()}", file=sys.stderr)
    if args.scaling:
        models = ["unet_small"] if args.models == ap.get_default("models") else args.models.split(",")
        sizes = _ints(args.sizes) if args.sizes else list(SCALING_SIZES)
        batches = _ints(args.expected_batch) if args.expected_batch else list(SCALING_BATCHES)
        modes = ["nonprivate", "fastdp"]
    else:
        models = args.models.split(",")
        sizes = _ints(args.sizes or "64,128")
        batches = _ints(args.expected_batch or "16,32")
        modes = ["nonprivate", "fastdp"] + ([] if args.no_opacus else ["opacus"])
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {sorted(MODELS)}")
    if modes[-1] == "opacus":
        try:
            import opacus  # noqa: F401
        except ImportError:
            print("opacus is not installed: timing non-private and fastdp only", file=sys.stderr)
            modes.pop()
    info = machine_info(args.device)
    results = []
    for model in models:
        for size in sizes:
            for expected in batches:
                case = Case(model, size, expected, args.dataset_size, args.steps, args.seed)
                timed = time_case(case, modes, args.device)
                skip = args.no_memory or args.scaling
                memory = {m: None if skip else measure_memory(case, m, args.device, args.threads) for m in modes}
                rows = summarise(case, timed, memory)
                results += rows
                ratios = "  ".join(
                    f"{r['mode']} x{r['ratio']:.2f} (2nd half x{r['second_half_ratio']:.2f})" for r in rows
                )
                print(f"done {model} {size}x{size} E[B]={expected}: {ratios}", file=sys.stderr, flush=True)
    if args.scaling:
        what = "fastdp step time / non-private step time (all steps / second half)"
        table = heading(info, args, models, what, memory=False) + "\n\n" + scaling_table(results)
    else:
        what = "Poisson-batch DP training: non-private vs fastdp" + (" vs Opacus hooks" if "opacus" in modes else "")
        table = heading(info, args, models, what, memory=not args.no_memory) + "\n\n" + results_table(results)
    print()
    print(table)
    if args.json:
        config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        payload = {"machine": info, "config": config, "results": results, "markdown": table}
        Path(args.json).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
