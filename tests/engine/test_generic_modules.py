"""The generic torch.func path on modules Opacus users train: recurrent layers with hidden states
and tuple outputs, attention with masks, transformer layers, and modules that own parameters and
have trainable children (a ViT's cls token and position embedding). Exact in float64 against the
microbatch-of-one reference; what cannot be made exact (dropout inside the unit, sequence-first
transformer layers, packed sequences, non-per-sample outputs) is refused with an error that says
what to do."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from _helpers import check_against_reference, fastdp_step, mse_batch, mse_per_sample
from _reference import clipped_mean, per_sample_grads
from torch import nn

import fastdp
from fastdp.engine import UnsupportedModuleError
from fastdp.layers import DPGRU, DPLSTM, DPRNN, DPMultiheadAttention

B, T, D, H = 5, 4, 3, 6

pytestmark = pytest.mark.usefixtures("float64")


def _exact(model, x, y):
    check_against_reference(model, x, y, mse_per_sample, mse_batch, rtol=1e-9)


# ------------------------------------------------------------------------------------ recurrent


class RNNHead(nn.Module):
    """x [B, T, D] -> an RNN with its initial state computed from x (a batched extra argument that
    needs a gradient, batch in dim 1) -> a head on the last output and the last hidden state."""

    def __init__(self, rnn: nn.RNNBase, init_state: bool = True, seq_first_input: bool = False):
        super().__init__()
        self.rnn = rnn
        self.init_state = init_state
        self.seq_first_input = seq_first_input
        L = rnn.num_layers * (2 if rnn.bidirectional else 1)
        self.L = L
        self.h_in = nn.Linear(D, L * rnn.hidden_size)
        h = getattr(rnn, "proj_size", 0) or rnn.hidden_size
        self.head = nn.Linear(h * (2 if rnn.bidirectional else 1) + h, 2)

    def forward(self, x):
        state = None
        if self.init_state:
            h0 = torch.tanh(self.h_in(x[:, 0])).view(x.shape[0], self.L, -1).transpose(0, 1).contiguous()
            state = (h0, torch.sin(h0)) if isinstance(self.rnn, nn.LSTM) else h0
        inp = x.transpose(0, 1) if self.seq_first_input else x
        out, hidden = self.rnn(inp, state)
        last = out[-1] if self.seq_first_input else out[:, -1]
        h_n = hidden[0] if isinstance(hidden, tuple) else hidden
        return self.head(torch.cat([last, h_n[-1]], 1))


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.LSTM(D, H, num_layers=2, batch_first=True, bidirectional=True),
        lambda: nn.GRU(D, H, batch_first=True),
        lambda: nn.RNN(D, H, num_layers=2, batch_first=True, nonlinearity="relu"),
        lambda: nn.LSTM(D, H, batch_first=True, proj_size=2),
    ],
    ids=["lstm-2layer-bidir", "gru", "rnn-relu-2layer", "lstm-proj"],
)
@pytest.mark.parametrize("init_state", [True, False], ids=["hidden", "no-hidden"])
def test_rnn_batch_first_exact(make, init_state):
    torch.manual_seed(0)
    rnn = make()
    if rnn.proj_size and init_state:  # h_0 is [L, B, proj_size] there
        pytest.skip("the state head builds [L, B, hidden_size] states")
    _exact(RNNHead(rnn, init_state), torch.randn(B, T, D), torch.randn(B, 2))


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
def test_rnn_seq_first_exact(cls):
    """batch_first=False: the input's batch is dim 1 (the wrapper passes [T, B, D])."""
    torch.manual_seed(0)
    rnn = cls(D, H, num_layers=2, bidirectional=True)
    _exact(RNNHead(rnn, seq_first_input=True), torch.randn(B, T, D), torch.randn(B, 2))


@pytest.mark.parametrize("cls", [DPLSTM, DPGRU, DPRNN])
def test_fastdp_layers_exact_and_opacus_conventions(cls):
    """fastdp.layers: Opacus's signatures, forward(input, state_init) -> (output, hidden)."""
    torch.manual_seed(0)
    rnn = cls(D, H, num_layers=2, batch_first=True, bidirectional=True)
    out, hidden = rnn(torch.randn(B, T, D))
    assert out.shape == (B, T, 2 * H)
    if cls is DPLSTM:
        assert isinstance(hidden, tuple) and hidden[0].shape == hidden[1].shape == (4, B, H)
    else:
        assert hidden.shape == (4, B, H)
    assert set(rnn.state_dict()) == set(getattr(nn, cls.__name__[2:])(D, H, 2, bidirectional=True).state_dict())
    _exact(RNNHead(rnn), torch.randn(B, T, D), torch.randn(B, 2))


