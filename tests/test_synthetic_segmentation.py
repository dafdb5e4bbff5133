"""The coastline task: labels follow the geometry, and a vessel's own region does not show its distance."""

from __future__ import annotations

import time

import numpy as np
import pytest

from xt_hf.synthetic.coastline import LABELS, _score_vessels, generate_dataset, generate_sample, sample_rng

SMALL = dict(image_size=192, region_size=32)  # 6 × 6 regions: room for both vessel classes
DEFAULT = dict(region_size=64)  # the generator's defaults: 512 px, near-shore below 2.5 regions, margin 0.25
# The measured setting of docs/segmentation.md: coast-free vessels about half near-shore, half offshore.
MEASURED = dict(image_size=256, region_size=32, near_distance=3.5, margin=0.5, num_vessels=(12, 20))


def brute_force_distance(land: np.ndarray, point: tuple[float, float]) -> float:
    rows, cols = np.nonzero(land)
    return float(np.sqrt((rows - point[0]) ** 2 + (cols - point[1]) ** 2).min())


@pytest.mark.parametrize("index", range(4))
def test_labels_match_the_geometry(index):
    region, near, margin, radius = 64, 2.5, 0.25, 6.0
    sample = generate_sample(sample_rng(0, "train", index), region_size=region, near_distance=near, margin=margin,
                             vessel_radius=radius)
    size = sample.image.shape[0]
    edge = {"left": sample.land[:, 0], "right": sample.land[:, -1], "top": sample.land[0], "bottom": sample.land[-1]}
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}[sample.land_side]
    assert edge[sample.land_side].all() and not edge[opposite].any()

    yy, xx = np.ogrid[:size, :size]
    covered = np.zeros((size, size), dtype=bool)
    assert sample.vessels
    for vessel in sample.vessels:
        distance = brute_force_distance(sample.land, vessel.center)
        assert distance == pytest.approx(vessel.distance, abs=1e-6)
        assert vessel.label == (1 if distance < near * region else 2)
        assert abs(distance - near * region) >= margin * region  # no vessel is borderline
        disc = (yy - vessel.center[0]) ** 2 + (xx - vessel.center[1]) ** 2 <= radius**2
        assert (sample.mask[disc] == vessel.label).all()
        assert not sample.land[disc].any()
        assert (sample.image[disc] == (235, 235, 225)).all()
        covered |= disc
    assert (sample.mask[~covered] == 0).all()  # background everywhere else, land and sea


def test_generation_is_deterministic_per_seed_split_and_index():
    first = generate_sample(sample_rng(3, "test", 5), **SMALL)
    again = generate_sample(sample_rng(3, "test", 5), **SMALL)
    other = generate_sample(sample_rng(3, "train", 5), **SMALL)
    assert np.array_equal(first.image, again.image) and np.array_equal(first.mask, again.mask)
    assert not np.array_equal(first.image, other.image)


@pytest.mark.parametrize("options", [DEFAULT, MEASURED], ids=["default", "measured"])
def test_sea_looks_the_same_near_the_coast_and_far_from_it(options):
    """Coast-free, vessel-free regions near the land and far from it have the same pixel statistics, so a
    region that shows no coast says nothing about how far the land is."""
    region, near = options["region_size"], options.get("near_distance", 2.5)
    statistics = {"near": [], "far": []}
    for index in range(6 if region == 64 else 24):
        sample = generate_sample(sample_rng(0, "validation", index), **options)
        cells = sample.image.shape[0] // region
        for row in range(cells):
            for col in range(cells):
                window = np.s_[row * region : (row + 1) * region, col * region : (col + 1) * region]
                if sample.land[window].any() or sample.mask[window].any():
                    continue
                centre = ((row + 0.5) * region, (col + 0.5) * region)
                key = "near" if brute_force_distance(sample.land, centre) < near * region else "far"
                pixels = sample.image[window].reshape(-1, 3).astype(float)
                statistics[key].append(np.concatenate([pixels.mean(0), pixels.std(0)]))
    near_stats, far_stats = np.array(statistics["near"]), np.array(statistics["far"])
    assert len(near_stats) >= 10 and len(far_stats) >= 10
    np.testing.assert_allclose(near_stats.mean(0), far_stats.mean(0), atol=0.5)  # noise σ 14: region means ±0.22


@pytest.mark.parametrize("options", [DEFAULT, MEASURED], ids=["default", "measured"])
def test_vessels_are_as_dense_near_the_coast_as_offshore(options):
    """Equal density: otherwise the number of vessels in a region would hint at its distance to the coast."""
    region, near, margin = options["region_size"], options.get("near_distance", 2.5), options.get("margin", 0.25)
    size = options.get("image_size", 512)
    vessels = {1: 0, 2: 0}
    area = {1: 0, 2: 0}  # admissible sea pixels of each band, on a 16-px lattice
    lattice = np.arange(8, size, 16)
    for index in range(16):
        sample = generate_sample(sample_rng(0, "validation", index), **options)
        for vessel in sample.vessels:
            vessels[vessel.label] += 1
        rows, cols = np.nonzero(sample.land[::4, ::4])  # distances to a 4-px subsample of the land: ±3 px
        for y in lattice:
            for x in lattice:
                distance = np.sqrt((4 * rows - y) ** 2 + (4 * cols - x) ** 2).min()
                if distance >= 8 and abs(distance - near * region) >= margin * region:
                    area[1 if distance < near * region else 2] += 1
    density_near, density_off = vessels[1] / area[1], vessels[2] / area[2]
    assert vessels[1] >= 30 and vessels[2] >= 30
    assert 0.75 < density_near / density_off < 1.33, (vessels, area)


