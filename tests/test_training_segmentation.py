"""Segmentation training: the Accelerate script's segmentation task, `transformers.Trainer`, masks, mean IoU."""

from __future__ import annotations

import functools
import json
import warnings

import numpy as np
import pytest
import torch
from conftest import REGION, tiny_backbone_config, tiny_config, train_script_arguments
from safetensors.torch import load_file

from xt_hf import XTForSemanticSegmentation, XTImageProcessor
from xt_hf.synthetic.coastline import LABELS, generate_dataset
from xt_hf.training import (
    BadSampleError,
    SegmentationPaddingCollator,
    compute_segmentation_metrics,
    mean_iou,
    prepare_segmentation_dataset,
    segmentation_predictions,
)

ID2LABEL = dict(enumerate(LABELS))
COAST = dict(image_size=6 * REGION, region_size=REGION)  # 6 × 6 regions of 32 px


def segmentation_config(**overrides):
    arguments = dict(backbone_config=tiny_backbone_config("convnext", out_features=["stage1", "stage2"]),
                     num_labels=3, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()},
                     classifier="pool", context_attention_causal=False, context_num_layers=1,
                     decoder_hidden_size=8)
    arguments.update(overrides)
    return tiny_config("convnext", **arguments)


@pytest.fixture(scope="module")
def coastline_data(tmp_path_factory):
    """A `save_to_disk` folder of the coastline task: `train` (10 images), `validation` (4), `test` (2)."""
    folder = tmp_path_factory.mktemp("data") / "coastline"
    generate_dataset(10, 2, num_validation=4, seed=0, **COAST).save_to_disk(folder)
    return folder


@pytest.fixture(scope="module")
def segmenter_config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "xt_segmenter.json"
    segmentation_config().to_json_file(path)
    return path


def script_arguments(dataset, model, output_dir, **settings) -> list[str]:
    settings = {"batch_size": 2, "learning_rate": 1e-2, "lr_scheduler": "constant", "num_workers": 0,
                "logging_steps": 1, "warmup_steps": 0, **settings}
    return train_script_arguments(dataset, model, output_dir, settings)


def logged(output_dir, key: str) -> list[float]:
    records = map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())
    return [record[key] for record in records if key in record]


def mask_dataset(images, masks):
    from datasets import Dataset, Features
    from datasets import Image as ImageFeature

    features = Features({"image": ImageFeature(), "mask": ImageFeature()})
    return Dataset.from_dict({"image": images, "mask": masks}, features=features)


# --------------------------------------------------------------------------------------------------------
# Mean IoU


def test_mean_iou_matches_a_hand_computation():
    ignore = 255
    predictions = [np.array([[0, 0, 1], [1, 2, 2]]), np.array([[1, 1], [0, 2]])]
    references = [np.array([[0, 1, 1], [1, 1, ignore]]), np.array([[1, 0], [0, ignore]])]
    # Labelled pixels (true → predicted): 0→0, 1→0, 1→1, 1→1, 1→2, then 1→1, 0→1, 0→0.
    # Class 0: intersection 2, labels 3, predictions 3 → IoU 2/4. Class 1: intersection 3, labels 5, predictions
    # 4 → IoU 3/6. Class 2: predicted once at a labelled pixel, never a label → IoU 0, accuracy NaN.
    # Class 3: in neither → NaN, left out of the means.
    metrics = mean_iou(predictions, references, num_labels=4, ignore_index=ignore)
    np.testing.assert_allclose(metrics["per_category_iou"], [0.5, 0.5, 0.0, np.nan])
    np.testing.assert_allclose(metrics["per_category_accuracy"], [2 / 3, 3 / 5, np.nan, np.nan])
    assert metrics["mean_iou"] == pytest.approx(1 / 3)
    assert metrics["mean_accuracy"] == pytest.approx((2 / 3 + 3 / 5) / 2)
    assert metrics["overall_accuracy"] == pytest.approx(5 / 8)


def test_mean_iou_of_nothing_labelled_is_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics = mean_iou(np.zeros((1, 2, 2)), np.full((1, 2, 2), 255), num_labels=2)
    assert np.isnan(metrics["mean_iou"]) and np.isnan(metrics["overall_accuracy"])


