"""pytest setup for the benchmark harness (`pytest benchmarks/`), never loaded by the test suite.

- puts benchmarks/ on sys.path, so test_bench.py imports the scripts' helpers as modules;
- FASTDP_BENCH_THREADS=n sets torch's thread count (default: torch's own), so runs compared
  across commits can pin it;
- saved runs (--benchmark-autosave / --benchmark-save) go to .bench/pytest-benchmark/ at the
  repository root, which git ignores, unless --benchmark-storage says otherwise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PLUGIN_DEFAULT_STORAGE = "file://./.benchmarks"  # pytest-benchmark's default: cwd, not ignored by git


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark's own pytest_configure opens the storage
def pytest_configure(config: pytest.Config) -> None:
    threads = os.environ.get("FASTDP_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    if getattr(config.option, "benchmark_storage", None) == PLUGIN_DEFAULT_STORAGE:
        config.option.benchmark_storage = f"file://{HERE.parent / '.bench' / 'pytest-benchmark'}"
