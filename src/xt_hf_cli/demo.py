"""`xt-hf demo`: the packaged demo model predicts where the red markers lie relative to the blue ones.

The model (`xt_hf/demo_model/`, safetensors) is a small xT trained with `xt-hf train` on the synthetic
relation task of `xt_hf.synthetic.relations`, a task whose answer needs context across regions (docs/fine-tuning.md
reports it against the same backbone with a pooling head). By default it predicts a freshly generated
held-out image, whose true label is known; `--image` predicts a file instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import time
from pathlib import Path

from .common import fail, non_negative_int, positive_int

# Found without importing xt_hf (and torch), so that `xt-hf demo --help` answers at once.
DEMO_MODEL = Path(importlib.util.find_spec("xt_hf").submodule_search_locations[0]) / "demo_model"
# Samples the demo model never saw: its training, model selection and scoring used "train", "validation", "test".
DEMO_SPLIT = "demo"


def load_demo_model():
    """The packaged demo classifier and its image processor, loaded offline like any saved model."""
    import torch
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as transformers_logging

    from .common import load_for_inference

    if not (DEMO_MODEL / "model.safetensors").is_file():
        raise FileNotFoundError(f"The demo model is missing from the installed package ({DEMO_MODEL}); "
                                "reinstall xt-hf.")
    transformers_logging.disable_progress_bar()  # a 1.5 MB file needs no loading bar in the demo's output
    return load_for_inference(AutoModelForImageClassification, str(DEMO_MODEL), torch.device("cpu"), torch.float32,
                              task="xt-hf demo")


def add_parser(subparsers) -> None:
    """Register `xt-hf demo`."""
    parser = subparsers.add_parser(
        "demo", help="predict a generated large image with the packaged, trained demo xT",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--image", help="predict this image file instead of a generated one")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="which held-out sample to generate (default 0)")
    parser.add_argument("--size", type=positive_int, default=1024,
                        help="side of the generated image in px (trained on 1024; at least one region)")
    parser.add_argument("--region-batch-size", type=positive_int, metavar="N",
                        help="regions encoded at a time (default: the demo model's config.region_batch_size)")
    parser.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> dict:
    import torch

    from xt_hf.synthetic.relations import generate_sample, sample_rng

    model, processor = load_demo_model()
    if not arguments.image and arguments.size < model.config.region_size:
        fail(f"--size {arguments.size}: the demo image must be at least one region ({model.config.region_size} px)")
    if arguments.region_batch_size is not None:
        model.config.region_batch_size = arguments.region_batch_size
    if arguments.image:
        from PIL import Image

        image, truth = Image.open(arguments.image).convert("RGB"), None
        source = arguments.image
    else:
        sample = generate_sample(sample_rng(0, DEMO_SPLIT, arguments.seed), image_size=arguments.size,
                                 region_size=model.config.region_size)
        image, truth = sample.image, sample.label_name
        source = f"generated held-out sample {arguments.seed}"

    start = time.perf_counter()
    inputs = processor(image, return_tensors="pt")
    with torch.inference_mode():
        probabilities = model(**inputs).logits.float().softmax(-1)[0]
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

    height, width = inputs["pixel_values"].shape[-2:]
    region = model.config.region_size
    label = model.config.id2label[int(probabilities.argmax())]
    print(f"image: {source}, {width}×{height} px → {height // region}×{width // region} regions of {region} px")
    print(f"model: {DEMO_MODEL.name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters), "
          "red markers relative to blue ones")
    print(f"prediction: {label} ({probabilities.max():.3f})" + (f"   true label: {truth}" if truth else ""))
    print(f"time: {seconds:.2f} s   peak memory (process RSS): {peak_mb:.0f} MB")
    return {"label": label, "truth": truth, "seconds": seconds, "peak_mb": peak_mb}


__all__ = ["DEMO_MODEL", "add_parser", "load_demo_model", "run"]
