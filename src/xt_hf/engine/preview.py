"""Pictures of whole-scene results, drawn in memory bounded by the picture, whatever the scene's size.

A preview is the scene at most `max_side` px on its longer side, with a result drawn over it and a legend beside
it: the class map of `segment` (read back from the written map, a window at a time), the boxes of `detect`
(scaled to the picture), or the region grid and the top labels of `predict`. The scene comes from the file's
overviews when its source has them (`RasterioSource.overview`: GDAL reads the overview level nearest the picture's
size), and otherwise is sampled from the lazy source one window of at most `window × window` pixels at a time
(`sample_grid`), so memory holds one window and the picture, never the scene.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .writers import atomic_write

NODATA_COLOUR = (40, 40, 40)
"""Where the scene holds no data (its no-data value or mask)."""
GRID_COLOUR = (255, 255, 0)
LEGEND_WIDTH = 280
PREVIEW_SUFFIXES = (".png",)


def class_colours(count: int) -> list[tuple[int, int, int]]:
    """`count` distinct RGB colours, the same for the same class id in every picture and in the class-map GeoTIFF's
    colour table: hues a golden-ratio step apart, so that neighbouring ids never look alike."""
    colours = []
    for index in range(count):
        hue = (0.05 + index * 0.6180339887) % 1.0
        saturation, value = (0.85, 0.95) if index % 2 == 0 else (0.65, 0.8)
        colours.append(tuple(round(channel * 255) for channel in colorsys.hsv_to_rgb(hue, saturation, value)))
    return colours


@dataclass
class Thumbnail:
    """The scene at preview size: `pixels` `(h, w, C)` in the scene's data type, `valid` `(h, w)` bool (None: all
    data), and the side of a preview pixel in scene pixels (`scale_y`, `scale_x`)."""

    pixels: np.ndarray
    valid: np.ndarray | None
    scale_y: float
    scale_x: float

    def centres(self) -> tuple[np.ndarray, np.ndarray]:
        """Scene pixel coordinates `(rows (h,), cols (w,))` of the preview pixels' centres."""
        height, width = self.pixels.shape[:2]
        return (np.arange(height) + 0.5) * self.scale_y, (np.arange(width) + 0.5) * self.scale_x


