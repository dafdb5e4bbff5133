"""Region presence: an auxiliary loss that asks each region's deepest tokens which classes occur in the region.

Why: a per-region decoder learns to use the context tokens only through a long, weak gradient path (pixel loss →
decoder → fused deepest stage → context encoder), and on tasks where a region's answer lies several regions away
the context encoder can stay unused for thousands of steps. Asking the tokens the decoder reads at its deepest
stage (context-encoded where there is a context encoder, the region encoder's own otherwise, so that a model
with and one without a context encoder are trained alike) to predict the classes present in their region gives
that path a direct signal. It is EncNet's "semantic encoding" loss (Zhang et al., 2018), per region instead of
per image. It costs one linear layer and is used only in training: inference never reads the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .nested_tokenization import pad_to_region_multiple, region_grid_shape


class XTRegionPresenceHead(nn.Module):
    """Mean of a region's deepest tokens → one logit per class: does the class occur in the region?"""

    def __init__(self, hidden_size: int, num_labels: int):
        super().__init__()
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, grid: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """`(batch, D, rows·h, cols·w)` tokens → `(batch, rows, cols, num_labels)` presence logits."""
        pooled = F.adaptive_avg_pool2d(grid, (rows, cols)) if grid.shape[-2:] != (rows, cols) else grid
        return self.classifier(pooled.permute(0, 2, 3, 1).float())


def presence_from_masks(labels: torch.Tensor, num_labels: int, region_size: int, ignore_index: int) -> torch.Tensor:
    """Pixel labels `(batch, H, W)` → `(batch, rows, cols, num_labels)` 0/1: which classes each region holds
    (ignored pixels and the padding to whole regions count as nothing)."""
    batch, height, width = labels.shape
    rows, cols = region_grid_shape(height, width, region_size)
    labels = labels.long().masked_fill(labels == ignore_index, num_labels)  # one spare class for "nothing"
    labels = pad_to_region_multiple(labels, region_size, value=num_labels)
    one_hot = F.one_hot(labels, num_labels + 1)[..., :num_labels]
    one_hot = one_hot.view(batch, rows, region_size, cols, region_size, num_labels)
    return one_hot.amax(dim=(2, 4)).float()


def presence_from_boxes(
    targets: list[dict[str, torch.Tensor]], num_labels: int, image_size: tuple[int, int], region_size: int
) -> torch.Tensor:
    """Checked detection labels (normalised `cx, cy, w, h` relative to `image_size`) → `(batch, rows, cols,
    num_labels)` 0/1: the classes of the objects whose centre lies in each region."""
    height, width = image_size
    rows, cols = region_grid_shape(height, width, region_size)
    presence = torch.zeros(len(targets), rows, cols, num_labels, device=targets[0]["boxes"].device if targets else None)
    for image, target in enumerate(targets):
        boxes = target["boxes"]
        row = (boxes[:, 1] * height / region_size).long().clamp(0, rows - 1)
        col = (boxes[:, 0] * width / region_size).long().clamp(0, cols - 1)
        presence[image, row, col, target["class_labels"]] = 1.0
    return presence


def region_presence_loss(logits: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of presence logits against 0/1 targets, both `(batch, rows, cols, num_labels)`."""
    return F.binary_cross_entropy_with_logits(logits.float(), presence.to(logits.device))
