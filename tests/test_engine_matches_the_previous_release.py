"""The inference engine gives, bit for bit, what the streaming code before the engine/model split gave.

`data/streaming_reference.safetensors` holds tiny models' weights, an image, and the outputs that release
(commit 0ba654a) streamed for them (`data/make_streaming_reference.py`). A refactor of the engine or of
the model's public pieces that changes a single bit of them fails here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

from xt_hf import XTForImageClassification, XTForSemanticSegmentation
from xt_hf.engine import encode_context_streaming, predict_streaming, segment_streaming

REFERENCE = load_file(Path(__file__).parent / "data" / "streaming_reference.safetensors")
CASES = {
    "attention_hyper_causal": dict(context_token_chunk_size=5, context_long_sequence_attention="hyper",
                                   hyper_min_seq_len=16, hyper_block_size=8, hyper_sample_size=8,
                                   context_attention_causal=True),
    "attention_hyper": dict(context_token_chunk_size=7, context_long_sequence_attention="hyper", hyper_min_seq_len=16,
                            hyper_block_size=8, hyper_sample_size=8),
    "attention_short": dict(),
    "mamba": dict(context_encoder="mamba", context_token_chunk_size=6, mamba_d_state=4, context_num_layers=2),
    "windows": dict(in_context_patches=12, context_token_chunk_size=5),
    "none": dict(context_encoder="none", classifier="pool"),
}
IMAGE = REFERENCE["image"].numpy()


def reference_model(model_class, name: str, **overrides):
    # That release ran transformers' eager Swin-v2 attention; the fused one differs by float rounding.
    model = model_class(tiny_config(region_encoder_attention="eager", **overrides)).eval()
    prefix = f"{name}.weights."
    model.load_state_dict({key[len(prefix):]: value for key, value in REFERENCE.items() if key.startswith(prefix)})
    return model


@pytest.mark.parametrize("name", CASES)
def test_streamed_tokens_and_logits_are_those_of_the_previous_release(name, tmp_path):
    model = reference_model(XTForImageClassification, name, **CASES[name])
    encoded, _ = encode_context_streaming(model, IMAGE, region_batch_size=5)
    assert torch.equal(encoded.last_hidden_state, REFERENCE[f"{name}.tokens"])
    assert torch.equal(predict_streaming(model, IMAGE, region_batch_size=5), REFERENCE[f"{name}.logits"])
    spilled = predict_streaming(model, IMAGE, region_batch_size=5, spill_directory=tmp_path)
    assert torch.equal(spilled, REFERENCE[f"{name}.spilled_logits"])


def test_streamed_class_map_is_that_of_the_previous_release(tmp_path):
    zarr = pytest.importorskip("zarr")
    model = reference_model(XTForSemanticSegmentation, "segmentation", context_token_chunk_size=5,
                            decoder_output_stride=2, num_labels=3)
    segment_streaming(model, IMAGE, tmp_path / "map.zarr", region_batch_size=5)
    class_map = np.asarray(zarr.open(str(tmp_path / "map.zarr"))[:])
    np.testing.assert_array_equal(class_map, REFERENCE["segmentation.class_map"].numpy())
