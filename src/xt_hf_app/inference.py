"""What the app computes and draws, without Gradio: loading a model for its task, reading an upload or a generated
example region by region, running the engine, and the pictures (downsampled view, class map, boxes, relevance).

Every image goes through the engine (`xt_hf.engine`) as a lazy region source, so an upload of any size that the
engine reads (PNG/JPEG, TIFF/BigTIFF, .npy, whole-slide images) costs memory for one chunk of regions and the
token grid, and the page only ever shows a view at most `VIEW_SIDE` px a side.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

VIEW_SIDE = 1024  # the longest side of the picture the page shows, in px
TASKS = {
    "XTForImageClassification": "classification",
    "XTForSemanticSegmentation": "segmentation",
    "XTForObjectDetection": "detection",
}
# Distinct colours for classes and boxes (class 0 of a segmenter, usually the background, is left undrawn).
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40))


class AppError(ValueError):
    """A problem the page shows as a sentence (an unusable file, a model without a known head), not a traceback."""


@dataclass
class LoadedModel:
    """A model ready for the app: `task` is "classification", "segmentation" or "detection"."""

    model: object
    processor: object
    task: str
    name: str

    @property
    def labels(self) -> list[str]:
        return [self.model.config.id2label[i] for i in range(self.model.config.num_labels)]


def load_model(model_id: str, device: str = "cpu") -> LoadedModel:
    """The xT model in folder or Hub repo `model_id`, with the head its config names, in eval mode on `device`."""
    import torch
    from transformers import (AutoConfig, AutoImageProcessor, AutoModelForImageClassification,
                              AutoModelForObjectDetection, AutoModelForSemanticSegmentation)

    import xt_hf  # noqa: F401  (registers the xT classes with the Auto classes)
    from xt_hf.configuration_xt import named_missing_folder

    auto_classes = {"classification": AutoModelForImageClassification, "segmentation": AutoModelForSemanticSegmentation,
                    "detection": AutoModelForObjectDetection}
    try:
        with named_missing_folder(model_id):  # a missing local folder named as such, not as a malformed repo id
            config = AutoConfig.from_pretrained(model_id, trust_remote_code=True)
    except (OSError, ValueError) as error:
        raise AppError(f"Cannot load the model {model_id!r}: {error}") from None
    if config.model_type != "xt":
        raise AppError(f"{model_id} is a {config.model_type!r} model, not an xT model.")
    task = next((TASKS[name] for name in config.architectures or [] if name in TASKS), None)
    if task is None:
        raise AppError(f"{model_id} was saved as {config.architectures}; the app shows "
                       f"{', '.join(TASKS)} models.")
    model = auto_classes[task].from_pretrained(model_id, trust_remote_code=True).to(torch.device(device)).eval()
    try:
        processor = AutoImageProcessor.from_pretrained(model_id, trust_remote_code=True)
    except (OSError, ValueError):
        processor = None  # no preprocessor_config.json: ImageNet statistics, as the original
    return LoadedModel(model=model, processor=processor, task=task, name=Path(model_id).name or model_id)


def example_image(task: str, region_size: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """A generated image for `task` (`xt_hf.synthetic`, from the held-out "demo" split) and a line saying what it is:
    relations for classification, coastline for segmentation, vessels and beacons for detection. The task's regions
    are the model's when the generator allows it, else the generator's own."""
    from xt_hf.synthetic import coastline, detection, relations
    from xt_hf.synthetic.splits import sample_rng

    module, regions = {"classification": (relations, 8), "segmentation": (coastline, 8),
                       "detection": (detection, 4)}[task]
    rng = sample_rng(0, "demo", seed)
    try:
        sample = module.generate_sample(rng, image_size=regions * region_size, region_size=region_size)
    except ValueError:  # the model's regions do not suit the generator: its defaults
        sample = module.generate_sample(sample_rng(0, "demo", seed))
    what = {"classification": f"relations sample {seed} (true answer: {getattr(sample, 'label_name', '')})",
            "segmentation": f"coastline sample {seed}", "detection": f"vessels-and-beacons sample {seed}"}[task]
    return sample.image, what


def open_image(image, region_size: int):
    """The engine's region source for an upload path or an array; an unusable one is an `AppError` whose message
    names the file and the problem."""
    from xt_hf.engine import open_region_source

    try:
        return open_region_source(str(image) if isinstance(image, Path) else image, region_size)
    except (ValueError, OSError) as error:
        name = Path(image).name if isinstance(image, (str, Path)) else "The image"
        message = str(error).replace(str(image), name) if isinstance(image, (str, Path)) else str(error)
        raise AppError(message if name in message else f"{name}: {message}") from None


def view_scale(source) -> float:
    """The factor from the image's pixels to the view's (at most 1)."""
    return min(1.0, VIEW_SIDE / max(source.height, source.width))


def downsampled_view(source, region_size: int) -> Image.Image:
    """An RGB picture of `source` at `view_scale`, read one region-sized window at a time."""
    scale = view_scale(source)
    view = Image.new("RGB", (max(1, round(source.width * scale)), max(1, round(source.height * scale))))
    for top in range(0, source.height, region_size):
        for left in range(0, source.width, region_size):
            window = source.read(top, left, min(region_size, source.height - top), min(region_size, source.width - left))
            tile = Image.fromarray(_displayable(window))
            box = (round(left * scale), round(top * scale), round((left + window.shape[1]) * scale),
                   round((top + window.shape[0]) * scale))
            if box[2] > box[0] and box[3] > box[1]:
                view.paste(tile.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.BILINEAR), box[:2])
    return view


def _displayable(pixels: np.ndarray) -> np.ndarray:
    """`(h, w, C)` pixels of any type as `(h, w, 3)` uint8 for the eye: the first three channels (grey repeated),
    integers scaled by their type's range, floats taken as [0, 1]."""
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    pixels = pixels[..., :3] if pixels.shape[-1] >= 3 else np.repeat(pixels[..., :1], 3, axis=-1)
    if pixels.dtype == np.uint8:
        return pixels
    if np.issubdtype(pixels.dtype, np.integer):
        return (pixels.astype(np.float64) / np.iinfo(pixels.dtype).max * 255).clip(0, 255).astype(np.uint8)
    return (np.nan_to_num(pixels.astype(np.float64)) * 255).clip(0, 255).astype(np.uint8)


