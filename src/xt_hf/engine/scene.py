"""The whole-scene driver: xT on an image read region by region from disk.

Pass one feeds the model's own region loop (`XTRegionEncoder.encode_batches`) from a lazy source and embeds
each chunk of regions into the context encoder's token sequence as it arrives, so neither the image nor the
stitched region features ever exist in memory; the context encoder then updates the tokens in place
(`context.encode_in_place`), optionally spilled to disk. A head that answers from the context is then
called once (`ContextHead`); a per-region head (`RegionHead`) gets pass two, which re-encodes the regions
and decodes each with its slice of the context tokens.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from ..detection_head import detections_from_dense_maps
from ..modeling_xt import XTModelOutput
from ..nested_tokenization import RegionIndex, new_stitched_grids, region_grid_shape, stitch_regions
from ..region_encoder import RegionBatch
from .context import encode_in_place, new_token_buffer
from .heads import ContextHead, RegionHead, require_head
from .sources import RegionReader, RegionSource, open_region_source
from .spill import release_pages
from .writers import CLASS_MAP_SUFFIXES, check_output_path, write_class_map


def region_reader_for(model, image, processor=None) -> RegionReader:
    """A reader of `image` (a `RegionSource` or anything `open_region_source` reads) that normalises exactly as
    the model's image processor (ImageNet statistics by default), checked against the model's channels."""
    source = image if hasattr(image, "read") else open_region_source(image, model.config.region_size)
    expected = model.config.backbone_config.num_channels
    if source.channels != expected:
        raise ValueError(f"The image has {source.channels} channels but the region encoder expects {expected}.")
    settings = {}
    if processor is not None:
        settings = {name: getattr(processor, name)
                    for name in ("image_mean", "image_std", "rescale_factor", "do_rescale", "do_normalize")}
    return RegionReader(source, model.config.region_size, **settings)


def region_feed(model, reader: RegionReader, *, region_batch_size: int | None = None, num_workers: int = 0,
                progress: bool = False, description: str = "regions", regions: range | None = None,
                ) -> Iterator[RegionBatch]:
    """The lazy feed of the model's region loop: regions read from disk in row-major order (all, or the numbers in
    `regions`), `region_batch_size` at a time (read ahead by `num_workers` processes), on the model's device and
    dtype. `region_batch_size=None` takes the model's `config.region_batch_size`; a config that says None (all
    regions at once, in memory) streams the config class's default instead, since holding a whole scene is what
    streaming avoids."""
    parameter = next(model.parameters())
    batch_size = region_batch_size or model.config.region_batch_size or type(model.config).region_batch_size
    batches = reader.batches(batch_size, num_workers, regions)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=len(batches), unit="batch", desc=f"{len(reader)} {description}")
    for regions, rows, cols in batches:
        index = RegionIndex(torch.zeros_like(rows), rows, cols, reader.rows, reader.cols).to(parameter.device)
        yield RegionBatch(regions.to(parameter.device, parameter.dtype), index, with_gradient=False)


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
    (only the deepest with `last_stage_only`: the shallow stages of a whole scene can be far larger)."""
    reader = region_reader_for(model, image, processor)
    feed = region_feed(model, reader, region_batch_size=region_batch_size, num_workers=num_workers, progress=progress)
    stitched = None
    for index, feature_maps in model.base_model.region_encoder.encode_batches(feed):
        feature_maps = feature_maps[-1:] if last_stage_only else feature_maps
        if stitched is None:
            stitched = new_stitched_grids(feature_maps, 1, reader.rows, reader.cols)
        for grid, features in zip(stitched, feature_maps):
            stitch_regions(grid, index, features)
    return stitched


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
    shard_regions: bool = False,
) -> tuple[XTModelOutput | None, tuple[int, int]]:
    """`XTModel`'s output for one large image read region by region, and the deepest stage's stitched grid
    size `(H_S, W_S)`.

    Memory holds the model, one chunk of regions and the tokens. With `spill_directory` (CPU), the tokens and
    the attention blocks' buffer of heads' outputs live in files there instead, and memory holds chunks
    (`spill.py`); `last_hidden_state` is then a view of that file, deleted when no tensor uses it any more.

    With `shard_regions` (under torch.distributed), the processes share the region stage and rank 0 alone gets
    the output (the others get `None`): see `_encode_context_across_processes`.
    """
    xt = model.base_model
    if xt.context_encoder is None:
        (grid,) = encode_regions_streaming(model, image, processor=processor, region_batch_size=region_batch_size,
                                           num_workers=num_workers, progress=progress, last_stage_only=True)
        return xt.encode_context([grid]), tuple(grid.shape[-2:])
    reader = region_reader_for(model, image, processor)
    if shard_regions:
        return _encode_context_across_processes(model, reader, region_batch_size=region_batch_size,
                                                num_workers=num_workers, progress=progress,
                                                spill_directory=spill_directory)
    feed = region_feed(model, reader, region_batch_size=region_batch_size, num_workers=num_workers, progress=progress)
    encoder, tokens = xt.context_encoder, None
    for flat, embedded, grid_shape in _embedded_regions(model, reader, feed):
        if tokens is None:
            tokens = new_token_buffer(encoder, 1, grid_shape[0] * grid_shape[1], device=embedded.device,
                                      spill_directory=spill_directory)
            grid_tokens = encoder.split_cls(tokens)[0]
        grid_tokens[:, flat] = embedded
        release_pages(grid_tokens[:, flat.min() : flat.max() + 1])
    del embedded
    _return_freed_memory()
    return xt.output_from_encoding(encode_in_place(encoder, tokens)), grid_shape


