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
  detaches it). Inference in chunks (`in_chunks=True`, the engine's path) computes the same pieces with
  PyTorch's own fused CPU flash-attention kernel instead, which is faster (docs/hyper_attention.md).
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
    out: torch.Tensor | None = None,
    in_chunks: bool = False,
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

    `out`, a `(batch, heads, L, head_dim_v)` tensor (for instance a slice of a larger buffer), receives the
    result, which is then returned. Causal attention also takes an `out` of fewer rows, `L_out < L`: it
    receives the first `L_out` rows, which do not depend on the rest (padding a caller appended, say).

    `in_chunks=True` computes the same pieces with the same draws without autograd: one head at a time
    (unless `heads_at_once` says otherwise), every piece a chunk of query rows at a time (causal attention level by level instead of recursively), merged straight into one
    float32 output (`out` itself when it is float32), so no second output-sized buffer exists. For 10⁵-10⁶
    tokens that is what limits; the inference engine asks for it, the model's forward never does.
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
    length = query.shape[2]
    if out is not None:
        rows_fit = out.dim() == 4 and (out.shape[2] == length or (causal and out.shape[2] < length))
        if not rows_fit or (out.shape[0], out.shape[1], out.shape[-1]) != (*query.shape[:2], value.shape[-1]):
            raise ValueError(f"`out` must have the output's shape {(*query.shape[:3], value.shape[-1])} (causal: or "
                             f"fewer rows), got {tuple(out.shape)}.")
        length = out.shape[2]
    if query.shape[2] <= min_seq_len:
        output = F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scale)
        return output if out is None else out.copy_(output[:, :, :length])

    if heads_at_once is not None and heads_at_once < 1:
        raise ValueError(f"`heads_at_once` must be None or ≥ 1, got {heads_at_once}.")
    heads = query.shape[1]
    if in_chunks and heads_at_once is None:
        heads_at_once = 1  # the temporaries of one head at a time, as nothing is kept for a backward pass
    first_head, total_heads = head_range or (0, heads)
    if first_head < 0 or first_head + heads > total_heads:
        raise ValueError(f"`head_range` {head_range} does not hold the inputs' {heads} heads.")

    padded = causal_padded_length(query.shape[2], min_seq_len) if causal else query.shape[2]
    if padded > query.shape[2]:
        # Zero rows at the end, seen (causally) only by themselves, make every halving exact.
        query, key, value = (F.pad(tensor, (0, 0, 0, padded - query.shape[2])) for tensor in (query, key, value))

    if generator is None:
        generator = torch.Generator().manual_seed(HYPER_ATTENTION_SEED)
    initial_state = generator.get_state()
    step = min(heads_at_once or heads, heads)
    needs_gradient = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if in_chunks and needs_gradient:
        raise ValueError("`in_chunks=True` is for inference: run it under torch.inference_mode() or on detached inputs.")
    if out is not None and needs_gradient:
        raise ValueError("`out` is for inference: autograd cannot differentiate through it.")
    output = out
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
            fused=in_chunks,
        )
        group = slice(start, start + step)
        inputs = (query[:, group], key[:, group], value[:, group])
        target = None if output is None else output[:, group]
        # In chunks, pieces are merged straight into `output` when its rows can take float32 merges.
        into_output = in_chunks and target is not None and target.dtype == torch.float32 and (
            _rows_view(target) is not None)
        if not in_chunks:
            attend = _causal_attention_with_lse if causal else _hyper_attention_with_lse
            part = attend(*inputs, approximation)[0][:, :, :length]
        else:
            if not into_output:
                target = torch.empty(*inputs[0].shape[:2], length, value.shape[-1], device=query.device)
            attend = _causal_attention_by_levels if causal else _hyper_attention_by_chunks
            part = attend(*inputs, approximation, _Rows.over(target))
        if step == heads and out is None:
            return part.to(query.dtype)
        if output is None:
            output = query.new_empty(*query.shape[:2], length, value.shape[-1])
        if not into_output:
            output[:, group] = part
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
    # Exact pieces through PyTorch's fused CPU kernel (no gradient): inference in chunks only.
    fused: bool = False