def test_compute_segmentation_metrics_reads_logits_and_skips_trainer_padding():
    from transformers import EvalPrediction

    labels = np.array([[[0, 1], [2, 2]], [[1, 1], [-100, -100]]])  # the Trainer pads with -100
    logits = np.zeros((2, 3, 2, 2), dtype=np.float32)
    predicted = np.array([[[0, 1], [2, 1]], [[1, 0], [0, 0]]])
    np.put_along_axis(logits, predicted[:, None], 5.0, axis=1)
    metrics = compute_segmentation_metrics(EvalPrediction(predictions=logits, label_ids=labels), id2label=ID2LABEL)
    expected = mean_iou(predicted[0], labels[0], 3)["per_category_iou"]  # the second image adds 1→1, 1→0
    assert metrics["iou_background"] == pytest.approx(1 / 2)
    assert metrics["iou_near_shore_vessel"] == pytest.approx(2 / 4)
    assert metrics["iou_offshore_vessel"] == pytest.approx(1 / 2) and expected[2] == pytest.approx(1 / 2)
    assert metrics["overall_accuracy"] == pytest.approx(4 / 6)


# --------------------------------------------------------------------------------------------------------
# Masks: transform, collator, bad samples


def test_collator_pads_images_and_masks_to_whole_regions_with_the_ignore_index():
    examples = [
        {"pixel_values": torch.ones(3, REGION, REGION + 5), "labels": torch.ones(REGION, REGION + 5).long()},
        {"pixel_values": torch.ones(3, 2 * REGION, REGION), "labels": torch.zeros(2 * REGION, REGION).long()},
    ]
    batch = SegmentationPaddingCollator(REGION, ignore_index=255)(examples)
    assert batch["pixel_values"].shape == (2, 3, 2 * REGION, 2 * REGION)
    assert batch["labels"].shape == (2, 2 * REGION, 2 * REGION) and batch["labels"].dtype == torch.long
    assert batch["labels"][0, :REGION, : REGION + 5].eq(1).all()
    assert batch["labels"][0, REGION:].eq(255).all() and batch["labels"][0, :, REGION + 5 :].eq(255).all()
    assert batch["labels"][1, :, REGION:].eq(255).all() and batch["pixel_values"][1, :, :, REGION:].eq(0).all()


def test_masks_as_images_or_arrays_resize_with_their_image():
    from datasets import Dataset

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)
    mask = np.zeros((40, 70), dtype=np.uint8)
    mask[:, 35:] = 2
    mask[:4] = 255  # unlabelled rows stay unlabelled
    processor = XTImageProcessor(region_size=REGION)
    as_image = prepare_segmentation_dataset(mask_dataset([image], [mask]), processor, num_labels=3)[0]
    as_array = prepare_segmentation_dataset(Dataset.from_dict({"image": [image], "mask": [mask.tolist()]}),
                                            processor, num_labels=3)[0]
    assert as_image["pixel_values"].shape == (3, 40, 70)
    assert torch.equal(as_image["labels"], torch.from_numpy(mask).long())
    assert torch.equal(as_array["labels"], as_image["labels"])

    resizing = XTImageProcessor(region_size=REGION, do_resize=True)  # 40×70 → 32×64, nearest for the mask
    resized = prepare_segmentation_dataset(mask_dataset([image], [mask]), resizing, num_labels=3)[0]
    assert resized["pixel_values"].shape == (3, 32, 64) and resized["labels"].shape == (32, 64)
    assert set(resized["labels"].unique().tolist()) == {0, 2, 255}


@pytest.mark.parametrize(
    "bad_mask,message",
    [
        (np.zeros((REGION, REGION - 3), dtype=np.uint8),
         rf"Sample 1: its mask is {REGION}×{REGION - 3} px \(height×width\) but its image is {REGION}×{REGION} px"),
        (np.full((REGION, REGION), 7, dtype=np.uint8),
         r"Sample 1: its mask holds class ids 7, outside the model's 3 classes \(0–2, and 255 for unlabelled"),
        (np.zeros((REGION, REGION, 3), dtype=np.uint8), r"Sample 1: its mask is a RGB image"),
    ],
)
def test_bad_masks_raise_errors_naming_the_sample(bad_mask, message):
    image = np.zeros((REGION, REGION, 3), dtype=np.uint8)
    good = np.full((REGION, REGION), 255, dtype=np.uint8)  # all unlabelled is allowed
    dataset = prepare_segmentation_dataset(mask_dataset([image, image], [good, bad_mask]),
                                           XTImageProcessor(region_size=REGION), num_labels=3)
    assert dataset[0]["labels"].eq(255).all()
    with pytest.raises(BadSampleError, match=message):
        dataset[1]


