"""The presence losses (`region_presence_loss_weight`, `scene_presence_loss_weight`): their targets, where they
read, and what they train."""

from __future__ import annotations

import pytest
import torch
from conftest import REGION, tiny_config

from xt_hf import XTConfig, XTForObjectDetection, XTForSemanticSegmentation
from xt_hf.region_presence import presence_from_boxes, presence_from_masks, region_presence_loss


def segmenter(**overrides):
    options = dict(classifier="pool", context_attention_causal=False, num_labels=3, decoder_hidden_size=16)
    return XTForSemanticSegmentation(tiny_config(**{**options, **overrides}))


def test_presence_from_masks_lists_the_classes_of_each_region_ignoring_unlabelled_pixels_and_padding():
    labels = torch.zeros(1, 5, 7, dtype=torch.long)  # regions of 4 px: 2 × 2 regions, the last ones padded
    labels[0, 0, 0] = 1          # region (0, 0) holds class 1 (and 0)
    labels[0, 4, 6] = 2          # region (1, 1): class 2 in its one real row
    labels[0, 1:4, 4:7] = 255    # region (0, 1): class 0 only in row 0 and column 7 is padding
    presence = presence_from_masks(labels, num_labels=3, region_size=4, ignore_index=255)
    assert presence.shape == (1, 2, 2, 3)
    assert presence[0, 0, 0].tolist() == [1, 1, 0]
    assert presence[0, 0, 1].tolist() == [1, 0, 0]
    assert presence[0, 1, 1].tolist() == [1, 0, 1]
    labels[0, 0:4, 4:8] = 255
    assert presence_from_masks(labels, 3, 4, 255)[0, 0, 1].tolist() == [0, 0, 0]


def test_presence_from_boxes_marks_the_region_of_each_centre():
    targets = [{"class_labels": torch.tensor([0, 1, 1]),
                "boxes": torch.tensor([[0.1, 0.1, 0.05, 0.05], [0.9, 0.3, 0.1, 0.1], [1.0, 1.0, 0.01, 0.01]])},
               {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    presence = presence_from_boxes(targets, num_labels=2, image_size=(64, 96), region_size=32)
    assert presence.shape == (2, 2, 3, 2)
    expected = torch.zeros(2, 2, 3, 2)
    expected[0, 0, 0, 0] = 1   # (x 9.6, y 6.4)
    expected[0, 0, 2, 1] = 1   # (x 86.4, y 19.2)
    expected[0, 1, 2, 1] = 1   # on the far corner: clamped into the last region
    assert torch.equal(presence, expected)


def test_weight_zero_adds_no_head_and_no_weights():
    model = segmenter()
    assert model.region_presence is None and model.scene_presence is None
    assert not any("presence" in name for name in model.state_dict())


@pytest.mark.parametrize("context_encoder", ["attention", "none"])
def test_the_head_reads_what_the_decoder_fuses_at_its_deepest_stage(context_encoder):
    model = segmenter(context_encoder=context_encoder, region_presence_loss_weight=1.0)
    expected = 32 if context_encoder == "attention" else model.xt.region_encoder.channels[-1]
    assert model.region_presence.classifier.in_features == expected


def test_segmentation_loss_adds_the_weighted_presence_loss():
    torch.manual_seed(0)
    model = segmenter(region_presence_loss_weight=2.5).eval()
    pixels = torch.randn(2, 3, 2 * REGION, 3 * REGION - 5)
    labels = torch.randint(0, 3, (2, *pixels.shape[-2:]))
    outputs, context, rows, cols = model.encode_for_regions(pixels, None, None)
    logits = model.cropped(model.decode(outputs.region_feature_maps, context, rows, cols), *pixels.shape[-2:])
    presence = presence_from_masks(labels, 3, REGION, 255)
    expected = model.segmentation_loss(logits, labels) + 2.5 * region_presence_loss(
        model.region_presence_logits(outputs, context, rows, cols), presence)
    torch.testing.assert_close(model(pixel_values=pixels, labels=labels).loss, expected)


def test_the_presence_loss_alone_trains_the_context_encoder_and_is_learnable():
    """Only the presence loss (no pixel loss reaches the context encoder through it here): its gradient reaches
    the context encoder, and a few steps on one batch lower it."""
    torch.manual_seed(0)
    model = segmenter(region_presence_loss_weight=1.0)
    pixels = torch.randn(2, 3, 2 * REGION, 2 * REGION)
    labels = torch.randint(0, 3, (2, *pixels.shape[-2:]))
    labels[:, :REGION] = 0  # the top regions hold background only: presence differs by region

    def presence_loss():
        outputs, context, rows, cols = model.encode_for_regions(pixels, None, None)
        return region_presence_loss(model.region_presence_logits(outputs, context, rows, cols),
                                    presence_from_masks(labels, 3, REGION, 255))

    loss = presence_loss()
    loss.backward()
    context_grads = [p.grad for p in model.xt.context_encoder.parameters() if p.grad is not None]
    assert context_grads and any(g.abs().sum() > 0 for g in context_grads)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        optimizer.zero_grad()
        step_loss = presence_loss()
        step_loss.backward()
        optimizer.step()
    assert presence_loss().item() < 0.5 * loss.item()


def test_detection_reports_the_presence_loss_and_adds_it():
    torch.manual_seed(0)
    config = tiny_config(classifier="pool", context_attention_causal=False, num_labels=2, decoder_output_stride=4,
                         decoder_hidden_size=16, region_presence_loss_weight=0.5)
    model = XTForObjectDetection(config).eval()
    pixels = torch.randn(1, 3, 2 * REGION, 2 * REGION)
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.7, 0.2, 0.1, 0.1]])}]
    outputs = model(pixel_values=pixels, labels=labels)
    parts = outputs.loss_dict
    assert "loss_region_presence" in parts
    expected = parts["loss_heatmap"] + 0.1 * parts["loss_size"] + parts["loss_offset"] + 0.5 * parts["loss_region_presence"]
    torch.testing.assert_close(outputs.loss, expected)


