"""HyperAttention (Han et al. 2023, arXiv 2310.05869): approximate softmax attention for long sequences.

The released "hyper" xT layers call HyperAttention with `min_seq_len=4096`, so every released
configuration (at most 257 tokens) runs exact attention; the approximation only matters for the very
long token sequences xT is meant to reach. This is a plain-PyTorch re-implementation (no Triton, no
flash-attn): every piece is a batched matmul whose size is bounded by `block_size`, `sample_size` or
`min_seq_len`, so memory grows as O(L · block_size) instead of O(L²).

Non-causal attention of queries Q against keys K (`_hyper_attention_with_lse`):

1. *Angular LSH*: queries and keys are hashed by the signs of `lsh_num_projs` random projections into
   `2**lsh_num_projs` buckets, numbered along the reflected Gray code so that neighbouring bucket numbers
   differ by one sign (one hyperplane).
2. *Sorted block diagonal*: Q and K are sorted by bucket and cut into as many blocks as K has
   `block_size`-blocks; query block i attends exactly to key block i. Large scores live there, since a
   query and a key with a large angle-wise similarity tend to share buckets.
3. *Sampled residual*: every query also attends to `sample_size` keys drawn uniformly (with
   replacement), skipping those of its own block, with weight `n_keys / sample_size`: an unbiased
   estimate of the rest of the softmax sum.
4. The two partial attentions are merged through their log-sum-exps.

Causal attention (`_causal_attention_with_lse`) splits the sequence in halves: the two diagonal halves
are causal problems of half the length (solved recursively, exactly once they are at most
`min_seq_len` long), and the second half's queries attend to the whole first half through one
non-causal block, approximated only once that block has at least `min_seq_len` queries (the original's
rule: between `min_seq_len` and `2 · min_seq_len` tokens, causal attention is still exact, computed in
pieces). Each halving level costs O(L · (block_size + sample_size)) and the exact leaves O(L · min_seq_len),
so time grows as O(L · min_seq_len + L · (block_size + sample_size) · log2(L / min_seq_len)).

Differences from the original implementation (`xt/models/context_encoders/hyper_attn/`):

* Randomness comes from a `torch.Generator`, by default a new CPU generator seeded with
  `HYPER_ATTENTION_SEED` on every call, so outputs are reproducible, identical across calls, layers and
  devices (up to matmul rounding), and gradient checkpointing recomputes the same approximation. The
  original draws the projections once per module with the global RNG (not saved with the weights) and
  resamples the residual's keys with `torch.randint` on every forward.
* Buckets are ranked along the Gray code (the inverse Gray code of the sign pattern). The original
  sorts by the Gray code *of* the sign pattern, whose neighbours differ in up to 4 signs (1.31 on
  average for 7 projections) instead of exactly one.
* Padding keys (when the length is not a multiple of `block_size`) are masked out; the original pads the
  sorted keys with zeros that take part in the last block's softmax with score 0.
* Causal attention first pads the sequence with zero rows at its end to a multiple of `2**K` (K halvings
  down to `min_seq_len`), so that no half ever needs padding again and, without autograd, every level's
  halves are views of one tensor. Only the padding rows themselves see the padding rows.
* Every piece (exact leaves, sorted blocks, sampled residual) and its log-sum-exp comes from a plain
  PyTorch softmax in float32, with gradients through the log-sum-exp (the original's Triton path
  detaches it). Without gradients on CPU, PyTorch's own fused flash-attention kernel computes the same
  pieces instead, 2-5× faster.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HYPER_ATTENTION_SEED = 0


class AngularLSH:
    """Sign-of-random-projection hash of `(..., L, head_dim)` vectors into Gray-code-ranked buckets.

    The `(head_dim, num_projs)` projection is drawn from `generator` (on the generator's device) at
    construction. A bucket number is the rank of the sign pattern in the reflected Gray code sequence,
    so buckets with consecutive numbers lie on opposite sides of a single hyperplane.
    """

    def __init__(self, num_projs: int, head_dim: int, *, generator: torch.Generator):
        if num_projs < 0:
            raise ValueError(f"`num_projs` must be ≥ 0, got {num_projs}.")
        self.num_projs = num_projs
        self.projections = torch.randn(head_dim, num_projs, generator=generator, device=generator.device)
        ranks = torch.arange(2**num_projs)
        self.bucket_of_pattern = torch.empty_like(ranks)
        self.bucket_of_pattern[ranks ^ (ranks >> 1)] = ranks
        self.bit_values = 2 ** torch.arange(num_projs)

    def hash(self, vectors: torch.Tensor) -> torch.Tensor:
        """`(..., L, head_dim)` → bucket numbers `(..., L)` in `[0, 2**num_projs)`, int64."""
        device = vectors.device
        signs = vectors @ self.projections.to(device, vectors.dtype) > 0
        patterns = (signs.long() * self.bit_values.to(device)).sum(-1)
        return self.bucket_of_pattern.to(device)[patterns]

    def __repr__(self) -> str:
        return f"AngularLSH(num_projs={self.num_projs}, head_dim={self.projections.shape[0]})"


def hyper_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    scale: float | None,
    causal: bool,
    lsh_num_projs: int = 7,
    block_size: int = 256,
    sample_size: int = 256,
    min_seq_len: int = 4096,
    generator: torch.Generator | None = None,
    heads_at_once: int | None = None,
    head_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Softmax attention on `(batch, heads, L, head_dim)`, approximated by HyperAttention when `L > min_seq_len`.

    Returns `(batch, heads, L, head_dim_v)` in the query's dtype; `scale=None` means `head_dim ** -0.5`.
    Up to `min_seq_len` tokens this is `torch.nn.functional.scaled_dot_product_attention`, unchanged. Above
    it, LSH-sorted block-diagonal attention plus a uniformly sampled residual (see the module docstring),
    with memory O(L · block_size). `generator` drives the projections and the sampling; `None` means a fresh
    CPU generator seeded with `HYPER_ATTENTION_SEED`, so repeated calls give identical outputs.

    `heads_at_once` computes the approximation for that many heads at a time, so that its temporaries
    (sorted copies, block scores) cover a few heads instead of all of them. The random draws are those of
    the all-heads call, so the result is the same up to float rounding; use it without autograd, which
    would keep every head's temporaries for the backward pass anyway. `head_range=(first, total)` says that
    the inputs are heads `first, first + 1, ...` of a call over `total` heads: they then get that call's
    random draws, so a caller can project and attend one head at a time.
    """
    if query.dim() != 4 or key.shape != query.shape or value.dim() != 4 or value.shape[:3] != key.shape[:3]:
        raise ValueError(
            "hyper_attention expects query and key of the same shape (batch, heads, L, head_dim) and a value of "
            f"shape (batch, heads, L, head_dim_v); got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}."
        )
    if min_seq_len < 1 or block_size < 1 or sample_size < 0 or lsh_num_projs < 0:
        raise ValueError(
            f"hyper_attention needs min_seq_len ≥ 1, block_size ≥ 1, sample_size ≥ 0 and lsh_num_projs ≥ 0; "
            f"got {min_seq_len}, {block_size}, {sample_size}, {lsh_num_projs}."
        )
    if query.shape[2] <= min_seq_len:
        return F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scale)

    if heads_at_once is not None and heads_at_once < 1:
        raise ValueError(f"`heads_at_once` must be None or ≥ 1, got {heads_at_once}.")
    heads = query.shape[1]
    first_head, total_heads = head_range or (0, heads)
    if first_head < 0 or first_head + heads > total_heads:
        raise ValueError(f"`head_range` {head_range} does not hold the inputs' {heads} heads.")

    length = query.shape[2]
    if causal and causal_padded_length(length, min_seq_len) > length:
        # Zero rows at the end, seen (causally) only by themselves, make every halving exact.
        rows = causal_padded_length(length, min_seq_len) - length
        query, key, value = (F.pad(tensor, (0, 0, 0, rows)) for tensor in (query, key, value))

    if generator is None:
        generator = torch.Generator().manual_seed(HYPER_ATTENTION_SEED)
    initial_state = generator.get_state()
    step = min(heads_at_once or heads, heads)
    output = None
    for start in range(0, heads, step):
        # Every head group replays the random stream from the start: the same projections, and it draws the
        # residual's samples for all heads and keeps its own, exactly as the all-heads call would.
        generator.set_state(initial_state)
        approximation = _Approximation(
            lsh=AngularLSH(lsh_num_projs, query.shape[-1], generator=generator),
            generator=generator,
            scale=query.shape[-1] ** -0.5 if scale is None else scale,
            block_size=block_size,
            sample_size=sample_size,
            min_seq_len=min_seq_len,
            heads=(first_head + start, first_head + min(start + step, heads), total_heads),
        )
        group = slice(start, start + step)
        if not causal:
            attend = _hyper_attention_with_lse
        elif torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            attend = _causal_attention_with_lse
        else:
            attend = _causal_attention_by_levels
        part, _ = attend(query[:, group], key[:, group], value[:, group], approximation)
        if step == heads:
            return part[:, :, :length].to(query.dtype)
        if output is None:
            output = query.new_empty(*query.shape[:2], length, value.shape[-1])
        output[:, group] = part[:, :, :length]
    return output


