"""A procedural detection task that needs context: which beacon's zone is each vessel in?

Each scene (by default 512 × 512 px, 4 × 4 regions of 128 px) is open sea with two beacons, a red disc and
a yellow disc, each wholly inside its own region, and 0–6 vessels: white squares of 8–16 px that look
alike whatever their class, each wholly inside one of the other regions. Every vessel has a box and one of
two classes, decided by the beacon nearer to the vessel's centre (the beacons' zones are the two halves of
the plane either side of their perpendicular bisector):

    0 "red zone" (nearer the red beacon)   1 "yellow zone" (nearer the yellow beacon)

No vessel lies within `margin` px of the bisector (|distance to red − distance to yellow| ≥ margin), so
every class is unambiguous from the geometry.

Why a model that sees one region at a time cannot beat chance on the class, while finding the boxes is
easy: a vessel's region never holds a beacon, and the sea is the same i.i.d. noise everywhere. More
strongly, the scene is symmetric under swapping the beacons' colours: the two beacon regions are a
uniformly drawn ordered pair, and everything else (where the vessels may go, the margin rule, sizes,
colours, noise) treats the two beacons alike. Swapping the colours flips every vessel's class and changes
nothing outside the two beacon discs, so each class is exactly as likely as the other given everything
but the beacons' colours: the vessel's pixels, its region's pixels, the number of vessels, even its absolute
position (a position embedding alone says nothing, unlike a single-beacon "near/far" rule, where vessels in
the middle of the scene would be "near" more often). Only by finding both beacons, regions away, and
comparing distances can a model tell the classes apart. Both classes are equally frequent, and the
vessels are as dense in one zone as in the other.

With `num_beacons=1` (`--beacons 1`) a scene holds a single beacon, red or yellow by a fair coin, and the
whole scene is its zone: every vessel takes its colour. The same symmetry holds (recolouring the beacon flips
every class and changes nothing else), so a per-region model is still at chance, but the context needed is
simpler: find the one beacon anywhere in the scene and read its colour, instead of comparing two distances.
This is the variant the documented context-gain runs use (docs/detection.md says why).

Generation is deterministic per (seed, split, index) and has no rejection loop: vessel positions are drawn
from the finite list of admissible grid points, shuffled once (crowded settings place fewer vessels).

Rows hold `image` (RGB) and `objects`, COCO-style annotations of one image: `{"image_id": row index in
its split, "annotations": [{"bbox": [x, y, w, h], "category_id", "area", "iscrowd": 0}, ...]}`, with
`bbox` in pixels from the top-left corner (the box covers columns x … x + w − 1 and rows y … y + h − 1) and
`category_id` a `ClassLabel` over `LABELS`, so the class names travel with the saved dataset.

    python -m xt_hf.synthetic.detection --output data/beacon_zones --train 400 --validation 64 --test 128
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass

import numpy as np

from .splits import generated_splits, sample_rng

LABELS = ("red zone", "yellow zone")
ID2LABEL = dict(enumerate(LABELS))
SEA = (25, 70, 120)
VESSEL = (225, 225, 215)
RED = (220, 40, 40)
YELLOW = (240, 210, 40)  # red and yellow both stand out from the blue sea and from the white vessels


@dataclass(frozen=True, eq=False)
class DetectionSample:
    """One generated scene and its geometry.

    `image` is `(height, width, 3)` uint8. Per vessel, in the same order: `boxes` `(n, 4)` float, COCO
    `[x, y, w, h]` in pixels from the top-left corner; `labels` `(n,)` int, indices into `LABELS`;
    `distances` `(n, 2)` float, the distance (px) from the box centre to the red and to the yellow beacon,
    `inf` for a colour the scene lacks (the context the class follows: `labels == (distances[:, 1] <
    distances[:, 0])`); `regions` `(n, 2)` int, the (region row, region column) holding the vessel.
    Per beacon (red then yellow when there are two): `beacon_centers` its `(x, y)` centre, `beacon_regions` its
    (region row, region column), `beacon_labels` its colour as an index into `LABELS`.
    """

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    distances: np.ndarray
    regions: np.ndarray
    beacon_centers: tuple[tuple[float, float], ...]
    beacon_regions: tuple[tuple[int, int], ...]
    beacon_labels: tuple[int, ...]
    beacon_radius: float

    def annotations(self, image_id: int = 0) -> dict:
        """The COCO-style annotations of this image, as the dataset rows and DETR-like image processors take
        them (`format="coco_detection"`)."""
        return {
            "image_id": int(image_id),
            "annotations": [
                {"bbox": [float(v) for v in box], "category_id": int(label), "area": float(box[2] * box[3]),
                 "iscrowd": 0}
                for box, label in zip(self.boxes, self.labels)
            ],
        }


def zone_label(center: tuple[float, float], red: tuple[float, float], yellow: tuple[float, float]) -> int:
    """Index into `LABELS` of the zone of the `(x, y)` point `center`: 0 nearer `red`, 1 nearer `yellow`."""
    to_red = np.hypot(center[0] - red[0], center[1] - red[1])
    return int(np.hypot(center[0] - yellow[0], center[1] - yellow[1]) < to_red)


def generate_sample(
    rng: np.random.Generator,
    *,
    image_size: int = 512,
    region_size: int = 128,
    num_objects: tuple[int, int] = (0, 6),
    object_size: tuple[int, int] = (8, 16),
    margin: float = 16.0,
    beacon_radius: float = 12.0,
    noise: float = 14.0,
    num_beacons: int = 2,
) -> DetectionSample:
    """Draw one square scene of `image_size` px, a grid of `region_size` regions.

    A random number of vessels in `num_objects` (fewer where they do not fit), each a square with a side
    in `object_size` px, at least 4 px apart, lies in the regions that hold no beacon, at least 2 px inside
    its region, and no nearer than `margin` px to the boundary between the two zones (see the module).
    `num_beacons=1` draws a single beacon, red or yellow by a fair coin, whose zone is the whole scene: every
    vessel takes its colour (`margin` is then moot).
    """
    size, region = image_size, region_size
    cells = size // region if region > 0 else 0
    if region <= 0 or size % region or cells * cells < 3:
        raise ValueError(f"image_size ({size}) must be a multiple of region_size ({region}) with at least 3 regions: "
                         f"two for the beacons and one for vessels.")
    smallest, largest = object_size
    inset, gap, step = 2, 4, 4
    if not 1 <= smallest <= largest or largest + 2 * inset > region:
        raise ValueError(f"object_size {object_size} must be 1 ≤ min ≤ max ≤ region_size − {2 * inset} px.")
    if 2 * (beacon_radius + inset) >= region:
        raise ValueError(f"A beacon of radius {beacon_radius} px does not fit inside a region of {region} px.")
    if not 0 <= num_objects[0] <= num_objects[1]:
        raise ValueError(f"num_objects {num_objects} must be 0 ≤ min ≤ max.")
    if num_beacons not in (1, 2):
        raise ValueError(f"num_beacons must be 1 (one beacon, its colour for the whole scene) or 2 (red and yellow "
                         f"zones), not {num_beacons!r}.")

    # An ordered pair of distinct regions (red first): uniform, so swapping the colours is as likely as not.
    # One beacon: a uniform region and a fair coin for its colour.
    beacon_cells = [divmod(int(cell), cells) for cell in rng.choice(cells * cells, size=num_beacons, replace=False)]
    beacon_labels = (0, 1) if num_beacons == 2 else (int(rng.integers(2)),)
    beacons = []
    for row, col in beacon_cells:
        low, high = inset + beacon_radius, region - inset - beacon_radius
        beacons.append((col * region + rng.uniform(low, high), row * region + rng.uniform(low, high)))  # (x, y)
    # The nearest beacon of each colour; a colour absent from the scene is infinitely far.
    red, yellow = (np.asarray(beacons[beacon_labels.index(label)]) if label in beacon_labels else np.full(2, np.inf)
                   for label in (0, 1))

    count = int(rng.integers(num_objects[0], num_objects[1] + 1))
    sides = rng.integers(smallest, largest + 1, size=count)

    # Top-left corners on a 4-px grid where the largest vessel fits inside its region, in beacon-free regions.
    offsets = np.arange(inset, region - inset - largest + 1, step)
    free = [(row, col) for row in range(cells) for col in range(cells) if (row, col) not in beacon_cells]
    corners = np.array([(col * region + dx, row * region + dy)
                        for row, col in free for dy in offsets for dx in offsets], dtype=float)

    boxes: list[tuple[float, float, float, float]] = []
    for index in rng.permutation(len(corners)):  # one pass over a finite list: always ends
        if len(boxes) == count:
            break
        side = float(sides[len(boxes)])
        x, y = corners[index]
        center = np.array([x + side / 2, y + side / 2])
        if num_beacons == 2 and abs(np.linalg.norm(center - red) - np.linalg.norm(center - yellow)) < margin:
            continue  # too near the zone boundary: the class would hinge on a pixel
        if any(x < bx + bw + gap and bx < x + side + gap and y < by + bh + gap and by < y + side + gap
               for bx, by, bw, bh in boxes):
            continue
        boxes.append((float(x), float(y), side, side))

    box_array = np.array(boxes, dtype=float).reshape(-1, 4)
    centers = box_array[:, :2] + box_array[:, 2:] / 2
    distances = np.stack([np.linalg.norm(centers - red, axis=1), np.linalg.norm(centers - yellow, axis=1)], axis=1)
    labels = (distances[:, 1] < distances[:, 0]).astype(np.int64)
    regions = (box_array[:, [1, 0]] // region).astype(np.int64)

    # Colours first, then the same noise over every pixel: sea, vessels and beacons alike.
    image = np.empty((size, size, 3), dtype=float)
    image[:] = SEA
    for x, y, w, h in boxes:
        image[int(y) : int(y + h), int(x) : int(x + w)] = VESSEL
    yy, xx = np.ogrid[:size, :size]
    for (bx, by), label in zip(beacons, beacon_labels):
        colour = (RED, YELLOW)[label]
        image[(xx + 0.5 - bx) ** 2 + (yy + 0.5 - by) ** 2 <= beacon_radius**2] = colour
    image += rng.normal(0.0, noise, size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    return DetectionSample(
        image=image, boxes=box_array, labels=labels, distances=distances, regions=regions,
        beacon_centers=tuple((float(x), float(y)) for x, y in beacons), beacon_regions=tuple(beacon_cells),
        beacon_labels=beacon_labels, beacon_radius=float(beacon_radius),
    )


def dataset_features():
    """The `datasets.Features` of a saved split: the class names are the `ClassLabel` of `category_id`."""
    from datasets import ClassLabel, Features, Image, List, Value

    annotation = {"bbox": List(Value("float32"), length=4), "category_id": ClassLabel(names=list(LABELS)),
                  "area": Value("float32"), "iscrowd": Value("int64")}
    return Features({"image": Image(), "objects": {"image_id": Value("int64"), "annotations": List(annotation)}})


def generate_dataset(
    num_train: int,
    num_test: int,
    *,
    num_validation: int = 0,
    seed: int = 0,
    image_size: int = 512,
    region_size: int = 128,
    **sample_options,
):
    """A `datasets.DatasetDict` with `train`, `test` (and `validation` when `num_validation > 0`) splits:
    `image` (RGB PNG) and `objects` (COCO-style annotations, `image_id` the row's index in its split).
    `sample_options` go to `generate_sample`.
    """
    features = dataset_features()

    def make_row(rng: np.random.Generator) -> dict:
        sample = generate_sample(rng, image_size=image_size, region_size=region_size, **sample_options)
        return {"image": sample.image, "objects": sample.annotations()}

    # The options enter the fingerprint hashed: `map` below parses the cache file names that hold it as a
    # regular expression, which brackets and quotes would break.
    options = hashlib.sha256(repr(sorted(sample_options.items())).encode()).hexdigest()[:16]
    dataset = generated_splits(
        "beacon-zones", __file__, {"train": num_train, "validation": num_validation, "test": num_test},
        features, make_row, seed=seed, settings=(image_size, region_size, options),
    )
    # A row's generator does not know its index, so the ids are numbered afterwards (the images untouched).
    return dataset.map(_number_image, with_indices=True, input_columns="objects", features=features,
                       desc="Numbering images")


def _number_image(objects: dict, index: int) -> dict:
    return {"objects": {**objects, "image_id": index}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="folder for `DatasetDict.save_to_disk`")
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--validation", type=int, default=64)
    parser.add_argument("--test", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--region-size", type=int, default=128)
    parser.add_argument("--objects", type=int, nargs=2, metavar=("MIN", "MAX"), default=(0, 6),
                        help="vessels per scene (default 0 6)")
    parser.add_argument("--object-size", type=int, nargs=2, metavar=("MIN", "MAX"), default=(8, 16),
                        help="side of a vessel in pixels (default 8 16)")
    parser.add_argument("--margin", type=float, default=16.0,
                        help="no vessel nearer than this (px) to the boundary between the zones (default 16)")
    parser.add_argument("--beacons", type=int, choices=(1, 2), default=2,
                        help="2: a red and a yellow beacon, each vessel in the zone of the nearer (default); 1: one "
                             "beacon of either colour, every vessel in its zone")
    arguments = parser.parse_args(argv)
    dataset = generate_dataset(arguments.train, arguments.test, num_validation=arguments.validation,
                               seed=arguments.seed, image_size=arguments.image_size, region_size=arguments.region_size,
                               num_objects=tuple(arguments.objects), object_size=tuple(arguments.object_size),
                               margin=arguments.margin, num_beacons=arguments.beacons)
    dataset.save_to_disk(arguments.output)
    print(dataset)


if __name__ == "__main__":
    main()


__all__ = ["ID2LABEL", "LABELS", "DetectionSample", "dataset_features", "generate_dataset", "generate_sample",
           "sample_rng", "zone_label"]
