"""Whole-scene detection streamed region by region gives the in-memory model's detections; `xt-hf detect`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from conftest import REGION, tiny_config

from xt_hf import XTForObjectDetection, XTImageProcessor
from xt_hf.engine import detect_streaming
from xt_hf_cli import main

THRESHOLD = 0.08  # an untrained head scores about 0.1 everywhere: plenty of peaks to compare


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    config = tiny_config(num_labels=2, classifier="pool", decoder_output_stride=4, detection_threshold=THRESHOLD,
                         id2label={0: "red zone", 1: "yellow zone"})
    model = XTForObjectDetection(config).eval()
    with torch.no_grad():  # a class prior that differs from region to region, as a trained one does
        model.region_class_prior.weight.normal_(std=0.05)
    return model


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(1).integers(0, 256, (3 * REGION, 2 * REGION, 3), dtype=np.uint8)


def in_memory_detections(model, image) -> dict:
    inputs = XTImageProcessor(region_size=REGION)(image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    (found,) = XTImageProcessor(region_size=REGION).post_process_object_detection(outputs, threshold=THRESHOLD)
    return found


def test_streamed_detections_equal_the_in_memory_forward(detector, image, tmp_path):
    expected = in_memory_detections(detector, image)
    assert len(expected["scores"]) > 3, "the comparison needs detections"
    for options in ({"region_batch_size": 1}, {"region_batch_size": 4, "spill_directory": tmp_path}):
        streamed = detect_streaming(detector, image, **options)
        torch.testing.assert_close(streamed["scores"], expected["scores"], rtol=1e-5, atol=1e-6)
        assert torch.equal(streamed["labels"], expected["labels"])
        torch.testing.assert_close(streamed["boxes"], expected["boxes"], rtol=1e-5, atol=1e-4)


def test_a_threshold_given_to_the_engine_replaces_the_configs(detector, image):
    everything = detect_streaming(detector, image)
    confident = detect_streaming(detector, image, threshold=float(everything["scores"].median()))
    assert 0 < len(confident["scores"]) < len(everything["scores"])
    assert bool((confident["scores"] > everything["scores"].median()).all())


def test_detection_refuses_a_model_without_a_detection_head(image):
    from xt_hf import XTForSemanticSegmentation

    with pytest.raises(ValueError, match="object detector"):
        detect_streaming(XTForSemanticSegmentation(tiny_config(classifier="pool")).eval(), image)


def test_detect_command_writes_json_geojson_and_csv(detector, image, tmp_path, capsys):
    detector.save_pretrained(tmp_path / "model")
    XTImageProcessor(region_size=REGION).save_pretrained(tmp_path / "model")
    np.save(tmp_path / "scene.npy", image)
    expected = detect_streaming(detector, image)
    arguments = ["detect", str(tmp_path / "scene.npy"), "--model", str(tmp_path / "model"), "--threshold",
                 str(THRESHOLD)]
    for suffix in (".json", ".geojson", ".csv"):
        main(arguments + ["--output", str(tmp_path / f"boxes{suffix}")])
    rows = json.loads((tmp_path / "boxes.json").read_text())
    assert [row["label"] for row in rows] == [detector.config.id2label[int(i)] for i in expected["labels"]]
    np.testing.assert_allclose([row["box"] for row in rows], expected["boxes"].numpy(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose([row["score"] for row in rows], expected["scores"].numpy(), rtol=1e-5)
    features = json.loads((tmp_path / "boxes.geojson").read_text())["features"]
    assert len(features) == len(rows) and features[0]["geometry"]["type"] == "Polygon"
    x1, y1, x2, y2 = rows[0]["box"]
    assert features[0]["geometry"]["coordinates"][0][2] == pytest.approx([x2, y2])
    with open(tmp_path / "boxes.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rows) and table[0]["label"] == rows[0]["label"]

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:  # an existing output is never replaced without --overwrite
        main(arguments + ["--output", str(tmp_path / "boxes.json")])
    assert exited.value.code == 2 and "--overwrite" in capsys.readouterr().err
    main(arguments + ["--output", str(tmp_path / "boxes.json"), "--overwrite"])


@pytest.mark.parametrize("head", ["XTForSemanticSegmentation", "XTForObjectDetection"])
def test_the_model_card_of_a_dense_head_says_its_task_and_its_demo_runs(head, tmp_path, capsys, monkeypatch):
    import re

    import xt_hf
    from conversion.model_card import render_model_card

    model = getattr(xt_hf, head)(tiny_config(num_labels=2, classifier="pool", decoder_output_stride=4,
                                             detection_threshold=0.0))
    model.save_pretrained(tmp_path / "model")
    XTImageProcessor(region_size=REGION).save_pretrained(tmp_path / "model")
    card = render_model_card(None, model.config, repo_id=str(tmp_path / "model"))
    task = {"XTForSemanticSegmentation": "image-segmentation", "XTForObjectDetection": "object-detection"}[head]
    assert f"pipeline_tag: {task}" in card
    demo = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(demo, "model-card-demo", "exec"), {})
    assert capsys.readouterr().out.strip()