def test_measured_setting_leaves_a_per_region_model_at_chance_on_coast_free_vessels():
    """Among vessels whose own region shows no land (the ones only context can place), near-shore and
    offshore are about equally common: a model that sees only its region gets about half of them right,
    not the ~70 % that always answering "offshore" got with the default bands."""
    region = MEASURED["region_size"]
    counts = np.zeros(3, dtype=int)
    for index in range(40):
        sample = generate_sample(sample_rng(0, "train", index), **MEASURED)
        for vessel in sample.vessels:
            row, col = int(vessel.center[0]) // region, int(vessel.center[1]) // region
            if not sample.land[row * region : (row + 1) * region, col * region : (col + 1) * region].any():
                counts[vessel.label] += 1
    assert counts[1] + counts[2] > 400
    assert 0.4 < counts[1] / (counts[1] + counts[2]) < 0.6, counts


def test_crowded_settings_still_end_placing_fewer_vessels():
    """No rejection loop: asking for more vessels than fit ends at once with as many as fit."""
    start = time.perf_counter()
    sample = generate_sample(sample_rng(0, "train", 0), num_vessels=(800, 800), vessel_radius=10.0, **SMALL)
    assert time.perf_counter() - start < 10
    assert 0 < len(sample.vessels) < 800


def test_sizes_that_leave_no_room_offshore_raise():
    with pytest.raises(ValueError, match="too little for offshore vessels"):
        generate_sample(sample_rng(0, "train", 0), image_size=128, region_size=32)


def test_dataset_has_image_and_mode_l_mask_columns():
    from datasets import Image

    dataset = generate_dataset(2, 1, num_validation=1, seed=4, **SMALL)
    assert list(dataset) == ["train", "validation", "test"]
    assert all(isinstance(dataset["train"].features[name], Image) for name in ("image", "mask"))
    row = dataset["train"][1]
    assert row["image"].mode == "RGB" and row["mask"].mode == "L"
    expected = generate_sample(sample_rng(4, "train", 1), **SMALL)
    assert np.array_equal(np.asarray(row["mask"]), expected.mask)
    assert np.array_equal(np.asarray(row["image"]), expected.image)
    assert set(np.unique(np.asarray(row["mask"]))) <= set(range(len(LABELS)))


def test_vessel_scoring_counts_each_vessel_once_by_whether_its_region_shows_land():
    sample = generate_sample(sample_rng(0, "train", 2), **SMALL)
    perfect = list(_score_vessels(sample, sample.mask.astype(np.int64), SMALL["region_size"]))
    swapped = np.where(sample.mask > 0, 3 - sample.mask, 0).astype(np.int64)  # every vessel in the other class
    assert len(perfect) == len(sample.vessels) and all(correct for _, correct in perfect)
    assert not any(correct for _, correct in _score_vessels(sample, swapped, SMALL["region_size"]))
    assert not any(correct for _, correct in _score_vessels(sample, np.zeros_like(swapped), SMALL["region_size"]))
    # An offshore vessel is ≥ 2.75 regions from land, so its own region (1.42 regions across) never shows land.
    groups = [group for group, _ in perfect]
    assert all(group == "region_shows_no_land" for group, v in zip(groups, sample.vessels) if v.label == 2)


def test_command_line_generates_the_vessel_count_it_is_given(tmp_path):
    from datasets import load_from_disk

    from xt_hf.synthetic.coastline import main

    main(["--output", str(tmp_path), "--train", "1", "--validation", "0", "--test", "2", "--image-size", "256",
          "--region-size", "32", "--vessels", "3", "3"])
    saved = load_from_disk(str(tmp_path))
    assert {name: len(split) for name, split in saved.items()} == {"train": 1, "test": 2}
    expected = generate_sample(sample_rng(0, "test", 1), image_size=256, region_size=32, num_vessels=(3, 3))
    assert len(expected.vessels) == 3
    np.testing.assert_array_equal(np.asarray(saved["test"][1]["mask"]), expected.mask)


def test_command_line_passes_the_band_options_to_the_generator(tmp_path):
    from datasets import load_from_disk

    from xt_hf.synthetic.coastline import main

    main(["--output", str(tmp_path), "--train", "1", "--validation", "0", "--test", "1", "--image-size", "256",
          "--region-size", "32", "--vessels", "12", "20", "--near-distance", "3.5", "--margin", "0.5",
          "--vessel-radius", "6"])
    expected = generate_sample(sample_rng(0, "train", 0), **MEASURED)
    np.testing.assert_array_equal(np.asarray(load_from_disk(str(tmp_path))["train"][0]["mask"]), expected.mask)
    assert {v.label for v in expected.vessels} == {1, 2}
    assert all(abs(v.distance - 3.5 * 32) >= 0.5 * 32 for v in expected.vessels)
