"""xT configuration: one dataclass that decides every architectural choice, including each quirk
of the released checkpoints (the project's `docs/architecture.md` lists them)."""

import contextlib
import difflib
import functools
import math
import re
import warnings
from typing import Literal, get_args, get_origin

from huggingface_hub.dataclasses import strict, validated_field
from huggingface_hub.errors import (
    HFValidationError,
    StrictDataclassClassValidationError,
    StrictDataclassFieldValidationError,
)
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES

# Keys that transformers itself reads from or writes to config.json without their being XTConfig fields; an unknown
# key that is one of these is never reported as a misspelling.
_TRANSFORMERS_KEYS = frozenset({
    "_attn_implementation_internal", "_commit_hash", "_experts_implementation_internal", "_name_or_path",
    "attn_implementation", "auto_map", "base_model_prefix", "custom_pipelines", "experts_implementation",
    "model_type", "name_or_path", "num_labels", "output_attentions", "per_layer_config", "quantization_config",
    "rope_scaling", "rope_theta", "tie_word_embeddings", "torch_dtype", "transformers_version", "use_cache",
})


# Field validators: each raises `ValueError("must be ..., got ...")`; `_field_errors_name_the_field` puts the field's
# name in front.
def at_least(low):
    """A validator for `value ≥ low`."""
    def check(value):
        if value < low:
            raise ValueError(f"must be ≥ {low}, got {value!r}.")
    return check


def positive(value):
    if value <= 0:
        raise ValueError(f"must be > 0, got {value!r}.")


