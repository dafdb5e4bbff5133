"""Metrics during training and in `transformers.Trainer`, computed with the packaged `evaluate` metrics'
own functions (`xt_hf/training/metrics/`), so that a number logged here is the number
`evaluate.load(<metric folder>).compute(...)` gives on the same predictions:

- top-1 accuracy is `accuracy_score` of the `accuracy` metric on the argmax predictions; top-5 is added here;
- segmentation metrics are `metrics_from_confusion` of the `mean_iou` metric, on a confusion matrix counted
  here with torch, on the device and per image (so that `gather_for_metrics` can drop duplicated samples and
  no process has to hold every pixel of the eval split).

    metrics = compute_metrics(EvalPrediction(logits, labels))                               # top1 / top5
    metrics = compute_segmentation_metrics(EvalPrediction(class_maps, masks), num_labels=3)  # mean IoU
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .metrics.accuracy.accuracy import accuracy_score
from .metrics.mean_iou.mean_iou import metrics_from_confusion as _metrics_from_confusion


def _as_tensor(values: np.ndarray | torch.Tensor | Sequence) -> torch.Tensor:
    return values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))


def top_k_accuracy(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, k: int = 1) -> float:
    """Fraction of samples whose label is among the `k` highest logits. `logits` `(n, classes)`, `labels` `(n,)`.

    `k` = 1 is the `accuracy` metric of the argmax. `k` larger than the number of classes counts every sample as
    correct (as top-5 on a 4-class task would).
    """
    logits, labels = _as_tensor(logits).float(), _as_tensor(labels).long()
    if len(labels) == 0:
        return float("nan")
    if k == 1:
        return accuracy_score(logits.argmax(dim=-1).cpu().numpy(), labels.cpu().numpy())
    top = logits.topk(min(k, logits.shape[-1]), dim=-1).indices
    return (top == labels[:, None]).any(dim=-1).float().mean().item()


def compute_metrics(eval_prediction) -> dict[str, float]:
    """`Trainer`'s `compute_metrics`: top-1 (the packaged `accuracy` metric) and top-5 from an `EvalPrediction`."""
    logits = eval_prediction.predictions
    if isinstance(logits, tuple):
        logits = logits[0]
    labels = eval_prediction.label_ids
    return {"top1": top_k_accuracy(logits, labels, 1), "top5": top_k_accuracy(logits, labels, 5)}


def logits_to_class_maps(logits: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Segmentation logits `(batch, classes, h, w)` → class maps `(batch, H, W)`, upsampled (bilinear, as the
    model's loss does) to `size` when the logits are at a coarser stride (`decoder_output_stride > 1`)."""
    if size is not None and tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)


def confusion_matrix(
    predictions: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    num_labels: int,
    ignore_index: int = 255,
    *,
    per_sample: bool = False,
) -> torch.Tensor:
    """Pixel counts `(num_labels, num_labels)`, `[true class, predicted class]`, over pixels whose label is a
    class (not `ignore_index`, not negative: Trainer pads with -100), on the predictions' device. With
    `per_sample`, one matrix per image of the batch, `(batch, num_labels, num_labels)`, so that duplicated
    samples can be dropped after a gather. The torch twin of the `mean_iou` metric's `confusion_matrix`.

    A labelled pixel predicted outside `[0, num_labels)` is an error.
    """
    predictions = _as_tensor(predictions)
    labels = _as_tensor(labels).to(predictions.device)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape.")
    predictions, labels = predictions.long(), labels.long()
    labelled = (labels != ignore_index) & (labels >= 0)
    if (labels[labelled] >= num_labels).any():
        raise ValueError(f"labels hold ids ≥ num_labels ({num_labels}) other than ignore_index ({ignore_index}).")
    if ((predictions[labelled] < 0) | (predictions[labelled] >= num_labels)).any():
        raise ValueError(f"predictions hold ids outside [0, {num_labels}) at labelled pixels.")
    cells = num_labels * num_labels
    code = labels * num_labels + predictions
    if not per_sample:
        return torch.bincount(code[labelled], minlength=cells).reshape(num_labels, num_labels)
    batch = labels.shape[0]
    sample = torch.arange(batch, device=labels.device).view(-1, *([1] * (labels.dim() - 1))).expand_as(labels)
    code = sample * cells + code
    return torch.bincount(code[labelled], minlength=batch * cells).reshape(batch, num_labels, num_labels)


def metrics_from_confusion(confusion: np.ndarray | torch.Tensor) -> dict[str, Any]:
    """`mean_iou`, `mean_accuracy`, `overall_accuracy`, `per_category_iou` and `per_category_accuracy` from a
    `[true, predicted]` confusion matrix: the packaged `mean_iou` metric's own computation."""
    if isinstance(confusion, torch.Tensor):
        confusion = confusion.cpu().numpy()
    return _metrics_from_confusion(confusion)


def mean_iou(
    predictions: np.ndarray | torch.Tensor | Sequence,
    references: np.ndarray | torch.Tensor | Sequence,
    num_labels: int,
    ignore_index: int = 255,
) -> dict[str, Any]:
    """Mean IoU over a dataset, as `evaluate.load(str(MEAN_IOU)).compute(...)` gives it, without `evaluate`'s
    Arrow round trip. `predictions` and `references` are class maps: one `(batch, H, W)` array or a sequence
    of `(H_i, W_i)` maps of any sizes."""
    if isinstance(predictions, np.ndarray | torch.Tensor):
        predictions, references = [predictions], [references]
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)
    for prediction, reference in zip(predictions, references):
        confusion += confusion_matrix(prediction, reference, num_labels, ignore_index).cpu()
    return metrics_from_confusion(confusion)


