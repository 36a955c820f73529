"""Multi-adapter LoRA in plain PyTorch: a per-row loop over adapters (the
oracle the kernels are tested against) and the references of the two ops,
with the launchers' signatures.

fp32 math (fp64 for fp64 inputs). Dropout uses the kernels' hash
(``ops/dropout.py``) with the same per-slot tables, so reference and kernels
drop exactly the same elements.
"""
from __future__ import annotations

import torch

from ..dropout import keep_at, multi_dropout_tables


def _multi_dropped(xr: torch.Tensor, orig_rows: torch.Tensor, a: int, i: int, dropout_p, seeds) -> torch.Tensor:
    """drop(x) for the rows ``orig_rows`` (original indices) of slot a, slice i."""
    if dropout_p is None:
        return xr
    thr, inv = multi_dropout_tables(dropout_p)
    cols = torch.arange(xr.shape[1], device=xr.device)[None, :]
    keep = keep_at(seeds[i], orig_rows[:, None], cols, int(thr[a]))
    return torch.where(keep, xr, 0) * inv[a].to(xr.dtype)


def _adapter_runs(ids: torch.Tensor, slots: int):
    """(slot, row mask) for each slot ``ids`` uses; -1 (no adapter) and, as in
    the kernels, ids outside [0, slots) are skipped."""
    for a in ids.unique().tolist():
        if 0 <= a < slots:
            yield a, ids == a


def _rank(ranks2: torch.Tensor, i: int, a: int, max_rank: int) -> int:
    """Rank of slice i of slot a, clamped to [0, max_rank] as the kernels clamp it."""
    return min(max(int(ranks2[i, a]), 0), max_rank)


def multi_lora_linear_ref(x, weight, bias, lora_a, lora_b, ranks, scales, adapter_ids, slices=None,
                          dropout_p=None, seeds=None):
    """Per-row loop over adapters: y[i] = x[i]·Wᵀ + s_a·B_a[:, :r_a](A_a[:r_a]·drop(x[i])) (+ bias),
    a = adapter_ids[i], -1 = none; with ``slices`` (output widths) each slice
    has its own A (rows i·R_MAX of lora_a), rank and scale ([slices, slots]).
    ``dropout_p`` ([slots] fp32) and ``seeds`` ([slices] int32): the kernels'
    per-slot dropout, each slice with its own mask. fp32 math (fp64 for fp64
    inputs), y in x's dtype. x is [M, K]."""
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    y = xf @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    R = lora_b.shape[2]
    widths = list(slices) if slices is not None else [weight.shape[0]]
    ranks2, scales2 = ranks.reshape(len(widths), -1), scales.reshape(len(widths), -1)
    row_ids = torch.arange(x.shape[0], device=x.device)
    for a, rows in _adapter_runs(adapter_ids, lora_b.shape[0]):
        lo = 0
        for i, width in enumerate(widths):
            r = _rank(ranks2, i, a, R)
            xa = _multi_dropped(xf[rows], row_ids[rows], a, i, dropout_p, seeds)
            t = xa @ lora_a[a, i * R:i * R + r].to(acc).t()
            y[rows, lo:lo + width] += float(scales2[i, a]) * (t @ lora_b[a, lo:lo + width, :r].to(acc).t())
            lo += width
    return y.to(x.dtype)


def multi_lora_fwd_ref(x, weight, bias, lora_a, lora_b, ranks, scales, adapter_ids, slices=None,
                       dropout_p=None, seeds=None):
    """What the multi-LoRA forward op returns: ``(y, t, perm, sid)``.

    ``sid, perm = sort(adapter_ids)`` (stable); ``t [M, slices·R_MAX]`` (fp32)
    holds each sorted row's low-rank activations ``A_a,i·x[perm[j]]`` at
    columns ``i·R_MAX:i·R_MAX + r_a,i``, zeros elsewhere (the kernel leaves
    those unwritten and never reads them)."""
    y = multi_lora_linear_ref(x, weight, bias, lora_a, lora_b, ranks, scales, adapter_ids, slices, dropout_p,
                              seeds)
    sid, perm = torch.sort(adapter_ids.to(torch.int64), stable=True)
    n_sl = 1 if slices is None else len(slices)
    R = lora_b.shape[2]
    ranks2 = ranks.reshape(n_sl, -1)
    t = torch.zeros(x.shape[0], n_sl * R, dtype=torch.float32, device=x.device)
    xs = x[perm].float()
    for a, rows in _adapter_runs(sid, lora_b.shape[0]):
        for i in range(n_sl):
            r = _rank(ranks2, i, a, R)
            xa = _multi_dropped(xs[rows], perm[rows], a, i, dropout_p, seeds)
            t[rows, i * R:i * R + r] = xa @ lora_a[a, i * R:i * R + r].float().t()
    return y, t, perm, sid


def multi_lora_bwd_ref(dy, x, weight, lora_a, lora_b, ranks, scales, t, perm, sid, slices=None,
                       needs_dx=True, needs_dlora=True, needs_dbias=False, dropout_p=None, seeds=None):
    """``(dx, dA, dB, dbias)`` of ``multi_lora_fwd_ref`` for the gradient
    ``dy [M, N]``, one adapter at a time. dA/dB are zero outside each slot's
    ranks (and for slots no row uses); dx, dA/dB and dbias are empty when
    not asked for, as the op returns them."""
    n_sl = 1 if slices is None else len(slices)
    widths = list(slices) if slices is not None else [weight.shape[0]]
    R = lora_b.shape[2]
    ranks2, scales2 = ranks.reshape(n_sl, -1), scales.reshape(n_sl, -1)
    acc = torch.promote_types(x.dtype, torch.float32)
    dys, xs = dy[perm].to(acc), x[perm].to(acc)
    dx_s = dys @ weight.to(acc) if needs_dx else None
    da = torch.zeros(lora_a.shape, dtype=acc, device=x.device)
    db = torch.zeros(lora_b.shape, dtype=acc, device=x.device)
    for a, rows in _adapter_runs(sid, lora_b.shape[0]):
        lo = 0
        for i, width in enumerate(widths):
            r, s = _rank(ranks2, i, a, R), float(scales2[i, a])
            dy_i = dys[rows, lo:lo + width]
            dt = dy_i @ lora_b[a, lo:lo + width, :r].to(acc)
            da[a, i * R:i * R + r] = s * (dt.t() @ _multi_dropped(xs[rows], perm[rows], a, i, dropout_p, seeds))
            db[a, lo:lo + width, :r] = s * (dy_i.t() @ t[rows, i * R:i * R + r].to(acc))
            if needs_dx:
                # d drop(x) / dx is the same mask and scale: drop() is linear
                dx_s[rows] += _multi_dropped(s * (dt @ lora_a[a, i * R:i * R + r].to(acc)), perm[rows], a, i,
                                             dropout_p, seeds)
            lo += width
    if needs_dx:
        dx = torch.empty_like(dx_s)
        dx[perm] = dx_s
        dx = dx.to(x.dtype)
    else:
        dx = x.new_empty(0)
    dbias = dy.float().sum(0) if needs_dbias else dy.new_empty(0, dtype=torch.float32)
    if not needs_dlora:
        return dx, lora_a.new_empty(0), lora_b.new_empty(0), dbias
    return dx, da.to(lora_a.dtype), db.to(lora_b.dtype), dbias
