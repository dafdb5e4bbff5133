"""COCO detection metrics for `XTForObjectDetection`, computed by torchmetrics' `MeanAveragePrecision` with the
pycocotools backend (the COCO evaluation itself, not a re-implementation):

- `map` (AP, IoU 0.50:0.95), `map_50` (AP50), `map_75`, `map_small` / `map_medium` / `map_large` (COCO's areas:
  below 32², 32²–96², above 96² px), `mar_100` (AR with 100 detections per image), `ap_<class>` per class;
- `map_agnostic` and `map_50_agnostic`: the same with every class merged into one (and the same box reported under
  two classes counted once: class-agnostic NMS at IoU 0.7), so that finding the boxes is scored apart from naming
  their class.

A metric that has nothing to score (no object of that size in the ground truth) is -1, as COCO reports it.
Boxes are scored in pixels of the frame the model saw (the padded batch, after a `do_resize`), so that the size
ranges mean what COCO means.

    metric = DetectionMeanAP(id2label)
    metric.update(model_detections(outputs.logits, outputs.pred_boxes, frame), target_boxes(labels, frame))
    metric.compute()   # {"map": ..., "map_50": ..., "map_small": ..., "map_50_agnostic": ..., "ap_<class>": ...}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torchvision.ops import box_convert, nms

from .evaluation import metric_name

AGNOSTIC_NMS_IOU = 0.7
SUMMARY_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100")


def _corners_in_frame(boxes: torch.Tensor, frame_size: tuple[int, int]) -> torch.Tensor:
    """Normalised `(cx, cy, w, h)` → `(m, 4)` float32 `x1, y1, x2, y2` in pixels of the `(height, width)` frame."""
    height, width = (int(v) for v in frame_size)
    corners = box_convert(boxes.float().reshape(-1, 4), "cxcywh", "xyxy")
    return corners * corners.new_tensor([width, height, width, height], dtype=torch.float32)


def model_detections(
    logits: torch.Tensor, pred_boxes: torch.Tensor, frame_size: tuple[int, int], threshold: float = 0.0
) -> list[dict[str, torch.Tensor]]:
    """`XTForObjectDetection`'s `(logits, pred_boxes)` → per image `{"boxes": (k, 4) x1y1x2y2 px, "scores",
    "labels"}` (CPU): rows with a finite logit (a detection; the padding rows are `-inf`) scoring above
    `threshold`. `frame_size` is the `(height, width)` of the `pixel_values` the boxes are normalised by."""
    results = []
    for image_logits, image_boxes in zip(_as_tensor(logits), _as_tensor(pred_boxes)):
        image_logits = image_logits.detach().float().cpu()
        best, labels = image_logits.max(dim=-1)
        keep = torch.isfinite(best) & (best.sigmoid() > threshold)
        results.append({"boxes": _corners_in_frame(image_boxes.detach().cpu()[keep], frame_size),
                        "scores": best[keep].sigmoid(), "labels": labels[keep]})
    return results


def target_boxes(labels: Sequence[Mapping[str, Any]], frame_size: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
    """Detection labels (normalised `cx, cy, w, h` in the frame) → per image `{"boxes": (m, 4) x1y1x2y2 px,
    "labels": (m,)}` (CPU)."""
    results = []
    for target in labels:
        results.append({"boxes": _corners_in_frame(_as_tensor(target["boxes"]).detach().cpu(), frame_size),
                        "labels": _as_tensor(target["class_labels"]).detach().cpu().long().reshape(-1)})
    return results


def _as_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


def class_agnostic(prediction: Mapping[str, torch.Tensor], iou_threshold: float = 0.7) -> dict[str, torch.Tensor]:
    """One image's detections as a single class: every label 0, and a box that another box of a higher score covers
    with IoU above `iou_threshold` dropped (class-agnostic NMS), so that the same object reported under two
    classes (a detector unsure of the class puts a peak in both heatmaps) counts once, not once right and once as a
    false positive."""
    keep = nms(prediction["boxes"].float(), prediction["scores"].float(), iou_threshold)
    return {"boxes": prediction["boxes"][keep], "scores": prediction["scores"][keep],
            "labels": torch.zeros_like(prediction["labels"][keep])}


class DetectionMeanAP:
    """COCO mAP of a whole eval split, class-wise and class-agnostic: two torchmetrics `MeanAveragePrecision`
    (`box_format="xyxy"`, `backend="pycocotools"`) fed the same boxes. `update` takes per-image dicts as
    `model_detections` and `target_boxes` give them; `compute` returns plain floats (see the module)."""

    def __init__(self, id2label: Mapping[int, str] | None = None, backend: str = "pycocotools",
                 agnostic_iou: float = AGNOSTIC_NMS_IOU):
        from torchmetrics.detection import MeanAveragePrecision

        self.id2label = {int(k): v for k, v in (id2label or {}).items()}
        self.agnostic_iou = agnostic_iou
        options = dict(box_format="xyxy", iou_type="bbox", backend=backend, sync_on_compute=False)
        self.classwise = MeanAveragePrecision(class_metrics=True, **options)
        self.agnostic = MeanAveragePrecision(**options)

    def update(self, predictions: Sequence[Mapping[str, torch.Tensor]],
               targets: Sequence[Mapping[str, torch.Tensor]]) -> None:
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} images of predictions for {len(targets)} images of targets.")
        predictions = [{"boxes": p["boxes"].float(), "scores": p["scores"].float(), "labels": p["labels"].long()}
                       for p in predictions]
        targets = [{"boxes": t["boxes"].float(), "labels": t["labels"].long()} for t in targets]
        self.classwise.update(predictions, targets)
        self.agnostic.update([class_agnostic(p, self.agnostic_iou) for p in predictions],
                             [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets])

    def compute(self) -> dict[str, float]:
        result = self.classwise.compute()
        metrics = {key: float(result[key]) for key in SUMMARY_KEYS}
        agnostic = self.agnostic.compute()
        metrics["map_agnostic"], metrics["map_50_agnostic"] = float(agnostic["map"]), float(agnostic["map_50"])
        classes = result["classes"].reshape(-1).tolist()
        per_class = result["map_per_class"].reshape(-1).tolist()
        for index in sorted(self.id2label) or classes:
            value = per_class[classes.index(index)] if index in classes else -1.0
            metrics[f"ap_{metric_name(str(self.id2label.get(index, index)))}"] = float(value)
        return metrics


def detection_metrics(
    predictions: Sequence[Mapping[str, torch.Tensor]],
    targets: Sequence[Mapping[str, torch.Tensor]],
    id2label: Mapping[int, str] | None = None,
) -> dict[str, float]:
    """COCO metrics of per-image predictions (`boxes` x1y1x2y2, `scores`, `labels`) against targets (`boxes`,
    `labels`), in pixels: `map`, `map_50`, `map_75`, `map_small`, `map_medium`, `map_large`, `mar_100`,
    `map_agnostic`, `map_50_agnostic`, `ap_<class>`."""
    metric = DetectionMeanAP(id2label)
    metric.update(predictions, targets)
    return metric.compute()


def detection_predictions(logits, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """`Trainer`'s `preprocess_logits_for_metrics` for `XTForObjectDetection`: keep `(logits, pred_boxes)` of the
    outputs (the first two tensors after the loss dict), not the dense maps."""
    tensors = [value for value in (logits if isinstance(logits, tuple | list) else (logits,))
               if isinstance(value, torch.Tensor)]
    return tensors[0], tensors[1]


def compute_detection_metrics(eval_prediction, *, id2label: Mapping[int, str] | None = None) -> dict[str, float]:
    """`Trainer`'s `compute_metrics` for detection, with `TrainingArguments(eval_do_concat_batches=False)` (batches
    of different sizes and per-image label dicts cannot be concatenated) and `preprocess_logits_for_metrics=
    detection_predictions`: COCO metrics as `detection_metrics`. Each batch's frame is read from its labels'
    `frame_size` (set by `DetectionPaddingCollator`)."""
    metric = DetectionMeanAP(id2label)
    for (logits, pred_boxes), labels in zip(eval_prediction.predictions, eval_prediction.label_ids):
        frame = tuple(int(v) for v in _as_tensor(labels[0]["frame_size"]).reshape(-1)[:2])
        metric.update(model_detections(logits, pred_boxes, frame), target_boxes(labels, frame))
    return metric.compute()


__all__ = [
    "DetectionMeanAP",
    "class_agnostic",
    "compute_detection_metrics",
    "detection_metrics",
    "detection_predictions",
    "model_detections",
    "target_boxes",
]
