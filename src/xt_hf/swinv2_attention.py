"""Swin-v2 window attention through `scaled_dot_product_attention`, reading transformers' own parameters.

transformers' `Swinv2SelfAttention` only has an eager path: it materialises the `(windows, heads, N, N)` scores
and passes over them five times (scale, bias, mask, mask again, softmax) before the second matrix product.
Swin-v2's cosine attention folds into one fused attention call:

    softmax(normalize(q) · normalize(k)ᵀ · τ_h + B_h + M) · v
  = sdpa(q = normalize(q) · τ_h, k = normalize(k), v, attn_mask = B_h + M, scale = 1)

with `τ_h = exp(min(logit_scale_h, log 100))` per head, `B = 16 · sigmoid(continuous position bias)` and `M` the
shifted-window mask.

transformers' Swin-v2 does not dispatch through its attention interface (`ALL_ATTENTION_FUNCTIONS`): each
`Swinv2Attention` calls its child `self`, a `Swinv2SelfAttention`. So the fused path plugs in as that child:
`set_swinv2_attention` replaces it with a `Swinv2SdpaSelfAttention` built around the same parameters, buffers
and layers under the same names, so the `state_dict` is unchanged (`XTRegionEncoder` does it at construction,
before weights load) and the eager module stays the reference it is tested against.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.swinv2.modeling_swinv2 import Swinv2Attention, Swinv2SelfAttention

# The released Swin-v2 clamps the learned temperature at 100.
_MAX_LOGIT_SCALE = math.log(100.0)


class Swinv2SdpaSelfAttention(Swinv2SelfAttention):
    """`Swinv2SelfAttention` computed by one `scaled_dot_product_attention` call per block.

    `(windows, N, C)` → `(windows, N, C)`, windows image-major as the Swin layer cuts them; `attention_mask`
    is the layer's `(windows per image, N, N)` shifted-window mask or `None`. Asking for attention weights
    falls back to the eager computation, which is the only one that has them.

    Built from an eager module (`Swinv2SdpaSelfAttention(eager)`), whose parameters it then holds.
    """

    def __init__(self, eager: Swinv2SelfAttention):
        # Not Swinv2SelfAttention.__init__, which would draw new random weights (and shift every later module's
        # random initialisation) only for them to be replaced.
        nn.Module.__init__(self)
        _take_over(self, eager)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                output_attentions: bool | None = False) -> tuple[torch.Tensor, ...]:
        if output_attentions:
            return super().forward(hidden_states, attention_mask, output_attentions=True)
        windows, tokens, channels = hidden_states.shape
        heads, head_dim = self.num_attention_heads, self.attention_head_size
        qkv = self._project_qkv(hidden_states)  # (windows, N, 3, heads, head_dim)
        query, key = self._cosine_query_key(qkv)  # each (windows, heads, N, head_dim)
        value = qkv[:, :, 2].transpose(1, 2)
        bias = self.relative_position_bias().to(query.dtype).unsqueeze(0)  # (1, heads, N, N): 4-D for the fused kernel
        dropout = self.dropout.p if self.training else 0.0
        if attention_mask is None:
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, dropout_p=dropout, scale=1.0)
        else:
            # The fused kernels take 4-D inputs with a mask that broadcasts over the first axis only: put each
            # image's windows beside the heads. transformers adds the shift mask twice (−200, not −100); so do we.
            per_image = attention_mask.shape[0]
            mask = (bias + 2 * attention_mask.to(query.dtype).unsqueeze(1)).view(1, per_image * heads, tokens, tokens)
            shape = (windows // per_image, per_image * heads, tokens, head_dim)
            attended = F.scaled_dot_product_attention(query.reshape(shape), key.reshape(shape), value.reshape(shape),
                                                      attn_mask=mask, dropout_p=dropout, scale=1.0)
            attended = attended.view(windows, heads, tokens, head_dim)
        return (attended.transpose(1, 2).reshape(windows, tokens, channels),)

    def _project_qkv(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(windows, N, C)` → `(windows, N, 3, heads, head_dim)` from one matrix product: the three projections
        concatenated on the fly (a copy of 3·C² weights, small next to the activations), the key's missing bias
        as zeros."""
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        bias = None
        if self.query.bias is not None:
            bias = torch.cat([self.query.bias, torch.zeros_like(self.query.bias), self.value.bias])
        windows, tokens, _ = hidden_states.shape
        return F.linear(hidden_states, weight, bias).view(windows, tokens, 3, self.num_attention_heads,
                                                           self.attention_head_size)

    def _cosine_query_key(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`normalize(q) · τ_h` and `normalize(k)`, each `(windows, heads, N, head_dim)`, from `(windows, N, 3,
        heads, head_dim)` projections.

        The norms are taken over the projections as they lie in memory (the value's too: a norm over the strided
        per-head view is several times slower than over contiguous rows), and without autograd the scaled rows
        are written straight into the per-head layout the attention kernel reads, in one pass.
        """
        windows, tokens, _, heads, head_dim = qkv.shape
        temperature = torch.clamp(self.logit_scale, max=_MAX_LOGIT_SCALE).exp().view(heads, 1)
        factors = torch.stack([temperature, torch.ones_like(temperature)])  # (2, heads, 1): query, key
        norms = torch.linalg.vector_norm(qkv, dim=-1, keepdim=True)[:, :, :2].clamp_min(1e-12)
        if torch.is_grad_enabled() and (qkv.requires_grad or factors.requires_grad):  # `out=` has no autograd
            return (qkv[:, :, :2] * (factors / norms)).permute(2, 0, 3, 1, 4).unbind(0)
        scaled = qkv.new_empty((2, windows, heads, tokens, head_dim))
        torch.mul(qkv[:, :, :2], factors / norms, out=scaled.permute(1, 3, 0, 2, 4))
        return scaled.unbind(0)

    def relative_position_bias(self) -> torch.Tensor:
        """`(heads, N, N)`: `16 · sigmoid` of the continuous position bias MLP, looked up for every token pair.

        Depends on weights only, but is recomputed each call (once per block per forward, not per window): a
        512-wide MLP over the (2·window − 1)² offsets, a few million multiply-adds, and never stale after a weight
        update.
        """
        tokens = self.window_size[0] * self.window_size[1]
        table = self.continuous_position_bias_mlp(self.relative_coords_table).view(-1, self.num_attention_heads)
        pairs = table.t().contiguous().index_select(1, self.relative_position_index.view(-1))
        pairs = pairs.view(self.num_attention_heads, tokens, tokens)
        return 16 * torch.sigmoid(pairs)


def _take_over(module: nn.Module, source: Swinv2SelfAttention) -> nn.Module:
    """Give `module` the settings, layers, parameters and buffers of `source`: the same objects, the same names."""
    for name in ("num_attention_heads", "attention_head_size", "all_head_size", "window_size",
                 "pretrained_window_size", "training"):
        setattr(module, name, getattr(source, name))
    for name, child in source.named_children():
        module.add_module(name, child)
    for name, parameter in source.named_parameters(recurse=False):
        module.register_parameter(name, parameter)
    for name, buffer in source.named_buffers(recurse=False):
        module.register_buffer(name, buffer, persistent=name not in source._non_persistent_buffers_set)
    return module


def _eager(fused: Swinv2SdpaSelfAttention) -> Swinv2SelfAttention:
    """transformers' module holding `fused`'s parameters (built without its `__init__`, like `fused` itself)."""
    eager = Swinv2SelfAttention.__new__(Swinv2SelfAttention)
    nn.Module.__init__(eager)
    return _take_over(eager, fused)


def set_swinv2_attention(backbone: nn.Module, implementation: Literal["eager", "sdpa"]) -> int:
    """Make every Swin-v2 window attention of `backbone` the `implementation` one, replacing the attention child of
    each `Swinv2Attention` by a module holding the same parameters and buffers (same `state_dict` keys). Returns
    the number of Swin-v2 window attentions (0 for a backbone that is not Swin-v2)."""
    if implementation not in ("eager", "sdpa"):
        raise ValueError(f"Swin-v2 attention is 'eager' or 'sdpa', got {implementation!r}.")
    parents = [module for module in backbone.modules() if isinstance(module, Swinv2Attention)]
    for parent in parents:
        fused = isinstance(parent.self, Swinv2SdpaSelfAttention)
        if implementation == "sdpa" and not fused:
            parent.self = Swinv2SdpaSelfAttention(parent.self)
        elif implementation == "eager" and fused:
            parent.self = _eager(parent.self)
    return len(parents)
