"""Fine-tuning: `transformers.Trainer`, the Accelerate script `xt_hf.training`, bad-data errors."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import REGION, REPO_ROOT, tiny_config, train_script_arguments
from PIL import Image
from safetensors.torch import load_file

from xt_hf import XTForImageClassification, XTImageProcessor
from xt_hf.training import (
    BadSampleError,
    RegionPaddingCollator,
    compute_metrics,
    prepare_dataset,
    top_k_accuracy,
)

CLASSES = ["blue", "red"]


def colour_images(count: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """Noisy images of mixed sizes (1 or 2 regions per side) whose label is their dominant colour.

    Sides are whole regions: a freshly initialised Swin-v2 gets all-zero tokens from padding patches, and its
    cosine attention then has gradients of ~1e12 (clipped, but they stall these few-step runs).
    """
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for index in range(count):
        label = index % 2
        height, width = rng.choice([REGION, 2 * REGION], size=2)
        image = rng.integers(0, 120, size=(height, width, 3)).astype(np.uint8)
        image[..., 2 if label == 0 else 0] += 120
        images.append(image)
        labels.append(label)
    return images, labels


def colour_dataset(count: int, seed: int):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    images, labels = colour_images(count, seed)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=CLASSES)})
    return Dataset.from_dict({"image": images, "label": labels}, features=features)


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory):
    """A `save_to_disk` folder with `train` (18 images) and `validation` (8 images) splits."""
    from datasets import DatasetDict

    folder = tmp_path_factory.mktemp("data") / "colours"
    DatasetDict({"train": colour_dataset(18, seed=0), "validation": colour_dataset(8, seed=1)}).save_to_disk(folder)
    return folder


@pytest.fixture(scope="module")
def model_config_file(tmp_path_factory):
    """An XTConfig JSON: the script builds a new, randomly initialised model from it."""
    path = tmp_path_factory.mktemp("model") / "xt_tiny.json"
    tiny_config(context_num_layers=1).to_json_file(path)
    return path


def script_arguments(dataset, model, output_dir, **settings) -> list[str]:
    settings = {"batch_size": 4, "learning_rate": 3e-3, "num_workers": 0, "logging_steps": 1, "warmup_steps": 0,
                "label_smoothing": 0.0, **settings}
    return train_script_arguments(dataset, model, output_dir, settings)


def logged_losses(output_dir) -> list[float]:
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [record["train/loss"] for record in map(json.loads, lines) if "train/loss" in record]


# --------------------------------------------------------------------------------------------------------
# transformers.Trainer


def test_trainer_fine_tunes_xt_with_set_transform_and_top_k_metrics(tmp_path):
    from transformers import Trainer, TrainingArguments

    label2id = {name: index for index, name in enumerate(CLASSES)}
    model = XTForImageClassification(
        tiny_config(num_labels=2, id2label=dict(enumerate(CLASSES)), label2id=label2id, context_num_layers=1)
    )
    processor = XTImageProcessor(region_size=REGION)
    train_dataset = prepare_dataset(colour_dataset(16, seed=0), processor, label2id=label2id)
    eval_dataset = prepare_dataset(colour_dataset(8, seed=1), processor, label2id=label2id)
    arguments = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, per_device_eval_batch_size=8, max_steps=16,
        learning_rate=3e-3, lr_scheduler_type="constant", max_grad_norm=5.0, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True,
        remove_unused_columns=False,  # the transform needs the raw image column
        dataloader_num_workers=0, seed=0,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=train_dataset, eval_dataset=eval_dataset,
                      data_collator=RegionPaddingCollator(REGION), compute_metrics=compute_metrics)
    trainer.train()

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    metrics = trainer.evaluate()
    # The reported top-1 is the accuracy of the trained model's own predictions on the evaluation images, and
    # the colour task is learnt: most are right (chance is 1/2).
    predictions = trainer.predict(eval_dataset)
    accuracy = float((predictions.predictions.argmax(-1) == predictions.label_ids).mean())
    assert metrics["eval_top1"] == pytest.approx(accuracy)
    assert metrics["eval_top1"] >= 0.75, metrics
    assert metrics["eval_top5"] == 1.0  # 2 classes: top-5 counts everything


def test_collator_pads_mixed_sizes_to_one_region_multiple():
    examples = [{"pixel_values": torch.ones(3, REGION, REGION + 5), "labels": 1},
                {"pixel_values": torch.ones(3, 2 * REGION, REGION), "labels": 0}]
    batch = RegionPaddingCollator(REGION)(examples)
    assert batch["pixel_values"].shape == (2, 3, 2 * REGION, 2 * REGION)
    assert batch["pixel_values"][0, :, REGION:].abs().sum() == 0 and batch["pixel_values"][0, :, :REGION, :REGION + 5].eq(1).all()
    assert batch["labels"].tolist() == [1, 0]


def test_top_k_accuracy():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    assert top_k_accuracy(logits, np.array([1, 1, 1]), k=1) == pytest.approx(1 / 3)
    assert top_k_accuracy(logits, np.array([1, 1, 1]), k=2) == pytest.approx(1.0)
    assert top_k_accuracy(logits, np.array([2, 2, 2]), k=5) == 1.0


# --------------------------------------------------------------------------------------------------------
# The Accelerate script


def test_script_loss_falls_and_best_model_loads_with_auto_classes(saved_dataset, model_config_file, tmp_path,
                                                                  fresh_accelerate_state):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from xt_hf.training.command import main

    output_dir = tmp_path / "run"
    metrics = main(script_arguments(saved_dataset, model_config_file, output_dir, max_steps=15, eval_steps=5))

    losses = logged_losses(output_dir)
    assert len(losses) == 15 and np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])
    assert {"eval/top1", "eval/top5", "best/top1"} <= set(metrics)
    best = output_dir / "best"
    model = AutoModelForImageClassification.from_pretrained(best).eval()
    processor = AutoImageProcessor.from_pretrained(best)
    assert type(model).__name__ == "XTForImageClassification" and model.config.id2label == dict(enumerate(CLASSES))
    images, labels = colour_images(4, seed=3)
    with torch.no_grad():
        logits = model(**processor(images, return_tensors="pt")).logits
    assert logits.shape == (4, 2)
    assert json.loads((best / "eval_results.json").read_text())["eval/top1"] == metrics["best/top1"]


class Preempted(Exception):
    pass


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(saved_dataset, model_config_file, tmp_path,
                                                                   monkeypatch, fresh_accelerate_state):
    """Killed while writing its step-6 checkpoint, a run resumes from step 3 (mid-epoch, mid-accumulation
    cycle of the data order) and must end bit-identical to a run that was never interrupted."""
    from accelerate.state import AcceleratorState

    import xt_hf.training.command as train_module
    import xt_hf.training.loop as loop_module

    # 18 images in batches of 2 with 2-step accumulation: 5 steps per epoch, the last of a single batch.
    settings = dict(batch_size=2, gradient_accumulation_steps=2, max_steps=8, checkpointing_steps=3,
                    checkpoints_total_limit=0, model_overrides={"grad_ratio": 0.5}, eval_steps=4)
    train_module.main(script_arguments(saved_dataset, model_config_file, tmp_path / "uninterrupted", **settings))

    original_save = loop_module.save_checkpoint

    def save_then_die_at_step_6(accelerator, output_dir, step, total_limit):
        if step == 6:
            accelerator.save_state(str(output_dir / "checkpoints" / "step_000006.tmp"))  # never renamed
            raise Preempted
        return original_save(accelerator, output_dir, step, total_limit)

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_die_at_step_6)
    with pytest.raises(Preempted):
        train_module.main(script_arguments(saved_dataset, model_config_file, interrupted, **settings))
    monkeypatch.setattr(loop_module, "save_checkpoint", original_save)
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["step_000003", "step_000006.tmp"]

    AcceleratorState._reset_state(reset_partial_state=True)
    train_module.main(script_arguments(saved_dataset, model_config_file, interrupted, **settings))

    logged_steps = [record["step"] for record in map(json.loads, (interrupted / "metrics.jsonl").read_text().splitlines())
                    if "train/loss" in record]
    assert logged_steps == [1, 2, 3, 4, 5, 6] + [4, 5, 6, 7, 8]  # the second run did only what was lost
    expected = load_file(tmp_path / "uninterrupted" / "checkpoints" / "step_000008" / "model.safetensors")
    resumed = load_file(interrupted / "checkpoints" / "step_000008" / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


def test_two_processes_on_cpu_end_with_identical_weights(saved_dataset, model_config_file, tmp_path):
    output_dir = tmp_path / "ddp"
    # `accelerate launch` starts the processes (torchrun underneath); `cpu=true` makes Accelerate join them over gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29517", "-m", "xt_hf.training",
               *script_arguments(saved_dataset, model_config_file, output_dir, max_steps=4, checkpointing_steps=0,
                                 verify_replicas=True, batch_size=3, cpu=True)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    hashes = [(output_dir / f"weights_rank{rank}.sha256").read_text() for rank in (0, 1)]
    assert hashes[0] == hashes[1]
    losses = logged_losses(output_dir)
    assert len(losses) == 4
    assert "All 2 processes hold identical weights" in result.stderr


# --------------------------------------------------------------------------------------------------------
# Bad data names the sample


def test_corrupt_image_error_names_index_and_file(tmp_path):
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    for label in CLASSES:
        (tmp_path / label).mkdir()
    images, _ = colour_images(4, seed=0)
    for index, image in enumerate(images):
        Image.fromarray(image).save(tmp_path / CLASSES[index % 2] / f"{index}.png")
    corrupt = tmp_path / "red" / "corrupt.png"
    corrupt.write_bytes((tmp_path / "red" / "1.png").read_bytes()[:60])  # a truncated PNG
    dataset = load_dataset("imagefolder", data_dir=str(tmp_path), split="train")
    raw_images = dataset.cast_column("image", ImageFeature(decode=False))["image"]
    index = next(i for i, image in enumerate(raw_images) if image["path"].endswith("corrupt.png"))

    prepared = prepare_dataset(dataset, XTImageProcessor(region_size=REGION))
    with pytest.raises(BadSampleError, match=rf"Sample {index} \(.*corrupt\.png\): cannot decode the image"):
        prepared[index]


def test_label_missing_from_label2id_error_names_the_sample():
    from datasets import Dataset

    images, _ = colour_images(3, seed=0)
    dataset = Dataset.from_dict({"image": images, "label": ["red", "blue", "green"]})
    prepared = prepare_dataset(dataset, XTImageProcessor(region_size=REGION), label2id={"blue": 0, "red": 1})
    assert prepared[0]["labels"] == 1
    with pytest.raises(BadSampleError, match=r"Sample 2 has label 'green', which is not in the model's label2id "
                                             r"\('blue', 'red'\)"):
        prepared[2]


def test_image_smaller_than_a_region_error_names_the_sample(saved_dataset, model_config_file, tmp_path,
                                                             fresh_accelerate_state):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature

    from xt_hf.training.command import main

    images, labels = colour_images(6, seed=0)
    images[4] = images[4][: REGION - 7]
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=CLASSES)})
    folder = tmp_path / "small"
    Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(folder)

    message = rf"Sample 4 is {REGION - 7}×\d+ px \(height×width\), smaller than one region \({REGION}×{REGION} px\)"
    with pytest.raises(BadSampleError, match=message):
        prepare_dataset(Dataset.load_from_disk(folder), XTImageProcessor(region_size=REGION))[4]
    with pytest.raises(BadSampleError, match=message):  # the script surfaces the same error
        main(script_arguments(folder, model_config_file, tmp_path / "run", max_steps=2, batch_size=6,
                              checkpointing_steps=0))


def test_fine_tuning_guide_lists_every_training_setting():
    import re

    from conftest import REPO_ROOT

    from xt_hf.training.arguments import SETTING_NAMES

    guide = (REPO_ROOT / "docs" / "fine-tuning.md").read_text()
    documented = set(re.findall(r"^\| `(\w+)` \|", guide, flags=re.M))
    missing = [name for name in SETTING_NAMES if name not in documented]
    assert not missing, f"docs/fine-tuning.md's settings tables lack {missing}"


# --------------------------------------------------------------------------------------------------------
# Settings: four HfArgumentParser dataclasses, a config file, flags


def test_settings_from_yaml_file_then_flags(tmp_path):
    from transformers import HfArgumentParser

    from xt_hf.training.arguments import ARGUMENT_GROUPS, parse_args, train_argument_parser

    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "model: m.json\ndataset: imagefolder:/data\nlearning_rate: 3e-4\n"  # YAML reads 3e-4 as a string
        "batch_size: 8\nmax_steps: 1000\nmodel_overrides: {region_batch_size: 16, context_num_layers: 2}\n"
        "eval_split: val\nreport_to: none\ngradient_checkpointing: false\ncheckpointing_steps: null\n"
    )
    config = parse_args(["--config", str(config_file), "--batch-size", "4", "--gradient-checkpointing",
                         "--processor-overrides", '{"do_resize": true}'])
    assert config.model == "m.json" and config.dataset == "imagefolder:/data"
    assert config.learning_rate == 3e-4 and config.batch_size == 4  # from the file, converted; the flag wins
    assert config.max_steps == 1000 and isinstance(config.max_steps, int)
    assert config.model_overrides == {"region_batch_size": 16, "context_num_layers": 2}
    assert config.processor_overrides == {"do_resize": True}  # JSON on the command line
    assert config.gradient_checkpointing is True and config.eval_split == "val" and config.checkpointing_steps is None
    assert config.report_to == "none" and config.weight_decay == 0.05  # a word, not a null; an untouched default
    assert config.optimization_arguments.batch_size == 4  # each setting lives in one group
    assert [type(group) for group in vars(config).values()] == list(ARGUMENT_GROUPS)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model_arguments = None

    # A JSON file gives the same; a dict flag replaces the file's whole dict; the written settings read back.
    json_file = tmp_path / "run.json"
    json_file.write_text(json.dumps({"model": "m.json", "dataset": "d", "model_overrides": {"context_num_layers": 2}}))
    config = parse_args(["--config", str(json_file), "--model-overrides", '{"region_batch_size": 4}'])
    assert config.model_overrides == {"region_batch_size": 4}
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(config.to_dict()))
    assert parse_args(["--config", str(tmp_path / "again.yaml")]) == config

    parser = train_argument_parser()
    assert isinstance(parser, HfArgumentParser)
    (action,) = [action for action in parser._actions if action.dest == "learning_rate"]
    assert action.option_strings == ["--learning_rate", "--learning-rate"]
    assert action.help == "Peak learning rate (all parameter groups)."


@pytest.mark.parametrize("source", ["file", "from_dict"])
def test_unknown_setting_fails_with_a_suggestion(tmp_path, source):
    from xt_hf.training import TrainConfig, parse_args

    with pytest.raises(ValueError, match=r"Unknown training setting 'lerning_rate'; did you mean 'learning_rate'\?"):
        if source == "file":
            (tmp_path / "run.yaml").write_text("model: m.json\ndataset: d\nlerning_rate: 0.1\n")
            parse_args(["--config", str(tmp_path / "run.yaml")])
        else:
            TrainConfig.from_dict({"model": "m.json", "dataset": "d", "lerning_rate": 0.1})


@pytest.mark.parametrize("settings, message", [
    ({"max_steps": "many"}, r"argument --max_steps/--max-steps: invalid int value: 'many'"),
    ({"batch_size": 2.5}, r"argument --batch_size/--batch-size: invalid int value: '2.5'"),
    ({"task": "keypoints"}, r"`task` must be one of auto, classification, segmentation, detection, got 'keypoints'"),
    ({"model_overrides": [1]}, r"`model_overrides` must be a mapping"),
    ({"batch_size": 0}, r"`batch_size` must be ≥ 1, got 0"),
    ({"model": ""}, r"Set `model`"),
])
def test_a_bad_value_fails_naming_its_setting(settings, message):
    from xt_hf.training import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict({"model": "m.json", "dataset": "d", **settings})


def test_a_bad_flag_exits_with_the_usage_and_the_setting(capsys):
    from xt_hf.training.command import main

    for argv, says in [(["--max-steps", "many"], "argument --max_steps/--max-steps: invalid int value: 'many'"),
                       (["--model-overrides", "{grad_ratio: 1}"], "`model_overrides` must be a JSON object"),
                       (["--mixed-precision", "fp8"], "argument --mixed_precision/--mixed-precision: invalid choice"),
                       (["--no-such-setting", "1"], "unrecognized arguments: --no-such-setting 1")]:
        with pytest.raises(SystemExit) as exited:
            main(["--model", "m.json", "--dataset", "d", *argv])
        assert exited.value.code == 2
        error = capsys.readouterr().err
        assert error.startswith("usage: python -m xt_hf.training") and says in error, error


def test_xt_hf_train_hands_its_arguments_to_the_training_settings(monkeypatch):
    import xt_hf.training.command as train_module
    from xt_hf_cli import main

    trained = []
    monkeypatch.setattr(train_module, "train", trained.append)
    main(["train", "--model", "m.json", "--dataset", "d", "--seed", "3", "--learning-rate", "3e-4"])
    (config,) = trained
    assert (config.model, config.dataset, config.seed, config.batch_size) == ("m.json", "d", 3, 8)
    assert config.learning_rate == 3e-4


# --------------------------------------------------------------------------------------------------------
# The packaged `accuracy` metric


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network access in a test that must work offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_packaged_accuracy_metric_loads_offline_and_matches_a_hand_computation(no_network):
    import evaluate

    from xt_hf.training.metrics import ACCURACY, load

    accuracy = evaluate.load(str(ACCURACY))
    assert isinstance(accuracy, evaluate.EvaluationModule)
    predictions, references = [0, 1, 1, 2, 0], [0, 1, 0, 2, 2]  # correct: samples 0, 1, 3
    assert accuracy.compute(predictions=predictions, references=references) == {"accuracy": pytest.approx(3 / 5)}
    assert accuracy.compute(predictions=predictions, references=references, normalize=False) == {"accuracy": 3.0}
    weighted = accuracy.compute(predictions=predictions, references=references, sample_weight=[1, 1, 4, 1, 1])
    assert weighted["accuracy"] == pytest.approx(3 / 8)
    assert load("accuracy").compute(predictions=[1], references=[1]) == {"accuracy": 1.0}


def test_classification_eval_metrics_equal_the_accuracy_metric(fresh_accelerate_state):
    import evaluate
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from xt_hf.training import ClassificationTask, TrainConfig
    from xt_hf.training.metrics import ACCURACY

    torch.manual_seed(0)
    model = XTForImageClassification(tiny_config(num_labels=2, context_num_layers=1)).eval()
    processor = XTImageProcessor(region_size=REGION)
    label2id = {name: i for i, name in enumerate(CLASSES)}
    dataset = prepare_dataset(colour_dataset(6, seed=1), processor, label2id=label2id)
    accelerator = Accelerator(cpu=True)
    loader = accelerator.prepare(DataLoader(dataset, batch_size=4, collate_fn=RegionPaddingCollator(REGION)))
    task = ClassificationTask(TrainConfig.from_dict({"model": "m.json", "dataset": "d"}))
    with torch.no_grad():
        metrics = task.evaluate(model, loader, accelerator)
        predictions, references = [], []
        for batch in loader:
            predictions += model(pixel_values=batch["pixel_values"]).logits.argmax(-1).tolist()
            references += batch["labels"].tolist()
    expected = evaluate.load(str(ACCURACY)).compute(predictions=predictions, references=references)
    assert metrics["eval/top1"] == expected["accuracy"]
