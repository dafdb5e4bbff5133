"""Lazy large-image sources and a region reader that never holds the full-resolution image in memory.

A source only has to say its size and read a window: `read(top, left, height, width) -> (h, w, C)`.
The reader turns region numbers into normalised `(C, R, R)` float32 regions, exactly as
`XTImageProcessor` followed by the model's own zero padding would, so that streamed and in-memory
forwards agree.

A georeferenced raster (a GeoTIFF with a CRS, or another GDAL format) opens as a `RasterioSource` when the geo
extra is installed: it also says where its pixels lie (`georeference`) and which of them hold data (`valid`, from
the file's no-data value or mask), and the reader turns the others into padding. Without the extra a GeoTIFF is
read by tifffile as plain pixels, with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..image_processing_xt import dtype_rescale_factor, normalize_pixels
from ..nested_tokenization import pad_to_region_multiple, region_grid_shape
from .geo import GEO_EXTRA, GeoReference, require_geo
from .spill import drop_mapped_pages

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".mrxs", ".vms", ".bif")
NUMPY_SUFFIXES = (".npy",)
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# TIFF tags that only a GeoTIFF (or a GDAL-written TIFF) has: GeoKeyDirectory, ModelTiepoint, ModelPixelScale,
# ModelTransformation, GDAL_NODATA.
GEOTIFF_TAGS = (34735, 33922, 33550, 34264, 42113)
# GDAL keeps decoded blocks in a cache that may grow to 5 % of the machine's memory, and reading a scene region by
# region, or a preview of it, fills it with the whole scene: 258 MB (the whole file) for a 6,000² px 2-band float32
# scene, measured. A window needs only the blocks of its rows (all the strips it crosses, for a striped file), so
# reads cap it at twice those rows of every band, and at least this much; a preview at this much alone (40 MB
# measured for the same scene, at the same speed).
MIN_BLOCK_CACHE = 32 * 2**20


class ImageError(ValueError):
    """An image that cannot be used as given; the message names the file (where there is one) and the reason.
    Whatever else a reader raises for a broken file is turned into one of these, naming the file."""


class RegionSource(Protocol):
    height: int
    width: int
    channels: int

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """Pixels `[top:top+height, left:left+width]` as `(h, w, channels)`; clipped at the image border."""

    # Optional (`RegionReader` and the writers look them up with getattr, so a source of one's own may omit them):
    # `georeference: GeoReference | None`, where the pixels lie on the Earth, and
    # `valid(top, left, height, width) -> (h, w) bool array | None`, which pixels of that window hold data
    # (None: all of them).


@dataclass
class ArraySource:
    """Any `(H, W, C)` or `(H, W)` array-like that slices lazily: numpy, `np.memmap`, zarr, tifffile's zarr view.
    `name`: the file it reads, named in its errors."""

    array: object
    name: str | None = None
    georeference = None  # a plain array says nothing about where it lies

    def __post_init__(self):
        shape = tuple(self.array.shape)
        if len(shape) not in (2, 3):
            holder = f"{self.name} holds" if self.name else "got"
            raise ImageError(f"An image array must be (height, width) or (height, width, channels), channels last; "
                             f"{holder} a {len(shape)}-D array of shape {shape}.")
        self.height, self.width = shape[:2]
        self.channels = shape[2] if len(shape) == 3 else 1

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        try:
            window = np.array(self.array[top : top + height, left : left + width])
        except Exception as error:  # a strip or tile that does not decode, found only when it is read
            if self.name is None:
                raise
            raise ImageError(f"Cannot read {self.name} at rows {top}–{top + height}, columns {left}–{left + width}:"
                             f" {type(error).__name__}: {error}") from error
        if isinstance(self.array, np.memmap):
            _release_memmap_rows(self.array, top, top + height)
        return window[..., None] if window.ndim == 2 else window

    def valid(self, top: int, left: int, height: int, width: int) -> None:
        """Every pixel of an array is data."""
        return None


def _release_memmap_rows(array: np.memmap, start: int, stop: int) -> None:
    """Unmap the pages of rows `start:stop` of a read-only, C-contiguous memmap once they have been read.

    A memmap's pages stay mapped, and counted in the process's memory, until the mapping closes: reading a
    29,000 × 25,000 px scene region by region would otherwise end with all 2 GB of it resident. Dropping them
    from a read-only mapping loses nothing (a later read maps them again from the page cache or the file).
    Copy-on-write and writable memmaps are left alone: there a page may hold the only copy of a change.
    """
    buffer = getattr(array, "_mmap", None)
    if buffer is None or array.mode != "r" or not array.flags.c_contiguous or not hasattr(buffer, "madvise"):
        return
    row_bytes = array.strides[0]
    offset = array.ctypes.data - np.frombuffer(buffer, dtype=np.uint8).ctypes.data  # from the mapping's first byte
    drop_mapped_pages(buffer, offset + start * row_bytes, offset + min(stop, array.shape[0]) * row_bytes)


class SlideSource:
    """Level 0 of a whole-slide image through tiffslide (or openslide), read tile window by window."""

    def __init__(self, path: Path):
        try:
            import tiffslide as slide_library
        except ImportError:
            try:
                import openslide as slide_library
            except ImportError as error:
                raise ImageError(
                    f"{path.name} is a whole-slide image: install tiffslide (pip install xt-hf[wsi]) or openslide-python."
                ) from error
        self.slide = slide_library.open_slide(str(path)) if hasattr(slide_library, "open_slide") else slide_library.OpenSlide(str(path))
        self.width, self.height = self.slide.dimensions
        self.channels = 3
        self.name = str(path)
        self.georeference = None

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        height, width = min(height, self.height - top), min(width, self.width - left)
        region = self.slide.read_region((left, top), 0, (width, height))
        return np.asarray(region)[..., :3]

    def valid(self, top: int, left: int, height: int, width: int) -> None:
        """Every pixel of level 0 is taken as data (a slide's background is tissue-free glass, not no-data)."""
        return None


def _numpy_source(path: Path) -> ArraySource:
    """A `.npy` file, memory-mapped once its header has been checked against the file's size: numpy's own error
    for a truncated file ("mmap length is greater than file size") names neither the file nor the problem."""
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)  # 3.0 differs only in its text encoding
            shape, _, dtype = read_header(handle)
        except ValueError as error:
            raise ImageError(f"{path} is not a NumPy .npy file, or its header is corrupt: {error}") from None
        present = os.fstat(handle.fileno()).st_size - handle.tell()
    expected = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and present < expected:
        raise ImageError(f"{path} is truncated or corrupt: its header describes a {shape} {dtype} array of "
                         f"{expected:,} bytes, but only {present:,} bytes follow the header.")
    return ArraySource(np.load(path, mmap_mode="r"), name=str(path))