@dataclass
class Answer:
    """One run of the app: the view and what to draw on it, and how long it took."""

    task: str
    view: Image.Image
    seconds: float
    regions: tuple[int, int]
    probabilities: dict[str, float] = field(default_factory=dict)  # classification
    relevance: np.ndarray | None = None  # classification: (rows, cols), sums to 1
    class_map: np.ndarray | None = None  # segmentation: (view height, view width) class ids
    detections: dict[str, np.ndarray] | None = None  # detection: boxes (n, 4) in the image's px, scores, labels
    scale: float = 1.0


def run(loaded: LoadedModel, source, *, region_batch_size: int | None = None, detection_floor: float = 0.05,
        relevance: bool = True, progress: bool = True) -> Answer:
    """The task's answer for a region `source` (`open_image`), through the engine region by region; `progress`
    shows the engine's bar over region batches (the page tracks it)."""
    import torch

    from xt_hf.engine import decode_streaming, detect_streaming
    from xt_hf.nested_tokenization import region_grid_shape

    from .relevance import classification_relevance, region_features

    model, region = loaded.model, loaded.model.config.region_size
    options = dict(processor=loaded.processor, region_batch_size=region_batch_size, progress=progress)
    regions = region_grid_shape(source.height, source.width, region)
    scale = view_scale(source)
    start = time.perf_counter()
    answer = Answer(task=loaded.task, view=None, seconds=0.0, regions=regions, scale=scale)
    try:
        if loaded.task == "classification":
            # The engine encodes the regions without gradients; only the context encoder and head keep a graph.
            features = region_features(model, source, **options)
            found = classification_relevance(model, features, regions)
            answer.probabilities = {loaded.labels[i]: float(p) for i, p in enumerate(found.probabilities)}
            answer.relevance = found.scores if relevance else None
        elif loaded.task == "segmentation":
            answer.class_map = _class_map_view(model, decode_streaming(model, source, **options), source, scale)
        else:
            found = detect_streaming(model, source, threshold=detection_floor, **options)
            answer.detections = {name: value.float().numpy() if value.is_floating_point() else value.numpy()
                                 for name, value in found.items()}
    except (ValueError, OSError) as error:  # a file that turns out broken part-way through, a wrong channel count
        raise AppError(str(error)) from None
    answer.seconds = time.perf_counter() - start
    with torch.inference_mode():
        answer.view = downsampled_view(source, region)
    return answer


