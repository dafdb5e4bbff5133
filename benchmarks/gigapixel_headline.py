"""The headline run: a 29,000 × 25,000 px image through xT with a Swin-v2-T region encoder, on CPU.

On two cores the region encoder alone takes over an hour (about 11,200 regions of 256 px), so the run
is split where xT itself splits it, at the stitched token grid, and each half is measured in its own
process:

    python benchmarks/gigapixel_headline.py encode  --workdir /tmp/headline   # regions → stitched grid (.npy)
    python benchmarks/gigapixel_headline.py context --workdir /tmp/headline   # grid → context encoder → logits

`encode` streams the regions of a random uint8 image (written to `workdir` as a memmap, band by band)
through the region encoder `region_batch_size` at a time, keeps only the deepest stage's stitched grid,
and saves it. `context` reads that grid back a band at a time into the context encoder's tokens, as
`xt_hf.streaming.encode_context_streaming` embeds each chunk of regions as it arrives, and runs the
context encoder and the classifier. Both build the same model from one seed. A single-process run holds
at most what the larger of the two holds: a grid-sized buffer plus either one chunk of regions or the
context encoder's working memory. Each stage prints one
JSON line (peak RSS of the process, seconds) and appends it to `workdir/results.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gigapixel import SWIN_T, write_image  # noqa: E402


def build_model():
    from xt_hf import XTConfig, XTForImageClassification

    torch.manual_seed(0)
    config = XTConfig(region_size=256, backbone_config=SWIN_T, context_encoder="attention", context_hidden_size=768,
                      context_num_layers=2, classifier="context", num_labels=10)
    return XTForImageClassification(config).eval()


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def encode(workdir: Path, height: int, width: int, region_batch_size: int) -> dict:
    from xt_hf.streaming import encode_regions_streaming

    image_path = workdir / f"image_{height}x{width}.npy"
    if not image_path.exists():
        write_image(image_path, height, width)
    model = build_model()
    start = time.perf_counter()
    (grid,) = encode_regions_streaming(model, np.load(image_path, mmap_mode="r"), region_batch_size=region_batch_size,
                                       progress=True, last_stage_only=True)
    seconds = time.perf_counter() - start
    np.save(workdir / f"grid_{height}x{width}.npy", grid.numpy())
    return {"stage": "encode", "height": height, "width": width, "grid_shape": list(grid.shape),
            "grid_gib": grid.numel() * grid.element_size() / 2**30, "seconds": seconds, "peak_rss_gib": peak_rss_gib()}


def context(workdir: Path, height: int, width: int, band_rows: int = 16) -> dict:
    """Embed the saved grid a band of token rows at a time (as streaming embeds each chunk of regions), then
    run the context encoder and the classifier. Only one band of the file is mapped at a time."""
    model = build_model()
    encoder = model.base_model.context_encoder
    path = workdir / f"grid_{height}x{width}.npy"
    _, channels, rows, cols = np.load(path, mmap_mode="r").shape
    start = time.perf_counter()
    with torch.inference_mode():
        tokens = encoder.new_token_buffer(1, rows * cols, device=torch.device("cpu"))
        grid_tokens = encoder.grid_part(tokens)
        for top in range(0, rows, band_rows):
            band = torch.from_numpy(np.array(np.load(path, mmap_mode="r")[0, :, top : top + band_rows]))
            count = band.shape[1]
            row = torch.arange(top, top + count).repeat_interleave(cols)
            col = torch.arange(cols).repeat(count)
            grid_tokens[:, top * cols : (top + count) * cols] = encoder.embed_tokens(band.flatten(1).T[None], row, col)
        embedded = time.perf_counter() - start
        logits = model.classifier(model.base_model.encode_embedded_context(tokens).pooler_output)
    seconds = time.perf_counter() - start
    return {"stage": "context", "height": height, "width": width, "tokens": rows * cols,
            "grid_gib": tokens.numel() * tokens.element_size() / 2**30, "seconds": seconds,
            "embed_seconds": embedded, "peak_rss_gib": peak_rss_gib(), "logits": [round(v, 5) for v in logits[0].tolist()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["encode", "context"])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--height", type=int, default=29000)
    parser.add_argument("--width", type=int, default=25000)
    parser.add_argument("--region-batch-size", type=int, default=16)
    arguments = parser.parse_args()
    arguments.workdir.mkdir(parents=True, exist_ok=True)
    if arguments.stage == "encode":
        result = encode(arguments.workdir, arguments.height, arguments.width, arguments.region_batch_size)
    else:
        result = context(arguments.workdir, arguments.height, arguments.width)
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))
    with open(arguments.workdir / "results.jsonl", "a") as log:
        log.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
