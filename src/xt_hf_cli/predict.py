"""`xt-hf predict IMAGE --model PATH_OR_HUB_ID [--preview scene.png]`: classify a large image read region by region.

`xt-hf predict IMAGES... --model M --output results.parquet` (or `.jsonl`): many inputs, one row each (top-k
labels and scores, seconds, error), resumable, shared between processes under `accelerate launch`."""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

from .common import (
    TABLE_SUFFIXES,
    add_inputs_argument,
    add_overwrite_argument,
    add_preview_arguments,
    add_streaming_arguments,
    check_preview_output,
    fail,
    is_table,
    load_streaming_model,
    open_input,
    positive_int,
    run_many,
    scene_options,
)

COLUMNS = {"path": "string", "labels": "list<string>", "scores": "list<float64>", "seconds": "float64",
           "error": "string"}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("predict", help="classify a large image, streaming its regions from disk")
    add_inputs_argument(parser)
    parser.add_argument("--model", required=True, help="local folder or Hub id of an xT classifier")
    parser.add_argument("--output", help="results table for many inputs: .parquet or .jsonl (one row per input; "
                        "a rerun skips the inputs already done)")
    add_streaming_arguments(parser)
    parser.add_argument("--top-k", type=positive_int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--shard-regions", action="store_true",
                        help="one image under torchrun / accelerate launch: the processes share its regions, rank 0 "
                             "runs the context encoder and prints")
    add_preview_arguments(parser, "its grid of regions and the top labels")
    add_overwrite_argument(parser)
    parser.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> None:
    if arguments.output is not None and not is_table(arguments.output):
        fail(f"--output {arguments.output}: a results table is {' or '.join(TABLE_SUFFIXES)}")
    if is_table(arguments.output):
        if arguments.preview is not None:
            fail("--preview draws one scene: leave it out with a results table, or predict that scene alone")
        run_many(arguments, command="predict", auto_class=_classifier_class(), columns=COLUMNS,
                 signature={"top_k": arguments.top_k}, make_work=lambda model, processor, images: _work(
                     arguments, model, processor))
        return
    if len(arguments.images) > 1:
        fail(f"{len(arguments.images)} inputs: several inputs need --output results.parquet (or .jsonl)")
    arguments.image = arguments.images[0]
    run_one(arguments)


def _classifier_class():
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification


def _work(arguments: argparse.Namespace, model, processor):
    from xt_hf.engine import predict_streaming

    def work(image: str) -> dict:
        logits = predict_streaming(model, image, scene_options(arguments, processor, progress=False))
        probabilities = logits.float().softmax(-1)[0]
        top = probabilities.topk(min(arguments.top_k, probabilities.numel()))
        return {"labels": [model.config.id2label[int(i)] for i in top.indices],
                "scores": [float(p) for p in top.values]}

    return work


def run_one(arguments: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForImageClassification

    from xt_hf.engine import predict_streaming
    from xt_hf.nested_tokenization import region_grid_shape

    preview = check_preview_output(arguments)
    source = open_input(arguments.image, bands=getattr(arguments, "bands", None))
    state = None
    if arguments.shard_regions:
        from xt_hf.engine.batch import distributed_state

        state = distributed_state(cpu=arguments.device == "cpu")
        if state is None:
            fail("--shard-regions shares one image between processes: launch with torchrun or accelerate launch")
    model, processor, device = load_streaming_model(arguments, AutoModelForImageClassification, task="xt-hf predict",
                                                    state=state)
    source = open_input(source, model.config.region_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    try:
        logits = predict_streaming(model, source, scene_options(arguments, processor, progress=not arguments.json))
    except ValueError as error:
        fail(str(error))
    if logits is None:  # a rank other than 0 of --shard-regions: its regions went to rank 0
        return
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
    if preview is not None:
        from xt_hf.engine.preview import preview_prediction

        preview_prediction(source, region_size=region, output=preview, max_side=arguments.preview_size,
                           predictions=[(p["label"], p["score"]) for p in result["predictions"]])
        result["preview"] = str(preview)
    if arguments.json:
        print(json.dumps(result))
        return
    print(f"{arguments.image}: {source.width}×{source.height} px, {regions} regions of {region} px")
    for prediction in result["predictions"]:
        print(f"  {prediction['score']:.4f}  {prediction['label']}")
    print(f"{seconds:.2f} s, {result['regions_per_second']:.1f} regions/s, peak memory {peak_mb:.0f} MB "
          f"({'GPU allocated' if device.type == 'cuda' else 'process RSS'})")
