"""The context encoder's attention without autograd, one head at a time, into a buffer the engine owns.

The model's attention (`XTSelfAttention.attend`, `hyper_attention`) keeps what a backward pass needs: every
head's pieces at once, the causal recursion's outputs until it unwinds. Here the same pieces (the model's
`sort_by_buckets`, `sorted_block_attention`, `attention_with_lse`) with the same random draws (the model's
`draw_hyper_attention`, made once per layer and handed to each head) are computed a chunk of rows at a time
and merged straight into one float32 output per head (the caller's buffer, which may be a spill file), causal
attention level by level. Exact pieces run in PyTorch's fused CPU flash-attention kernel where there is one.
Same numbers as the model's forward up to float rounding (tests/test_hyper_attention.py compares them).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..context_attention import XTSelfAttention
from ..hyper_attention import (
    HyperAttentionDraws,
    HyperAttentionPlan,
    attention_with_lse,
    causal_halves,
    causal_padded_length,
    draw_hyper_attention,
    merge_attention,
    sort_by_buckets,
    sorted_block_attention,
)

_ROWS_PER_CHUNK = 2**15  # query rows per chunk of a piece: 16 MiB per float32 head_dim-128 tensor


def layer_draws(attention: XTSelfAttention, batch: int, length: int) -> HyperAttentionDraws | None:
    """The random draws `attention` makes for all its heads over `length` tokens, or None when it attends exactly."""
    if not attention.uses_hyper_attention(length):
        return None
    return draw_hyper_attention(batch, attention.num_heads, length, attention.head_dim,
                                **attention.hyper_attention_options())


def attend_head(attention: XTSelfAttention, query, key, value, *, head: int, draws: HyperAttentionDraws | None,
                out: torch.Tensor) -> torch.Tensor:
    """Head `head` of `attention` on its own: `(batch, 1, L, head_dim)` q/k/v (causal HyperAttention: `L` may be
    `causal_padded_length`, the extra rows zero) into `out` `(batch, 1, L_out, head_dim)`, its first `L_out` rows.

    `draws` are `layer_draws(attention, batch, L_out)`, shared by every head of the layer.
    """
    if draws is None:
        output, _ = attention.attend(query, key, value)  # heads are independent: one is the model's own call
        return out.copy_(output[:, : out.shape[2]].transpose(1, 2))
    options = attention.hyper_attention_options()
    plan = HyperAttentionPlan(draws_of_head(draws, head), scale=attention.scale, block_size=options["block_size"],
                              sample_size=options["sample_size"], min_seq_len=options["min_seq_len"],
                              exact_attention=fused_attention_with_lse)
    return hyper_attention_into(query, key, value, plan, causal=options["causal"], out=out)


def hyper_attention_into(query, key, value, plan: HyperAttentionPlan, *, causal: bool, out: torch.Tensor):
    """`hyper_attention` of `(batch, heads, L, head_dim)` with `plan`'s draws, into `out` `(batch, heads, L_out, d_v)`
    (causal: `L_out ≤ L`, the first rows), a chunk of rows at a time; returns `out`.

    Only q/k/v, `out` and chunks exist: when `out` is float32 and its rows are one view, pieces are merged
    straight into it, else into one float32 buffer copied into it at the end.
    """
    if causal and query.shape[2] < causal_padded_length(query.shape[2], plan.min_seq_len):
        padded = causal_padded_length(query.shape[2], plan.min_seq_len)
        query, key, value = (F.pad(tensor, (0, 0, 0, padded - tensor.shape[2])) for tensor in (query, key, value))
    direct = out.dtype == torch.float32 and _rows_view(out) is not None
    rows = _Rows.over(out if direct else torch.empty(out.shape, device=out.device))
    if causal:
        _causal_attention_by_levels(query, key, value, plan, rows)
    else:
        _hyper_attention_by_chunks(query, key, value, plan, rows, depth=0, segments=1, offset=0)
    return out if direct else out.copy_(rows.target)


def fused_attention_with_lse(query, key, value, *, scale: float, causal: bool = False, hidden=None,
                             query_chunk=None):
    """`attention_with_lse` computed by PyTorch's CPU flash-attention kernel (no autograd), elsewhere the model's.

    The kernel takes an additive bias, as large as the mask; a mask with a row per query (the sampled
    residual's: queries × sample_size) is turned into one a slice of queries at a time.
    """
    if _FUSED_CPU_ATTENTION_WITH_LSE is None or query.device.type != "cpu":
        return attention_with_lse(query, key, value, scale=scale, causal=causal, hidden=hidden,
                                  query_chunk=query_chunk)
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


def _fused_cpu_attention_with_lse():
    """PyTorch's CPU flash-attention kernel, which returns the log-sum-exp too; `None` where it is missing."""
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):
        return None


