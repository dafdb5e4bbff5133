"""What both backends of the xT image processor share: the settings, the pixel arithmetic, the padding and the
post-processing.

`image_processing_xt.XTImageProcessor` (torchvision, the default) and `image_processing_pil_xt.XTImageProcessorPil`
(PIL/NumPy, always available) are `XTImageProcessorMixin` on transformers' `TorchvisionBackend` and `PilBackend`; each
adds only how it lays out and resizes an image. `normalize_pixels` is the one definition of the pixel arithmetic both
use, public so that streaming readers can apply it to windows of an image.

Shipped as Hub remote code beside both backend modules: imports only NumPy, Pillow, transformers and the standard
library (torch only inside functions, for tensor inputs; torchvision's box operations only inside
`post_process_object_detection`), so that the PIL backend loads where torchvision is not installed.
"""

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from transformers.image_processing_utils import BatchFeature
from transformers.image_transforms import convert_to_rgb as convert_to_rgb_pil
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
    is_valid_image,
    make_flat_list_of_images,
)
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType, is_torch_tensor, logging

try:
    from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
except ImportError:  # transformers without the class: the same fields in a plain BatchFeature
    SemanticSegmentationPostProcessorOutput = BatchFeature

logger = logging.get_logger(__name__)

LEGACY_RESCALE_FACTOR = 1 / 255  # what every image was multiplied by before the data-type rule, and older files hold


def dtype_rescale_factor(dtype) -> float:
    """The factor that brings pixels of `dtype` to [0, 1]: the data-type rule of both processors and the engine.

    `uint8` pixels are divided by 255 and `uint16` (16-bit PNG and TIFF) by 65535; floating-point pixels are taken as
    already in [0, 1] (factor 1.0), as are booleans. Any other integer type is refused with a `ValueError`: its
    largest value says nothing about the data (`np.random.default_rng().integers` and `torch.randint` give int64
    whatever the range), and dividing by it would turn any picture into a near-black one without a word. `dtype` is
    a NumPy dtype (or anything `np.dtype` accepts) or a torch dtype.
    """
    dtype = _numpy_dtype(dtype)
    if dtype.kind in "fb":
        return 1.0
    if dtype in (np.uint8, np.uint16):
        return 1.0 / np.iinfo(dtype).max
    if dtype.kind in "ui":
        raise ValueError(
            f"Pixels of type {dtype} have no standard range, so they are not rescaled by data type (only uint8, "
            f"uint16 and floats are). Give the factor that brings them to [0, 1]: rescale_factor=1/255 for 8-bit "
            f"values, in the call or the processor (on the command line: --rescale-factor 0.00392156862745098), or "
            f"convert the image to uint8 (or uint16) first."
        )
    raise TypeError(f"Pixels of dtype {dtype} cannot be rescaled: expected integers, floats or booleans.")


def _numpy_dtype(dtype) -> np.dtype:
    """A NumPy dtype, or for a torch dtype the NumPy one of the same name (`torch.int64` -> `int64`; any torch float
    type -> float32, which is all the rescaling rule needs to know)."""
    if not isinstance(dtype, np.dtype) and type(dtype).__module__ == "torch":
        if dtype.is_floating_point:  # bfloat16 and the float8 types have no NumPy name
            return np.dtype(np.float32)
        try:
            return np.dtype(str(dtype).removeprefix("torch."))
        except TypeError:  # complex, quantised
            raise TypeError(
                f"Pixels of dtype {dtype} cannot be rescaled: expected integers, floats or booleans.") from None
    return np.dtype(dtype)


def normalize_pixels(
    pixels,
    *,
    image_mean: float | tuple[float, ...] | list[float],
    image_std: float | tuple[float, ...] | list[float],
    rescale_factor: float | None = None,
    do_rescale: bool = True,
    do_normalize: bool = True,
    input_data_format: str | ChannelDimension = ChannelDimension.LAST,
):
    """Pixels of any dtype -> float32 `(channels, height, width)`, exactly as the xT image processors compute them.

    1. Cast to float32 and, with `do_rescale`, multiply by `rescale_factor`, or when it is `None` by the factor of
       the input's dtype (`dtype_rescale_factor`: uint8 1/255, uint16 1/65535, floats 1; other integer types are
       refused with a `ValueError` unless `rescale_factor` is given).
    2. With `do_normalize`, `(x - image_mean) / image_std` per channel (`image_mean`/`image_std`: one value, or one
       per channel).

    All arithmetic is float32, one operation at a time, so that NumPy and torch give the same bits.

    Args:
        pixels (`np.ndarray` or `torch.Tensor`):
            One image or window, `(height, width, channels)` (`input_data_format="channels_last"`, the default),
            `(channels, height, width)` (`"channels_first"`), or `(height, width)`. A tensor stays on its device and
            a tensor is returned.
    """
    channels_last = ChannelDimension(input_data_format) == ChannelDimension.LAST
    tensor = is_torch_tensor(pixels)
    if not tensor:
        pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[..., None] if channels_last else pixels[None]
    if pixels.ndim != 3:
        raise ValueError(f"normalize_pixels takes one 2-d or 3-d image, got shape {tuple(pixels.shape)}.")
    factor = None
    if do_rescale:
        factor = dtype_rescale_factor(pixels.dtype) if rescale_factor is None else float(rescale_factor)
    if tensor:
        import torch

        pixels = pixels.permute(2, 0, 1) if channels_last else pixels
        pixels = pixels.to(torch.float32)

        def as_float32(values, shape):
            return torch.tensor(values, dtype=torch.float32, device=pixels.device).reshape(shape)
    else:
        pixels = np.moveaxis(pixels, -1, 0) if channels_last else pixels
        pixels = np.array(pixels, dtype=np.float32, order="C")

        def as_float32(values, shape):
            return np.asarray(values, dtype=np.float32).reshape(shape)

    if do_rescale:
        pixels = pixels * as_float32(factor, ())
    if do_normalize:
        channels = pixels.shape[0]
        mean, std = (_per_channel(values, name, channels) for values, name in ((image_mean, "image_mean"), (image_std, "image_std")))
        pixels = (pixels - as_float32(mean, (-1, 1, 1))) / as_float32(std, (-1, 1, 1))
    return pixels.contiguous() if tensor else pixels


