"""What the whole-scene engine asks of a task model: one small interface, two kinds of head.

A head either answers for the whole image from the context encoding (classification), or answers per
region from that region's own features and its context tokens (segmentation, detection). The engine
encodes the scene once, then calls the head; a new task needs no engine change, only one of these methods.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..modeling_xt import XTModelOutput


@runtime_checkable
class ContextHead(Protocol):
    """A head that reads the whole scene's context encoding (the pooled state, the tokens)."""

    def logits_from_context(self, encoded: XTModelOutput) -> torch.Tensor:
        """`(batch, ...)` outputs from the context encoding alone."""


@runtime_checkable
class RegionHead(Protocol):
    """A head whose output for a region depends only on that region's features and its context tokens."""

    def decode_regions(self, stage_features: list[torch.Tensor], context: torch.Tensor | None) -> torch.Tensor:
        """Regions' stage maps `(n, C_s, h_s, w_s)` and context tokens `(n, D, h, w)` → `(n, ...)` outputs."""


def require_head(model, kind: type, task: str) -> None:
    """Fail, naming the model and what the task needs, when `model` lacks the `kind` of head."""
    if not isinstance(model, kind):
        needs = "a whole-image head (an image classifier)" if kind is ContextHead else (
            "a per-region head (a segmenter or detector)")
        raise ValueError(f"{task} needs {needs}; {type(model).__name__} has none.")
