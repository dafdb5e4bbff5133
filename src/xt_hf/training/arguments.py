"""Every setting of a training run, in four `HfArgumentParser` dataclasses: `ModelArguments`, `DataArguments`,
`OptimizationArguments` and `RunArguments`. The loop receives them together as one frozen `TrainConfig`, which
reads as if flat (`config.learning_rate`).

A run's settings come from a YAML or JSON file (`--config`), then flags (`--learning-rate 3e-4`, or
`--learning_rate`); flags win. The file's values become the parser's defaults, so they go through the same `type=`
conversion as a flag (YAML reads `3e-4` as a string: it arrives as the float 3e-4); a key that is no setting is an
error that suggests the closest one. Dict settings (`model_overrides`, `processor_overrides`) take a JSON object on
the command line.

    config = TrainConfig.from_dict({"model": "m.json", "dataset": "d", "learning_rate": "3e-4"})
    config = parse_args(["--config", "run.yaml", "--batch-size", "4", "--model-overrides", '{"grad_ratio": 0.5}'])
"""

import argparse
import dataclasses
import difflib
import json
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import HfArgumentParser

Task = Literal["auto", "classification", "segmentation", "detection"]
LabelSource = Literal["auto", "model", "data"]
MixedPrecision = Literal["no", "bf16", "fp16"]
TASKS = typing.get_args(Task)
DESCRIPTION = ("Fine-tune an xT classifier, segmenter or detector with 🤗 Accelerate: one script from a laptop CPU "
               "to many GPUs.")
EPILOG = "Flags override the --config file. docs/fine-tuning.md describes every setting."


@dataclass
class ModelArguments:
    """The model to fine-tune, what it predicts, and how it and its image processor differ from their saved form."""

    _argument_group_name = "model"

    model: str = field(default="", metadata={"help": "Hub id or local folder of a saved xT model, or an XTConfig "
                                                     "JSON/YAML file (a new, randomly initialised model)."})
    # `dict | str | None` because that is how HfArgumentParser reads a JSON string from the command line (as
    # TrainingArguments does); __post_init__ leaves a dict.
    model_overrides: dict | str | None = field(default_factory=dict, metadata={
        "help": 'XTConfig fields to override, e.g. {"region_batch_size": 16, "grad_ratio": 0.5}.'})
    processor_overrides: dict | str | None = field(default_factory=dict, metadata={
        "help": 'XTImageProcessor settings, e.g. {"do_resize": true}.'})
    task: Task = field(default="auto", metadata={
        "help": "'segmentation' when the model is an XTForSemanticSegmentation or the training split has "
                "`mask_column`, 'detection' when the model is an XTForObjectDetection or the training split has an "
                "`objects` column (COCO boxes), else 'classification'; 'auto' chooses so."})
    label_source: LabelSource = field(default="auto", metadata={
        "help": "Where the class list comes from: 'model' (the model config's id2label; other labels are errors), "
                "'data' (the training split's labels; a new head if they differ), or 'auto' ('model' when the "
                "config names classes and the training labels are among them, else 'data')."})

    def __post_init__(self):
        if not self.model:
            raise ValueError("Set `model`: a Hub id, a saved model folder, or an XTConfig JSON file.")
        self.model_overrides = json_object("model_overrides", self.model_overrides)
        self.processor_overrides = json_object("processor_overrides", self.processor_overrides)
        check_choice("task", self.task, Task)
        check_choice("label_source", self.label_source, LabelSource)


@dataclass
class DataArguments:
    """Which samples, from where, in which columns, and how they are loaded."""

    _argument_group_name = "data"

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
    mask_column: str = field(default="mask", metadata={
        "help": "Segmentation masks: an Image feature (mode L/P/I) or 2-D array of class ids per pixel, the size "
                "of its image; XTConfig.semantic_loss_ignore_index (255) marks unlabelled pixels."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training samples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N eval samples."})
    num_workers: int = field(default=2, metadata={"help": "DataLoader worker processes per device."})

    def __post_init__(self):
        if not self.dataset:
            raise ValueError("Set `dataset`: a Hub dataset name, 'imagefolder:PATH', or a save_to_disk folder.")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"`eval_fraction` must be in [0, 1), got {self.eval_fraction}.")


@dataclass
class OptimizationArguments:
    """How long, in what batches, with which optimizer, schedule, loss and precision."""

    _argument_group_name = "optimisation"

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
        "help": "Peak LR of the head (classifier, or segmentation / detection decoder). Default: learning_rate."})
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
    mixed_precision: MixedPrecision | None = field(default=None, metadata={
        "help": "Accelerate autocast; unset (null), the `accelerate launch` config's setting, else no."})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "Recompute backbone and context-encoder activations in the backward pass."})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the region encoder's backbone and the context encoder (inductor); the first "
                "steps, and each new region batch or image shape, compile first."})

    def __post_init__(self):
        for name in ("batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be ≥ 1, got {getattr(self, name)}.")
        if self.mixed_precision is not None:
            check_choice("mixed_precision", self.mixed_precision, MixedPrecision)


