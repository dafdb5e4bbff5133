"""The whole-scene driver: xT on an image read region by region from disk.

Pass one feeds the model's own region loop (`XTRegionEncoder.encode_batches`) from a lazy source and embeds
each chunk of regions into the context encoder's token sequence as it arrives, so neither the image nor the
stitched region features ever exist in memory; the context encoder then updates the tokens in place
(`context.encode_in_place`), optionally spilled to disk. One driver (`run_scene`) then hands the encoding to
a task (`heads.py`): a whole-image head answers from it at once; a per-region head reads pass two, which
re-encodes the regions and decodes each with its slice of the context tokens (`decode_region_batches`, the
models' own per-region loop).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..modeling_xt import XTModelOutput
from ..nested_tokenization import RegionIndex, decode_region_batches, new_stitched_grids, stitch_regions
from ..region_encoder import RegionBatch
from .context import encode_in_place, new_token_buffer
from .heads import ClassifyScene, DecodeRegions, DetectObjects, SceneTask, SegmentScene, require_head
from .sources import RegionReader, RegionSource, open_region_source
from .spill import InMemory, token_storage


def region_reader_for(model, image, processor=None) -> RegionReader:
    """A reader of `image` (a `RegionSource` or anything `open_region_source` reads) that normalises exactly as
    the model's image processor (ImageNet statistics by default), checked against the model's channels."""
    if isinstance(image, RegionReader):
        return image
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
    return _encode_context(model, region_reader_for(model, image, processor), token_storage(spill_directory),
                           region_batch_size=region_batch_size, num_workers=num_workers, progress=progress,
                           shard_regions=shard_regions)


def _encode_context(model, reader: RegionReader, storage: InMemory, *, shard_regions: bool = False, **options
                    ) -> tuple[XTModelOutput | None, tuple[int, int]]:
    """`encode_context_streaming` of the image `reader` reads, its token buffers in `storage`; `options` those of
    `region_feed`."""
    xt = model.base_model
    if xt.context_encoder is None:
        (grid,) = encode_regions_streaming(model, reader, last_stage_only=True, **options)
        return xt.encode_context([grid]), tuple(grid.shape[-2:])
    if shard_regions:
        return _encode_context_across_processes(model, reader, storage=storage, **options)
    feed = region_feed(model, reader, **options)
    encoder, tokens = xt.context_encoder, None
    for flat, embedded, grid_shape in _embedded_regions(model, reader, feed):
        if tokens is None:
            tokens = new_token_buffer(encoder, 1, grid_shape[0] * grid_shape[1], device=embedded.device,
                                      storage=storage)
            grid_tokens = encoder.split_cls(tokens)[0]
        grid_tokens[:, flat] = embedded
        storage.release(grid_tokens[:, flat.min() : flat.max() + 1])
    del embedded
    _return_freed_memory()
    return xt.output_from_encoding(encode_in_place(encoder, tokens, storage)), grid_shape


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
                                     storage):
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
    tokens = new_token_buffer(encoder, 1, grid_shape[0] * grid_shape[1], device=device, storage=storage)
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
            storage.release(grid_tokens[:, int(positions.min()) : int(positions.max()) + 1])
    _return_freed_memory()
    return model.base_model.output_from_encoding(encode_in_place(encoder, tokens, storage)), grid_shape


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
def run_scene(
    model,
    image,
    task: SceneTask,
    *,
    processor=None,
    region_batch_size: int | None = None,
    num_workers: int = 0,
    progress: bool = False,
    spill_directory: str | os.PathLike | None = None,
    shard_regions: bool = False,
):
    """`task`'s answer for one large image read region by region (`heads.py`): the model checked for the head the
    task needs, the image's reader and the token storage made once, the context encoded once (pass one), then the
    task given the encoding and every region's head outputs, which a second pass computes as the task reads them
    (`_decoded_regions`). With `shard_regions` (torch.distributed), ranks other than 0 get None."""
    require_head(model, task.needs, task.name)
    reader = region_reader_for(model, image, processor)
    storage = token_storage(spill_directory)
    options = {"region_batch_size": region_batch_size, "num_workers": num_workers, "progress": progress}
    encoded, grid_shape = _encode_context(model, reader, storage, shard_regions=shard_regions, **options)
    if encoded is None:
        return None
    regions = _decoded_regions(model, reader, storage, encoded, grid_shape, **options)
    return task.answer(model, encoded, regions, (reader.source.height, reader.source.width))


def _decoded_regions(model, reader: RegionReader, storage: InMemory, encoded: XTModelOutput,
                     grid_shape: tuple[int, int], **options) -> Iterator[tuple[RegionIndex, torch.Tensor]]:
    """Pass two: the regions re-encoded a chunk at a time and decoded (`decode_region_batches`) with their own
    context tokens, cut from a view of the token sequence (never copied into a grid), whose pages are released
    once the regions are decoded."""
    tokens = encoded.last_hidden_state
    row_tokens = grid_shape[0] // reader.rows * grid_shape[1]  # tokens of one row of regions
    feed = region_feed(model, reader, description="decoded", **options)
    batches = model.base_model.region_encoder.encode_batches(feed)
    for index, outputs in decode_region_batches(model.decode_regions, batches, model.context_grid(tokens, grid_shape)):
        storage.release(tokens[:, int(index.row.min()) * row_tokens : (int(index.row.max()) + 1) * row_tokens])
        yield index, outputs


def predict_streaming(model, image, **options) -> torch.Tensor | None:
    """A whole-image head's outputs (`ContextHead`: classification logits `(1, num_labels)`) for one large image
    read region by region; `options` as `run_scene`'s (with `shard_regions`, `None` on ranks but 0)."""
    return run_scene(model, image, ClassifyScene(), **options)


@torch.inference_mode()
def decode_streaming(model, image, **options) -> Iterator[tuple[RegionIndex, torch.Tensor]]:
    """A per-region head's outputs (`RegionHead.decode_regions`) for every region of one large image, in row-major
    region order, each with its place; `options` as `run_scene`'s."""
    yield from run_scene(model, image, DecodeRegions(), **options)


def detect_streaming(model, image, *, threshold: float | None = None, **options) -> dict[str, torch.Tensor]:
    """Whole-scene object detection of one large image (`DetectObjects`): `{"scores", "labels", "boxes"}`, boxes
    absolute x1, y1, x2, y2 in the image's pixels, from the same per-region pieces in the same order as the
    in-memory forward, so an image that fits gives the same detections either way. `options` as `run_scene`'s."""
    return run_scene(model, image, DetectObjects(threshold), **options)


def segment_streaming(model, image, output, *, overwrite: bool = False, **options) -> tuple[int, int]:
    """Whole-scene segmentation of a large image into a class map on disk (`SegmentScene`: a `.zarr` directory or
    a tiled `.tif`, checked before any work, an existing one refused unless `overwrite`): returns the map's
    `(height, width)`. `options` as `run_scene`'s."""
    return run_scene(model, image, SegmentScene(model, output, overwrite=overwrite), **options)


__all__ = [
    "RegionSource",
    "decode_streaming",
    "detect_streaming",
    "encode_context_streaming",
    "encode_regions_streaming",
    "predict_streaming",
    "region_feed",
    "region_reader_for",
    "run_scene",
    "segment_streaming",
]