def causal_padded_length(length: int, min_seq_len: int) -> int:
    """The length causal HyperAttention pads a sequence of `length` tokens to: a multiple of `2**K`, K being
    the number of halvings that bring it to `min_seq_len` tokens or fewer, so that every half is a view.

    A caller that builds q/k/v itself can allocate them at this length, zero the extra rows and save the
    copy that padding them would take.
    """
    levels = 0
    while -(-length // 2**levels) > min_seq_len:
        levels += 1
    return -(-length // 2**levels) * 2**levels


@dataclass(frozen=True)
class _Approximation:
    """The settings and random state shared by every piece of one `hyper_attention` call."""

    lsh: AngularLSH
    generator: torch.Generator
    scale: float
    block_size: int
    sample_size: int
    min_seq_len: int
    # (first, stop, total): the call computes heads first..stop-1 of `total`. Inside causal attention a
    # head is split into 2^k independent halves at depth k, so there the group spans (first, stop) · 2^k.
    heads: tuple[int, int, int]
    # The sampled residual's keys, when drawn ahead of time (`_causal_attention_by_levels`).
    drawn: torch.Tensor | None = None


def _causal_attention_with_lse(query, key, value, approx: _Approximation) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention `(b, h, L, d)` → float32 output `(b, h, L, d_v)` and log-sum-exp `(b, h, L)`.

    `L` is a `causal_padded_length`, so every level halves exactly.
    """
    length = query.shape[2]
    if length <= approx.min_seq_len:
        return _attention_with_lse(query, key, value, scale=approx.scale, causal=True, query_chunk=approx.block_size)
    half = length // 2

    # b h (two n) d -> b (h two) n d: the two diagonal halves become independent heads.
    def split(tensor):
        b, h, _, d = tensor.shape
        return tensor.reshape(b, h * 2, half, d)

    diagonal_output, diagonal_lse = _causal_attention_with_lse(split(query), split(key), split(value), approx)
    batch, heads = query.shape[:2]
    diagonal_output = diagonal_output.reshape(batch, heads, 2 * half, -1)
    diagonal_lse = diagonal_lse.reshape(batch, heads, 2 * half)

    # Every query of the second half sees every key of the first half: one non-causal block.
    past = (query[:, :, half:], key[:, :, :half], value[:, :, :half])
    if half >= approx.min_seq_len:
        past_output, past_lse = _hyper_attention_with_lse(*past, approx)
    else:
        past_output, past_lse = _attention_with_lse(*past, scale=approx.scale, query_chunk=approx.block_size)
    lower_output, lower_lse = _merge(diagonal_output[:, :, half:], diagonal_lse[:, :, half:], past_output, past_lse)
    output = torch.cat((diagonal_output[:, :, :half], lower_output), dim=2)
    lse = torch.cat((diagonal_lse[:, :, :half], lower_lse), dim=2)
    return output, lse


def _causal_attention_by_levels(query, key, value, approx: _Approximation) -> tuple[torch.Tensor, torch.Tensor]:
    """`_causal_attention_with_lse` without autograd, level by level instead of recursively.

    Same pieces, same random draws, same result up to the order in which pieces are merged. The recursion
    keeps every level's outputs alive until it unwinds; here each level's non-causal block is merged
    straight into one output, and every level's halves are views of the inputs (`L` is a
    `causal_padded_length`).
    """
    batch, heads, length, _ = query.shape
    halves, size = [], length
    while size > approx.min_seq_len:
        size //= 2
        halves.append(size)
    # The recursion draws the residual's samples on its way back up, the deepest level first: draw them so.
    drawn = {}
    for depth in reversed(range(len(halves))):
        half = halves[depth]
        if half >= approx.min_seq_len and half > approx.block_size and approx.sample_size > 0:
            drawn[depth] = _draw_residual_keys(approx, batch, half, 2**depth)

    output = torch.zeros(batch, heads, length, value.shape[-1], dtype=torch.float32, device=query.device)
    lse = torch.full((batch, heads, length), -math.inf, device=query.device)
    positions = torch.arange(length, device=query.device).view(1, length)  # (segments, tokens)
    tensors = [query, key, value]  # (batch, heads · segments, tokens, dim), as the recursion reshapes them
    for depth, half in enumerate(halves):
        past = (tensors[0][:, :, half:], tensors[1][:, :, :half], tensors[2][:, :, :half])
        if half >= approx.min_seq_len:
            piece, piece_lse = _hyper_attention_with_lse(*past, dataclasses.replace(approx, drawn=drawn.get(depth)))
        else:
            piece, piece_lse = _attention_with_lse(*past, scale=approx.scale, query_chunk=approx.block_size)
        del past
        _merge_into(output, lse, piece, piece_lse, positions[:, half:])
        del piece, piece_lse
        tensors = [tensor.reshape(batch, tensor.shape[1] * 2, half, tensor.shape[-1]) for tensor in tensors]
        positions = positions.reshape(-1, half)
    piece, piece_lse = _attention_with_lse(*tensors, scale=approx.scale, causal=True, query_chunk=approx.block_size)
    _merge_into(output, lse, piece, piece_lse, positions)
    return output, lse


def _merge_into(output, lse, piece, piece_lse, positions, chunk: int = 2**16) -> None:
    """Merge a piece `(b, h · S, m, d)` whose S segments hold the tokens `positions` `(S, m)` into the whole
    sequence's `output` `(b, h, L, d)` and `lse` `(b, h, L)`, in place, `chunk` tokens at a time."""
    batch, heads = output.shape[:2]
    piece = piece.reshape(batch, heads, positions.numel(), piece.shape[-1])
    piece_lse = piece_lse.reshape(batch, heads, positions.numel())
    flat = positions.reshape(-1)
    for start in range(0, flat.numel(), chunk):
        rows = slice(start, start + chunk)
        index = flat[rows]
        merged, merged_lse = _merge(output[:, :, index], lse[:, :, index], piece[:, :, rows], piece_lse[:, :, rows],
                                    in_place=True)
        output[:, :, index] = merged
        lse[:, :, index] = merged_lse


def _hyper_attention_with_lse(query, key, value, approx: _Approximation) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal HyperAttention `(b, h, n_q, d)` × `(b, h, n_k, d)` → float32 output and log-sum-exp."""
    num_queries, num_keys = query.shape[2], key.shape[2]
    query_order = approx.lsh.hash(query).argsort(dim=-1, stable=True)
    key_order = approx.lsh.hash(key).argsort(dim=-1, stable=True)
    query, key, value = _take(query, query_order), _take(key, key_order), _take(value, key_order)

    num_blocks = math.ceil(num_keys / approx.block_size)
    query_block = math.ceil(num_queries / num_blocks)
    output, lse = _block_diagonal_attention(query, key, value, num_blocks, query_block, approx)
    if num_blocks > 1 and approx.sample_size > 0:
        residual_output, residual_lse = _sampled_residual_attention(query, key, value, query_block, approx)
        del query, key, value  # the sorted copies: not needed any more
        output, lse = _merge(output, lse, residual_output, residual_lse, in_place=not torch.is_grad_enabled())
        del residual_output, residual_lse

    inverse = torch.empty_like(query_order).scatter_(
        -1, query_order, torch.arange(num_queries, device=query_order.device).expand_as(query_order)
    )
    return _take(output, inverse), lse.gather(-1, inverse)


def _block_diagonal_attention(query, key, value, num_blocks, query_block, approx: _Approximation):
    """Query block i attends to key block i of the bucket-sorted sequences; padded keys are masked out."""
    batch, heads, num_queries, _ = query.shape
    num_keys, block = key.shape[2], approx.block_size

    # b h (blocks n) d -> b (h blocks) n d: each pair of blocks is one small attention problem.
    def blocks(tensor, size):
        return _pad_rows(tensor, num_blocks * size).reshape(batch, heads * num_blocks, size, tensor.shape[-1])

    hidden = None
    if num_keys % block:
        padding = torch.arange(num_blocks * block, device=query.device).view(1, num_blocks, 1, block) >= num_keys
        hidden = padding.expand(heads, -1, -1, -1).reshape(1, heads * num_blocks, 1, block)
    output, lse = _attention_with_lse(
        blocks(query, query_block), blocks(key, block), blocks(value, block), scale=approx.scale, hidden=hidden
    )
    output = output.reshape(batch, heads, num_blocks * query_block, -1)[:, :, :num_queries]
    return output, lse.reshape(batch, heads, num_blocks * query_block)[:, :, :num_queries]


def _sampled_residual_attention(query, key, value, query_block, approx: _Approximation):
    """Attention to `sample_size` uniformly drawn keys outside the query's block, reweighted to the rest.

    Each draw is uniform over all `n_k` keys and counts only when it falls outside the query's block,
    so `n_k / sample_size · Σ_draws exp(score)` is an unbiased estimate of the off-block softmax sum.
    """
    batch, heads, num_queries, _ = query.shape
    num_keys = key.shape[2]
    first, stop, _ = approx.heads
    split = heads // (stop - first)  # 2^depth of the causal recursion
    drawn = approx.drawn if approx.drawn is not None else _draw_residual_keys(approx, batch, num_keys, split)
    drawn = drawn.to(query.device)
    query_blocks = torch.arange(num_queries, device=query.device) // query_block
    same_block = query_blocks.view(1, 1, -1, 1) == (drawn // approx.block_size).unsqueeze(2)
    output, lse = _attention_with_lse(query, _take(key, drawn), _take(value, drawn), scale=approx.scale,
                                      hidden=same_block)
    return output, lse + math.log(num_keys / approx.sample_size)


def _draw_residual_keys(approx: _Approximation, batch: int, num_keys: int, split: int) -> torch.Tensor:
    """The residual's key samples `(batch, heads · split, sample_size)` for this call's heads: drawn for all
    `total` heads (times `split` causal segments) and sliced, so any group of heads sees the same draws."""
    first, stop, total = approx.heads
    generator = approx.generator
    drawn = torch.randint(num_keys, (batch, total * split, approx.sample_size), generator=generator,
                          device=generator.device)
    return drawn[:, first * split : stop * split]


def _fused_cpu_attention_with_lse():
    """PyTorch's CPU flash-attention kernel, which returns the log-sum-exp too; `None` where it is missing."""
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):
        return None


