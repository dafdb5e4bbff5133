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
    assert processor["auto_map"]["AutoImageProcessor"] == "image_processing_xt.XTImageProcessor"
    for module in ("modeling_xt.py", "configuration_xt.py", "region_encoder.py", "context_encoder.py",
                   "context_attention.py", "context_mamba.py", "image_processing_xt.py"):
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
        model = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert not type(model).__module__.startswith("xt_hf"), type(model).__module__
        assert type(processor).__name__ == "XTImageProcessor"
        with torch.no_grad():
            logits = model(torch.load({str(tmp_path / "pixel_values.pt")!r})).logits
        torch.save(logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, rtol=0, atol=1e-6)


def test_image_classification_pipeline_on_a_local_folder(saved_model):
    _, folder = saved_model
    classifier = pipeline("image-classification", model=str(folder))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8))
    predictions = classifier(image, top_k=3)
    assert len(predictions) == 3
    assert all(p["label"].startswith("class_") for p in predictions)
    assert predictions[0]["score"] >= predictions[1]["score"] >= predictions[2]["score"]