def in_range(low, high, *, low_open=False, high_open=False):
    """A validator for `value` in the interval from `low` to `high`, each end included unless it is open."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"

    def check(value):
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            raise ValueError(f"must be in {interval}, got {value!r}.")
    return check


def optional(check):
    """`check`, letting `None` through."""
    def check_unless_none(value):
        if value is not None:
            check(value)
    return check_unless_none


def window_length(value):
    if value < 2 and value != -1:
        raise ValueError(f"must be -1 (off) or ≥ 2 (windows advance by half their length), got {value!r}.")


def _field_errors_name_the_field(cls):
    """Make `@strict`'s errors plain `ValueError`s that name the field, and warn about misspelt keys.

    `@strict` checks each field's type (a `Literal` field: its values) and validators on every assignment, and the
    `validate_*` methods after construction and in `validate()`, but wraps what they raise in its own exception
    types, which are not `ValueError`s. Applied on top of `@strict`, this re-raises them as `ValueError`, and warns
    from the outermost `__init__`, so that the warning points at the line that built the config without counting
    the frames of transformers' and `@strict`'s own `__init__` wrappers.
    """
    strict_init, strict_setattr, strict_validate = cls.__init__, cls.__setattr__, cls.validate

    @functools.wraps(strict_init)
    def __init__(self, *args, **kwargs):
        strict_init(self, *args, **kwargs)
        _warn_about_misspelt_keys(self, kwargs, stacklevel=2)

    def __setattr__(self, name, value):
        try:
            strict_setattr(self, name, value)
        except StrictDataclassFieldValidationError as error:
            cause = error.__cause__
            if isinstance(cause, TypeError):  # strict's own type check
                expected = cls.__dataclass_fields__[name].type
                choices = get_args(expected) if get_origin(expected) is Literal else None
                rule = f"one of {choices}" if choices else f"of type {getattr(expected, '__name__', expected)}"
                raise ValueError(f"`{name}` must be {rule}, got {value!r}.") from cause
            raise ValueError(f"`{name}` {cause}") from cause

    @functools.wraps(strict_validate)
    def validate(self):
        try:
            strict_validate(self)
        except StrictDataclassClassValidationError as error:
            raise ValueError(str(error.__cause__)) from error.__cause__

    validate.__is_defined_by_strict_decorator__ = True  # lets `@strict` on a subclass replace it
    cls.__init__, cls.__setattr__, cls.validate = __init__, __setattr__, validate
    return cls


@_field_errors_name_the_field
@strict
class XTConfig(PreTrainedConfig):
    r"""
    Configuration of an xT model: nested tokenization → region encoder → stitch → context encoder → head.

    Field defaults describe the released Swin-v2-T "hyper" xT model (region 256, 2 context layers of
    width 768). The fields are listed below by role; the conversion script sets the quirk fields to the values
    the released checkpoints need, given as *(released: ...)*.

    Architecture:
        region_size (`int`, defaults to 256):
            Side of the square regions the image is cut into. The region encoder sees one region at a
            time, so this is also the backbone's input size (`backbone_config.image_size` is set to it).
        backbone_config (`PreTrainedConfig` or `dict`, *optional*):
            Any transformers backbone config (`Swinv2Config` by default; `HieraConfig`, `ConvNextConfig`,
            or `TimmBackboneConfig` for timm models such as `fastvit_mci3`). Its `out_features` decide
            which stages are stitched; the last one feeds the context encoder.
        context_encoder (`str`, defaults to `"attention"`):
            `"none"`, `"attention"` (Llama-style blocks) or `"mamba"` (bidirectional-alternating Mamba).
        context_hidden_size (`int`, defaults to 768):
            Width of the context encoder; region features are projected to it.
        context_num_layers (`int`, defaults to 2):
            Number of context encoder blocks.
        context_num_heads (`int`, *optional*):
            Attention heads. `None` uses `context_hidden_size // 128` (at least 1), which is what every
            released checkpoint computes whatever its config says.
        context_mlp_ratio (`float`, defaults to 4.0):
            Width of the gated MLP of attention blocks relative to `context_hidden_size`.
        context_qkv_bias (`bool`, defaults to `True`):
            Bias of the fused query/key/value projection.
        hyper_min_seq_len (`int`, defaults to 4096):
            Longest sequence that is always attended exactly. For causal attention the approximation only
            starts at `2 · hyper_min_seq_len` tokens: in between, the halves are computed exactly, in pieces.
        hyper_lsh_num_projs (`int`, defaults to 7):
            Random projections of HyperAttention's angular LSH (`2**hyper_lsh_num_projs` buckets).
        hyper_block_size (`int`, defaults to 256):
            Keys per block of HyperAttention's bucket-sorted block diagonal (and queries per chunk of its
            exact pieces): memory grows as sequence length × block size.
        hyper_sample_size (`int`, defaults to 256):
            Keys sampled uniformly for HyperAttention's residual (0: block diagonal only).
        context_layer_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the LayerNorms of Mamba blocks and of the heads.
        context_position_embedding (`str`, defaults to `"sincos_2d"`):
            `"sincos_2d"`: fixed MAE-style 2-D sin-cos embedding of each token's global (row, column) in
            the stitched grid, added after the input projection. The first half of the channels encodes
            the column, the second half the row (the released models' layout). `"none"` adds nothing.
        in_context_patches (`int`, defaults to -1):
            When > 0, the context encoder runs over windows of this many tokens that advance by half a
            window (each window keeps the previous window's second half as context), each window with
            its own CLS token; the pooled output is the mean of the windows' CLS states, as in the
            original "XL" code. `-1` (or any value ≥ the sequence length) runs on the whole sequence.
        mamba_d_state (`int`, defaults to 16), mamba_d_conv (`int`, defaults to 4), mamba_expand (`int`, defaults to 2):
            Selective-scan state size, causal depthwise convolution width and inner-width multiplier.
        mamba_dt_rank (`int`, *optional*):
            Rank of the step-size projection; `None` means `ceil(context_hidden_size / 16)`.
        classifier (`str`, defaults to `"context"`):
            `"pool"`: global average pool of the tokens and an MLP (the original "naive" head).
            `"context"`: a CLS token goes through the context encoder and a LayerNorm + Linear reads it
            (the original "xl" head). Needs a context encoder.
        classifier_mlp_ratio (`int`, defaults to 4):
            Hidden width of the `"pool"` head's MLP relative to its input width.
        decoder_hidden_size (`int`, defaults to 64):
            Width of the per-region U-Net decoder of `XTForSemanticSegmentation`. It reads every stage in
            `backbone_config.out_features` (list them all for a U-Net), shallow to deep.
        decoder_output_stride (`int`, defaults to 1):
            Segmentation logits are at `1 / decoder_output_stride` of the input resolution (1: full resolution).
            Must be ≥ 1 and divide `region_size`, so that each region's logits are a whole number of pixels per side.
            (The decoder works at the backbone's first out-feature stride; other strides are reached by bilinear
            resizing, so a divisor of that stride avoids an extra upsampling.)
        detection_region_class_prior (`bool`, defaults to `True`):
            `XTForObjectDetection`: add to every heatmap cell of a region a per-class logit read linearly from the
            tokens the decoder fuses at its deepest stage (the region's context tokens, or its own deepest tokens
            without a context encoder), zero at initialisation (`XTRegionClassPrior` in `detection_head.py`). It lets
            an object's class follow the scene quickly; `False` gives the plain CenterNet head.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the truncated normal used to initialise new weights.

    Quirks of the released checkpoints:
        region_encoder_output_norm (`bool`, defaults to `False`):
            Keep the per-stage output LayerNorm that transformers backbones (Hiera, ConvNeXt) add.
            *(released: False: timm's `features_only` Swin and `HieraWrapper` output un-normalised maps.)*
        context_attention_causal (`bool`, defaults to `True`):
            Causal self-attention over the token sequence. *(released "hyper": True; "naive": False.)*
        context_attention_scale (`float`, *optional*):
            Softmax scale; `None` means `head_dim ** -0.5`. *(released "naive": 1.0.)*
        context_long_sequence_attention (`str`, defaults to `"hyper"`):
            Attention for sequences longer than `hyper_min_seq_len` tokens: `"hyper"` approximates it with
            HyperAttention (`hyper_attention.py`: LSH-sorted block-diagonal attention plus a sampled residual,
            memory O(L · `hyper_block_size`)), as the released "hyper" layers do; `"exact"` keeps exact
            attention at any length. Shorter sequences are always exact, bit for bit. The HyperAttention
            path returns no attention weights. *(released "hyper": "hyper"; "naive": "exact".)*
        context_rms_norm_eps (`float`, defaults to 1e-5):
            Epsilon of the RMSNorms in attention blocks. *(released: 1e-5, not Llama's 1e-6.)*
        cls_token_position (`str`, defaults to `"last"`):
            Where the `"context"` classifier's CLS token joins the sequence. It never gets a position
            embedding. *(released: "last", which matters with causal attention: it sees every token.)*
        mamba_reverse_even_layers (`bool`, defaults to `True`):
            Layers 0, 2, 4, ... scan the sequence backwards, the others forwards. *(released: True.)*
        mamba_residual_from_normed (`bool`, defaults to `True`):
            The Mamba block computes `n = LayerNorm(x); x = n + Mamba(n)`: the residual is the
            normalised tensor, not the block input. *(released: True.)* `False` gives the usual
            `x + Mamba(LayerNorm(x))`.

    Training and losses:
        grad_ratio (`float`, defaults to 1.0):
            While training, the fraction of regions (in their original order) that keep gradients; the
            rest run under `no_grad`. Saves memory on very large images.
        semantic_loss_ignore_index (`int`, defaults to 255):
            Label value that segmentation losses ignore (unlabelled pixels).
        semantic_loss_dice_weight (`float`, defaults to 0.0):
            Weight of a soft Dice loss added to the segmentation cross-entropy.
        region_presence_loss_weight (`float`, defaults to 0.0):
            `XTForSemanticSegmentation` and `XTForObjectDetection`: weight of an auxiliary training loss in which each
            region's deepest tokens (context-encoded when there is a context encoder) predict which classes occur in
            the region (`region_presence.py`). It gives the context encoder a direct training signal; 0 adds no head
            and no weights. Inference never uses it.
        scene_presence_loss_weight (`float`, defaults to 0.0):
            `XTForSemanticSegmentation` and `XTForObjectDetection`: weight of an auxiliary training loss in which the
            mean of those same tokens over the whole image predicts which classes occur anywhere in it (EncNet's
            image-level loss). It asks the one region that holds a clue to a class somewhere else to encode it, where
            the region presence loss reaches that region only through the context encoder's attention. 0 adds no head
            and no weights. Inference never uses it.
        detection_heatmap_loss_weight (`float`, defaults to 1.0):
            `XTForObjectDetection`: weight of the CenterNet focal loss on the heatmap.
        detection_size_loss_weight (`float`, defaults to 0.1):
            `XTForObjectDetection`: weight of the L1 loss on box width and height (in output cells) at object centres.
        detection_offset_loss_weight (`float`, defaults to 1.0):
            `XTForObjectDetection`: weight of the L1 loss on the centre offsets (CenterNet's weights are 1, 0.1, 1).

    Post-processing thresholds:
        detection_threshold (`float`, defaults to 0.05):
            `XTForObjectDetection`: a heatmap peak (score = sigmoid of its logit) becomes a candidate detection when
            its score is above this; must be in [0, 1). Post-processing thresholds the merged detections again.
        detection_max_detections (`int`, defaults to 100):
            `XTForObjectDetection`: at most this many candidates per region, and this many merged detections per
            image (the length of `logits` and `pred_boxes`).
        detection_nms_iou (`float`, defaults to 0.5):
            `XTForObjectDetection`: IoU above which class-wise NMS suppresses the weaker of two detections when the
            regions' detections are merged (an object crossing a region border is reported by both regions).

    Runtime (how the model runs; outputs never change beyond float rounding):
        region_encoder_attention (`str`, defaults to `"sdpa"`):
            Window attention of a Swin-v2 region encoder: `"sdpa"` (`swinv2_attention.py`: one fused
            `scaled_dot_product_attention` call per block, same weights) or `"eager"` (transformers' own
            modules, the reference). Other backbones ignore it.
        region_batch_size (`int`, *optional*, defaults to 16):
            The forward encodes (and decodes) at most this many regions at a time, bounding peak memory; `None`:
            all regions of the batch at once. Runtime default: the engine (`xt_hf.engine`, the `xt-hf` commands)
            uses it when the caller gives no `region_batch_size` (16 when it is `None`). Memory and time:
            docs/performance.md.
        context_token_chunk_size (`int`, defaults to 2048):
            Tokens per chunk of the context encoder's per-token layers. Runtime default: the engine
            (`xt_hf.engine`, the `xt-hf` commands) uses it when the caller gives no `token_chunk_size`; the model's
            forward does not read it. Memory: docs/gigapixel.md ("Memory knobs").

    Validation: `@strict` checks each field when it is set (at construction, by `from_pretrained`, or by assignment):
    its type, and its range where the field has a validator (`at_least`, `positive`, `in_range`, ...). The string
    choice fields (`context_encoder`, `context_long_sequence_attention`, `context_position_embedding`,
    `cls_token_position`, `classifier`, `region_encoder_attention`) accept exactly the values of their `Literal`
    annotation, see `XTConfig.allowed_values(name)`. Rules between fields (`validate_architecture`) and
    `num_labels` ≥ 1 (the length of `id2label`, `validate_labels`) are checked after construction and by
    `config.validate()`. A bad value raises `ValueError` naming the field.

    Unknown keys: a keyword argument or `config.json` key that is not a field is kept as an attribute, as
    transformers does. If it is close to a field name (e.g. `region_szie`), a `UserWarning` (Python's `warnings`
    module, so `warnings.simplefilter("error")` makes it fatal) names the field it probably meant, since that field
    silently keeps its default. Keys that transformers itself writes to `config.json` (`auto_map`, `model_type`,
    `transformers_version`, `torch_dtype`, ...) never warn.
    """

    model_type = "xt"
    sub_configs_defaults = {
        "backbone_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="swinv2",
            init_kwargs={
                "image_size": 256,
                "window_size": 16,
                "embed_dim": 96,
                "depths": [2, 2, 6, 2],
                "num_heads": [3, 6, 12, 24],
                "drop_path_rate": 0.0,
                "out_features": ["stage4"],
            },
        ),
    }

    region_size: int = validated_field(at_least(1), default=256)
    backbone_config: dict | PreTrainedConfig | None = None
    region_encoder_output_norm: bool = False
    region_encoder_attention: Literal["eager", "sdpa"] = "sdpa"
    region_batch_size: int | None = validated_field(optional(at_least(1)), default=16)
    grad_ratio: float | int = validated_field(in_range(0, 1, low_open=True), default=1.0)

    context_encoder: Literal["none", "attention", "mamba"] = "attention"
    context_hidden_size: int = validated_field(at_least(1), default=768)
    context_num_layers: int = validated_field(at_least(1), default=2)
    context_num_heads: int | None = validated_field(optional(at_least(1)), default=None)
    context_mlp_ratio: float | int = validated_field(positive, default=4.0)
    context_token_chunk_size: int = validated_field(at_least(1), default=2048)
    context_attention_causal: bool = True
    context_attention_scale: float | int | None = None
    context_qkv_bias: bool = True
    context_long_sequence_attention: Literal["exact", "hyper"] = "hyper"
    hyper_min_seq_len: int = validated_field(at_least(1), default=4096)
    hyper_lsh_num_projs: int = validated_field(in_range(0, 16), default=7)  # 2**n LSH buckets
    hyper_block_size: int = validated_field(at_least(1), default=256)
    hyper_sample_size: int = validated_field(at_least(0), default=256)
    context_rms_norm_eps: float = 1e-5
    context_layer_norm_eps: float = 1e-5
    context_position_embedding: Literal["sincos_2d", "none"] = "sincos_2d"
    cls_token_position: Literal["last", "first"] = "last"
    in_context_patches: int = validated_field(window_length, default=-1)

    mamba_d_state: int = validated_field(at_least(1), default=16)
    mamba_d_conv: int = validated_field(at_least(1), default=4)
    mamba_expand: int = validated_field(at_least(1), default=2)
    mamba_dt_rank: int | None = validated_field(optional(at_least(1)), default=None)
    mamba_reverse_even_layers: bool = True
    mamba_residual_from_normed: bool = True

    classifier: Literal["pool", "context"] = "context"
    classifier_mlp_ratio: int = validated_field(at_least(1), default=4)
    decoder_hidden_size: int = validated_field(at_least(1), default=64)
    decoder_output_stride: int = 1
    semantic_loss_ignore_index: int = 255
    semantic_loss_dice_weight: float | int = validated_field(at_least(0), default=0.0)
    region_presence_loss_weight: float | int = validated_field(at_least(0), default=0.0)
    scene_presence_loss_weight: float | int = validated_field(at_least(0), default=0.0)
    detection_threshold: float | int = validated_field(in_range(0, 1, high_open=True), default=0.05)
    detection_max_detections: int = validated_field(at_least(1), default=100)
    detection_nms_iou: float | int = validated_field(in_range(0, 1, low_open=True), default=0.5)
    detection_region_class_prior: bool = True
    detection_heatmap_loss_weight: float | int = validated_field(at_least(0), default=1.0)
    detection_size_loss_weight: float | int = validated_field(at_least(0), default=0.1)
    detection_offset_loss_weight: float | int = validated_field(at_least(0), default=1.0)
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        _check_backbone_model_type(self.backbone_config)
        requested_num_labels = kwargs.get("num_labels")
        super().__post_init__(**kwargs)
        if requested_num_labels is not None and requested_num_labels < 1:
            # `num_labels=-3` leaves an empty `id2label`; report the number that was asked for.
            raise ValueError(f"`num_labels` must be ≥ 1, got {requested_num_labels}.")
        if self.context_num_heads is None:
            self.context_num_heads = max(1, self.context_hidden_size // 128)
        if self.mamba_dt_rank is None:
            self.mamba_dt_rank = math.ceil(self.context_hidden_size / 16)
        # The region is the backbone's whole input image; keep the two from disagreeing.
        image_size = getattr(self.backbone_config, "image_size", None)
        if isinstance(image_size, (list, tuple)):
            self.backbone_config.image_size = [self.region_size, self.region_size]
        elif image_size is not None:
            self.backbone_config.image_size = self.region_size

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs) -> tuple[dict, dict]:
        """`PreTrainedConfig.get_config_dict` (what `from_pretrained` reads), refusing another model type's config:
        transformers would only log a warning and build an xT model of default size from its unrelated keys."""
        with named_missing_folder(pretrained_model_name_or_path):
            config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        model_type = config_dict.get("model_type")
        if model_type is not None and model_type != cls.model_type:
            architectures = config_dict.get("architectures") or []
            saved = f" ({', '.join(map(str, architectures))})" if architectures else ""
            raise ValueError(
                f"{pretrained_model_name_or_path} holds a {model_type!r} model{saved}, not an xT one: its config.json "
                f"has model_type={model_type!r} where {cls.__name__} needs {cls.model_type!r}. Load it with its own "
                f"class (or AutoModel), or give the folder or Hub id of a saved xT model."
            )
        return config_dict, kwargs

    @classmethod
    def allowed_values(cls, name: str) -> tuple:
        """The values the string choice field `name` accepts, read from its `Literal` annotation."""
        field = cls.__dataclass_fields__.get(name)
        if field is None or get_origin(field.type) is not Literal:
            choice_fields = sorted(n for n, f in cls.__dataclass_fields__.items() if get_origin(f.type) is Literal)
            raise KeyError(f"{name!r} is not a choice field of {cls.__name__}: {choice_fields}.")
        return get_args(field.type)

    def validate_architecture(self):
        """Rules between fields (`@strict` runs every `validate_*` method after construction and in `validate()`)."""
        super().validate_architecture()
        if getattr(self.backbone_config, "model_type", None) not in MODEL_FOR_BACKBONE_MAPPING_NAMES:
            raise ValueError(
                f"`backbone_config` must be the config of a transformers backbone (AutoBackbone: Swinv2Config, "
                f"HieraConfig, ConvNextConfig, TimmBackboneConfig, ...), got {type(self.backbone_config).__name__}."
            )
        if self.classifier == "context" and self.context_encoder == "none":
            raise ValueError(
                '`classifier="context"` reads a CLS token that only a context encoder can fill: set '
                '`context_encoder` to "attention" or "mamba", or use `classifier="pool"`.'
            )
        if self.context_position_embedding == "sincos_2d" and self.context_hidden_size % 4:
            raise ValueError(
                f"`context_hidden_size` must be a multiple of 4 for the 2-D sin-cos position embedding, "
                f"got {self.context_hidden_size}."
            )
        heads = self.context_num_heads
        if heads is not None and self.context_hidden_size % heads:
            raise ValueError(
                f"`context_num_heads` ({heads}) must divide `context_hidden_size` ({self.context_hidden_size})."
            )
        stride = self.decoder_output_stride
        if stride < 1 or self.region_size % stride:
            raise ValueError(
                f"`decoder_output_stride` must be ≥ 1 and divide `region_size` ({self.region_size}), got {stride!r}."
            )

    def validate_labels(self):
        """`num_labels` (the length of `id2label`) must be ≥ 1."""
        if self.num_labels is None or self.num_labels < 1:
            raise ValueError(
                f"`num_labels` must be ≥ 1 (one output per class; 1 for regression), got {self.num_labels} "
                f"(`id2label` has {len(self.id2label or {})} entries)."
            )


def _warn_about_misspelt_keys(config, kwargs: dict, stacklevel: int) -> None:
    """Warn for each unknown key in `kwargs` that looks like a misspelt field of `config` (difflib, ratio ≥ 0.8).
    `stacklevel` is the one the caller would give `warnings.warn`."""
    cls = type(config)
    fields = set(cls.__dataclass_fields__) | {"num_labels"}
    for key in kwargs:
        if not isinstance(key, str) or key in fields or key in _TRANSFORMERS_KEYS:
            continue
        suggestion = difflib.get_close_matches(key, fields, n=1, cutoff=0.8)
        if suggestion:
            name = suggestion[0]
            current = "" if name == "num_labels" else f" (it is {getattr(config, name)!r})"
            warnings.warn(
                f"{cls.__name__} got the unknown key `{key}`: did you mean `{name}`? `{key}` is kept as an extra "
                f"attribute but nothing reads it, and `{name}` is not set from it{current}.",
                UserWarning,
                stacklevel=stacklevel + 1,
            )


# A Hub repo id: "name" or "org/name", letters, digits, '-', '_' and '.'; anything else with a slash is a path.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def looks_like_local_path(name) -> bool:
    """Whether `from_pretrained(name)` can only mean a folder on this machine: absolute, starting with `./`, `../` or
    `~`, or with path separators that no Hub repo id has (`org/name` stays a repo id)."""
    if not isinstance(name, str):
        return hasattr(name, "__fspath__")
    return name.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in name or (
        "/" in name and not _REPO_ID.fullmatch(name))


@contextlib.contextmanager
def named_missing_folder(name):
    """Turn the Hub's repo-id error for a local path that is not a folder ("Repo id must be in the form ...") into
    one that says so. transformers treats `name` as a Hub id only after finding no folder there, so the path does
    not exist (or is a file); this module reads no files to tell which."""
    try:
        yield
    except (HFValidationError, OSError) as error:
        invalid_id = isinstance(error, HFValidationError) or isinstance(error.__cause__, HFValidationError)
        if not (invalid_id and looks_like_local_path(name)):
            raise
        path = str(name.__fspath__()) if hasattr(name, "__fspath__") else name
        why = (f"from_pretrained does not expand `~`, give the full path (os.path.expanduser({path!r}))"
               if path.startswith("~") else "it does not exist")
        raise FileNotFoundError(
            f"No folder {path}: {why}. from_pretrained takes a folder written by save_pretrained or a Hub repo id "
            f"such as 'org/name'."
        ) from error


def _check_backbone_model_type(backbone_config) -> None:
    """A `ValueError` naming a `backbone_config` dict's `model_type` when no transformers backbone has it, with the
    closest backbone types; transformers would otherwise fail with a bare `KeyError: 'swinv3'`."""
    if not isinstance(backbone_config, dict) or "model_type" not in backbone_config:
        return
    model_type = backbone_config["model_type"]
    if model_type in MODEL_FOR_BACKBONE_MAPPING_NAMES:
        return
    backbones = sorted(MODEL_FOR_BACKBONE_MAPPING_NAMES)
    close = difflib.get_close_matches(str(model_type), backbones, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(name) for name in close)}? " if close else ""
    raise ValueError(
        f"backbone_config has model_type={model_type!r}, which is not a transformers backbone: {hint}"
        f"the backbone types are {', '.join(backbones)} (xT's default is 'swinv2')."
    )


# The choice fields' allowed values, for code that wants them as constants; read from the annotations.
CONTEXT_ENCODERS = XTConfig.allowed_values("context_encoder")
CLASSIFIERS = XTConfig.allowed_values("classifier")
LONG_SEQUENCE_ATTENTIONS = XTConfig.allowed_values("context_long_sequence_attention")

__all__ = ["XTConfig"]
