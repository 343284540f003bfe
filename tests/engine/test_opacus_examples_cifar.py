"""Opacus's examples/cifar10.py training loop with only the import changed (fastdp for opacus).

Our own adaptation, on random tensors of CIFAR's shape (3x32x32, 10 classes) and a narrower
convnet with GroupNorm: flat clipping with SGD (momentum, weight decay) and Adam, the script's
cosine LR schedule through optimizer.param_groups, --clip_per_layer, --grad_sample_mode no_op
(torch.func vmap(grad) and p.grad_sample, as the script does), the script's own checkpoint and
engine.save_checkpoint / load_checkpoint. Plus: every Opacus submodule name a script imports.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.optim as optim
from torch.func import grad_and_value, vmap
from torch.utils.data import DataLoader, TensorDataset

import fastdp
from fastdp import PrivacyEngine  # was: from opacus import PrivacyEngine
from fastdp.grad_sample.functorch import make_functional  # was: from opacus.grad_sample.functorch import ...


@pytest.fixture(autouse=True)
def _one_conv_method(monkeypatch):
    # One fixed per-sample conv method: no timing runs, and runs compared for equality agree.
    monkeypatch.setenv("FASTDP_CONV_METHOD", "grouped")


@dataclass
class Args:
    """The script's command-line arguments that the training loop reads (small values)."""

    grad_sample_mode: str = "hooks"
    optim: str = "SGD"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    sigma: float = 1.5
    max_per_sample_grad_norm: float = 10.0
    clip_per_layer: bool = False
    lr_schedule: str = "cos"
    start_epoch: int = 1
    epochs: int = 2
    batch_size: int = 8
    delta: float = 1e-5
    print_freq: int = 4  # once per epoch: an RDP epsilon takes ~0.1 s


def convnet(num_classes):
    # cifar10.py's convnet, narrower, with a GroupNorm after each of the first two convolutions
    return nn.Sequential(
        nn.Conv2d(3, 4, kernel_size=3, stride=1, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(4, 8, kernel_size=3, stride=1, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(8, 8, kernel_size=3, stride=1, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(start_dim=1, end_dim=-1),
        nn.Linear(8, num_classes, bias=True),
    )


def accuracy(preds, labels):
    return (preds == labels).mean()


def train(args, model, train_loader, optimizer, privacy_engine, epoch, log):
    """cifar10.py's train(), printing replaced by `log`."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    losses, top1_acc = [], []

    if args.grad_sample_mode == "no_op":
        fmodel, _fparams = make_functional(model)

        def compute_loss_stateless_model(params, sample, target):
            batch = sample.unsqueeze(0)
            targets = target.unsqueeze(0)
            predictions = fmodel(params, batch)
            return criterion(predictions, targets)

        ft_compute_grad = grad_and_value(compute_loss_stateless_model)
        ft_compute_sample_grad = vmap(ft_compute_grad, in_dims=(None, 0, 0))
        params = list(model.parameters())

    for i, (images, target) in enumerate(train_loader):
        output = model(images)
        if args.grad_sample_mode == "no_op":
            per_sample_grads, per_sample_losses = ft_compute_sample_grad(params, images, target)
            per_sample_grads = [g.detach() for g in per_sample_grads]
            loss = torch.mean(per_sample_losses)
            for p, g in zip(params, per_sample_grads, strict=True):
                p.grad_sample = g
        else:
            loss = criterion(output, target)
            preds = np.argmax(output.detach().cpu().numpy(), axis=1)
            top1_acc.append(accuracy(preds, target.numpy()))
            loss.backward()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
        if i % args.print_freq == 0:
            log.append((epoch, i, privacy_engine.accountant.get_epsilon(delta=args.delta)))
    return losses


def evaluate(model, test_loader):
    """cifar10.py's test(): evaluation under no_grad, through the private model."""
    model.eval()
    criterion = nn.CrossEntropyLoss()
    losses, top1_acc = [], []
    with torch.no_grad():
        for images, target in test_loader:
            output = model(images)
            losses.append(criterion(output, target).item())
            top1_acc.append(accuracy(np.argmax(output.numpy(), axis=1), target.numpy()))
    return float(np.mean(top1_acc))


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))


def main(args, checkpoint_file=None):
    """cifar10.py's main() for one process on CPU, without DDP. Returns what the test checks."""
    torch.manual_seed(0)
    train_loader = DataLoader(_data(32, 1), batch_size=args.batch_size, num_workers=0)
    test_loader = DataLoader(_data(16, 2), batch_size=16, shuffle=False)
    model = convnet(num_classes=10)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    if args.optim == "SGD":
        optimizer = optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    elif args.optim == "Adam":
        optimizer = optim.Adam(model.parameters(), lr=args.lr)
    else:
        raise NotImplementedError(args.optim)

    if args.clip_per_layer:
        n_layers = len([(n, p) for n, p in model.named_parameters() if p.requires_grad])
        max_grad_norm = [args.max_per_sample_grad_norm / np.sqrt(n_layers)] * n_layers
    else:
        max_grad_norm = args.max_per_sample_grad_norm
    privacy_engine = PrivacyEngine(secure_mode=False)
    clipping = "per_layer" if args.clip_per_layer else "flat"
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=train_loader,
        noise_multiplier=args.sigma,
        max_grad_norm=max_grad_norm,
        clipping=clipping,
        grad_sample_mode=args.grad_sample_mode,
    )
    log, lrs, losses = [], [], []
    best_acc1 = 0.0
    for epoch in range(args.start_epoch, args.epochs + 1):
        if args.lr_schedule == "cos":
            lr = args.lr * 0.5 * (1 + np.cos(np.pi * epoch / (args.epochs + 1)))
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
        lrs.append(optimizer.original_optimizer.param_groups[0]["lr"])
        losses += train(args, model, train_loader, optimizer, privacy_engine, epoch, log)
        top1_acc = evaluate(model, test_loader)
        best_acc1 = max(top1_acc, best_acc1)
        if checkpoint_file is not None:  # the script's own checkpoint
            torch.save(
                {
                    "epoch": epoch + 1,
                    "arch": "Convnet",
                    "state_dict": model.state_dict(),
                    "best_acc1": best_acc1,
                    "optimizer": optimizer.state_dict(),
                },
                checkpoint_file,
            )
    return {
        "engine": privacy_engine,
        "model": model,
        "optimizer": optimizer,
        "initial": initial,
        "log": log,
        "lrs": lrs,
        "losses": losses,
    }


