"""What classification, segmentation and detection do differently: model class, class list, data, loss and
metrics. Also the model and processor a `TrainConfig` names, and the optimizer's parameter groups.

Three tasks share the loop (`task`; by default segmentation when the model is an `XTForSemanticSegmentation` or
the dataset has a `mask_column`, detection when it is an `XTForObjectDetection` or the dataset has an `objects`
column): classification (cross-entropy with label smoothing, top-1/top-5, best model by top-1), semantic
segmentation (the model's own loss, mean IoU / per-class IoU / pixel accuracy, best model by mean IoU) and object
detection (the model's own CenterNet loss, COCO AP / AP50 / AP-small via torchmetrics and pycocotools, best model
by AP50). Classification and segmentation compute their metrics with the packaged `evaluate` metrics' functions
(`evaluation.py`): top-1 is the `accuracy` metric, the segmentation numbers are the `mean_iou` metric's;
detection's are COCO's own evaluation (`detection_evaluation.py`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig

from xt_hf import (
    XTConfig,
    XTForImageClassification,
    XTForObjectDetection,
    XTForSemanticSegmentation,
    XTImageProcessor,
)

from .arguments import OptimizationArguments, TrainConfig, read_config_file
from .data import RegionPaddingCollator, has_named_labels, infer_id2label, prepare_dataset
from .detection_data import (
    DetectionPaddingCollator,
    detection_id2label,
    find_objects_column,
    has_objects_column,
    prepare_detection_dataset,
)
from .detection_evaluation import DetectionMeanAP, model_detections, target_boxes
from .evaluation import (
    confusion_matrix,
    logits_to_class_maps,
    metrics_from_confusion,
    segmentation_results,
    top_k_accuracy,
)
from .segmentation_data import SegmentationPaddingCollator, prepare_segmentation_dataset

logger = logging.getLogger("xt_hf.train")


def make_task(config: TrainConfig, model_config, train_split) -> ClassificationTask | SegmentationTask | DetectionTask:
    """The task `config.task` names; for "auto", segmentation when the model config says it is a segmenter or
    the training split has `config.mask_column`, detection when it says it is a detector or the training split
    has an `objects` column, else classification."""
    name = config.task
    if name == "auto":
        architectures = getattr(model_config, "architectures", None) or []
        is_segmenter = any(architecture.endswith("ForSemanticSegmentation") for architecture in architectures)
        is_detector = any(architecture.endswith("ForObjectDetection") for architecture in architectures)
        if is_segmenter or config.mask_column in train_split.column_names:
            name = "segmentation"
        elif is_detector or has_objects_column(train_split):
            name = "detection"
        else:
            name = "classification"
    tasks = {"segmentation": SegmentationTask, "detection": DetectionTask}
    return tasks.get(name, ClassificationTask)(config)


class ClassificationTask:
    """One class per image: cross-entropy with label smoothing, top-1 and top-5 accuracy, best model by top-1."""

    name = "classification"
    best_metric = "eval/top1"
    model_class = XTForImageClassification

    def __init__(self, config: TrainConfig):
        self.config = config

    def labels(self, model_config, train_split) -> tuple[dict, bool]:
        """Config fields that fix the class list, and whether they need a new head."""
        id2label, new_head = choose_labels(self.config, model_config, train_split)
        return dict(id2label=id2label, label2id={name: i for i, name in id2label.items()}), new_head

    def prepare(self, split, processor, model_config):
        return prepare_dataset(split, processor, label2id=model_config.label2id, image_column=self.config.image_column,
                               label_column=self.config.label_column)

    def collator(self, processor, model_config):
        return RegionPaddingCollator(processor.region_size, processor.pad_value)

    def loss(self, model, batch: dict) -> torch.Tensor:
        logits = model(pixel_values=batch["pixel_values"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.config.label_smoothing)

    def evaluate(self, model, loader, accelerator, on_batch=None) -> dict[str, float]:
        """Plain cross-entropy (no smoothing), top-1 (the `accuracy` metric) and top-5 over the whole eval split.
        `on_batch(batch, predicted class ids (batch,))`, if given, sees this process's batches."""
        all_logits, all_labels, losses = [], [], []
        for batch in loader:
            logits = model(pixel_values=batch["pixel_values"]).logits.float()
            losses.append(F.cross_entropy(logits, batch["labels"], reduction="sum")[None])
            if on_batch is not None:
                on_batch(batch, logits.argmax(dim=-1))
            logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
        logits, labels = torch.cat(all_logits), torch.cat(all_labels)
        loss_sum = accelerator.reduce(torch.cat(losses).sum(), reduction="sum").item()
        return {"eval/loss": loss_sum / max(1, len(labels)), "eval/top1": top_k_accuracy(logits, labels, 1),
                "eval/top5": top_k_accuracy(logits, labels, 5)}


