"""Fused LoRA kernels: y = x·W0ᵀ + s·(drop(x)·Aᵀ)·Bᵀ + bias and its backward.

Letters: M tokens, K in-features, N out-features, R rank, P the kept dim of
a reduction over M. Every kernel takes explicit strides (expanded stride-0
gradients and non-contiguous inputs are read as they are) and accumulates
in fp32. Operands are cast to the dtype of the main input (x or dY) right
before each ``tl.dot``, so adapters may be fp32 while x is bf16/fp16.

Forward, one or two launches:

* ``_lora_shrink_kernel``       t = drop(X)·Aᵀ (only where the GEMM cannot fuse it: dropout on, or R > 16)
* ``_lora_matmul_kernel``       Y = X·Wᵀ + scale·T·Uᵀ [+ bias]: the portable GEMM (sm_80, interpreter)
* ``_lora_matmul_tma_kernel``   the same on sm_90: TMA tiles, persistent grid, t fused into the main loop

Backward, three launches, no atomics, every reduction in a fixed order:

* ``_lora_dy_kernel``    one pass over dY: dt = s·dY·B, and dB, dbias as per-split partial sums
* ``_lora_x_kernel``     one pass over x: dA = dtᵀ·drop(x); its other programs sum the dB and dbias partials
* the matmul kernel again, operands transposed: dX = dY·W0 + (dt·A)⊙keep/(1-p)
"""
import triton
import triton.language as tl

from .common import column_quarters, dropout_keep, gemm_tile, grouped_pid, mma, tma_gemm_tile, tma_operands