def _check_trained(out, args):
    model = out["model"]
    assert all(np.isfinite(out["losses"])) and len(out["losses"]) == 4 * args.epochs
    assert all(not torch.equal(p, out["initial"][n]) for n, p in model._module.named_parameters())
    steps = 4 * args.epochs
    assert out["engine"].accountant.steps == steps
    eps = out["engine"].get_epsilon(args.delta)
    assert eps == pytest.approx(fastdp.compute_epsilon(1 / 4, args.sigma, steps, args.delta, "prv"))  # Opacus's default
    assert [e for _, _, e in out["log"]] == sorted(e for _, _, e in out["log"])  # epsilon only grows


@pytest.mark.parametrize("optim_name", ["SGD", "Adam"])
def test_cifar10_flat_clipping_with_cosine_schedule(optim_name):
    args = Args(optim=optim_name, lr=0.1 if optim_name == "SGD" else 1e-3)
    out = main(args)
    _check_trained(out, args)
    expected = [args.lr * 0.5 * (1 + np.cos(np.pi * e / (args.epochs + 1))) for e in range(1, args.epochs + 1)]
    assert out["lrs"] == pytest.approx(expected)  # set through the DP optimizer's param_groups


def test_cifar10_clip_per_layer():
    args = Args(clip_per_layer=True)
    out = main(args)
    _check_trained(out, args)
    opt = out["optimizer"]
    n = len(opt.max_grad_norms)
    assert n == 12 and opt.max_grad_norm == pytest.approx(args.max_per_sample_grad_norm)


def test_cifar10_grad_sample_mode_no_op():
    args = Args(grad_sample_mode="no_op")
    out = main(args)
    _check_trained(out, args)


def test_cifar10_checkpoints(tmp_path):
    args = Args(epochs=1)
    out = main(args, checkpoint_file=tmp_path / "checkpoint.tar")
    saved = torch.load(tmp_path / "checkpoint.tar", weights_only=False)  # the script's own checkpoint
    model = convnet(10)
    engine = PrivacyEngine()
    fresh, opt, _ = engine.make_private(
        module=model,
        optimizer=optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        data_loader=DataLoader(_data(32, 1), batch_size=8),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    fresh.load_state_dict(saved["state_dict"])  # '_module.'-prefixed keys, as Opacus's
    opt.load_state_dict(saved["optimizer"])
    for (n, p), (_, q) in zip(fresh.named_parameters(), out["model"].named_parameters(), strict=True):
        assert torch.equal(p, q), n
    # Opacus's engine checkpoint: model, optimizer and accountant (plus fastdp's noise stream)
    out["engine"].save_checkpoint(path=tmp_path / "engine.pt", module=out["model"], optimizer=out["optimizer"])
    ckpt = engine.load_checkpoint(path=tmp_path / "engine.pt", module=fresh, optimizer=opt)
    assert set(ckpt) >= {"module_state_dict", "privacy_accountant_state_dict"}
    assert engine.get_epsilon(1e-5) == out["engine"].get_epsilon(1e-5) > 0


@pytest.mark.parametrize(
    "module, names",
    [
        ("fastdp.validators", ["ModuleValidator"]),
        ("fastdp.utils.batch_memory_manager", ["BatchMemoryManager"]),
        ("fastdp.data_loader", ["DPDataLoader"]),
        ("fastdp.optimizers", ["DPOptimizer", "DPPerLayerOptimizer"]),
        ("fastdp.grad_sample", ["GradSampleModule", "GradSampleModuleNoOp"]),
        ("fastdp.grad_sample.functorch", ["make_functional"]),
    ],
)
def test_opacus_submodule_names_import_from_fastdp(module, names):
    mod = importlib.import_module(module)
    opacus_mod = importlib.import_module(module.replace("fastdp", "opacus", 1))
    for name in names:
        assert hasattr(opacus_mod, name), f"{module}.{name} is not an Opacus name"
        assert callable(getattr(mod, name))
    engine_names = {"BatchMemoryManager": fastdp.BatchMemoryManager, "DPDataLoader": fastdp.engine.DPDataLoader}
    for name in set(names) & set(engine_names):
        assert getattr(mod, name) is engine_names[name]  # the engine's class, not a copy
