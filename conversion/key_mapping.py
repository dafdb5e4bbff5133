"""Declarative rules from the original xT state-dict keys to ours, and a loud check of the result.

Every original key (after stripping DataParallel's `module.`) must match exactly one rule; every key of
our model must be produced exactly once with the same shape. Anything else is reported by name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch

BACKBONE = "xt.region_encoder.backbone."
CONTEXT = "xt.context_encoder."

Target = str | Callable[[re.Match, "MappingContext"], str]


@dataclass(frozen=True)
class KeyRule:
    """`pattern` (full match on the original key) → `target` (a `re` template or a function of the match).

    `split` names the pieces an original fused tensor is cut into along dim 0 (Swin's qkv), each
    substituted for `{part}` in the target.
    """

    pattern: str
    target: Target
    split: tuple[str, ...] = ()


@dataclass
class MappingContext:
    """What some rules need to know about the architecture (Hiera numbers blocks globally)."""

    hiera_depths: tuple[int, ...] = ()


def _hiera_layer(match: re.Match, context: MappingContext) -> str:
    """Our prefix of original Hiera block `match["block"]` (numbered across all stages)."""
    index = int(match["block"])
    for stage, depth in enumerate(context.hiera_depths):
        if index < depth:
            return f"{BACKBONE}encoder.stages.{stage}.layers.{index}."
        index -= depth
    raise KeyError(f"Hiera block {match['block']} is beyond the configured depths {context.hiera_depths}")


SWIN_BLOCK = r"encoder\.model\.layers_(?P<stage>\d+)\.blocks\.(?P<block>\d+)\."
SWIN_OURS = BACKBONE + r"encoder.layers.\g<stage>.blocks.\g<block>."

SWINV2_RULES = (
    KeyRule(r"encoder\.model\.patch_embed\.proj\.(?P<p>weight|bias)", BACKBONE + r"embeddings.patch_embeddings.projection.\g<p>"),
    KeyRule(r"encoder\.model\.patch_embed\.norm\.(?P<p>weight|bias)", BACKBONE + r"embeddings.norm.\g<p>"),
    # timm ≥ 0.9 merges patches at the start of stages 1-3; transformers at the end of stages 0-2.
    KeyRule(
        r"encoder\.model\.layers_(?P<stage>\d+)\.downsample\.(?P<rest>reduction\.weight|norm\.weight|norm\.bias)",
        lambda m, _: f"{BACKBONE}encoder.layers.{int(m['stage']) - 1}.downsample.{m['rest']}",
    ),
    KeyRule(SWIN_BLOCK + r"attn\.qkv\.weight", SWIN_OURS + r"attention.self.{part}.weight", split=("query", "key", "value")),
    KeyRule(SWIN_BLOCK + r"attn\.q_bias", SWIN_OURS + "attention.self.query.bias"),
    KeyRule(SWIN_BLOCK + r"attn\.v_bias", SWIN_OURS + "attention.self.value.bias"),
    KeyRule(SWIN_BLOCK + r"attn\.logit_scale", SWIN_OURS + "attention.self.logit_scale"),
    KeyRule(SWIN_BLOCK + r"attn\.cpb_mlp\.(?P<rest>.+)", SWIN_OURS + r"attention.self.continuous_position_bias_mlp.\g<rest>"),
    KeyRule(SWIN_BLOCK + r"attn\.proj\.(?P<p>weight|bias)", SWIN_OURS + r"attention.output.dense.\g<p>"),
    KeyRule(SWIN_BLOCK + r"norm1\.(?P<p>weight|bias)", SWIN_OURS + r"layernorm_before.\g<p>"),
    KeyRule(SWIN_BLOCK + r"norm2\.(?P<p>weight|bias)", SWIN_OURS + r"layernorm_after.\g<p>"),
    KeyRule(SWIN_BLOCK + r"mlp\.fc1\.(?P<p>weight|bias)", SWIN_OURS + r"intermediate.dense.\g<p>"),
    KeyRule(SWIN_BLOCK + r"mlp\.fc2\.(?P<p>weight|bias)", SWIN_OURS + r"output.dense.\g<p>"),
)

HIERA_BLOCK = r"encoder\.model\.blocks\.(?P<block>\d+)\."

HIERA_RULES = (
    KeyRule(r"encoder\.model\.pos_embed", BACKBONE + "embeddings.position_embeddings"),
    KeyRule(r"encoder\.model\.patch_embed\.proj\.(?P<p>weight|bias)", BACKBONE + r"embeddings.patch_embeddings.projection.\g<p>"),
    KeyRule(HIERA_BLOCK + r"norm1\.(?P<p>weight|bias)", lambda m, c: _hiera_layer(m, c) + f"layernorm_before.{m['p']}"),
    KeyRule(HIERA_BLOCK + r"norm2\.(?P<p>weight|bias)", lambda m, c: _hiera_layer(m, c) + f"layernorm_after.{m['p']}"),
    KeyRule(
        HIERA_BLOCK + r"(?P<rest>(?:attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|proj)\.(?:weight|bias))",
        lambda m, c: _hiera_layer(m, c) + m["rest"],
    ),
)

POOL_HEAD_RULES = (
    # ClassificationDecoder: Sequential(Linear, GELU, LayerNorm, Linear)
    KeyRule(r"decoder\.layers\.0\.(?P<p>weight|bias)", r"classifier.dense.\g<p>"),
    KeyRule(r"decoder\.layers\.2\.(?P<p>weight|bias)", r"classifier.layernorm.\g<p>"),
    KeyRule(r"decoder\.layers\.3\.(?P<p>weight|bias)", r"classifier.out_proj.\g<p>"),
)

CONTEXT_HEAD_RULES = (
    KeyRule(r"decoder\.cls_token", CONTEXT + "cls_token"),
    KeyRule(r"decoder\.input_proj\.(?P<p>weight|bias)", CONTEXT + r"input_proj.\g<p>"),
    # Attention ("hyper"/"naive") and Mamba layers keep the original inner names.
    KeyRule(r"decoder\.layers\.(?P<i>\d+)\.(?P<rest>.+)", CONTEXT + r"layers.\g<i>.\g<rest>"),
    KeyRule(r"decoder\.cls\.0\.(?P<p>weight|bias)", r"classifier.layernorm.\g<p>"),
    KeyRule(r"decoder\.cls\.1\.(?P<p>weight|bias)", r"classifier.out_proj.\g<p>"),
)


def rules_for(backbone_type: str, classifier: str) -> tuple[KeyRule, ...]:
    """The rule table for one architecture: region encoder rules, then head rules."""
    backbone_rules = {"swinv2": SWINV2_RULES, "hiera": HIERA_RULES}
    if backbone_type not in backbone_rules:
        raise ValueError(f"No key mapping for region encoder {backbone_type!r}; known: {sorted(backbone_rules)}.")
    head_rules = CONTEXT_HEAD_RULES if classifier == "context" else POOL_HEAD_RULES
    return backbone_rules[backbone_type] + head_rules


@dataclass
class MappingReport:
    """Keys that failed to line up, by name. Empty lists everywhere means a one-to-one match."""

    unmatched_original: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mis_shaped: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.unmatched_original or self.missing or self.unexpected or self.mis_shaped or self.duplicated)

    def describe(self) -> str:
        lines = []
        for title, keys in (
            ("original keys no rule maps", self.unmatched_original),
            ("model keys the checkpoint does not provide (missing)", self.missing),
            ("mapped keys the model does not have (unexpected)", self.unexpected),
            ("keys with a different shape", self.mis_shaped),
            ("model keys produced more than once", self.duplicated),
        ):
            if keys:
                lines.append(f"{len(keys)} {title}:")
                lines.extend(f"  {key}" for key in keys)
        return "\n".join(lines) if lines else "all keys map one to one with matching shapes"


def map_state_dict(
    original: dict[str, torch.Tensor], rules: tuple[KeyRule, ...], context: MappingContext
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Apply the first matching rule to every key. Returns (mapped, unmatched original keys, duplicated keys)."""
    mapped: dict[str, torch.Tensor] = {}
    unmatched, duplicated = [], []
    for key, tensor in original.items():
        rule, match = next(((r, m) for r in rules if (m := re.fullmatch(r.pattern, key))), (None, None))
        if rule is None:
            unmatched.append(key)
            continue
        if callable(rule.target):
            targets = [(rule.target(match, context), tensor)]
        else:
            template = match.expand(rule.target)
            if rule.split:
                pieces = tensor.chunk(len(rule.split), dim=0)
                targets = [(template.replace("{part}", part), piece) for part, piece in zip(rule.split, pieces)]
            else:
                targets = [(template, tensor)]
        for target, value in targets:
            if target in mapped:
                duplicated.append(target)
            mapped[target] = value
    return mapped, unmatched, duplicated


def check_against_model(
    mapped: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], report: MappingReport
) -> MappingReport:
    """Fill `report` with missing, unexpected and mis-shaped keys versus the model's own state dict."""
    report.missing = sorted(set(expected) - set(mapped))
    report.unexpected = sorted(set(mapped) - set(expected))
    report.mis_shaped = sorted(
        f"{key}: checkpoint {tuple(mapped[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in set(mapped) & set(expected)
        if mapped[key].shape != expected[key].shape
    )
    return report
