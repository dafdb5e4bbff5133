"""`evaluate` metrics that ship with `xt_hf` and load offline: `evaluate.load(str(ACCURACY))`,
`evaluate.load(str(MEAN_IOU))`, or `load("accuracy")` / `load("mean_iou")`. Their keys are those of the
Hub's `accuracy` and `mean_iou`. Each folder holds one `evaluate.Metric` script; the training code uses
the same computations (`accuracy_score`, `metrics_from_confusion`) through `xt_hf.training.evaluation`.
"""

from __future__ import annotations

from pathlib import Path

import evaluate

METRICS_DIR = Path(__file__).parent
ACCURACY = METRICS_DIR / "accuracy"
MEAN_IOU = METRICS_DIR / "mean_iou"
METRICS = {"accuracy": ACCURACY, "mean_iou": MEAN_IOU}


def load(name: str, **kwargs) -> evaluate.EvaluationModule:
    """`evaluate.load` of a packaged metric by name ("accuracy" or "mean_iou"), from its folder: no network."""
    if name not in METRICS:
        raise ValueError(f"No packaged metric {name!r}; there are {', '.join(METRICS)}.")
    return evaluate.load(str(METRICS[name]), **kwargs)


__all__ = ["ACCURACY", "MEAN_IOU", "METRICS", "METRICS_DIR", "load"]