def _with_num_channels_of_statistics(kwargs: dict, processor=None) -> dict:
    """`kwargs` with `image_mean`/`image_std` as floats (integers such as `image_std=(1, 1, 1, 1)` would fail
    transformers' type check of a call's arguments) and, when `num_channels` is not given, set to the number of
    per-channel statistics: n values of `image_mean` or `image_std` say the images have n channels.

    In a call (`processor` given), the count is taken only when the call gives per-channel statistics and they
    agree with those of the processor that the call leaves in place; otherwise `num_channels` stays the
    processor's, so that the error names the statistic with the wrong count.
    """
    kwargs = dict(kwargs)
    for name in ("image_mean", "image_std"):
        values = kwargs.get(name)
        if isinstance(values, int) and not isinstance(values, bool):
            kwargs[name] = float(values)
        elif isinstance(values, list | tuple) and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                       for v in values):
            kwargs[name] = type(values)(float(v) for v in values)
    if kwargs.get("num_channels") is not None:
        return kwargs
    given = [kwargs.get(name) for name in ("image_mean", "image_std")]
    if processor is None:
        counts = [len(values) for values in given if isinstance(values, list | tuple)][:1]
    elif any(isinstance(values, list | tuple) for values in given):
        in_use = [getattr(processor, name) if values is None else values
                  for name, values in zip(("image_mean", "image_std"), given)]
        counts = list({len(values) for values in in_use if isinstance(values, list | tuple)})
    else:
        counts = []
    if len(counts) == 1:
        kwargs["num_channels"] = counts[0]
    return kwargs


def _per_channel(values, name: str, channels: int) -> list[float]:
    values = [float(values)] * channels if isinstance(values, int | float) else [float(v) for v in values]
    if len(values) != channels:
        raise ValueError(f"{name} has {len(values)} values but the image has {channels} channels.")
    return values


