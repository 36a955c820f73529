"""LoRA on MoE experts: the expert GEMMs with each expert's adapter fused in.

    y[j] = x[j]·W_e + s_e·(drop(x[j])·A_eᵀ)·B_eᵀ (+ bias_e),   e = the expert of packed row j

Letters: M packed rows (the kept slots, grouped by expert: expert e owns rows
ends[e-1]:ends[e]), K in-features, N out-features, E experts, R_MAX the
widest rank, SLOTS the adapter ids (E for one adapter per expert; E·T with T
tenants, id = e·T + tenant, for a mixed batch).

One kernel, ``_expert_lora_matmul_kernel``, over a table of row tiles that
never straddle two experts (built on the device from ``ends``, no host sync),
so each program runs one expert's GEMM: W_e comes from the expert's own
weight, and the low-rank term is either

* fused (FUSE_SHRINK: one adapter per expert, no dropout, R_MAX ≤ BLOCK_R ≤ 64):
  t = x·A_eᵀ is accumulated from the x tiles the main loop already loads
  (no second pass over x), written once per row tile (the programs of the
  first column block), and expanded into the same accumulator; or
* read from ``t`` (computed by the multi-adapter shrink, ``kernels/multi_lora.py``)
  and expanded run by run (``_expand``: every adapter id of the tile, rows
  of other ids isolated by select), which covers dropout and mixed batches.

On sm_90, ``_expert_lora_matmul_tma_kernel`` runs the fused case with x,
the weight and A through TMA over a persistent grid.

The backward is the same kernel with operands transposed (dX = dY·W_eᵀ +
s·(dY·B_e)·A_e, dt fused the same way) and the multi-adapter gradient kernel
with the experts as slots (dA_e, dB_e over the expert's own rows, fixed
order, no atomics; an expert without rows gets exact zeros).
"""
import triton
import triton.language as tl

from .common import column_quarters, grouped_pid, mma
from .multi_lora import _expand


