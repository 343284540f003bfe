"""Checkpoints and site state files: written atomically with a content digest, read without pickle code.

A state file holds only tensors and plain Python values (dicts, lists, numbers, strings), so it is
read with ``torch.load(weights_only=True)``: a planted file cannot run code. Its top level is
``{"fastdp_state": FORMAT, "sha256": <digest of the content>, "state": <content>}``; on reading,
the digest is recomputed, so a torn, truncated or altered file is refused with an error that names
the file instead of resuming from garbage. (The digest detects corruption and edits made without
fastdp; someone who can write a site's disk and run code there is outside what a file can defend.)
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fastdp.atomic import atomic_torch_save

__all__ = ["FORMAT", "StateFileError", "check_finite", "check_model_state", "load_state", "save_state"]

FORMAT = 1


class StateFileError(ValueError):
    """A checkpoint or state file that cannot be used; the message names the file and what is wrong."""


def _feed(h: Any, obj: Any) -> None:
    """Feeds a canonical encoding of `obj` (nested dicts/lists of tensors and plain values) into hash h."""
    if torch.is_tensor(obj):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}|".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}|".encode())
        for v in obj:
            _feed(h, v)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(f"{type(obj).__name__}:{obj!r}|".encode())
    elif isinstance(obj, torch.Size):
        h.update(f"S{tuple(obj)}|".encode())
    else:
        raise TypeError(f"state files hold tensors and plain values only, got {type(obj).__name__}")


def digest(obj: Any) -> str:
    """sha256 hex digest of a state's content (independent of how torch.save lays out the file)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def save_state(state: Any, path: str | os.PathLike) -> None:
    """Writes `state` (tensors and plain values only) atomically, with its digest."""
    atomic_torch_save({"fastdp_state": FORMAT, "sha256": digest(state), "state": state}, path)


def load_state(path: str | os.PathLike, what: str = "state file") -> Any:
    """Reads a file written by save_state; StateFileError naming `path` when it cannot be trusted.

    Args:
        path: the file.
        what: how the error names it ("checkpoint", "site state file", ...).
    """
    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pickle payloads, truncation, garbage: all refused, none executed
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise StateFileError(
            f"{what} {path} cannot be read safely ({type(exc).__name__}: {first}). It is truncated, corrupt, "
            "or holds objects other than tensors and plain values; delete it (or rerun with --fresh) to start over."
        ) from None
    if not isinstance(raw, dict) or raw.get("fastdp_state") != FORMAT or "state" not in raw or "sha256" not in raw:
        raise StateFileError(
            f"{what} {path} is not a fastdp state file of format {FORMAT} (written by another program or an older "
            "fastdp); delete it (or rerun with --fresh) to start over."
        )
    try:
        actual = digest(raw["state"])
    except TypeError as exc:
        raise StateFileError(f"{what} {path}: {exc}") from None
    if actual != raw["sha256"]:
        raise StateFileError(
            f"{what} {path}: its content does not match its digest (the file was altered or corrupted after "
            "fastdp wrote it); refusing to resume from it."
        )
    return raw["state"]


def check_finite(obj: Any, path: str | os.PathLike, what: str, where: str = "") -> None:
    """StateFileError when any floating-point tensor or float inside `obj` is NaN or inf."""
    if torch.is_tensor(obj):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            raise StateFileError(f"{what} {path}: non-finite values (NaN or inf) in {where or 'a tensor'}")
    elif isinstance(obj, float):
        if not math.isfinite(obj):
            raise StateFileError(f"{what} {path}: non-finite value {obj} at {where or 'top level'}")
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            check_finite(v, path, what, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_finite(v, path, what, f"{where}[{i}]")


def check_model_state(
    state: Any, reference: Mapping[str, torch.Tensor], path: str | os.PathLike, what: str
) -> dict[str, torch.Tensor]:
    """`state` checked against a model's state_dict `reference`: same names, shapes, dtypes, finite values.

    Returns it as a plain dict; StateFileError naming the file and the first problem otherwise.
    """
    if not isinstance(state, Mapping):
        raise StateFileError(f"{what} {path}: the model state is a {type(state).__name__}, not a table of tensors")
    missing = [k for k in reference if k not in state]
    extra = [k for k in state if k not in reference]
    if missing or extra:
        raise StateFileError(
            f"{what} {path}: model entries differ from the model (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    for k, ref in reference.items():
        v = state[k]
        if not torch.is_tensor(v):
            raise StateFileError(f"{what} {path}: {k!r} is a {type(v).__name__}, not a tensor")
        if tuple(v.shape) != tuple(ref.shape) or v.dtype != ref.dtype:
            raise StateFileError(
                f"{what} {path}: {k!r} is {v.dtype} {tuple(v.shape)}, the model has {ref.dtype} {tuple(ref.shape)}"
            )
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise StateFileError(f"{what} {path}: non-finite values (NaN or inf) in {k!r}")
    return {k: state[k] for k in reference}