@triton.jit
def _lora_shrink_kernel(
    x_ptr,  # [M, K]  input rows (x forward, dY backward)
    a_ptr,  # [R, K]  down projection (A forward, Bᵀ backward)
    t_ptr,  # [M, R]  fp32 output
    seed_ptr,  # [1] int32, read only when HAS_DROPOUT
    scale,  # fp32: multiplies the whole product (dropout's 1/(1-p) included)
    M, K, R,
    stride_xm, stride_xk,
    stride_ar, stride_ak,
    stride_tm, stride_tr,
    drop_threshold,  # int32: round(p * 2**24)
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """t[m, :] = scale · Σ_k keep(m, k)·x[m, k]·a[:, k].

    Grid: (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R)). BLOCK_R covers the whole
    rank up to 64, so x is read exactly once there; larger ranks take one
    program per 64 ranks (each re-reads its rows: register-bound otherwise).
    This kernel is memory-bound.
    """
    # ---- program ids -> offsets
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_r = offs_r < R
    # int64 row offsets: M·stride_xm overflows int32 at real sizes.
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    a_ptrs = a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :].to(tl.int64) * stride_ar
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr).to(tl.uint32)

    # ---- reduction over K
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offs_m[:, None], k0 + offs_k[None, :], drop_threshold)
            x = tl.where(keep, x, 0.0)
        acc = mma(x, a.to(x.dtype), acc)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak

    # ---- write back
    acc = acc * scale
    t_ptrs = t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + offs_r[None, :] * stride_tr
    tl.store(t_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _low_rank(acc, rows, cols, t, t_ptr, stride_tm, stride_tr, u_ptr, stride_un, stride_ur, M, N, R, scale,
              dtype: tl.constexpr, FUSE_SHRINK: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc + scale·t·uᵀ over the tile's rows and columns: the fused fp32 rank
    tile ``t`` (FUSE_SHRINK, R ≤ BLOCK_R) in one step, or t read from
    ``t_ptr`` in rank steps of BLOCK_R. Rows and columns wrap modulo M and N
    so the loads need no mask (the stores are masked or clipped)."""
    offs_r = tl.arange(0, BLOCK_R)
    wrows = (rows % M).to(tl.int64)
    wcols = (cols % N).to(tl.int64)
    if FUSE_SHRINK:
        u = tl.load(u_ptr + offs_r[:, None] * stride_ur + wcols[None, :] * stride_un,
                    mask=(offs_r < R)[:, None], other=0.0)
        acc = mma((t * scale).to(dtype), u.to(dtype), acc)
    else:
        t_ptrs = t_ptr + wrows[:, None] * stride_tm + offs_r[None, :] * stride_tr
        u_ptrs = u_ptr + offs_r[:, None] * stride_ur + wcols[None, :] * stride_un
        for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
            mask_r = (r0 + offs_r) < R
            tr = tl.load(t_ptrs, mask=mask_r[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=mask_r[:, None], other=0.0)
            acc = mma((tr * scale).to(dtype), u.to(dtype), acc)
            t_ptrs += BLOCK_R * stride_tr
            u_ptrs += BLOCK_R * stride_ur
    return acc


@triton.jit
def _epilogue_part(acc, rows, cols, t_ptr, stride_tm, stride_tr, u_ptr, stride_un, stride_ur, bias_ptr,
                   seed, M, N, R, scale, drop_threshold, dtype: tl.constexpr,
                   HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr):
    """One column part of a matmul kernel's epilogue, cast for the store:
    acc + bias, and with HAS_DROPOUT + (scale·t·uᵀ)⊙keep, the low-rank term
    of these columns only (a whole-tile masked term would need a second
    tile-sized accumulator)."""
    if HAS_DROPOUT:
        lora = _low_rank(tl.zeros(acc.shape, dtype=tl.float32), rows, cols, rows, t_ptr, stride_tm, stride_tr,
                         u_ptr, stride_un, stride_ur, M, N, R, scale, dtype, False, BLOCK_R)
        keep = dropout_keep(seed, rows[:, None], cols[None, :], drop_threshold)
        acc += tl.where(keep, lora, 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols % N).to(tl.float32)[None, :]
    return acc.to(dtype)


@triton.jit
def lora_store(acc, t, offs_m, offs_n, pid_n, t_ptr, stride_tm, stride_tr, u_ptr, stride_un, stride_ur, bias_ptr,
               y_ptr, stride_ym, stride_yn, seed_ptr, M, N, R, scale, drop_threshold,
               HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, FUSE_SHRINK: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """The epilogue of a pointer-store LoRA GEMM tile (rows ``offs_m``, columns ``offs_n``, column
    block ``pid_n``): y = acc + scale·t·uᵀ (⊙ keep/(1-p)) + bias, cast and stored under a mask.

    The low-rank term is cdiv(R, BLOCK_R) more reduction steps into acc (one at r = 16), or with
    FUSE_SHRINK one step from the fp32 rank tile ``t`` the main loop accumulated (the first column
    block also writes t, unscaled, for the backward). With dropout (dx) the masked term is computed
    per column quarter (``_epilogue_part``): a whole-tile masked term needs a second tile-sized
    accumulator, and spills."""
    dtype: tl.constexpr = y_ptr.dtype.element_ty
    mask_m = offs_m < M
    if FUSE_SHRINK:
        if pid_n == 0:
            offs_r = tl.arange(0, BLOCK_R)
            tl.store(t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + offs_r[None, :] * stride_tr, t,
                     mask=mask_m[:, None] & (offs_r < R)[None, :])
    y_rows = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr).to(tl.uint32)
        QUARTER: tl.constexpr = BLOCK_N // 4
        parts = column_quarters(acc, BLOCK_M, BLOCK_N)
        for q in tl.static_range(4):
            qcols = pid_n * BLOCK_N + q * QUARTER + tl.arange(0, QUARTER)
            y = _epilogue_part(parts[q], offs_m, qcols, t_ptr, stride_tm, stride_tr, u_ptr, stride_un, stride_ur,
                               bias_ptr, seed, M, N, R, scale, drop_threshold, dtype, HAS_BIAS, HAS_DROPOUT, BLOCK_R)
            tl.store(y_rows + qcols[None, :] * stride_yn, y, mask=mask_m[:, None] & (qcols < N)[None, :])
    else:
        acc = _low_rank(acc, offs_m, offs_n, t, t_ptr, stride_tm, stride_tr, u_ptr, stride_un, stride_ur,
                        M, N, R, scale, dtype, FUSE_SHRINK, BLOCK_R)
        y = _epilogue_part(acc, offs_m, offs_n, t_ptr, stride_tm, stride_tr, u_ptr, stride_un, stride_ur,
                           bias_ptr, seed, M, N, R, scale, drop_threshold, dtype, HAS_BIAS, False, BLOCK_R)
        tl.store(y_rows + offs_n[None, :] * stride_yn, y, mask=mask_m[:, None] & (offs_n < N)[None, :])


@triton.jit
def _lora_matmul_kernel(
    x_ptr,  # [M, K]  (x forward, dY backward)
    w_ptr,  # [N, K]  frozen weight (W0 forward, W0ᵀ backward)
    t_ptr,  # [M, R]  fp32 low-rank activations (t forward, dt backward)
    u_ptr,  # [N, R]  up projection (B forward, Aᵀ backward)
    bias_ptr,  # [N]  read only when HAS_BIAS
    y_ptr,  # [M, N]  output
    seed_ptr,  # [1] int32, read only when HAS_DROPOUT
    scale,  # fp32 multiplier of the low-rank term
    M, N, K, R,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_tm, stride_tr,
    stride_un, stride_ur,
    stride_ym, stride_yn,
    drop_threshold,  # int32: round(p * 2**24)
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y = x·wᵀ + scale·t·uᵀ (masked by keep(m, n)/(1-p) when HAS_DROPOUT) + bias.

    Grid: (cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N),). The low-rank term is
    cdiv(R, BLOCK_R) extra reduction steps into the same fp32 tile, so y is
    written once; its rank tile is BLOCK_R wide (16: r = 16 is one unpadded
    step), not BLOCK_K, so the t/u tiles take few registers next to the
    accumulator. With dropout (the dx of the backward, where the mask sits on
    the output column) the low-rank product is masked before it is added.
    """
    # ---- program ids: grouped ordering so that GROUP_M row blocks share
    # their weight tiles in L2.
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # ---- pointers. Rows and columns wrap modulo M and N so the loads need
    # no mask there; only the store is masked.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn

    # ---- main loop: x·wᵀ
    acc = gemm_tile(x_ptrs, w_ptrs, K, stride_xk, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K)

    # ---- low-rank term, bias, cast, masked store
    lora_store(acc, offs_m, offs_m, offs_n, pid_n, t_ptr, stride_tm, stride_tr, u_ptr, stride_un, stride_ur,
               bias_ptr, y_ptr, stride_ym, stride_yn, seed_ptr, M, N, R, scale, drop_threshold,
               HAS_BIAS, HAS_DROPOUT, False, BLOCK_M, BLOCK_N, BLOCK_R)


@triton.jit
def _lora_matmul_tma_kernel(
    x_ptr,  # [M, K]  unit column stride, 16-byte aligned rows (x forward, dY backward)
    w_ptr,  # [N, K] with unit K stride, or [K, N] with unit N stride when W_NMAJOR (W0 forward / W0ᵀ backward)
    t_ptr,  # [M, R]  fp32 low-rank activations: read, or written when FUSE_SHRINK (for the backward)
    u_ptr,  # [N, R]  up projection (B forward, Aᵀ backward)
    a_ptr,  # [R, K]  down projection in x's dtype, unit K stride, read only when FUSE_SHRINK
    bias_ptr,  # [N]  read only when HAS_BIAS
    y_ptr,  # [M, N]  output, unit column stride, 16-byte aligned rows
    seed_ptr,  # [1] int32, read only when HAS_DROPOUT
    scale,  # fp32 multiplier of the low-rank term (dropout's 1/(1-p) included)
    M, N, K, R, num_programs,
    stride_xm, stride_w,
    stride_tm, stride_tr,
    stride_un, stride_ur,
    stride_ar,
    stride_ym,
    drop_threshold,  # int32: round(p * 2**24)
    W_NMAJOR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, FUSE_SHRINK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """y = x·wᵀ + scale·t·uᵀ (⊙ keep/(1-p) with HAS_DROPOUT) + bias, on sm_90.

    Grid: (num_programs,), about one program per SM; program p takes output
    tiles p, p + num_programs, ... in grouped order (GROUP_M row blocks share
    weight tiles in L2). Operand tiles come through tensor descriptors (TMA).
    The epilogue adds the low-rank term to the whole tile, then adds bias,
    casts and stores two column halves, each through a descriptor, so the
    cast copy takes half the registers of a whole tile. With dropout (dx)
    the masked low-rank term is computed per column quarter
    (``_epilogue_part``), as in the portable kernel.

    FUSE_SHRINK (forward without dropout, R ≤ BLOCK_R, a in x's dtype): t = x·aᵀ is
    accumulated from the x tiles the main loop already holds, so no separate
    shrink pass reads x; the tiles of the first column block write t (fp32,
    unscaled) for the backward. Every column block computes the same t from
    the same tiles in the same order, so all of them agree bit for bit.
    """
    x_desc, w_desc = tma_operands(x_ptr, w_ptr, M, N, K, stride_xm, stride_w, BLOCK_M, BLOCK_N, BLOCK_K, W_NMAJOR)
    HALF: tl.constexpr = BLOCK_N // 2
    if HAS_DROPOUT:  # stored by quarters
        y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[stride_ym, 1],
                                           block_shape=[BLOCK_M, HALF // 2])
    else:
        y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[stride_ym, 1], block_shape=[BLOCK_M, HALF])
    dtype: tl.constexpr = y_ptr.dtype.element_ty
    a_desc = x_desc
    if FUSE_SHRINK:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[R, K], strides=[stride_ar, 1], block_shape=[BLOCK_R, BLOCK_K])
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr).to(tl.uint32)

    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
        pid_m, pid_n = grouped_pid(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        # ---- main loop (and the fused shrink)
        acc, t = tma_gemm_tile(x_desc, w_desc, a_desc, off_m, off_n, K,
                               BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, W_NMAJOR, FUSE_SHRINK)
        rows = off_m + tl.arange(0, BLOCK_M)
        if FUSE_SHRINK:
            if pid_n == 0:
                offs_r = tl.arange(0, BLOCK_R)
                tl.store(t_ptr + rows[:, None].to(tl.int64) * stride_tm + offs_r[None, :] * stride_tr, t,
                         mask=(rows < M)[:, None] & (offs_r < R)[None, :])
        # ---- epilogue by column parts: with dropout, four quarters, each with
        # its masked low-rank term; without, the low-rank term on the whole
        # tile, then two halves. Bias, cast and a descriptor store per part.
        if HAS_DROPOUT:
            QUARTER: tl.constexpr = BLOCK_N // 4
            parts = column_quarters(acc, BLOCK_M, BLOCK_N)
            for q in tl.static_range(4):
                y_desc.store([off_m, off_n + q * QUARTER], _epilogue_part(
                    parts[q], rows, off_n + q * QUARTER + tl.arange(0, QUARTER), t_ptr, stride_tm, stride_tr, u_ptr,
                    stride_un, stride_ur, bias_ptr, seed, M, N, R, scale, drop_threshold, dtype, HAS_BIAS,
                    HAS_DROPOUT, BLOCK_R))
        else:
            acc = _low_rank(acc, rows, off_n + tl.arange(0, BLOCK_N), t, t_ptr, stride_tm, stride_tr,
                            u_ptr, stride_un, stride_ur, M, N, R, scale, dtype, FUSE_SHRINK, BLOCK_R)
            acc0, acc1 = acc.reshape(BLOCK_M, 2, HALF).permute(0, 2, 1).split()
            cols = off_n + tl.arange(0, HALF)
            y_desc.store([off_m, off_n], _epilogue_part(
                acc0, rows, cols, t_ptr, stride_tm, stride_tr, u_ptr, stride_un, stride_ur, bias_ptr, seed,
                M, N, R, scale, drop_threshold, dtype, HAS_BIAS, HAS_DROPOUT, BLOCK_R))
            y_desc.store([off_m, off_n + HALF], _epilogue_part(
                acc1, rows, cols + HALF, t_ptr, stride_tm, stride_tr, u_ptr, stride_un, stride_ur, bias_ptr, seed,
                M, N, R, scale, drop_threshold, dtype, HAS_BIAS, HAS_DROPOUT, BLOCK_R))


@triton.jit
def _lora_dy_kernel(
    dy_ptr,  # [M, N]  output gradient
    b_ptr,  # [N, R]  up projection
    t_ptr,  # [M, R]  fp32 forward activations
    dt_ptr,  # [M, R]  fp32 out: s·dY·B
    db_ptr,  # [SPLIT, N, R] fp32 out: per-split partial s·dYᵀ·t
    dbias_ptr,  # [SPLIT, N] fp32 out: per-split partial column sums of dY, written only when HAS_DBIAS
    scale,
    M, N, R, rows_per_split,
    stride_dym, stride_dyn,
    stride_bn, stride_br,
    stride_tm, stride_tr,
    stride_dtm, stride_dtr,
    stride_dbs, stride_dbn, stride_dbr,
    stride_dbias_s,
    HAS_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One pass over dY for dt, dB and dbias.

    Grid: (SPLIT, cdiv(R, BLOCK_R)); BLOCK_R is the whole rank up to 64 (larger
    ranks: a program per 64 ranks, each reading its rows of dY again).
    Program s owns rows [s·rows_per_split, (s+1)·rows_per_split)
    and walks every column block of them (column blocks outer, row blocks
    inner). Its dt rows are complete when it ends: it adds each column
    block's s·dY·B to them in order (they are its own rows, a few KB that stay
    in cache; a barrier orders the read after the previous write). dB and
    dbias of a column block are summed over its rows in registers and written
    to the program's slab; ``_lora_x_kernel`` sums the slabs in slab order.
    No atomics: bitwise reproducible for a given shape and split.
    """
    pid = tl.program_id(0)
    m_start = pid * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_mb = tl.arange(0, BLOCK_M)
    mask_r = offs_r < R
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :] * stride_br,
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for m0 in range(m_start, m_end, BLOCK_M):
            offs_m = m0 + offs_mb
            mask_m = offs_m < m_end
            dy = tl.load(dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :] * stride_dyn,
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            t = tl.load(t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + offs_r[None, :] * stride_tr,
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            db = mma(tl.trans(dy), t.to(dy.dtype), db)
            if HAS_DBIAS:
                dbias += tl.sum(dy.to(tl.float32), axis=0)
            dt = mma(dy, b.to(dy.dtype), tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)) * scale
            dt_ptrs = dt_ptr + offs_m[:, None].to(tl.int64) * stride_dtm + offs_r[None, :] * stride_dtr
            mask_t = mask_m[:, None] & mask_r[None, :]
            if n0 > 0:
                dt += tl.load(dt_ptrs, mask=mask_t, other=0.0)
            tl.store(dt_ptrs, dt, mask=mask_t)
        tl.debug_barrier()  # this block's dt writes before the next block's reads, across the program's threads
        slab = pid.to(tl.int64) * stride_dbs
        tl.store(db_ptr + slab + offs_n[:, None].to(tl.int64) * stride_dbn + offs_r[None, :] * stride_dbr,
                 db * scale, mask=mask_n[:, None] & mask_r[None, :])
        if HAS_DBIAS:
            if tl.program_id(1) == 0:
                tl.store(dbias_ptr + pid.to(tl.int64) * stride_dbias_s + offs_n, dbias, mask=mask_n)


@triton.jit
def _lora_x_kernel(
    x_ptr,  # [M, K]  layer input
    dt_ptr,  # [M, R]  fp32 from _lora_dy_kernel
    da_ptr,  # [R, K]  out (lora_a's dtype): dA = dtᵀ·drop(x)
    seed_ptr,  # [1] int32, read only when HAS_DROPOUT
    db_part_ptr,  # [SPLIT, N, R] fp32 partials of _lora_dy_kernel
    db_ptr,  # [N, R]  out (lora_b's dtype, contiguous): their sum
    dbias_part_ptr,  # [SPLIT, N] fp32 partials, read only when HAS_DBIAS
    dbias_ptr,  # [N] fp32 out, written only when HAS_DBIAS
    M, K, R, N, SPLIT, k_programs,
    stride_xm, stride_xk,
    stride_dtm, stride_dtr,
    stride_dar, stride_dak,
    stride_dbs, stride_dbn, stride_dbr,
    stride_dbias_s,
    scale,  # fp32 multiplier of dA (dropout's 1/(1-p))
    drop_threshold,
    HAS_DROPOUT: tl.constexpr, HAS_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dA = scale·dtᵀ·drop(x) from one pass over x, and the fixed-order sums of dB and dbias.

    Grid: (k_programs + cdiv(N, BLOCK_N), cdiv(R, BLOCK_R)); BLOCK_R is the whole
    rank up to 64 (larger ranks: a program per 64 ranks). Program p < k_programs owns
    columns [p·BLOCK_K, (p+1)·BLOCK_K) of dA and reduces over every row of x
    itself: no split over M, so no partial sums. The programs after them each
    sum one column block of the dB (and dbias) slabs, slab 0 first.
    """
    pid = tl.program_id(0)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    if pid < k_programs:
        offs_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        offs_mb = tl.arange(0, BLOCK_M)
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr).to(tl.uint32)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + offs_mb
            mask_m = offs_m < M
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            dt = tl.load(dt_ptr + offs_m[:, None].to(tl.int64) * stride_dtm + offs_r[None, :] * stride_dtr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            if HAS_DROPOUT:
                x = tl.where(dropout_keep(seed, offs_m[:, None], offs_k[None, :], drop_threshold), x, 0.0)
            acc = mma(tl.trans(dt.to(x.dtype)), x, acc)
        tl.store(da_ptr + offs_r[:, None] * stride_dar + offs_k[None, :] * stride_dak,
                 (acc * scale).to(da_ptr.dtype.element_ty),
                 mask=mask_r[:, None] & mask_k[None, :])
    else:
        offs_n = (pid - k_programs) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        ptrs = db_part_ptr + offs_n[:, None].to(tl.int64) * stride_dbn + offs_r[None, :] * stride_dbr
        mask = mask_n[:, None] & mask_r[None, :]
        db = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        dbias = tl.zeros((BLOCK_N,), dtype=tl.float32)
        bias_ptrs = dbias_part_ptr + offs_n
        for _ in range(0, SPLIT):  # slab order: the sum is the same on every run
            db += tl.load(ptrs, mask=mask, other=0.0)
            ptrs += stride_dbs
            if HAS_DBIAS:
                dbias += tl.load(bias_ptrs, mask=mask_n, other=0.0)
                bias_ptrs += stride_dbias_s
        tl.store(db_ptr + offs_n[:, None] * R + offs_r[None, :], db.to(db_ptr.dtype.element_ty), mask=mask)
        if HAS_DBIAS:
            if tl.program_id(1) == 0:
                tl.store(dbias_ptr + offs_n, dbias, mask=mask_n)
