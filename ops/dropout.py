"""The kernels' dropout mask, mirrored bit for bit in PyTorch.

Dropout masks are a counter-based hash of (seed, row, col)
(``kernels/common.py: dropout_keep``), not a stored tensor. This module
computes the same hash with int64 tensor arithmetic, for the references, and
the integer thresholds and per-slot tables the launchers pass to the
kernels, so kernels and references drop exactly the same elements.
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # (h * c) mod 2**32 without overflowing int64: split h in 16-bit halves.
    lo, hi = h & 0xFFFF, h >> 16
    return ((((hi * c) & 0xFFFF) << 16) + lo * c) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_threshold(p: float) -> int:
    """The integer threshold the kernels compare the top 24 hash bits with."""
    return min(int(round(p * (1 << 24))), (1 << 24))


def keep_at(seed: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, threshold) -> torch.Tensor:
    """The kernels' keep test at int64 indices ``rows`` (column vector) and
    ``cols`` (row vector); ``threshold`` an int or an int tensor broadcastable
    to them. ``seed`` is a 0-d or [1] int32 tensor."""
    s = seed.to(torch.int64).reshape(()) & _M32
    h = _fmix32(rows.to(torch.int64) ^ s)
    h = _fmix32((h + cols.to(torch.int64)) & _M32)
    return (h >> 8) >= threshold


def dropout_keep_ref(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """Bool [rows, cols]: True where the element survives dropout.

    ``seed`` is the [1] int32 tensor the ops take; no host synchronisation.
    """
    dev = seed.device
    r = torch.arange(rows, device=dev, dtype=torch.int64)[:, None]
    c = torch.arange(cols, device=dev, dtype=torch.int64)[None, :]
    return keep_at(seed, r, c, dropout_threshold(p))


def multi_dropout_tables(dropout_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot dropout (threshold int32 = round(p·2**24), inverse keep rate
    fp32 = 1/(1-p), 0 where p = 1), on the device, shared by the multi-LoRA
    kernels and their reference so both drop the same elements."""
    thr = torch.round(dropout_p.double() * (1 << 24)).clamp(0, 1 << 24).to(torch.int32)
    inv = torch.where(dropout_p < 1, 1.0 / (1.0 - dropout_p.double()), 0.0).float()
    return thr, inv
