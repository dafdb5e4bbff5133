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
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..modeling_xt import XTModelOutput
from ..nested_tokenization import RegionIndex, decode_region_batches, stitch_batches
from ..region_encoder import RegionBatch
from .context import encode_in_place, new_token_buffer
from .heads import ClassifyScene, DecodeRegions, DetectObjects, SceneTask, SegmentScene, require_head
from .sources import RegionReader, RegionSource, open_region_source
from .spill import InMemory, token_storage


@dataclass(frozen=True)
class SceneOptions:
    """How the engine runs one scene; none of these changes the outputs. Every engine function takes them as
    keyword arguments (`run_scene(model, image, task, region_batch_size=8)`) and hands this one object on."""

    processor: object = None
    """The model's image processor, whose normalisation the reader applies (None: ImageNet statistics)."""
    region_batch_size: int | None = None
    """Regions encoded at a time; None: the model's saved `config.region_batch_size` (the config class's
    default when that says None, since holding a whole scene is what streaming avoids)."""
    token_chunk_size: int | None = None
    """Tokens the context encoder's per-token layers run at a time, in place; None: the model's saved
    `config.context_token_chunk_size`."""
    num_workers: int = 0
    """Processes that read regions ahead."""
    progress: bool = False
    """A progress bar over the region batches."""
    spill_directory: str | os.PathLike | None = None
    """Keep the token buffers in files there (`spill.Spill`) instead of memory."""
    shard_regions: bool = False
    """Share the region stage between the processes of torch.distributed (rank 0 alone gets the answer)."""

    @classmethod
    def of(cls, options: SceneOptions | None = None, **changes) -> SceneOptions:
        """`options` (or the defaults) with `changes`; an unknown name is a `TypeError` that names it."""
        unknown = sorted(set(changes) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"Unknown engine option(s) {', '.join(unknown)}; the options are "
                            f"{', '.join(field.name for field in dataclasses.fields(cls))}.")
        return dataclasses.replace(options or cls(), **changes)

    def region_batch_size_for(self, model) -> int:
        return self.region_batch_size or model.config.region_batch_size or type(model.config).region_batch_size


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


def region_feed(model, reader: RegionReader, options: SceneOptions | None = None, *, description: str = "regions",
                regions: range | None = None) -> Iterator[RegionBatch]:
    """The lazy feed of the model's region loop: regions read from disk in row-major order (all, or the numbers in
    `regions`), `options.region_batch_size` at a time, on the model's device and dtype."""
    options = options or SceneOptions()
    parameter = next(model.parameters())
    batches = reader.batches(options.region_batch_size_for(model), options.num_workers, regions)
    if options.progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=len(batches), unit="batch", desc=f"{len(reader)} {description}")
    for regions, rows, cols in batches:
        index = RegionIndex(torch.zeros_like(rows), rows, cols, reader.rows, reader.cols).to(parameter.device)
        yield RegionBatch(regions.to(parameter.device, parameter.dtype), index, with_gradient=False)


@torch.inference_mode()
def encode_regions_streaming(model, image, options: SceneOptions | None = None, *, last_stage_only: bool = False,
                             **changes) -> list[torch.Tensor]:
    """Stitched `(1, C_s, rows·h_s, cols·w_s)` maps of every `out_features` stage for one large image
    (only the deepest with `last_stage_only`: the shallow stages of a whole scene can be far larger); how it runs:
    `options` with `changes` (`SceneOptions`)."""
    options = SceneOptions.of(options, **changes)
    return _stitched_stages(model, region_reader_for(model, image, options.processor), options, last_stage_only)


def _stitched_stages(model, reader: RegionReader, options: SceneOptions, last_stage_only: bool) -> list[torch.Tensor]:
    batches = model.base_model.region_encoder.encode_batches(region_feed(model, reader, options))
    if last_stage_only:
        batches = ((index, feature_maps[-1:]) for index, feature_maps in batches)
    return stitch_batches(batches, 1, reader.rows, reader.cols)


@torch.inference_mode()
def encode_context_streaming(model, image, options: SceneOptions | None = None, **changes
                             ) -> tuple[XTModelOutput | None, tuple[int, int]]:
    """`XTModel`'s output for one large image read region by region, and the deepest stage's stitched grid
    size `(H_S, W_S)`; how it runs: `options` with `changes` (`SceneOptions`).

    Memory holds the model, one chunk of regions and the tokens. With `spill_directory` (CPU), the tokens and
    the attention blocks' buffer of heads' outputs live in files there instead, and memory holds chunks
    (`spill.py`); `last_hidden_state` is then a view of that file, deleted when no tensor uses it any more.

    With `shard_regions` (under torch.distributed), the processes share the region stage and rank 0 alone gets
    the output (the others get `None`): see `_encode_context_across_processes`.
    """
    options = SceneOptions.of(options, **changes)
    reader = region_reader_for(model, image, options.processor)
    return _encode_context(model, reader, token_storage(options.spill_directory), options)


