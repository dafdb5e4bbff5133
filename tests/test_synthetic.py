"""The synthetic relation task: labels follow the markers, and nothing order-free gives the label away."""

from __future__ import annotations

import numpy as np
import pytest

from xt_hf.synthetic.relations import BLUE, LABELS, RED, generate_dataset, generate_sample, relation_label, sample_rng


def colour_cells(image: np.ndarray, colour, region: int) -> set[tuple[int, int]]:
    mask = (image == np.asarray(colour, dtype=np.uint8)).all(-1)
    rows, cols = np.nonzero(mask)
    return {(int(r) // region, int(c) // region) for r, c in zip(rows, cols)}


@pytest.mark.parametrize("index", range(6))
def test_markers_sit_where_the_sample_says_and_decide_the_label(index):
    sample = generate_sample(sample_rng(0, "train", index), image_size=512, region_size=64,
                             marker_radius=(8, 14), clutter_radius=(4, 12))
    assert sample.image.shape == (512, 512, 3) and sample.image.dtype == np.uint8
    assert colour_cells(sample.image, RED, 64) == set(sample.red_regions)
    assert colour_cells(sample.image, BLUE, 64) == set(sample.blue_regions)
    assert len(sample.red_regions) == len(sample.blue_regions) == 4
    # Every red disc has the same relation to every blue disc.
    assert {relation_label(r, b) for r in sample.red_centers for b in sample.blue_centers} == {sample.label}
    assert sample.label_name == LABELS[sample.label]


def test_samples_are_reproducible_one_by_one_and_splits_differ():
    first = generate_sample(sample_rng(3, "train", 7), image_size=512, region_size=64, marker_radius=(8, 14),
                            clutter_radius=(4, 12))
    again = generate_sample(sample_rng(3, "train", 7), image_size=512, region_size=64, marker_radius=(8, 14),
                            clutter_radius=(4, 12))
    other = generate_sample(sample_rng(3, "test", 7), image_size=512, region_size=64, marker_radius=(8, 14),
                            clutter_radius=(4, 12))
    np.testing.assert_array_equal(first.image, again.image)
    assert not np.array_equal(first.image, other.image)


def test_labels_are_balanced():
    labels = [generate_sample(sample_rng(0, "validation", i), image_size=512, region_size=64,
                              marker_radius=(8, 14), clutter_radius=(4, 12), clutter_per_region=(0, 0)).label
              for i in range(400)]
    counts = np.bincount(labels, minlength=4)
    assert counts.min() > 70, counts  # 100 expected each; 70 is ~3.5 standard deviations away


def test_single_marker_variant_and_non_square_images():
    sample = generate_sample(sample_rng(0, "train", 0), image_size=(384, 640), region_size=64, markers_per_colour=1,
                             marker_radius=(8, 14), clutter_radius=(4, 12))
    assert sample.image.shape == (384, 640, 3)
    assert len(sample.red_regions) == len(sample.blue_regions) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(image_size=500, region_size=64), "multiples of region_size"),
    (dict(image_size=256, region_size=64), "at least 6 regions"),
    (dict(image_size=512, region_size=64, markers_per_colour=10), "markers_per_colour"),
    (dict(image_size=512, region_size=64, marker_radius=(20, 40)), "fit inside one region"),
])
def test_impossible_layouts_raise_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        generate_sample(sample_rng(0, "train", 0), **kwargs)


def test_generated_dataset_has_image_and_class_label_columns(tmp_path):
    dataset = generate_dataset(3, 2, image_size=384, region_size=64, marker_radius=(8, 14), clutter_radius=(4, 12))
    assert {name: len(split) for name, split in dataset.items()} == {"train": 3, "test": 2}
    assert dataset["train"].features["label"].names == list(LABELS)
    row = dataset["test"][1]
    expected = generate_sample(sample_rng(0, "test", 1), image_size=384, region_size=64, marker_radius=(8, 14),
                               clutter_radius=(4, 12))
    np.testing.assert_array_equal(np.asarray(row["image"]), expected.image)
    assert row["label"] == expected.label


def test_a_saved_relations_classifier_scores_what_its_predictions_say(tmp_path):
    """`evaluate_saved_model` on a generated folder: the loss, top-1 and confusion matrix of the model's own
    predictions on the images as the processor prepares them."""
    import torch
    import torch.nn.functional as F
    from conftest import tiny_backbone_config, tiny_config

    from xt_hf import XTForImageClassification, XTImageProcessor
    from xt_hf.training.score import evaluate_saved_model, main

    options = dict(image_size=384, region_size=64, marker_radius=(8, 14), clutter_radius=(4, 12))
    generate_dataset(2, 5, **options).save_to_disk(tmp_path / "data")
    id2label = dict(enumerate(LABELS))
    config = tiny_config(region_size=64, backbone_config=tiny_backbone_config(out_features=["stage2"]), num_labels=4,
                         id2label=id2label, label2id={name: i for i, name in id2label.items()})
    model = XTForImageClassification(config).eval()
    model.save_pretrained(tmp_path / "model")
    XTImageProcessor(region_size=64).save_pretrained(tmp_path / "model")

    report = evaluate_saved_model(str(tmp_path / "model"), str(tmp_path / "data"), "test", batch_size=2)
    samples = [generate_sample(sample_rng(0, "test", i), **options) for i in range(5)]
    labels = torch.tensor([sample.label for sample in samples])
    processor = XTImageProcessor(region_size=64)
    with torch.no_grad():
        logits = model(**processor([s.image for s in samples], return_tensors="pt")).logits
    expected = np.zeros((4, 4), dtype=int)
    for label, guess in zip(labels.tolist(), logits.argmax(-1).tolist()):
        expected[label, guess] += 1
    assert report["confusion"] == expected.tolist() and report["labels"] == list(LABELS)
    assert report["images"] == 5 and report["top1"] == pytest.approx(np.trace(expected) / 5)
    assert report["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert main([str(tmp_path / "model"), "--dataset", str(tmp_path / "data"), "--batch-size", "2"]) == report
    with pytest.raises(ValueError, match="seed"):
        evaluate_saved_model(str(tmp_path / "model"), str(tmp_path / "data"), seed=0)


def test_a_changed_generator_never_returns_cached_old_data(tmp_path):
    """`datasets` caches generated splits by fingerprint: the generator's code is part of it."""
    from datasets import Features, Value

    from xt_hf.synthetic.splits import generated_splits

    generator = tmp_path / "generator.py"
    features = Features({"value": Value("int64")})

    def build(offset):
        return generated_splits("fingerprint-test", generator, {"train": 3}, features,
                                lambda rng: {"value": int(rng.integers(100)) + offset}, seed=0, settings=())

    generator.write_text("version = 1\n")
    first = build(0)["train"]["value"]
    generator.write_text("version = 2\n")
    changed = build(1000)["train"]["value"]
    assert [value - 1000 for value in changed] == first


def test_unknown_split_names_the_choices():
    with pytest.raises(ValueError, match="demo.*test.*train.*validation"):
        sample_rng(0, "holdout", 0)
