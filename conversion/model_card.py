"""Model cards for converted xT checkpoints: Hub metadata, the paper's numbers, a runnable demo, the citation; and
the files of each model's Hugging Face Space, which runs the xT app (`xt_hf_app`) on it."""

from __future__ import annotations

CITATION = """@inproceedings{gupta2024xt,
  title     = {xT: Nested Tokenization for Larger Context in Large Images},
  author    = {Gupta, Ritwik and Li, Shufan and Zhu, Tyler and Malik, Jitendra and Darrell, Trevor and Mangalam, Karttikeya},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2024}
}"""

# The demo runs as written against any converted repo; tests substitute REPO_ID with a tiny local model.
DEMO = '''import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

repo = "{repo_id}"
model = AutoModelForImageClassification.from_pretrained(repo, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(repo, trust_remote_code=True)

# Any image of at least one region per side; here a random {image_size} x {image_size} one.
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, ({image_size}, {image_size}, 3), dtype=np.uint8))
inputs = processor(image, return_tensors="pt")
with torch.inference_mode():
    logits = model(**inputs).logits
label = logits.argmax(-1).item()
print(model.config.id2label[label], logits.softmax(-1)[0, label].item())'''

# What a card says for each task head: the Hub's pipeline tag and metric, the Auto class and the demo's last lines.
TASKS = {
    "XTForImageClassification": ("image-classification", "accuracy", "AutoModelForImageClassification", None),
    "XTForSemanticSegmentation": ("image-segmentation", "mean_iou", "AutoModelForSemanticSegmentation", '''with torch.inference_mode():
    outputs = model(**inputs)
(class_map,) = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])
print(class_map.shape, class_map.unique())'''),
    "XTForObjectDetection": ("object-detection", "map", "AutoModelForObjectDetection", '''with torch.inference_mode():
    outputs = model(**inputs)
(found,) = processor.post_process_object_detection(outputs, threshold=0.3, target_sizes=[image.size[::-1]])
print(len(found["scores"]), "objects")
for score, label, box in zip(found["scores"], found["labels"], found["boxes"]):
    print(model.config.id2label[int(label)], round(float(score), 3), [round(float(v), 1) for v in box])'''),
}


# The Gradio release the Spaces were written for (the Hub reads it from the Space's front matter).
GRADIO_SDK_VERSION = "6.31.0"
SPACE_REQUIREMENTS = "xt-hf[app]\n"
SPACE_APP = '''"""The xT app for {repo_id}, as a Hugging Face Space (written by conversion/make_model_cards.py).

Locally: pip install "xt-hf[app]" && xt-hf app --model {repo_id}
"""

from xt_hf_app import build_app

demo = build_app("{repo_id}")

if __name__ == "__main__":
    demo.launch()
'''


def space_id(repo_id: str) -> str:
    """The Space that runs the app on model `repo_id`."""
    return f"{repo_id}-demo"


def render_space_files(entry: dict | None, config, repo_id: str) -> dict[str, str]:
    """`app.py`, `README.md` (the Space's front matter) and `requirements.txt` of the Space for `repo_id`."""
    name = entry["hub_name"] if entry else repo_id.split("/")[-1]
    architecture = next((a for a in (config.architectures or []) if a in TASKS), "XTForImageClassification")
    readme = f"""---
title: xT {name}
emoji: 🔭
colorFrom: blue
colorTo: red
sdk: gradio
sdk_version: {GRADIO_SDK_VERSION}
app_file: app.py
pinned: false
license: mit
short_description: xT ({TASKS[architecture][0]}) on large images, with where its context came from
models:
- {repo_id}
---

# xT {name}: live demo

The xT app (`xt_hf_app` of xt-hf) on [{repo_id}](https://huggingface.co/{repo_id}): upload an image or run a
generated example; the page answers for the model's task and, for a classifier, maps how much each region's tokens
moved the answer. The same page runs locally with `xt-hf app --model {repo_id}`.
"""
    return {"app.py": SPACE_APP.format(repo_id=repo_id), "README.md": readme, "requirements.txt": SPACE_REQUIREMENTS}


