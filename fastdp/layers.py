"""Drop-in names for Opacus's DP layers: `from fastdp.layers import DPLSTM` where a script had
`from opacus.layers import DPLSTM`.

Opacus needs hand-written re-implementations of recurrent and attention layers (its per-sample
hooks only know Linear-like pieces). fastdp's engine gives exact per-sample gradients for the torch
modules themselves (the generic torch.func path, a whole nn.LSTM or nn.MultiheadAttention as one
unit), so these are thin subclasses of the torch modules with Opacus's constructor signatures and
forward conventions:

- DPRNN / DPGRU / DPLSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False,
  dropout=0, bidirectional=False, proj_size=0[, nonlinearity="tanh" for DPRNN]);
  forward(input, state_init=None) -> (output, h_n), or (output, (h_n, c_n)) for DPLSTM, shapes as
  torch's ([B, T, D*H] with batch_first, else [T, B, D*H]; h_n, c_n [L*D, B, H]).
- DPMultiheadAttention(embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
  add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None, dtype=None);
  forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
  is_causal=False) -> (attn_output, attn_weights averaged over heads, or None).

Differences from Opacus: the parameters and state_dict keys are torch's (weight_ih_l0, ...; for
attention in_proj_weight / out_proj.weight, not Opacus's qlinear / klinear / vlinear), so a model
trained with these loads into the plain torch modules and back; PackedSequence inputs are refused
(pass padded batches). Dropout between recurrent layers is exact (the engine runs a multi-layer RNN
with dropout layer by layer, the dropout on the batch between the units); attention dropout is
refused in training, since the per-sample recomputation cannot replay its random draws: use
dropout=0.0 on the attention (an nn.Dropout on its output is fine).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DPGRU", "DPLSTM", "DPMultiheadAttention", "DPRNN"]


class _OpacusRecurrent:
    """Opacus's recurrent-layer signature on a torch RNN class (mixed in before it): the shared
    constructor arguments, proj_size refused where torch has no projection, and
    forward(input, state_init=None)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0,
        bidirectional: bool = False,
        proj_size: int = 0,
        **torch_only,
    ) -> None:
        name = type(self).__name__
        if proj_size and not isinstance(self, nn.LSTM):
            raise ValueError(f"{name}: proj_size is an LSTM option ({name} has no projection); use proj_size=0")
        if proj_size:
            torch_only["proj_size"] = proj_size
        super().__init__(
            input_size,
            hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=float(dropout),
            bidirectional=bidirectional,
            **torch_only,
        )

    def forward(self, input: torch.Tensor, state_init=None):
        return super().forward(input, state_init)


class DPRNN(_OpacusRecurrent, nn.RNN):
    """nn.RNN with Opacus's DPRNN signature (nonlinearity last); forward(input [B, T, D] or [T, B, D],
    state_init h_0 [L*D, B, H] or None) -> (output, h_n)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0,
        bidirectional: bool = False,
        proj_size: int = 0,
        nonlinearity: str = "tanh",
    ) -> None:
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            nonlinearity=nonlinearity,
        )


class DPGRU(_OpacusRecurrent, nn.GRU):
    """nn.GRU with Opacus's DPGRU signature; forward(input, state_init h_0 or None) -> (output, h_n)."""


class DPLSTM(_OpacusRecurrent, nn.LSTM):
    """nn.LSTM with Opacus's DPLSTM signature; forward(input, state_init (h_0, c_0) or None) ->
    (output, (h_n, c_n)). proj_size > 0 works (torch's projection; Opacus refuses it)."""


class DPMultiheadAttention(nn.MultiheadAttention):
    """nn.MultiheadAttention with Opacus's DPMultiheadAttention forward signature (is_causal in
    the place of torch's average_attn_weights; the weights are averaged over heads)."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ):
        return super().forward(
            query,
            key,
            value,
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            is_causal=is_causal,
        )
