"""What `save_pretrained` ships as remote code is the model's math only (read before `trust_remote_code=True`)."""

from __future__ import annotations

import ast
import sys

from conftest import tiny_config

from xt_hf import XTForImageClassification, XTForObjectDetection, XTForSemanticSegmentation, XTImageProcessor

ALLOWED_TOP_LEVEL = {"torch", "transformers", "huggingface_hub", "numpy", "PIL", "torchvision", "mamba_ssm",
                     "causal_conv1d"}
# Standard-library modules that reach files, memory maps, processes or foreign code.
FORBIDDEN = {"mmap", "ctypes", "os", "shutil", "tempfile", "subprocess", "pathlib", "weakref", "socket", "pickle"}
# The image processor copies the module of its other backend beside itself on save_pretrained, as transformers
# copies remote code: its only file access.
EXCEPTIONS = {"image_processing_common_xt.py": {"shutil", "pathlib"}}


def imported_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_saved_models_ship_only_the_model_files_with_harmless_imports(tmp_path):
    for model in (XTForImageClassification(tiny_config()), XTForSemanticSegmentation(tiny_config()),
                  XTForObjectDetection(tiny_config(classifier="pool"))):
        model.save_pretrained(tmp_path)
    XTImageProcessor(region_size=32).save_pretrained(tmp_path)
    shipped = {path.name: path for path in tmp_path.glob("*.py")}
    assert {"modeling_xt.py", "configuration_xt.py", "detection_head.py"} <= set(shipped)
    assert not {"spill.py", "sources.py", "scene.py", "streaming.py", "attention.py", "context.py"} & set(shipped)
    for name, path in shipped.items():
        for module in imported_modules(path):
            if module.startswith("."):
                assert f"{module.lstrip('.')}.py" in shipped, f"{name} imports {module}, which is not shipped"
                continue
            top = module.split(".")[0]
            assert top not in FORBIDDEN - EXCEPTIONS.get(name, set()), f"{name} imports {module}"
            assert top in ALLOWED_TOP_LEVEL or top in sys.stdlib_module_names or top == "__future__", (
                f"{name} imports {module}")
