"""XTConfig validation: label count, choice fields from their `Literal` annotations, the decoder stride rule, and
warnings for misspelt keys."""

from __future__ import annotations

import json
import typing
import warnings

import pytest
from conftest import REGION, tiny_config
from transformers import AutoConfig

from xt_hf import XTConfig, XTForImageClassification


@pytest.mark.parametrize("num_labels", [0, -3])
def test_num_labels_below_one_is_rejected(num_labels):
    with pytest.raises(ValueError, match=rf"`num_labels` must be ≥ 1, got {num_labels}"):
        tiny_config(num_labels=num_labels)
    assert tiny_config(num_labels=1).num_labels == 1  # one output: regression


def test_empty_id2label_is_rejected_naming_num_labels():
    with pytest.raises(ValueError, match=r"`num_labels` must be ≥ 1.*`id2label` has 0 entries"):
        XTConfig(id2label={})


def test_misspelt_key_in_config_json_warns_with_the_field_it_meant(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["region_szie"] = saved.pop("region_size")
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match=r"unknown key `region_szie`: did you mean `region_size`\?"):
        config = AutoConfig.from_pretrained(tmp_path)
    assert config.region_size == 256  # the default: the misspelt value reached nothing
    with pytest.warns(UserWarning, match=r"`num_lables`: did you mean `num_labels`\?") as caught:
        XTConfig(num_lables=4)
    assert caught[0].filename == __file__  # the warning points at the line that built the config


@pytest.mark.parametrize(("overrides", "message"), [
    ({"region_size": 0}, r"`region_size` must be ≥ 1, got 0"),
    ({"region_size": "256"}, r"`region_size` must be of type int, got '256'"),
    ({"grad_ratio": 0.0}, r"`grad_ratio` must be in \(0, 1\], got 0.0"),
    ({"hyper_lsh_num_projs": 17}, r"`hyper_lsh_num_projs` must be in \[0, 16\], got 17"),
    ({"detection_threshold": 1.0}, r"`detection_threshold` must be in \[0, 1\), got 1.0"),
    ({"region_batch_size": 0}, r"`region_batch_size` must be ≥ 1, got 0"),
    ({"in_context_patches": 1}, r"`in_context_patches` must be -1 \(off\) or ≥ 2"),
    ({"detection_region_class_prior": 1}, r"`detection_region_class_prior` must be of type bool, got 1"),
    ({"context_num_heads": 5}, r"`context_num_heads` \(5\) must divide `context_hidden_size` \(32\)"),
    ({"context_encoder": "none"}, r'`classifier="context"` reads a CLS token that only a context encoder can fill'),
])
def test_a_bad_value_raises_a_value_error_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_assignment_and_validate_check_the_same_rules():
    config = tiny_config()
    with pytest.raises(ValueError, match=r"`region_size` must be ≥ 1, got -1"):
        config.region_size = -1
    assert config.region_size == REGION  # the bad value was not set
    config.decoder_output_stride = 3  # a rule between fields is checked by validate(), as save_pretrained does
    with pytest.raises(ValueError, match=r"`decoder_output_stride` must be ≥ 1 and divide `region_size`"):
        config.validate()


def test_keys_transformers_writes_and_unrelated_extra_keys_do_not_warn(tmp_path):
    model = XTForImageClassification(tiny_config(id2label={0: "a", 1: "b", 2: "c"}))
    model.save_pretrained(tmp_path)  # config.json with auto_map, architectures, dtype, transformers_version, ...
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {"auto_map", "model_type", "transformers_version", "architectures"} <= set(saved)
    saved.update(torch_dtype="float32", use_cache=False, training_notes="run 7")  # an older file, a user's note
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = AutoConfig.from_pretrained(tmp_path)
        XTConfig.from_dict(config.to_dict())
    assert not [w for w in caught if "unknown key" in str(w.message)], [str(w.message) for w in caught]
    assert config.training_notes == "run 7"


CHOICE_FIELDS = {
    name: typing.get_args(annotation)
    for name, annotation in XTConfig.__annotations__.items()
    if typing.get_origin(annotation) is typing.Literal
}


def test_choice_fields_are_exactly_their_literal_annotations():
    assert set(CHOICE_FIELDS) == {
        "context_encoder", "context_long_sequence_attention", "context_position_embedding", "cls_token_position",
        "classifier", "region_encoder_attention",
    }
    for name, values in CHOICE_FIELDS.items():
        assert XTConfig.allowed_values(name) == values, name


@pytest.mark.parametrize("name", sorted(CHOICE_FIELDS))
def test_each_allowed_value_is_accepted_and_any_other_rejected(name):
    for value in CHOICE_FIELDS[name]:
        overrides = {name: value}
        if name == "context_encoder" and value == "none":
            overrides["classifier"] = "pool"  # the CLS classifier needs a context encoder
        if name == "context_encoder" and value == "mamba":
            pytest.importorskip("torch")  # the config alone needs no Mamba kernel
        assert getattr(tiny_config(**overrides), name) == value
    with pytest.raises(ValueError, match=rf"`{name}` must be one of .*got 'sideways'"):
        tiny_config(**{name: "sideways"})


def test_decoder_output_stride_must_divide_region_size():
    for stride in (1, 2, 4, 8, REGION):
        assert tiny_config(decoder_output_stride=stride).decoder_output_stride == stride
    rule = r"`decoder_output_stride` must be ≥ 1 and divide `region_size` \(32\)"
    for stride in (3, 0, -2, 2 * REGION):
        with pytest.raises(ValueError, match=rf"{rule}, got {stride}"):
            tiny_config(decoder_output_stride=stride)
    # The docstring states the same rule the check enforces.
    assert "Must be ≥ 1 and divide `region_size`" in " ".join(XTConfig.__doc__.split())
