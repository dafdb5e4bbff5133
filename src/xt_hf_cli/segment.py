"""`xt-hf segment IMAGE --model PATH --output mask.tif`: whole-scene segmentation written straight to disk."""

from __future__ import annotations

import argparse
import resource
import time

from .common import (add_streaming_arguments, check_spill_directory, fail, load_for_inference, resolve_device,
                     with_rescale_factor)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("segment", help="segment a large scene region by region into a mask on disk")
    parser.add_argument("image", help="TIFF/BigTIFF, .npy, zarr, whole-slide image, PNG/JPEG")
    parser.add_argument("--model", required=True, help="local folder or Hub id of an XTForSemanticSegmentation")
    parser.add_argument("--output", required=True, help="class map to write: .tif (tiled) or .zarr")
    add_streaming_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForSemanticSegmentation

    from xt_hf.engine import segment_streaming
    from xt_hf.engine.writers import CLASS_MAP_SUFFIXES, check_output_path

    try:  # before the model loads and long before the first pass ends
        check_output_path(arguments.output, suffixes=CLASS_MAP_SUFFIXES, overwrite=arguments.overwrite)
    except ValueError as error:
        fail(f"--output {arguments.output}: {error}")
    check_spill_directory(arguments.spill_dir)
    device = resolve_device(arguments.device)
    model, processor = load_for_inference(AutoModelForSemanticSegmentation, arguments.model, device,
                                          getattr(torch, arguments.dtype), task="xt-hf segment")
    processor = with_rescale_factor(processor, model, arguments.rescale_factor)
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
