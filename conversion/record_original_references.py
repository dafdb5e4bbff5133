"""Record reference outputs of the ORIGINAL xT code (github bair-climate-initiative/xT) for the parity tests.

The converter (`convert_original_checkpoint.py`) and the re-implementation (`xt_hf`) are only worth something
if they reproduce what the original code computes. This script runs the original code itself and keeps its
outputs, so that the parity tests of a clone do not depend on anything outside the repository. For each
variant in `VARIANTS` it

1. builds the ORIGINAL model with the original `xt.models.build_model` (tiny: the backbone builders are
   shrunk through the shims below, never edited),
2. re-draws every parameter from a seeded Gaussian (random-init weights would leave LayerNorms at 1/0 and
   biases at 0, and a converter that drops or swaps such a key would still pass),
3. converts it to channels_last as the original trainer (`xt/trainer.py:_init_model`) does,
4. runs it in eval mode, float32, on CPU, on a seeded N(0, 1) batch of 2 images of 2x2 regions (rounded
   to float16 values, so that io.safetensors stores them exactly in half the bytes), checks that every
   parameter affects the output and that float32 rounding stays far inside the tolerance (`noise_floor`),
5. writes `<output>/<variant>/model.ckpt` in the original trainer's payload format
   (`{"epoch", "state_dict" with "module." keys, "optimizer_state_dict": {}, "metrics"}`),
   `variant.json` (the original `model_config`, the shrink arguments and what the original computed with
   them) and `io.safetensors` (`pixel_values`, `logits`, `region_features`),
6. reloads the written checkpoint into a freshly built original model and asserts identical outputs.

Then, for the key-mapping tests, it writes the full-size key layout of every original config (each
`config/**/*.yaml` of the original checkout but `base.yaml` and `paths.yaml`, plus the two combinations in
`SYNTHESIZED_LAYOUTS` that ../shared's manifests also synthesize) to `<output>/layouts/<config name>.json.gz`:
the config is merged by the original loader (`xt/config.py:_merge_configs`, i.e. base.yaml, paths.yaml, then
the file, over the `ModelConfig` schema), the model is built by the original `build_model` at full size on CPU
(the meta device fails inside Hiera and timm) with the same shims and `pretrained=False`, and the file holds
`model_config` (the resolved model section, as `xt_config_from_original` reads it), `num_parameters` and
`keys`: `[{"key", "shape"}]` of `nn.DataParallel(model).state_dict()` in order (the "module." keys the trainer
saves). No weights; gzip with mtime 0, so a re-run writes the same bytes.

Last it writes `<output>/MANIFEST.json` (original commit, command, library versions, seeds, sha256 and size of
every file). The original code is imported from `--original-repo`; it is never copied into this repository.

Scratch environment (outside this repository; Python 3.11, CPU only; the versions the references were made with):

    mkdir -p /work/scratch && cd /work/scratch
    git clone https://github.com/bair-climate-initiative/xT xT-git    # or: git clone MIRROR_GIT_DIR xT-git
    git -C xT-git checkout 4e79e41901298c758d2d8e551b6c8b5ea4bb4071   # "Refactor for readability"
    python3.11 -m venv orig-venv
    orig-venv/bin/pip install torch==2.14.1            # CPU is enough; it pulls triton 3.8.0 as a dependency
    orig-venv/bin/pip install timm==0.9.7 hiera-transformer==0.1.4 einops omegaconf numpy safetensors \\
        transformers==4.39.3                           # transformers only so that mamba_ssm 1.x imports
    MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \\
        orig-venv/bin/pip install --no-build-isolation --no-deps mamba-ssm==1.2.0.post1
    #   FORCE_BUILD=TRUE: otherwise its setup.py tries to download a prebuilt CUDA wheel from GitHub.
    #   SKIP_CUDA_BUILD=TRUE: no CUDA extension; this script supplies the pure-PyTorch scan (see shims).

Re-run from the repository root (the original checkout must not be inside the repository):

    /work/scratch/orig-venv/bin/python conversion/record_original_references.py \\
        --original-repo /work/scratch/xT-git --output tests/data/original_xt
    # a copy without .git (e.g. `git archive`): add --original-commit 4e79e41901298c758d2d8e551b6c8b5ea4bb4071

It takes about a minute on one CPU thread (a few seconds for the variants, the rest for building the 24
full-size models of the layouts; about 1 GB of memory for the largest). The outputs are deterministic: a second run on the same machine
writes byte-identical files. Another CPU or library build may change the last bits of the float32 outputs (they
are checked with atol 1e-5 / 1e-4).

Shims (all here, applied before the original code is imported; the original files are run unmodified):

- timm: `timm.create_model` is wrapped while a variant is built: `pretrained=False` (no download) and the
  variant's shrink kwargs (`img_size`, `window_size`, `embed_dim`, `depths`, `num_heads`[,
  `pretrained_window_sizes`]) are added to the original builder's call (a layout: `pretrained=False` only).
- hiera: the original calls `hiera.hiera_base(...)`, which no hiera-transformer release defines
  (`AttributeError`). It is aliased to a builder that makes what `hiera_base_224` makes, shrunk
  (`hiera.Hiera(embed_dim, num_heads, stages, input_size)`), without pretrained weights. `HieraWrapper`'s
  hard-coded `hidden_size=768` is replaced by the shrunk model's real final width (the decoder is sized
  from it).
- hiera_base_plus (the layouts only) is aliased the same way, with `hiera_base_plus_224`'s arguments. At full
  size `HieraWrapper` keeps the original's hard-coded width (checked equal to the model's final width).
- mamba_ssm 1.x hard-imports its CUDA extension `selective_scan_cuda`: an empty placeholder module is
  registered, and `Mamba`'s `selective_scan_fn` is pointed at mamba_ssm's own pure-PyTorch
  `selective_scan_ref`. causal_conv1d is not installed, so `Mamba.forward` takes its `nn.Conv1d` path.
- The layouts' config loader: the original `_merge_configs` is compiled from `xt/config.py` and run as is
  (importing `xt.config` would need the data pipeline's cv2/albumentations/pycocotools); its `OmegaConf.load`
  drops a line that repeats an earlier line of the same YAML mapping verbatim (upstream
  `swin_v2_large_1e-5_mamba_512_256.yaml` has `lr: 1e-5` twice, which OmegaConf refuses), recorded in the
  layout's `config_load_issues`.
- HyperAttention needs none: in float32 with causal attention and at most 4096 tokens the original calls
  `utils.exact_attention`, plain PyTorch. Its Triton `flash_attn_func` (fp16/bf16 only) is replaced by a
  function that raises, to prove it is never reached.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import gzip
import hashlib
import importlib.metadata
import io
import json
import math
import os
import platform
import subprocess
import sys
import types
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ORIGINAL_URL = "https://github.com/bair-climate-initiative/xT"
REGIONS_PER_SIDE = 2  # 2x2 regions: the nested tokenization, its inverse and the stitched grid are exercised
BATCH = 2  # two images: catches an image/region order mix-up in "(N HP WP)"
NUM_CLASSES = 10
# The input is drawn N(0, 1) in float32, rounded to float16, and the original runs on those values in float32.
# Stored as float16 they are exact at half the size (pixel_values are half of the budget); the converter's
# --verify and the tests read them with `.float()`. Set float32 here to store them as float32 (+0.8 MB).
PIXEL_STORAGE_DTYPE = torch.float16
LOGITS_ATOL, FEATURES_ATOL = 1e-5, 1e-4  # float32 noise floor, measured per variant in variant.json
# What `trainer._get_current_payload` saves besides the weights: a plausible, fixed epoch and metrics.
PAYLOAD_EPOCH = 3
PAYLOAD_METRICS = {"accuracy_top1": 0.125, "accuracy_top5": 0.5, "precision": 0.0625, "recall": 0.25}
PERTURBED_RUNS = 3
CONDITIONING_LIMIT = 0.5  # perturbed float32 vs float64, as a fraction of the tolerance
LIBRARIES = ("torch", "timm", "hiera-transformer", "mamba_ssm", "triton", "einops", "numpy", "omegaconf",
             "safetensors", "transformers")

# Tiny Swin: 64-px regions and window 4 give grids 16/8/4/2, i.e. the pattern of the released 256-px,
# window-16 models (64/32/16/8): stages 0-1 shifted with an attention mask, stage 2 one unshifted window,
# stage 3 a window clamped to the grid. Stage 3 keeps 2x2 tokens, so every attention weight still matters.
SWIN_SHRINK = {"img_size": 64, "window_size": 4, "embed_dim": 4, "depths": [2, 2, 2, 1], "num_heads": [1, 2, 2, 4]}
# Swin-L style: its relative-position table keeps a pre-training window. (12,12,12,6) at window 16 is scaled
# down, keeping stage 3 different from the others and every divisor different from the window's own.
SWIN_LARGE_SHRINK = dict(SWIN_SHRINK, pretrained_window_sizes=[6, 6, 6, 3])
# Tiny Hiera: 64-px regions give 16x16 tokens, i.e. 4 mask units of 8x8 (the windowed attention and the
# unroll/reroll orders matter), pooled three times to 2x2.
HIERA_SHRINK = {"input_size": [64, 64], "embed_dim": 4, "num_heads": 1, "stages": [2, 2, 2, 1]}
HIERA_BASE_DEFAULTS = {"embed_dim": 96, "num_heads": 1, "stages": (2, 3, 16, 3)}  # hiera_base_224
# The hiera builders the original calls, none of which hiera-transformer defines, with the arguments of the
# `<name>_224` builders it does define (hiera/hiera.py). hiera_base serves the tiny variants and the layouts,
# hiera_base_plus the layouts.
HIERA_BUILDER_DEFAULTS = {
    "hiera_base": HIERA_BASE_DEFAULTS,
    "hiera_base_plus": {"embed_dim": 112, "num_heads": 2, "stages": (2, 3, 16, 3)},  # hiera_base_plus_224
}
REDRAW_RULES = ("one standard-normal draw N per parameter, in named_parameters order: Linear/conv weights "
                "N/sqrt(fan_in), biases 0.1 N; LayerNorm/RMSNorm weights 1 + 0.1 N, biases 0.1 N; Swin logit_scale "
                "log(10) + 0.2 N, q_bias/v_bias 0.1 N; cls_token 0.5 N; Hiera pos_embed 0.1 N; Mamba A_log and "
                "dt_proj.bias keep their init plus 0.1 N, D 1 + 0.1 N")
SWIN_TIMM_NAMES = {
    "swinv2_tiny_window16_256_timm": "swinv2_tiny_window16_256.ms_in1k",
    "swinv2_large_window16_256_timm": "swinv2_large_window12to16_192to256.ms_in22k_ft_in1k",
}


@dataclass(frozen=True)
class Variant:
    """One tiny original model: the original `model_config` fields that differ from the schema's defaults."""

    name: str
    seed: int
    backbone_class: str
    shrink: dict
    cls_head: str  # "naive" (ClassificationDecoder) or "xl" (LLMClassificationDecoder)
    covers: str  # which original code paths and quirks this variant pins down, in words
    context: dict = field(default_factory=dict)  # ContextEncoderConfig fields (used by the "xl" head)
    mlp_ratio: int = 4

    @property
    def family(self) -> str:
        return "hiera" if self.backbone_class.startswith("hiera") else "swinv2"

    @property
    def region_size(self) -> int:
        return self.shrink["img_size"] if self.family == "swinv2" else self.shrink["input_size"][0]


