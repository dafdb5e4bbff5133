"""Context encoder: a long-sequence model over every token of the stitched region grid."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from .configuration_xt import XTConfig
from .context_attention import XTAttentionBlock
from .context_mamba import XTMambaBlock
from .position_embedding import sincos_2d_position_embedding_at
from .spill import empty_beside, ensure_free_space, release_pages, spilled_empty


@dataclass
class ContextEncoding:
    """What the context encoder hands to the model: per-token states, the pooled CLS state, extras."""

    tokens: torch.Tensor
    cls_state: torch.Tensor | None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class XTContextEncoder(nn.Module):
    """Projects the grid tokens, adds 2-D position embeddings, appends a CLS token, runs the blocks.

    Tokens are the stitched grid flattened row-major over the whole image (not region by region).
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
        self,
        grid: torch.Tensor,
        *,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        spill_directory: str | os.PathLike | None = None,
    ) -> ContextEncoding:
        """`grid` `(batch, C, h, w)` → tokens `(batch, h·w, hidden)` (CLS excluded) and the CLS state.

        `spill_directory`: without autograd only, keep the token sequence in a file there (`new_token_buffer`).
        """
        batch, _, height, width = grid.shape
        features = grid.flatten(2).transpose(1, 2)
        row = torch.arange(height, device=grid.device).repeat_interleave(width)
        col = torch.arange(width, device=grid.device).repeat(height)
        if torch.is_grad_enabled():
            if spill_directory is not None:
                raise ValueError("Spilling tokens to disk is for inference: run under torch.inference_mode().")
            tokens = self._add_cls(self.embed_tokens(features, row, col))
        else:
            # A chunk of tokens at a time into one buffer: no full-size temporaries besides the tokens.
            tokens = self.new_token_buffer(batch, height * width, device=grid.device, spill_directory=spill_directory)
            grid_tokens = self.grid_part(tokens)
            for start in range(0, height * width, self.config.context_token_chunk_size):
                part = slice(start, start + self.config.context_token_chunk_size)
                grid_tokens[:, part] = self.embed_tokens(features[:, part], row[part], col[part])
                release_pages(grid_tokens[:, part])
        return self.encode(tokens, output_hidden_states=output_hidden_states, output_attentions=output_attentions)

    def embed_tokens(self, features: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """Region-encoder features `(batch, n, C)` of the grid cells `(row[i], col[i])` → `(batch, n, hidden)`:
        projected, plus their position embedding. Streaming embeds each chunk of regions as it arrives."""
        tokens = self.input_proj(features)
        if self.config.context_position_embedding == "sincos_2d":
            tokens = tokens + sincos_2d_position_embedding_at(row, col, tokens.shape[-1]).to(tokens.dtype)
        return tokens

    def new_token_buffer(
        self,
        batch: int,
        num_grid_tokens: int,
        *,
        device: torch.device,
        spill_directory: str | os.PathLike | None = None,
    ) -> torch.Tensor:
        """An uninitialised `(batch, num_grid_tokens [+ 1 CLS], hidden)` sequence, CLS already in place, for
        `embed_tokens` to fill (its grid tokens are `grid_part(buffer)`, row-major).

        With `spill_directory` (CPU only) the sequence lives in a file there (`spill.spilled_empty`), and the
        in-place blocks keep only the chunks they work on in memory.
        """
        weight = self.input_proj.weight
        shape = (batch, num_grid_tokens + (self.cls_token is not None), weight.shape[0])
        if spill_directory is None:
            tokens = weight.new_empty(shape, device=device)
        elif torch.device(device).type != "cpu":
            raise ValueError(f"Spilling tokens to disk is for CPU inference; the model runs on {device}.")
        else:
            # Attention blocks spill a second buffer of the same size (the heads' outputs), maybe an hour of
            # region encoding later: make sure now that the disk has room for both.
            buffers = 2 if any(isinstance(layer, XTAttentionBlock) for layer in self.layers) else 1
            ensure_free_space(spill_directory, buffers * math.prod(shape) * weight.element_size())
            tokens = spilled_empty(shape, dtype=weight.dtype, directory=spill_directory)
        if self.cls_token is not None:
            tokens[:, -1 if self.config.cls_token_position == "last" else 0] = self.cls_token[0, 0].to(tokens.dtype)
        return tokens

    def grid_part(self, tokens: torch.Tensor) -> torch.Tensor:
        """The grid tokens of a sequence (a view: the CLS token, if any, left out)."""
        return self._split_cls(tokens)[0]

    def encode(
        self, tokens: torch.Tensor, *, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> ContextEncoding:
        """Run the blocks over an embedded sequence `(batch, L [+ 1 CLS], hidden)`.

        Without autograd, a long sequence (more than `context_token_chunk_size` tokens) is updated in place,
        `tokens` included: see `XTAttentionBlock.forward_in_place` and `XTMambaBlock.forward_in_place`.
        """
        window = self.config.in_context_patches
        if 0 < window < tokens.shape[1]:
            return self._forward_windows(tokens, window)

        in_place = (
            not torch.is_grad_enabled() and not output_hidden_states and not output_attentions
            and tokens.shape[1] > self.config.context_token_chunk_size
            # mamba_ssm's CUDA scan over the whole sequence is far faster than chunks of the plain one.
            and not any(isinstance(layer, XTMambaBlock) and layer.mixer.uses_kernels(tokens) for layer in self.layers)
        )
        all_hidden, all_attentions = [], []
        for layer in self.layers:
            if in_place:
                layer.forward_in_place(tokens)
                continue
            if output_hidden_states:
                all_hidden.append(tokens)
            tokens, attentions = layer(tokens)
            all_attentions.append(attentions)
        if output_hidden_states:
            all_hidden.append(tokens)
        tokens, cls_state = self._split_cls(tokens)
        return ContextEncoding(
            tokens=tokens,
            cls_state=cls_state,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions and all_attentions[0] is not None else None,
        )

    def _add_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cls_token is None:
            return tokens
        cls = self.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        pieces = (tokens, cls) if self.config.cls_token_position == "last" else (cls, tokens)
        return torch.cat(pieces, dim=1)

    def _split_cls(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.cls_token is None:
            return tokens, None
        if self.config.cls_token_position == "last":
            return tokens[:, :-1], tokens[:, -1]
        return tokens[:, 1:], tokens[:, 0]

    def _run_layers(self, tokens: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            tokens, _ = layer(tokens)
        return tokens

    def _forward_windows(self, tokens: torch.Tensor, window: int) -> ContextEncoding:
        """Transformer-XL-style pass: windows of `window` tokens advancing by half a window.

        Each window sees the previous half-window as memory. A token's output comes from the window
        where it sits in the second half (so it has that memory), except in the very first half-window.
        As in the original, every window gets its own CLS token, the sequence's own CLS (if any) is an
        ordinary token of the windows that reach it, and the pooled state is the mean of the windows' CLS.
        """
        stride = window // 2
        length = tokens.shape[1]
        outputs = empty_beside(tokens, tuple(tokens.shape))
        window_cls = []
        for start in range(0, length - 1 if self.cls_token is not None else length, stride):
            piece = self._add_cls(tokens[:, start : start + window])
            piece, cls_state = self._split_cls(self._run_layers(piece))
            if cls_state is not None:
                window_cls.append(cls_state)
            keep_from = 0 if start == 0 else stride
            outputs[:, start + keep_from : start + piece.shape[1]] = piece[:, keep_from:]
            release_pages(outputs[:, start + keep_from : start + piece.shape[1]])
            release_pages(tokens[:, start : start + stride])
        outputs, _ = self._split_cls(outputs)
        cls_state = torch.stack(window_cls, dim=1).mean(dim=1) if window_cls else None
        return ContextEncoding(tokens=outputs, cls_state=cls_state)
