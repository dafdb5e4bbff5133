"""Detection training: the Accelerate script's detection task, the collator, COCO mAP, bad boxes, `Trainer`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_backbone_config, tiny_config, train_script_arguments

from xt_hf import XTForObjectDetection, XTImageProcessor
from xt_hf.synthetic.detection import LABELS, generate_dataset
from xt_hf.training import (
    BadSampleError,
    DetectionPaddingCollator,
    detection_metrics,
    model_detections,
    prepare_detection_dataset,
    target_boxes,
)

REGION = 64
ID2LABEL = dict(enumerate(LABELS))
SCENES = dict(image_size=2 * REGION, region_size=REGION)  # 2 × 2 regions: two beacons, two regions of vessels


def detection_config(**overrides):
    arguments = dict(region_size=REGION,
                     backbone_config=tiny_backbone_config("convnext", out_features=["stage1", "stage2"]),
                     num_labels=2, id2label=ID2LABEL, label2id={v: k for k, v in ID2LABEL.items()},
                     classifier="pool", context_attention_causal=False, context_num_layers=1, context_hidden_size=16,
                     decoder_hidden_size=8, decoder_output_stride=4)
    arguments.update(overrides)
    return tiny_config("convnext", **arguments)


@pytest.fixture(scope="module")
def beacon_data(tmp_path_factory):
    """A `save_to_disk` folder of the synthetic detection task: `train` (8 scenes), `validation` (4), `test` (2)."""
    folder = tmp_path_factory.mktemp("data") / "beacons"
    generate_dataset(8, 2, num_validation=4, seed=0, **SCENES).save_to_disk(folder)
    return folder


@pytest.fixture(scope="module")
def detector_config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "xt_detector.json"
    detection_config().to_json_file(path)
    return path


def logged(output_dir, key: str) -> list[float]:
    records = map(json.loads, (output_dir / "metrics.jsonl").read_text().splitlines())
    return [record[key] for record in records if key in record]


def objects_dataset(images, objects, names=LABELS):
    from datasets import ClassLabel, Dataset, Features, Image, List, Value

    annotation = {"bbox": List(Value("float32"), length=4), "category_id": ClassLabel(names=list(names)),
                  "area": Value("float32"), "iscrowd": Value("int64")}
    features = Features({"image": Image(), "objects": {"image_id": Value("int64"), "annotations": List(annotation)}})
    rows = {"image": images, "objects": [
        {"image_id": i, "annotations": [{"bbox": list(map(float, box)), "category_id": category,
                                         "area": float(box[2] * box[3]), "iscrowd": 0} for box, category in cell]}
        for i, cell in enumerate(objects)]}
    return Dataset.from_dict(rows, features=features)


# --------------------------------------------------------------------------------------------------------
# Settings


def test_detection_settings_round_trip(tmp_path):
    import yaml

    from xt_hf.training import TrainConfig, parse_args

    config = TrainConfig.from_dict({"model": "m.json", "dataset": "d", "task": "detection", "learning_rate": "3e-4"})
    assert config.task == "detection"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    again = parse_args(["--config", str(path)])
    assert again == config
    assert parse_args(["--model", "m.json", "--dataset", "d", "--task", "detection"]).task == "detection"
    with pytest.raises(ValueError, match="`task` must be one of"):
        TrainConfig.from_dict({"model": "m", "dataset": "d", "task": "keypoints"})


def test_task_follows_the_model_or_the_objects_column(beacon_data):
    from datasets import load_from_disk

    from xt_hf.training import TrainConfig, make_task

    train = load_from_disk(str(beacon_data))["train"]
    settings = dict(model="m.json", dataset="d")
    classifier = tiny_config(num_labels=2)
    assert make_task(TrainConfig.from_dict(settings), classifier, train).name == "detection"  # an `objects` column
    detector = detection_config(architectures=["XTForObjectDetection"])
    plain = train.remove_columns("objects")
    assert make_task(TrainConfig.from_dict(settings), classifier, plain).name == "classification"
    assert make_task(TrainConfig.from_dict(settings), detector, plain).name == "detection"
    assert make_task(TrainConfig.from_dict({**settings, "task": "classification"}), detector, train).name == "classification"


# --------------------------------------------------------------------------------------------------------
# Data and collator


def test_collator_pads_to_whole_regions_and_renormalises_boxes():
    processor = XTImageProcessor(region_size=REGION)
    images = [np.zeros((70, 100, 3), np.uint8), np.zeros((64, 64, 3), np.uint8)]
    dataset = prepare_detection_dataset(
        objects_dataset(images, [[([10, 20, 30, 40], 1), ([0, 0, 100, 70], 0)], []]), processor, num_labels=2)
    examples = [dataset[0], dataset[1]]
    assert examples[0]["pixel_values"].shape == (3, 70, 100)  # unpadded per sample
    batch = DetectionPaddingCollator(REGION)(examples)
    assert batch["pixel_values"].shape == (2, 3, 128, 128)
    first, second = batch["labels"]
    assert first["class_labels"].tolist() == [1, 0]
    # Normalised (cx, cy, w, h) by the padded 128 × 128 frame: the pixels do not move.
    expected = torch.tensor([[25 / 128, 40 / 128, 30 / 128, 40 / 128], [50 / 128, 35 / 128, 100 / 128, 70 / 128]])
    torch.testing.assert_close(first["boxes"], expected)
    assert first["frame_size"].tolist() == [128, 128] and first["orig_size"].tolist() == [70, 100]
    assert second["class_labels"].shape == (0,) and second["boxes"].shape == (0, 4)  # no objects: empty labels
    # As the processor normalises a padded batch itself.
    encoded = processor(images, annotations=[{"image_id": 0, "annotations": [
        {"bbox": [10, 20, 30, 40], "category_id": 1}, {"bbox": [0, 0, 100, 70], "category_id": 0}]},
        {"image_id": 1, "annotations": []}], return_tensors="pt")
    torch.testing.assert_close(encoded["labels"][0]["boxes"], first["boxes"])
    torch.testing.assert_close(encoded["pixel_values"], batch["pixel_values"])
    # The model takes the batch, images without objects included.
    model = XTForObjectDetection(detection_config())
    assert torch.isfinite(model(**batch).loss)


def test_class_names_map_by_name_and_columnar_objects_work():
    from datasets import ClassLabel, Dataset, Features, Image, List, Value

    processor = XTImageProcessor(region_size=REGION)
    image = np.zeros((64, 64, 3), np.uint8)
    names = ClassLabel(names=["yellow zone", "red zone"])
    features = Features({"image": Image(), "objects": {"bbox": List(List(Value("float32"), length=4)),
                                                       "category": List(names)}})
    data = Dataset.from_dict({"image": [image], "objects": [{"bbox": [[1, 2, 3, 4]], "category": [0]}]},
                             features=features)
    dataset = prepare_detection_dataset(data, processor, label2id={"red zone": 0, "yellow zone": 1})
    assert dataset[0]["labels"]["class_labels"].tolist() == [1]  # "yellow zone" is the model's class 1


@pytest.mark.parametrize("box, category, message", [
    ([50, 10, 20, 10], 0, "reaching outside its 64×64 px image"),
    ([-3, 10, 20, 10], 0, "reaching outside"),
    ([10, 10, 0, 10], 0, "width and height must be positive"),
    ([10, 10, 5, -2], 0, "width and height must be positive"),
    ([10, 10, 5, 5], 2, "outside the model's 2 classes"),
])
def test_bad_boxes_raise_errors_naming_the_sample(box, category, message):
    from datasets import Dataset, Features, Image, List, Value

    annotation = {"bbox": List(Value("float32"), length=4), "category_id": Value("int64")}
    features = Features({"image": Image(), "objects": {"image_id": Value("int64"), "annotations": List(annotation)}})
    good = {"image_id": 0, "annotations": [{"bbox": [1, 1, 4, 4], "category_id": 1}]}
    bad = {"image_id": 1, "annotations": [{"bbox": box, "category_id": category}]}
    image = np.zeros((64, 64, 3), np.uint8)
    data = Dataset.from_dict({"image": [image, image], "objects": [good, bad]}, features=features)
    dataset = prepare_detection_dataset(data, XTImageProcessor(region_size=REGION), num_labels=2)
    assert dataset[0]["labels"]["class_labels"].tolist() == [1]
    with pytest.raises(BadSampleError, match=rf"Sample 1.*object 0.*{message}"):
        dataset[1]


# --------------------------------------------------------------------------------------------------------
# COCO mAP


def _random_boxes(generator, count, size=256.0):
    corner = torch.rand(count, 2, generator=generator) * (size - 40)
    side = 8 + torch.rand(count, 2, generator=generator) * 30
    return torch.cat([corner, corner + side], dim=-1)


def test_map_of_perfect_predictions_is_one_and_of_shifted_boxes_lower():
    generator = torch.Generator().manual_seed(0)
    targets = [{"boxes": _random_boxes(generator, n), "labels": torch.randint(0, 2, (n,), generator=generator)}
               for n in (3, 0, 5, 2)]
    perfect = [{"boxes": t["boxes"].clone(), "labels": t["labels"].clone(),
                "scores": torch.linspace(0.9, 0.5, len(t["labels"]))} for t in targets]
    metrics = detection_metrics(perfect, targets, ID2LABEL)
    for key in ("map", "map_50", "map_75", "map_small", "map_agnostic", "map_50_agnostic", "ap_red_zone",
                "ap_yellow_zone"):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics["map_large"] == -1.0  # no object above 96² px: nothing to score, as COCO reports it

    shifted = [{**p, "boxes": p["boxes"] + 4.0} for p in perfect]
    worse = detection_metrics(shifted, targets, ID2LABEL)
    assert worse["map"] < 0.9 and worse["map"] < metrics["map"]
    wrong_class = [{**p, "labels": 1 - p["labels"]} for p in perfect]
    swapped = detection_metrics(wrong_class, targets, ID2LABEL)
    assert swapped["map_50"] == pytest.approx(0.0) and swapped["map_50_agnostic"] == pytest.approx(1.0)
    # Unsure of the class: every box reported under both classes. Class-wise about half; the boxes are all found.
    both = [{"boxes": torch.cat([p["boxes"], p["boxes"]]), "labels": torch.cat([p["labels"], 1 - p["labels"]]),
             "scores": torch.cat([p["scores"], p["scores"] - 0.01])} for p in perfect]
    unsure = detection_metrics(both, targets, ID2LABEL)
    assert unsure["map_50_agnostic"] == pytest.approx(1.0) and unsure["map_50"] < 1.0


def test_model_outputs_and_labels_become_pixel_boxes():
    logits = torch.full((1, 3, 2), float("-inf"))
    logits[0, 0, 1], logits[0, 1, 0] = 2.0, -1.0
    pred_boxes = torch.tensor([[[0.5, 0.25, 0.25, 0.125], [0.1, 0.1, 0.1, 0.1], [0, 0, 0, 0]]])
    (found,) = model_detections(logits, pred_boxes, (128, 256))
    assert found["labels"].tolist() == [1, 0]
    torch.testing.assert_close(found["boxes"][0], torch.tensor([96.0, 24.0, 160.0, 40.0]))
    torch.testing.assert_close(found["scores"], torch.tensor([2.0, -1.0]).sigmoid())
    (target,) = target_boxes([{"class_labels": torch.tensor([1]), "boxes": pred_boxes[0, :1]}], (128, 256))
    torch.testing.assert_close(target["boxes"], found["boxes"][:1])


# --------------------------------------------------------------------------------------------------------
# The Accelerate script


def test_script_trains_a_detector_and_keeps_the_best_by_map_50(beacon_data, detector_config_file, tmp_path,
                                                              fresh_accelerate_state):
    from transformers import AutoImageProcessor, AutoModelForObjectDetection

    from xt_hf.training.command import main
    from xt_hf.training.score import evaluate_saved_model

    output_dir = tmp_path / "run"
    settings = {"task": "detection", "max_steps": 2, "eval_steps": 1, "batch_size": 4, "num_workers": 0,
                "logging_steps": 1, "learning_rate": 1e-3, "checkpointing_steps": None, "cpu": True}
    metrics = main(train_script_arguments(beacon_data, detector_config_file, output_dir, settings))
    assert {"eval/loss", "eval/map", "eval/map_50", "eval/map_small", "eval/map_50_agnostic", "eval/ap_red_zone",
            "eval/ap_yellow_zone", "best/map_50", "best/step"} <= set(metrics)
    assert len(logged(output_dir, "eval/map")) == 2 and len(logged(output_dir, "eval/map_small")) == 2
    assert metrics["best/map_50"] == max(logged(output_dir, "eval/map_50"))

    best = output_dir / "best"
    model = AutoModelForObjectDetection.from_pretrained(best).eval()
    assert type(model) is XTForObjectDetection and model.config.id2label == ID2LABEL
    saved = json.loads((best / "eval_results.json").read_text())
    # The saved model is the one that scored best: evaluating it again on the validation split gives its scores.
    again = evaluate_saved_model(str(best), str(beacon_data), "validation", batch_size=4)
    assert again["images"] == 4
    for key in ("loss", "map", "map_50", "map_small", "map_50_agnostic", "ap_red_zone", "ap_yellow_zone"):
        assert again[key] == pytest.approx(saved[f"eval/{key}"], abs=1e-6), key
    processor = AutoImageProcessor.from_pretrained(best)
    image = np.zeros((2 * REGION, 2 * REGION + 10, 3), dtype=np.uint8)
    with torch.no_grad():
        outputs = model(**processor(image, return_tensors="pt"))
    (found,) = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=[image.shape[:2]])
    assert found["boxes"].shape[-1] == 4


def test_detection_loss_falls_on_a_tiny_set(beacon_data):
    from datasets import load_from_disk

    torch.set_num_threads(1)
    processor = XTImageProcessor(region_size=REGION)
    config = detection_config()
    dataset = prepare_detection_dataset(load_from_disk(str(beacon_data))["train"].select(range(4)), processor,
                                        label2id=config.label2id)
    batch = DetectionPaddingCollator(REGION)([dataset[i] for i in range(4)])
    model = XTForObjectDetection(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])


# --------------------------------------------------------------------------------------------------------
# transformers.Trainer


def test_trainer_trains_a_detector_and_reports_coco_map(beacon_data, tmp_path):
    import functools

    from datasets import load_from_disk
    from transformers import Trainer, TrainingArguments

    from xt_hf.training import compute_detection_metrics, detection_predictions

    data = load_from_disk(str(beacon_data))
    processor = XTImageProcessor(region_size=REGION)
    model = XTForObjectDetection(detection_config())
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                               per_device_eval_batch_size=2, use_cpu=True, report_to="none",
                               remove_unused_columns=False, eval_do_concat_batches=False),
        train_dataset=prepare_detection_dataset(data["train"], processor, label2id=model.config.label2id),
        eval_dataset=prepare_detection_dataset(data["validation"], processor, label2id=model.config.label2id),
        data_collator=DetectionPaddingCollator(REGION),
        preprocess_logits_for_metrics=detection_predictions,
        compute_metrics=functools.partial(compute_detection_metrics, id2label=model.config.id2label),
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert {"eval_loss", "eval_map", "eval_map_50", "eval_map_small", "eval_map_50_agnostic"} <= set(metrics)
