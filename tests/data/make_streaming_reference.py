"""Records the pre-refactor engine's streaming outputs (commit 0ba654a) for the bit-identity test."""
import sys, tempfile
from pathlib import Path
sys.path.insert(0, "/work/main/tests")
import numpy as np, torch
from safetensors.torch import save_file
from conftest import REGION, tiny_config
from xt_hf import XTForImageClassification, XTForSemanticSegmentation
from xt_hf.streaming import encode_context_streaming, predict_streaming, segment_streaming

CASES = {
    "attention_hyper_causal": dict(context_token_chunk_size=5, context_long_sequence_attention="hyper", hyper_min_seq_len=16,
                                   hyper_block_size=8, hyper_sample_size=8, context_attention_causal=True),
    "attention_hyper": dict(context_token_chunk_size=7, context_long_sequence_attention="hyper", hyper_min_seq_len=16,
                            hyper_block_size=8, hyper_sample_size=8),
    "attention_short": dict(),
    "mamba": dict(context_encoder="mamba", context_token_chunk_size=6, mamba_d_state=4, context_num_layers=2),
    "windows": dict(in_context_patches=12, context_token_chunk_size=5),
    "none": dict(context_encoder="none", classifier="pool"),
}
image = np.random.default_rng(0).integers(0, 255, (3 * REGION + 5, 2 * REGION + 17, 3), dtype=np.uint8)
tensors = {"image": torch.from_numpy(image)}
for name, overrides in CASES.items():
    torch.manual_seed(0)
    model = XTForImageClassification(tiny_config(**overrides)).eval()
    for key, value in model.state_dict().items():
        tensors[f"{name}.weights.{key}"] = value.contiguous()
    encoded, _ = encode_context_streaming(model, image, region_batch_size=5)
    tensors[f"{name}.tokens"] = encoded.last_hidden_state.contiguous().clone()
    tensors[f"{name}.logits"] = predict_streaming(model, image, region_batch_size=5).contiguous()
    with tempfile.TemporaryDirectory() as spill:
        tensors[f"{name}.spilled_logits"] = predict_streaming(model, image, region_batch_size=5, spill_directory=spill).clone()
torch.manual_seed(0)
segmenter = XTForSemanticSegmentation(tiny_config(context_token_chunk_size=5, decoder_output_stride=2,
                                                  num_labels=3)).eval()
for key, value in segmenter.state_dict().items():
    tensors[f"segmentation.weights.{key}"] = value.contiguous()
with tempfile.TemporaryDirectory() as folder:
    segment_streaming(segmenter, image, Path(folder) / "map.zarr", region_batch_size=5)
    import zarr
    tensors["segmentation.class_map"] = torch.from_numpy(np.asarray(zarr.open(str(Path(folder) / "map.zarr"))[:]))
save_file(tensors, sys.argv[1], metadata={"made_by": "tests/data/make_streaming_reference.py at commit 0ba654a"})
print({k: tuple(v.shape) for k, v in tensors.items() if "weights" not in k})
