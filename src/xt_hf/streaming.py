"""Run xT on images read region by region from disk: only the stitched token grid stays in memory."""

from __future__ import annotations

import os

import numpy as np
import torch

from .nested_tokenization import as_region_grid
from .region_sources import RegionReader, RegionSource, open_region_source
from .spill import release_pages


def load_for_inference(auto_class, model_id: str, device: str, dtype: torch.dtype):
    """`(model in eval mode on device/dtype, image processor or None)`; exits with status 2 and a message
    naming the model when it cannot be loaded (command-line use)."""
    import sys

    from transformers import AutoImageProcessor

    try:
        model = auto_class.from_pretrained(model_id, trust_remote_code=True)
    except (OSError, ValueError) as error:
        print(f"error: cannot load the model {model_id!r}: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        processor = AutoImageProcessor.from_pretrained(model_id, trust_remote_code=True)
    except (OSError, ValueError):
        processor = None  # no preprocessor_config.json: ImageNet statistics, as the original
    return model.to(device, dtype).eval(), processor


def region_reader_for(model, source: RegionSource, processor=None) -> RegionReader:
    """A reader that normalises exactly as the model's image processor (ImageNet statistics by default)."""
    arguments = {}
    if processor is not None:
        arguments = dict(mean=processor.image_mean, std=processor.image_std,
                         rescale_factor=processor.rescale_factor if processor.do_rescale else 1.0)
        if not processor.do_normalize:
            arguments.update(mean=[0.0] * source.channels, std=[1.0] * source.channels)
    return RegionReader(source, model.config.region_size, **arguments)


@torch.inference_mode()
def encode_regions_streaming(
    model,
    image,
    *,
    processor=None,
    region_batch_size: int | None = None,
    num_workers: int = 0,
    progress: bool = False,
    last_stage_only: bool = False,
) -> list[torch.Tensor]:
    """Stitched `(1, C_s, rows·h_s, cols·w_s)` maps of every `out_features` stage for one large image
    (only the deepest with `last_stage_only`: the shallow stages of a whole scene can be far larger).

    `image` is anything `open_region_source` reads (array, memmap, zarr, TIFF, slide, path). Regions are
    read `region_batch_size` at a time (background workers with `num_workers > 0`), encoded, and written
    into preallocated grids; nothing else of the image stays in memory.
    """
    xt = model.base_model
    reader = _reader(model, image, processor)
    stitched = None
    for regions, rows, cols in _region_batches(model, reader, region_batch_size, num_workers, progress):
        feature_maps = xt.region_encoder._feature_maps(regions)
        if last_stage_only:
            feature_maps = feature_maps[-1:]
        if stitched is None:
            stitched = [f.new_empty(1, f.shape[1], reader.rows * f.shape[2], reader.cols * f.shape[3]) for f in feature_maps]
        image_index = torch.zeros_like(rows)
        for grid, features in zip(stitched, feature_maps):
            as_region_grid(grid, features.shape[2], features.shape[3])[image_index, rows, cols] = features
    return stitched


def _reader(model, image, processor) -> RegionReader:
    source = image if hasattr(image, "read") else open_region_source(image, model.config.region_size)
    expected = model.config.backbone_config.num_channels
    if source.channels != expected:
        raise ValueError(f"The image has {source.channels} channels but the region encoder expects {expected}.")
    return region_reader_for(model, source, processor)


def _region_batches(model, reader: RegionReader, region_batch_size, num_workers, progress, description="regions"):
    """`(regions on the model's device and dtype, rows, cols)` batches in row-major order."""
    parameter = next(model.parameters())
    batch_size = region_batch_size or model.config.region_batch_size or 16
    batches = reader.batches(batch_size, num_workers)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=len(batches), unit="batch", desc=f"{len(reader)} {description}")
    for regions, rows, cols in batches:
        yield regions.to(parameter.device, parameter.dtype), rows, cols


@torch.inference_mode()
def encode_context_streaming(
    model,
    image,
    *,
    processor=None,
    region_batch_size: int | None = None,
    num_workers: int = 0,
    progress: bool = False,
    spill_directory: str | os.PathLike | None = None,
):
    """`XTModel.encode_context` of one large image read region by region: `(XTModelOutput, (H_S, W_S))`, the
    latter the deepest stage's stitched grid size.

    With a context encoder, each chunk of regions is embedded into the context encoder's token sequence as it
    arrives, so the stitched region features never exist: memory holds the model, one chunk of regions and
    the tokens, which the context encoder then updates in place. With `spill_directory` (CPU), the tokens and
    the attention blocks' buffer of heads' outputs live in files there instead, and memory holds chunks
    (`spill.py`); `last_hidden_state` is then a view of that file, deleted when no tensor uses it any more.
    """
    xt = model.base_model
    if xt.context_encoder is None:
        (grid,) = encode_regions_streaming(model, image, processor=processor, region_batch_size=region_batch_size,
                                           num_workers=num_workers, progress=progress, last_stage_only=True)
        return xt.encode_context([grid]), tuple(grid.shape[-2:])
    reader = _reader(model, image, processor)
    encoder, tokens = xt.context_encoder, None
    for regions, rows, cols in _region_batches(model, reader, region_batch_size, num_workers, progress):
        features = xt.region_encoder._feature_maps(regions)[-1]  # (n, C, h, w)
        count, channels, height, width = features.shape
        if tokens is None:
            grid_shape = (reader.rows * height, reader.cols * width)
            tokens = encoder.new_token_buffer(1, grid_shape[0] * grid_shape[1], device=features.device,
                                              spill_directory=spill_directory)
        # Grid cells of every token of the chunk, in the (region, i, j) order of `features`.
        row = (rows.to(features.device).view(-1, 1, 1) * height + torch.arange(height, device=features.device).view(1, -1, 1))
        col = (cols.to(features.device).view(-1, 1, 1) * width + torch.arange(width, device=features.device).view(1, 1, -1))
        row, col = row.expand(count, height, width).reshape(-1), col.expand(count, height, width).reshape(-1)
        embedded = encoder.embed_tokens(features.permute(0, 2, 3, 1).reshape(1, -1, channels), row, col)
        index = row * grid_shape[1] + col
        encoder.grid_part(tokens)[:, index] = embedded
        release_pages(encoder.grid_part(tokens)[:, index.min() : index.max() + 1])
    del features, embedded, regions
    _return_freed_memory()
    return xt.encode_embedded_context(tokens), grid_shape


