"""Kernel benchmark: fastdp's fused clip + accumulate + noise vs the reference path vs a copy.

For per-sample gradients of B samples over P parameters spread across ~60 tensors:
- fastdp: ops.per_sample_sq_norms + ops.clip_accumulate_noise (norm pass + one fused pass);
- reference: what Opacus does per parameter: per-parameter norms, stacked global norm, clip
  factors, einsum("i,i...") weighted sum, torch.normal noise, scale;
- copy: a plain copy of the same B*P gradient values (the memory-bandwidth yardstick).
GB/s counts the bytes each candidate must move: fastdp reads the gradients twice (norms, then
the clipped sum) and writes P values; the copy reads and writes B*P values. "of copy" is
fastdp's GB/s over the copy's GB/s.

    python benchmarks/bench_ops.py [--device cpu|cuda] [--batch 16,64] [--params 0.5,2,8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, markdown_table, median, time_interleaved  # noqa: E402

import fastdp  # noqa: E402
from fastdp import ops  # noqa: E402


def tensor_sizes(total: int, count: int = 60, seed: int = 0) -> list[int]:
    """Sizes of `count` tensors summing to `total`: half weight-like (large), half bias-like (small)."""
    gen = torch.Generator().manual_seed(seed)
    n_big = count // 2
    weights = torch.rand(n_big, generator=gen) * 2 + 0.2
    small = [int(x) for x in torch.randint(16, 257, (count - n_big,), generator=gen)]
    budget = total - sum(small)
    big = [max(1, int(budget * w / weights.sum())) for w in weights]
    big[-1] += budget - sum(big)
    sizes = []
    for b, s in zip(big, small, strict=True):
        sizes += [b, s]
    return sizes


def reference_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """Opacus-style per-sample norms: one norm per parameter, then the norm of those. [B]."""
    return torch.stack([g.reshape(len(g), -1).norm(2, dim=-1) for g in grads], dim=1).norm(2, dim=1)


def reference_clip_sum_noise(grads, norms, outs, max_norm, noise_std, scale) -> None:
    """Opacus-style clip + sum + noise + scale, one parameter at a time (einsum, torch.normal)."""
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g, o in zip(grads, outs, strict=True):
        summed = torch.einsum("i,i...", coef, g)
        noise = torch.normal(0.0, noise_std, size=summed.shape, device=summed.device)
        o.copy_((summed + noise) * scale)


def measure_case(device: str, batch: int, total: int, repeats: int, noise: fastdp.NoiseSource) -> dict:
    """Times every candidate for B=batch per-sample gradients over `total` parameters."""
    sizes = tensor_sizes(total)
    grads = [torch.randn(batch, s, device=device) for s in sizes]
    outs = [torch.empty(s, device=device) for s in sizes]
    outs_ref = [torch.empty(s, device=device) for s in sizes]
    copy_src = torch.randn(batch * total, device=device)
    copy_dst = torch.empty_like(copy_src)
    max_norm, noise_std, scale = 1.0, 1.0, 1.0 / batch
    sq = ops.per_sample_sq_norms(grads)
    norms = sq.sqrt()

    def fused(sq_norms=None):
        seed, offset = noise.next()
        sq_norms = ops.per_sample_sq_norms(grads) if sq_norms is None else sq_norms
        ops.clip_accumulate_noise(grads, sq_norms, outs, max_norm, noise_std, scale, seed, offset)

    fns = {
        "fastdp": fused,
        "reference": lambda: reference_clip_sum_noise(
            grads, reference_norms(grads), outs_ref, max_norm, noise_std, scale
        ),
        "fastdp_given_norms": lambda: fused(sq),
        "reference_given_norms": lambda: reference_clip_sum_noise(grads, norms, outs_ref, max_norm, noise_std, scale),
        "copy": lambda: copy_dst.copy_(copy_src),
    }
    t = {k: median(v) for k, v in time_interleaved(fns, device, repeats).items()}
    bytes_grads = batch * total * 4
    fused_gbs = (2 * bytes_grads + total * 4) / t["fastdp"] / 1e9  # norm pass + fused pass
    given_gbs = (bytes_grads + total * 4) / t["fastdp_given_norms"] / 1e9  # fused pass only
    copy_gbs = 2 * bytes_grads / t["copy"] / 1e9  # read + write
    return {
        "B": batch,
        "P": total,
        "tensors": len(sizes),
        "fastdp_ms": t["fastdp"] * 1e3,
        "reference_ms": t["reference"] * 1e3,
        "fastdp_given_norms_ms": t["fastdp_given_norms"] * 1e3,
        "reference_given_norms_ms": t["reference_given_norms"] * 1e3,
        "copy_ms": t["copy"] * 1e3,
        "speedup_vs_reference": t["reference"] / t["fastdp"],
        "speedup_given_norms": t["reference_given_norms"] / t["fastdp_given_norms"],
        "fastdp_GBps": fused_gbs,
        "fastdp_given_norms_GBps": given_gbs,
        "copy_GBps": copy_gbs,
        "fraction_of_copy_bw": fused_gbs / copy_gbs,
        "fraction_of_copy_bw_given_norms": given_gbs / copy_gbs,
        "repeats": repeats,
    }


def run(device: str, batches: list[int], params_m: list[float], repeats: int) -> list[dict]:
    results = []
    noise = fastdp.NoiseSource(seed=0)
    for batch in batches:
        for pm in params_m:
            row = measure_case(device, batch, int(pm * 1e6), repeats, noise)
            results.append(row)
            print(
                f"B={batch:3d} P={pm:4.1f}M  fastdp {row['fastdp_ms']:8.2f} ms  reference {row['reference_ms']:8.2f} ms"
                f"  copy {row['copy_ms']:8.2f} ms  speed-up {row['speedup_vs_reference']:5.2f}x"
                f" (given norms {row['speedup_given_norms']:5.2f}x)"
                f"  {row['fastdp_GBps']:6.1f} GB/s = {100 * row['fraction_of_copy_bw']:5.1f}% of copy",
                flush=True,
            )
    return results


def to_markdown(results: list[dict], info: dict) -> str:
    rows = [
        [
            r["B"],
            f"{r['P'] / 1e6:.1f}M",
            f"{r['fastdp_ms']:.2f}",
            f"{r['reference_ms']:.2f}",
            f"{r['speedup_vs_reference']:.2f}x",
            f"{r['fastdp_given_norms_ms']:.2f}",
            f"{r['reference_given_norms_ms']:.2f}",
            f"{r['speedup_given_norms']:.2f}x",
            f"{r['copy_ms']:.2f}",
            f"{r['fastdp_GBps']:.1f} ({100 * r['fraction_of_copy_bw']:.0f}%)",
            f"{r['fastdp_given_norms_GBps']:.1f} ({100 * r['fraction_of_copy_bw_given_norms']:.0f}%)",
            f"{r['copy_GBps']:.1f}",
        ]
        for r in results
    ]
    header = [
        "B",
        "P",
        "fastdp ms",
        "reference ms",
        "speed-up",
        "fused op ms (norms given)",
        "reference ms (norms given)",
        "speed-up",
        "copy ms",
        "fastdp GB/s (of copy)",
        "fused op GB/s (of copy)",
        "copy GB/s",
    ]
    where = info.get("gpu") or f"{info['cpu']}, {info['torch_threads']} threads"
    head = f"Machine: {where}; torch {info['torch']}; medians of {results[0]['repeats']} interleaved rounds.\n\n"
    return head + markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", default="16,64", help="comma-separated batch sizes")
    parser.add_argument("--params", default="0.5,2,8", help="comma-separated parameter counts in millions")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default=None, help="write results and machine info to this file")
    args = parser.parse_args()
    if not fastdp.has_kernel(args.device):
        raise SystemExit(f"fastdp has no compiled kernels for {args.device}: {fastdp.compiled_error()}")
    info = machine_info(args.device)
    results = run(
        args.device,
        [int(b) for b in args.batch.split(",")],
        [float(p) for p in args.params.split(",")],
        args.repeats,
    )
    table = to_markdown(results, info)
    print()
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "results": results, "markdown": table}, indent=2))


if __name__ == "__main__":
    main()
