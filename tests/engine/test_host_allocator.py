"""fastdp.engine.host_allocator: freed CPU memory stays in the process between steps (glibc)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc settings only"
)

# Allocates and frees a 40 MB tensor 20 times and prints the minor page faults of the last 10:
# above glibc's largest dynamic mmap threshold (32 MiB) every allocation is a fresh mapping that
# faults all its pages in, unless the thresholds were set.
_PROBE = """
import resource, sys, torch
from fastdp.engine import PrivateModule, host_allocator
if sys.argv[1] == "private":
    PrivateModule(torch.nn.Linear(2, 2))
def churn():
    t = torch.ones(10 << 20)  # 40 MB, every page written
    del t
for _ in range(10):
    churn()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    churn()
print(host_allocator.is_tuned(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _probe(mode: str, env_value: str | None = None) -> tuple[bool, int]:
    import os

    env = dict(os.environ)
    env.pop("FASTDP_HOST_ALLOCATOR", None)
    if env_value is not None:
        env["FASTDP_HOST_ALLOCATOR"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, env=env, timeout=120
    ).stdout.split()
    return out[0] == "True", int(out[1])


@glibc
def test_a_private_model_keeps_freed_memory_in_the_process():
    tuned, faults = _probe("private")
    assert tuned
    assert faults < 1000, faults  # 10 x 40 MB would be ~100,000 faults of 4 KiB pages
    untuned, faults_default = _probe("plain")
    assert not untuned
    assert faults_default > 50_000, faults_default  # glibc's default: every 40 MB block mapped afresh


@glibc
def test_opt_out_by_environment():
    tuned, faults = _probe("private", "default")
    assert not tuned and faults > 50_000


def test_bad_environment_value_is_refused(monkeypatch):
    from fastdp.engine import host_allocator

    monkeypatch.setitem(host_allocator._state, "tuned", False)
    monkeypatch.setenv("FASTDP_HOST_ALLOCATOR", "fast")
    with pytest.raises(ValueError, match="FASTDP_HOST_ALLOCATOR"):
        host_allocator.tune()
