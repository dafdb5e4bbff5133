"""XTForObjectDetection: CenterNet-style dense maps per region, per-region peaks, class-wise NMS across borders."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import REGION, tiny_config
from PIL import Image
from transformers import AutoModelForObjectDetection, pipeline

from xt_hf import XTConfig, XTForObjectDetection, XTImageProcessor
from xt_hf.detection_head import centernet_targets, merge_region_detections
from xt_hf.image_processing_pil_xt import XTImageProcessorPil
from xt_hf.modeling_xt import detections_from_dense_maps
from xt_hf.nested_tokenization import nested_tokenize, region_batches, region_grid_shape

STRIDE = 4
SIDE = REGION // STRIDE  # output cells per region side
NUM_LABELS = 3


@pytest.fixture(autouse=True)
def _one_thread():
    """These tiny models run many small operations: on a shared machine one thread is many times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def detection_config(**overrides) -> XTConfig:
    arguments = dict(decoder_output_stride=STRIDE, num_labels=NUM_LABELS, decoder_hidden_size=16,
                     id2label={i: f"class_{i}" for i in range(NUM_LABELS)})
    arguments.update(overrides)
    return tiny_config(**arguments)


def blank_maps(batch: int, height: int, width: int) -> torch.Tensor:
    """Dense maps `(batch, NUM_LABELS + 4, height, width)` with no object anywhere (heatmap logits -20)."""
    maps = torch.zeros(batch, NUM_LABELS + 4, height, width)
    maps[:, :NUM_LABELS] = -20.0
    return maps


