"""Wrong input to the models, their loaders and the converter gets an error that names it, never a silently wrong
answer (the image processor's share is in test_image_processing.py)."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from conftest import REGION, tiny_backbone_config, tiny_config
from PIL import Image
from transformers import BertConfig, Swinv2Config, Swinv2ForImageClassification, pipeline
from transformers.pipelines import base as pipelines_base

from conversion.checkpoint_io import CheckpointError, load_original_state_dict
from conversion.convert_original_checkpoint import main
from xt_hf import (
    XTConfig,
    XTForImageClassification,
    XTForObjectDetection,
    XTForSemanticSegmentation,
    XTImageProcessor,
)

# ---- labels of the losses -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier() -> XTForImageClassification:
    return XTForImageClassification(tiny_config()).eval()  # num_labels=5


@pytest.mark.parametrize(("labels", "message"), [
    (torch.tensor([0, 5]), r"class indices in \[0, 4\] \(num_labels=5\) or -100 \(ignored\), got \[5\]"),
    (torch.tensor([-1, 2]), r"class indices in \[0, 4\] \(num_labels=5\).*got \[-1\]"),
    (torch.tensor([1.0, 2.0]), r"shape \(2,\) and dtype torch.float32 do not fit multi_label_classification.*"
                               r"single-label class indices are integers"),
], ids=["index-too-large", "negative-index", "float-indices"])
def test_classification_labels_that_cannot_be_classes_are_named(classifier, labels, message):
    with pytest.raises(ValueError, match=message):
        classifier(torch.randn(2, 3, REGION, REGION), labels=labels)
    assert classifier.config.problem_type is None  # a refused call does not fix the problem type


def test_float_labels_are_refused_once_the_problem_is_single_label(classifier):
    model = XTForImageClassification(tiny_config(problem_type="single_label_classification")).eval()
    with pytest.raises(ValueError, match=r"labels of dtype torch.float32 cannot be class indices.*\[0, 4\]"):
        model(torch.randn(2, 3, REGION, REGION), labels=torch.tensor([1.0, 2.0]))
    loss = model(torch.randn(2, 3, REGION, REGION), labels=torch.tensor([1, -100])).loss  # -100: ignored
    assert torch.isfinite(loss)


@pytest.mark.parametrize(("labels", "message"), [
    (torch.zeros(2, REGION, REGION), r"dtype torch.float32 are not class maps.*\[0, 4\] \(num_labels=5\)"),
    (torch.full((2, REGION, REGION), 7), r"class indices in \[0, 4\] \(num_labels=5\) or 255.*got \[7\]"),
], ids=["float-mask", "class-out-of-range"])
def test_segmentation_labels_that_cannot_be_class_maps_are_named(labels, message):
    model = XTForSemanticSegmentation(tiny_config()).eval()
    with pytest.raises(ValueError, match=message):
        model(torch.randn(2, 3, REGION, REGION), labels=labels)
    assert torch.isfinite(model(torch.randn(2, 3, REGION, REGION), labels=torch.full((2, REGION, REGION), 255)).loss
                          .nan_to_num(0.0))  # all ignored: allowed


# ---- configs and from_pretrained ------------------------------------------------------------------------------


def test_a_misspelt_backbone_type_names_the_typo_and_the_close_backbones():
    with pytest.raises(ValueError, match=r"model_type='swinv3'.*did you mean 'swinv2'.*backbone types are .*hiera"):
        XTConfig(backbone_config=tiny_backbone_config(model_type="swinv3"))


@pytest.mark.parametrize("path", ["/no/such/folder", "./no-such-folder", "../no/such", "runs/no/such/folder"])
def test_from_pretrained_on_a_missing_local_folder_says_it_does_not_exist(path):
    with pytest.raises(FileNotFoundError, match=rf"No folder {path}: it does not exist"):
        XTForImageClassification.from_pretrained(path)
    with pytest.raises(FileNotFoundError, match="it does not exist"):
        XTConfig.from_pretrained(path)


def test_from_pretrained_on_another_model_types_folder_is_refused(tmp_path):
    swin = Swinv2Config(embed_dim=8, depths=[1], num_heads=[1], window_size=4)
    Swinv2ForImageClassification(swin).save_pretrained(tmp_path / "swin")
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match=r"holds a 'swinv2' model \(Swinv2ForImageClassification\), not an xT one.*"
                                         r"model_type='swinv2' where XTConfig needs 'xt'"):
        XTForObjectDetection.from_pretrained(tmp_path / "swin")
    with pytest.raises(ValueError, match=r"holds a 'bert' model.*needs 'xt'"):
        XTForImageClassification.from_pretrained(tmp_path / "bert")


def test_another_heads_weights_still_load_outside_a_pipeline(tmp_path):
    """Fine-tuning a segmenter from a classifier checkpoint is transfer learning, not a mistake."""
    XTForImageClassification(tiny_config()).save_pretrained(tmp_path)
    assert isinstance(XTForSemanticSegmentation.from_pretrained(tmp_path), XTForSemanticSegmentation)


# ---- pipelines ------------------------------------------------------------------------------------------------


def _saved(tmp_path, model) -> str:
    model.save_pretrained(tmp_path)
    XTImageProcessor(region_size=REGION).save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.fixture
def pipeline_errors(monkeypatch) -> list[str]:
    """What the pipelines log with `logger.error` (the "is not supported for <task>" check)."""
    messages = []
    monkeypatch.setattr(pipelines_base.logger, "error", lambda message, *a, **k: messages.append(message))
    return messages


@pytest.mark.parametrize(("task", "model_class"), [
    ("object-detection", XTForObjectDetection),
    ("image-segmentation", XTForSemanticSegmentation),
    ("image-classification", XTForImageClassification),
])
def test_pipelines_take_xt_models_without_a_false_not_supported_error(tmp_path, pipeline_errors, task, model_class):
    folder = _saved(tmp_path, model_class(tiny_config(classifier="pool")))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    results = pipeline(task, model=folder)(image)
    assert isinstance(results, list)
    assert not [message for message in pipeline_errors if "not supported" in message], pipeline_errors


def test_a_model_of_another_task_loads_with_its_head_reported_missing(tmp_path):
    """Loading a classifier's folder as a detector (transfer learning, or a pipeline of the wrong task) is allowed, and
    the detector's head is reported as missing weights, never filled silently. (A pipeline's task cannot be seen from
    the model class without reading the caller's frames, so the pipeline itself is not refused.)"""
    folder = _saved(tmp_path, XTForImageClassification(tiny_config()))
    _, info = XTForObjectDetection.from_pretrained(folder, output_loading_info=True)
    assert any(key.startswith("decoder.") or "head" in key for key in info["missing_keys"]), info["missing_keys"]
    assert info["unexpected_keys"]


# ---- the converter's checkpoint ------------------------------------------------------------------------------


def test_random_bytes_are_not_a_pytorch_checkpoint_and_torch_advice_does_not_leak(tmp_path, capsys):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x13\x37" + random.Random(0).randbytes(3000))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError) as raised:
            load_original_state_dict(path)
        status = main(["--checkpoint", str(path), "--variant", "swin-t-mamba-512-256", "--output",
                       str(tmp_path / "out")])
    message = str(raised.value)
    assert f"{path} is not a readable PyTorch checkpoint, nor a PyTorch checkpoint at all" in message
    assert "3,002 bytes are a binary file starting with 13 37" in message
    printed = capsys.readouterr()
    assert status == 2 and "nor a PyTorch checkpoint at all" in printed.err
    leaked = [str(warning.message) for warning in caught] + [message, printed.out, printed.err]
    assert not [text for text in leaked if "weights_only" in text], leaked


def test_a_broken_pickle_is_reported_without_torchs_weights_only_advice(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"\x80\x02" + random.Random(1).randbytes(3000))  # opens like a pickle, then garbage
    with pytest.raises(CheckpointError, match="corrupt or truncated") as raised:
        load_original_state_dict(path)
    assert "weights_only" not in str(raised.value)