def _causal_attention_with_lse(query, key, value, approx: _Approximation) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention `(b, h, L, d)` → float32 output `(b, h, L, d_v)` and log-sum-exp `(b, h, L)`.

    `L` is a `causal_padded_length`, so every level halves exactly.
    """
    length = query.shape[2]
    if length <= approx.min_seq_len:
        return _attention_with_lse(query, key, value, scale=approx.scale, causal=True, query_chunk=approx.block_size,
                                   fused=approx.fused)
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
        past_output, past_lse = _attention_with_lse(*past, scale=approx.scale, query_chunk=approx.block_size,
                                                    fused=approx.fused)
    lower_output, lower_lse = _merge(diagonal_output[:, :, half:], diagonal_lse[:, :, half:], past_output, past_lse)
    output = torch.cat((diagonal_output[:, :, :half], lower_output), dim=2)
    lse = torch.cat((diagonal_lse[:, :, :half], lower_lse), dim=2)
    return output, lse


def _causal_attention_by_levels(query, key, value, approx: _Approximation, rows: _Rows) -> torch.Tensor:
    """`_causal_attention_with_lse`'s output without autograd, level by level instead of recursively, merged
    into `rows` (whose tensor it returns).

    Same pieces, same random draws, same result up to the order in which pieces are merged. The recursion
    keeps every level's outputs alive until it unwinds; here every piece is computed a chunk of rows at a
    time and merged straight into one float32 output of `(batch, heads, L_out, d_v)` (`L_out ≤ L`: the rows
    past `L_out` are padding, dropped), and every level's halves are views of the inputs (`L` is a
    `causal_padded_length`). So besides q/k/v and the output only chunks exist.
    """
    batch, _, length, _ = query.shape
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

    tensors = [query, key, value]  # (batch, heads · segments, tokens, dim), as the recursion reshapes them
    for depth, half in enumerate(halves):
        # Segment s of a head holds the tokens s · 2·half ... (s + 1) · 2·half: its second half's queries see
        # its whole first half.
        past = (tensors[0][:, :, half:], tensors[1][:, :, :half], tensors[2][:, :, :half])
        if half >= approx.min_seq_len:
            pieces = _hyper_attention_chunks(*past, dataclasses.replace(approx, drawn=drawn.get(depth)),
                                             rows_per_chunk=_ROWS_PER_CHUNK)
        else:
            pieces = _exact_attention_chunks(*past, approx, causal=False)
        for piece, piece_lse, local, first in pieces:
            rows.merge(piece, piece_lse, local, first, segments=2**depth, segment_length=2 * half, offset=half)
        tensors = [tensor.reshape(batch, tensor.shape[1] * 2, half, tensor.shape[-1]) for tensor in tensors]
    for piece, piece_lse, local, first in _exact_attention_chunks(*tensors, approx, causal=True):
        rows.merge(piece, piece_lse, local, first, segments=2 ** len(halves), segment_length=tensors[0].shape[2],
                   offset=0)
    return rows.target


def _hyper_attention_by_chunks(query, key, value, approx: _Approximation, rows: _Rows) -> torch.Tensor:
    """Non-causal HyperAttention without autograd, a chunk of sorted blocks at a time, into `rows`."""
    for piece, piece_lse, local, first in _hyper_attention_chunks(query, key, value, approx,
                                                                 rows_per_chunk=_ROWS_PER_CHUNK):
        rows.merge(piece, piece_lse, local, first, segments=1, segment_length=query.shape[2], offset=0)
    return rows.target


_ROWS_PER_CHUNK = 2**15  # query rows per chunk of a piece without autograd: 16 MiB per float32 head_dim-128 tensor


@dataclass
class _Rows:
    """The float32 output `(batch, heads, L_out, d_v)` of an attention and its log-sum-exps, flattened to rows,
    that pieces of `(batch, heads · segments, n)` rows are merged into."""

    target: torch.Tensor
    output: torch.Tensor  # target as (batch · heads · L_out, d_v), a view
    lse: torch.Tensor  # (batch · heads · L_out,)
    heads: int
    length: int

    @classmethod
    def over(cls, target: torch.Tensor) -> _Rows:
        """Rows of `target` (zeroed: nothing merged yet), which must be float32 and viewable as rows."""
        batch, heads, length, _ = target.shape
        lse = torch.full((batch * heads * length,), -math.inf, device=target.device)
        return cls(target, _rows_view(target.zero_()), lse, heads, length)

    def merge(self, piece, piece_lse, local, first: int, *, segments: int, segment_length: int, offset: int) -> None:
        """Merge `piece` `(b, n_j, n, d_v)` of the problems `j = first, first + 1, ...` of `heads · segments`:
        its row `(j, i)` is token `offset + local[.., j, i]` of segment `j % segments` (`segment_length` tokens
        each) of head `j // segments`. Rows past `L_out` (padding) are dropped."""
        batch, count = piece.shape[:2]
        j = torch.arange(first, first + count, device=piece.device).view(1, count, 1)
        position = (j % segments) * segment_length + offset + local
        flat = (torch.arange(batch, device=piece.device).view(-1, 1, 1) * self.heads + j // segments) * self.length
        flat = (flat + position).reshape(-1)
        piece, piece_lse = piece.reshape(-1, piece.shape[-1]), piece_lse.reshape(-1)
        if (position >= self.length).any():  # the zero rows that pad a causal sequence
            keep = (position < self.length).expand(batch, -1, -1).reshape(-1)
            flat, piece, piece_lse = flat[keep], piece[keep], piece_lse[keep]
        merged, merged_lse = _merge(self.output.index_select(0, flat), self.lse.index_select(0, flat), piece, piece_lse,
                                    in_place=True)
        self.output.index_copy_(0, flat, merged)
        self.lse.index_copy_(0, flat, merged_lse)


def _exact_attention_chunks(query, key, value, approx: _Approximation, *, causal: bool):
    """Exact attention of `(b, S, n_q, d)` × `(b, S, n_k, d)` a few of the S problems at a time: yields their
    float32 outputs, log-sum-exps, row numbers `(1, s, n_q)` and the first problem's number."""
    batch, count, num_queries, _ = query.shape
    step = max(1, _ROWS_PER_CHUNK // (batch * num_queries))
    local = torch.arange(num_queries, device=query.device).view(1, 1, -1)
    for first in range(0, count, step):
        group = slice(first, first + step)
        output, lse = _attention_with_lse(query[:, group], key[:, group], value[:, group], scale=approx.scale,
                                          fused=approx.fused,
                                          causal=causal, query_chunk=approx.block_size)
        yield output, lse, local.expand(1, output.shape[1], -1), first


def _hyper_attention_with_lse(query, key, value, approx: _Approximation) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-causal HyperAttention `(b, h, n_q, d)` × `(b, h, n_k, d)` → float32 output and log-sum-exp."""
    ((output, lse, query_order, _),) = _hyper_attention_chunks(query, key, value, approx)
    inverse = torch.empty_like(query_order).scatter_(
        -1, query_order, torch.arange(query.shape[2], device=query_order.device).expand_as(query_order)
    )
    return _take(output, inverse), lse.gather(-1, inverse)


def _hyper_attention_chunks(query, key, value, approx: _Approximation, rows_per_chunk: int | None = None):
    """Non-causal HyperAttention `(b, h, n_q, d)` × `(b, h, n_k, d)` by groups of sorted blocks.

    Yields float32 outputs `(b, h, n, d_v)` and log-sum-exps `(b, h, n)` of a group of query blocks (all at
    once when `rows_per_chunk` is None, else about that many rows at a time), with the rows' places in
    `query` `(b, h, n)` and 0 (the first of the h problems). Each group gathers only its own queries and keys in
    sorted order.
    """
    batch, heads, num_queries, _ = query.shape
    num_keys = key.shape[2]
    query_order = approx.lsh.hash(query).argsort(dim=-1, stable=True)
    key_order = approx.lsh.hash(key).argsort(dim=-1, stable=True)
    num_blocks = math.ceil(num_keys / approx.block_size)
    query_block = math.ceil(num_queries / num_blocks)
    with_residual = num_blocks > 1 and approx.sample_size > 0
    if with_residual:
        # Every query also sees `sample_size` keys drawn uniformly from the sorted keys (see
        # `_sampled_residual_attention`); they are the same for every group of blocks.
        first, stop, _ = approx.heads
        drawn = approx.drawn if approx.drawn is not None else _draw_residual_keys(approx, batch, num_keys,
                                                                                  heads // (stop - first))
        drawn = drawn.to(query.device)
        sampled = key_order.gather(-1, drawn)
        residual = (_take(key, sampled), _take(value, sampled), drawn // approx.block_size)

    step = num_blocks if rows_per_chunk is None else max(1, rows_per_chunk // (batch * heads * query_block))
    for first_block in range(0, num_blocks, step):
        blocks = min(step, num_blocks - first_block)
        queries = query_order[..., first_block * query_block : (first_block + blocks) * query_block]
        if queries.shape[-1] == 0:
            break
        keys = key_order[..., first_block * approx.block_size : (first_block + blocks) * approx.block_size]
        sorted_query = _take(query, queries)
        output, lse = _block_diagonal_attention(sorted_query, _take(key, keys), _take(value, keys), blocks,
                                                query_block, approx)
        if with_residual:
            residual_output, residual_lse = _sampled_residual_attention(sorted_query, *residual, num_keys,
                                                                        first_block * query_block, query_block, approx)
            del sorted_query
            # Chunks (`rows_per_chunk`) are inference only: nothing else reads the two pieces afterwards.
            output, lse = _merge(output, lse, residual_output, residual_lse, in_place=rows_per_chunk is not None)
        yield output, lse, queries, 0


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
        blocks(query, query_block), blocks(key, block), blocks(value, block), scale=approx.scale, hidden=hidden,
        fused=approx.fused,
    )
    output = output.reshape(batch, heads, num_blocks * query_block, -1)[:, :, :num_queries]
    return output, lse.reshape(batch, heads, num_blocks * query_block)[:, :, :num_queries]


def _sampled_residual_attention(query, sampled_key, sampled_value, sampled_block, num_keys, first_query, query_block,
                                approx: _Approximation):
    """Attention of sorted queries `first_query, first_query + 1, ...` to the `sample_size` keys drawn uniformly
    from all `num_keys` sorted keys (`sampled_block`: their blocks), except those of the query's own block.

    Each draw counts only when it falls outside the query's block, so `n_k / sample_size · Σ_draws exp(score)`
    is an unbiased estimate of the off-block softmax sum.
    """
    query_blocks = (first_query + torch.arange(query.shape[2], device=query.device)) // query_block
    same_block = query_blocks.view(1, 1, -1, 1) == sampled_block.unsqueeze(2)
    output, lse = _attention_with_lse(query, sampled_key, sampled_value, scale=approx.scale, hidden=same_block,
                                      fused=approx.fused)
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


def _attention_with_lse(query, key, value, *, scale: float, causal: bool = False, hidden=None, query_chunk=None,
                        fused: bool = False):
    """Exact softmax attention `(b, h, n_q, d)` × `(b, h, n_k, d)` → float32 output and log-sum-exp `(b, h, n_q)`.

    `hidden` (bool, broadcastable to `(b, h, n_q, n_k)`) removes keys from a query's softmax; a query
    with every key hidden gets a log-sum-exp near `finfo.min`, so that merging ignores it. With `causal`,
    query i sees keys 0..i. The plain path takes `query_chunk` queries at a time to bound the score matrix.
    With `fused` (inference in chunks only) PyTorch's fused CPU flash-attention kernel computes the same
    thing faster; its log-sum-exp has no gradient, and merging pieces under autograd needs one.
    """
    if fused and _FUSED_CPU_ATTENTION_WITH_LSE is not None and query.device.type == "cpu":
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


def _rows_view(tensor: torch.Tensor) -> torch.Tensor | None:
    """`(b, h, n, d)` seen as `(b · h · n, d)` rows without a copy, or None where its strides do not allow it."""
    try:
        return tensor.view(-1, tensor.shape[-1])
    except RuntimeError:
        return None


def _take(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`tensor[b, h, indices[b, h, s], :]` for `(b, h, n, d)` and `(b, h, s)` → `(b, h, s, d)`."""
    return tensor.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1]))


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad `(b, h, n, d)` to `rows` rows."""
    return F.pad(tensor, (0, 0, 0, rows - tensor.shape[2])) if rows > tensor.shape[2] else tensor


__all__ = ["AngularLSH", "HYPER_ATTENTION_SEED", "causal_padded_length", "hyper_attention"]
