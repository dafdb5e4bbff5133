"""`xt-hf train --config FILE ...`: fine-tune with Accelerate. Help and argument errors are answered from the
training settings alone (`xt_hf/training/arguments.py`: the standard library, yaml and transformers' argument
parser); torch is imported only when a run starts (`xt_hf.training.command.run`).

That settings module is loaded from its file, under a name of its own, rather than imported: importing anything
inside `xt_hf` first runs `xt_hf/__init__.py`, which imports torch and registers the models (seconds, and over
half a minute on a busy machine, for a `--help`). A process that has already imported it uses that module.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

SETTINGS_MODULE = "xt_hf.training.arguments"


def settings_module():
    """`xt_hf.training.arguments`, without importing the `xt_hf` package."""
    if SETTINGS_MODULE in sys.modules:
        return sys.modules[SETTINGS_MODULE]
    name = f"{__name__}._settings"
    if name not in sys.modules:
        package = importlib.util.find_spec("xt_hf")  # finds the package's folder without running its __init__
        path = Path(package.origin).parent / "training" / "arguments.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # `dataclass` and `get_type_hints` look the module up while it runs
        spec.loader.exec_module(module)
    return sys.modules[name]


def main(argv: Sequence[str], prog: str = "xt-hf train") -> dict[str, float]:
    """Parse `argv` (help and usage errors exit here, status 0 and 2), then train."""
    arguments = settings_module().train_command_parser(prog=prog).parse_args(argv)
    return importlib.import_module("xt_hf.training.command").run(arguments)
