"""xT models: nested tokenization → region encoder → stitch → context encoder → head."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import ImageClassifierOutput, SemanticSegmenterOutput
from transformers.utils import ModelOutput, auto_docstring, can_return_tuple

from .configuration_xt import XTConfig, named_missing_folder
from .context_encoder import ContextEncoding, XTContextEncoder
from .context_mamba import XTMambaMixer
from .detection_head import (
    XTCenterNetHead,
    XTHeatmapLogits,
    XTRegionClassPrior,
    box_convert,
    centernet_loss,
    check_detection_labels,
    detections_from_dense_maps,
    merge_region_detections,
)
from .nested_tokenization import (
    RegionIndex,
    decode_region_batches,
    nested_tokenize,
    pad_to_region_multiple,
    region_batches,
    region_grid_shape,
    stitch_batches,
)
from .region_encoder import XTRegionEncoder
from .region_presence import XTRegionPresenceHead, presence_from_boxes, presence_from_masks, region_presence_loss
from .segmentation_decoder import XTSegmentationDecoder


@dataclass
class XTModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, rows·h · cols·w, hidden_size)`):
        Context-encoded tokens of the stitched grid, row-major over the whole image (the stitched
        region features themselves when `context_encoder="none"`). Excludes the CLS token.
    pooler_output (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
        The CLS state for `classifier="context"`, else the mean of `last_hidden_state`.
    region_feature_maps (`tuple(torch.FloatTensor)`, *optional*, returned with `output_region_features=True`):
        One stitched `(batch_size, channels, rows·h, cols·w)` map per `backbone_config.out_features` stage.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
        The context encoder's input and each block's output `(batch_size, tokens, hidden_size)` (CLS included);
        without a context encoder, the stitched tokens alone.
    attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True` and eager attention):
        Attention weights of each context block.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    region_feature_maps: tuple[torch.FloatTensor, ...] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@auto_docstring
class XTPreTrainedModel(PreTrainedModel):
    config: XTConfig
    config_class = XTConfig
    base_model_prefix = "xt"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["XTRegionEncoder", "XTAttentionBlock", "XTMambaBlock"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`; a local path that is not a folder is named as such (not as a malformed
        Hub repo id), and another model type's folder is refused (`XTConfig.get_config_dict`)."""
        with named_missing_folder(pretrained_model_name_or_path):
            return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, XTRegionClassPrior):  # a new detector starts as the plain CenterNet head
            init.zeros_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, XTContextEncoder) and module.cls_token is not None:
            # As the original: a near-zero CLS, so it starts as a pure "query" of the sequence.
            init.normal_(module.cls_token, std=1e-6)
        elif isinstance(module, XTMambaMixer):
            # Runs after its Linear children (children are initialised first), so its own scheme wins.
            module.reset_parameters()
        elif isinstance(module, XTHeatmapLogits):
            super()._init_weights(module)
            init.constant_(module.bias, module.bias_init)  # CenterNet's prior: every cell starts at p = 0.1
        else:
            super()._init_weights(module)

    @torch.no_grad()
    def adapt_input_channels(self, num_channels: int) -> None:
        """Make a model trained on 3-channel images take `num_channels` (1 for grey, 2 for SAR VV/VH, 4-13
        multispectral), keeping what the first convolution learned.

        Every new input channel gets the mean of the old filters, scaled by `old / num_channels`: an image
        whose channels are all alike then produces exactly the activations the old model gave for it
        (with one channel this is timm's summed filter). Fine-tuning then tells the channels apart.
        Updates the config.
        """
        backbone = self.base_model.region_encoder.backbone
        old = self.config.backbone_config.num_channels
        stem = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d) and m.in_channels == old), None)
        if stem is None:
            raise ValueError(f"No {old}-channel input convolution found in the {type(backbone).__name__} region encoder.")
        summed = stem.weight.sum(dim=1, keepdim=True)
        adapted = (summed / num_channels).repeat(1, num_channels, 1, 1)
        stem.weight = nn.Parameter(adapted.contiguous())
        stem.in_channels = num_channels
        for config in (self.config.backbone_config, backbone.config):
            config.num_channels = num_channels
        if hasattr(backbone, "embeddings") and hasattr(backbone.embeddings, "patch_embeddings"):
            backbone.embeddings.patch_embeddings.num_channels = num_channels