# Seeds: a tiny Swin is badly conditioned. Its post-norm LayerNorms over 4-8 channels amplify rounding on
# unlucky tokens, and for most seeds float32 differs from float64 by more than the tolerance. These seeds were
# picked among 3000-3159 (3000-3029 for Hiera, which is well conditioned) for the smallest perturbed-float32 deviation
# (see `noise_floor`); `check_conditioning` refuses a seed whose deviation exceeds half the tolerance.
VARIANTS = [
    Variant("swin-naive", 3106, "swinv2_tiny_window16_256_timm", SWIN_SHRINK, "naive",
            "SwinV2 tiny-style (shifted windows with mask, unshifted and clamped windows, pretrained window 0); "
            "naive head: global average pool, Linear-GELU-LayerNorm-Linear"),
    Variant("swin-hyper", 3066, "swinv2_tiny_window16_256_timm", SWIN_SHRINK, "xl",
            "xl head with hyper attention: exact causal path, heads = hidden // 128, 2-D sin-cos position "
            "embedding, cls token last, RMSNorm pre-norm layers, gated MLP of width hidden * mlp_ratio",
            context={"hidden_size": 128, "n_layer": 2, "attention_method": "hyper"}, mlp_ratio=1),
    Variant("hiera-naive-attn", 3001, "hiera_base", HIERA_SHRINK, "xl",
            "Hiera region encoder (mask-unit attention, q-pooling, unroll/reroll, LayerNorm eps 1e-6); xl head "
            "with 'naive' attention: ViTAttention's shifted arguments (heads = hidden, scale 1, qkv bias = "
            "hidden // 128 = 0: none, not causal)",
            context={"hidden_size": 64, "n_layer": 2, "attention_method": "naive"}, mlp_ratio=1),
    Variant("swin-large-mamba", 3022, "swinv2_large_window16_256_timm", SWIN_LARGE_SHRINK, "xl",
            "SwinV2 large-style: relative-position table scaled by the pre-training windows; xl head with "
            "Mamba layers: even layers scan reversed, residual from the normalised input, no final norm",
            context={"hidden_size": 32, "n_layer": 2, "attention_method": "mamba"}),
]