def _tiff_source(path: Path) -> ArraySource:
    """Level 0 of a (Big)TIFF as a zarr view: a window read decodes only the tiles (or strips) it touches."""
    import tifffile
    import zarr

    with _quiet_tifffile():
        tiff = tifffile.TiffFile(path)
        try:
            level_0 = tiff.series[0].levels[0]
            _check_tiff_data(path, level_0, tiff.filehandle.size)
        except BaseException:
            tiff.close()
            raise
    array = zarr.open(level_0.aszarr(), mode="r")
    if level_0.axes.startswith(("C", "S")) and len(level_0.axes) == 3:  # planar (C, H, W): read lazily, channels last
        return ArraySource(_ChannelsFirst(array), name=str(path))
    return ArraySource(array, name=str(path))


@contextlib.contextmanager
def _quiet_tifffile():
    """tifffile logs each inconsistency of a broken header as an error line of its own (and reads on);
    `_check_tiff_data` says what is wrong in one line instead."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_tiff_data(path: Path, level, file_size: int) -> None:
    """A TIFF header can claim any size: fail now, naming it, where the file lists fewer strips or tiles than that
    size needs, where they point past the file's end, or where uncompressed ones hold fewer bytes than the pixels.
    Otherwise a forged or cut-off file fails only when its first region is decoded, with tifffile's "corrupted
    strip cannot be reshaped", after the model has loaded."""
    claimed = f"{' × '.join(f'{side:,}' for side in level.shape)} {level.dtype}"
    for page in level.pages:
        if page is None:
            continue
        keyframe = page.keyframe
        needed, listed = math.prod(keyframe.chunked), len(page.dataoffsets)
        kind = "tiles" if keyframe.is_tiled else "strips"
        problem = None
        if listed < needed:
            problem = f"{needed:,} {kind}, but the file lists {listed:,}"
        elif any(offset + count > file_size for offset, count in zip(page.dataoffsets, page.databytecounts)):
            problem = f"{kind} that end past the end of the file ({file_size:,} bytes)"
        elif keyframe.compression == 1 and all(page.databytecounts) and sum(page.databytecounts) < keyframe.nbytes:
            # (a count of 0 is a sparse chunk, read as zeros, which GDAL writes for empty tiles)
            problem = f"{keyframe.nbytes:,} bytes of uncompressed {kind}, but they hold {sum(page.databytecounts):,}"
        if problem:
            raise ImageError(f"{path}: the TIFF header claims {claimed} pixels in {problem}: the image data is "
                             f"missing or the file is corrupt.")