def _content_dropout(t, p=0.5, training=True, inplace=False):
    """A dropout whose mask depends on the values only (the same for a sample in a batch or alone),
    so that the microbatch reference sees the masks the batch saw."""
    if not training or p == 0:
        return t
    return t * ((t.detach() * 1e3).frac().abs() > p) / (1 - p)


def _stacked_forward(rnn: nn.RNNBase):
    """torch's definition of a multi-layer RNN with dropout, written out: single-layer RNNs with the
    layer's weights, dropout on every layer's output but the last's."""
    D = 2 if rnn.bidirectional else 1

    def forward(self, x, hx=None):
        lstm = isinstance(rnn, nn.LSTM)
        out, hs, cs = x, [], []
        for layer in range(rnn.num_layers):
            one = next(c for c in type(rnn).__mro__ if c.__module__.startswith("torch."))  # the torch class
            kw = {"proj_size": rnn.proj_size} if lstm else {}
            insize = rnn.input_size if layer == 0 else out.shape[-1]
            single = one(
                insize,
                rnn.hidden_size,
                1,
                bias=rnn.bias,
                batch_first=rnn.batch_first,
                bidirectional=rnn.bidirectional,
                **kw,
            )
            params = {n: getattr(rnn, n.replace("_l0", f"_l{layer}")) for n, _ in single.named_parameters()}
            rows = slice(layer * D, (layer + 1) * D)
            st = None if hx is None else ((hx[0][rows], hx[1][rows]) if lstm else hx[rows])
            out, h = torch.func.functional_call(single, params, (out, st))
            hs.append(h[0] if lstm else h)
            cs.append(h[1] if lstm else None)
            if layer < rnn.num_layers - 1:
                out = torch.nn.functional.dropout(out, rnn.dropout, training=self.training)
        h_n = torch.cat(hs)
        return out, ((h_n, torch.cat(cs)) if lstm else h_n)

    return forward


@pytest.mark.parametrize("cls", [DPLSTM, nn.GRU, DPRNN])
def test_rnn_dropout_between_layers_exact(cls, monkeypatch):
    """dropout > 0 between layers: each layer is its own unit, the dropout on the batch between them."""
    torch.manual_seed(0)
    model = RNNHead(cls(D, H, num_layers=3, dropout=0.4, batch_first=True, bidirectional=True))
    x, y = torch.randn(B, T, D), torch.randn(B, 2)
    # the written-out definition is torch's (dropout off: the two agree)
    stacked = copy.deepcopy(model)
    stacked.rnn.forward = types.MethodType(_stacked_forward(stacked.rnn), stacked.rnn)
    stacked.eval(), model.eval()
    torch.testing.assert_close(stacked(x), model(x), rtol=1e-12, atol=1e-12)
    stacked.train(), model.train()
    monkeypatch.setattr(torch.nn.functional, "dropout", _content_dropout)
    ref, norms = per_sample_grads(stacked, mse_per_sample, x, y)
    C = float(norms.median())
    expected = clipped_mean(ref, norms, C, B)
    got, _, _ = fastdp_step(model, x, y, mse_batch, C)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-9, atol=1e-12)


def test_rnn_dropout_trains_with_real_dropout():
    torch.manual_seed(0)
    model = RNNHead(DPLSTM(D, H, num_layers=2, dropout=0.5, batch_first=True))
    pm, opt, _ = _private(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    mse_batch(pm(torch.randn(4, T, D)), torch.randn(4, 2)).backward()
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_rnn_only_the_rnn_is_a_unit_and_state_dict_unchanged():
    model = RNNHead(nn.LSTM(D, H, batch_first=True))
    keys = set(model.state_dict())
    pm = fastdp.PrivacyEngine(seed=0).make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, T, D)), batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )[0]
    assert set(model.state_dict()) == keys
    assert {id(m) for m in pm._patched} == {id(model.rnn), id(model.h_in), id(model.head)}


# ------------------------------------------------------------------------------------ attention


