"""What users of XTModel / XTForImageClassification rely on, checked on tiny CPU models."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import REGION, tiny_backbone_config, tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from xt_hf import XTConfig, XTForImageClassification, XTModel
from xt_hf.nested_tokenization import nested_tokenize, region_batches, stitch_regions
from xt_hf.position_embedding import sincos_1d, sincos_2d_position_embedding


def build(config=None, **overrides):
    model = XTForImageClassification(config or tiny_config(**overrides))
    return model.eval()


def grid_tokens(height, width, region=REGION, reduction=8):
    """Tokens of the stitched last stage for an image of this size (tiny Swin: stride 8)."""
    rows, cols = math.ceil(height / region), math.ceil(width / region)
    return rows * cols * (region // reduction) ** 2


# ---- shapes for any image size ---------------------------------------------------------------

@pytest.mark.parametrize(
    "height,width",
    [(REGION, REGION), (REGION + 1, REGION), (REGION, 3 * REGION), (70, 45), (2 * REGION, 2 * REGION)],
    ids=["one-region", "one-pixel-larger", "non-square", "not-a-multiple", "exact-grid"],
)
def test_any_image_size_gives_grid_shaped_outputs(height, width):
    model = build()
    pixel_values = torch.randn(2, 3, height, width)
    with torch.no_grad():
        outputs = model.xt(pixel_values, output_region_features=True)
        logits = model(pixel_values).logits
    rows, cols = math.ceil(height / REGION), math.ceil(width / REGION)
    assert logits.shape == (2, 5)
    assert outputs.last_hidden_state.shape == (2, grid_tokens(height, width), 32)
    assert outputs.pooler_output.shape == (2, 32)
    stage1, stage2 = outputs.region_feature_maps
    assert stage1.shape == (2, 8, rows * 8, cols * 8)
    assert stage2.shape == (2, 16, rows * 4, cols * 4)


def test_padding_is_zero_at_bottom_and_right():
    model = build()
    pixel_values = torch.randn(1, 3, REGION + 5, REGION + 9)
    padded = torch.zeros(1, 3, 2 * REGION, 2 * REGION)
    padded[:, :, : REGION + 5, : REGION + 9] = pixel_values
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, model(padded).logits, rtol=0, atol=0)


# ---- nested tokenization ---------------------------------------------------------------------

def test_nested_tokenization_is_image_major_then_row_major_and_stitch_inverts_it():
    images = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).view(2, 1, 4, 6)
    (index,) = region_batches(2, 2, 3, None)
    regions = nested_tokenize(images, index)
    assert regions.shape == (2 * 2 * 3, 1, 2, 2)
    torch.testing.assert_close(regions[4], images[0, :, 2:4, 2:4])  # image 0, region row 1, column 1
    torch.testing.assert_close(regions[6], images[1, :, 0:2, 0:2])
    stitched = torch.full_like(images, float("nan"))
    for part in region_batches(2, 2, 3, 5):  # batches of 5 regions: 5, 5, 2
        stitch_regions(stitched, part, nested_tokenize(images, part))
    torch.testing.assert_close(stitched, images, rtol=0, atol=0)


def test_region_encoder_sees_each_region_independently():
    model = build()
    pixel_values = torch.randn(1, 3, 2 * REGION, 2 * REGION)
    with torch.no_grad():
        whole = model.xt(pixel_values, output_region_features=True).region_feature_maps[-1]
        alone = model.xt.region_encoder.backbone(pixel_values[:, :, REGION:, :REGION]).feature_maps[-1]
    torch.testing.assert_close(whole[:, :, 4:, :4], alone, rtol=1e-5, atol=1e-5)


# ---- memory knobs never change numbers -------------------------------------------------------

@pytest.mark.parametrize("context_encoder", ["none", "attention", "mamba"])
def test_region_chunking_does_not_change_outputs(context_encoder):
    classifier = "pool" if context_encoder == "none" else "context"
    model = build(context_encoder=context_encoder, classifier=classifier)
    pixel_values = torch.randn(2, 3, 3 * REGION, 2 * REGION)
    with torch.no_grad():
        model.config.region_batch_size = None
        all_at_once = model(pixel_values).logits
        model.config.region_batch_size = 1
        one_by_one = model(pixel_values).logits
        model.config.region_batch_size = 5
        uneven = model(pixel_values).logits
    torch.testing.assert_close(one_by_one, all_at_once, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(uneven, all_at_once, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_gives_the_same_gradients():
    pixel_values = torch.randn(2, 3, 2 * REGION, REGION)
    labels = torch.tensor([1, 3])

    def gradients(checkpointing):
        torch.manual_seed(0)
        model = XTForImageClassification(tiny_config(region_batch_size=2)).train()
        if checkpointing:
            model.activation_checkpointing_enable()
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.xt.context_encoder.modules())
            assert any(getattr(m, "gradient_checkpointing", False) for m in model.xt.region_encoder.modules())
        model(pixel_values, labels=labels).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(build().parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_grad_ratio_keeps_outputs_and_region_order_and_drops_some_gradients():
    pixel_values = torch.randn(1, 3, 2 * REGION, 2 * REGION)
    model = XTForImageClassification(tiny_config()).train()
    full = model(pixel_values).logits
    model.config.grad_ratio = 0.25
    partial = model(pixel_values).logits
    torch.testing.assert_close(partial, full)

    def regions_with_gradient() -> list[int]:
        """Row-major numbers of the 2×2 regions whose pixels receive a gradient in one training step."""
        pixels = pixel_values.clone().requires_grad_(True)
        model.zero_grad()
        model(pixels).logits.sum().backward()
        per_region = pixels.grad.abs().reshape(3, 2, REGION, 2, REGION).sum(dim=(0, 2, 4)).flatten()
        return per_region.nonzero().flatten().tolist()

    # With one region out of four keeping gradients, only that region's pixels get a gradient: the other
    # three are encoded without autograd (their tokens still reach the context encoder, so outputs are equal).
    chosen = [regions_with_gradient() for _ in range(8)]
    assert all(len(regions) == 1 for regions in chosen), chosen
    assert len({regions[0] for regions in chosen}) > 1, chosen  # a fresh random subset each step
    patch_weight = model.xt.region_encoder.backbone.embeddings.patch_embeddings.projection.weight
    assert patch_weight.grad is not None and patch_weight.grad.abs().sum() > 0

    model.config.grad_ratio = 1.0  # every region keeps its gradient
    assert regions_with_gradient() == [0, 1, 2, 3]


# ---- context encoders ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "context_encoder,classifier",
    [("none", "pool"), ("attention", "pool"), ("attention", "context"), ("mamba", "pool"), ("mamba", "context")],
)
def test_every_context_encoder_and_head_trains(context_encoder, classifier):
    model = XTForImageClassification(tiny_config(context_encoder=context_encoder, classifier=classifier)).train()
    pixel_values = torch.randn(2, 3, REGION, 2 * REGION)
    outputs = model(pixel_values, labels=torch.tensor([0, 4]))
    outputs.loss.backward()
    assert outputs.logits.shape == (2, 5)
    without_gradient = [name for name, p in model.named_parameters() if p.grad is None]
    assert without_gradient == []


def test_context_tokens_are_row_major_over_the_whole_grid():
    config = tiny_config(context_position_embedding="none", context_attention_causal=False,
                         classifier="pool", context_num_layers=1)
    model = build(config)
    pixel_values = torch.randn(1, 3, REGION, 2 * REGION)
    with torch.no_grad():
        outputs = model.xt(pixel_values, output_region_features=True)
        grid = outputs.region_feature_maps[-1]  # (1, 16, 4, 8)
        expected_input = model.xt.context_encoder.input_proj(grid[0, :, 1, 5])  # row 1, column 5
        hidden = model.xt(pixel_values, output_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(hidden[0, 1 * 8 + 5], expected_input)


def test_position_embedding_encodes_column_then_row():
    embedding = sincos_2d_position_embedding(rows=3, cols=4, dim=16)
    assert embedding.shape == (12, 16)
    cell = 2 * 4 + 1  # row 2, column 1
    torch.testing.assert_close(embedding[cell, :8], sincos_1d(torch.tensor([1]), 8)[0])
    torch.testing.assert_close(embedding[cell, 8:], sincos_1d(torch.tensor([2]), 8)[0])


def _original_windowed_cls(model, tokens_with_cls, window):
    """The original xl head's in_context_patches loop, transcribed (xt/models/decoders/decoder.py)."""
    encoder = model.xt.context_encoder
    cls_states, start = [], 0
    while start < tokens_with_cls.shape[1] - 1:
        piece = tokens_with_cls[:, start : start + window]
        piece = torch.cat([piece, encoder.cls_token.expand(piece.shape[0], -1, -1)], dim=1)
        for layer in encoder.layers:
            piece, _ = layer(piece)
        cls_states.append(piece[:, -1:])
        start += window // 2
    return torch.cat(cls_states, dim=1).mean(dim=1)


