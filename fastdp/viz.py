"""Figures: PNG grids of CT slices with ground-truth and predicted masks overlaid.

Uses matplotlib's object API with the Agg canvas (no pyplot global state, no display).
Needs matplotlib (``pip install matplotlib``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fastdp.viz needs matplotlib: pip install matplotlib") from exc
    return Figure, FigureCanvasAgg


def _np2d(x, name: str) -> np.ndarray:
    """[N, 1, H, W] / [N, H, W] tensor or array -> [N, H, W] numpy; logits [N, C, H, W] -> argmax."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.dim() == 4 and x.shape[1] > 1:
            x = x.argmax(1)
        x = x.float().numpy()
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"{name} must be [N, H, W] or [N, 1, H, W], got shape {x.shape}")
    return x


def save_segmentation_grid(
    path: str | os.PathLike,
    images,
    targets,
    preds=None,
    *,
    titles: Sequence[str] | None = None,
    max_rows: int = 8,
    dpi: int = 100,
) -> Path:
    """Write a PNG: one row per slice, columns slice | ground truth overlay | prediction overlay.

    Args:
        path: output file (parent folders are created).
        images: [N, 1, H, W] or [N, H, W], values in [0, 1] (windowed CT).
        targets: [N, H, W] labels (0 background, >0 organ).
        preds: [N, H, W] labels, or logits [N, C, H, W] (argmax is taken), or None.
        titles: optional row titles (e.g. per-slice Dice).
        max_rows: at most this many slices are drawn.
        dpi: resolution of the PNG.

    Returns: the path written.
    """
    Figure, FigureCanvasAgg = _matplotlib()
    imgs = _np2d(images, "images")[:max_rows]
    tgts = _np2d(targets, "targets")[: len(imgs)]
    prds = None if preds is None else _np2d(preds, "preds")[: len(imgs)]
    n = len(imgs)
    if n == 0:
        raise ValueError("save_segmentation_grid needs at least one slice")
    cols = 2 if prds is None else 3
    fig = Figure(figsize=(2.6 * cols, 2.6 * n))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n, cols, squeeze=False)
    overlays = [("slice", None, None), ("ground truth", tgts, "#ff3030")]
    if prds is not None:
        overlays.append(("prediction", prds, "#30a0ff"))
    for r in range(n):
        for c, (name, masks, color) in enumerate(overlays):
            ax = axes[r, c]
            ax.imshow(imgs[r], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
            if masks is not None:
                m = masks[r] > 0
                rgba = np.zeros((*m.shape, 4))
                rgba[m] = [*_hex_rgb(color), 0.35]
                ax.imshow(rgba, interpolation="nearest")
                if m.any() and not m.all():
                    ax.contour(m.astype(float), levels=[0.5], colors=[color], linewidths=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
        if titles is not None and r < len(titles):
            axes[r, 0].set_ylabel(titles[r], fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    return out


def _hex_rgb(color: str) -> tuple[float, float, float]:
    h = color.lstrip("#")
    return tuple(int(h[i : i + 2], 16) / 255.0 for i in (0, 2, 4))