@dataclass
class _ChannelsFirst:
    """A `(C, H, W)` lazily sliced array seen as `(H, W, C)`."""

    array: object

    @property
    def shape(self):
        channels, height, width = self.array.shape
        return height, width, channels

    def __getitem__(self, key):
        rows, cols = key
        return np.moveaxis(np.asarray(self.array[:, rows, cols]), 0, -1)


class RasterioSource:
    """A georeferenced raster (a GeoTIFF, or any format GDAL reads) through rasterio, read one window at a time.

    `bands`: the 1-based band numbers to read, in order, as GDAL and rasterio count them (None: every band);
    they become the channels. `georeference` is None when the file has no CRS. `valid` says which pixels hold data,
    from the file's no-data value, mask band or alpha band (None when it has none of them). The dataset is opened
    once per process, so that `DataLoader` workers never share a file handle.
    """

    def __init__(self, path, bands: Sequence[int] | None = None):
        self.path, self.name = Path(path), str(path)
        self._dataset, self._opened_by = None, None
        dataset = self.dataset
        self.bands = tuple(range(1, dataset.count + 1)) if bands is None else _checked_bands(bands, dataset.count,
                                                                                               self.name)
        self.height, self.width, self.channels = int(dataset.height), int(dataset.width), len(self.bands)
        self.dtype = np.result_type(*(np.dtype(dataset.dtypes[band - 1]) for band in self.bands))
        self.georeference: GeoReference | None = GeoReference.of_dataset(dataset)
        flags = require_geo("Reading a raster's mask").enums.MaskFlags
        # A band whose only mask flag is all_valid has no no-data value, mask band or alpha band.
        self.masked = any(dataset.mask_flag_enums[band - 1] != [flags.all_valid] for band in self.bands)
        # GDAL decodes every band of a block (pixel-interleaved files keep them together).
        self._row_bytes = self.width * dataset.count * max(np.dtype(dtype).itemsize for dtype in dataset.dtypes)

    @property
    def dataset(self):
        """The open rasterio dataset of this process."""
        if self._dataset is None or self._opened_by != os.getpid():
            rasterio = require_geo(f"Reading {self.path.name} with its georeference")
            self._dataset, self._opened_by = rasterio.open(self.path), os.getpid()
        return self._dataset

    def __getstate__(self):
        return {**self.__dict__, "_dataset": None, "_opened_by": None}

    def _capped_block_cache(self, rows: int):
        """GDAL's block cache capped for reading `rows` rows (0: a preview), see `MIN_BLOCK_CACHE`."""
        return require_geo("Reading a raster").Env(GDAL_CACHEMAX=max(MIN_BLOCK_CACHE, 2 * rows * self._row_bytes))

    def _window(self, top: int, left: int, height: int, width: int):
        height, width = min(height, self.height - top), min(width, self.width - left)
        return (top, top + height), (left, left + width)

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """Pixels `[top:top+height, left:left+width]` of the chosen bands as `(h, w, channels)`, clipped at the
        border; only the blocks of the file that the window touches are decoded."""
        window = self._window(top, left, height, width)
        try:
            with self._capped_block_cache(height):
                pixels = self.dataset.read(list(self.bands), window=window, out_dtype=self.dtype)
        except Exception as error:  # a block that does not decode, found only when it is read
            raise ImageError(f"Cannot read {self.name} at rows {top}–{top + height}, columns {left}–{left + width}:"
                             f" {type(error).__name__}: {error}") from error
        return np.moveaxis(pixels, 0, -1)

    def valid(self, top: int, left: int, height: int, width: int) -> np.ndarray | None:
        """`(h, w)` bool, True where every chosen band holds data (the window clipped as `read` clips it); None
        when the file marks no pixel as no-data."""
        if not self.masked:
            return None
        with self._capped_block_cache(height):
            masks = self.dataset.read_masks(list(self.bands), window=self._window(top, left, height, width))
        return np.all(masks != 0, axis=0)

    def overview(self, max_side: int) -> tuple[np.ndarray, float]:
        """The whole scene at most `max_side` px on its longer side, `(h', w', channels)`, and `scale`, preview
        pixels per scene pixel (`h' = round(height · scale)`, likewise `w'`; 1.0 when the scene fits already).

        GDAL reads the file's overviews when it has them (otherwise it averages the full resolution block by block,
        its block cache capped at `MIN_BLOCK_CACHE`), so memory is bounded by the output. No-data pixels are
        left out of the averages; `overview_valid` gives the preview's mask."""
        scale, shape = self._overview_shape(max_side)
        average = require_geo("A raster preview").enums.Resampling.average
        with self._capped_block_cache(0):
            pixels = self.dataset.read(list(self.bands), out_shape=(self.channels, *shape), out_dtype=self.dtype,
                                       resampling=average)
        return np.moveaxis(pixels, 0, -1), scale

    def overview_valid(self, max_side: int) -> np.ndarray | None:
        """`(h', w')` bool, where the preview of `overview(max_side)` holds data; None when the file marks no
        pixel as no-data."""
        if not self.masked:
            return None
        _, shape = self._overview_shape(max_side)
        with self._capped_block_cache(0):
            masks = self.dataset.read_masks(list(self.bands), out_shape=(self.channels, *shape))
        return np.all(masks != 0, axis=0)

    def _overview_shape(self, max_side: int) -> tuple[float, tuple[int, int]]:
        if max_side < 1:
            raise ValueError(f"max_side must be at least 1, got {max_side}.")
        scale = min(1.0, max_side / max(self.height, self.width))
        return scale, (max(1, round(self.height * scale)), max(1, round(self.width * scale)))


