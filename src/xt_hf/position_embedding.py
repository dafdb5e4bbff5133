"""Fixed 2-D sin-cos position embedding of the stitched token grid (MAE style)."""

from __future__ import annotations

import torch


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """`[sin(p·ω), cos(p·ω)]` with `ω_k = 10000^(-k/(dim/2))`: `(n,) -> (n, dim)`, float32.

    Computed in float32 in the same order as the original numpy code, so that released models see
    the same embedding to the last bit (the difference is otherwise ~1e-6 at large grid positions).
    """
    omega = torch.arange(dim // 2, dtype=torch.float32, device=positions.device)
    omega = 1.0 / 10000 ** (omega / (dim / 2.0))
    angles = positions.to(torch.float32)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d_position_embedding(
    rows: int, cols: int, dim: int, *, device: torch.device | None = None
) -> torch.Tensor:
    """Embedding of every cell of a `rows × cols` grid, flattened row-major: `(rows·cols, dim)`, float32."""
    return sincos_2d_position_embedding_at(*grid_cells(rows, cols, device=device), dim)


def grid_cells(rows: int, cols: int, *, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every cell of a `rows × cols` grid, flattened row-major: two `(rows·cols,)` tensors."""
    return (torch.arange(rows, device=device).repeat_interleave(cols), torch.arange(cols, device=device).repeat(rows))


def sincos_2d_position_embedding_at(row: torch.Tensor, col: torch.Tensor, dim: int) -> torch.Tensor:
    """Embedding of the grid cells `(row[i], col[i])`: `(n, dim)`, float32, the same values as the whole grid's.

    Lets tokens be embedded a chunk or a region at a time. The first half of the channels encodes the
    column and the second half the row: the released models were trained with MAE's meshgrid order,
    whose names are swapped relative to what it does.
    """
    return torch.cat([sincos_1d(col, dim // 2), sincos_1d(row, dim // 2)], dim=1)
