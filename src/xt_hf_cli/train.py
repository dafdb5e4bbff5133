"""`xt-hf train --config FILE ...`: fine-tune with Accelerate (`xt_hf.training.command`).

Unlike the other commands, its parser is not built here: its flags are the training settings' dataclasses, which
live in `xt_hf.training.arguments`. Importing them imports the `xt_hf` package, whose `__init__` registers the
models with the transformers Auto classes, and so imports torch: `xt-hf train --help` takes seconds, not a
fraction of one. (Registration cannot wait: `import xt_hf` alone must make `AutoModel.from_pretrained` read an xT
folder, and transformers' registration API itself imports torch.)
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str], prog: str = "xt-hf train") -> dict[str, float]:
    """Parse `argv` (help and usage errors exit here, status 0 and 2), then train."""
    from xt_hf.training.command import main as train

    return train(argv, prog=prog)
