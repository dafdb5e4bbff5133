"""The beacon-zones detection task: boxes are easy and exact, each class follows the nearer beacon, and
nothing in a vessel's own region (nor its position) tells the classes apart."""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import pytest

from xt_hf.synthetic.detection import (
    LABELS,
    RED,
    VESSEL,
    YELLOW,
    DetectionSample,
    generate_dataset,
    generate_sample,
    sample_rng,
    zone_label,
)

SMALL = dict(image_size=256, region_size=64)  # 4 × 4 regions, a quarter of the default's pixels: fast


@lru_cache(maxsize=None)
def scenes(split: str, count: int) -> tuple[DetectionSample, ...]:
    """SMALL scenes shared by the statistical tests (the symmetry that makes the classes alike does not
    depend on the sizes; the rule and box tests cover the defaults too)."""
    return tuple(generate_sample(sample_rng(0, split, index), **SMALL) for index in range(count))


def vessel_rows(samples, region: int = SMALL["region_size"]):
    """Per vessel: its label, and what a model that sees only the vessel's region could measure there."""
    labels, features = [], []
    for sample in samples:
        for (x, y, w, h), label, (row, col) in zip(sample.boxes.astype(int), sample.labels, sample.regions):
            window = sample.image[row * region : (row + 1) * region, col * region : (col + 1) * region].astype(float)
            vessels = np.zeros((region, region), dtype=bool)  # every vessel in this region
            for (vx, vy, vw, vh), other in zip(sample.boxes.astype(int), sample.regions):
                if tuple(other) == (row, col):
                    top, left = vy - row * region, vx - col * region
                    vessels[top : top + vh, left : left + vw] = True
            inside = sample.image[y : y + h, x : x + w].reshape(-1, 3).astype(float)
            sea, pixels = window[~vessels], window.reshape(-1, 3)
            features.append(np.concatenate([
                inside.mean(0), inside.std(0),  # 0-5: the vessel itself
                sea.mean(0), sea.std(0),  # 6-11: the sea around it, in its region
                pixels.mean(0), pixels.std(0),  # 12-17: the whole region, its vessels included
                [w, x - col * region, y - row * region, vessels.sum() / w / h],  # 18-21: size, place, crowding
                [row, col],  # 22-23: where the region is, a position embedding's view
            ]))
            labels.append(label)
    return np.array(labels), np.array(features)


@pytest.mark.parametrize("options", [{}, SMALL], ids=["default", "small"])
def test_every_class_follows_the_nearer_beacon(options):
    """The out-of-region cue decides every class, never by a hair, and no vessel shares a beacon's region."""
    region, margin = options.get("region_size", 128), 16.0
    seen = 0
    for index in range(12):
        sample = generate_sample(sample_rng(1, "train", index), **options)
        red, yellow = sample.beacon_centers
        for box, label, distances, (row, col) in zip(sample.boxes, sample.labels, sample.distances, sample.regions):
            center = (box[0] + box[2] / 2, box[1] + box[3] / 2)
            assert label == zone_label(center, red, yellow)
            assert distances == pytest.approx([np.hypot(center[0] - red[0], center[1] - red[1]),
                                               np.hypot(center[0] - yellow[0], center[1] - yellow[1])])
            assert abs(distances[0] - distances[1]) >= margin
            assert (row, col) not in sample.beacon_regions
            # Wholly inside its region, which also holds no beacon pixel.
            assert col * region <= box[0] and box[0] + box[2] <= (col + 1) * region
            assert row * region <= box[1] and box[1] + box[3] <= (row + 1) * region
            seen += 1
        for (bx, by), (row, col), colour in zip(sample.beacon_centers, sample.beacon_regions, (RED, YELLOW)):
            assert (col * region + sample.beacon_radius < bx < (col + 1) * region - sample.beacon_radius
                    and row * region + sample.beacon_radius < by < (row + 1) * region - sample.beacon_radius)
            disc = sample.image[int(by) - 3 : int(by) + 3, int(bx) - 3 : int(bx) + 3].reshape(-1, 3).astype(float)
            np.testing.assert_allclose(disc.mean(0), colour, atol=12)
    assert seen >= 20


