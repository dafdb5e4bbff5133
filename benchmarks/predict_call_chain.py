"""How many functions a reader passes from `xt-hf predict` to the first attention call of each encoder.

Runs `xt-hf predict` in this process on a small Swin-v2 xT classifier (random weights, 4 × 4 regions) and
records the Python call stack at the first `scaled_dot_product_attention` call made inside the region encoder
and inside the context encoder. It prints both chains, counting the frames of xt-hf's own code (`xt_hf`,
`xt_hf_cli`) and all frames (transformers and torch included).

    python benchmarks/predict_call_chain.py
    PYTHONPATH=/path/to/an/older/checkout/src python benchmarks/predict_call_chain.py   # the same for another tree
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import traceback
from pathlib import Path

import numpy as np
import torch

OWN_PACKAGES = ("xt_hf", "xt_hf_cli")


def _package(filename: str) -> str | None:
    parts = Path(filename).parts
    return next((part for part in reversed(parts) if part in OWN_PACKAGES), None)


def record_first_attention_calls() -> dict[str, list[traceback.FrameSummary]]:
    """Wraps `torch.nn.functional.scaled_dot_product_attention` so that the first call under the region encoder and
    the first under the context encoder leave their stacks in the returned dict."""
    stacks: dict[str, list[traceback.FrameSummary]] = {}
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        stack = traceback.extract_stack()[:-1]
        names = " ".join(frame.filename for frame in stack)
        stage = "context encoder" if "context_" in names or "hyper_attention" in names else "region encoder"
        stacks.setdefault(stage, stack)
        return original(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = recording
    return stacks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    stacks = record_first_attention_calls()
    from xt_hf import XTConfig, XTForImageClassification
    from xt_hf_cli import main as xt_hf

    torch.manual_seed(0)
    config = XTConfig(
        region_size=64, num_labels=3, context_hidden_size=32, context_num_layers=1,
        backbone_config={"model_type": "swinv2", "image_size": 64, "patch_size": 4, "embed_dim": 16,
                         "depths": [1, 1], "num_heads": [1, 2], "window_size": 4, "out_features": ["stage2"]},
    )
    with tempfile.TemporaryDirectory() as folder:
        XTForImageClassification(config).eval().save_pretrained(f"{folder}/model")
        np.save(f"{folder}/image.npy", np.random.default_rng(0).random((256, 256, 3), dtype=np.float32))
        output = io.StringIO()
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            try:
                xt_hf(["predict", f"{folder}/image.npy", "--model", f"{folder}/model", "--json"])
            except SystemExit as error:
                if error.code:
                    raise RuntimeError(f"xt-hf predict failed: {output.getvalue()[-2000:]}") from error
    entry = next(i for i, frame in enumerate(next(iter(stacks.values()))) if _package(frame.filename) == "xt_hf_cli")
    for stage, stack in stacks.items():
        chain = stack[entry:]
        own = [frame for frame in chain if _package(frame.filename)]
        print(f"{stage}: {len(own)} xt-hf functions ({len(chain)} frames in all) from `xt-hf predict` to the first "
              f"attention call")
        for frame in chain:
            package = _package(frame.filename)
            parts = Path(frame.filename).parts
            where = "/".join(parts[len(parts) - parts[::-1].index(package) - 1 :]) if package else parts[-1]
            print(f"  {'*' if package else ' '} {where}:{frame.lineno} {frame.name}")


if __name__ == "__main__":
    main()
