"""Lazy large-image sources and a region reader that never holds the full-resolution image in memory.

A source only has to say its size and read a window: `read(top, left, height, width) -> (h, w, C)`.
The reader turns region numbers into normalised `(C, R, R)` float32 regions, exactly as
`XTImageProcessor` followed by the model's own zero padding would, so that streamed and in-memory
forwards agree.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..image_processing_xt import dtype_rescale_factor, normalize_pixels
from ..nested_tokenization import pad_to_region_multiple, region_grid_shape
from .spill import drop_mapped_pages

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8")
SLIDE_SUFFIXES = (".svs", ".ndpi", ".scn", ".mrxs", ".vms", ".bif")
NUMPY_SUFFIXES = (".npy",)
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class ImageError(ValueError):
    """An image that cannot be used as given; the message names the file (where there is one) and the reason.
    Whatever else a reader raises for a broken file is turned into one of these, naming the file."""


class RegionSource(Protocol):
    height: int
    width: int
    channels: int

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        """Pixels `[top:top+height, left:left+width]` as `(h, w, channels)`; clipped at the image border."""


@dataclass
class ArraySource:
    """Any `(H, W, C)` or `(H, W)` array-like that slices lazily: numpy, `np.memmap`, zarr, tifffile's zarr view.
    `name`: the file it reads, named in its errors."""

    array: object
    name: str | None = None

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

    def read(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        height, width = min(height, self.height - top), min(width, self.width - left)
        region = self.slide.read_region((left, top), 0, (width, height))
        return np.asarray(region)[..., :3]


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

    # tifffile logs each inconsistency of a broken header as an error line of its own (and reads on);
    # `_check_tiff_data` says what is wrong in one line instead.
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        tiff = tifffile.TiffFile(path)
        try:
            level_0 = tiff.series[0].levels[0]
            _check_tiff_data(path, level_0, tiff.filehandle.size)
        except BaseException:
            tiff.close()
            raise
    finally:
        logger.setLevel(level)
    array = zarr.open(level_0.aszarr(), mode="r")
    if level_0.axes.startswith(("C", "S")) and len(level_0.axes) == 3:  # planar (C, H, W): read lazily, channels last
        return ArraySource(_ChannelsFirst(array), name=str(path))
    return ArraySource(array, name=str(path))


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


def open_region_source(image, region_size: int | None = None) -> RegionSource:
    """A source for an array, a zarr array, or a path (.npy, TIFF/BigTIFF, zarr directory, slide, PNG/JPEG); a
    source already opened is checked against `region_size` and returned as it is.

    Raises `ValueError` (an `ImageError`) naming the file and the problem: missing, unreadable, truncated or
    corrupt file, unsupported format, an array of another layout than (height, width[, channels]), an image
    smaller than one region (when `region_size` is given).
    """
    if isinstance(image, (str, Path)):
        source = _open_path(Path(image))
    elif hasattr(image, "read") and hasattr(image, "height"):
        source = image
    elif isinstance(image, torch.Tensor):
        raise ValueError("Pass torch tensors to the model directly; sources are for arrays and files.")
    elif hasattr(image, "shape") and hasattr(image, "__getitem__"):
        source = ArraySource(image)
    else:
        raise ValueError(f"Cannot read an image from a {type(image).__name__}.")
    if region_size is not None and (source.height < region_size or source.width < region_size):
        image_name = getattr(source, "name", None) or "The image"
        raise ImageError(f"{image_name} is {source.height}×{source.width} px, smaller than one region "
                         f"({region_size}×{region_size} px).")
    return source


def _open_path(path: Path) -> RegionSource:
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
            return ArraySource(opened, name=str(path))
        if suffix in NUMPY_SUFFIXES:
            return _numpy_source(path)
        if suffix in TIFF_SUFFIXES:
            return _tiff_source(path)
        if suffix in SLIDE_SUFFIXES:
            return SlideSource(path)
        if suffix in PIL_SUFFIXES:
            from PIL import Image

            with Image.open(path) as opened:
                return ArraySource(np.asarray(opened.convert("RGB")), name=str(path))
    except ImageError:
        raise
    except Exception as error:  # every reader has its own exception types (ValueError too) for broken files
        raise ImageError(f"Cannot read {path}: {type(error).__name__}: {error}") from error
    supported = TIFF_SUFFIXES + SLIDE_SUFFIXES + NUMPY_SUFFIXES + PIL_SUFFIXES + (".zarr",)
    raise ValueError(f"Unsupported image format {suffix or path.name!r}; supported: {', '.join(supported)}.")


class RegionReader(Dataset):
    """Region number (row-major over the grid) → normalised `(C, R, R)` float32 region and its (row, col).

    Pixels are rescaled and normalised by the image processors' own `normalize_pixels` (the same settings,
    the same bits), and the part of a region beyond the image border is 0 after normalisation: what
    `XTImageProcessor` plus the model's padding produce. Reading happens per region, so a `DataLoader` with
    workers prefetches while the model runs.
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
