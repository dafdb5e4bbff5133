"""XTImageProcessor (torchvision) and XTImageProcessorPil: any image size in, whole regions out, original pixels
untouched; and processor folders saved before the transformers-5 names still load, with the same outputs."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.utils import is_torchvision_available

from xt_hf.image_processing_common_xt import dtype_rescale_factor, normalize_pixels
from xt_hf.image_processing_pil_xt import XTImageProcessorPil
from xt_hf.image_processing_xt import XTImageProcessor

needs_torchvision = pytest.mark.skipif(not is_torchvision_available(), reason="torchvision is not installed")

REGION = 16
# ImageNet statistics written out, so that normalisation is checked against numbers, not against the constant used.
MEAN = np.array([0.485, 0.456, 0.406]).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225]).reshape(3, 1, 1)


def random_image(height: int, width: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """A `(height, width, channels)` uint8 image."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def by_hand(image: np.ndarray) -> np.ndarray:
    """`(H, W, 3)` uint8 -> `(3, H, W)` rescaled and ImageNet-normalised, in float64."""
    return (image.transpose(2, 0, 1) / 255.0 - MEAN) / STD


BACKENDS = [XTImageProcessor, XTImageProcessorPil]


@pytest.fixture(params=BACKENDS, ids=lambda cls: cls.__name__)
def processor(request):
    """Each backend: the behaviour below is that of both."""
    return request.param(region_size=REGION)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda cls: cls.__name__)
def test_defaults_follow_the_original_xt(backend):
    processor = backend()
    assert processor.region_size == 256
    assert processor.do_rescale and processor.rescale_factor is None  # by data type: uint8 / 255
    assert processor.do_normalize
    np.testing.assert_allclose(processor.image_mean, MEAN.ravel())
    np.testing.assert_allclose(processor.image_std, STD.ravel())
    assert processor.do_pad and processor.pad_value == 0.0
    assert not processor.do_resize
    assert processor.num_channels == 3


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        pytest.param(32, 32, (32, 32), id="square-multiple"),
        pytest.param(16, 48, (16, 48), id="non-square-stays-non-square"),
        pytest.param(20, 37, (32, 48), id="not-a-multiple"),
        pytest.param(16, 16, (16, 16), id="exactly-one-region"),
        pytest.param(17, 16, (32, 16), id="one-pixel-taller-than-a-region"),
        pytest.param(16, 17, (16, 32), id="one-pixel-wider-than-a-region"),
    ],
)
def test_output_is_padded_up_to_whole_regions(processor, height, width, expected):
    pixel_values = processor(random_image(height, width), return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, *expected)
    assert pixel_values.dtype == torch.float32


