"""transformers' generic model tests (`ModelTesterMixin`) on `XTForSemanticSegmentation`, for each context
encoder."""

import unittest

from xt_hf import XTForSemanticSegmentation

from .xt_testers import XTModelTestBase, context_encoder_covered_by_xt_model


@context_encoder_covered_by_xt_model
class XTForSemanticSegmentationWithAttentionTest(XTModelTestBase, unittest.TestCase):
    all_model_classes = (XTForSemanticSegmentation,)
    context_encoder = "attention"


class XTForSemanticSegmentationWithMambaTest(XTForSemanticSegmentationWithAttentionTest):
    context_encoder = "mamba"


class XTForSemanticSegmentationWithoutContextEncoderTest(XTForSemanticSegmentationWithAttentionTest):
    context_encoder = "none"