@pytest.mark.parametrize("window", [4, 6, 32])
def test_in_context_patches_reproduces_the_original_window_loop(window):
    model = build(in_context_patches=window)
    pixel_values = torch.randn(2, 3, REGION, 2 * REGION)  # 32 tokens + CLS
    with torch.no_grad():
        pooled = model.xt(pixel_values).pooler_output
        model.config.in_context_patches = -1
        tokens_with_cls = model.xt(pixel_values, output_hidden_states=True).hidden_states[0]
        expected = _original_windowed_cls(model, tokens_with_cls, window)
    torch.testing.assert_close(pooled, expected, rtol=1e-5, atol=1e-6)


def test_in_context_patches_longer_than_the_sequence_is_the_full_pass():
    pixel_values = torch.randn(1, 3, REGION, REGION)
    model = build()
    with torch.no_grad():
        full = model(pixel_values).logits
        model.config.in_context_patches = 1000
        windowed = model(pixel_values).logits
    torch.testing.assert_close(windowed, full)


def test_sdpa_and_eager_attention_agree_and_eager_returns_weights():
    model = build()
    assert model.config._attn_implementation == "sdpa"
    pixel_values = torch.randn(1, 3, REGION, 2 * REGION)
    with torch.no_grad():
        sdpa = model(pixel_values).logits
        model.config._attn_implementation = "eager"
        eager = model(pixel_values, output_attentions=True)
    torch.testing.assert_close(eager.logits, sdpa, rtol=1e-5, atol=1e-6)
    assert len(eager.attentions) == 2
    weights = eager.attentions[0]
    assert weights.shape == (1, 2, 33, 33)
    assert torch.all(weights.triu(1) == 0), "causal attention must not look ahead"


