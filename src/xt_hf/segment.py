"""`xt-hf segment IMAGE --model PATH --output mask.tif`: whole-scene segmentation written straight to disk."""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("segment", help="segment a large scene region by region into a mask on disk")
    parser.add_argument("image", help="TIFF/BigTIFF, .npy, zarr, whole-slide image, PNG/JPEG")
    parser.add_argument("--model", required=True, help="local folder or Hub id of an XTForSemanticSegmentation")
    parser.add_argument("--output", required=True, help="class map to write: .tif (tiled) or .zarr")
    parser.add_argument("--region-batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=0, help="background processes reading regions")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--spill-dir", help="CPU: keep the context encoder's token buffers in files in this directory "
                        "(memory then holds chunks; the disk needs about twice the token grid)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> None:
    from transformers import AutoModelForSemanticSegmentation

    from .streaming import load_for_inference, segment_streaming

    model, processor = load_for_inference(
        AutoModelForSemanticSegmentation, arguments.model, arguments.device, getattr(torch, arguments.dtype)
    )
    start = time.perf_counter()
    try:
        height, width = segment_streaming(
            model, arguments.image, arguments.output, processor=processor,
            region_batch_size=arguments.region_batch_size, num_workers=arguments.num_workers, progress=True,
            overwrite=arguments.overwrite, spill_directory=arguments.spill_dir,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {arguments.output}: {width}×{height} class map in {seconds:.1f} s, peak RSS {peak_mb:.0f} MB")
