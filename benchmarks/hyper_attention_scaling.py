"""Time and peak memory of exact causal attention against HyperAttention as the sequence grows.

    python benchmarks/hyper_attention_scaling.py [--lengths 2048,4096,8192,16384,32768] [--heads 6]
        [--head-dim 128] [--device cpu|cuda] [--dtype float32|bfloat16] [--exact-budget 60] [--threads N]
        [--clock wall|cpu]

Inputs are random `(1, heads, L, head_dim)` query/key/value; both methods run causal, forward only, under
`torch.inference_mode`, with the released settings (`min_seq_len=4096`, 7 projections, blocks of 256 keys,
256 sampled keys; change them with `--min-seq-len`, `--block-size`, `--sample-size`). Exact attention is
`torch.nn.functional.scaled_dot_product_attention` (on CPU a flash-style kernel: O(L) memory, O(L²) time);
it is skipped at a length once the previous length's time × 4 would exceed `--exact-budget` seconds.
Up to `min_seq_len` tokens HyperAttention *is* SDPA. Between `min_seq_len` and `2 · min_seq_len` causal
HyperAttention is still exact (computed in halves); the approximation starts at `2 · min_seq_len`.

Peak memory: on CUDA the growth of `torch.cuda.max_memory_allocated`; on CPU the peak growth of the
process's resident set during the call, sampled every millisecond from /proc/self/statm, with glibc told
to mmap every allocation above 128 KiB (so tensors show up in the resident set and leave it when freed,
instead of being recycled inside the heap).
The "×" columns are the time ratio to the previous length: ≈ 2 is linear growth, ≈ 4 quadratic.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import time

import torch
import torch.nn.functional as F

from xt_hf.hyper_attention import hyper_attention

from peak_memory import PeakRSS  # benchmarks/ is on sys.path when run as a script


def mmap_large_allocations(threshold: int = 128 * 1024) -> None:
    """Fix glibc's mmap threshold (`mallopt(M_MMAP_THRESHOLD)`), which otherwise grows after large frees."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)
    except (OSError, AttributeError):
        pass


def measure(function, device: torch.device, repeats: int, clock) -> tuple[float, float, torch.Tensor]:
    """Median seconds over `repeats` calls, peak memory growth (MiB) of the first, and the output."""
    times, peak = [], 0.0
    for repeat in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with PeakRSS() as rss:
            start = clock()
            output = function()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(clock() - start)
        if repeat == 0:
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if device.type == "cuda" else rss.growth_mib
        if repeat < repeats - 1:
            del output
    return statistics.median(times), peak, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="2048,4096,8192,16384,32768")
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--min-seq-len", type=int, default=4096)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--sample-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement (median)")
    parser.add_argument("--exact-budget", type=float, default=60.0, help="seconds one exact call may take")
    parser.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads); default: PyTorch's")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu: this process's CPU time, steadier than wall time on a shared machine")
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)

    device, dtype = torch.device(arguments.device), getattr(torch, arguments.dtype)
    mmap_large_allocations()
    settings = dict(lsh_num_projs=7, block_size=arguments.block_size, sample_size=arguments.sample_size,
                    min_seq_len=arguments.min_seq_len)
    scale = arguments.head_dim**-0.5
    clock = time.process_time if arguments.clock == "cpu" else time.perf_counter
    print(f"device={device} dtype={arguments.dtype} threads={torch.get_num_threads()} clock={arguments.clock} "
          f"heads={arguments.heads} head_dim={arguments.head_dim} causal, forward; hyper: {settings}")

    def exact(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)

    def hyper(q, k, v):
        return hyper_attention(q, k, v, scale=scale, causal=True, **settings)

    with torch.inference_mode():
        warm = torch.randn(1, arguments.heads, 512, arguments.head_dim, device=device, dtype=dtype)
        exact(warm, warm, warm)
        hyper_attention(warm, warm, warm, scale=scale, causal=True, block_size=32, sample_size=32, min_seq_len=64)

        header = (f"{'L':>6} | {'exact s':>8} {'×':>5} {'MiB':>7} | {'hyper s':>8} {'×':>5} {'MiB':>7} | "
                  f"{'exact/hyper':>11} | {'rel. error':>10}")
        print(header)
        print("-" * len(header))
        previous = {}  # method → seconds at the previous length
        for length in (int(n) for n in arguments.lengths.split(",")):
            generator = torch.Generator().manual_seed(length)
            q, k, v = (torch.randn(1, arguments.heads, length, arguments.head_dim, generator=generator)
                       .to(device, dtype) for _ in range(3))
            if 4 * previous.get("exact", 0.0) > arguments.exact_budget:
                previous["exact"] = float("inf")  # too slow from here on
            row = {}
            for name, function in (("hyper", hyper), ("exact", exact)):
                last = previous.get(name, 0.0)
                if last != float("inf"):
                    repeats = arguments.repeats if 2 * last < 20 else 1
                    row[name] = measure(lambda: function(q, k, v), device, repeats, clock)

            cells = []
            for name in ("exact", "hyper"):
                if name not in row:
                    cells.append(f"{'—':>8} {'':>5} {'':>7}")
                    continue
                seconds, mib, _ = row[name]
                ratio = f"{seconds / previous[name]:5.2f}" if name in previous else f"{'':>5}"
                cells.append(f"{seconds:8.3f} {ratio} {mib:7.0f}")
                previous[name] = seconds
            speedup, error = f"{'—':>11}", f"{'—':>10}"
            if "exact" in row:
                exact_output, hyper_output = row["exact"][2].float(), row["hyper"][2].float()
                speedup = f"{row['exact'][0] / row['hyper'][0]:11.2f}"
                error = f"{((hyper_output - exact_output).norm() / exact_output.norm()).item():10.3f}"
            print(f"{length:>6} | {cells[0]} | {cells[1]} | {speedup} | {error}", flush=True)
            del q, k, v, row

if __name__ == "__main__":
    main()
