"""The attack experiment: invert the non-private and the DP update of the same CT slices.

One global model (a lightly trained ``unet_small``), one site batch (1 or 4 phantom slices),
the update that site would send without DP and with DP-SGD at several noise multipliers (same
batch, same clipping bound), the same attack on each, metrics against the truth next to the
trivial guesses, a PNG grid and timings.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def pretrain(
    model: nn.Module, images: torch.Tensor, masks: torch.Tensor, steps: int, batch_size: int = 8, lr: float = 3e-3
) -> nn.Module:
    """Lightly trains ``model`` in place (Adam, Dice+CE) on images [N, 1, H, W], masks [N, H, W].

    A server attacks a model that has trained for a while, and an untrained net's gradients
    carry less of the image (measured in the issue); a few dozen steps are enough for that.
    """
    from fastdp.models import dice_ce_criterion

    crit = dice_ce_criterion()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        opt.zero_grad(set_to_none=True)
        crit(model(images[idx]), masks[idx]).backward()
        opt.step()
    return model


def site_update(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    *,
    noise_multiplier: float | None = None,
    max_grad_norm: float = 1.0,
    local_steps: int = 1,
    lr: float = 0.1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """What a site holding exactly this batch sends: ``delta = local - global`` after local SGD.

    Every local step uses the whole batch (a site whose data is the batch, Poisson rate 1), plain
    SGD without momentum, the Dice+CE criterion. ``noise_multiplier=None`` trains without DP;
    otherwise through ``fastdp.PrivacyEngine`` (per-sample clipping to ``max_grad_norm``, noise
    std ``noise_multiplier * max_grad_norm``, divided by the batch size): exactly the DP-SGD step
    of a fastdp site. The model is not modified.

    Args:
        model: the global model.
        images: [B, 1, H, W] in [0, 1]; masks: [B, H, W] int.
        local_steps, lr: the site's local SGD.
        seed: the DP noise seed.
    Returns: name -> delta for every floating-point entry of ``model.state_dict()``.
    """
    import fastdp
    from fastdp.models import dice_ce_criterion

    local = copy.deepcopy(model)
    global_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(local.parameters(), lr=lr)
    crit = dice_ce_criterion()
    loader = DataLoader(TensorDataset(images, masks), batch_size=images.shape[0])
    if noise_multiplier is not None:
        engine = fastdp.PrivacyEngine(seed=seed)
        local, opt, loader = engine.make_private(
            module=local,
            optimizer=opt,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,  # rate 1: every step takes the whole batch, as a one-batch site does
        )
    for _ in range(local_steps):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            crit(local(x), y).backward()
            opt.step()
    state = local.state_dict()
    return {k: (state[k] - v).detach() for k, v in global_state.items() if v.is_floating_point()}
