"""The tiny-model tester that feeds transformers' `ModelTesterMixin`, and the skips every xT head shares.

Each head's test module subclasses `XTModelTestBase` once per context encoder ("none", "attention", "mamba"); the
mixin's generic tests then run on `all_model_classes` with the inputs of `XTModelTester`.
"""

from __future__ import annotations

import sys
import unittest
from pathlib import Path

import pytest
import torch

from . import released_tests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# tests/conftest.py: the tiny configs of every test.
from conftest import REGION, tiny_config

modeling_common = released_tests.mixins("test_modeling_common")

# The region grid of the test images: one row of two regions of REGION px, so the context encoder sees a sequence of
# several regions, in an image that is not square.
ROWS, COLS = 1, 2
# The tiny Swin-v2 region encoder (patch 4, two stages) gives each region a 4 × 4 grid of deepest-stage tokens.
TOKENS_PER_REGION_SIDE = REGION // 8
STAGE_CHANNELS = (8, 16)


class XTModelTester:
    """Tiny xT configs and random `(batch, 3, ROWS·REGION, COLS·REGION)` images, in the shape the mixin expects."""

    def __init__(self, parent, *, context_encoder: str = "attention", batch_size: int = 2, num_labels: int = 3,
                 is_training: bool = True):
        self.parent = parent
        self.context_encoder = context_encoder
        self.classifier = "pool" if context_encoder == "none" else "context"
        self.batch_size = batch_size
        self.num_labels = num_labels
        self.is_training = is_training
        self.num_channels = 3
        self.height, self.width = ROWS * REGION, COLS * REGION
        # What the mixin checks hidden states and attentions against: the context encoder's blocks, width and
        # sequence (the stitched deepest-stage tokens, plus the CLS token of the "context" classifier).
        self.num_hidden_layers = 2 if context_encoder != "none" else 0
        self.num_attention_heads = 2
        self.hidden_size = 32 if context_encoder != "none" else STAGE_CHANNELS[-1]
        tokens = ROWS * COLS * TOKENS_PER_REGION_SIDE**2
        self.seq_length = tokens + (self.classifier == "context")

    def get_config(self):
        return tiny_config(
            context_encoder=self.context_encoder,
            classifier=self.classifier,
            context_num_layers=max(self.num_hidden_layers, 1),
            context_num_heads=self.num_attention_heads,
            num_labels=self.num_labels,
            # The segmentation and detection decoders at their smallest: 8 channels, output at a quarter of the input.
            decoder_hidden_size=8,
            decoder_output_stride=4,
        )

    def prepare_config_and_inputs(self):
        pixel_values = modeling_common.floats_tensor([self.batch_size, self.num_channels, self.height, self.width])
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class XTModelTestBase(modeling_common.ModelTesterMixin):
    """`ModelTesterMixin` on xT, with the generic tests that encode a convention xT does not follow skipped, each
    with its reason (docs/transformers-tests.md lists them)."""

    context_encoder = "attention"
    all_model_classes = ()
    test_resize_embeddings = False  # xT's input is pixels: there is no token embedding matrix to resize
    test_torch_exportable = False

    # Whether the tested classes have a loss: the mixin's training tests need one.
    is_training = True

    def setUp(self):
        self.model_tester = XTModelTester(self, context_encoder=self.context_encoder, is_training=self.is_training)
        # Only attention blocks have attention weights; Mamba blocks and the encoder-less model have none.
        self.has_attentions = self.context_encoder == "attention"

    def test_model_get_set_embeddings(self):
        """xT is a pixel model: its input embedding is the region encoder's patch embedding, not a token matrix
        (the mixin's version asks for an `nn.Embedding`), and it has no output embedding."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            self.assertIsNone(model.get_output_embeddings())


def context_encoder_covered_by_xt_model(test_class):
    """Skip, in a head's tester, the mixin's eager-vs-SDPA matrix (24 dtype × padding × mask variants): it compares
    the context encoder's attention, which is `XTModel`'s, and runs once there, in `XTModelWithAttentionTest`."""
    reason = "eager vs SDPA compares the context encoder, XTModel's; run once in test_modeling_xt_model.py"
    for name in dir(test_class):
        if name.startswith("test_eager_matches_sdpa_inference"):
            setattr(test_class, name, unittest.skip(reason)(lambda self: None))
    return test_class


__all__ = ["XTModelTestBase", "XTModelTester",
           "context_encoder_covered_by_xt_model", "modeling_common"]