# --------------------------------------------------------------------------------------------------------
# transformers.Trainer


def test_trainer_fine_tunes_xt_segmentation_and_reports_mean_iou_over_mixed_heights(tmp_path):
    from datasets import concatenate_datasets
    from transformers import Trainer, TrainingArguments

    from xt_hf.synthetic.coastline import generate_sample, sample_rng

    model = XTForSemanticSegmentation(segmentation_config())
    processor = XTImageProcessor(region_size=REGION)
    raw = generate_dataset(8, 2, seed=1, **COAST)
    # Taller eval images (224 × 192 px): the Trainer pads the other batch's class maps with -100 when it
    # concatenates them (it pads only that dimension, so Trainer eval sets need one width).
    taller = [generate_sample(sample_rng(2, "test", i), image_size=7 * REGION, region_size=REGION) for i in range(2)]
    eval_raw = concatenate_datasets([raw["test"], mask_dataset([s.image[:, : 6 * REGION] for s in taller],
                                                               [s.mask[:, : 6 * REGION] for s in taller])])
    train_dataset = prepare_segmentation_dataset(raw["train"], processor, num_labels=3)
    eval_dataset = prepare_segmentation_dataset(eval_raw, processor, num_labels=3)
    arguments = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=8,
        learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, remove_unused_columns=False, dataloader_num_workers=0, seed=0,
    )
    trainer = Trainer(
        model=model, args=arguments, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=SegmentationPaddingCollator(REGION),
        compute_metrics=functools.partial(compute_segmentation_metrics, num_labels=3, id2label=ID2LABEL),
        preprocess_logits_for_metrics=segmentation_predictions,
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])

    metrics = trainer.evaluate()
    model.eval()
    predictions, references = [], []
    with torch.no_grad():
        for index in range(len(eval_dataset)):
            sample = eval_dataset[index]
            predictions.append(model(pixel_values=sample["pixel_values"][None]).logits.argmax(1)[0])
            references.append(sample["labels"])
    expected = mean_iou(predictions, references, num_labels=3)
    assert metrics["eval_mean_iou"] == pytest.approx(expected["mean_iou"], abs=1e-6)
    assert metrics["eval_iou_offshore_vessel"] == pytest.approx(expected["per_category_iou"][2], nan_ok=True, abs=1e-6)


# --------------------------------------------------------------------------------------------------------
# The Accelerate script


def test_task_follows_the_model_or_the_mask_column(coastline_data):
    from datasets import load_from_disk

    from xt_hf.training import TrainConfig, make_task

    train = load_from_disk(str(coastline_data))["train"]
    settings = dict(model="m.json", dataset="d")
    classification_config = tiny_config(num_labels=2)
    assert make_task(TrainConfig.from_dict(settings), classification_config, train).name == "segmentation"  # a mask column
    without_masks = TrainConfig.from_dict({**settings, "mask_column": "other"})
    assert make_task(without_masks, classification_config, train).name == "classification"
    segmenter = segmentation_config(architectures=["XTForSemanticSegmentation"])
    assert make_task(without_masks, segmenter, train).name == "segmentation"
    assert make_task(TrainConfig.from_dict({**settings, "task": "classification"}), segmenter, train).name == "classification"
    with pytest.raises(ValueError, match="`task` must be one of"):
        TrainConfig.from_dict({**settings, "task": "keypoints"})


def test_segmentation_decoder_learns_at_the_head_rate():
    from xt_hf.training import OptimizationArguments, parameter_groups

    model = XTForSemanticSegmentation(segmentation_config())
    groups = parameter_groups(model, OptimizationArguments(learning_rate=1e-3, head_learning_rate=0.5))
    decoder = {id(p) for p in model.decoder.parameters()}
    head = [group for group in groups if group["name"].startswith("head")]
    assert decoder == {id(p) for group in head for p in group["params"]}
    assert all(group["lr"] == 0.5 for group in head)


