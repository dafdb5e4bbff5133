"""The `transformers.Trainer` helpers, kept under their old module name; they live in `xt_hf.training`
(`data`, `segmentation_data`, `evaluation`).

    dataset = prepare_dataset(dataset, processor, label2id=label2id)          # set_transform: decode, check, preprocess
    batch = RegionPaddingCollator(region_size)(examples)                     # pad mixed sizes to one region multiple
    metrics = compute_metrics(EvalPrediction(logits, labels))                # top-1 / top-5 accuracy
    dataset = prepare_segmentation_dataset(dataset, processor, num_labels=3)  # (image, mask) pairs
    batch = SegmentationPaddingCollator(region_size)(examples)               # masks padded with the ignore index
    metrics = compute_segmentation_metrics(EvalPrediction(class_maps, masks), num_labels=3)   # mean IoU
"""

from .training.data import (
    SAMPLE_INDEX_COLUMN,
    BadSampleError,
    RegionPaddingCollator,
    XTTransform,
    dataset_label_names,
    find_image_column,
    has_named_labels,
    infer_id2label,
    pad_bottom_right,
    prepare_dataset,
)
from .training.evaluation import (
    compute_metrics,
    compute_segmentation_metrics,
    confusion_matrix,
    logits_to_class_maps,
    mean_iou,
    metrics_from_confusion,
    segmentation_predictions,
    top_k_accuracy,
)
from .training.segmentation_data import (
    SegmentationPaddingCollator,
    XTSegmentationTransform,
    prepare_segmentation_dataset,
)

__all__ = [
    "SAMPLE_INDEX_COLUMN",
    "BadSampleError",
    "RegionPaddingCollator",
    "SegmentationPaddingCollator",
    "XTSegmentationTransform",
    "XTTransform",
    "compute_metrics",
    "compute_segmentation_metrics",
    "confusion_matrix",
    "dataset_label_names",
    "find_image_column",
    "has_named_labels",
    "infer_id2label",
    "logits_to_class_maps",
    "mean_iou",
    "metrics_from_confusion",
    "pad_bottom_right",
    "prepare_dataset",
    "prepare_segmentation_dataset",
    "segmentation_predictions",
    "top_k_accuracy",
]
