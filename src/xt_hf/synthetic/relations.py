"""A procedural large-image task that needs context: where are the red markers relative to the blue ones?

Each image is a grid of `region_size` cells (by default 1024 × 1024 px, 8 × 8 regions of 128 px). A group
of red discs and a group of blue discs (4 each by default, one disc per cell, each group inside the 3 × 3
cells around its centre) sit in cells apart in both rows and columns; every cell also holds distractor
clutter. The label says where the red group is relative to the blue one:

    0 "above-left"   1 "above-right"   2 "below-left"   3 "below-right"

Why a head that averages region features cannot solve it: every cell's content (background tint,
clutter, a disc's offset inside its cell) is drawn independently of where the cell is, so an image whose
marker cells are moved to any other admissible cells (for instance the red and blue groups swapped) is
exactly as likely. An order-free pool of per-region features therefore sees the same distribution for all
four labels (its best accuracy is chance, 25 %), whereas a context encoder that knows each token's
position can compare where the two colours are. Nothing countable leaks the label either: the numbers of
red and blue discs are fixed, and clutter counts, colours and sizes do not depend on it.

Groups rather than single markers, and markers larger than the clutter, because a from-scratch model learns
the relation far faster when each side of it is carried by several tokens that stand out clearly from the
rest (`markers_per_colour=1` gives the single-marker variant); docs/fine-tuning.md has the runs that
chose the disc sizes.

    python -m xt_hf.synthetic.relations --output data/relations --train 4000 --validation 256 --test 1000
    python -m xt_hf.training.score outputs/relations_xt/best --dataset data/relations   # held-out top-1
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from .splits import generated_splits, sample_rng

LABELS = ("above-left", "above-right", "below-left", "below-right")
RED = (220, 30, 30)
BLUE = (30, 50, 220)
# Distractor colours: far from both marker colours, so that colour alone tells a marker apart.
CLUTTER_COLOURS = ((40, 170, 60), (235, 215, 40), (245, 245, 245), (20, 20, 20), (20, 160, 160), (150, 150, 150))


@dataclass(frozen=True)
class RelationSample:
    """One generated image `(height, width, 3)` uint8, its label, and where the markers are."""

    image: np.ndarray
    label: int
    red_centers: tuple[tuple[int, int], ...]  # (row, column) of each red disc, in pixels
    blue_centers: tuple[tuple[int, int], ...]
    red_regions: tuple[tuple[int, int], ...]  # (region row, region column) of each red disc
    blue_regions: tuple[tuple[int, int], ...]

    @property
    def label_name(self) -> str:
        return LABELS[self.label]


def relation_label(red_center: tuple[float, float], blue_center: tuple[float, float]) -> int:
    """Index into `LABELS` of where `red_center` (row, column) lies relative to `blue_center`."""
    below = red_center[0] > blue_center[0]
    right = red_center[1] > blue_center[1]
    return 2 * int(below) + int(right)


def generate_sample(
    rng: np.random.Generator,
    *,
    image_size: int | tuple[int, int] = 1024,
    region_size: int = 128,
    markers_per_colour: int = 4,
    marker_radius: tuple[int, int] = (40, 56),
    clutter_per_region: tuple[int, int] = (0, 2),
    clutter_radius: tuple[int, int] = (6, 30),
) -> RelationSample:
    """Draw one image of `image_size` px (a side, or `(height, width)`), a grid of `region_size` cells.

    Every shape lies wholly inside one cell, and each cell is drawn independently of its position.
    """
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    spread = 1 if markers_per_colour > 1 else 0  # a group fills cells of the 3 × 3 block around its centre
    gap = 2 * spread + 1  # the groups' blocks are apart in rows and in columns
    minimum_cells = gap + 2 * spread + 1
    if height % region_size or width % region_size or min(height, width) // region_size < minimum_cells:
        raise ValueError(f"The image sides ({height}×{width}) must be multiples of region_size ({region_size}), "
                         f"at least {minimum_cells} regions each.")
    if not 1 <= markers_per_colour <= (2 * spread + 1) ** 2:
        raise ValueError(f"markers_per_colour must be in [1, 9], got {markers_per_colour}.")
    if 2 * marker_radius[1] + 2 > region_size or 2 * clutter_radius[1] + 2 > region_size:
        raise ValueError(f"Markers and clutter must fit inside one region of {region_size} px.")
    cell_rows, cell_cols = height // region_size, width // region_size
    image = np.empty((height, width, 3), dtype=np.uint8)
    base = rng.uniform(100, 160, size=3)  # a muted base colour for the whole image
    for cell_row in range(cell_rows):
        for cell_col in range(cell_cols):
            cell = _cell(image, (cell_row, cell_col), region_size)
            cell[:] = np.clip(base + rng.uniform(-15, 15, size=3), 0, 255).astype(np.uint8)
            for _ in range(rng.integers(clutter_per_region[0], clutter_per_region[1] + 1)):
                radius = rng.uniform(*clutter_radius)
                colour = CLUTTER_COLOURS[rng.integers(len(CLUTTER_COLOURS))]
                shape = "disc" if rng.random() < 0.5 else "square"
                _draw(cell, _inside(rng, radius, region_size), radius, colour, shape)

    # Every admissible pair of group centres, drawn uniformly: no rejection loop that could fail to end.
    centre_rows = np.arange(spread, cell_rows - spread)
    centre_cols = np.arange(spread, cell_cols - spread)
    pairs = [((r1, c1), (r2, c2)) for r1 in centre_rows for c1 in centre_cols for r2 in centre_rows for c2 in centre_cols
             if abs(int(r1) - int(r2)) >= gap and abs(int(c1) - int(c2)) >= gap]
    red_group, blue_group = pairs[rng.integers(len(pairs))]
    block = [(dr, dc) for dr in range(-spread, spread + 1) for dc in range(-spread, spread + 1)]
    centers, regions = {}, {}
    for name, group, colour in (("red", red_group, RED), ("blue", blue_group, BLUE)):
        chosen = rng.choice(len(block), size=markers_per_colour, replace=False)
        regions[name] = tuple((int(group[0] + block[i][0]), int(group[1] + block[i][1])) for i in sorted(chosen))
        centers[name] = []
        for region in regions[name]:
            radius = rng.uniform(*marker_radius)
            center = _inside(rng, radius, region_size)
            _draw(_cell(image, region, region_size), center, radius, colour, "disc")
            centers[name].append((int(round(region[0] * region_size + center[0])),
                                  int(round(region[1] * region_size + center[1]))))

    return RelationSample(
        image=image,
        # The blocks are apart in both axes, so every red disc has this relation to every blue one.
        label=relation_label(centers["red"][0], centers["blue"][0]),
        red_centers=tuple(centers["red"]),
        blue_centers=tuple(centers["blue"]),
        red_regions=regions["red"],
        blue_regions=regions["blue"],
    )


def generate_dataset(
    num_train: int,
    num_test: int,
    num_validation: int = 0,
    *,
    seed: int = 0,
    image_size: int = 1024,
    region_size: int = 128,
    **sample_options,
):
    """A `datasets.DatasetDict` of `train`, held-out `test` and (when asked for) `validation` splits, each with
    `image` (PNG) and `label` (ClassLabel) columns.

    `sample_options` go to `generate_sample` (marker and clutter sizes, markers per colour).
    """
    from datasets import ClassLabel, Features, Image

    def make_row(rng: np.random.Generator) -> dict:
        sample = generate_sample(rng, image_size=image_size, region_size=region_size, **sample_options)
        return {"image": sample.image, "label": sample.label}

    return generated_splits(
        "relations", __file__, {"train": num_train, "validation": num_validation, "test": num_test},
        Features({"image": Image(), "label": ClassLabel(names=list(LABELS))}), make_row,
        seed=seed, settings=(image_size, region_size, sorted(sample_options.items())),
    )


def _cell(image: np.ndarray, region: tuple[int, int], region_size: int) -> np.ndarray:
    """A view of one cell of the image."""
    return image[region[0] * region_size : (region[0] + 1) * region_size,
                 region[1] * region_size : (region[1] + 1) * region_size]


def _inside(rng: np.random.Generator, radius: float, region_size: int) -> tuple[float, float]:
    """A centre such that a shape of `radius` lies wholly inside the cell."""
    low, high = radius + 1, region_size - radius - 1
    return float(rng.uniform(low, high)), float(rng.uniform(low, high))


def _draw(cell: np.ndarray, center: tuple[float, float], radius: float, colour, shape: str) -> None:
    """Paint a disc or a square into `cell`, touching only its bounding box."""
    top, left = int(center[0] - radius), int(center[1] - radius)
    bottom, right = int(np.ceil(center[0] + radius)) + 1, int(np.ceil(center[1] + radius)) + 1
    rows, cols = np.ogrid[top:bottom, left:right]
    if shape == "disc":
        mask = (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2
    else:
        mask = (np.abs(rows - center[0]) <= radius * 0.85) & (np.abs(cols - center[1]) <= radius * 0.85)
    cell[top:bottom, left:right][mask] = colour


def shortcut_check(num_samples: int = 2000, *, seed: int = 0, image_size: int = 1024, region_size: int = 128,
                   ) -> dict[str, object]:
    """Look for label leaks that need no positions: per-class means of order-free image statistics (pixels of
    each colour, i.e. marker sizes and clutter amounts) and the held-out accuracy of a linear probe on them.

    Both should show nothing: equal means across classes and a probe at chance (25 %).
    """
    colours = {"red": RED, "blue": BLUE, **{f"clutter{i}": c for i, c in enumerate(CLUTTER_COLOURS)}}
    features, labels = [], []
    for index in range(num_samples):
        sample = generate_sample(sample_rng(seed, "validation", index), image_size=image_size, region_size=region_size)
        pixels = sample.image.reshape(-1, 3)
        counts = [float((pixels == colour).all(-1).sum()) for colour in colours.values()]
        features.append([*counts, float(pixels.mean()), float(pixels.std())])
        labels.append(sample.label)
    features, labels = np.asarray(features), np.asarray(labels)
    names = [*colours, "mean_intensity", "std_intensity"]
    means = {LABELS[k]: dict(zip(names, features[labels == k].mean(0).round(1).tolist())) for k in range(len(LABELS))}

    split = num_samples * 3 // 4
    standardised = (features - features[:split].mean(0)) / (features[:split].std(0) + 1e-9)
    inputs = np.concatenate([standardised, np.ones((num_samples, 1))], axis=1)
    weights = np.zeros((inputs.shape[1], len(LABELS)))
    targets = np.eye(len(LABELS))[labels]
    for _ in range(2000):  # multinomial logistic regression, full-batch gradient descent
        logits = inputs[:split] @ weights
        probabilities = np.exp(logits - logits.max(1, keepdims=True))
        probabilities /= probabilities.sum(1, keepdims=True)
        weights -= 0.5 * inputs[:split].T @ (probabilities - targets[:split]) / split
    probe_accuracy = float(((inputs[split:] @ weights).argmax(1) == labels[split:]).mean())
    return {"class_means": means, "class_counts": np.bincount(labels, minlength=len(LABELS)).tolist(),
            "linear_probe_heldout_accuracy": probe_accuracy, "chance": 1 / len(LABELS)}


def main(argv: list[str] | None = None) -> None:
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", help="folder for `DatasetDict.save_to_disk`")
    parser.add_argument("--check-shortcuts", type=int, metavar="N",
                        help="instead, generate N samples and report order-free statistics per class and a linear probe")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--validation", type=int, default=0)
    parser.add_argument("--test", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=1024)
    parser.add_argument("--region-size", type=int, default=128)
    arguments = parser.parse_args(argv)
    if arguments.check_shortcuts:
        report = shortcut_check(arguments.check_shortcuts, seed=arguments.seed, image_size=arguments.image_size,
                                region_size=arguments.region_size)
        print(json.dumps(report, indent=2))
        return
    if not arguments.output:
        parser.error("--output is required")
    dataset = generate_dataset(arguments.train, arguments.test, arguments.validation, seed=arguments.seed,
                               image_size=arguments.image_size, region_size=arguments.region_size)
    dataset.save_to_disk(arguments.output)
    print(dataset)


if __name__ == "__main__":
    main()


__all__ = ["LABELS", "RelationSample", "generate_dataset", "generate_sample", "relation_label", "sample_rng",
           "shortcut_check"]
