"""CenterNet-style dense detection for xT: per-region maps, their peaks, the merge across regions, and the loss.

A region's dense maps `(n, num_labels + 4, R/s, R/s)` (`s = decoder_output_stride`) hold, per output cell:

- channels `[0, num_labels)`: class heatmap **logits** (`sigmoid` gives the probability that an object of that class
  is centred in the cell);
- channels `num_labels, num_labels + 1`: box **width, height in output cells** (multiply by `s` for pixels; read
  clamped at 0);
- channels `num_labels + 2, num_labels + 3`: the centre's **offset x, y in output cells** from the cell's top-left
  corner (in [0, 1) when trained), so a centre at pixel `(cx, cy)` sits in cell `(⌊cx/s⌋, ⌊cy/s⌋)` with offset
  `(cx/s − ⌊cx/s⌋, cy/s − ⌊cy/s⌋)`.

`detections_from_dense_maps` turns each region's maps into boxes on its own (3×3 max-pool peaks inside the region),
and `merge_region_detections` shifts the regions' boxes onto the image and merges them with class-wise NMS. The
in-memory model and a region-by-region (streaming) engine call the same two functions, so they agree exactly.

Shipped as Hub remote code with the model: torch, and torchvision (guarded: only detection needs it) for the box
operations: `box_convert`, `clip_boxes_to_image` and `batched_nms`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torchvision.ops import batched_nms, box_convert, clip_boxes_to_image
except ImportError:  # torchvision is optional for the rest of the model
    batched_nms = box_convert = clip_boxes_to_image = None

HEATMAP_PRIOR = 0.1  # CenterNet: the heatmap bias starts at -log((1 - 0.1) / 0.1) ≈ -2.19
HEATMAP_BIAS_INIT = -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR)
GAUSSIAN_MIN_OVERLAP = 0.7  # CenterNet's radius: a box moved by it still overlaps the target with IoU ≥ 0.7
FOCAL_ALPHA, FOCAL_BETA = 2.0, 4.0  # CenterNet's penalty-reduced focal loss exponents


class XTHeatmapLogits(nn.Conv2d):
    """The heatmap branch's last 1×1 convolution; its bias starts at CenterNet's prior (`HEATMAP_BIAS_INIT`, set by
    `XTPreTrainedModel._init_weights`), so that every cell starts at p = 0.1 and the focal loss starts stable."""

    bias_init = HEATMAP_BIAS_INIT


class XTCenterNetHead(nn.Module):
    """Decoder features `(n, C, h, w)` → dense maps `(n, num_labels + 4, h, w)`: heatmap logits, size (w, h),
    offset (x, y); each branch `conv3×3 → GELU → conv1×1`, per cell (no normalisation, so regions never mix)."""

    def __init__(self, in_channels: int, num_labels: int):
        super().__init__()

        def branch(out_channels: int, output: type[nn.Conv2d] = nn.Conv2d) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(in_channels, in_channels, 3, padding=1), nn.GELU(),
                                 output(in_channels, out_channels, 1))

        self.heatmap = branch(num_labels, XTHeatmapLogits)
        self.size = branch(2)
        self.offset = branch(2)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.heatmap(hidden_states), self.size(hidden_states), self.offset(hidden_states)], dim=1)


class XTRegionClassPrior(nn.Linear):
    """A region's deepest fused tokens → one logit per class, added to every heatmap cell of the region.

    Why: a small object's class can depend on the scene rather than on its own pixels, and the U-Net reaches the
    heatmap from the tokens it fuses at its deepest stage only through every decoder block, so the context tokens
    can tell the classes apart long before the heatmap does (docs/detection.md has the runs). A linear map from
    those same tokens (context-encoded, or the region encoder's own without a context encoder) straight to the
    class logits gives that information a one-layer path.
    It is zero-initialised (`XTPreTrainedModel._init_weights`), so a new detector starts as the plain CenterNet head,
    and it keeps a region's maps a function of its own pixels and context tokens.
    """

    def forward(self, heatmap_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Heatmap logits `(n, num_labels, h, w)` plus the prior of the regions' tokens `(n, D, h', w')`."""
        prior = F.linear(tokens.mean(dim=(-2, -1)).to(self.weight.dtype), self.weight, self.bias)
        return heatmap_logits + prior.to(heatmap_logits.dtype)[:, :, None, None]


def _require_torchvision(task: str) -> None:
    if batched_nms is None:
        raise ImportError(f"{task} needs torchvision (torchvision.ops): pip install torchvision.")


def detections_from_dense_maps(
    maps: torch.Tensor, *, stride: int, threshold: float, max_detections: int
) -> list[dict[str, torch.Tensor]]:
    """Each region's detections from its dense maps, looking at that region only.

    Args:
        maps (`torch.Tensor` of shape `(n, num_labels + 4, h, w)`): dense maps of `n` regions (see the module
            docstring for the channels and units).
        stride (`int`): pixels per output cell (`config.decoder_output_stride`).
        threshold (`float`): keep peaks whose score (`sigmoid` of the heatmap logit) is above it.
        max_detections (`int`): at most this many detections per region, the highest scores.

    Returns:
        One dict per region: `scores` `(k,)` float, `labels` `(k,)` long, `boxes` `(k, 4)` float: absolute
        `x1, y1, x2, y2` in pixels relative to the region's top-left corner; sorted by decreasing score. A peak is a
        cell whose score equals the maximum of its 3×3 neighbourhood within the region (the region's border is
        not compared with its neighbour's cells).
    """
    if maps.dim() != 4 or maps.shape[1] < 5:
        raise ValueError(f"maps must be (n, num_labels + 4, h, w) with num_labels ≥ 1, got {tuple(maps.shape)}.")
    _require_torchvision("Reading boxes from the dense maps")
    maps = maps.detach().float()
    num_labels, height, width = maps.shape[1] - 4, maps.shape[2], maps.shape[3]
    scores = maps[:, :num_labels].sigmoid()
    peaks = scores == F.max_pool2d(scores, kernel_size=3, stride=1, padding=1)
    scores = scores.where(peaks, torch.zeros((), dtype=scores.dtype, device=scores.device)).flatten(1)
    k = min(max_detections, scores.shape[1])
    top_scores, top_index = scores.topk(k, dim=1) if k > 0 else (scores[:, :0], scores[:, :0].long())
    cells = height * width
    detections = []
    for region in range(maps.shape[0]):
        keep = top_scores[region] > threshold
        region_scores, index = top_scores[region][keep], top_index[region][keep]
        labels, cell = index // cells, index % cells
        row, col = cell // width, cell % width
        size = maps[region, num_labels : num_labels + 2].flatten(1)[:, cell].clamp(min=0)
        offset = maps[region, num_labels + 2 : num_labels + 4].flatten(1)[:, cell]
        centre_x, centre_y = col.to(maps.dtype) + offset[0], row.to(maps.dtype) + offset[1]
        boxes = box_convert(torch.stack([centre_x, centre_y, size[0], size[1]], dim=-1), "cxcywh", "xyxy") * stride
        detections.append({"scores": region_scores, "labels": labels, "boxes": boxes})
    return detections


def merge_region_detections(
    region_detections: Sequence[Mapping[str, torch.Tensor]],
    region_origins: Sequence[tuple[int, int]],
    *,
    iou_threshold: float,
    max_detections: int,
    image_size: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """One image's detections from its regions' (`detections_from_dense_maps`), merged across region borders.

    Each region's boxes move by its origin `(x, y)` (the pixel of its top-left corner in the image). With
    `image_size` `(height, width)`, detections centred outside the image (in the padding) are dropped and boxes are
    clipped to it. Class-wise NMS (`torchvision.ops.batched_nms`, IoU above `iou_threshold` suppressed) then removes
    the duplicates that neighbouring regions report for an object crossing their border, and the `max_detections`
    best are kept, by decreasing score. A streaming engine calling this with the same regions in the same order gets
    the in-memory model's result exactly.

    Returns:
        `{"scores": (k,), "labels": (k,), "boxes": (k, 4)}`, boxes absolute `x1, y1, x2, y2` in image pixels.
    """
    if len(region_detections) != len(region_origins):
        raise ValueError(f"Got {len(region_detections)} regions' detections but {len(region_origins)} origins.")
    if not region_detections:
        return {"scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    device = region_detections[0]["boxes"].device
    counts = torch.tensor([len(d["boxes"]) for d in region_detections])
    shifts = torch.tensor([[x, y, x, y] for x, y in region_origins], dtype=torch.float32).repeat_interleave(counts, 0)
    boxes = torch.cat([d["boxes"].to(device) for d in region_detections]) + shifts.to(device)
    scores = torch.cat([d["scores"].to(device) for d in region_detections])
    labels = torch.cat([d["labels"].to(device) for d in region_detections])
    _require_torchvision("Merging detections across regions")
    if image_size is not None:
        height, width = image_size
        centre_x, centre_y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        inside = (centre_x >= 0) & (centre_x < width) & (centre_y >= 0) & (centre_y < height)
        boxes = clip_boxes_to_image(boxes[inside], (height, width))
        scores, labels = scores[inside], labels[inside]
    keep = batched_nms(boxes.float(), scores.float(), labels, iou_threshold)[:max_detections]
    return {"scores": scores[keep], "labels": labels[keep], "boxes": boxes[keep]}


def check_detection_labels(labels, batch_size: int, num_labels: int, device=None) -> list[dict[str, torch.Tensor]]:
    """transformers' detection labels, checked: a list of `batch_size` dicts with `class_labels` `(m,)` integers in
    `[0, num_labels)` and `boxes` `(m, 4)` normalised `cx, cy, w, h` in [0, 1] with positive sizes. Returns them as
    `{"class_labels": long, "boxes": float32}` tensors on `device`; a problem raises `ValueError` naming it."""
    if isinstance(labels, Mapping) or not isinstance(labels, Sequence):
        raise ValueError(
            f"labels must be a list with one dict per image ({{'class_labels': (m,), 'boxes': (m, 4)}}), got "
            f"{type(labels).__name__}."
        )
    if len(labels) != batch_size:
        raise ValueError(f"labels has {len(labels)} entries but the batch has {batch_size} images.")
    checked = []
    for image, target in enumerate(labels):
        if not isinstance(target, Mapping) or "class_labels" not in target or "boxes" not in target:
            raise ValueError(
                f"labels[{image}] must be a dict with 'class_labels' and 'boxes', got "
                f"{sorted(target) if isinstance(target, Mapping) else type(target).__name__}."
            )
        classes = torch.as_tensor(target["class_labels"], device=device)
        boxes = torch.as_tensor(target["boxes"], device=device)
        if classes.numel() == 0 and boxes.numel() == 0:  # an image without objects, however its empties are shaped
            classes, boxes = classes.reshape(0).long(), boxes.reshape(0, 4)
        if classes.dim() != 1 or (classes.numel() and (classes.is_floating_point() or classes.is_complex())):
            raise ValueError(f"labels[{image}]['class_labels'] must be (m,) integers, got {classes.dtype} of shape "
                             f"{tuple(classes.shape)}.")
        if boxes.dim() != 2 or boxes.shape[1] != 4 or boxes.shape[0] != classes.shape[0]:
            raise ValueError(f"labels[{image}]['boxes'] must be (m, 4) = ({classes.shape[0]}, 4) for its "
                             f"{classes.shape[0]} class labels, got {tuple(boxes.shape)}.")
        boxes = boxes.float()
        if not torch.isfinite(boxes).all():
            raise ValueError(f"labels[{image}]['boxes'] contains NaN or infinite values.")
        if ((boxes < 0) | (boxes > 1)).any():
            raise ValueError(f"labels[{image}]['boxes'] has values outside [0, 1]: boxes must be normalised "
                             f"(cx, cy, w, h) relative to the image size (min {boxes.min():g}, max {boxes.max():g}).")
        if (boxes[:, 2:] <= 0).any():
            raise ValueError(f"labels[{image}]['boxes'] has boxes with non-positive width or height.")
        if ((classes < 0) | (classes >= num_labels)).any():
            raise ValueError(f"labels[{image}]['class_labels'] must be in [0, {num_labels}) (num_labels), got "
                             f"values from {int(classes.min())} to {int(classes.max())}.")
        checked.append({"class_labels": classes.long(), "boxes": boxes})
    return checked


def gaussian_radius(
    width: torch.Tensor, height: torch.Tensor, min_overlap: float = GAUSSIAN_MIN_OVERLAP
) -> torch.Tensor:
    """Largest corner displacement that keeps a `width × height` box's IoU with itself ≥ `min_overlap`, over
    CenterNet's three cases (box moved diagonally, shrunk, grown), each a root of a quadratic in the radius."""
    total, area, o = width + height, width * height, min_overlap
    moved = (total - (total**2 - 4 * area * (1 - o) / (1 + o)).clamp(min=0).sqrt()) / 2
    shrunk = (2 * total - (4 * total**2 - 16 * (1 - o) * area).clamp(min=0).sqrt()) / 8
    grown = (-2 * o * total + (4 * o**2 * total**2 + 16 * o * (1 - o) * area).sqrt()) / (8 * o)
    return torch.minimum(torch.minimum(moved, shrunk), grown).clamp(min=0)


def centernet_targets(
    targets: list[dict[str, torch.Tensor]], num_labels: int, map_size: tuple[int, int],
    image_size: tuple[int, int], stride: int,
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """The Gaussian-splatted heatmap `(batch, num_labels, h, w)` (1 at each object's centre cell, the maximum where
    objects of a class overlap) and, per image, the centre cells with their size and offset targets (output cells)."""
    height, width = map_size
    image_height, image_width = image_size
    device = targets[0]["boxes"].device if targets else None
    heatmap = torch.zeros(len(targets), num_labels, height, width, device=device)
    ys = torch.arange(height, device=device, dtype=torch.float32).view(1, -1, 1)
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, -1)
    centres = []
    for image, target in enumerate(targets):
        boxes = target["boxes"]
        centre_x, centre_y = boxes[:, 0] * image_width / stride, boxes[:, 1] * image_height / stride
        size = torch.stack([boxes[:, 2] * image_width / stride, boxes[:, 3] * image_height / stride], dim=-1)
        col = centre_x.floor().long().clamp(0, width - 1)
        row = centre_y.floor().long().clamp(0, height - 1)
        offset = torch.stack([centre_x - col, centre_y - row], dim=-1)
        sigma = ((2 * gaussian_radius(size[:, 0], size[:, 1]) + 1) / 6).view(-1, 1, 1)
        for start in range(0, len(boxes), 64):  # bounded memory: 64 objects' full-map Gaussians at a time
            part = slice(start, start + 64)
            distance = (xs - col[part].view(-1, 1, 1)) ** 2 + (ys - row[part].view(-1, 1, 1)) ** 2
            gaussians = torch.exp(-distance / (2 * sigma[part] ** 2))
            classes = target["class_labels"][part].view(-1, 1, 1).expand_as(gaussians)
            heatmap[image].scatter_reduce_(0, classes, gaussians, "amax")
        centres.append({"row": row, "col": col, "size": size, "offset": offset})
    return heatmap, centres


def centernet_focal_loss(logits: torch.Tensor, heatmap: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced pixel-wise focal loss, summed and divided by the number of object centres (at
    least 1, so images without objects train on negatives alone). Computed from logits, stably."""
    logits = logits.float()
    probability = logits.sigmoid()
    positive = heatmap == 1
    positive_loss = F.logsigmoid(logits) * (1 - probability) ** FOCAL_ALPHA
    negative_loss = F.logsigmoid(-logits) * probability**FOCAL_ALPHA * (1 - heatmap) ** FOCAL_BETA
    loss = positive_loss.where(positive, negative_loss)
    return -loss.sum() / positive.sum().clamp(min=1)


def centernet_loss(
    maps: torch.Tensor, targets: list[dict[str, torch.Tensor]], *, image_size: tuple[int, int], stride: int,
    weights: tuple[float, float, float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of dense maps `(batch, num_labels + 4, h, w)` covering an image of `image_size` against checked labels:
    focal loss on the heatmap, L1 on size and offset at object centres (per object). Returns the weighted sum and
    the unweighted parts `{"loss_heatmap", "loss_size", "loss_offset"}`."""
    num_labels = maps.shape[1] - 4
    heatmap, centres = centernet_targets(targets, num_labels, tuple(maps.shape[-2:]), image_size, stride)
    heatmap_loss = centernet_focal_loss(maps[:, :num_labels], heatmap)
    size_loss = maps.new_zeros((), dtype=torch.float32)
    offset_loss = maps.new_zeros((), dtype=torch.float32)
    for image, centre in enumerate(centres):
        cells = maps[image, num_labels:, centre["row"], centre["col"]].float().T  # (m, 4)
        size_loss = size_loss + (cells[:, :2] - centre["size"]).abs().sum()
        offset_loss = offset_loss + (cells[:, 2:] - centre["offset"]).abs().sum()
    count = max(sum(len(centre["row"]) for centre in centres), 1)
    parts = {"loss_heatmap": heatmap_loss, "loss_size": size_loss / count, "loss_offset": offset_loss / count}
    loss = sum(weight * part for weight, part in zip(weights, parts.values()))
    return loss, parts


__all__ = [
    "XTCenterNetHead",
    "XTHeatmapLogits",
    "centernet_loss",
    "check_detection_labels",
    "detections_from_dense_maps",
    "merge_region_detections",
]
