"""Nested tokenization: cut an image into a grid of regions, and put region outputs back on the grid.

Both directions use the same strided view, `(batch, C, rows·h, cols·w) <-> (batch, rows, cols, C, h, w)`
(einops: `b c (rows h) (cols w) -> b rows cols c h w`), so neither the image nor the stitched feature map
is ever copied as a whole: `nested_tokenize` cuts out and `stitch_regions` writes back a batch of regions
(`RegionIndex`, from `region_batches`) at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def region_grid_shape(height: int, width: int, region_size: int) -> tuple[int, int]:
    """Rows and columns of `region_size` squares needed to cover a `height × width` image (the last ones padded);
    with a stride for `region_size`, the size of a map at `1 / stride` of the image's resolution."""
    return -(-height // region_size), -(-width // region_size)


def pad_to_region_multiple(pixel_values: torch.Tensor, region_size: int, value: float = 0.0) -> torch.Tensor:
    """Pad `(..., H, W)` at the bottom and right with `value` to whole regions (returned as it is when it has them).

    The default zero is the mean colour after ImageNet normalisation, so the padding reads as a neutral border;
    the original code accepted only exact multiples and did no padding.
    """
    height, width = pixel_values.shape[-2:]
    rows, cols = region_grid_shape(height, width, region_size)
    pad_bottom, pad_right = rows * region_size - height, cols * region_size - width
    if pad_bottom == 0 and pad_right == 0:
        return pixel_values
    return F.pad(pixel_values, (0, pad_right, 0, pad_bottom), value=value)


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


@dataclass(frozen=True)
class RegionIndex:
    """Which regions of a `rows × cols` grid a batch holds: image, region row and region column, `(n,)` each.

    `nested_tokenize` reads those regions out of any map laid over the grid and `stitch_regions` writes them
    back, whatever the map's resolution.
    """

    image: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    rows: int
    cols: int

    def __len__(self) -> int:
        return len(self.row)

    def to(self, device: torch.device | str) -> RegionIndex:
        return RegionIndex(self.image.to(device), self.row.to(device), self.col.to(device), self.rows, self.cols)


def nested_tokenize(grid: torch.Tensor, index: RegionIndex) -> torch.Tensor:
    """Cut the regions `index` names out of `(batch, C, rows·h, cols·w)`: `(n, C, h, w)`.

    `grid` is anything laid over the region grid: the padded image, a stage's stitched features, the
    context tokens on the grid, the logits. Only these regions are copied, never the whole image.
    """
    return as_region_grid(grid, grid.shape[2] // index.rows, grid.shape[3] // index.cols)[index.image, index.row, index.col]


def stitch_regions(grid: torch.Tensor, index: RegionIndex, regions: torch.Tensor) -> None:
    """Write regions' maps `(n, C, h, w)` into their places of the stitched `(batch, C, rows·h, cols·w)`:
    the inverse of `nested_tokenize`."""
    as_region_grid(grid, grid.shape[2] // index.rows, grid.shape[3] // index.cols)[index.image, index.row, index.col] = regions


def decode_region_batches(
    decode: Callable[[list[torch.Tensor], torch.Tensor | None], torch.Tensor],
    batches: Iterable[tuple[RegionIndex, Sequence[torch.Tensor]]],
    context: torch.Tensor | None,
) -> Iterator[tuple[RegionIndex, torch.Tensor]]:
    """The per-region decode loop: each batch of regions `(index, stage maps (n, C_s, h_s, w_s))` through `decode`
    with its own context tokens, cut out of `context` `(batch, D, rows·h, cols·w)` (None without a context
    encoder), as `(index, outputs (n, ...))`. The models feed it regions cut from their stitched stages; the
    engine feeds it the region loop's batches of a scene on disk and a view of the scene's tokens."""
    for index, stage_maps in batches:
        yield index, decode(list(stage_maps), None if context is None else nested_tokenize(context, index))


def region_batches(
    batch: int, rows: int, cols: int, batch_size: int | None, *, order: torch.Tensor | None = None
) -> Iterator[RegionIndex]:
    """The regions of `batch` images of `rows × cols` regions, `batch_size` at a time (all at once for None):
    image-major then row-major, or in the flat `order` given (a subset is allowed)."""
    order = torch.arange(batch * rows * cols) if order is None else order
    step = batch_size or max(len(order), 1)
    for start in range(0, len(order), step):
        yield RegionIndex(*region_index(order[start : start + step], rows, cols), rows, cols)


def stitch_batches(batches: Iterable[tuple[RegionIndex, Sequence[torch.Tensor]]], batch: int, rows: int, cols: int
                   ) -> list[torch.Tensor]:
    """Every batch of regions' maps `(index, (n, C_s, h_s, w_s) per stage)` written into one stitched
    `(batch, C_s, rows·h_s, cols·w_s)` grid per stage, allocated from the first batch's shapes: the one stitching
    step of the region encoder, the decoders and the engine."""
    stitched = None
    for index, maps in batches:
        if stitched is None:
            stitched = [m.new_empty(batch, m.shape[1], rows * m.shape[2], cols * m.shape[3]) for m in maps]
        for grid, regions in zip(stitched, maps):
            stitch_regions(grid, index, regions)
    return stitched
