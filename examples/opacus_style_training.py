"""DP-SGD training the Opacus way, with fastdp: the only change is the import.

A small GroupNorm U-Net learns to segment bright discs in noisy 32x32 images with per-sample
cross-entropy + Dice, Poisson sampling, a physical-batch limit and RDP accounting.

    python examples/opacus_style_training.py --epochs 3
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdp  # instead of: import opacus
from fastdp.engine import BatchMemoryManager


def make_data(n: int, size: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centres = torch.randint(6, size - 6, (n, 2), generator=g)
    radii = torch.randint(3, 7, (n,), generator=g)
    masks = ((yy - centres[:, 0, None, None]) ** 2 + (xx - centres[:, 1, None, None]) ** 2) <= radii[:, None, None] ** 2
    images = masks.float() + 0.5 * torch.randn(n, size, size, generator=g)
    return TensorDataset(images.unsqueeze(1), masks.long())


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(4, cout), nn.PReLU())


class TinyUNet(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.enc1, self.enc2 = block(1, c), block(c, 2 * c)
        self.up = nn.ConvTranspose2d(2 * c, c, 2, stride=2)
        self.dec = block(2 * c, c)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(nn.functional.max_pool2d(e1, 2))
        return self.head(self.dec(torch.cat([self.up(e2), e1], 1)))


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample cross-entropy + soft Dice (reduced over each image), mean over the batch."""
    ce = nn.functional.cross_entropy(logits, target, reduction="none").flatten(1).mean(1)
    prob = logits.softmax(1)[:, 1]
    t = target.float()
    dice = 1 - (2 * (prob * t).flatten(1).sum(1) + 1) / ((prob + t).flatten(1).sum(1) + 1)
    return (ce + dice).mean()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-physical-batch", type=int, default=32)
    ap.add_argument("--epsilon", type=float, default=8.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)

    train = DataLoader(make_data(args.n), batch_size=args.batch_size)
    model = TinyUNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    engine = fastdp.PrivacyEngine(accountant="rdp", secure_mode=False)
    model, optimizer, train = engine.make_private_with_epsilon(
        module=model,
        optimizer=optimizer,
        data_loader=train,
        target_epsilon=args.epsilon,
        target_delta=1e-5,
        epochs=args.epochs,
        max_grad_norm=1.0,
        poisson_sampling=True,
    )
    print(f"noise multiplier {optimizer.noise_multiplier:.3f}, sample rate {optimizer.sample_rate:.4f}")
    for epoch in range(args.epochs):
        losses = []
        with BatchMemoryManager(
            data_loader=train, max_physical_batch_size=args.max_physical_batch, optimizer=optimizer
        ) as loader:
            for x, y in loader:
                optimizer.zero_grad()
                loss = seg_loss(model(x), y)
                loss.backward()
                optimizer.step()
                if x.shape[0]:
                    losses.append(loss.item())
        eps = engine.get_epsilon(delta=1e-5)
        print(f"epoch {epoch + 1}: loss {sum(losses) / max(1, len(losses)):.3f}, epsilon {eps:.2f} (delta 1e-5)")

    val = make_data(128, seed=1)
    model.eval()
    with torch.no_grad():
        pred = model(val.tensors[0]).argmax(1)
    inter = ((pred == 1) & (val.tensors[1] == 1)).sum().item()
    dice = 2 * inter / ((pred == 1).sum().item() + (val.tensors[1] == 1).sum().item())
    print(f"validation Dice {dice:.3f}")


if __name__ == "__main__":
    main()