def _class_map_view(model, decoded, source, scale: float) -> np.ndarray:
    """The argmax of every region's logits, placed in a `(view height, view width)` map as the regions arrive."""
    region = model.config.region_size
    view_height, view_width = max(1, round(source.height * scale)), max(1, round(source.width * scale))
    class_map = np.zeros((view_height, view_width), dtype=np.int32)
    for index, logits in decoded:
        for row, col, tile in zip(index.row.tolist(), index.col.tolist(), logits.argmax(dim=1).cpu().numpy()):
            top, left = round(row * region * scale), round(col * region * scale)
            bottom, right = round((row + 1) * region * scale), round((col + 1) * region * scale)
            if bottom <= top or right <= left:
                continue
            resized = np.asarray(Image.fromarray(tile.astype(np.int32)).resize((right - left, bottom - top),
                                                                               Image.Resampling.NEAREST))
            height, width = class_map[top:bottom, left:right].shape
            class_map[top:bottom, left:right] = resized[:height, :width]
    return class_map


def colour(label: int) -> tuple[int, int, int]:
    return PALETTE[label % len(PALETTE)]


def draw_class_map(view: Image.Image, class_map: np.ndarray, *, opacity: float = 0.55) -> Image.Image:
    """The class map over the view: every class but 0 (the background of the generated tasks) in its colour."""
    paint = np.zeros((*class_map.shape, 3), dtype=np.uint8)
    for label in np.unique(class_map):
        if label:
            paint[class_map == label] = colour(int(label))
    alpha = Image.fromarray(((class_map > 0) * int(255 * opacity)).astype(np.uint8))
    return Image.composite(Image.fromarray(paint), view, alpha)


def draw_boxes(view: Image.Image, detections: dict[str, np.ndarray], *, scale: float, threshold: float,
               labels: list[str]) -> tuple[Image.Image, int]:
    """Detections with a score of at least `threshold` as labelled boxes over the view, and how many."""
    picture = view.copy()
    draw = ImageDraw.Draw(picture)
    kept = 0
    for box, score, label in zip(detections["boxes"], detections["scores"], detections["labels"]):
        if score < threshold:
            continue
        kept += 1
        x1, y1, x2, y2 = (float(v) * scale for v in box)
        draw.rectangle((x1, y1, x2, y2), outline=colour(int(label)), width=2)
        draw.text((x1 + 2, max(0.0, y1 - 11)), f"{labels[int(label)]} {score:.2f}", fill=colour(int(label)))
    return picture, kept


def draw_relevance(view: Image.Image, scores: np.ndarray, *, region_size: int, scale: float) -> Image.Image:
    """The relevance map over the view: regions tinted from transparent (none) to opaque orange (the most relevant),
    each outlined with its share in per cent when it holds at least 2 %."""
    heat = scores / scores.max() if scores.max() > 0 else scores
    side = region_size * scale
    dimmed = Image.blend(view, Image.new("RGB", view.size, (0, 0, 0)), 0.45)
    overlay = Image.new("RGBA", view.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for (row, col), value in np.ndenumerate(heat):
        box = (col * side, row * side, (col + 1) * side - 1, (row + 1) * side - 1)
        draw.rectangle(box, fill=(255, 140, 0, int(150 * value)))
        if scores[row, col] >= 0.02:
            draw.rectangle(box, outline=(255, 255, 255, 255), width=1)
            draw.text((box[0] + 3, box[1] + 2), f"{100 * scores[row, col]:.0f}%", fill=(255, 255, 255, 255))
    # The region's own pixels stay visible under the tint: the original where it matters, dimmed elsewhere.
    mask = Image.fromarray((heat * 255).astype(np.uint8)).resize(view.size, Image.Resampling.NEAREST)
    base = Image.composite(view, dimmed, mask)
    return Image.alpha_composite(base.convert("RGBA"), overlay).convert("RGB")


def legend(labels: list[str], present: set[int] | None = None, *, background: bool = True) -> str:
    """An HTML legend of class colours (without class 0 when it is the undrawn `background`), those absent from the
    answer faded."""
    items = []
    for label, name in enumerate(labels):
        if label == 0 and background:
            continue
        red, green, blue = colour(label)
        faded = "" if present is None or label in present else "opacity:0.4;"
        items.append(f'<span style="margin-right:1em;{faded}"><span style="display:inline-block;width:0.9em;'
                     f'height:0.9em;background:rgb({red},{green},{blue});margin-right:0.3em"></span>{name}</span>')
    return '<div class="xt-legend">' + "".join(items) + "</div>"


__all__ = ["AppError", "Answer", "LoadedModel", "TASKS", "VIEW_SIDE", "colour", "downsampled_view", "draw_boxes",
           "draw_class_map", "draw_relevance", "example_image", "legend", "load_model", "open_image", "run"]
