"""`xt-hf detect IMAGE --model PATH --output boxes.geojson`: whole-scene detection, region by region."""

from __future__ import annotations

import argparse
import resource
import time

from .common import add_streaming_arguments, fail, load_streaming_model, open_input, scene_options


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("detect", help="detect objects in a large scene, region by region, into a file")
    parser.add_argument("image", help="TIFF/BigTIFF, .npy, zarr, whole-slide image, PNG/JPEG")
    parser.add_argument("--model", required=True, help="local folder or Hub id of an XTForObjectDetection")
    parser.add_argument("--output", required=True,
                        help="detections to write: .geojson (box polygons), .json (list of label, score, box) or .csv")
    parser.add_argument("--threshold", type=float, default=0.3, help="lowest score kept (default 0.3)")
    add_streaming_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> None:
    from transformers import AutoModelForObjectDetection

    from xt_hf.engine import detect_streaming
    from xt_hf.engine.writers import DETECTION_SUFFIXES, check_output_path, write_detections

    try:  # before the model loads and long before the first pass ends
        output = check_output_path(arguments.output, suffixes=DETECTION_SUFFIXES, overwrite=arguments.overwrite)
    except ValueError as error:
        fail(f"--output {arguments.output}: {error}")
    if not 0.0 <= arguments.threshold <= 1.0:
        fail(f"--threshold {arguments.threshold}: a score between 0 and 1")
    source = open_input(arguments.image)
    model, processor, _ = load_streaming_model(arguments, AutoModelForObjectDetection, task="xt-hf detect")
    source = open_input(source, model.config.region_size)
    start = time.perf_counter()
    try:
        detections = detect_streaming(model, source, scene_options(arguments, processor, progress=True),
                                      threshold=arguments.threshold)
    except ValueError as error:
        fail(str(error))
    write_detections(output, detections["boxes"].numpy(), detections["scores"].numpy(), detections["labels"].numpy(),
                     model.config.id2label)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {arguments.output}: {len(detections['scores'])} detections in {seconds:.1f} s, "
          f"peak RSS {peak_mb:.0f} MB")