class XTImageKwargs(ImagesKwargs, total=False):
    """
    The settings of xT's image processor beyond transformers' `ImagesKwargs`; each backend module subclasses it as
    its `XTImageProcessorKwargs`.

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


class XTImageProcessorMixin:
    r"""
    Turns images of any size into xT `pixel_values` of shape `(batch, num_channels, rows·region_size,
    cols·region_size)`, float32.

    Pixels are rescaled to [0, 1] according to their data type and normalised with the ImageNet mean and std, as in
    the original xT. xT cuts the image into a grid of `region_size` squares, so each image is then padded at the
    **bottom and right** up to the next multiple of `region_size` in each dimension: the image keeps its top-left
    corner at region (0, 0) and no original pixel moves or changes. The padding is `pad_value` written *after*
    normalisation, so the default 0.0 is the ImageNet mean colour, the neutral value the model itself pads with. In
    a batch, every image is padded the same way to the largest padded height and the largest padded width of the
    batch, so they stack. Non-square images stay non-square.

    Two backends compute the same values (to float32 rounding): `XTImageProcessor` (torchvision, the one
    `AutoImageProcessor` picks when torchvision is installed; tensors stay on their device, `device=` moves them) and
    `XTImageProcessorPil` (PIL/NumPy, `AutoImageProcessor.from_pretrained(..., backend="pil")`).

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
            Bring pixel values to [0, 1] by multiplying them by the rescale factor (see `rescale_factor`).
        rescale_factor (`float`, *optional*):
            `None` (the default): the factor follows each image's data type: uint8 pixels are divided by 255, uint16
            (16-bit PNG and TIFF) by 65535, and floating-point pixels are taken as already in [0, 1] (factor 1; a
            warning is logged when a float image has values above 1). Other integer types (int64, which NumPy's
            and torch's random integers are, int32, uint32, ...) have no standard range and are refused with a
            `ValueError`: give their factor here or in the call (`1/255` for 8-bit values), or convert them to
            uint8. A number given here (or in the call) is used for every image whatever its type, e.g. `1/4095`
            for 12-bit data stored as uint16, or `1/255` for float images holding 0-255 values. Files saved by
            earlier versions hold `rescale_factor: 1/255`, which is used as given (with a warning for uint16
            images); delete the key to get the data-type rule.
        do_normalize (`bool`, defaults to `True`):
            Normalise each channel with `image_mean` and `image_std` (ImageNet's by default).
        do_pad (`bool`, defaults to `True`):
            Pad as described above. With `False`, images keep their (possibly resized) size; the model then
            zero-pads them itself, but only images of one size can be stacked into a tensor.
        pad_value (`float`, defaults to 0.0):
            Value written into the padded pixels of the output as it is, after rescaling and normalisation: with
            the defaults, 0.0 is the ImageNet mean colour; with `do_normalize=False` it is black.
        num_channels (`int`, *optional*):
            Channels every input must have. When it is not given, it is the number of `image_mean` (or `image_std`)
            values if they are a list, else 3: `image_mean` and `image_std` of 4 values make a 4-channel processor.
        do_convert_rgb (`bool`, *optional*):
            Convert grayscale and RGBA inputs to RGB first (alpha is composited onto white).

    The arithmetic is `normalize_pixels` of this module: float32 `x * rescale_factor`, then `(x - mean) / std`.

    Inputs are PIL images, NumPy arrays or torch tensors, `(height, width)`, `(channels, height, width)` or
    `(height, width, channels)`, uint8, uint16, float or bool (other integer types with a `rescale_factor`), one image
    or a non-empty list. The channel axis is the end axis holding `num_channels` values (the first one if both do);
    pass `input_data_format` to override.
    """

    valid_kwargs = XTImageKwargs
    model_input_names = ["pixel_values"]

    region_size = 256
    do_resize = False
    size = None
    resample = PILImageResampling.BILINEAR
    do_rescale = True
    rescale_factor = None
    do_normalize = True
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    do_pad = True
    pad_value = 0.0
    num_channels = 3

    def __init__(self, **kwargs: Unpack[XTImageKwargs]):
        super().__init__(**_with_num_channels_of_statistics(kwargs))

    def preprocess(
        self, images: ImageInput, annotations: dict | list[dict] | None = None, **kwargs: Unpack[XTImageKwargs]
    ) -> BatchFeature:
        r"""
        Prepare one image or a list of images for an xT model.

        Args:
            images (`ImageInput`):
                PIL image, NumPy array or torch tensor, or a non-empty list of them; sizes may differ.
            annotations (`dict` or `list[dict]`, *optional*):
                COCO object-detection annotations, one dict per image: `{"image_id": int, "annotations": [{"bbox":
                [x, y, width, height], "category_id": int, ...}, ...]}`, boxes in pixels of the image as given. They
                become `labels` for `XTForObjectDetection` (see Returns). Crowd objects (`"iscrowd": 1`) are left
                out, as in transformers' DETR processor, and so are boxes with no area inside the image.
            kwargs:
                Any attribute of the processor (see the class docstring), overriding it for this call, plus
                `return_tensors` (`"pt"` or `"np"`) and `input_data_format`.

        Returns:
            [`BatchFeature`] with `pixel_values`, `(batch, num_channels, H, W)` float32, where `H` and `W` are
            the largest height and width in the batch after resizing, rounded up to multiples of `region_size`.
            Without `return_tensors` it is a list of `(num_channels, H, W)` arrays (tensors for the torchvision
            backend). With `annotations`, also `labels`: one dict per image with `class_labels` `(m,)` int64 and
            `boxes` `(m, 4)` float32 `(center_x, center_y, width, height)` that follow the resizing and are
            normalised by the padded `H, W` (the frame of `pixel_values`), plus `image_id`, `orig_size` and `size`
            (the image's `(height, width)` before and after resizing), as tensors with `return_tensors="pt"`.
        """
        # image_mean and image_std of n values given in the call make it an n-channel call, as in the constructor:
        # the call's values win over the processor's num_channels (transformers' common 4-channel test relies on it).
        return super().preprocess(images, annotations, **_with_num_channels_of_statistics(kwargs, self))

    def _preprocess_image_like_inputs(self, images: ImageInput, annotations=None, **kwargs) -> BatchFeature:
        """Both backends' `_preprocess` on the images; COCO `annotations` become `labels` in the padded frame."""
        if annotations is not None:
            annotations = [annotations] if isinstance(annotations, dict) else annotations
            _check_coco_annotations(annotations)
        images = self._prepare_image_like_inputs(images, **kwargs)
        if annotations is not None and len(annotations) != len(images):
            raise ValueError(f"Got {len(annotations)} annotations for {len(images)} images: give one per image.")
        original_sizes = [tuple(int(side) for side in image.shape[-2:]) for image in images]
        encoded = self._preprocess(images, **kwargs)
        if annotations is not None:
            size = kwargs.get("size")
            labels = []
            for annotation, (height, width), pixels in zip(annotations, original_sizes, encoded["pixel_values"]):
                resized = (_resized_size(height, width, kwargs["region_size"], size) if kwargs.get("do_resize")
                           else (height, width))
                labels.append(coco_detection_labels(annotation, (height, width), resized, tuple(pixels.shape[-2:])))
            return_tensors = kwargs.get("return_tensors")
            encoded["labels"] = [BatchFeature(label, tensor_type=return_tensors) for label in labels]
        return encoded

    def _prepare_images_structure(self, images: ImageInput, expected_ndims: int = 3) -> list:
        """A flat, non-empty list of single images. 2-d (grayscale) arrays count as images on their own and in lists,
        so that they reach the channel check (and `do_convert_rgb`) instead of failing as an unknown nesting."""
        if isinstance(images, list | tuple) and not images:
            raise ValueError("No images to process: got an empty list; pass one image or a list of at least one.")
        images = self.fetch_images(images)
        if is_valid_image(images) and not is_pil_image(images) and images.ndim == 2:
            return [images]
        if isinstance(images, list | tuple) and all(
            is_valid_image(image) and (is_pil_image(image) or image.ndim in (2, 3)) for image in images
        ):
            return list(images)
        images = make_flat_list_of_images(images, expected_ndims=expected_ndims)
        if not images:
            raise ValueError("No images to process: the batch is empty (a batch axis of length 0, or empty lists).")
        return images

    def _validate_preprocess_kwargs(
        self,
        region_size: int | None = None,
        num_channels: int | None = None,
        do_resize: bool | None = None,
        size: SizeDict | None = None,
        do_rescale: bool | None = None,
        rescale_factor: float | None = None,
        do_normalize: bool | None = None,
        image_mean: float | tuple[float, ...] | None = None,
        image_std: float | tuple[float, ...] | None = None,
        **kwargs,
    ) -> None:
        # `do_resize` without `size` means "to the nearest region multiple", and `rescale_factor=None` "by data type":
        # the generic checks would reject both.
        super()._validate_preprocess_kwargs(
            do_resize=do_resize and size is not None,
            size=size,
            do_rescale=do_rescale and rescale_factor is not None,
            rescale_factor=rescale_factor,
            do_normalize=do_normalize,
            image_mean=image_mean,
            image_std=image_std,
            **kwargs,
        )
        if not isinstance(region_size, int) or region_size < 1:
            raise ValueError(f"region_size must be a positive integer, got {region_size!r}.")
        if not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive integer, got {num_channels!r}.")
        if rescale_factor is not None and not (isinstance(rescale_factor, int | float) and rescale_factor > 0):
            raise ValueError(f"rescale_factor must be None (by data type) or a positive number, got {rescale_factor!r}.")
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
                    raise ValueError(
                        f"{name} has {len(values)} values but num_channels is {num_channels}: give one value per "
                        f"channel (a processor built with image_mean and image_std of n values has num_channels=n)."
                    )

    def _size_dict(self) -> SizeDict:
        """`size` as a `SizeDict` (it is one once set through the constructor, a dict when assigned by hand)."""
        return self.size if isinstance(self.size, SizeDict) else SizeDict(**self.size)

    def _normalized_images(self, images: list, *, region_size: int, do_resize: bool, size: SizeDict | None, resample,
                           do_rescale: bool, rescale_factor: float | None, do_normalize: bool, image_mean, image_std,
                           num_channels: int) -> list:
        """Each `(channels, height_i, width_i)` image checked, resized (with `do_resize`, by the backend's own
        `resize`) and normalised by `normalize_pixels`: the step both backends share."""
        processed = []
        for index, image in enumerate(images):
            _check_image(image, index, region_size, num_channels, check_size=not do_resize)
            factor = self._rescale_factor_for(image, rescale_factor, do_rescale)
            if do_resize:
                height, width = _resized_size(*image.shape[-2:], region_size, size)
                image = self.resize(image, SizeDict(height=height, width=width), resample=resample)
            processed.append(normalize_pixels(
                image, image_mean=image_mean, image_std=image_std, rescale_factor=factor, do_rescale=do_rescale,
                do_normalize=do_normalize, input_data_format=ChannelDimension.FIRST,
            ))
        return processed

    def _rescale_factor_for(self, image, rescale_factor: float | None, do_rescale: bool) -> float | None:
        """The factor for one image (before resizing, which makes it float), warning about likely mistakes.

        `rescale_factor` is the call's, else the processor's: not `None` only when someone chose it, since the
        default is `None` (by data type). A processor file that records a number counts as such a choice, even the
        1/255 that files of earlier versions hold and that cannot be told apart from one chosen by hand: for the
        integer types without a data-type factor it is the usual right answer (8-bit values in int64 arrays), never
        a near-zero one, and for uint16 and floats a warning below names it.
        """
        if not do_rescale:
            return None
        if rescale_factor is None:
            if _is_floating(image) and _num_elements(image):
                largest = float(image.max())
                if largest > 1.0:
                    logger.warning_once(
                        f"Float images are taken as already in [0, 1] (rescale factor 1), but one has values up to "
                        f"{largest:g}: pass rescale_factor=1/255 if it holds 0-255 values."
                    )
            return dtype_rescale_factor(image.dtype)  # refuses integer types without a standard range
        if _is_floating(image):
            if rescale_factor != 1.0 and _num_elements(image) and float(image.min()) >= 0 and float(image.max()) <= 1:
                logger.warning_once(
                    f"A float image has all its values in [0, 1] and will be multiplied by rescale_factor="
                    f"{rescale_factor:g}; leave rescale_factor unset (None) for float images already in [0, 1]."
                )
        elif rescale_factor == LEGACY_RESCALE_FACTOR and _numpy_dtype(image.dtype) == np.uint16:
            logger.warning_once(
                f"rescale_factor=1/255 is applied to an image of type uint16, whose range is 1/65535: files saved by "
                f"earlier versions of this processor hold 1/255; remove rescale_factor (set it to None) to rescale "
                f"each image by its data type."
            )
        return rescale_factor

    def _preprocess(
        self,
        images: list,
        region_size: int,
        do_resize: bool,
        size: SizeDict | None,
        resample: PILImageResampling | int | None,
        do_rescale: bool,
        rescale_factor: float | None,
        do_normalize: bool,
        image_mean: float | tuple[float, ...],
        image_std: float | tuple[float, ...],
        do_pad: bool,
        pad_value: float,
        num_channels: int,
        return_tensors: str | TensorType | None,
        **kwargs,
    ) -> BatchFeature:
        """`(channels, height_i, width_i)` images -> `pixel_values` `(batch, channels, H, W)`, see `preprocess`: both
        backends' steps, each backend's own `resize` and `pad`."""
        processed = self._normalized_images(
            images, region_size=region_size, do_resize=do_resize, size=size, resample=resample, do_rescale=do_rescale,
            rescale_factor=rescale_factor, do_normalize=do_normalize, image_mean=image_mean, image_std=image_std,
            num_channels=num_channels,
        )
        if do_pad:
            height, width = padded_frame([image.shape[-2:] for image in processed], region_size)
            # One image at a time (no grouping by shape): the torchvision backend would stack a copy of the batch.
            processed = self.pad(processed, pad_size=SizeDict(height=height, width=width), fill_value=pad_value,
                                 disable_grouping=True)
        else:
            _check_stackable(processed, return_tensors)
        return self._batch_feature(processed, return_tensors)

    def _batch_feature(self, processed: list, return_tensors: str | TensorType | None) -> BatchFeature:
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)

    def post_process_semantic_segmentation(
        self,
        outputs,
        target_sizes: list[tuple[int, int]] | None = None,
        return_segmentation_scores: bool = False,
    ) -> list:
        """Per-image class maps `(height, width)` from `XTForSemanticSegmentation` outputs.

        The model's logits cover the processed image: the original (or resized) pixels at the top left,
        then the padding. With `target_sizes` (the original `(height, width)` of each image, as the
        `image-segmentation` pipeline passes them), logits are brought to full resolution, the padding is
        cropped away, and a resized image is resized back; without it, the uncropped map is returned.

        Args:
            outputs: the model's output (or a dict) with `logits` `(batch, num_labels, h, w)`.
            target_sizes (`list[tuple[int, int]]`, *optional*): see above.
            return_segmentation_scores (`bool`, defaults to `False`):
                Also return the scores behind each map, as transformers' segmentation processors do: each item is
                then a `SemanticSegmentationPostProcessorOutput` with `segmentation` (the class map,
                `(height, width)`) and `segmentation_scores` (the logits the map is the argmax of, float32
                `(num_labels, height, width)`, same crop and size; `.softmax(0)` gives probabilities).

        Returns:
            `list[torch.Tensor]` of class maps, or with `return_segmentation_scores` a list of
            `SemanticSegmentationPostProcessorOutput`; one item per image.
        """
        import torch.nn.functional as F

        logits = outputs.logits if hasattr(outputs, "logits") else outputs["logits"]
        if target_sizes is not None and len(target_sizes) != len(logits):
            raise ValueError(f"Got {len(target_sizes)} target sizes for a batch of {len(logits)} logits.")
        if target_sizes is None or len(logits) == 0:
            scores = [image_logits.float() for image_logits in logits]
        else:
            sizes = [tuple(int(v) for v in size) for size in target_sizes]
            resize_to = self._size_dict() if self.do_resize and self.size else None
            processed = [
                _resized_size(height, width, self.region_size, resize_to) if self.do_resize else (height, width)
                for height, width in sizes
            ]
            # The batch was padded to its largest whole-region height; the logits' stride follows from that.
            batch_height, _ = padded_frame(processed, self.region_size if self.do_pad else 1)
            stride = max(1, round(batch_height / logits.shape[-2]))
            scores = []
            for image_logits, (height, width), (processed_height, processed_width) in zip(logits, sizes, processed):
                full = image_logits[None].float()
                if stride > 1:
                    full = F.interpolate(full, scale_factor=stride, mode="bilinear", align_corners=False)
                full = full[..., :processed_height, :processed_width]
                if (processed_height, processed_width) != (height, width):
                    full = F.interpolate(full, size=(height, width), mode="bilinear", align_corners=False)
                scores.append(full[0])
        maps = [image_scores.argmax(dim=0) for image_scores in scores]
        if not return_segmentation_scores:
            return maps
        return [
            SemanticSegmentationPostProcessorOutput(data={"segmentation": seg, "segmentation_scores": score})
            for seg, score in zip(maps, scores)
        ]

    def post_process_object_detection(
        self,
        outputs,
        threshold: float = 0.5,
        target_sizes=None,
        top_k: int | None = None,
    ) -> list[dict]:
        """Per-image detections from `XTForObjectDetection` outputs, with boxes as pixel corners.

        The model's `pred_boxes` are normalised `(center_x, center_y, width, height)` in the frame of the
        `pixel_values` it was given (the processed image, padding included, `outputs.image_sizes`). Without
        `target_sizes`, boxes are in pixels of that frame. With `target_sizes` (the original `(height, width)` of
        each image, as the `object-detection` pipeline passes them), they are brought back to the original image:
        a resize done by this processor (`do_resize`) is undone, detections centred in the padding are dropped and
        boxes are clipped to the image.

        Args:
            outputs: the model's output (or a dict) with `logits` `(batch, detections, num_labels)` and `pred_boxes`
                `(batch, detections, 4)`, and `image_sizes` `(batch, 2)` (needed when `target_sizes` is not given;
                without it the padded frame is worked out from `target_sizes` and this processor's settings).
            threshold (`float`, defaults to 0.5): keep detections whose score (`sigmoid` of the logit) is above it.
            target_sizes (`torch.Tensor` of shape `(batch, 2)` or `list[tuple[int, int]]`, *optional*): see above.
            top_k (`int`, *optional*): keep at most this many detections per image, the best.

        Returns:
            `list[dict]`, one per image: `scores` `(k,)`, `labels` `(k,)`, `boxes` `(k, 4)` absolute
            `(x1, y1, x2, y2)`, by decreasing score.
        """
        from torchvision.ops import box_convert, clip_boxes_to_image

        logits = outputs.logits if hasattr(outputs, "logits") else outputs["logits"]
        pred_boxes = outputs.pred_boxes if hasattr(outputs, "pred_boxes") else outputs["pred_boxes"]
        frames = outputs.get("image_sizes") if hasattr(outputs, "get") else getattr(outputs, "image_sizes", None)
        if target_sizes is not None:
            sizes = [tuple(int(v) for v in size) for size in (target_sizes.tolist() if hasattr(target_sizes, "tolist")
                                                              else target_sizes)]
            if len(sizes) != len(logits):
                raise ValueError(f"Got {len(sizes)} target sizes for a batch of {len(logits)} images.")
            resize_to = None
            if self.do_resize and self.size:
                resize_to = self._size_dict()
            processed = [_resized_size(h, w, self.region_size, resize_to) if self.do_resize else (h, w)
                         for h, w in sizes]
            if frames is None:  # the batch was padded to its largest whole-region size
                frames = [padded_frame(processed, self.region_size if self.do_pad else 1)] * len(sizes)
        elif frames is None:
            raise ValueError("post_process_object_detection needs target_sizes, or outputs with image_sizes (the "
                             "pixel_values' (height, width) that XTForObjectDetection returns).")
        frames = [tuple(int(v) for v in frame) for frame in (frames.tolist() if hasattr(frames, "tolist") else frames)]
        results = []
        for index, (image_logits, image_boxes) in enumerate(zip(logits, pred_boxes)):
            scores, labels = image_logits.float().sigmoid().max(dim=-1)
            order = scores.argsort(descending=True, stable=True)
            order = order[scores[order] > threshold][:top_k]
            frame_height, frame_width = frames[index]
            boxes = box_convert(image_boxes[order].float(), "cxcywh", "xyxy")
            boxes = boxes * boxes.new_tensor([frame_width, frame_height, frame_width, frame_height])
            if target_sizes is not None:
                (height, width), (processed_height, processed_width) = sizes[index], processed[index]
                boxes = boxes * boxes.new_tensor([width / processed_width, height / processed_height] * 2)
                centre_x, centre_y = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
                inside = (centre_x >= 0) & (centre_x < width) & (centre_y >= 0) & (centre_y < height)
                order, boxes = order[inside], clip_boxes_to_image(boxes[inside], (height, width))
            results.append({"scores": scores[order], "labels": labels[order], "boxes": boxes})
        return results

    def to_dict(self) -> dict:
        """The saved settings. The type is `XTImageProcessor` whichever backend saves them (transformers drops the
        `Pil` of a PIL class's name the same way), so that the file loads with whichever backend `AutoImageProcessor`
        picks; the remote-code `auto_map` lists both backends."""
        output = super().to_dict()
        output["image_processor_type"] = "XTImageProcessor"
        auto_map = output.get("auto_map")
        if isinstance(auto_map, dict) and isinstance(auto_map.get("AutoImageProcessor"), str):
            output["auto_map"] = {**auto_map, "AutoImageProcessor": _backend_auto_map()}
        return output

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """`ImageProcessingMixin.save_pretrained`, plus, for remote code, the module of each backend."""
        files = super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        if self._auto_class is not None:
            for module in _backend_modules().values():
                target = Path(save_directory) / module.name
                if module.resolve() != target.resolve():
                    shutil.copyfile(module, target)
        return files


def channels_first_array(image, do_convert_rgb: bool | None, input_data_format, num_channels: int) -> np.ndarray:
    """One PIL image, array or tensor -> a NumPy `(channels, height, width)` array of the input's dtype: the layout
    step both backends share (tensors are read on the CPU)."""
    image_type = get_image_type(image)
    if image_type == ImageType.PIL:
        image = convert_to_rgb_pil(image, return_numpy=True) if do_convert_rgb else np.array(image)
        input_data_format = ChannelDimension.LAST
    elif image_type == ImageType.TORCH:
        image = image.detach().cpu().numpy()
    image, _ = _to_channels_first(image, input_data_format, num_channels)
    if do_convert_rgb and image_type != ImageType.PIL and image.shape[0] in (1, 4):
        image = convert_to_rgb_pil(image, input_data_format=ChannelDimension.FIRST, return_numpy=True)
    return image


def _to_channels_first(image, input_data_format, num_channels: int):
    """A 2-d or 3-d array or tensor -> `(channels, height, width)` (a view), and whether it was channels-last."""
    if image.ndim == 2:
        return image[None], False
    if image.ndim != 3:
        raise ValueError(
            f"An image must be (height, width), (channels, height, width) or (height, width, channels); "
            f"got shape {tuple(image.shape)}."
        )
    if input_data_format is None:
        input_data_format = _channel_dimension(image, num_channels)
    if ChannelDimension(input_data_format) == ChannelDimension.LAST:
        return (image.permute(2, 0, 1) if is_torch_tensor(image) else np.moveaxis(image, -1, 0)), True
    return image, False


def resize_channels_with_pil(image: np.ndarray, height: int, width: int, resample) -> np.ndarray:
    """`(channels, h, w)` of any type -> float32 `(channels, height, width)`, each channel a PIL float image."""
    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32)).resize(
            (width, height), resample=resample))
        for channel in image
    ]
    return np.stack(channels)


