"""Pieces shared by `transformers.Trainer` recipes and `xt_hf.train`: the dataset transform, the collator, metrics.

A `datasets` image dataset goes through three steps:

    dataset = prepare_dataset(dataset, processor, label2id)      # set_transform: decode, check, preprocess
    batch = RegionPaddingCollator(region_size)(examples)        # pad mixed sizes to one region multiple
    metrics = compute_metrics(EvalPrediction(logits, labels))   # top-1 / top-5 accuracy

Every error raised for bad data names the sample: its index in the dataset and, where the dataset knows
it, the image file.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SAMPLE_INDEX_COLUMN = "__xt_sample_index__"


class BadSampleError(ValueError):
    """A sample of the dataset cannot be used; the message names it (index, and file where known)."""


def find_image_column(dataset, image_column: str | None = None) -> str:
    """`image_column` if given, else the dataset's first column with an `Image` feature (or named "image"/"img")."""
    from datasets import Image as ImageFeature

    columns = dataset.column_names
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(f"The dataset has no column {image_column!r}; its columns are {columns}.")
        return image_column
    for name, feature in dataset.features.items():
        if isinstance(feature, ImageFeature):
            return name
    for name in ("image", "img", "pixel_values"):
        if name in columns:
            return name
    raise ValueError(f"Found no image column in {columns}: pass image_column.")


def dataset_label_names(dataset, label_column: str) -> list[str] | None:
    """Class names a dataset declares for `label_column` (a `ClassLabel`), else `None`."""
    from datasets import ClassLabel

    feature = dataset.features.get(label_column)
    return list(feature.names) if isinstance(feature, ClassLabel) else None


def infer_id2label(dataset, label_column: str) -> dict[int, str]:
    """Class ids → names for a dataset: its `ClassLabel` names, or its distinct label values in sorted order."""
    names = dataset_label_names(dataset, label_column)
    if names is None:
        values = sorted(value for value in dataset.unique(label_column) if value is not None)
        names = [str(value) for value in values]
        if values and all(isinstance(value, int) for value in values):
            names = [str(i) for i in range(max(values) + 1)]
    return dict(enumerate(names))


def has_named_labels(config) -> bool:
    """Whether a model config carries real class names (not transformers' placeholder `LABEL_0`, `LABEL_1`...)."""
    id2label = getattr(config, "id2label", None) or {}
    return bool(id2label) and any(name != f"LABEL_{i}" for i, name in id2label.items())


