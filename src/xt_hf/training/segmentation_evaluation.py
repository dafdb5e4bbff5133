"""Scores of a saved `XTForSemanticSegmentation` on one split of a segmentation dataset, as the training loop's
eval computes them: mean IoU, pixel accuracy and per-class IoU. On a folder of the synthetic coastline task
(`xt_hf.synthetic.coastline`), given the seed and options it was generated with, whole vessels are scored too
(`coastline.VesselScores`).

    python -m xt_hf.training.segmentation_evaluation MODEL --dataset D [--split test]
    python -m xt_hf.training.segmentation_evaluation MODEL --dataset D --seed 0 --image-size 256 --region-size 32 \\
        --near-distance 3.5 --margin 0.5 --vessels 30 40      # a coastline folder: its generator settings
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..synthetic.coastline import VesselScores, add_sample_arguments, sample_options
from .evaluation import confusion_matrix, logits_to_class_maps, metrics_from_confusion
from .segmentation_data import SegmentationPaddingCollator, prepare_segmentation_dataset


def evaluate_saved_segmenter(
    model: str,
    dataset: str,
    split: str = "test",
    *,
    batch_size: int = 4,
    seed: int | None = None,
    **coastline_options,
) -> dict:
    """`{"split", "images", "mean_iou", "overall_accuracy", "per_category_iou"}` of a saved segmenter (folder or
    Hub id, with its image processor) on one split of a dataset (a `save_to_disk` folder or a Hub name).

    With the `seed` (and `coastline_options`, `generate_sample`'s) a coastline folder was generated with, also
    `"vessel_accuracy"`: `coastline.VesselScores` per group of vessels.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    segmenter = AutoModelForSemanticSegmentation.from_pretrained(model).eval()
    processor = AutoImageProcessor.from_pretrained(model)
    data = load_from_disk(dataset) if Path(dataset).is_dir() else load_dataset(dataset)
    data = data[split] if isinstance(data, DatasetDict) else data
    num_labels, ignore = segmenter.config.num_labels, segmenter.config.semantic_loss_ignore_index
    prepared = prepare_segmentation_dataset(data, processor, num_labels=num_labels, ignore_index=ignore)
    collate = SegmentationPaddingCollator(processor.region_size, processor.pad_value, ignore)
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.long)
    vessels = None if seed is None else VesselScores(seed, split, **coastline_options)
    with torch.no_grad():
        for start in range(0, len(prepared), batch_size):
            indices = range(start, min(start + batch_size, len(prepared)))
            batch = collate([prepared[i] for i in indices])
            logits = segmenter(pixel_values=batch["pixel_values"]).logits
            predictions = logits_to_class_maps(logits, batch["labels"].shape[-2:])
            confusion += confusion_matrix(predictions, batch["labels"], num_labels, ignore)
            if vessels is not None:
                for index, labels, prediction in zip(indices, batch["labels"].numpy(), predictions.numpy()):
                    vessels.update(index, labels, prediction, processor.region_size)
    metrics = metrics_from_confusion(confusion)
    names = [segmenter.config.id2label[i] for i in range(num_labels)]
    report = {"split": split, "images": len(prepared), "mean_iou": float(metrics["mean_iou"]),
              "overall_accuracy": float(metrics["overall_accuracy"]),
              "per_category_iou": dict(zip(names, metrics["per_category_iou"].tolist()))}
    if vessels is not None:
        report["vessel_accuracy"] = vessels.result()
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m xt_hf.training.segmentation_evaluation MODEL --dataset D [--split test] [--seed S ...]`: print
    the scores of a saved segmenter on a split, as JSON."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__.split(":")[0])
    parser.add_argument("model", help="a saved XTForSemanticSegmentation folder (or Hub id) with its image processor")
    parser.add_argument("--dataset", required=True, help="a save_to_disk folder or a Hub dataset name")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=4)
    coastline = parser.add_argument_group(
        "coastline folders", "with --seed, also score whole vessels: the settings the folder was generated with")
    coastline.add_argument("--seed", type=int, help="the seed of `python -m xt_hf.synthetic.coastline`")
    add_sample_arguments(coastline)
    arguments = parser.parse_args(argv)
    options = sample_options(arguments) if arguments.seed is not None else {}
    report = evaluate_saved_segmenter(arguments.model, arguments.dataset, arguments.split,
                                      batch_size=arguments.batch_size, seed=arguments.seed, **options)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()


__all__ = ["evaluate_saved_segmenter"]
