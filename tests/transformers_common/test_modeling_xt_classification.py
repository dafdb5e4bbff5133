"""transformers' generic model tests (`ModelTesterMixin`) on `XTForImageClassification`, for each context encoder
(the "context" classifier with one, the "pool" classifier without)."""

import unittest

from xt_hf import XTForImageClassification

from .xt_testers import XTModelTestBase, context_encoder_covered_by_xt_model


@context_encoder_covered_by_xt_model
class XTForImageClassificationWithAttentionTest(XTModelTestBase, unittest.TestCase):
    all_model_classes = (XTForImageClassification,)
    context_encoder = "attention"


class XTForImageClassificationWithMambaTest(XTForImageClassificationWithAttentionTest):
    context_encoder = "mamba"


class XTForImageClassificationWithoutContextEncoderTest(XTForImageClassificationWithAttentionTest):
    context_encoder = "none"
