"""The headline run: a 29,000 × 25,000 px image through xT with a Swin-v2-T region encoder, on CPU.

    python benchmarks/gigapixel_headline.py full --workdir /tmp/headline      # image → logits, one process
    python benchmarks/gigapixel_headline.py full --workdir /tmp/headline --spill-dir /tmp/headline  # tokens on disk

`full` is what a user runs: `xt_hf.engine.predict_streaming` on a random uint8 image stored as a `.npy`
memmap (written first, in a separate process, band by band), `region_batch_size` regions at a time, then
the context encoder over the whole token grid and the classifier. It prints one JSON line (the process's
peak RSS, seconds) and appends it to `workdir/results.jsonl`.

On two cores the region encoder alone takes over an hour (about 11,200 regions of 256 px), so the run
can also be split where xT itself splits it, at the stitched token grid, each half in its own process:

    python benchmarks/gigapixel_headline.py encode  --workdir /tmp/headline   # regions → stitched grid (.npy)
    python benchmarks/gigapixel_headline.py context --workdir /tmp/headline   # grid → context encoder → logits

`encode` streams the regions through the region encoder and saves the deepest stage's stitched grid.
`context` reads that grid back a band at a time into the context encoder's tokens, as
`encode_context_streaming` embeds each chunk of regions as it arrives, and runs the context encoder and
the classifier. All stages build the same model from one seed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gigapixel import SWIN_T  # noqa: E402


def build_model():
    from xt_hf import XTConfig, XTForImageClassification

    torch.manual_seed(0)
    config = XTConfig(region_size=256, backbone_config=SWIN_T, context_encoder="attention", context_hidden_size=768,
                      context_num_layers=2, classifier="context", num_labels=10)
    return XTForImageClassification(config).eval()


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def image(workdir: Path, height: int, width: int) -> Path:
    """The random test image's path, written first by another process so that its pages are not this one's."""
    path = workdir / f"image_{height}x{width}.npy"
    if not path.exists():
        code = (f"from pathlib import Path; from gigapixel import write_image; "
                f"write_image(Path({str(path)!r}), {height}, {width})")
        subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, check=True)
    return path


def full(workdir: Path, height: int, width: int, region_batch_size: int, spill_directory: Path | None) -> dict:
    from xt_hf.engine import predict_streaming

    path = image(workdir, height, width)
    model = build_model()
    start = time.perf_counter()
    logits = predict_streaming(model, path, region_batch_size=region_batch_size, progress=True,
                               spill_directory=spill_directory)
    return {"stage": "full", "height": height, "width": width, "spilled": spill_directory is not None,
            "seconds": time.perf_counter() - start,
            "peak_rss_gib": peak_rss_gib(), "logits": [round(v, 5) for v in logits[0].tolist()]}


def encode(workdir: Path, height: int, width: int, region_batch_size: int) -> dict:
    from xt_hf.engine import encode_regions_streaming

    image_path = image(workdir, height, width)
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
    from xt_hf.engine import encode_in_place, new_token_buffer

    model = build_model()
    encoder = model.base_model.context_encoder
    path = workdir / f"grid_{height}x{width}.npy"
    _, channels, rows, cols = np.load(path, mmap_mode="r").shape
    start = time.perf_counter()
    with torch.inference_mode():
        tokens = new_token_buffer(encoder, 1, rows * cols, device=torch.device("cpu"))
        grid_tokens = encoder.split_cls(tokens)[0]
        for top in range(0, rows, band_rows):
            band = torch.from_numpy(np.array(np.load(path, mmap_mode="r")[0, :, top : top + band_rows]))
            count = band.shape[1]
            row = torch.arange(top, top + count).repeat_interleave(cols)
            col = torch.arange(cols).repeat(count)
            grid_tokens[:, top * cols : (top + count) * cols] = encoder.embed_tokens(band.flatten(1).T[None], row, col)
        embedded = time.perf_counter() - start
        logits = model.logits_from_context(model.base_model.output_from_encoding(encode_in_place(encoder, tokens)))
    seconds = time.perf_counter() - start
    return {"stage": "context", "height": height, "width": width, "tokens": rows * cols,
            "grid_gib": tokens.numel() * tokens.element_size() / 2**30, "seconds": seconds,
            "embed_seconds": embedded, "peak_rss_gib": peak_rss_gib(), "logits": [round(v, 5) for v in logits[0].tolist()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["full", "encode", "context"])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--height", type=int, default=29000)
    parser.add_argument("--width", type=int, default=25000)
    parser.add_argument("--region-batch-size", type=int, default=16)
    parser.add_argument("--spill-dir", type=Path, help="`full`: keep the context encoder's token buffers in files here")
    arguments = parser.parse_args()
    arguments.workdir.mkdir(parents=True, exist_ok=True)
    if arguments.stage == "full":
        result = full(arguments.workdir, arguments.height, arguments.width, arguments.region_batch_size,
                      arguments.spill_dir)
    elif arguments.stage == "encode":
        result = encode(arguments.workdir, arguments.height, arguments.width, arguments.region_batch_size)
    else:
        result = context(arguments.workdir, arguments.height, arguments.width)
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result))
    with open(arguments.workdir / "results.jsonl", "a") as log:
        log.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
