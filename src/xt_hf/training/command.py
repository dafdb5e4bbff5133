"""The `xt-hf train` command (also `python -m xt_hf.training`, `accelerate launch -m xt_hf.training`); `xt-hf`
hands it everything after the word `train`. Its settings and flags are `arguments.TrainConfig`'s."""

from __future__ import annotations

from collections.abc import Sequence

from .arguments import parse_args, train_argument_parser


def train(config) -> dict[str, float]:
    """`loop.train`, imported here rather than at the top: a settings error answers before the loop's imports."""
    from .loop import train as train_loop

    return train_loop(config)


def main(argv: Sequence[str] | None = None, prog: str = "python -m xt_hf.training") -> dict[str, float]:
    """Parse `argv` (help exits with status 0; a settings error prints the usage and exits with status 2),
    then train."""
    try:
        config = parse_args(argv, prog=prog)
    except ValueError as error:
        train_argument_parser(prog=prog).error(str(error))
    return train(config)


__all__ = ["main", "train"]