@triton.jit
def _expert_lora_matmul_kernel(
    x_ptr,  # [M, K]  packed rows, grouped by expert (x forward, dY backward)
    w_ptr,  # [E, ...]  frozen weights: element (e, k, n) at e·stride_we + k·stride_wk + n·stride_wn
    bias_ptr,  # [E, N]  element (e, n) at e·stride_biase + n; read only when HAS_BIAS
    tile_e_ptr,  # [TILES] int32  expert of each row tile, -1 = unused tile
    tile_row_ptr,  # [TILES] int32  first packed row of each tile
    ends_ptr,  # [E] int32  expert e's rows end at ends[e]
    sid_ptr,  # [M] int64  adapter id of each row (SLOTS = none); read only without FUSE_SHRINK
    a_ptr,  # adapters' down projections, element (id, r, k) at id·stride_as + r·stride_ar + k·stride_ak;
    #         read only when FUSE_SHRINK (A forward, Bᵀ backward)
    t_ptr,  # [M, R_MAX] fp32  low-rank activations: written when FUSE_SHRINK (unscaled), read otherwise
    b_ptr,  # adapters' up projections, element (id, n, r) at id·stride_bs + n·stride_bn + r·stride_br
    #         (B forward, Aᵀ backward)
    rank_ptr,  # [SLOTS] int32  rank of each adapter id
    scale_ptr,  # [SLOTS] fp32  scale of each adapter id
    y_ptr,  # [M, N]  output (rows past ends[E-1] are not written)
    seed_ptr,  # [1] int32  dropout seed, read only when HAS_DROPOUT (backward dX)
    thr_ptr,  # [SLOTS] int32  dropout thresholds, read only when HAS_DROPOUT
    inv_ptr,  # [SLOTS] fp32  1 / (1 - p), read only when HAS_DROPOUT
    M, N, K, E, R_MAX, SLOTS, TILES,
    stride_xm, stride_xk,
    stride_we, stride_wk, stride_wn,
    stride_biase,
    stride_as, stride_ar, stride_ak,
    stride_tm, stride_tr,
    stride_bs, stride_bn, stride_br,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, FUSE_SHRINK: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Grid: (TILES · cdiv(N, BLOCK_N),), in grouped order. Row tile i holds
    rows tile_row[i] … min(tile_row[i] + BLOCK_M, ends[e]) of expert
    e = tile_e[i]; unused tiles (e = -1) do nothing. Every output element is
    written by one program, once.

    Loads need no row mask: rows past the expert's end (the next expert's,
    clamped to M - 1) are read, used in no stored row and never written, so
    a NaN in another expert's rows or adapter reaches none of this expert's
    outputs. An expert index or a row outside its tensor (a corrupt table)
    is clamped, so no value makes the kernel touch memory outside its
    tensors."""
    # ---- program ids -> (row tile of one expert, column block)
    pid_m, pid_n = grouped_pid(tl.program_id(0), TILES * BLOCK_M, N, BLOCK_M, BLOCK_N, GROUP_M)
    e = tl.load(tile_e_ptr + pid_m)
    if e >= 0:
        e = tl.minimum(e, E - 1)
        row0 = tl.load(tile_row_ptr + pid_m)
        end = tl.minimum(tl.load(ends_ptr + e), M)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        mask_m = (offs_m < end) & (offs_m >= 0)
        rows = tl.minimum(tl.maximum(offs_m, 0), M - 1).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = (offs_n % N).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        dtype: tl.constexpr = x_ptr.dtype.element_ty

        x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
        w_ptrs = w_ptr + e.to(tl.int64) * stride_we + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
        if FUSE_SHRINK:
            r_e = tl.minimum(tl.maximum(tl.load(rank_ptr + e), 0), R_MAX)
            mask_r = offs_r < r_e
            a_ptrs = a_ptr + e.to(tl.int64) * stride_as + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak
            t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)

        # ---- main loop: the expert's GEMM (and the shrink from the same x tiles)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask_k = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None], other=0.0)
            acc = mma(x, w.to(dtype), acc)
            if FUSE_SHRINK:
                a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
                t = mma(x, a.to(dtype), t)
                a_ptrs += BLOCK_K * stride_ak
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

        # ---- low-rank term, bias, store
        if FUSE_SHRINK:
            if pid_n == 0:  # one column block writes t for the backward
                tl.store(t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr, t,
                         mask=mask_m[:, None] & mask_r[None, :])
            u = tl.load(b_ptr + e.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br + cols[None, :] * stride_bn,
                        mask=mask_r[:, None], other=0.0)
            acc = mma((t * tl.load(scale_ptr + e)).to(dtype), u.to(dtype), acc)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + e.to(tl.int64) * stride_biase + cols).to(tl.float32)[None, :]
            tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                     mask=mask_m[:, None] & (offs_n < N)[None, :])
        else:
            # Every adapter run of the tile, a column quarter at a time: the
            # run's isolated term needs a quarter tile of registers (a whole
            # one spills).
            sid = tl.load(sid_ptr + rows, mask=mask_m, other=-1)
            valid = mask_m & (sid >= 0) & (sid < SLOTS)
            QUARTER: tl.constexpr = BLOCK_N // 4
            parts = column_quarters(acc, BLOCK_M, BLOCK_N)
            for q in tl.static_range(4):
                offs_q = pid_n * BLOCK_N + q * QUARTER + tl.arange(0, QUARTER)
                out = _expand(parts[q], rows, rows, sid, valid, offs_q, t_ptr, b_ptr, rank_ptr, scale_ptr, rank_ptr,
                              seed_ptr, thr_ptr, inv_ptr, N, R_MAX, SLOTS, stride_tm, stride_tr, stride_bs, 0,
                              stride_bn, stride_br, dtype, False, HAS_DROPOUT, 1, BLOCK_R)
                if HAS_BIAS:
                    out += tl.load(bias_ptr + e.to(tl.int64) * stride_biase + offs_q % N).to(tl.float32)[None, :]
                tl.store(y_ptr + rows[:, None] * stride_ym + offs_q[None, :] * stride_yn,
                         out.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & (offs_q < N)[None, :])


@triton.jit
def _expert_lora_matmul_tma_kernel(
    x_ptr,  # [M, K]  packed rows (unit K stride): through TMA
    w_ptr,  # [E, ...]  frozen weights: [E, K, N] with unit N stride (W_NMAJOR) or [E, N, K] with unit K stride
    bias_ptr,  # [E, N]  read only when HAS_BIAS
    tile_e_ptr,  # [TILES] int32  expert of each row tile; the used tiles come first
    tile_row_ptr,  # [TILES] int32  first packed row of each tile
    used_ptr,  # [1] int64  number of used row tiles
    ends_ptr,  # [E] int32  expert e's rows end at ends[e]
    a_ptr,  # [E, R_MAX, K] in x's dtype, unit K stride: down projections (A forward, Bᵀ backward), through TMA
    t_ptr,  # [M, R_MAX] fp32  low-rank activations, written (unscaled)
    b_ptr,  # up projections, element (e, n, r) at e·stride_bs + n·stride_bn + r·stride_br
    rank_ptr,  # [E] int32
    scale_ptr,  # [E] fp32
    y_ptr,  # [M, N]  output
    M, N, K, E, R_MAX, num_programs,
    stride_xm, stride_we, stride_w, stride_biase,
    stride_as, stride_ar,
    stride_tm, stride_tr,
    stride_bs, stride_bn, stride_br,
    stride_ym, stride_yn,
    W_NMAJOR: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``_expert_lora_matmul_kernel`` with the shrink fused, on sm_90: x, the
    expert's weight tile and its A tile through tensor descriptors (TMA; 3-D
    descriptors over [experts, ...], so a tile never reads past its expert's
    K or N), wgmma on them, over a persistent grid (about one program per SM
    walking the used row tiles × column blocks in grouped order; the number
    of used tiles is read on the device). The store is a masked pointer store:
    a row tile ends at its expert's last row, and the rows after it belong to
    the next expert's tiles. TMA zero-fills past M, K, N and R_MAX; ranks
    below R_MAX are masked on t."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    if W_NMAJOR:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E, K, N], strides=[stride_we, stride_w, 1],
                                           block_shape=[1, BLOCK_K, BLOCK_N])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[E, N, K], strides=[stride_we, stride_w, 1],
                                           block_shape=[1, BLOCK_N, BLOCK_K])
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[E, R_MAX, K], strides=[stride_as, stride_ar, 1],
                                       block_shape=[1, BLOCK_R, BLOCK_K])
    dtype: tl.constexpr = y_ptr.dtype.element_ty
    used = tl.load(used_ptr).to(tl.int32)
    offs_r = tl.arange(0, BLOCK_R)
    for tile in tl.range(tl.program_id(0), used * tl.cdiv(N, BLOCK_N), num_programs, flatten=True):
        pid_m, pid_n = grouped_pid(tile, used * BLOCK_M, N, BLOCK_M, BLOCK_N, GROUP_M)
        e = tl.minimum(tl.maximum(tl.load(tile_e_ptr + pid_m), 0), E - 1)
        row0 = tl.load(tile_row_ptr + pid_m)
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([row0, k0])
            if W_NMAJOR:
                w = w_desc.load([e, k0, off_n]).reshape(BLOCK_K, BLOCK_N)
            else:
                w = w_desc.load([e, off_n, k0]).reshape(BLOCK_N, BLOCK_K).T
            acc = tl.dot(x, w, acc)
            t = tl.dot(x, a_desc.load([e, 0, k0]).reshape(BLOCK_R, BLOCK_K).T, t)

        # ---- low-rank term, bias, masked store (rows of this expert only)
        end = tl.minimum(tl.load(ends_ptr + e), M)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < end
        rows = tl.minimum(offs_m, M - 1).to(tl.int64)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        cols = (offs_n % N).to(tl.int64)
        r_e = tl.minimum(tl.maximum(tl.load(rank_ptr + e), 0), R_MAX)
        mask_r = offs_r < r_e
        t = tl.where(mask_r[None, :], t, 0.0)  # A's rows past the expert's rank (a rank pattern) count for nothing
        if pid_n == 0:
            tl.store(t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr, t,
                     mask=mask_m[:, None] & mask_r[None, :])
        u = tl.load(b_ptr + e.to(tl.int64) * stride_bs + offs_r[:, None] * stride_br + cols[None, :] * stride_bn,
                    mask=mask_r[:, None], other=0.0)
        acc = tl.dot((t * tl.load(scale_ptr + e)).to(dtype), u.to(dtype), acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + e.to(tl.int64) * stride_biase + cols).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(dtype),
                 mask=mask_m[:, None] & (offs_n < N)[None, :])
