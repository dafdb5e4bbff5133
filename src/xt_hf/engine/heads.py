"""What the whole-scene engine asks of a task model, and the tasks it runs through one driver (`scene.run_scene`).

A head either answers for the whole image from the context encoding (classification), or answers per
region from that region's own features and its context tokens (segmentation, detection). The driver encodes
the scene once, then hands a task the encoding and, lazily, every region's head outputs; a task is a small
object that says which head it needs and what it makes of them (`ClassifyScene`, `DecodeRegions`,
`SegmentScene`, `DetectObjects`). A new task needs no driver change, only one of these.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from ..modeling_xt import XTModelOutput
from ..nested_tokenization import RegionIndex, region_grid_shape
from .writers import CLASS_MAP_SUFFIXES, check_output_path, write_class_map

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
    """One task over one scene: the head it needs, and its answer from the context encoding and every region's
    head outputs (`regions`, row-major, computed only if read: a second pass over the scene)."""

    needs: type
    name: str

    def answer(self, model, encoded: XTModelOutput, regions: Regions, image_size: tuple[int, int]): ...


class ClassifyScene:
    """Whole-image logits `(1, num_labels)` from the context encoding."""

    needs, name = ContextHead, "Whole-image prediction"

    def answer(self, model, encoded, regions, image_size) -> torch.Tensor:
        return model.logits_from_context(encoded)


class DecodeRegions:
    """Every region's head outputs as they come, each with its place."""

    needs, name = RegionHead, "Region-by-region decoding"

    def answer(self, model, encoded, regions, image_size) -> Regions:
        return regions


class SegmentScene:
    """The argmax of every region's logits written into a class map on disk (`write_class_map`): `.zarr` or tiled
    `.tif`, uint8 (uint16 beyond 256 classes), at `1 / decoder_output_stride`; the output is checked when the task
    is made, before any work. Answers the map's `(height, width)`."""

    needs, name = RegionHead, "Segmentation"

    def __init__(self, model, output, *, overwrite: bool = False):
        self.output = check_output_path(output, suffixes=CLASS_MAP_SUFFIXES, overwrite=overwrite)
        self.stride = model.config.decoder_output_stride
        self.side = model.config.region_size // self.stride
        if self.output.suffix.lower() != ".zarr" and self.side % 16:
            raise ValueError(f"Tiled TIFF tiles must be multiples of 16 px; region_size / stride is {self.side}: "
                             f"use .zarr.")

    def answer(self, model, encoded, regions, image_size) -> tuple[int, int]:
        shape = region_grid_shape(*image_size, self.stride)
        dtype = np.uint8 if model.config.num_labels <= 256 else np.uint16
        tiles = (
            (row, col, mask)
            for index, logits in regions
            for row, col, mask in zip(index.row.tolist(), index.col.tolist(),
                                      logits.argmax(dim=1).cpu().numpy().astype(dtype))
        )
        write_class_map(self.output, tiles, shape=shape, tile_side=self.side, dtype=dtype)
        return shape


class DetectObjects:
    """`{"scores", "labels", "boxes"}` of the whole scene, boxes absolute x1, y1, x2, y2 in the image's pixels: each
    region's detections found as it is decoded (`region_detections`, with `threshold` instead of the config's if
    given), only those small lists kept, merged across borders at the end (`merge_detections`)."""

    needs, name = DetectionHead, "Detection"

    def __init__(self, threshold: float | None = None):
        self.threshold = threshold

    def answer(self, model, encoded, regions, image_size) -> dict[str, torch.Tensor]:
        found, origins = [], []
        for index, maps in regions:
            for _, detections, origin in model.region_detections(index, maps, self.threshold):
                found.append(detections)
                origins.append(origin)
        return model.merge_detections(found, origins, image_size)