@dataclass
class RunArguments:
    """Where the run writes, when it evaluates, saves and logs, and on what hardware."""

    _argument_group_name = "run"

    output_dir: str = field(default="xt-finetuned", metadata={"help": "Where checkpoints, logs and best/ go."})
    seed: int = field(default=0, metadata={"help": "Seed of the initialisation, the data order and every step."})
    eval_steps: int | None = field(default=None, metadata={
        "help": "Evaluate every N optimizer steps; default at the end of each epoch. Always at the end."})
    checkpointing_steps: int | None = field(default=500, metadata={
        "help": "Save the full training state every N optimizer steps (and at the end); 0 or null disables."})
    checkpoints_total_limit: int | None = field(default=2, metadata={
        "help": "Keep only the newest N checkpoints; 0 or null keeps all."})
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

    def __post_init__(self):
        if self.logging_steps < 1:
            raise ValueError(f"`logging_steps` must be ≥ 1, got {self.logging_steps}.")


ARGUMENT_GROUPS = (ModelArguments, DataArguments, OptimizationArguments, RunArguments)
SETTING_NAMES = tuple(item.name for group in ARGUMENT_GROUPS for item in dataclasses.fields(group))


@dataclass(frozen=True)
class TrainConfig:
    """The settings of one training run: its four argument groups, read as one (`config.learning_rate` is
    `config.optimization_arguments.learning_rate`)."""

    model_arguments: ModelArguments
    data_arguments: DataArguments
    optimization_arguments: OptimizationArguments
    run_arguments: RunArguments

    def __getattr__(self, name: str) -> Any:
        # Called only for names that are not a field of the container: look the setting up in its group.
        for group in self.__dict__.values():
            if name in group.__dataclass_fields__:
                return getattr(group, name)
        raise AttributeError(f"{type(self).__name__} has no setting {name!r}.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """The config of a mapping of settings (as in a config file); values may be strings, as on the command line."""
        return parse_settings(values)

    def to_dict(self) -> dict[str, Any]:
        """Every setting by name: what a `--config` file of this run holds."""
        return {name: value for group in self.__dict__.values() for name, value in dataclasses.asdict(group).items()}


def json_object(name: str, value: dict | str | None) -> dict:
    """A dict setting as a dict: given as a mapping (config file), a JSON object (command line), or null."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"`{name}` must be a JSON object, got {value!r} ({error}).") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"`{name}` must be a mapping (a JSON object), got {value!r}.")
    return value


def check_choice(name: str, value: Any, choices: Any) -> None:
    """argparse checks the choices of a flag, not those of a config file's value, which arrive as defaults."""
    if value not in typing.get_args(choices):
        raise ValueError(f"`{name}` must be one of {', '.join(typing.get_args(choices))}, got {value!r}.")


def check_setting_names(keys) -> None:
    """Every key must name a setting; the error suggests the closest one."""
    for key in keys:
        if key not in SETTING_NAMES:
            close = difflib.get_close_matches(key, SETTING_NAMES, n=1)
            raise ValueError(f"Unknown training setting {key!r}" + (f"; did you mean {close[0]!r}?" if close else "."))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML or JSON file holds (a training config, or an XTConfig)."""
    text = Path(path).read_text()
    values = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(values).__name__}.")
    return values


def train_argument_parser(**kwargs) -> HfArgumentParser:
    """`HfArgumentParser` over the four argument groups (a flag per setting, `--learning-rate` and
    `--learning_rate`, a help group per dataclass), and `--config FILE`."""
    parser = HfArgumentParser(ARGUMENT_GROUPS, **kwargs)
    parser.add_argument("--config", help="YAML or JSON file of settings; flags override it.")
    return parser


def parse_settings(values: Mapping[str, Any], argv: Sequence[str] = (),
                   parser: HfArgumentParser | None = None) -> TrainConfig:
    """The config of `values` (a config file's mapping) overridden by the flags in `argv`. Errors in the settings
    raise ValueError naming the setting; argparse exits on `--help`."""
    check_setting_names(values)
    parser = parser or train_argument_parser()
    parser.exit_on_error = False
    # Defaults that are strings go through the flag's `type=`, as if given on the command line.
    parser.set_defaults(**{name: value if value is None or isinstance(value, dict) else str(value)
                           for name, value in values.items()})
    try:
        *groups, _, unknown = parser.parse_args_into_dataclasses(
            list(argv), return_remaining_strings=True, look_for_args_file=False)
    except argparse.ArgumentError as error:
        raise ValueError(str(error)) from None
    if unknown:
        raise ValueError(f"unrecognized arguments: {' '.join(unknown)}")
    return TrainConfig(*groups)


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> TrainConfig:
    """`TrainConfig` from command-line arguments: `--config FILE`, then the flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = train_argument_parser(prog=prog, description=DESCRIPTION, epilog=EPILOG)
    known, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ValueError(f"unrecognized arguments: {' '.join(unknown)}")
    config_file = known.config
    try:
        values = read_config_file(config_file) if config_file else {}
        check_setting_names(values)
    except ValueError as error:
        raise ValueError(f"{config_file}: {error}") from None
    return parse_settings(values, argv, parser)


__all__ = ["ARGUMENT_GROUPS", "TASKS", "DataArguments", "ModelArguments", "OptimizationArguments", "RunArguments",
           "TrainConfig", "parse_args", "parse_settings", "read_config_file", "train_argument_parser"]
