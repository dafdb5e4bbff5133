"""Semantic segmentation data: (image, mask) pairs checked against each other and the class list, and padded
into batches with the ignore index.

    dataset = prepare_segmentation_dataset(dataset, processor, num_labels=3)   # masks checked with their images
    batch = SegmentationPaddingCollator(region_size)(examples)                # masks padded with the ignore index
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from datasets import Image as ImageFeature
from PIL import Image

from .data import (
    SAMPLE_INDEX_COLUMN,
    BadSampleError,
    RegionPaddingCollator,
    XTTransform,
    _open_file_cell,
    _sample_name,
    _undecoded_with_sample_index,
    find_image_column,
    pad_bottom_right,
)


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


__all__ = ["SegmentationPaddingCollator", "XTSegmentationTransform", "prepare_segmentation_dataset"]
