"""Pieces shared by `transformers.Trainer` recipes and `xt_hf.train`: the dataset transform, the collator, metrics.

A `datasets` image dataset goes through three steps:

    dataset = prepare_dataset(dataset, processor, label2id)      # set_transform: decode, check, preprocess
    batch = RegionPaddingCollator(region_size)(examples)        # pad mixed sizes to one region multiple
    metrics = compute_metrics(EvalPrediction(logits, labels))   # top-1 / top-5 accuracy

and a segmentation dataset of (image, mask) pairs through the same three:

    dataset = prepare_segmentation_dataset(dataset, processor, num_labels=3)   # masks checked with their images
    batch = SegmentationPaddingCollator(region_size)(examples)                # masks padded with the ignore index
    metrics = compute_segmentation_metrics(EvalPrediction(class_maps, masks), num_labels=3)   # mean IoU

Every error raised for bad data names the sample: its index in the dataset and, where the dataset knows
it, the image file.
"""

from __future__ import annotations

import io
import re
import warnings
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
        region = self.region_size
        return (-(-max(t.shape[-2] for t in tensors) // region) * region,
                -(-max(t.shape[-1] for t in tensors) // region) * region)


def pad_bottom_right(tensors: Sequence[torch.Tensor], size: tuple[int, int], value: float) -> torch.Tensor:
    """Pad each `(..., h_i, w_i)` tensor at the bottom and right with `value` to `size` and stack them."""
    height, width = size
    return torch.stack([F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]), value=value) for t in tensors])


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


# --------------------------------------------------------------------------------------------------------
# Semantic segmentation: (image, mask) pairs


