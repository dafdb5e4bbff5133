"""`xt-hf predict IMAGE --model PATH_OR_HUB_ID`: classify a large image read region by region."""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

from .common import (
    add_streaming_arguments,
    check_spill_directory,
    fail,
    load_for_inference,
    positive_int,
    resolve_device,
    with_rescale_factor,
)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="classify a large image, streaming its regions from disk")
    parser.add_argument("image", help="TIFF/BigTIFF, .npy, zarr, whole-slide image, PNG/JPEG")
    parser.add_argument("--model", required=True, help="local folder or Hub id of an xT classifier")
    add_streaming_arguments(parser)
    parser.add_argument("--top-k", type=positive_int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForImageClassification

    from xt_hf.engine import open_region_source, predict_streaming
    from xt_hf.nested_tokenization import region_grid_shape

    check_spill_directory(arguments.spill_dir)
    device = resolve_device(arguments.device)
    model, processor = load_for_inference(AutoModelForImageClassification, arguments.model, device,
                                          getattr(torch, arguments.dtype), task="xt-hf predict")
    processor = with_rescale_factor(processor, model, arguments.rescale_factor)
    try:
        source = open_region_source(arguments.image, model.config.region_size)
    except ValueError as error:
        fail(str(error))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        logits = predict_streaming(model, source, processor=processor, region_batch_size=arguments.region_batch_size,
                                   num_workers=arguments.num_workers, progress=not arguments.json,
                                   spill_directory=arguments.spill_dir)
    except ValueError as error:
        fail(str(error))
    seconds = time.perf_counter() - start
    probabilities = logits.float().softmax(-1)[0]
    top = probabilities.topk(min(arguments.top_k, probabilities.numel()))
    region = model.config.region_size
    regions = math.prod(region_grid_shape(source.height, source.width, region))
    peak_mb = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    result = {
        "image": str(arguments.image),
        "size": [source.height, source.width],
        "regions": regions,
        "predictions": [{"label": model.config.id2label[int(i)], "score": float(p)}
                        for p, i in zip(top.values, top.indices)],
        "seconds": seconds,
        "regions_per_second": regions / seconds,
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": "cuda_allocated" if device.type == "cuda" else "process_rss",
        "spill_directory": arguments.spill_dir,
    }
    if arguments.json:
        print(json.dumps(result))
        return
    print(f"{arguments.image}: {source.width}×{source.height} px, {regions} regions of {region} px")
    for prediction in result["predictions"]:
        print(f"  {prediction['score']:.4f}  {prediction['label']}")
    print(f"{seconds:.2f} s, {result['regions_per_second']:.1f} regions/s, peak memory {peak_mb:.0f} MB "
          f"({'GPU allocated' if device.type == 'cuda' else 'process RSS'})")
