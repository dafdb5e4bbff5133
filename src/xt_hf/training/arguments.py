"""Every setting of a training run: the `TrainConfig` dataclass, read through `transformers.HfArgumentParser`.

Settings come from a YAML/JSON file (`--config`), then flags (`--learning-rate 3e-4`, or `--learning_rate`),
then `--set key=value` (dotted keys reach into dict settings: `--set model_overrides.region_batch_size=16`);
later sources win. `HfArgumentParser` builds one flag per field, with the field's `help` metadata, and builds
the dataclass (`parse_dict`); what this module adds is a thin layer on top:

- values are taken loosely typed and converted to the field's type (`3e-4`, `null`, `true`, `1e3` for an
  int, YAML for dict fields), with an error that names the setting;
- an unknown key (file, flag-free `--set`, `from_dict`) is an error that suggests the closest field name;
- `--set` with dotted keys merges into dict fields instead of replacing them.

    config = TrainConfig.from_dict({"model": "m.json", "dataset": "d", "learning_rate": "3e-4"})
    config = parse_args(["--config", "run.yaml", "--batch-size", "4", "--set", "model_overrides.grad_ratio=0.5"])
"""

from __future__ import annotations

# Only the standard library, yaml and transformers' argument parser, never torch or a module of `xt_hf`:
# `xt_hf_cli.train` loads this file on its own to answer `xt-hf train --help` at once.
import argparse
import copy
import dataclasses
import difflib
import json
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

TASKS = ("auto", "classification", "segmentation", "detection")
DESCRIPTION = "Fine-tune an xT classifier or segmenter with 🤗 Accelerate: one script from a laptop CPU to many GPUs."
EPILOG = ("Settings come from the --config file, then flags, then --set; later sources win. "
          "docs/fine-tuning.md describes every setting.")


@dataclass
class TrainConfig:
    """Every setting of a training run. Field names are the YAML keys and, with dashes, the flags; each field's
    `help` metadata is its `--help` text (and its row in docs/fine-tuning.md)."""

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
        "help": "'classification', 'segmentation', 'detection', or 'auto': segmentation when the model is an "
                "XTForSemanticSegmentation or the training split has `mask_column`, detection when the model is an "
                "XTForObjectDetection or the training split has an `objects` column (COCO boxes), else "
                "classification."})
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

    # `HfArgumentParser` puts the flags of this dataclass in an argument group of this name.
    _argument_group_name = "settings (each overrides the config file)"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build and validate a config from loosely typed values (YAML, flags), naming any unknown or ill-typed
        key; dashes in keys count as underscores."""
        (config,) = train_argument_parser().parse_dict(coerce_settings(values))
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


FIELD_NAMES = tuple(item.name for item in dataclasses.fields(TrainConfig))
FIELD_TYPES = typing.get_type_hints(TrainConfig)


def setting_name(key: str) -> str:
    """`key` as a `TrainConfig` field name (dashes read as underscores); an unknown key is an error that suggests
    the closest field."""
    name = key.strip().replace("-", "_")
    if name not in FIELD_NAMES:
        close = difflib.get_close_matches(name, FIELD_NAMES, n=1)
        raise ValueError(f"Unknown training setting {name!r}" + (f"; did you mean {close[0]!r}?" if close else "."))
    return name


def coerce_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """Loosely typed settings → `{field name: value of the field's type}`; unknown keys and bad values fail."""
    settings = {}
    for key, value in values.items():
        name = setting_name(key)
        settings[name] = _coerce(name, value, FIELD_TYPES[name])
    return settings


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


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML or JSON file holds (a training config, or an XTConfig)."""
    text = Path(path).read_text()
    values = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(values).__name__}.")
    return values


def apply_overrides(values: Mapping[str, Any], assignments: Sequence[str]) -> dict[str, Any]:
    """The `--set KEY=VALUE` layer: a copy of `values` with each assignment applied in order. A plain key
    replaces the setting (the value is converted later, with the rest); a dotted key merges one YAML value into
    a dict setting (`model_overrides.context_num_layers=4`)."""
    values = copy.deepcopy(dict(values))
    for assignment in assignments:
        key, separator, raw = assignment.partition("=")
        if not separator:
            raise ValueError(f"--set expects KEY=VALUE, got {assignment!r}.")
        head, *rest = key.strip().split(".")
        head = setting_name(head)
        if not rest:
            values[head] = raw
            continue
        target = values.get(head)
        if target is None:
            target = values[head] = {}
        if not isinstance(target, dict):
            raise ValueError(f"--set {key}: `{head}` is not a dict setting.")
        for part in rest[:-1]:
            target = target.setdefault(part, {})
        target[rest[-1]] = yaml.safe_load(raw)
    return values


def train_argument_parser(**kwargs) -> HfArgumentParser:
    """`--config`, `--set` and `HfArgumentParser`'s flags for every `TrainConfig` field (`--learning-rate` and
    `--learning_rate`; booleans alone or with a value). Flags keep their strings (converted with the other
    sources) and are absent from the parsed namespace unless given, so that they override only what they name."""
    kwargs.setdefault("formatter_class", argparse.HelpFormatter)  # defaults are in the help texts
    parser = HfArgumentParser(TrainConfig, **kwargs)
    defaults = {item.name: item.default if item.default is not dataclasses.MISSING else item.default_factory()
                for item in dataclasses.fields(TrainConfig)}
    for action in parser._actions:
        if action.dest in defaults:
            action.type, action.default = None, argparse.SUPPRESS
            types = typing.get_args(FIELD_TYPES[action.dest]) or (FIELD_TYPES[action.dest],)
            action.metavar = next(kind.__name__.upper() for kind in types if kind is not type(None))
            default = defaults[action.dest]
            shown = "null" if default is None else json.dumps(default) if isinstance(default, dict | bool) else default
            action.help = f"{action.help or ''} (default: {shown})".replace("%", "%%").lstrip()
    parser.add_argument("--config", help="YAML or JSON file of settings (TrainConfig fields).")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override one setting; dotted keys reach into dicts. Repeatable; wins over flags.")
    return parser


def train_command_parser(prog: str = "python -m xt_hf.training") -> HfArgumentParser:
    """The parser of the `xt-hf train` command. It lives here, with the settings, because this module needs no
    torch: `xt-hf train --help` and argument errors are answered from it alone (see `xt_hf_cli.train`)."""
    return train_argument_parser(prog=prog, description=DESCRIPTION, epilog=EPILOG)


def config_from_arguments(arguments: argparse.Namespace) -> TrainConfig:
    """The config of a parsed command line: the `--config` file, then the flags given, then `--set`."""
    values: dict[str, Any] = {}
    if arguments.config:
        try:
            values = coerce_settings(read_config_file(arguments.config))
        except ValueError as error:
            raise ValueError(f"{arguments.config}: {error}") from None
    values.update({name: getattr(arguments, name) for name in FIELD_NAMES if hasattr(arguments, name)})
    return TrainConfig.from_dict(apply_overrides(values, arguments.set))


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """`TrainConfig` from command-line arguments (`--config FILE`, flags, `--set KEY=VALUE`)."""
    return config_from_arguments(train_argument_parser().parse_args(argv))


__all__ = ["TASKS", "TrainConfig", "apply_overrides", "coerce_settings", "config_from_arguments", "parse_args",
           "read_config_file", "train_argument_parser", "train_command_parser"]
