"""One training step on one huge image: xT against the original xT code and a whole-image Swin-v2 (issue #29).

    python benchmarks/training_memory.py [--sizes 512,1024,2048] [--dtypes fp32,bf16] [--max-gb 20]
        [--settings defaults,checkpointing,grad_ratio] [--original-repo PATH --original-python PYTHON]
        [--json-out results.json]

What one step is: forward, cross-entropy loss, backward, AdamW step, `zero_grad(set_to_none=True)`, on one
square image of each size, CPU, one thread, float32 or bfloat16 autocast (`torch.autocast("cpu")`; the
weights stay float32). The architecture is the released Swin-T xT "hyper" 512/256
(`conversion/variants.json`, `swin_v2_tiny_1e-4_hyper_512_256`: Swin-v2-T regions of 256 px, two causal
context blocks of width 768, 284 classes) with random weights, in training mode (drop path active).

Rows, each in a fresh process:
  xT, defaults         `region_batch_size` 16 (the default), no checkpointing, `grad_ratio` 1
  xT, checkpointing    `gradient_checkpointing` (non-reentrant, as `xt_hf.training` enables it), batch 16
  xT, grad_ratio 0.5   half the regions, drawn at random, keep backbone activations
  baseline             transformers' `Swinv2ForImageClassification`, Swin-v2-T, window 16, over the whole
                       image (the paper's "comparable baseline"), its own eager attention
  original, defaults / original, grad_ratio 0.5
                       the original xT code (`xt.models.build_model`, imported from `--original-repo` with
                       the shims of `conversion/record_original_references.py`; never copied here), run by
                       `--original-python` (its scratch environment). It has no checkpointing switch; its
                       trainer never passes `use_checkpoint`. With `--original-repo` both models start from
                       the same weights: the original model's, converted by `conversion/`.

Reported per row: the peak resident-set growth over the loaded model and its optimizer (the process's
VmHWM after `clear_refs`, so exact, not sampled; it includes the gradients and AdamW's two moments, which
the first step allocates), the step time, both per 256 px region (the baseline: per 256² px of image),
and what autograd stored for backward during the forward (tensors saved by autograd, deduplicated by
storage, parameters excluded), split into the region encoder and the
context encoder. A run whose resident set passes `--max-gb` is killed and reported as not fitting; larger
sizes of that row are then skipped. Rows run size-major, so that the runs compared in the table run
back to back, under the same load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VARIANT = "swin_v2_tiny_1e-4_hyper_512_256"
REGION = 256
SETTINGS = ("defaults", "checkpointing", "grad_ratio")
ORIGINAL_SETTINGS = ("defaults", "grad_ratio")
GB = 1e9


# ---- inside a child process -------------------------------------------------------------------------------

def resident_bytes(field: str = "VmRSS") -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) * 1024


class SavedForBackward:
    """Bytes autograd keeps for backward while the block runs, by phase (`region` or `context`), beyond `model`'s
    parameters (an op that keeps a weight for backward keeps the parameter itself, no new memory)."""

    def __init__(self, model):
        self.bytes = {"region": 0, "context": 0}
        self.phase = "region"
        self._seen: set[int] = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self._seen:
            self._seen.add(storage.data_ptr())
            self.bytes[self.phase] += storage.nbytes()
        return tensor

    def watch_context(self, module) -> None:
        module.register_forward_pre_hook(lambda *_: setattr(self, "phase", "context"))
        module.register_forward_hook(lambda *_: setattr(self, "phase", "region"))


def one_step(model, loss_of, pixel_values, job: dict, counter: SavedForBackward) -> dict:
    """`job["steps"]` optimizer steps; the peak covers them all, the time is the last one's (the first pays
    one-time costs: AdamW's state, oneDNN's kernel selection)."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    loaded = resident_bytes()
    try:  # resets VmHWM to the current resident set (Linux ≥ 4.0), so the peak below is the steps'
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    for step in range(job.get("steps", 2)):
        hooks = torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda tensor: tensor)
        if step > 0:
            hooks = torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, lambda tensor: tensor)
        start = time.perf_counter()
        with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=job["dtype"] == "bf16"):
            loss = loss_of(model, pixel_values)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
    return {"loaded_gb": loaded / GB, "peak_growth_gb": (resident_bytes("VmHWM") - loaded) / GB, "step_s": seconds,
            "saved_region_gb": counter.bytes["region"] / GB, "saved_context_gb": counter.bytes["context"] / GB,
            "loss": float(loss)}


