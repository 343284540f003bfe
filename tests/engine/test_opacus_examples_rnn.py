"""Opacus's examples/char-lstm-classification.py and examples/dcgan.py, adapted to synthetic data
(random token tensors, random images) and shrunk, with only the import changed: a few private
steps each, then one step at sigma 0 against the microbatch-of-one reference.

dcgan.py calls the discriminator on the real batch and on the generator's fakes before one
backward of errD_real + errD_fake: fastdp takes both calls as one batch, row i of each call
privacy unit i (gradients summed, then clipped once), as Opacus does."""

from __future__ import annotations

import copy

import pytest
import torch
from _helpers import check_against_reference
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fastdp
from fastdp.layers import DPGRU, DPLSTM, DPRNN

VOCAB, EMB, HID, CLASSES, T = 12, 6, 8, 3, 5


class CharNNClassifier(nn.Module):
    """As in the example: embedding -> RNN called with a hidden state argument -> last step -> linear."""

    def __init__(self, rnn_type, num_layers=1, bidirectional=False):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, EMB)
        self.rnn = rnn_type(EMB, HID, num_layers=num_layers, bidirectional=bidirectional, batch_first=True)
        self.out_layer = nn.Linear(HID * (2 if bidirectional else 1), CLASSES)

    def forward(self, x, hidden=None):
        x = self.embedding(x)  # -> [B, T, D]
        x, _ = self.rnn(x, hidden)  # -> [B, T, H]
        x = x[:, -1, :]  # -> [B, H]
        return self.out_layer(x)  # -> [B, C]


def _tokens(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randint(0, VOCAB, (n, T), generator=g), torch.randint(0, CLASSES, (n,), generator=g))


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("rnn_type", [DPLSTM, DPGRU, DPRNN, nn.LSTM])
def test_char_lstm_classification_trains_privately(rnn_type):
    torch.manual_seed(0)
    model = CharNNClassifier(rnn_type, num_layers=2, bidirectional=rnn_type is DPLSTM)
    engine = fastdp.PrivacyEngine(seed=0)
    model, optimizer, train_loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
        data_loader=DataLoader(_tokens(48), batch_size=8),
        noise_multiplier=1.1,
        max_grad_norm=1.0,
    )
    criterion = nn.CrossEntropyLoss()
    before = _snapshot(model._module)
    losses = []
    model.train()
    for x, y in train_loader:  # the example's train(): forward, loss, backward, step, zero_grad
        logits = model(x)
        loss = criterion(logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert engine.accountant.steps == len(train_loader) == 6
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(before[n], p) for n, p in model._module.named_parameters())
    assert engine.get_epsilon(1e-5) > 0
    model.eval()
    with torch.no_grad():  # the example's test(): evaluation is not recorded
        assert model(next(iter(train_loader))[0]).shape[1] == CLASSES


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("rnn_type", [DPLSTM, nn.GRU])
def test_char_lstm_one_step_exact(rnn_type):
    torch.manual_seed(0)
    model = CharNNClassifier(rnn_type, num_layers=2, bidirectional=True)
    x, y = _tokens(6).tensors
    ce = nn.functional.cross_entropy
    check_against_reference(model, x, y, ce, ce, rtol=1e-9)


# --------------------------------------------------------------------------------------- DCGAN

NZ, NGF, NDF, NC = 4, 4, 4, 1  # images 1 x 8 x 8


class Generator(nn.Module):
    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(NZ, NGF * 2, 4, 1, 0, bias=False),  # 4x4
            nn.GroupNorm(2, NGF * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(NGF * 2, NC, 4, 2, 1, bias=False),  # 8x8
            nn.Tanh(),
        )

    def forward(self, input):
        return self.main(input)


class Discriminator(nn.Module):
    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(NC, NDF, 4, 2, 1, bias=False),  # 4x4
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(NDF, NDF * 2, 4, 2, 1, bias=False),  # 2x2
            nn.GroupNorm(2, NDF * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(NDF * 2, 1, 2, 1, 0, bias=False),  # 1x1
            nn.Sigmoid(),
        )

    def forward(self, input):
        return self.main(input).view(-1, 1).squeeze(1)


