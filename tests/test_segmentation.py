"""XTForSemanticSegmentation: dense logits over any image size, any channel count, cropped padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import REGION, tiny_backbone_config, tiny_config
from PIL import Image
from transformers import AutoModelForSemanticSegmentation, pipeline

from xt_hf import XTForSemanticSegmentation, XTImageProcessor


def segmenter(**overrides):
    arguments = dict(num_labels=3, classifier="pool", context_attention_causal=False)
    arguments.update(overrides)
    return XTForSemanticSegmentation(tiny_config(**arguments)).eval()


@pytest.mark.parametrize("height,width", [(REGION, REGION), (REGION + 1, 2 * REGION), (45, 70)])
@pytest.mark.parametrize("stride", [1, 4])
def test_logits_cover_the_input_at_the_output_stride(height, width, stride):
    model = segmenter(decoder_output_stride=stride)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, height, width)).logits
    assert logits.shape == (2, 3, -(-height // stride), -(-width // stride))


@pytest.mark.parametrize("context_encoder", ["none", "attention", "mamba"])
def test_region_chunking_does_not_change_segmentation(context_encoder):
    model = segmenter(context_encoder=context_encoder)
    pixel_values = torch.randn(1, 3, 2 * REGION + 3, 2 * REGION)
    with torch.no_grad():
        whole = model(pixel_values).logits
        model.config.region_batch_size = 1
        chunked = model(pixel_values).logits
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_context_reaches_other_regions_only_through_the_context_encoder():
    pixel_values = torch.randn(1, 3, REGION, 3 * REGION)
    changed = pixel_values.clone()
    changed[..., 2 * REGION :] += 1.0  # alter the last region only
    for context_encoder, expect_change in (("none", False), ("attention", True)):
        model = segmenter(context_encoder=context_encoder)
        with torch.no_grad():
            before, after = model(pixel_values).logits, model(changed).logits
        first_region_moved = not torch.allclose(before[..., :REGION], after[..., :REGION])
        assert first_region_moved == expect_change, context_encoder


def test_two_channel_input_trains_and_loss_decreases():
    backbone = tiny_backbone_config(num_channels=2)
    model = XTForSemanticSegmentation(tiny_config(backbone_config=backbone, num_labels=2, classifier="pool",
                                                  semantic_loss_dice_weight=0.5)).train()
    torch.manual_seed(0)
    columns = torch.arange(2 * REGION)
    labels = ((columns // 16) % 2).expand(2, REGION, -1).clone()  # vertical stripes, 16 px wide
    pixel_values = 0.5 * torch.randn(2, 2, REGION, 2 * REGION)
    pixel_values[:, 0] += 2.0 * labels  # that the input shows in its first (VV-like) channel
    labels[:, :2] = 255  # unlabelled rows are ignored
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(pixel_values, labels=labels).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("num_channels", [1, 2, 13])
def test_adapting_three_channel_weights_keeps_alike_channels_equivalent(num_channels):
    model = segmenter()
    image = torch.randn(1, 3, REGION, REGION)
    mean_image = image.mean(dim=1, keepdim=True)
    with torch.no_grad():
        three = model(mean_image.expand(-1, 3, -1, -1)).logits
        model.adapt_input_channels(num_channels)
        adapted = model(mean_image.expand(-1, num_channels, -1, -1)).logits
    assert model.config.backbone_config.num_channels == num_channels
    torch.testing.assert_close(adapted, three, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=f"3 channels but the region encoder expects {num_channels}"):
        model(image)


def test_post_processing_crops_the_padding():
    model = segmenter()
    processor = XTImageProcessor(region_size=REGION)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (45, 70, 3), dtype=np.uint8), rng.integers(0, 255, (33, 40, 3), dtype=np.uint8)]
    inputs = processor(images, return_tensors="pt")
    assert inputs["pixel_values"].shape[-2:] == (2 * REGION, 3 * REGION)
    with torch.no_grad():
        maps = processor.post_process_semantic_segmentation(model(**inputs), target_sizes=[(45, 70), (33, 40)])
        unpadded = model(inputs["pixel_values"][:1, :, :45, :70]).logits.argmax(dim=1)[0]
    assert [m.shape for m in maps] == [(45, 70), (33, 40)]
    assert torch.equal(maps[0], unpadded)


def test_image_segmentation_pipeline_and_auto_class(tmp_path):
    model = segmenter(id2label={0: "sea", 1: "land", 2: "vessel"})
    model.save_pretrained(tmp_path)
    XTImageProcessor(region_size=REGION).save_pretrained(tmp_path)
    assert type(AutoModelForSemanticSegmentation.from_pretrained(tmp_path)) is XTForSemanticSegmentation
    segment = pipeline("image-segmentation", model=str(tmp_path), trust_remote_code=False)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    results = segment(image)
    assert {r["label"] for r in results} <= {"sea", "land", "vessel"}
    assert all(r["mask"].size == (50, 40) for r in results)


@pytest.mark.parametrize(
    "labels,message",
    [
        (torch.zeros(1, REGION, REGION, dtype=torch.long), "labels must be \\(batch, height, width\\)"),
        (torch.zeros(2, REGION + 1, 2 * REGION, dtype=torch.long), "labels must be"),
    ],
)
def test_labels_of_the_wrong_size_raise(labels, message):
    with pytest.raises(ValueError, match=message):
        segmenter()(torch.randn(2, 3, REGION, 2 * REGION), labels=labels)


def test_channel_mismatch_raises():
    with pytest.raises(ValueError, match="2 channels but the region encoder expects 3"):
        segmenter()(torch.randn(1, 2, REGION, REGION))


def test_the_fusing_block_responds_to_its_input_on_a_one_token_map():
    """One context token per region gives the fusing block 1 × 1 maps; its norm must not flatten them into a
    fixed ±1 pattern (groups of 2 channels did: small changes of the input then changed nothing)."""
    from xt_hf.segmentation_decoder import XTDecoderBlock

    block = XTDecoderBlock(48, 16).eval()
    tokens = torch.randn(4, 48, 1, 1)
    with torch.no_grad():
        change = block(tokens + 1e-2 * torch.randn_like(tokens)) - block(tokens)
    assert change.abs().median() > 1e-3, change.abs().median()