def _checked_bands(bands: Sequence[int], count: int, name: str | None) -> tuple[int, ...]:
    bands = tuple(int(band) for band in bands)
    outside = [band for band in bands if not 1 <= band <= count]
    if not bands or outside:
        holder = f"{name} has" if name else "The image has"
        problem = "no bands were chosen" if not bands else f"band {outside[0]} does not exist"
        raise ImageError(f"{holder} {count} band{'s' if count != 1 else ''} (numbered from 1); {problem}.")
    return bands


class BandSelection:
    """Some channels of a source that has no bands of its own (an array, a plain TIFF), chosen by 1-based band
    numbers as `RasterioSource` chooses them; a window is read, then its channels picked."""

    def __init__(self, source: RegionSource, bands: Sequence[int]):
        self.source, self.name = source, getattr(source, "name", None)
        self.bands = _checked_bands(bands, source.channels, self.name)
        self.height, self.width, self.channels = source.height, source.width, len(self.bands)
        self.georeference = getattr(source, "georeference", None)

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        return self.source.read(top, left, height, width)[..., [band - 1 for band in self.bands]]

    def valid(self, top: int, left: int, height: int, width: int) -> np.ndarray | None:
        valid = getattr(self.source, "valid", None)
        return None if valid is None else valid(top, left, height, width)