class SegmentationTask:
    """A class per pixel: the model's own loss (cross-entropy over labelled pixels, plus its Dice term), mean IoU,
    per-class IoU and pixel accuracy, best model by mean IoU. The classes are the model config's (`id2label`,
    `num_labels`; set them with `model_overrides`); masks hold their ids."""

    name = "segmentation"
    best_metric = "eval/mean_iou"
    model_class = XTForSemanticSegmentation

    def __init__(self, config: TrainConfig):
        self.config = config

    def labels(self, model_config, train_split) -> tuple[dict, bool]:
        overrides = self.config.model_overrides
        return {}, "num_labels" in overrides or "id2label" in overrides

    def prepare(self, split, processor, model_config):
        return prepare_segmentation_dataset(
            split, processor, num_labels=model_config.num_labels, ignore_index=model_config.semantic_loss_ignore_index,
            image_column=self.config.image_column, mask_column=self.config.mask_column,
        )

    def collator(self, processor, model_config):
        return SegmentationPaddingCollator(processor.region_size, processor.pad_value,
                                           model_config.semantic_loss_ignore_index)

    def loss(self, model, batch: dict) -> torch.Tensor:
        outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
        if not torch.isfinite(outputs.loss):  # no labelled pixel in the batch: a zero loss, not NaN gradients
            return outputs.logits.float().sum() * 0.0
        return outputs.loss

    def evaluate(self, model, loader, accelerator, on_batch=None) -> dict[str, float]:
        """The model's loss, and the `mean_iou` metric's results from one confusion matrix summed over every
        eval pixel of every process. `on_batch(batch, class maps (batch, H, W))`, if given, sees this process's
        batches."""
        model_config = accelerator.unwrap_model(model).config
        num_labels, ignore = model_config.num_labels, model_config.semantic_loss_ignore_index
        confusions = []
        loss_sum = torch.zeros((), device=accelerator.device)
        loss_count = torch.zeros((), device=accelerator.device)
        for batch in loader:
            outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
            if torch.isfinite(outputs.loss):
                loss_sum += outputs.loss.float() * len(batch["labels"])
                loss_count += len(batch["labels"])
            predictions = logits_to_class_maps(outputs.logits, batch["labels"].shape[-2:])
            if on_batch is not None:
                on_batch(batch, predictions)
            # Per image, so that gather_for_metrics can drop the samples repeated to even out the last batch.
            confusion = confusion_matrix(predictions, batch["labels"], num_labels, ignore, per_sample=True)
            confusions.append(accelerator.gather_for_metrics(confusion).cpu())
        metrics = metrics_from_confusion(torch.cat(confusions).sum(dim=0))
        loss = accelerator.reduce(loss_sum, reduction="sum") / accelerator.reduce(loss_count, reduction="sum")
        return {"eval/loss": loss.item(),
                **segmentation_results(metrics, model_config.id2label, "eval/", pixel_accuracy_key="pixel_accuracy")}


class DetectionTask:
    """Boxes and their classes: `XTForObjectDetection`'s own loss (CenterNet: heatmap focal loss, size and offset
    L1), COCO AP / AP50 / AP75 / AP-small/medium/large and class-agnostic AP from torchmetrics'
    `MeanAveragePrecision` (pycocotools), best model by AP50 (`eval/map_50`). The classes are the dataset's
    (`ClassLabel` names of the objects' `category_id`) or, with `label_source: model`, the model config's;
    images without objects train on the heatmap's negatives alone."""

    name = "detection"
    best_metric = "eval/map_50"
    model_class = XTForObjectDetection

    def __init__(self, config: TrainConfig):
        self.config = config

    def labels(self, model_config, train_split) -> tuple[dict, bool]:
        model_labels = {int(i): name for i, name in (model_config.id2label or {}).items()}
        data_labels = detection_id2label(train_split)
        source = self.config.label_source
        if source == "model" or (source == "auto" and has_named_labels(model_config)
                                 and set(data_labels.values()) <= set(model_labels.values())):
            return dict(id2label=model_labels, label2id={n: i for i, n in model_labels.items()}), False
        if source == "auto" and has_named_labels(model_config):
            logger.warning("The dataset's classes are not all among the model's id2label: training a new head on "
                           "the dataset's %d classes.", len(data_labels))
        return (dict(id2label=data_labels, label2id={n: i for i, n in data_labels.items()}),
                data_labels != model_labels)

    def prepare(self, split, processor, model_config):
        label2id = model_config.label2id or {name: int(i) for i, name in (model_config.id2label or {}).items()}
        return prepare_detection_dataset(split, processor, num_labels=model_config.num_labels,
                                         label2id=label2id, image_column=self.config.image_column,
                                         objects_column=find_objects_column(split))

    def collator(self, processor, model_config):
        return DetectionPaddingCollator(processor.region_size, processor.pad_value)

    def loss(self, model, batch: dict) -> torch.Tensor:
        return model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss

    def evaluate(self, model, loader, accelerator, on_batch=None) -> dict[str, float]:
        """The model's loss, and COCO metrics over every image of the eval split (all processes' detections
        gathered, the samples repeated to even out the last batch dropped). `on_batch(batch, detections)`, if
        given, sees this process's batches and their detections as `model_detections` gives them."""
        model_config = accelerator.unwrap_model(model).config
        metric = DetectionMeanAP(model_config.id2label)
        loss_sum = torch.zeros((), device=accelerator.device)
        loss_count = torch.zeros((), device=accelerator.device)
        for batch in loader:
            outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
            loss_sum += outputs.loss.float() * len(batch["labels"])
            loss_count += len(batch["labels"])
            frame = tuple(batch["pixel_values"].shape[-2:])
            detections = model_detections(outputs.logits, outputs.pred_boxes, frame)
            if on_batch is not None:
                on_batch(batch, detections)
            pairs = list(zip(detections, target_boxes(batch["labels"], frame)))
            if accelerator.num_processes > 1:
                pairs = accelerator.gather_for_metrics(pairs, use_gather_object=True)
            metric.update([p for p, _ in pairs], [t for _, t in pairs])
        loss = accelerator.reduce(loss_sum, reduction="sum") / accelerator.reduce(loss_count, reduction="sum")
        return {"eval/loss": loss.item(), **{f"eval/{key}": value for key, value in metric.compute().items()}}


