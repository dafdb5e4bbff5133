"""Context encoder: a long-sequence model over every token of the stitched region grid."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .configuration_xt import XTConfig
from .context_attention import XTAttentionBlock
from .context_mamba import XTMambaBlock
from .position_embedding import grid_cells, sincos_2d_position_embedding_at


@dataclass
class ContextEncoding:
    """What the context encoder hands to the model: per-token states, the pooled CLS state, extras."""

    tokens: torch.Tensor
    cls_state: torch.Tensor | None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class ContextWindow:
    """One Transformer-XL window's share of the result (`XTContextEncoder.encode_windows`)."""

    finished: slice  # the input tokens that no later window reads
    written: slice  # the sequence positions whose outputs this window gives
    tokens: torch.Tensor  # those outputs, `(batch, n, hidden)`
    cls_state: torch.Tensor | None  # the window's own CLS state


class XTContextEncoder(nn.Module):
    """Projects the grid tokens, adds 2-D position embeddings, appends a CLS token, runs the blocks.

    Tokens are the stitched grid flattened row-major over the whole image (not region by region). The
    public pieces (`embed_tokens`, `add_cls` / `split_cls`, `encode`, `encode_windows` and each block's
    own pieces) let an engine run the same numbers on sequences it builds and updates itself.
    """

    def __init__(self, config: XTConfig, in_channels: int):
        super().__init__()
        self.config = config
        hidden = config.context_hidden_size
        self.input_proj = nn.Linear(in_channels, hidden)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden)) if config.classifier == "context" else None
        block = XTMambaBlock if config.context_encoder == "mamba" else XTAttentionBlock
        self.layers = nn.ModuleList(block(config, layer_idx) for layer_idx in range(config.context_num_layers))

    def forward(
        self, grid: torch.Tensor, *, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> ContextEncoding:
        """`grid` `(batch, C, h, w)` → tokens `(batch, h·w, hidden)` (CLS excluded) and the CLS state."""
        _, _, height, width = grid.shape
        features = grid.flatten(2).transpose(1, 2)
        tokens = self.add_cls(self.embed_tokens(features, *grid_cells(height, width, device=grid.device)))
        return self.encode(tokens, output_hidden_states=output_hidden_states, output_attentions=output_attentions)

    def embed_tokens(self, features: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """Region-encoder features `(batch, n, C)` of the grid cells `(row[i], col[i])` → `(batch, n, hidden)`:
        projected, plus their position embedding. Any subset of the grid can be embedded on its own."""
        tokens = self.input_proj(features)
        if self.config.context_position_embedding == "sincos_2d":
            tokens = tokens + sincos_2d_position_embedding_at(row, col, tokens.shape[-1]).to(tokens.dtype)
        return tokens

    @property
    def cls_index(self) -> int | None:
        """Where the CLS token sits in a sequence (0 or -1), or None without one."""
        if self.cls_token is None:
            return None
        return -1 if self.config.cls_token_position == "last" else 0

    def add_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(batch, L, hidden)` → the sequence with the CLS token at `cls_index` (unchanged without one)."""
        if self.cls_token is None:
            return tokens
        cls = self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        pieces = (tokens, cls) if self.cls_index == -1 else (cls, tokens)
        return torch.cat(pieces, dim=1)

    def split_cls(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A sequence → its grid tokens (a view) and its CLS state (None without one)."""
        if self.cls_token is None:
            return tokens, None
        if self.cls_index == -1:
            return tokens[:, :-1], tokens[:, -1]
        return tokens[:, 1:], tokens[:, 0]

    def encode(
        self, tokens: torch.Tensor, *, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> ContextEncoding:
        """Run the blocks over an embedded sequence `(batch, L [+ 1 CLS], hidden)`."""
        window = self.config.in_context_patches
        if 0 < window < tokens.shape[1]:
            outputs = tokens.new_empty(tokens.shape)
            cls_states = []
            for piece in self.encode_windows(tokens):
                outputs[:, piece.written] = piece.tokens
                cls_states.append(piece.cls_state)
            return self.windows_encoding(outputs, cls_states)

        all_hidden, all_attentions = [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(tokens)
            tokens, attentions = layer(tokens)
            all_attentions.append(attentions)
        if output_hidden_states:
            all_hidden.append(tokens)
        tokens, cls_state = self.split_cls(tokens)
        return ContextEncoding(
            tokens=tokens,
            cls_state=cls_state,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions and all_attentions[0] is not None else None,
        )

    def encode_windows(
        self, tokens: torch.Tensor, *, run_block: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    ) -> Iterator[ContextWindow]:
        """Transformer-XL-style pass over `(batch, L, hidden)`: windows of `in_context_patches` tokens
        advancing by half a window, in order.

        Each window sees the previous half-window as memory. A token's output comes from the window
        where it sits in the second half (so it has that memory), except in the very first half-window.
        As in the original, every window gets its own CLS token, and the sequence's own CLS (if any) is an
        ordinary token of the windows that reach it (`windows_encoding` pools the windows' CLS states).
        `run_block(block, tokens) -> tokens` runs one block over a window (the block's forward by default), so
        that an engine can schedule the blocks its own way and keep this windowing.
        """
        window = self.config.in_context_patches
        stride = window // 2
        length = tokens.shape[1]
        for start in range(0, length - 1 if self.cls_token is not None else length, stride):
            piece = self.add_cls(tokens[:, start : start + window])
            for layer in self.layers:
                piece = layer(piece)[0] if run_block is None else run_block(layer, piece)
            piece, cls_state = self.split_cls(piece)
            keep_from = 0 if start == 0 else stride
            yield ContextWindow(
                finished=slice(start, start + stride),
                written=slice(start + keep_from, start + piece.shape[1]),
                tokens=piece[:, keep_from:],
                cls_state=cls_state,
            )

    def windows_encoding(self, outputs: torch.Tensor, cls_states: list[torch.Tensor | None]) -> ContextEncoding:
        """The encoding of a windowed pass: `outputs` holds every window's written tokens; the pooled state
        is the mean of the windows' CLS states."""
        tokens, _ = self.split_cls(outputs)
        states = [state for state in cls_states if state is not None]
        cls_state = torch.stack(states, dim=1).mean(dim=1) if states else None
        return ContextEncoding(tokens=tokens, cls_state=cls_state)
