"""transformers' generic model tests (`ModelTesterMixin`) on `XTModel`, for each context encoder."""

import unittest

from xt_hf import XTModel

from .xt_testers import XTModelTestBase


class XTModelWithAttentionTest(XTModelTestBase, unittest.TestCase):
    all_model_classes = (XTModel,)
    context_encoder = "attention"
    # The headless encoder has no loss; the heads' testers run the training tests. (transformers skips its own base
    # models there by their entry in MODEL_MAPPING_NAMES, a table that AutoModel.register leaves alone.)
    is_training = False


class XTModelWithMambaTest(XTModelWithAttentionTest):
    context_encoder = "mamba"


class XTModelWithoutContextEncoderTest(XTModelWithAttentionTest):
    context_encoder = "none"
