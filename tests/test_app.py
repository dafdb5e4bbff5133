"""The xT app without a browser: where the context came from (the relevance map), what each task answers, the
messages for unusable input, the command's help and its missing-extra error, and the Space files of the model repos.

The relevance and inference tests need only the library; the page tests need Gradio and are skipped without it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xt_hf.synthetic.relations import generate_sample
from xt_hf.synthetic.splits import sample_rng
from xt_hf_app.inference import AppError, draw_boxes, draw_class_map, draw_relevance, load_model, open_image, run
from xt_hf_app.relevance import classification_relevance, region_features

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO_ROOT / "src" / "xt_hf" / "demo_model"
HAS_GRADIO = importlib.util.find_spec("gradio") is not None


@pytest.fixture(scope="module")
def demo():
    return load_model(str(DEMO_MODEL))


def test_relevance_lights_up_the_regions_that_hold_the_answer(demo):
    """On held-out relations images the answer lives in the 8 regions of the red and blue groups (of 64): the relevance
    map must put most of its mass there (chance: 8 / 64 = 12.5 %)."""
    shares, top_hits = [], []
    for index in range(12):
        sample = generate_sample(sample_rng(0, "demo", 100 + index), image_size=1024, region_size=128)
        features = region_features(demo.model, sample.image, processor=demo.processor)
        found = classification_relevance(demo.model, features, (8, 8))
        answer = np.zeros((8, 8), dtype=bool)
        for row, col in sample.red_regions + sample.blue_regions:
            answer[row, col] = True
        assert found.scores.shape == (8, 8) and np.isclose(found.scores.sum(), 1.0) and (found.scores >= 0).all()
        shares.append(found.scores[answer].sum())
        top_hits.append(answer.ravel()[found.scores.argmax()])
    shares = np.array(shares)
    print(f"relevance mass on the answer regions: mean {shares.mean():.3f}, min {shares.min():.3f} "
          f"(chance 0.125); most relevant region is an answer region in {sum(top_hits)}/12")
    assert shares.mean() > 0.75
    assert np.median(shares) > 0.8
    assert sum(top_hits) >= 11


def test_relevance_follows_the_class_asked_for(demo):
    """The map is of the class shown; asking for another class gives that class's map, of the same shape."""
    sample = generate_sample(sample_rng(0, "demo", 0), image_size=1024, region_size=128)
    features = region_features(demo.model, sample.image, processor=demo.processor)
    predicted = classification_relevance(demo.model, features, (8, 8))
    other = classification_relevance(demo.model, features, (8, 8), label=(predicted.label + 1) % 4)
    assert predicted.label == sample.label
    assert other.label == (predicted.label + 1) % 4 and other.scores.shape == (8, 8)
    assert np.isclose(predicted.probabilities.sum(), 1.0, atol=1e-5)


def test_classification_answer_matches_the_model_and_draws_its_map(demo):
    import torch

    sample = generate_sample(sample_rng(0, "demo", 1), image_size=1024, region_size=128)
    answer = run(demo, open_image(sample.image, 128), progress=False)
    with torch.inference_mode():
        reference = demo.model(**demo.processor(sample.image, return_tensors="pt")).logits.softmax(-1)[0]
    assert np.allclose(list(answer.probabilities.values()), reference.numpy(), atol=1e-4)
    assert answer.view.size == (1024, 1024) and answer.regions == (8, 8)
    picture = draw_relevance(answer.view, answer.relevance, region_size=128, scale=answer.scale)
    assert picture.size == answer.view.size


def test_large_uploads_are_shown_downsampled(demo, tmp_path):
    from PIL import Image

    path = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (640, 2048, 3), dtype=np.uint8)).save(path)
    answer = run(demo, open_image(path, 128), progress=False)
    assert answer.view.size == (1024, 320) and answer.relevance.shape == (5, 16)


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_dense_tasks_answer_region_by_region(task, tmp_path):
    from xt_hf_app.browser import random_model
    from xt_hf_app.inference import example_image

    loaded = load_model(random_model(task, tmp_path / task))
    assert loaded.task == task
    region = loaded.model.config.region_size
    image, _ = example_image(task, region, 0)
    answer = run(loaded, open_image(image, region), progress=False)
    if task == "segmentation":
        assert answer.class_map.shape == image.shape[:2]
        assert draw_class_map(answer.view, answer.class_map).size == answer.view.size
    else:
        assert answer.detections["boxes"].shape[1] == 4
        _, kept = draw_boxes(answer.view, answer.detections, scale=1.0, threshold=1.01, labels=loaded.labels)
        assert kept == 0


def test_an_unusable_file_is_a_sentence_naming_it(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("this is a text file, not a picture\n")
    with pytest.raises(AppError, match="notes.png") as caught:
        open_image(bad, 128)
    assert "Traceback" not in str(caught.value) and str(tmp_path) not in str(caught.value)
    small = tmp_path / "small.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(small)
    with pytest.raises(AppError, match="smaller than one region"):
        open_image(small, 128)


def test_app_help_imports_neither_torch_nor_gradio():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "xt_hf_cli", "app", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--model" in result.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "gradio", "transformers"}


def test_missing_gradio_is_one_line_naming_the_extra(monkeypatch, capsys):
    from xt_hf_cli import main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *rest: None if name == "gradio" else real_find_spec(name, *rest))
    with pytest.raises(SystemExit) as caught:
        main(["app", "--model", str(DEMO_MODEL)])
    assert caught.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error == "error: xt-hf app needs Gradio: pip install 'xt-hf[app]'"


@pytest.mark.skipif(not HAS_GRADIO, reason="Gradio is not installed (pip install 'xt-hf[app]')")
@pytest.mark.parametrize("task", ["classification", "segmentation", "detection"])
def test_the_page_builds_for_every_task(task, tmp_path):
    import gradio

    from xt_hf_app import build_app
    from xt_hf_app.browser import task_model

    page = build_app(task_model(task, tmp_path))
    assert isinstance(page, gradio.Blocks)
    ids = {getattr(block, "elem_id", None) for block in page.blocks.values()}
    assert {"xt-upload", "xt-example", "xt-status", "xt-result"} <= ids


def test_every_model_repo_has_a_space_running_the_app():
    cards = sorted((REPO_ROOT / "modeling").glob("*/README.md"))
    assert cards
    for card in cards:
        name = card.parent.name
        space = card.parent / "space"
        app = (space / "app.py").read_text()
        compile(app, str(space / "app.py"), "exec")
        assert f'"xt-hf/{name}"' in app and "build_app" in app
        front_matter = (space / "README.md").read_text().split("---")[1]
        assert "sdk: gradio" in front_matter and "app_file: app.py" in front_matter and f"xt-hf/{name}" in front_matter
        assert "xt-hf[app]" in (space / "requirements.txt").read_text()
        assert f"https://huggingface.co/spaces/xt-hf/{name}-demo" in card.read_text()


def test_a_missing_model_folder_is_named_as_such(tmp_path):
    with pytest.raises(AppError, match=r"No folder .*missing-model: it does not exist"):
        load_model(str(tmp_path / "missing-model"))