def put_object(maps, image, label, logit, centre_x, centre_y, box_width, box_height):
    """Write one object, in pixels of the maps' frame, the way a trained head would encode it."""
    col, row = int(centre_x // STRIDE), int(centre_y // STRIDE)
    maps[image, label, row, col] = logit
    maps[image, NUM_LABELS : NUM_LABELS + 2, row, col] = torch.tensor([box_width, box_height]) / STRIDE
    maps[image, NUM_LABELS + 2 :, row, col] = torch.tensor([centre_x / STRIDE - col, centre_y / STRIDE - row])


def use_dense_maps(model, full_maps: torch.Tensor) -> None:
    """Make `model.decode_regions` answer with hand-made maps: `full_maps` covers the padded region grid, cut into
    regions in the order the forward decodes them (all regions in one batch)."""
    rows, cols = full_maps.shape[-2] // SIDE, full_maps.shape[-1] // SIDE
    index = next(region_batches(full_maps.shape[0], rows, cols, None))
    model.decode_regions = lambda stage_features, context: nested_tokenize(full_maps, index).clone()


def test_output_shapes_and_the_heatmap_prior():
    model = XTForObjectDetection(detection_config(detection_max_detections=7)).eval()
    pixel_values = torch.randn(2, 3, REGION + 8, 2 * REGION)
    with torch.no_grad():
        outputs = model(pixel_values)
    rows, cols = -(-(REGION + 8) // STRIDE), 2 * REGION // STRIDE
    assert outputs.logits.shape == (2, 7, NUM_LABELS)
    assert outputs.pred_boxes.shape == (2, 7, 4)
    assert outputs.heatmap.shape == (2, NUM_LABELS, rows, cols)
    assert outputs.box_sizes.shape == outputs.box_offsets.shape == (2, 2, rows, cols)
    assert outputs.image_sizes.tolist() == [[REGION + 8, 2 * REGION]] * 2
    assert outputs.loss is None and outputs.loss_dict is None
    # CenterNet's prior: every cell starts near p = 0.1.
    bias = model.detection_head.heatmap[-1].bias
    torch.testing.assert_close(bias, torch.full_like(bias, -math.log(9)))
    # The engine's piece: one region's dense maps from its stage features and context tokens.
    stages = [torch.randn(3, 8, 8, 8), torch.randn(3, 16, 4, 4)]
    assert model.decode_regions(stages, torch.randn(3, 32, 4, 4)).shape == (3, NUM_LABELS + 4, SIDE, SIDE)
    assert isinstance(outputs.to_tuple(), tuple)


@pytest.mark.parametrize("context_encoder", ["attention", "none"])
def test_the_region_class_prior_adds_one_logit_per_class_read_from_the_fused_tokens(context_encoder):
    model = XTForObjectDetection(detection_config(context_encoder=context_encoder, classifier="pool")).eval()
    prior = model.region_class_prior
    assert not prior.weight.any() and not prior.bias.any(), "a new detector starts as the plain CenterNet head"
    stages = [torch.randn(3, 8, 8, 8), torch.randn(3, 16, 4, 4)]
    context = torch.randn(3, 32, 4, 4) if context_encoder != "none" else None
    with torch.no_grad():
        plain = model.decode_regions(stages, context)
        prior.weight.normal_()
        prior.bias.normal_()
        shifted = model.decode_regions(stages, context)
    # The tokens the decoder fuses at its deepest stage: the context tokens, or the region's own without them.
    tokens = (stages[-1] if context is None else context).mean(dim=(-2, -1))
    expected = (tokens @ prior.weight.T + prior.bias)[:, :, None, None].expand(-1, -1, SIDE, SIDE)
    torch.testing.assert_close(shifted[:, :NUM_LABELS] - plain[:, :NUM_LABELS], expected)
    assert torch.equal(shifted[:, NUM_LABELS:], plain[:, NUM_LABELS:]), "boxes do not depend on the prior"

    without = XTForObjectDetection(detection_config(context_encoder=context_encoder, classifier="pool",
                                                    detection_region_class_prior=False))
    assert without.region_class_prior is None
    assert not any("region_class_prior" in name for name in without.state_dict())


def test_a_detector_saved_before_the_class_prior_loads_with_a_zero_prior_and_predicts_the_same(tmp_path):
    """Folders written before `detection_region_class_prior` existed have neither the field nor the weights."""
    torch.manual_seed(0)
    old = XTForObjectDetection(detection_config(classifier="pool", detection_region_class_prior=False)).eval()
    old.save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    saved = json.loads(config_file.read_text())
    del saved["detection_region_class_prior"]
    config_file.write_text(json.dumps(saved))
    loaded = XTForObjectDetection.from_pretrained(tmp_path).eval()
    assert loaded.region_class_prior is not None and not loaded.region_class_prior.weight.any()
    pixel_values = torch.randn(1, 3, REGION, 2 * REGION)
    with torch.no_grad():
        expected, found = old(pixel_values), loaded(pixel_values)
    torch.testing.assert_close(found.heatmap, expected.heatmap, rtol=0, atol=0)


def test_known_boxes_round_trip_through_dense_maps_and_post_processing():
    # One region's maps: two objects of different classes, sub-cell centres.
    maps = blank_maps(1, SIDE, SIDE)
    put_object(maps, 0, 2, 3.0, 13.0, 9.5, 10.0, 6.0)
    put_object(maps, 0, 0, 1.0, 22.5, 25.0, 4.0, 12.0)
    [found] = detections_from_dense_maps(maps, stride=STRIDE, threshold=0.5, max_detections=10)
    torch.testing.assert_close(found["scores"], torch.sigmoid(torch.tensor([3.0, 1.0])))
    assert found["labels"].tolist() == [2, 0]
    torch.testing.assert_close(found["boxes"], torch.tensor([[8.0, 6.5, 18.0, 12.5], [20.5, 19.0, 24.5, 31.0]]))
    # The threshold and the limit.
    assert len(detections_from_dense_maps(maps, stride=STRIDE, threshold=0.8, max_detections=10)[0]["scores"]) == 1
    assert len(detections_from_dense_maps(maps, stride=STRIDE, threshold=0.0, max_detections=1)[0]["scores"]) == 1

    # The same objects through the model's forward and the processor, on a 50 × 70 image resized to 64 × 96.
    processor = XTImageProcessor(region_size=REGION, do_resize=True, size={"height": 64, "width": 96})
    pixel_values = processor(np.zeros((50, 70, 3), np.uint8), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape[-2:] == (64, 96)
    model = XTForObjectDetection(detection_config()).eval()
    full = blank_maps(1, 64 // STRIDE, 96 // STRIDE)
    put_object(full, 0, 1, 4.0, 70.0, 40.0, 12.0, 8.0)  # inside region (1, 2)
    use_dense_maps(model, full)
    with torch.no_grad():
        outputs = model(pixel_values)
    torch.testing.assert_close(outputs.pred_boxes[0, 0], torch.tensor([70 / 96, 40 / 64, 12 / 96, 8 / 64]))
    assert torch.isinf(outputs.logits[0, 1:]).all() and (outputs.pred_boxes[0, 1:] == 0).all()
    [result] = processor.post_process_object_detection(outputs, threshold=0.5)
    torch.testing.assert_close(result["boxes"], torch.tensor([[64.0, 36.0, 76.0, 44.0]]))
    torch.testing.assert_close(result["scores"], torch.sigmoid(torch.tensor([4.0])))
    assert result["labels"].tolist() == [1]
    # Back to the original 50 × 70 image: the resize is undone.
    [original] = processor.post_process_object_detection(outputs, threshold=0.5, target_sizes=[(50, 70)])
    scale = torch.tensor([70 / 96, 50 / 64] * 2)
    torch.testing.assert_close(original["boxes"], torch.tensor([[64.0, 36.0, 76.0, 44.0]]) * scale)
    assert processor.post_process_object_detection(outputs, threshold=0.99)[0]["boxes"].shape == (0, 4)


def test_forward_equals_region_by_region_decoding_and_merge():
    config = detection_config(region_batch_size=2, detection_max_detections=20)
    model = XTForObjectDetection(config).eval()
    with torch.no_grad():  # some clear peaks, so that there is something to merge; a class prior that varies
        model.detection_head.heatmap[-1].bias.fill_(0.0)
        model.region_class_prior.weight.normal_(std=0.5)
    height, width = 2 * REGION + 5, 2 * REGION
    pixel_values = torch.randn(2, 3, height, width)
    with torch.no_grad():
        outputs = model(pixel_values)
        encoded = model.xt(pixel_values, output_region_features=True)
        rows, cols = region_grid_shape(height, width, REGION)
        features = encoded.region_feature_maps
        context = encoded.last_hidden_state.transpose(1, 2).reshape(2, -1, *features[-1].shape[-2:])
        found = [[], []]
        for index in region_batches(2, rows, cols, config.region_batch_size):
            maps = model.decode_regions([nested_tokenize(f, index) for f in features], nested_tokenize(context, index))
            # Each region's maps are the forward's maps at that region's place.
            for region_maps, image, row, col in zip(maps, index.image, index.row, index.col):
                expected = torch.cat([outputs.heatmap, outputs.box_sizes, outputs.box_offsets], dim=1)[
                    image, :, row * SIDE : (row + 1) * SIDE, col * SIDE : (col + 1) * SIDE]
                torch.testing.assert_close(region_maps[:, : expected.shape[1], : expected.shape[2]], expected,
                                           rtol=0, atol=0)
            detections = detections_from_dense_maps(maps, stride=STRIDE, threshold=config.detection_threshold,
                                                    max_detections=config.detection_max_detections)
            for region_found, image, row, col in zip(detections, index.image, index.row, index.col):
                found[int(image)].append((region_found, (int(col) * REGION, int(row) * REGION)))
    for image in range(2):
        merged = merge_region_detections([d for d, _ in found[image]], [o for _, o in found[image]],
                                         iou_threshold=config.detection_nms_iou,
                                         max_detections=config.detection_max_detections, image_size=(height, width))
        count = len(merged["scores"])
        assert 0 < count <= config.detection_max_detections
        scores, labels = outputs.logits[image, :count].sigmoid().max(dim=-1)
        torch.testing.assert_close(scores, merged["scores"])
        assert labels.tolist() == merged["labels"].tolist()
        boxes = merged["boxes"]
        expected = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], dim=-1)
        torch.testing.assert_close(outputs.pred_boxes[image, :count], expected / torch.tensor([width, height] * 2))
        assert torch.isinf(outputs.logits[image, count:]).all()


def test_an_object_split_by_a_region_border_is_detected_once():
    full = blank_maps(1, SIDE, 2 * SIDE)
    # Region 0 sees the object centred at x = 30 (x 22-38); region 1 sees its part centred at x = 33 (x 26-40):
    # IoU 2/3. Another class in the same place is another object.
    put_object(full, 0, 1, 3.0, 30.0, 16.0, 16.0, 10.0)
    put_object(full, 0, 1, 2.0, 33.0, 16.0, 14.0, 10.0)
    put_object(full, 0, 2, 1.0, 38.0, 16.0, 14.0, 10.0)
    regions = [full[..., :SIDE], full[..., SIDE:]]
    per_region = [detections_from_dense_maps(r, stride=STRIDE, threshold=0.5, max_detections=5)[0] for r in regions]
    assert [len(d["scores"]) for d in per_region] == [1, 2]  # each region on its own reports the object
    merged = merge_region_detections(per_region, [(0, 0), (REGION, 0)], iou_threshold=0.5, max_detections=5)
    assert merged["labels"].tolist() == [1, 2]
    torch.testing.assert_close(merged["boxes"][0], torch.tensor([22.0, 11.0, 38.0, 21.0]))
    torch.testing.assert_close(merged["scores"][0], torch.sigmoid(torch.tensor(3.0)))

    # The model's forward merges the same way.
    model = XTForObjectDetection(detection_config()).eval()
    use_dense_maps(model, full)
    with torch.no_grad():
        outputs = model(torch.zeros(1, 3, REGION, 2 * REGION))
    [result] = XTImageProcessor(region_size=REGION).post_process_object_detection(outputs, threshold=0.5)
    assert result["labels"].tolist() == [1, 2]
    torch.testing.assert_close(result["boxes"], merged["boxes"])


def test_detections_centred_in_the_padding_are_dropped_and_boxes_clipped():
    full = blank_maps(1, SIDE, SIDE)
    put_object(full, 0, 0, 3.0, 10.0, 29.0, 8.0, 8.0)  # centre below a 24-px-high image
    put_object(full, 0, 1, 3.0, 10.0, 20.0, 8.0, 12.0)  # reaches past its bottom
    found = detections_from_dense_maps(full, stride=STRIDE, threshold=0.5, max_detections=5)
    merged = merge_region_detections(found, [(0, 0)], iou_threshold=0.5, max_detections=5, image_size=(24, REGION))
    assert merged["labels"].tolist() == [1]
    torch.testing.assert_close(merged["boxes"], torch.tensor([[6.0, 14.0, 14.0, 24.0]]))


def test_post_processing_to_the_original_size_drops_detections_in_the_padding():
    processor = XTImageProcessor(region_size=REGION)
    pixel_values = processor(np.zeros((40, 50, 3), np.uint8), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape[-2:] == (64, 64)
    model = XTForObjectDetection(detection_config()).eval()
    full = blank_maps(1, 16, 16)
    put_object(full, 0, 0, 3.0, 20.0, 20.0, 8.0, 8.0)
    put_object(full, 0, 1, 2.0, 46.0, 30.0, 12.0, 8.0)  # reaches past the right edge at x = 50
    put_object(full, 0, 2, 1.0, 56.0, 20.0, 8.0, 8.0)  # centred in the padding
    use_dense_maps(model, full)
    with torch.no_grad():
        outputs = model(pixel_values)
    assert processor.post_process_object_detection(outputs)[0]["labels"].tolist() == [0, 1, 2]
    [result] = processor.post_process_object_detection(outputs, target_sizes=torch.tensor([[40, 50]]))
    assert result["labels"].tolist() == [0, 1]
    torch.testing.assert_close(result["boxes"], torch.tensor([[16.0, 16.0, 24.0, 24.0], [40.0, 26.0, 50.0, 34.0]]))
    assert processor.post_process_object_detection(outputs, top_k=1)[0]["labels"].tolist() == [0]


def squares_dataset(count: int = 2, size: int = 2 * REGION):
    """Images with bright squares of class 0 and dark-framed squares of class 1, and their labels."""
    generator = torch.Generator().manual_seed(0)
    images, labels = [], []
    for _ in range(count):
        image = torch.zeros(3, size, size)
        boxes, classes = [], []
        for label in (0, 1, 0):
            side = int(torch.randint(8, 16, (), generator=generator))
            x, y = (int(v) for v in torch.randint(0, size - side, (2,), generator=generator))
            image[:, y : y + side, x : x + side] = 2.0 if label == 0 else -2.0
            boxes.append([(x + side / 2) / size, (y + side / 2) / size, side / size, side / size])
            classes.append(label)
        images.append(image)
        labels.append({"class_labels": torch.tensor(classes), "boxes": torch.tensor(boxes)})
    return torch.stack(images), labels


def test_loss_falls_on_a_tiny_set():
    model = XTForObjectDetection(detection_config()).train()
    pixel_values, labels = squares_dataset()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        outputs = model(pixel_values, labels=labels)
        optimizer.zero_grad()
        outputs.loss.backward()
        optimizer.step()
        losses.append(outputs.loss.item())
    assert set(outputs.loss_dict) == {"loss_heatmap", "loss_size", "loss_offset"}
    assert all(math.isfinite(loss) for loss in losses)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


def test_images_without_objects_train():
    model = XTForObjectDetection(detection_config()).train()
    empty = {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    pixel_values, labels = squares_dataset(1)
    outputs = model(torch.cat([pixel_values, torch.randn(1, 3, 2 * REGION, 2 * REGION)]), labels=[labels[0], empty])
    assert torch.isfinite(outputs.loss)
    outputs = model(torch.randn(2, 3, REGION, REGION), labels=[empty, empty])
    assert torch.isfinite(outputs.loss) and outputs.loss > 0
    assert outputs.loss_dict["loss_size"] == 0 and outputs.loss_dict["loss_offset"] == 0
    outputs.loss.backward()
    assert model.detection_head.heatmap[-1].bias.grad.abs().sum() > 0
    # Empty lists count as no objects too.
    assert torch.isfinite(model(torch.randn(1, 3, REGION, REGION), labels=[{"class_labels": [], "boxes": []}]).loss)
    # Targets: an all-zero heatmap for the empty image, exactly 1 at each object's centre cell otherwise.
    heatmap, centres = centernet_targets([empty, labels[0]], NUM_LABELS, (16, 16), (64, 64), STRIDE)
    assert heatmap[0].sum() == 0 and (heatmap[1] == 1).sum() == 3


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ({"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}, "one dict per image"),
        ([{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}] * 2, "batch has 1"),
        ([{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}], "'class_labels' and 'boxes'"),
        ([{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 1.5, 0.1, 0.1]])}], "outside [0, 1]"),
        ([{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.0, 0.1]])}], "non-positive"),
        ([{"class_labels": torch.tensor([3]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}], "in [0, 3)"),
        ([{"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}], "(m, 4)"),
        ([{"class_labels": torch.tensor([0.0]), "boxes": torch.tensor([[0.5, 0.5, 0.1, 0.1]])}], "integers"),
        ([{"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, float("nan"), 0.1, 0.1]])}], "NaN"),
    ],
)
def test_bad_labels_raise_naming_the_problem(labels, message):
    model = XTForObjectDetection(detection_config())
    with pytest.raises(ValueError, match=re.escape(message)):
        model(torch.randn(1, 3, REGION, REGION), labels=labels)


@pytest.mark.parametrize("processor_class", [XTImageProcessorPil, XTImageProcessor])
def test_annotation_boxes_follow_resize_and_padding(processor_class):
    images = [np.zeros((40, 50, 3), np.uint8), np.zeros((33, 40, 3), np.uint8)]
    annotations = [
        {"image_id": 1, "annotations": [{"bbox": [10, 5, 20, 10], "category_id": 2},
                                        {"bbox": [45, 30, 20, 20], "category_id": 1},  # clipped at the image
                                        {"bbox": [0, 0, 4, 4], "category_id": 0, "iscrowd": 1}]},
        {"image_id": 2, "annotations": []},
    ]
    # No resize: a 40 × 50 image padded (with the batch) to 64 × 64.
    plain = processor_class(region_size=REGION)(images, annotations=annotations, return_tensors="pt")
    assert plain["pixel_values"].shape[-2:] == (64, 64)
    first = plain["labels"][0]
    assert first["class_labels"].tolist() == [2, 1] and first["image_id"].tolist() == [1]
    torch.testing.assert_close(first["boxes"], torch.tensor([[20, 10, 20, 10], [47.5, 35, 5, 10]]) / 64)
    assert first["orig_size"].tolist() == [40, 50] and first["size"].tolist() == [40, 50]
    assert plain["labels"][1]["boxes"].shape == (0, 4) and plain["labels"][1]["class_labels"].shape == (0,)

    # Resized to 80 × 100 (× 2), padded to 96 × 128.
    resized = processor_class(region_size=REGION, do_resize=True, size={"height": 80, "width": 100})
    out = resized(images[0], annotations=annotations[0], return_tensors="pt")
    assert out["pixel_values"].shape[-2:] == (96, 128)
    boxes = torch.tensor([[40, 20, 40, 20], [95, 70, 10, 20]]) / torch.tensor([128, 96, 128, 96])
    torch.testing.assert_close(out["labels"][0]["boxes"], boxes.float())
    assert out["labels"][0]["size"].tolist() == [80, 100]
    # Without return_tensors, NumPy; both backends give the same labels.
    other = XTImageProcessorPil if processor_class is XTImageProcessor else XTImageProcessor
    reference = other(region_size=REGION, do_resize=True, size={"height": 80, "width": 100})(
        images[0], annotations=annotations[0])
    np.testing.assert_array_equal(reference["labels"][0]["boxes"], out["labels"][0]["boxes"].numpy())
    # The labels train the model as they are.
    model = XTForObjectDetection(detection_config())
    assert torch.isfinite(model(plain["pixel_values"], labels=plain["labels"]).loss)

    with pytest.raises(ValueError, match="'bbox' of 4"):
        processor_class(region_size=REGION)(images[0],
                                            annotations={"annotations": [{"bbox": [1, 2], "category_id": 0}]})
    with pytest.raises(ValueError, match="category_id"):
        processor_class(region_size=REGION)(images[0], annotations={"annotations": [{"bbox": [1, 2, 3, 4]}]})
    with pytest.raises(ValueError, match="2 annotations for 1 images"):
        processor_class(region_size=REGION)(images[0], annotations=annotations)


@pytest.fixture
def saved_detector(tmp_path):
    model = XTForObjectDetection(detection_config()).eval()
    with torch.no_grad():
        model.detection_head.heatmap[-1].bias.copy_(torch.tensor([0.5, -0.5, 0.0]))
    folder = tmp_path / "xt-detector"
    model.save_pretrained(folder)
    XTImageProcessor(region_size=REGION).save_pretrained(folder)
    return model, folder


def test_save_and_load_round_trip(saved_detector):
    model, folder = saved_detector
    loaded = AutoModelForObjectDetection.from_pretrained(folder).eval()
    assert type(loaded) is XTForObjectDetection
    assert loaded.config.detection_nms_iou == 0.5 and loaded.config.decoder_output_stride == STRIDE
    pixel_values = torch.randn(1, 3, REGION + 3, 2 * REGION)
    with torch.no_grad():
        expected, got = model(pixel_values), loaded(pixel_values)
    for name in ("logits", "pred_boxes", "heatmap", "box_sizes", "box_offsets"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=0, atol=0)


def test_object_detection_pipeline_on_a_saved_folder(saved_detector):
    model, folder = saved_detector
    detector = pipeline("object-detection", model=str(folder))
    assert isinstance(detector.model, XTForObjectDetection)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 90, 3), dtype=np.uint8))
    predictions = detector(image, threshold=0.3)
    processor = XTImageProcessor(region_size=REGION)
    with torch.no_grad():
        outputs = model(**processor(image, return_tensors="pt"))
    [expected] = processor.post_process_object_detection(outputs, threshold=0.3, target_sizes=[(50, 90)])
    assert len(predictions) == len(expected["scores"]) > 0
    assert [p["label"] for p in predictions] == [f"class_{i}" for i in expected["labels"].tolist()]
    np.testing.assert_allclose([p["score"] for p in predictions], expected["scores"].numpy(), rtol=0, atol=1e-6)
    for prediction, box in zip(predictions, expected["boxes"].int().tolist()):
        assert [prediction["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")] == box
        assert 0 <= box[0] <= box[2] <= 90 and 0 <= box[1] <= box[3] <= 50


def test_remote_code_detector_loads_where_xt_hf_is_not_importable(saved_detector, tmp_path):
    model, folder = saved_detector
    assert (folder / "detection_head.py").is_file()
    pixel_values = torch.randn(1, 3, REGION + 7, 2 * REGION)
    with torch.no_grad():
        expected = model(pixel_values)
    torch.save(pixel_values, tmp_path / "pixel_values.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["xt_hf"] = None  # this interpreter cannot import the package
        import torch
        from transformers import AutoImageProcessor, AutoModelForObjectDetection
        model = AutoModelForObjectDetection.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert not type(model).__module__.startswith("xt_hf"), type(model).__module__
        with torch.no_grad():
            outputs = model(torch.load({str(tmp_path / "pixel_values.pt")!r}))
        results = processor.post_process_object_detection(outputs, threshold=0.3)
        torch.save((outputs.logits, outputs.pred_boxes, results[0]["boxes"]), {str(tmp_path / "outputs.pt")!r})
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    logits, pred_boxes, boxes = torch.load(tmp_path / "outputs.pt")
    torch.testing.assert_close(logits, expected.logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(pred_boxes, expected.pred_boxes, rtol=0, atol=1e-6)
    [local] = XTImageProcessor(region_size=REGION).post_process_object_detection(expected, threshold=0.3)
    torch.testing.assert_close(boxes, local["boxes"], rtol=0, atol=1e-4)


def test_detection_config_fields_are_checked():
    for field, value in (("detection_nms_iou", 0.0), ("detection_threshold", 1.0), ("detection_max_detections", 0),
                         ("detection_size_loss_weight", -1.0), ("detection_region_class_prior", "yes")):
        with pytest.raises(ValueError, match=field):
            detection_config(**{field: value})
