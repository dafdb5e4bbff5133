"""`xt-hf segment IMAGE --model PATH --output mask.tif`: whole-scene segmentation written straight to disk."""

from __future__ import annotations

import argparse
import resource
import time

from .common import (check_spill_directory, fail, load_for_inference, non_negative_int, positive_int,
                     resolve_device)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("segment", help="segment a large scene region by region into a mask on disk")
    parser.add_argument("image", help="TIFF/BigTIFF, .npy, zarr, whole-slide image, PNG/JPEG")
    parser.add_argument("--model", required=True, help="local folder or Hub id of an XTForSemanticSegmentation")
    parser.add_argument("--output", required=True, help="class map to write: .tif (tiled) or .zarr")
    parser.add_argument("--region-batch-size", type=positive_int, default=16)
    parser.add_argument("--num-workers", type=non_negative_int, default=0, help="background processes reading regions")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (CUDA when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--spill-dir", help="CPU: keep the context encoder's token buffers in files in this directory "
                        "(memory then holds chunks; the disk needs about twice the token grid)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForSemanticSegmentation

    from ..engine import segment_streaming
    from ..engine.writers import CLASS_MAP_SUFFIXES, check_output_path

    try:  # before the model loads and long before the first pass ends
        check_output_path(arguments.output, suffixes=CLASS_MAP_SUFFIXES, overwrite=arguments.overwrite)
    except ValueError as error:
        fail(f"--output {arguments.output}: {error}")
    check_spill_directory(arguments.spill_dir)
    device = resolve_device(arguments.device)
    model, processor = load_for_inference(AutoModelForSemanticSegmentation, arguments.model, device,
                                          getattr(torch, arguments.dtype), task="xt-hf segment")
    start = time.perf_counter()
    try:
        height, width = segment_streaming(
            model, arguments.image, arguments.output, processor=processor,
            region_batch_size=arguments.region_batch_size, num_workers=arguments.num_workers, progress=True,
            overwrite=arguments.overwrite, spill_directory=arguments.spill_dir,
        )
    except ValueError as error:
        fail(str(error))
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {arguments.output}: {width}×{height} class map in {seconds:.1f} s, peak RSS {peak_mb:.0f} MB")
