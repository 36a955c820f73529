"""Batched multi-adapter LoRA: y[i] = x[i]·W0ᵀ + s_a·B_a(A_a·x[i]) (+ bias), a = ids[i].

Letters: M tokens, K in-features, N out-features, R_MAX the pool's rank
capacity, SLOTS the pool's adapter slots. Rows are processed in adapter order
(``perm``: sorted position → original row; ``sid``: the slot of each sorted
row, ascending, -1 = no adapter), so a tile's rows form runs of one adapter.
A tile loops over the distinct adapters it holds (a ``while`` over the runs,
no padding of runs to tiles) and each adapter's rank in steps of
``BLOCK_R`` = 16 up to its own rank (no arithmetic on rank padding beyond the
next multiple of 16, the ``tl.dot`` minimum).

Forward: ``_multi_lora_shrink_kernel`` (t = A_a·x per run), then
``_multi_lora_matmul_kernel`` (base GEMM + every run's expand in one accumulator;
on sm_90 ``_multi_lora_matmul_tma_kernel``, the same over a persistent grid
with the weight through TMA).
Backward: the same two kernels with transposed operands give dt = dY·B_a and
dx = dY·W0 + s·dt·A_a; ``_multi_lora_grad_kernel`` gives dA and dB per adapter.
"""
import triton
import triton.language as tl

from .common import (column_quarters, dropout_keep, gathered_tma_gemm_tile, gemm_tile, grouped_pid, mma,
                     tma_weight)

_NO_ADAPTER = tl.constexpr(2 ** 30)  # larger than any slot id


@triton.jit
def _next_adapter(sid, valid, after):
    """Smallest slot id > ``after`` among the tile's rows (``_NO_ADAPTER`` if none)."""
    return tl.min(tl.where(valid & (sid > after), sid, _NO_ADAPTER), axis=0)


@triton.jit
def _sorted_rows(perm_ptr, sid_ptr, pid_m, M, SLOTS, BLOCK_M: tl.constexpr):
    """Row tile ``pid_m`` of the sorted order: (sorted positions, in-bounds
    mask, original rows, slot of each row, rows that have an adapter). A slot
    id outside [0, SLOTS) counts as no adapter, so no id, however wrong, makes
    a kernel read outside the pool (the launchers reject such ids before any
    launch, except while a CUDA graph is being captured)."""
    offs_j = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_j = offs_j < M
    rows = tl.load(perm_ptr + offs_j, mask=mask_j, other=0)
    sid = tl.load(sid_ptr + offs_j, mask=mask_j, other=-1)
    return offs_j, mask_j, rows, sid, mask_j & (sid >= 0) & (sid < SLOTS)


@triton.jit
def _rank(rank_ptr, i, a, SLOTS, R_MAX):
    """Rank of slice i of slot a, clamped to [0, R_MAX]: a wrong rank never
    reads past the slot's rows of the pool."""
    return tl.minimum(tl.maximum(tl.load(rank_ptr + i * SLOTS + a), 0), R_MAX)


