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
  down to `min_seq_len`), so that no half ever needs padding again (and an engine can take every level's
  halves as views of one tensor). Only the padding rows themselves see the padding rows.
* Every piece (exact leaves, sorted blocks, sampled residual) and its log-sum-exp comes from a plain
  PyTorch softmax in float32, with gradients through the log-sum-exp (the original's Triton path
  detaches it).

The random draws of a call come from one function (`draw_hyper_attention`), and the pieces are public
(`sort_by_buckets`, `sorted_block_attention`, `attention_with_lse`, `merge_attention`), so that an
inference engine can schedule the same computation its own way (`xt_hf.engine.attention`: a head and a
chunk of rows at a time, without autograd) and get the same numbers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
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
) -> torch.Tensor:
    """Softmax attention on `(batch, heads, L, head_dim)`, approximated by HyperAttention when `L > min_seq_len`.

    Returns `(batch, heads, L, head_dim_v)` in the query's dtype; `scale=None` means `head_dim ** -0.5`.
    Up to `min_seq_len` tokens this is `torch.nn.functional.scaled_dot_product_attention`, unchanged. Above
    it, LSH-sorted block-diagonal attention plus a uniformly sampled residual (see the module docstring),
    with memory O(L · block_size). `generator` drives the projections and the sampling
    (`draw_hyper_attention`); `None` means a fresh CPU generator seeded with `HYPER_ATTENTION_SEED`, so
    repeated calls give identical outputs.
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
    batch, heads, length, head_dim = query.shape
    if length <= min_seq_len:
        return F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scale)

    draws = draw_hyper_attention(batch, heads, length, head_dim, causal=causal, lsh_num_projs=lsh_num_projs,
                                 block_size=block_size, sample_size=sample_size, min_seq_len=min_seq_len,
                                 generator=generator)
    plan = HyperAttentionPlan(draws, scale=head_dim**-0.5 if scale is None else scale, block_size=block_size,
                              sample_size=sample_size, min_seq_len=min_seq_len)
    if causal:
        # Zero rows at the end, seen (causally) only by themselves, make every halving exact.
        padded = causal_padded_length(length, min_seq_len)
        query, key, value = (_pad_rows(tensor, padded) for tensor in (query, key, value))
        output, _ = _causal_attention_with_lse(query, key, value, plan, depth=0)
    else:
        output, _ = _hyper_attention_with_lse(query, key, value, plan, depth=0)
    return output[:, :, :length].to(query.dtype)


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


def causal_halves(length: int, min_seq_len: int) -> list[int]:
    """The half length at each depth of causal HyperAttention over `length` tokens: depth `d` splits each of
    its `2**d` segments (of `causal_padded_length` / `2**d` tokens) into two halves of `halves[d]` tokens."""
    halves, size = [], causal_padded_length(length, min_seq_len)
    while size > min_seq_len:
        size //= 2
        halves.append(size)
    return halves


# ---- the random draws --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HyperAttentionDraws:
    """Every random draw of one HyperAttention call over `(batch, heads, L, head_dim)` inputs.

    `lsh` hashes every head. `residual_keys[d]` `(batch, heads · 2**d, sample_size)` are the positions, among
    the bucket-sorted keys, of the keys each query samples for its residual in the non-causal problems of
    depth `d` (`None` where there is none): one problem per head for non-causal attention (depth 0 only);
    for causal attention, the second half of each of the `2**d` segments of a head against its first half,
    head-major (head h owns problems `h · 2**d ... (h + 1) · 2**d − 1`).
    """

    lsh: AngularLSH
    residual_keys: tuple[torch.Tensor | None, ...]


def draw_hyper_attention(
    batch: int,
    heads: int,
    length: int,
    head_dim: int,
    *,
    causal: bool,
    lsh_num_projs: int = 7,
    block_size: int = 256,
    sample_size: int = 256,
    min_seq_len: int = 4096,
    generator: torch.Generator | None = None,
) -> HyperAttentionDraws:
    """The draws `hyper_attention` makes for `L = length > min_seq_len` tokens, on the generator's device.

    The one place randomness enters: the projections first, then the residual's samples deepest depth first
    (the order in which the causal recursion reaches them). `generator=None` is a fresh CPU generator seeded
    with `HYPER_ATTENTION_SEED`.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(HYPER_ATTENTION_SEED)
    lsh = AngularLSH(lsh_num_projs, head_dim, generator=generator)
    num_keys = causal_halves(length, min_seq_len) if causal else [length]
    residual_keys = [None] * len(num_keys)
    for depth in reversed(range(len(num_keys))):
        # A problem below `min_seq_len` is exact; one within a single block has no residual.
        if num_keys[depth] >= min_seq_len and num_keys[depth] > block_size and sample_size > 0:
            residual_keys[depth] = torch.randint(num_keys[depth], (batch, heads * 2**depth, sample_size),
                                                 generator=generator, device=generator.device)
    return HyperAttentionDraws(lsh, tuple(residual_keys))