@auto_docstring
class XTModel(XTPreTrainedModel):
    """The xT encoder: returns context-encoded tokens of the whole image and a pooled state."""

    def __init__(self, config: XTConfig):
        super().__init__(config)
        self.region_encoder = XTRegionEncoder(config)
        channels = self.region_encoder.channels[-1]
        self.context_encoder = XTContextEncoder(config, channels) if config.context_encoder != "none" else None
        self.hidden_size = config.context_hidden_size if self.context_encoder is not None else channels
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        """The region encoder's patch embedding (its first layer), which every region goes through."""
        backbone = self.region_encoder.backbone
        try:
            return backbone.get_input_embeddings()
        except (NotImplementedError, AttributeError):  # e.g. a timm backbone: its stem
            return next(module for module in backbone.modules() if isinstance(module, nn.Conv2d))

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_region_features: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> XTModelOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images of any size of at least one region per side; the bottom and right are
            zero-padded to whole regions.
        output_region_features (`bool`, *optional*):
            Also return the stitched region feature maps of every `out_features` stage.
        """
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions

        self._check_pixel_values(pixel_values)
        rows, cols = region_grid_shape(*pixel_values.shape[-2:], self.config.region_size)
        padded = pad_to_region_multiple(pixel_values, self.config.region_size)
        region_feature_maps = self.region_encoder(padded, rows, cols)
        output = self.encode_context(
            region_feature_maps,
            output_region_features=output_region_features,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        return output

    def encode_context(
        self,
        region_feature_maps: list[torch.Tensor] | tuple[torch.Tensor, ...],
        output_region_features: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> XTModelOutput:
        """Everything after the region encoder, on stitched maps `(batch, C_s, rows·h_s, cols·w_s)`.

        Lets region features computed elsewhere (streamed from disk chunk by chunk, cached) go
        through the same context encoder and pooling as `forward`.
        """
        grid = region_feature_maps[-1]
        if self.context_encoder is None:
            tokens = grid.flatten(2).transpose(1, 2)
            # No blocks: the only hidden state is the sequence itself. The decoders read the deepest stage back
            # through it (a view of the same storage), so that the hidden state lies on their gradient path.
            region_feature_maps = (*region_feature_maps[:-1], tokens.transpose(1, 2).reshape(grid.shape))
            encoding = ContextEncoding(tokens=tokens, cls_state=None,
                                       hidden_states=(tokens,) if output_hidden_states else None)
        else:
            encoding = self.context_encoder(
                grid, output_hidden_states=bool(output_hidden_states), output_attentions=bool(output_attentions)
            )
        return self.output_from_encoding(encoding, tuple(region_feature_maps) if output_region_features else None)

    @staticmethod
    def output_from_encoding(
        encoding: ContextEncoding, region_feature_maps: tuple[torch.Tensor, ...] | None = None
    ) -> XTModelOutput:
        """The model's output for a context encoding, however it was computed: the pooled state is the CLS
        state, or the tokens' mean without a CLS token."""
        pooled = encoding.cls_state if encoding.cls_state is not None else encoding.tokens.mean(dim=1)
        return XTModelOutput(
            last_hidden_state=encoding.tokens,
            pooler_output=pooled,
            region_feature_maps=region_feature_maps,
            hidden_states=encoding.hidden_states,
            attentions=encoding.attentions,
        )

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Fail early, naming the problem, instead of deep inside a backbone."""
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"pixel_values are {pixel_values.dtype}, not normalised floats: pass the image through "
                f"XTImageProcessor (or normalise it yourself) first."
            )
        weight = self.get_input_embeddings()
        expected_dtype = next(weight.parameters()).dtype
        if pixel_values.dtype != expected_dtype and not torch.is_autocast_enabled(pixel_values.device.type):
            raise ValueError(
                f"pixel_values are {pixel_values.dtype} but the model is {expected_dtype}: "
                f"use pixel_values.to({expected_dtype}) (or load the model in {pixel_values.dtype})."
            )
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must be (batch, channels, height, width), got shape {tuple(pixel_values.shape)}."
            )
        expected = self.config.backbone_config.num_channels
        if pixel_values.shape[1] != expected:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels but the region encoder expects {expected} "
                f"(backbone_config.num_channels)."
            )
        height, width = pixel_values.shape[-2:]
        region = self.config.region_size
        if height < region or width < region:
            raise ValueError(
                f"Image of {height}×{width} px is smaller than one region ({region}×{region} px): resize it to at "
                f"least {region} px per side (XTImageProcessor(do_resize=True)) or use a model with a smaller "
                f"region_size."
            )
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contains NaN or infinite values.")


class XTPoolingHead(nn.Module):
    """The original "naive" head: `Linear(C, r·C) → GELU → LayerNorm → Linear(r·C, labels)` on the pooled state."""

    def __init__(self, config: XTConfig, hidden_size: int):
        super().__init__()
        inner = hidden_size * config.classifier_mlp_ratio
        self.dense = nn.Linear(hidden_size, inner)
        self.act = nn.GELU()
        self.layernorm = nn.LayerNorm(inner, eps=config.context_layer_norm_eps)
        self.out_proj = nn.Linear(inner, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.layernorm(self.act(self.dense(pooled))))


class XTContextHead(nn.Module):
    """The original "xl" head: `LayerNorm → Linear` on the CLS state (the blocks end without a norm)."""

    def __init__(self, config: XTConfig, hidden_size: int):
        super().__init__()
        self.layernorm = nn.LayerNorm(hidden_size, eps=config.context_layer_norm_eps)
        self.out_proj = nn.Linear(hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.layernorm(pooled))


@auto_docstring
class XTForImageClassification(XTPreTrainedModel):
    """xT with a classification head on the pooled state (`classifier="pool"` or `"context"`)."""

    def __init__(self, config: XTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.xt = XTModel(config)
        head = XTContextHead if config.classifier == "context" else XTPoolingHead
        self.classifier = head(config, self.xt.hidden_size)
        self.post_init()

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)` or `torch.FloatTensor` of shape `(batch_size, num_labels)`):
            Class indices (single-label), multi-hot targets (multi-label) or values (regression, `num_labels == 1`),
            chosen by `config.problem_type` as in every transformers classification head.
        """
        outputs = self.xt(
            pixel_values,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        logits = self.logits_from_context(outputs)
        loss = None
        if labels is not None:
            loss = self.loss_function(checked_classification_labels(labels, logits, self.config), logits, self.config,
                                      **kwargs)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def logits_from_context(self, encoded: XTModelOutput) -> torch.Tensor:
        """The head's part of the forward: `(batch, num_labels)` logits from the context encoding alone (what a
        whole-scene engine calls once it has encoded a scene its own way)."""
        return self.classifier(encoded.pooler_output)


IGNORED_CLASS_LABEL = -100  # transformers' cross-entropy ignore_index: a label that takes no part in the loss


def checked_classification_labels(labels: torch.Tensor, logits: torch.Tensor, config: XTConfig) -> torch.Tensor:
    """`labels` as transformers' classification loss takes them for `config.problem_type`, or a `ValueError` that
    names what is wrong; left to the loss, a class index out of range is an `IndexError` (a device assert on CUDA)
    and float class indices a dtype error or a shape error from the multi-label loss.

    The problem type is inferred as transformers infers it (one label: regression; integer labels:
    single-label; else multi-label), but before the loss writes it into `config`, so a refused call leaves the
    config as it was.
    """
    labels = torch.as_tensor(labels, device=logits.device)
    batch, num_labels = logits.shape
    integers = not (labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool)
    problem = config.problem_type or (
        "regression" if num_labels == 1 else "single_label_classification" if integers
        else "multi_label_classification"
    )
    if problem == "single_label_classification":
        if not integers:
            raise ValueError(
                f"labels of dtype {labels.dtype} cannot be class indices: single-label classification takes integer "
                f"labels (torch.long) of shape ({batch},) in [0, {num_labels - 1}] (num_labels={num_labels}); "
                f"multi-label targets are floats of shape ({batch}, {num_labels}) with "
                f"problem_type='multi_label_classification'."
            )
        if labels.numel() != batch:
            raise ValueError(f"labels must hold one class index per image, shape ({batch},), got shape "
                             f"{tuple(labels.shape)}.")
        outside = ((labels < 0) | (labels >= num_labels)) & (labels != IGNORED_CLASS_LABEL)
        if outside.any():
            raise ValueError(
                f"labels must be class indices in [0, {num_labels - 1}] (num_labels={num_labels}) or "
                f"{IGNORED_CLASS_LABEL} (ignored), got {labels[outside].unique().tolist()[:5]}."
            )
        return labels.long()
    expected = (batch,) if problem == "regression" and num_labels == 1 else (batch, num_labels)
    if labels.numel() != batch * num_labels or (num_labels > 1 and tuple(labels.shape) != expected):
        kind = "regression targets" if problem == "regression" else "multi-label targets"
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} and dtype {labels.dtype} do not fit {problem} ({kind} are "
            f"floats of shape {expected}, num_labels={num_labels}); single-label class indices are integers "
            f"(torch.long) of shape ({batch},)."
        )
    return labels.to(logits.dtype) if not labels.is_floating_point() else labels


