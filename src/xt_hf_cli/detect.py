"""`xt-hf detect IMAGE --model PATH --output boxes.geojson [--preview boxes.png]`: whole-scene detection, region by
region. A georeferenced scene (a GeoTIFF with a CRS) gives GeoJSON in WGS 84 longitude/latitude, or GeoParquet in
its own CRS; any other scene gives boxes in its pixels, and the file says so."""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

from .common import (
    add_preview_arguments,
    add_streaming_arguments,
    check_preview_output,
    fail,
    load_streaming_model,
    open_input,
    scene_options,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("detect", help="detect objects in a large scene, region by region, into a file")
    parser.add_argument("image", help="GeoTIFF, TIFF/BigTIFF, .npy, zarr, whole-slide image, PNG/JPEG")
    parser.add_argument("--model", required=True, help="local folder or Hub id of an XTForObjectDetection")
    parser.add_argument("--output", required=True,
                        help="detections to write: .geojson (box polygons: longitude/latitude for a georeferenced "
                             "scene, else pixels), .parquet or .geoparquet (GeoParquet in the scene's CRS; needs the "
                             "geo extra), .json (list of label, score, box) or .csv")
    parser.add_argument("--threshold", type=float, default=0.3, help="lowest score kept (default 0.3)")
    add_streaming_arguments(parser)
    add_preview_arguments(parser, "the boxes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output (and preview)")
    parser.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> None:
    from transformers import AutoModelForObjectDetection

    from xt_hf.engine import detect_streaming
    from xt_hf.engine.writers import DETECTION_SUFFIXES, GEOPARQUET_SUFFIXES, check_output_path, write_detections

    try:  # before the model loads and long before the first pass ends
        output = check_output_path(arguments.output, suffixes=DETECTION_SUFFIXES, overwrite=arguments.overwrite)
    except ValueError as error:
        fail(f"--output {arguments.output}: {error}")
    if not 0.0 <= arguments.threshold <= 1.0:
        fail(f"--threshold {arguments.threshold}: a score between 0 and 1")
    preview = check_preview_output(arguments)
    if output.suffix.lower() in GEOPARQUET_SUFFIXES:
        _require_geopandas(output)
    bands = getattr(arguments, "bands", None)
    source = open_input(arguments.image, bands=bands)
    georeference = getattr(source, "georeference", None)
    if georeference is not None:  # pyproj converts the boxes: missing, it would fail after the whole scene ran
        from xt_hf.engine.geo import require_geo

        try:
            require_geo("Georeferenced detections")
        except ImportError as error:
            fail(str(error))
    model, processor, _ = load_streaming_model(arguments, AutoModelForObjectDetection, task="xt-hf detect")
    source = open_input(source, model.config.region_size)
    start = time.perf_counter()
    try:
        detections = detect_streaming(model, source, scene_options(arguments, processor, progress=True),
                                      threshold=arguments.threshold)
    except ValueError as error:
        fail(str(error))
    boxes, scores, labels = (detections[name].float().numpy() if name != "labels" else detections[name].numpy()
                             for name in ("boxes", "scores", "labels"))
    write_detections(output, boxes, scores, labels, model.config.id2label, georeference=georeference)
    seconds = time.perf_counter() - start
    where = "longitude/latitude" if georeference is not None and output.suffix.lower() == ".geojson" else (
        "the scene's CRS" if georeference is not None and output.suffix.lower() in GEOPARQUET_SUFFIXES else "pixels")
    if preview is not None:
        from xt_hf.engine.preview import preview_detections

        class_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        preview_detections(source, boxes, labels, scores, class_names=class_names, output=preview,
                           max_side=arguments.preview_size, threshold=arguments.threshold)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {arguments.output}: {len(scores)} detections ({where}) in {seconds:.1f} s"
          f"{f', preview {preview}' if preview is not None else ''}, peak RSS {peak_mb:.0f} MB")


def _require_geopandas(output: Path) -> None:
    try:
        import geopandas  # noqa: F401
    except ImportError:
        fail(f"--output {output}: GeoParquet needs the geo extra: pip install 'xt-hf[geo]'")
