"""Streaming large images from disk gives the in-memory numbers, and `xt-hf predict` reports clearly."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REGION, tiny_config

from xt_hf import XTForImageClassification, XTImageProcessor
from xt_hf.engine import (
    RegionReader,
    encode_context_streaming,
    encode_regions_streaming,
    open_region_source,
    predict_streaming,
)

HEIGHT, WIDTH = 3 * REGION + 5, 2 * REGION + 17  # non-square, not a multiple of the region


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return XTForImageClassification(tiny_config(id2label={i: f"class {i}" for i in range(5)})).eval()


def in_memory_logits(model, image):
    inputs = XTImageProcessor(region_size=REGION)(image, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def write_sources(image, folder):
    """The same pixels as a .npy memmap, a tiled BigTIFF and a zarr array."""
    tifffile = pytest.importorskip("tifffile")
    np.save(folder / "image.npy", image)
    tifffile.imwrite(folder / "image.tif", image, tile=(32, 32), bigtiff=True)
    sources = {"array": image, "npy": folder / "image.npy", "tiff": folder / "image.tif"}
    try:
        import zarr
    except ImportError:
        return sources
    array = zarr.open(str(folder / "image.zarr"), mode="w", shape=image.shape, chunks=(40, 40, 3), dtype=image.dtype)
    array[:] = image
    sources["zarr"] = folder / "image.zarr"
    return sources


def test_reader_normalises_like_the_image_processor(image):
    reader = RegionReader(open_region_source(image), REGION)
    processed = XTImageProcessor(region_size=REGION)(image, return_tensors="pt")["pixel_values"][0]
    assert len(reader) == 4 * 3
    for index in (0, 5, len(reader) - 1):  # an inner region and the padded bottom-right corner
        region, row, col = reader[index]
        expected = processed[:, row * REGION : (row + 1) * REGION, col * REGION : (col + 1) * REGION]
        torch.testing.assert_close(region, expected, rtol=0, atol=1e-6)


def test_streaming_equals_the_in_memory_forward_for_every_source(image, model, tmp_path):
    expected = in_memory_logits(model, image)
    for name, source in write_sources(image, tmp_path).items():
        logits = predict_streaming(model, source, region_batch_size=5)
        torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5, msg=name)


def test_streaming_embeds_regions_into_the_context_tokens_exactly(image):
    """A long sequence (HyperAttention, tokens embedded region chunk by region chunk, blocks updated in place)
    still gives the in-memory forward's tokens and logits; so does a model without a context encoder."""
    torch.manual_seed(0)
    long_sequence = XTForImageClassification(tiny_config(
        context_token_chunk_size=5, context_long_sequence_attention="hyper", hyper_min_seq_len=16,
        hyper_block_size=8, hyper_sample_size=8)).eval()
    without_context = XTForImageClassification(tiny_config(context_encoder="none", classifier="pool")).eval()
    pixel_values = XTImageProcessor(region_size=REGION)(image, return_tensors="pt")["pixel_values"]
    for model in (long_sequence, without_context):
        with torch.no_grad():
            expected = model.xt(pixel_values)
        streamed, grid_shape = encode_context_streaming(model, image, region_batch_size=5)
        assert grid_shape == (4 * REGION // 8, 3 * REGION // 8)
        torch.testing.assert_close(streamed.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(predict_streaming(model, image, region_batch_size=5),
                                   model.logits_from_context(expected), rtol=1e-5, atol=1e-5)


def test_streaming_with_spilled_tokens_gives_the_same_numbers(image, tmp_path):
    """`spill_directory` keeps the token sequence in a file; the tokens and logits must not change."""
    from test_spill import spill_file_directory

    torch.manual_seed(0)
    model = XTForImageClassification(tiny_config(
        context_token_chunk_size=5, context_long_sequence_attention="hyper", hyper_min_seq_len=16,
        hyper_block_size=8, hyper_sample_size=8)).eval()
    expected, _ = encode_context_streaming(model, image, region_batch_size=5)
    spilled, _ = encode_context_streaming(model, image, region_batch_size=5, spill_directory=tmp_path)
    assert spill_file_directory(spilled.last_hidden_state) == tmp_path
    torch.testing.assert_close(spilled.last_hidden_state, expected.last_hidden_state, rtol=0, atol=0)
    with torch.inference_mode():
        expected_logits = model.logits_from_context(expected)
    torch.testing.assert_close(predict_streaming(model, image, region_batch_size=5, spill_directory=tmp_path),
                               expected_logits, rtol=0, atol=0)


def test_prefetching_workers_give_the_same_features(image, model):
    plain = encode_regions_streaming(model, image, region_batch_size=4)
    prefetched = encode_regions_streaming(model, image, region_batch_size=4, num_workers=1)
    for a, b in zip(plain, prefetched):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def resident_file_pages_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("RssFile:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_reading_a_memmap_leaves_none_of_the_image_resident(tmp_path):
    """Region by region through a .npy scene: its pages must not pile up in the process (a 29,000 × 25,000
    scene is 2 GB), and what is read must still be the file's pixels."""
    pixels = np.random.default_rng(0).integers(0, 256, (2048, 1536, 3), dtype=np.uint8)  # 9 MiB
    np.save(tmp_path / "scene.npy", pixels)
    del pixels
    source = open_region_source(tmp_path / "scene.npy")
    before = resident_file_pages_mib()
    regions = [np.array(source.read(top, left, 256, 256)) for top in range(0, 2048, 256) for left in range(0, 1536, 256)]
    assert resident_file_pages_mib() - before < 2
    expected = np.load(tmp_path / "scene.npy")
    assert all(np.array_equal(region, expected[top : top + 256, left : left + 256]) for region, (top, left) in
               zip(regions, [(t, c) for t in range(0, 2048, 256) for c in range(0, 1536, 256)]))
    # A writable or copy-on-write memmap keeps its pages: dropping them could lose a change.
    writable = np.load(tmp_path / "scene.npy", mmap_mode="r+")
    writable[0, 0] = 7
    assert open_region_source(writable).read(0, 0, 256, 256)[0, 0, 0] == 7


def test_sources_reject_bad_input_clearly(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        open_region_source(tmp_path / "missing.tif")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="Unsupported image format '.txt'"):
        open_region_source(tmp_path / "notes.txt")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00garbage")
    with pytest.raises(ValueError, match="Cannot read .*broken.tif"):
        open_region_source(tmp_path / "broken.tif")
    with pytest.raises(ValueError, match="smaller than one region"):
        open_region_source(np.zeros((REGION - 1, 100, 3), np.uint8), REGION)


def test_predict_command(image, model, tmp_path):
    model.save_pretrained(tmp_path / "model")
    XTImageProcessor(region_size=REGION).save_pretrained(tmp_path / "model")
    np.save(tmp_path / "image.npy", image)
    command = [sys.executable, "-m", "xt_hf", "predict", str(tmp_path / "image.npy"), "--model",
               str(tmp_path / "model"), "--top-k", "3", "--region-batch-size", "4"]
    result = subprocess.run(command + ["--json", "--spill-dir", str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    expected = in_memory_logits(model, image).softmax(-1)[0]
    assert report["predictions"][0]["label"] == f"class {int(expected.argmax())}"
    assert abs(report["predictions"][0]["score"] - float(expected.max())) < 1e-5
    assert report["spill_directory"] == str(tmp_path)
    assert report["regions"] == 12 and report["regions_per_second"] > 0 and report["peak_memory_mb"] > 0

    text = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and "regions/s" in text.stdout and "peak memory" in text.stdout

    no_disk = subprocess.run(command + ["--spill-dir", str(tmp_path / "missing")], capture_output=True, text=True,
                             timeout=300)
    assert no_disk.returncode == 2 and "spill directory" in no_disk.stderr
    tiny = tmp_path / "tiny.npy"
    np.save(tiny, image[:10])
    for path, message in ((tmp_path / "nope.tif", "does not exist"), (tiny, "smaller than one region")):
        failed = subprocess.run(command[:4] + [str(path)] + command[5:], capture_output=True, text=True, timeout=300)
        assert failed.returncode == 2 and message in failed.stderr


@pytest.mark.parametrize("suffix, spilled", [(".zarr", False), (".tif", False), (".tif", True)])
def test_whole_scene_segmentation_streams_to_disk_and_equals_in_memory(image, tmp_path, suffix, spilled):
    """Spilled: the context tokens live in a file and are updated in place chunk by chunk (chunks of 5)."""
    tifffile = pytest.importorskip("tifffile")
    from xt_hf import XTForSemanticSegmentation
    from xt_hf.engine import segment_streaming

    torch.manual_seed(0)
    chunking = {"context_token_chunk_size": 5} if spilled else {}
    model = XTForSemanticSegmentation(tiny_config(num_labels=3, classifier="pool", context_attention_causal=False,
                                                  **chunking)).eval()
    inputs = XTImageProcessor(region_size=REGION)(image, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits.argmax(dim=1)[0, :HEIGHT, :WIDTH].numpy()
    output = tmp_path / f"mask{suffix}"
    spill = {"spill_directory": tmp_path} if spilled else {}
    assert segment_streaming(model, image, output, region_batch_size=5, **spill) == (HEIGHT, WIDTH)
    if suffix == ".zarr":
        import zarr

        written = zarr.open(str(output), mode="r")[:]
    else:
        written = tifffile.imread(output)
    assert written.shape == (HEIGHT, WIDTH)
    np.testing.assert_array_equal(written, expected)
    with pytest.raises(ValueError, match="exists"):
        segment_streaming(model, image, output)


def test_segment_command(image, tmp_path):
    from xt_hf import XTForSemanticSegmentation

    model = XTForSemanticSegmentation(tiny_config(num_labels=3, classifier="pool"))
    model.save_pretrained(tmp_path / "model")
    XTImageProcessor(region_size=REGION).save_pretrained(tmp_path / "model")
    np.save(tmp_path / "scene.npy", image)
    command = [sys.executable, "-m", "xt_hf", "segment", str(tmp_path / "scene.npy"), "--model",
               str(tmp_path / "model"), "--output", str(tmp_path / "mask.zarr")]
    first = subprocess.run(command + ["--spill-dir", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    assert f"{WIDTH}×{HEIGHT} class map" in first.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "exists" in again.stderr
    no_disk = subprocess.run(command + ["--overwrite", "--spill-dir", str(tmp_path / "missing")], capture_output=True,
                             text=True, timeout=300)
    assert no_disk.returncode == 2 and "spill directory" in no_disk.stderr