def test_one_beacon_gives_every_vessel_its_colour_and_each_colour_half_the_scenes():
    """`num_beacons=1`: the whole scene is the zone of its only beacon, a fair coin decides its colour, and
    no vessel shares its region."""
    region = SMALL["region_size"]
    colours = []
    for index in range(200):
        sample = generate_sample(sample_rng(5, "train", index), num_beacons=1, num_objects=(2, 4), **SMALL)
        (label,) = sample.beacon_labels
        (bx, by), (row, col) = sample.beacon_centers[0], sample.beacon_regions[0]
        assert (sample.labels == label).all() and len(sample.labels) >= 2
        assert np.isinf(sample.distances[:, 1 - label]).all() and np.isfinite(sample.distances[:, label]).all()
        assert all(tuple(cell) != (row, col) for cell in sample.regions)
        disc = sample.image[int(by) - 3 : int(by) + 3, int(bx) - 3 : int(bx) + 3].reshape(-1, 3).astype(float)
        np.testing.assert_allclose(disc.mean(0), (RED, YELLOW)[label], atol=12)
        assert col * region < bx < (col + 1) * region
        colours.append(label)
    assert 0.4 < np.mean(colours) < 0.6


def test_two_beacons_remain_the_default_and_draw_the_same_scenes():
    """The single-beacon option changed nothing for the default two beacons: the scene below is the one the
    generator drew before the option existed (its pixels' SHA-256 and first boxes, recorded then)."""
    import hashlib

    sample = generate_sample(sample_rng(6, "train", 0), num_beacons=2, **SMALL)
    assert sample.beacon_labels == (0, 1) and len(sample.beacon_centers) == 2
    assert hashlib.sha256(sample.image.tobytes()).hexdigest()[:16] == "021d0279a48e9f62"
    assert sample.boxes.tolist()[:2] == [[198.0, 42.0, 11.0, 11.0], [214.0, 14.0, 14.0, 14.0]]


@pytest.mark.parametrize("options", [{}, SMALL], ids=["default", "small"])
def test_boxes_lie_inside_the_image_cover_the_vessels_and_do_not_overlap(options):
    size = options.get("image_size", 512)
    for index in range(12):
        sample = generate_sample(sample_rng(2, "train", index), **options)
        assert sample.image.shape == (size, size, 3) and sample.image.dtype == np.uint8
        assert sample.boxes.shape == (len(sample.labels), 4) and sample.labels.dtype == np.int64
        bright = np.zeros((size, size), dtype=bool)
        for x, y, w, h in sample.boxes:
            assert w > 0 and h > 0 and 8 <= w <= 16 and w == h
            assert x >= 0 and y >= 0 and x + w <= size and y + h <= size
            assert x == int(x) and y == int(y)  # whole pixels: the box is exactly the vessel
            assert not bright[int(y) : int(y + h), int(x) : int(x + w)].any()
            bright[int(y) : int(y + h), int(x) : int(x + w)] = True
        # The vessels are what stands out: white inside every box, and outside the boxes nothing is (the sea
        # is blue, the beacons red and yellow), so finding the boxes is easy.
        if bright.any():
            np.testing.assert_allclose(sample.image[bright].mean(0), VESSEL, atol=3)
        assert np.mean(sample.image[~bright].min(axis=-1) > 128) < 1e-3


def test_generation_is_deterministic_per_seed_split_and_index():
    first = generate_sample(sample_rng(3, "test", 5), **SMALL)
    again = generate_sample(sample_rng(3, "test", 5), **SMALL)
    other = generate_sample(sample_rng(4, "test", 5), **SMALL)
    assert np.array_equal(first.image, again.image)
    assert np.array_equal(first.boxes, again.boxes) and np.array_equal(first.labels, again.labels)
    assert first.beacon_centers == again.beacon_centers
    assert not np.array_equal(first.image, other.image)


def test_both_classes_are_about_equally_common_and_some_scenes_hold_no_vessel():
    samples = scenes("validation", 400)
    counts = np.bincount(np.concatenate([s.labels for s in samples]), minlength=len(LABELS))
    assert counts.sum() > 1000
    assert 0.45 < counts[0] / counts.sum() < 0.55, counts
    # Vessels of one scene often share a zone, so the scenes are the independent draws: the per-scene
    # excess of red-zone vessels has mean 0 (the colours are a fair coin), well within 3 standard errors.
    excess = np.array([np.sum(s.labels == 0) - np.sum(s.labels == 1) for s in samples])
    assert abs(excess.mean()) < 3 * excess.std() / np.sqrt(len(excess)), (excess.mean(), excess.std())
    per_scene = np.bincount([len(s.labels) for s in samples])
    assert len(per_scene) == 7 and per_scene.min() > 30  # 0–6 vessels, about a seventh of the scenes empty
    assert {tuple(sorted(set(s.labels.tolist()))) for s in samples} >= {(0,), (1,), (0, 1)}  # mixed scenes too