def _embedded_regions(model, reader: RegionReader, feed: Iterator[RegionBatch]):
    """Each batch of regions through the model's region loop and into context tokens: `(flat grid positions (k,),
    embedded tokens (1, k, hidden), token grid shape)`."""
    xt = model.base_model
    for index, feature_maps in xt.region_encoder.encode_batches(feed):
        features = feature_maps[-1]  # (n, C, h, w)
        _, channels, height, width = features.shape
        grid_shape = (reader.rows * height, reader.cols * width)
        row, col = _token_cells(index, height, width)
        embedded = xt.context_encoder.embed_tokens(features.permute(0, 2, 3, 1).reshape(1, -1, channels), row, col)
        yield row * grid_shape[1] + col, embedded, grid_shape


# Tokens per message when ranks hand their embedded tokens to rank 0: bounds what a message holds.
_TOKENS_PER_MESSAGE = 2**16


def _encode_context_across_processes(model, reader: RegionReader, *, region_batch_size, num_workers, progress,
                                     spill_directory):
    """The region stage of one image shared between the processes of `torch.distributed` (each takes a contiguous
    share of the regions in row-major order), the embedded tokens sent to rank 0, which alone runs the context
    encoder. Rank 0 returns what `encode_context_streaming` returns; the other ranks return `(None, grid_shape)`.

    Regions are independent, so the region stage (nearly all the time) parallelises perfectly; the context encoder
    runs on one device and bounds the rest. Each rank keeps only its own share of tokens until it sends them.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("shard_regions needs torch.distributed to be initialised (torchrun, accelerate launch, or "
                         "torch.distributed.init_process_group).")
    rank, world = dist.get_rank(), dist.get_world_size()
    total = reader.rows * reader.cols
    share = range(rank * total // world, (rank + 1) * total // world)
    feed = region_feed(model, reader, region_batch_size=region_batch_size, num_workers=num_workers,
                       progress=progress and rank == 0, regions=share)
    pieces = list(_embedded_regions(model, reader, feed))
    device = next(model.parameters()).device
    grid_shape = pieces[0][2] if pieces else None
    shapes = [None] * world
    dist.all_gather_object(shapes, grid_shape)
    grid_shape = next(shape for shape in shapes if shape is not None)
    encoder = model.base_model.context_encoder
    hidden = encoder.input_proj.weight.shape[0]
    flat = torch.cat([piece[0] for piece in pieces]) if pieces else torch.zeros(0, dtype=torch.long, device=device)
    embedded = torch.cat([piece[1][0] for piece in pieces]) if pieces else encoder.input_proj.weight.new_zeros(0, hidden)
    del pieces
    if rank != 0:
        count = torch.tensor([len(flat)], device=device)
        dist.send(count, dst=0)
        for start in range(0, len(flat), _TOKENS_PER_MESSAGE):
            dist.send(flat[start : start + _TOKENS_PER_MESSAGE].contiguous(), dst=0)
            dist.send(embedded[start : start + _TOKENS_PER_MESSAGE].contiguous(), dst=0)
        return None, grid_shape
    tokens = new_token_buffer(encoder, 1, grid_shape[0] * grid_shape[1], device=device, spill_directory=spill_directory)
    grid_tokens = encoder.split_cls(tokens)[0]
    grid_tokens[0, flat] = embedded
    del flat, embedded
    for source in range(1, world):
        count = torch.zeros(1, dtype=torch.long, device=device)
        dist.recv(count, src=source)
        for start in range(0, int(count), _TOKENS_PER_MESSAGE):
            size = min(_TOKENS_PER_MESSAGE, int(count) - start)
            positions = torch.empty(size, dtype=torch.long, device=device)
            values = grid_tokens.new_empty(size, hidden)
            dist.recv(positions, src=source)
            dist.recv(values, src=source)
            grid_tokens[0, positions] = values
            release_pages(grid_tokens[:, int(positions.min()) : int(positions.max()) + 1])
    _return_freed_memory()
    return model.base_model.output_from_encoding(encode_in_place(encoder, tokens)), grid_shape


def _token_cells(index: RegionIndex, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid cells `(row, col)` of every token of a batch of regions with `height × width` tokens each, in the
    `(region, i, j)` order of their feature maps."""
    device = index.row.device
    row = index.row.view(-1, 1, 1) * height + torch.arange(height, device=device).view(1, -1, 1)
    col = index.col.view(-1, 1, 1) * width + torch.arange(width, device=device).view(1, 1, -1)
    count = len(index)
    return row.expand(count, height, width).reshape(-1), col.expand(count, height, width).reshape(-1)


