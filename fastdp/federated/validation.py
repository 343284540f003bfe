"""Server-side checks on incoming site updates: a bad update is rejected with a reason, never averaged.

Two kinds of check, because they mean different things for DP:

- format checks (:func:`check_update`) look at one update alone and at nothing that depends on
  the data: the sender is a known site that has not sent already, the delta has the global model's
  keys, shapes and floating dtype and is finite after casting to the model's dtype, and the claimed
  sample count is an integer in [1, the size the server knows for that site]. They are always on.
- norm screening (an absolute bound, and the relative test against the median of the round) looks
  at values that depend on the sites' data, and the relative test at the other sites' updates too.
  Under DP-FedAvg it is off: the server's clipping to S is the defence, and any screening that
  depends on other sites' updates changes the mechanism whose sensitivity the accountant assumes.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

import torch

from fastdp.federated.site import SiteUpdate, floating_keys


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_update(
    update: SiteUpdate, global_state: dict[str, torch.Tensor], expected_samples: int | None = None
) -> str | None:
    """The reason to reject `update` on format alone, or None if it is well-formed.

    Args:
        update: what a site sent.
        global_state: the server's model state (keys, shapes and dtypes the delta must have).
        expected_samples: the site's training-set size as the server knows it (from the site's
            registration); a larger claim is rejected. None: only type and range are checked.
    """
    if not isinstance(update, SiteUpdate):
        return f"not a SiteUpdate ({type(update).__name__})"
    n = update.num_samples
    if not _is_int(n) or n < 1:
        return f"num_samples must be an integer >= 1, got {n!r}"
    if expected_samples is not None and n > expected_samples:
        return f"num_samples {n} is more than the {expected_samples} the site registered"
    if not _is_int(update.steps) or update.steps < 0:
        return f"steps must be an integer >= 0, got {update.steps!r}"
    if update.epsilon is not None and not (isinstance(update.epsilon, float) and update.epsilon >= 0):
        return f"epsilon must be None or a number >= 0, got {update.epsilon!r}"
    if not isinstance(update.delta, Mapping):
        return f"delta is a {type(update.delta).__name__}, not a table of tensors"
    expected = set(floating_keys(global_state))
    got = set(update.delta)
    if got != expected:
        missing, extra = sorted(expected - got)[:3], sorted(map(str, got - expected))[:3]
        return f"delta keys differ from the global model (missing {missing}, unexpected {extra})"
    for key in sorted(expected):
        d, ref = update.delta[key], global_state[key]
        if not torch.is_tensor(d) or tuple(d.shape) != tuple(ref.shape):
            shape = tuple(d.shape) if torch.is_tensor(d) else type(d).__name__
            return f"delta[{key!r}] has shape {shape}, expected {tuple(ref.shape)}"
        if not d.is_floating_point():
            return f"delta[{key!r}] has dtype {d.dtype}, expected a floating-point tensor"
        # Finite in float64 can still overflow the model's float32: check what will be averaged.
        if not bool(torch.isfinite(d.to(ref.dtype)).all()):
            return f"non-finite values (NaN or inf) in delta[{key!r}] as {ref.dtype}"
    return None


def screen_updates(
    updates: list[SiteUpdate],
    global_state: dict[str, torch.Tensor],
    max_update_norm: float | None = None,
    outlier_factor: float | None = 100.0,
    *,
    site_sizes: Mapping[str, int] | None = None,
    norm_screening: bool = True,
) -> tuple[list[SiteUpdate], list[dict]]:
    """Splits updates into (accepted, rejected [{"site", "reason"}]).

    Args:
        max_update_norm: reject any update whose L2 norm exceeds it (None: no absolute bound).
        outlier_factor: with at least 3 well-formed updates, reject those whose norm exceeds this
            many times the median norm (an implausible update; None disables). Its limits: it needs
            3 updates, and colluding sites that are a majority of a round move the median.
        site_sizes: {site_id: training-set size} as the server knows it; updates from other ids,
            and claims above these sizes, are rejected. None: ids and sizes are not checked.
        norm_screening: False under DP-FedAvg: only the format checks may drop an update (see the
            module docstring); max_update_norm and outlier_factor are then ignored.
    """
    rejected, ok = [], []
    counts: dict[object, int] = {}
    for u in updates:
        sid = getattr(u, "site_id", None)
        counts[sid] = counts.get(sid, 0) + 1
    for u in updates:
        sid = getattr(u, "site_id", None)
        if not isinstance(sid, str):
            reason = f"site_id must be a name, got {sid!r}"
        elif counts[sid] > 1:
            reason = f"site {sid!r} sent {counts[sid]} updates in one round; all are refused"
        elif site_sizes is not None and sid not in site_sizes:
            reason = f"site {sid!r} is not a site of this federation"
        else:
            reason = check_update(u, global_state, None if site_sizes is None else site_sizes[sid])
        if reason is None:
            ok.append(u)
        else:
            rejected.append({"site": sid if isinstance(sid, str) else repr(sid), "reason": reason})
    if not norm_screening:
        return ok, rejected
    norms = {id(u): u.norm() for u in ok}
    median = statistics.median(norms.values()) if len(ok) >= 3 else math.nan
    accepted = []
    for u in ok:
        n = norms[id(u)]
        if max_update_norm is not None and not n <= max_update_norm:
            rejected.append({"site": u.site_id, "reason": f"update norm {n:.4g} > max_update_norm {max_update_norm:g}"})
        elif outlier_factor is not None and median > 0 and n > outlier_factor * median:
            rejected.append(
                {"site": u.site_id, "reason": f"update norm {n:.4g} > {outlier_factor:g} x the median {median:.4g}"}
            )
        else:
            accepted.append(u)
    return accepted, rejected
