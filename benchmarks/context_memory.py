"""Peak memory of the context encoder alone as the token grid grows, with and without token chunking.

The region encoder's memory is bounded by `region_batch_size` whatever the image size; what grows with
the image is the stitched token grid and the context encoder run over it. This measures that part in
isolation (the released 768-wide, 2-layer HyperAttention encoder, or with `--context mamba` the released
768-wide, 4-layer Mamba encoder, on a Swin-v2-T grid: one token per 32 × 32 px) for image sides from
2,048 px up, each size in a fresh subprocess:

    python benchmarks/context_memory.py --sides 2048 4096 8192 16384 --csv benchmarks/results/context_memory.csv

`growth` is the process's peak resident memory during the forward minus before it (the grid itself is
allocated before); `× grid` divides it by the token grid's own size. `chunked` uses the default
`context_token_chunk_size` (token chunks, and in place head by head above it); `unchunked` sets it above
the token count (the whole sequence at once, as a plain implementation does; HyperAttention still runs
one head at a time); `spilled` is `chunked` with the token sequence (and the attention blocks' buffer of
heads' outputs) in a file in a temporary directory (`--spill-dir`), released chunk by chunk (`xt_hf.engine.spill`).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STRIDE = 32  # Swin-v2-T's deepest stage: one token per 32 × 32 px
CHANNELS = 768


def measure(height: int, width: int, chunk: int | None, dtype: str, context: str, spill: str | None = None) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from peak_memory import PeakRSS

    from xt_hf import XTConfig
    from xt_hf.context_encoder import XTContextEncoder
    from xt_hf.engine import encode_grid

    torch.manual_seed(0)
    rows, cols = height // STRIDE, width // STRIDE
    chunking = {} if chunk is None else {"context_token_chunk_size": chunk}
    if context == "mamba":  # the released swin-*-mamba context encoder
        config = XTConfig(context_encoder="mamba", context_hidden_size=768, context_num_layers=4, **chunking)
    else:
        config = XTConfig(context_hidden_size=768, context_num_layers=2, context_long_sequence_attention="hyper",
                          **chunking)
    encoder = XTContextEncoder(config, CHANNELS).eval().to(getattr(torch, dtype))
    grid = torch.randn(1, CHANNELS, rows, cols, dtype=getattr(torch, dtype))
    start = time.perf_counter()
    with torch.inference_mode(), PeakRSS() as peak:
        encode_grid(encoder, grid, spill_directory=spill)
    return {
        "context": context, "height": height, "width": width, "tokens": rows * cols, "dtype": dtype,
        "chunk": config.context_token_chunk_size, "seconds": round(time.perf_counter() - start, 2),
        "grid_mib": round(grid.numel() * grid.element_size() / 2**20, 1), "growth_mib": round(peak.growth_mib, 1),
        "spilled": spill is not None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--extra", nargs="*", default=[], metavar="HxW", help="other image sizes, e.g. 29000x25000")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--context", default="hyper", choices=["hyper", "mamba"])
    parser.add_argument("--modes", default="unchunked,chunked,spilled")
    parser.add_argument("--spill-dir", default=None, help="where `spilled` keeps its files (a temporary directory)")
    parser.add_argument("--csv")
    parser.add_argument("--_child", nargs=6, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments._child:
        height, width, chunk, dtype, context, spill = arguments._child
        print(json.dumps(measure(int(height), int(width), None if chunk == "default" else int(chunk), dtype, context,
                                 None if spill == "none" else spill)))
        return

    sizes = [(side, side) for side in arguments.sides] + [tuple(map(int, s.split("x"))) for s in arguments.extra]
    rows = []
    print(f"{'image':>13} {'tokens':>8} {'grid MiB':>9} {'mode':>9} {'growth MiB':>11} {'× grid':>7} {'s':>7}")
    modes = {"unchunked": (str(10**9), False), "chunked": ("default", False), "spilled": ("default", True)}
    spill_folder = tempfile.TemporaryDirectory(dir=arguments.spill_dir)
    for height, width in sizes:
        for mode in arguments.modes.split(","):
            chunk, spilled = modes[mode]
            result = subprocess.run(
                [sys.executable, __file__, "--_child", str(height), str(width), chunk, arguments.dtype,
                 arguments.context, spill_folder.name if spilled else "none"],
                capture_output=True, text=True,
            )
            if result.returncode:
                print(f"{height}×{width} {mode}: failed ({result.stderr.strip().splitlines()[-1:]})")
                continue
            row = {"mode": mode, **json.loads(result.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"{height:>6}×{width:<6} {row['tokens']:>8} {row['grid_mib']:>9} {mode:>9} {row['growth_mib']:>11} "
                  f"{row['growth_mib'] / row['grid_mib']:>7.2f} {row['seconds']:>7}", flush=True)
    if arguments.csv and rows:
        Path(arguments.csv).parent.mkdir(parents=True, exist_ok=True)
        with open(arguments.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