def _return_freed_memory() -> None:
    """Hand the region encoder's freed working memory back to the system before the context encoder's
    grid-sized buffers are allocated (glibc only; elsewhere nothing happens).

    glibc keeps freed blocks below its mmap threshold (up to 32 MiB) in the heap for reuse, still counted in
    the process, where they would add to the context encoder's peak (docs/gigapixel.md, "Memory knobs").
    """
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@torch.inference_mode()
def predict_streaming(model, image, **options) -> torch.Tensor:
    """A whole-image head's outputs (`ContextHead`: classification logits `(1, num_labels)`) for one large image
    read region by region; `options` as `encode_context_streaming`'s (with `shard_regions`, `None` on ranks but 0)."""
    require_head(model, ContextHead, "Whole-image prediction")
    output, _ = encode_context_streaming(model, image, **options)
    return None if output is None else model.logits_from_context(output)


@torch.inference_mode()
def decode_streaming(
    model,
    image,
    *,
    processor=None,
    region_batch_size: int | None = None,
    num_workers: int = 0,
    progress: bool = False,
    spill_directory: str | os.PathLike | None = None,
) -> Iterator[tuple[RegionIndex, torch.Tensor]]:
    """A per-region head's outputs (`RegionHead.decode_regions`) for every region of one large image, in row-major
    region order, each with its place: pass one encodes the context, pass two re-encodes the regions a chunk at
    a time and decodes each with its own context tokens (viewed in place, never copied into a grid)."""
    require_head(model, RegionHead, "Region-by-region decoding")
    reader = region_reader_for(model, image, processor)
    options = dict(region_batch_size=region_batch_size, num_workers=num_workers, progress=progress)
    encoded, grid_shape = encode_context_streaming(model, reader.source, processor=processor,
                                                   spill_directory=spill_directory, **options)
    xt = model.base_model
    tokens = encoded.last_hidden_state if xt.context_encoder is not None else None
    token_rows = grid_shape[0] // reader.rows
    # (rows, h, cols, w, D): each region's context tokens, a view of the sequence.
    region_tokens = None if tokens is None else tokens[0].view(
        reader.rows, token_rows, reader.cols, grid_shape[1] // reader.cols, tokens.shape[-1])
    feed = region_feed(model, reader, description="decoded", **options)
    for index, feature_maps in xt.region_encoder.encode_batches(feed):
        context = None
        if region_tokens is not None:
            context = region_tokens[index.row, :, index.col].permute(0, 3, 1, 2).contiguous()
            first, last = int(index.row.min()), int(index.row.max()) + 1
            release_pages(tokens[:, first * token_rows * grid_shape[1] : last * token_rows * grid_shape[1]])
        yield index, model.decode_regions(list(feature_maps), context)


@torch.inference_mode()
def detect_streaming(
    model,
    image,
    *,
    threshold: float | None = None,
    processor=None,
    region_batch_size: int | None = None,
    num_workers: int = 0,
    progress: bool = False,
    spill_directory: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """Whole-scene object detection of one large image: `{"scores", "labels", "boxes"}`, boxes absolute x1, y1,
    x2, y2 in the image's pixels.

    Each region's dense maps (`decode_streaming`) give that region's detections at once (`detect_regions`, or
    `detections_from_dense_maps` with `threshold` instead of the config's), and only those small lists are kept;
    at the end they are merged across region borders (`merge_detections`: class-wise NMS), the same pieces in
    the same order as the in-memory forward, so an image that fits gives the same detections either way.
    """
    if not hasattr(model, "detect_regions"):
        raise ValueError(f"Detection needs an object detector (XTForObjectDetection); {type(model).__name__} is not one.")
    if threshold is None:
        detect = model.detect_regions
    else:
        detect = partial(detections_from_dense_maps, stride=model.config.decoder_output_stride, threshold=threshold,
                         max_detections=model.config.detection_max_detections)
    reader = region_reader_for(model, image, processor)
    region = model.config.region_size
    found, origins = [], []
    for index, maps in decode_streaming(model, reader.source, processor=processor, region_batch_size=region_batch_size,
                                        num_workers=num_workers, progress=progress, spill_directory=spill_directory):
        found += detect(maps)
        origins += [(col * region, row * region) for row, col in zip(index.row.tolist(), index.col.tolist())]
    return model.merge_detections(found, origins, (reader.source.height, reader.source.width))


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
    """Whole-scene segmentation of a large image into a class map on disk: returns the map's `(height, width)`.

    The argmax of every region's logits (`decode_streaming`) goes straight into `output`: a `.zarr` directory
    or a tiled `.tif`, uint8 (uint16 beyond 256 classes), at `1 / decoder_output_stride` of the input
    resolution. The output is checked before any work; an existing one is refused unless `overwrite`.
    """
    require_head(model, RegionHead, "Segmentation")
    output = check_output_path(output, suffixes=CLASS_MAP_SUFFIXES, overwrite=overwrite)
    stride = model.config.decoder_output_stride
    side = model.config.region_size // stride
    if output.suffix.lower() != ".zarr" and side % 16:
        raise ValueError(f"Tiled TIFF tiles must be multiples of 16 px; region_size / stride is {side}: use .zarr.")
    reader = region_reader_for(model, image, processor)
    shape = region_grid_shape(reader.source.height, reader.source.width, stride)
    dtype = np.uint8 if model.config.num_labels <= 256 else np.uint16
    regions = decode_streaming(model, reader.source, processor=processor, region_batch_size=region_batch_size,
                               num_workers=num_workers, progress=progress, spill_directory=spill_directory)
    tiles = (
        (row, col, mask)
        for index, logits in regions
        for row, col, mask in zip(index.row.tolist(), index.col.tolist(),
                                  logits.argmax(dim=1).cpu().numpy().astype(dtype))
    )
    write_class_map(output, tiles, shape=shape, tile_side=side, dtype=dtype)
    return shape


__all__ = [
    "RegionSource",
    "decode_streaming",
    "detect_streaming",
    "encode_context_streaming",
    "encode_regions_streaming",
    "predict_streaming",
    "region_feed",
    "region_reader_for",
    "segment_streaming",
]