@triton.jit
def _multi_lora_shrink_kernel(
    x_ptr,  # [M, K]  tokens, original order
    perm_ptr,  # [M] int64  sorted position -> original row
    sid_ptr,  # [M] int64  slot of each sorted row, ascending; -1 = no adapter
    a_ptr,  # [SLOTS, ...]  down projections: slice i of slot a at a·stride_as + i·stride_a_slice
    rank_ptr,  # [NUM_SLICES, SLOTS] int32  rank of each slice of each slot (0 = empty)
    bounds_ptr,  # [NUM_SLICES + 1] int32  first K column of each slice, then K; read only when SLICED_REDUCTION
    t_ptr,  # [SPLIT_K, M, NUM_SLICES·R_MAX] fp32  low-rank activations (partial sums), sorted order
    seed_ptr,  # [NUM_SLICES] int32  dropout seed of each slice, read only when HAS_DROPOUT
    thr_ptr,  # [SLOTS] int32  dropout threshold round(p_a·2**24) of each slot, read only when HAS_DROPOUT
    inv_ptr,  # [SLOTS] fp32  1 / (1 - p_a), read only when HAS_DROPOUT
    M, K, R_MAX, SLOTS, K_PER_SPLIT,
    stride_xm, stride_xk,
    stride_as, stride_a_slice, stride_ar, stride_ak,
    stride_ts, stride_tm, stride_tr,
    SLICED_REDUCTION: tl.constexpr, HAS_DROPOUT: tl.constexpr, NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """t[j, i·R_MAX + :r_ai] = A_a,i · drop(x[perm[j]]) for each sorted row j
    with slot a ≥ 0 and each slice i. With HAS_DROPOUT (forward only), x's
    element (row, k) survives when keep(seed_i, original row, k, thr_a), and
    t is scaled by 1/(1-p_a): each slot has its own rate, each slice its own mask.

    Forward: A is ``lora_a [SLOTS, NUM_SLICES·R_MAX, K]`` (``stride_a_slice``
    = R_MAX rows) and every slice reduces over all of K. Backward (dt = dY·B):
    x is dY, A is ``lora_b`` read transposed (``stride_a_slice`` = 0) and,
    with SLICED_REDUCTION, slice i reduces over its own columns bounds[i]:bounds[i+1] only.

    Grid: (cdiv(M, BLOCK_M), SPLIT_K). Each adapter of the tile reads its A
    once per tile (the decode case: many adapters, few tokens each). Program
    (m, s) covers k in [s·K_PER_SPLIT, (s+1)·K_PER_SPLIT) and writes slab s
    of t: with few row tiles (decode) the split keeps every SM reading
    adapters, and the caller sums the slabs in a fixed order."""
    # ---- program ids -> sorted rows, K range of this split
    pid = tl.program_id(0)
    split_lo = tl.program_id(1) * K_PER_SPLIT
    t_ptr += tl.program_id(1).to(tl.int64) * stride_ts
    offs_j, _, rows, sid, valid = _sorted_rows(perm_ptr, sid_ptr, pid, M, SLOTS, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)

    # ---- one pass per adapter present in the tile
    a = _next_adapter(sid, valid, -1)
    while a < _NO_ADAPTER:
        in_run = valid & (sid == a)
        for i in range(NUM_SLICES):  # a loop, not unrolled: one body however many slices
            r_a = _rank(rank_ptr, i, a, SLOTS, R_MAX)
            if SLICED_REDUCTION:
                k_lo = tl.maximum(tl.load(bounds_ptr + i), split_lo)
                k_hi = tl.minimum(tl.load(bounds_ptr + i + 1), split_lo + K_PER_SPLIT)
            else:
                k_lo = split_lo
                k_hi = tl.minimum(K, split_lo + K_PER_SPLIT)
            a_base = a_ptr + a.to(tl.int64) * stride_as + i * stride_a_slice
            if HAS_DROPOUT:
                seed = tl.load(seed_ptr + i).to(tl.uint32)
                thr = tl.load(thr_ptr + a)
            for r0 in range(0, r_a, BLOCK_R):
                mask_r = (r0 + offs_r) < r_a
                acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for k0 in range(k_lo, k_hi, BLOCK_K):
                    ks = k0 + offs_k
                    mask_k = ks < k_hi
                    x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                                mask=in_run[:, None] & mask_k[None, :], other=0.0)
                    if HAS_DROPOUT:
                        x = tl.where(dropout_keep(seed, rows[:, None], ks[None, :], thr), x, 0.0)
                    w = tl.load(a_base + (r0 + offs_r)[None, :] * stride_ar + ks[:, None] * stride_ak,
                                mask=mask_k[:, None] & mask_r[None, :], other=0.0)
                    acc = mma(x, w.to(x.dtype), acc)
                if HAS_DROPOUT:
                    acc = acc * tl.load(inv_ptr + a)
                r_cols = i * R_MAX + r0 + offs_r
                tl.store(t_ptr + offs_j.to(tl.int64)[:, None] * stride_tm + r_cols[None, :] * stride_tr, acc,
                         mask=in_run[:, None] & mask_r[None, :])
        a = _next_adapter(sid, valid, a)


