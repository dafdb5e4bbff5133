"""The `xt-hf train` command (also `python -m xt_hf.training`, `accelerate launch -m xt_hf.training`); `xt-hf`
hands it everything after the word `train`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .arguments import config_from_arguments, train_argument_parser
from .loop import train

DESCRIPTION = "Fine-tune an xT classifier or segmenter with 🤗 Accelerate: one script from a laptop CPU to many GPUs."
EPILOG = ("Settings come from the --config file, then flags, then --set; later sources win. "
          "docs/fine-tuning.md describes every setting.")


def run(arguments: argparse.Namespace) -> dict[str, float]:
    return train(config_from_arguments(arguments))


def main(argv: Sequence[str] | None = None, prog: str = "python -m xt_hf.training") -> dict[str, float]:
    parser = train_argument_parser(prog=prog, description=DESCRIPTION, epilog=EPILOG)
    return run(parser.parse_args(argv))


__all__ = ["main", "run"]
