"""A picture of what context changes on the beacon-zones task: one test scene, its true boxes, and the boxes of
a detector trained with and without its context encoder, side by side (docs/detection.md).

    python benchmarks/detection_picture.py --dataset runs/beacons/data/seed0 \
        --with-context runs/beacons/runs/data0_train0_context/best \
        --without-context runs/beacons/runs/data0_train0_nocontext/best --output docs/detection_predictions.png

Each model is run through `pipeline("object-detection")`, as a user would (built from the installed package's classes), at `--threshold`. Boxes are drawn in
their class's colour (red zone: red, yellow zone: yellow) with the score; the thin grey lines are the region
borders, so one sees that a vessel's region never shows a beacon. Only PIL is needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red zone": (235, 50, 50), "yellow zone": (250, 220, 40)}
SCALE = 3
CAPTION = 18  # px of caption band above each panel


def panel(image: Image.Image, boxes: list[tuple[str, float | None, list[float]]], title: str,
          region_size: int) -> Image.Image:
    """The scene enlarged `SCALE` times, region borders, boxes `(label, score or None, [x1, y1, x2, y2])`."""
    width, height = image.size
    canvas = Image.new("RGB", (width * SCALE, height * SCALE + CAPTION), (255, 255, 255))
    canvas.paste(image.resize((width * SCALE, height * SCALE), Image.NEAREST), (0, CAPTION))
    draw = ImageDraw.Draw(canvas)
    for line in range(region_size, max(width, height), region_size):
        draw.line([(line * SCALE, CAPTION), (line * SCALE, CAPTION + height * SCALE)], fill=(150, 150, 150))
        draw.line([(0, CAPTION + line * SCALE), (width * SCALE, CAPTION + line * SCALE)], fill=(150, 150, 150))
    order = list(COLOURS)
    for label, score, (x1, y1, x2, y2) in boxes:
        # The same vessel reported under both classes stays visible: the second class's box is drawn 3 px wider
        # and its score one line lower.
        k = order.index(label) if label in order else len(order)
        corners = [x1 * SCALE - 3 * k, CAPTION + y1 * SCALE - 3 * k, x2 * SCALE + 3 * k, CAPTION + y2 * SCALE + 3 * k]
        colour = COLOURS.get(label, (0, 255, 0))
        draw.rectangle(corners, outline=colour, width=2)
        if score is not None:
            draw.text((x1 * SCALE, CAPTION + y2 * SCALE + 3 * len(order) + 1 + 10 * k), f"{score:.2f}", fill=colour)
    draw.text((4, 3), title, fill=(0, 0, 0))
    return canvas


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True, help="a beacon-zones save_to_disk folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--index", type=int, default=0, help="which scene of the split")
    parser.add_argument("--with-context", required=True, help="saved detector trained with its context encoder")
    parser.add_argument("--without-context", required=True, help="saved detector trained without it")
    parser.add_argument("--threshold", type=float, default=0.3)
    parser.add_argument("--output", type=Path, required=True, help="a .png; an existing file is replaced")
    arguments = parser.parse_args(argv)
    if arguments.output.suffix.lower() != ".png":
        parser.error(f"--output {arguments.output} must end in .png")
    for option, folder in (("--dataset", arguments.dataset), ("--with-context", arguments.with_context),
                           ("--without-context", arguments.without_context)):
        if not Path(folder).is_dir():
            parser.error(f"{option} {folder} is not a folder (a save_to_disk dataset or a saved detector)")

    from datasets import load_from_disk
    from transformers import pipeline

    from xt_hf import XTForObjectDetection, XTImageProcessor

    split = load_from_disk(arguments.dataset)[arguments.split]
    names = split.features["objects"]["annotations"].feature["category_id"].names
    row = split[arguments.index]
    image = row["image"].convert("RGB")
    truth = [(names[a["category_id"]], None, [a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                                              a["bbox"][1] + a["bbox"][3]])
             for a in row["objects"]["annotations"]]

    def load_detector(folder: str):  # the installed package's classes, so no saved code is run (no trust_remote_code)
        return pipeline("object-detection", model=XTForObjectDetection.from_pretrained(folder),
                        image_processor=XTImageProcessor.from_pretrained(folder))

    detectors = {"with context": load_detector(arguments.with_context),
                 "without context": load_detector(arguments.without_context)}
    region_size = detectors["with context"].image_processor.region_size
    panels = [panel(image, truth, f"truth: {len(truth)} vessels", region_size)]
    for title, detector in detectors.items():
        found = detector(image, threshold=arguments.threshold)
        boxes = [(d["label"], d["score"], [d["box"][k] for k in ("xmin", "ymin", "xmax", "ymax")]) for d in found]
        panels.append(panel(image, boxes, f"{title}: {len(boxes)} boxes >= {arguments.threshold}", region_size))
    gap = 8
    picture = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1), panels[0].height),
                        (255, 255, 255))
    for i, p in enumerate(panels):
        picture.paste(p, (i * (p.width + gap), 0))
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    picture.save(arguments.output)
    print(f"wrote {arguments.output} ({picture.width} × {picture.height} px)")
    return arguments.output


if __name__ == "__main__":
    main()
