"""`compile: true` in the training settings: one training step of the compiled model equals eager."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import REGION, tiny_config
from xt_hf import XTForImageClassification
from xt_hf.training.arguments import TrainConfig
from xt_hf.training.loop import compile_model

# Inductor reorders float32 reductions and fuses elementwise chains; on these O(1) activations the loss and
# every gradient stay within this of eager (measured on this tiny model: loss equal, gradients within 1.6e-6
# absolute, 8e-6 relative to each gradient's largest entry).
COMPILE_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def one_training_step(model, pixel_values, labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    loss = model(pixel_values, labels=labels).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_compiled_training_step_equals_eager(checkpointing):
    torch._dynamo.reset()
    eager = XTForImageClassification(tiny_config(region_batch_size=2))
    if checkpointing:
        eager.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    compiled = compile_model(copy.deepcopy(eager))
    pixel_values = torch.randn(2, 3, 2 * REGION, REGION)
    labels = torch.tensor([1, 3])

    eager_loss, eager_gradients = one_training_step(eager, pixel_values, labels)
    compiled_loss, compiled_gradients = one_training_step(compiled, pixel_values, labels)

    torch.testing.assert_close(compiled_loss, eager_loss, **COMPILE_TOLERANCE)
    assert compiled_gradients.keys() == eager_gradients.keys()
    assert len(eager_gradients) == len(list(eager.parameters()))
    for name, gradient in eager_gradients.items():
        torch.testing.assert_close(compiled_gradients[name], gradient, **COMPILE_TOLERANCE, msg=name)


def test_compiling_keeps_the_state_dict_keys():
    model = XTForImageClassification(tiny_config())
    keys = list(model.state_dict())
    assert list(compile_model(model, backend="eager").state_dict()) == keys


def test_compile_is_a_training_setting_off_by_default():
    settings = {"model": "config.json", "dataset": "imagefolder:data"}
    assert TrainConfig.from_dict(settings).compile is False
    assert TrainConfig.from_dict({**settings, "compile": True}).compile is True
