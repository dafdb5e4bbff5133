"""The engine and the heads on one contract: one per-region decode loop, one driver for every task, spill state
passed as an object (issue 26). Checked on the source text."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from xt_hf import XTForImageClassification, XTForObjectDetection, XTForSemanticSegmentation
from xt_hf.engine.heads import ClassifyScene, DetectObjects, RegionHead, require_head

SRC = Path(__file__).resolve().parents[1] / "src" / "xt_hf"


def calls(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)]


def test_no_engine_code_asks_the_model_what_it_has():
    """Tasks say which head they need (`heads.py`); nothing dispatches on `hasattr(model, ...)`."""
    offenders = [f"{path.name}:{call.lineno}" for path in (SRC / "engine").glob("*.py") for call in calls(path)
                 if ast.unparse(call.func) == "hasattr" and "model" in ast.unparse(call.args[0])]
    assert not offenders


def test_regions_are_decoded_by_one_loop():
    """`decode_regions` is called only by `nested_tokenization.decode_region_batches`: the models and the engine
    pass it there instead of writing their own loop."""
    offenders = [f"{path.relative_to(SRC)}:{call.lineno}" for path in SRC.rglob("*.py") for call in calls(path)
                 if isinstance(call.func, ast.Attribute) and call.func.attr == "decode_regions"]
    assert not offenders


@pytest.mark.parametrize("task, model_class, fits", [
    (ClassifyScene(), XTForImageClassification, True),
    (ClassifyScene(), XTForSemanticSegmentation, False),
    (DetectObjects(), XTForObjectDetection, True),
    (DetectObjects(), XTForSemanticSegmentation, False),
])
def test_each_task_names_the_head_it_needs(task, model_class, fits):
    model = model_class(tiny_config(classifier="pool"))
    if fits:
        require_head(model, task.needs, task.name)
        return
    with pytest.raises(ValueError, match=f"{task.name} needs"):
        require_head(model, task.needs, task.name)


def test_segmenters_and_detectors_are_region_heads():
    for model_class in (XTForSemanticSegmentation, XTForObjectDetection):
        assert isinstance(model_class(tiny_config(classifier="pool")), RegionHead)
    assert not isinstance(torch.nn.Linear(1, 1), RegionHead)


def test_stitching_is_written_once():
    """`stitch_batches` is the one place that allocates stitched grids and writes regions into them: the region
    encoder, the segmentation decoder and the engine call it."""
    offenders = [f"{path.relative_to(SRC)}:{call.lineno}" for path in SRC.rglob("*.py") for call in calls(path)
                 if ast.unparse(call.func).endswith("stitch_regions") and path.name != "nested_tokenization.py"]
    assert not offenders


def test_engine_options_are_one_object():
    """The engine's run options are declared once (`SceneOptions`); a misspelt one names itself and the options."""
    from xt_hf.engine import predict_streaming
    from xt_hf.engine.scene import SceneOptions

    model = XTForImageClassification(tiny_config(num_labels=3)).eval()
    with pytest.raises(TypeError, match=r"region_bach_size.*region_batch_size"):
        predict_streaming(model, torch.rand(3, 64, 64).numpy(), region_bach_size=2)
    options = SceneOptions(region_batch_size=2)
    assert SceneOptions.of(options, num_workers=1) == SceneOptions(region_batch_size=2, num_workers=1)
    assert options.region_batch_size_for(model) == 2
    assert SceneOptions().region_batch_size_for(model) == model.config.region_batch_size
    for function in ("run_scene", "encode_context_streaming", "encode_regions_streaming", "predict_streaming"):
        parameters = ast.unparse(next(node for node in ast.walk(ast.parse((SRC / "engine" / "scene.py").read_text()))
                                      if isinstance(node, ast.FunctionDef) and node.name == function).args)
        assert "num_workers" not in parameters and "spill_directory" not in parameters, function


def test_token_chunk_size_is_a_run_option_that_defaults_to_the_saved_value(tmp_path, monkeypatch):
    """The context encoder's token chunk is chosen per run (`token_chunk_size`, `xt-hf --token-chunk-size`), the
    model's saved `context_token_chunk_size` when none is given; it never changes the answer."""
    import numpy as np

    from xt_hf.engine import predict_streaming
    from xt_hf_cli import main

    torch.manual_seed(0)
    model = XTForImageClassification(tiny_config(num_labels=3, context_token_chunk_size=4096)).eval()
    image = np.random.default_rng(0).random((4 * 32, 3 * 32, 3), dtype=np.float32)
    from xt_hf.engine import context

    chunks = []
    update = context.update_attention_block
    monkeypatch.setattr(context, "update_attention_block", lambda layer, tokens, chunk, storage: (
        chunks.append(chunk), update(layer, tokens, chunk, storage))[1])
    whole = predict_streaming(model, image)
    assert chunks == []  # the saved 4096 holds every token: the blocks' own forward
    chunked = predict_streaming(model, image, token_chunk_size=5)
    assert chunks and set(chunks) == {5}
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "model")
    np.save(tmp_path / "image.npy", image)
    for flags, expected in (([], []), (["--token-chunk-size", "5"], [5])):
        chunks.clear()
        main(["predict", str(tmp_path / "image.npy"), "--model", str(tmp_path / "model"), "--json", *flags])
        assert sorted(set(chunks)) == expected


def test_no_code_reads_its_callers_frames_or_evaluates_text():
    """Settings are validated declaratively (`XTConfig`'s `@strict` validators): nothing walks stack frames or
    `eval`s annotations."""
    offenders = [f"{path.relative_to(SRC)}:{call.lineno}" for path in SRC.rglob("*.py") for call in calls(path)
                 if ast.unparse(call.func) in ("sys._getframe", "inspect.stack", "inspect.currentframe", "eval")]
    assert not offenders
