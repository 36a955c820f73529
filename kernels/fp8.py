"""fp8 tensor-core GEMMs for LoRA over an fp8 frozen base: y = x·Wᵀ + s·t·Bᵀ + bias with x and W
both e4m3 in the GEMM, fp32 accumulation, and the low-rank term from the unquantised x.

Letters: M tokens, N output columns, K the reduction, R rank, as in ``lora.py``; KB = cdiv(K, 128).
Scales: the activations get one per row and 128-column block (1×128, computed by
``_fp8_act_quant_kernel`` from the unquantised values: scale = amax / 448); the weight one per
output row (W_SCALE 1) or per 128×128 tile (W_SCALE 2, HF FP8 checkpoints and DeepSeek-V3); the
GEMM promotes each 128-deep partial product to fp32 and scales it there (the product of two
scaled blocks), so the accumulator never holds an unscaled sum across blocks.

* ``_fp8_act_quant_kernel``     one pass over x: x_q (e4m3), its 1×128 scales, and, fused, the
  LoRA shrink t = s·x·Aᵀ from the unquantised x (the low-rank path keeps the adapter's precision)
* ``_fp8_lora_matmul_kernel``   the GEMM and the LoRA epilogue of ``lora.py`` (``lora_store``):
  forward (W [N, K]), or dx = dY·W (W read as [K, N]) with dY quantised by the first kernel (a
  per-row weight scale is then folded into dY before its quantisation: it scales the reduction
  dimension); pointer loads (sm_89, and operands a descriptor cannot address)
* ``_fp8_lora_matmul_tma_kernel``  the same on sm_90: x_q and the weight through TMA, a persistent grid
"""
import triton
import triton.language as tl

from .common import grouped_pid, mma, tma_operands, tma_weight_tile
from .lora import lora_store

E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def e4m3_round(v):
    """fp32 ``v`` (|v| ≤ 448) rounded to the nearest e4m3 value, ties to even, still in fp32: exact
    arithmetic (a power-of-two quantum per binade, the subnormal one below 2**-6, and the rounding
    of fp32's own add), so the cast of the result to e4m3 has nothing left to round. Used under the
    interpreter only (``EXACT_CAST``), whose fp32 -> e4m3 cast does not round to nearest (it drops
    the carry into the exponent: 124.3 became 64); a GPU's cast is exact and faster."""
    bits = v.to(tl.uint32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF).to(tl.int32) - 127
    quantum = ((tl.maximum(exponent, -6) - 3 + 127).to(tl.uint32) << 23).to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2**23: adding it rounds to an integer, ties to even
    steps = (tl.abs(v) / quantum + magic) - magic
    return tl.where((bits >> 31) != 0, -steps, steps) * quantum  # the sign bit: -0.0 stays -0.0