def test_the_forward_is_one_path_whatever_the_grad_mode():
    """Training and inference run the same code: a long sequence (HyperAttention, more tokens than
    `context_token_chunk_size`) gives bit-identical outputs with autograd and under inference_mode. The region
    encoder runs eager here: with `"sdpa"`, torch picks another attention kernel when the position bias needs
    gradients (same code, equal up to rounding: tests/test_region_encoder_fast_path.py)."""
    pixel_values = torch.randn(2, 3, 2 * REGION, 3 * REGION)
    model = build(region_encoder_attention="eager", **LONG_SEQUENCE)
    reference = model(pixel_values, output_hidden_states=True)
    with torch.inference_mode():
        inferred = model(pixel_values, output_hidden_states=True)
    assert torch.equal(inferred.logits, reference.logits)
    for got, expected in zip(inferred.hidden_states, reference.hidden_states, strict=True):
        assert torch.equal(got, expected)


LONG_SEQUENCE = dict(context_token_chunk_size=7, context_long_sequence_attention="hyper", hyper_min_seq_len=16,
                     hyper_block_size=8, hyper_sample_size=8)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("classifier,cls_position", [("context", "last"), ("context", "first"), ("pool", "last")])
def test_the_engine_in_place_matches_the_model_forward(causal, classifier, cls_position, monkeypatch):
    """The inference engine embeds a long sequence a chunk at a time and runs each block head by head in place
    (HyperAttention replaying the all-heads draws): the model's numbers, up to float rounding."""
    from xt_hf.engine import context as engine_context

    model = build(context_attention_causal=causal, classifier=classifier, cls_token_position=cls_position,
                  context_qkv_bias=causal, **LONG_SEQUENCE)
    pixel_values = torch.randn(2, 3, 2 * REGION, 3 * REGION)  # 96 grid tokens: HyperAttention, 14 chunks
    reference = model.xt(pixel_values, output_region_features=True)
    grid = reference.region_feature_maps[-1].detach()
    calls = []
    original = engine_context.update_attention_block
    monkeypatch.setattr(engine_context, "update_attention_block",
                        lambda *arguments: calls.append(1) or original(*arguments))
    in_place = model.xt.output_from_encoding(engine_context.encode_grid(model.xt.context_encoder, grid))
    assert len(calls) == 2, "both blocks must take the in-place path"
    torch.testing.assert_close(in_place.last_hidden_state, reference.last_hidden_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(in_place.pooler_output, reference.pooler_output, rtol=1e-5, atol=1e-5)


def test_hidden_states_cover_input_and_every_block():
    model = build(context_num_layers=3)
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, REGION, REGION), output_hidden_states=True)
    assert len(outputs.hidden_states) == 4
    assert all(h.shape == (1, 16 + 1, 32) for h in outputs.hidden_states)


