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
6. reloads the written checkpoint into a freshly built original model and asserts identical outputs,

and writes `<output>/MANIFEST.json` (original commit, command, library versions, seeds, sha256 and size of
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

It takes a few seconds on one CPU thread. The outputs are deterministic: a second run on the same machine
writes byte-identical files. Another CPU or library build may change the last bits of the float32 outputs (they
are checked with atol 1e-5 / 1e-4).

Shims (all here, applied before the original code is imported; the original files are run unmodified):

- timm: `timm.create_model` is wrapped while a variant is built: `pretrained=False` (no download) and the
  variant's shrink kwargs (`img_size`, `window_size`, `embed_dim`, `depths`, `num_heads`[,
  `pretrained_window_sizes`]) are added to the original builder's call.
- hiera: the original calls `hiera.hiera_base(...)`, which no hiera-transformer release defines
  (`AttributeError`). It is aliased to a builder that makes what `hiera_base_224` makes, shrunk
  (`hiera.Hiera(embed_dim, num_heads, stages, input_size)`), without pretrained weights. `HieraWrapper`'s
  hard-coded `hidden_size=768` is replaced by the shrunk model's real final width (the decoder is sized
  from it).
- mamba_ssm 1.x hard-imports its CUDA extension `selective_scan_cuda`: an empty placeholder module is
  registered, and `Mamba`'s `selective_scan_fn` is pointed at mamba_ssm's own pure-PyTorch
  `selective_scan_ref`. causal_conv1d is not installed, so `Mamba.forward` takes its `nn.Conv1d` path.
- HyperAttention needs none: in float32 with causal attention and at most 4096 tokens the original calls
  `utils.exact_attention`, plain PyTorch. Its Triton `flash_attn_func` (fp16/bf16 only) is replaced by a
  function that raises, to prove it is never reached.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata
import json
import math
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
def backbone_shrink(variant: Variant):
    """While the original builders run: timm and hiera get the variant's shrink kwargs and no download."""
    import timm

    original_create_model = timm.create_model

    def create_model(model_name, *args, pretrained=False, **kwargs):
        kwargs = {**kwargs, "pretrained": False, **_ACTIVE_SHRINK}
        _BUILD_LOG["timm_create_model_call"] = {"model_name": model_name, "kwargs": jsonable(kwargs)}
        return original_create_model(model_name, *args, **kwargs)

    _ACTIVE_SHRINK.clear()
    _ACTIVE_SHRINK.update(copy.deepcopy(variant.shrink))
    _BUILD_LOG.clear()
    timm.create_model = create_model
    try:
        yield _BUILD_LOG
    finally:
        timm.create_model = original_create_model
        _ACTIVE_SHRINK.clear()


def install_hiera_shim(original_hiera: types.ModuleType) -> None:
    """Provide the `hiera.hiera_base` the original calls, and size `HieraWrapper` from the real model."""
    import hiera

    def hiera_base(pretrained=False, checkpoint=None, input_size=(224, 224), **kwargs):
        arguments = {**HIERA_BASE_DEFAULTS, "input_size": tuple(input_size), **kwargs, **_ACTIVE_SHRINK}
        arguments = {key: tuple(value) if isinstance(value, list) else value for key, value in arguments.items()}
        _BUILD_LOG["hiera_constructor"] = {"fn": "hiera.Hiera", "kwargs": jsonable(arguments),
                                           "replaces": "hiera.hiera_base (= hiera_base_224), pretrained=False"}
        return hiera.Hiera(**arguments)

    wrapper_class = original_hiera.HieraWrapper

    def hiera_wrapper(model, hidden_size=768):
        return wrapper_class(model, hidden_size=model.blocks[-1].dim_out)

    hiera.hiera_base = hiera_base
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
    with backbone_shrink(variant) as build_log:
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
    write_json(arguments.output / "MANIFEST.json", {
        "what": "Outputs of the ORIGINAL xT code on tiny seeded models, for the parity tests.",
        "original": {"repository": arguments.original_url, "commit": commit, "commit_source": commit_source,
                     "xt_sources_sha256": source_tree_sha256(original_repo)},
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "environment": {**versions, "platform": platform.machine(), "torch_num_threads": 1},
        "recipe": {"regions_per_side": REGIONS_PER_SIDE, "batch": BATCH, "num_classes": NUM_CLASSES,
                   "parameters": REDRAW_RULES,
                   "generator": "torch.Generator().manual_seed(seed): parameters in named_parameters order, then "
                                "pixel_values = torch.randn((2, 3, S, S)), rounded to "
                                f"{str(PIXEL_STORAGE_DTYPE).removeprefix('torch.')}",
                   "model": "original build_model, channels_last, eval, float32, CPU"},
        "variants": manifest_variants,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