@triton.jit
def _fp8_act_quant_kernel(
    x_ptr,  # [M, K]  activations (x forward, dY backward)
    xq_ptr,  # [M, K]  e4m3 out, contiguous
    sx_ptr,  # [M, KB] fp32 out: the scale of each row's 128-column block (value = xq · sx)
    col_ptr,  # [K] fp32  multiplies column k before the quantisation, read only when HAS_COL_SCALE
    a_ptr,  # [R, K]  down projection, read only when FUSE_SHRINK
    t_ptr,  # [M, R]  fp32 out: scale · x·Aᵀ, written only when FUSE_SHRINK
    scale,  # fp32 multiplier of t
    M, K, R, KB,
    stride_xm, stride_xk,
    stride_ar, stride_ak,
    stride_tm, stride_tr,
    HAS_COL_SCALE: tl.constexpr, FUSE_SHRINK: tl.constexpr, EXACT_CAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """x_q[m, k] = round_e4m3(x[m, k]·col[k] / sx[m, k // 128]), sx = amax of the row's block / 448
    (1 for an all-zero block), rounded to nearest even (as PyTorch's cast), and with FUSE_SHRINK
    t = scale·x·Aᵀ.

    Grid: (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R)); BLOCK_K = 128, the scale block. The programs of
    rank chunks past the first compute t only (the first writes x_q and its scales)."""
    # ---- program ids -> rows, rank chunk
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    first = tl.program_id(1) == 0
    rows = offs_m.to(tl.int64)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)

    # ---- one pass over the row block, 128 columns at a time
    for kb in range(0, KB):
        ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = mask_m[:, None] & (ks < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk, mask=mask, other=0.0)
        if FUSE_SHRINK:
            a = tl.load(a_ptr + offs_r[:, None] * stride_ar + ks[None, :] * stride_ak,
                        mask=(offs_r < R)[:, None] & (ks < K)[None, :], other=0.0)
            t = mma(x, tl.trans(a).to(x.dtype), t)
        if first:
            xf = x.to(tl.float32)
            if HAS_COL_SCALE:
                xf = xf * tl.load(col_ptr + ks, mask=ks < K, other=0.0)[None, :]
            amax = tl.max(tl.abs(xf), axis=1)
            sx = tl.where(amax > 0.0, amax / E4M3_MAX, 1.0)
            # clamped: x / (amax / 448) may round a hair above 448, which e4m3fn cannot hold
            xs = tl.clamp(xf / sx[:, None], -E4M3_MAX, E4M3_MAX)
            if EXACT_CAST:
                xs = e4m3_round(xs)
            xq = xs.to(xq_ptr.dtype.element_ty)
            tl.store(xq_ptr + rows[:, None] * K + ks[None, :], xq, mask=mask)
            tl.store(sx_ptr + rows * KB + kb, sx, mask=mask_m)

    # ---- write back the fused shrink
    if FUSE_SHRINK:
        tl.store(t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr, t * scale,
                 mask=mask_m[:, None] & (offs_r < R)[None, :])