# ---- heads and losses ------------------------------------------------------------------------

@pytest.mark.parametrize(
    "problem_type,num_labels,labels",
    [
        ("single_label_classification", 5, torch.tensor([1, 4])),
        ("multi_label_classification", 5, torch.tensor([[1.0, 0, 1, 0, 0], [0, 0, 0, 0, 1]])),
        ("regression", 1, torch.tensor([0.5, -1.0])),
    ],
)
def test_problem_types_give_the_matching_loss(problem_type, num_labels, labels):
    model = build(problem_type=problem_type, num_labels=num_labels)
    outputs = model(torch.randn(2, 3, REGION, REGION), labels=labels)
    assert outputs.logits.shape == (2, num_labels)
    if problem_type == "single_label_classification":
        expected = torch.nn.functional.cross_entropy(outputs.logits, labels)
    elif problem_type == "multi_label_classification":
        expected = torch.nn.functional.binary_cross_entropy_with_logits(outputs.logits, labels)
    else:
        expected = torch.nn.functional.mse_loss(outputs.logits.squeeze(-1), labels)
    torch.testing.assert_close(outputs.loss, expected)


def test_tuple_and_dict_outputs_match():
    model = build()
    pixel_values = torch.randn(1, 3, REGION, REGION)
    with torch.no_grad():
        as_dict = model(pixel_values, labels=torch.tensor([2]))
        as_tuple = model(pixel_values, labels=torch.tensor([2]), return_dict=False)
    torch.testing.assert_close(as_tuple[0], as_dict.loss)
    torch.testing.assert_close(as_tuple[1], as_dict.logits)


# ---- backbone families -----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["swinv2", "hiera", "convnext"])
def test_each_backbone_family_runs_and_chunks_exactly(family):
    model = build(tiny_config(family))
    region = model.config.region_size
    pixel_values = torch.randn(1, 3, region + 3, 2 * region)
    with torch.no_grad():
        everything = model(pixel_values).logits
        model.config.region_batch_size = 1
        chunked = model(pixel_values).logits
    assert everything.shape == (1, 5)
    torch.testing.assert_close(chunked, everything, rtol=1e-5, atol=1e-6)


def test_backbone_output_norm_is_optional():
    without = XTModel(tiny_config("convnext"))
    with_norm = XTModel(tiny_config("convnext", region_encoder_output_norm=True))
    assert not any("hidden_states_norms" in k for k in without.state_dict())
    assert any("hidden_states_norms" in k for k in with_norm.state_dict())


def test_timm_backbone():
    pytest.importorskip("timm", reason="timm is an optional extra (pip install xt-hf[timm])")
    backbone = dict(model_type="timm_backbone", backbone="fastvit_t8", out_indices=[-1], num_channels=3)
    model = build(tiny_config(backbone_config=backbone, region_size=64))
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 64, 100)).logits
    assert logits.shape == (1, 5)


def test_fastvit_hd_region_encoder_builds_from_config():
    timm = pytest.importorskip("timm", reason="timm is an optional extra (pip install xt-hf[timm])")
    if "fastvit_mci3" not in timm.list_models("fastvit_mci3"):
        pytest.skip(f"timm {timm.__version__} has no fastvit_mci3")
    config = XTConfig(
        region_size=64,
        backbone_config=dict(model_type="timm_backbone", backbone="fastvit_mci3", out_indices=[-1]),
        classifier="pool",
        context_encoder="none",
        num_labels=3,
    )
    with torch.device("meta"):
        model = XTForImageClassification(config)
    assert model.xt.region_encoder.channels[-1] > 0
    assert model.classifier.out_proj.out_features == 3


# ---- save, load, Auto classes ----------------------------------------------------------------

