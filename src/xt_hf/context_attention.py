"""Llama-style attention blocks of the context encoder (the released "hyper" and "naive" layers)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_xt import XTConfig
from .hyper_attention import causal_padded_length, hyper_attention
from .spill import empty_beside, release_pages


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
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention on `(batch, heads, L, head_dim)`; returns `(batch, L, heads, head_dim)` and weights.

    The causal mask adds `finfo.min` above the diagonal, exactly as the original `exact_attention`.
    """
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if causal:
        length = scores.shape[-1]
        mask = torch.ones(length, length, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores + mask.to(scores.dtype) * torch.finfo(scores.dtype).min
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
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

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, first_head: int = 0,
        out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of `(batch, heads, L, head_dim)` → `(batch, L, heads, head_dim)` and eager weights.

        `first_head` says which of the layer's heads `query` starts at when it holds only some of them, so
        that HyperAttention draws for them what it draws in the all-heads call. `out` `(batch, heads, L', head_dim)`
        receives the result (causal attention: its first `L' ≤ L` rows), as in `hyper_attention`.
        """
        implementation = self.config._attn_implementation or "sdpa"
        if self.uses_hyper_attention(query.shape[2]):
            output = hyper_attention(
                query, key, value, scale=self.scale, causal=self.is_causal,
                lsh_num_projs=self.config.hyper_lsh_num_projs, block_size=self.config.hyper_block_size,
                sample_size=self.config.hyper_sample_size, min_seq_len=self.config.hyper_min_seq_len,
                # Without autograd, one head at a time: the approximation's temporaries then cover one head.
                heads_at_once=None if torch.is_grad_enabled() else 1,
                head_range=(first_head, self.num_heads), out=out,
            )
            return output.transpose(1, 2), None
        if implementation == "eager":
            output, weights = eager_attention(query, key, value, scale=self.scale, causal=self.is_causal)
        else:
            output, weights = ALL_ATTENTION_FUNCTIONS[implementation](
                self, query, key, value, None, scaling=self.scale, dropout=0.0, is_causal=self.is_causal
            )
        if out is not None:
            out.copy_(output[:, : out.shape[2]].transpose(1, 2))
            output = out.transpose(1, 2)
        return output, weights


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
    """Pre-norm block: `x + attn(RMSNorm(x))`, then `x + mlp(RMSNorm(x))`."""

    def __init__(self, config: XTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = XTRMSNorm(config.context_hidden_size, eps=config.context_rms_norm_eps)
        self.attn = XTSelfAttention(config)
        self.post_attention_layernorm = XTRMSNorm(config.context_hidden_size, eps=config.context_rms_norm_eps)
        self.mlp = XTGatedMLP(config)
        self.token_chunk_size = config.context_token_chunk_size

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(self.input_layernorm(hidden_states))
        if torch.is_grad_enabled():
            hidden_states = hidden_states + attended
            return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states)), weights
        # Without autograd nothing needs the intermediate states: the residual sum reuses the attention
        # output's storage and the MLP half runs chunk by chunk in place. Gigapixel images have 10⁵–10⁶
        # tokens, where the MLP's widened activations would otherwise dominate peak memory.
        hidden_states = attended.add_(hidden_states)
        for chunk in hidden_states.split(self.token_chunk_size, dim=1):
            chunk.add_(self.mlp(self.post_attention_layernorm(chunk)))
        return hidden_states, weights

    @torch.no_grad()
    def forward_in_place(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The same block without autograd, updating `hidden_states` `(batch, L, hidden)` in place.

        For 10⁵–10⁶ tokens (gigapixel images) memory is what limits: besides the tokens this holds one
        buffer of the heads' outputs and one head's query, key and value. Each head projects its q/k/v
        from the normalised tokens a chunk at a time (the norm is recomputed per head rather than stored),
        so neither the normalised copy nor the fused 3-wide qkv projection ever exists for all tokens.
        When the tokens are spilled to disk (`spill.spilled_empty`), so is the heads' buffer, and each chunk's
        pages are released once done: memory then holds one head's q/k/v and output, and chunks.
        """
        attention = self.attn
        batch, length, hidden = hidden_states.shape
        heads, head_dim = attention.num_heads, attention.head_dim
        chunks = [slice(start, start + self.token_chunk_size) for start in range(0, length, self.token_chunk_size)]
        weight = attention.qkv.weight.view(3, heads, head_dim, hidden)
        bias = None if attention.qkv.bias is None else attention.qkv.bias.view(3, heads, head_dim)
        # The heads' outputs, head-major so that each head's output is one contiguous block (one range of a
        # spill file); `proj` gathers a chunk of every head at a time.
        merged = empty_beside(hidden_states, (heads, batch, length, head_dim))
        # Causal HyperAttention pads the sequence with zero rows: giving it them up front spares a copy of q/k/v.
        padded = length
        if attention.is_causal and attention.uses_hyper_attention(length):
            padded = causal_padded_length(length, attention.config.hyper_min_seq_len)
        for head in range(heads):
            head_weight = weight[:, head].reshape(3 * head_dim, hidden)
            head_bias = None if bias is None else bias[:, head].reshape(3 * head_dim)
            qkv = hidden_states.new_zeros(3, batch, 1, padded, head_dim)
            tokens_qkv = qkv[:, :, 0, :length]
            for part in chunks:
                projected = F.linear(self.input_layernorm(hidden_states[:, part]), head_weight, head_bias)
                tokens_qkv[:, :, part] = projected.unflatten(-1, (3, head_dim)).permute(2, 0, 1, 3)
                release_pages(hidden_states[:, part])
            # The head's output goes straight into its block of `merged` (its first `length` rows: the rest is
            # padding); HyperAttention merges its pieces there without another output-sized buffer.
            attention.attend(*qkv, first_head=head, out=merged[head].unsqueeze(1))
            release_pages(merged[head])
            del qkv
        for part in chunks:
            hidden_states[:, part] += attention.proj(merged[:, :, part].permute(1, 2, 0, 3).flatten(2))
            for head_output in merged[:, :, part]:
                release_pages(head_output)
            release_pages(hidden_states[:, part])
        del merged
        for part in chunks:
            hidden_states[:, part] += self.mlp(self.post_attention_layernorm(hidden_states[:, part]))
            release_pages(hidden_states[:, part])
        return hidden_states
