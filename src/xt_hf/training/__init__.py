"""Fine-tuning xT: settings (`arguments`), data (`data`, `segmentation_data`, `detection_data`), tasks (`tasks`),
the Accelerate loop (`loop`), metrics (`evaluation`, the `evaluate` metric scripts in `metrics/`, and COCO mAP in
`detection_evaluation`), scores of a saved model on a split (`score`), the command (`command`).

    from xt_hf.training import TrainConfig, train
    metrics = train(TrainConfig.from_dict({"model": "config.json", "dataset": "data/", "max_steps": 100}))
"""

from .arguments import (
    DataArguments,
    ModelArguments,
    OptimizationArguments,
    RunArguments,
    TrainConfig,
    parse_args,
    read_config_file,
)
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
from .detection_data import (
    DetectionPaddingCollator,
    XTDetectionTransform,
    detection_id2label,
    detection_label_names,
    prepare_detection_dataset,
)
from .detection_evaluation import (
    DetectionMeanAP,
    compute_detection_metrics,
    detection_metrics,
    detection_predictions,
    model_detections,
    target_boxes,
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
from .tasks import ClassificationTask, DetectionTask, SegmentationTask, make_task, parameter_groups

__all__ = [
    "ACCURACY",
    "MEAN_IOU",
    "BadSampleError",
    "ClassificationTask",
    "DataArguments",
    "DetectionMeanAP",
    "DetectionPaddingCollator",
    "DetectionTask",
    "ModelArguments",
    "OptimizationArguments",
    "RegionPaddingCollator",
    "RunArguments",
    "SegmentationPaddingCollator",
    "SegmentationTask",
    "TrainConfig",
    "TrainingProgress",
    "XTSegmentationTransform",
    "XTDetectionTransform",
    "XTTransform",
    "compute_detection_metrics",
    "compute_metrics",
    "compute_segmentation_metrics",
    "confusion_matrix",
    "dataset_label_names",
    "detection_id2label",
    "detection_label_names",
    "detection_metrics",
    "detection_predictions",
    "find_image_column",
    "has_named_labels",
    "infer_id2label",
    "load_splits",
    "logits_to_class_maps",
    "make_task",
    "mean_iou",
    "model_detections",
    "metrics_from_confusion",
    "parameter_groups",
    "parse_args",
    "prepare_dataset",
    "prepare_detection_dataset",
    "prepare_segmentation_dataset",
    "read_config_file",
    "save_checkpoint",
    "save_model",
    "segmentation_predictions",
    "target_boxes",
    "top_k_accuracy",
    "train",
]