def test_save_load_round_trip_is_exact(tmp_path):
    model = build()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded) is XTForImageClassification
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items()):
        assert torch.equal(a, b), name
    pixel_values = torch.randn(1, 3, REGION, 2 * REGION)
    with torch.no_grad():
        # Weights are bit-identical; memory-mapped safetensors can take another BLAS path (~3e-8).
        torch.testing.assert_close(reloaded(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=1e-6)


def test_auto_classes_know_xt(tmp_path):
    arguments = tiny_config().to_dict()
    arguments.pop("model_type")
    config = AutoConfig.for_model("xt", **arguments)
    assert isinstance(config, XTConfig)
    assert type(AutoModel.from_config(config)) is XTModel
    assert type(AutoModelForImageClassification.from_config(config)) is XTForImageClassification


def test_changing_num_labels_when_loading(tmp_path):
    build().save_pretrained(tmp_path)
    model = AutoModelForImageClassification.from_pretrained(tmp_path, num_labels=3, ignore_mismatched_sizes=True)
    assert model(torch.randn(1, 3, REGION, REGION)).logits.shape == (1, 3)


def test_device_map_loading(tmp_path):
    build().save_pretrained(tmp_path)
    model = AutoModelForImageClassification.from_pretrained(tmp_path, device_map="cpu")
    assert next(model.parameters()).device.type == "cpu"


def test_half_precision_forward():
    model = build().to(torch.bfloat16)
    with torch.no_grad():
        logits = model(torch.randn(1, 3, REGION, REGION, dtype=torch.bfloat16)).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


# ---- bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "pixel_values,message",
    [
        (torch.randn(1, 4, REGION, REGION), "4 channels but the region encoder expects 3"),
        (torch.randn(1, 3, REGION - 1, 2 * REGION), "smaller than one region"),
        (torch.randn(3, REGION, REGION), "must be \\(batch, channels, height, width\\)"),
        (torch.full((1, 3, REGION, REGION), float("nan")), "NaN or infinite"),
    ],
    ids=["channels", "too-small", "not-4d", "nan"],
)
def test_bad_pixel_values_raise_a_clear_error(pixel_values, message):
    with pytest.raises(ValueError, match=message):
        build()(pixel_values)


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(backbone_config=dict(model_type="vit")), "backbone_config"),
        (dict(context_encoder="transformer"), "context_encoder"),
        (dict(classifier="context", context_encoder="none"), "classifier"),
        (dict(grad_ratio=1.5), "grad_ratio"),
        (dict(region_batch_size=0), "region_batch_size"),
        (dict(context_num_heads=3), "context_num_heads"),
        (dict(in_context_patches=1), "in_context_patches"),
    ],
)
def test_invalid_config_names_the_field(overrides, field):
    arguments = dict(region_size=REGION, backbone_config=tiny_backbone_config(), context_hidden_size=32)
    arguments.update(overrides)
    with pytest.raises(ValueError, match=field):
        XTConfig(**arguments)


@pytest.mark.parametrize("family", ["swinv2", "hiera", "convnext"])
def test_input_embeddings_are_the_region_encoders_first_layer(family):
    """`get_input_embeddings` (used by transformers' generic tooling) is the layer every region enters through."""
    model = XTForImageClassification(tiny_config(family))
    embeddings = model.get_input_embeddings()
    backbone = model.xt.region_encoder.backbone
    assert any(module is embeddings for module in backbone.embeddings.modules())
    assert model.xt.get_input_embeddings() is embeddings


def test_without_a_context_encoder_hidden_states_hold_the_stitched_tokens():
    model = build(context_encoder="none", classifier="pool")
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, REGION, 2 * REGION), output_hidden_states=True)
        tokens = model.xt(torch.randn(1, 3, REGION, 2 * REGION)).last_hidden_state
    (hidden,) = outputs.hidden_states
    assert hidden.shape == tokens.shape


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64, torch.float64])
def test_pixel_values_of_the_wrong_dtype_are_named(dtype):
    """Raw integer pixels, or float64 ones for a float32 model, fail before the backbone's first convolution."""
    model = build()
    pixel_values = torch.zeros(1, 3, REGION, REGION).to(dtype)
    with pytest.raises(ValueError, match=str(dtype).removeprefix("torch.")):
        model(pixel_values)
