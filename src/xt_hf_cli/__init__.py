"""The `xt-hf` command line (also `python -m xt_hf_cli`). Each command lives in its own module.

    xt-hf demo                    the packaged demo model on a generated large image
    xt-hf predict IMAGE --model   classify any supported large-image source, streaming its regions
    xt-hf segment IMAGE --model   whole-scene segmentation straight to zarr or tiled TIFF
    xt-hf detect IMAGE --model    whole-scene object detection into GeoJSON, JSON or CSV
    xt-hf stats SCENE...          per-band mean and std of scenes, for the image processor
    xt-hf app --model M           a page in the browser for any xT model (Gradio)
    xt-hf train --config FILE     fine-tune with Accelerate

A package of its own, beside `xt_hf`: importing anything inside `xt_hf` imports torch and registers the
models (seconds), while help and argument errors should answer at once. So the parsers of the inference commands
are built here from the standard library alone, and a command imports `xt_hf` only when it runs. `train` is the
exception: its flags are the training settings' dataclasses in `xt_hf.training.arguments`, so its help imports them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules providing `add_parser(subparsers)`, which registers a command whose `run(arguments)` does the work.
COMMAND_MODULES = ("demo", "predict", "segment", "detect", "embed", "app", "stats")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        # Its flags come from the training settings (HfArgumentParser over their dataclass), which parse
        # everything after the word itself, help included.
        importlib.import_module(f"{__name__}.train").main(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="xt-hf", description="xT for very large images.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").add_parser(commands)
    commands.add_parser("train", help="fine-tune an xT classifier, segmenter or detector with Accelerate (xt-hf train --help)")
    arguments = parser.parse_args(argv)
    arguments.run(arguments)

