"""Region encoder: any transformers backbone, run on each region independently, a chunk at a time."""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoBackbone
from transformers.models.hiera.modeling_hiera import unroll as hiera_unroll

from .configuration_xt import XTConfig
from .nested_tokenization import as_region_grid, region_index


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

    @property
    def channels(self) -> list[int]:
        """Channels of each stitched stage, in `backbone_config.out_features` order."""
        return list(self.backbone.channels)

    def forward(self, pixel_values: torch.Tensor, rows: int, cols: int) -> list[torch.Tensor]:
        """`(batch, C, rows·R, cols·R)` → one stitched `(batch, C_s, rows·h_s, cols·w_s)` map per stage."""
        regions = as_region_grid(pixel_values, self.config.region_size, self.config.region_size)
        num_regions = pixel_values.shape[0] * rows * cols
        chunk = self.config.region_batch_size or num_regions

        keep_grad = torch.ones(num_regions, dtype=torch.bool)
        if self.training and torch.is_grad_enabled() and self.config.grad_ratio < 1.0:
            # A fresh random subset keeps gradients each step; outputs stay in region order.
            num_grad = math.ceil(num_regions * self.config.grad_ratio)
            keep_grad[:] = False
            keep_grad[torch.randperm(num_regions)[:num_grad]] = True

        stitched: list[torch.Tensor] | None = None
        for with_grad in (True, False):
            selected = keep_grad.nonzero().flatten() if with_grad else (~keep_grad).nonzero().flatten()
            for start in range(0, len(selected), chunk):
                flat = selected[start : start + chunk]
                image, row, col = (i.to(pixel_values.device) for i in region_index(flat, rows, cols))
                with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
                    feature_maps = self._feature_maps(regions[image, row, col])
                if stitched is None:
                    stitched = [
                        features.new_empty(pixel_values.shape[0], features.shape[1], rows * features.shape[2],
                                           cols * features.shape[3])
                        for features in feature_maps
                    ]
                for grid, features in zip(stitched, feature_maps):
                    as_region_grid(grid, features.shape[2], features.shape[3])[image, row, col] = features
        return stitched

    def _feature_maps(self, regions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`(n, C, R, R)` → the backbone's `(n, C_s, h_s, w_s)` map for each `out_features` stage."""
        if self.config.backbone_config.model_type == "hiera":
            return self._hiera_feature_maps(regions)
        return self.backbone(regions).feature_maps

    def _hiera_feature_maps(self, regions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Hiera's stage outputs, computed as `HieraModel` (and the original) computes them.

        transformers 5.23's `HieraBackbone.forward` hands the patch embeddings to the encoder without
        `unroll`-ing them into mask-unit order, so its feature maps differ from `HieraModel`'s and from
        the original Hiera's (measured max |Δ| ≈ 2.7 on the fixture). This path adds the missing step.
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