def check_segmentation_labels(labels: torch.Tensor, num_labels: int, ignore_index: int) -> None:
    """A `ValueError` naming the problem when `(batch, height, width)` segmentation `labels` are not integer class
    indices in `[0, num_labels)` or `ignore_index`: float masks would be truncated to classes without a word, and an
    index out of range fails deep inside the loss (a device assert on CUDA)."""
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels of dtype {labels.dtype} are not class maps: segmentation labels are integer class indices "
            f"(torch.long) in [0, {num_labels - 1}] (num_labels={num_labels}), with {ignore_index} "
            f"(semantic_loss_ignore_index) for unlabelled pixels; convert masks with .long() after checking them."
        )
    outside = ((labels < 0) | (labels >= num_labels)) & (labels != ignore_index)
    if outside.any():
        raise ValueError(
            f"labels must be class indices in [0, {num_labels - 1}] (num_labels={num_labels}) or {ignore_index} "
            f"(semantic_loss_ignore_index), got {labels[outside].unique().tolist()[:5]}."
        )


class XTRegionDecoderModel(XTPreTrainedModel):
    """What heads that decode each region from its own multi-scale features and its context tokens share
    (segmentation, detection): the encoded scene laid out for them, and their output resolution."""

    def encode_for_regions(
        self, pixel_values: torch.Tensor, output_hidden_states: bool | None, output_attentions: bool | None
    ) -> tuple[XTModelOutput, torch.Tensor | None, int, int]:
        """The encoder's output (with every stage's stitched features), the context tokens on the deepest stage's
        grid (`context_grid`), and the grid's rows and columns of regions."""
        outputs = self.xt(
            pixel_values,
            output_region_features=True,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        rows, cols = region_grid_shape(*pixel_values.shape[-2:], self.config.region_size)
        context = self.context_grid(outputs.last_hidden_state, outputs.region_feature_maps[-1].shape[-2:])
        return outputs, context, rows, cols

    def new_presence_heads(self) -> None:
        """The auxiliary heads of `region_presence_loss_weight` and `scene_presence_loss_weight` on the tokens the
        decoder fuses at its deepest stage (context tokens, or the region encoder's own without a context
        encoder); each is `None` when its weight is 0."""
        config = self.config
        self.region_presence = self.scene_presence = None
        if config.region_presence_loss_weight:
            self.region_presence = XTRegionPresenceHead(self.fused_token_width(), config.num_labels)
        if config.scene_presence_loss_weight:
            self.scene_presence = XTRegionPresenceHead(self.fused_token_width(), config.num_labels)

    def fused_token_width(self) -> int:
        """Channels of the tokens the decoder fuses at its deepest stage: the context encoder's, or the region
        encoder's deepest stage's without one."""
        config = self.config
        return config.context_hidden_size if config.context_encoder != "none" else self.xt.region_encoder.channels[-1]

    def region_presence_logits(
        self, outputs: XTModelOutput, context: torch.Tensor | None, rows: int, cols: int
    ) -> torch.Tensor:
        """`(batch, rows, cols, num_labels)` logits of the region presence head."""
        return self.region_presence(self.fused_tokens(outputs, context), rows, cols)

    @staticmethod
    def fused_tokens(outputs: XTModelOutput, context: torch.Tensor | None) -> torch.Tensor:
        """The tokens the decoder fuses at its deepest stage, on its grid: the context tokens, or the region
        encoder's deepest stage without a context encoder."""
        return outputs.region_feature_maps[-1] if context is None else context

    def presence_losses(
        self, outputs: XTModelOutput, context: torch.Tensor | None, rows: int, cols: int, presence: torch.Tensor
    ) -> tuple[torch.Tensor | float, dict[str, torch.Tensor]]:
        """The weighted sum of the presence losses against `(batch, rows, cols, num_labels)` 0/1 region targets,
        and each unweighted loss by name (`loss_region_presence`, `loss_scene_presence`)."""
        config, total, parts = self.config, 0.0, {}
        if self.region_presence is not None:
            parts["loss_region_presence"] = region_presence_loss(
                self.region_presence_logits(outputs, context, rows, cols), presence)
            total = total + config.region_presence_loss_weight * parts["loss_region_presence"]
        if self.scene_presence is not None:
            anywhere = presence.amax(dim=(1, 2), keepdim=True)  # the classes of the whole image
            parts["loss_scene_presence"] = region_presence_loss(
                self.scene_presence(self.fused_tokens(outputs, context), 1, 1), anywhere)
            total = total + config.scene_presence_loss_weight * parts["loss_scene_presence"]
        return total, parts

    def context_grid(self, tokens: torch.Tensor, grid_shape: tuple[int, int]) -> torch.Tensor | None:
        """Context-encoded tokens `(batch, H_S·W_S, D)` put back on the deepest stitched stage's grid of
        `grid_shape` `(H_S, W_S)`: `(batch, D, H_S, W_S)`; `None` without a context encoder."""
        if self.xt.context_encoder is None:
            return None
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid_shape)

    def decode(
        self, region_feature_maps: tuple[torch.Tensor, ...], context: torch.Tensor | None, rows: int, cols: int,
        each: Callable[[RegionIndex, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Decode every region (`decode_regions`), `region_batch_size` at a time (`decode_region_batches`), into one
        stitched `(batch, C, rows·R/s, cols·R/s)` grid; `each(index, outputs)` also sees every batch's outputs."""
        batch, device = region_feature_maps[0].shape[0], region_feature_maps[0].device
        indexes = (index.to(device) for index in region_batches(batch, rows, cols, self.config.region_batch_size))
        batches = ((index, [nested_tokenize(stage, index) for stage in region_feature_maps]) for index in indexes)

        def decoded():
            for index, outputs in decode_region_batches(self.decode_regions, batches, context):
                if each is not None:
                    each(index, outputs)
                yield index, (outputs,)

        (stitched,) = stitch_batches(decoded(), batch, rows, cols)
        return stitched

    def at_output_resolution(self, region_maps: torch.Tensor) -> torch.Tensor:
        """Regions' decoded maps `(n, C, h, w)` at the output resolution, `region_size / decoder_output_stride`."""
        side = self.config.region_size // self.config.decoder_output_stride
        if region_maps.shape[-2:] != (side, side):
            region_maps = F.interpolate(region_maps, size=(side, side), mode="bilinear", align_corners=False)
        return region_maps

    def cropped(self, maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Stitched output maps without the rows and columns that cover only the padding of a `height × width` input."""
        rows, cols = region_grid_shape(height, width, self.config.decoder_output_stride)
        return maps[..., :rows, :cols]


@auto_docstring
class XTForSemanticSegmentation(XTRegionDecoderModel):
    """xT with a per-region U-Net decoder: multi-scale region features plus context-encoded tokens → logits.

    Logits cover the input at `1 / decoder_output_stride` of its resolution (padding cropped away).
    """

    def __init__(self, config: XTConfig):
        super().__init__(config)
        self.xt = XTModel(config)
        context_channels = config.context_hidden_size if config.context_encoder != "none" else 0
        self.decoder = XTSegmentationDecoder(config, self.xt.region_encoder.channels, context_channels)
        self.new_presence_heads()
        self.post_init()

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            Class index per pixel at the input's resolution; `config.semantic_loss_ignore_index` marks pixels
            without a label. The loss is cross-entropy (plus soft Dice with `semantic_loss_dice_weight`).
        """
        height, width = pixel_values.shape[-2:]
        if labels is not None and tuple(labels.shape) != (pixel_values.shape[0], height, width):
            raise ValueError(
                f"labels must be (batch, height, width) = {(pixel_values.shape[0], height, width)} to match "
                f"pixel_values, got {tuple(labels.shape)}."
            )
        if labels is not None:
            check_segmentation_labels(labels, self.config.num_labels, self.config.semantic_loss_ignore_index)
        outputs, context, rows, cols = self.encode_for_regions(pixel_values, output_hidden_states, output_attentions)
        logits = self.cropped(self.decode(outputs.region_feature_maps, context, rows, cols), height, width)

        loss = None
        if labels is not None:
            loss = self.segmentation_loss(logits, labels)
            if self.region_presence is not None or self.scene_presence is not None:
                presence = presence_from_masks(labels, self.config.num_labels, self.config.region_size,
                                               self.config.semantic_loss_ignore_index)
                loss = loss + self.presence_losses(outputs, context, rows, cols, presence)[0]
        return SemanticSegmenterOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def decode_regions(self, stage_features: list[torch.Tensor], context: torch.Tensor | None) -> torch.Tensor:
        """Regions' stage maps `(n, C_s, h_s, w_s)` (and their context tokens `(n, D, h, w)`) → their logits
        `(n, num_labels, R/stride, R/stride)`. A region's output depends on nothing else, which is what lets an
        engine decode a whole scene region by region."""
        return self.at_output_resolution(self.decoder(stage_features, context))

    def segmentation_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over labelled pixels (at the labels' resolution), plus weighted soft Dice."""
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        ignore = self.config.semantic_loss_ignore_index
        loss = F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore)
        if self.config.semantic_loss_dice_weight > 0:
            labelled = (labels != ignore).unsqueeze(1)
            probabilities = logits.float().softmax(dim=1) * labelled
            targets = F.one_hot(labels.long().where(labels != ignore, 0), logits.shape[1]).permute(0, 3, 1, 2)
            targets = targets * labelled
            intersection = (probabilities * targets).sum(dim=(0, 2, 3))
            total = probabilities.sum(dim=(0, 2, 3)) + targets.sum(dim=(0, 2, 3))
            dice = 1 - (2 * intersection + 1) / (total + 1)
            loss = loss + self.config.semantic_loss_dice_weight * dice.mean()
        return loss


@dataclass
class XTObjectDetectionOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` are provided):
        `detection_heatmap_loss_weight · loss_heatmap + detection_size_loss_weight · loss_size +
        detection_offset_loss_weight · loss_offset`.
    loss_dict (`dict[str, torch.FloatTensor]`, *optional*, returned when `labels` are provided):
        The unweighted parts: `loss_heatmap` (CenterNet focal loss), `loss_size` and `loss_offset` (L1 per object).
    logits (`torch.FloatTensor` of shape `(batch_size, detection_max_detections, num_labels)`):
        The merged detections, best first: each row holds the detection's heatmap logit at its class and `-inf`
        elsewhere (rows past the last detection are all `-inf`), so `sigmoid` and a max over the classes give back
        its score and label.
    pred_boxes (`torch.FloatTensor` of shape `(batch_size, detection_max_detections, 4)`):
        Their boxes, `(center_x, center_y, width, height)` normalised by the size of `pixel_values` (padding
        included); zeros past the last detection. `XTImageProcessor.post_process_object_detection` turns them into
        pixel corners.
    heatmap (`torch.FloatTensor` of shape `(batch_size, num_labels, ⌈height/s⌉, ⌈width/s⌉)`):
        Class heatmap logits at `s = decoder_output_stride`, every region's stitched (padding cropped away).
    box_sizes (`torch.FloatTensor` of shape `(batch_size, 2, ⌈height/s⌉, ⌈width/s⌉)`):
        Box width and height in output cells (`s` pixels).
    box_offsets (`torch.FloatTensor` of shape `(batch_size, 2, ⌈height/s⌉, ⌈width/s⌉)`):
        The centre's x, y offset from its cell's top-left corner, in output cells.
    image_sizes (`torch.LongTensor` of shape `(batch_size, 2)`):
        `(height, width)` of `pixel_values`: the frame `pred_boxes` are normalised to.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states=True`):
        The context encoder's hidden states, as `XTModel` returns them.
    attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True` and eager attention):
        Attention weights of each context block.
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict | None = None
    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    heatmap: torch.FloatTensor | None = None
    box_sizes: torch.FloatTensor | None = None
    box_offsets: torch.FloatTensor | None = None
    image_sizes: torch.LongTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@auto_docstring
class XTForObjectDetection(XTRegionDecoderModel):
    """xT for small objects in huge scenes: the per-region U-Net decoder (multi-scale region features plus the
    region's context tokens) feeds an anchor-free, CenterNet-style dense head at `1 / decoder_output_stride`: a class
    heatmap, box sizes and centre offsets (`detection_head.py`).

    A region's dense maps depend only on its own pixels and its context tokens (`decode_regions`); its peaks are
    found inside it (`detections_from_dense_maps`) and the regions' boxes are merged across borders with class-wise
    NMS (`merge_region_detections`). The forward runs exactly these pieces region by region, so an engine streaming a
    whole scene region by region reproduces it. CenterNet works at stride 4: set `decoder_output_stride=4`.
    """

    def __init__(self, config: XTConfig):
        super().__init__(config)
        self.xt = XTModel(config)
        context_channels = config.context_hidden_size if config.context_encoder != "none" else 0
        # The segmentation decoder's U-Net trunk; the dense head replaces its per-pixel classifier.
        self.decoder = XTSegmentationDecoder(config, self.xt.region_encoder.channels, context_channels)
        self.decoder.classifier = nn.Identity()
        self.detection_head = XTCenterNetHead(config.decoder_hidden_size, config.num_labels)
        self.region_class_prior = None
        if config.detection_region_class_prior:
            self.region_class_prior = XTRegionClassPrior(self.fused_token_width(), config.num_labels)
        self.new_presence_heads()
        self.post_init()

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: list[dict] | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> XTObjectDetectionOutput | tuple:
        r"""
        labels (`list[dict]`, *optional*):
            One dict per image, as transformers' detection models take them (and `XTImageProcessor` makes them from
            COCO annotations): `class_labels` `(m,)` integers in `[0, num_labels)` and `boxes` `(m, 4)` normalised
            `(center_x, center_y, width, height)` relative to `pixel_values`' size. An image may have no objects.
            The loss is CenterNet's: focal loss on the Gaussian-splatted heatmap plus L1 on sizes and offsets at the
            object centres.
        """
        batch, height, width = pixel_values.shape[0], *pixel_values.shape[-2:]
        targets = None
        if labels is not None:
            targets = check_detection_labels(labels, batch, self.config.num_labels, pixel_values.device)
        outputs, context, rows, cols = self.encode_for_regions(pixel_values, output_hidden_states, output_attentions)
        found = [([], []) for _ in range(batch)]  # each image's regions' detections and origins, in region order

        def collect(index: RegionIndex, region_maps: torch.Tensor) -> None:
            for image, detections, origin in self.region_detections(index, region_maps):
                found[image][0].append(detections)
                found[image][1].append(origin)

        maps = self.cropped(self.decode(outputs.region_feature_maps, context, rows, cols, each=collect), height, width)
        detections = [self.merge_detections(*found[image], (height, width)) for image in range(batch)]
        stride = self.config.decoder_output_stride
        logits, pred_boxes = self.padded_detections(detections, (height, width), maps)

        loss = loss_dict = None
        if targets is not None:
            weights = (self.config.detection_heatmap_loss_weight, self.config.detection_size_loss_weight,
                       self.config.detection_offset_loss_weight)
            loss, loss_dict = centernet_loss(maps, targets, image_size=(height, width), stride=stride, weights=weights)
            if self.region_presence is not None or self.scene_presence is not None:
                presence = presence_from_boxes(targets, self.config.num_labels, (height, width), self.config.region_size)
                presence_loss, presence_parts = self.presence_losses(outputs, context, rows, cols, presence)
                loss_dict.update(presence_parts)
                loss = loss + presence_loss
        num_labels = self.config.num_labels
        return XTObjectDetectionOutput(
            loss=loss,
            loss_dict=loss_dict,
            logits=logits,
            pred_boxes=pred_boxes,
            heatmap=maps[:, :num_labels],
            box_sizes=maps[:, num_labels : num_labels + 2],
            box_offsets=maps[:, num_labels + 2 :],
            image_sizes=torch.tensor([[height, width]] * batch, device=pixel_values.device),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def decode_regions(self, stage_features: list[torch.Tensor], context: torch.Tensor | None) -> torch.Tensor:
        """Regions' stage maps `(n, C_s, h_s, w_s)` (and their context tokens `(n, D, h, w)`) → their dense maps
        `(n, num_labels + 4, R/s, R/s)`: heatmap logits, then box width, height, then centre offset x, y, sizes and
        offsets in output cells (`s = decoder_output_stride` pixels). A region's maps depend on nothing else."""
        maps = self.detection_head(self.at_output_resolution(self.decoder(stage_features, context)))
        if self.region_class_prior is None:
            return maps
        num_labels = self.config.num_labels
        heatmap = self.region_class_prior(maps[:, :num_labels], stage_features[-1] if context is None else context)
        return torch.cat([heatmap, maps[:, num_labels:]], dim=1)

    def detect_regions(self, maps: torch.Tensor, threshold: float | None = None) -> list[dict[str, torch.Tensor]]:
        """`detections_from_dense_maps` of regions' maps with the config's stride and limit, and its threshold
        unless one is given."""
        return detections_from_dense_maps(
            maps, stride=self.config.decoder_output_stride, max_detections=self.config.detection_max_detections,
            threshold=self.config.detection_threshold if threshold is None else threshold,
        )

    def region_detections(
        self, index: RegionIndex, maps: torch.Tensor, threshold: float | None = None
    ) -> Iterator[tuple[int, dict[str, torch.Tensor], tuple[int, int]]]:
        """Each region's detections (`detect_regions` of its maps) with its image and its origin `(x, y)` in the
        image's pixels, for `merge_detections`."""
        region = self.config.region_size
        places = zip(index.image.tolist(), index.row.tolist(), index.col.tolist())
        for detections, (image, row, col) in zip(self.detect_regions(maps, threshold), places):
            yield image, detections, (col * region, row * region)

    def merge_detections(
        self, region_detections: list[dict[str, torch.Tensor]], region_origins: list[tuple[int, int]],
        image_size: tuple[int, int] | None,
    ) -> dict[str, torch.Tensor]:
        """`merge_region_detections` with the config's NMS IoU threshold and limit."""
        return merge_region_detections(
            region_detections, region_origins, iou_threshold=self.config.detection_nms_iou,
            max_detections=self.config.detection_max_detections, image_size=image_size,
        )

    def padded_detections(
        self, detections: list[dict[str, torch.Tensor]], image_size: tuple[int, int], like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged detections as transformers' `(logits, pred_boxes)`: `(batch, max_detections, num_labels)` with
        the heatmap logit at the label and `-inf` elsewhere, and normalised `(cx, cy, w, h)` (zeros when absent)."""
        batch, limit, num_labels = len(detections), self.config.detection_max_detections, self.config.num_labels
        height, width = image_size
        logits = torch.full((batch, limit, num_labels), float("-inf"), device=like.device, dtype=torch.float32)
        pred_boxes = torch.zeros(batch, limit, 4, device=like.device, dtype=torch.float32)
        scale = torch.tensor([width, height, width, height], device=like.device, dtype=torch.float32)
        for image, found in enumerate(detections):
            count = len(found["scores"])
            rows = torch.arange(count, device=like.device)
            logits[image, rows, found["labels"]] = torch.logit(found["scores"].float())
            pred_boxes[image, :count] = box_convert(found["boxes"].float(), "xyxy", "cxcywh") / scale
        return logits, pred_boxes


__all__ = [
    "XTForImageClassification",
    "XTForObjectDetection",
    "XTForSemanticSegmentation",
    "XTModel",
    "XTModelOutput",
    "XTObjectDetectionOutput",
    "XTPreTrainedModel",
    "detections_from_dense_maps",
    "merge_region_detections",
]
