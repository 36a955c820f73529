"""Batched multi-adapter LoRA: y[i] = x[i]·W0ᵀ + s_a·B_a(A_a·x[i]) (+ bias), a = ids[i].

Letters: M tokens, K in-features, N out-features, R_MAX the pool's rank
capacity, SLOTS the pool's adapter slots. Rows are processed in adapter order
(``perm``: sorted position → original row; ``sid``: the slot of each sorted
row, ascending, -1 = no adapter), so a tile's rows form runs of one adapter.
A tile loops over the distinct adapters it holds (a ``while`` over the runs,
no padding of runs to tiles) and each adapter's rank in steps of
``BLOCK_R`` = 16 up to its own rank (no arithmetic on rank padding beyond the
next multiple of 16, the ``tl.dot`` minimum).
"""
import triton
import triton.language as tl

from .common import gemm_tile, grouped_pid, mma

_NO_ADAPTER = tl.constexpr(2 ** 30)  # larger than any slot id


@triton.jit
def _next_adapter(sid, valid, after):
    """Smallest slot id > ``after`` among the tile's rows (``_NO_ADAPTER`` if none)."""
    return tl.min(tl.where(valid & (sid > after), sid, _NO_ADAPTER), axis=0)


@triton.jit
def _mlora_shrink_kernel(
    x_ptr,  # [M, K]  tokens, original order
    perm_ptr,  # [M] int64  sorted position -> original row
    sid_ptr,  # [M] int64  slot of each sorted row, ascending; -1 = no adapter
    a_ptr,  # [SLOTS, NUM_SLICES·R_MAX, K]  down projections, slice i at rows i·R_MAX
    rank_ptr,  # [NUM_SLICES, SLOTS] int32  rank of each slice of each slot (0 = empty)
    t_ptr,  # [M, NUM_SLICES·R_MAX] fp32  low-rank activations, sorted order
    M, K, R_MAX, SLOTS,
    stride_xm, stride_xk,
    stride_as, stride_ar, stride_ak,
    stride_tm, stride_tr,
    NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """t[j, i·R_MAX + :r_ai] = A_a,i · x[perm[j]] for each sorted row j with
    slot a ≥ 0 and each output slice i.

    Grid: (cdiv(M, BLOCK_M),). Each adapter of the tile reads its A once per
    tile (the decode case: many adapters, few tokens each)."""
    # ---- program ids -> sorted rows
    pid = tl.program_id(0)
    offs_j = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_j = offs_j < M
    sid = tl.load(sid_ptr + offs_j, mask=mask_j, other=-1)
    rows = tl.load(perm_ptr + offs_j, mask=mask_j, other=0)
    valid = mask_j & (sid >= 0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)

    # ---- one pass per adapter present in the tile
    a = _next_adapter(sid, valid, -1)
    while a < _NO_ADAPTER:
        in_run = valid & (sid == a)
        for i in tl.static_range(NUM_SLICES):
            r_a = tl.load(rank_ptr + i * SLOTS + a)
            for r0 in range(0, r_a, BLOCK_R):
                mask_r = (r0 + offs_r) < r_a
                r_cols = i * R_MAX + r0 + offs_r
                acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    mask_k = (k0 + offs_k) < K
                    x = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + offs_k)[None, :] * stride_xk,
                                mask=in_run[:, None] & mask_k[None, :], other=0.0)
                    w = tl.load(a_ptr + a.to(tl.int64) * stride_as + r_cols[None, :] * stride_ar
                                + (k0 + offs_k)[:, None] * stride_ak,
                                mask=mask_k[:, None] & mask_r[None, :], other=0.0)
                    acc = mma(x, w.to(x.dtype), acc)
                tl.store(t_ptr + offs_j.to(tl.int64)[:, None] * stride_tm + r_cols[None, :] * stride_tr, acc,
                         mask=in_run[:, None] & mask_r[None, :])
        a = _next_adapter(sid, valid, a)


@triton.jit
def _mlora_matmul_kernel(
    x_ptr,  # [M, K]  tokens, original order
    w_ptr,  # [N, K]  frozen weight
    bias_ptr,  # [N]  read only when HAS_BIAS
    perm_ptr,  # [M] int64  sorted position -> original row
    sid_ptr,  # [M] int64  slot of each sorted row, ascending; -1 = no adapter
    t_ptr,  # [M, NUM_SLICES·R_MAX] fp32  low-rank activations, sorted order
    b_ptr,  # [SLOTS, N, R_MAX]  up projections; row n belongs to the slice holding column n
    rank_ptr,  # [NUM_SLICES, SLOTS] int32
    scale_ptr,  # [NUM_SLICES, SLOTS] fp32
    bounds_ptr,  # [NUM_SLICES + 1] int32  first column of each slice, then N
    y_ptr,  # [M, N]  output, original order
    M, N, K, R_MAX, SLOTS,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_tm, stride_tr,
    stride_bs, stride_bn, stride_br,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[perm[j]] = x[perm[j]]·Wᵀ + Σ_runs Σ_slices s_a,i·t[j, slice i, :r_ai]·B_a[slice i cols, :r_ai]ᵀ + bias.

    Output slices (fused q/k/v, GQA widths) share x and the launch; a tile
    that straddles a slice boundary handles each slice it holds.

    Grid: (cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N),). The base GEMM and every
    adapter's expand land in one fp32 accumulator; y is written once, to the
    rows' original positions (a permutation: no two programs write a row)."""
    # ---- program ids: grouped ordering, as the single-adapter kernel
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # ---- sorted rows -> original rows (gathered loads, scattered store)
    offs_j = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_j = offs_j < M
    rows = tl.load(perm_ptr + offs_j, mask=mask_j, other=0)
    sid = tl.load(sid_ptr + offs_j, mask=mask_j, other=-1)
    valid = mask_j & (sid >= 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    # ---- base GEMM (K masked: no even-K specialisation here)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = gemm_tile(x_ptrs, w_ptrs, K, stride_xk, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, False)

    # ---- expand: every adapter run of the tile, up to its own rank
    offs_r = tl.arange(0, BLOCK_R)
    a = _next_adapter(sid, valid, -1)
    while a < _NO_ADAPTER:
        in_run = valid & (sid == a)
        for i in tl.static_range(NUM_SLICES):
            lo = tl.load(bounds_ptr + i)
            hi = tl.load(bounds_ptr + i + 1)
            in_slice = (offs_n >= lo) & (offs_n < hi)
            # A slice outside this tile's columns costs nothing: its rank loop is skipped.
            r_a = tl.where(tl.max(in_slice.to(tl.int32), axis=0) > 0, tl.load(rank_ptr + i * SLOTS + a), 0)
            s_a = tl.load(scale_ptr + i * SLOTS + a)
            for r0 in range(0, r_a, BLOCK_R):
                mask_r = (r0 + offs_r) < r_a
                t = tl.load(t_ptr + offs_j.to(tl.int64)[:, None] * stride_tm
                            + (i * R_MAX + r0 + offs_r)[None, :] * stride_tr,
                            mask=in_run[:, None] & mask_r[None, :], other=0.0)
                u = tl.load(b_ptr + a.to(tl.int64) * stride_bs + cols[None, :] * stride_bn
                            + (r0 + offs_r)[:, None] * stride_br, mask=mask_r[:, None] & in_slice[None, :],
                            other=0.0)
                acc = mma((t * s_a).to(x_ptr.dtype.element_ty), u.to(x_ptr.dtype.element_ty), acc)
        a = _next_adapter(sid, valid, a)

    # ---- epilogue
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_j[:, None] & (offs_n[None, :] < N))
