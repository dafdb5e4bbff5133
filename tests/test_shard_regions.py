"""One large image across processes: the region stage shared between ranks, the context encoder on rank 0."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import REGION, tiny_config

from xt_hf import XTForImageClassification
from xt_hf.engine import encode_context_streaming, predict_streaming


def _predict(rank: int, folder: str, batch_size: int, world: int) -> None:
    """One process of a `world`-process run (1: no torch.distributed, no sharding); rank 0 saves the logits."""
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        model = XTForImageClassification.from_pretrained(f"{folder}/model").eval()
        image = np.load(f"{folder}/image.npy", mmap_mode="r")
        logits = predict_streaming(model, image, region_batch_size=batch_size, shard_regions=world > 1)
        if rank == 0:
            torch.save(logits, f"{folder}/logits_{world}.pt")
        else:
            assert logits is None
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_two_processes_share_one_image_and_give_the_logits_of_one(tmp_path):
    """Each region encoded alone (batches of one) in both runs: the same operations, so the same bits."""
    batch_size = 1
    torch.manual_seed(0)
    model = XTForImageClassification(tiny_config(context_token_chunk_size=7)).eval()
    model.save_pretrained(tmp_path / "model")
    image = np.random.default_rng(0).integers(0, 256, (3 * REGION + 5, 5 * REGION, 3), dtype=np.uint8)  # 20 regions
    np.save(tmp_path / "image.npy", image)
    for world in (1, 2):  # both in fresh processes with one thread each, so only the sharing differs
        mp.spawn(_predict, args=(str(tmp_path), batch_size, world), nprocs=world, join=True)
    one, two = torch.load(tmp_path / "logits_1.pt"), torch.load(tmp_path / "logits_2.pt")
    assert torch.equal(two, one), (two - one).abs().max()


def test_sharding_needs_torch_distributed():
    model = XTForImageClassification(tiny_config()).eval()
    image = np.zeros((REGION, REGION, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="torch.distributed"):
        encode_context_streaming(model, image, shard_regions=True)


def test_predict_command_shares_one_image_between_processes(tmp_path):
    """`torchrun --nproc_per_node 2 -m xt_hf predict IMAGE --shard-regions`: rank 0 prints what one process prints."""
    torch.manual_seed(0)
    XTForImageClassification(tiny_config(context_token_chunk_size=7)).save_pretrained(tmp_path / "model")
    np.save(tmp_path / "image.npy", np.random.default_rng(0).integers(0, 256, (3 * REGION, 5 * REGION, 3), np.uint8))
    command = ["-m", "xt_hf", "predict", str(tmp_path / "image.npy"), "--model", str(tmp_path / "model"), "--json",
               "--region-batch-size", "1", "--device", "cpu"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300, env=environment)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29531", *command, "--shard-regions"], capture_output=True, text=True, timeout=300,
                         env=environment)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    (line,) = [line for line in two.stdout.splitlines() if line.startswith("{")]  # rank 0 alone prints
    expected = json.loads(one.stdout.strip().splitlines()[-1])["predictions"]
    assert json.loads(line)["predictions"] == expected
    alone = subprocess.run([sys.executable, *command, "--shard-regions"], capture_output=True, text=True, timeout=300)
    assert alone.returncode == 2 and "torchrun" in alone.stderr
