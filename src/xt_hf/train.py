"""Fine-tune an xT classifier or segmenter with 🤗 Accelerate: one script from a laptop CPU to many GPUs and nodes.

    xt-hf train --config configs/train/example.yaml --set learning_rate=3e-4
    accelerate launch --config_file configs/accelerate/8xa100_ddp.yaml -m xt_hf.train --config ...

Settings come from a YAML/JSON file (`--config`), then explicit flags (`--learning-rate 3e-4`), then
`--set key=value` (dotted keys reach into dict settings: `--set model_overrides.region_batch_size=16`);
later sources win. Every setting is a field of `TrainConfig`. Distribution, mixed precision, gradient
accumulation, checkpoint state and trackers are Accelerate's; this script holds only the training loop.

Two tasks share the loop (`task`; by default segmentation when the model is an `XTForSemanticSegmentation` or
the dataset has a `mask_column`): classification (cross-entropy with label smoothing, top-1/top-5, best model
by top-1) and semantic segmentation (the model's own loss, mean IoU / per-class IoU / pixel accuracy, best
model by mean IoU). What differs between them lives in `ClassificationTask` and `SegmentationTask`.

What a run writes to `output_dir`:
    checkpoints/step_000200/  `accelerator.save_state` (model, optimizer, scheduler, RNG, progress);
                              written under a `.tmp` name and renamed when complete
    best/                     the best model by eval top-1 (segmentation: mean IoU): `save_pretrained` +
                              image processor, loads with `AutoModelForImageClassification` (or
                              `AutoModelForSemanticSegmentation`) `.from_pretrained`
    metrics.jsonl             every logged metric, one JSON object per line
    train_config.yaml         the resolved settings
A run started again with the same `output_dir` resumes from the newest complete checkpoint, at the same
position in the data, and ends where an uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import re
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

logger = logging.getLogger("xt_hf.train")

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")
TASKS = ("auto", "classification", "segmentation")


@dataclass
class TrainConfig:
    """Every setting of a training run. Field names are the YAML keys and, with dashes, the flags."""

    # --- model and data -------------------------------------------------------------------------------
    model: str = field(default="", metadata={"help": "Hub id or local folder of a saved xT model, or an XTConfig "
                                                     "JSON file (a new, randomly initialised model)."})
    model_overrides: dict = field(default_factory=dict, metadata={
        "help": "XTConfig fields to override, e.g. {region_batch_size: 16, context_num_layers: 4}."})
    label_source: str = field(default="auto", metadata={
        "help": "Where the class list comes from: 'model' (the model config's id2label; other labels are errors), "
                "'data' (the training split's labels; a new head if they differ), or 'auto' ('model' when the "
                "config names classes and the training labels are among them, else 'data')."})
    dataset: str = field(default="", metadata={
        "help": "A Hub dataset name, 'imagefolder:PATH', or a folder written by save_to_disk."})
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default=None, metadata={
        "help": "Split to evaluate on; by default the first of validation, valid, val, test that exists."})
    eval_fraction: float = field(default=0.0, metadata={
        "help": "Without an eval split, hold out this fraction of the training split (seeded)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column; by default the Image feature."})
    label_column: str = field(default="label", metadata={"help": "Label column (classification)."})
    task: str = field(default="auto", metadata={
        "help": "'classification', 'segmentation', or 'auto': segmentation when the model is an "
                "XTForSemanticSegmentation or the training split has `mask_column`, else classification."})
    mask_column: str = field(default="mask", metadata={
        "help": "Segmentation masks: an Image feature (mode L/P/I) or 2-D array of class ids per pixel, the size "
                "of its image; XTConfig.semantic_loss_ignore_index (255) marks unlabelled pixels."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training samples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N eval samples."})
    processor_overrides: dict = field(default_factory=dict, metadata={
        "help": "XTImageProcessor settings, e.g. {do_resize: true}."})

    # --- optimisation ---------------------------------------------------------------------------------
    output_dir: str = field(default="xt-finetuned", metadata={"help": "Where checkpoints, logs and best/ go."})
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation, the data order and every step."})
    num_epochs: float = field(default=10.0, metadata={"help": "Epochs to train (ignored when max_steps is set)."})
    max_steps: int | None = field(default=None, metadata={"help": "Optimizer steps to train; overrides num_epochs."})
    batch_size: int = field(default=8, metadata={"help": "Images per device per forward pass."})
    eval_batch_size: int | None = field(default=None, metadata={"help": "Per-device eval batch; default batch_size."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Forward passes per optimizer step."})
    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate (all parameter groups)."})
    region_encoder_learning_rate: float | None = field(default=None, metadata={
        "help": "Peak LR of the region encoder (backbone); 0 freezes it. Default: learning_rate."})
    context_encoder_learning_rate: float | None = field(default=None, metadata={
        "help": "Peak LR of the context encoder. Default: learning_rate."})
    head_learning_rate: float | None = field(default=None, metadata={
        "help": "Peak LR of the head (classifier, or segmentation decoder). Default: learning_rate."})
    weight_decay: float = field(default=0.05, metadata={
        "help": "AdamW weight decay (not applied to biases, norms, position or CLS tokens)."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    lr_scheduler: str = field(default="cosine", metadata={
        "help": "transformers scheduler name: cosine, linear, constant_with_warmup, ..."})
    warmup_steps: int | None = field(default=None, metadata={"help": "Warmup steps; default warmup_ratio·steps."})
    warmup_ratio: float = field(default=0.05, metadata={"help": "Warmup as a fraction of all steps."})
    max_grad_norm: float = field(default=5.0, metadata={"help": "Gradient clipping norm (xT: 5.0); 0 disables."})
    label_smoothing: float = field(default=0.3, metadata={
        "help": "Label smoothing of the classification cross-entropy (xT: 0.3); segmentation uses the model's loss."})
    mixed_precision: str | None = field(default=None, metadata={
        "help": "no, bf16 or fp16 (Accelerate autocast); null: the `accelerate launch` config's setting, else no."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute backbone and context-encoder activations in the backward pass."})
    grad_ratio: float | None = field(default=None, metadata={
        "help": "Fraction of regions that keep gradients each step (XTConfig.grad_ratio)."})
    region_batch_size: int | None = field(default=None, metadata={
        "help": "Regions encoded at a time (XTConfig.region_batch_size); bounds activation memory."})

    # --- data loading, evaluation, checkpoints, logging -----------------------------------------------
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes per device."})
    eval_steps: int | None = field(default=None, metadata={
        "help": "Evaluate every N optimizer steps; default at the end of each epoch. Always at the end."})
    checkpointing_steps: int | None = field(default=500, metadata={
        "help": "Save the full training state every N optimizer steps (and at the end); null disables."})
    checkpoints_total_limit: int | None = field(default=2, metadata={"help": "Keep only the newest N checkpoints."})
    resume: str = field(default="auto", metadata={
        "help": "'auto' (newest checkpoint in output_dir, if any), 'none', or a checkpoint folder."})
    logging_steps: int = field(default=10, metadata={"help": "Log training metrics every N optimizer steps."})
    report_to: str = field(default="none", metadata={
        "help": "Accelerate trackers, comma-separated: tensorboard, wandb, mlflow, comet_ml, aim, clearml, "
                "dvclive, swanlab, trackio, all, none. metrics.jsonl is always written."})
    project_name: str = field(default="xt-finetune", metadata={"help": "Tracker project / run group name."})
    cpu: bool = field(default=False, metadata={
        "help": "Train on CPU even where a GPU is present; several CPU processes (torchrun, or accelerate launch "
                "--multi_gpu) then synchronise over gloo."})
    verify_replicas: bool = field(default=False, metadata={
        "help": "At the end, hash each process's weights into output_dir/weights_rank{R}.sha256 and fail if "
                "the replicas differ (a data-parallel sanity check)."})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build a config from loosely typed values (YAML, flags), naming any unknown or ill-typed key."""
        names = [f.name for f in dataclasses.fields(cls)]
        hints = typing.get_type_hints(cls)
        arguments = {}
        for key, value in values.items():
            key = key.replace("-", "_")
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                raise ValueError(f"Unknown training setting {key!r}" + (f"; did you mean {close[0]!r}?" if close else "."))
            arguments[key] = _coerce(key, value, hints[key])
        config = cls(**arguments)
        config.validate()
        return config

    def validate(self) -> None:
        if not self.model:
            raise ValueError("Set `model`: a Hub id, a saved model folder, or an XTConfig JSON file.")
        if not self.dataset:
            raise ValueError("Set `dataset`: a Hub dataset name, 'imagefolder:PATH', or a save_to_disk folder.")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise ValueError(f"`mixed_precision` must be no, bf16 or fp16, got {self.mixed_precision!r}.")
        if self.task not in TASKS:
            raise ValueError(f"`task` must be one of {', '.join(TASKS)}, got {self.task!r}.")
        if self.label_source not in ("auto", "model", "data"):
            raise ValueError(f"`label_source` must be auto, model or data, got {self.label_source!r}.")
        for name in ("batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be ≥ 1, got {getattr(self, name)}.")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"`eval_fraction` must be in [0, 1), got {self.eval_fraction}.")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Turn a YAML value or a command-line string into the field's type (YAML reads `3e-4` as a string)."""
    types = typing.get_args(hint) or (hint,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
        if type(None) in types:
            return None
        if value is not None and str in types:  # the word itself, as in `report_to: none` or `resume: none`
            return value
        raise ValueError(f"`{key}` cannot be null.")
    try:
        if bool in types:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                    raise ValueError(value)
                return value.lower() in ("true", "yes", "1", "on")
            return bool(value)
        if int in types:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if float in types:
            return float(value)
        if dict in types:
            value = yaml.safe_load(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{key}` must be {hint}, got {value!r}.") from None


# --------------------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config`, `--set` and one `--kebab-case` flag per `TrainConfig` field."""
    parser.add_argument("--config", help="YAML or JSON file of settings (TrainConfig fields).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override one setting; dotted keys reach into dicts. Repeatable; wins over flags.")
    group = parser.add_argument_group("settings (override the config file)")
    hints = typing.get_type_hints(TrainConfig)
    for item in dataclasses.fields(TrainConfig):
        flag = "--" + item.name.replace("_", "-")
        help_text = item.metadata.get("help", "")
        if bool in (typing.get_args(hints[item.name]) or (hints[item.name],)):
            group.add_argument(flag, dest=item.name, nargs="?", const="true", default=argparse.SUPPRESS,
                               metavar="BOOL", help=help_text)
        else:
            group.add_argument(flag, dest=item.name, default=argparse.SUPPRESS, help=help_text)


def config_from_arguments(arguments: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    if arguments.config:
        values.update(read_config_file(arguments.config))
    for item in dataclasses.fields(TrainConfig):
        if hasattr(arguments, item.name):
            values[item.name] = getattr(arguments, item.name)
    for assignment in arguments.set:
        key, separator, raw = assignment.partition("=")
        if not separator:
            raise ValueError(f"--set expects KEY=VALUE, got {assignment!r}.")
        head, *rest = key.strip().replace("-", "_").split(".")
        if rest:
            target = values.setdefault(head, {})
            if not isinstance(target, dict):
                raise ValueError(f"--set {key}: `{head}` is not a dict setting.")
            for part in rest[:-1]:
                target = target.setdefault(part, {})
            target[rest[-1]] = yaml.safe_load(raw)
        else:
            values[head] = raw
    return TrainConfig.from_dict(values)


def read_config_file(path: str | Path) -> dict[str, Any]:
    text = Path(path).read_text()
    values = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(values).__name__}.")
    return values


def add_parser(subparsers) -> None:
    """Register `xt-hf train`."""
    parser = subparsers.add_parser(
        "train", help="fine-tune an xT classifier or segmenter (Accelerate; also `accelerate launch -m xt_hf.train`)",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(parser)
    parser.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> dict[str, float]:
    return train(config_from_arguments(arguments))


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m xt_hf.train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


# --------------------------------------------------------------------------------------------------------
# Data and model


def load_splits(config: TrainConfig, accelerator):
    """The training split and the eval split (or `None`) as `datasets.Dataset`s, not yet transformed."""
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    spec = config.dataset
    with accelerator.main_process_first():  # one process downloads or builds the cache, the others reuse it
        if spec.startswith("imagefolder:"):
            dataset = load_dataset("imagefolder", data_dir=spec.split(":", 1)[1])
        elif Path(spec).is_dir() and any((Path(spec) / name).exists()
                                         for name in ("dataset_dict.json", "state.json", "dataset_info.json")):
            dataset = load_from_disk(spec)
        else:
            dataset = load_dataset(spec, config.dataset_config)
    if isinstance(dataset, Dataset):
        dataset = DatasetDict({config.train_split: dataset})
    if config.train_split not in dataset:
        raise ValueError(f"The dataset has no split {config.train_split!r}; it has {list(dataset)}.")
    train_split = dataset[config.train_split]

    eval_name = config.eval_split
    if eval_name is None:
        eval_name = next((name for name in ("validation", "valid", "val", "test") if name in dataset), None)
    if eval_name is not None and eval_name not in dataset:
        raise ValueError(f"The dataset has no split {eval_name!r}; it has {list(dataset)}.")
    eval_split = dataset[eval_name] if eval_name is not None else None
    if eval_split is None and config.eval_fraction > 0:
        parts = train_split.train_test_split(test_size=config.eval_fraction, seed=config.seed)
        train_split, eval_split = parts["train"], parts["test"]

    if config.max_train_samples is not None:
        train_split = train_split.select(range(min(config.max_train_samples, len(train_split))))
    if eval_split is not None and config.max_eval_samples is not None:
        eval_split = eval_split.select(range(min(config.max_eval_samples, len(eval_split))))
    return train_split, eval_split


def choose_labels(config: TrainConfig, model_config, train_split) -> tuple[dict[int, str], bool]:
    """The class list to train with, and whether it differs from the model config's (a new head)."""
    from .training_utils import has_named_labels, infer_id2label

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
    from transformers import AutoConfig

    from . import XTConfig

    if _is_config_file(config.model):
        return XTConfig.from_dict(read_config_file(config.model))
    return AutoConfig.from_pretrained(config.model)


def load_model_and_processor(config: TrainConfig, model_config, task, train_split):
    """The task's model (pretrained or new) with the training class list, and its image processor."""
    from . import XTConfig, XTImageProcessor

    overrides = dict(config.model_overrides)
    for name in ("grad_ratio", "region_batch_size"):
        if getattr(config, name) is not None:
            overrides[name] = getattr(config, name)
    labels, new_head = task.labels(model_config, train_split)

    from_config_file = _is_config_file(config.model)
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


def _is_config_file(model: str) -> bool:
    path = Path(model)
    return path.is_file() and path.suffix in (".json", ".yaml", ".yml")


# --------------------------------------------------------------------------------------------------------
# Tasks: what classification and segmentation do differently (model class, data, loss, metrics)


def make_task(config: TrainConfig, model_config, train_split) -> ClassificationTask | SegmentationTask:
    """The task `config.task` names; for "auto", segmentation when the model config says it is a segmenter or
    the training split has `config.mask_column`, else classification."""
    name = config.task
    if name == "auto":
        architectures = getattr(model_config, "architectures", None) or []
        is_segmenter = any(architecture.endswith("ForSemanticSegmentation") for architecture in architectures)
        name = "segmentation" if is_segmenter or config.mask_column in train_split.column_names else "classification"
    return SegmentationTask(config) if name == "segmentation" else ClassificationTask(config)


class ClassificationTask:
    """One class per image: cross-entropy with label smoothing, top-1 and top-5 accuracy, best model by top-1."""

    name = "classification"
    best_metric = "eval/top1"

    def __init__(self, config: TrainConfig):
        self.config = config

    @property
    def model_class(self):
        from . import XTForImageClassification

        return XTForImageClassification

    def labels(self, model_config, train_split) -> tuple[dict, bool]:
        """Config fields that fix the class list, and whether they need a new head."""
        id2label, new_head = choose_labels(self.config, model_config, train_split)
        return dict(id2label=id2label, label2id={name: i for i, name in id2label.items()}), new_head

    def prepare(self, split, processor, model_config):
        from .training_utils import prepare_dataset

        return prepare_dataset(split, processor, label2id=model_config.label2id, image_column=self.config.image_column,
                               label_column=self.config.label_column)

    def collator(self, processor, model_config):
        from .training_utils import RegionPaddingCollator

        return RegionPaddingCollator(processor.region_size, processor.pad_value)

    def loss(self, model, batch: dict) -> torch.Tensor:
        logits = model(pixel_values=batch["pixel_values"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.config.label_smoothing)

    def evaluate(self, model, loader, accelerator) -> dict[str, float]:
        """Plain cross-entropy (no smoothing), top-1 and top-5 over the whole eval split."""
        from .training_utils import top_k_accuracy

        all_logits, all_labels, losses = [], [], []
        for batch in loader:
            logits = model(pixel_values=batch["pixel_values"]).logits.float()
            losses.append(F.cross_entropy(logits, batch["labels"], reduction="sum")[None])
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

    def __init__(self, config: TrainConfig):
        self.config = config

    @property
    def model_class(self):
        from . import XTForSemanticSegmentation

        return XTForSemanticSegmentation

    def labels(self, model_config, train_split) -> tuple[dict, bool]:
        overrides = self.config.model_overrides
        return {}, "num_labels" in overrides or "id2label" in overrides

    def prepare(self, split, processor, model_config):
        from .training_utils import prepare_segmentation_dataset

        return prepare_segmentation_dataset(
            split, processor, num_labels=model_config.num_labels, ignore_index=model_config.semantic_loss_ignore_index,
            image_column=self.config.image_column, mask_column=self.config.mask_column,
        )

    def collator(self, processor, model_config):
        from .training_utils import SegmentationPaddingCollator

        return SegmentationPaddingCollator(processor.region_size, processor.pad_value,
                                           model_config.semantic_loss_ignore_index)

    def loss(self, model, batch: dict) -> torch.Tensor:
        outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
        if not torch.isfinite(outputs.loss):  # no labelled pixel in the batch: a zero loss, not NaN gradients
            return outputs.logits.float().sum() * 0.0
        return outputs.loss

    def evaluate(self, model, loader, accelerator) -> dict[str, float]:
        """The model's loss, and IoU / accuracy from one confusion matrix summed over every eval pixel."""
        from .training_utils import _metric_name, confusion_matrix, logits_to_class_maps, metrics_from_confusion

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
            # Per image, so that gather_for_metrics can drop the samples repeated to even out the last batch.
            confusion = confusion_matrix(predictions, batch["labels"], num_labels, ignore, per_sample=True)
            confusions.append(accelerator.gather_for_metrics(confusion).cpu())
        metrics = metrics_from_confusion(torch.cat(confusions).sum(dim=0))
        loss = accelerator.reduce(loss_sum, reduction="sum") / accelerator.reduce(loss_count, reduction="sum")
        result = {"eval/loss": loss.item(), "eval/mean_iou": metrics["mean_iou"],
                  "eval/mean_accuracy": metrics["mean_accuracy"], "eval/pixel_accuracy": metrics["overall_accuracy"]}
        for index, iou in enumerate(metrics["per_category_iou"]):
            name = model_config.id2label.get(index, str(index))
            result[f"eval/iou_{_metric_name(str(name))}"] = float(iou)
        return result


def parameter_groups(model, config: TrainConfig) -> list[dict]:
    """AdamW groups: region encoder / context encoder / head, each with and without weight decay.

    A group whose learning rate is 0 is frozen (`requires_grad=False`) rather than stepped with lr 0.
    """
    rates = {
        "region_encoder": config.region_encoder_learning_rate,
        "context_encoder": config.context_encoder_learning_rate,
        "head": config.head_learning_rate,
    }
    groups: dict[tuple[str, bool], list] = {}
    for name, parameter in model.named_parameters():
        part = ("region_encoder" if ".region_encoder." in f".{name}" else
                "context_encoder" if ".context_encoder." in f".{name}" else "head")
        rate = rates[part] if rates[part] is not None else config.learning_rate
        if rate == 0:
            parameter.requires_grad_(False)
            continue
        if not parameter.requires_grad:
            continue
        no_decay = parameter.ndim <= 1 or name.endswith(".bias") or "cls_token" in name or "position" in name
        groups.setdefault((part, no_decay), []).append(parameter)
    return [
        {"params": params, "lr": rates[part] if rates[part] is not None else config.learning_rate,
         "weight_decay": 0.0 if no_decay else config.weight_decay, "name": f"{part}{'_no_decay' if no_decay else ''}"}
        for (part, no_decay), params in groups.items()
    ]


class TrainingProgress:
    """Where the run is; saved with every checkpoint (`register_for_checkpointing`)."""

    def __init__(self):
        self.global_step = 0  # optimizer steps done
        self.epoch = 0
        self.batches_in_epoch = 0  # batches of `epoch` already consumed
        self.best_metric = -math.inf  # the task's best_metric (top-1, or mean IoU) of the best model so far
        self.best_step = -1

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        if "best_top1" in state:  # checkpoints written before segmentation training
            state["best_metric"] = state.pop("best_top1")
        vars(self).update(state)


def jsonl_tracker(path: Path):
    """An Accelerate tracker appending every logged dict to `path` (`metrics.jsonl`), one JSON object a line,
    so that every run leaves a machine-readable log whatever `report_to` says."""
    from accelerate.tracking import GeneralTracker

    class JsonLinesTracker(GeneralTracker):
        name = "jsonl"
        requires_logging_directory = False
        main_process_only = True

        def __init__(self):
            super().__init__(_blank=True)

        @property
        def tracker(self):
            return path

        def start(self):
            path.parent.mkdir(parents=True, exist_ok=True)

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            with path.open("a") as file:
                file.write(json.dumps({"step": step, **values}) + "\n")

    return JsonLinesTracker()


# --------------------------------------------------------------------------------------------------------
# Training


def train(config: TrainConfig) -> dict[str, float]:
    """Run (or resume) a training run; returns the final eval metrics (empty without an eval split)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    output_dir = Path(config.output_dir)
    trackers = [name.strip() for name in config.report_to.split(",") if name.strip() and name.strip() != "none"]
    accelerator = Accelerator(
        cpu=config.cpu,
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=[*trackers, jsonl_tracker(output_dir / "metrics.jsonl")],
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # The sampler reshuffles from (seed, epoch) alone, so a resumed run sees the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    set_seed(config.seed)

    train_split, eval_split = load_splits(config, accelerator)
    model_config = load_model_config(config)
    task = make_task(config, model_config, train_split)
    model, processor = load_model_and_processor(config, model_config, task, train_split)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    train_dataset = task.prepare(train_split, processor, model.config)
    eval_dataset = task.prepare(eval_split, processor, model.config) if eval_split is not None else None
    collate = task.collator(processor, model.config)
    loader_options = dict(collate_fn=collate, num_workers=config.num_workers,
                          pin_memory=accelerator.device.type == "cuda", persistent_workers=config.num_workers > 0)
    train_loader = DataLoader(train_dataset, batch_size=config.batch_size, shuffle=True, drop_last=False,
                              **loader_options)
    eval_loader = (DataLoader(eval_dataset, batch_size=config.eval_batch_size or config.batch_size, shuffle=False,
                              **loader_options) if eval_dataset is not None else None)

    optimizer = torch.optim.AdamW(parameter_groups(model, config), betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_epsilon)
    _fsdp_wrap_present_layers(accelerator, model)
    num_labels = model.config.num_labels
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)

    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    max_steps = config.max_steps if config.max_steps is not None else math.ceil(config.num_epochs * steps_per_epoch)
    warmup_steps = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_ratio * max_steps)
    # The prepared scheduler steps once per process at every optimizer step, hence the factors.
    scheduler = get_scheduler(config.lr_scheduler, optimizer,
                              num_warmup_steps=warmup_steps * accelerator.num_processes,
                              num_training_steps=max_steps * accelerator.num_processes)
    scheduler = accelerator.prepare(scheduler)
    progress = TrainingProgress()
    accelerator.register_for_checkpointing(progress)

    checkpoint = _checkpoint_to_resume(config, output_dir)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        logger.info("Resumed from %s (step %d, epoch %d, batch %d).", checkpoint, progress.global_step,
                    progress.epoch, progress.batches_in_epoch)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    accelerator.init_trackers(config.project_name, config=_flat_hparams(config))

    total_batch = config.batch_size * accelerator.num_processes * config.gradient_accumulation_steps
    logger.info("%s: %d training images, %s eval images, %d classes; %d steps of %d images (%d per device × %d "
                "processes × %d accumulation), %d steps per epoch.", task.name, len(train_dataset),
                len(eval_dataset) if eval_dataset is not None else "no", num_labels, max_steps,
                total_batch, config.batch_size, accelerator.num_processes, config.gradient_accumulation_steps,
                steps_per_epoch)

    def evaluate_and_keep_best() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            metrics = task.evaluate(model, eval_loader, accelerator)
        model.train()
        accelerator.log(metrics, step=progress.global_step)
        logger.info("step %d: %s", progress.global_step,
                    ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
        if metrics[task.best_metric] > progress.best_metric:
            progress.best_metric, progress.best_step = metrics[task.best_metric], progress.global_step
            save_model(accelerator, model, processor, output_dir / "best",
                       {**metrics, "step": progress.global_step, "epoch": progress.epoch})
        return metrics

    model.train()
    bar = tqdm(total=max_steps, initial=progress.global_step, desc="train", dynamic_ncols=True,
               disable=not accelerator.is_local_main_process)
    running_loss = torch.zeros((), device=accelerator.device)
    running_batches = 0
    last_log_time, last_log_step = time.perf_counter(), progress.global_step
    metrics: dict[str, float] = {}
    evaluated_at = -1
    batches_per_epoch = len(train_loader)
    if progress.batches_in_epoch >= batches_per_epoch:
        progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0

    while progress.global_step < max_steps:
        train_loader.set_epoch(progress.epoch)
        skipped = progress.batches_in_epoch
        epoch_loader = accelerator.skip_first_batches(train_loader, skipped) if skipped else train_loader
        for batch in epoch_loader:
            # Every step draws from a generator seeded by (seed, step, rank), so that dropout and grad_ratio's
            # region choice do not depend on how many steps ran since the process started (resume-exact).
            micro_step = progress.epoch * batches_per_epoch + progress.batches_in_epoch
            torch.manual_seed((config.seed << 32) + micro_step * accelerator.num_processes
                              + accelerator.process_index)
            with accelerator.accumulate(model):
                loss = task.loss(model, batch)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and config.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            progress.batches_in_epoch += 1
            running_loss += loss.detach()
            running_batches += 1
            if not accelerator.sync_gradients:
                continue

            progress.global_step += 1
            bar.update(1)
            if progress.global_step % config.logging_steps == 0 or progress.global_step == max_steps:
                mean_loss = accelerator.reduce(running_loss / running_batches, reduction="mean").item()
                elapsed = time.perf_counter() - last_log_time
                steps = progress.global_step - last_log_step
                logged = {"train/loss": mean_loss, "train/epoch": progress.epoch + progress.batches_in_epoch
                          / batches_per_epoch, "train/images_per_second": steps * total_batch / max(elapsed, 1e-9)}
                for group in optimizer.param_groups:
                    if not group["name"].endswith("_no_decay"):
                        logged[f"train/lr_{group['name']}"] = group["lr"]
                if grad_norm is not None:
                    logged["train/grad_norm"] = float(grad_norm)
                if accelerator.device.type == "cuda":
                    logged["train/peak_memory_gb"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
                accelerator.log(logged, step=progress.global_step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
                running_loss.zero_()
                running_batches = 0
                last_log_time, last_log_step = time.perf_counter(), progress.global_step
            if eval_loader is not None and config.eval_steps and progress.global_step % config.eval_steps == 0:
                metrics, evaluated_at = evaluate_and_keep_best(), progress.global_step
            if config.checkpointing_steps and progress.global_step % config.checkpointing_steps == 0:
                save_checkpoint(accelerator, output_dir, progress.global_step, config.checkpoints_total_limit)
            if progress.global_step >= max_steps:
                break

        if progress.batches_in_epoch >= batches_per_epoch:
            if eval_loader is not None and not config.eval_steps and evaluated_at != progress.global_step:
                metrics, evaluated_at = evaluate_and_keep_best(), progress.global_step
            progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0
    bar.close()

    if eval_loader is not None and evaluated_at != progress.global_step:
        metrics = evaluate_and_keep_best()
    if eval_loader is None and progress.global_step > 0:
        save_model(accelerator, model, processor, output_dir / "best", {"step": progress.global_step})
    if config.checkpointing_steps and not (output_dir / "checkpoints" / f"step_{progress.global_step:06d}").exists():
        save_checkpoint(accelerator, output_dir, progress.global_step, config.checkpoints_total_limit)
    if config.verify_replicas:
        _verify_replicas(accelerator, model, output_dir)
    accelerator.end_training()
    if metrics:
        best_key = "best/" + task.best_metric.split("/", 1)[1]  # best/top1 or best/mean_iou
        metrics = {**metrics, best_key: progress.best_metric, "best/step": progress.best_step}
    return metrics


def save_model(accelerator, model, processor, folder: Path, metrics: dict) -> None:
    """`save_pretrained` of the unwrapped model (full state dict, also under FSDP) and the image processor."""
    state_dict = accelerator.get_state_dict(model)  # a collective under FSDP: every process calls it
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(folder, state_dict=state_dict, save_function=accelerator.save)
        processor.save_pretrained(folder)
        (folder / "eval_results.json").write_text(json.dumps(metrics, indent=2) + "\n")
    accelerator.wait_for_everyone()


def save_checkpoint(accelerator, output_dir: Path, step: int, total_limit: int | None) -> Path:
    """`accelerator.save_state` into `checkpoints/step_N.tmp`, renamed to `step_N` once every process is done,
    so that a run killed mid-save never resumes from half a checkpoint."""
    folder = output_dir / "checkpoints" / f"step_{step:06d}"
    partial = folder.with_name(folder.name + ".tmp")
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if folder.exists():
            shutil.rmtree(folder)
        partial.rename(folder)
        if total_limit:
            for old in _complete_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return folder


def _complete_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    folder = output_dir / "checkpoints"
    found = [(int(m.group(1)), p) for p in folder.glob("step_*") if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [path for _, path in sorted(found)]


def _checkpoint_to_resume(config: TrainConfig, output_dir: Path) -> Path | None:
    if config.resume == "none":
        return None
    if config.resume != "auto":
        path = Path(config.resume)
        if not path.is_dir():
            raise ValueError(f"`resume` checkpoint {path} does not exist.")
        return path
    checkpoints = _complete_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def _fsdp_wrap_present_layers(accelerator, model) -> None:
    """Under FSDP's transformer-based wrap, name only the `_no_split_modules` classes this model contains
    (Accelerate fails on a listed class that is absent, e.g. `XTMambaBlock` in an attention model)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or getattr(plugin, "transformer_cls_names_to_wrap", None) is not None:
        return
    present = {type(module).__name__ for module in model.modules()}
    plugin.transformer_cls_names_to_wrap = [name for name in model._no_split_modules if name in present]


def _verify_replicas(accelerator, model, output_dir: Path) -> None:
    """Hash this process's weights to `weights_rank{R}.sha256`; fail if the processes disagree."""
    from accelerate.utils import gather_object

    digest = hashlib.sha256()
    for name, tensor in sorted(accelerator.unwrap_model(model).state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    hexdigest = digest.hexdigest()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"weights_rank{accelerator.process_index}.sha256").write_text(hexdigest + "\n")
    hashes = gather_object([hexdigest])
    if len(set(hashes)) != 1:
        raise RuntimeError(f"The processes ended with different weights: {hashes}.")
    logger.info("All %d processes hold identical weights (sha256 %s).", len(hashes), hexdigest[:16])


def _flat_hparams(config: TrainConfig) -> dict[str, Any]:
    """Tracker-friendly hyper-parameters: scalars only, dicts flattened to dotted keys."""
    flat = {}
    for key, value in dataclasses.asdict(config).items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v if isinstance(v, int | float | str | bool) else str(v)
                         for k, v in value.items()})
        else:
            flat[key] = value
    return flat


if __name__ == "__main__":
    main(sys.argv[1:])


__all__ = ["ClassificationTask", "SegmentationTask", "TrainConfig", "add_parser", "main", "make_task",
           "save_checkpoint", "train"]