# ---- environment: original code and shims ------------------------------------------------------------------

def import_original(original_repo: Path) -> types.SimpleNamespace:
    """Import the original `xt` package from the user's checkout, after the shims its imports need."""
    install_mamba_shim()
    sys.path.insert(0, str(original_repo))
    from omegaconf import OmegaConf
    from xt.models import ModelConfig, build_model
    from xt.models.backbones import hiera as original_hiera
    from xt.models.context_encoders.hyper_attn.attention import utils as hyper_utils

    hyper_utils.flash_attn_func = never_reached_flash_attn
    install_hiera_shim(original_hiera)
    return types.SimpleNamespace(ModelConfig=ModelConfig, build_model=build_model, OmegaConf=OmegaConf)


def install_mamba_shim() -> None:
    """Let mamba_ssm 1.x import without its CUDA extension and run its reference selective scan instead."""
    sys.modules.setdefault("selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    from mamba_ssm.modules import mamba_simple
    from mamba_ssm.ops.selective_scan_interface import selective_scan_ref

    mamba_simple.selective_scan_fn = selective_scan_ref
    if mamba_simple.causal_conv1d_fn is not None:
        raise RuntimeError("causal_conv1d is installed: uninstall it so that Mamba takes its nn.Conv1d path")


def never_reached_flash_attn(*args, **kwargs):
    """HyperAttention's Triton kernel serves fp16/bf16 only; reaching it in float32 would be a surprise."""
    raise RuntimeError("HyperAttention's Triton flash_attn_func was reached: not the exact float32 path")


# Set by `backbone_shrink` while one variant is built; the builders below read it.
_ACTIVE_SHRINK: dict[str, Any] = {}
_BUILD_LOG: dict[str, Any] = {}


@contextmanager
def backbone_shrink(shrink: dict):
    """While the original builders run: timm and hiera get the `shrink` kwargs (none: full size) and no download."""
    import timm

    original_create_model = timm.create_model

    def create_model(model_name, *args, pretrained=False, **kwargs):
        kwargs = {**kwargs, "pretrained": False, **_ACTIVE_SHRINK}
        _BUILD_LOG["timm_create_model_call"] = {"model_name": model_name, "kwargs": jsonable(kwargs)}
        return original_create_model(model_name, *args, **kwargs)

    _ACTIVE_SHRINK.clear()
    _ACTIVE_SHRINK.update(copy.deepcopy(shrink))
    _BUILD_LOG.clear()
    timm.create_model = create_model
    try:
        yield _BUILD_LOG
    finally:
        timm.create_model = original_create_model
        _ACTIVE_SHRINK.clear()


def install_hiera_shim(original_hiera: types.ModuleType) -> None:
    """Provide the `hiera.hiera_base[_plus]` the original calls; a shrunk `HieraWrapper` is sized from the model."""
    import hiera

    def hiera_builder(name: str):
        def build(pretrained=False, checkpoint=None, input_size=(224, 224), **kwargs):
            arguments = {**HIERA_BUILDER_DEFAULTS[name], "input_size": tuple(input_size), **kwargs, **_ACTIVE_SHRINK}
            arguments = {key: tuple(value) if isinstance(value, list) else value for key, value in arguments.items()}
            _BUILD_LOG["hiera_constructor"] = {"fn": "hiera.Hiera", "kwargs": jsonable(arguments),
                                               "replaces": f"hiera.{name} (= {name}_224), pretrained=False"}
            return hiera.Hiera(**arguments)
        return build

    wrapper_class = original_hiera.HieraWrapper

    def hiera_wrapper(model, hidden_size=768):
        # Shrunk: the real final width. Full size (layouts): the original's hard-coded width, checked.
        if _ACTIVE_SHRINK:
            hidden_size = model.blocks[-1].dim_out
        elif hidden_size != model.blocks[-1].dim_out:
            raise RuntimeError(f"HieraWrapper hidden_size {hidden_size} != final width {model.blocks[-1].dim_out}")
        return wrapper_class(model, hidden_size=hidden_size)

    for name in HIERA_BUILDER_DEFAULTS:
        setattr(hiera, name, hiera_builder(name))
    original_hiera.HieraWrapper = hiera_wrapper


# ---- the original model -------------------------------------------------------------------------------------

def original_model_config(original, variant: Variant):
    """The original `ModelConfig` (schema defaults filled in) as the original `create_config` would merge it."""
    overrides = {
        "backbone_class": variant.backbone_class,
        "num_classes": NUM_CLASSES,
        "cls_head": variant.cls_head,
        "mlp_ratio": variant.mlp_ratio,
        "backbone": {"input_dim": 3, "input_size": variant.region_size},
        "context": variant.context,
    }
    return original.OmegaConf.merge(original.OmegaConf.structured(original.ModelConfig), overrides)


def build_original(original, variant: Variant, init_seed: int) -> tuple[nn.Module, dict]:
    """`build_model` of the original code, channels_last like the trainer; also what the builders were asked."""
    torch.manual_seed(init_seed)  # HyperAttention draws its LSH projections at construction
    with backbone_shrink(variant.shrink) as build_log:
        model = original.build_model(original_model_config(original, variant))
    model = model.to(memory_format=torch.channels_last)  # as trainer._init_model does
    return model.eval(), dict(build_log)


def redraw_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """Replace every parameter by a seeded Gaussian draw that keeps the activations in a sane range.

    Fresh-init weights leave norms at 1/0 and biases at 0, so a converter that dropped or swapped those keys
    would still reproduce the outputs. Draws follow the parameter order, so the same seed gives the same
    weights. The rules (`REDRAW_RULES`) are those of the shared fixtures' recipe.
    """
    owners = {f"{prefix}.{name}" if prefix else name: module
              for prefix, module in model.named_modules() for name, _ in module.named_parameters(recurse=False)}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
            parameter.copy_(redrawn_value(name, owners[name], parameter, noise))


def redrawn_value(name: str, owner: nn.Module, parameter: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The new value of one parameter from its standard-normal `noise` (see `redraw_parameters`)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "logit_scale":
        return math.log(10.0) + 0.2 * noise
    if leaf in ("q_bias", "v_bias"):
        return 0.1 * noise
    if leaf == "cls_token":
        return 0.5 * noise
    if leaf == "pos_embed":
        return 0.1 * noise
    if leaf == "A_log" or (leaf == "bias" and name.endswith("dt_proj.bias")):
        return parameter.detach().float() + 0.1 * noise
    if leaf == "D":
        return 1.0 + 0.1 * noise
    is_norm = isinstance(owner, nn.LayerNorm) or type(owner).__name__ in ("LlamaRMSNorm", "RMSNorm")
    if is_norm:
        return (1.0 + 0.1 * noise) if leaf == "weight" else 0.1 * noise
    if isinstance(owner, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        if leaf == "bias":
            return 0.1 * noise
        fan_in = parameter[0].numel()  # in_features, or in_channels/groups * kernel area
        return noise / math.sqrt(fan_in)
    raise ValueError(f"no re-draw rule for parameter {name} of {type(owner).__name__}")


def run_original(model: nn.Module, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """`logits` and the last stitched feature map the decoder receives (`enc_results[-1]`)."""
    captured = {}

    def keep_decoder_input(module, args):
        captured["region_features"] = args[0][-1].detach().clone()

    handle = model.decoder.register_forward_pre_hook(keep_decoder_input)
    try:
        with torch.no_grad():
            logits = model(pixel_values)["label"]
    finally:
        handle.remove()
    return {"logits": logits.detach().clone(), "region_features": captured["region_features"]}


def parameters_without_gradient(model: nn.Module, pixel_values: torch.Tensor) -> list[str]:
    """Parameters whose gradient is absent or zero: keys a converter could get wrong undetected."""
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    model(pixel_values)["label"].square().sum().backward()
    return [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


def noise_floor(model: nn.Module, pixel_values: torch.Tensor, reference: dict) -> dict:
    """How far float32 is from a float64 run: the basis of the tolerance, and a check of the seed.

    Besides the recorded run, float32 runs with weights and input perturbed by about one ulp show how much an
    implementation with other rounding (ours) may differ: a tiny model can amplify rounding a lot.
    """
    in_double = run_original(copy.deepcopy(model).double(), pixel_values.double())
    contiguous = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    contiguous.channels_last = False
    in_contiguous = run_original(contiguous, pixel_values.contiguous())
    perturbed = [run_original(*perturb(model, pixel_values, draw)) for draw in range(PERTURBED_RUNS)]

    def diff(a, b, key):
        return (a[key].double() - b[key].double()).abs().max().item()

    return {
        "max_abs_logit": reference["logits"].abs().max().item(),
        "max_abs_diff_vs_float64_run": diff(reference, in_double, "logits"),
        "max_abs_diff_perturbed_float32_vs_float64": max(diff(p, in_double, "logits") for p in perturbed),
        "max_abs_diff_channels_last_vs_contiguous": diff(reference, in_contiguous, "logits"),
        "region_features_max_abs": reference["region_features"].abs().max().item(),
        "region_features_max_abs_diff_vs_float64_run": diff(reference, in_double, "region_features"),
        "region_features_max_abs_diff_perturbed_float32_vs_float64":
            max(diff(p, in_double, "region_features") for p in perturbed),
        "region_features_max_abs_diff_channels_last_vs_contiguous": diff(reference, in_contiguous, "region_features"),
        "suggested_tolerance": {"logits_atol": LOGITS_ATOL, "region_features_atol": FEATURES_ATOL},
    }


def perturb(model: nn.Module, pixel_values: torch.Tensor, draw: int) -> tuple[nn.Module, torch.Tensor]:
    """A copy of the model and input with every value scaled by 1 + 2^-23 N: float32 rounding, simulated."""
    generator = torch.Generator().manual_seed(draw)
    model = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1 + 2.0**-23 * torch.randn(parameter.shape, generator=generator))
    return model, pixel_values * (1 + 2.0**-23 * torch.randn(pixel_values.shape, generator=generator))


def check_conditioning(variant: Variant, numerics: dict) -> None:
    """Refuse a reference that float32 cannot reproduce well inside the tolerance (an unlucky seed)."""
    worst = max(numerics["max_abs_diff_perturbed_float32_vs_float64"] / LOGITS_ATOL,
                numerics["region_features_max_abs_diff_perturbed_float32_vs_float64"] / FEATURES_ATOL)
    if worst > CONDITIONING_LIMIT:
        raise AssertionError(f"{variant.name}: float32 rounding moves the outputs by {worst:.2f} x the tolerance "
                             f"(limit {CONDITIONING_LIMIT}): ill-conditioned, choose another seed")


# ---- what the original computed with the shrunk settings (variant.json) ------------------------------------

def swin_blocks(model: nn.Module) -> list[dict]:
    """Per block: grid, effective window and shift, heads, pretrained window, whether a mask is applied."""
    blocks = []
    for stage_name, stage in model.encoder.model.named_children():
        if not stage_name.startswith("layers_"):
            continue
        for index, block in enumerate(stage.blocks):
            blocks.append({
                "module": f"{stage_name}.blocks.{index}",
                "grid": list(block.input_resolution),
                "window": list(block.window_size),
                "shift": list(block.shift_size),
                "num_heads": block.attn.num_heads,
                "dim": block.dim,
                "pretrained_window_size": list(block.attn.pretrained_window_size),
                "has_attn_mask": block.attn_mask is not None,
            })
    return blocks


def backbone_description(variant: Variant, model: nn.Module, build_log: dict) -> dict:
    """The `backbone` section of variant.json: shrink kwargs (the converter reads these) and their effect."""
    final_channels = model.encoder.feature_info[-1]["num_chs"]
    description = {
        "backbone_class": variant.backbone_class,
        "family": variant.family,
        "timm_model_name": SWIN_TIMM_NAMES.get(variant.backbone_class),
        "region_size": variant.region_size,
        "shrink_kwargs": copy.deepcopy(variant.shrink),
        "final_feature_channels": final_channels,
    }
    if variant.family == "swinv2":
        description["timm_create_model_call"] = build_log["timm_create_model_call"]
        description["swin_blocks_effective"] = swin_blocks(model)
        description["swin_fixed_args"] = {"patch_size": 4, "mlp_ratio": 4.0, "qkv_bias": True,
                                          "layer_norm_eps": 1e-05, "act": "GELU (exact erf)",
                                          "features_only_out": "NHWC per stage, no final norm"}
    else:
        hiera_model = model.encoder.model
        description["hiera_constructor"] = {**build_log["hiera_constructor"],
                                            "HieraWrapper_hidden_size": final_channels}
        description["hiera_effective"] = {
            "tokens_per_side": hiera_model.tokens_spatial_shape[0],
            "mask_unit_size": list(hiera_model.mask_unit_size),
            "q_pool": hiera_model.q_pool,
            "blocks": [{"dim": b.dim, "dim_out": b.dim_out, "heads": b.attn.heads, "q_stride": b.attn.q_stride,
                        "window_size": b.attn.window_size, "use_mask_unit_attn": b.attn.use_mask_unit_attn}
                       for b in hiera_model.blocks],
            "norm_layer": "nn.LayerNorm(eps=1e-6)",
            "head/norm": "replaced by nn.Identity in HieraWrapper",
            "output": "intermediates[-1] (rerolled, B,H,W,C) permuted to NCHW",
        }
    return description


def context_description(variant: Variant, model: nn.Module) -> dict:
    """The context layers the original actually built, quirks included (heads, scale, causality, bias)."""
    if variant.cls_head == "naive":
        return {"decoder_class": "ClassificationDecoder", "note": "cls_head naive: the context config is unused"}
    layer = model.decoder.layers[0]
    base = {"decoder_class": type(model.decoder).__name__, "layer_class": type(layer).__name__,
            "n_layer": len(model.decoder.layers), "mlp_width": None}
    if hasattr(layer, "mixer"):  # Mamba Block
        mixer = layer.mixer
        return {**base, "mixer_class": type(mixer).__name__, "d_state": mixer.d_state, "d_conv": mixer.d_conv,
                "expand": mixer.expand, "dt_rank": mixer.dt_rank, "use_fast_path_taken": False,
                "reverse_per_layer": [block.reverse for block in model.decoder.layers],
                "norm_eps": layer.norm.eps, "mlp_width": None}
    attention = layer.attn
    base["mlp_width"] = layer.mlp.intermediate_size
    if type(attention).__name__ == "LLMAttention":
        head_dim = attention.qkv.out_features // 3 // attention.num_heads
        return {**base, "attention_class": "LLMAttention", "num_heads_effective": attention.num_heads,
                "causal": attention.causal, "scale": head_dim ** -0.5,
                "hyper_min_seq_len": attention.attn.min_seq_len}
    return {**base, "attention_class": type(attention).__name__, "num_heads_effective": attention.num_heads,
            "scale": attention.scale, "qkv_bias": attention.qkv.bias is not None, "causal": False}


def kernel_notes(variant: Variant) -> list[str]:
    """Which shims this variant's forward pass depends on."""
    notes = []
    if variant.cls_head == "xl" and variant.context.get("attention_method", "hyper") == "hyper":
        notes.append("HyperAttention: no replacement. float32, causal, <= 4096 tokens: utils.exact_attention "
                     "(plain PyTorch). The Triton flash_attn_func was replaced by a function that raises; "
                     "it was never reached.")
    if variant.context.get("attention_method") == "mamba":
        notes.append("Mamba: placeholder selective_scan_cuda module; Mamba's selective_scan_fn -> mamba_ssm's "
                     "pure-PyTorch selective_scan_ref; no causal_conv1d, so nn.Conv1d(...)[..., :L] + SiLU.")
    if variant.family == "swinv2":
        notes.append("SwinV2: original builder function called unchanged; timm.create_model wrapped to force "
                     "pretrained=False and add the shrink kwargs.")
    else:
        notes.append("Hiera: the original hiera_base builder calls hiera.hiera_base (missing in every "
                     "hiera-transformer release); aliased to hiera.Hiera with hiera_base_224's defaults plus "
                     "the shrink kwargs, pretrained=False. HieraWrapper's hidden_size set to the real final "
                     "width. xT built by the original build_model.")
    return notes


def library_versions() -> dict[str, str]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


# ---- files ---------------------------------------------------------------------------------------------------

def trainer_payload(model: nn.Module) -> dict:
    """What `trainer._get_current_payload` saves: the DataParallel state dict ("module." keys, _metadata)."""
    state_dict = nn.DataParallel(model).state_dict()  # on CPU DataParallel only wraps: same keys as on GPU
    assert isinstance(state_dict, OrderedDict) and all(key.startswith("module.") for key in state_dict)
    return {"epoch": PAYLOAD_EPOCH, "state_dict": state_dict, "optimizer_state_dict": {},
            "metrics": dict(PAYLOAD_METRICS)}


def write_io(path: Path, pixel_values: torch.Tensor, outputs: dict) -> None:
    from safetensors.torch import save_file

    tensors = {"pixel_values": pixel_values.to(PIXEL_STORAGE_DTYPE), **outputs}
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))


def verify_reload(original, variant: Variant, folder: Path, reference: dict) -> None:
    """Reload the written checkpoint into a freshly built model (other init seed): identical outputs or fail."""
    from safetensors.torch import load_file

    payload = torch.load(folder / "model.ckpt", map_location="cpu", weights_only=True)
    model, _ = build_original(original, variant, init_seed=variant.seed + 1)
    state_dict = OrderedDict((key.removeprefix("module."), value) for key, value in payload["state_dict"].items())
    model.load_state_dict(state_dict, strict=True)
    recorded = load_file(str(folder / "io.safetensors"))
    again = run_original(model, recorded["pixel_values"].float())
    for key in ("logits", "region_features"):
        if not torch.equal(again[key], recorded[key]):
            difference = (again[key] - recorded[key]).abs().max().item()
            raise AssertionError(f"{variant.name}: reloaded checkpoint changes {key} by {difference}")


def file_record(path: Path) -> dict:
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def write_json(path: Path, document: dict) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")


def jsonable(value):
    """Tuples to lists (JSON has no tuples), recursively."""
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    return value


# ---- one variant ------------------------------------------------------------------------------------------

def variant_document(original, variant: Variant, model, build_log: dict, outputs: dict, numerics: dict,
                     versions: dict) -> dict:
    """variant.json: the original `model_config` and shrink kwargs (what the converter reads), and what the
    original built from them, so that a failing comparison can be traced to a quirk."""
    model_config = original.OmegaConf.to_container(original_model_config(original, variant))
    image_size = REGIONS_PER_SIDE * variant.region_size
    return {
        "name": variant.name,
        "description": "Random-init (seeded, every parameter re-drawn) ORIGINAL xT model, eval mode, float32, "
                       "CPU, channels_last. Made by conversion/record_original_references.py.",
        "covers": variant.covers,
        "seed": variant.seed,
        "model_config": model_config,
        "backbone": backbone_description(variant, model, build_log),
        "regions_per_side": REGIONS_PER_SIDE,
        "image_size": image_size,
        "crop_size": variant.region_size,
        "cls_head": variant.cls_head,
        "context": {key: model_config["context"][key]
                    for key in ("hidden_size", "n_layer", "attention_method", "in_context_patches")},
        "effective_context": context_description(variant, model),
        "num_classes": NUM_CLASSES,
        "mlp_ratio": variant.mlp_ratio,
        "channels_last": True,
        "io": {"pixel_values": [BATCH, 3, image_size, image_size],
               "pixel_values_dtype": f"{str(PIXEL_STORAGE_DTYPE).removeprefix('torch.')} (exact: the original ran on "
                                     f"these values as float32; read them with .float())",
               "logits": list(outputs["logits"].shape),
               "region_features": list(outputs["region_features"].shape),
               "logits_atol": LOGITS_ATOL, "region_features_atol": FEATURES_ATOL},
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "parameters_without_gradient": [],  # checked: record_variant refuses a model with any
        "numerics": numerics,
        "versions": versions,
        "kernel_replacements": kernel_notes(variant),
    }


def checkpoint_format(payload: dict) -> dict:
    return {
        "payload_keys": list(payload),
        "state_dict_prefix": "module.",
        "state_dict_type": "collections.OrderedDict with _metadata (nn.DataParallel(model).state_dict())",
        "conv_weights_channels_last_strides": True,
    }


def seeded_model_and_input(original, variant: Variant) -> tuple[nn.Module, dict, torch.Tensor]:
    """The original model with re-drawn parameters, what its builders were asked, and its input batch."""
    model, build_log = build_original(original, variant, init_seed=variant.seed)
    generator = torch.Generator().manual_seed(variant.seed)
    redraw_parameters(model, generator)
    size = REGIONS_PER_SIDE * variant.region_size
    drawn = torch.randn((BATCH, 3, size, size), generator=generator)
    return model, build_log, drawn.to(PIXEL_STORAGE_DTYPE).float()  # exactly what io.safetensors stores


def record_variant(original, variant: Variant, output: Path, versions: dict) -> dict:
    """Build, re-draw, run, check, write and verify one variant; its MANIFEST entry."""
    model, build_log, pixel_values = seeded_model_and_input(original, variant)
    outputs = run_original(model, pixel_values)
    without_gradient = parameters_without_gradient(model, pixel_values)
    if without_gradient:
        raise AssertionError(f"{variant.name}: parameters that do not affect the output: {without_gradient}")
    numerics = noise_floor(model, pixel_values, outputs)
    check_conditioning(variant, numerics)

    folder = output / variant.name
    folder.mkdir(parents=True, exist_ok=True)
    payload = trainer_payload(model)
    torch.save(payload, folder / "model.ckpt")
    write_io(folder / "io.safetensors", pixel_values, outputs)
    document = variant_document(original, variant, model, build_log, outputs, numerics, versions)
    write_json(folder / "variant.json", {**document, "state_dict_num_keys": len(payload["state_dict"]),
                                         "checkpoint_format": checkpoint_format(payload)})
    verify_reload(original, variant, folder, outputs)
    files = {name: file_record(folder / name) for name in ("model.ckpt", "variant.json", "io.safetensors")}
    return {"seed": variant.seed, "covers": variant.covers,
            "num_parameters": sum(p.numel() for p in model.parameters()), "files": files}


# ---- full-size key layouts of the original configs ---------------------------------------------------------

LAYOUTS_FOLDER = "layouts"
NOT_MODEL_CONFIGS = ("base.yaml", "paths.yaml")  # every config's base_configs, not configs of their own
# Combinations with no upstream config nor released checkpoint, made from a released config the way
# ../shared's manifests make them: they cover the hiera_base_plus xl head and a SwinV2-S Mamba context encoder.
SYNTHESIZED_LAYOUTS = {
    "synth_hiera_baseplus_1e-4_hyper_448_224": {
        "config_file": "config/hiera/hiera_base_1e-4_hyper_448_224.yaml",
        "overrides": {"model": {"backbone_class": "hiera_base_plus"}},
        "note": "No hiera_base_plus xl config/weights exist upstream; hiera_base hyper config with backbone_class "
                "hiera_base_plus.",
    },
    "synth_swin_v2_small_1e-4_mamba_512_256": {
        "config_file": "config/swin-s/swin_v2_small_1e-4_hyper_512_256.yaml",
        "overrides": {"model": {"context": {"hidden_size": 768, "attention_method": "mamba", "n_layer": 4,
                                            "classification_mode": False}}},
        "note": "No swin-s mamba config/weights exist upstream; synthesized like the swin-t/b/l mamba configs.",
    },
}


def original_config_loader(original_repo: Path, load_issues: list[str]):
    """The original `xt/config.py:_merge_configs`, compiled from its source and run unmodified.

    Importing `xt.config` would import the training data pipeline (cv2, albumentations, pycocotools, ...) for its
    `MainConfig` schema; the model section needs only `ModelConfig`, which the caller passes as the schema.
    `OmegaConf.load` is the one thing replaced: a YAML mapping that repeats a line verbatim (an upstream config
    has `lr: 1e-5` twice) is loaded without the repetition and the fact is appended to `load_issues`; any other
    duplicate key still fails.
    """
    from omegaconf import OmegaConf
    from yaml.constructor import ConstructorError

    def load(cfg_file):
        lines = Path(cfg_file).read_text().splitlines(keepends=True)
        while True:
            try:
                return OmegaConf.load(io.StringIO("".join(lines)))
            except ConstructorError as error:
                if "found duplicate key" not in str(error.problem):
                    raise
                repeated, mapping_start = error.problem_mark.line, error.context_mark.line
                earlier = [index for index in range(mapping_start, repeated) if lines[index] == lines[repeated]]
                if not earlier:
                    raise
                load_issues.append(f"{Path(cfg_file).as_posix()}: line {repeated + 1} {lines[repeated].strip()!r} "
                                   f"repeats line {earlier[-1] + 1} (YAML: {error.problem}); loaded without it")
                del lines[repeated]

    path = original_repo / "xt" / "config.py"
    tree = ast.parse(path.read_text(), str(path))
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "_merge_configs")
    namespace = {"os": os, "OmegaConf": types.SimpleNamespace(load=load, merge=OmegaConf.merge),
                 "MainConfig": "MainConfig"}  # MainConfig: only the annotation of its argument
    # The original's own function, from the checkout whose `xt` package this script imports anyway.
    exec(compile(ast.Module(body=[function], type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return namespace["_merge_configs"]


def layout_sources(original_repo: Path) -> list[dict]:
    """Every original config (`config/**/*.yaml` but its base configs) and the synthesized ones, by name."""
    sources = [{"name": path.stem, "config_file": path.relative_to(original_repo).as_posix(),
                "synthesized_from": None, "note": None}
               for path in sorted((original_repo / "config").rglob("*.yaml")) if path.name not in NOT_MODEL_CONFIGS]
    sources += [{"name": name, "config_file": None, "note": spec["note"],
                 "synthesized_from": {"config_file": spec["config_file"], "overrides": spec["overrides"]}}
                for name, spec in SYNTHESIZED_LAYOUTS.items()]
    names = [source["name"] for source in sources]
    if len(set(names)) != len(names):
        raise SystemExit(f"config names are not unique: {sorted(names)}")
    return sorted(sources, key=lambda source: source["name"])


def load_original_model_config(original, original_repo: Path, source: dict):
    """The merged config as the original trainer sees it (base configs, schema defaults), and the load issues."""
    from omegaconf import OmegaConf

    issues: list[str] = []
    merge_configs = original_config_loader(original_repo, issues)
    config_file = source["config_file"] or source["synthesized_from"]["config_file"]
    schema = OmegaConf.create({"model": OmegaConf.structured(original.ModelConfig)})
    with contextlib.chdir(original_repo), contextlib.redirect_stdout(io.StringIO()):  # base_configs: repo-relative
        config = merge_configs(schema, config_file)
    if source["synthesized_from"]:
        config = OmegaConf.merge(config, source["synthesized_from"]["overrides"])
    return config, issues


def layout_document(original, original_repo: Path, source: dict) -> dict:
    """Build the ORIGINAL model of one config at full size and describe its checkpoint's state_dict keys."""
    from omegaconf import OmegaConf

    config, issues = load_original_model_config(original, original_repo, source)
    torch.manual_seed(0)  # HyperAttention draws its LSH projections (buffers, not saved) at construction
    # CPU, not the meta device: Hiera's drop-path schedule calls .item() and timm's SwinV2 copies computed
    # buffers, neither of which a meta tensor allows.
    with backbone_shrink({}) as build_log:  # full size: only pretrained=False
        model = original.build_model(config.model, config.data.dataset)  # as trainer._init_model calls it
    model = model.to(memory_format=torch.channels_last)
    state_dict = nn.DataParallel(model).state_dict()  # the keys trainer._get_current_payload saves
    assert all(key.startswith("module.") for key in state_dict)
    return {
        "name": source["name"],
        "description": "Full-size key layout of the ORIGINAL xT model of an original config: the keys and shapes "
                       "of the state_dict its trainer saves (nn.DataParallel, 'module.' prefix), in order. Made by "
                       "conversion/record_original_references.py.",
        "config_file": source["config_file"],
        "synthesized": source["synthesized_from"] is not None,
        "synthesized_from": source["synthesized_from"],
        "note": source["note"],
        "config_load_issues": issues,
        "model_config": OmegaConf.to_container(config.model, resolve=True),
        "builder_calls": jsonable(dict(build_log)),
        "num_parameters": sum(parameter.numel() for parameter in model.parameters()),
        "num_keys": len(state_dict),
        "keys": [{"key": key, "shape": list(value.shape)} for key, value in state_dict.items()],
    }


def write_gzipped_json(path: Path, document: dict) -> None:
    """JSON with one line per key entry (readable through zcat), gzipped deterministically: no file name and
    mtime 0 in the header."""
    head = json.dumps({name: value for name, value in document.items() if name != "keys"}, indent=1)
    entries = ",\n".join("  " + json.dumps(entry) for entry in document["keys"])
    text = head.removesuffix("\n}") + ',\n "keys": [\n' + entries + "\n ]\n}\n"
    assert json.loads(text) == document and list(document)[-1] == "keys"
    data = text.encode()
    with path.open("wb") as handle, gzip.GzipFile(filename="", mode="wb", fileobj=handle, mtime=0,
                                                   compresslevel=9) as stream:
        stream.write(data)


def record_layouts(original, original_repo: Path, output: Path) -> dict:
    """`<output>/layouts/<config name>.json.gz` for every original config; their MANIFEST entries."""
    folder = output / LAYOUTS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for source in layout_sources(original_repo):
        document = layout_document(original, original_repo, source)
        path = folder / f"{source['name']}.json.gz"
        write_gzipped_json(path, document)
        files[path.name] = {"config_file": source["config_file"], "synthesized": document["synthesized"],
                            "num_parameters": document["num_parameters"], "num_keys": document["num_keys"],
                            **file_record(path)}
        print(f"layout {source['name']}: {document['num_parameters']} parameters, {document['num_keys']} keys")
    return files


# ---- command line -----------------------------------------------------------------------------------------

def original_commit(original_repo: Path, given: str | None) -> tuple[str, str]:
    """The original checkout's commit and where it came from; a given hash must match a git checkout's."""
    result = subprocess.run(["git", "-C", str(original_repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=False)
    found = result.stdout.strip() if result.returncode == 0 else None
    if given and found and not found.startswith(given):
        raise SystemExit(f"--original-commit {given} but {original_repo} is at {found}")
    if found:
        return found, "git rev-parse HEAD"
    if given:
        return given, "--original-commit (the checkout has no .git)"
    raise SystemExit(f"{original_repo} is not a git checkout: pass its commit with --original-commit")


def source_tree_sha256(original_repo: Path) -> str:
    """One hash of the original `xt/` sources that ran: provenance even for a checkout without .git."""
    digest = hashlib.sha256()
    for path in sorted((original_repo / "xt").rglob("*.py")):
        digest.update(path.relative_to(original_repo).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original-repo", required=True, type=Path, help="checkout of the original xT code")
    parser.add_argument("--output", required=True, type=Path, help="folder for the variants and MANIFEST.json")
    parser.add_argument("--original-commit", help="commit of --original-repo when it is not a git checkout")
    parser.add_argument("--original-url", default=ORIGINAL_URL, help="where the original code comes from")
    arguments = parser.parse_args(argv)

    original_repo = arguments.original_repo.resolve()
    if not (original_repo / "xt" / "models" / "build.py").is_file():
        raise SystemExit(f"{original_repo} has no xt/models/build.py: not a checkout of {arguments.original_url}")
    commit, commit_source = original_commit(original_repo, arguments.original_commit)
    torch.set_num_threads(1)  # thread count can change float32 reduction order: one thread is reproducible
    torch.use_deterministic_algorithms(True)
    original = import_original(original_repo)
    versions = library_versions()

    manifest_variants = {}
    for variant in VARIANTS:
        manifest_variants[variant.name] = record_variant(original, variant, arguments.output, versions)
        print(f"{variant.name}: {manifest_variants[variant.name]['num_parameters']} parameters, verified")
    manifest_layouts = record_layouts(original, original_repo, arguments.output)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])])
    write_json(arguments.output / "MANIFEST.json", {
        "what": "Outputs of the ORIGINAL xT code on tiny seeded models, for the parity tests.",
        "original": {"repository": arguments.original_url, "commit": commit, "commit_source": commit_source,
                     "xt_sources_sha256": source_tree_sha256(original_repo)},
        "command": command,
        "environment": {**versions, "platform": platform.machine(), "torch_num_threads": 1},
        "recipe": {"regions_per_side": REGIONS_PER_SIDE, "batch": BATCH, "num_classes": NUM_CLASSES,
                   "parameters": REDRAW_RULES,
                   "generator": "torch.Generator().manual_seed(seed): parameters in named_parameters order, then "
                                "pixel_values = torch.randn((2, 3, S, S)), rounded to "
                                f"{str(PIXEL_STORAGE_DTYPE).removeprefix('torch.')}",
                   "model": "original build_model, channels_last, eval, float32, CPU"},
        "variants": manifest_variants,
        "layouts": {
            "what": "Full-size key layouts (state_dict keys and shapes, num_parameters, model_config) of the ORIGINAL "
                    "model of every original config, for the key-mapping tests; no weights.",
            "folder": LAYOUTS_FOLDER,
            "command": command,
            "recipe": "config: the original xt/config.py _merge_configs (base_configs, then the file) over the "
                      "ModelConfig schema, resolved; synthesized ones: a config plus overrides. Model: original "
                      "build_model(config.model, config.data.dataset) on CPU at full size, pretrained=False, "
                      "channels_last; keys: nn.DataParallel(model).state_dict(). Gzip with mtime 0.",
            "files": manifest_layouts,
        },
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
