"""Per-region U-Net decoder for dense prediction: region features + context tokens → region logits.

Each region is decoded on its own (no convolution crosses a region border), so decoding chunk by chunk,
or region by region from disk, gives exactly the in-memory result. Context reaches every region through
the context-encoded tokens fused at the deepest stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_xt import XTConfig


class XTDecoderBlock(nn.Module):
    """Two `conv3×3 → GroupNorm → GELU`. GroupNorm, unlike BatchNorm, never mixes regions of a chunk.

    Every group spans at least 16 channels (at most 8 groups). With one context token per region the fusing
    block sees a 1 × 1 map, and a group of 2 channels normalises every region to the same ±1 pattern: the
    context and the deepest features were thrown away there (docs/segmentation.md, the coastline task).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        groups = max(1, min(8, out_channels // 16))
        self.layers = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.GELU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.GroupNorm(groups, out_channels),
            nn.GELU(),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layers(hidden_states)


class XTSegmentationDecoder(nn.Module):
    """Fuse the deepest stage with the context tokens, then upsample through the shallower stages."""

    def __init__(self, config: XTConfig, stage_channels: list[int], context_channels: int):
        super().__init__()
        width = config.decoder_hidden_size
        self.fuse = XTDecoderBlock(stage_channels[-1] + context_channels, width)
        self.up_blocks = nn.ModuleList(XTDecoderBlock(width + channels, width) for channels in reversed(stage_channels[:-1]))
        self.classifier = nn.Conv2d(width, config.num_labels, kernel_size=1)

    def forward(self, stage_features: list[torch.Tensor], context: torch.Tensor | None) -> torch.Tensor:
        """Regions' stage maps `(n, C_s, h_s, w_s)`, shallow to deep, and their context `(n, D, h_S, w_S)`
        → logits `(n, num_labels, h_1, w_1)` at the shallowest stage's resolution."""
        deepest = stage_features[-1] if context is None else torch.cat([stage_features[-1], context.to(stage_features[-1].dtype)], 1)
        hidden = self.fuse(deepest)
        for block, skip in zip(self.up_blocks, reversed(stage_features[:-1])):
            hidden = F.interpolate(hidden, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            hidden = block(torch.cat([hidden, skip], dim=1))
        return self.classifier(hidden)
