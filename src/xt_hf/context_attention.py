"""Llama-style attention blocks of the context encoder (the released "hyper" and "naive" layers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_xt import XTConfig
from .hyper_attention import hyper_attention


class XTRMSNorm(nn.Module):
    """RMSNorm computed in float32, as Llama's (and the released models') is."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    *,
    is_causal: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention on `(batch, heads, L, head_dim)`; returns `(batch, L, heads, head_dim)` and weights.

    The signature of transformers' attention interface, so that "eager" is one more entry beside "sdpa".
    The causal mask adds `finfo.min` above the diagonal, exactly as the original `exact_attention`.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if is_causal:
        length = scores.shape[-1]
        mask = torch.ones(length, length, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores + mask.to(scores.dtype) * torch.finfo(scores.dtype).min
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2), weights


class XTSelfAttention(nn.Module):
    """Multi-head self-attention with a fused, biased qkv projection (released key names `qkv`, `proj`).

    Sequences longer than `config.hyper_min_seq_len` use HyperAttention when
    `config.context_long_sequence_attention == "hyper"`, as the released "hyper" layers do.
    """

    def __init__(self, config: XTConfig):
        super().__init__()
        self.config = config
        hidden = config.context_hidden_size
        self.num_heads = config.context_num_heads
        self.head_dim = hidden // self.num_heads
        self.scale = config.context_attention_scale or self.head_dim**-0.5
        self.is_causal = config.context_attention_causal
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=config.context_qkv_bias)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(batch, L, hidden)` → `(batch, L, hidden)` and, with eager attention, the attention weights."""
        batch, length, hidden = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        output, weights = self.attend(query, key, value)
        return self.proj(output.reshape(batch, length, hidden)), weights

    def uses_hyper_attention(self, length: int) -> bool:
        return self.config.context_long_sequence_attention == "hyper" and length > self.config.hyper_min_seq_len

    def hyper_attention_options(self) -> dict:
        """This layer's HyperAttention settings, keyword arguments of `hyper_attention` and `draw_hyper_attention`."""
        config = self.config
        return dict(causal=self.is_causal, lsh_num_projs=config.hyper_lsh_num_projs, block_size=config.hyper_block_size,
                    sample_size=config.hyper_sample_size, min_seq_len=config.hyper_min_seq_len)

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of `(batch, heads, L, head_dim)` → `(batch, L, heads, head_dim)` and eager weights:
        HyperAttention above `hyper_min_seq_len` in "hyper" layers, else the implementation that
        `config._attn_implementation` names in transformers' attention interface (`ALL_ATTENTION_FUNCTIONS`)."""
        if self.uses_hyper_attention(query.shape[2]):
            output = hyper_attention(query, key, value, scale=self.scale, **self.hyper_attention_options())
            return output.transpose(1, 2), None
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation or "sdpa", eager_attention)
        return attention(self, query, key, value, None, scaling=self.scale, dropout=0.0, is_causal=self.is_causal)


class XTGatedMLP(nn.Module):
    """`down(GELU(gate(x)) · up(x))` without biases, with the exact (erf) GELU."""

    def __init__(self, config: XTConfig):
        super().__init__()
        hidden = config.context_hidden_size
        inner = int(hidden * config.context_mlp_ratio)
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)
        self.act_fn = nn.GELU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class XTAttentionBlock(GradientCheckpointingLayer):
    """Pre-norm block: `x + attn(RMSNorm(x))`, then `x + mlp(RMSNorm(x))`.

    `attention_update` and `feed_forward_update` are the two residual branches on their own, so that an
    engine can apply them to parts of a sequence in place (`xt_hf.engine.context`); it schedules the attention
    itself from the layer's pieces (`qkv`, `attend`, `hyper_attention_options`, `proj`).
    """

    def __init__(self, config: XTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = XTRMSNorm(config.context_hidden_size, eps=config.context_rms_norm_eps)
        self.attn = XTSelfAttention(config)
        self.post_attention_layernorm = XTRMSNorm(config.context_hidden_size, eps=config.context_rms_norm_eps)
        self.mlp = XTGatedMLP(config)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(batch, L, hidden)` → `(batch, L, hidden)` and the eager attention weights."""
        attended, weights = self.attention_update(hidden_states)
        hidden_states = hidden_states + attended
        return hidden_states + self.feed_forward_update(hidden_states), weights

    def attention_update(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the attention half adds to `(batch, L, hidden)`, and the eager attention weights."""
        return self.attn(self.input_layernorm(hidden_states))

    def feed_forward_update(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """What the MLP half adds to each token of `(batch, n, hidden)` (token-wise: any slice of a sequence)."""
        return self.mlp(self.post_attention_layernorm(hidden_states))