def _select_bands(source: RegionSource, bands: Sequence[int] | None) -> RegionSource:
    if bands is None or tuple(bands) == getattr(source, "bands", None):  # opened with these bands already
        return source
    return BandSelection(source, bands)


def _geo_available() -> bool:
    try:
        require_geo("")
    except ImportError:
        return False
    return True


def _has_geotiff_tags(path: Path) -> bool:
    """Whether the first page of a TIFF carries GeoTIFF (or GDAL no-data) tags; False for a file tifffile cannot
    open, which `_tiff_source` then names."""
    import tifffile

    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tiff:
            tags = tiff.pages.first.tags
            return any(code in tags for code in GEOTIFF_TAGS)
    except Exception:
        return False


def _tiff_or_geotiff_source(path: Path, bands: Sequence[int] | None) -> RegionSource:
    """A GeoTIFF through rasterio (its georeference and no-data mask kept) when the geo extra is installed; any
    other TIFF through tifffile, as before; a TIFF that tifffile cannot decode through GDAL where it can."""
    geotiff = _has_geotiff_tags(path)
    if geotiff and _geo_available():
        return RasterioSource(path, bands)
    try:
        source = _tiff_source(path)
    except ImageError:
        raise  # a header that claims data the file lacks: named as it is
    except Exception:
        if not _geo_available():
            raise
        try:
            return RasterioSource(path, bands)
        except Exception:
            pass
        raise
    if geotiff:
        logger.warning(f"{path.name} is a GeoTIFF, read as plain pixels without its georeference or no-data mask; "
                       f"to use them: {GEO_EXTRA}")
    return _select_bands(source, bands)


def open_region_source(image, region_size: int | None = None, *, bands: Sequence[int] | None = None
                       ) -> RegionSource:
    """A source for an array, a zarr array, or a path (.npy, TIFF/BigTIFF, zarr directory, slide, PNG/JPEG; with the
    geo extra installed, any raster GDAL reads); a source already opened is checked against `region_size` and
    returned as it is.

    A GeoTIFF opens as a `RasterioSource` (its georeference and no-data mask kept) when rasterio is installed, and
    as plain pixels through tifffile, with a warning, when it is not. `bands`: 1-based band (channel) numbers to
    read, in order (None: all); a raster reads only those, another source reads a window and picks them.

    Raises `ValueError` (an `ImageError`) naming the file and the problem: missing, unreadable, truncated or
    corrupt file, unsupported format, an array of another layout than (height, width[, channels]), an image
    smaller than one region (when `region_size` is given).
    """
    if isinstance(image, (str, Path)):
        source = _open_path(Path(image), bands)
    elif hasattr(image, "read") and hasattr(image, "height"):
        source = _select_bands(image, bands)
    elif isinstance(image, torch.Tensor):
        raise ValueError("Pass torch tensors to the model directly; sources are for arrays and files.")
    elif hasattr(image, "shape") and hasattr(image, "__getitem__"):
        source = _select_bands(ArraySource(image), bands)
    else:
        raise ValueError(f"Cannot read an image from a {type(image).__name__}.")
    if region_size is not None and (source.height < region_size or source.width < region_size):
        image_name = getattr(source, "name", None) or "The image"
        raise ImageError(f"{image_name} is {source.height}×{source.width} px, smaller than one region "
                         f"({region_size}×{region_size} px).")
    return source


