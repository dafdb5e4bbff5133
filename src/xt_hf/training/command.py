"""The `xt-hf train` command (also `python -m xt_hf.training`, `accelerate launch -m xt_hf.training`); `xt-hf`
hands it everything after the word `train`. Its parser is `arguments.train_command_parser`; the training loop, and
torch with it, is imported only when a run starts."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from .arguments import config_from_arguments, train_command_parser


def train(config) -> dict[str, float]:
    """`loop.train`, imported here rather than at the top: help and argument errors need no torch."""
    from .loop import train as train_loop

    return train_loop(config)


def run(arguments: argparse.Namespace) -> dict[str, float]:
    return train(config_from_arguments(arguments))


def main(argv: Sequence[str] | None = None, prog: str = "python -m xt_hf.training") -> dict[str, float]:
    return run(train_command_parser(prog=prog).parse_args(argv))


__all__ = ["main", "run"]