def test_script_trains_a_segmenter_and_keeps_the_best_by_mean_iou(coastline_data, segmenter_config_file, tmp_path,
                                                                   fresh_accelerate_state):
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    from xt_hf.synthetic.coastline import generate_sample, sample_rng
    from xt_hf.training.command import main
    from xt_hf.training.score import evaluate_saved_model

    output_dir = tmp_path / "run"
    metrics = main(script_arguments(coastline_data, segmenter_config_file, output_dir, max_steps=12, eval_steps=4,
                                    checkpointing_steps=None))

    losses = logged(output_dir, "train/loss")
    assert len(losses) == 12 and np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    assert {"eval/loss", "eval/mean_iou", "eval/pixel_accuracy", "eval/iou_background", "eval/iou_near_shore_vessel",
            "eval/iou_offshore_vessel", "best/mean_iou", "best/step"} <= set(metrics)
    assert metrics["best/mean_iou"] == max(logged(output_dir, "eval/mean_iou"))

    best = output_dir / "best"
    model = AutoModelForSemanticSegmentation.from_pretrained(best).eval()
    assert type(model) is XTForSemanticSegmentation and model.config.id2label == ID2LABEL
    saved = json.loads((best / "eval_results.json").read_text())
    assert saved["eval/mean_iou"] == metrics["best/mean_iou"]
    # The saved model is the one that scored best: evaluating it again on the validation split gives its scores.
    again = evaluate_saved_model(str(best), str(coastline_data), "validation", batch_size=2, seed=0, **COAST)
    for key in ("loss", "mean_iou", "pixel_accuracy", "iou_near_shore_vessel"):
        assert again[key] == pytest.approx(saved[f"eval/{key}"], abs=1e-5), key
    vessels = sum(len(generate_sample(sample_rng(0, "validation", i), **COAST).vessels) for i in range(4))
    assert sum(group["vessels"] for group in again["vessel_accuracy"].values()) == vessels
    processor = AutoImageProcessor.from_pretrained(best)
    image = np.zeros((COAST["image_size"], COAST["image_size"] + 10, 3), dtype=np.uint8)
    with torch.no_grad():
        outputs = model(**processor(image, return_tensors="pt"))
    (class_map,) = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.shape[:2]])
    assert class_map.shape == image.shape[:2]


class Preempted(Exception):
    pass


