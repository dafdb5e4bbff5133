"""Record what the xT image processors of the release before the transformers-5 rename save, and what they compute.

Recorded at commit e69ff3c29439a30993cc469806f3df8846e437a3 (xt-hf 0.1.0, transformers 5.25), where
`XTImageProcessor` was the PIL/NumPy backend (`image_processing_xt.py`) and `XTImageProcessorFast` the torchvision
one (`image_processing_xt_fast.py`). `tests/test_image_processing.py` loads these folders with the renamed classes
and checks that they give the recorded `pixel_values`.

To record again, run this file against a checkout of that commit (not the working tree, which has the new names):

    git worktree add /tmp/xt-before e69ff3c29439a30993cc469806f3df8846e437a3
    PYTHONPATH=/tmp/xt-before/src .venv/bin/python tests/data/processors_before_rename/record.py

Each folder holds what `save_pretrained` wrote except the copies of the processor's own modules (it wrote
`image_processing_xt.py` and `image_processing_xt_fast.py` beside the JSON, as remote code): they are that commit's
files, and a loader that has `xt_hf` installed uses its own classes instead. `reference.npz` holds the input image
and each folder's `pixel_values` (`return_tensors="np"`).
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SETTINGS = {
    "region_size": 16,
    "image_mean": [0.5, 0.4, 0.3],
    "image_std": [0.2, 0.25, 0.3],
    "pad_value": -1.0,
    "do_resize": True,
    "size": {"height": 32, "width": 48},
    "resample": 3,  # BICUBIC
}
RESCALED = {"region_size": 16, "rescale_factor": 1 / 4095, "do_normalize": False}  # 12-bit data in uint16


def image() -> np.ndarray:
    """A `(20, 37, 3)` uint8 image, not a whole number of regions, so that padding and resizing both show."""
    return np.random.default_rng(30).integers(0, 256, (20, 37, 3), dtype=np.uint8)


def main() -> None:
    import xt_hf
    from xt_hf import XTImageProcessor
    from xt_hf.image_processing_xt_fast import XTImageProcessorFast

    source = Path(xt_hf.__file__).resolve().parent
    commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=False).stdout
    print(f"recording with {source} at commit {commit.strip() or 'unknown'}")
    folders = {
        "pil": XTImageProcessor(**SETTINGS),
        "torchvision": XTImageProcessorFast(**SETTINGS),
        "pil_rescale_factor": XTImageProcessor(**RESCALED),
    }
    outputs = {"image": image(), "image_uint16": (image().astype(np.uint16) * 16)}
    for name, processor in folders.items():
        folder = HERE / name
        processor.save_pretrained(folder)
        for module in folder.glob("*.py"):
            module.unlink()
        pixels = processor(outputs["image_uint16" if name == "pil_rescale_factor" else "image"],
                           return_tensors="np")["pixel_values"]
        outputs[name] = pixels
        saved = json.loads((folder / "preprocessor_config.json").read_text())
        print(f"{name}: {saved['image_processor_type']}, auto_map {saved.get('auto_map')}, {pixels.shape}")
    np.savez_compressed(HERE / "reference.npz", **outputs)


if __name__ == "__main__":
    sys.exit(main())