def _open_path(path: Path, bands: Sequence[int] | None = None) -> RegionSource:
    if not path.exists():
        raise ValueError(f"{path} does not exist.")
    suffix = path.suffix.lower()
    zarr_metadata = ("zarr.json", ".zarray", ".zgroup")  # zarr v3; v2 array, v2 group
    if path.is_dir() and not any((path / name).is_file() for name in zarr_metadata):
        raise ValueError(f"{path} is a directory, not an image or a zarr array (it holds no {', '.join(zarr_metadata)}).")
    try:
        if path.is_dir() or suffix == ".zarr":
            import zarr

            opened = zarr.open(str(path), mode="r")
            if not hasattr(opened, "shape"):  # a group of arrays: which one is the image is not ours to guess
                names = sorted(getattr(opened, "array_keys", lambda: [])())
                example = f" (e.g. {path / names[0]})" if names else ""
                raise ImageError(f"{path} is a zarr group, not an array: give the path of its image array{example}.")
            return _select_bands(ArraySource(opened, name=str(path)), bands)
        if suffix in NUMPY_SUFFIXES:
            return _select_bands(_numpy_source(path), bands)
        if suffix in TIFF_SUFFIXES:
            return _tiff_or_geotiff_source(path, bands)
        if suffix in SLIDE_SUFFIXES:
            return _select_bands(SlideSource(path), bands)
        if suffix in PIL_SUFFIXES:
            from PIL import Image

            with Image.open(path) as opened:
                return _select_bands(ArraySource(np.asarray(opened.convert("RGB")), name=str(path)), bands)
    except ImageError:
        raise
    except Exception as error:  # every reader has its own exception types (ValueError too) for broken files
        raise ImageError(f"Cannot read {path}: {type(error).__name__}: {error}") from error
    if not path.is_dir() and _geo_available():  # JPEG 2000, ERDAS .img, a VRT, NetCDF...: whatever GDAL reads
        try:
            return RasterioSource(path, bands)
        except ImageError:
            raise
        except Exception:
            pass
    supported = TIFF_SUFFIXES + SLIDE_SUFFIXES + NUMPY_SUFFIXES + PIL_SUFFIXES + (".zarr",)
    others = (", and the raster formats GDAL reads (it cannot read this file)" if _geo_available()
              else f". Other raster formats (JPEG 2000, VRT, ...) need the geo extra: {GEO_EXTRA}")
    raise ValueError(f"Unsupported image format {suffix or path.name!r}; supported: {', '.join(supported)}{others}.")


