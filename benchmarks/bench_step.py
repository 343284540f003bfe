"""Training-step benchmark: non-private vs fastdp vs Opacus (hooks / functorch / ghost) vs a
microbatch-of-one loop, on a 4-level GroupNorm U-Net (16/32/64/128 channels, 1xSxS input,
2 classes, per-sample cross-entropy + soft Dice).

Steps of all modes are interleaved in one process (one step of each mode per repetition) and
the median is reported, so background load affects all modes alike. Peak extra memory is
measured per mode in a fresh subprocess: CUDA max_memory_allocated, or on CPU the peak RSS
during the steps minus the RSS before them.

    python benchmarks/bench_step.py                       # CPU, B=16,32, 128x128
    python benchmarks/bench_step.py --device cuda --sizes 128,256 --json out.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import peak_extra_mb, run_memory_worker  # noqa: E402

warnings.filterwarnings("ignore")


class SegLoss(nn.Module):
    """Cross-entropy + soft Dice per sample (reduced over pixels inside the sample), then
    `reduction` over the batch ("mean", "sum" or "none" -> [B]; Opacus ghost mode sets "none")."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.cross_entropy(logits, target, reduction="none").flatten(1).mean(1)
        prob = logits.softmax(1)
        onehot = nn.functional.one_hot(target, logits.shape[1]).movedim(-1, 1).to(prob.dtype)
        inter = (prob * onehot).flatten(2).sum(2)
        denom = (prob + onehot).flatten(2).sum(2)
        per_sample = ce + 1 - ((2 * inter + 1e-5) / (denom + 1e-5)).mean(1)
        if self.reduction == "none":
            return per_sample
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.GroupNorm(8, cout),
        nn.ReLU(),
        nn.Conv2d(cout, cout, 3, padding=1),
        nn.GroupNorm(8, cout),
        nn.ReLU(),
    )


class UNet(nn.Module):
    """4-level GroupNorm U-Net, Upsample + Conv up path."""

    def __init__(self, channels=(16, 32, 64, 128), in_ch: int = 1, classes: int = 2) -> None:
        super().__init__()
        c = channels
        self.enc = nn.ModuleList([_block(in_ch, c[0])] + [_block(c[i], c[i + 1]) for i in range(len(c) - 1)])
        self.up = nn.ModuleList(
            [
                nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c[i + 1], c[i], 3, padding=1))
                for i in range(len(c) - 1)
            ]
        )
        self.dec = nn.ModuleList([_block(2 * c[i], c[i]) for i in range(len(c) - 1)])
        self.head = nn.Conv2d(c[0], classes, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, enc in enumerate(self.enc):
            x = enc(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(len(self.dec))):
            x = self.dec[i](torch.cat([self.up[i](x), skips.pop()], 1))
        return self.head(x)


SIGMA, CLIP = 1.0, 1.0


class Mode:
    """One way of taking a training step; `step(x, y)` runs forward + backward + update.

    By default the DP modes are made private for fixed batches of `batch` samples (sample rate
    1/10). With `poisson=True` they are made private the way a Poisson-sampled training run is
    (sample rate q = batch / dataset_size, so E[B] = batch, and 1/E[B] scaling): the caller then
    feeds batches of varying size B_t (see bench_poisson.py). The Poisson loaders made here only
    set q: batches are never drawn from them.
    """

    def __init__(
        self,
        name: str,
        base: nn.Module,
        batch: int,
        device: str,
        *,
        dataset_size: int | None = None,
        poisson: bool = False,
        criterion: nn.Module | None = None,
    ) -> None:
        self.name = name
        self.model = copy.deepcopy(base).to(device)
        self.crit = criterion if criterion is not None else SegLoss()
        n = dataset_size or 10 * batch  # dataset size for the sample rate (q = B / N)
        ds = torch.utils.data.TensorDataset(torch.zeros(n, 1), torch.zeros(n))
        loader = torch.utils.data.DataLoader(ds, batch_size=batch)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.expected = float(batch)
        if name == "fastdp":
            import fastdp
            from fastdp.engine import DPDataLoader

            engine = fastdp.PrivacyEngine(seed=0)
            self.model, self.opt, _ = engine.make_private(
                module=self.model,
                optimizer=self.opt,
                # a DPDataLoader is kept as it is, so q is exactly batch / n (not 1 / len(loader))
                data_loader=DPDataLoader(ds, sample_rate=batch / n) if poisson else loader,
                noise_multiplier=SIGMA,
                max_grad_norm=CLIP,
                poisson_sampling=poisson,
            )
        elif name.startswith("opacus"):
            from opacus import PrivacyEngine

            mode = name.split("-")[1]
            engine = PrivacyEngine()
            kw = dict(
                module=self.model,
                optimizer=self.opt,
                data_loader=loader,
                noise_multiplier=SIGMA,
                max_grad_norm=CLIP,
                poisson_sampling=poisson,
                grad_sample_mode=mode,
            )
            if mode == "ghost":
                self.model, self.opt, self.crit, _ = engine.make_private(criterion=self.crit, **kw)
            else:
                self.model, self.opt, _ = engine.make_private(**kw)
            if poisson:
                # Opacus derives E[B] as int(N / len(loader)) (15 for N=600, B=16); use the same
                # 1/E[B] scale as fastdp so both take the same step
                self.opt.expected_batch_size = batch
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.name == "microbatch":
            self._microbatch_step(x, y)
            return
        self.opt.zero_grad()
        self.crit(self.model(x), y).backward()
        self.opt.step()

    def _microbatch_step(self, x, y) -> None:
        """What the paper's code did: one forward/backward per sample, clip, sum, noise."""
        summed = [torch.zeros_like(p) for p in self.params]
        for i in range(x.shape[0]):
            self.opt.zero_grad()
            self.crit(self.model(x[i : i + 1]), y[i : i + 1]).backward()
            grads = [p.grad for p in self.params]
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            c = (CLIP / (norm + 1e-6)).clamp(max=1.0)
            for s, g in zip(summed, grads, strict=True):
                s.add_(g, alpha=float(c))
        for p, s in zip(self.params, summed, strict=True):
            p.grad = (s + SIGMA * CLIP * torch.randn_like(s)) / self.expected
        self.opt.step()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def available_modes() -> list[str]:
    modes = ["nonprivate", "fastdp"]
    try:
        import opacus  # noqa: F401

        modes += ["opacus-hooks", "opacus-functorch", "opacus-ghost"]
    except ImportError:
        pass
    return modes + ["microbatch"]


def _data(batch: int, size: int, device: str):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, generator=g)
    y = (x[:, 0] > 0.5).long()
    return x.to(device), y.to(device)


