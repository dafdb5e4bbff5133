"""xT ("Nested Tokenization for Larger Context in Large Images") as transformers models.

Importing the package registers XTConfig, the models and both image processor backends (`XTImageProcessor`,
torchvision, the default; `XTImageProcessorPil`) with the transformers Auto classes, and marks them so that
`save_pretrained` writes the code and `auto_map` that let `trust_remote_code=True` load a saved model where this
package is not installed.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForObjectDetection,
    AutoModelForSemanticSegmentation,
)
from transformers.models.auto import modeling_auto

from .configuration_xt import XTConfig
from .image_processing_pil_xt import XTImageProcessorPil
from .image_processing_xt import XTImageProcessor
from .modeling_xt import (
    XTForImageClassification,
    XTForObjectDetection,
    XTForSemanticSegmentation,
    XTModel,
    XTModelOutput,
    XTPreTrainedModel,
)

AutoConfig.register(XTConfig.model_type, XTConfig, exist_ok=True)
AutoModel.register(XTConfig, XTModel, exist_ok=True)
AutoModelForImageClassification.register(XTConfig, XTForImageClassification, exist_ok=True)
AutoModelForSemanticSegmentation.register(XTConfig, XTForSemanticSegmentation, exist_ok=True)
AutoModelForObjectDetection.register(XTConfig, XTForObjectDetection, exist_ok=True)
# The pipelines check a model against the static `model_type -> class name` tables of the Auto classes, which
# `register` leaves alone: without these entries, pipeline("object-detection", ...) logs "XTForObjectDetection is not
# supported for object-detection" and then runs it. (The Auto classes never read an entry whose model_type has no
# built-in config, so they still load the classes registered above.)
for _table, _model_class in (
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", XTForImageClassification),
    ("MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES", XTForSemanticSegmentation),
    ("MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES", XTForObjectDetection),
):
    getattr(modeling_auto, _table, {}).setdefault(XTConfig.model_type, _model_class.__name__)
# Both backends, so that AutoImageProcessor's default (torchvision) needs no fallback. A processor saved by either one
# lists both modules in its auto_map (one class per backend) for remote code.
AutoImageProcessor.register(
    XTConfig, image_processor_classes={"torchvision": XTImageProcessor, "pil": XTImageProcessorPil}, exist_ok=True
)

XTConfig.register_for_auto_class()
XTModel.register_for_auto_class("AutoModel")
XTForImageClassification.register_for_auto_class("AutoModelForImageClassification")
XTForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
XTForObjectDetection.register_for_auto_class("AutoModelForObjectDetection")
XTImageProcessor.register_for_auto_class("AutoImageProcessor")
XTImageProcessorPil.register_for_auto_class("AutoImageProcessor")


def __getattr__(name: str):
    """`XTImageProcessorFast`, the old name of `XTImageProcessor`, for one more release (with a FutureWarning)."""
    if name == "XTImageProcessorFast":
        from . import image_processing_xt_fast

        return image_processing_xt_fast.XTImageProcessorFast
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "XTConfig",
    "XTForImageClassification",
    "XTForObjectDetection",
    "XTForSemanticSegmentation",
    "XTImageProcessor",
    "XTImageProcessorPil",
    "XTModel",
    "XTModelOutput",
    "XTPreTrainedModel",
]