def sample_grid(source, rows: np.ndarray, cols: np.ndarray, *, window: int = 1024
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """The source's pixels at every `(row, col)` of the grid `rows × cols` (increasing integer arrays):
    `(values (len(rows), len(cols), C), valid (len(rows), len(cols)) bool or None)`.

    Read one window of at most `window × window` pixels at a time (a window spans as many consecutive grid lines as
    fit), so that memory holds one window and the output whatever the source's size."""
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    valid_of = getattr(source, "valid", None)
    values, valid = None, None
    for row_group in _spans(rows, window):
        for col_group in _spans(cols, window):
            top, left = int(rows[row_group][0]), int(cols[col_group][0])
            height, width = int(rows[row_group][-1]) - top + 1, int(cols[col_group][-1]) - left + 1
            picked = np.ix_(rows[row_group] - top, cols[col_group] - left)
            pixels = source.read(top, left, height, width)
            if values is None:
                values = np.empty((len(rows), len(cols), pixels.shape[-1]), dtype=pixels.dtype)
            values[row_group, col_group] = pixels[picked]
            mask = valid_of(top, left, height, width) if valid_of is not None else None
            if mask is not None:
                if valid is None:
                    valid = np.ones((len(rows), len(cols)), dtype=bool)
                valid[row_group, col_group] = mask[picked]
    return values, valid


def _spans(positions: np.ndarray, window: int) -> list[slice]:
    """Consecutive runs of `positions` that each fit in `window` pixels."""
    spans, start = [], 0
    for index in range(1, len(positions) + 1):
        if index == len(positions) or positions[index] - positions[start] >= window:
            spans.append(slice(start, index))
            start = index
    return spans


def thumbnail(source, max_side: int = 1024) -> Thumbnail:
    """The scene at most `max_side` px on its longer side: the file's overviews when the source has them, else the
    pixel at the centre of every preview pixel, sampled a window at a time (`sample_grid`)."""
    if max_side < 16:
        raise ValueError(f"A preview needs at least 16 px on its longer side; got {max_side}.")
    if hasattr(source, "overview"):
        pixels, _ = source.overview(max_side)
        overview_valid = getattr(source, "overview_valid", None)
        valid = overview_valid(max_side) if overview_valid is not None else None
        return Thumbnail(pixels, valid, source.height / pixels.shape[0], source.width / pixels.shape[1])
    step = max(1, math.ceil(max(source.height, source.width) / max_side))
    rows = np.minimum(np.arange(-(-source.height // step)) * step + step // 2, source.height - 1)
    cols = np.minimum(np.arange(-(-source.width // step)) * step + step // 2, source.width - 1)
    pixels, valid = sample_grid(source, rows, cols)
    return Thumbnail(pixels, valid, float(step), float(step))


def display_rgb(thumb: Thumbnail) -> np.ndarray:
    """`(h, w, 3)` uint8 for display: 8-bit pixels as they are, other types stretched per band between their 2nd
    and 98th percentiles over the valid pixels; one band grey, two bands red = band 1, green = band 2, blue =
    band 1 (SAR's co- and cross-polarisation), more bands their first three; no-data pixels `NODATA_COLOUR`."""
    pixels = thumb.pixels
    valid = np.ones(pixels.shape[:2], dtype=bool) if thumb.valid is None else thumb.valid.copy()
    if pixels.dtype == np.uint8:
        bands = pixels
    else:
        data = pixels.astype(np.float32)
        valid &= np.isfinite(data).all(axis=-1)
        bands = np.zeros(data.shape, dtype=np.uint8)
        for band in range(data.shape[-1]):
            values = data[..., band][valid]
            low, high = np.percentile(values, [2, 98]) if values.size else (0.0, 1.0)
            stretched = (data[..., band] - low) / (high - low if high > low else 1.0)
            bands[..., band] = np.clip(np.nan_to_num(stretched) * 255, 0, 255).astype(np.uint8)
    order = {1: [0, 0, 0], 2: [0, 1, 0]}.get(bands.shape[-1], [0, 1, 2])
    rgb = np.ascontiguousarray(bands[..., order])
    rgb[~valid] = NODATA_COLOUR
    return rgb


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # PIL built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _compose(scene: np.ndarray, title: list[str], entries: list[tuple[tuple[int, int, int] | None, str]]
             ) -> Image.Image:
    """The picture with a legend panel on its right: title lines, then one line per entry with its colour swatch."""
    font, line = _font(), 20
    height = max(scene.shape[0], 16 + line * (len(title) + len(entries) + 1))
    canvas = Image.new("RGB", (scene.shape[1] + LEGEND_WIDTH, height), (255, 255, 255))
    canvas.paste(Image.fromarray(scene), (0, 0))
    draw = ImageDraw.Draw(canvas)
    x, y = scene.shape[1] + 12, 8
    for text in title:
        draw.text((x, y), _shorten(text, 34), fill=(0, 0, 0), font=font)
        y += line
    y += line // 2
    for colour, text in entries:
        if colour is not None:
            draw.rectangle([x, y + 2, x + 14, y + 16], fill=colour, outline=(0, 0, 0))
        draw.text((x + 22, y), _shorten(text, 31), fill=(0, 0, 0), font=font)
        y += line
    return canvas


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _scene_lines(source, thumb: Thumbnail) -> list[str]:
    # The legend is ASCII: PIL's default font has no glyphs for × or ≥.
    lines = [f"{source.width:,} x {source.height:,} px"]
    georeference = getattr(source, "georeference", None)
    if georeference is not None:
        try:
            lines.append(georeference.crs.to_string())
        except Exception:  # a CRS without an authority code still has a name
            lines.append("georeferenced")
    lines.append(f"preview: 1 px = {thumb.scale_x:.3g} scene px")
    return lines


def _save(canvas: Image.Image, output: str | Path, colours: list[tuple[int, int, int]] = ()) -> Path:
    """`canvas` as a PNG of 256 colours: `colours` (the classes'), no-data, the grid and the legend's black and
    white exactly, the rest of the palette fitted to the scene. Against full colour that is about half the size
    for a speckled scene, the same to the eye; a palette fitted to the whole picture would drop the colour of a
    class with few pixels."""
    output = Path(output)
    reserved = list(dict.fromkeys([*colours, NODATA_COLOUR, GRID_COLOUR, (0, 0, 0), (255, 255, 255)]))
    if len(reserved) <= 128:
        fitted = canvas.quantize(colors=256 - len(reserved), dither=Image.Dither.NONE).getpalette()
        palette = Image.new("P", (1, 1))
        palette.putpalette([value for colour in reserved for value in colour] + fitted[: 3 * (256 - len(reserved))])
        canvas = canvas.quantize(palette=palette, dither=Image.Dither.NONE)
    with atomic_write(output) as partial:
        canvas.save(partial, format="PNG", optimize=True)
    return output


def preview_segmentation(source, class_map, *, stride: int, class_names: list[str], nodata: int | None,
                         output: str | Path, max_side: int = 1024, opacity: float = 0.5) -> Path:
    """The scene with the class map at `class_map` (a written `.tif` or `.zarr`, at `1 / stride` of the scene)
    blended over it, one colour per class, and a legend with each class's share of the picture's valid pixels."""
    from .sources import open_region_source

    thumb = thumbnail(source, max_side)
    scene = display_rgb(thumb)
    centre_rows, centre_cols = thumb.centres()
    classes_source = open_region_source(class_map)
    map_rows = np.minimum((centre_rows // stride).astype(np.int64), classes_source.height - 1)
    map_cols = np.minimum((centre_cols // stride).astype(np.int64), classes_source.width - 1)
    classes = sample_grid(_PlainPixels(classes_source), map_rows, map_cols)[0][..., 0].astype(np.int64)
    colours = np.array(class_colours(len(class_names)), dtype=np.float32)
    labelled = (classes >= 0) & (classes < len(class_names))
    if nodata is not None:
        labelled &= classes != nodata
    blended = scene.astype(np.float32)
    blended[labelled] = (1 - opacity) * blended[labelled] + opacity * colours[classes[labelled]]
    counts = np.bincount(classes[labelled], minlength=len(class_names))
    total = max(1, int(labelled.sum()))
    entries = [(tuple(int(c) for c in colours[i]), f"{name}  {100 * counts[i] / total:.1f} %")
               for i, name in enumerate(class_names)]
    if (~labelled).any():
        entries.append((NODATA_COLOUR, "no data"))
    title = ["xt-hf segment", *_scene_lines(source, thumb), f"class map: 1 px = {stride} scene px"]
    return _save(_compose(blended.astype(np.uint8), title, entries), output, class_colours(len(class_names)))


@dataclass
class _PlainPixels:
    """A class map read as plain values: its no-data cells are class values to draw, not pixels to mask."""

    source: object

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        return self.source.read(top, left, height, width)


def preview_detections(source, boxes: np.ndarray, labels: np.ndarray, scores: np.ndarray, *,
                       class_names: list[str], output: str | Path, max_side: int = 1024,
                       threshold: float | None = None) -> Path:
    """The scene with every box (`(k, 4)` x1, y1, x2, y2 in scene pixels) outlined in its class's colour; a box
    smaller than 5 preview px is drawn 5 px wide around its centre, so that small objects stay visible. The legend
    counts the boxes of each class."""
    thumb = thumbnail(source, max_side)
    canvas = Image.fromarray(display_rgb(thumb))
    draw = ImageDraw.Draw(canvas)
    colours = class_colours(len(class_names))
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) / np.array([thumb.scale_x, thumb.scale_y] * 2)
    labels = np.asarray(labels, dtype=np.int64)
    for (x1, y1, x2, y2), label in zip(boxes, labels):
        centre_x, centre_y = (x1 + x2) / 2, (y1 + y2) / 2
        half_width, half_height = max(x2 - x1, 5) / 2, max(y2 - y1, 5) / 2
        draw.rectangle([centre_x - half_width, centre_y - half_height, centre_x + half_width, centre_y + half_height],
                       outline=colours[label % len(colours)], width=2)
    counts = np.bincount(labels, minlength=len(class_names)) if len(labels) else np.zeros(len(class_names), int)
    entries = [(colour, f"{name}  {count:,}") for colour, name, count in zip(colours, class_names, counts)]
    if thumb.valid is not None and (~thumb.valid).any():
        entries.append((NODATA_COLOUR, "no data"))
    found = f"{len(labels):,} detections" + (f", score >= {threshold:g}" if threshold is not None else "")
    title = ["xt-hf detect", *_scene_lines(source, thumb), found]
    return _save(_compose(np.asarray(canvas), title, entries), output, colours)


def preview_prediction(source, *, region_size: int, predictions: list[tuple[str, float]], output: str | Path,
                       max_side: int = 1024) -> Path:
    """The scene with its grid of regions (every k-th line where regions are under 8 preview px) and the top labels
    with their probabilities in the legend: a classifier answers for the whole scene, not per region."""
    thumb = thumbnail(source, max_side)
    canvas = Image.fromarray(display_rgb(thumb))
    draw = ImageDraw.Draw(canvas)
    every = max(1, math.ceil(8 * thumb.scale_x / region_size))
    spacing_x, spacing_y = region_size * every / thumb.scale_x, region_size * every / thumb.scale_y
    width, height = canvas.size
    for x in np.arange(0, width, spacing_x):
        draw.line([(x, 0), (x, height)], fill=GRID_COLOUR, width=1)
    for y in np.arange(0, height, spacing_y):
        draw.line([(0, y), (width, y)], fill=GRID_COLOUR, width=1)
    grid = f"grid: regions of {region_size} px" + (f", every {every}th line" if every > 1 else "")
    title = ["xt-hf predict", *_scene_lines(source, thumb), grid, "whole-scene labels:"]
    entries = [(None, f"{score:.3f}  {label}") for label, score in predictions]
    return _save(_compose(np.asarray(canvas), title, entries), output)
