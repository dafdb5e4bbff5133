"""Region encoder: any transformers backbone, run on each region independently, a chunk at a time."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoBackbone
from transformers.models.hiera.modeling_hiera import unroll as hiera_unroll

from .configuration_xt import XTConfig
from .nested_tokenization import RegionIndex, nested_tokenize, region_batches, stitch_batches
from .swinv2_attention import set_swinv2_attention


@dataclass
class RegionBatch:
    """Regions to encode, `(n, C, R, R)` normalised pixels, with their places; `with_gradient=False` encodes them
    without autograd even in training (`grad_ratio`)."""

    pixels: torch.Tensor
    index: RegionIndex
    with_gradient: bool = True


class XTRegionEncoder(nn.Module):
    """Encodes the regions of a padded image and writes each stage's feature maps into stitched grids.

    Regions are gathered from the image `region_batch_size` at a time and their feature maps are
    scattered straight into preallocated `(batch, C, rows·h, cols·w)` grids, so peak memory is one
    chunk of backbone activations plus the stitched outputs, whatever the image size.
    """

    def __init__(self, config: XTConfig):
        super().__init__()
        self.config = config
        self.backbone = AutoBackbone.from_config(config.backbone_config)
        norms = getattr(self.backbone, "hidden_states_norms", None)
        if norms is not None and not config.region_encoder_output_norm:
            # The released models read un-normalised stage outputs (timm features_only / HieraWrapper).
            for stage in list(norms.keys()):
                norms[stage] = nn.Identity()
        set_swinv2_attention(self.backbone, config.region_encoder_attention)

    @property
    def channels(self) -> list[int]:
        """Channels of each stitched stage, in `backbone_config.out_features` order."""
        return list(self.backbone.channels)

    def forward(self, pixel_values: torch.Tensor, rows: int, cols: int) -> list[torch.Tensor]:
        """`(batch, C, rows·R, cols·R)` → one stitched `(batch, C_s, rows·h_s, cols·w_s)` map per stage."""
        return stitch_batches(self.encode_batches(self.region_feed(pixel_values, rows, cols)), pixel_values.shape[0],
                              rows, cols)

    def region_feed(self, pixel_values: torch.Tensor, rows: int, cols: int) -> Iterator[RegionBatch]:
        """The regions of an in-memory padded image, `region_batch_size` at a time, in image-major row-major
        order, gathered from a view (never all cut out at once).

        In training with `grad_ratio < 1`, a fresh random subset of the regions keeps gradients each step:
        those come first, then the rest without autograd.
        """
        num_regions = pixel_values.shape[0] * rows * cols
        keep_grad = torch.ones(num_regions, dtype=torch.bool)
        if self.training and torch.is_grad_enabled() and self.config.grad_ratio < 1.0:
            keep_grad[:] = False
            keep_grad[torch.randperm(num_regions)[: math.ceil(num_regions * self.config.grad_ratio)]] = True
        for with_gradient in (True, False):
            selected = (keep_grad if with_gradient else ~keep_grad).nonzero().flatten()
            for index in region_batches(pixel_values.shape[0], rows, cols, self.config.region_batch_size,
                                        order=selected):
                index = index.to(pixel_values.device)
                yield RegionBatch(nested_tokenize(pixel_values, index), index, with_gradient)

    def encode_batches(self, batches: Iterable[RegionBatch]) -> Iterator[tuple[RegionIndex, tuple[torch.Tensor, ...]]]:
        """The region loop: each batch's `(n, C_s, h_s, w_s)` stage maps, with the batch's places.

        The model feeds it from an image in memory (`region_feed`); the inference engine from a file read
        region by region. Either way each region is encoded on its own, so the feed decides nothing but order.
        """
        for batch in batches:
            with torch.set_grad_enabled(batch.with_gradient and torch.is_grad_enabled()):
                feature_maps = self.encode(batch.pixels)
            yield batch.index, feature_maps

    def encode(self, regions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`(n, C, R, R)` → the backbone's `(n, C_s, h_s, w_s)` map for each `out_features` stage."""
        if self.config.backbone_config.model_type == "hiera":
            return self._hiera_feature_maps(regions)
        return self.backbone(regions).feature_maps

    def _hiera_feature_maps(self, regions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Hiera's stage outputs, computed as `HieraModel` (and the original) computes them.

        transformers 5.23's `HieraBackbone.forward` hands the patch embeddings to the encoder without
        `unroll`-ing them into mask-unit order, so its feature maps differ from `HieraModel`'s and from
        the original Hiera's (docs/architecture.md). This path adds the missing step.
        """
        backbone = self.backbone
        embeddings, _, _ = backbone.embeddings(regions)
        tokens = hiera_unroll(
            embeddings,
            image_shape=tuple(regions.shape[-2:]),
            patch_stride=backbone.config.patch_stride,
            schedule=[backbone.config.query_stride] * len(backbone.config.depths[:-1]),
        )
        stages = backbone.encoder(tokens, output_hidden_states=True, return_dict=True).reshaped_hidden_states
        feature_maps = []
        for stage, hidden_state in zip(backbone.stage_names, stages):
            if stage in backbone.out_features:
                batch, height, width, channels = hidden_state.shape
                normed = backbone.hidden_states_norms[stage](hidden_state.reshape(batch, height * width, channels))
                feature_maps.append(normed.view(batch, height, width, channels).permute(0, 3, 1, 2))
        return tuple(feature_maps)