def choose_labels(config: TrainConfig, model_config, train_split) -> tuple[dict[int, str], bool]:
    """The class list to train with, and whether it differs from the model config's (a new head)."""
    model_labels = {int(i): name for i, name in (model_config.id2label or {}).items()}
    if config.label_source == "model" or (config.label_source == "auto" and has_named_labels(model_config)):
        data_names = set(infer_id2label(train_split, config.label_column).values())
        if config.label_source == "model" or data_names <= set(model_labels.values()):
            return model_labels, False
        logger.warning("The training labels are not all among the model's id2label: training a new head on the "
                       "dataset's %d classes (label_source='model' keeps the model's and reports the bad samples).",
                       len(data_names))
    data_labels = infer_id2label(train_split, config.label_column)
    return data_labels, data_labels != model_labels


def load_model_config(config: TrainConfig):
    """The model's config: read from an XTConfig JSON/YAML file, or from a saved folder or Hub id."""
    if is_config_file(config.model):
        return XTConfig.from_dict(read_config_file(config.model))
    return AutoConfig.from_pretrained(config.model)


def load_model_and_processor(config: TrainConfig, model_config, task, train_split):
    """The task's model (pretrained or new) with the training class list, and its image processor."""
    overrides = dict(config.model_overrides)
    labels, new_head = task.labels(model_config, train_split)

    from_config_file = is_config_file(config.model)
    if from_config_file:
        values = {**model_config.to_dict(), **overrides, **labels}
        if "id2label" in labels or "id2label" in overrides:
            values.pop("num_labels", None)  # follows id2label
        elif "num_labels" in overrides:
            values.pop("id2label", None)  # rebuilt for the new number of classes
            values.pop("label2id", None)
        model = task.model_class(XTConfig.from_dict(values))
    else:
        model = task.model_class.from_pretrained(
            config.model, **overrides, **labels, ignore_mismatched_sizes=new_head
        )

    try:
        processor = XTImageProcessor.from_pretrained(config.model) if not from_config_file else None
    except OSError:  # a model saved without its processor
        processor = None
    if processor is None:
        processor = XTImageProcessor(region_size=model.config.region_size)
    for key, value in config.processor_overrides.items():
        setattr(processor, key, value)
    if processor.region_size != model.config.region_size:
        raise ValueError(f"The image processor's region_size ({processor.region_size}) differs from the model's "
                         f"({model.config.region_size}).")
    return model, processor


def is_config_file(model: str) -> bool:
    path = Path(model)
    return path.is_file() and path.suffix in (".json", ".yaml", ".yml")


def parameter_groups(model, optimization: OptimizationArguments) -> list[dict]:
    """AdamW groups: region encoder / context encoder / head, each with and without weight decay.

    A group whose learning rate is 0 is frozen (`requires_grad=False`) rather than stepped with lr 0.
    """
    rates = {
        "region_encoder": optimization.region_encoder_learning_rate,
        "context_encoder": optimization.context_encoder_learning_rate,
        "head": optimization.head_learning_rate,
    }
    groups: dict[tuple[str, bool], list] = {}
    for name, parameter in model.named_parameters():
        part = ("region_encoder" if ".region_encoder." in f".{name}" else
                "context_encoder" if ".context_encoder." in f".{name}" else "head")
        rate = rates[part] if rates[part] is not None else optimization.learning_rate
        if rate == 0:
            parameter.requires_grad_(False)
            continue
        if not parameter.requires_grad:
            continue
        no_decay = parameter.ndim <= 1 or name.endswith(".bias") or "cls_token" in name or "position" in name
        groups.setdefault((part, no_decay), []).append(parameter)
    return [
        {"params": params, "lr": rates[part] if rates[part] is not None else optimization.learning_rate,
         "weight_decay": 0.0 if no_decay else optimization.weight_decay, "name": f"{part}{'_no_decay' if no_decay else ''}"}
        for (part, no_decay), params in groups.items()
    ]


__all__ = ["ClassificationTask", "DetectionTask", "SegmentationTask", "choose_labels", "is_config_file",
           "load_model_and_processor", "load_model_config", "make_task", "parameter_groups"]
