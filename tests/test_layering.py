"""Calls go one way (docs/architecture.md): the command line above the library, training above the synthetic
tasks, the model files below everything. Checked on the source text, so that an import inside a function,
which runs only sometimes, counts as much as one at the top of a file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
MODEL_FILES = sorted(path for path in (SRC / "xt_hf").glob("*.py") if path.name not in ("__init__.py", "__main__.py"))

# Modules that must not import, what they must not import, and why.
RULES = [
    pytest.param(sorted((SRC / "xt_hf").rglob("*.py")), "xt_hf_cli", "the library never depends on its command line",
                 id="library-not-cli"),
    pytest.param(sorted((SRC / "xt_hf" / "synthetic").rglob("*.py")), "xt_hf.training",
                 "the synthetic tasks sit below training: training may use them, not the other way round",
                 id="synthetic-not-training"),
    pytest.param(sorted((SRC / "xt_hf" / "synthetic").rglob("*.py")), "transformers",
                 "the synthetic tasks make data; loading and scoring a saved model is training's job "
                 "(xt_hf.training.score)", id="synthetic-loads-no-model"),
    pytest.param(sorted((SRC / "xt_hf").rglob("*.py")), "xt_hf_app", "the library never depends on the app above it",
                 id="library-not-app"),
    pytest.param(sorted((SRC / "xt_hf_app").rglob("*.py")), "xt_hf_cli",
                 "the app sits beside the command line: `xt-hf app` starts the app, the app never calls the commands",
                 id="app-not-cli"),
    pytest.param(sorted(path for path in (SRC / "xt_hf_app").rglob("*.py") if path.name != "ui.py"), "gradio",
                 "Gradio is an extra: only the page (xt_hf_app/ui.py) imports it, so the rest runs and is tested "
                 "without it", id="app-gradio-only-in-ui"),
    pytest.param(MODEL_FILES, "xt_hf.engine", "the model says what, the engine when and where", id="model-not-engine"),
    pytest.param(MODEL_FILES, "xt_hf.training", "the model files ship to the Hub without the training code",
                 id="model-not-training"),
    pytest.param(MODEL_FILES, "xt_hf.synthetic", "the model files ship to the Hub without the synthetic tasks",
                 id="model-not-synthetic"),
]


def module_name(path: Path, root: Path = SRC) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, root: Path = SRC) -> set[str]:
    """Every module `path` (under `root`) may import, relative imports resolved: for `from a import b`, both `a`
    and `a.b` (`b` may be a submodule)."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def reaches(name: str, forbidden: str) -> bool:
    return name == forbidden or name.startswith(forbidden + ".")


@pytest.mark.parametrize("importers, forbidden, why", RULES)
def test_no_module_imports_a_layer_above_it(importers, forbidden, why):
    assert importers, "no source files found"
    offenders = {f"{path.relative_to(SRC)} imports {name}" for path in importers
                 for name in imported_names(path) if reaches(name, forbidden)}
    assert not offenders, f"{why}: " + "; ".join(sorted(offenders))


def test_relative_imports_are_resolved(tmp_path):
    """The check sees `from .. import training` in xt_hf/synthetic as an import of xt_hf.training."""
    package = tmp_path / "xt_hf" / "synthetic"
    package.mkdir(parents=True)
    module = package / "example.py"
    module.write_text("def f():\n    from .. import training\n    from ..training.loop import train\n"
                      "    import xt_hf_cli.common\n")
    assert {"xt_hf.training", "xt_hf.training.loop", "xt_hf_cli.common"} <= imported_names(module, tmp_path)
