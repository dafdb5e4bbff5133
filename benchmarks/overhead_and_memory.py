"""xT overhead over its region encoder, and peak memory against `region_batch_size`, side by side.

    python benchmarks/overhead_and_memory.py [--side 2048] [--repeats 3] [--device cpu]

Region encoder: Swin-v2-T (swinv2_tiny_window16_256 shapes, random weights), 256 px regions.
Timings (same process, interleaved, median of `--repeats`):
  * backbone alone : the transformers Swinv2Backbone on all regions of the image, pre-cut
  * xT, no context : nested tokenization + chunked region encoding + stitching + pooling head
  * xT, released   : plus the released "hyper" context encoder (2 blocks, width 768, causal)
Peak memory: each `region_batch_size` runs in a fresh process; reported as the peak growth of the
resident set during one forward, beyond model and input (sampled every millisecond from /proc, since
the process high-water mark may already be set by model construction), and on GPU the growth of
`torch.cuda.max_memory_allocated`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from peak_memory import PeakRSS  # benchmarks/ is on sys.path when run as a script


def swin_t_xt_config(context: bool, region_batch_size: int | None = None, region_encoder_attention: str = "sdpa"):
    from xt_hf import XTConfig

    backbone = dict(model_type="swinv2", embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                    window_size=16, drop_path_rate=0.0, out_features=["stage4"])
    if context:
        return XTConfig(region_size=256, backbone_config=backbone, context_encoder="attention",
                        context_hidden_size=768, context_num_layers=2, classifier="context", num_labels=284,
                        region_batch_size=region_batch_size, region_encoder_attention=region_encoder_attention)
    return XTConfig(region_size=256, backbone_config=backbone, context_encoder="none", classifier="pool",
                    num_labels=284, region_batch_size=region_batch_size,
                    region_encoder_attention=region_encoder_attention)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(function, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def measure_overhead(side: int, repeats: int, device: torch.device, dtype: torch.dtype,
                     region_batch_size: int = 16) -> dict:
    from xt_hf import XTForImageClassification
    from xt_hf.nested_tokenization import nested_tokenize, region_batches

    torch.manual_seed(0)
    plain = XTForImageClassification(swin_t_xt_config(context=False, region_batch_size=region_batch_size))
    plain = plain.to(device, dtype).eval()
    released = XTForImageClassification(swin_t_xt_config(context=True, region_batch_size=region_batch_size))
    released = released.to(device, dtype).eval()
    released.xt.region_encoder.load_state_dict(plain.xt.region_encoder.state_dict())
    backbone = plain.xt.region_encoder.backbone
    pixel_values = torch.randn(1, 3, side, side, device=device, dtype=dtype)
    (every_region,) = region_batches(1, side // 256, side // 256, None)
    regions = nested_tokenize(pixel_values, every_region)

    def backbone_alone():
        for start in range(0, len(regions), region_batch_size):
            backbone(regions[start : start + region_batch_size])

    runs = {"backbone": backbone_alone, "xt_no_context": lambda: plain(pixel_values),
            "xt_released_context": lambda: released(pixel_values)}
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for function in runs.values():  # warm-up
            function()
        for _ in range(repeats):
            for name, function in runs.items():
                times[name].append(timed(function, device))
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "regions": len(regions),
        "tokens": (side // 256 * 8) ** 2,
        "seconds": median,
        "ratio_xt_no_context": median["xt_no_context"] / median["backbone"],
        "ratio_xt_released_context": median["xt_released_context"] / median["backbone"],
    }


def peak_memory_child(side: int, region_batch_size: int | None, device_name: str, dtype_name: str,
                      attention: str = "sdpa") -> None:
    """Runs in its own process so that peak RSS belongs to this setting alone."""
    from xt_hf import XTForImageClassification

    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    model = XTForImageClassification(swin_t_xt_config(context=True, region_batch_size=region_batch_size,
                                                      region_encoder_attention=attention))
    model = model.to(device, dtype).eval()
    pixel_values = torch.randn(1, 3, side, side, device=device, dtype=dtype)
    with torch.inference_mode():
        model(torch.randn(1, 3, 256, 256, device=device, dtype=dtype))  # allocator and kernel warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with PeakRSS() as rss:
            start = time.perf_counter()
            model(pixel_values)
            seconds = time.perf_counter() - start
    result = {"peak_rss_growth_mb": rss.growth_mib, "seconds": seconds,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        result["cuda_peak_growth_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    print(json.dumps(result))


def measure_memory(side: int, region_batch_size: int | None, device: str, dtype: str, attention: str = "sdpa") -> dict:
    """Peak memory of one forward with this `region_batch_size` (`None`: all regions at once), in a fresh process."""
    command = [sys.executable, __file__, "--child", "all" if region_batch_size is None else str(region_batch_size),
               "--side", str(side), "--device", device, "--dtype", dtype, "--attention", attention]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-sizes", default="4,64", help="region_batch_size values for the memory runs")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "eager"], help="region_encoder_attention")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child is not None:
        batch_size = None if arguments.child == "all" else int(arguments.child)
        peak_memory_child(arguments.side, batch_size, arguments.device, arguments.dtype, arguments.attention)
        return

    device, dtype = torch.device(arguments.device), getattr(torch, arguments.dtype)
    print(f"device={device} dtype={arguments.dtype} threads={torch.get_num_threads()} image={arguments.side}²")
    overhead = measure_overhead(arguments.side, arguments.repeats, device, dtype)
    seconds = overhead["seconds"]
    print(f"regions={overhead['regions']} context tokens={overhead['tokens']}")
    print(f"backbone alone        {seconds['backbone']:8.2f} s")
    print(f"xT, no context        {seconds['xt_no_context']:8.2f} s   ratio {overhead['ratio_xt_no_context']:.3f}")
    print(f"xT, released context  {seconds['xt_released_context']:8.2f} s   "
          f"ratio {overhead['ratio_xt_released_context']:.3f}")
    for batch_size in (int(b) for b in arguments.batch_sizes.split(",")):
        memory = measure_memory(arguments.side, batch_size, arguments.device, arguments.dtype, arguments.attention)
        line = f"region_batch_size={batch_size:3d}  peak RSS growth {memory['peak_rss_growth_mb']:8.1f} MB"
        if "cuda_peak_growth_mb" in memory:
            line += f"  CUDA peak growth {memory['cuda_peak_growth_mb']:8.1f} MB"
        print(line)


if __name__ == "__main__":
    main()
