"""The fused Swin-v2 window attention (`swinv2_attention.py`) computes what transformers' eager modules compute.

Each test builds one backbone, runs it with transformers' `Swinv2SelfAttention` (the reference) and again with each
such module replaced by a `Swinv2SdpaSelfAttention` holding its parameters, and compares.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_backbone_config, tiny_config
from transformers import AutoBackbone, AutoConfig
from transformers.models.swinv2.modeling_swinv2 import Swinv2Attention, Swinv2SelfAttention

from xt_hf import XTConfig, XTForImageClassification
from xt_hf.swinv2_attention import Swinv2SdpaSelfAttention, set_swinv2_attention


def swinv2_backbone(**overrides) -> torch.nn.Module:
    """A tiny Swin-v2 backbone with non-trivial temperatures (one above the log-100 clamp) and position biases."""
    arguments = tiny_backbone_config(image_size=32, **overrides)
    arguments.pop("model_type")
    backbone = AutoBackbone.from_config(AutoConfig.for_model("swinv2", **arguments)).eval()
    with torch.no_grad():
        for module in backbone.modules():
            if isinstance(module, Swinv2SelfAttention):
                module.logit_scale.uniform_(0.5, 4.0)
                module.logit_scale.view(-1)[0] = math.log(200.0)
                module.continuous_position_bias_mlp[2].weight.normal_(0.0, 0.5)
    return backbone


def features_both_ways(backbone, regions) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    assert set_swinv2_attention(backbone, "eager") > 0
    eager = backbone(regions).feature_maps
    set_swinv2_attention(backbone, "sdpa")
    fused = backbone(regions).feature_maps
    return eager, fused


def assert_close_features(eager, fused, tolerance: float) -> None:
    assert len(eager) == len(fused)
    for reference, candidate in zip(eager, fused):
        assert candidate.shape == reference.shape and candidate.dtype == reference.dtype
        torch.testing.assert_close(candidate.float(), reference.float(), atol=tolerance, rtol=0.0)


@pytest.mark.parametrize(
    ("region", "window_size", "qkv_bias"),
    [
        (32, 4, True),  # 8×8 tokens: stage 1 shifted (2 × 2 windows), stage 2 one unshifted window
        (32, 2, True),  # 16 windows per image in stage 1, shifted in both stages
        (24, 4, True),  # 6×6 tokens padded to 8×8 before windowing, shifted
        (40, 3, False),  # 10×10 tokens padded to 12×12 by 3-token windows; no query/value bias
        (32, 8, True),  # one window covering the whole stage: no shift at all
    ],
)
def test_sdpa_attention_matches_eager_swinv2_in_float32(region, window_size, qkv_bias):
    backbone = swinv2_backbone(window_size=window_size, qkv_bias=qkv_bias)
    regions = torch.randn(5, 3, region, region)
    with torch.inference_mode():
        eager, fused = features_both_ways(backbone, regions)
    assert_close_features(eager, fused, tolerance=1e-4)


def test_sdpa_attention_matches_eager_with_pretrained_window_sizes():
    """The released Swin-L reads its position-bias table at 192 px pre-training scale (`pretrained_window_sizes`)."""
    backbone = swinv2_backbone(pretrained_window_sizes=[3, 3])
    with torch.inference_mode():
        eager, fused = features_both_ways(backbone, torch.randn(3, 3, 32, 32))
    assert_close_features(eager, fused, tolerance=1e-4)


def assert_no_less_accurate_than_eager(reference, eager, fused) -> None:
    """bfloat16 rounding moves both paths far from float32 (max |Δ| ≈ 1.6 on these maps of size ≈ 5); the fused
    path, which accumulates scores and softmax in float32, must be at least as close as the eager one."""
    for exact, slow, fast in zip(reference, eager, fused):
        assert fast.shape == slow.shape and fast.dtype == slow.dtype
        slow_error, fast_error = (slow.float() - exact).abs(), (fast.float() - exact).abs()
        assert fast_error.mean() <= 1.1 * slow_error.mean()
        assert fast_error.max() <= 1.1 * slow_error.max()


def test_sdpa_attention_in_bfloat16_is_as_accurate_as_eager():
    backbone = swinv2_backbone()
    regions = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        reference, _ = features_both_ways(backbone, regions)
        eager, fused = features_both_ways(backbone.to(torch.bfloat16), regions.to(torch.bfloat16))
    assert_no_less_accurate_than_eager(reference, eager, fused)


def test_sdpa_attention_under_bfloat16_autocast_is_as_accurate_as_eager():
    backbone = swinv2_backbone()
    regions = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        reference, _ = features_both_ways(backbone, regions)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager, fused = features_both_ways(backbone, regions)
    assert_no_less_accurate_than_eager(reference, eager, fused)


def test_sdpa_attention_gradients_match_eager():
    """Fine-tuning through the fused path trains the same parameters the same way (temperature and bias MLP too)."""
    backbone = swinv2_backbone().train()
    regions = torch.randn(3, 3, 32, 32)
    gradients = {}
    for implementation in ("eager", "sdpa"):
        set_swinv2_attention(backbone, implementation)
        backbone.zero_grad()
        sum(maps.square().mean() for maps in backbone(regions).feature_maps).backward()
        gradients[implementation] = {name: parameter.grad.clone() for name, parameter in backbone.named_parameters()
                                     if parameter.grad is not None}
    assert gradients["sdpa"].keys() == gradients["eager"].keys()
    assert any("logit_scale" in name for name in gradients["eager"])
    for name, reference in gradients["eager"].items():
        # Float32 rounding, relative to each gradient's scale (up to ≈ 30 here: temperatures reach 100).
        scale = reference.abs().max().item()
        torch.testing.assert_close(gradients["sdpa"][name], reference, atol=1e-4 * scale, rtol=0.0, msg=name)


def test_sdpa_attention_with_autograd_matches_inference():
    """With gradients on the position bias torch runs its math kernel instead of the fused one: same numbers up to
    float rounding."""
    backbone = swinv2_backbone()
    set_swinv2_attention(backbone, "sdpa")
    regions = torch.randn(3, 3, 32, 32)
    trained = backbone(regions).feature_maps
    with torch.inference_mode():
        inferred = backbone(regions).feature_maps
    assert_close_features(trained, inferred, tolerance=5e-5)  # 1.6e-5 measured on one AMD EPYC machine


def test_attention_weights_requested_fall_back_to_eager():
    backbone = swinv2_backbone()
    regions = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        set_swinv2_attention(backbone, "eager")
        eager = backbone(regions, output_attentions=True)
        set_swinv2_attention(backbone, "sdpa")
        fused = backbone(regions, output_attentions=True)
    for reference, candidate in zip(eager.attentions, fused.attentions):
        torch.testing.assert_close(candidate, reference)


def test_attention_implementations_share_one_state_dict():
    """Converted checkpoints and models saved with either implementation load into the other unchanged."""
    fused = XTForImageClassification(tiny_config(region_encoder_attention="sdpa"))
    eager = XTForImageClassification(tiny_config(region_encoder_attention="eager"))
    fused_state, eager_state = fused.state_dict(), eager.state_dict()
    assert {k: v.shape for k, v in fused_state.items()} == {k: v.shape for k, v in eager_state.items()}
    eager.load_state_dict(fused_state, strict=True)
    kinds = {type(m) for m in fused.modules()} & {Swinv2SelfAttention, Swinv2SdpaSelfAttention}
    assert kinds == {Swinv2SdpaSelfAttention}
    assert not {type(m) for m in eager.modules()} & {Swinv2SdpaSelfAttention}


def test_switching_replaces_the_attention_child_and_keeps_its_parameters():
    """The fused module is a new child of each `Swinv2Attention` holding the very parameter and buffer objects of
    the eager one, under the same names; no module changes class, and switching back gives transformers' module."""
    backbone = swinv2_backbone()
    set_swinv2_attention(backbone, "eager")
    eager_children = [module.self for module in backbone.modules() if isinstance(module, Swinv2Attention)]
    before = dict(backbone.named_parameters()) | dict(backbone.named_buffers())
    assert set_swinv2_attention(backbone, "sdpa") == len(eager_children) > 0
    fused_children = [module.self for module in backbone.modules() if isinstance(module, Swinv2Attention)]
    assert all(type(child) is Swinv2SdpaSelfAttention for child in fused_children)
    assert all(type(child) is Swinv2SelfAttention for child in eager_children), "eager modules are left as they were"
    after = dict(backbone.named_parameters()) | dict(backbone.named_buffers())
    assert before.keys() == after.keys() and all(after[name] is tensor for name, tensor in before.items())
    set_swinv2_attention(backbone, "eager")
    assert all(type(module.self) is Swinv2SelfAttention for module in backbone.modules()
               if isinstance(module, Swinv2Attention))
    assert all(tensor is before[name] for name, tensor in (dict(backbone.named_parameters()) |
                                                          dict(backbone.named_buffers())).items())