@triton.jit
def promote(acc, part, sx_ptr, sw_ptr, rows, cols, kb, KB, stride_sn, stride_sk, W_SCALE: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """acc + the fp32 product of one 128-deep block (``part``) scaled by x's block scales (rows) and,
    for tile-scaled weights (W_SCALE 2), the weight's tile scales (columns); a per-row weight scale
    (W_SCALE 1) factors out of the sum and is applied once, after the loop."""
    sx = tl.load(sx_ptr + rows * KB + kb)
    if W_SCALE == 2:
        sw = tl.load(sw_ptr + (cols // BLOCK_K) * stride_sn + kb * stride_sk)
        acc += part * sx[:, None] * sw[None, :]  # (not the sx ⊗ sw tile: 64 more registers a thread)
    else:
        acc += part * sx[:, None]
    return acc


@triton.jit
def _fp8_lora_matmul_kernel(
    xq_ptr,  # [M, K]  e4m3, contiguous (x_q forward, dY_q backward)
    sx_ptr,  # [M, KB] fp32  their 1×128 scales
    w_ptr,  # e4m3: [N, K] forward (unit K stride), or the weight [K, N] read transposed (W_NMAJOR, dx)
    sw_ptr,  # fp32 weight scales: element (n, kb) at (n // 128)·stride_sn + kb·stride_sk (W_SCALE 2), or [N] (1)
    t_ptr,  # [M, R]  fp32 low-rank activations (t forward, dt backward)
    u_ptr,  # [N, R]  up projection (B forward, Aᵀ backward)
    bias_ptr,  # [N]  read only when HAS_BIAS
    y_ptr,  # [M, N]  output
    seed_ptr,  # [1] int32, read only when HAS_DROPOUT
    scale,  # fp32 multiplier of the low-rank term (dropout's 1/(1-p) included)
    M, N, K, R, KB,
    stride_wn, stride_wk,
    stride_sn, stride_sk,
    stride_tm, stride_tr,
    stride_un, stride_ur,
    stride_ym,
    drop_threshold,  # int32: round(p * 2**24)
    W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """y = Σ_kb (x_q·w_qᵀ)[kb]·sx[:, kb]·sw[kb] (· sw[n] when W_SCALE 1) + scale·t·uᵀ (⊙ keep/(1-p))
    + bias, each 128-deep block's product promoted to fp32 and scaled there. W_SCALE 0: the weight's
    scales were folded into x (the dx of a per-row-scaled weight).

    Grid: (cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N),), grouped order. BLOCK_K = 128, the scale block."""
    # ---- program ids: grouped ordering so that GROUP_M row blocks share their weight tiles in L2
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # ---- pointers: rows and columns wrap (loads in range); K is masked (the last block may be short)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)

    # ---- main loop: one scaled fp8 block product per 128 columns of K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        ks = kb * BLOCK_K + offs_k
        inside = ks < K
        xq = tl.load(xq_ptr + rows[:, None] * K + ks[None, :], mask=inside[None, :], other=0.0)
        wq = tl.load(w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn, mask=inside[:, None], other=0.0)
        part = tl.dot(xq, wq)
        acc = promote(acc, part, sx_ptr, sw_ptr, rows, cols, kb, KB, stride_sn, stride_sk, W_SCALE, BLOCK_K)
    if W_SCALE == 1:
        acc = acc * tl.load(sw_ptr + cols)[None, :]

    # ---- low-rank term (t from memory), bias, cast, masked store
    lora_store(acc, offs_m, offs_m, offs_n, pid_n, t_ptr, stride_tm, stride_tr, u_ptr, stride_un, stride_ur,
               bias_ptr, y_ptr, stride_ym, 1, seed_ptr, M, N, R, scale, drop_threshold,
               HAS_BIAS, HAS_DROPOUT, False, BLOCK_M, BLOCK_N, BLOCK_R)


@triton.jit
def _fp8_lora_matmul_tma_kernel(
    xq_ptr,  # [M, K]  e4m3, contiguous, 16-byte rows (x_q forward, dY_q backward): through TMA
    sx_ptr,  # [M, KB] fp32  their 1×128 scales
    w_ptr,  # e4m3 weight through TMA: [N, K] with unit K stride, or [K, N] with unit N stride (W_NMAJOR, dx)
    sw_ptr,  # fp32 weight scales, as in _fp8_lora_matmul_kernel
    t_ptr,  # [M, R]  fp32 low-rank activations (t forward, dt backward)
    u_ptr,  # [N, R]  up projection (B forward, Aᵀ backward)
    bias_ptr,  # [N]  read only when HAS_BIAS
    y_ptr,  # [M, N]  output
    seed_ptr,  # [1] int32, read only when HAS_DROPOUT
    scale,  # fp32 multiplier of the low-rank term (dropout's 1/(1-p) included)
    M, N, K, R, KB, num_programs,
    stride_w,  # the weight's row stride (the dimension that is not unit-stride)
    stride_sn, stride_sk,
    stride_tm, stride_tr,
    stride_un, stride_ur,
    stride_ym,
    drop_threshold,  # int32: round(p * 2**24)
    W_NMAJOR: tl.constexpr, W_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``_fp8_lora_matmul_kernel`` on sm_90: x_q and the weight through tensor descriptors (TMA,
    zero-filled past M, N and K), fp8 wgmma, a persistent grid.

    Grid: (num_programs,), about one program per SM walking the output tiles in grouped order.
    BLOCK_K = 128, the scale block."""
    x_desc, w_desc = tma_operands(xq_ptr, w_ptr, M, N, K, K, stride_w, BLOCK_M, BLOCK_N, BLOCK_K, W_NMAJOR)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True):
        pid_m, pid_n = grouped_pid(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        rows = (offs_m % M).to(tl.int64)
        cols = (offs_n % N).to(tl.int64)
        # ---- main loop: one scaled fp8 block product per 128 columns of K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, KB):
            part = tl.dot(x_desc.load([off_m, kb * BLOCK_K]), tma_weight_tile(w_desc, off_n, kb * BLOCK_K, W_NMAJOR))
            acc = promote(acc, part, sx_ptr, sw_ptr, rows, cols, kb, KB, stride_sn, stride_sk, W_SCALE, BLOCK_K)
        if W_SCALE == 1:
            acc = acc * tl.load(sw_ptr + cols)[None, :]
        # ---- low-rank term (t from memory), bias, cast, masked store
        lora_store(acc, offs_m, offs_m, offs_n, pid_n, t_ptr, stride_tm, stride_tr, u_ptr, stride_un, stride_ur,
                   bias_ptr, y_ptr, stride_ym, 1, seed_ptr, M, N, R, scale, drop_threshold,
                   HAS_BIAS, HAS_DROPOUT, False, BLOCK_M, BLOCK_N, BLOCK_R)
