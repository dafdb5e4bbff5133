"""`xt-hf stats SCENE... [--bands 1,2] [--samples N] [--window 256] [--seed S]`: per-band mean and std for the
image processor.

A model pretrained on ImageNet normalises with ImageNet's statistics; SAR backscatter in dB, a 12-bit
multispectral band or a DEM needs its own. This samples random windows from one or more scenes (never more than
one window in memory), skips no-data pixels, and prints the values to give `XTImageProcessor` (`image_mean`,
`image_std`), after the rescaling the processor applies to the scenes' data type.
"""

from __future__ import annotations

import argparse
import json

from .common import band_numbers, fail, positive_int


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("stats", help="per-band mean and std of scenes, for the image processor")
    parser.add_argument("scenes", nargs="+", metavar="SCENE", help="GeoTIFF (or any raster GDAL reads, with the "
                        "geo extra), TIFF, .npy, zarr, PNG/JPEG")
    parser.add_argument("--bands", type=band_numbers, metavar="1,2", help="the bands to measure, numbered from 1, "
                        "in order (default: all)")
    parser.add_argument("--samples", type=positive_int, default=64, metavar="N", help="random windows to read "
                        "(default: 64)")
    parser.add_argument("--window", type=positive_int, default=256, metavar="PX", help="side of each window in "
                        "pixels (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the window positions (default: 0)")
    parser.add_argument("--rescale-factor", type=float, help="the factor the processor will multiply raw pixels "
                        "by (default: by data type, uint8 1/255, uint16 1/65535, floats 1)")
    parser.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> None:
    from xt_hf.engine.sources import band_statistics, open_region_source
    from xt_hf.image_processing_common_xt import dtype_rescale_factor

    sources = []
    for scene in arguments.scenes:
        try:
            sources.append(open_region_source(scene, bands=arguments.bands))
        except ValueError as error:
            fail(str(error))
    factor, processor_settings = arguments.rescale_factor, {}
    if factor is not None:
        if factor <= 0:
            fail(f"--rescale-factor {factor}: must be positive")
        processor_settings["rescale_factor"] = factor
    else:
        dtypes = {str(getattr(source, "dtype", None) or source.read(0, 0, 1, 1).dtype) for source in sources}
        try:
            factors = {dtype_rescale_factor(dtype) for dtype in dtypes}
        except ValueError:  # integers with no standard range: normalise the raw values
            factors = {1.0}
        if len(factors) != 1:
            fail(f"the scenes' data types ({', '.join(sorted(dtypes))}) are rescaled differently by default; "
                 f"convert them to one type or give --rescale-factor")
        factor = factors.pop()
        if factor == 1.0:
            # Floats (dB, reflectance, heights) and integers without a standard range: normalised as they are.
            # Saying so also spares the processor's warning about floats above 1 that may hold 0-255 values.
            processor_settings["do_rescale"] = False
    try:
        statistics = band_statistics(sources, samples=arguments.samples, window=arguments.window,
                                     seed=arguments.seed)
    except ValueError as error:
        fail(str(error))
    bands = arguments.bands or tuple(range(1, len(statistics.mean) + 1))
    for band, pixels, std in zip(bands, statistics.pixels, statistics.std):
        if pixels == 0:
            fail(f"band {band}: no valid pixel in {statistics.windows} windows (all no-data); sample more "
                 f"(--samples) or larger (--window) windows")
        if std == 0:
            fail(f"band {band} has the same value in every sampled pixel: its std is 0, which cannot normalise")
    mean = [float(f"{value * factor:.7g}") for value in statistics.mean]
    std = [float(f"{value * factor:.7g}") for value in statistics.std]

    rescaled = "" if factor == 1.0 else f", rescaled by {factor:.7g}"
    print(f"{len(sources)} scene(s), {statistics.windows} windows of {arguments.window} px (seed {arguments.seed}); "
          f"no-data skipped{rescaled}:")
    for band, pixels, band_mean, band_std in zip(bands, statistics.pixels, mean, std):
        print(f"  band {band}: mean {band_mean:.7g}, std {band_std:.7g} ({pixels:,} pixels)")
    print("preprocessor_config.json:")
    print(json.dumps({**processor_settings, "image_mean": mean, "image_std": std}))
    settings = ", ".join(f"{name}={value!r}" for name, value in
                         {**processor_settings, "image_mean": mean, "image_std": std}.items())
    print("Python:")
    print(f"XTImageProcessor({settings})")
