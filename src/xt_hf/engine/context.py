"""The context encoder over 10⁵–10⁶ tokens: the model's blocks, scheduled a chunk of tokens at a time in place.

The model's forward (`XTContextEncoder.encode`) keeps every intermediate a training step needs. Without
autograd none of them is needed again, so here each block updates one token buffer in place through the
block's own pieces (norms, projections, `feed_forward_update`, the Mamba carry; attention a head at a time by
`attention.attend_head`, with the layer's random draws made once), and memory holds the tokens, the attention
heads' outputs and chunks. With a spill directory both buffers live in files on disk (`spill.py`) and each
chunk's pages are released once done. Same numbers as the model's forward up to
float rounding (tests compare them).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..context_attention import XTAttentionBlock
from ..context_encoder import ContextEncoding, XTContextEncoder
from ..context_mamba import XTMambaBlock
from ..hyper_attention import causal_padded_length
from ..position_embedding import grid_cells
from .attention import attend_head, layer_draws
from .spill import IN_MEMORY, InMemory, token_storage


def new_token_buffer(
    encoder: XTContextEncoder,
    batch: int,
    num_grid_tokens: int,
    *,
    device: torch.device,
    storage: InMemory = IN_MEMORY,
) -> torch.Tensor:
    """An uninitialised `(batch, num_grid_tokens [+ 1 CLS], hidden)` sequence, CLS already in place, for
    `encoder.embed_tokens` to fill (its grid tokens are `encoder.split_cls(buffer)[0]`, row-major).

    With a `Spill` storage (CPU only) the sequence lives in a file (`spill.py`), and the in-place blocks keep
    only the chunks they work on in memory.
    """
    weight = encoder.input_proj.weight
    shape = (batch, num_grid_tokens + (encoder.cls_token is not None), weight.shape[0])
    # Attention blocks make a second buffer of the same size (the heads' outputs), maybe an hour of region
    # encoding later: a spill directory is checked now for room for both.
    buffers = 2 if any(isinstance(layer, XTAttentionBlock) for layer in encoder.layers) else 1
    tokens = storage.empty(shape, dtype=weight.dtype, device=device, buffers=buffers)
    if encoder.cls_index is not None:
        tokens[:, encoder.cls_index] = encoder.cls_token[0, 0].to(tokens.dtype)
    return tokens


@torch.inference_mode()
def encode_grid(
    encoder: XTContextEncoder, grid: torch.Tensor, *, spill_directory: str | os.PathLike | None = None,
    token_chunk_size: int | None = None,
) -> ContextEncoding:
    """`encoder(grid)` for a stitched grid `(batch, C, h, w)` already in memory: its tokens embedded a chunk at a
    time into one buffer (spilled to `spill_directory` if given), then `encode_in_place`."""
    chunk = token_chunk_size or encoder.config.context_token_chunk_size
    storage = token_storage(spill_directory)
    batch, _, height, width = grid.shape
    features = grid.flatten(2).transpose(1, 2)
    row, col = grid_cells(height, width, device=grid.device)
    tokens = new_token_buffer(encoder, batch, height * width, device=grid.device, storage=storage)
    grid_tokens = encoder.split_cls(tokens)[0]
    for start in range(0, height * width, chunk):
        part = slice(start, start + chunk)
        grid_tokens[:, part] = encoder.embed_tokens(features[:, part], row[part], col[part])
        storage.release(grid_tokens[:, part])
    return encode_in_place(encoder, tokens, storage, token_chunk_size=chunk)


@torch.inference_mode()
def encode_in_place(encoder: XTContextEncoder, tokens: torch.Tensor, storage: InMemory = IN_MEMORY, *,
                    token_chunk_size: int | None = None) -> ContextEncoding:
    """`encoder.encode(tokens)` without autograd, updating `tokens` `(batch, L [+ 1 CLS], hidden)` in place once
    the sequence is longer than `token_chunk_size` tokens (None: the model's saved `context_token_chunk_size`;
    shorter ones run the blocks' own forward); `storage` is where `tokens` lives (`spill.py`), and where the
    buffers made beside it go."""
    config = encoder.config
    chunk = token_chunk_size or config.context_token_chunk_size
    if 0 < config.in_context_patches < tokens.shape[1]:
        return _encode_windows(encoder, tokens, storage, chunk)
    # mamba_ssm's CUDA scan over the whole sequence is far faster than chunks of the plain one.
    kernels = any(isinstance(layer, XTMambaBlock) and layer.mixer.uses_kernels(tokens) for layer in encoder.layers)
    for layer in encoder.layers:
        if tokens.shape[1] <= chunk or kernels:
            tokens = run_block(layer, tokens, chunk)
        elif isinstance(layer, XTMambaBlock):
            update_mamba_block(layer, tokens, chunk, storage)
        else:
            update_attention_block(layer, tokens, chunk, storage)
    grid_tokens, cls_state = encoder.split_cls(tokens)
    return ContextEncoding(tokens=grid_tokens, cls_state=cls_state)


def run_block(block: torch.nn.Module, hidden_states: torch.Tensor, chunk: int) -> torch.Tensor:
    """`block(hidden_states)[0]` without autograd for a sequence that fits in memory: an attention block's
    residual sum reuses the attention output's storage and its MLP half runs `chunk` tokens at a time in
    place, since nothing needs the intermediate states again; HyperAttention runs a head at a time as for a
    long sequence (`update_attention_block`, on a copy); other blocks run their own forward."""
    if not isinstance(block, XTAttentionBlock):
        return block(hidden_states)[0]
    if block.attn.uses_hyper_attention(hidden_states.shape[1]):
        return update_attention_block(block, hidden_states.clone(), chunk)
    attended, _ = block.attention_update(hidden_states)
    hidden_states = attended.add_(hidden_states)
    for part in hidden_states.split(chunk, dim=1):
        part.add_(block.feed_forward_update(part))
    return hidden_states


def update_attention_block(
    block: XTAttentionBlock, hidden_states: torch.Tensor, chunk: int, storage: InMemory = IN_MEMORY
) -> torch.Tensor:
    """`block(hidden_states)` without autograd, updating `hidden_states` `(batch, L, hidden)` in place.

    Besides the tokens this holds one buffer of the heads' outputs and one head's query, key and value.
    Each head projects its q/k/v from the normalised tokens a chunk at a time (the norm is recomputed per
    head rather than stored), so neither the normalised copy nor the fused 3-wide qkv projection ever exists
    for all tokens. When the tokens are spilled to disk, so is the heads' buffer, and each chunk's pages are
    released once done: memory then holds one head's q/k/v and output, and chunks.
    """
    attention = block.attn
    batch, length, hidden = hidden_states.shape
    heads, head_dim = attention.num_heads, attention.head_dim
    chunks = [slice(start, start + chunk) for start in range(0, length, chunk)]
    weight = attention.qkv.weight.view(3, heads, head_dim, hidden)
    bias = None if attention.qkv.bias is None else attention.qkv.bias.view(3, heads, head_dim)
    # The heads' outputs, head-major so that each head's output is one contiguous block (one range of a
    # spill file); `proj` gathers a chunk of every head at a time.
    merged = storage.empty_beside(hidden_states, (heads, batch, length, head_dim))
    # Causal HyperAttention pads the sequence with zero rows: giving it them up front spares a copy of q/k/v.
    padded = length
    if attention.is_causal and attention.uses_hyper_attention(length):
        padded = causal_padded_length(length, attention.config.hyper_min_seq_len)
    draws = layer_draws(attention, batch, length)  # every head's, drawn once as the model's call draws them
    for head in range(heads):
        head_weight = weight[:, head].reshape(3 * head_dim, hidden)
        head_bias = None if bias is None else bias[:, head].reshape(3 * head_dim)
        qkv = hidden_states.new_zeros(3, batch, 1, padded, head_dim)
        tokens_qkv = qkv[:, :, 0, :length]
        for part in chunks:
            projected = F.linear(block.input_layernorm(hidden_states[:, part]), head_weight, head_bias)
            tokens_qkv[:, :, part] = projected.unflatten(-1, (3, head_dim)).permute(2, 0, 1, 3)
            storage.release(hidden_states[:, part])
        # The head's output goes straight into its block of `merged` (its first `length` rows: the rest is
        # padding); HyperAttention merges its pieces there without another output-sized buffer.
        attend_head(attention, *qkv, head=head, draws=draws, out=merged[head].unsqueeze(1))
        storage.release(merged[head])
        del qkv
    for part in chunks:
        hidden_states[:, part] += attention.proj(merged[:, :, part].permute(1, 2, 0, 3).flatten(2))
        for head_output in merged[:, :, part]:
            storage.release(head_output)
        storage.release(hidden_states[:, part])
    del merged
    for part in chunks:
        hidden_states[:, part] += block.feed_forward_update(hidden_states[:, part])
        storage.release(hidden_states[:, part])
    return hidden_states


def update_mamba_block(
    block: XTMambaBlock, hidden_states: torch.Tensor, chunk: int, storage: InMemory = IN_MEMORY
) -> torch.Tensor:
    """`block(hidden_states)` without autograd, updating `hidden_states` `(batch, L, hidden)` in place, a chunk
    at a time in scan order.

    The scan is causal in its direction, so once a chunk is done no later one needs its old states: the
    block carries its convolution inputs and scan state over (`new_carry`), and memory holds the tokens plus
    one chunk's widened activations, where the whole-sequence forward holds several `inner`-wide copies of
    every token (in_proj's output alone is 4 × the tokens at the released width).
    """
    carry = block.new_carry(hidden_states.shape[0], device=hidden_states.device, dtype=hidden_states.dtype)
    starts = range(0, hidden_states.shape[1], chunk)
    for start in reversed(starts) if block.reverse else starts:
        part = hidden_states[:, start : start + chunk]
        part.copy_(block(part, carry=carry)[0])
        storage.release(part)
    return hidden_states


def _encode_windows(encoder: XTContextEncoder, tokens: torch.Tensor, storage: InMemory, chunk: int) -> ContextEncoding:
    """`encoder.encode_windows` with the outputs kept beside the tokens (spilled too when they are), each
    window's pages released once written."""
    outputs = storage.empty_beside(tokens, tuple(tokens.shape))
    cls_states = []
    for window in encoder.encode_windows(tokens, run_block=lambda block, piece: run_block(block, piece, chunk)):
        outputs[:, window.written] = window.tokens
        cls_states.append(window.cls_state)
        storage.release(outputs[:, window.written])
        storage.release(tokens[:, window.finished])
    return encoder.windows_encoding(outputs, cls_states)
