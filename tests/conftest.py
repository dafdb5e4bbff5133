"""Tiny xT configurations shared by the tests (CPU, a few thousand parameters each)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Outputs of the original xT code on tiny seeded models, kept in the repository
# (`conversion/record_original_references.py` made them; MANIFEST.json says how).
ORIGINAL_REFERENCES = REPO_ROOT / "tests" / "data" / "original_xt"
# A larger set made the same way, beside the project where a checkout has `../shared`: an extra, never required.
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "original_xt"

# `conversion/` is a folder of scripts next to the package, importable from the repository root.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

REGION = 32


def tiny_backbone_config(family: str = "swinv2", **overrides) -> dict:
    """A backbone config dict small enough to run many regions per second on one CPU core."""
    if family == "swinv2":
        config = dict(model_type="swinv2", embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4,
                      drop_path_rate=0.0, out_features=["stage1", "stage2"])
    elif family == "hiera":
        config = dict(model_type="hiera", embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                      out_features=["stage4"])
    elif family == "convnext":
        config = dict(model_type="convnext", num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                      out_features=["stage2"])
    else:
        raise ValueError(family)
    config.update(overrides)
    return config


def tiny_config(family: str = "swinv2", **overrides):
    """An `XTConfig` with a tiny backbone and a 2-layer, 32-wide context encoder."""
    from xt_hf import XTConfig

    backbone = overrides.pop("backbone_config", None) or tiny_backbone_config(family)
    arguments = dict(
        region_size=REGION if family != "hiera" else 64,
        backbone_config=backbone,
        context_encoder="attention",
        context_hidden_size=32,
        context_num_heads=2,
        context_num_layers=2,
        classifier="context",
        num_labels=5,
    )
    arguments.update(overrides)
    return XTConfig(**arguments)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process training run gets its own Accelerate state, as a new process would."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def train_script_arguments(dataset, model, output_dir, settings: dict) -> list[str]:
    """Command-line arguments of `xt-hf train` (`xt_hf.training`) for these paths, each setting as its flag (a dict as
    JSON; None as 0, which the step and limit settings read as "off")."""
    arguments = ["--model", str(model), "--dataset", str(dataset), "--output-dir", str(output_dir)]
    for key, value in settings.items():
        value = json.dumps(value) if isinstance(value, dict) else 0 if value is None else value
        arguments += [f"--{key.replace('_', '-')}", str(value)]
    return arguments
