"""The data side of training: load the splits a `TrainConfig` names, decode and check each image, run the image
processor, and pad mixed sizes into batches.

    dataset = prepare_dataset(dataset, processor, label2id=label2id)   # set_transform: decode, check, preprocess
    batch = RegionPaddingCollator(region_size)(examples)              # pad mixed sizes to one region multiple

(`segmentation_data` does the same for (image, mask) pairs.) Every error raised for bad data names the
sample: its index in the dataset and, where the dataset knows it, the image file.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset, load_from_disk
from datasets import Image as ImageFeature
from PIL import Image

from ..image_processing_xt import padded_frame

if TYPE_CHECKING:
    from .arguments import TrainConfig

SAMPLE_INDEX_COLUMN = "__xt_sample_index__"


class BadSampleError(ValueError):
    """A sample of the dataset cannot be used; the message names it (index, and file where known)."""


def find_image_column(dataset, image_column: str | None = None) -> str:
    """`image_column` if given, else the dataset's first column with an `Image` feature (or named "image"/"img")."""
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
            image = _open_file_cell(image)
            if isinstance(image, np.ndarray | torch.Tensor | list):  # arrays, or nested lists of pixel values
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

    def _pixel_values(self, image: Image.Image, name: str, **processor_options) -> torch.Tensor:
        region = self.processor.region_size
        width, height = image.size
        if not self.processor.do_resize and (height < region or width < region):
            raise BadSampleError(
                f"{name} is {height}×{width} px (height×width), smaller than one region ({region}×{region} px): "
                f"drop it (dataset.filter), resize it (XTImageProcessor(do_resize=True)), or use a model with a "
                f"smaller region_size."
            )
        try:
            return self.processor(image, return_tensors="pt", **processor_options)["pixel_values"][0]
        except ValueError as error:
            raise BadSampleError(f"{name}: {error}") from error

    def _label_id(self, label: Any, name: str) -> int:
        if label is None:
            raise BadSampleError(f"{name} has no label.")
        if self.label_names is not None and isinstance(label, int | np.integer):
            if not 0 <= label < len(self.label_names):
                raise BadSampleError(
                    f"{name} has label {label}, outside the dataset's {len(self.label_names)} classes.")
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
    image_column = find_image_column(dataset, image_column)
    dataset = _undecoded_with_sample_index(dataset, [image_column])
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
        size = self.padded_size(pixel_values)
        batch = {"pixel_values": pad_bottom_right(pixel_values, size, self.pad_value).float()}
        if "labels" in examples[0]:
            batch["labels"] = torch.tensor([int(example["labels"]) for example in examples], dtype=torch.long)
        return batch

    def padded_size(self, tensors: Sequence[torch.Tensor]) -> tuple[int, int]:
        """The batch's largest height and width, each rounded up to whole regions."""
        return padded_frame([t.shape[-2:] for t in tensors], self.region_size)


def pad_bottom_right(tensors: Sequence[torch.Tensor], size: tuple[int, int], value: float) -> torch.Tensor:
    """Pad each `(..., h_i, w_i)` tensor at the bottom and right with `value` to `size` and stack them."""
    height, width = size
    return torch.stack([F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]), value=value) for t in tensors])



def _open_file_cell(cell: Any) -> Any:
    """An `Image(decode=False)` cell (`{"bytes": ..., "path": ...}`) or a file path → a lazily opened PIL image;
    anything else (an image, an array) unchanged."""
    if isinstance(cell, Mapping):
        return Image.open(io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell["path"])
    if isinstance(cell, str):
        return Image.open(cell)
    return cell


def _undecoded_with_sample_index(dataset, columns: Sequence[str]):
    """The dataset with its `Image` columns among `columns` read undecoded (the transform decodes them and
    names the sample when one is corrupt) and a column of each row's index."""
    for column in columns:
        if isinstance(dataset.features[column], ImageFeature):
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
    if SAMPLE_INDEX_COLUMN not in dataset.column_names:
        dataset = dataset.add_column(SAMPLE_INDEX_COLUMN, np.arange(len(dataset)))
    return dataset


def _sample_name(index: Any, image: Any) -> str:
    """"Sample 17 (path/to/file.jpg)", or "Sample 17" when the dataset holds no path."""
    path = image.get("path") if isinstance(image, Mapping) else image if isinstance(image, str) else None
    path = path or getattr(image, "filename", None)
    label = f"Sample {int(index)}" if index is not None else "A sample"
    return f"{label} ({path})" if path else label


def load_splits(config: TrainConfig, accelerator) -> tuple[Dataset, Dataset | None]:
    """The training split and the eval split (or `None`) that `config` names, as `datasets.Dataset`s, not yet
    transformed: `dataset` is a Hub name, `imagefolder:PATH` or a `save_to_disk` folder; without an eval split,
    `eval_fraction` of the training split is held out (seeded); `max_*_samples` keep the first N."""
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


__all__ = [
    "SAMPLE_INDEX_COLUMN",
    "BadSampleError",
    "RegionPaddingCollator",
    "XTTransform",
    "dataset_label_names",
    "find_image_column",
    "has_named_labels",
    "infer_id2label",
    "load_splits",
    "pad_bottom_right",
    "prepare_dataset",
]
