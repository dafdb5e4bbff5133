"""Mean IoU of semantic segmentation, as an `evaluate` metric that loads offline.

    import evaluate
    from xt_hf.training.metrics import MEAN_IOU

    mean_iou = evaluate.load(str(MEAN_IOU))   # a local folder: no download
    mean_iou.compute(predictions=class_maps, references=masks, num_labels=3, ignore_index=255)

The keys and arguments are those of the Hub's `mean_iou`: `mean_iou`, `mean_accuracy`, `overall_accuracy`,
`per_category_iou` and `per_category_accuracy`, from `predictions`, `references`, `num_labels`,
`ignore_index` and `reduce_labels` (also `label_map` and `nan_to_num`). Intersections and unions are summed
over every pixel of every image before dividing: a dataset-level IoU, not a mean of per-image IoUs.

The computation goes through a `[true class, predicted class]` pixel-count matrix: `confusion_matrix` counts
it, `metrics_from_confusion` turns it into the five results. `xt_hf`'s training loop sums such matrices over
processes and calls the same `metrics_from_confusion`. This script needs only numpy.
"""

import warnings

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """Intersection over union per class, |prediction ∩ reference| / |prediction ∪ reference| counted in
pixels over the whole set of images, and its mean over classes; also per-class and overall pixel accuracy.
Pixels whose reference is `ignore_index` (or negative) are not scored."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D arrays): predicted class-id maps, one per image; sizes may differ between images.
    references (`list` of 2-D arrays): true class-id maps, each the size of its prediction.
    num_labels (`int`): number of classes.
    ignore_index (`int`): reference value of unlabelled pixels (255 in ADE20k-style masks); negative reference
        values are unlabelled too.
    nan_to_num (`int`, optional): replace NaN results (a class in neither predictions nor references) by this.
    label_map (`dict`, optional): old reference id -> new reference id, applied first.
    reduce_labels (`bool`, defaults to False): references count 0 as unlabelled and every other id minus 1
        (0 becomes `ignore_index` 255, 1 becomes 0, ...), as for datasets whose 0 is "background/other".
Returns:
    mean_iou (`float`): mean of `per_category_iou`, NaNs (classes in neither) left out.
    mean_accuracy (`float`): mean of `per_category_accuracy`, NaNs (classes without reference pixels) left out.
    overall_accuracy (`float`): correct labelled pixels / labelled pixels.
    per_category_iou (`ndarray` of `num_labels` floats): IoU of each class.
    per_category_accuracy (`ndarray` of `num_labels` floats): correct pixels of each class / its reference pixels.
Examples:
    >>> mean_iou = evaluate.load("path/to/xt_hf/training/metrics/mean_iou")
    >>> results = mean_iou.compute(predictions=[[[0, 1], [1, 1]]], references=[[[0, 1], [0, 255]]],
    ...                            num_labels=2, ignore_index=255)
    >>> results["mean_iou"], results["overall_accuracy"]
    (0.5, 0.666...)
"""

_CITATION = ""


def confusion_matrix(prediction, reference, num_labels: int, ignore_index: int = 255) -> np.ndarray:
    """Pixel counts `(num_labels, num_labels)`, `[true class, predicted class]`, of one prediction/reference pair
    (any matching shapes) over its labelled pixels: reference neither `ignore_index` nor negative. A labelled
    pixel whose reference or prediction lies outside `[0, num_labels)` is an error."""
    prediction = np.asarray(prediction).astype(np.int64)
    reference = np.asarray(reference).astype(np.int64)
    if prediction.shape != reference.shape:
        raise ValueError(f"A prediction of shape {prediction.shape} has a reference of shape {reference.shape}.")
    labelled = (reference != ignore_index) & (reference >= 0)
    prediction, reference = prediction[labelled], reference[labelled]
    if reference.size and reference.max() >= num_labels:
        raise ValueError(f"references hold ids ≥ num_labels ({num_labels}) other than ignore_index ({ignore_index}).")
    if prediction.size and (prediction.min() < 0 or prediction.max() >= num_labels):
        raise ValueError(f"predictions hold ids outside [0, {num_labels}) at labelled pixels.")
    counts = np.bincount(reference * num_labels + prediction, minlength=num_labels * num_labels)
    return counts.reshape(num_labels, num_labels)


def metrics_from_confusion(confusion) -> dict:
    """The five results from a `[true, predicted]` confusion matrix (a numpy array, or anything `np.asarray`
    takes). A class in neither references nor predictions has IoU NaN; one without reference pixels has
    accuracy NaN; the means leave NaNs out (all NaN: NaN, without a warning)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    correct = np.diag(confusion)
    reference_pixels = confusion.sum(axis=1)
    predicted_pixels = confusion.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_category_iou = correct / (reference_pixels + predicted_pixels - correct)
        per_category_accuracy = correct / reference_pixels
        overall_accuracy = correct.sum() / reference_pixels.sum()
    with warnings.catch_warnings():  # nanmean of all-NaN warns "Mean of empty slice"
        warnings.simplefilter("ignore", RuntimeWarning)
        mean_iou = np.nanmean(per_category_iou)
        mean_accuracy = np.nanmean(per_category_accuracy)
    return {"mean_iou": float(mean_iou), "mean_accuracy": float(mean_accuracy),
            "overall_accuracy": float(overall_accuracy), "per_category_iou": per_category_iou,
            "per_category_accuracy": per_category_accuracy}


def relabel(reference, ignore_index: int = 255, label_map=None, reduce_labels: bool = False) -> np.ndarray:
    """A reference map after `label_map` (old id -> new id), then `reduce_labels` (0 -> ignore_index, k -> k-1)."""
    reference = np.array(reference, dtype=np.int64)
    if label_map:
        original = reference.copy()
        for old, new in label_map.items():
            reference[original == int(old)] = int(new)
    if reduce_labels:
        unlabelled = (reference == 0) | (reference == ignore_index)
        reference = np.where(unlabelled, ignore_index, reference - 1)
    return reference


def mean_iou(predictions, references, num_labels: int, ignore_index: int = 255, nan_to_num=None, label_map=None,
             reduce_labels: bool = False) -> dict:
    """The metric's computation on sequences of class-id maps (or one `(images, H, W)` array each)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references.")
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
    for prediction, reference in zip(predictions, references):
        reference = relabel(reference, ignore_index, label_map, reduce_labels)
        confusion += confusion_matrix(prediction, reference, num_labels, ignore_index)
    results = metrics_from_confusion(confusion)
    if nan_to_num is not None:
        results = {key: np.nan_to_num(value, nan=nan_to_num) if isinstance(value, np.ndarray)
                   else float(np.nan_to_num(value, nan=nan_to_num)) for key, value in results.items()}
    return results


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    def _info(self):
        class_map = datasets.Sequence(datasets.Sequence(datasets.Value("int64")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": class_map, "references": class_map}),
            reference_urls=[],
        )

    def _compute(self, predictions, references, num_labels, ignore_index, nan_to_num=None, label_map=None,
                 reduce_labels=False):
        return mean_iou(predictions, references, num_labels, ignore_index, nan_to_num=nan_to_num,
                        label_map=label_map, reduce_labels=reduce_labels)
