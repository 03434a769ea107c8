"""Gather the active rows of a [B, T, H] batch once, and scatter per-token results back for logging."""
from __future__ import annotations

from typing import NamedTuple

import torch


class PackedRows(NamedTuple):
    rows: torch.Tensor  # [N, H] active rows, in row-major (b, t) order
    index: torch.Tensor  # [N] flat positions b * T + t of those rows
    shape: tuple  # (B, T)


def pack_rows(hidden: torch.Tensor, mask: torch.Tensor) -> PackedRows:
    """Active rows of ``hidden`` [B, T, H] under ``mask`` [B, T] (differentiable w.r.t. ``hidden``)."""
    if hidden.dim() != 3 or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"hidden must be [B, T, H] and mask [B, T] to match, got {tuple(hidden.shape)} and "
                         f"{tuple(mask.shape)}")
    b, t, width = hidden.shape
    index = (mask.reshape(-1) != 0).nonzero().squeeze(1)
    return PackedRows(hidden.reshape(b * t, width).index_select(0, index), index, (b, t))


def unpack_rows(values: torch.Tensor, packed: PackedRows, fill: float = 0.0) -> torch.Tensor:
    """Per-row ``values`` [N, ...] back to [B, T, ...], ``fill`` at inactive positions."""
    b, t = packed.shape
    if values.shape[0] != packed.index.shape[0]:
        raise ValueError(f"values must have one entry per packed row ({packed.index.shape[0]}), got {values.shape[0]}")
    out = values.new_full((b * t,) + tuple(values.shape[1:]), fill)
    return out.index_copy(0, packed.index, values).reshape((b, t) + tuple(values.shape[1:]))
