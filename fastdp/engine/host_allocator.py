"""Keeps freed CPU memory in the process between training steps (glibc malloc settings).

Why: a DP step allocates tens of MB of short-lived tensors (per-sample gradients, folded
GroupNorm buffers) and frees them at the end of the step. With glibc's default (dynamic)
settings the freed top of the heap is handed back to the OS (trimmed) and the next step faults
every page in again: measured on the 2-core CPU for unet_small at 64x64, B = 41, about 25,000
minor page faults per DP step (about 100 MB) against under 900 for the non-private step, and
the DP step 10-15% slower than with the memory kept (fastdp/benchmarks, issue 14). Large
activations above the mmap threshold are mapped and unmapped on every allocation, for private
and non-private training alike.

`tune()` sets two glibc malloc parameters for the whole process (mallopt), once:

- M_MMAP_THRESHOLD = 64 MiB (32 MiB where glibc refuses more): blocks up to it come from the
  heap (freed ones are reused), not from a fresh mmap each time (glibc's default starts at
  128 KiB and grows to 32 MiB);
- M_TRIM_THRESHOLD = 512 MiB: up to 512 MiB of free memory at the top of the heap is kept.

The cost: the process's resident memory stays near its peak between steps instead of dropping
(the peak itself does not grow). The PrivateModule calls `tune()` when it is created, so DP
training gets it without asking; set FASTDP_HOST_ALLOCATOR=default to leave glibc's settings
alone (read at the call). Not glibc (macOS, musl, Windows): nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

ENV_VAR = "FASTDP_HOST_ALLOCATOR"
MMAP_THRESHOLD = 64 << 20  # bytes
TRIM_THRESHOLD = 512 << 20  # bytes
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h> parameter numbers

_state: dict[str, object] = {"tuned": False}


def _libc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def tune() -> bool:
    """Sets the process's malloc thresholds (see the module docstring) unless $FASTDP_HOST_ALLOCATOR
    is "default" or this is not glibc. Idempotent; returns whether the settings are in effect."""
    if _state["tuned"]:
        return True
    setting = os.environ.get(ENV_VAR, "tuned").strip().lower()
    if setting not in ("tuned", "default"):
        raise ValueError(f"{ENV_VAR}={setting!r}: expected 'tuned' or 'default'")
    if setting == "default":
        return False
    libc = _libc()
    if libc is None:
        return False
    # The mmap threshold first: a successful mallopt of either parameter turns glibc's dynamic
    # thresholds off, and a trim threshold alone would leave every block over 128 KiB mmapped.
    # Older glibc refuses thresholds over 32 MiB (HEAP_MAX_SIZE / 2): then 32 MiB.
    if not (libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) or libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)):
        return False
    _state["tuned"] = bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return bool(_state["tuned"])


def is_tuned() -> bool:
    """Whether `tune()` has set the thresholds in this process."""
    return bool(_state["tuned"])