def test_dcgan_trains_privately_with_both_discriminator_calls_before_one_backward():
    torch.manual_seed(0)
    netG, netD = Generator(), Discriminator()
    dataloader = DataLoader(TensorDataset(torch.rand(40, NC, 8, 8) * 2 - 1), batch_size=8)
    optimizerD = torch.optim.Adam(netD.parameters(), lr=1e-2, betas=(0.5, 0.999))
    privacy_engine = fastdp.PrivacyEngine(seed=0)
    netD, optimizerD, dataloader = privacy_engine.make_private(
        module=netD, optimizer=optimizerD, data_loader=dataloader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    optimizerG = torch.optim.Adam(netG.parameters(), lr=1e-2, betas=(0.5, 0.999))
    criterion = nn.BCELoss()
    beforeD, beforeG = _snapshot(netD._module), _snapshot(netG)
    steps = 0
    for _epoch in range(2):
        for data in dataloader:  # the example's loop, unchanged
            optimizerD.zero_grad(set_to_none=True)
            real_data = data[0]
            batch_size = real_data.size(0)
            label_true = torch.full((batch_size,), 1.0)
            output = netD(real_data)
            errD_real = criterion(output, label_true)
            noise = torch.randn(batch_size, NZ, 1, 1)
            fake = netG(noise)
            label_fake = torch.full((batch_size,), 0.0)
            output = netD(fake.detach())
            errD_fake = criterion(output, label_fake)
            errD = errD_real + errD_fake
            errD.backward()
            optimizerD.step()
            optimizerD.zero_grad(set_to_none=True)
            steps += 1

            optimizerG.zero_grad()
            label_g = torch.full((batch_size,), 1.0)
            output_g = netD(fake)
            errG = criterion(output_g, label_g)
            errG.backward()
            optimizerG.step()
            assert torch.isfinite(errD) and torch.isfinite(errG)
    assert privacy_engine.accountant.steps == steps == 2 * len(dataloader)
    assert all(not torch.equal(beforeD[n], p) for n, p in netD._module.named_parameters())
    assert all(not torch.equal(beforeG[n], p) for n, p in netG.named_parameters())
    assert all(p.grad is None for p in netD._module.parameters())  # the G step leaves D's grads alone
    assert privacy_engine.get_epsilon(1e-5) > 0


@pytest.mark.usefixtures("float64")
def test_dcgan_discriminator_step_exact_units_are_real_fake_pairs():
    """sigma 0: p.grad = sum_i c_i (g(real_i) + g(fake_i)) / B, c_i from the pair's norm."""
    torch.manual_seed(0)
    netD = Discriminator()
    B = 6
    real = torch.rand(B, NC, 8, 8) * 2 - 1
    fake = Generator()(torch.randn(B, NZ, 1, 1)).detach()
    bce = nn.functional.binary_cross_entropy
    ref = copy.deepcopy(netD)
    params = [p for p in ref.parameters()]
    per_unit = []
    for i in range(B):
        loss = bce(ref(real[i : i + 1]), torch.ones(1)) + bce(ref(fake[i : i + 1]), torch.zeros(1))
        per_unit.append(torch.autograd.grad(loss, params))
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in per_unit])
    C = float(norms.median())
    c = (C / (norms + 1e-6)).clamp(max=1.0)
    expected = [sum(c[i] * per_unit[i][k] for i in range(B)) / B for k in range(len(params))]
    assert (c < 1).any() and (c == 1).any()

    engine = fastdp.PrivacyEngine(seed=0)
    pm, opt, _ = engine.make_private(
        module=netD,
        optimizer=torch.optim.SGD(netD.parameters(), lr=0.0),
        data_loader=DataLoader(TensorDataset(real), batch_size=B),
        noise_multiplier=0.0,
        max_grad_norm=C,
        poisson_sampling=False,
    )
    opt.zero_grad()
    err = bce(pm(real), torch.ones(B)) + bce(pm(fake), torch.zeros(B))
    err.backward()
    opt.step()
    for p, e in zip(netD.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-13)
    assert engine.accountant.steps == 1
