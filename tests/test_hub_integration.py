"""Hub users: remote code without the package, the pipeline, and what `save_pretrained` writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import REGION, tiny_config
from PIL import Image
from transformers import pipeline

from xt_hf import XTForImageClassification, XTImageProcessor


@pytest.fixture
def saved_model(tmp_path):
    """A tiny classifier and its image processor saved the way a Hub repo holds them."""
    config = tiny_config(id2label={i: f"class_{i}" for i in range(5)})
    model = XTForImageClassification(config).eval()
    folder = tmp_path / "xt-tiny"
    model.save_pretrained(folder)
    XTImageProcessor(region_size=REGION).save_pretrained(folder)
    return model, folder


def test_saved_folder_carries_code_and_auto_map(saved_model):
    _, folder = saved_model
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageClassification"] == "modeling_xt.XTForImageClassification"
    assert config["auto_map"]["AutoConfig"] == "configuration_xt.XTConfig"
    processor = json.loads((folder / "preprocessor_config.json").read_text())
    # One class per backend, the form AutoImageProcessor reads for remote code.
    assert processor["auto_map"]["AutoImageProcessor"] == {
        "torchvision": "image_processing_xt.XTImageProcessor",
        "pil": "image_processing_pil_xt.XTImageProcessorPil",
    }
    assert processor["image_processor_type"] == "XTImageProcessor"
    for module in ("modeling_xt.py", "configuration_xt.py", "region_encoder.py", "context_encoder.py",
                   "context_attention.py", "context_mamba.py", "image_processing_xt.py", "image_processing_pil_xt.py",
                   "image_processing_common_xt.py"):
        assert (folder / module).is_file(), module


def test_remote_code_loads_where_xt_hf_is_not_importable(saved_model, tmp_path):
    model, folder = saved_model
    pixel_values = torch.randn(1, 3, REGION + 7, 2 * REGION)
    with torch.no_grad():
        expected = model(pixel_values).logits
    torch.save(pixel_values, tmp_path / "pixel_values.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["xt_hf"] = None  # this interpreter cannot import the package
        try:
            import xt_hf
        except ImportError:
            pass
        else:
            raise SystemExit("xt_hf is still importable")
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification
        import numpy as np
        model = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        pil = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True, backend="pil")
        assert not type(model).__module__.startswith("xt_hf"), type(model).__module__
        assert type(processor).__name__ == "XTImageProcessor", type(processor)  # torchvision: the default
        assert type(pil).__name__ == "XTImageProcessorPil", type(pil)
        image = np.random.default_rng(0).integers(0, 65536, (40, 50, 3), dtype=np.uint16)
        torch.testing.assert_close(processor(image, return_tensors="pt")["pixel_values"],
                                   pil(image, return_tensors="pt")["pixel_values"], rtol=0, atol=1e-6)
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / "pixel_values.pt")!r})).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Falling back" not in result.stderr, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-6)


def test_pipeline_on_a_saved_folder_never_prompts_for_remote_code(saved_model, tmp_path):
    """With xt_hf installed, the registered classes win: no "run the custom code? [y/N]" question (which blocks a
    script, and with stdin closed silently drops a component), no backend fallback, the model's own answer."""
    model, folder = saved_model
    image = np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8)
    np.save(tmp_path / "image.npy", image)
    with torch.no_grad():
        inputs = XTImageProcessor(region_size=REGION)(image, return_tensors="pt")
        probabilities = model(**inputs).logits.softmax(-1)[0]
    top = probabilities.topk(3)
    expected = [(f"class_{i}", p) for p, i in zip(top.values.tolist(), top.indices.tolist())]
    script = textwrap.dedent(
        f"""
        import builtins, json
        import numpy as np
        from PIL import Image
        from transformers import pipeline
        import xt_hf

        def no_prompt(question=""):
            raise SystemExit("prompted: " + question)

        builtins.input = no_prompt
        classifier = pipeline("image-classification", model={str(folder)!r})
        print("PROCESSOR", type(classifier.image_processor).__module__)
        predictions = classifier(Image.fromarray(np.load({str(tmp_path / "image.npy")!r})), top_k=3)
        print("RESULT", json.dumps([(p["label"], p["score"]) for p in predictions]))
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "custom code" not in output and "[y/N]" not in output, output[-3000:]
    assert "Falling back" not in output, output[-3000:]
    assert "PROCESSOR xt_hf." in result.stdout  # the installed package's class, not a copy from the folder
    got = json.loads(result.stdout.split("RESULT ", 1)[1])
    assert [label for label, _ in got] == [label for label, _ in expected]
    np.testing.assert_allclose([score for _, score in got], [score for _, score in expected], rtol=0, atol=1e-5)


def test_image_classification_pipeline_on_a_local_folder(saved_model):
    _, folder = saved_model
    classifier = pipeline("image-classification", model=str(folder))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8))
    predictions = classifier(image, top_k=3)
    assert len(predictions) == 3
    assert all(p["label"].startswith("class_") for p in predictions)
    assert predictions[0]["score"] >= predictions[1]["score"] >= predictions[2]["score"]
