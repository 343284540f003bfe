"""The paper-like BatchNorm U-Net: eval-mode freezing is the same function, GroupNorm conversion keeps
the weights, and the frozen model's update goes through fastdp's DP engine."""

import torch
from torch import nn

from fastdp.models.batchnorm_unet import (
    FrozenBatchNorm2d,
    bn_unet_small,
    calibrate_batchnorm,
    freeze_batchnorm,
    to_groupnorm,
)


def _calibrated():
    torch.manual_seed(0)
    net = bn_unet_small(base_channels=4, depth=2)
    g = torch.Generator().manual_seed(1)
    return calibrate_batchnorm(net, torch.rand(16, 1, 16, 16, generator=g), batch_size=8)


def test_calibration_sets_running_statistics_and_freezing_keeps_the_function():
    net = _calibrated()
    bn = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn and not net.training
    assert all(float(m.running_var.mean()) != 1.0 for m in bn)  # changed from the reset value
    frozen = freeze_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(frozen.train()(x), net(x), rtol=1e-5, atol=1e-5)
    # Eval-mode BatchNorm sees brightness: scaling the input changes the output.
    assert not torch.allclose(frozen(x), frozen(0.5 * x), atol=1e-3)


def test_groupnorm_conversion_copies_affine_and_is_blind_to_scale():
    net = _calibrated()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    gn = to_groupnorm(freeze_batchnorm(net))
    norms = [m for m in gn.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and not any(isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d)) for m in gn.modules())
    bn_weights = [m.weight for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for a, b in zip(norms, bn_weights, strict=True):
        torch.testing.assert_close(a.weight, b)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    # Bias-free first convolution + GroupNorm: the output ignores the input's scale.
    torch.testing.assert_close(gn(x), gn(0.5 * x), rtol=1e-3, atol=1e-3)


def test_frozen_model_trains_under_dp():
    import warnings

    from torch.utils.data import DataLoader, TensorDataset

    from fastdp.engine import PrivacyEngine

    model = freeze_batchnorm(_calibrated())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    y = (x[:, 0] > 0.5).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, opt, loader = PrivacyEngine(seed=0).make_private(
            module=model,
            optimizer=opt,
            data_loader=DataLoader(TensorDataset(x, y), batch_size=4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    for xb, yb in loader:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(private(xb), yb).backward()
        opt.step()
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    # The running statistics are fixed buffers: DP training never touches them.
    for k in before:
        if "running" in k:
            torch.testing.assert_close(before[k], after[k])
