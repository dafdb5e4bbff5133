"""Scores of a saved model on one split of a dataset, computed by the training loop's own task (`tasks.py`: its
`prepare`, `collator` and `evaluate`), so that a saved model scores here what it scored during training, and each
task's metrics are written once.

    report = evaluate_saved_model("outputs/run/best", "data/coastline", "test")
    python -m xt_hf.training.score MODEL --dataset D [--split test] [--task auto] [--device cpu]
    python -m xt_hf.training.score MODEL --dataset D --seed 0 --image-size 256 --region-size 32 \\
        --near-distance 3.5 --margin 0.5 --vessels 30 40      # a coastline folder: its generator settings
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import send_to_device
from datasets import DatasetDict, load_dataset, load_from_disk
from torch.utils.data import DataLoader
from transformers import AutoConfig

from xt_hf import XTImageProcessor

from ..synthetic.coastline import VesselScores, add_sample_arguments, sample_options
from .arguments import TASKS, TrainConfig
from .evaluation import confusion_matrix
from .tasks import make_task


class OneProcess:
    """The part of `accelerate.Accelerator` a task's `evaluate` uses, for one process on one `device`: nothing to
    gather or reduce."""

    num_processes = 1

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)

    def unwrap_model(self, model):
        return model

    def gather_for_metrics(self, data, use_gather_object: bool = False):
        return data

    def reduce(self, tensor: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return tensor


class ConfusionCounts:
    """`on_batch` of a classifier's `evaluate`: `confusion`, `[true, predicted]` image counts, rows and columns in
    the order of `labels` (the model's class names)."""

    def __init__(self, id2label: Mapping[int, str]):
        self.labels = [id2label[i] for i in range(len(id2label))]
        self.counts = torch.zeros(len(self.labels), len(self.labels), dtype=torch.long)

    def __call__(self, batch: dict, predictions: torch.Tensor) -> None:
        self.counts += confusion_matrix(predictions, batch["labels"], len(self.labels)).cpu()

    def result(self) -> dict[str, list]:
        return {"confusion": self.counts.tolist(), "labels": self.labels}


class GeneratedVessels:
    """`on_batch` of a segmenter's `evaluate` on a folder of the synthetic coastline task: `vessel_accuracy`, whole
    vessels scored by `scores` (a `coastline.VesselScores`) for a model of `region_size`. The batches must come in
    the split's order."""

    def __init__(self, scores: VesselScores, region_size: int):
        self.scores, self.region_size = scores, region_size
        self.seen = 0

    def __call__(self, batch: dict, predictions: torch.Tensor) -> None:
        for labels, prediction in zip(batch["labels"].cpu().numpy(), predictions.cpu().numpy()):
            self.scores.update(self.seen, labels, prediction, self.region_size)
            self.seen += 1

    def result(self) -> dict[str, dict]:
        return {"vessel_accuracy": self.scores.result()}


def evaluate_saved_model(
    model_name_or_path: str,
    dataset: str,
    split: str = "test",
    *,
    task: str = "auto",
    batch_size: int = 8,
    seed: int | None = None,
    device: str = "cpu",
    **generator_options,
) -> dict[str, Any]:
    """Scores of a saved model (folder or Hub id, with its image processor) on one split of a dataset (a
    `save_to_disk` folder or a Hub name): the metrics its task's `evaluate` gives during training, without the
    `eval/` prefix, after `model`, `split` and `images`:

    - classification: `loss`, `top1`, `top5`, and `confusion` with its `labels`;
    - segmentation: `loss`, `mean_iou`, `mean_accuracy`, `pixel_accuracy`, `iou_<class>`; with the `seed` (and
      `generator_options`, `coastline.generate_sample`'s) a coastline folder was generated with, `vessel_accuracy`;
    - detection: `loss`, `map`, `map_50`, ..., `map_50_agnostic`, `ap_<class>`.

    `task` is the training setting: "auto" reads it off the model's architecture and the split's columns.
    """
    if generator_options and seed is None:
        raise ValueError(f"Generator options {sorted(generator_options)} need the seed the folder was made with.")
    data = load_from_disk(dataset) if Path(dataset).is_dir() else load_dataset(dataset)
    data = data[split] if isinstance(data, DatasetDict) else data
    settings = TrainConfig.from_dict({"model": model_name_or_path, "dataset": dataset, "task": task})
    task = make_task(settings, AutoConfig.from_pretrained(model_name_or_path), data)
    if seed is not None and task.name != "segmentation":
        raise ValueError(f"A seed scores the samples of a generated coastline folder; this is {task.name}.")
    model = task.model_class.from_pretrained(model_name_or_path).to(device).eval()
    processor = XTImageProcessor.from_pretrained(model_name_or_path)
    on_batch = None
    if task.name == "classification":
        on_batch = ConfusionCounts(model.config.id2label)
    elif seed is not None:
        on_batch = GeneratedVessels(VesselScores(seed, split, **generator_options), processor.region_size)

    prepared = task.prepare(data, processor, model.config)
    loader = DataLoader(prepared, batch_size=batch_size, collate_fn=task.collator(processor, model.config))
    accelerator = OneProcess(device)
    with torch.no_grad():
        batches = (send_to_device(batch, accelerator.device) for batch in loader)
        metrics = task.evaluate(model, batches, accelerator, on_batch=on_batch)
    report = {"model": model_name_or_path, "split": split, "images": len(prepared),
              **{key.removeprefix("eval/"): value for key, value in metrics.items()}}
    return {**report, **(on_batch.result() if on_batch is not None else {})}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """`python -m xt_hf.training.score MODEL --dataset D [--split test] [--seed S ...]`: print the scores of a saved
    model on a split, as JSON."""
    parser = argparse.ArgumentParser(description="Print the scores of a saved xT model on a split, as JSON.")
    parser.add_argument("model", help="a saved xT folder (or Hub id) with its image processor")
    parser.add_argument("--dataset", required=True, help="a save_to_disk folder or a Hub dataset name")
    parser.add_argument("--split", default="test")
    parser.add_argument("--task", default="auto", choices=TASKS)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    coastline = parser.add_argument_group(
        "coastline folders", "with --seed, also score whole vessels: the settings the folder was generated with")
    coastline.add_argument("--seed", type=int, help="the seed of `python -m xt_hf.synthetic.coastline`")
    add_sample_arguments(coastline)
    arguments = parser.parse_args(argv)
    options = sample_options(arguments) if arguments.seed is not None else {}
    report = evaluate_saved_model(arguments.model, arguments.dataset, arguments.split, task=arguments.task,
                                  batch_size=arguments.batch_size, seed=arguments.seed, device=arguments.device,
                                  **options)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()


__all__ = ["ConfusionCounts", "GeneratedVessels", "OneProcess", "evaluate_saved_model", "main"]