def _num_elements(image) -> int:
    return image.numel() if is_torch_tensor(image) else image.size


def _is_floating(image) -> bool:
    return image.is_floating_point() if is_torch_tensor(image) else np.issubdtype(image.dtype, np.floating)


def _channel_dimension(image, num_channels: int) -> ChannelDimension:
    """Which end axis of a 3-d array holds the channels: the one of length `num_channels`, first if both are.

    Failing that, the shorter end axis, so that an image with the wrong channel count is later reported
    with its real count.
    """
    first, last = image.shape[0], image.shape[-1]
    if first == num_channels or (last != num_channels and first <= last):
        return ChannelDimension.FIRST
    return ChannelDimension.LAST


def _check_image(image, index: int, region_size: int, num_channels: int, check_size: bool) -> None:
    """Reject a `(channels, height, width)` array or tensor the model cannot take, naming its index in the batch."""
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
            f"expected (array of shape (channels, height, width) = {tuple(image.shape)}): {', or '.join(hints)}."
        )
    if _is_floating(image) and not bool((image.isfinite() if is_torch_tensor(image) else np.isfinite(image)).all()):
        raise ValueError(f"Image {index} of the batch contains NaN or infinite pixel values.")
    if check_size and (height < region_size or width < region_size):
        raise ValueError(
            f"Image {index} of the batch is {height}×{width} px (height×width), smaller than one region "
            f"({region_size}×{region_size} px): resize it (do_resize=True rounds each side to the nearest multiple "
            f"of region_size, or also pass size={{'height': h, 'width': w}}) or use a model with a smaller region_size."
        )


