"""Region encoder speed, xT overhead over it, and memory by default (issue #18), each a ratio measured in one run.

    python benchmarks/region_encoder.py [--regions 16] [--repeats 5] [--threads 1,2] [--dtypes float32,bfloat16]
                                        [--compile] [--side 2048] [--skip-overhead] [--skip-memory]

Region encoder: Swin-v2-T (swinv2_tiny_window16_256 shapes, random weights), 256 px regions, the same weights and
the same `--regions` regions for every path. All timings are interleaved in one process, median of `--repeats`.

1. Throughput: `region_encoder_attention="sdpa"` (and, with `--compile`, the same backbone `torch.compile`d with
   inductor's `freezing`) against transformers' `Swinv2Backbone` with its own eager attention, for each thread
   count and dtype (`bfloat16`: weights and regions cast), with max |Δ| of the features against the eager float32
   features. FLOPs per region are counted on the eager path (`torch.utils.flop_counter`: matrix products and
   convolutions, attention included) and the achieved rate is compared with this machine's rate on one large matrix
   product of the same dtype, the practical ceiling (`--peak-gflops-per-core` adds the nominal one).
2. Overhead: xT forward with the released "hyper" context / region encoder alone, at `--side`² with the default
   `region_batch_size` (`overhead_and_memory.measure_overhead`), at the first thread count; and the same ratio in
   FLOPs, the time ratio's floor when the context encoder runs no faster than the region encoder.
3. Memory: peak RSS growth of one xT forward at `--side`², each setting in a fresh process: as before this work
   (eager attention, all regions at once) and with the defaults; plus the forward time with the default
   `region_batch_size` against all regions at once (same process, interleaved).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch._inductor.config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

# benchmarks/ is on sys.path when run as a script
from overhead_and_memory import measure_memory, measure_overhead, swin_t_xt_config, timed


def region_encoders(compile_backbone: bool) -> dict[str, torch.nn.Module]:
    """The Swin-v2-T backbone as transformers runs it (eager) and as xT runs it by default, same weights."""
    from xt_hf import XTForImageClassification
    from xt_hf.swinv2_attention import set_swinv2_attention

    torch.manual_seed(0)
    fused = XTForImageClassification(swin_t_xt_config(context=False)).xt.region_encoder.backbone.eval()
    eager = copy.deepcopy(fused)
    set_swinv2_attention(eager, "eager")
    encoders = {"eager": eager, "sdpa": fused}
    if compile_backbone:
        # Freezing treats the weights as constants (inference only): inductor then pre-packs the matrix products
        # and fuses their bias and activation; without it compiling gained nothing measurable here.
        torch._inductor.config.freezing = True
        compiled = copy.deepcopy(fused)
        compiled.compile()
        encoders["sdpa+compile"] = compiled
    return encoders


def counted_flops(function) -> float:
    """FLOPs of matrix products and convolutions, attention included: SDPA runs its math path here, which the
    counter sees as matrix products."""
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def flops_per_region(eager: torch.nn.Module) -> float:
    return counted_flops(lambda: eager(torch.randn(1, 3, 256, 256)))


def xt_flops_ratio(side: int) -> float:
    """FLOPs of the released-context xT forward at `side`² over those of its region encoder alone on the same
    regions: the floor of the time ratio when both run at the same rate."""
    from xt_hf import XTForImageClassification

    model = XTForImageClassification(swin_t_xt_config(context=True)).eval()
    regions = (side // 256) ** 2
    whole = counted_flops(lambda: model(torch.randn(1, 3, side, side)))
    alone = counted_flops(lambda: model.xt.region_encoder.backbone(torch.randn(1, 3, 256, 256)))
    return whole / (regions * alone)


def gemm_gflops(dtype: torch.dtype, repeats: int = 5, size: int = 2048) -> float:
    """This machine's rate on one large matrix product: the ceiling the region encoder's matrix products can reach."""
    left, right = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(left, right)
    seconds = statistics.median(timed(lambda: torch.mm(left, right), torch.device("cpu")) for _ in range(repeats))
    return 2 * size**3 / seconds / 1e9


def measure_throughput(encoders, regions: torch.Tensor, threads: int, dtype: torch.dtype, repeats: int,
                       reference: torch.Tensor) -> dict:
    torch.set_num_threads(threads)
    cast = {name: copy.deepcopy(encoder).to(dtype) if dtype != torch.float32 else encoder
            for name, encoder in encoders.items()}
    inputs = regions.to(dtype)
    times = {name: [] for name in cast}
    deviation = {}
    with torch.inference_mode():
        for name, encoder in cast.items():  # warm-up (and compilation)
            features = encoder(inputs).feature_maps[-1]
            deviation[name] = (features.float() - reference).abs().max().item()
        for _ in range(repeats):
            for name, encoder in cast.items():
                times[name].append(timed(lambda: encoder(inputs), torch.device("cpu")))
    return {"seconds": {name: statistics.median(values) for name, values in times.items()}, "max_abs": deviation}


def measure_default_chunking_time(side: int, repeats: int) -> dict:
    """Forward time of the released-context xT at `side`² with the default `region_batch_size` and with all regions
    at once, interleaved in this process."""
    from xt_hf import XTConfig, XTForImageClassification

    torch.manual_seed(0)
    config = swin_t_xt_config(context=True, region_batch_size=XTConfig().region_batch_size)
    model = XTForImageClassification(config).eval()
    pixel_values = torch.randn(1, 3, side, side)
    settings = {"default": config.region_batch_size, "all": None}
    times = {name: [] for name in settings}
    with torch.inference_mode():
        model(pixel_values)
        for _ in range(repeats):
            for name, batch_size in settings.items():
                model.config.region_batch_size = batch_size
                times[name].append(timed(lambda: model(pixel_values), torch.device("cpu")))
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regions", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--compile", action="store_true", help="also time the sdpa backbone under torch.compile")
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--overhead-repeats", type=int, default=3)
    parser.add_argument("--peak-gflops-per-core", type=float, help="nominal float32 peak of one core, if known")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    arguments = parser.parse_args()
    threads = [int(t) for t in arguments.threads.split(",")]
    dtypes = [getattr(torch, name) for name in arguments.dtypes.split(",")]

    from xt_hf import XTConfig

    encoders = region_encoders(arguments.compile)
    flops = flops_per_region(encoders["eager"])
    torch.manual_seed(1)
    regions = torch.randn(arguments.regions, 3, 256, 256)
    with torch.inference_mode():
        reference = encoders["eager"](regions).feature_maps[-1]
    print(f"1. Region encoder: Swin-v2-T, {arguments.regions} regions of 256², {flops / 1e9:.2f} GFLOP per region "
          f"(matrix products), median of {arguments.repeats}")
    for count in threads:
        for dtype in dtypes:
            torch.set_num_threads(count)
            ceiling = gemm_gflops(dtype)
            result = measure_throughput(encoders, regions, count, dtype, arguments.repeats, reference)
            seconds = result["seconds"]
            for name, value in seconds.items():
                rate = flops * arguments.regions / value / 1e9
                line = (f"   threads={count} {str(dtype).removeprefix('torch.'):8s} {name:12s} "
                        f"{arguments.regions / value:6.2f} regions/s  {seconds['eager'] / value:5.3f}× eager  "
                        f"max|Δ| {result['max_abs'][name]:.1e}  {rate:6.1f} GFLOP/s = {rate / ceiling:4.0%} of "
                        f"{ceiling:.0f} GFLOP/s (GEMM)")
                if arguments.peak_gflops_per_core and dtype == torch.float32:
                    line += f", {rate / (arguments.peak_gflops_per_core * count):4.0%} of nominal"
                print(line, flush=True)
    torch.set_num_threads(threads[0])

    default_batch = XTConfig().region_batch_size
    if not arguments.skip_overhead:
        overhead = measure_overhead(arguments.side, arguments.overhead_repeats, torch.device("cpu"), torch.float32,
                                    region_batch_size=default_batch)
        seconds = overhead["seconds"]
        print(f"2. Overhead at {arguments.side}² ({overhead['regions']} regions, threads={threads[0]}, "
              f"region_batch_size={default_batch}): region encoder alone {seconds['backbone']:.2f} s, "
              f"xT released context {seconds['xt_released_context']:.2f} s, "
              f"ratio {overhead['ratio_xt_released_context']:.3f} (no context: {overhead['ratio_xt_no_context']:.3f}); "
              f"FLOPs xT / region encoder {xt_flops_ratio(arguments.side):.3f}", flush=True)

    if not arguments.skip_memory:
        before = measure_memory(arguments.side, None, "cpu", "float32", attention="eager")
        now = measure_memory(arguments.side, default_batch, "cpu", "float32", attention="sdpa")
        chunked = measure_default_chunking_time(arguments.side, arguments.overhead_repeats)
        print(f"3. Memory at {arguments.side}²: peak RSS growth {before['peak_rss_growth_mb']:.0f} MB before "
              f"(eager, all regions at once) → {now['peak_rss_growth_mb']:.0f} MB with the defaults (sdpa, "
              f"region_batch_size={default_batch}): "
              f"ratio {now['peak_rss_growth_mb'] / before['peak_rss_growth_mb']:.2f}; "
              f"time with region_batch_size={default_batch} / all at once (sdpa, threads={threads[0]}): "
              f"{chunked['default'] / chunked['all']:.3f}", flush=True)


if __name__ == "__main__":
    main()
