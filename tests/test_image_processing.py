"""XTImageProcessor: any image size in, whole regions out, original pixels untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from xt_hf import XTImageProcessor

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


@pytest.fixture
def processor() -> XTImageProcessor:
    return XTImageProcessor(region_size=REGION)


def test_defaults_follow_the_original_xt():
    processor = XTImageProcessor()
    assert processor.region_size == 256
    assert processor.do_rescale and processor.rescale_factor == pytest.approx(1 / 255)
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
        "numpy HWC float": image.astype(np.float64),
        "torch CHW uint8": torch.from_numpy(image).permute(2, 0, 1),
        "torch HWC float": torch.from_numpy(image).float(),
    }
    for name, variant in same_image.items():
        torch.testing.assert_close(processor(variant, return_tensors="pt")["pixel_values"], expected, msg=name)
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