def _check_coco_annotations(annotations) -> None:
    """COCO detection annotations, one dict per image, or a `ValueError` naming what is wrong and where."""
    if not isinstance(annotations, list | tuple):
        raise ValueError(
            f"annotations must be a dict or a list of dicts (one per image), got {type(annotations).__name__}.")
    for image, annotation in enumerate(annotations):
        if not isinstance(annotation, dict) or not isinstance(annotation.get("annotations"), list | tuple):
            raise ValueError(
                f"annotations[{image}] must be a COCO detection dict {{'image_id': ..., 'annotations': [{{'bbox': "
                f"[x, y, w, h], 'category_id': ...}}, ...]}}, got {annotation!r:.200}."
            )
        for number, obj in enumerate(annotation["annotations"]):
            bbox = obj.get("bbox") if isinstance(obj, dict) else None
            if bbox is None or len(bbox) != 4 or not all(np.isfinite(float(v)) for v in bbox):
                raise ValueError(f"annotations[{image}]['annotations'][{number}] needs a 'bbox' of 4 finite numbers "
                                 f"[x, y, width, height], got {obj!r:.200}.")
            category = obj.get("category_id")
            if isinstance(category, bool) or not isinstance(category, int | np.integer) or category < 0:
                raise ValueError(f"annotations[{image}]['annotations'][{number}] needs a non-negative integer "
                                 f"'category_id', got {category!r}.")


