"""Expert-LoRA launchers: the only code of the feature that touches Triton.

``expert_lora_fwd_triton`` / ``expert_lora_bwd_triton`` have the signatures
of ``reference.expert_lora_fwd_ref`` / ``expert_lora_bwd_ref``.

Operands (all strided views, read as they are):

* x ``[M, K]``: packed rows grouped by expert, expert e's ending at ``ends[e]``
  (int32, as ``grouped.pack_slots`` gives ``offs``); rows past ``ends[-1]``
  are neither read for any stored output nor written.
* weight ``[E, K, N]``: element (e, k, n) multiplies x[·, k] into y[·, n]
  (the layer's ``[E, in, out]`` as is, transformers' ``[E, out, in]`` as a
  transposed view).
* lora_a ``[E, R, K]``, lora_b ``[E, N, R]`` (PEFT's flattened layouts are
  views of these), ranks ``[E]`` int32 (≤ R: per-expert rank patterns),
  scales ``[E]`` fp32, bias ``[E, N]`` or None.

The experts are the multi-adapter kernels' slots: the shrink (where it is
not fused), the gradient kernel (dA, dB, dbias per expert over its own rows,
deterministic) and the row-order tables come from ``ops/multi_lora/launch.py``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from ...autotune.cache import select_config
from ...autotune.moe_lora import EXPERT_LORA_MATMUL, EXPERT_LORA_MATMUL_TMA, EXPERT_LORA_RUNS, RANK_CAP
from ..backend import (GEMM_VAR, aligned, compute_capability, descriptor_copy, device_info, ensure_tma_allocator,
                       num_sms, on_device, tma_addressable, tma_row_stride)
from ..common import cdiv, dtype_name
from ..dropout import multi_dropout_tables
from ..multi_lora.launch import AdapterStack, RowOrder, SlotMatrix, _bounds, grad, shrink


def tile_table(ends: Tensor, M: int, block_m: int, with_count: bool = False):
    """(expert of each row tile int32 (-1 = unused), first row of each tile
    int32, number of tiles[, used tiles int64 [1]]): every expert's rows cut
    into ``block_m``-row tiles that never straddle two experts, the used
    ones first. On the device, no host sync; the table has the static size
    ``cdiv(M, block_m) + E`` (an upper bound on Σ_e cdiv(rows_e, block_m))."""
    E = ends.numel()
    tiles_max = cdiv(M, block_m) + E
    ends64 = ends.to(torch.int64).clamp(0, M)
    starts = torch.cat([ends64.new_zeros(1), ends64[:-1]])
    counts = (ends64 - starts).clamp_min(0)
    per = (counts + block_m - 1) // block_m
    cum = torch.cumsum(per, 0)
    tile = torch.arange(tiles_max, device=ends.device, dtype=torch.int64)
    e = torch.searchsorted(cum, tile, right=True)
    used = e < E
    ec = e.clamp_max(E - 1)
    row0 = starts[ec] + (tile - (cum[ec] - per[ec])) * block_m
    table = (torch.where(used, ec, -1).to(torch.int32), torch.where(used, row0, 0).to(torch.int32), tiles_max)
    return (*table, cum[-1:]) if with_count else table


def row_ids(ends: Tensor, M: int) -> Tensor:
    """[M] int64: the expert of each packed row, E for rows past ``ends[-1]``
    (ascending, as the multi-adapter kernels' slot ids must be)."""
    r = torch.arange(M, device=ends.device, dtype=ends.dtype)
    return torch.searchsorted(ends, r, right=True).to(torch.int64)


def _stack(ranks: Tensor, scales: Tensor, R: int, dropout_p: float, seed: Optional[Tensor]) -> AdapterStack:
    E = ranks.numel()
    drop = None
    if dropout_p > 0.0:
        p = torch.full((E,), dropout_p, device=ranks.device, dtype=torch.float32)
        drop = (seed, *multi_dropout_tables(p))
    return AdapterStack(ranks.reshape(1, E).contiguous(), scales.reshape(1, E).float().contiguous(),
                        _bounds((1,), ranks.device), E, R, 1, drop)


def _slots(m: Tensor) -> SlotMatrix:
    """A ``[E, rows, cols]`` view as the multi-adapter kernels' slot operand."""
    s0, s1, s2 = m.stride()
    return SlotMatrix(m, s0, 0, s1, s2)


def expert_matmul(x: Tensor, w: Tensor, bias: Optional[Tensor], ends: Tensor, y: Tensor, t: Tensor, b: SlotMatrix,
                  stack: AdapterStack, a: Optional[SlotMatrix] = None, sid: Optional[Tensor] = None,
                  dropout: bool = False) -> None:
    """y = x·w_e + s·t·b_eᵀ (+ bias_e) per expert into ``y``; ``w`` read as
    ``[E, K, N]``, ``b`` as ``[N, R]`` per adapter id. With ``a`` (read as
    ``[R, K]``) the shrink is fused and t is written; otherwise t is read and
    expanded run by run over ``sid``."""
    M, K = x.shape
    E, N = w.shape[0], w.shape[2]
    dims = dict(N=N, K=K, R=stack.max_rank, M=max(1, M // E))
    if a is not None:
        plan = _tma_plan(x, w, a, stack.max_rank)
        if plan is not None:
            _expert_matmul_tma(x, w, bias, ends, y, t, b, stack, plan, dims)
            return
    fused = a is not None
    spec = EXPERT_LORA_MATMUL if fused else EXPERT_LORA_RUNS
    if not fused:
        dims.pop("R")
    cfg = select_config(spec, dtype_name(x.dtype), device_info(x.device), **dims)
    tile_e, tile_row, tiles = tile_table(ends, M, cfg["BLOCK_M"])
    grid = (tiles * cdiv(N, cfg["BLOCK_N"]),)
    spec.fn[grid](
        x_ptr=x, w_ptr=w, bias_ptr=bias if bias is not None else y, tile_e_ptr=tile_e, tile_row_ptr=tile_row,
        ends_ptr=ends, sid_ptr=sid if sid is not None else tile_e, a_ptr=a.data if fused else x,
        t_ptr=t, b_ptr=b.data, rank_ptr=stack.ranks, scale_ptr=stack.scales, y_ptr=y,
        **stack.drop_kwargs(dropout, stack.ranks),
        M=M, N=N, K=K, E=E, R_MAX=stack.max_rank, SLOTS=stack.slots, TILES=tiles,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_we=w.stride(0), stride_wk=w.stride(1), stride_wn=w.stride(2),
        stride_biase=bias.stride(0) if bias is not None else 0,
        stride_as=a.stride_s if fused else 0, stride_ar=a.stride_r if fused else 0,
        stride_ak=a.stride_c if fused else 0,
        stride_tm=t.stride(0), stride_tr=t.stride(1),
        stride_bs=b.stride_s, stride_bn=b.stride_r, stride_br=b.stride_c,
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        HAS_BIAS=bias is not None, FUSE_SHRINK=fused,
        **(spec.launch_kwargs(cfg, spec.block_r(stack.max_rank)) if fused else spec.launch_kwargs(cfg)))


def _tma_plan(x: Tensor, w: Tensor, a: SlotMatrix, R: int):
    """(W_NMAJOR, the weight's other stride, A as a TMA-readable ``[E, R, K]`` in x's dtype) when the
    sm_90 kernel may run the fused case on these operands (``POSTTRAIN_KERNELS_GEMM``: auto on sm_90,
    ``tma`` also under the interpreter, ``portable`` never), else None. A is copied (E·R·K elements)
    when its dtype, strides or base do not suit a descriptor; x and the weight never are."""
    choice = (os.environ.get(GEMM_VAR) or "auto").lower()
    if choice == "portable" or x.dtype not in (torch.float16, torch.bfloat16) or w.dtype != x.dtype:
        return None
    if choice == "auto" and (compute_capability(x.device) or 0) < 90:
        return None
    E, K, N = w.shape
    es = w.element_size()
    if not tma_addressable(x) or not aligned(w) or (w.stride(0) * es) % 16:
        return None
    if w.stride(2) == 1 and w.stride(1) >= N and (w.stride(1) * es) % 16 == 0:
        w_nmajor, stride_w = True, w.stride(1)
    elif w.stride(1) == 1 and w.stride(2) >= K and (w.stride(2) * es) % 16 == 0:
        w_nmajor, stride_w = False, w.stride(2)
    else:
        return None
    a3 = torch.as_strided(a.data, (E, R, K), (a.stride_s, a.stride_r, a.stride_c))
    if not (a3.dtype == x.dtype and a3.stride(2) == 1 and a3.stride(1) >= K and aligned(a3)
            and (a3.stride(1) * es) % 16 == 0 and (a3.stride(0) * es) % 16 == 0):
        a3 = descriptor_copy(a3, x.dtype, tma_row_stride(K, x.dtype))
    return w_nmajor, stride_w, a3


def _expert_matmul_tma(x, w, bias, ends, y, t, b: SlotMatrix, stack: AdapterStack, plan, dims) -> None:
    """The fused case on sm_90: ``_expert_lora_matmul_tma_kernel`` over a persistent grid."""
    w_nmajor, stride_w, a3 = plan
    M, K = x.shape
    E, N = w.shape[0], w.shape[2]
    ensure_tma_allocator()
    cfg = select_config(EXPERT_LORA_MATMUL_TMA, dtype_name(x.dtype), device_info(x.device), **dims)
    block_r = EXPERT_LORA_MATMUL_TMA.block_r(stack.max_rank)
    tile_e, tile_row, tiles, used = tile_table(ends, M, cfg["BLOCK_M"], with_count=True)
    programs = max(1, min(tiles * cdiv(N, cfg["BLOCK_N"]), num_sms(x.device)))
    EXPERT_LORA_MATMUL_TMA.fn[(programs,)](
        x_ptr=x, w_ptr=w, bias_ptr=bias if bias is not None else y, tile_e_ptr=tile_e, tile_row_ptr=tile_row,
        used_ptr=used, ends_ptr=ends, a_ptr=a3, t_ptr=t, b_ptr=b.data, rank_ptr=stack.ranks,
        scale_ptr=stack.scales, y_ptr=y, M=M, N=N, K=K, E=E, R_MAX=stack.max_rank, num_programs=programs,
        stride_xm=x.stride(0), stride_we=w.stride(0), stride_w=stride_w,
        stride_biase=bias.stride(0) if bias is not None else 0,
        stride_as=a3.stride(0), stride_ar=a3.stride(1), stride_tm=t.stride(0), stride_tr=t.stride(1),
        stride_bs=b.stride_s, stride_bn=b.stride_r, stride_br=b.stride_c,
        stride_ym=y.stride(0), stride_yn=y.stride(1), W_NMAJOR=w_nmajor, HAS_BIAS=bias is not None,
        **EXPERT_LORA_MATMUL_TMA.launch_kwargs(cfg, block_r))


def _bias_rows(bias: Optional[Tensor]) -> Optional[Tensor]:
    """bias ``[E, N]`` with a unit N stride (what the kernel indexes)."""
    return bias if bias is None or bias.stride(1) == 1 else bias.contiguous()


# ---------------------------------------------------------------- forward / backward
@on_device
def expert_lora_fwd_triton(x: Tensor, weight: Tensor, ends: Tensor, lora_a: Tensor, lora_b: Tensor, ranks: Tensor,
                           scales: Tensor, bias: Optional[Tensor], dropout_p: float,
                           seed: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(y [M, N] in x's dtype, t [M, R] fp32 = drop(x)·A_eᵀ per row, unscaled; zeros past each rank)."""
    M, _ = x.shape
    R, N = lora_a.shape[1], weight.shape[2]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    t = torch.zeros((M, R), device=x.device, dtype=torch.float32)
    if M == 0:
        return y, t
    stack = _stack(ranks, scales, R, dropout_p, seed)
    if dropout_p == 0.0 and R <= RANK_CAP:
        expert_matmul(x, weight, _bias_rows(bias), ends, y, t, _slots(lora_b), stack, a=_slots(lora_a))
        return y, t
    rows = RowOrder(torch.arange(M, device=x.device), row_ids(ends, M))
    shrink(x, _slots(lora_a), stack, rows, t, sliced_reduction=False, dropout=dropout_p > 0.0)
    expert_matmul(x, weight, _bias_rows(bias), ends, y, t, _slots(lora_b), stack, sid=rows.sid)
    return y, t


@on_device
def expert_lora_bwd_triton(dy: Tensor, x: Tensor, weight: Tensor, ends: Tensor, lora_a: Tensor, lora_b: Tensor,
                           ranks: Tensor, scales: Tensor, t: Tensor, dropout_p: float, seed: Optional[Tensor],
                           needs_dx: bool, needs_dbias: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx [M, K] or empty, dA [E, R, K] fp32, dB [E, N, R] fp32, dbias [E, N] fp32 or empty).
    Rows of dx past ``ends[-1]`` are not written."""
    M, K = x.shape
    E, R, N = weight.shape[0], lora_a.shape[1], weight.shape[2]
    da = torch.zeros((E, R, K), device=x.device, dtype=torch.float32)
    db = torch.zeros((E, N, R), device=x.device, dtype=torch.float32)
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype) if needs_dx else x.new_empty(0)
    dbias = (torch.zeros((E, N), device=x.device, dtype=torch.float32) if needs_dbias
             else x.new_empty(0, dtype=torch.float32))
    if M == 0:
        return dx, da, db, dbias
    stack = _stack(ranks, scales, R, dropout_p, seed)
    dropout = dropout_p > 0.0
    rows = RowOrder(torch.arange(M, device=x.device), row_ids(ends, M))
    w_t, b_t, a_t = weight.transpose(1, 2), _slots(lora_b).T, _slots(lora_a).T
    # dt = dY·B_e (unscaled), fused into the dX GEMM where it can be; dX = dY·W_eᵀ + drop(s·dt·A_e)
    dt = torch.zeros((M, R), device=x.device, dtype=torch.float32)
    if needs_dx and not dropout and R <= RANK_CAP:
        expert_matmul(dy, w_t, None, ends, dx, dt, a_t, stack, a=b_t)
    else:
        shrink(dy, b_t, stack, rows, dt, sliced_reduction=False)
        if needs_dx:
            expert_matmul(dy, w_t, None, ends, dx, dt, a_t, stack, sid=rows.sid, dropout=dropout)
    # dA_e = s·dtᵀ·drop(x), dB_e = s·dYᵀ·t over expert e's rows (the experts as slots)
    seg = torch.cat([ends.new_zeros(1), ends]).to(torch.int64).clamp(0, M)
    grad(dt, x, rows, seg, stack, _slots(da), sliced_output=False, dropout=dropout)
    grad(t, dy, rows, seg, stack, _slots(db).T, sliced_output=False)
    if needs_dbias:
        ones = torch.ones((M, 1), device=x.device, dtype=torch.float32)
        unit = AdapterStack(torch.ones((1, E), device=x.device, dtype=torch.int32),
                            torch.ones((1, E), device=x.device, dtype=torch.float32), stack.bounds, E, 1, 1, None)
        grad(ones, dy, rows, seg, unit, SlotMatrix(dbias, dbias.stride(0), 0, 0, dbias.stride(1)),
             sliced_output=False)
    return dx, da, db, dbias


@on_device
def expert_lora_mixed_triton(x: Tensor, weight: Tensor, ends: Tensor, lora_a: Tensor, lora_b: Tensor, ranks: Tensor,
                             scales: Tensor, adapter_ids: Tensor, bias: Optional[Tensor]) -> Tensor:
    """y [M, N] for a mixed batch: packed row j of expert e uses adapter slot s = adapter_ids[j]
    (-1 or out of range: none) with ``lora_a [S, E, R, K]``, ``lora_b [S, E, N, R]``, ``ranks`` /
    ``scales [S, E]``. Each (slot, expert) pair is one adapter id ``s·E + e`` of the multi-adapter
    shrink and of the expert GEMM's run-by-run expand (a tile loops over the ids of its rows)."""
    M = x.shape[0]
    S, E, R = lora_a.shape[0], lora_a.shape[1], lora_a.shape[2]
    y = torch.empty((M, weight.shape[2]), device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    experts = row_ids(ends, M)
    ok = (adapter_ids >= 0) & (adapter_ids < S) & (experts < E)
    sid = torch.where(ok, adapter_ids.to(torch.int64) * E + experts, -1)
    a = lora_a if lora_a.stride(0) == E * lora_a.stride(1) else lora_a.contiguous()
    b = lora_b if lora_b.stride(0) == E * lora_b.stride(1) else lora_b.contiguous()
    stack = AdapterStack(ranks.reshape(1, S * E).to(torch.int32).contiguous(),
                         scales.reshape(1, S * E).float().contiguous(), _bounds((1,), x.device), S * E, R, 1, None)
    rows = RowOrder(torch.arange(M, device=x.device), sid)
    t = torch.zeros((M, R), device=x.device, dtype=torch.float32)
    shrink(x, SlotMatrix(a, a.stride(1), 0, a.stride(2), a.stride(3)), stack, rows, t, sliced_reduction=False)
    expert_matmul(x, weight, _bias_rows(bias), ends, y, t, SlotMatrix(b, b.stride(1), 0, b.stride(2), b.stride(3)),
                  stack, sid=sid)
    return y
