"""One large image across processes: the region stage shared between ranks, the context encoder on rank 0."""

from __future__ import annotations

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
