"""Peak memory and time against image side: xT streaming versus the same backbone on the whole image.

    python benchmarks/gigapixel.py [--quick] [--sides 1024,2048,4096] [--baseline-sides ...] [--memory-cap-gb 20]
                                   [--context hyper|mamba] [--spill]

(a) xT streaming: Swin-v2-T region encoder (embed 96, depths 2-2-6-2, window 16, 256 px regions),
    attention context encoder (2 layers, width 768; HyperAttention above 4,096 tokens) or with
    `--context mamba` the released Mamba encoder (4 layers, width 768), regions read from a uint8 .npy
    memmap on disk, `region_batch_size` 16. With `--spill` (CPU) the context encoder's token buffers live
    in files in the image's temporary directory (`spill_directory`), and the rows are labelled `xt_spilled`.
(b) whole image: transformers `Swinv2Model` with the same shapes on the full image at once.
Each measurement runs in a fresh process whose address space is capped (`--memory-cap-gb`), so a
baseline that does not fit fails with "OOM" instead of taking the machine down. Peak memory is the
process's peak resident set (CPU) or `torch.cuda.max_memory_allocated` (GPU), in GiB (2³⁰ bytes).
Writes a CSV and, when matplotlib is installed, a PNG next to it.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SWIN_T = dict(model_type="swinv2", embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=16,
              drop_path_rate=0.0, out_features=["stage4"])


def write_image(path: Path, height: int, width: int) -> None:
    """A random uint8 image written band by band, so the benchmark itself never holds it in memory."""
    image = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(height, width, 3))
    rng = np.random.default_rng(0)
    for top in range(0, height, 1024):
        image[top : top + 1024] = rng.integers(0, 255, image[top : top + 1024].shape, dtype=np.uint8)
    image.flush()


def child(kind: str, path: str, device_name: str, dtype_name: str, context: str = "hyper", spill: bool = False) -> dict:
    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    image = np.load(path, mmap_mode="r")
    height, width = image.shape[:2]
    start = time.perf_counter()
    if kind == "xt":
        from xt_hf import XTConfig, XTForImageClassification
        from xt_hf.engine import predict_streaming

        # The released 2-layer causal HyperAttention encoder, or the released 4-layer Mamba encoder.
        layers = dict(context_encoder="mamba", context_num_layers=4) if context == "mamba" else dict(
            context_encoder="attention", context_num_layers=2)
        config = XTConfig(region_size=256, backbone_config=SWIN_T, context_hidden_size=768, classifier="context",
                          num_labels=10, **layers)
        model = XTForImageClassification(config).to(device, dtype).eval()
        predict_streaming(model, image, region_batch_size=16, spill_directory=Path(path).parent if spill else None)
    else:
        from transformers import Swinv2Config, Swinv2Model

        config = Swinv2Config(image_size=256, **{k: v for k, v in SWIN_T.items() if k not in ("model_type", "out_features")})
        model = Swinv2Model(config).to(device, dtype).eval()
        with torch.inference_mode():
            pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].to(device, dtype) / 255
            model(pixels)
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"seconds": seconds, "peak_gib": peak, "height": height, "width": width}


def measure(kind: str, path: Path, arguments) -> dict:
    cap = int(arguments.memory_cap_gb * 2**30)
    command = [sys.executable, __file__, "--child", kind, str(path), "--device", arguments.device,
               "--dtype", arguments.dtype, "--context", arguments.context] + (["--spill"] if arguments.spill else [])
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=arguments.timeout,
        preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap))) if arguments.device == "cpu" else None,
    )
    if result.returncode != 0:
        reason = "OOM" if ("memory" in result.stderr.lower() or result.returncode < 0) else "error"
        return {"status": reason, "detail": result.stderr.strip().splitlines()[-1:] if result.stderr else []}
    return {"status": "ok", **json.loads(result.stdout.strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="sides 512 and 1024 only")
    parser.add_argument("--sides", default="1024,2048,4096,5120,8192,16384")
    parser.add_argument("--baseline-sides", default="1024,2048,4096,5120,6144,8192")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--context", default="hyper", choices=["hyper", "mamba"], help="xT's context encoder")
    parser.add_argument("--spill", action="store_true", help="xT keeps its token buffers in files (CPU)")
    parser.add_argument("--memory-cap-gb", type=float, default=20.0)
    parser.add_argument("--timeout", type=int, default=3600)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "gigapixel.csv")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "IMAGE"), help=argparse.SUPPRESS)
    parser.add_argument("--plot", nargs="+", type=Path, metavar="CSV",
                        help="only plot these earlier runs' CSVs together, into --output's .png")
    arguments = parser.parse_args()
    if arguments.plot:
        rows = [row for path in arguments.plot for row in csv.DictReader(path.open())]
        plot(rows, arguments.output.with_suffix(".png"))
        return
    if arguments.child:
        result = child(*arguments.child, arguments.device, arguments.dtype, arguments.context, arguments.spill)
        print(json.dumps(result))
        return

    sides = [512, 1024] if arguments.quick else [int(s) for s in arguments.sides.split(",") if s]
    baseline_sides = [512, 1024] if arguments.quick else [int(s) for s in arguments.baseline_sides.split(",") if s]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for side in sorted(set(sides) | set(baseline_sides)):
            path = Path(folder) / f"{side}.npy"
            write_image(path, side, side)
            for kind, wanted in (("xt", sides), ("whole_image", baseline_sides)):
                if side not in wanted:
                    continue
                result = measure(kind, path, arguments)
                label = "xt_spilled" if kind == "xt" and arguments.spill else kind
                figures = {k: result.get(k) for k in ("status", "seconds", "peak_gib")}
                rows.append({"model": label, "side": side, **figures})
                print(f"{label:12s} {side:6d}²  {result['status']:5s}  "
                      f"{result.get('seconds') or float('nan'):8.1f} s  {result.get('peak_gib') or float('nan'):6.2f} GiB",
                      flush=True)
                if result["status"] != "ok" and kind == "whole_image":
                    baseline_sides = [s for s in baseline_sides if s < side]  # larger ones cannot fit either
            path.unlink()
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    with arguments.output.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["model", "side", "status", "seconds", "peak_gib"])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {arguments.output}")
    plot(rows, arguments.output.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    """Peak memory and time against image side, one line per model (ok rows only)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = {"xt": "xT streaming (Swin-v2-T regions)", "xt_spilled": "xT streaming, tokens spilled to disk",
              "whole_image": "Swin-v2-T, whole image"}
    for kind, label in labels.items():
        done = sorted((r for r in rows if r["model"] == kind and r["status"] == "ok"), key=lambda r: int(r["side"]))
        if not done:
            continue
        axes[0].plot([int(r["side"]) for r in done], [float(r["peak_gib"]) for r in done], "o-", label=label)
        axes[1].plot([int(r["side"]) for r in done], [float(r["seconds"]) for r in done], "o-", label=label)
    for axis, title in zip(axes, ("peak memory (GiB)", "time (s)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("image side (px)")
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