_FUSED_CPU_ATTENTION_WITH_LSE = _fused_cpu_attention_with_lse()
_FUSED_BIAS_ELEMENTS = 2**22  # at most 16 MiB of float32 bias per slice of queries


def _attention_with_lse(query, key, value, *, scale: float, causal: bool = False, hidden=None, query_chunk=None):
    """Exact softmax attention `(b, h, n_q, d)` × `(b, h, n_k, d)` → float32 output and log-sum-exp `(b, h, n_q)`.

    `hidden` (bool, broadcastable to `(b, h, n_q, n_k)`) removes keys from a query's softmax; a query
    with every key hidden gets a log-sum-exp near `finfo.min`, so that merging ignores it. With `causal`,
    query i sees keys 0..i. The plain path takes `query_chunk` queries at a time to bound the score matrix.
    On CPU without gradients, PyTorch's fused flash-attention kernel computes the same thing 2-5× faster;
    it is not used under autograd because its log-sum-exp has no gradient, and merging pieces needs one.
    """
    needs_gradient = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if _FUSED_CPU_ATTENTION_WITH_LSE is not None and query.device.type == "cpu" and not needs_gradient:
        # The kernel takes an additive bias, as large as the mask; a mask with a row per query (the sampled
        # residual's: queries × sample_size) is turned into one a slice of queries at a time.
        per_query = hidden is not None and hidden.shape[-2] > 1
        step = max(1, _FUSED_BIAS_ELEMENTS // hidden[..., :1, :].numel()) if per_query else query.shape[2]
        outputs, lses = [], []
        for start in range(0, query.shape[2], step):
            bias = None
            if hidden is not None:
                rows = hidden[..., start : start + step, :] if per_query else hidden
                bias = torch.zeros(rows.shape, dtype=query.dtype, device=query.device)
                bias.masked_fill_(rows, torch.finfo(query.dtype).min)
            output, lse = _FUSED_CPU_ATTENTION_WITH_LSE(query[:, :, start : start + step], key, value, 0.0, causal,
                                                        attn_mask=bias, scale=scale)
            outputs.append(output.float())
            lses.append(lse.float())
        return (outputs[0], lses[0]) if len(outputs) == 1 else (torch.cat(outputs, dim=2), torch.cat(lses, dim=2))

    outputs, lses = [], []
    num_queries, num_keys = query.shape[2], key.shape[2]
    query_chunk = query_chunk or num_queries
    for start in range(0, num_queries, query_chunk):
        stop = min(start + query_chunk, num_queries)
        visible = stop if causal else num_keys
        scores = (query[:, :, start:stop] @ key[:, :, :visible].transpose(-1, -2)).float() * scale
        if causal:
            positions = torch.arange(visible, device=scores.device)
            scores = scores.masked_fill(positions[start:stop, None] < positions, torch.finfo(scores.dtype).min)
        if hidden is not None:
            rows = hidden if hidden.shape[-2] == 1 else hidden[..., start:stop, :]
            scores = scores.masked_fill(rows[..., :visible], torch.finfo(scores.dtype).min)
        output, lse = _softmax_attend(scores, value[:, :, :visible])
        outputs.append(output)
        lses.append(lse)
    return torch.cat(outputs, dim=2), torch.cat(lses, dim=2)


def _softmax_attend(scores: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 scores `(..., n, m)` and values `(..., m, d_v)` → float32 output `(..., n, d_v)`, lse `(..., n)`."""
    probabilities = scores.softmax(dim=-1).to(value.dtype)
    return (probabilities @ value).float(), scores.logsumexp(dim=-1)


def _merge(output_a, lse_a, output_b, lse_b, *, in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the union of two disjoint key sets, from each set's output and log-sum-exp.

    `in_place` reuses the storage of `output_a` and `output_b` (without autograd, for tensors nothing else
    reads afterwards)."""
    lse = torch.logaddexp(lse_a, lse_b)
    weight_a, weight_b = (lse_a - lse).exp().unsqueeze(-1), (lse_b - lse).exp().unsqueeze(-1)
    if in_place:
        return output_a.mul_(weight_a).add_(output_b.mul_(weight_b)), lse
    return output_a * weight_a + output_b * weight_b, lse


def _take(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`tensor[b, h, indices[b, h, s], :]` for `(b, h, n, d)` and `(b, h, s)` → `(b, h, s, d)`."""
    return tensor.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1]))


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad `(b, h, n, d)` to `rows` rows."""
    return F.pad(tensor, (0, 0, 0, rows - tensor.shape[2])) if rows > tensor.shape[2] else tensor


__all__ = ["AngularLSH", "HYPER_ATTENTION_SEED", "causal_padded_length", "hyper_attention"]