def test_the_fused_attention_draws_no_random_numbers():
    """Installed at construction, it must not shift the random initialisation of the modules built after it."""
    torch.manual_seed(0)
    fused = XTForImageClassification(tiny_config(region_encoder_attention="sdpa"))
    torch.manual_seed(0)
    eager = XTForImageClassification(tiny_config(region_encoder_attention="eager"))
    for (name, reference), (_, candidate) in zip(eager.state_dict().items(), fused.state_dict().items(), strict=True):
        assert torch.equal(candidate, reference), name


def test_region_encoder_attention_does_not_change_xt_outputs():
    config = tiny_config(region_batch_size=3)
    fused = XTForImageClassification(config).eval()
    eager = XTForImageClassification(tiny_config(region_batch_size=3, region_encoder_attention="eager")).eval()
    eager.load_state_dict(fused.state_dict())
    pixel_values = torch.randn(2, 3, 3 * 32, 2 * 32 + 5)
    with torch.inference_mode():
        torch.testing.assert_close(fused(pixel_values).logits, eager(pixel_values).logits, atol=1e-4, rtol=0.0)


def test_region_encoder_attention_is_ignored_by_other_backbones():
    model = XTForImageClassification(tiny_config("hiera", region_encoder_attention="sdpa"))
    assert set_swinv2_attention(model.xt.region_encoder.backbone, "sdpa") == 0
    with pytest.raises(ValueError, match="region_encoder_attention"):
        XTConfig(region_encoder_attention="flash")
