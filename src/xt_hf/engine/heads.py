"""What the whole-scene engine asks of a task model, and the tasks it runs through one driver (`scene.run_scene`).

A head either answers for the whole image from the context encoding (classification), or answers per
region from that region's own features and its context tokens (segmentation, detection). The driver encodes
the scene once, then hands a task the encoding, lazily every region's head outputs, and the scene's source (its
size, where it lies on the Earth, which of its pixels hold data); a task is a small object that says which head it
needs and what it makes of them (`ClassifyScene`, `DecodeRegions`, `SegmentScene`, `DetectObjects`). A new task
needs no driver change, only one of these.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..modeling_xt import XTModelOutput
from ..nested_tokenization import RegionIndex, region_grid_shape
from .sources import RegionSource
from .writers import CLASS_MAP_SUFFIXES, check_output_path, class_map_dtype, map_georeference, write_class_map

Regions = Iterator[tuple[RegionIndex, torch.Tensor]]


@runtime_checkable
class ContextHead(Protocol):
    """A head that reads the whole scene's context encoding (the pooled state, the tokens)."""

    def logits_from_context(self, encoded: XTModelOutput) -> torch.Tensor:
        """`(batch, ...)` outputs from the context encoding alone."""


@runtime_checkable
class RegionHead(Protocol):
    """A head whose output for a region depends only on that region's features and its context tokens."""

    def context_grid(self, tokens: torch.Tensor, grid_shape: tuple[int, int]) -> torch.Tensor | None:
        """Context tokens `(batch, H·W, D)` on the grid: `(batch, D, H, W)` (a view), None without a context encoder."""

    def decode_regions(self, stage_features: list[torch.Tensor], context: torch.Tensor | None) -> torch.Tensor:
        """Regions' stage maps `(n, C_s, h_s, w_s)` and context tokens `(n, D, h, w)` → `(n, ...)` outputs."""


@runtime_checkable
class DetectionHead(RegionHead, Protocol):
    """A region head whose outputs are dense maps of objects, found per region and merged across borders."""

    def region_detections(self, index: RegionIndex, maps: torch.Tensor, threshold: float | None = None):
        """`(image, detections, origin)` of each region of a batch."""

    def merge_detections(self, region_detections, region_origins, image_size) -> dict[str, torch.Tensor]:
        """The regions' detections merged across borders."""


_NEEDS = {
    ContextHead: "a whole-image head (an image classifier)",
    RegionHead: "a per-region head (a segmenter or detector)",
    DetectionHead: "an object detector (XTForObjectDetection)",
}


def require_head(model, kind: type, task: str) -> None:
    """Fail, naming the model and what the task needs, when `model` lacks the `kind` of head."""
    if not isinstance(model, kind):
        raise ValueError(f"{task} needs {_NEEDS[kind]}; {type(model).__name__} has none.")


class SceneTask(Protocol):
    """One task over one scene: the head it needs, and its answer from the context encoding, every region's head
    outputs (`regions`, row-major, computed only if read: a second pass over the scene) and the scene's `source`
    (`height`, `width`; optionally `georeference` and `valid`, looked up with getattr)."""

    needs: type
    name: str

    def answer(self, model, encoded: XTModelOutput, regions: Regions, source: RegionSource): ...


class ClassifyScene:
    """Whole-image logits `(1, num_labels)` from the context encoding."""

    needs, name = ContextHead, "Whole-image prediction"

    def answer(self, model, encoded, regions, source) -> torch.Tensor:
        return model.logits_from_context(encoded)


class DecodeRegions:
    """Every region's head outputs as they come, each with its place."""

    needs, name = RegionHead, "Region-by-region decoding"

    def answer(self, model, encoded, regions, source) -> Regions:
        return regions


