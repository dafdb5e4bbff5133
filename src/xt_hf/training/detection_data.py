"""Object-detection data: images with COCO-style boxes, checked against their image and the class list, turned into
`XTForObjectDetection` labels by the image processor, and padded into batches.

    dataset = prepare_detection_dataset(dataset, processor, label2id=model.config.label2id)
    batch = DetectionPaddingCollator(region_size)(examples)  # images padded to whole regions, boxes renormalised

A row holds an image and an objects cell, COCO-style as `xt_hf.synthetic.detection` writes it:
`{"image_id": 7, "annotations": [{"bbox": [x, y, w, h], "category_id": 1, "iscrowd": 0}, ...]}` (boxes in pixels
from the image's top-left corner), or the columnar form of many Hub datasets: `{"bbox": [[x, y, w, h], ...],
"category": [1, ...]}`. The class names are the `ClassLabel` of `category_id` (or `category`) when the dataset
declares one. An image without objects is a normal sample (its labels are empty).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel

from .data import (
    SAMPLE_INDEX_COLUMN,
    BadSampleError,
    RegionPaddingCollator,
    XTTransform,
    _sample_name,
    _undecoded_with_sample_index,
    find_image_column,
    pad_bottom_right,
)

OBJECTS_COLUMNS = ("objects", "annotations", "annotation")
CATEGORY_KEYS = ("category_id", "category", "label", "class_labels")
BOX_TOLERANCE = 0.01  # px: a COCO box may end on the image border, float32 rounding included


def find_objects_column(dataset, objects_column: str | None = None) -> str:
    """`objects_column` if given, else the first of `objects`, `annotations`, `annotation` the dataset has."""
    columns = dataset.column_names
    if objects_column is not None:
        if objects_column not in columns:
            raise ValueError(f"The dataset has no objects column {objects_column!r}; its columns are {columns}.")
        return objects_column
    for name in OBJECTS_COLUMNS:
        if name in columns:
            return name
    raise ValueError(f"Found no objects column (one of {', '.join(OBJECTS_COLUMNS)}) in {columns}: a detection "
                     f"dataset needs COCO-style boxes per image.")


def has_objects_column(dataset) -> bool:
    return any(name in dataset.column_names for name in OBJECTS_COLUMNS)


def detection_label_names(dataset, objects_column: str | None = None) -> list[str] | None:
    """Class names a detection dataset declares: the `ClassLabel` of its objects' `category_id` (or `category`),
    else `None`."""
    feature = dataset.features.get(find_objects_column(dataset, objects_column))
    found = _find_class_label(feature)
    return list(found.names) if found is not None else None


def detection_id2label(dataset, objects_column: str | None = None) -> dict[int, str]:
    """Class ids → names for a detection dataset: its `ClassLabel` names, else `"0"` … `"<largest id>"` (the ids
    found in the data)."""
    names = detection_label_names(dataset, objects_column)
    if names is None:
        column = find_objects_column(dataset, objects_column)
        largest = -1
        for cell in dataset[column]:
            for obj in coco_annotations(cell, "A sample")["annotations"]:
                if isinstance(obj["category_id"], int | np.integer):
                    largest = max(largest, int(obj["category_id"]))
        names = [str(i) for i in range(largest + 1)]
    return dict(enumerate(names))


def _find_class_label(feature: Any) -> ClassLabel | None:
    if isinstance(feature, ClassLabel):
        return feature
    if isinstance(feature, Mapping):
        for key in CATEGORY_KEYS:
            if key in feature and (found := _find_class_label(feature[key])) is not None:
                return found
        for value in feature.values():
            if (found := _find_class_label(value)) is not None:
                return found
        return None
    inner = getattr(feature, "feature", None)  # List / Sequence
    if inner is not None:
        return _find_class_label(inner)
    if isinstance(feature, list | tuple) and feature:
        return _find_class_label(feature[0])
    return None


def coco_annotations(cell: Any, name: str) -> dict:
    """An objects cell (COCO `{"image_id", "annotations": [...]}` or columnar `{"bbox": [...], "category": [...]}`)
    → `{"image_id", "annotations": [{"bbox", "category_id", "iscrowd"}, ...]}`; a malformed cell raises
    `BadSampleError` naming the sample."""
    if cell is None:
        return {"image_id": -1, "annotations": []}
    if not isinstance(cell, Mapping):
        raise BadSampleError(f"{name}: its objects cell must be a dict of COCO annotations, got "
                             f"{type(cell).__name__}.")
    if "annotations" in cell:
        objects = cell["annotations"] or []
        if isinstance(objects, Mapping):  # a columnar list of structs, as datasets may return it
            objects = _columnar_objects(objects, name)
    elif "bbox" in cell:
        objects = _columnar_objects(cell, name)
    else:
        raise BadSampleError(f"{name}: its objects cell has keys {sorted(cell)}; expected COCO 'annotations' "
                             f"([{{'bbox': [x, y, w, h], 'category_id': ...}}, ...]) or columnar 'bbox' and "
                             f"'category'.")
    annotations = []
    for number, obj in enumerate(objects):
        if not isinstance(obj, Mapping) or "bbox" not in obj:
            raise BadSampleError(f"{name}: object {number} has no 'bbox' ([x, y, w, h] in pixels): {obj!r:.200}.")
        category = next((obj[key] for key in CATEGORY_KEYS if key in obj), None)
        if category is None:
            raise BadSampleError(f"{name}: object {number} has no 'category_id': {obj!r:.200}.")
        annotations.append({"bbox": obj["bbox"], "category_id": category, "iscrowd": int(obj.get("iscrowd") or 0)})
    image_id = cell.get("image_id", -1)
    return {"image_id": int(image_id) if image_id is not None else -1, "annotations": annotations}


def _columnar_objects(columns: Mapping, name: str) -> list[dict]:
    boxes = list(columns.get("bbox") or [])
    key = next((key for key in CATEGORY_KEYS if key in columns), None)
    if key is None:
        raise BadSampleError(f"{name}: its objects have boxes but no 'category' / 'category_id' list.")
    categories = list(columns[key] or [])
    if len(categories) != len(boxes):
        raise BadSampleError(f"{name}: its objects have {len(boxes)} boxes but {len(categories)} categories.")
    crowd = list(columns.get("iscrowd") or [0] * len(boxes))
    return [{"bbox": box, "category_id": category, "iscrowd": flag}
            for box, category, flag in zip(boxes, categories, crowd)]


class XTDetectionTransform(XTTransform):
    """The `set_transform` function for detection: decode each image, check its boxes and classes, and run the image
    processor (unpadded) with the COCO annotations.

    Returns `pixel_values` `(channels, h, w)` per sample and `labels`, one dict per sample: `class_labels` `(m,)`
    int64, `boxes` `(m, 4)` float32 normalised `(cx, cy, w, h)` by the sample's own `(h, w)`, `image_id`,
    `orig_size` and `size` (before and after a `do_resize`). `DetectionPaddingCollator` pads the images and
    renormalises the boxes to the batch's frame.

    A box that reaches outside its image, has a non-positive width or height or non-finite values, or a class
    outside the model's (`num_labels`, or a name not in `label2id`) raises a `BadSampleError` naming the sample.
    Crowd objects (`iscrowd: 1`) are left out, as the processor does.

    Args:
        processor: an `XTImageProcessor`; with `do_resize` the boxes are resized with the image.
        num_labels: classes of the model.
        label2id: class name → model id; with `label_names`, a dataset's integer categories are mapped by name.
        label_names: the dataset's `ClassLabel` names of `category_id`.
        image_column, objects_column: dataset columns.
    """

    def __init__(
        self,
        processor,
        *,
        num_labels: int,
        label2id: Mapping[str, int] | None = None,
        label_names: Sequence[str] | None = None,
        image_column: str = "image",
        objects_column: str = "objects",
        convert_rgb: bool = True,
    ):
        super().__init__(processor, label2id=label2id, image_column=image_column, label_column=None,
                         label_names=label_names, convert_rgb=convert_rgb)
        self.num_labels = num_labels
        self.objects_column = objects_column

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        images, objects = batch[self.image_column], batch[self.objects_column]
        indices = batch.get(SAMPLE_INDEX_COLUMN, [None] * len(images))
        output = {"pixel_values": [], "labels": []}
        for image, cell, index in zip(images, objects, indices):
            name = _sample_name(index, image)
            pil_image = self._decode(image, name)
            annotation = coco_annotations(cell, name)
            if annotation["image_id"] < 0 and index is not None:
                annotation["image_id"] = int(index)
            annotation["annotations"] = [self._checked(obj, number, pil_image.size, name)
                                         for number, obj in enumerate(annotation["annotations"])]
            pixel_values, labels = self._encode(pil_image, annotation, name)
            output["pixel_values"].append(pixel_values)
            output["labels"].append(labels)
        return output

    def _checked(self, obj: dict, number: int, image_size: tuple[int, int], name: str) -> dict:
        width, height = image_size
        where = f"{name}: object {number}"
        try:
            x, y, w, h = (float(v) for v in obj["bbox"])
        except (TypeError, ValueError) as error:
            raise BadSampleError(f"{where} has bbox {obj['bbox']!r}; a bbox is [x, y, width, height] in pixels.") \
                from error
        if not all(np.isfinite([x, y, w, h])):
            raise BadSampleError(f"{where} has a non-finite bbox {[x, y, w, h]}.")
        if w <= 0 or h <= 0:
            raise BadSampleError(f"{where} has bbox [x, y, w, h] = {[x, y, w, h]}: width and height must be positive.")
        tol = BOX_TOLERANCE
        if x < -tol or y < -tol or x + w > width + tol or y + h > height + tol:
            raise BadSampleError(
                f"{where} has bbox [x, y, w, h] = {[x, y, w, h]}, reaching outside its {height}×{width} px image "
                f"(height×width): boxes are COCO [x, y, width, height] in pixels from the top-left corner.")
        box = [max(x, 0.0), max(y, 0.0), min(w, width - max(x, 0.0)), min(h, height - max(y, 0.0))]
        return {"bbox": box, "category_id": self._category_id(obj["category_id"], where), "iscrowd": obj["iscrowd"]}

    def _category_id(self, category: Any, where: str) -> int:
        if isinstance(category, bool) or not isinstance(category, int | np.integer | str):
            raise BadSampleError(f"{where} has category {category!r}; expected an integer id or a class name.")
        if self.label_names is not None and isinstance(category, int | np.integer):
            if not 0 <= category < len(self.label_names):
                raise BadSampleError(f"{where} has category {category}, outside the dataset's "
                                     f"{len(self.label_names)} classes.")
            category = self.label_names[category]
        if isinstance(category, str):
            if self.label2id is None or category not in self.label2id:
                known = ", ".join(repr(k) for k in list(self.label2id or {})[:20])
                raise BadSampleError(f"{where} has class {category!r}, which is not in the model's label2id "
                                     f"({known}): fix the label, or train a model whose config lists it.")
            category = self.label2id[category]
        if not 0 <= category < self.num_labels:
            raise BadSampleError(f"{where} has category {int(category)}, outside the model's {self.num_labels} "
                                 f"classes (0–{self.num_labels - 1}): fix the label, or train a model with more "
                                 f"classes (num_labels).")
        return int(category)

    def _encode(self, image, annotation: dict, name: str) -> tuple[torch.Tensor, dict]:
        region = self.processor.region_size
        if not self.processor.do_resize and (image.height < region or image.width < region):
            raise BadSampleError(
                f"{name} is {image.height}×{image.width} px (height×width), smaller than one region "
                f"({region}×{region} px): drop it (dataset.filter), resize it (XTImageProcessor(do_resize=True)), "
                f"or use a model with a smaller region_size.")
        try:
            encoded = self.processor(image, annotations=annotation, return_tensors="pt", do_pad=False)
        except ValueError as error:
            raise BadSampleError(f"{name}: {error}") from error
        labels = encoded["labels"][0]
        return encoded["pixel_values"][0], {
            "class_labels": torch.as_tensor(labels["class_labels"]).long().reshape(-1),
            "boxes": torch.as_tensor(labels["boxes"]).float().reshape(-1, 4),
            "image_id": torch.as_tensor(labels["image_id"]).long().reshape(-1),
            "orig_size": torch.as_tensor(labels["orig_size"]).long(),
            "size": torch.as_tensor(labels["size"]).long(),
        }


def prepare_detection_dataset(
    dataset,
    processor,
    *,
    num_labels: int | None = None,
    label2id: Mapping[str, int] | None = None,
    image_column: str | None = None,
    objects_column: str | None = None,
):
    """Attach an `XTDetectionTransform` to a `datasets.Dataset` of images and COCO-style objects; returns the new
    dataset. `label2id` (the model config's) maps the dataset's `ClassLabel` names to model ids; `num_labels`
    defaults to its length. As `prepare_dataset`, the image column is read undecoded and a sample-index column
    is added, so every bad sample is reported by index (and file). Use `remove_unused_columns=False` with
    `Trainer`."""
    objects_column = find_objects_column(dataset, objects_column)
    image_column = find_image_column(dataset, image_column)
    if num_labels is None:
        if label2id is None:
            raise ValueError("Pass num_labels or label2id (the model config's) to prepare_detection_dataset.")
        num_labels = len(label2id)
    label_names = detection_label_names(dataset, objects_column)
    placeholders = label2id is not None and all(str(key).startswith("LABEL_") for key in label2id)
    if label2id is None or label_names is None or (placeholders and not set(label_names) <= set(label2id)):
        # No names on one side (or transformers' LABEL_i placeholders): the dataset's ids are the model's ids.
        label2id = label_names = None
    dataset = _undecoded_with_sample_index(dataset, [image_column])
    dataset.set_transform(XTDetectionTransform(
        processor, num_labels=num_labels, label2id=label2id, label_names=label_names, image_column=image_column,
        objects_column=objects_column,
    ))
    return dataset


class DetectionPaddingCollator(RegionPaddingCollator):
    """Stack detection samples of different sizes: pad each `(C, H_i, W_i)` image at the bottom and right with
    `pad_value` to the batch's largest height and width rounded up to whole regions, and rescale each sample's
    normalised `(cx, cy, w, h)` boxes from its own frame to the padded one (the pixels do not move), as the image
    processor normalises by its padded output.

    Returns `{"pixel_values": (batch, C, H, W) float32, "labels": [one dict per image]}`, each dict with
    `class_labels` `(m,)` int64 and `boxes` `(m, 4)` float32, `frame_size` (the padded `(H, W)`, for the
    metrics), plus the sample's other label keys (`image_id`, `orig_size`, `size`). Images without objects keep
    empty `(0,)` and `(0, 4)` tensors.
    """

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        pixel_values = [torch.as_tensor(example["pixel_values"]) for example in examples]
        height, width = self.padded_size(pixel_values)
        batch = {"pixel_values": pad_bottom_right(pixel_values, (height, width), self.pad_value).float()}
        if "labels" in examples[0]:
            labels = []
            for pixels, example in zip(pixel_values, examples):
                target = {key: torch.as_tensor(value) for key, value in example["labels"].items()}
                boxes = target["boxes"].float().reshape(-1, 4)
                scale = boxes.new_tensor([pixels.shape[-1] / width, pixels.shape[-2] / height] * 2)
                target["boxes"] = boxes * scale
                target["class_labels"] = target["class_labels"].long().reshape(-1)
                target["frame_size"] = torch.tensor([height, width])
                labels.append(target)
            batch["labels"] = labels
        return batch


__all__ = [
    "DetectionPaddingCollator",
    "XTDetectionTransform",
    "coco_annotations",
    "detection_id2label",
    "detection_label_names",
    "find_objects_column",
    "has_objects_column",
    "prepare_detection_dataset",
]
