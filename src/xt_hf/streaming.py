"""Run xT on images read region by region from disk: only the stitched token grid stays in memory."""

from __future__ import annotations

import torch

from .nested_tokenization import as_region_grid
from .region_sources import RegionReader, RegionSource, open_region_source


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
) -> list[torch.Tensor]:
    """Stitched `(1, C_s, rows·h_s, cols·w_s)` maps of every `out_features` stage for one large image.

    `image` is anything `open_region_source` reads (array, memmap, zarr, TIFF, slide, path). Regions are
    read `region_batch_size` at a time (background workers with `num_workers > 0`), encoded, and written
    into preallocated grids; nothing else of the image stays in memory.
    """
    xt = model.base_model
    source = image if hasattr(image, "read") else open_region_source(image, model.config.region_size)
    reader = region_reader_for(model, source, processor)
    expected = model.config.backbone_config.num_channels
    if source.channels != expected:
        raise ValueError(f"The image has {source.channels} channels but the region encoder expects {expected}.")
    parameter = next(model.parameters())
    batch_size = region_batch_size or model.config.region_batch_size or 16
    batches = reader.batches(batch_size, num_workers)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=len(batches), unit="batch", desc=f"{len(reader)} regions")
    stitched = None
    for regions, rows, cols in batches:
        regions = regions.to(parameter.device, parameter.dtype)
        feature_maps = xt.region_encoder._feature_maps(regions)
        if stitched is None:
            stitched = [f.new_empty(1, f.shape[1], reader.rows * f.shape[2], reader.cols * f.shape[3]) for f in feature_maps]
        image_index = torch.zeros_like(rows)
        for grid, features in zip(stitched, feature_maps):
            as_region_grid(grid, features.shape[2], features.shape[3])[image_index, rows, cols] = features
    return stitched


@torch.inference_mode()
def predict_streaming(model, image, **kwargs) -> torch.Tensor:
    """Classification logits `(1, num_labels)` of one large image read region by region."""
    maps = encode_regions_streaming(model, image, **kwargs)
    pooled = model.base_model.encode_context(maps).pooler_output
    return model.classifier(pooled)