def time_modes(modes, batch, size, device, reps, warmup):
    torch.manual_seed(0)
    base = UNet()
    runners = [Mode(m, base, batch, device) for m in modes]
    x, y = _data(batch, size, device)
    times = {m: [] for m in modes}
    for r in range(warmup + reps):
        for run in runners:
            _sync(device)
            t0 = time.perf_counter()
            run.step(x, y)
            _sync(device)
            if r >= warmup:
                times[run.name].append(1000 * (time.perf_counter() - t0))
    return {m: statistics.median(v) for m, v in times.items()}, {m: v for m, v in times.items()}


def memory_worker(mode: str, batch: int, size: int, device: str) -> float:
    """Peak extra memory (MB) of two steps of `mode`, in this (fresh) process."""
    torch.manual_seed(0)
    run = Mode(mode, UNet(), batch, device)
    x, y = _data(batch, size, device)

    def two_steps() -> None:
        for _ in range(2):
            run.step(x, y)

    return peak_extra_mb(two_steps, device)


def measure_memory(mode, batch, size, device) -> float | None:
    cmd = [sys.executable, __file__, "--_mem", f"{mode},{batch},{size}", "--device", device]
    return run_memory_worker(cmd, mode, timeout=900)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", default="16,32", help="comma-separated batch sizes")
    ap.add_argument("--sizes", default="128", help="comma-separated input sizes (S for 1xSxS)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", default=None, help="comma-separated subset of modes")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write results to this path")
    ap.add_argument("--_mem", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args._mem:
        mode, batch, size = args._mem.split(",")
        print(f"MEM {memory_worker(mode, int(batch), int(size), args.device):.1f}")
        return
    modes = args.modes.split(",") if args.modes else available_modes()
    if "nonprivate" not in modes:
        modes = ["nonprivate"] + modes
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for batch in [int(b) for b in args.batches.split(",")]:
            med, raw = time_modes(modes, batch, size, args.device, args.reps, args.warmup)
            mem = {m: (None if args.no_memory else measure_memory(m, batch, size, args.device)) for m in modes}
            for m in modes:
                results.append(
                    {
                        "mode": m,
                        "batch": batch,
                        "size": size,
                        "device": args.device,
                        "median_ms": med[m],
                        "ratio": med[m] / med["nonprivate"],
                        # ratio within each repetition (adjacent in time), then the median: robust
                        # to background load that drifts between repetitions
                        "paired_ratio": statistics.median(
                            a / b for a, b in zip(raw[m], raw["nonprivate"], strict=True)
                        ),
                        "times_ms": raw[m],
                        "peak_extra_mb": mem[m],
                        "memory_ratio": (mem[m] / mem["nonprivate"]) if mem[m] and mem["nonprivate"] else None,
                    }
                )
            print(f"done size={size} B={batch}", file=sys.stderr, flush=True)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev, "torch": torch.__version__, "results": results}, f, indent=1)
    print(f"\nU-Net 16/32/64/128, {dev}, torch {torch.__version__}, median of {args.reps} interleaved steps\n")
    print("| input | B | mode | ms/step | x non-private | paired x | peak extra MB | x non-private mem |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        mem = "-" if r["peak_extra_mb"] is None else f"{r['peak_extra_mb']:.0f}"
        mr = "-" if r["memory_ratio"] is None else f"{r['memory_ratio']:.2f}"
        print(
            f"| {r['size']}x{r['size']} | {r['batch']} | {r['mode']} | {r['median_ms']:.0f} | "
            f"{r['ratio']:.2f} | {r['paired_ratio']:.2f} | {mem} | {mr} |"
        )


if __name__ == "__main__":
    main()
