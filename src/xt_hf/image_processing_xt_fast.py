"""Deprecated module: `XTImageProcessorFast` is now `XTImageProcessor` of `image_processing_xt.py`.

transformers 5 names the torchvision backend `<Model>ImageProcessor` and the PIL one `<Model>ImageProcessorPil`; the
earlier `XTImageProcessorFast` (torchvision) is that `XTImageProcessor`, and the earlier PIL `XTImageProcessor` is
`image_processing_pil_xt.XTImageProcessorPil`. This module keeps the old name importable, with a `FutureWarning`,
for one release. Processor files saved under the old names load unchanged with `AutoImageProcessor` or either class.
"""

import warnings

_RENAMED = {"XTImageProcessorFast": "XTImageProcessor"}


def __getattr__(name: str):
    if name in _RENAMED:
        warnings.warn(
            f"xt_hf.image_processing_xt_fast.{name} is deprecated and will be removed in the next release: use "
            f"xt_hf.{_RENAMED[name]} (the torchvision backend, from xt_hf.image_processing_xt), which is the same "
            f"class.",
            FutureWarning,
            stacklevel=2,
        )
        from . import image_processing_xt

        return getattr(image_processing_xt, _RENAMED[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_RENAMED)