def coco_detection_labels(
    annotation: dict, original_size: tuple[int, int], resized_size: tuple[int, int], padded_size: tuple[int, int]
) -> dict:
    """One image's COCO annotation → the `labels` dict of `XTForObjectDetection` (NumPy): each box scaled with the
    image from `original_size` to `resized_size`, clipped to it, and normalised `(cx, cy, w, h)` by the bottom/right
    padded `padded_size` (all `(height, width)`). Crowd objects and boxes with no area inside the image are left out."""
    objects = [obj for obj in annotation["annotations"] if not obj.get("iscrowd", 0)]
    (height, width), (resized_height, resized_width) = original_size, resized_size
    padded_height, padded_width = padded_size
    corners = np.array([obj["bbox"] for obj in objects], dtype=np.float64).reshape(-1, 4)
    corners[:, 2:] += corners[:, :2]
    corners *= np.array([resized_width / width, resized_height / height] * 2)
    corners = corners.clip(0, np.array([resized_width, resized_height] * 2))
    keep = (corners[:, 2] > corners[:, 0]) & (corners[:, 3] > corners[:, 1])
    corners = corners[keep]
    boxes = np.concatenate([(corners[:, :2] + corners[:, 2:]) / 2, corners[:, 2:] - corners[:, :2]], axis=1)
    boxes /= np.array([padded_width, padded_height] * 2)
    classes = np.array([obj["category_id"] for obj in objects], dtype=np.int64)[keep]
    return {
        "image_id": np.array([annotation.get("image_id", -1)], dtype=np.int64),
        "class_labels": classes,
        "boxes": boxes.astype(np.float32),
        "orig_size": np.array([height, width], dtype=np.int64),
        "size": np.array([resized_height, resized_width], dtype=np.int64),
    }


