"""Multi-adapter LoRA launchers: the only code of the feature that touches Triton.

The flat op arguments are turned once into three small objects, and the
launchers take those:

* ``RowOrder``: the rows grouped by adapter (a stable device sort of the
  ids: ``perm`` sorted position → original row, ``sid`` the slot of each
  sorted row, ascending, -1 first).
* ``AdapterStack``: what every kernel reads of the pool besides the adapter
  matrices: per-slice ranks and scales, slice boundaries, dropout tables.
* ``SlotMatrix``: one adapter matrix of every slot and slice as a kernel
  operand (a strided view, so the backward reads A and B transposed with
  no copy).

``multi_lora_fwd_triton`` / ``multi_lora_bwd_triton`` have the signatures of
``reference.multi_lora_fwd_ref`` / ``multi_lora_bwd_ref``.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch
from torch import Tensor

from ...autotune.cache import select_config
from ...autotune.multi_lora import MULTI_LORA_GRAD, MULTI_LORA_MATMUL, MULTI_LORA_MATMUL_TMA, MULTI_LORA_SHRINK
from ..backend import GEMM_VAR, device_info, ensure_tma_allocator, gemm_path, num_sms, on_device
from ..common import cdiv, dtype_name
from ..dropout import multi_dropout_tables
from ..quant.launch import dequantize_triton, gemm_mode, quant_multi_lora_matmul


@dataclasses.dataclass(frozen=True)
class RowOrder:
    """Rows grouped by adapter: ``perm [M]`` (sorted position → original row)
    and ``sid [M]`` (slot of each sorted row, ascending, -1 = no adapter)."""

    perm: Tensor
    sid: Tensor

    @classmethod
    def sort(cls, adapter_ids: Tensor) -> "RowOrder":
        """A stable device sort: no host synchronisation."""
        sid, perm = torch.sort(adapter_ids.to(torch.int64), stable=True)
        return cls(perm, sid)

    def segments(self, slots: int) -> Tensor:
        """``[slots + 1]`` int64: the sorted rows of slot a are ``seg[a]:seg[a + 1]``."""
        return torch.searchsorted(self.sid, torch.arange(slots + 1, device=self.sid.device, dtype=torch.int64))


@dataclasses.dataclass(frozen=True)
class SlotMatrix:
    """A per-slot, per-slice matrix of the pool as a kernel operand: element
    (r, c) of slice i of slot a is at ``a·stride_s + i·stride_slice +
    r·stride_r + c·stride_c`` of ``data``."""

    data: Tensor
    stride_s: int
    stride_slice: int
    stride_r: int
    stride_c: int

    @classmethod
    def lora_a(cls, lora_a: Tensor, max_rank: int) -> "SlotMatrix":
        """A_a,i as ``[R, K]``: ``lora_a [S, slices·R, K]``, slice i at rows i·R."""
        s0, s1, s2 = lora_a.stride()
        return cls(lora_a, s0, max_rank * s1, s1, s2)

    @classmethod
    def lora_b(cls, lora_b: Tensor) -> "SlotMatrix":
        """B_a as ``[N, R]``: ``lora_b [S, N, R]``, one matrix for every slice
        (slice i owns its columns, so the slice stride is 0)."""
        s0, s1, s2 = lora_b.stride()
        return cls(lora_b, s0, 0, s1, s2)

    @property
    def T(self) -> "SlotMatrix":
        """The transposed view, no copy."""
        return dataclasses.replace(self, stride_r=self.stride_c, stride_c=self.stride_r)


@dataclasses.dataclass(frozen=True)
class AdapterStack:
    """What every multi-LoRA kernel reads of the pool besides the matrices:
    ``ranks`` / ``scales [slices, S]`` (contiguous, as the kernels index
    them), the slice ``bounds [slices + 1]`` (int32, first column of each
    slice, then the total), and the dropout tables (seeds per slice,
    thresholds and 1/(1-p) per slot) or None."""

    ranks: Tensor
    scales: Tensor
    bounds: Tensor
    slots: int
    max_rank: int
    num_slices: int
    drop: Optional[tuple]

    @classmethod
    def build(cls, lora_b: Tensor, ranks: Tensor, scales: Tensor, slices, dropout_p: Optional[Tensor],
              seeds: Optional[Tensor]) -> "AdapterStack":
        S, N, R = lora_b.shape
        widths = tuple(slices) if slices else (N,)
        n_sl = len(widths)
        drop = None if dropout_p is None else (seeds, *multi_dropout_tables(dropout_p))
        return cls(ranks.reshape(n_sl, S).contiguous(), scales.reshape(n_sl, S).contiguous(),
                   _bounds(widths, lora_b.device), S, R, n_sl, drop)

    def drop_kwargs(self, dropout: bool, unused: Tensor) -> dict:
        """The dropout launch arguments; without dropout ``unused`` stands in
        for the pointers, which the kernels then never read."""
        seeds, thr, inv = self.drop if dropout else (unused, unused, unused)
        return dict(seed_ptr=seeds, thr_ptr=thr, inv_ptr=inv, HAS_DROPOUT=dropout)


_BOUNDS: dict = {}


def _bounds(widths: tuple, device: torch.device) -> Tensor:
    """Slice boundaries on the device, made once per (widths, device): a
    host-to-device copy inside a CUDA-graph capture would not be allowed."""
    key = (widths, str(device))
    if key not in _BOUNDS:
        edges = [0]
        for w in widths:
            edges.append(edges[-1] + w)
        _BOUNDS[key] = torch.tensor(edges, dtype=torch.int32, device=device)
    return _BOUNDS[key]


def shrink_split(m_tiles: int, K: int, block_k: int, sms: int) -> tuple[int, int]:
    """(splits, K per split) of the shrink: with fewer row tiles than SMs
    (decode), K is split so that about 2·SMs programs read adapters; the
    split size is a multiple of BLOCK_K. (1, K) when the row tiles suffice."""
    if m_tiles >= sms:
        return 1, K
    k_steps = cdiv(K, block_k)
    want = min(k_steps, cdiv(2 * sms, m_tiles))
    if want <= 1:
        return 1, K
    per = cdiv(k_steps, want) * block_k
    return cdiv(K, per), per


# ---------------------------------------------------------------- launchers
def shrink(x: Tensor, a: SlotMatrix, stack: AdapterStack, rows: RowOrder, t: Tensor, sliced_reduction: bool,
           dropout: bool = False) -> None:
    """t = A_a,i·drop(x) per run and slice into ``t [M, slices·R]`` (sorted
    rows); ``a`` read as ``[R, K]``. With ``sliced_reduction`` slice i reduces
    over its own columns of x only. Entries outside the rows' ranks keep t's
    contents when there is no K split and become zero when there is one."""
    M, K = x.shape
    cfg = select_config(MULTI_LORA_SHRINK, dtype_name(x.dtype), device_info(x.device), K=K, M=M)
    m_tiles = cdiv(M, cfg["BLOCK_M"])
    splits, per = shrink_split(m_tiles, K, cfg["BLOCK_K"], num_sms(x.device))
    # Partial sums of a split go to separate fp32 slabs, summed in a fixed order (no atomics).
    out = t if splits == 1 else torch.zeros((splits, *t.shape), device=t.device, dtype=torch.float32)
    MULTI_LORA_SHRINK.fn[(m_tiles, splits)](
        x_ptr=x, perm_ptr=rows.perm, sid_ptr=rows.sid, a_ptr=a.data, rank_ptr=stack.ranks,
        bounds_ptr=stack.bounds, t_ptr=out,
        M=M, K=K, R_MAX=stack.max_rank, SLOTS=stack.slots, K_PER_SPLIT=per,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_as=a.stride_s, stride_a_slice=a.stride_slice, stride_ar=a.stride_r, stride_ak=a.stride_c,
        stride_ts=0 if splits == 1 else out.stride(0), stride_tm=out.stride(-2), stride_tr=out.stride(-1),
        SLICED_REDUCTION=sliced_reduction, NUM_SLICES=stack.num_slices,
        **stack.drop_kwargs(dropout, stack.bounds), **MULTI_LORA_SHRINK.launch_kwargs(cfg))
    if splits > 1:
        torch.sum(out, dim=0, out=t)


def matmul(x: Tensor, w: Tensor, bias: Optional[Tensor], rows: RowOrder, t: Tensor, b: SlotMatrix,
           stack: AdapterStack, y: Tensor, sliced_output: bool, dropout: bool = False) -> None:
    """y[perm] = x[perm]·wᵀ + Σ_runs Σ_slices s·t·b_a,iᵀ (+ bias) into ``y``;
    ``w`` any strided ``[N, K]`` view, ``b`` read as ``[N, R]``. With
    ``sliced_output`` slice i writes its own columns only."""
    M, K = x.shape
    N = w.shape[0]
    if not isinstance(w, Tensor):  # the forward over a quantized weight, decoded in the main loop
        quant_multi_lora_matmul(x, w, bias, rows, t, b, stack, y)
        return
    common = dict(
        x_ptr=x, bias_ptr=bias.contiguous() if bias is not None else y,  # read at unit stride
        perm_ptr=rows.perm, sid_ptr=rows.sid,
        t_ptr=t, b_ptr=b.data, rank_ptr=stack.ranks, scale_ptr=stack.scales, bounds_ptr=stack.bounds, y_ptr=y,
        M=M, N=N, K=K, R_MAX=stack.max_rank, SLOTS=stack.slots, stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_tm=t.stride(0), stride_tr=t.stride(1),
        stride_bs=b.stride_s, stride_b_slice=b.stride_slice, stride_bn=b.stride_r, stride_br=b.stride_c,
        stride_ym=y.stride(0), stride_yn=y.stride(1), HAS_BIAS=bias is not None, SLICED_OUTPUT=sliced_output,
        NUM_SLICES=stack.num_slices, **stack.drop_kwargs(dropout, stack.bounds))
    # sm_90: the persistent kernel with the weight through TMA (x's rows are
    # gathered by pointer either way, so only the weight must be aligned).
    if gemm_path(x, w, N, os.environ.get(GEMM_VAR), x_tma=False) == "tma":
        ensure_tma_allocator()
        cfg = select_config(MULTI_LORA_MATMUL_TMA, dtype_name(x.dtype), device_info(x.device), N=N, K=K, M=M)
        w_nmajor = w.stride(0) == 1 and w.stride(1) != 1
        programs = max(1, min(cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]), num_sms(x.device)))
        MULTI_LORA_MATMUL_TMA.fn[(programs,)](
            w_ptr=w, num_programs=programs, stride_w=w.stride(1) if w_nmajor else w.stride(0), W_NMAJOR=w_nmajor,
            **common, **MULTI_LORA_MATMUL_TMA.launch_kwargs(cfg))
        return
    cfg = select_config(MULTI_LORA_MATMUL, dtype_name(x.dtype), device_info(x.device), N=N, K=K, M=M)
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    MULTI_LORA_MATMUL.fn[grid](w_ptr=w, stride_wn=w.stride(0), stride_wk=w.stride(1), **common,
                               **MULTI_LORA_MATMUL.launch_kwargs(cfg))


def grad(p: Tensor, q: Tensor, rows: RowOrder, seg: Tensor, stack: AdapterStack, o: SlotMatrix,
         sliced_output: bool, dropout: bool = False) -> None:
    """o[a, slice i] = s_a,i · Σ over slot a's sorted rows of p[j, slice i]ᵀ·q[perm[j]]
    into ``o`` (read as ``[R, D]``): the adapter gradients, one small GEMM per adapter."""
    M, D = q.shape
    cfg = select_config(MULTI_LORA_GRAD, dtype_name(q.dtype), device_info(q.device), D=D, R=stack.max_rank, M=M)
    grid = (stack.slots, cdiv(stack.max_rank, cfg["BLOCK_R"]), cdiv(D, cfg["BLOCK_D"]))
    MULTI_LORA_GRAD.fn[grid](
        p_ptr=p, q_ptr=q, perm_ptr=rows.perm, seg_ptr=seg, rank_ptr=stack.ranks, scale_ptr=stack.scales,
        bounds_ptr=stack.bounds, o_ptr=o.data, M=M, D=D, R_MAX=stack.max_rank, SLOTS=stack.slots,
        stride_pm=p.stride(0), stride_pr=p.stride(1), stride_qm=q.stride(0), stride_qd=q.stride(1),
        stride_os=o.stride_s, stride_o_slice=o.stride_slice, stride_or=o.stride_r, stride_od=o.stride_c,
        SLICED_OUTPUT=sliced_output, NUM_SLICES=stack.num_slices, **stack.drop_kwargs(dropout, stack.bounds),
        **MULTI_LORA_GRAD.launch_kwargs(cfg))


# ---------------------------------------------------------------- forward / backward
@on_device
def multi_lora_fwd_triton(x, weight, bias, lora_a, lora_b, ranks, scales, adapter_ids, slices, dropout_p, seeds):
    """(y [M, N], t [M, slices·R] fp32 in sorted order, perm, sid) for a 2-D x; ``weight`` dense or
    quantized (decoded in the GEMM at few tokens, else once into a dense buffer: ``quant/launch.py``;
    the fp8 tensor-core GEMM has no multi-adapter form)."""
    M = x.shape[0]
    if not isinstance(weight, Tensor) and gemm_mode(weight, x, M) != "inloop":
        weight = dequantize_triton(weight, x.dtype)
    stack = AdapterStack.build(lora_b, ranks, scales, slices, dropout_p, seeds)
    rows = RowOrder.sort(adapter_ids)
    y = torch.empty((M, weight.shape[0]), device=x.device, dtype=x.dtype)
    # Zeros: the kernels write t only inside each row's ranks, and the op's
    # output must be defined everywhere (the reference returns the same t).
    t = torch.zeros((M, stack.num_slices * stack.max_rank), device=x.device, dtype=torch.float32)
    if M == 0:
        return y, t, rows.perm, rows.sid
    # t = A_a·drop(x) per adapter run (sorted rows)
    shrink(x, SlotMatrix.lora_a(lora_a, stack.max_rank), stack, rows, t, sliced_reduction=False,
           dropout=stack.drop is not None)
    # y = x·W0ᵀ + Σ s·t·B_aᵀ + bias
    matmul(x, weight, bias, rows, t, SlotMatrix.lora_b(lora_b), stack, y, sliced_output=True)
    return y, t, rows.perm, rows.sid


@on_device
def multi_lora_bwd_triton(dy, x, weight, lora_a, lora_b, ranks, scales, t, perm, sid, slices, needs_dx,
                          needs_dlora, needs_dbias, dropout_p, seeds):
    """(dx [M, K] or empty, dA like lora_a and dB like lora_b or both empty,
    dbias [N] fp32 or empty). A quantized weight is decoded into a buffer for dx."""
    M, K = x.shape
    if not isinstance(weight, Tensor) and needs_dx:
        weight = dequantize_triton(weight, x.dtype)
    stack = AdapterStack.build(lora_b, ranks, scales, slices, dropout_p, seeds)
    rows = RowOrder(perm, sid)
    if needs_dlora:
        da = torch.zeros(lora_a.shape, device=x.device, dtype=torch.float32)
        db = torch.zeros(lora_b.shape, device=x.device, dtype=torch.float32)
    else:
        da, db = lora_a.new_empty(0), lora_b.new_empty(0)
    dx = torch.empty((M, K), device=x.device, dtype=x.dtype) if needs_dx else x.new_empty(0)
    dbias = dy.sum(0, dtype=torch.float32) if needs_dbias else dy.new_empty(0, dtype=torch.float32)
    if M == 0 or not (needs_dx or needs_dlora):
        return dx, da.to(lora_a.dtype), db.to(lora_b.dtype), dbias
    sliced = stack.num_slices > 1
    dropout = stack.drop is not None
    a_op, b_op = SlotMatrix.lora_a(lora_a, stack.max_rank), SlotMatrix.lora_b(lora_b)
    # dt = dY·B_a per run and slice (unscaled; its consumers apply s): B read as [R, N],
    # slice i reducing over its own columns only.
    dt = torch.empty((M, stack.num_slices * stack.max_rank), device=x.device, dtype=torch.float32)
    shrink(dy, b_op.T, stack, rows, dt, sliced_reduction=sliced)
    if needs_dlora:
        # dA = s·dtᵀ·drop(x) and dB = s·dYᵀ·t, one small GEMM per adapter over its sorted rows
        seg = rows.segments(stack.slots)
        grad(dt, x, rows, seg, stack, SlotMatrix.lora_a(da, stack.max_rank), sliced_output=False, dropout=dropout)
        grad(t, dy, rows, seg, stack, SlotMatrix.lora_b(db).T, sliced_output=sliced)
    if needs_dx:
        # dx = dY·W0 + Σ_i drop_i(s·dt_i·A_a,i): W0 read as [K, N] (out = K), A as [K, R] per slice
        matmul(dy, weight.t(), None, rows, dt, a_op.T, stack, dx, sliced_output=False, dropout=dropout)
    return dx, da.to(lora_a.dtype), db.to(lora_b.dtype), dbias