class XTSegmentationTransform(XTTransform):
    """The `set_transform` function for (image, mask) pairs: decode both, check the mask against its image and
    the class list, run the image processor (unpadded) and resize the mask along with the image.

    Returns `pixel_values` `(channels, h, w)` and `labels` `(h, w)` int64 per sample, of the same size;
    `SegmentationPaddingCollator` pads both to whole regions.

    Args:
        processor: an `XTImageProcessor`. With `do_resize`, masks are resized with nearest-neighbour.
        num_labels: classes of the model; a mask id ≥ `num_labels` (other than `ignore_index`) is an error.
        ignore_index: the unlabelled value (`XTConfig.semantic_loss_ignore_index`, 255 by default).
        image_column, mask_column: dataset columns. A mask is an image of class ids (mode L, P or I) or a
            2-D array.
        augment: optional `(PIL image, PIL mask) -> (PIL image, PIL mask)` applied before the processor
            (geometric transforms must move both alike).
    """

    def __init__(
        self,
        processor,
        *,
        num_labels: int,
        ignore_index: int = 255,
        image_column: str = "image",
        mask_column: str = "mask",
        augment: Callable[[Image.Image, Image.Image], tuple[Image.Image, Image.Image]] | None = None,
        convert_rgb: bool = True,
    ):
        super().__init__(processor, image_column=image_column, label_column=None, convert_rgb=convert_rgb)
        self.num_labels = num_labels
        self.ignore_index = ignore_index
        self.mask_column = mask_column
        self.joint_augment = augment

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        images, masks = batch[self.image_column], batch[self.mask_column]
        indices = batch.get(SAMPLE_INDEX_COLUMN, [None] * len(images))
        output = {"pixel_values": [], "labels": []}
        for image, mask, index in zip(images, masks, indices):
            name = _sample_name(index, image)
            pil_image = self._decode(image, name)
            mask = self._decode_mask(mask, name)
            if mask.shape != (pil_image.height, pil_image.width):
                raise BadSampleError(
                    f"{name}: its mask is {mask.shape[0]}×{mask.shape[1]} px (height×width) but its image is "
                    f"{pil_image.height}×{pil_image.width} px; a mask must label every pixel of its image."
                )
            self._check_class_ids(mask, name)
            if self.joint_augment is not None:
                pil_image, pil_mask = self.joint_augment(pil_image, Image.fromarray(mask.astype(np.int32)))
                mask = np.asarray(pil_mask, dtype=np.int64)
            pixel_values = self._pixel_values(pil_image, name, do_pad=False)
            if mask.shape != tuple(pixel_values.shape[-2:]):  # do_resize: nearest keeps ids whole
                resized = Image.fromarray(mask.astype(np.int32)).resize(
                    (pixel_values.shape[-1], pixel_values.shape[-2]), resample=Image.NEAREST)
                mask = np.asarray(resized, dtype=np.int64)
            output["pixel_values"].append(pixel_values)
            output["labels"].append(torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int64)))
        return output

    def _decode_mask(self, mask: Any, name: str) -> np.ndarray:
        """A mask cell (image, file, bytes, array or nested lists) → `(height, width)` int64 class ids."""
        try:
            mask = _open_file_cell(mask)
            if isinstance(mask, Image.Image):
                mask.load()
                if mask.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
                    raise BadSampleError(
                        f"{name}: its mask is a {mask.mode} image; a mask must hold one class id per pixel "
                        f"(mode L, P or I, or a 2-D array), not colours."
                    )
                mask = np.asarray(mask)
            array = mask.numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        except BadSampleError:
            raise
        except Exception as error:
            raise BadSampleError(f"{name}: cannot decode the mask ({type(error).__name__}: {error}).") from error
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != 2:
            raise BadSampleError(f"{name}: its mask has shape {array.shape}; a mask must be (height, width) class ids.")
        if array.dtype.kind == "f":
            if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
                raise BadSampleError(f"{name}: its mask holds non-integer values; a mask must hold class ids.")
        elif array.dtype.kind not in "iub":
            raise BadSampleError(f"{name}: its mask has dtype {array.dtype}; a mask must hold integer class ids.")
        return array.astype(np.int64)

    def _check_class_ids(self, mask: np.ndarray, name: str) -> None:
        ids = np.unique(mask)
        bad = ids[((ids < 0) | (ids >= self.num_labels)) & (ids != self.ignore_index)]
        if len(bad):
            shown = ", ".join(str(int(i)) for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
            raise BadSampleError(
                f"{name}: its mask holds class ids {shown}, outside the model's {self.num_labels} classes "
                f"(0–{self.num_labels - 1}, and {self.ignore_index} for unlabelled pixels): fix the mask, or train a "
                f"model with more classes (num_labels)."
            )


def prepare_segmentation_dataset(
    dataset,
    processor,
    *,
    num_labels: int,
    ignore_index: int = 255,
    image_column: str | None = None,
    mask_column: str = "mask",
    augment: Callable[[Image.Image, Image.Image], tuple[Image.Image, Image.Image]] | None = None,
):
    """Attach an `XTSegmentationTransform` to a `datasets.Dataset` of (image, mask) pairs; returns the new dataset.

    As `prepare_dataset`: `Image` columns are read undecoded and decoded by the transform, and a sample-index
    column is added, so that every bad sample is reported by index (and file). Use `remove_unused_columns=False`
    with `Trainer`.
    """
    from datasets import Image as ImageFeature

    if mask_column not in dataset.column_names:
        raise ValueError(f"The dataset has no mask column {mask_column!r}; its columns are {dataset.column_names}.")
    if image_column is None:
        image_column = next((name for name, feature in dataset.features.items()
                             if isinstance(feature, ImageFeature) and name != mask_column), None)
    image_column = find_image_column(dataset, image_column)
    dataset = _undecoded_with_sample_index(dataset, [image_column, mask_column])
    dataset.set_transform(XTSegmentationTransform(
        processor, num_labels=num_labels, ignore_index=ignore_index, image_column=image_column,
        mask_column=mask_column, augment=augment,
    ))
    return dataset


class SegmentationPaddingCollator(RegionPaddingCollator):
    """Stack (image, mask) samples of different sizes: pad each `(C, H_i, W_i)` image with `pad_value` and its
    `(H_i, W_i)` mask with `ignore_index`, at the bottom and right, to the batch's largest height and width
    rounded up to whole regions. The padding is then never scored by the loss or the metrics.

    Returns `{"pixel_values": (batch, C, H, W) float32, "labels": (batch, H, W) int64}`.
    """

    def __init__(self, region_size: int, pad_value: float = 0.0, ignore_index: int = 255):
        super().__init__(region_size, pad_value)
        self.ignore_index = ignore_index

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        pixel_values = [torch.as_tensor(example["pixel_values"]) for example in examples]
        masks = [torch.as_tensor(example["labels"]).long() for example in examples]
        size = self.padded_size(pixel_values)
        return {"pixel_values": pad_bottom_right(pixel_values, size, self.pad_value).float(),
                "labels": pad_bottom_right(masks, size, self.ignore_index)}


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
    class (not `ignore_index`, not negative: Trainer pads with -100). With `per_sample`, one matrix per image of
    the batch, `(batch, num_labels, num_labels)`, so that duplicated samples can be dropped after a gather.

    A labelled pixel predicted outside `[0, num_labels)` is an error.
    """
    predictions = predictions if isinstance(predictions, torch.Tensor) else torch.as_tensor(np.asarray(predictions))
    labels = labels if isinstance(labels, torch.Tensor) else torch.as_tensor(np.asarray(labels))
    labels = labels.to(predictions.device)
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
    """IoU and accuracy from a `[true, predicted]` confusion matrix, with the keys and conventions of
    `evaluate`'s `mean_iou`: a class absent from both labels and predictions has IoU NaN, one absent from the
    labels has accuracy NaN; means skip NaNs.

    Returns `mean_iou`, `mean_accuracy`, `overall_accuracy` (pixel accuracy), `per_category_iou` and
    `per_category_accuracy` (arrays of `num_labels`).
    """
    confusion = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.float64)
    intersection = np.diag(confusion)
    area_label = confusion.sum(axis=1)
    area_prediction = confusion.sum(axis=0)
    union = area_label + area_prediction - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersection / union
        accuracy = intersection / area_label
        overall = intersection.sum() / area_label.sum()
    with warnings.catch_warnings():  # all-NaN (nothing labelled) gives NaN, without "Mean of empty slice"
        warnings.simplefilter("ignore", RuntimeWarning)
        return {"mean_iou": float(np.nanmean(iou)), "mean_accuracy": float(np.nanmean(accuracy)),
                "overall_accuracy": float(overall), "per_category_iou": iou, "per_category_accuracy": accuracy}


def mean_iou(
    predictions: np.ndarray | torch.Tensor | Sequence,
    references: np.ndarray | torch.Tensor | Sequence,
    num_labels: int,
    ignore_index: int = 255,
) -> dict[str, Any]:
    """Mean IoU over a dataset, as `evaluate.load("mean_iou").compute(...)` gives it, computed locally.

    `predictions` and `references` are class maps: one `(batch, H, W)` array or a sequence of `(H_i, W_i)`
    maps of any sizes. Intersections and unions are summed over every pixel of every image before dividing
    (a dataset-level IoU, not a mean of per-image IoUs). `evaluate`'s own metric fetches its script from the
    Hub, which fails offline and on clusters without internet.
    """
    if isinstance(predictions, np.ndarray | torch.Tensor):
        predictions, references = [predictions], [references]
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)
    for prediction, reference in zip(predictions, references):
        confusion += confusion_matrix(prediction, reference, num_labels, ignore_index).cpu()
    return metrics_from_confusion(confusion)


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
    labels = torch.as_tensor(np.asarray(eval_prediction.label_ids))
    predictions = torch.as_tensor(np.asarray(predictions))
    if predictions.dim() == labels.dim() + 1:  # logits
        num_labels = num_labels or predictions.shape[1]
        predictions = logits_to_class_maps(predictions, labels.shape[-2:])
    if num_labels is None:
        raise ValueError("Pass num_labels to compute_segmentation_metrics when predictions are class maps.")
    metrics = metrics_from_confusion(confusion_matrix(predictions, labels, num_labels, ignore_index))
    names = [str(id2label[i]) if id2label else str(i) for i in range(num_labels)]
    result = {key: metrics[key] for key in ("mean_iou", "mean_accuracy", "overall_accuracy")}
    for name, iou in zip(names, metrics["per_category_iou"]):
        result[f"iou_{_metric_name(name)}"] = float(iou)
    return result


def segmentation_predictions(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """`Trainer`'s `preprocess_logits_for_metrics`: per-batch logits → class maps at the labels' size."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits_to_class_maps(logits, labels.shape[-2:])


def _metric_name(name: str) -> str:
    """A class name as a metric-key suffix: "near-shore vessel" → "near_shore_vessel"."""
    return re.sub(r"\W+", "_", name).strip("_") or "class"


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
    from datasets import Image as ImageFeature

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


__all__ = [
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
    "prepare_dataset",
    "prepare_segmentation_dataset",
    "segmentation_predictions",
    "top_k_accuracy",
]