def segmentation_results(metrics: Mapping[str, Any], id2label: Mapping[int, str] | None, prefix: str = "",
                         pixel_accuracy_key: str = "overall_accuracy") -> dict[str, float]:
    """Scalar results for loggers: `mean_iou`, `mean_accuracy`, overall accuracy (under `pixel_accuracy_key`)
    and one `iou_<class name>` per class, each key with `prefix`."""
    result = {f"{prefix}mean_iou": metrics["mean_iou"], f"{prefix}mean_accuracy": metrics["mean_accuracy"],
              f"{prefix}{pixel_accuracy_key}": metrics["overall_accuracy"]}
    for index, iou in enumerate(metrics["per_category_iou"]):
        name = id2label.get(index, str(index)) if id2label else str(index)
        result[f"{prefix}iou_{metric_name(str(name))}"] = float(iou)
    return result


def compute_segmentation_metrics(
    eval_prediction,
    *,
    num_labels: int | None = None,
    ignore_index: int = 255,
    id2label: Mapping[int, str] | None = None,
) -> dict[str, float]:
    """`Trainer`'s `compute_metrics` for segmentation: `mean_iou`, `mean_accuracy`, `overall_accuracy` and one
    `iou_<class>` per class (scalars, so that every logger takes them).

    Predictions are logits `(n, classes, h, w)` or, better, class maps `(n, H, W)` from
    `preprocess_logits_for_metrics=segmentation_predictions` (the Trainer then keeps one integer per pixel
    instead of every logit). Bind the settings with `functools.partial(compute_segmentation_metrics,
    num_labels=..., ignore_index=...)`; `num_labels` is read off logits when not given.
    """
    predictions = eval_prediction.predictions
    if isinstance(predictions, tuple):
        predictions = predictions[0]
    labels = _as_tensor(eval_prediction.label_ids)
    predictions = _as_tensor(predictions)
    if predictions.dim() == labels.dim() + 1:  # logits
        num_labels = num_labels or predictions.shape[1]
        predictions = logits_to_class_maps(predictions, labels.shape[-2:])
    if num_labels is None:
        raise ValueError("Pass num_labels to compute_segmentation_metrics when predictions are class maps.")
    metrics = metrics_from_confusion(confusion_matrix(predictions, labels, num_labels, ignore_index))
    return segmentation_results(metrics, id2label)


def segmentation_predictions(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """`Trainer`'s `preprocess_logits_for_metrics`: per-batch logits → class maps at the labels' size."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits_to_class_maps(logits, labels.shape[-2:])


def metric_name(name: str) -> str:
    """A class name as a metric-key suffix: "near-shore vessel" → "near_shore_vessel"."""
    return re.sub(r"\W+", "_", name).strip("_") or "class"


__all__ = [
    "compute_metrics",
    "compute_segmentation_metrics",
    "confusion_matrix",
    "logits_to_class_maps",
    "mean_iou",
    "metric_name",
    "metrics_from_confusion",
    "segmentation_predictions",
    "segmentation_results",
    "top_k_accuracy",
]