class Attend(nn.Module):
    """x [B, T, E] -> MultiheadAttention with masks computed per sample from x -> Linear."""

    def __init__(self, mha: nn.MultiheadAttention, need_weights: bool, masks: str):
        super().__init__()
        self.mha, self.need_weights, self.masks = mha, need_weights, masks
        self.head = nn.Linear(mha.embed_dim + (T if need_weights else 0), 2)

    def forward(self, x):
        kw = {}
        if "padding" in self.masks:
            kpm = x[:, :, 0] > 0.5
            kpm[:, 0] = False  # at least one key per sample
            kw["key_padding_mask"] = kpm
        if "shared" in self.masks:  # [T, T], the same for all samples
            kw["attn_mask"] = torch.ones(T, T, dtype=torch.bool).triu(1)  # causal
        if "per-sample" in self.masks:  # [B*heads, T, T] additive, needs a gradient (through x)
            s = x[:, :, :1]
            m = -(s - s.transpose(1, 2)).abs()
            kw["attn_mask"] = m.repeat_interleave(self.mha.num_heads, dim=0)
        q = x if self.mha.batch_first else x.transpose(0, 1)
        out, w = self.mha(q, q, q, need_weights=self.need_weights, **kw)
        out = out if self.mha.batch_first else out.transpose(0, 1)
        feats = out.mean(1)
        if self.need_weights:
            feats = torch.cat([feats, w.mean(1)], 1)
        return self.head(feats)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masks", ["none", "padding+shared", "per-sample"])
def test_multihead_attention_exact(batch_first, need_weights, masks):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=batch_first)
    _exact(Attend(mha, need_weights, masks), torch.randn(B, T, 8), torch.randn(B, 2))


def test_multihead_attention_kdim_bias_kv_exact():
    """Separate q/k/v projections (kdim, vdim) and bias_k / bias_v: all parameters covered."""
    torch.manual_seed(0)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, kdim=3, vdim=5, add_bias_kv=True, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            out, _ = self.mha(x[..., :8], x[..., 8:11], x[..., 11:16])
            return self.head(out.mean(1))

    _exact(Cross(), torch.randn(B, T, 16), torch.randn(B, 2))


def test_dp_multihead_attention_opacus_signature():
    torch.manual_seed(0)
    mha = DPMultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(B, T, 8)
    out, w = mha(x, x, x, None, True, None, False)  # Opacus's positional order (is_causal last)
    assert out.shape == (B, T, 8) and w.shape == (B, T, T)
    _exact(Attend(mha, True, "padding+shared"), x, torch.randn(B, 2))


class Encoder(nn.Module):
    def __init__(self, norm_first=False, layers=1):
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            8, 2, dim_feedforward=16, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False) if layers > 1 else layer
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        kpm = x[:, :, 0] > 0.5
        kpm[:, 0] = False
        kw = {"src_key_padding_mask": kpm}
        return self.head(self.enc(x, **kw).mean(1))


@pytest.mark.parametrize("norm_first,layers", [(False, 1), (True, 1), (False, 2)])
def test_transformer_encoder_exact(norm_first, layers):
    torch.manual_seed(0)
    _exact(Encoder(norm_first, layers), torch.randn(B, T, 8), torch.randn(B, 2))


# --------------------------------------------------------------- own parameters + trainable children


class TinyViT(nn.Module):
    """Patch embedding conv, cls token and position embedding (own parameters), a transformer
    layer and a LayerNorm (children): the whole module is one generic unit."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(1, 8, 2, stride=2)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, 5, 8) * 0.1)
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)  # [B, 4, 8]
        t = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.block(t))[:, 0])


def test_vit_with_cls_token_and_position_embedding_exact():
    torch.manual_seed(0)
    _exact(TinyViT(), torch.randn(B, 1, 4, 4), torch.randn(B, 3))


def test_unit_takes_its_subtree():
    """A unit's children are not patched (their parameters go through the unit)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 1 * 4 * 4), nn.Unflatten(1, (1, 4, 4)), TinyViT())
    x = torch.randn(B, 3)
    check_against_reference(model, x, torch.randn(B, 3), mse_per_sample, mse_batch, rtol=1e-9)
    pm = fastdp.PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=5),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
    )[0]
    assert [type(m).__name__ for m in pm._patched] == ["Linear", "TinyViT"]


