"""Stages that several places share have one definition each, and it computes what the hand-written copies did.

Box formats and clipping are torchvision's (`box_convert`, `clip_boxes_to_image`); padding to whole regions is
`nested_tokenization.pad_to_region_multiple` (model and engine) or each image-processor backend's own `pad` to
`padded_frame`; replacing a file whole is `engine.writers.atomic_write`. Each check below compares the shared
function, bit for bit, with the formula it replaced.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import box_convert, clip_boxes_to_image

from xt_hf.engine.batch import Journal, read_table, write_table
from xt_hf.engine.sources import ArraySource, RegionReader
from xt_hf.engine.writers import atomic_write
from xt_hf.image_processing_pil_xt import XTImageProcessorPil
from xt_hf.image_processing_xt import XTImageProcessor, normalize_pixels, padded_frame
from xt_hf.nested_tokenization import pad_to_region_multiple, region_grid_shape


def awkward_boxes(count: int = 4096) -> torch.Tensor:
    """float32 `(count, 4)` values of every magnitude, with ties, zeros, negatives and odd fractions."""
    generator = torch.Generator().manual_seed(0)
    boxes = torch.randn(count, 4, generator=generator) * torch.logspace(-6, 6, count)[:, None]
    boxes[:4] = torch.tensor([[0.0, -0.0, 1e-38, 3.0], [1 / 3, 2 / 3, 0.1, 0.7], [5.0, 5.0, 0.0, -1.0],
                              [-2.5, 7.25, 1e30, 1e-30]])
    return boxes


def test_torchvision_box_formats_give_the_hand_written_bits():
    boxes = awkward_boxes()
    by_hand = torch.cat([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], dim=-1)
    assert torch.equal(box_convert(boxes, "cxcywh", "xyxy"), by_hand)
    by_hand = torch.cat([(boxes[:, :2] + boxes[:, 2:]) / 2, boxes[:, 2:] - boxes[:, :2]], dim=-1)
    assert torch.equal(box_convert(boxes, "xyxy", "cxcywh"), by_hand)


def test_torchvision_clipping_gives_the_hand_written_bits():
    boxes = awkward_boxes() * 50
    height, width = 37, 53
    by_hand = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                           boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=-1)
    assert torch.equal(clip_boxes_to_image(boxes, (height, width)), by_hand)
    assert clip_boxes_to_image(boxes[:0], (height, width)).shape == (0, 4)


@pytest.mark.parametrize("height, width", [(64, 64), (65, 64), (1, 130), (97, 33)])
def test_padding_to_whole_regions_is_the_hand_written_padding(height, width):
    region = 32
    pixels = torch.randn(2, 3, height, width)
    padded = pad_to_region_multiple(pixels, region, value=0.25)
    rows, cols = region_grid_shape(height, width, region)
    assert (rows, cols) == (-(-height // region), -(-width // region))
    assert padded.shape == (2, 3, rows * region, cols * region)
    assert torch.equal(padded[..., :height, :width], pixels)
    assert (padded[..., height:, :] == 0.25).all() and (padded[..., width:] == 0.25).all()
    labels = torch.randint(0, 5, (2, height, width))
    assert torch.equal(pad_to_region_multiple(labels, region, value=5)[:, :height, :width], labels)
    assert pad_to_region_multiple(labels, region, value=5).dtype == torch.long


def test_engine_regions_at_the_border_are_the_hand_written_zero_padding():
    image = np.random.default_rng(0).integers(0, 256, (70, 45, 3), dtype=np.uint8)
    reader = RegionReader(ArraySource(image), 32)
    for index in range(len(reader)):
        region, row, col = reader[index]
        pixels = normalize_pixels(image[row * 32 : row * 32 + 32, col * 32 : col * 32 + 32], **reader.normalization)
        expected = np.zeros((3, 32, 32), dtype=np.float32)
        expected[:, : pixels.shape[1], : pixels.shape[2]] = pixels
        assert region.dtype == torch.float32 and region.shape == (3, 32, 32)
        assert np.array_equal(region.numpy(), expected)


def test_padded_frame_is_the_largest_size_rounded_up_to_whole_regions():
    sizes = [(40, 70), (33, 96), (64, 1)]
    assert padded_frame(sizes, 32) == (64, 96)
    assert padded_frame(sizes, 1) == (64, 96)  # without do_pad: the largest, not rounded
    assert padded_frame([torch.Size([65, 31])], 32) == (96, 32)


@pytest.mark.parametrize("processor_class", [XTImageProcessorPil, XTImageProcessor])
def test_both_backends_pad_with_pad_value_exactly_as_by_hand(processor_class):
    images = [np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
              for seed, (h, w) in enumerate([(40, 70), (33, 40)])]
    processor = processor_class(region_size=32, pad_value=0.5)
    padded = processor(images, return_tensors="pt").pixel_values
    unpadded = [torch.as_tensor(np.asarray(image)) for image in processor(images, do_pad=False).pixel_values]
    by_hand = torch.stack([torch.nn.functional.pad(image, (0, 96 - image.shape[-1], 0, 64 - image.shape[-2]),
                                                   value=0.5) for image in unpadded])
    assert torch.equal(padded, by_hand)


def test_atomic_write_replaces_a_file_whole_and_keeps_its_suffix(tmp_path):
    target = tmp_path / "table.jsonl"
    target.write_text("old\n")
    with atomic_write(target) as temporary:
        assert temporary.parent == tmp_path and temporary.suffix == ".jsonl" and temporary.name.startswith(".")
        temporary.write_text("new\n")
        assert target.read_text() == "old\n"  # nobody sees the new file before it is whole
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.jsonl"]


def test_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "table.parquet"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("killed halfway")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.parquet"]


def test_atomic_write_of_a_folder_replaces_the_folder(tmp_path):
    target = tmp_path / "mask.zarr"
    target.mkdir()
    (target / "stale").write_text("x")
    with atomic_write(target) as temporary:
        temporary.mkdir()
        (temporary / "fresh").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["fresh"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.zarr"]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_results_tables_and_the_journal_go_through_atomic_write(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    output = tmp_path / f"results{suffix}"
    rows = [{"path": "a.png", "seconds": 1.5, "error": None}, {"path": "b.png", "seconds": 2.0, "error": "E"}]
    columns = {"path": "string", "seconds": "float64", "error": "string"}
    write_table(output, rows[:1], columns)
    write_table(output, rows, columns)
    assert read_table(output) == rows
    journal = Journal(output)
    journal.start({"command": "predict"})
    assert journal.recorded_signature() == {"command": "predict"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [output.name, output.name + ".parts"]
    assert sorted(p.name for p in journal.directory.iterdir()) == ["run.json"]
