"""transformers' generic config tests (`ConfigTester`) on `XTConfig`, with each context encoder.

The tester checks that every keyword it was given comes back unchanged from `to_json_string`, so it gets scalar
fields only: a `backbone_config` given as a dict comes back completed with the backbone's defaults (transformers'
sub-config behaviour), and the default Swin-v2 backbone is only configured here, never built.
"""

import unittest

from parameterized import parameterized

from xt_hf import XTConfig

from . import released_tests

configuration_common = released_tests.mixins("test_configuration_common")

VARIANTS = [
    ("attention", {"context_encoder": "attention", "context_num_heads": 2, "context_attention_causal": False}),
    ("mamba", {"context_encoder": "mamba", "mamba_d_state": 8}),
    ("none", {"context_encoder": "none", "classifier": "pool", "decoder_output_stride": 4}),
]


class XTConfigTest(unittest.TestCase):
    @parameterized.expand(VARIANTS)
    def test_config(self, _, arguments):
        # xT is a vision model (no vocab_size); its common properties are its own names for width, heads and depth.
        tester = configuration_common.ConfigTester(
            self,
            config_class=XTConfig,
            has_text_modality=False,
            common_properties=["context_hidden_size", "context_num_heads", "context_num_layers", "region_size"],
            **{"region_size": 64, "context_hidden_size": 32, "context_num_layers": 1, **arguments},
        )
        tester.run_common_tests()