class XTTransform:
    """The `set_transform` function: decode each image, check it, run the image processor, map its label.

    Works on the batches `datasets` hands to a transform (a dict of columns). Returns `pixel_values`, one
    `(channels, H, W)` tensor per sample (sizes may differ; `RegionPaddingCollator` pads them into a batch),
    and `labels` when the dataset has a label column.

    Args:
        processor: an `XTImageProcessor` (its `region_size`, `do_resize` and `num_channels` decide the checks).
        label2id: class name → model class id. `None` passes integer labels through unchanged.
        image_column, label_column: dataset columns; a missing label column gives unlabelled samples.
        label_names: the dataset's `ClassLabel` names, so that its integer labels are mapped by name.
        augment: optional `PIL.Image -> PIL.Image` applied before the processor (training only).
        convert_rgb: convert grayscale, palette and RGBA images to RGB when the processor wants 3 channels.
    """

    def __init__(
        self,
        processor,
        *,
        label2id: Mapping[str, int] | None = None,
        image_column: str = "image",
        label_column: str | None = "label",
        label_names: Sequence[str] | None = None,
        augment: Callable[[Image.Image], Image.Image] | None = None,
        convert_rgb: bool = True,
    ):
        self.processor = processor
        self.label2id = dict(label2id) if label2id is not None else None
        self.image_column = image_column
        self.label_column = label_column
        self.label_names = list(label_names) if label_names is not None else None
        self.augment = augment
        self.convert_rgb = convert_rgb

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        images = batch[self.image_column]
        indices = batch.get(SAMPLE_INDEX_COLUMN, [None] * len(images))
        labels = batch.get(self.label_column) if self.label_column else None
        output = {"pixel_values": []}
        if labels is not None:
            output["labels"] = []
        for position, (image, index) in enumerate(zip(images, indices)):
            name = _sample_name(index, image)
            pil_image = self._decode(image, name)
            output["pixel_values"].append(self._pixel_values(pil_image, name))
            if labels is not None:
                output["labels"].append(self._label_id(labels[position], name))
        return output

    def _decode(self, image: Any, name: str) -> Image.Image:
        try:
            if isinstance(image, Mapping):  # an `Image(decode=False)` cell: {"bytes": ..., "path": ...}
                source = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else image["path"]
                image = Image.open(source)
            elif isinstance(image, str):
                image = Image.open(image)
            elif isinstance(image, np.ndarray | torch.Tensor | list):  # arrays, or nested lists of pixel values
                array = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
                image = Image.fromarray(array.astype(np.uint8) if array.dtype != np.uint8 else array)
            if not isinstance(image, Image.Image):
                raise TypeError(f"expected an image, got {type(image).__name__}")
            image.load()  # PIL decodes lazily: make a truncated or corrupt file fail here, not later
        except Exception as error:
            raise BadSampleError(f"{name}: cannot decode the image ({type(error).__name__}: {error}).") from error
        if self.convert_rgb and getattr(self.processor, "num_channels", 3) == 3 and image.mode != "RGB":
            image = image.convert("RGB")
        if self.augment is not None:
            image = self.augment(image)
        return image

    def _pixel_values(self, image: Image.Image, name: str) -> torch.Tensor:
        region = self.processor.region_size
        width, height = image.size
        if not self.processor.do_resize and (height < region or width < region):
            raise BadSampleError(
                f"{name} is {height}×{width} px (height×width), smaller than one region ({region}×{region} px): "
                f"drop it (dataset.filter), resize it (XTImageProcessor(do_resize=True)), or use a model with a "
                f"smaller region_size."
            )
        try:
            return self.processor(image, return_tensors="pt")["pixel_values"][0]
        except ValueError as error:
            raise BadSampleError(f"{name}: {error}") from error

    def _label_id(self, label: Any, name: str) -> int:
        if label is None:
            raise BadSampleError(f"{name} has no label.")
        if self.label_names is not None and isinstance(label, int | np.integer):
            if not 0 <= label < len(self.label_names):
                raise BadSampleError(f"{name} has label {label}, outside the dataset's {len(self.label_names)} classes.")
            label = self.label_names[label]
        if self.label2id is None:
            if isinstance(label, int | np.integer):
                return int(label)
            raise BadSampleError(f"{name} has label {label!r}: pass label2id to map class names to ids.")
        if isinstance(label, int | np.integer) and str(label) not in self.label2id:
            if 0 <= label < len(self.label2id):
                return int(label)
        key = str(label)
        if key not in self.label2id:
            known = ", ".join(repr(k) for k in list(self.label2id)[:20])
            more = f", ... ({len(self.label2id)} in all)" if len(self.label2id) > 20 else ""
            raise BadSampleError(
                f"{name} has label {label!r}, which is not in the model's label2id ({known}{more}): fix the label, "
                f"or train a model whose config lists it (id2label/label2id)."
            )
        return self.label2id[key]