def _return_freed_memory() -> None:
    """Hand the region encoder's freed working memory back to the system before the context encoder's
    grid-sized buffers are allocated (glibc only; elsewhere nothing happens).

    glibc keeps freed blocks below its mmap threshold (up to 32 MiB) in the heap for reuse: after 40 chunks
    of 16 Swin-v2-T regions that was 0.39 GiB of free memory still counted in the process (measured on a
    4,096² px image), which would otherwise add to the context encoder's peak.
    """
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@torch.inference_mode()
def predict_streaming(model, image, **kwargs) -> torch.Tensor:
    """Classification logits `(1, num_labels)` of one large image read region by region."""
    output, _ = encode_context_streaming(model, image, **kwargs)
    return model.classifier(output.pooler_output)


@torch.inference_mode()
def segment_streaming(
    model,
    image,
    output,
    *,
    processor=None,
    region_batch_size: int | None = None,
    num_workers: int = 0,
    progress: bool = False,
    overwrite: bool = False,
    spill_directory: str | os.PathLike | None = None,
) -> tuple[int, int]:
    """Whole-scene segmentation of a large image into a class map on disk, never holding full-resolution
    features of all regions: returns the map's `(height, width)`.

    Pass one encodes every region and keeps only its context-encoder tokens (`encode_context_streaming`).
    Pass two re-encodes the regions chunk by chunk, decodes each with its slice of the context tokens
    (`XTForSemanticSegmentation.decode_regions`) and writes the argmax straight into `output`: a `.zarr`
    directory or a tiled `.tif`, uint8 (uint16 beyond 256 classes), at `1 / decoder_output_stride` of the
    input resolution. Existing outputs are refused unless `overwrite`. `spill_directory` keeps the context
    tokens in a file there (`encode_context_streaming`); pass two then maps in one region row's tokens at a time.
    """
    from pathlib import Path

    output = Path(output)
    if output.exists() and not overwrite:
        raise ValueError(f"{output} exists: choose another output or allow replacing it (--overwrite, overwrite=True).")
    if output.suffix.lower() not in (".zarr", ".tif", ".tiff"):
        raise ValueError(f"The output must be a .zarr directory or a .tif file, got {output.name!r}.")
    reader = _reader(model, image, processor)
    xt = model.base_model
    encoded, grid_shape = encode_context_streaming(model, reader.source, processor=processor,
                                                   region_batch_size=region_batch_size, num_workers=num_workers,
                                                   progress=progress, spill_directory=spill_directory)
    tokens = encoded.last_hidden_state if xt.context_encoder is not None else None
    # (1, rows, h, cols, w, D): each region's context tokens, viewed in place rather than copied into a grid.
    token_rows = grid_shape[0] // reader.rows
    region_tokens = None if tokens is None else tokens.view(
        1, reader.rows, token_rows, reader.cols, grid_shape[1] // reader.cols, tokens.shape[-1])
    stride = model.config.decoder_output_stride
    side = model.config.region_size // stride
    height, width = -(-reader.source.height // stride), -(-reader.source.width // stride)
    dtype = np.uint8 if model.config.num_labels <= 256 else np.uint16

    def region_masks():
        """`(row, col, class map (side, side))` in row-major region order."""
        for regions, rows, cols in _region_batches(model, reader, region_batch_size, num_workers, progress, "decoded"):
            features = xt.region_encoder._feature_maps(regions)
            region_context = None
            if region_tokens is not None:
                region_context = region_tokens[0][rows, :, cols].permute(0, 3, 1, 2).contiguous()
                release_pages(tokens[:, int(rows.min()) * token_rows * grid_shape[1] :
                                     (int(rows.max()) + 1) * token_rows * grid_shape[1]])
            masks = model.decode_regions(list(features), region_context).argmax(dim=1).cpu().numpy().astype(dtype)
            yield from zip(rows.tolist(), cols.tolist(), masks)

    if output.suffix.lower() == ".zarr":
        import zarr

        target = zarr.open(str(output), mode="w", shape=(height, width), chunks=(side, side), dtype=dtype)
        for row, col, mask in region_masks():
            window = target[row * side : (row + 1) * side, col * side : (col + 1) * side]
            target[row * side : (row + 1) * side, col * side : (col + 1) * side] = mask[: window.shape[0], : window.shape[1]]
    else:
        import tifffile

        if side % 16:
            raise ValueError(f"Tiled TIFF tiles must be multiples of 16 px; region_size / stride is {side}: use .zarr.")
        # Regions arrive in row-major order, the order of a tiled TIFF's tiles (one tile per region, the
        # last row and column of tiles partly outside the image): write them as they come.
        tiles = (mask for _, _, mask in region_masks())
        tifffile.imwrite(output, tiles, shape=(height, width), dtype=dtype, tile=(side, side))
    return height, width

