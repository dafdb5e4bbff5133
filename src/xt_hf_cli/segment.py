"""`xt-hf segment IMAGE --model PATH --output mask.tif [--preview mask.png]`: whole-scene segmentation written
straight to disk; a georeferenced scene (a GeoTIFF with a CRS) gives a Cloud-Optimised GeoTIFF in its CRS.

`xt-hf segment IMAGES... --model M --output results.parquet --output-dir masks/` (or `.jsonl`): many inputs,
each mask written into `--output-dir` under a name derived from its input, one row each (the mask's path, its
size, seconds, error); resumable, shared between processes under `accelerate launch`."""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from .common import (
    add_inputs_argument,
    add_overwrite_argument,
    add_preview_arguments,
    add_streaming_arguments,
    check_preview_output,
    fail,
    is_table,
    load_streaming_model,
    open_input,
    run_many,
    scene_options,
)

COLUMNS = {"path": "string", "mask": "string", "height": "int64", "width": "int64", "seconds": "float64",
           "error": "string"}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("segment", help="segment a large scene region by region into a mask on disk")
    add_inputs_argument(parser)
    parser.add_argument("--model", required=True, help="local folder or Hub id of an XTForSemanticSegmentation")
    parser.add_argument("--output", required=True, help="class map to write: .tif (tiled; a Cloud-Optimised GeoTIFF "
                        "for a georeferenced scene) or .zarr; for many inputs a results table, .parquet or .jsonl, "
                        "with the masks in --output-dir")
    parser.add_argument("--output-dir", help="many inputs: the folder for their masks (<input name>.zarr or .tif)")
    parser.add_argument("--mask-format", choices=["zarr", "tif"], default="zarr",
                        help="many inputs: the masks' format (default zarr)")
    add_streaming_arguments(parser)
    add_preview_arguments(parser, "the class map")
    add_overwrite_argument(parser)
    parser.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> None:
    if is_table(arguments.output):
        if arguments.preview is not None:
            fail("--preview draws one scene: leave it out with a results table, or segment that scene alone")
        run_masks(arguments)
        return
    if len(arguments.images) > 1:
        fail(f"{len(arguments.images)} inputs: several inputs need --output results.parquet (or .jsonl) "
             f"and --output-dir for the masks")
    arguments.image = arguments.images[0]
    run_one(arguments)


def run_masks(arguments: argparse.Namespace) -> None:
    from transformers import AutoModelForSemanticSegmentation

    if arguments.output_dir is None:
        fail(f"--output {arguments.output}: a results table needs --output-dir, the folder for the masks")
    folder = Path(arguments.output_dir)
    if not folder.parent.is_dir():
        fail(f"--output-dir {folder}: the folder {folder.parent} does not exist")
    folder.mkdir(exist_ok=True)
    suffix = "." + arguments.mask_format

    def make_work(model, processor, images):
        from xt_hf.engine import segment_streaming
        from xt_hf.engine.batch import output_names
        from xt_hf.engine.writers import atomic_write

        names = output_names(images, suffix)

        def work(image: str) -> dict:
            # Written under a temporary name, then renamed: a mask in --output-dir is always a whole one.
            # An input not done yet (killed halfway, say) has its earlier mask replaced.
            target = folder / names[image]
            with atomic_write(target) as partial:
                height, width = segment_streaming(model, image, partial, scene_options(arguments, processor,
                                                                                       progress=False), overwrite=True)
            return {"mask": str(target), "height": height, "width": width}

        return work

    run_many(arguments, command="segment", auto_class=AutoModelForSemanticSegmentation, columns=COLUMNS,
             signature={"output_dir": str(folder.resolve()), "mask_format": arguments.mask_format},
             make_work=make_work)


def run_one(arguments: argparse.Namespace) -> None:
    from transformers import AutoModelForSemanticSegmentation

    from xt_hf.engine import segment_streaming
    from xt_hf.engine.writers import CLASS_MAP_SUFFIXES, check_output_path

    try:  # before the model loads and long before the first pass ends
        check_output_path(arguments.output, suffixes=CLASS_MAP_SUFFIXES, overwrite=arguments.overwrite)
    except ValueError as error:
        fail(f"--output {arguments.output}: {error}")
    preview = check_preview_output(arguments)
    source = open_input(arguments.image, bands=getattr(arguments, "bands", None))
    model, processor, _ = load_streaming_model(arguments, AutoModelForSemanticSegmentation, task="xt-hf segment")
    source = open_input(source, model.config.region_size)
    start = time.perf_counter()
    try:
        height, width = segment_streaming(model, source, arguments.output,
                                          scene_options(arguments, processor, progress=True),
                                          overwrite=arguments.overwrite)
    except ValueError as error:
        fail(str(error))
    seconds = time.perf_counter() - start
    if preview is not None:
        from xt_hf.engine.preview import preview_segmentation
        from xt_hf.engine.writers import class_map_dtype

        config = model.config
        preview_segmentation(source, arguments.output, stride=config.decoder_output_stride,
                             class_names=[config.id2label[i] for i in range(config.num_labels)],
                             nodata=class_map_dtype(config.num_labels)[1], output=preview,
                             max_side=arguments.preview_size)
    kind = "georeferenced " if getattr(source, "georeference", None) is not None else ""
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {arguments.output}: {width}×{height} {kind}class map in {seconds:.1f} s"
          f"{f', preview {preview}' if preview is not None else ''}, peak RSS {peak_mb:.0f} MB")
