"""A procedural segmentation task that needs context: is this vessel near the shore or offshore?

Each image (by default 512 × 512 px, 8 × 8 regions of 64 px) holds land along one side (which side is
random), bounded by a smooth random coastline, and sea everywhere else. Identical vessels (bright discs of
one radius and one colour) lie scattered over the sea. Every vessel pixel is labelled by the vessel's
distance to the nearest land pixel:

    0 "background" (land and sea)   1 "near-shore vessel" (< near_distance)   2 "offshore vessel" (≥ near_distance)

with `near_distance` 2.5 regions by default, and no vessel within `margin` of that threshold, so every
label is unambiguous from the geometry. Vessels are placed uniformly over the admissible sea (so about a
third are near-shore with the defaults: the near band is the narrower one).

Why a model without a context encoder cannot solve it: the sea texture is the same i.i.d. noise at every
distance from the coast and the vessels all look alike, so a region that holds no coastline shows nothing
of where the land is. XTForSemanticSegmentation decodes each region on its own; without a context encoder
a vessel's logits depend on its region's pixels alone, and for a vessel in a coast-free region it can only
guess between the two vessel classes (only vessels in a region that shows land are surely near-shore).
With a context encoder, every token can find the land tokens several regions away. Nothing else leaks the
answer: the land side is random (so a position embedding alone says nothing), and vessels are as dense
near the coast as far from it (were each class given its own count, the narrower near-shore band would
hold more vessels per region, and a region with two vessels would hint "near-shore").

Generation is deterministic per (seed, split, index) and has no rejection loop: vessel positions are drawn
from the finite list of admissible grid points, shuffled once.

    python -m xt_hf.synthetic.coastline --output data/coastline --train 400 --validation 64 --test 128
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from .splits import generated_splits, sample_rng

LABELS = ("background", "near-shore vessel", "offshore vessel")
SEA = (25, 70, 120)
LAND = (120, 140, 70)
VESSEL = (235, 235, 225)
LAND_SIDES = ("left", "top", "right", "bottom")


@dataclass(frozen=True)
class Vessel:
    """One vessel: its centre `(row, column)` and radius in pixels, distance to the nearest land pixel, class id."""

    center: tuple[float, float]
    radius: float
    distance: float
    label: int


@dataclass(frozen=True)
class CoastlineSample:
    """One generated image `(height, width, 3)` uint8, its mask `(height, width)` uint8, and its geometry."""

    image: np.ndarray
    mask: np.ndarray
    land: np.ndarray  # (height, width) bool
    land_side: str
    vessels: tuple[Vessel, ...]


def generate_sample(
    rng: np.random.Generator,
    *,
    image_size: int = 512,
    region_size: int = 64,
    near_distance: float = 2.5,
    margin: float = 0.25,
    coast_offset: tuple[float, float] = (0.5, 1.5),
    coast_amplitude: float = 0.4,
    num_vessels: tuple[int, int] = (6, 12),
    vessel_radius: float = 6.0,
    noise: float = 14.0,
) -> CoastlineSample:
    """Draw one square image of `image_size` px.

    Distances are in regions: vessels nearer than `near_distance` to land are near-shore, none lies within
    `margin` of it; the mean coastline is `coast_offset` (a range) from the land side's edge and wanders
    by up to `coast_amplitude` either way. A random number of vessels in `num_vessels` (fewer where they do not
    fit) is spread uniformly over the sea outside the threshold's margin, at least 3 radii apart.
    """
    size, region = image_size, region_size
    # Far edge of the sea is at least this far (px) from land: the offshore band must fit before it.
    farthest_coast = (coast_offset[1] + coast_amplitude) * region
    reachable = size - 1 - farthest_coast - vessel_radius
    if size % region or (near_distance + margin) * region > reachable:
        raise ValueError(
            f"An image of {size} px ({size / region:g} regions) leaves at most {reachable / region:.2f} regions of "
            f"sea beyond the coast: too little for offshore vessels at ≥ {near_distance + margin} regions. Use a "
            f"larger image, a smaller near_distance, or a coastline nearer the edge."
        )
    if (near_distance - margin) * region <= vessel_radius + 2:
        raise ValueError("near_distance - margin must leave room for a near-shore vessel off the coast.")

    # Drawn with land on the left, then rotated: distances and textures do not care about the rotation.
    rows = np.arange(size)
    coast = np.full(size, rng.uniform(*coast_offset) * region)
    weights = rng.uniform(0.5, 1.0, size=3)
    for weight, frequency in zip(weights / weights.sum(), (1, 2, 3)):
        phase = rng.uniform(0, 2 * np.pi)
        coast += coast_amplitude * region * weight * np.sin(2 * np.pi * frequency * rows / size + phase)
    land = np.arange(size)[None, :] < coast[:, None]

    image = np.where(land[..., None], np.asarray(LAND, float), np.asarray(SEA, float))
    image = image + rng.normal(0.0, noise, size=image.shape)  # the same noise over land and sea, at every distance

    # Candidate centres on a 4-px grid, wholly inside the image, with their exact distance to the land.
    step = 4
    lattice = np.arange(int(np.ceil(vessel_radius)) + 1, size - int(np.ceil(vessel_radius)) - 1, step)
    grid_rows, grid_cols = np.meshgrid(lattice, lattice, indexing="ij")
    candidates = np.stack([grid_rows.ravel(), grid_cols.ravel()], axis=1).astype(float)
    distance = distance_to_land(candidates, coast)
    admissible = (distance >= vessel_radius + 2) & (np.abs(distance - near_distance * region) >= margin * region)

    vessels: list[Vessel] = []
    count = int(rng.integers(num_vessels[0], num_vessels[1] + 1))
    for index in rng.permutation(np.flatnonzero(admissible)):  # one pass over a finite list: always ends
        if len(vessels) == count:
            break
        center = candidates[index]
        if all(np.hypot(*(center - np.asarray(v.center))) > 3 * vessel_radius for v in vessels):
            label = 1 if distance[index] < near_distance * region else 2
            vessels.append(Vessel((float(center[0]), float(center[1])), vessel_radius, float(distance[index]), label))

    mask = np.zeros((size, size), dtype=np.uint8)
    yy, xx = np.ogrid[:size, :size]
    for vessel in vessels:
        disc = (yy - vessel.center[0]) ** 2 + (xx - vessel.center[1]) ** 2 <= vessel.radius**2
        image[disc] = VESSEL
        mask[disc] = vessel.label
    image = np.clip(image, 0, 255).astype(np.uint8)

    turns = int(rng.integers(4))  # counter-clockwise quarter turns: land ends on the left, bottom, right or top
    vessels = [Vessel(_rotate_point(v.center, size, turns), v.radius, v.distance, v.label) for v in vessels]
    return CoastlineSample(
        image=np.ascontiguousarray(np.rot90(image, turns)),
        mask=np.ascontiguousarray(np.rot90(mask, turns)),
        land=np.ascontiguousarray(np.rot90(land, turns)),
        land_side=("left", "bottom", "right", "top")[turns],
        vessels=tuple(vessels),
    )


def distance_to_land(points: np.ndarray, coast: np.ndarray) -> np.ndarray:
    """Euclidean distance from each `(row, column)` point `(n, 2)` to the nearest land pixel, for land on the
    left of `coast` (pixel `(r, c)` is land when `c < coast[r]`); 0 on land."""
    rows = np.arange(len(coast))
    last_land_col = np.ceil(coast) - 1  # the rightmost land pixel of each row
    distance = np.full(len(points), np.inf)
    for start in range(0, len(points), 2048):  # bounds the (points × rows) temporary
        chunk = points[start : start + 2048]
        across = np.maximum(chunk[:, 1:2] - last_land_col[None, :], 0.0)
        along = chunk[:, 0:1] - rows[None, :]
        distance[start : start + 2048] = np.sqrt(across**2 + along**2).min(axis=1)
    return distance


def _rotate_point(point: tuple[float, float], size: int, turns: int) -> tuple[float, float]:
    """Where pixel `point` of a `size`-px square goes under `np.rot90(image, turns)`."""
    row, col = point
    for _ in range(turns % 4):
        row, col = size - 1 - col, row
    return float(row), float(col)


def generate_dataset(
    num_train: int,
    num_test: int,
    *,
    num_validation: int = 0,
    seed: int = 0,
    image_size: int = 512,
    region_size: int = 64,
    **sample_options,
):
    """A `datasets.DatasetDict` with `train`, `test` (and `validation` when `num_validation > 0`) splits:
    `image` (RGB PNG) and `mask` (mode-L PNG of class ids, `LABELS`). `sample_options` go to `generate_sample`.
    """
    from datasets import Features, Image

    def make_row(rng: np.random.Generator) -> dict:
        sample = generate_sample(rng, image_size=image_size, region_size=region_size, **sample_options)
        return {"image": sample.image, "mask": sample.mask}

    return generated_splits(
        "coastline", __file__, {"train": num_train, "validation": num_validation, "test": num_test},
        Features({"image": Image(), "mask": Image()}), make_row,
        seed=seed, settings=(image_size, region_size, sorted(sample_options.items())),
    )


class VesselScores:
    """Whole-vessel accuracy of class maps predicted for a generated split (reported by
    `xt_hf.training.score`): each vessel's class is the majority prediction over its pixels,
    counted apart for vessels whose own region shows land and those whose region does not (only context can tell
    the latter apart).

    The samples are generated again from the `seed` and `sample_options` (`generate_sample`'s) the folder was
    made with; an image whose labels differ from the generated mask is refused, naming the settings to pass.
    """

    def __init__(self, seed: int, split: str, **sample_options):
        self.seed, self.split, self.sample_options = seed, split, sample_options
        self.counts = {"region_shows_land": [0, 0], "region_shows_no_land": [0, 0]}  # [correct, total]

    def update(self, index: int, labels: np.ndarray, prediction: np.ndarray, region_size: int) -> None:
        """Score image `index` of the split: its labels and predicted class map `(H, W)` (padding beyond the
        sample allowed), with the model's `region_size`."""
        sample = generate_sample(sample_rng(self.seed, self.split, index), **self.sample_options)
        height, width = sample.mask.shape
        if not np.array_equal(sample.mask, labels[:height, :width]):
            raise ValueError(f"Sample {index} of {self.split} is not what seed {self.seed} and {self.sample_options} "
                             f"generate: pass the settings the folder was made with, or no seed (pixel metrics "
                             f"only).")
        for key, correct in _score_vessels(sample, prediction, region_size):
            self.counts[key][0] += correct
            self.counts[key][1] += 1

    def result(self) -> dict[str, dict]:
        """Per group: `{"correct", "vessels", "accuracy"}`."""
        return {key: {"correct": correct, "vessels": total, "accuracy": correct / max(total, 1)}
                for key, (correct, total) in self.counts.items()}


def _score_vessels(sample: CoastlineSample, prediction: np.ndarray, region_size: int):
    """`(group, correct)` per vessel: whether the vessel class predicted on most of its pixels is its label (a
    vessel predicted as background throughout counts as wrong), grouped by whether the region holding its
    centre shows any land."""
    size = sample.mask.shape[0]
    yy, xx = np.ogrid[:size, :size]
    for vessel in sample.vessels:
        disc = (yy - vessel.center[0]) ** 2 + (xx - vessel.center[1]) ** 2 <= vessel.radius**2
        votes = np.bincount(prediction[disc], minlength=len(LABELS))[1:]  # near-shore, offshore
        row, col = int(vessel.center[0]) // region_size, int(vessel.center[1]) // region_size
        region = np.s_[row * region_size : (row + 1) * region_size, col * region_size : (col + 1) * region_size]
        group = "region_shows_land" if sample.land[region].any() else "region_shows_no_land"
        yield group, int(votes.max() > 0 and votes.argmax() + 1 == vessel.label)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder for `DatasetDict.save_to_disk`")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--validation", type=int, default=64)
    parser.add_argument("--test", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    add_sample_arguments(parser)
    arguments = parser.parse_args(argv)
    dataset = generate_dataset(arguments.train, arguments.test, num_validation=arguments.validation,
                               seed=arguments.seed, **sample_options(arguments))
    dataset.save_to_disk(arguments.output)
    print(dataset)


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """The `generate_sample` options but the seed, for generating a folder and for scoring its vessels again
    (`python -m xt_hf.training.score`): both must be given the same."""
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--region-size", type=int, default=64)
    parser.add_argument("--vessels", type=int, nargs=2, metavar=("MIN", "MAX"), default=(6, 12),
                        help="vessels per image (default 6 12)")
    parser.add_argument("--near-distance", type=float, default=2.5,
                        help="near-shore below this distance to land, in regions (default 2.5)")
    parser.add_argument("--margin", type=float, default=0.25,
                        help="no vessel within this many regions of --near-distance (default 0.25)")
    parser.add_argument("--vessel-radius", type=float, default=6.0, help="in pixels (default 6)")


def sample_options(arguments: argparse.Namespace) -> dict:
    """The `generate_sample` options that `add_sample_arguments` reads."""
    return {"image_size": arguments.image_size, "region_size": arguments.region_size,
            "num_vessels": tuple(arguments.vessels), "near_distance": arguments.near_distance,
            "margin": arguments.margin, "vessel_radius": arguments.vessel_radius}


if __name__ == "__main__":
    main()


__all__ = ["LABELS", "CoastlineSample", "Vessel", "VesselScores", "add_sample_arguments", "distance_to_land",
           "generate_dataset", "generate_sample", "sample_options", "sample_rng"]
