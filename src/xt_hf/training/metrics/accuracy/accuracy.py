"""Accuracy: the fraction of predictions equal to their reference, as an `evaluate` metric that loads offline.

    import evaluate
    from xt_hf.training.metrics import ACCURACY

    accuracy = evaluate.load(str(ACCURACY))   # a local folder: no download
    accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])   # {"accuracy": 0.666...}

The keys and arguments are those of the Hub's `accuracy` (`normalize`, `sample_weight`); this script needs
only numpy. `accuracy_score` is the computation itself, shared with `xt_hf`'s training code.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """The fraction of samples whose predicted class equals the reference class:
(number of correct predictions) / (number of predictions), or the count of correct predictions."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted class ids, one per sample.
    references (`list` of `int`): true class ids, one per sample.
    normalize (`bool`, defaults to True): the fraction of correct samples; False gives their number.
    sample_weight (`list` of `float`, optional): a weight per sample (weighted fraction, or weighted count).
Returns:
    accuracy (`float`): in [0, 1] with `normalize`, else the (weighted) number of correct samples.
Examples:
    >>> accuracy = evaluate.load("path/to/xt_hf/training/metrics/accuracy")
    >>> accuracy.compute(predictions=[0, 1, 2, 0], references=[0, 1, 1, 2])
    {'accuracy': 0.5}
"""

_CITATION = ""


def accuracy_score(predictions, references, normalize: bool = True, sample_weight=None) -> float:
    """The fraction (or, without `normalize`, the number) of `predictions` equal to `references`, each sample
    counted with its `sample_weight` (1 by default). An empty input gives NaN with `normalize`."""
    predictions = np.asarray(predictions).reshape(-1)
    references = np.asarray(references).reshape(-1)
    if predictions.shape != references.shape:
        raise ValueError(f"{predictions.size} predictions for {references.size} references.")
    weights = np.ones(predictions.size) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if weights.shape != predictions.shape:
        raise ValueError(f"{weights.size} sample weights for {predictions.size} predictions.")
    correct = float(np.sum(weights * (predictions == references)))
    if not normalize:
        return correct
    total = float(np.sum(weights))
    return correct / total if total else float("nan")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
            reference_urls=[],
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        return {"accuracy": accuracy_score(predictions, references, normalize=normalize, sample_weight=sample_weight)}
