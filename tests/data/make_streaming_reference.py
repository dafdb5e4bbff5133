"""Records what the release before the engine/model split (commit 0ba654a, `xt_hf.streaming`) streams for tiny
seeded models: the reference `tests/test_engine_matches_the_previous_release.py` compares the engine with.

    python tests/data/make_streaming_reference.py OUTPUT.safetensors

It runs that release's own code: `git archive` copies the commit's `src/` and `tests/conftest.py` into a
temporary folder, and the recording runs in a child process with that folder first on its import path, so this
checkout's `xt_hf` is never imported. The checked-in `streaming_reference.safetensors` was made this way; a
rerun on another CPU may differ from it by float rounding (the test's module docstring).
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

RELEASE = "0ba654a"
REPO_ROOT = Path(__file__).resolve().parents[2]
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


def record(output: str) -> None:
    """In the child process, on the release's code: every case's weights, tokens and logits (also spilled), and
    a segmenter's class map, into `output`."""
    import numpy as np
    import torch
    import xt_hf
    import zarr
    from conftest import REGION, tiny_config
    from safetensors.torch import save_file
    from xt_hf import XTForImageClassification, XTForSemanticSegmentation
    from xt_hf.streaming import encode_context_streaming, predict_streaming, segment_streaming

    if Path(xt_hf.__file__).resolve().is_relative_to(REPO_ROOT):
        raise RuntimeError(f"xt_hf came from this checkout ({xt_hf.__file__}), not from release {RELEASE}.")
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
            tensors[f"{name}.spilled_logits"] = predict_streaming(model, image, region_batch_size=5,
                                                                  spill_directory=spill).clone()
    torch.manual_seed(0)
    segmenter = XTForSemanticSegmentation(tiny_config(context_token_chunk_size=5, decoder_output_stride=2,
                                                      num_labels=3)).eval()
    for key, value in segmenter.state_dict().items():
        tensors[f"segmentation.weights.{key}"] = value.contiguous()
    with tempfile.TemporaryDirectory() as folder:
        segment_streaming(segmenter, image, Path(folder) / "map.zarr", region_batch_size=5)
        tensors["segmentation.class_map"] = torch.from_numpy(np.asarray(zarr.open(str(Path(folder) / "map.zarr"))[:]))
    save_file(tensors, output, metadata={"made_by": f"tests/data/make_streaming_reference.py at commit {RELEASE}"})
    print({key: tuple(value.shape) for key, value in tensors.items() if ".weights." not in key})


def main(argv: list[str]) -> None:
    if len(argv) == 2 and argv[0] == "--record":
        record(argv[1])
        return
    if len(argv) != 1 or argv[0].startswith("-"):
        sys.exit(f"usage: python {Path(__file__).relative_to(REPO_ROOT)} OUTPUT.safetensors")
    output = Path(argv[0]).resolve()
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", RELEASE, "src", "tests/conftest.py"],
                             check=True, capture_output=True).stdout
    with tempfile.TemporaryDirectory() as tree, tarfile.open(fileobj=io.BytesIO(archive)) as files:
        files.extractall(tree, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join([f"{tree}/src", f"{tree}/tests"])}
        subprocess.run([sys.executable, __file__, "--record", str(output)], env=environment, cwd=tree, check=True)


if __name__ == "__main__":
    main(sys.argv[1:])