class SegmentScene:
    """The argmax of every region's logits written into a class map on disk (`write_class_map`): `.zarr` or tiled
    `.tif`, uint8 (uint16 beyond 255 classes), at `1 / decoder_output_stride`; the output is checked when the task
    is made, before any work. Cells whose scene pixel holds no data (`source.valid` at the cell's centre pixel) get
    the map's no-data value (`class_map_dtype`), never a class. A scene with a georeference gets a Cloud-Optimised
    GeoTIFF in its CRS (or a zarr that records it). Answers the map's `(height, width)`."""

    needs, name = RegionHead, "Segmentation"

    def __init__(self, model, output, *, overwrite: bool = False):
        self.output = check_output_path(output, suffixes=CLASS_MAP_SUFFIXES, overwrite=overwrite)
        self.stride = model.config.decoder_output_stride
        self.side = model.config.region_size // self.stride
        if self.output.suffix.lower() != ".zarr" and self.side % 16:
            raise ValueError(f"Tiled TIFF tiles must be multiples of 16 px; region_size / stride is {self.side}: "
                             f"use .zarr.")

    def answer(self, model, encoded, regions, source) -> tuple[int, int]:
        shape = region_grid_shape(source.height, source.width, self.stride)
        dtype, nodata = class_map_dtype(model.config.num_labels)
        region = model.config.region_size
        tiles = (
            (row, col, self._without_nodata(source, mask, row * region, col * region, nodata))
            for index, logits in regions
            for row, col, mask in zip(index.row.tolist(), index.col.tolist(),
                                      logits.argmax(dim=1).cpu().numpy().astype(dtype))
        )
        georeference = getattr(source, "georeference", None)
        write_class_map(self.output, tiles, shape=shape, tile_side=self.side, dtype=dtype,
                        class_names=[model.config.id2label[i] for i in range(model.config.num_labels)],
                        nodata=nodata,
                        georeference=None if georeference is None else map_georeference(georeference, self.stride,
                                                                                        shape))
        return shape

    def _without_nodata(self, source, tile: np.ndarray, top: int, left: int, nodata: int) -> np.ndarray:
        """`tile` with `nodata` in the cells whose centre pixel (the last row or column where the scene ends inside
        the cell) holds no data."""
        valid = getattr(source, "valid", None)
        valid = None if valid is None else valid(top, left, tile.shape[0] * self.stride, tile.shape[1] * self.stride)
        if valid is None:
            return tile
        rows = np.arange(-(-valid.shape[0] // self.stride)) * self.stride + self.stride // 2
        cols = np.arange(-(-valid.shape[1] // self.stride)) * self.stride + self.stride // 2
        cells = valid[np.ix_(np.minimum(rows, valid.shape[0] - 1), np.minimum(cols, valid.shape[1] - 1))]
        tile = tile.copy()
        tile[: cells.shape[0], : cells.shape[1]][~cells] = nodata
        return tile


class DetectObjects:
    """`{"scores", "labels", "boxes"}` of the whole scene, boxes absolute x1, y1, x2, y2 in the image's pixels: each
    region's detections found as it is decoded (`region_detections`, with `threshold` instead of the config's if
    given), those whose centre pixel holds no data (`source.valid`) dropped, only those small lists kept, merged
    across borders at the end (`merge_detections`)."""

    needs, name = DetectionHead, "Detection"

    def __init__(self, threshold: float | None = None):
        self.threshold = threshold

    def answer(self, model, encoded, regions, source) -> dict[str, torch.Tensor]:
        found, origins = [], []
        for index, maps in regions:
            for _, detections, origin in model.region_detections(index, maps, self.threshold):
                found.append(_with_data_at_centre(source, detections, origin, model.config.region_size))
                origins.append(origin)
        return model.merge_detections(found, origins, (source.height, source.width))


def _with_data_at_centre(source, detections: dict[str, torch.Tensor], origin: tuple[int, int], region: int
                         ) -> dict[str, torch.Tensor]:
    """A region's `detections` (boxes relative to its `origin` `(x, y)`) without those whose centre pixel holds no
    data. A centre may lie just outside its region (a peak's offset crosses the border): that pixel is looked up on
    its own; one beyond the scene's edge is left to `merge_detections`, which drops it."""
    valid = getattr(source, "valid", None)
    if valid is None or not len(detections["scores"]):
        return detections
    left, top = origin
    mask = valid(top, left, region, region)
    if mask is None:
        return detections
    boxes = detections["boxes"].detach().cpu().double()
    cols = torch.floor((boxes[:, 0] + boxes[:, 2]) / 2).long().tolist()
    rows = torch.floor((boxes[:, 1] + boxes[:, 3]) / 2).long().tolist()
    keep = []
    for row, col in zip(rows, cols):
        if 0 <= row < mask.shape[0] and 0 <= col < mask.shape[1]:
            keep.append(bool(mask[row, col]))
        elif 0 <= top + row < source.height and 0 <= left + col < source.width:
            pixel = valid(top + row, left + col, 1, 1)
            keep.append(pixel is None or bool(pixel[0, 0]))
        else:
            keep.append(True)
    if all(keep):
        return detections
    keep = torch.tensor(keep, device=detections["scores"].device)
    return {name: value[keep] for name, value in detections.items()}
