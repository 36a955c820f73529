"""Quantized frozen bases: the weight tile dequantised in registers inside the GEMM's main loop.

Letters: M tokens, N output columns, K the reduction, R rank, as in ``lora.py``; WN, WK the stored
weight's own [out_features, in_features]. ``QUANT`` (constexpr) names the storage:

* 0, 1: 4 bits in bitsandbytes' layout (``ops/quant/nf4.py``): element (n, k) is code number
  n·WK + k of a flat array, two codes a byte (high nibble first), scaled by the absmax of block
  (n·WK + k) // blocksize; with QUANT 1 the absmax are 8-bit codes under a second code book
  (double quantisation). Value: code[nibble]·absmax in fp32, bitsandbytes' dequantisation.
* 2, 3: fp8 e4m3 (``ops/quant/fp8.py``), [WN, WK] row-major, times an fp32 scale per output row
  (2) or per blocksize2 × blocksize tile (3: HF FP8 checkpoints, 128×128).

Every kernel takes the weight as the same five pointers, whatever the format: ``w_ptr`` (the
packed codes, or the e4m3 data), ``scale_ptr`` (absmax, its 8-bit codes, or the fp8 scales),
``code_ptr`` (the 16 levels), ``scale2_ptr`` / ``code2_ptr`` (the absmax' own scales and levels);
a format ignores those it has no use for. The decoded value is rounded once to the weight's dtype,
then to the input's, so a tile equals the format's reference dequantisation element for element.

* ``_quant_lora_matmul_kernel``   y = x·Wᵀ + s·t·Bᵀ + bias (forward), or dx = dY·W + s·dt·A
  (``W_NMAJOR``): the fused-LoRA GEMM of ``lora.py`` with the weight decoded in the main loop; the
  forward can also compute t = x·Aᵀ from the same x tiles (``FUSE_SHRINK``)
* ``_quant_multi_lora_matmul_kernel``  the multi-adapter forward (``multi_lora.py``) over a quantized weight
* ``_quant_dequant_kernel``       the dense [WN, WK] weight, for the GEMMs that run on a dequantised copy
  (many tokens, or a weight whose rows do not split into whole blocks of the GEMM's tiles)

Why in registers: at few tokens (decode, serving) the GEMM is bound by the weight's bytes, and 4.5
bits (or 8) an element move 3.5x (2x) fewer than 16. At many tokens the GEMM is bound by the tensor
cores, and decoding the tile again in every row block costs more ALU than the GEMM has to spare:
the launchers then decode once into a buffer and run the dense kernels, or, for fp8, run the fp8
tensor-core GEMM of ``fp8.py`` (docs/architecture.md, "Quantized bases").
"""
import triton
import triton.language as tl

from .common import grouped_pid, mma
from .lora import lora_store
from .multi_lora import _expand, _sorted_rows


@triton.jit
def nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, blk, blocksize2, NESTED: tl.constexpr):
    """fp32 scales of the 4-bit blocks ``blk`` (int64, in range): absmax[blk], or with double
    quantisation code2[q[blk]]·absmax2[blk // blocksize2] + offset, the product rounded before the
    offset is added, as bitsandbytes does (the kernels run without fp fusion: no fma joins them)."""
    if NESTED:
        q = tl.load(absmax_ptr + blk).to(tl.int32)
        s = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // blocksize2)
        s = s + offset
    else:
        s = tl.load(absmax_ptr + blk)
    return s


