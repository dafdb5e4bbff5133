"""transformers' generic model tests (`ModelTesterMixin`) on `XTForObjectDetection`, for each context encoder.

The detector's `logits` and `pred_boxes` are its detections: peaks of the dense maps, thresholded, kept by top-k and
class-wise NMS, computed on detached maps, with `-inf` logits (and zero boxes) in the empty slots. Two mixin tests
assume a differentiable, finite first output; their versions here check the same property on the dense maps
(`heatmap`, `box_sizes`, `box_offsets`) that the detections are read from.
"""

import unittest

import torch
from transformers.testing_utils import set_config_for_less_flaky_test, set_model_for_less_flaky_test

from xt_hf import XTForObjectDetection

from .xt_testers import XTModelTestBase, context_encoder_covered_by_xt_model

DENSE_OUTPUTS = ("heatmap", "box_sizes", "box_offsets")


@context_encoder_covered_by_xt_model
class XTForObjectDetectionWithAttentionTest(XTModelTestBase, unittest.TestCase):
    all_model_classes = (XTForObjectDetection,)
    context_encoder = "attention"

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        """The mixin's inputs, with detection labels (one box per image) when it asks for labels: the mixin only
        knows the label layouts of classification and dense heads."""
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels:
            device = inputs_dict["pixel_values"].device
            inputs_dict["labels"] = [
                {"class_labels": torch.tensor([image % self.model_tester.num_labels], device=device),
                 "boxes": torch.tensor([[0.3, 0.6, 0.2, 0.25]], device=device)}
                for image in range(self.model_tester.batch_size)
            ]
        return inputs_dict

    def test_batching_equivalence(self, atol=1e-5, rtol=1e-5):
        """The mixin's check that an image gives the same outputs alone and in a batch, on the dense maps and the
        hidden states. The detections are a top-k and NMS selection, which the mixin leaves out for the same reason
        it leaves out argmax outputs (a tiny difference can change the selection), with `-inf` in empty slots."""
        torch.manual_seed(42)
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        set_config_for_less_flaky_test(config)
        config.output_hidden_states = True
        model = XTForObjectDetection(config).eval()
        set_model_for_less_flaky_test(model)
        with torch.no_grad():
            batched = model(**inputs)
            single = model(pixel_values=inputs["pixel_values"][:1])
        for name in DENSE_OUTPUTS:
            self.assertTrue(torch.isfinite(batched[name]).all(), name)
            torch.testing.assert_close(batched[name][:1], single[name], atol=atol, rtol=rtol, msg=name)
        for batched_state, single_state in zip(batched.hidden_states, single.hidden_states, strict=True):
            torch.testing.assert_close(batched_state[:1], single_state, atol=atol, rtol=rtol)

    def test_retain_grad_hidden_states_attentions(self):
        """The mixin's check that the hidden states and attentions get gradients from the output, from the `heatmap`:
        the detections (`logits`, the first output) are picked from detached maps and carry no gradient."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        config.output_hidden_states = True
        config.output_attentions = self.has_attentions
        model = XTForObjectDetection._from_config(config, attn_implementation="eager")
        outputs = model(**inputs)
        hidden_states = outputs.hidden_states[0]
        hidden_states.retain_grad()
        if self.has_attentions:
            attentions = outputs.attentions[0]
            attentions.retain_grad()
        outputs.heatmap.flatten()[0].backward()
        self.assertIsNotNone(hidden_states.grad)
        if self.has_attentions:
            self.assertIsNotNone(attentions.grad)


class XTForObjectDetectionWithMambaTest(XTForObjectDetectionWithAttentionTest):
    context_encoder = "mamba"


class XTForObjectDetectionWithoutContextEncoderTest(XTForObjectDetectionWithAttentionTest):
    context_encoder = "none"
