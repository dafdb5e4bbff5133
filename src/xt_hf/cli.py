"""`xt-hf` command line. Each command lives in its own module and registers its parser here.

`xt-hf demo` runs xT end to end on a generated large image.
"""

from __future__ import annotations

import argparse
import importlib
import resource
import sys
import time

import numpy as np
import torch


# Modules providing `add_parser(subparsers)`, which registers a command whose `run(arguments)` does the work.
COMMAND_MODULES = ("predict", "segment", "train")


def generated_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A procedural RGB image (`height × width × 3`, uint8): smooth colour fields plus a few discs."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack(
        [127 + 100 * np.sin(rows / rng.uniform(50, 400) + cols / rng.uniform(50, 400) + phase) for phase in (0, 2, 4)],
        axis=-1,
    )
    for _ in range(12):
        center_row, center_col, radius = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(20, 120)
        disc = (rows - center_row) ** 2 + (cols - center_col) ** 2 < radius**2
        image[disc] = rng.uniform(0, 255, size=3)
    return image.clip(0, 255).astype(np.uint8)


def demo(arguments: argparse.Namespace) -> None:
    from xt_hf import XTConfig, XTForImageClassification, XTImageProcessor

    config = XTConfig(
        region_size=256,
        backbone_config=dict(model_type="swinv2", embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8],
                             window_size=8, drop_path_rate=0.0, out_features=["stage4"]),
        context_encoder="attention",
        context_hidden_size=128,
        context_num_layers=2,
        classifier="context",
        region_batch_size=arguments.region_batch_size,
        id2label={0: "calm", 1: "busy", 2: "striped"},
    )
    torch.manual_seed(0)
    model = XTForImageClassification(config).eval()
    processor = XTImageProcessor(region_size=config.region_size)
    image = generated_image(arguments.height, arguments.width)

    start = time.perf_counter()
    inputs = processor(image, return_tensors="pt")
    with torch.inference_mode():
        probabilities = model(**inputs).logits.softmax(-1)[0]
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    rows, cols = (side // config.region_size for side in inputs["pixel_values"].shape[-2:])
    print("NOTE: this demo model is UNTRAINED (random weights): the label shows the pipeline runs, nothing more.")
    print(f"image {arguments.width}×{arguments.height} px → {rows}×{cols} regions of {config.region_size} px, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    label = int(probabilities.argmax())
    print(f"prediction: {config.id2label[label]} ({probabilities[label]:.3f})")
    print(f"time: {seconds:.2f} s   peak memory (RSS): {peak_mb:.0f} MB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="xt-hf", description="xT for very large images.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="predict a generated large image with a small untrained xT")
    demo_parser.add_argument("--height", type=int, default=2048)
    demo_parser.add_argument("--width", type=int, default=3072)
    demo_parser.add_argument("--region-batch-size", type=int, default=8)
    demo_parser.set_defaults(run=demo)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"xt_hf.{module_name}")
        except ImportError as error:  # an optional command whose extra is not installed
            commands.add_parser(module_name, help=f"unavailable: {error}")
            continue
        module.add_parser(commands)
    arguments = parser.parse_args(argv)
    arguments.run(arguments)


if __name__ == "__main__":
    sys.exit(main())
