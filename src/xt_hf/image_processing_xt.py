"""Image processor for xT: ImageNet-normalised pixels, padded at the bottom and right to whole regions.

Stands alone (transformers, NumPy and Pillow only, no torchvision): it is shipped as Hub remote code
next to the model files.
"""

import numpy as np
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    ChannelDimension,
    ImageInput,
    ImageType,
    PILImageResampling,
    SizeDict,
    get_image_type,
    is_pil_image,
    is_scaled_image,
    is_valid_image,
    make_flat_list_of_images,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, logging

logger = logging.get_logger(__name__)


class XTImageProcessorKwargs(ImagesKwargs, total=False):
    """
    region_size (`int`, *optional*, defaults to `self.region_size`):
        Side in pixels of the square regions xT cuts the image into; match the model's `config.region_size`.
    pad_value (`float`, *optional*, defaults to `self.pad_value`):
        Value of the padded pixels, written after rescaling and normalisation.
    num_channels (`int`, *optional*, defaults to `self.num_channels`):
        Number of channels every input image must have (after `do_convert_rgb`).
    """

    region_size: int | None
    pad_value: int | float | None
    num_channels: int | None


class XTImageProcessor(PilBackend):
    r"""
    Turns images of any size into xT `pixel_values` of shape `(batch, num_channels, rows·region_size,
    cols·region_size)`, float32.

    Pixels are rescaled to [0, 1] and normalised with the ImageNet mean and std, as in the original xT. xT
    cuts the image into a grid of `region_size` squares, so each image is then padded at the **bottom and
    right** up to the next multiple of `region_size` in each dimension: the image keeps its top-left corner
    at region (0, 0) and no original pixel moves or changes. The padding is `pad_value` written *after*
    normalisation, so the default 0.0 is the ImageNet mean colour, the neutral value the model itself pads
    with. In a batch, every image is padded the same way to the largest padded height and the largest
    padded width of the batch, so they stack. Non-square images stay non-square.

    Args:
        region_size (`int`, defaults to 256):
            Side of the square regions; must equal the model's `config.region_size`. An image smaller than
            one region in either dimension is rejected unless `do_resize` is set.
        do_resize (`bool`, defaults to `False`):
            Resize before normalising: to `size` if it is set, otherwise each side to the nearest multiple
            of `region_size` (at least one region).
        size (`dict[str, int]`, *optional*):
            `{"height": h, "width": w}` to resize to when `do_resize` is set; need not be a region multiple
            (padding completes it) but must be at least one region per side.
        resample (`PILImageResampling`, defaults to `BILINEAR`):
            Resampling filter for resizing.
        do_rescale (`bool`, defaults to `True`):
            Multiply pixel values by `rescale_factor` (1/255). Set it to `False` for float images already in [0, 1].
        do_normalize (`bool`, defaults to `True`):
            Normalise each channel with `image_mean` and `image_std` (ImageNet's by default).
        do_pad (`bool`, defaults to `True`):
            Pad as described above. With `False`, images keep their (possibly resized) size; the model then
            zero-pads them itself, but only images of one size can be stacked into a tensor.
        pad_value (`float`, defaults to 0.0):
            Value written into the padded pixels of the output as it is, after rescaling and normalisation: with
            the defaults, 0.0 is the ImageNet mean colour; with `do_normalize=False` it is black.
        num_channels (`int`, defaults to 3):
            Channels every input must have; set it, with `image_mean` and `image_std` of that many values,
            for a model on multispectral images.
        do_convert_rgb (`bool`, *optional*):
            Convert grayscale and RGBA inputs to RGB first (alpha is composited onto white).

    Inputs are PIL images, NumPy arrays or torch tensors, `(height, width)`, `(channels, height, width)` or
    `(height, width, channels)`, integer (0-255) or float, one image or a list. The channel axis is the
    end axis holding `num_channels` values (the first one if both do); pass `input_data_format` to override.
    """

    valid_kwargs = XTImageProcessorKwargs
    model_input_names = ["pixel_values"]

    region_size = 256
    do_resize = False
    size = None
    resample = PILImageResampling.BILINEAR
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    do_pad = True
    pad_value = 0.0
    num_channels = 3

    def __init__(self, **kwargs: Unpack[XTImageProcessorKwargs]):
        super().__init__(**kwargs)

    def preprocess(self, images: ImageInput, **kwargs: Unpack[XTImageProcessorKwargs]) -> BatchFeature:
        r"""
        Prepare one image or a list of images for an xT model.

        Args:
            images (`ImageInput`):
                PIL image, NumPy array or torch tensor, or a list of them; sizes may differ.
            kwargs:
                Any attribute of the processor (see the class docstring), overriding it for this call, plus
                `return_tensors` (`"pt"` or `"np"`) and `input_data_format`.

        Returns:
            [`BatchFeature`] with only `pixel_values`, `(batch, num_channels, H, W)` float32, where `H` and `W` are
            the largest height and width in the batch after resizing, rounded up to multiples of `region_size`.
            Without `return_tensors` it is a list of `(num_channels, H, W)` arrays.
        """
        return super().preprocess(images, **kwargs)

    def _prepare_images_structure(self, images: ImageInput, expected_ndims: int = 3) -> list:
        """A flat list of single images. 2-d (grayscale) arrays count as images on their own and in lists, so that
        they reach the channel check (and `do_convert_rgb`) instead of failing as an unknown nesting."""
        images = self.fetch_images(images)
        if is_valid_image(images) and not is_pil_image(images) and images.ndim == 2:
            return [images]
        if isinstance(images, list | tuple) and images and all(
            is_valid_image(image) and (is_pil_image(image) or image.ndim in (2, 3)) for image in images
        ):
            return list(images)
        return make_flat_list_of_images(images, expected_ndims=expected_ndims)

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        num_channels: int | None = None,
        **kwargs,
    ) -> np.ndarray:
        """One PIL image, array or tensor -> a `(channels, height, width)` array of the input's dtype."""
        image_type = get_image_type(image)
        if image_type == ImageType.PIL:
            image = self.convert_to_rgb(image) if do_convert_rgb else np.array(image)
            input_data_format = ChannelDimension.LAST
        elif image_type == ImageType.TORCH:
            image = image.detach().cpu().numpy()

        if image.ndim == 2:
            image, input_data_format = image[None], ChannelDimension.FIRST
        elif image.ndim != 3:
            raise ValueError(
                f"An image must be (height, width), (channels, height, width) or (height, width, channels); "
                f"got shape {image.shape}."
            )
        if input_data_format is None:
            input_data_format = _channel_dimension(image, num_channels or self.num_channels)
        if ChannelDimension(input_data_format) == ChannelDimension.LAST:
            image = np.moveaxis(image, -1, 0)

        if do_convert_rgb and image_type != ImageType.PIL and image.shape[0] in (1, 4):
            image = self.convert_to_rgb(image, input_data_format=ChannelDimension.FIRST)
        return image

    def resize(
        self,
        image: np.ndarray,
        size: SizeDict,
        resample: PILImageResampling | int | None = None,
        **kwargs,
    ) -> np.ndarray:
        """Resize `(channels, height, width)` to `(channels, size.height, size.width)`, float32.

        Each channel goes through PIL as a 32-bit float image, so any channel count (multispectral) and float
        input can be resized, and nothing is rounded to 8 bits on the way.
        """
        resample = PILImageResampling.BILINEAR if resample is None else resample
        channels = [
            np.asarray(Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32)).resize(
                (size.width, size.height), resample=resample))
            for channel in image
        ]
        return np.stack(channels)

    def _preprocess(
        self,
        images: list[np.ndarray],
        region_size: int,
        do_resize: bool,
        size: SizeDict | None,
        resample: PILImageResampling | int | None,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | tuple[float, ...],
        image_std: float | tuple[float, ...],
        do_pad: bool,
        pad_value: float,
        num_channels: int,
        return_tensors: str | TensorType | None,
        **kwargs,
    ) -> BatchFeature:
        """`(channels, height_i, width_i)` arrays -> `pixel_values` `(batch, channels, H, W)`, see `preprocess`."""
        processed = []
        for index, image in enumerate(images):
            _check_image(image, index, region_size, num_channels, check_size=not do_resize)
            if do_rescale and np.issubdtype(image.dtype, np.floating) and is_scaled_image(image):
                logger.warning_once(
                    "A float image has all its values in [0, 1] and will be multiplied by rescale_factor again; "
                    "pass do_rescale=False if it is already rescaled."
                )
            if do_resize:
                height, width = _resized_size(*image.shape[-2:], region_size, size)
                image = self.resize(image, SizeDict(height=height, width=width), resample=resample)
            if do_rescale:
                image = self.rescale(image, rescale_factor)
            if do_normalize:
                image = self.normalize(image, image_mean, image_std)
            processed.append(image.astype(np.float32, copy=False))

        if do_pad:
            # Every image goes to the same whole-region size, so that the batch stacks.
            padded_height = max(-(-image.shape[1] // region_size) for image in processed) * region_size
            padded_width = max(-(-image.shape[2] // region_size) for image in processed) * region_size
            processed = self.pad(
                processed, pad_size=SizeDict(height=padded_height, width=padded_width), fill_value=pad_value
            )
        elif return_tensors is not None and len({image.shape for image in processed}) > 1:
            raise ValueError(
                f"Images of sizes {sorted({image.shape[1:] for image in processed})} cannot be stacked into one "
                f"tensor with do_pad=False: set do_pad=True, or do_resize=True with a fixed size."
            )
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)

    def post_process_semantic_segmentation(self, outputs, target_sizes: list[tuple[int, int]] | None = None) -> list:
        """Per-image class maps `(height, width)` from `XTForSemanticSegmentation` outputs.

        The model's logits cover the processed image: the original (or resized) pixels at the top left,
        then the padding. With `target_sizes` (the original `(height, width)` of each image, as the
        `image-segmentation` pipeline passes them), logits are brought to full resolution, the padding is
        cropped away, and a resized image is resized back; without it, the uncropped map is returned.
        """
        import torch.nn.functional as F

        logits = outputs.logits if hasattr(outputs, "logits") else outputs["logits"]
        if target_sizes is None:
            return list(logits.argmax(dim=1))
        if len(target_sizes) != len(logits):
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {len(logits)} logits.")
        sizes = [tuple(int(v) for v in size) for size in target_sizes]
        resize_to = SizeDict(**self.size) if self.do_resize and self.size else None
        processed = [
            _resized_size(height, width, self.region_size, resize_to) if self.do_resize else (height, width)
            for height, width in sizes
        ]
        # The batch was padded to its largest whole-region height; the logits' stride follows from that.
        batch_height = max(-(-h // self.region_size) * self.region_size if self.do_pad else h for h, _ in processed)
        stride = max(1, round(batch_height / logits.shape[-2]))
        maps = []
        for image_logits, (height, width), (processed_height, processed_width) in zip(logits, sizes, processed):
            full = image_logits[None].float()
            if stride > 1:
                full = F.interpolate(full, scale_factor=stride, mode="bilinear", align_corners=False)
            full = full[..., :processed_height, :processed_width]
            if (processed_height, processed_width) != (height, width):
                full = F.interpolate(full, size=(height, width), mode="bilinear", align_corners=False)
            maps.append(full[0].argmax(dim=0))
        return maps

    def _validate_preprocess_kwargs(
        self,
        region_size: int | None = None,
        num_channels: int | None = None,
        do_resize: bool | None = None,
        size: SizeDict | None = None,
        do_normalize: bool | None = None,
        image_mean: float | tuple[float, ...] | None = None,
        image_std: float | tuple[float, ...] | None = None,
        **kwargs,
    ) -> None:
        # `do_resize` without `size` means "to the nearest region multiple", which the generic check rejects.
        super()._validate_preprocess_kwargs(
            do_resize=do_resize and size is not None,
            size=size,
            do_normalize=do_normalize,
            image_mean=image_mean,
            image_std=image_std,
            **kwargs,
        )
        if not isinstance(region_size, int) or region_size < 1:
            raise ValueError(f"region_size must be a positive integer, got {region_size!r}.")
        if not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive integer, got {num_channels!r}.")
        if do_resize and size is not None:
            if not (size.height and size.width):
                raise ValueError(f"size must be {{'height': int, 'width': int}}, got {dict(size)}.")
            if size.height < region_size or size.width < region_size:
                raise ValueError(
                    f"size {size.height}×{size.width} is smaller than one region ({region_size}×{region_size} px)."
                )
        if do_normalize:
            for name, values in (("image_mean", image_mean), ("image_std", image_std)):
                if not isinstance(values, int | float) and len(values) != num_channels:
                    raise ValueError(f"{name} has {len(values)} values but num_channels is {num_channels}.")


def _channel_dimension(image: np.ndarray, num_channels: int) -> ChannelDimension:
    """Which end axis of a 3-d array holds the channels: the one of length `num_channels`, first if both are.

    Failing that, the shorter end axis, so that an image with the wrong channel count is later reported
    with its real count.
    """
    first, last = image.shape[0], image.shape[-1]
    if first == num_channels or (last != num_channels and first <= last):
        return ChannelDimension.FIRST
    return ChannelDimension.LAST


def _check_image(image: np.ndarray, index: int, region_size: int, num_channels: int, check_size: bool) -> None:
    """Reject a `(channels, height, width)` image the model cannot take, naming its index in the batch."""
    channels, height, width = image.shape
    if channels != num_channels:
        hints = []
        if num_channels == 3 and channels in (1, 4):
            hints.append("pass do_convert_rgb=True to convert grayscale or RGBA images to RGB")
        hints.append(
            f"set num_channels={channels} (with one image_mean and image_std value per channel) if the model takes "
            f"{channels}-channel images"
        )
        raise ValueError(
            f"Image {index} of the batch has {channels} channel{'s' if channels != 1 else ''} but {num_channels} are "
            f"expected (array of shape (channels, height, width) = {image.shape}): {', or '.join(hints)}."
        )
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise ValueError(f"Image {index} of the batch contains NaN or infinite pixel values.")
    if check_size and (height < region_size or width < region_size):
        raise ValueError(
            f"Image {index} of the batch is {height}×{width} px (height×width), smaller than one region "
            f"({region_size}×{region_size} px): resize it (do_resize=True rounds each side to the nearest multiple "
            f"of region_size, or also pass size={{'height': h, 'width': w}}) or use a model with a smaller region_size."
        )


def _resized_size(height: int, width: int, region_size: int, size: SizeDict | None) -> tuple[int, int]:
    """`size` if given, else each side rounded (half up) to the nearest multiple of `region_size`, at least one."""
    if size is not None:
        return size.height, size.width
    return tuple(max(1, (2 * side + region_size) // (2 * region_size)) * region_size for side in (height, width))


__all__ = ["XTImageProcessor"]
