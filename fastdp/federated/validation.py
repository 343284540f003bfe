"""Server-side checks on incoming site updates: a bad update is rejected with a reason, never averaged."""

from __future__ import annotations

import math
import statistics

import torch

from fastdp.federated.site import SiteUpdate, floating_keys


def check_update(update: SiteUpdate, global_state: dict[str, torch.Tensor]) -> str | None:
    """The reason to reject `update` (wrong keys or shapes, non-finite values), or None if it is well-formed."""
    if not isinstance(update, SiteUpdate):
        return f"not a SiteUpdate ({type(update).__name__})"
    expected = set(floating_keys(global_state))
    got = set(update.delta)
    if got != expected:
        missing, extra = sorted(expected - got)[:3], sorted(got - expected)[:3]
        return f"delta keys differ from the global model (missing {missing}, unexpected {extra})"
    for key in sorted(expected):
        d = update.delta[key]
        if not torch.is_tensor(d) or tuple(d.shape) != tuple(global_state[key].shape):
            shape = tuple(d.shape) if torch.is_tensor(d) else type(d).__name__
            return f"delta[{key!r}] has shape {shape}, expected {tuple(global_state[key].shape)}"
        if not d.is_floating_point():
            return f"delta[{key!r}] has dtype {d.dtype}, expected a floating-point tensor"
        if not bool(torch.isfinite(d).all()):
            return f"non-finite values (NaN or inf) in delta[{key!r}]"
    if update.num_samples < 1:
        return f"num_samples must be >= 1, got {update.num_samples}"
    return None


def screen_updates(
    updates: list[SiteUpdate],
    global_state: dict[str, torch.Tensor],
    max_update_norm: float | None = None,
    outlier_factor: float | None = 100.0,
) -> tuple[list[SiteUpdate], list[dict]]:
    """Splits updates into (accepted, rejected [{"site", "reason"}]).

    Args:
        max_update_norm: reject any update whose L2 norm exceeds it (None: no absolute bound).
        outlier_factor: with at least 3 well-formed updates, reject those whose norm exceeds this
            many times the median norm (an implausible update; None disables).
    """
    rejected, ok = [], []
    for u in updates:
        reason = check_update(u, global_state)
        if reason is None:
            ok.append(u)
        else:
            rejected.append({"site": getattr(u, "site_id", "?"), "reason": reason})
    norms = {id(u): u.norm() for u in ok}
    median = statistics.median(norms.values()) if len(ok) >= 3 else math.nan
    accepted = []
    for u in ok:
        n = norms[id(u)]
        if max_update_norm is not None and n > max_update_norm:
            rejected.append({"site": u.site_id, "reason": f"update norm {n:.4g} > max_update_norm {max_update_norm:g}"})
        elif outlier_factor is not None and median > 0 and n > outlier_factor * median:
            rejected.append(
                {"site": u.site_id, "reason": f"update norm {n:.4g} > {outlier_factor:g} x the median {median:.4g}"}
            )
        else:
            accepted.append(u)
    return accepted, rejected