@triton.jit
def _multi_lora_matmul_kernel(
    x_ptr,  # [M, K]  tokens, original order
    w_ptr,  # [N, K]  frozen weight
    bias_ptr,  # [N]  read only when HAS_BIAS
    perm_ptr,  # [M] int64  sorted position -> original row
    sid_ptr,  # [M] int64  slot of each sorted row, ascending; -1 = no adapter
    t_ptr,  # [M, NUM_SLICES·R_MAX] fp32  low-rank activations, sorted order
    b_ptr,  # [SLOTS, ...]  up projections: element (n, r) of slice i of slot a at
    #         a·stride_bs + i·stride_b_slice + n·stride_bn + r·stride_br
    rank_ptr,  # [NUM_SLICES, SLOTS] int32
    scale_ptr,  # [NUM_SLICES, SLOTS] fp32
    bounds_ptr,  # [NUM_SLICES + 1] int32  first column of each slice, then N; read only when SLICED_OUTPUT
    y_ptr,  # [M, N]  output, original order
    seed_ptr,  # [NUM_SLICES] int32  dropout seeds, read only when HAS_DROPOUT (backward dx)
    thr_ptr,  # [SLOTS] int32  dropout thresholds, read only when HAS_DROPOUT
    inv_ptr,  # [SLOTS] fp32  1 / (1 - p_a), read only when HAS_DROPOUT
    M, N, K, R_MAX, SLOTS,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_tm, stride_tr,
    stride_bs, stride_b_slice, stride_bn, stride_br,
    stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, SLICED_OUTPUT: tl.constexpr, HAS_DROPOUT: tl.constexpr, NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[perm[j]] = x[perm[j]]·Wᵀ + Σ_runs Σ_slices s_a,i·t[j, slice i, :r_ai]·B_a[slice i cols, :r_ai]ᵀ
    + bias.

    Forward (SLICED_OUTPUT): output slices (fused q/k/v, GQA widths) share x and
    the launch, B is ``lora_b [SLOTS, N, R_MAX]`` (``stride_b_slice`` = 0) and
    slice i owns columns bounds[i]:bounds[i+1]; a tile that straddles a slice
    boundary handles each slice it holds. Backward (dx = dY·W0 + Σ_i s·dt_i·A_i):
    x is dY, W0 is read transposed, B is ``lora_a`` read transposed
    (``stride_b_slice`` = R_MAX rows) and every slice adds to every column;
    with HAS_DROPOUT each (run, slice) term is masked by the forward's keep
    mask on (original row, column) and scaled by 1/(1-p_a) before it joins
    the accumulator.

    Grid: (cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N),). The base GEMM and every
    adapter's expand land in one fp32 accumulator; y is written once, to the
    rows' original positions (a permutation: no two programs write a row)."""
    # ---- program ids: grouped ordering, as the single-adapter kernel
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # ---- sorted rows -> original rows (gathered loads, scattered store)
    offs_j, mask_j, rows, sid, valid = _sorted_rows(perm_ptr, sid_ptr, pid_m, M, SLOTS, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    # ---- base GEMM (K masked: no even-K specialisation here)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = gemm_tile(x_ptrs, w_ptrs, K, stride_xk, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, False)

    # ---- expand (every adapter run of the tile), bias, scattered store
    acc = _expand(acc, offs_j, rows, sid, valid, offs_n, t_ptr, b_ptr, rank_ptr, scale_ptr, bounds_ptr, seed_ptr,
                  thr_ptr, inv_ptr, N, R_MAX, SLOTS, stride_tm, stride_tr, stride_bs, stride_b_slice, stride_bn,
                  stride_br, x_ptr.dtype.element_ty, SLICED_OUTPUT, HAS_DROPOUT, NUM_SLICES, BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_j[:, None] & (offs_n[None, :] < N))


@triton.jit
def _expand(acc, offs_j, rows, sid, valid, offs_n, t_ptr, b_ptr, rank_ptr, scale_ptr, bounds_ptr, seed_ptr, thr_ptr,
            inv_ptr, N, R_MAX, SLOTS, stride_tm, stride_tr, stride_bs, stride_b_slice, stride_bn, stride_br,
            dtype: tl.constexpr, SLICED_OUTPUT: tl.constexpr, HAS_DROPOUT: tl.constexpr, NUM_SLICES: tl.constexpr,
            BLOCK_R: tl.constexpr):
    """acc + Σ_runs Σ_slices s_a,i·t·B_a,iᵀ over the tile's sorted rows
    ``offs_j`` (original ``rows``, slots ``sid``) and columns ``offs_n``:
    every adapter run of the tile, up to its own rank. The columns may be a
    part of the output tile (the sm_90 kernel expands by column quarters)."""
    cols = (offs_n % N).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    a = _next_adapter(sid, valid, -1)
    while a < _NO_ADAPTER:
        in_run = valid & (sid == a)
        for i in range(NUM_SLICES):  # a loop, not unrolled: one body however many slices
            if SLICED_OUTPUT:
                lo = tl.load(bounds_ptr + i)
                hi = tl.load(bounds_ptr + i + 1)
                in_slice = (offs_n >= lo) & (offs_n < hi)
                # A slice outside these columns costs nothing: its rank loop is skipped.
                r_a = tl.where(tl.max(in_slice.to(tl.int32), axis=0) > 0, _rank(rank_ptr, i, a, SLOTS, R_MAX), 0)
            else:
                in_slice = offs_n < N
                r_a = _rank(rank_ptr, i, a, SLOTS, R_MAX)
            s_a = tl.load(scale_ptr + i * SLOTS + a)
            b_base = b_ptr + a.to(tl.int64) * stride_bs + i * stride_b_slice
            # The run's term goes to a tile of its own and joins acc on the
            # run's rows and the slice's columns only: the other rows' t (and
            # the other slices' u) are zero, but 0·NaN = NaN, so a NaN or Inf
            # in this adapter would otherwise reach every row of the tile
            # (other tenants, base-only rows). Isolation by select.
            lora = tl.zeros(acc.shape, dtype=tl.float32)
            for r0 in range(0, r_a, BLOCK_R):
                mask_r = (r0 + offs_r) < r_a
                t = tl.load(t_ptr + offs_j.to(tl.int64)[:, None] * stride_tm
                            + (i * R_MAX + r0 + offs_r)[None, :] * stride_tr,
                            mask=in_run[:, None] & mask_r[None, :], other=0.0)
                u = tl.load(b_base + cols[None, :] * stride_bn + (r0 + offs_r)[:, None] * stride_br,
                            mask=mask_r[:, None] & in_slice[None, :], other=0.0)
                lora = mma((t * s_a).to(dtype), u.to(dtype), lora)
            keep = in_run[:, None] & in_slice[None, :]
            if HAS_DROPOUT:
                keep = keep & dropout_keep(tl.load(seed_ptr + i).to(tl.uint32), rows[:, None], cols[None, :],
                                           tl.load(thr_ptr + a))
                lora = lora * tl.load(inv_ptr + a)
            acc += tl.where(keep, lora, 0.0)
        a = _next_adapter(sid, valid, a)
    return acc


@triton.jit
def _multi_lora_matmul_tma_kernel(
    x_ptr,  # [M, K]  tokens, original order (gathered: pointer loads)
    w_ptr,  # [N, K] with unit K stride, or [K, N] with unit N stride when W_NMAJOR: through TMA
    bias_ptr,  # [N]  read only when HAS_BIAS
    perm_ptr,  # [M] int64  sorted position -> original row
    sid_ptr,  # [M] int64  slot of each sorted row, ascending; -1 = no adapter
    t_ptr,  # [M, NUM_SLICES·R_MAX] fp32  low-rank activations, sorted order
    b_ptr,  # [SLOTS, ...]  up projections, as in _multi_lora_matmul_kernel
    rank_ptr,  # [NUM_SLICES, SLOTS] int32
    scale_ptr,  # [NUM_SLICES, SLOTS] fp32
    bounds_ptr,  # [NUM_SLICES + 1] int32, read only when SLICED_OUTPUT
    y_ptr,  # [M, N]  output, original order
    seed_ptr,  # [NUM_SLICES] int32, read only when HAS_DROPOUT
    thr_ptr,  # [SLOTS] int32, read only when HAS_DROPOUT
    inv_ptr,  # [SLOTS] fp32, read only when HAS_DROPOUT
    M, N, K, R_MAX, SLOTS, num_programs,
    stride_xm, stride_xk, stride_w,
    stride_tm, stride_tr,
    stride_bs, stride_b_slice, stride_bn, stride_br,
    stride_ym, stride_yn,
    W_NMAJOR: tl.constexpr, HAS_BIAS: tl.constexpr, SLICED_OUTPUT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``_multi_lora_matmul_kernel`` on sm_90: the same sum, over a persistent grid.

    Grid: (num_programs,), about one program per SM walking the output tiles
    in grouped order. The weight tiles come through a tensor descriptor (TMA)
    and the gathered x rows through pointer loads; the expand (and its
    per-run isolation tile) and the scattered store work a column quarter of
    the tile at a time, so the run's isolated term needs a quarter tile of
    registers (a whole-tile one spills)."""
    w_desc = tma_weight(w_ptr, N, K, stride_w, BLOCK_N, BLOCK_K, W_NMAJOR)
    QUARTER: tl.constexpr = BLOCK_N // 4
    dtype: tl.constexpr = y_ptr.dtype.element_ty
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
        pid_m, pid_n = grouped_pid(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_j, mask_j, rows, sid, valid = _sorted_rows(perm_ptr, sid_ptr, pid_m, M, SLOTS, BLOCK_M)
        acc = gathered_tma_gemm_tile(x_ptr + rows * stride_xm, stride_xk, w_desc, pid_n * BLOCK_N, K,
                                     BLOCK_M, BLOCK_N, BLOCK_K, W_NMAJOR)
        parts = column_quarters(acc, BLOCK_M, BLOCK_N)
        for q in tl.static_range(4):
            offs_n = pid_n * BLOCK_N + q * QUARTER + tl.arange(0, QUARTER)
            out = _expand(parts[q], offs_j, rows, sid, valid, offs_n, t_ptr, b_ptr, rank_ptr, scale_ptr, bounds_ptr,
                          seed_ptr, thr_ptr, inv_ptr, N, R_MAX, SLOTS, stride_tm, stride_tr, stride_bs, stride_b_slice,
                          stride_bn, stride_br, dtype, SLICED_OUTPUT, HAS_DROPOUT, NUM_SLICES, BLOCK_R)
            if HAS_BIAS:
                out += tl.load(bias_ptr + offs_n % N).to(tl.float32)[None, :]
            tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn, out.to(dtype),
                     mask=mask_j[:, None] & (offs_n < N)[None, :])


@triton.jit
def _multi_lora_grad_kernel(
    p_ptr,  # [M, NUM_SLICES·R_MAX] fp32, sorted order: dt (for dA) or t (for dB)
    q_ptr,  # [M, D]  original order: x (for dA) or dY (for dB)
    perm_ptr,  # [M] int64  sorted position -> original row
    seg_ptr,  # [SLOTS + 1] int64  the sorted rows of slot a are seg[a]:seg[a+1]
    rank_ptr,  # [NUM_SLICES, SLOTS] int32
    scale_ptr,  # [NUM_SLICES, SLOTS] fp32
    bounds_ptr,  # [NUM_SLICES + 1] int32  first D column of each slice, then D; read only when SLICED_OUTPUT
    o_ptr,  # fp32 gradient: element (r, d) of slice i of slot a at a·stride_os + i·stride_o_slice + ...
    seed_ptr,  # [NUM_SLICES] int32  dropout seeds, read only when HAS_DROPOUT (dA: q = drop(x))
    thr_ptr,  # [SLOTS] int32  dropout thresholds, read only when HAS_DROPOUT
    inv_ptr,  # [SLOTS] fp32  1 / (1 - p_a), read only when HAS_DROPOUT
    M, D, R_MAX, SLOTS,
    stride_pm, stride_pr, stride_qm, stride_qd,
    stride_os, stride_o_slice, stride_or, stride_od,
    SLICED_OUTPUT: tl.constexpr, HAS_DROPOUT: tl.constexpr, NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """o[a, slice i, r, d] = s_a,i · Σ_{sorted rows j of slot a} p[j, i·R_MAX + r] · q[perm[j], d]
    for r < r_a,i: the adapter gradients, one small GEMM per adapter.

    dA: p = dt, q = x, o = dA ``[SLOTS, NUM_SLICES·R_MAX, K]`` (``stride_o_slice``
    = R_MAX rows), every slice over all of K. dB: p = t, q = dY, o = dB
    ``[SLOTS, N, R_MAX]`` read as [r, n] (``stride_o_slice`` = 0), and with
    SLICED_OUTPUT slice i only on its columns bounds[i]:bounds[i+1]. With
    HAS_DROPOUT (dA), q is the forward's dropped x: masked by keep(seed_i,
    original row, d, thr_a) and scaled by 1/(1-p_a).

    Grid: (SLOTS, cdiv(R_MAX, BLOCK_R), cdiv(D, BLOCK_D)). Each program sums
    its adapter's rows in sorted order: deterministic, no atomics. Elements
    it does not own (rank padding, idle slots) keep the caller's zeros."""
    # ---- program ids -> (slot, rank block, column block)
    a = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    start = tl.load(seg_ptr + a)
    end = tl.load(seg_ptr + a + 1)
    o_base = o_ptr + a.to(tl.int64) * stride_os

    for i in range(NUM_SLICES):  # a loop, not unrolled: one body however many slices
        r_a = _rank(rank_ptr, i, a, SLOTS, R_MAX)
        if SLICED_OUTPUT:
            in_cols = (offs_d >= tl.load(bounds_ptr + i)) & (offs_d < tl.load(bounds_ptr + i + 1))
        else:
            in_cols = offs_d < D
        # A rank block past this slice's rank, or a column block outside it: nothing to do.
        if (r0 < r_a) & (tl.max(in_cols.to(tl.int32), axis=0) > 0):
            mask_r = offs_r < r_a
            if HAS_DROPOUT:
                seed = tl.load(seed_ptr + i).to(tl.uint32)
                thr = tl.load(thr_ptr + a)
            acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
            for m0 in range(start, end, BLOCK_M):
                offs_j = m0 + offs_m
                mask_j = offs_j < end
                rows = tl.load(perm_ptr + offs_j, mask=mask_j, other=0)
                p = tl.load(p_ptr + offs_j[None, :] * stride_pm + (i * R_MAX + offs_r)[:, None] * stride_pr,
                            mask=mask_r[:, None] & mask_j[None, :], other=0.0)
                q = tl.load(q_ptr + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                            mask=mask_j[:, None] & in_cols[None, :], other=0.0)
                if HAS_DROPOUT:
                    q = tl.where(dropout_keep(seed, rows[:, None], offs_d[None, :], thr), q, 0.0)
                acc = mma(p.to(q.dtype), q, acc)
            s_a = tl.load(scale_ptr + i * SLOTS + a)
            if HAS_DROPOUT:
                s_a = s_a * tl.load(inv_ptr + a)
            tl.store(o_base + i * stride_o_slice + offs_r[:, None] * stride_or + offs_d[None, :] * stride_od,
                     acc * s_a, mask=mask_r[:, None] & in_cols[None, :])
