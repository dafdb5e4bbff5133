"""`xt-hf` command line. Each command lives in its own module and registers its parser here.

    xt-hf demo                    the packaged demo model on a generated large image
    xt-hf predict IMAGE --model   classify any supported large-image source, streaming its regions
    xt-hf segment IMAGE --model   whole-scene segmentation straight to zarr or tiled TIFF
    xt-hf train --config FILE     fine-tune with Accelerate
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules providing `add_parser(subparsers)`, which registers a command whose `run(arguments)` does the work.
# Parsers are built without importing torch; a command imports what it needs when it runs.
COMMAND_MODULES = {
    "demo": "xt_hf.cli.demo",
    "predict": "xt_hf.cli.predict",
    "segment": "xt_hf.cli.segment",
    "train": "xt_hf.training.command",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="xt-hf", description="xT for very large images.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMAND_MODULES.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:  # an optional command whose extra is not installed
            commands.add_parser(name, help=f"unavailable: {error}")
            continue
        module.add_parser(commands)
    arguments = parser.parse_args(argv)
    arguments.run(arguments)


if __name__ == "__main__":
    sys.exit(main())