def test_padding_goes_bottom_right_and_original_pixels_are_normalised_untouched(processor):
    image = random_image(20, 37)
    pixel_values = processor(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(pixel_values[:, :20, :37], by_hand(image), rtol=0, atol=1e-5)
    assert (pixel_values[:, 20:, :] == 0).all()
    assert (pixel_values[:, :, 37:] == 0).all()


def test_pad_value_is_written_after_normalisation(processor):
    image = random_image(20, 37)
    pixel_values = processor(image, pad_value=-1.5, return_tensors="np")["pixel_values"][0]
    assert (pixel_values[:, 20:, :] == -1.5).all() and (pixel_values[:, :, 37:] == -1.5).all()
    np.testing.assert_allclose(pixel_values[:, :20, :37], by_hand(image), rtol=0, atol=1e-5)


def test_returns_only_pixel_values(processor):
    inputs = processor(random_image(20, 20), return_tensors="pt")
    assert list(inputs.keys()) == ["pixel_values"]


def test_resize_rounds_each_side_to_the_nearest_region_multiple(processor):
    # 20 / 16 = 1.25 -> 1 region; 40 / 16 = 2.5 -> 3 regions (half rounds up); 5 px -> at least one region.
    assert processor(random_image(20, 40), do_resize=True, return_tensors="pt")["pixel_values"].shape == (1, 3, 16, 48)
    assert processor(random_image(5, 7), do_resize=True, return_tensors="pt")["pixel_values"].shape == (1, 3, 16, 16)


def test_resize_to_a_given_size_then_pads(processor):
    image = random_image(50, 70)
    pixel_values = processor(
        image, do_resize=True, size={"height": 40, "width": 24}, return_tensors="np"
    )["pixel_values"][0]
    assert pixel_values.shape == (3, 48, 32)
    assert (pixel_values[:, 40:, :] == 0).all() and (pixel_values[:, :, 24:] == 0).all()
    resized = np.asarray(Image.fromarray(image).resize((24, 40), resample=Image.Resampling.BILINEAR))
    # PIL rounds 8-bit RGB to whole grey levels after each of its two passes, the processor resizes in float.
    np.testing.assert_allclose(pixel_values[:, :40, :24], by_hand(resized), rtol=0, atol=1.01 / 255 / STD.min())


def test_batch_of_mixed_sizes_is_padded_to_the_largest_padded_size(processor):
    first, second = random_image(20, 37, seed=1), random_image(40, 17, seed=2)
    pixel_values = processor([first, second], return_tensors="np")["pixel_values"]
    # 20×37 -> 32×48 and 40×17 -> 48×32, so both go to 48×48.
    assert pixel_values.shape == (2, 3, 48, 48)
    for image, padded in zip((first, second), pixel_values):
        height, width = image.shape[:2]
        np.testing.assert_allclose(padded[:, :height, :width], by_hand(image), rtol=0, atol=1e-5)
        assert (padded[:, height:, :] == 0).all() and (padded[:, :, width:] == 0).all()


def test_pil_numpy_and_torch_inputs_give_the_same_pixel_values(processor):
    image = random_image(20, 37)
    expected = processor(Image.fromarray(image), return_tensors="pt")["pixel_values"]
    same_image = {
        "numpy HWC uint8": image,
        "numpy CHW uint8": image.transpose(2, 0, 1),
        "numpy HWC float in [0, 1]": image.astype(np.float64) / 255,
        "torch CHW uint8": torch.from_numpy(image).permute(2, 0, 1),
        "torch HWC float in [0, 1]": torch.from_numpy(image).float() / 255,
        "numpy HWC uint16": image.astype(np.uint16) * 257,
    }
    for name, variant in same_image.items():
        torch.testing.assert_close(processor(variant, return_tensors="pt")["pixel_values"], expected, msg=name)
    # Float images holding 0-255 values need the factor spelt out.
    as_float = processor(image.astype(np.float32), rescale_factor=1 / 255, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(as_float, expected)
    batched = processor([Image.fromarray(image), image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(batched, expected.expand(2, -1, -1, -1))


def test_image_smaller_than_one_region_is_rejected_with_its_index_and_size(processor):
    with pytest.raises(ValueError, match=r"Image 1 of the batch is 10×40 px.*smaller than one region.*do_resize"):
        processor([random_image(20, 20), random_image(10, 40)])
    # Resizing is the documented way out.
    assert processor(random_image(10, 40), do_resize=True, return_tensors="pt")["pixel_values"].shape == (1, 3, 16, 48)


def test_wrong_channel_count_is_rejected(processor):
    grayscale = random_image(20, 20)[..., 0]
    with pytest.raises(ValueError, match=r"Image 0 of the batch has 1 channel but 3 are expected.*do_convert_rgb"):
        processor(grayscale)
    with pytest.raises(ValueError, match=r"has 4 channels but 3 are expected.*do_convert_rgb"):
        processor(random_image(20, 20, channels=4))
    with pytest.raises(ValueError, match=r"has 2 channels but 3 are expected.*num_channels=2"):
        processor(random_image(20, 20, channels=2))
    converted = processor(grayscale, do_convert_rgb=True, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(converted[:, :20, :20], by_hand(np.repeat(grayscale[..., None], 3, -1)), atol=1e-5)


def test_multispectral_images_with_num_channels():
    processor = XTImageProcessor(region_size=REGION, num_channels=5, image_mean=[0.5] * 5, image_std=[0.25] * 5)
    image = random_image(20, 20, channels=5)
    pixel_values = processor(image, return_tensors="np")["pixel_values"]
    assert pixel_values.shape == (1, 5, 32, 32)
    np.testing.assert_allclose(pixel_values[0, :, :20, :20], (image.transpose(2, 0, 1) / 255 - 0.5) / 0.25, atol=1e-5)
    assert processor(image, do_resize=True, size=24, return_tensors="np")["pixel_values"].shape == (1, 5, 32, 32)
    with pytest.raises(ValueError, match="image_mean has 3 values but num_channels is 5"):
        processor(image, image_mean=[0.5] * 3)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_infinite_pixels_are_rejected(processor, bad):
    image = random_image(20, 20).astype(np.float32)
    image[3, 4, 1] = bad
    with pytest.raises(ValueError, match="Image 1 of the batch contains NaN or infinite"):
        processor([random_image(20, 20), image])


def test_unstackable_batch_without_padding_is_rejected(processor):
    assert processor(random_image(20, 37), do_pad=False, return_tensors="pt")["pixel_values"].shape == (1, 3, 20, 37)
    with pytest.raises(ValueError, match="cannot be stacked.*do_pad=True"):
        processor([random_image(20, 37), random_image(40, 17)], do_pad=False, return_tensors="pt")


def test_save_and_load_keep_every_attribute(tmp_path):
    processor = XTImageProcessor(
        region_size=64,
        do_resize=True,
        size={"height": 128, "width": 192},
        do_normalize=True,
        image_mean=[0.1, 0.2, 0.3, 0.4],
        image_std=[0.5, 0.6, 0.7, 0.8],
        num_channels=4,
        pad_value=-2.0,
        do_pad=True,
    )
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "XTImageProcessor"
    assert saved["region_size"] == 64 and saved["num_channels"] == 4 and saved["pad_value"] == -2.0
    assert saved["size"] == {"height": 128, "width": 192} and saved["do_resize"] is True

    loaded = XTImageProcessor.from_pretrained(tmp_path)
    assert loaded.to_dict() == processor.to_dict()
    image = random_image(100, 150, channels=4)
    np.testing.assert_array_equal(
        loaded(image, return_tensors="np")["pixel_values"], processor(image, return_tensors="np")["pixel_values"]
    )


# --- Rescaling by data type, and the shared normalisation function -------------------------------------------------


def test_uint16_images_are_rescaled_by_their_range_like_uint8(processor):
    image = random_image(32, 48)
    wide = image.astype(np.uint16) * 257  # 255 -> 65535: the same intensities in 16 bits
    pixel_values = processor(wide, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(pixel_values, by_hand(image), rtol=0, atol=1e-5)
    white = np.full((16, 16, 3), 65535, dtype=np.uint16)
    np.testing.assert_array_equal(
        processor(white, return_tensors="np")["pixel_values"],
        processor(np.full((16, 16, 3), 255, dtype=np.uint8), return_tensors="np")["pixel_values"],
    )
    # Exactly what the streaming engine gets from the public function on the same (h, w, C) window.
    np.testing.assert_array_equal(
        pixel_values, normalize_pixels(wide, image_mean=processor.image_mean, image_std=processor.image_std)
    )


def test_16_bit_png_and_float_tiff_files(tmp_path):
    gray = XTImageProcessor(region_size=REGION, image_mean=[0.5], image_std=[0.25])  # num_channels from image_mean
    levels = (np.arange(16 * 16).reshape(16, 16) * 250).astype(np.uint16)
    Image.fromarray(levels).save(tmp_path / "sixteen.png")
    with Image.open(tmp_path / "sixteen.png") as file:
        assert file.mode == "I;16"
        pixel_values = gray(file, return_tensors="np")["pixel_values"][0, 0]
    np.testing.assert_allclose(pixel_values, (levels / 65535 - 0.5) / 0.25, rtol=0, atol=1e-5)

    fractions = np.random.default_rng(3).random((16, 16), dtype=np.float32)
    Image.fromarray(fractions).save(tmp_path / "float.tif")
    with Image.open(tmp_path / "float.tif") as file:
        assert file.mode == "F"
        pixel_values = gray(file, return_tensors="np")["pixel_values"][0, 0]
    np.testing.assert_allclose(pixel_values, (fractions - 0.5) / 0.25, rtol=0, atol=1e-6)  # taken as in [0, 1]


def test_float_images_above_one_are_used_as_given_with_a_warning(processor, caplog):
    largest = 3.75 if isinstance(processor, XTImageProcessor) else 4.25  # the warning is logged once per message
    image = np.full((16, 16, 3), largest, dtype=np.float32)
    pixel_values = processor(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(pixel_values, (largest - MEAN) / STD * np.ones((1, 16, 16)), rtol=0, atol=1e-5)
    assert f"values up to {largest:g}: pass rescale_factor=1/255" in caplog.text


def test_an_explicit_rescale_factor_wins_over_the_data_type(tmp_path):
    twelve_bit = np.random.default_rng(1).integers(0, 4096, (16, 16, 3), dtype=np.uint16)
    expected = (twelve_bit.transpose(2, 0, 1) / 4095 - MEAN) / STD
    processor = XTImageProcessor(region_size=REGION, rescale_factor=1 / 4095)
    np.testing.assert_allclose(processor(twelve_bit, return_tensors="np")["pixel_values"][0], expected, atol=1e-5)
    processor.save_pretrained(tmp_path)
    reloaded = XTImageProcessor.from_pretrained(tmp_path)
    assert reloaded.rescale_factor == pytest.approx(1 / 4095)
    by_type = XTImageProcessor(region_size=REGION)
    np.testing.assert_allclose(
        by_type(twelve_bit, rescale_factor=1 / 4095, return_tensors="np")["pixel_values"][0], expected, atol=1e-5
    )
    with pytest.raises(ValueError, match="rescale_factor must be None .* or a positive number"):
        by_type(twelve_bit, rescale_factor=-1.0)


def test_dtype_rescale_factor():
    assert dtype_rescale_factor(np.uint8) == 1 / 255
    assert dtype_rescale_factor(np.uint16) == 1 / 65535
    assert dtype_rescale_factor(np.float32) == dtype_rescale_factor(np.float64) == dtype_rescale_factor(bool) == 1.0
    assert dtype_rescale_factor(torch.uint8) == 1 / 255 and dtype_rescale_factor(torch.float16) == 1.0
    assert dtype_rescale_factor(torch.bfloat16) == dtype_rescale_factor(torch.bool) == 1.0
    for dtype in (np.int8, np.int16, np.int32, np.int64, np.uint32, np.uint64, torch.int64, torch.int32):
        with pytest.raises(ValueError, match="no standard range"):
            dtype_rescale_factor(dtype)


EIGHT_BIT_VALUES_IN_WIDER_TYPES = {
    "numpy int64 (rng.integers)": lambda image: image.astype(np.int64),
    "numpy int32": lambda image: image.astype(np.int32),
    "numpy int16": lambda image: image.astype(np.int16),
    "numpy int8": lambda image: (image // 2).astype(np.int8),  # halved to fit
    "numpy uint32": lambda image: image.astype(np.uint32),
    "numpy uint64": lambda image: image.astype(np.uint64),
    "torch int64 (torch.randint)": lambda image: torch.from_numpy(image.astype(np.int64)),
}


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("widen", EIGHT_BIT_VALUES_IN_WIDER_TYPES.values(), ids=EIGHT_BIT_VALUES_IN_WIDER_TYPES.keys())
def test_integer_images_without_a_standard_range_are_refused_not_darkened(backend, widen):
    """Dividing int64 pixels by 2**63 - 1 made any picture black and still gave a prediction; now the error names
    the type and the way out, and the way out (an explicit factor, in the call or the processor) works."""
    image = random_image(20, 20)
    wide = widen(image)
    processor = backend(region_size=REGION)
    with pytest.raises(ValueError, match=r"type (u?int\d+) have no standard range.*rescale_factor=1/255.*uint8"):
        processor(wide, return_tensors="pt")
    values = np.asarray(wide, dtype=np.float64).transpose(2, 0, 1)
    expected = torch.from_numpy((values / 255 - MEAN) / STD).float()
    in_the_call = processor(wide, rescale_factor=1 / 255, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(in_the_call[0, :, :20, :20], expected, rtol=0, atol=2e-5)
    explicit = backend(region_size=REGION, rescale_factor=1 / 255)
    torch.testing.assert_close(explicit(wide, return_tensors="pt")["pixel_values"][0, :, :20, :20], expected,
                               rtol=0, atol=2e-5)
    assert processor(wide, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"].max() > 1


def test_the_streaming_engine_refuses_int64_windows_the_same_way():
    window = random_image(5, 7).astype(np.int64)
    stats = dict(image_mean=MEAN.ravel().tolist(), image_std=STD.ravel().tolist())
    with pytest.raises(ValueError, match="int64 have no standard range.*--rescale-factor"):
        normalize_pixels(window, **stats)
    np.testing.assert_allclose(normalize_pixels(window, **stats, rescale_factor=1 / 255), by_hand(window), atol=1e-5)


def test_a_saved_rescale_factor_counts_as_explicit_for_int64_images(tmp_path):
    """A file that records a number (the 1/255 of older versions included) says how to scale; one that records
    none (today's default) leaves it to the data type, which refuses int64."""
    image = random_image(16, 16)
    XTImageProcessor(region_size=REGION, rescale_factor=1 / 255).save_pretrained(tmp_path / "recorded")
    XTImageProcessor(region_size=REGION).save_pretrained(tmp_path / "default")
    recorded = XTImageProcessor.from_pretrained(tmp_path / "recorded")
    np.testing.assert_allclose(recorded(image.astype(np.int64), return_tensors="np")["pixel_values"][0],
                               by_hand(image), atol=1e-5)
    with pytest.raises(ValueError, match="no standard range"):
        XTImageProcessor.from_pretrained(tmp_path / "default")(image.astype(np.int64))


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda cls: cls.__name__)
def test_per_channel_statistics_given_in_the_call_win_over_the_processor(backend):
    """transformers' common `test_call_numpy_4_channels` call: 4-channel images with 4 statistics in the call."""
    images = [random_image(20, 20, channels=4, seed=seed) for seed in range(2)]
    processor = backend(region_size=REGION)  # 3 channels
    pixel_values = processor(images, return_tensors="pt", input_data_format="channels_last",
                             image_mean=(0, 0, 0, 0), image_std=(1, 1, 1, 1))["pixel_values"]
    assert pixel_values.shape == (2, 4, 32, 32)
    torch.testing.assert_close(pixel_values[1, :, :20, :20],
                               torch.from_numpy(images[1].transpose(2, 0, 1) / 255).float(), rtol=0, atol=1e-6)
    assert processor.num_channels == 3  # the call did not change the processor
    with pytest.raises(ValueError, match="image_mean has 4 values but num_channels is 3"):
        processor(images, image_mean=[0.5] * 4)  # the processor's 3 image_std values stay: a mismatch, named


def test_normalize_pixels_takes_windows_of_any_layout_and_type():
    window = random_image(5, 7)
    expected = by_hand(window)
    stats = dict(image_mean=MEAN.ravel().tolist(), image_std=STD.ravel().tolist())
    out = normalize_pixels(window, **stats)
    assert out.shape == (3, 5, 7) and out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(normalize_pixels(window.transpose(2, 0, 1), **stats, input_data_format="channels_first"), out)
    np.testing.assert_array_equal(normalize_pixels(torch.from_numpy(window), **stats).numpy(), out)  # same bits
    np.testing.assert_array_equal(normalize_pixels(window, **stats, rescale_factor=1 / 255), out)
    np.testing.assert_allclose(normalize_pixels(window, **stats, do_normalize=False), window.transpose(2, 0, 1) / 255, atol=1e-7)
    np.testing.assert_array_equal(normalize_pixels(window, **stats, do_rescale=False, do_normalize=False), window.transpose(2, 0, 1))
    with pytest.raises(ValueError, match="image_mean has 3 values but the image has 4 channels"):
        normalize_pixels(random_image(5, 7, channels=4), **stats)


# --- num_channels, empty batches, segmentation scores ---------------------------------------------------------------


def test_num_channels_is_inferred_from_image_mean_and_std(tmp_path):
    processor = XTImageProcessor(region_size=REGION, image_mean=[0.5, 0.5, 0.5, 0.5], image_std=[0.25] * 4)
    assert processor.num_channels == 4
    image = random_image(20, 20, channels=4)
    pixel_values = processor(image, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(pixel_values[0, :, :20, :20], (image.transpose(2, 0, 1) / 255 - 0.5) / 0.25, atol=1e-5)
    processor.save_pretrained(tmp_path)
    assert XTImageProcessor.from_pretrained(tmp_path).num_channels == 4
    assert XTImageProcessor(image_std=(0.2, 0.2)).num_channels == 2
    assert XTImageProcessor(image_mean=0.5, image_std=0.25).num_channels == 3  # one value for any channel count
    with pytest.raises(ValueError, match="image_mean has 4 values but num_channels is 3"):
        XTImageProcessor(region_size=REGION, num_channels=3, image_mean=[0.5] * 4, image_std=[0.25] * 4)(image)


@pytest.mark.parametrize(
    "empty",
    [[], (), np.zeros((0, 20, 20, 3), dtype=np.uint8), torch.zeros(0, 3, 20, 20)],
    ids=["list", "tuple", "numpy-batch", "torch-batch"],
)
def test_an_empty_batch_is_rejected(processor, empty):
    with pytest.raises(ValueError, match="No images to process"):
        processor(empty, return_tensors="pt")


def test_post_process_semantic_segmentation_returns_scores_on_request(processor):
    from types import SimpleNamespace

    logits = torch.randn(2, 3, 32, 48)  # a batch padded to 32×48 at full resolution
    outputs = SimpleNamespace(logits=logits)
    sizes = [(20, 37), (30, 17)]
    maps = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
    scored = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes, return_segmentation_scores=True)
    for (height, width), image_logits, plain, item in zip(sizes, logits, maps, scored):
        assert item["segmentation_scores"].shape == (3, height, width)
        torch.testing.assert_close(item["segmentation_scores"], image_logits[:, :height, :width])
        assert torch.equal(item["segmentation"], plain) and torch.equal(plain, item["segmentation_scores"].argmax(0))
    uncropped = processor.post_process_semantic_segmentation(outputs, return_segmentation_scores=True)
    assert uncropped[1].segmentation_scores.shape == (3, 32, 48)


def test_post_processing_undoes_a_resize_of_the_inputs():
    """With `do_resize` and a `size`, the class map comes back at each original size (this raised a TypeError)."""
    from types import SimpleNamespace

    processor = XTImageProcessor(region_size=REGION, do_resize=True, size={"height": 2 * REGION, "width": 3 * REGION})
    images = [np.zeros((20, 37, 3), dtype=np.uint8), np.zeros((30, 17, 3), dtype=np.uint8)]
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    outputs = SimpleNamespace(logits=torch.randn(2, 3, *pixel_values.shape[-2:]))
    maps = processor.post_process_semantic_segmentation(outputs, target_sizes=[(20, 37), (30, 17)])
    assert [tuple(m.shape) for m in maps] == [(20, 37), (30, 17)]


# --- Two backends, named as transformers 5 names them -----------------------------------------------------------------


def backend_inputs():
    rng = np.random.default_rng(7)
    yield "uint8 HWC", rng.integers(0, 256, (20, 37, 3), dtype=np.uint8)
    yield "uint16 HWC", rng.integers(0, 65536, (40, 17, 3), dtype=np.uint16)
    yield "float CHW", rng.random((3, 33, 50), dtype=np.float32)
    yield "torch uint8 CHW", torch.from_numpy(rng.integers(0, 256, (3, 18, 70), dtype=np.uint8))
    yield "PIL", Image.fromarray(rng.integers(0, 256, (45, 30, 3), dtype=np.uint8))


@needs_torchvision
@pytest.mark.parametrize(
    "settings",
    [{}, {"do_resize": True}, {"do_resize": True, "size": {"height": 40, "width": 24}},
     {"do_resize": True, "resample": 3}, {"do_resize": True, "resample": 0},
     {"do_normalize": False, "pad_value": -1.0}],
    ids=["plain", "resize-to-regions", "resize-to-size", "bicubic", "nearest", "no-normalize"],
)
def test_torchvision_backend_matches_pil(settings):
    torchvision, pil = XTImageProcessor(region_size=REGION), XTImageProcessorPil(region_size=REGION)
    for name, image in backend_inputs():
        expected = pil(image, return_tensors="pt", **settings)["pixel_values"]
        got = torchvision(image, return_tensors="pt", **settings)["pixel_values"]
        assert got.shape == expected.shape and got.dtype == torch.float32, name
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6, msg=name)
    batch = [image for _, image in backend_inputs()]
    torch.testing.assert_close(
        torchvision(batch, return_tensors="pt", **settings)["pixel_values"],
        pil(batch, return_tensors="pt", **settings)["pixel_values"], rtol=0, atol=1e-6,
    )
    numpy_out = torchvision(batch, return_tensors="np", **settings)["pixel_values"]
    assert isinstance(numpy_out, np.ndarray) and numpy_out.dtype == np.float32


@needs_torchvision
def test_auto_image_processor_picks_torchvision_by_default_and_pil_on_request(tmp_path, monkeypatch):
    from transformers import AutoImageProcessor
    from transformers.models.auto import image_processing_auto

    messages = []
    monkeypatch.setattr(image_processing_auto.logger, "warning_once", lambda message, *a, **k: messages.append(message))
    XTImageProcessorPil(region_size=REGION, pad_value=-1.0).save_pretrained(tmp_path)
    default = AutoImageProcessor.from_pretrained(tmp_path)
    pil = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert type(default) is XTImageProcessor and type(pil) is XTImageProcessorPil
    assert type(AutoImageProcessor.from_pretrained(tmp_path, backend="torchvision")) is XTImageProcessor
    assert type(AutoImageProcessor.from_pretrained(tmp_path, use_fast=False)) is XTImageProcessorPil  # deprecated
    assert default.pad_value == pil.pad_value == -1.0
    assert not [m for m in messages if "Falling back" in m], messages
    # Saved by either backend, the file is the same one, which names the class transformers gives both.
    default.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "preprocessor_config.json").read_text())
    assert again == json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert again["image_processor_type"] == "XTImageProcessor"


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda cls: cls.__name__)
def test_each_backend_module_has_its_own_kwargs_class(backend):
    """What transformers' common `test_valid_kwargs_set` checks: `valid_kwargs` is the `XTImageProcessorKwargs` of
    the class's own module (the name without `Pil`), and the shared settings are in it."""
    import sys

    module = sys.modules[backend.__module__]
    assert backend.valid_kwargs is vars(module)[f"{backend.__name__.removesuffix('Pil')}Kwargs"]
    assert backend.valid_kwargs.__module__ == backend.__module__
    assert {"region_size", "pad_value", "num_channels", "do_pad"} <= set(backend.valid_kwargs.__annotations__)


def module_level_imports(path: Path) -> set[str]:
    """Top-level names a module imports when it is loaded (imports inside functions are left out)."""
    tree = ast.parse(path.read_text())
    statements = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
    statements += [inner for node in tree.body if isinstance(node, ast.If | ast.Try)
                   for inner in ast.walk(node) if isinstance(inner, ast.Import | ast.ImportFrom)]
    names = set()
    for node in statements:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_pil_backend_needs_no_torchvision():
    """Remote code loads `image_processing_pil_xt.py` and what it imports where torchvision is not installed."""
    source = Path(XTImageProcessorPil.__module__.replace(".", "/")).name
    folder = Path(__import__("xt_hf").__file__).parent
    for name in (f"{source}.py", "image_processing_common_xt.py"):
        assert not {"torch", "torchvision"} & module_level_imports(folder / name), name


# --- Folders saved before the rename (XTImageProcessor was PIL, XTImageProcessorFast torchvision) --------------------

BEFORE_RENAME = Path(__file__).parent / "data" / "processors_before_rename"


@pytest.fixture(scope="module")
def recorded() -> dict:
    """The input images and each folder's `pixel_values`, as the release before the rename computed them."""
    with np.load(BEFORE_RENAME / "reference.npz") as reference:
        return dict(reference)


def recorded_input(folder: str, recorded: dict) -> np.ndarray:
    return recorded["image_uint16" if folder == "pil_rescale_factor" else "image"]


@needs_torchvision
@pytest.mark.parametrize("folder", ["pil", "torchvision", "pil_rescale_factor"])
def test_processor_folders_saved_before_the_rename_load_unchanged(folder, recorded):
    """A `preprocessor_config.json` naming `XTImageProcessor`, with the auto_map of both old modules, loads with
    `AutoImageProcessor` (torchvision by default, PIL on request; no trust_remote_code needed with xt_hf installed)
    and with either class, keeps its settings and gives the recorded `pixel_values`: to the bit with the backend
    that saved it, to float32 rounding with the other."""
    from transformers import AutoImageProcessor

    path = BEFORE_RENAME / folder
    saved = json.loads((path / "preprocessor_config.json").read_text())
    assert saved["image_processor_type"] == "XTImageProcessor"
    assert saved["auto_map"]["AutoImageProcessor"] == {
        "pil": "image_processing_xt.XTImageProcessor", "torchvision": "image_processing_xt_fast.XTImageProcessorFast"}
    saved_by = "torchvision" if folder == "torchvision" else "pil"
    loaded = {
        "torchvision": [AutoImageProcessor.from_pretrained(path), XTImageProcessor.from_pretrained(path),
                        AutoImageProcessor.from_pretrained(path, trust_remote_code=True)],
        "pil": [AutoImageProcessor.from_pretrained(path, backend="pil"), XTImageProcessorPil.from_pretrained(path)],
    }
    assert {type(processor) for processor in loaded["torchvision"]} == {XTImageProcessor}
    assert {type(processor) for processor in loaded["pil"]} == {XTImageProcessorPil}
    settings = {key: value for key, value in saved.items() if key not in ("auto_map", "image_processor_type")}
    for backend, processors in loaded.items():
        for processor in processors:
            kept = {key: value for key, value in processor.to_dict().items() if key in settings}
            assert json.loads(json.dumps(kept)) == settings, (backend, type(processor))
            pixel_values = processor(recorded_input(folder, recorded), return_tensors="np")["pixel_values"]
            tolerance = 0 if backend == saved_by else 1e-6
            np.testing.assert_allclose(pixel_values, recorded[folder], rtol=0, atol=tolerance,
                                       err_msg=f"{folder} loaded as {type(processor).__name__}")


@needs_torchvision
@pytest.mark.parametrize("old_type", ["XTImageProcessorFast", "XTImageProcessor"])
@pytest.mark.parametrize("auto_map", ["both modules", "one module (a string)", "none"])
def test_old_class_names_in_a_saved_file_resolve_to_the_renamed_backends(tmp_path, recorded, old_type, auto_map):
    """Files that name the torchvision backend by its old name, or hold the one-string auto_map transformers writes
    for a single class, load as the new classes with the recorded outputs."""
    from transformers import AutoImageProcessor

    shutil.copytree(BEFORE_RENAME / "torchvision", tmp_path, dirs_exist_ok=True)
    config_file = tmp_path / "preprocessor_config.json"
    saved = json.loads(config_file.read_text())
    saved["image_processor_type"] = old_type
    if auto_map == "none":
        del saved["auto_map"]
    elif auto_map != "both modules":
        saved["auto_map"]["AutoImageProcessor"] = "image_processing_xt_fast.XTImageProcessorFast"
    config_file.write_text(json.dumps(saved))
    default, pil = AutoImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert type(default) is XTImageProcessor and type(pil) is XTImageProcessorPil
    image = recorded_input("torchvision", recorded)
    np.testing.assert_array_equal(default(image, return_tensors="np")["pixel_values"], recorded["torchvision"])
    np.testing.assert_allclose(pil(image, return_tensors="np")["pixel_values"], recorded["torchvision"], atol=1e-6)


def test_the_old_torchvision_name_is_a_deprecated_alias():
    import xt_hf

    with pytest.warns(FutureWarning, match=r"XTImageProcessorFast is deprecated.*use xt_hf\.XTImageProcessor"):
        from xt_hf.image_processing_xt_fast import XTImageProcessorFast
    assert XTImageProcessorFast is XTImageProcessor
    with pytest.warns(FutureWarning, match="XTImageProcessorFast is deprecated"):
        assert xt_hf.XTImageProcessorFast is XTImageProcessor
    assert xt_hf.XTImageProcessor is XTImageProcessor and xt_hf.XTImageProcessorPil is XTImageProcessorPil


@needs_torchvision
def test_a_saved_folder_ships_both_backend_modules_for_remote_code(tmp_path):
    XTImageProcessorPil(region_size=REGION).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["auto_map"]["AutoImageProcessor"] == {
        "torchvision": "image_processing_xt.XTImageProcessor", "pil": "image_processing_pil_xt.XTImageProcessorPil"}
    assert {path.name for path in tmp_path.glob("*.py")} == {
        "image_processing_xt.py", "image_processing_pil_xt.py", "image_processing_common_xt.py"}
