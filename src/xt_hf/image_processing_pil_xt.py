"""PIL/NumPy backend of the xT image processor: `XTImageProcessorPil`, always available (it needs no torchvision).

Same settings, same outputs (to float32 rounding) as the default torchvision backend,
`image_processing_xt.XTImageProcessor`: both are `XTImageProcessorMixin` of `image_processing_common_xt.py`, which
lays images out with `channels_first_array` and computes pixels with `normalize_pixels`; this module adds only the
PIL backend's layout and resizing. `AutoImageProcessor.from_pretrained(..., backend="pil")` picks it.

Shipped as Hub remote code next to `image_processing_common_xt.py`, which it imports relatively.
"""

import numpy as np
from transformers.image_processing_backends import PilBackend
from transformers.image_utils import ChannelDimension, ImageInput, PILImageResampling, SizeDict

from .image_processing_common_xt import (
    XTImageKwargs,
    XTImageProcessorMixin,
    channels_first_array,
    resize_channels_with_pil,
)


class XTImageProcessorKwargs(XTImageKwargs, total=False):
    """The keyword arguments of `XTImageProcessorPil`: those of `XTImageKwargs`."""


class XTImageProcessorPil(XTImageProcessorMixin, PilBackend):
    __doc__ = XTImageProcessorMixin.__doc__
    valid_kwargs = XTImageProcessorKwargs

    def process_image(
        self,
        image: ImageInput,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        num_channels: int | None = None,
        **kwargs,
    ) -> np.ndarray:
        """One PIL image, array or tensor -> a `(channels, height, width)` array of the input's dtype."""
        return channels_first_array(image, do_convert_rgb, input_data_format, num_channels or self.num_channels)

    def resize(
        self,
        image: np.ndarray,
        size: SizeDict,
        resample: PILImageResampling | int | None = None,
        **kwargs,
    ) -> np.ndarray:
        """Resize `(channels, height, width)` to `(channels, size.height, size.width)`, float32.

        Each channel goes through PIL as a 32-bit float image, so any channel count (multispectral) and any
        input type can be resized, and nothing is rounded to 8 bits on the way.
        """
        resample = PILImageResampling.BILINEAR if resample is None else resample
        return resize_channels_with_pil(image, size.height, size.width, resample)


__all__ = ["XTImageProcessorKwargs", "XTImageProcessorPil"]
