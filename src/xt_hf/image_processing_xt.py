"""Image processor for xT: normalised pixels, padded at the bottom and right to whole regions.

`XTImageProcessor` is the torchvision backend, the one `AutoImageProcessor` picks when torchvision is installed;
`image_processing_pil_xt.XTImageProcessorPil` is the PIL/NumPy backend, always available, with the same outputs (to
float32 rounding). Both are `XTImageProcessorMixin` of `image_processing_common_xt.py`, which holds the settings, the
pixel arithmetic (`normalize_pixels`), the padding and the post-processing; this module adds only the torchvision
backend's layout and resizing. Torch tensors stay on their device.

`normalize_pixels`, `dtype_rescale_factor` and `padded_frame` are importable from here too, where earlier versions
defined them.

Shipped as Hub remote code next to `image_processing_common_xt.py`, which it imports relatively.
"""

import numpy as np
import torch
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import (
    ChannelDimension,
    ImageInput,
    ImageType,
    PILImageResampling,
    SizeDict,
    get_image_type,
)
from transformers.utils import TensorType, is_torchvision_available

from .image_processing_common_xt import (
    XTImageKwargs,
    XTImageProcessorMixin,
    _to_channels_first,
    channels_first_array,
    dtype_rescale_factor,
    normalize_pixels,
    padded_frame,
    resize_channels_with_pil,
)

if is_torchvision_available():
    from torchvision.transforms.v2 import functional as tvF

# PIL filters that torchvision computes the same way (antialiased, PIL's kernels), to float32 rounding. The others
# (NEAREST, BOX, HAMMING, LANCZOS) differ from PIL's, so those images are resized through PIL, channel by channel.
_SAME_AS_PIL = {PILImageResampling.BILINEAR: "BILINEAR", PILImageResampling.BICUBIC: "BICUBIC"}


class XTImageProcessorKwargs(XTImageKwargs, total=False):
    """The keyword arguments of `XTImageProcessor`: those of `XTImageKwargs`."""


class XTImageProcessor(XTImageProcessorMixin, TorchvisionBackend):
    __doc__ = XTImageProcessorMixin.__doc__
    valid_kwargs = XTImageProcessorKwargs

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        num_channels: int | None = None,
        device: "torch.device | str | None" = None,
        **kwargs,
    ) -> torch.Tensor:
        """One PIL image, array or tensor -> a `(channels, height, width)` tensor of the input's dtype.

        Tensors keep their device (unless `device` is given) and skip NumPy, except when `do_convert_rgb` has to
        convert them, which goes through PIL's conversion, as in the PIL backend, for identical results."""
        num_channels = num_channels or self.num_channels
        if get_image_type(image) == ImageType.TORCH:
            tensor, _ = _to_channels_first(image.detach(), input_data_format, num_channels)
            if not (do_convert_rgb and tensor.shape[0] in (1, 4)):
                return tensor.contiguous() if device is None else tensor.to(device).contiguous()
        array = channels_first_array(image, do_convert_rgb, input_data_format, num_channels)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor if device is None else tensor.to(device)

    def resize(
        self,
        image: torch.Tensor,
        size: SizeDict,
        resample: PILImageResampling | int | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Resize `(channels, height, width)` to `(channels, size.height, size.width)`, float32.

        BILINEAR and BICUBIC run in torchvision (antialiased, as PIL does) in float64, which matches the PIL
        backend's float resize to float32 rounding; other filters go through PIL."""
        resample = PILImageResampling.BILINEAR if resample is None else PILImageResampling(resample)
        if resample not in _SAME_AS_PIL or image.device.type == "mps":  # MPS has no float64
            resized = resize_channels_with_pil(image.cpu().numpy(), size.height, size.width, resample)
            return torch.from_numpy(resized).to(image.device)
        interpolation = getattr(tvF.InterpolationMode, _SAME_AS_PIL[resample])
        resized = tvF.resize(image.to(torch.float64), [size.height, size.width], interpolation=interpolation,
                             antialias=True)
        return resized.to(torch.float32)

    def _batch_feature(self, processed: list[torch.Tensor], return_tensors: str | TensorType | None) -> BatchFeature:
        if return_tensors is not None and str(return_tensors) in ("pt", str(TensorType.PYTORCH)):
            return BatchFeature(data={"pixel_values": torch.stack(processed)}, tensor_type=return_tensors)
        if return_tensors is not None:
            processed = [image.cpu().numpy() for image in processed]
        return BatchFeature(data={"pixel_values": processed}, tensor_type=return_tensors)


__all__ = [
    "XTImageProcessor",
    "XTImageProcessorKwargs",
    "XTImageProcessorMixin",
    "dtype_rescale_factor",
    "normalize_pixels",
    "padded_frame",
]
