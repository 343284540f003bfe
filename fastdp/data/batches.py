"""Batches as training loops see them: ``(image, label)`` tuples (fastdp's datasets) or dicts (MONAI's).

MONAI datasets and dictionary transforms yield ``{"image": ..., "label": ..., <other keys>}``
items; torch's default collate turns a list of them into one dict of batched tensors (and
lists of the strings). :func:`image_and_label` takes the two tensors a segmentation step
needs out of either form, so the same training loop runs on both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

#: The keys MONAI's examples and transforms use for a segmentation pair.
DEFAULT_BATCH_KEYS: tuple[str, str] = ("image", "label")


def plain_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a plain torch.Tensor (same storage, no copy): drops MONAI's MetaTensor subclass.

    A MetaTensor carries its metadata through every operation (``__torch_function__``); the DP
    step and the model need only the values, and plain tensors keep torch.func and autograd
    Functions on their ordinary path.
    """
    return t if type(t) is torch.Tensor else t.as_subclass(torch.Tensor)


def image_and_label(batch, keys: tuple[str, str] = DEFAULT_BATCH_KEYS) -> tuple[torch.Tensor, torch.Tensor]:
    """The (image, label) tensors of a collated batch, as plain tensors.

    Args:
        batch: a dict (MONAI's convention: ``{"image": [B, C, H, W], "label": [B, 1, H, W] or
            [B, H, W], ...}``; other keys are ignored) or a tuple/list whose first two entries
            are the image and the label batch (fastdp's datasets, TensorDataset).
        keys: the image and label keys of a dict batch.

    Returns:
        (image, label) with the shapes and dtypes the batch has (MetaTensors become plain
        tensors); an empty Poisson batch gives tensors with 0 rows.

    Raises:
        KeyError: a dict batch lacks one of ``keys`` (the message lists the keys it has).
        TypeError: the batch is neither, or its entries are not tensors.
    """
    if isinstance(batch, Mapping):
        missing = [k for k in keys if k not in batch]
        if missing:
            raise KeyError(
                f"the batch has no {missing} entries (its keys: {sorted(map(str, batch))}); pass the "
                "dataset's image and label keys as batch_keys=(image_key, label_key)"
            )
        x, y = batch[keys[0]], batch[keys[1]]
    elif isinstance(batch, Sequence) and not isinstance(batch, (str, bytes)) and len(batch) >= 2:
        x, y = batch[0], batch[1]
    else:
        raise TypeError(
            f"expected a batch of (image, label) or a dict with keys {list(keys)}, got {type(batch).__name__}"
        )
    for name, t in (("image", x), ("label", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"the batch's {name} is a {type(t).__name__}, not a tensor: the dataset must give tensors "
                "(or numpy arrays, which the default collate turns into tensors)"
            )
    return plain_tensor(x), plain_tensor(y)
