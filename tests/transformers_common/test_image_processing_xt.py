"""transformers' generic image processor tests (`ImageProcessingTestMixin`, `PostProcessSemanticSegmentationTestMixin`)
on both backends of xT's image processor, `XTImageProcessor` (torchvision) and `XTImageProcessorPil`.

The mixin's expected output shape is the resize `size`; xT pads every image to whole regions, so the tester resizes to
a `size` that is a whole number of regions (32 × 32 with 16-px regions), where padding adds nothing.
"""

import unittest

from xt_hf import XTImageProcessor, XTImageProcessorPil

from . import released_tests

image_processing_common = released_tests.mixins("test_image_processing_common")


class XTImageProcessingTester(image_processing_common.ImageProcessingTester):
    def __init__(self, parent, **kwargs):
        kwargs.setdefault("region_size", 16)
        kwargs.setdefault("do_resize", True)
        kwargs.setdefault("size", {"height": 32, "width": 32})
        kwargs.setdefault("num_labels", 5)
        super().__init__(parent, **kwargs)

    def _get_image_processing_classes(self):
        # The mixin finds the classes from the test folder's name, a transformers model folder; xT's are registered.
        return {"torchvision": XTImageProcessor, "pil": XTImageProcessorPil}


class XTImageProcessingTest(
    image_processing_common.ImageProcessingTestMixin,
    image_processing_common.PostProcessSemanticSegmentationTestMixin,
    unittest.TestCase,
):
    image_processor_tester_class = XTImageProcessingTester
