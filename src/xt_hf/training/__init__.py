"""Fine-tuning xT: settings (`arguments`), data (`data`, `segmentation_data`), tasks (`tasks`), the Accelerate
loop (`loop`), metrics (`evaluation`, and the `evaluate` metric scripts in `metrics/`), the command (`command`).

    from xt_hf.training import TrainConfig, train
    metrics = train(TrainConfig.from_dict({"model": "config.json", "dataset": "data/", "max_steps": 100}))
"""

from .arguments import TrainConfig, apply_overrides, config_from_arguments, parse_args, read_config_file
from .data import (
    BadSampleError,
    RegionPaddingCollator,
    XTTransform,
    dataset_label_names,
    find_image_column,
    has_named_labels,
    infer_id2label,
    load_splits,
    prepare_dataset,
)
from .evaluation import (
    compute_metrics,
    compute_segmentation_metrics,
    confusion_matrix,
    logits_to_class_maps,
    mean_iou,
    metrics_from_confusion,
    segmentation_predictions,
    top_k_accuracy,
)
from .loop import TrainingProgress, save_checkpoint, save_model, train
from .metrics import ACCURACY, MEAN_IOU
from .segmentation_data import SegmentationPaddingCollator, XTSegmentationTransform, prepare_segmentation_dataset
from .tasks import ClassificationTask, SegmentationTask, make_task, parameter_groups

__all__ = [
    "ACCURACY",
    "MEAN_IOU",
    "BadSampleError",
    "ClassificationTask",
    "RegionPaddingCollator",
    "SegmentationPaddingCollator",
    "SegmentationTask",
    "TrainConfig",
    "TrainingProgress",
    "XTSegmentationTransform",
    "XTTransform",
    "apply_overrides",
    "compute_metrics",
    "compute_segmentation_metrics",
    "config_from_arguments",
    "confusion_matrix",
    "dataset_label_names",
    "find_image_column",
    "has_named_labels",
    "infer_id2label",
    "load_splits",
    "logits_to_class_maps",
    "make_task",
    "mean_iou",
    "metrics_from_confusion",
    "parameter_groups",
    "parse_args",
    "prepare_dataset",
    "prepare_segmentation_dataset",
    "read_config_file",
    "save_checkpoint",
    "save_model",
    "segmentation_predictions",
    "top_k_accuracy",
    "train",
]
