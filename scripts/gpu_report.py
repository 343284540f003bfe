"""GPU check helpers for scripts/gpu_check.sh: a kernel self-check and the Markdown report.

python3 scripts/gpu_report.py selfcheck --json OUT/kernel_check.json
    Runs fastdp's CUDA kernels against its CPU kernels (same build) and the pure-PyTorch
    reference on edge cases (dtypes, B=0/1, empty and odd-sized tensors, non-contiguous
    inputs, mixed dtypes, a side stream, a tensor of more than 2^31 elements), checks the
    noise statistics, and times the kernels against a device copy (GB/s, fraction of copy).
    Loads fastdp/_C*.so directly, so it needs neither dp-accounting nor the package import.

python3 scripts/gpu_report.py summary --out OUT/gpu_report.md --steps OUT/steps.tsv ...
    Writes the Markdown summary of a gpu_check.sh run.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# selfcheck
# --------------------------------------------------------------------------------------------


def _load_fastdp(device: str = "cuda"):
    """Loads the compiled ops and fastdp/reference.py without importing the fastdp package."""
    import torch

    libs = sorted(glob.glob(str(ROOT / "fastdp" / "_C*.so")))
    if not libs:
        raise SystemExit("no fastdp/_C*.so: build first (python3 setup.py build_ext --inplace)")
    torch.ops.load_library(libs[0])
    spec = importlib.util.spec_from_file_location("fastdp_reference", ROOT / "fastdp" / "reference.py")
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    for key in ("CPU", "CUDA") if device == "cuda" else ("CPU",):
        for op in ("per_sample_sq_norms", "clip_accumulate_noise", "add_noise_scale_"):
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastdp::{op}", key):
                raise SystemExit(f"fastdp::{op} has no {key} kernel in {libs[0]}")
    return torch, torch.ops.fastdp, ref


class Checker:
    def __init__(self) -> None:
        self.results: list[dict] = []

    def run(self, name: str, fn) -> None:
        start = time.perf_counter()
        try:
            detail = fn()
            ok = True
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none stops the rest
            ok = False
            detail = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
        self.results.append(
            {"check": name, "ok": ok, "detail": detail, "seconds": round(time.perf_counter() - start, 3)}
        )
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {str(detail)[:300]}", flush=True)


def _tol(torch, dtype, noisy: bool) -> dict:
    if dtype == torch.float16:
        return {"rtol": 2e-3, "atol": 2e-3}
    if dtype == torch.bfloat16:
        return {"rtol": 1.6e-2, "atol": 1.6e-2}
    if dtype == torch.float64:
        # The noise is drawn in float on both devices: a float rounding difference shows.
        return {"rtol": 1e-6, "atol": 1e-6} if noisy else {"rtol": 1e-11, "atol": 1e-11}
    return {"rtol": 2e-5, "atol": 2e-5}


def selfcheck(json_path: str | None, device: str = "cuda") -> int:
    torch, ops, ref = _load_fastdp(device)
    dev = torch.device(device)  # "cpu" runs the same checks CPU-against-CPU (tests this script)
    on_cuda = dev.type == "cuda"
    gen = torch.Generator().manual_seed(1234)
    chk = Checker()
    f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64

    def randn(shape, dtype):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)

    sizes = [0, 1, 3, 4, 5, 7, 16, 130, 1000, 4097, 65539, 262144]

    def clip_case(batch, in_dtypes, out_dtypes, noise_std, sq_dtype=f32, noncontig=False, stream=False):
        grads = []
        for k, s in enumerate(sizes):
            dt = in_dtypes[k % len(in_dtypes)]
            if noncontig and s % 2 == 0 and s > 0:
                g = randn((batch, 2, s // 2), dt).transpose(1, 2)  # [B, s/2, 2], non-contiguous
            else:
                g = randn((batch, s), dt)
            grads.append(g)
        outs_dtypes = [out_dtypes[k % len(out_dtypes)] for k in range(len(sizes))]
        sq = ref.per_sample_sq_norms([g.double() for g in grads]).to(sq_dtype) * 0.5  # some clipped, some not
        max_norm, scale, seed, offset = 7.0, 0.37, 0x7FFF_1234_5678_9ABC, (1 << 33) + 5
        cpu_out = [torch.empty(g.shape[1:], dtype=d) for g, d in zip(grads, outs_dtypes, strict=True)]
        cpu_c = ops.clip_accumulate_noise(grads, sq, cpu_out, max_norm, noise_std, scale, seed, offset)
        g_dev = [g.to(dev) for g in grads]
        out_dev = [torch.full(o.shape, float("nan"), dtype=o.dtype, device=dev) for o in cpu_out]
        if stream:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                c = ops.clip_accumulate_noise(g_dev, sq.to(dev), out_dev, max_norm, noise_std, scale, seed, offset)
            torch.cuda.current_stream().wait_stream(side)
        else:
            c = ops.clip_accumulate_noise(g_dev, sq.to(dev), out_dev, max_norm, noise_std, scale, seed, offset)
        if on_cuda:
            torch.cuda.synchronize()
        assert c.device.type == dev.type and c.dtype == cpu_c.dtype, (c.device, c.dtype, cpu_c.dtype)
        assert torch.equal(c.cpu(), cpu_c), "clip factors differ from the CPU kernel's"
        worst = 0.0
        for k, (o, co) in enumerate(zip(out_dev, cpu_out, strict=True)):
            o = o.cpu()
            assert not torch.isnan(o).any(), f"out[{k}] (numel {o.numel()}) has unwritten elements"
            torch.testing.assert_close(
                o, co, **_tol(torch, co.dtype, noise_std > 0), msg=lambda m, k=k: f"out[{k}]: {m}"
            )
            if o.numel():
                worst = max(worst, (o.double() - co.double()).abs().max().item())
        return f"max |cuda - cpu| = {worst:.3g}"

    for batch in (0, 1, 5, 33):
        for noise_std in (0.0, 1.3):
            chk.run(
                f"clip fp32 B={batch} noise={noise_std}", lambda b=batch, n=noise_std: clip_case(b, [f32], [f32], n)
            )
    for name, ins, outs in [
        ("fp16", [f16], [f16]),
        ("bf16", [bf16], [bf16]),
        ("fp64", [f64], [f64]),
        ("fp16 in, fp32 out", [f16], [f32]),
        ("bf16 in, fp16 out", [bf16], [f16]),
        ("mixed fp32/fp16/bf16 in, mixed out", [f32, f16, bf16], [f32, bf16, f16, f64]),
        ("mixed with one fp64 input (fp64 accumulation)", [f32, f64, f16], [f32]),
    ]:
        chk.run(f"clip {name}", lambda i=ins, o=outs: clip_case(9, i, o, 0.8))
    chk.run("clip fp32 inputs, fp64 sq_norms", lambda: clip_case(6, [f32], [f32], 0.8, sq_dtype=f64))
    chk.run("clip non-contiguous grads", lambda: clip_case(7, [f32, f16], [f32], 0.8, noncontig=True))
    if on_cuda:
        chk.run("clip on a side stream", lambda: clip_case(12, [f32], [f32], 0.8, stream=True))

    def norms_case(batch, in_dtypes, noncontig=False):
        grads = []
        for k, s in enumerate(sizes + [3 * 16384 + 4, 16384]):
            dt = in_dtypes[k % len(in_dtypes)]
            if noncontig and s % 2 == 0 and s > 0:
                grads.append(randn((batch, 2, s // 2), dt).transpose(1, 2))
            else:
                grads.append(randn((batch, s), dt))
        cpu = ops.per_sample_sq_norms(grads)
        g_dev = [g.to(dev) for g in grads]
        a = ops.per_sample_sq_norms(g_dev)
        b = ops.per_sample_sq_norms(g_dev)
        assert a.dtype == cpu.dtype and a.shape == cpu.shape, (a.dtype, a.shape, cpu.dtype, cpu.shape)
        assert torch.equal(a, b), "two runs on the same input differ (non-deterministic reduction)"
        rtol = 1e-10 if cpu.dtype == f64 else 1e-5
        torch.testing.assert_close(a.cpu(), cpu, rtol=rtol, atol=0.0)
        exact = ref.per_sample_sq_norms([g.double() for g in grads])
        err = ((a.cpu().double() - exact).abs() / exact.clamp_min(1e-30)).max().item() if batch else 0.0
        return f"max relative error vs fp64 = {err:.3g}"

    for batch in (0, 1, 3, 64):
        chk.run(f"norms fp32 B={batch}", lambda b=batch: norms_case(b, [f32]))
    chk.run("norms fp16/bf16", lambda: norms_case(5, [f16, bf16]))
    chk.run("norms with one fp64 tensor", lambda: norms_case(5, [f32, f64]))
    chk.run("norms non-contiguous", lambda: norms_case(4, [f32, bf16], noncontig=True))

    def noise_case(dtypes, noise_std, noncontig=False):
        xs = []
        for k, s in enumerate(sizes):
            dt = dtypes[k % len(dtypes)]
            if noncontig and s % 2 == 0 and s > 0:
                xs.append(randn((2, s // 2), dt).t())
            else:
                xs.append(randn((s,), dt))
        cpu = [x.clone() for x in xs]
        ops.add_noise_scale_(cpu, noise_std, 0.61, 99, 7)
        x_dev = [x.to(dev) for x in xs]
        ops.add_noise_scale_(x_dev, noise_std, 0.61, 99, 7)
        for k, (a, b) in enumerate(zip(x_dev, cpu, strict=True)):
            torch.testing.assert_close(
                a.cpu(), b, **_tol(torch, b.dtype, noise_std > 0), msg=lambda m, k=k: f"[{k}] {m}"
            )
        return "ok"

    chk.run("add_noise_scale_ fp32", lambda: noise_case([f32], 1.1))
    chk.run("add_noise_scale_ fp32 noise_std=0", lambda: noise_case([f32], 0.0))
    chk.run("add_noise_scale_ mixed dtypes", lambda: noise_case([f32, f16, bf16, f64], 0.9))
    chk.run("add_noise_scale_ non-contiguous", lambda: noise_case([f32, f16], 0.9, noncontig=True))

    def noise_stats():
        n = 1 << 24
        out = [torch.empty(n, device=dev)]
        ops.clip_accumulate_noise([torch.empty(0, n, device=dev)], torch.empty(0, device=dev), out, 1.0, 1.0, 1.0, 5, 0)
        z = out[0].double()
        mean, std = z.mean().item(), z.std().item()
        skew = ((z - mean) ** 3).mean().item() / std**3
        kurt = ((z - mean) ** 4).mean().item() / std**4
        lag1 = (z[1:] * z[:-1]).mean().item()
        other = [torch.empty(n, device=dev)]
        ops.clip_accumulate_noise(
            [torch.empty(0, n, device=dev)], torch.empty(0, device=dev), other, 1.0, 1.0, 1.0, 5, 1
        )
        corr = (z * other[0].double()).mean().item()
        tol = 6 / math.sqrt(n)
        assert abs(mean) < tol and abs(std - 1) < tol * 2, (mean, std)
        assert abs(skew) < 0.01 and abs(kurt - 3) < 0.03, (skew, kurt)
        assert abs(lag1) < tol and abs(corr) < tol, (lag1, corr)
        # Same stream as the reference Philox on the first and last elements.
        for first in (0, n - 4099):
            want = ref.gaussian_noise(4099, 5, 0, first)
            got = out[0][first : first + 4099].cpu()
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return f"mean {mean:.2e} std {std:.5f} skew {skew:.2e} kurt {kurt:.4f} lag1 {lag1:.2e} offset-corr {corr:.2e}"

    chk.run("noise statistics and reference stream", noise_stats)

    def huge_tensor():
        n = (1 << 31) + 13
        free, _ = torch.cuda.mem_get_info()
        if free < 12 * n:
            return f"skipped: {free / 2**30:.1f} GiB free"
        g = torch.ones(1, n, dtype=f16, device=dev)
        g[0, -7:] = 2.0
        sq = ops.per_sample_sq_norms([g])
        want_sq = float(n - 7) + 7 * 4.0
        assert abs(sq.item() - want_sq) / want_sq < 1e-5, (sq.item(), want_sq)
        out = [torch.full((n,), float("nan"), dtype=f16, device=dev)]
        offset_base = [torch.empty(3, device=dev)]  # shifts the big tensor's noise base by 3
        big_grads = [torch.ones(1, 3, device=dev), g]
        sq_all = torch.tensor([want_sq + 3.0], device=dev)
        c = ops.clip_accumulate_noise(big_grads, sq_all, offset_base + out, 1e9, 0.5, 0.25, 11, 3)
        assert c.item() == 1.0
        del g
        o = out[0]
        assert not torch.isnan(o).any().item(), "unwritten elements in the >2^31 tensor"
        for first in (0, (1 << 31) - 100, n - 64):  # the last window crosses 2^31
            z = ref.gaussian_noise(64, 11, 3, 3 + first)
            x = torch.ones(64, dtype=torch.float64)
            if first == n - 64:
                x[-7:] = 2.0
            want = ((x + 0.5 * z.double()) * 0.25).to(f16)
            torch.testing.assert_close(o[first : first + 64].cpu(), want, rtol=2e-3, atol=2e-3)
        ops.add_noise_scale_(out, 0.0, 2.0, 0, 0)
        torch.testing.assert_close(o[-64:].cpu(), (want.double() * 2).to(f16), rtol=2e-3, atol=2e-3)
        return "n = 2^31 + 13 fp16: norms, clip (noise base 3) and add_noise_scale_ ok"

    if on_cuda:
        chk.run("tensor with more than 2^31 elements", huge_tensor)
        torch.cuda.empty_cache()
    timings = bandwidth(torch, ops, dev) if on_cuda else []
    overhead = host_overhead(torch, ops, dev) if on_cuda else {}
    ok = all(r["ok"] for r in chk.results)
    print(f"\nself-check: {sum(r['ok'] for r in chk.results)}/{len(chk.results)} passed", flush=True)
    for t in timings:
        print(f"  {t['what']}: {t['ms']:.3f} ms, {t['GBps']:.0f} GB/s ({100 * t['of_copy']:.0f}% of copy)")
    if json_path:
        info = {"device": torch.cuda.get_device_name() if on_cuda else "cpu", "torch": torch.__version__}
        info["cuda"] = torch.version.cuda
        Path(json_path).write_text(
            json.dumps({"machine": info, "checks": chk.results, "timings": timings, "overhead": overhead}, indent=2)
        )
    return 0 if ok else 1


def _time_ms(torch, fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_overhead(torch, ops, dev) -> dict:
    """Per-call wall time (host, synchronized) of each op on small inputs, and a profiler
    breakdown of where the host time of clip_accumulate_noise goes."""
    res: dict = {}
    try:
        sizes = [int(x) for x in torch.randint(16, 20000, (60,), generator=torch.Generator().manual_seed(1))]
        grads = [torch.randn(16, s, device=dev) for s in sizes]
        outs = [torch.empty(s, device=dev) for s in sizes]
        sq = ops.per_sample_sq_norms(grads)
        x = torch.randn(1 << 16, device=dev)

        def wall_us(fn, reps=50):
            for _ in range(5):
                fn()
            ts = []
            for _ in range(reps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                ts.append((time.perf_counter() - t0) * 1e6)
            return statistics.median(ts)

        res["P"] = sum(sizes)
        res["B"] = 16
        res["one small kernel (x.mul_(1)) us"] = wall_us(lambda: x.mul_(1.0))
        res["per_sample_sq_norms us"] = wall_us(lambda: ops.per_sample_sq_norms(grads))
        res["clip_accumulate_noise us"] = wall_us(
            lambda: ops.clip_accumulate_noise(grads, sq, outs, 1.0, 1.0, 0.1, 1, 2)
        )
        res["add_noise_scale_ us"] = wall_us(lambda: ops.add_noise_scale_(outs, 1.0, 0.5, 1, 2))
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                ops.clip_accumulate_noise(grads, sq, outs, 1.0, 1.0, 0.1, 1, 2)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=50)
        res["profile_clip_x20"] = table
        print(table, flush=True)
    except Exception as exc:  # noqa: BLE001
        res["error"] = f"{type(exc).__name__}: {exc}"
    print({k: (round(v, 1) if isinstance(v, float) else v) for k, v in res.items() if k != "profile_clip_x20"})
    return res


def bandwidth(torch, ops, dev) -> list[dict]:
    """GB/s of each kernel (bytes it must move / median time) against a device-to-device copy."""
    rows: list[dict] = []
    try:
        src = torch.randn(1 << 28, device=dev)  # 1 GiB
        dst = torch.empty_like(src)
        copy_ms = _time_ms(torch, lambda: dst.copy_(src))
        copy_gbps = 2 * src.numel() * 4 / copy_ms / 1e6
        rows.append({"what": "copy 1 GiB fp32 (read + write)", "ms": copy_ms, "GBps": copy_gbps, "of_copy": 1.0})

        def add(what, nbytes, fn):
            ms = _time_ms(torch, fn)
            gbps = nbytes / ms / 1e6
            rows.append({"what": what, "ms": ms, "GBps": gbps, "of_copy": gbps / copy_gbps})

        gen = torch.Generator().manual_seed(0)
        for batch, total, aligned in [(32, 8_000_000, True), (32, 8_000_000, False), (64, 2_000_000, False)]:
            n_tensors = 60
            base = [int(x) for x in torch.randint(total // 90, total // 30, (n_tensors,), generator=gen)]
            sizes = [(s // 4) * 4 if aligned else s | 1 for s in base]
            grads = [torch.randn(batch, s, device=dev) for s in sizes]
            outs = [torch.empty(s, device=dev) for s in sizes]
            p = sum(sizes)
            sq = ops.per_sample_sq_norms(grads)
            kind = "sizes % 4 == 0" if aligned else "odd sizes"
            add(
                f"clip_accumulate_noise B={batch} P={p / 1e6:.1f}M fp32, {kind}",
                (batch * p + p) * 4,
                lambda g=grads, o=outs, s=sq: ops.clip_accumulate_noise(g, s, o, 1.0, 1.0, 0.1, 1, 2),
            )
            add(
                f"per_sample_sq_norms B={batch} P={p / 1e6:.1f}M fp32, {kind}",
                batch * p * 4,
                lambda g=grads: ops.per_sample_sq_norms(g),
            )
            if batch == 32 and aligned:
                gh = [g.half() for g in grads]
                add(
                    f"clip_accumulate_noise B={batch} P={p / 1e6:.1f}M fp16 in, fp32 out",
                    batch * p * 2 + p * 4,
                    lambda g=gh, o=outs, s=sq: ops.clip_accumulate_noise(g, s, o, 1.0, 1.0, 0.1, 1, 2),
                )
                del gh
            del grads, outs
        big = [torch.empty(1 << 26, device=dev)]
        add(
            "clip_accumulate_noise B=0 (noise only) P=64M fp32",
            big[0].numel() * 4,
            lambda: ops.clip_accumulate_noise(
                [torch.empty(0, 1 << 26, device=dev)], torch.empty(0, device=dev), big, 1.0, 1.0, 1.0, 1, 2
            ),
        )
        add("add_noise_scale_ P=64M fp32", 2 * big[0].numel() * 4, lambda: ops.add_noise_scale_(big, 1.0, 0.5, 1, 2))
    except Exception as exc:  # noqa: BLE001
        rows.append({"what": f"timing failed: {exc}", "ms": float("nan"), "GBps": float("nan"), "of_copy": 0.0})
    torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------


def _read(path: Path, tail: int | None = None) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    if tail is not None:
        lines = text.splitlines()
        text = "\n".join(lines[-tail:])
    return text


def _table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def _json_section(path: Path) -> str:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"(no results: {exc})"
    if isinstance(data, dict) and isinstance(data.get("markdown"), str):
        return data["markdown"]
    rows = data.get("results", data) if isinstance(data, dict) else data
    if isinstance(rows, list) and rows and isinstance(rows[0], dict):
        keys = [k for k, v in rows[0].items() if isinstance(v, (int, float, str)) or v is None][:10]
        body = [[_fmt(r.get(k)) for k in keys] for r in rows[:60]]
        return _table(keys, body)
    return "```\n" + json.dumps(data, indent=1)[:4000] + "\n```"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)


def summary(out: str, steps: str, env: str | None, files: list[str]) -> int:
    out_dir = Path(out).parent
    parts = ["# fastdp GPU check", ""]
    step_rows = []
    for line in _read(Path(steps)).splitlines():
        fields = line.split("\t")
        if len(fields) >= 3:
            name, rc, secs = fields[:3]
            if rc == "0":
                status = "ok"
            elif rc == "skipped":
                status = "SKIPPED (no time left)"
            else:
                status = "TIMEOUT" if rc in ("124", "137") else f"FAILED (rc {rc})"
            step_rows.append([name, status, secs])
    parts += ["## Steps", "", _table(["step", "result", "seconds"], step_rows), ""]
    if env:
        parts += ["## Machine", "", "```", _read(Path(env), tail=40), "```", ""]
    pytest_log = out_dir / "pytest.log"
    if pytest_log.exists():
        tail = [ln for ln in _read(pytest_log).splitlines() if ln.strip()]
        summary_lines = [ln for ln in tail if ln.startswith(("FAILED", "ERROR", "SKIPPED"))][:40]
        parts += ["## Test suite", "", "```", *(tail[-1:] if tail else ["(no output)"]), "```", ""]
        if summary_lines:
            parts += ["```", *summary_lines, "```", ""]
    check = out_dir / "kernel_check.json"
    if check.exists():
        try:
            data = json.loads(check.read_text())
            rows = [
                [c["check"], "PASS" if c["ok"] else "FAIL", str(c["detail"]).splitlines()[0][:160]]
                for c in data["checks"]
            ]
            n_ok = sum(c["ok"] for c in data["checks"])
            parts += [
                f"## Kernel self-check ({n_ok}/{len(rows)} passed)",
                "",
                _table(["check", "result", "detail"], rows),
                "",
            ]
            t_rows = [
                [t["what"], f"{t['ms']:.3f}", f"{t['GBps']:.0f}", f"{100 * t['of_copy']:.0f}%"] for t in data["timings"]
            ]
            parts += [
                "## Kernel bandwidth (CUDA events, median of 20)",
                "",
                _table(["kernel", "ms", "GB/s", "of copy"], t_rows),
                "",
            ]
            over = {k: v for k, v in data.get("overhead", {}).items() if k != "profile_clip_x20"}
            if over:
                rows = [[k, f"{v:.1f}" if isinstance(v, float) else v] for k, v in over.items()]
                parts += ["## Host time per call, small inputs (synchronized)", "", _table(["", ""], rows), ""]
        except (OSError, ValueError, KeyError) as exc:
            parts += ["## Kernel self-check", "", f"(unreadable: {exc})", ""]
    for f in files:
        p = Path(f)
        if p.exists():
            parts += [f"## {p.stem}", "", _json_section(p), ""]
        else:
            parts += [f"## {p.stem}", "", "(not produced)", ""]
    Path(out).write_text("\n".join(parts) + "\n")
    print("\n".join(parts))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sc = sub.add_parser("selfcheck")
    sc.add_argument("--json", default=None)
    sc.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    sm = sub.add_parser("summary")
    sm.add_argument("--out", required=True)
    sm.add_argument("--steps", required=True, help="TSV of step name, exit code, seconds")
    sm.add_argument("--env", default=None, help="file with nvidia-smi and torch info")
    sm.add_argument("files", nargs="*", help="benchmark JSON files to include")
    args = ap.parse_args()
    if args.cmd == "selfcheck":
        return selfcheck(args.json, args.device)
    return summary(args.out, args.steps, args.env, args.files)


if __name__ == "__main__":
    sys.exit(main())