@triton.jit
def nf4_tile(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, rows, k0, WK, blocksize, blocksize2,
             ROWS: tl.constexpr, COLS: tl.constexpr, NESTED: tl.constexpr, ALIGNED: tl.constexpr):
    """fp32 [ROWS, COLS]: W[rows, k0 : k0 + COLS] of the 4-bit weight W [WN, WK]. ``rows``: int64
    [ROWS] in [0, WN) (callers wrap theirs modulo WN, so no load needs a row mask).

    ALIGNED (WK a multiple of blocksize, COLS dividing blocksize, k0 a multiple of COLS): each row's
    part of the tile is COLS / 2 whole bytes inside one block, so the codes are loaded as bytes and
    split in two, and the scale is one per row. Otherwise each element finds its own byte, nibble
    and block, and the columns past WK are zero."""
    if ALIGNED:
        HALF: tl.constexpr = COLS // 2
        byte = tl.load(packed_ptr + rows[:, None] * (WK // 2) + (k0 // 2 + tl.arange(0, HALF))[None, :])
        # element 2j of a row is byte j's high nibble, element 2j + 1 its low one
        nib = tl.join(byte >> 4, byte & 0xF).reshape(ROWS, COLS).to(tl.int32)
        s = nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, rows * (WK // blocksize) + k0 // blocksize,
                      blocksize2, NESTED)
        w = tl.load(code_ptr + nib) * s[:, None]  # the 16 levels: one cache line, read by every element
    else:
        cols = k0 + tl.arange(0, COLS)
        inside = (cols < WK)[None, :]
        # columns past WK read the row's last element (in range), and are zeroed after the decode
        flat = rows[:, None] * WK + tl.minimum(cols, WK - 1)[None, :]
        byte = tl.load(packed_ptr + flat // 2).to(tl.int32)
        nib = (byte >> (4 - 4 * (flat % 2)).to(tl.int32)) & 0xF
        s = nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset, flat // blocksize, blocksize2, NESTED)
        w = tl.where(inside, tl.load(code_ptr + nib) * s, 0.0)
    return w


@triton.jit
def fp8_tile(w_ptr, scale_ptr, rows, k0, WK, blocksize, blocksize2,
             ROWS: tl.constexpr, COLS: tl.constexpr, BLOCKED: tl.constexpr, ALIGNED: tl.constexpr):
    """fp32 [ROWS, COLS]: W[rows, k0 : k0 + COLS] of the fp8 weight W [WN, WK] (e4m3, row-major) times
    its scales: one per row, or with BLOCKED one per blocksize2 × blocksize tile (ALIGNED: the
    tile's columns lie in one block, so one scale per row; else a scale per element). ``rows`` in
    [0, WN); columns past WK are zero."""
    cols = k0 + tl.arange(0, COLS)
    inside = (cols < WK)[None, :]
    data = tl.load(w_ptr + rows[:, None] * WK + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    if BLOCKED:
        scale_row = scale_ptr + (rows // blocksize2) * tl.cdiv(WK, blocksize)
        if ALIGNED:
            w = data * tl.load(scale_row + k0 // blocksize)[:, None]
        else:
            w = data * tl.load(scale_row[:, None] + (tl.minimum(cols, WK - 1) // blocksize)[None, :])
    else:
        w = data * tl.load(scale_ptr + rows)[:, None]
    return w


@triton.jit
def weight_tile(w_ptr, scale_ptr, code_ptr, scale2_ptr, code2_ptr, offset, rows, k0, WK, blocksize, blocksize2,
                ROWS: tl.constexpr, COLS: tl.constexpr, QUANT: tl.constexpr, ALIGNED: tl.constexpr):
    """fp32 [ROWS, COLS] tile W[rows, k0 : k0 + COLS] of a quantized weight in the storage QUANT
    names (module doc), decoded: ``nf4_tile`` or ``fp8_tile``."""
    if QUANT < 2:
        w = nf4_tile(w_ptr, scale_ptr, code_ptr, scale2_ptr, code2_ptr, offset, rows, k0, WK, blocksize, blocksize2,
                     ROWS, COLS, QUANT == 1, ALIGNED)
    else:
        w = fp8_tile(w_ptr, scale_ptr, rows, k0, WK, blocksize, blocksize2, ROWS, COLS, QUANT == 3, ALIGNED)
    return w


@triton.jit
def _rounded(w, dtype: tl.constexpr, W_ROUND: tl.constexpr):
    """The decoded fp32 tile in the GEMM's dtype, through the weight's own dtype first when that
    is another 16-bit one (W_ROUND 1: float16, 2: bfloat16), as bitsandbytes dequantises to the
    weight's dtype and the layer then casts to the input's. (The interpreter's fp32 -> bfloat16
    cast truncates where a GPU rounds to nearest: bfloat16 is checked on the GPU.)"""
    if W_ROUND == 1:
        w = w.to(tl.float16)
    elif W_ROUND == 2:
        w = w.to(tl.bfloat16)
    return w.to(dtype)


@triton.jit
def quant_gemm_tile(x_ptrs, stride_xk, a_ptrs, stride_ak, w_ptr, scale_ptr, code_ptr, scale2_ptr, code2_ptr,
                    offset, off_n, K, R, WN, WK, blocksize, blocksize2,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                    EVEN_K: tl.constexpr, W_NMAJOR: tl.constexpr, QUANT: tl.constexpr, W_ROUND: tl.constexpr,
                    FUSE_SHRINK: tl.constexpr):
    """(acc, t): acc = fp32 [BLOCK_M, BLOCK_N] Σ_k x·wᵀ over K for output columns off_n.. of a
    quantized weight, from the pointer tile ``x_ptrs [BLOCK_M, BLOCK_K]`` at k = 0 (rows gathered or
    not).

    The weight tile is decoded in registers each step (``weight_tile``'s one-block-per-row path:
    the launchers take this kernel only when the tiles' WK-wide side divides the block along WK,
    and for 4 bits when WK is a multiple of the blocksize; other weights are decoded into a buffer
    first): W [WN, WK] read as [N, K] (the
    forward: the tile is W[columns, k-step], transposed) or, with W_NMAJOR, as [K, N] (dx = dY·W:
    the tile is W[k-step, columns]). With FUSE_SHRINK, t = fp32 [BLOCK_M, BLOCK_R] x·aᵀ for
    ``a_ptrs [BLOCK_R, BLOCK_K]`` (a [R, K]) from the same x tiles."""
    dtype: tl.constexpr = x_ptrs.dtype.element_ty
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=((k0 + offs_k) < K)[None, :], other=0.0)
        if W_NMAJOR:  # rows past K meet x's zero columns: wrapped, so their loads need no mask
            w = weight_tile(w_ptr, scale_ptr, code_ptr, scale2_ptr, code2_ptr, offset,
                            ((k0 + offs_k) % WN).to(tl.int64), off_n, WK, blocksize, blocksize2,
                            BLOCK_K, BLOCK_N, QUANT, True)
        else:  # columns past N wrap too: their products land in columns the store masks
            w = tl.trans(weight_tile(w_ptr, scale_ptr, code_ptr, scale2_ptr, code2_ptr, offset,
                                     (offs_n % WN).to(tl.int64), k0, WK, blocksize, blocksize2,
                                     BLOCK_N, BLOCK_K, QUANT, True))
        acc = mma(x, _rounded(w, dtype, W_ROUND), acc)
        if FUSE_SHRINK:
            offs_r = tl.arange(0, BLOCK_R)
            a = tl.load(a_ptrs, mask=(offs_r < R)[:, None] & ((k0 + offs_k) < K)[None, :], other=0.0)
            t = mma(x, tl.trans(a).to(dtype), t)
            a_ptrs += BLOCK_K * stride_ak
        x_ptrs += BLOCK_K * stride_xk
    return acc, t


@triton.jit
def _quant_lora_matmul_kernel(
    x_ptr,  # [M, K]  (x forward, dY backward)
    w_ptr,  # the weight's codes: 4-bit [WN·WK / 2] uint8, or fp8 e4m3 [WN, WK] (module doc)
    scale_ptr,  # its scales: fp32 absmax (uint8 codes of them when QUANT 1), or the fp8 scales
    code_ptr,  # [16] fp32  the 4-bit levels, read only when QUANT < 2
    scale2_ptr,  # fp32 scales of the absmax, read only when QUANT 1
    code2_ptr,  # [256] fp32  the absmax' 8-bit levels, read only when QUANT 1
    t_ptr,  # [M, R]  fp32 low-rank activations (t forward, dt backward): read, or written when FUSE_SHRINK
    u_ptr,  # [N, R]  up projection (B forward, Aᵀ backward)
    a_ptr,  # [R, K]  down projection, read only when FUSE_SHRINK
    bias_ptr,  # [N]  read only when HAS_BIAS
    y_ptr,  # [M, N]  output
    seed_ptr,  # [1] int32, read only when HAS_DROPOUT
    scale,  # fp32 multiplier of the low-rank term (dropout's 1/(1-p) included)
    offset,  # fp32 offset of the double-quantised scales (QUANT 1)
    M, N, K, R, WN, WK, blocksize, blocksize2,
    stride_xm, stride_xk,
    stride_tm, stride_tr,
    stride_un, stride_ur,
    stride_ar, stride_ak,
    stride_ym, stride_yn,
    drop_threshold,  # int32: round(p * 2**24)
    W_NMAJOR: tl.constexpr, QUANT: tl.constexpr, W_ROUND: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, FUSE_SHRINK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y = x·wᵀ + scale·t·uᵀ (⊙ keep/(1-p) with HAS_DROPOUT) + bias, w the quantized weight read as
    [N, K] (forward: N = WN, K = WK) or as [K, N] with W_NMAJOR (dx: N = WK, K = WN).

    Grid: (cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N),), grouped order. The epilogue is the dense
    kernel's (``lora_store``). FUSE_SHRINK (forward without dropout, R ≤ BLOCK_R): t = x·aᵀ from
    the x tiles of the main loop, one launch for the whole forward; every column block computes the
    same t from the same tiles in the same order, and the first one writes it."""
    # ---- program ids: grouped ordering so that GROUP_M row blocks share their weight tiles in L2
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # ---- pointers: rows wrap modulo M so the loads need no mask; only the store is masked
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + (offs_m % M).to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    a_ptrs = a_ptr + tl.arange(0, BLOCK_R)[:, None] * stride_ar + offs_k[None, :] * stride_ak

    # ---- main loop: x·wᵀ with the weight decoded a tile at a time (and the fused shrink)
    acc, t = quant_gemm_tile(x_ptrs, stride_xk, a_ptrs, stride_ak, w_ptr, scale_ptr, code_ptr, scale2_ptr, code2_ptr,
                             offset, pid_n * BLOCK_N, K, R, WN, WK, blocksize, blocksize2,
                             BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, EVEN_K, W_NMAJOR, QUANT, W_ROUND, FUSE_SHRINK)

    # ---- low-rank term, bias, cast, masked store (t written by the first column block if fused)
    lora_store(acc, t, offs_m, offs_n, pid_n, t_ptr, stride_tm, stride_tr, u_ptr, stride_un, stride_ur,
               bias_ptr, y_ptr, stride_ym, stride_yn, seed_ptr, M, N, R, scale, drop_threshold,
               HAS_BIAS, HAS_DROPOUT, FUSE_SHRINK, BLOCK_M, BLOCK_N, BLOCK_R)


@triton.jit
def _quant_multi_lora_matmul_kernel(
    x_ptr,  # [M, K]  tokens, original order
    w_ptr,  # the weight [N, K]'s codes (module doc)
    scale_ptr,  # its scales
    code_ptr,  # [16] fp32, read only when QUANT < 2
    scale2_ptr,  # fp32, read only when QUANT 1
    code2_ptr,  # [256] fp32, read only when QUANT 1
    bias_ptr,  # [N]  read only when HAS_BIAS
    perm_ptr,  # [M] int64  sorted position -> original row
    sid_ptr,  # [M] int64  slot of each sorted row, ascending; -1 = no adapter
    t_ptr,  # [M, NUM_SLICES·R_MAX] fp32  low-rank activations, sorted order
    b_ptr,  # [SLOTS, N, R_MAX]  up projections
    rank_ptr,  # [NUM_SLICES, SLOTS] int32
    lora_scale_ptr,  # [NUM_SLICES, SLOTS] fp32  the adapters' scales
    bounds_ptr,  # [NUM_SLICES + 1] int32, read only when SLICED_OUTPUT
    y_ptr,  # [M, N]  output, original order
    offset,  # fp32 offset of the double-quantised scales (QUANT 1)
    M, N, K, R_MAX, SLOTS, blocksize, blocksize2,
    stride_xm, stride_xk,
    stride_tm, stride_tr,
    stride_bs, stride_bn, stride_br,
    stride_ym, stride_yn,
    QUANT: tl.constexpr, W_ROUND: tl.constexpr, HAS_BIAS: tl.constexpr,
    SLICED_OUTPUT: tl.constexpr, NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
):
    """y[perm[j]] = x[perm[j]]·Wᵀ + Σ_runs Σ_slices s_a,i·t[j, slice i]·B_a[slice i cols]ᵀ + bias,
    W the quantized [N, K] weight: ``_multi_lora_matmul_kernel``'s forward (serving many adapters
    over one quantized base) with the weight decoded in the main loop. Every row's term stays on
    its own rows (``_expand``'s isolation).

    Grid: (cdiv(M, BLOCK_M) · cdiv(N, BLOCK_N),), grouped order."""
    pid_m, pid_n = grouped_pid(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    # ---- sorted rows -> original rows (gathered loads, scattered store)
    offs_j, mask_j, rows, sid, valid = _sorted_rows(perm_ptr, sid_ptr, pid_m, M, SLOTS, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + tl.arange(0, BLOCK_K)[None, :] * stride_xk

    # ---- base GEMM, the weight decoded a tile at a time
    acc, _ = quant_gemm_tile(x_ptrs, stride_xk, x_ptrs, stride_xk, w_ptr, scale_ptr, code_ptr, scale2_ptr, code2_ptr,
                             offset, pid_n * BLOCK_N, K, 0, N, K, blocksize, blocksize2,
                             BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, EVEN_K, False, QUANT, W_ROUND, False)

    # ---- expand (every adapter run of the tile), bias, scattered store
    acc = _expand(acc, offs_j, rows, sid, valid, offs_n, t_ptr, b_ptr, rank_ptr, lora_scale_ptr, bounds_ptr,
                  bounds_ptr, bounds_ptr, bounds_ptr, N, R_MAX, SLOTS, stride_tm, stride_tr, stride_bs, 0, stride_bn,
                  stride_br, x_ptr.dtype.element_ty, SLICED_OUTPUT, False, NUM_SLICES, BLOCK_R)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n % N).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=mask_j[:, None] & (offs_n[None, :] < N))


@triton.jit
def _quant_dequant_kernel(
    w_ptr,  # the weight's codes (module doc)
    scale_ptr,  # its scales
    code_ptr,  # [16] fp32, read only when QUANT < 2
    scale2_ptr,  # fp32, read only when QUANT 1
    code2_ptr,  # [256] fp32, read only when QUANT 1
    out_ptr,  # [N, K]  the dense weight (rows of stride_on)
    offset,
    N, K, blocksize, blocksize2, stride_on,
    QUANT: tl.constexpr, ALIGNED: tl.constexpr, W_ROUND: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = the decoded [N, K] weight (here N, K are the weight's own out- and in-features), in
    out's dtype (through the weight's own 16-bit dtype first when W_ROUND). Memory-bound: reads the
    codes once (4.5 or 8 bits an element), writes out once.

    Grid: (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    cols = k0 + tl.arange(0, BLOCK_K)
    w = weight_tile(w_ptr, scale_ptr, code_ptr, scale2_ptr, code2_ptr, offset, (rows % N).to(tl.int64), k0,
                    K, blocksize, blocksize2, BLOCK_N, BLOCK_K, QUANT, ALIGNED)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_on + cols[None, :],
             _rounded(w, out_ptr.dtype.element_ty, W_ROUND), mask=(rows < N)[:, None] & (cols < K)[None, :])
