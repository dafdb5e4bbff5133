"""Turn an original xT `model_config` (YAML file or JSON) into an `XTConfig`, quirks included."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import HieraConfig, Swinv2Config

from .checkpoint_io import describe_file, file_kind
from xt_hf import XTConfig

# Architecture of each original `backbone_class` builder (timm / hiera-transformer defaults).
SWINV2_BACKBONES = {
    "swinv2_tiny_window16_256_timm": dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24]),
    "swinv2_small_window16_256_timm": dict(embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24]),
    "swinv2_base_window16_256_timm": dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]),
    # Fine-tuned from 192 px with window 12: its relative-position table keeps the pre-training scale.
    "swinv2_large_window16_256_timm": dict(
        embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], pretrained_window_sizes=[12, 12, 12, 6]
    ),
}
HIERA_BACKBONES = {
    "hiera_base": dict(embed_dim=96, num_heads=1, depths=[2, 3, 16, 3]),
    "hiera_base_plus": dict(embed_dim=112, num_heads=2, depths=[2, 3, 16, 3]),
}
# The original Swin builders drop `input_size` (timm swallows it in **kwargs): the region is always 256.
SWINV2_REGION_SIZE = 256


class ConfigError(ValueError):
    """An original config that cannot be read, with the reason in words."""


def read_model_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(model_config, backbone_overrides)` from an original YAML config or a JSON with `model_config`.

    Backbone overrides are the shrink arguments of the test fixtures' `variant.json`
    (`backbone.shrink_kwargs`); released configs have none. Raises `ConfigError` naming the problem.
    """
    path = Path(path)
    expected = "expected an original xT YAML config (.yaml) or a JSON holding its `model_config`"
    if not path.is_file():
        raise ConfigError(f"Config {path} does not exist or is not a file.")
    if file_kind(path) not in ("JSON", "text"):
        raise ConfigError(f"{path} is {describe_file(path)}, not a config: {expected}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text: {expected}.") from None
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            document = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"{path} is not valid YAML{where}: {expected}.") from None
        if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
            raise ConfigError(f"{path} has no `model` section: {expected}.")
        return document["model"], {}
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path} is not valid JSON (line {error.lineno}): {expected}.") from None
    model_config = document.get("model_config", document.get("model")) if isinstance(document, dict) else None
    if not isinstance(model_config, dict):
        raise ConfigError(f"{path} has neither `model_config` nor `model`: {expected}.")
    shrink = document.get("backbone", {})
    return model_config, shrink.get("shrink_kwargs", {}) if isinstance(shrink, dict) else {}


REQUIRED_KEYS = ("backbone_class", "num_classes")


def check_model_config(model_config: dict[str, Any], source: str | Path = "the model config") -> None:
    """Raise `ConfigError` when `model_config` lacks a key the conversion needs."""
    missing = [key for key in REQUIRED_KEYS if key not in model_config]
    if missing:
        raise ConfigError(f"{source} lacks {', '.join(missing)}: not a complete original xT model config.")


def backbone_config_from_original(backbone_class: str, overrides: dict[str, Any], drop_path_rate: float):
    """Region size and transformers backbone config for an original `backbone_class`."""
    if backbone_class in SWINV2_BACKBONES:
        arguments = {**SWINV2_BACKBONES[backbone_class], "window_size": 16}
        arguments.update({k: overrides[k] for k in ("embed_dim", "depths", "num_heads", "window_size",
                                                     "pretrained_window_sizes") if k in overrides})
        region_size = overrides.get("img_size", SWINV2_REGION_SIZE)
        stages = len(arguments["depths"])
        return region_size, Swinv2Config(
            image_size=region_size,
            patch_size=4,
            drop_path_rate=drop_path_rate,
            out_features=[f"stage{stages}"],
            **arguments,
        )
    if backbone_class in HIERA_BACKBONES:
        arguments = dict(HIERA_BACKBONES[backbone_class])
        arguments.update({k: overrides[k] for k in ("embed_dim", "num_heads") if k in overrides})
        if "stages" in overrides:
            arguments["depths"] = list(overrides["stages"])
        region_size = overrides.get("input_size", [None])[0]
        heads = arguments.pop("num_heads")
        depths = arguments["depths"]
        return region_size, HieraConfig(
            image_size=[region_size, region_size] if region_size else [224, 224],
            num_heads=[heads * 2**i for i in range(len(depths))],
            drop_path_rate=drop_path_rate,
            out_features=[f"stage{len(depths)}"],
            **arguments,
        )
    known = sorted(SWINV2_BACKBONES) + sorted(HIERA_BACKBONES)
    raise ConfigError(f"Unknown original backbone_class {backbone_class!r}; known: {known}.")


def xt_config_from_original(
    model_config: dict[str, Any], backbone_overrides: dict[str, Any] | None = None, **extra: Any
) -> XTConfig:
    """Build the `XTConfig` that computes what the original model of `model_config` computes."""
    check_model_config(model_config)
    backbone = model_config.get("backbone", {})
    region_size, backbone_config = backbone_config_from_original(
        model_config["backbone_class"], backbone_overrides or {}, backbone.get("drop_path_rate", 0.0)
    )
    if region_size is None:  # Hiera honours input_size
        region_size = backbone["input_size"]
        backbone_config.image_size = [region_size, region_size]
    mlp_ratio = model_config.get("mlp_ratio", 4)
    arguments: dict[str, Any] = dict(
        region_size=region_size,
        backbone_config=backbone_config,
        region_encoder_output_norm=False,
        num_labels=model_config["num_classes"],
        classifier_mlp_ratio=mlp_ratio,
        context_mlp_ratio=mlp_ratio,
    )
    if model_config.get("cls_head", "naive") == "naive":
        arguments.update(classifier="pool", context_encoder="none")
    else:
        context = model_config.get("context", {})
        hidden = context.get("hidden_size", 768)
        method = context.get("attention_method", "hyper")
        arguments.update(
            classifier="context",
            context_hidden_size=hidden,
            context_num_layers=context.get("n_layer", 12),
            in_context_patches=context.get("in_context_patches", -1),
            cls_token_position="last",
        )
        if method == "hyper":
            # LLMLayer ignores the configured heads: hidden // 128 (the original crashes below 128).
            arguments.update(context_encoder="attention", context_num_heads=max(1, hidden // 128),
                             context_attention_causal=True, context_attention_scale=None, context_qkv_bias=True,
                             context_rms_norm_eps=1e-5, context_long_sequence_attention="hyper",
                             hyper_min_seq_len=4096, hyper_lsh_num_projs=7, hyper_block_size=256,
                             hyper_sample_size=256)
        elif method == "naive":
            # ViTAttention(dim, dim, heads) shifts its positional arguments: heads = dim, qkv_bias = dim // 128,
            # scale = 1.0, and the causal flag is swallowed.
            arguments.update(context_encoder="attention", context_num_heads=hidden, context_attention_causal=False,
                             context_attention_scale=1.0, context_qkv_bias=bool(hidden // 128),
                             context_rms_norm_eps=1e-5, context_long_sequence_attention="exact")
        elif method == "mamba":
            arguments.update(context_encoder="mamba", mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
                             mamba_reverse_even_layers=True, mamba_residual_from_normed=True,
                             context_layer_norm_eps=1e-5)
        else:
            raise ConfigError(f"Unknown original context.attention_method {method!r}; known: hyper, naive, mamba.")
    arguments.update(extra)
    return XTConfig(**arguments)
