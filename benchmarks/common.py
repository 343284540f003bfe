"""Helpers shared by the benchmarks: machine description, interleaved timing, Poisson batch
sequences, peak memory, Markdown tables."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from fastdp.engine import host_allocator

# fastdp's PrivateModule sets the process's malloc thresholds (fastdp.engine.host_allocator); set
# them here for every mode and every memory subprocess, so that non-private, fastdp and Opacus
# steps run under the same allocator (FASTDP_HOST_ALLOCATOR=default leaves glibc's for all).
host_allocator.tune()


def machine_info(device: str) -> dict:
    """A short description of where the numbers were measured."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "host_allocator": "fastdp (glibc thresholds set)" if host_allocator.is_tuned() else "default",
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_interleaved(
    fns: dict[str, Callable[[], object]], device: str, repeats: int, warmup: int = 2
) -> dict[str, list[float]]:
    """Runs every function once per round, rounds interleaved, and returns seconds per call.

    Interleaving spreads machine noise (other jobs, frequency changes) over all candidates
    instead of penalising whichever ran during a noisy stretch.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(x) for x in row) + " |")
    return "\n".join(lines)


def rotated(items: list, k: int) -> list:
    """`items` rotated left by k: with k = the step index, each candidate takes every place in turn,
    so none always runs first (cold caches) or right after a particular other one."""
    k %= max(1, len(items))
    return items[k:] + items[:k]


def poisson_batches(dataset_size: int, expected_batch: float, steps: int, seed: int = 0) -> list[torch.Tensor]:
    """`steps` Poisson batches of a dataset of N = dataset_size: each sample joins each batch
    independently with probability q = expected_batch / N, so a batch's size is Binomial(N, q).

    Returns one int64 index tensor [B_t] per step, drawn from a generator seeded with `seed`: the
    same arguments give the same sequence (sizes and members) in every mode and every process.
    """
    q = expected_batch / dataset_size
    if not 0 < q <= 1:
        raise ValueError(f"need 0 < E[B] <= N, got E[B]={expected_batch}, N={dataset_size}")
    gen = torch.Generator().manual_seed(seed)
    return [torch.nonzero(torch.rand(dataset_size, generator=gen) < q).flatten() for _ in range(steps)]


def rss_bytes() -> int:
    """Resident set size of this process now, in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_rss_bytes() -> int:
    """This process's peak RSS (VmHWM), in bytes.

    Not getrusage's ru_maxrss: Linux carries the parent's peak across fork + exec into it, so in a
    subprocess started by a big benchmark process it reports the parent's footprint.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_extra_mb(fn: Callable[[], object], device: str) -> float:
    """Runs fn() and returns its peak memory above the level before it, in MiB.

    CUDA: max_memory_allocated over the call. CPU: peak RSS (VmHWM, reset to the current RSS just
    before the call) minus the RSS before it. Where the reset is refused, VmHWM is the process's
    lifetime peak: then call this once, in a fresh process, with no bigger allocation before it.
    The result counts what the allocator keeps (freed buffers it does not return count too).
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _reset_peak_rss()
    before = rss_bytes()
    fn()
    return (_peak_rss_bytes() - before) / 2**20


def describe_machine(info: dict) -> str:
    """One line for a table's heading: CPU (or GPU), cores, torch threads, torch version."""
    where = f"{info['cpu']}, {info['cpu_count']} cores, {info['torch_threads']} torch threads"
    if info.get("gpu"):
        where = f"{info['gpu']} (host: {where})"
    return f"{where}; torch {info['torch']}, Python {info['python']}; malloc: {info.get('host_allocator', 'default')}"


def run_memory_worker(cmd: list[str], what: str, timeout: float) -> float | None:
    """Runs a benchmark's memory worker (a fresh interpreter that prints "MEM <MB>"); its MB, or None if it failed."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    for line in out.stdout.splitlines():
        if line.startswith("MEM "):
            return float(line.split()[1])
    print(f"memory run of {what} failed: {out.stderr[-500:]}", file=sys.stderr)
    return None