def test_a_vessels_own_region_looks_the_same_in_both_classes():
    """Per class, the mean of every statistic of a vessel and of its region (colour mean and spread of the
    vessel, of the sea around it and of the whole region; size, place in the region, crowding, and where the
    region is) agrees to a small fraction of its spread, and colours to a fraction of a grey level."""
    labels, features = vessel_rows(scenes("validation", 400))
    red_zone, yellow_zone = features[labels == 0].mean(0), features[labels == 1].mean(0)
    gap = np.abs(red_zone - yellow_zone)
    # Sampling noise only: ~0.05 of a spread at this count (each under 0.04 with 3000 scenes).
    assert np.all(gap < 0.15 * features.std(0)), gap / features.std(0)
    assert np.all(gap[0:3] < 0.3) and np.all(gap[3:6] < 0.2)  # the vessel: 14-σ noise over ~150 pixels
    assert np.all(gap[6:12] < 0.1)  # the sea around it: the same noise everywhere, over ~4000 pixels
    assert np.all(gap[12:18] < 0.5) and gap[18] < 0.5  # the region as a whole; the vessel's side (px)


def test_a_classifier_of_the_vessels_region_is_at_chance_and_one_of_the_beacons_is_perfect():
    """Nearest class mean over the region statistics (standardised), fitted on one set of scenes and scored
    on another: chance. The same classifier given the two beacon distances instead: every vessel right."""
    labels, features = vessel_rows(scenes("validation", 400))
    held_labels, held_features = vessel_rows(scenes("test", 200))
    mean, std = features.mean(0), features.std(0) + 1e-9

    def accuracy(train, train_labels, test, test_labels):
        centroids = np.stack([train[train_labels == k].mean(0) for k in (0, 1)])
        guess = np.argmin(((test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
        return float(np.mean(guess == test_labels))

    local = accuracy((features - mean) / std, labels, (held_features - mean) / std, held_labels)
    assert len(held_labels) > 500 and 0.44 < local < 0.56, local

    def context(samples):  # how much nearer the yellow beacon than the red one
        return np.concatenate([s.distances[:, :1] - s.distances[:, 1:] for s in samples])

    assert accuracy(context(scenes("validation", 400)), labels, context(scenes("test", 200)), held_labels) == 1.0


def test_crowded_settings_still_end_placing_fewer_vessels():
    """No rejection loop: asking for more vessels than fit ends at once with as many as fit."""
    start = time.perf_counter()
    sample = generate_sample(sample_rng(0, "train", 0), num_objects=(500, 500), **SMALL)
    assert time.perf_counter() - start < 10
    assert 0 < len(sample.labels) < 500


@pytest.mark.parametrize("options, message", [
    (dict(image_size=250, region_size=64), "multiple of region_size"),
    (dict(image_size=128, region_size=128), "at least 3 regions"),
    (dict(object_size=(8, 70), **SMALL), "object_size"),
    (dict(beacon_radius=40.0, **SMALL), "does not fit"),
    (dict(num_beacons=3, **SMALL), "num_beacons must be 1"),
])
def test_impossible_settings_raise(options, message):
    with pytest.raises(ValueError, match=message):
        generate_sample(sample_rng(0, "train", 0), **options)


def test_dataset_rows_hold_coco_annotations_and_the_class_names():
    from datasets import ClassLabel, Image

    dataset = generate_dataset(2, 1, num_validation=1, seed=4, **SMALL)
    assert list(dataset) == ["train", "validation", "test"]
    features = dataset["train"].features
    assert isinstance(features["image"], Image)
    category = features["objects"]["annotations"].feature["category_id"]
    assert isinstance(category, ClassLabel) and category.names == list(LABELS)
    for index in range(2):
        row = dataset["train"][index]
        expected = generate_sample(sample_rng(4, "train", index), **SMALL)
        assert row["image"].mode == "RGB" and np.array_equal(np.asarray(row["image"]), expected.image)
        assert row["objects"] == expected.annotations(image_id=index)
        for annotation, (x, y, w, h) in zip(row["objects"]["annotations"], expected.boxes):
            assert annotation["bbox"] == [x, y, w, h] and annotation["area"] == w * h
            assert annotation["iscrowd"] == 0


def test_command_line_writes_loadable_splits_that_the_seed_reproduces(tmp_path):
    from datasets import load_from_disk

    from xt_hf.synthetic.detection import main

    main(["--output", str(tmp_path), "--train", "2", "--validation", "1", "--test", "1", "--seed", "7",
          "--image-size", "256", "--region-size", "64", "--objects", "3", "3"])
    saved = load_from_disk(str(tmp_path))
    assert {name: len(split) for name, split in saved.items()} == {"train": 2, "validation": 1, "test": 1}
    expected = generate_sample(sample_rng(7, "train", 1), num_objects=(3, 3), **SMALL)
    assert len(expected.labels) == 3
    row = saved["train"][1]
    np.testing.assert_array_equal(np.asarray(row["image"]), expected.image)
    assert row["objects"] == expected.annotations(image_id=1)
