"""Whole-scene outputs written region by region, so that no full-resolution map is ever held in memory; files that
are replaced whole (`atomic_write`), so that a reader or a kill never meets half of one.

A scene with a georeference (`geo.GeoReference`: a GeoTIFF with a CRS) gets georeferenced outputs: its class map
becomes a Cloud-Optimised GeoTIFF in its CRS, its detections GeoJSON in WGS 84 longitude/latitude (RFC 7946) or
GeoParquet in its own CRS. A scene without one keeps pixel outputs, and each says so in the file.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

CLASS_MAP_SUFFIXES = (".zarr", ".tif", ".tiff")


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Write `path` whole or not at all: yields a temporary sibling path to write a file (or a folder) to.

    The temporary name is hidden and keeps the suffix (`.<stem>.<pid>.partial<suffix>`), so that writers that pick
    their format by the suffix pick the same one. When the block ends, a written file is fsync'd and `os.replace`d
    onto `path` in one step; a written folder (a `.zarr`) replaces whatever is at `path`, which is
    removed first since a rename cannot replace a non-empty folder; then the parent folder's entries are fsync'd.
    When the block raises, the temporary is removed and `path` is left as it was. A folder's own files are not
    fsync'd: a kill never leaves half of one, a power cut may.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")
    _remove(temporary)  # left by a killed run of a process that had the same id
    try:
        yield temporary
        if temporary.is_dir():
            _remove(path)
        else:
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        _remove(temporary)
    _fsync_directory(path.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync_directory(path: Path) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def check_output_path(output: str | Path, *, suffixes: tuple[str, ...], overwrite: bool) -> Path:
    """Fail before any work, naming the problem, for an output that cannot or must not be written: a wrong
    suffix, an existing output without `overwrite`, a missing or read-only folder."""
    output = Path(output)
    if output.suffix.lower() not in suffixes:
        raise ValueError(f"The output must end in {', '.join(suffixes)}; got {output.name!r}.")
    if output.exists() and not overwrite:
        raise ValueError(f"{output} exists: choose another output or allow replacing it (--overwrite, overwrite=True).")
    folder = output.parent
    if not folder.is_dir():
        raise ValueError(f"The output folder {str(folder)!r} does not exist.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"The output folder {str(folder)!r} is not writable.")
    return output


def class_map_dtype(num_labels: int) -> tuple[np.dtype, int]:
    """The class map's data type and its no-data value, the type's largest (255 or 65,535), which no class id
    reaches: uint8 for up to 255 classes, else uint16. It marks the cells whose scene pixel holds no data."""
    dtype = np.dtype(np.uint8 if num_labels <= 255 else np.uint16)
    return dtype, int(np.iinfo(dtype).max)


def write_class_map(output: Path, tiles: Iterable[tuple[int, int, np.ndarray]], *, shape: tuple[int, int],
                    tile_side: int, dtype: np.dtype, class_names: list[str] | None = None, nodata: int | None = None,
                    georeference=None) -> None:
    """Write `(region row, region column, (side, side) class map)` tiles, arriving in row-major region order,
    into a `.zarr` array or a tiled `.tif` of `shape` (the last row and column of tiles cropped).

    With a `georeference` (the map's own grid: `geo.GeoReference` of `shape`), a `.tif` is a Cloud-Optimised
    GeoTIFF in its CRS (`_write_geotiff_class_map`); a `.zarr` keeps the CRS (WKT) and the affine transform in its
    attributes. `class_names` and `nodata` go into the GeoTIFF's tags and colour table, and the zarr's attributes."""
    height, width = shape
    if output.suffix.lower() == ".zarr":
        import zarr

        target = zarr.open(str(output), mode="w", shape=shape, chunks=(tile_side, tile_side), dtype=dtype)
        target.attrs.update(_class_map_attributes(class_names, nodata, georeference))
        for row, col, tile in tiles:
            rows = slice(row * tile_side, min((row + 1) * tile_side, height))
            cols = slice(col * tile_side, min((col + 1) * tile_side, width))
            target[rows, cols] = tile[: rows.stop - rows.start, : cols.stop - cols.start]
        return
    if georeference is not None:
        _write_geotiff_class_map(output, tiles, shape=shape, tile_side=tile_side, dtype=dtype,
                                 class_names=class_names, nodata=nodata, georeference=georeference)
        return
    import tifffile

    if tile_side % 16:
        raise ValueError(f"Tiled TIFF tiles must be multiples of 16 px; region_size / stride is {tile_side}: use .zarr.")
    # Regions arrive in row-major order, the order of a tiled TIFF's tiles (one tile per region, the last row
    # and column of tiles partly outside the image): write them as they come.
    tifffile.imwrite(output, (tile for _, _, tile in tiles), shape=shape, dtype=dtype, tile=(tile_side, tile_side))


def _class_map_attributes(class_names, nodata, georeference) -> dict:
    attributes = {"class_names": list(class_names or []), "nodata": nodata}
    if georeference is not None:
        attributes.update(crs_wkt=georeference.crs_wkt, transform=list(georeference.transform))
    return attributes


def map_georeference(georeference, stride: int, shape: tuple[int, int]):
    """The georeference of a map at `1 / stride` of the scene's resolution, `shape` `(height, width)` cells: each
    cell covers `stride × stride` scene pixels from the same corner (the last ones reach past the scene's edge)."""
    a, b, c, d, e, f = georeference.transform
    return dataclasses.replace(georeference, transform=(a * stride, b * stride, c, d * stride, e * stride, f),
                               height=shape[0], width=shape[1])


# Memory GDAL may use for blocks waiting to be written; tiles arrive a row of regions at a time.
_GDAL_CACHE_MB = 64


def _write_geotiff_class_map(output: Path, tiles, *, shape, tile_side, dtype, class_names, nodata,
                             georeference) -> None:
    """A Cloud-Optimised GeoTIFF (deflate, 512 px tiles, nearest-neighbour overviews) with the scene's CRS, the map's
    transform, `nodata`, the class names as a tag (`CLASS_NAMES`, JSON) and the band's description, and a colour
    table (`preview.class_colours`, no-data transparent), so that a GIS shows it as a legend of classes.

    GDAL writes a COG only by copying a finished raster (its overviews and tiles must be laid out before the
    full-resolution data), so the tiles go first into a tiled staging GeoTIFF beside the output, written window by
    window as they arrive, and the copy then builds the overviews from it block by block: memory holds GDAL's block
    cache (`_GDAL_CACHE_MB`), never the map. The staging file is removed whatever happens."""
    from .geo import require_geo
    from .preview import class_colours

    rasterio = require_geo("A georeferenced class map")
    from rasterio.shutil import copy as copy_raster
    from rasterio.transform import Affine
    from rasterio.windows import Window

    height, width = shape
    block = tile_side if tile_side % 16 == 0 else 256
    staging = output.with_name(f".{output.stem}.{os.getpid()}.staging.tif")
    colours = {index: (*colour, 255) for index, colour in enumerate(class_colours(len(class_names or [])))}
    if nodata is not None:
        colours[nodata] = (0, 0, 0, 0)
    try:
        with rasterio.Env(GDAL_CACHEMAX=_GDAL_CACHE_MB):
            with rasterio.open(staging, "w", driver="GTiff", width=width, height=height, count=1, dtype=dtype,
                               crs=georeference.crs, transform=Affine(*georeference.transform), nodata=nodata,
                               tiled=True, blockxsize=block, blockysize=block, compress="deflate",
                               BIGTIFF="IF_SAFER") as target:
                for row, col, tile in tiles:
                    top, left = row * tile_side, col * tile_side
                    tile = tile[: min(tile_side, height - top), : min(tile_side, width - left)]
                    target.write(tile[None], window=Window(left, top, tile.shape[1], tile.shape[0]))
                target.write_colormap(1, colours)
                target.update_tags(CLASS_NAMES=json.dumps(list(class_names or [])),
                                   NODATA_MEANING="the scene holds no data here (its no-data value or mask)")
                target.set_band_description(1, "class")
            copy_raster(staging, output, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=512, OVERVIEWS="AUTO",
                        RESAMPLING="NEAREST", BIGTIFF="IF_SAFER")
    finally:
        _remove(staging)


DETECTION_SUFFIXES = (".geojson", ".json", ".csv", ".parquet", ".geoparquet")
GEOPARQUET_SUFFIXES = (".parquet", ".geoparquet")


def write_detections(output: Path, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                     id2label: dict[int, str], *, georeference=None) -> None:
    """Detections (`boxes` `(k, 4)` x1, y1, x2, y2 in the scene's pixels, corners of pixels) into `output`, whole or
    not at all (`atomic_write`), by its suffix:

    - `.geojson`: a FeatureCollection of box polygons with `label`, `score` and `pixel_box` properties. With a
      `georeference`, in WGS 84 longitude/latitude as RFC 7946 requires (each corner of the pixel box projected, rings
      counter-clockwise); without one, in pixel coordinates (x right, y down), which the member `"xt_hf"` states,
      since a GeoJSON reader otherwise takes any coordinates for longitude/latitude.
    - `.parquet` / `.geoparquet`: GeoParquet (geopandas) of the same polygons in the scene's own CRS, with `label`,
      `score` and the pixel box `x1, y1, x2, y2`; without a georeference in pixels, its CRS null ("undefined", as the
      GeoParquet specification defines it).
    - `.json` (a list of `{"label", "score", "box"}`) and `.csv` (one row per detection): pixel boxes, plus the
      longitude and latitude of each box's centre (`lon`, `lat`) when there is a georeference.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    names = [id2label.get(int(label), str(int(label))) for label in labels]
    scores = [float(score) for score in scores]
    suffix = output.suffix.lower()
    with atomic_write(output) as partial:
        if suffix in GEOPARQUET_SUFFIXES:
            _write_geoparquet(partial, boxes, scores, names, georeference)
        elif suffix == ".geojson":
            partial.write_text(json.dumps(_feature_collection(boxes, scores, names, georeference)))
        else:
            _write_table(partial, suffix, boxes, scores, names, georeference)


def _corner_rings(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each box's closed ring of pixel corners `(k, 5)` xs and ys: top-left, bottom-left, bottom-right, top-right."""
    x1, y1, x2, y2 = boxes.T
    return np.stack([x1, x1, x2, x2, x1], axis=1), np.stack([y1, y2, y2, y1, y1], axis=1)


def _feature_collection(boxes, scores, names, georeference) -> dict:
    xs, ys = _corner_rings(boxes)
    if georeference is None:
        rings = np.stack([xs, ys], axis=-1)
        coordinates = ("pixels of the image: x to the right, y down, from the top-left corner of its top-left pixel; "
                       "not longitude/latitude")
    else:
        lons, lats = georeference.to_lonlat(*georeference.pixel_to_crs(xs, ys))
        rings = np.stack([lons, lats], axis=-1)
        # RFC 7946 §3.1.6: exterior rings counter-clockwise; a shoelace sum < 0 is clockwise.
        clockwise = np.sum(rings[:, :-1, 0] * rings[:, 1:, 1] - rings[:, 1:, 0] * rings[:, :-1, 1], axis=1) < 0
        rings[clockwise] = rings[clockwise, ::-1]
        coordinates = "WGS 84 longitude, latitude (RFC 7946)"
    features = []
    for ring, score, name, box in zip(rings.tolist(), scores, names, boxes.tolist()):
        feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                   "properties": {"label": name, "score": score, "pixel_box": box}}
        if georeference is not None:
            points = np.asarray(ring)
            feature["bbox"] = [*points.min(axis=0).tolist(), *points.max(axis=0).tolist()]
        features.append(feature)
    about = {"coordinates": coordinates, "pixel_box": "x1, y1, x2, y2 in the scene's pixels"}
    if georeference is not None:
        about["scene_crs"] = georeference.crs_wkt
    return {"type": "FeatureCollection", "xt_hf": about, "features": features}


def _write_geoparquet(path: Path, boxes, scores, names, georeference) -> None:
    from .geo import GEO_EXTRA

    try:
        import geopandas
        import shapely
    except ImportError:
        raise ImportError(f"GeoParquet output needs the geo extra: {GEO_EXTRA}") from None
    xs, ys = _corner_rings(boxes)
    if georeference is not None:
        xs, ys = georeference.pixel_to_crs(xs, ys)
    geometry = shapely.polygons(np.stack([xs, ys], axis=-1)) if len(boxes) else []
    frame = geopandas.GeoDataFrame(
        {"label": names, "score": np.asarray(scores, dtype=np.float64), **dict(zip(("x1", "y1", "x2", "y2"), boxes.T))},
        geometry=geopandas.GeoSeries(geometry, crs=None if georeference is None else georeference.crs_wkt))
    frame.to_parquet(path)


def _write_table(path: Path, suffix: str, boxes, scores, names, georeference) -> None:
    centres = None
    if georeference is not None:
        lons, lats = georeference.to_lonlat(*georeference.pixel_to_crs((boxes[:, 0] + boxes[:, 2]) / 2,
                                                                       (boxes[:, 1] + boxes[:, 3]) / 2))
        centres = list(zip(np.atleast_1d(lons).tolist(), np.atleast_1d(lats).tolist()))
    if suffix == ".csv":
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["label", "score", "x1", "y1", "x2", "y2"] + (["lon", "lat"] if centres is not None else []))
            for index, (name, score, box) in enumerate(zip(names, scores, boxes.tolist())):
                where = [f"{value:.7f}" for value in centres[index]] if centres is not None else []
                writer.writerow([name, f"{score:.6g}", *(f"{v:.2f}" for v in box), *where])
        return
    rows = [{"label": name, "score": score, "box": box} for name, score, box in zip(names, scores, boxes.tolist())]
    for row, centre in zip(rows, centres or []):
        row["lon"], row["lat"] = centre
    path.write_text(json.dumps(rows))
