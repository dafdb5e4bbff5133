"""One large image on 1 process against N processes sharing its regions (`shard_regions=True`), one thread each.

    OMP_NUM_THREADS=1 python benchmarks/shard_regions.py --side 8192 --processes 2

The model is the headline benchmark's (Swin-v2-T regions of 256 px, the 768-wide 2-layer causal HyperAttention
context encoder, CLS head). Every run is fresh processes over gloo on this machine's CPU. Each rank reports the
seconds its region stage took (reading, region encoder, embedding; until its tokens are handed over) and its peak
RSS; rank 0 also the whole prediction. It prints one JSON line per run and the region stage's speed-up.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from gigapixel_headline import build_model  # noqa: E402


def rank_main(rank: int, world: int, folder: str, image_path: str) -> None:
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    from xt_hf.engine import scene

    model = build_model()
    image = np.load(image_path, mmap_mode="r")
    marks = {}
    embedded_regions = scene._embedded_regions

    def timed(*arguments):  # the region stage ends when this rank's last region is embedded
        yield from embedded_regions(*arguments)
        marks["regions_done"] = time.perf_counter()

    scene._embedded_regions = timed
    start = time.perf_counter()
    logits = scene.predict_streaming(model, image, region_batch_size=16, shard_regions=world > 1)
    report = {"world": world, "rank": rank, "region_stage_s": round(marks["regions_done"] - start, 1),
              "total_s": round(time.perf_counter() - start, 1),
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if logits is not None:
        report["logits"] = [round(v, 5) for v in logits[0].tolist()]
    Path(folder, f"rank{rank}_of_{world}.json").write_text(json.dumps(report))
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", type=int, default=8192)
    parser.add_argument("--processes", type=int, default=2)
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        image_path = f"{folder}/image.npy"
        image = np.lib.format.open_memmap(image_path, mode="w+", dtype=np.uint8, shape=(arguments.side, arguments.side, 3))
        rng = np.random.default_rng(0)
        for top in range(0, arguments.side, 1024):
            image[top : top + 1024] = rng.integers(0, 256, image[top : top + 1024].shape, dtype=np.uint8)
        image.flush()
        del image
        runs = {}
        for world in (1, arguments.processes):
            mp.spawn(rank_main, args=(world, folder, image_path), nprocs=world, join=True)
            runs[world] = [json.loads(Path(folder, f"rank{r}_of_{world}.json").read_text()) for r in range(world)]
            for report in runs[world]:
                print(json.dumps(report))
        one = runs[1][0]["region_stage_s"]
        many = max(report["region_stage_s"] for report in runs[arguments.processes])
        print(json.dumps({"side": arguments.side, "processes": arguments.processes,
                          "region_stage_speedup": round(one / many, 2),
                          "same_logits": runs[1][0]["logits"] == runs[arguments.processes][0]["logits"]}))


if __name__ == "__main__":
    main()