def _check_stackable(images: list, return_tensors) -> None:
    shapes = {tuple(image.shape) for image in images}
    if return_tensors is not None and len(shapes) > 1:
        raise ValueError(
            f"Images of sizes {sorted(shape[1:] for shape in shapes)} cannot be stacked into one tensor with "
            f"do_pad=False: set do_pad=True, or do_resize=True with a fixed size."
        )


def padded_frame(sizes, region_size: int) -> tuple[int, int]:
    """The `(height, width)` a batch of images of `sizes` (`(height, width)` each) is padded to, so that it stacks:
    the largest height and the largest width, each rounded up to whole regions (`region_size=1`: not rounded, as
    without `do_pad`)."""
    return (max(-(-int(height) // region_size) for height, _ in sizes) * region_size,
            max(-(-int(width) // region_size) for _, width in sizes) * region_size)


def _resized_size(height: int, width: int, region_size: int, size: SizeDict | None) -> tuple[int, int]:
    """`size` if given, else each side rounded (half up) to the nearest multiple of `region_size`, at least one."""
    if size is not None:
        return size.height, size.width
    return tuple(max(1, (2 * side + region_size) // (2 * region_size)) * region_size for side in (height, width))


# The module of each backend, as transformers names them: `image_processing_<model>.py` (torchvision, the default)
# and `image_processing_pil_<model>.py`.
BACKEND_CLASSES = {
    "torchvision": ("image_processing_xt", "XTImageProcessor"),
    "pil": ("image_processing_pil_xt", "XTImageProcessorPil"),
}


def _backend_modules() -> dict[str, Path]:
    """`{backend: module file}` of the backends whose module sits beside this one (in a remote-code cache, only the
    modules that were downloaded)."""
    here = Path(__file__)
    modules = {backend: here.with_name(f"{module}.py") for backend, (module, _) in BACKEND_CLASSES.items()}
    return {backend: path for backend, path in modules.items() if path.is_file()}


def _backend_auto_map() -> dict[str, str]:
    """The remote-code `auto_map["AutoImageProcessor"]`: one class reference per backend, as transformers reads it."""
    return {backend: f"{module.stem}.{BACKEND_CLASSES[backend][1]}" for backend, module in _backend_modules().items()}


__all__ = ["XTImageKwargs", "XTImageProcessorMixin", "dtype_rescale_factor", "normalize_pixels", "padded_frame"]