@pytest.mark.parametrize("context_encoder", ["attention", "none"])
def test_the_scene_presence_loss_asks_the_mean_of_the_fused_tokens_which_classes_occur_anywhere(context_encoder):
    torch.manual_seed(0)
    config = tiny_config(classifier="pool", context_encoder=context_encoder, num_labels=3, decoder_output_stride=4,
                         decoder_hidden_size=16, region_presence_loss_weight=0.5, scene_presence_loss_weight=2.0)
    model = XTForObjectDetection(config).eval()
    pixels = torch.randn(2, 3, 2 * REGION, 3 * REGION)
    labels = [{"class_labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.1, 0.2, 0.1, 0.1], [0.9, 0.8, 0.1, 0.1]])},
              {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]  # no objects at all
    outputs = model(pixel_values=pixels, labels=labels)
    parts = outputs.loss_dict
    encoded, context, rows, cols = model.encode_for_regions(pixels, None, None)
    tokens = encoded.region_feature_maps[-1] if context is None else context
    scene_logits = tokens.mean(dim=(-2, -1)) @ model.scene_presence.classifier.weight.T + model.scene_presence.classifier.bias
    scene_targets = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])  # classes anywhere in each image
    torch.testing.assert_close(parts["loss_scene_presence"],
                               torch.nn.functional.binary_cross_entropy_with_logits(scene_logits, scene_targets))
    expected = (parts["loss_heatmap"] + 0.1 * parts["loss_size"] + parts["loss_offset"]
                + 0.5 * parts["loss_region_presence"] + 2.0 * parts["loss_scene_presence"])
    torch.testing.assert_close(outputs.loss, expected)
    assert model.scene_presence.classifier.in_features == model.fused_token_width()


def test_the_scene_presence_loss_alone_makes_one_region_encode_its_class():
    """Segmentation, no context encoder: class 1 occurs in one region only. The scene loss reaches that region's
    tokens directly (the region loss reaches others' only through attention): a few steps lower it."""
    torch.manual_seed(0)
    model = segmenter(context_encoder="none", scene_presence_loss_weight=1.0)
    pixels = torch.randn(4, 3, 2 * REGION, 2 * REGION)
    labels = torch.zeros(4, *pixels.shape[-2:], dtype=torch.long)
    labels[:2, :REGION, :REGION] = 1
    pixels[:2, 0, :REGION, :REGION] += 3.0  # the region that holds class 1 looks different

    def scene_loss():
        outputs, context, rows, cols = model.encode_for_regions(pixels, None, None)
        return model.presence_losses(outputs, context, rows, cols, presence_from_masks(labels, 3, REGION, 255))[1]

    first = scene_loss()
    assert set(first) == {"loss_scene_presence"}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(15):
        optimizer.zero_grad()
        scene_loss()["loss_scene_presence"].backward()
        optimizer.step()
    assert scene_loss()["loss_scene_presence"].item() < 0.5 * first["loss_scene_presence"].item()


def test_the_head_survives_a_save_and_load(tmp_path):
    model = segmenter(region_presence_loss_weight=1.0)
    model.save_pretrained(tmp_path)
    loaded = XTForSemanticSegmentation.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.region_presence.classifier.weight, model.region_presence.classifier.weight)


@pytest.mark.parametrize("name", ["region_presence_loss_weight", "scene_presence_loss_weight"])
def test_a_negative_weight_is_named(name):
    with pytest.raises(ValueError, match=name):
        XTConfig(**{name: -1.0})
