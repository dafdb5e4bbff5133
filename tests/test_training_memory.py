"""What a training step stores for backward (the counts `benchmarks/training_memory.py` reports), on a tiny xT."""

from __future__ import annotations

import sys

import torch

from conftest import REGION, REPO_ROOT, tiny_config
from xt_hf import XTForImageClassification

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from training_memory import SavedForBackward, table


def saved_for_backward(checkpointing: bool = False, **overrides) -> dict[str, int]:
    torch.manual_seed(0)
    model = XTForImageClassification(tiny_config(region_batch_size=2, **overrides)).train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    counter = SavedForBackward(model)
    counter.watch_context(model.xt.context_encoder)
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda tensor: tensor):
        loss = model(torch.randn(1, 3, 2 * REGION, 2 * REGION), labels=torch.tensor([1])).loss
    loss.backward()
    return counter.bytes


def test_regions_without_gradient_store_nothing_for_backward():
    everything, half = saved_for_backward(), saved_for_backward(grad_ratio=0.5)
    assert 0.4 < half["region"] / everything["region"] < 0.6  # 2 of 4 regions keep their activations
    assert half["context"] == everything["context"]


def test_gradient_checkpointing_stores_only_the_checkpointed_blocks_inputs():
    plain = saved_for_backward()
    checkpointed = saved_for_backward(checkpointing=True)
    assert checkpointed["region"] < 0.25 * plain["region"]
    assert checkpointed["context"] < 0.5 * plain["context"]


def test_table_compares_xt_with_the_original_of_the_same_setting():
    common = {"dtype": "fp32", "size": 1024, "saved_region_gb": 1.0, "saved_context_gb": 0.1}
    results = [
        dict(common, kind="xt", setting="grad_ratio", peak_growth_gb=1.6, step_s=10.0),
        dict(common, kind="original", setting="grad_ratio", peak_growth_gb=3.2, step_s=40.0),
        dict(common, kind="baseline", setting="-", error="over 20 GB", fits=False),
    ]
    lines = table(results).splitlines()
    assert lines[2].endswith("| 0.50 | 0.25 |") and "| 100 |" in lines[2]  # 1.6 GB / 16 regions
    assert "over 20 GB" in lines[4]