def demo_for(config, repo_id: str, image_size: int) -> str:
    """The card's runnable snippet for the model's task (the architecture it was saved as)."""
    architecture = next((name for name in (config.architectures or []) if name in TASKS), "XTForImageClassification")
    _, _, auto_class, ending = TASKS[architecture]
    demo = DEMO.format(repo_id=repo_id, image_size=image_size)
    if ending is None:
        return demo
    demo = demo.replace("AutoModelForImageClassification", auto_class)
    return demo[: demo.index("with torch.inference_mode():")] + ending


def _describe(config) -> str:
    backbone = config.backbone_config
    if config.context_encoder == "none":
        context = "none (global average pooling head, the paper's non-xT baseline)"
    elif config.context_encoder == "mamba":
        context = f"Mamba, {config.context_num_layers} layers of width {config.context_hidden_size}"
    else:
        kind = "causal" if config.context_attention_causal else "bidirectional"
        context = (f"{config.context_num_layers} Llama-style {kind} attention layers of width "
                   f"{config.context_hidden_size} ({config.context_num_heads} heads)")
    return (f"- Region encoder: {type(backbone).__name__.removesuffix('Config')} "
            f"(`{backbone.model_type}`), regions of {config.region_size} × {config.region_size} px\n"
            f"- Context encoder: {context}\n"
            f"- Head: {'CLS token through the context encoder' if config.classifier == 'context' else 'pooled MLP'}, "
            f"{config.num_labels} classes")


def render_model_card(entry: dict | None, config, repo_id: str | None = None) -> str:
    """A Hub model card for a registry `entry` of `conversion/variants.json` (or `None` for a custom config)."""
    name = entry["hub_name"] if entry else "xT"
    repo_id = repo_id or f"your-username/xt-{name}"
    image_size = entry["image_size"] if entry else 2 * config.region_size
    results = (entry or {}).get("paper_results") or {}
    if results.get("top1") is not None:
        result_text = (f"Top-1 accuracy **{results['top1']}%** on {results.get('dataset', 'iNaturalist 2018')} "
                       f"at {image_size} × {image_size} px (source: {results.get('source', 'the xT README')}).")
    else:
        result_text = "The authors report no accuracy for this variant."
    if entry and not entry.get("released_weights", False):
        weights_text = ("**No released weights**: this card describes the architecture only; converting needs "
                        "a checkpoint you trained yourself.")
    elif entry:
        weights_text = (f"Converted from `{entry.get('checkpoint_path')}` in the Hub repo "
                        f"`{entry.get('hub_repo', 'bair-climate-initiative/xt')}` with "
                        "`conversion/convert_original_checkpoint.py`, which checks every key and shape.")
    else:
        weights_text = "Converted with `conversion/convert_original_checkpoint.py` of xt-hf."
    notes = "\n".join(f"- {note}" for note in (entry or {}).get("notes", []) if isinstance(note, str))
    architecture = next((name for name in (config.architectures or []) if name in TASKS), "XTForImageClassification")
    pipeline_tag, metric, _, _ = TASKS[architecture]
    return f"""---
library_name: transformers
pipeline_tag: {pipeline_tag}
license: mit
tags:
- xt
- large-images
- nested-tokenization
- custom_code
datasets:
- inaturalist-2018
metrics:
- {metric}
---

# xT {name}

[xT](https://arxiv.org/abs/2403.01915) ("xT: Nested Tokenization for Larger Context in Large Images",
ICML 2024) models images too large for one pass of a vision backbone: it cuts them into regions,
encodes each region independently, stitches the region features into one token grid and runs a
long-sequence context encoder over the whole image.

{_describe(config)}
- Trained input size: {image_size} × {image_size} px (any size of at least one region works)

## Results

{result_text}

## Weights

{weights_text}

## Use

```python
{demo_for(config, repo_id, image_size)}
```

The image processor rescales, normalises with ImageNet statistics (as the original) and pads the
bottom and right to whole regions. Pass `region_batch_size` to `from_pretrained` to bound memory on
very large images.

## Live demo

The [xT app Space](https://huggingface.co/spaces/{space_id(repo_id)}) runs this model in the browser: upload an
image or run a generated example, see the answer and, for a classifier, which regions its context came from. The
same page locally: `pip install "xt-hf[app]"` and `xt-hf app --model {repo_id}` (the Space's files are in `space/`).
{"" if not notes else chr(10) + "## Notes" + chr(10) + chr(10) + notes + chr(10)}
## Citation

```bibtex
{CITATION}
```
"""