class Mixed(nn.Module):
    """Own parameters, a child, and extra arguments of every kind: a batched tensor, a shared tensor,
    a non-tensor flag and a keyword; a tuple output with a dict inside."""

    def __init__(self):
        super().__init__()
        self.alpha = nn.Parameter(torch.randn(4))
        self.inner = nn.Linear(4, 4)

    def forward(self, x, extra, shared, flag, *, power=2):
        h = self.inner(x) * self.alpha + extra * shared
        if flag:
            h = h**power
        return h, {"aux": torch.tanh(h).sum(1), "unused": h * 0}, "tag"


class UsesMixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.mixed = Mixed()
        self.shared = nn.Parameter(torch.randn(4), requires_grad=False)

    def forward(self, x):
        h, d, tag = self.mixed(x, self.pre(x), self.shared, True, power=3)
        assert tag == "tag"
        return h + d["aux"][:, None]


def test_own_parameters_children_and_extra_arguments_exact():
    torch.manual_seed(0)
    _exact(UsesMixed(), torch.randn(B, 4), torch.randn(B, 4))


# ------------------------------------------------------------------------------------- refused


def _private(model, n=8, batch_size=4):
    engine = fastdp.PrivacyEngine(seed=0)
    return engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(n, 1)), batch_size=4),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        poisson_sampling=False,
    )


def test_attention_dropout_refused():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
    pm, _, _ = _private(nn.Sequential(layer, nn.Flatten(), nn.Linear(T * 8, 2)))
    with pytest.raises(UnsupportedModuleError, match=r"'0\.self_attn' \(MultiheadAttention\).*attention dropout"):
        pm(torch.randn(4, T, 8))


def test_sequence_first_transformer_layer_refused():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    with pytest.raises(UnsupportedModuleError, match=r"batch_first=False.*batch_first=True"):
        _private(nn.Sequential(layer, nn.Linear(8, 2)))


def test_packed_sequence_refused():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(D, H, batch_first=True)

        def forward(self, x):
            packed = nn.utils.rnn.pack_padded_sequence(x, [T] * x.shape[0], batch_first=True)
            return self.rnn(packed)[1][0]

    pm, _, _ = _private(Packed())
    with pytest.raises(UnsupportedModuleError, match="PackedSequence.*pad_sequence"):
        pm(torch.randn(4, T, D))


def test_output_without_batch_dimension_refused():
    class Reg(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return x * self.w, self.w.pow(2).sum()  # a parameter-only regulariser

    pm, _, _ = _private(nn.Sequential(Reg()))
    with pytest.raises(UnsupportedModuleError, match=r"'0' \(Reg\).*every tensor output per sample"):
        pm(torch.randn(4, 4))


def test_generic_disabled_refuses_unit():
    with pytest.raises(UnsupportedModuleError, match=r"'0' \(LSTM\).*allow_generic=False"):
        fastdp.PrivacyEngine().make_private(
            module=(model := nn.Sequential(nn.LSTM(D, H, batch_first=True))),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 1)), batch_size=4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            allow_generic=False,
        )


def test_rnn_noise_covers_every_parameter():
    """With noise: every parameter of the unit (both directions, both layers) is noised."""
    torch.manual_seed(0)
    model = RNNHead(nn.LSTM(D, H, num_layers=2, batch_first=True, bidirectional=True))
    x, y = torch.randn(B, T, D), torch.randn(B, 2)
    got, _, _ = fastdp_step(copy.deepcopy(model), x, y, mse_batch, 1.0, sigma=1.0, seed=3)
    zero, _, _ = fastdp_step(copy.deepcopy(model), x, y, mse_batch, 1.0, sigma=0.0)
    for n in got:
        assert (got[n] - zero[n]).abs().min() > 0, f"{n} not noised"


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: RNNHead(nn.GRU(D, H, num_layers=2, dropout=0.3, batch_first=True), init_state=False), (0, T, D)),
        (lambda: Attend(nn.MultiheadAttention(8, 2, batch_first=True), True, "padding+shared"), (0, T, 8)),
        (TinyViT, (0, 1, 4, 4)),
    ],
    ids=["gru-dropout", "attention", "vit"],
)
def test_empty_batch_is_a_noise_step(make, shape):
    """An empty Poisson batch through a generic unit: a step with noise only."""
    torch.manual_seed(0)
    model = make()
    pm, opt, _ = _private(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    pm(torch.randn(*shape)).sum().backward()
    opt.step()
    assert opt.accountant.steps == 1
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())
