"""Pure-PyTorch references, one per kernel, with the launchers' signatures.

They run on CPU tensors (the default backend there) and are what the tests
compare the kernels against. The dropout mask is the same counter-based hash
as ``kernels/common.py``, computed with int64 tensor arithmetic, so reference
and kernels drop exactly the same elements.
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


def multi_dropout_tables(dropout_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot dropout (threshold int32 = round(p·2**24), inverse keep rate
    fp32 = 1/(1-p), 0 where p = 1), on the device, shared by the multi-LoRA
    kernels and this reference so both drop the same elements."""
    thr = torch.round(dropout_p.double() * (1 << 24)).clamp(0, 1 << 24).to(torch.int32)
    inv = torch.where(dropout_p < 1, 1.0 / (1.0 - dropout_p.double()), 0.0).float()
    return thr, inv


def _multi_dropped(xr: torch.Tensor, orig_rows: torch.Tensor, a: int, i: int, dropout_p, seeds) -> torch.Tensor:
    """drop(x) for the rows ``orig_rows`` (original indices) of slot a, slice i."""
    if dropout_p is None:
        return xr
    thr, inv = multi_dropout_tables(dropout_p)
    cols = torch.arange(xr.shape[1], device=xr.device)[None, :]
    keep = keep_at(seeds[i], orig_rows[:, None], cols, int(thr[a]))
    return torch.where(keep, xr, 0) * inv[a].to(xr.dtype)


def dropout_keep_ref(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """Bool [rows, cols]: True where the element survives dropout.

    ``seed`` is the [1] int32 tensor the ops take; no host synchronisation.
    """
    dev = seed.device
    r = torch.arange(rows, device=dev, dtype=torch.int64)[:, None]
    c = torch.arange(cols, device=dev, dtype=torch.int64)[None, :]
    return keep_at(seed, r, c, dropout_threshold(p))


def _dropped(x2d: torch.Tensor, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    if dropout_p == 0.0:
        return x2d
    keep = dropout_keep_ref(seed, x2d.shape[0], x2d.shape[1], dropout_p)
    return torch.where(keep, x2d, 0) / (1.0 - dropout_p)


def lora_fwd_ref(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed):
    """(y, t): y = x·Wᵀ + s·t·Bᵀ + bias with t = drop(x)·Aᵀ; x is [M, K].

    Computed in fp32 on upcast inputs; y in x's dtype, t in fp32 (as saved
    by the kernels for the backward).
    """
    xf = x.float()
    t = _dropped(xf, dropout_p, seed) @ lora_a.float().t()
    y = xf @ weight.float().t() + scale * (t @ lora_b.float().t())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), t


def lora_bwd_ref(dy, x, weight, lora_a, lora_b, t, scale, dropout_p, seed,
                 needs_dx=True, needs_dbias=False):
    """(dx, dA, dB, dbias) of ``lora_fwd_ref``; dx and dbias are empty when
    not asked for (as the op returns them)."""
    dyf = dy.float()
    dt = scale * (dyf @ lora_b.float())
    db = scale * (dyf.t() @ t.float())
    da = dt.t() @ _dropped(x.float(), dropout_p, seed)
    if needs_dx:
        lora_dx = dt @ lora_a.float()
        if dropout_p:
            lora_dx = _dropped(lora_dx, dropout_p, seed)
        dx = (dyf @ weight.float() + lora_dx).to(x.dtype)
    else:
        dx = x.new_empty(0)
    dbias = dyf.sum(0) if needs_dbias else dy.new_empty(0, dtype=torch.float32)
    return dx, da.to(lora_a.dtype), db.to(lora_b.dtype), dbias


def lora_linear_ref(x, weight, lora_a, lora_b, scale, bias=None, dropout_p=0.0, seed=None,
                    compute_dtype=None):
    """Differentiable LoRA linear for tests, PEFT's formula.

    ``compute_dtype`` runs every operand and every product in that dtype
    (bf16/fp16 = the low-precision baseline of the tolerance rule; fp64 = the
    high-precision reference); None keeps the inputs' dtypes.
    """
    if compute_dtype is not None:
        x, weight, lora_a, lora_b = (v.to(compute_dtype) for v in (x, weight, lora_a, lora_b))
        bias = None if bias is None else bias.to(compute_dtype)
    x2d = x.reshape(-1, x.shape[-1])
    lora_in = _dropped(x2d, dropout_p, seed) if dropout_p else x2d
    y = x2d @ weight.t() + scale * ((lora_in @ lora_a.t()) @ lora_b.t())
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


# ---------------------------------------------------------------- MoE
def moe_dispatch_ref(x: torch.Tensor, token_idx: torch.Tensor) -> torch.Tensor:
    """[E, C, d]: x[token_idx], zero rows where token_idx is -1."""
    valid = token_idx >= 0
    out = x[token_idx.clamp_min(0)]
    return torch.where(valid[..., None], out, torch.zeros((), dtype=x.dtype, device=x.device))


def moe_combine_ref(expert_out: torch.Tensor, token_idx: torch.Tensor, gates: torch.Tensor,
                    num_tokens: int) -> torch.Tensor:
    """[n, d]: y[t] = Σ gate·expert_out over the slots holding t, in fp32."""
    E, C, d = expert_out.shape
    acc = torch.promote_types(expert_out.dtype, torch.float32)  # fp32, or fp64 for an fp64 reference
    valid = (token_idx >= 0).reshape(-1)
    w = gates.to(acc).reshape(-1, 1) * expert_out.to(acc).reshape(-1, d)
    y = torch.zeros(num_tokens, d, dtype=acc, device=expert_out.device)
    y.index_add_(0, token_idx.reshape(-1)[valid], w[valid])
    return y.to(expert_out.dtype)


def moe_onehot_masks(token_idx: torch.Tensor, gates: torch.Tensor, num_tokens: int):
    """flaxformer's formulation: dispatch mask [n, E, C] (0/1) and combine
    weights [n, E, C], for ``einsum('nd,nec->ecd')`` / ``einsum('ecd,nec->nd')``."""
    E, C = token_idx.shape
    onehot = torch.nn.functional.one_hot(token_idx.clamp_min(0), num_tokens).to(gates.dtype)  # [E, C, n]
    onehot = onehot * (token_idx >= 0)[..., None]
    dispatch = onehot.permute(2, 0, 1)
    return dispatch, dispatch * gates[None].to(dispatch.dtype)


# ---------------------------------------------------------------- multi-adapter LoRA
def _adapter_runs(ids: torch.Tensor):
    """(slot, row mask) for each slot ``ids`` uses (-1, no adapter, skipped)."""
    for a in ids.unique().tolist():
        if a >= 0:
            yield a, ids == a


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
    for a, rows in _adapter_runs(adapter_ids):
        lo = 0
        for i, width in enumerate(widths):
            r = int(ranks2[i, a])
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
    for a, rows in _adapter_runs(sid):
        for i in range(n_sl):
            r = int(ranks2[i, a])
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
    for a, rows in _adapter_runs(sid):
        lo = 0
        for i, width in enumerate(widths):
            r, s = int(ranks2[i, a]), float(scales2[i, a])
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