_FUSED_CPU_ATTENTION_WITH_LSE = _fused_cpu_attention_with_lse()
_FUSED_BIAS_ELEMENTS = 2**22  # at most 16 MiB of float32 bias per slice of queries


def draws_of_head(draws: HyperAttentionDraws, head: int) -> HyperAttentionDraws:
    """The layer's draws as a call over head `head` alone sees them (head-major problems, `HyperAttentionDraws`)."""
    return dataclasses.replace(draws, residual_keys=tuple(
        None if drawn is None else drawn[:, head * 2**depth : (head + 1) * 2**depth]
        for depth, drawn in enumerate(draws.residual_keys)))


def _causal_attention_by_levels(query, key, value, plan: HyperAttentionPlan, rows: _Rows) -> None:
    """The model's causal recursion level by level, merged into `rows`.

    Same pieces, same draws, same result up to the order in which pieces are merged. The recursion keeps every
    level's outputs alive until it unwinds; here every piece is computed a chunk of rows at a time and merged
    at once, and every level's halves are views of the inputs (`L` is a `causal_padded_length`).
    """
    batch, _, length, _ = query.shape
    tensors = [query, key, value]  # (batch, heads · segments, tokens, dim), as the recursion reshapes them
    halves = causal_halves(length, plan.min_seq_len)
    for depth, half in enumerate(halves):
        # Segment s of a head holds the tokens s · 2·half ... (s + 1) · 2·half: its second half's queries see
        # its whole first half.
        past = (tensors[0][:, :, half:], tensors[1][:, :, :half], tensors[2][:, :, :half])
        placement = dict(segments=2**depth, segment_length=2 * half, offset=half)
        if half >= plan.min_seq_len:
            _hyper_attention_by_chunks(*past, plan, rows, depth=depth, **placement)
        else:
            _exact_attention_by_chunks(*past, plan, rows, causal=False, **placement)
        tensors = [tensor.reshape(batch, tensor.shape[1] * 2, half, tensor.shape[-1]) for tensor in tensors]
    _exact_attention_by_chunks(*tensors, plan, rows, causal=True, segments=2 ** len(halves),
                               segment_length=tensors[0].shape[2], offset=0)


def _hyper_attention_by_chunks(query, key, value, plan: HyperAttentionPlan, rows: _Rows, *, depth: int,
                               segments: int, offset: int, segment_length: int | None = None) -> None:
    """The non-causal problems of depth `depth` a chunk of sorted blocks at a time, merged into `rows`."""
    problem = sort_by_buckets(query, key, value, plan, depth)
    batch, problems, num_queries = query.shape[:3]
    step = max(1, _ROWS_PER_CHUNK // (batch * problems * problem.query_block))
    for first_block in range(0, problem.num_blocks, step):
        if first_block * problem.query_block >= num_queries:
            break
        stop_block = min(first_block + step, problem.num_blocks)
        piece, piece_lse, local = sorted_block_attention(problem, first_block, stop_block, plan)
        rows.merge(piece, piece_lse, local, 0, segments=segments, segment_length=segment_length or num_queries,
                   offset=offset)


def _exact_attention_by_chunks(query, key, value, plan: HyperAttentionPlan, rows: _Rows, *, causal: bool,
                               segments: int, segment_length: int, offset: int) -> None:
    """Exact attention of `(b, S, n_q, d)` × `(b, S, n_k, d)` a few of the S problems at a time, into `rows`."""
    batch, count, num_queries, _ = query.shape
    step = max(1, _ROWS_PER_CHUNK // (batch * num_queries))
    local = torch.arange(num_queries, device=query.device).view(1, 1, -1)
    for first in range(0, count, step):
        group = slice(first, first + step)
        piece, piece_lse = plan.exact_attention(query[:, group], key[:, group], value[:, group], scale=plan.scale,
                                                causal=causal, query_chunk=plan.block_size)
        rows.merge(piece, piece_lse, local.expand(1, piece.shape[1], -1), first, segments=segments,
                   segment_length=segment_length, offset=offset)


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
        merged, merged_lse = merge_attention(self.output.index_select(0, flat), self.lse.index_select(0, flat), piece,
                                             piece_lse)
        self.output.index_copy_(0, flat, merged)
        self.lse.index_copy_(0, flat, merged_lse)


def _rows_view(tensor: torch.Tensor) -> torch.Tensor | None:
    """`(b, h, n, d)` seen as `(b · h · n, d)` rows without a copy, or None where its strides do not allow it."""
    try:
        return tensor.view(-1, tensor.shape[-1])
    except RuntimeError:
        return None