class RegionReader(Dataset):
    """Region number (row-major over the grid) → normalised `(C, R, R)` float32 region and its (row, col).

    Pixels are rescaled and normalised by the image processors' own `normalize_pixels` (the same settings,
    the same bits), and the part of a region beyond the image border is 0 after normalisation: what
    `XTImageProcessor` plus the model's padding produce. Reading happens per region, so a `DataLoader` with
    workers prefetches while the model runs.

    No-data pixels are padding: where the source's `valid` says a pixel holds no data (a GeoTIFF's no-data value,
    mask or alpha band, in any of the chosen bands), every channel is set to exactly 0 after normalisation, the
    value of the model's zero padding, so a no-data border or a swath edge reads as the outside of the image and
    never as data (a region of nothing but no-data gives the same model input as one beyond the border). Floating-
    point pixels are not rescaled by data type (factor 1) and never clipped, so negative values (SAR backscatter in
    dB) reach the normalisation as they are; give `image_mean`/`image_std` one value, or one per band.
    """

    def __init__(self, source: RegionSource, region_size: int, *, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                 rescale_factor: float | None = None, do_rescale: bool = True, do_normalize: bool = True):
        self.source, self.region_size = source, region_size
        self.rows, self.cols = region_grid_shape(source.height, source.width, region_size)
        self.normalization = dict(image_mean=image_mean, image_std=image_std, rescale_factor=rescale_factor,
                                  do_rescale=do_rescale, do_normalize=do_normalize)
        if do_rescale and rescale_factor is None:  # an int64 image fails here, not later in a DataLoader worker
            dtype_rescale_factor(source.read(0, 0, 1, 1).dtype)
        for name in ("image_mean", "image_std"):
            values = self.normalization[name]
            count = len(values) if isinstance(values, (list, tuple)) else 1
            if do_normalize and count not in (1, source.channels):
                raise ValueError(f"The image has {source.channels} channels but {count} values of {name}.")

    def __len__(self) -> int:
        return self.rows * self.cols

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        row, col = divmod(index, self.cols)
        size = self.region_size
        pixels = normalize_pixels(self.source.read(row * size, col * size, size, size), **self.normalization)
        valid = getattr(self.source, "valid", None)
        valid = None if valid is None else valid(row * size, col * size, size, size)
        if valid is not None:
            pixels[:, ~valid] = 0.0
        region = pad_to_region_multiple(torch.from_numpy(pixels), size)
        if not torch.isfinite(region).all():
            raise ValueError(f"Region (row {row}, column {col}) contains NaN or infinite values.")
        return region, row, col

    def batches(self, batch_size: int, num_workers: int = 0, regions: range | None = None) -> DataLoader:
        """Regions in order (all, or the row-major numbers in `regions`), `batch_size` at a time, read ahead by
        `num_workers` background processes."""
        dataset = self if regions is None else Subset(self, regions)
        return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                          prefetch_factor=2 if num_workers else None)


@dataclass(frozen=True)
class BandStatistics:
    """Per-band mean and standard deviation (population, float64) of sampled pixels, and how many were counted."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixels: tuple[int, ...]
    windows: int


def band_statistics(sources: Sequence[RegionSource], *, samples: int = 64, window: int = 256,
                    seed: int = 0) -> BandStatistics:
    """The statistics of each band over `samples` random `window` × `window` windows of `sources`, the values to
    give a processor's `image_mean` and `image_std` (after any rescaling, which multiplies both).

    Each window's scene is drawn in proportion to its area and its corner uniformly, so every pixel is equally
    likely to be counted; no-data pixels (`valid`) and non-finite values are skipped. One window is in memory at a
    time. A window as large as a scene covers it, so the statistics of a small scene are exact.
    """
    channels = {source.channels for source in sources}
    if len(channels) != 1:
        raise ValueError(f"The scenes have different numbers of bands ({', '.join(map(str, sorted(channels)))}).")
    rng = np.random.default_rng(seed)
    areas = np.array([source.height * source.width for source in sources], dtype=np.float64)
    bands = channels.pop()
    count, mean, m2 = (np.zeros(bands, dtype=np.float64) for _ in range(3))
    for chosen in rng.choice(len(sources), size=samples, p=areas / areas.sum()):
        source = sources[chosen]
        top = int(rng.integers(0, max(source.height - window, 0) + 1))
        left = int(rng.integers(0, max(source.width - window, 0) + 1))
        pixels = np.asarray(source.read(top, left, window, window), dtype=np.float64)
        valid = getattr(source, "valid", None)
        valid = None if valid is None else valid(top, left, window, window)
        for band in range(pixels.shape[-1]):
            values = pixels[..., band] if valid is None else pixels[..., band][valid]
            values = values[np.isfinite(values)]
            if values.size == 0:
                continue
            # Chan et al.'s pairwise update: exact in one pass, no catastrophic cancellation of sums of squares.
            window_mean = values.mean()
            delta, total = window_mean - mean[band], count[band] + values.size
            mean[band] += delta * values.size / total
            m2[band] += ((values - window_mean) ** 2).sum() + delta**2 * count[band] * values.size / total
            count[band] = total
    std = np.sqrt(np.divide(m2, count, out=np.zeros_like(m2), where=count > 0))
    return BandStatistics(tuple(mean.tolist()), tuple(std.tolist()), tuple(int(n) for n in count), samples)
