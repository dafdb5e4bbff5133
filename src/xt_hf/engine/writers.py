"""Whole-scene outputs written region by region, so that no full-resolution map is ever held in memory; files that
are replaced whole (`atomic_write`), so that a reader or a kill never meets half of one."""

from __future__ import annotations

import csv
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


def write_class_map(output: Path, tiles: Iterable[tuple[int, int, np.ndarray]], *, shape: tuple[int, int],
                    tile_side: int, dtype: np.dtype) -> None:
    """Write `(region row, region column, (side, side) class map)` tiles, arriving in row-major region order,
    into a `.zarr` array or a tiled `.tif` of `shape` (the last row and column of tiles cropped)."""
    height, width = shape
    if output.suffix.lower() == ".zarr":
        import zarr

        target = zarr.open(str(output), mode="w", shape=shape, chunks=(tile_side, tile_side), dtype=dtype)
        for row, col, tile in tiles:
            rows = slice(row * tile_side, min((row + 1) * tile_side, height))
            cols = slice(col * tile_side, min((col + 1) * tile_side, width))
            target[rows, cols] = tile[: rows.stop - rows.start, : cols.stop - cols.start]
        return
    import tifffile

    if tile_side % 16:
        raise ValueError(f"Tiled TIFF tiles must be multiples of 16 px; region_size / stride is {tile_side}: use .zarr.")
    # Regions arrive in row-major order, the order of a tiled TIFF's tiles (one tile per region, the last row
    # and column of tiles partly outside the image): write them as they come.
    tifffile.imwrite(output, (tile for _, _, tile in tiles), shape=shape, dtype=dtype, tile=(tile_side, tile_side))


DETECTION_SUFFIXES = (".geojson", ".json", ".csv")


def write_detections(output: Path, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                     id2label: dict[int, str]) -> None:
    """Detections in full-image pixels (`boxes` `(k, 4)` x1, y1, x2, y2) into `output`: a `.json` list of
    `{"label", "score", "box"}`, a `.csv` with one row per detection, or a `.geojson` FeatureCollection of box
    polygons in pixel coordinates (y down, as the image), with `label` and `score` properties."""
    rows = [(id2label.get(int(label), str(int(label))), float(score), [float(v) for v in box])
            for box, score, label in zip(boxes, scores, labels)]
    suffix = output.suffix.lower()
    if suffix == ".csv":
        with open(output, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["label", "score", "x1", "y1", "x2", "y2"])
            writer.writerows([label, f"{score:.6g}", *(f"{v:.2f}" for v in box)] for label, score, box in rows)
        return
    if suffix == ".json":
        document = [{"label": label, "score": score, "box": box} for label, score, box in rows]
    else:
        document = {"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {"label": label, "score": score},
             "geometry": {"type": "Polygon", "coordinates": [[[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]]]}}
            for label, score, (x1, y1, x2, y2) in rows]}
    output.write_text(json.dumps(document))