def run_xt(job: dict) -> dict:
    import torch

    sys.path.insert(0, str(REPO))
    from conversion.original_config import xt_config_from_original
    from xt_hf import XTForImageClassification

    if job.get("weights"):
        from conversion.convert_original_checkpoint import convert_checkpoint

        model = convert_checkpoint(job["weights"], variant=VARIANT)[0]
    else:
        entry = json.loads((REPO / "conversion" / "variants.json").read_text())[VARIANT]
        torch.manual_seed(0)
        model = XTForImageClassification(xt_config_from_original(entry["original_config"]))
    if job["setting"] == "checkpointing":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if job["setting"] == "grad_ratio":
        model.config.grad_ratio = 0.5
    if job.get("region_batch_size"):
        model.config.region_batch_size = job["region_batch_size"]
    counter = SavedForBackward(model)
    counter.watch_context(model.xt.context_encoder)
    labels = torch.tensor([1])
    pixel_values = torch.randn(1, 3, job["size"], job["size"], generator=torch.Generator().manual_seed(1))
    return one_step(model, lambda m, x: m(x, labels=labels).loss, pixel_values, job, counter)


def run_baseline(job: dict) -> dict:
    import torch
    from transformers import Swinv2Config, Swinv2ForImageClassification

    torch.manual_seed(0)
    config = Swinv2Config(image_size=job["size"], patch_size=4, embed_dim=96, depths=[2, 2, 6, 2],
                          num_heads=[3, 6, 12, 24], window_size=16, drop_path_rate=0.2, num_labels=284)
    model = Swinv2ForImageClassification(config)
    counter = SavedForBackward(model)
    counter.watch_context(model.classifier)
    labels = torch.tensor([1])
    pixel_values = torch.randn(1, 3, job["size"], job["size"], generator=torch.Generator().manual_seed(1))
    return one_step(model, lambda m, x: m(x, labels=labels).loss, pixel_values, job, counter)


def build_original(job: dict):
    """The original model of `VARIANT`, full size, built by the original code with the recorder's shims."""
    import torch

    sys.path.insert(0, str(REPO))
    from conversion import record_original_references as recorder

    original = recorder.import_original(Path(job["original_repo"]))
    entry = json.loads((REPO / "conversion" / "variants.json").read_text())[VARIANT]
    model_config = original.OmegaConf.merge(original.OmegaConf.structured(original.ModelConfig),
                                            entry["original_config"])
    if job.get("setting") == "grad_ratio":
        model_config.context.grad_ratio = 0.5
    torch.manual_seed(0)
    with recorder.backbone_shrink({}):  # full size, pretrained=False
        model = original.build_model(model_config)
    return model.to(memory_format=torch.channels_last), recorder  # as the original trainer does


def run_original(job: dict) -> dict:
    import torch

    model, _ = build_original(job)
    if job.get("weights"):
        state_dict = torch.load(job["weights"], map_location="cpu", weights_only=True)["state_dict"]
        model.load_state_dict({key.removeprefix("module."): value for key, value in state_dict.items()})
    counter = SavedForBackward(model)
    counter.watch_context(model.decoder)
    labels = torch.tensor([1])
    pixel_values = torch.randn(1, 3, job["size"], job["size"], generator=torch.Generator().manual_seed(1))
    return one_step(model, lambda m, x: torch.nn.functional.cross_entropy(m(x)["label"], labels), pixel_values,
                    job, counter)


def write_original_weights(job: dict) -> dict:
    import torch

    model, recorder = build_original(job)
    torch.save(recorder.trainer_payload(model), job["weights"])
    return {"weights": job["weights"]}


def child(job: dict) -> None:
    import torch

    torch.set_num_threads(1)
    run = {"xt": run_xt, "baseline": run_baseline, "original": run_original,
           "original_weights": write_original_weights}[job["kind"]]
    print("RESULT " + json.dumps(run(job)), flush=True)


# ---- the parent: one fresh process per row and size ----------------------------------------------------------