def prepare_dataset(
    dataset,
    processor,
    *,
    label2id: Mapping[str, int] | None = None,
    image_column: str | None = None,
    label_column: str | None = "label",
    augment: Callable[[Image.Image], Image.Image] | None = None,
):
    """Attach an `XTTransform` to a `datasets.Dataset` with `set_transform`; returns the new dataset.

    The image column is read undecoded (`Image(decode=False)`) and decoded by the transform, and a column with
    each row's index is added, so that a corrupt file is reported with its index and path instead of failing
    inside `datasets`. Use `remove_unused_columns=False` with `Trainer`: the transform needs the raw columns.
    """
    from datasets import Image as ImageFeature

    image_column = find_image_column(dataset, image_column)
    if isinstance(dataset.features[image_column], ImageFeature):
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
    if SAMPLE_INDEX_COLUMN not in dataset.column_names:
        dataset = dataset.add_column(SAMPLE_INDEX_COLUMN, np.arange(len(dataset)))
    if label_column is not None and label_column not in dataset.column_names:
        label_column = None
    transform = XTTransform(
        processor,
        label2id=label2id,
        image_column=image_column,
        label_column=label_column,
        label_names=dataset_label_names(dataset, label_column) if label_column else None,
        augment=augment,
    )
    dataset.set_transform(transform)
    return dataset


class RegionPaddingCollator:
    """Stack samples of different sizes: pad each `(C, H_i, W_i)` at the bottom and right to the batch's
    largest height and width, rounded up to whole regions, with `pad_value` (0.0, the mean colour after
    ImageNet normalisation, as `XTImageProcessor` pads).

    Returns `{"pixel_values": (batch, C, H, W) float32, "labels": (batch,) int64}` (labels when present).
    """

    def __init__(self, region_size: int, pad_value: float = 0.0):
        self.region_size = region_size
        self.pad_value = pad_value

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        pixel_values = [torch.as_tensor(example["pixel_values"]) for example in examples]
        region = self.region_size
        height = -(-max(p.shape[-2] for p in pixel_values) // region) * region
        width = -(-max(p.shape[-1] for p in pixel_values) // region) * region
        batch = {
            "pixel_values": torch.stack([
                F.pad(p, (0, width - p.shape[-1], 0, height - p.shape[-2]), value=self.pad_value)
                for p in pixel_values
            ]).float()
        }
        if "labels" in examples[0]:
            batch["labels"] = torch.tensor([int(example["labels"]) for example in examples], dtype=torch.long)
        return batch


def top_k_accuracy(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, k: int = 1) -> float:
    """Fraction of samples whose label is among the `k` highest logits. `logits` `(n, classes)`, `labels` `(n,)`.

    `k` larger than the number of classes counts every sample as correct (as top-5 on a 4-class task would).
    """
    logits = torch.as_tensor(np.asarray(logits) if not isinstance(logits, torch.Tensor) else logits).float()
    labels = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels).long()
    if len(labels) == 0:
        return float("nan")
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return (top == labels[:, None]).any(dim=-1).float().mean().item()


def compute_metrics(eval_prediction) -> dict[str, float]:
    """`Trainer`'s `compute_metrics`: top-1 and top-5 accuracy from an `EvalPrediction`.

    Computed locally: `evaluate.load("accuracy")` fetches the metric's script from the Hub, which fails
    offline and on clusters without internet, and has no top-k variant.
    """
    logits = eval_prediction.predictions
    if isinstance(logits, tuple):
        logits = logits[0]
    labels = eval_prediction.label_ids
    return {"top1": top_k_accuracy(logits, labels, 1), "top5": top_k_accuracy(logits, labels, 5)}


def _sample_name(index: Any, image: Any) -> str:
    """"Sample 17 (path/to/file.jpg)", or "Sample 17" when the dataset holds no path."""
    path = image.get("path") if isinstance(image, Mapping) else image if isinstance(image, str) else None
    path = path or getattr(image, "filename", None)
    label = f"Sample {int(index)}" if index is not None else "A sample"
    return f"{label} ({path})" if path else label


__all__ = [
    "BadSampleError",
    "RegionPaddingCollator",
    "XTTransform",
    "compute_metrics",
    "dataset_label_names",
    "find_image_column",
    "has_named_labels",
    "infer_id2label",
    "prepare_dataset",
    "top_k_accuracy",
]