# ---- the pieces --------------------------------------------------------------------------------------------

def attention_with_lse(query, key, value, *, scale: float, causal: bool = False, hidden=None, query_chunk=None):
    """Exact softmax attention `(b, h, n_q, d)` × `(b, h, n_k, d)` → float32 output and log-sum-exp `(b, h, n_q)`.

    `hidden` (bool, broadcastable to `(b, h, n_q, n_k)`) removes keys from a query's softmax; a query
    with every key hidden gets a log-sum-exp near `finfo.min`, so that merging ignores it. With `causal`,
    query i sees keys 0..i. `query_chunk` queries are taken at a time, to bound the score matrix.
    """
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
        probabilities = scores.softmax(dim=-1).to(value.dtype)
        outputs.append((probabilities @ value[:, :, :visible]).float())
        lses.append(scores.logsumexp(dim=-1))
    return torch.cat(outputs, dim=2), torch.cat(lses, dim=2)


def merge_attention(output_a, lse_a, output_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over the union of two disjoint key sets, from each set's output and log-sum-exp."""
    lse = torch.logaddexp(lse_a, lse_b)
    return output_a * (lse_a - lse).exp().unsqueeze(-1) + output_b * (lse_b - lse).exp().unsqueeze(-1), lse


@dataclass(frozen=True)
class HyperAttentionPlan:
    """One HyperAttention call's draws and settings, shared by its pieces."""

    draws: HyperAttentionDraws
    scale: float
    block_size: int
    sample_size: int
    min_seq_len: int
    # Computes every exact piece, with `attention_with_lse`'s signature and numbers; an engine may pass a
    # faster kernel without autograd (`xt_hf.engine.attention`).
    exact_attention: Callable[..., tuple[torch.Tensor, torch.Tensor]] = attention_with_lse


@dataclass(frozen=True)
class BucketSorted:
    """A non-causal problem `(b, h, n_q, d)` × `(b, h, n_k, d)` sorted by bucket (`sort_by_buckets`): query block
    i (`query_block` sorted queries) attends to key block i (`block_size` sorted keys), plus the residual."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    query_order: torch.Tensor  # (b, h, n_q): the queries' positions in bucket order
    key_order: torch.Tensor  # (b, h, n_k)
    num_blocks: int
    query_block: int
    # The sampled keys and values (b, h, sample_size, ·) and their blocks (b, h, sample_size), or None.
    residual: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


def sort_by_buckets(query, key, value, plan: HyperAttentionPlan, depth: int) -> BucketSorted:
    """Hash and sort the problems `(b, h, n_q, d)` × `(b, h, n_k, d)` of depth `depth` (`HyperAttentionDraws`),
    and gather the keys their residual samples."""
    num_queries, num_keys = query.shape[2], key.shape[2]
    query_order = plan.draws.lsh.hash(query).argsort(dim=-1, stable=True)
    key_order = plan.draws.lsh.hash(key).argsort(dim=-1, stable=True)
    num_blocks = math.ceil(num_keys / plan.block_size)
    residual = None
    drawn = plan.draws.residual_keys[depth]
    if num_blocks > 1 and drawn is not None:
        drawn = drawn.to(query.device)
        sampled = key_order.gather(-1, drawn)
        residual = (_take(key, sampled), _take(value, sampled), drawn // plan.block_size)
    return BucketSorted(query, key, value, query_order, key_order, num_blocks, math.ceil(num_queries / num_blocks),
                        residual)


def sorted_block_attention(problem: BucketSorted, first_block: int, stop_block: int, plan: HyperAttentionPlan):
    """The sorted query blocks `first_block ... stop_block − 1` of `problem`: float32 output `(b, h, n, d_v)`,
    log-sum-exp `(b, h, n)` and the queries' positions `(b, h, n)` in the unsorted problem."""
    query_block, block = problem.query_block, plan.block_size
    queries = problem.query_order[..., first_block * query_block : stop_block * query_block]
    keys = problem.key_order[..., first_block * block : stop_block * block]
    sorted_query = _take(problem.query, queries)
    output, lse = _block_diagonal_attention(sorted_query, _take(problem.key, keys), _take(problem.value, keys),
                                            stop_block - first_block, query_block, plan)
    if problem.residual is not None:
        residual = _sampled_residual_attention(sorted_query, *problem.residual, problem.key.shape[2],
                                               first_block * query_block, query_block, plan)
        output, lse = merge_attention(output, lse, *residual)
    return output, lse, queries


def _hyper_attention_with_lse(query, key, value, plan: HyperAttentionPlan, depth: int):
    """Non-causal HyperAttention `(b, h, n_q, d)` × `(b, h, n_k, d)` → float32 output and log-sum-exp."""
    problem = sort_by_buckets(query, key, value, plan, depth)
    output, lse, query_order = sorted_block_attention(problem, 0, problem.num_blocks, plan)
    inverse = torch.empty_like(query_order).scatter_(
        -1, query_order, torch.arange(query.shape[2], device=query_order.device).expand_as(query_order)
    )
    return _take(output, inverse), lse.gather(-1, inverse)


def _causal_attention_with_lse(query, key, value, plan: HyperAttentionPlan, depth: int):
    """Causal attention `(b, h, L, d)` → float32 output `(b, h, L, d_v)` and log-sum-exp `(b, h, L)`.

    `L` is a `causal_padded_length`, so every depth halves exactly.
    """
    length = query.shape[2]
    if length <= plan.min_seq_len:
        return plan.exact_attention(query, key, value, scale=plan.scale, causal=True, query_chunk=plan.block_size)
    half = length // 2

    # b h (two n) d -> b (h two) n d: the two diagonal halves become independent problems of the next depth.
    def split(tensor):
        b, h, _, d = tensor.shape
        return tensor.reshape(b, h * 2, half, d)

    diagonal_output, diagonal_lse = _causal_attention_with_lse(split(query), split(key), split(value), plan,
                                                               depth + 1)
    batch, heads = query.shape[:2]
    diagonal_output = diagonal_output.reshape(batch, heads, 2 * half, -1)
    diagonal_lse = diagonal_lse.reshape(batch, heads, 2 * half)

    # Every query of the second half sees every key of the first half: one non-causal problem.
    past = (query[:, :, half:], key[:, :, :half], value[:, :, :half])
    if half >= plan.min_seq_len:
        past_output, past_lse = _hyper_attention_with_lse(*past, plan, depth)
    else:
        past_output, past_lse = plan.exact_attention(*past, scale=plan.scale, query_chunk=plan.block_size)
    lower_output, lower_lse = merge_attention(diagonal_output[:, :, half:], diagonal_lse[:, :, half:], past_output,
                                              past_lse)
    output = torch.cat((diagonal_output[:, :, :half], lower_output), dim=2)
    lse = torch.cat((diagonal_lse[:, :, :half], lower_lse), dim=2)
    return output, lse


def _block_diagonal_attention(query, key, value, num_blocks, query_block, plan: HyperAttentionPlan):
    """Query block i attends to key block i of the bucket-sorted sequences; padded keys are masked out."""
    batch, heads, num_queries, _ = query.shape
    num_keys, block = key.shape[2], plan.block_size

    # b h (blocks n) d -> b (h blocks) n d: each pair of blocks is one small attention problem.
    def blocks(tensor, size):
        return _pad_rows(tensor, num_blocks * size).reshape(batch, heads * num_blocks, size, tensor.shape[-1])

    hidden = None
    if num_keys % block:
        padding = torch.arange(num_blocks * block, device=query.device).view(1, num_blocks, 1, block) >= num_keys
        hidden = padding.expand(heads, -1, -1, -1).reshape(1, heads * num_blocks, 1, block)
    output, lse = plan.exact_attention(blocks(query, query_block), blocks(key, block), blocks(value, block),
                                       scale=plan.scale, hidden=hidden)
    output = output.reshape(batch, heads, num_blocks * query_block, -1)[:, :, :num_queries]
    return output, lse.reshape(batch, heads, num_blocks * query_block)[:, :, :num_queries]


def _sampled_residual_attention(query, sampled_key, sampled_value, sampled_block, num_keys, first_query, query_block,
                                plan: HyperAttentionPlan):
    """Attention of sorted queries `first_query, first_query + 1, ...` to the `sample_size` keys drawn uniformly
    from all `num_keys` sorted keys (`sampled_block`: their blocks), except those of the query's own block.

    Each draw counts only when it falls outside the query's block, so `n_k / sample_size · Σ_draws exp(score)`
    is an unbiased estimate of the off-block softmax sum.
    """
    query_blocks = (first_query + torch.arange(query.shape[2], device=query.device)) // query_block
    same_block = query_blocks.view(1, 1, -1, 1) == sampled_block.unsqueeze(2)
    output, lse = plan.exact_attention(query, sampled_key, sampled_value, scale=plan.scale, hidden=same_block)
    return output, lse + math.log(num_keys / plan.sample_size)


def _take(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """`tensor[b, h, indices[b, h, s], :]` for `(b, h, n, d)` and `(b, h, s)` → `(b, h, s, d)`."""
    return tensor.gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, tensor.shape[-1]))


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad `(b, h, n, d)` to `rows` rows."""
    return F.pad(tensor, (0, 0, 0, rows - tensor.shape[2])) if rows > tensor.shape[2] else tensor


__all__ = [
    "HYPER_ATTENTION_SEED",
    "AngularLSH",
    "BucketSorted",
    "HyperAttentionDraws",
    "HyperAttentionPlan",
    "attention_with_lse",
    "causal_halves",
    "causal_padded_length",
    "draw_hyper_attention",
    "hyper_attention",
    "merge_attention",
    "sort_by_buckets",
    "sorted_block_attention",
]