def launch(job: dict, python: str, max_bytes: float, timeout: float, mmap_threshold: int | None = None) -> dict:
    """Runs `job` in a fresh one-thread process, killed once its resident set passes `max_bytes`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    process = subprocess.Popen([python, __file__, "--child", json.dumps(job)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    start, status, peak = time.monotonic(), None, 0
    while process.poll() is None:
        try:
            rss = int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{process.pid}/status").read_text()).group(1))
            peak = max(peak, rss * 1024)
        except (OSError, AttributeError):
            pass
        if peak > max_bytes:
            status = f"over {max_bytes / GB:.0f} GB"
        elif time.monotonic() - start > timeout:
            status = f"over {timeout:.0f} s"
        if status:
            os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    stdout, stderr = process.communicate()
    if status:
        return {"error": status, "fits": False}
    results = [line[len("RESULT "):] for line in stdout.splitlines() if line.startswith("RESULT ")]
    if process.returncode != 0 or not results:
        last = (stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {process.returncode}: {last[:160]}", "fits": process.returncode != -9}
    return json.loads(results[-1])


def rows_to_run(args) -> list[tuple[str, str]]:
    rows = [("xt", setting) for setting in args.settings]
    if not args.skip_baseline:
        rows.append(("baseline", "-"))
    if args.original_repo:
        rows += [("original", setting) for setting in ORIGINAL_SETTINGS if setting in args.settings]
    return rows


def per_region(result: dict, size: int) -> tuple[float, float]:
    regions = math.ceil(size / REGION) ** 2
    return result["peak_growth_gb"] * 1000 / regions, result["step_s"] / regions


def table(results: list[dict]) -> str:
    """The Markdown table: one line per dtype, size and row, with ratios to the original's same setting
    (xT with checkpointing against the original's defaults, its only way to train)."""
    by_key = {(r["dtype"], r["size"], r["kind"], r["setting"]): r for r in results}
    lines = [("| dtype | image | regions | run | peak growth (GB) | MB / region | step (s) | s / region | saved for "
              "backward: region / context (GB) | memory × original | time × original |"),
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:  # in the order they ran: size-major
        name = r["kind"] if r["setting"] == "-" else f"{r['kind']}, {r['setting']}"
        regions = math.ceil(r["size"] / REGION) ** 2
        head = f"| {r['dtype']} | {r['size']}² | {regions} | {name} |"
        if "error" in r:
            lines.append(head + f" {r['error']} | | | | | | |")
            continue
        mb_region, s_region = per_region(r, r["size"])
        ratios = ["", ""]
        if r["kind"] == "xt":
            reference = by_key.get((r["dtype"], r["size"], "original",
                                    "grad_ratio" if r["setting"] == "grad_ratio" else "defaults"))
            if reference and "error" not in reference:
                ratios = [f"{r['peak_growth_gb'] / reference['peak_growth_gb']:.2f}",
                          f"{r['step_s'] / reference['step_s']:.2f}"]
        lines.append(head + f" {r['peak_growth_gb']:.2f} | {mb_region:.0f} | {r['step_s']:.1f} | {s_region:.2f} | "
                     f"{r['saved_region_gb']:.2f} / {r['saved_context_gb']:.2f} | {ratios[0]} | {ratios[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default="512,1024,2048,4096,8192", help="Image sides in px, comma-separated.")
    parser.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (autocast).")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="xT rows: " + ", ".join(SETTINGS) + ".")
    parser.add_argument("--max-gb", type=float, default=20.0, help="Kill a run whose resident set passes this.")
    parser.add_argument("--timeout", type=float, default=3600.0, help="Kill a run that takes longer (s).")
    parser.add_argument("--steps", type=int, default=2, help="Steps per run; the time is the last one's.")
    parser.add_argument("--region-batch-size", type=int, help="xT rows: this instead of the default (16).")
    parser.add_argument("--malloc-mmap-threshold", type=int, help=(
        "Children get MALLOC_MMAP_THRESHOLD_=N: glibc then serves blocks of N bytes or more with mmap and returns "
        "them on free, instead of a heap that the tensors saved for backward fragment (131072: docs/performance.md)."))
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--original-repo", help="Checkout of github.com/bair-climate-initiative/xT (outside "
                                                "this repository); its training step is measured too.")
    parser.add_argument("--original-python", default=sys.executable,
                        help="Interpreter of the original code's environment (timm, omegaconf, ...).")
    parser.add_argument("--json-out", help="Also write every result to this JSON file.")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    args.settings = [name for name in args.settings.split(",") if name]
    sizes = [int(size) for size in args.sizes.split(",")]
    max_bytes = args.max_gb * GB
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        weights = None
        if args.original_repo:
            weights = str(Path(scratch) / "original.ckpt")
            written = launch({"kind": "original_weights", "original_repo": args.original_repo, "weights": weights},
                             args.original_python, max_bytes, args.timeout)
            if "error" in written:
                sys.exit(f"Could not build the original model: {written['error']}")
        # Size-major, so that the rows compared in the table run back to back, under the same load.
        too_large: set[tuple[str, str, str]] = set()
        for dtype in args.dtypes.split(","):
            for size in sizes:
                for kind, setting in rows_to_run(args):
                    if (dtype, kind, setting) in too_large:
                        continue  # a smaller image did not fit
                    job = {"kind": kind, "setting": setting, "dtype": dtype, "size": size, "steps": args.steps,
                           "weights": weights, "original_repo": args.original_repo,
                           "region_batch_size": args.region_batch_size}
                    python = args.original_python if kind == "original" else sys.executable
                    result = {**job, **launch(job, python, max_bytes, args.timeout, args.malloc_mmap_threshold)}
                    results.append(result)
                    print(json.dumps({k: v for k, v in result.items() if k not in ("weights", "original_repo")}),
                          flush=True)
                    if args.json_out:
                        Path(args.json_out).write_text(json.dumps(results, indent=1))
                    if result.get("fits") is False:
                        too_large.add((dtype, kind, setting))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
