"""Token buffers spilled to disk keep their values, leave no file behind and stay out of the process's memory."""

from __future__ import annotations

import os
import sys
import weakref
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from xt_hf.engine import spill
from xt_hf.context_encoder import XTContextEncoder
from xt_hf.engine import encode_grid, new_token_buffer
from xt_hf.engine.spill import IN_MEMORY, Spill

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def resident_file_mib() -> float:
    """Pages of file mappings resident in this process (the spill files' share of its memory)."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("RssFile:"))
    return int(line.split()[1]) / 1024


def resident_mib_of_mapping(tensor: torch.Tensor) -> float:
    """Resident size of the one memory mapping holding `tensor` (`/proc/self/smaps`): unlike the process's
    RssFile, it does not move when a first call elsewhere maps in more library code."""
    address, inside = tensor.data_ptr(), False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(bound, 16) for bound in head.split("-"))
                inside = start <= address < end
            elif inside and head == "Rss:":
                return int(line.split()[1]) / 1024
    raise AssertionError("no mapping holds the tensor")


def spill_file_directory(tensor: torch.Tensor):
    """The directory of the (deleted) file whose mapping holds `tensor`, from `/proc/self/maps`; None in memory."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            if start <= address < end:
                path = fields[5].strip() if len(fields) > 5 else ""
                return Path(path.removesuffix(" (deleted)")).parent if path.endswith("(deleted)") else None
    return None


def test_released_pages_leave_memory_and_keep_their_values(tmp_path):
    spill_here = Spill(tmp_path)
    buffer = spill_here.empty((4096, 1024), dtype=torch.float32)  # 16 MiB
    buffer.copy_(torch.arange(buffer.numel(), dtype=torch.float32).view_as(buffer))
    assert resident_mib_of_mapping(buffer) > 15.9
    for rows in buffer.split(1000):  # pieces that do not end on page boundaries
        spill_here.release(rows)
    assert resident_mib_of_mapping(buffer) == 0
    assert torch.equal(buffer, torch.arange(buffer.numel(), dtype=torch.float32).view_as(buffer))


def test_releasing_a_tensor_in_memory_changes_nothing(tmp_path):
    values = torch.randn(2048, 512)
    expected = values.clone()
    for storage in (IN_MEMORY, Spill(tmp_path)):  # a spill releases only what it made
        storage.release(values)
        storage.release(values[100:1000])
    assert torch.equal(values, expected)
    assert spill_file_directory(values) is None


def test_the_spill_file_has_no_name_and_goes_with_its_last_tensor(tmp_path):
    spill_here = Spill(tmp_path)
    buffer = spill_here.empty((64, 64), dtype=torch.float32)
    view = buffer[10:20]
    assert os.listdir(tmp_path) == []  # nothing for a crash to leave behind
    assert spill_file_directory(view) == tmp_path
    beside = spill_here.empty_beside(view, (3, 5))
    assert spill_file_directory(beside) == tmp_path and beside.dtype == torch.float32
    mappings = [spill_here.mapping_of(tensor)[1] for tensor in (buffer, beside)]
    references = [weakref.ref(mapping) for mapping in mappings]
    del buffer, view, beside, mappings
    assert [reference() for reference in references] == [None, None]


def test_spilling_fails_clearly_without_a_directory_or_disk_space(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        Spill(tmp_path / "missing")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(spill.shutil, "disk_usage", lambda _: usage(2**30, 2**30 - 1024, 1024))
    with pytest.raises(ValueError, match="GiB free"):
        Spill(tmp_path).empty((1024, 1024), dtype=torch.float32)


@pytest.mark.parametrize("context, windows", [("attention", -1), ("mamba", -1), ("attention", 2048)])
def test_a_spilled_context_encoder_gives_the_same_tokens_and_keeps_few_pages(context, windows, tmp_path):
    """Long sequences are updated in place either way (or run window by window, Transformer-XL style);
    spilled, the tokens and the heads' outputs (or the windows' outputs) live in the file and only chunks are
    resident after the pass (here 32,768 tokens: 16 MiB of tokens, 16 of heads)."""
    config = tiny_config(context_encoder=context, context_hidden_size=128, context_num_heads=2,
                         context_token_chunk_size=1024, context_long_sequence_attention="hyper",
                         hyper_min_seq_len=4096, hyper_block_size=64, hyper_sample_size=64,
                         in_context_patches=windows)
    torch.manual_seed(0)
    encoder = XTContextEncoder(config, in_channels=8).eval()
    grid = torch.randn(1, 8, 128, 256)
    with torch.inference_mode():
        expected = encode_grid(encoder, grid)
        before = resident_file_mib()
        spilled = encode_grid(encoder, grid, spill_directory=tmp_path)
        resident = resident_file_mib() - before
    assert spill_file_directory(spilled.tokens) == tmp_path
    torch.testing.assert_close(spilled.tokens, expected.tokens, rtol=0, atol=0)
    torch.testing.assert_close(spilled.cls_state, expected.cls_state, rtol=0, atol=0)
    assert resident < 4, f"{resident:.1f} MiB of the spill files stayed resident"


@pytest.mark.parametrize("context, fits", [("attention", False), ("mamba", True)])
def test_the_disk_is_checked_for_every_buffer_before_the_long_work_starts(context, fits, tmp_path, monkeypatch):
    """An attention encoder spills the heads' outputs too, after the region encoder has run (an hour for a
    29,000 × 25,000 scene): room for that second buffer is checked when the tokens are allocated."""
    encoder = XTContextEncoder(tiny_config(context_encoder=context), in_channels=8)
    tokens_size = (1000 + 1) * 32 * 4
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(spill.shutil, "disk_usage", lambda _: usage(2**30, 0, int(1.5 * tokens_size)))
    if fits:
        new_token_buffer(encoder, 1, 1000, device=torch.device("cpu"), storage=Spill(tmp_path))
        return
    with pytest.raises(ValueError, match="GiB free"):
        new_token_buffer(encoder, 1, 1000, device=torch.device("cpu"), storage=Spill(tmp_path))


def test_spilling_into_memory_backed_storage_is_flagged(tmp_path, monkeypatch):
    monkeypatch.setattr(spill, "filesystem_type", lambda _: "tmpfs")
    with pytest.warns(UserWarning, match="saves no memory"):
        Spill(tmp_path)
    assert spill.filesystem_type(tmp_path.parent.parent) is not None


def test_spilling_is_refused_where_it_cannot_help(tmp_path):
    encoder = XTContextEncoder(tiny_config(), in_channels=8)
    with pytest.raises(ValueError, match="CPU"):
        new_token_buffer(encoder, 1, 16, device=torch.device("meta"), storage=Spill(tmp_path))


def test_spill_state_is_an_object_not_a_module_global():
    """What was spilled where is kept by the `Spill` that made it, passed to whoever needs it: the module holds
    no registry of mappings (a list or dict filled at run time)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(spill))
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            value = node.value
            assert not isinstance(value, (ast.List, ast.Dict, ast.ListComp, ast.DictComp)), ast.unparse(node)
            assert not (isinstance(value, ast.Call) and ast.unparse(value.func) == "Spill"), ast.unparse(node)
    assert vars(spill.IN_MEMORY) == {}