def test_resumed_segmentation_run_ends_with_the_weights_of_an_uninterrupted_run(
        coastline_data, segmenter_config_file, tmp_path, monkeypatch, fresh_accelerate_state):
    """Killed while writing its step-4 checkpoint, a run resumes from step 2 (mid-epoch, and its best-mIoU record)
    and ends bit-identical to a run that was never interrupted."""
    from accelerate.state import AcceleratorState

    import xt_hf.training.command as train_module
    import xt_hf.training.loop as loop_module

    settings = dict(batch_size=2, gradient_accumulation_steps=2, max_steps=5, checkpointing_steps=2,
                    checkpoints_total_limit=0, model_overrides={"grad_ratio": 0.5}, eval_steps=2)
    train_module.main(script_arguments(coastline_data, segmenter_config_file, tmp_path / "uninterrupted", **settings))

    original_save = loop_module.save_checkpoint

    def save_then_die_at_step_4(accelerator, output_dir, step, total_limit):
        if step == 4:
            raise Preempted
        return original_save(accelerator, output_dir, step, total_limit)

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_die_at_step_4)
    with pytest.raises(Preempted):
        train_module.main(script_arguments(coastline_data, segmenter_config_file, interrupted, **settings))
    monkeypatch.setattr(loop_module, "save_checkpoint", original_save)
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["step_000002"]
    AcceleratorState._reset_state(reset_partial_state=True)
    resumed_metrics = train_module.main(
        script_arguments(coastline_data, segmenter_config_file, interrupted, **settings))

    records = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "train/loss" in r] == [1, 2, 3, 4] + [3, 4, 5]  # only what was lost
    expected = load_file(tmp_path / "uninterrupted" / "checkpoints" / "step_000005" / "model.safetensors")
    resumed = load_file(interrupted / "checkpoints" / "step_000005" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    uninterrupted_best = json.loads((tmp_path / "uninterrupted" / "best" / "eval_results.json").read_text())
    assert resumed_metrics["best/mean_iou"] == uninterrupted_best["eval/mean_iou"]


def test_coastline_experiment_configs_differ_only_in_the_context_encoder():
    from conftest import REPO_ROOT

    from xt_hf.training import TrainConfig, read_config_file

    configs = {name: TrainConfig.from_dict(read_config_file(REPO_ROOT / f"configs/train/coastline_{name}.yaml"))
               for name in ("context", "nocontext")}
    context, nocontext = (configs[name].to_dict() for name in ("context", "nocontext"))
    assert {key for key in context if context[key] != nocontext[key]} == {"model_overrides", "output_dir"}
    assert nocontext["model_overrides"] == {"context_encoder": "none"} and context["model_overrides"] == {}
    assert context["report_to"] == "none"  # the word, not a null
    assert context["task"] == "segmentation" and context["eval_split"] == "validation"  # test is never trained on


# --------------------------------------------------------------------------------------------------------
# The packaged `mean_iou` metric


def test_packaged_mean_iou_metric_loads_offline_and_matches_a_hand_computation(monkeypatch):
    import socket

    import evaluate

    from xt_hf.training.metrics import MEAN_IOU

    def refuse(*args, **kwargs):
        raise OSError("network access in a test that must work offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    metric = evaluate.load(str(MEAN_IOU))
    ignore = 255
    predictions = [np.array([[0, 0, 1], [1, 2, 2]]), np.array([[1, 1], [0, 2]])]
    references = [np.array([[0, 1, 1], [1, 1, ignore]]), np.array([[1, 0], [0, ignore]])]
    # The same pixels as test_mean_iou_matches_a_hand_computation: IoU 2/4, 3/6, 0, NaN; accuracy 2/3, 3/5, NaN, NaN.
    results = metric.compute(predictions=predictions, references=references, num_labels=4, ignore_index=ignore)
    assert set(results) == {"mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou",
                            "per_category_accuracy"}
    np.testing.assert_allclose(results["per_category_iou"], [0.5, 0.5, 0.0, np.nan])
    np.testing.assert_allclose(results["per_category_accuracy"], [2 / 3, 3 / 5, np.nan, np.nan])
    assert results["mean_iou"] == pytest.approx(1 / 3)
    assert results["mean_accuracy"] == pytest.approx((2 / 3 + 3 / 5) / 2)
    assert results["overall_accuracy"] == pytest.approx(5 / 8)

    # reduce_labels: reference 0 becomes unlabelled, k becomes k - 1 (and 255 stays unlabelled).
    reduced = metric.compute(predictions=[np.array([[0, 1, 1, 0]])], references=[np.array([[1, 2, 0, ignore]])],
                             num_labels=2, ignore_index=ignore, reduce_labels=True)
    np.testing.assert_allclose(reduced["per_category_iou"], [1.0, 1.0])
    assert reduced["overall_accuracy"] == 1.0
    # The local function the Trainer helpers use gives the same numbers.
    local = mean_iou(predictions, references, num_labels=4, ignore_index=ignore)
    np.testing.assert_allclose(local["per_category_iou"], results["per_category_iou"])


def test_segmentation_eval_metrics_equal_the_mean_iou_metric(coastline_data, fresh_accelerate_state):
    import evaluate
    from accelerate import Accelerator
    from datasets import load_from_disk
    from torch.utils.data import DataLoader

    from xt_hf.training import SegmentationTask, TrainConfig, logits_to_class_maps
    from xt_hf.training.metrics import MEAN_IOU

    torch.manual_seed(0)
    model = XTForSemanticSegmentation(segmentation_config()).eval()
    processor = XTImageProcessor(region_size=REGION)
    task = SegmentationTask(TrainConfig.from_dict({"model": "m.json", "dataset": "d"}))
    dataset = task.prepare(load_from_disk(str(coastline_data))["validation"], processor, model.config)
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(DataLoader(dataset, batch_size=3, collate_fn=task.collator(processor, model.config)))
    with torch.no_grad():
        metrics = task.evaluate(model, loader, accelerator)
        predictions, references = [], []
        for batch in loader:
            logits = model(pixel_values=batch["pixel_values"]).logits
            predictions += list(logits_to_class_maps(logits, batch["labels"].shape[-2:]).numpy())
            references += list(batch["labels"].numpy())
    expected = evaluate.load(str(MEAN_IOU)).compute(predictions=predictions, references=references, num_labels=3,
                                                    ignore_index=model.config.semantic_loss_ignore_index)
    assert metrics["eval/mean_iou"] == pytest.approx(expected["mean_iou"], rel=1e-12, nan_ok=True)
    assert metrics["eval/mean_accuracy"] == pytest.approx(expected["mean_accuracy"], rel=1e-12, nan_ok=True)
    assert metrics["eval/pixel_accuracy"] == pytest.approx(expected["overall_accuracy"], rel=1e-12)
    for index, name in ID2LABEL.items():
        key = "eval/iou_" + name.replace(" ", "_").replace("-", "_")
        assert metrics[key] == pytest.approx(expected["per_category_iou"][index], rel=1e-12, nan_ok=True)
