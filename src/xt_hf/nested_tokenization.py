"""Nested tokenization: cut an image into a grid of regions, and put region outputs back on the grid.

Both directions use the same strided view, `(batch, C, rows·h, cols·w) <-> (batch, rows, cols, C, h, w)`
(einops: `b c (rows h) (cols w) -> b rows cols c h w`), so neither the image nor the stitched feature map
is ever copied as a whole: regions are gathered and scattered a chunk at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def region_grid_shape(height: int, width: int, region_size: int) -> tuple[int, int]:
    """Rows and columns of regions needed to cover a `height × width` image (the last ones padded)."""
    return -(-height // region_size), -(-width // region_size)


def pad_to_region_multiple(pixel_values: torch.Tensor, region_size: int) -> torch.Tensor:
    """Zero-pad `(batch, C, H, W)` at the bottom and right to whole regions.

    Zero is the mean colour after ImageNet normalisation, so the padding reads as a neutral border;
    the original code accepted only exact multiples and did no padding.
    """
    height, width = pixel_values.shape[-2:]
    rows, cols = region_grid_shape(height, width, region_size)
    pad_bottom, pad_right = rows * region_size - height, cols * region_size - width
    if pad_bottom == 0 and pad_right == 0:
        return pixel_values
    return F.pad(pixel_values, (0, pad_right, 0, pad_bottom))


def as_region_grid(grid: torch.Tensor, region_height: int, region_width: int) -> torch.Tensor:
    """View `(batch, C, rows·h, cols·w)` as `(batch, rows, cols, C, h, w)` without copying.

    Indexing the view by `(image, region row, region column)` reads a region out of an image
    (nested tokenization), and assigning to it writes a region's feature map into the stitched grid.
    """
    batch, channels, height, width = grid.shape
    rows, cols = height // region_height, width // region_width
    return grid.view(batch, channels, rows, region_height, cols, region_width).permute(0, 2, 4, 1, 3, 5)


def region_index(flat_index: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split flat region numbers (image-major, then region row, then region column) into their parts."""
    return flat_index // (rows * cols), (flat_index // cols) % rows, flat_index % cols


def nested_tokenize(pixel_values: torch.Tensor, region_size: int) -> torch.Tensor:
    """Cut `(batch, C, rows·R, cols·R)` into `(batch·rows·cols, C, R, R)`, image-major then row-major.

    Materialises every region at once; the model itself gathers regions chunk by chunk instead.
    """
    regions = as_region_grid(pixel_values, region_size, region_size)
    return regions.reshape(-1, *regions.shape[3:])


def stitch_regions(region_features: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of `nested_tokenize` for feature maps: `(batch·rows·cols, C, h, w) -> (batch, C, rows·h, cols·w)`."""
    total, channels, height, width = region_features.shape
    batch = total // (rows * cols)
    grid = region_features.view(batch, rows, cols, channels, height, width).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(batch, channels, rows * height, cols * width)