def _encode_context(model, reader: RegionReader, storage: InMemory, options: SceneOptions
                    ) -> tuple[XTModelOutput | None, tuple[int, int]]:
    """`encode_context_streaming` of the image `reader` reads, its token buffers in `storage`."""
    xt = model.base_model
    if xt.context_encoder is None:
        (grid,) = _stitched_stages(model, reader, options, last_stage_only=True)
        return xt.encode_context([grid]), tuple(grid.shape[-2:])
    if options.shard_regions:
        return _encode_context_across_processes(model, reader, storage, options)
    feed = region_feed(model, reader, options)
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
    encoding = encode_in_place(encoder, tokens, storage, token_chunk_size=options.token_chunk_size)
    return xt.output_from_encoding(encoding), grid_shape


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


def _encode_context_across_processes(model, reader: RegionReader, storage: InMemory, options: SceneOptions):
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
    feed = region_feed(model, reader, SceneOptions.of(options, progress=options.progress and rank == 0),
                       regions=share)
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
    encoding = encode_in_place(encoder, tokens, storage, token_chunk_size=options.token_chunk_size)
    return model.base_model.output_from_encoding(encoding), grid_shape


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
def run_scene(model, image, task: SceneTask, options: SceneOptions | None = None, **changes):
    """`task`'s answer for one large image read region by region (`heads.py`): the model checked for the head the
    task needs, the image's reader and the token storage made once, the context encoded once (pass one), then the
    task given the encoding, every region's head outputs, which a second pass computes as the task reads them
    (`_decoded_regions`), and the scene's source (its size, georeference and data mask). How it runs: `options` (a
    `SceneOptions`) with `changes`, e.g. `region_batch_size=8`; with `shard_regions` (torch.distributed), ranks other
    than 0 get None."""
    options = SceneOptions.of(options, **changes)
    require_head(model, task.needs, task.name)
    reader = region_reader_for(model, image, options.processor)
    storage = token_storage(options.spill_directory)
    encoded, grid_shape = _encode_context(model, reader, storage, options)
    if encoded is None:
        return None
    regions = _decoded_regions(model, reader, storage, encoded, grid_shape, options)
    return task.answer(model, encoded, regions, reader.source)


def _decoded_regions(model, reader: RegionReader, storage: InMemory, encoded: XTModelOutput,
                     grid_shape: tuple[int, int], options: SceneOptions) -> Iterator[tuple[RegionIndex, torch.Tensor]]:
    """Pass two: the regions re-encoded a chunk at a time and decoded (`decode_region_batches`) with their own
    context tokens, cut from a view of the token sequence (never copied into a grid), whose pages are released
    once the regions are decoded."""
    tokens = encoded.last_hidden_state
    row_tokens = grid_shape[0] // reader.rows * grid_shape[1]  # tokens of one row of regions
    feed = region_feed(model, reader, options, description="decoded")
    batches = model.base_model.region_encoder.encode_batches(feed)
    for index, outputs in decode_region_batches(model.decode_regions, batches, model.context_grid(tokens, grid_shape)):
        storage.release(tokens[:, int(index.row.min()) * row_tokens : (int(index.row.max()) + 1) * row_tokens])
        yield index, outputs


def predict_streaming(model, image, options: SceneOptions | None = None, **changes) -> torch.Tensor | None:
    """A whole-image head's outputs (`ContextHead`: classification logits `(1, num_labels)`) for one large image
    read region by region; `options` and `changes` as `run_scene`'s (with `shard_regions`, `None` on ranks but 0)."""
    return run_scene(model, image, ClassifyScene(), options, **changes)


@torch.inference_mode()
def decode_streaming(model, image, options: SceneOptions | None = None, **changes
                     ) -> Iterator[tuple[RegionIndex, torch.Tensor]]:
    """A per-region head's outputs (`RegionHead.decode_regions`) for every region of one large image, in row-major
    region order, each with its place; `options` and `changes` as `run_scene`'s."""
    yield from run_scene(model, image, DecodeRegions(), options, **changes)


def detect_streaming(model, image, options: SceneOptions | None = None, *, threshold: float | None = None, **changes
                     ) -> dict[str, torch.Tensor]:
    """Whole-scene object detection of one large image (`DetectObjects`): `{"scores", "labels", "boxes"}`, boxes
    absolute x1, y1, x2, y2 in the image's pixels, from the same per-region pieces in the same order as the
    in-memory forward, so an image that fits gives the same detections either way. `options` and `changes` as
    `run_scene`'s."""
    return run_scene(model, image, DetectObjects(threshold), options, **changes)


def segment_streaming(model, image, output, options: SceneOptions | None = None, *, overwrite: bool = False,
                      **changes) -> tuple[int, int]:
    """Whole-scene segmentation of a large image into a class map on disk (`SegmentScene`: a `.zarr` directory or
    a tiled `.tif`, checked before any work, an existing one refused unless `overwrite`): returns the map's
    `(height, width)`. `options` and `changes` as `run_scene`'s."""
    return run_scene(model, image, SegmentScene(model, output, overwrite=overwrite), options, **changes)


__all__ = [
    "RegionSource",
    "SceneOptions",
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
