"""Fused LoRA kernels: y = x·W0ᵀ + s·(drop(x)·Aᵀ)·Bᵀ + bias and its backward.

Letters: M tokens, K in-features, N out-features, R rank, P the kept dim of
a reduction over M. Every kernel takes explicit strides (expanded stride-0
gradients and non-contiguous inputs are read as they are) and accumulates
in fp32. Operands are cast to the dtype of the main input (x or dY) right
before each ``tl.dot``, so adapters may be fp32 while x is bf16/fp16.

Three kernels cover forward and backward:

* ``_lora_shrink_kernel``   t = scale·drop(X)·Aᵀ             (forward t, backward dt)
* ``_lora_matmul_kernel``   Y = X·Wᵀ + scale·T·Uᵀ [+ bias]   (forward y, backward dx)
* ``_lora_grad_kernel``     O = scale·drop(X)ᵀ·T, split over M (backward dA, dB)
"""
import triton
import triton.language as tl

from .common import dropout_keep, gemm_tile, grouped_pid, mma


@triton.jit
def _lora_shrink_kernel(
    x_ptr,  # [M, K]  input rows (x forward, dY backward)
    a_ptr,  # [R, K]  down projection (A forward, Bᵀ backward)
    t_ptr,  # [M, R]  fp32 output
    seed_ptr,  # [1] int32, read only when HAS_DROPOUT
    M, K, R,
    stride_xm, stride_xk,
    stride_ar, stride_ak,
    stride_tm, stride_tr,
    scale,  # fp32: multiplies the whole product (dropout's 1/(1-p) included)
    drop_threshold,  # int32: round(p * 2**24)
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """t[m, :] = scale · Σ_k keep(m, k)·x[m, k]·a[:, k].

    Grid: (cdiv(M, BLOCK_M),). BLOCK_R covers the whole rank (R ≤ BLOCK_R),
    so x is read exactly once; this kernel is memory-bound.
    """
    # ---- program ids -> offsets
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
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
def _lora_matmul_kernel(
    x_ptr,  # [M, K]  (x forward, dY backward)
    w_ptr,  # [N, K]  frozen weight (W0 forward, W0ᵀ backward)
    t_ptr,  # [M, R]  fp32 low-rank activations (t forward, dt backward)
    u_ptr,  # [N, R]  up projection (B forward, Aᵀ backward)
    bias_ptr,  # [N]  read only when HAS_BIAS
    y_ptr,  # [M, N]  output
    seed_ptr,  # [1] int32, read only when HAS_DROPOUT
    M, N, K, R,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_tm, stride_tr,
    stride_un, stride_ur,
    stride_ym, stride_yn,
    scale,  # fp32 multiplier of the low-rank term
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

    # ---- low-rank term: cdiv(R, BLOCK_R) more reduction steps (R ≤ 256,
    # one step at r = 16). scale is folded into t before the cast, so the
    # term lands in acc without a second accumulator.
    offs_r = tl.arange(0, BLOCK_R)
    t_ptrs = t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr
    u_ptrs = u_ptr + offs_r[:, None] * stride_ur + cols[None, :] * stride_un
    if HAS_DROPOUT:
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in tl.range(0, R, BLOCK_R, num_stages=1):
        mask_r = (r0 + offs_r) < R
        t = tl.load(t_ptrs, mask=mask_r[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=mask_r[:, None], other=0.0)
        t = (t * scale).to(x_ptr.dtype.element_ty)
        if HAS_DROPOUT:
            lora = mma(t, u.to(t.dtype), lora)
        else:
            acc = mma(t, u.to(t.dtype), acc)
        t_ptrs += BLOCK_R * stride_tr
        u_ptrs += BLOCK_R * stride_ur
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr).to(tl.uint32)
        keep = dropout_keep(seed, offs_m[:, None], offs_n[None, :], drop_threshold)
        acc += tl.where(keep, lora, 0.0)

    # ---- epilogue: bias, cast, masked store
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols).to(tl.float32)
        acc += bias[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lora_grad_kernel(
    x_ptr,  # [M, P]  (x for dA, dY for dB)
    t_ptr,  # [M, R]  fp32 (dt for dA, t for dB)
    o_ptr,  # [SPLIT, P, R] fp32 partial sums, one slab per split (any strides: may be [SPLIT, R, P])
    seed_ptr,  # [1] int32, read only when HAS_DROPOUT
    M, P, R, rows_per_split,
    stride_xm, stride_xp,
    stride_tm, stride_tr,
    stride_os, stride_op, stride_or,
    scale,  # fp32 multiplier of the whole product
    drop_threshold,  # int32: round(p * 2**24)
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """o[split, p, :] = scale · Σ_{m in split} keep(m, p)·x[m, p]·t[m, :].

    Grid: (cdiv(P, BLOCK_P), SPLIT). The reduction over M is split into
    SPLIT contiguous chunks of ``rows_per_split`` rows, each written to its
    own slab; the launcher sums the slabs in a fixed order. No atomics, so
    the result is bitwise reproducible.
    """
    # ---- program ids -> offsets
    pid_p = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.arange(0, BLOCK_R)
    offs_mb = tl.arange(0, BLOCK_M)
    mask_p = offs_p < P
    mask_r = offs_r < R
    m_start = pid_s * rows_per_split
    m_end = min(m_start + rows_per_split, M)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr).to(tl.uint32)

    # ---- reduction over this split's rows
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + offs_mb
        mask_m = offs_m < m_end
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_p[None, :] * stride_xp
        t_ptrs = t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + offs_r[None, :] * stride_tr
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_p[None, :], other=0.0)
        t = tl.load(t_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offs_m[:, None], offs_p[None, :], drop_threshold)
            x = tl.where(keep, x, 0.0)
        acc = mma(tl.trans(x), t.to(x.dtype), acc)

    # ---- write back this split's slab (zeros when the split is empty)
    acc = acc * scale
    o_ptrs = (o_ptr + pid_s.to(tl.int64) * stride_os
              + offs_p[:, None].to(tl.int64) * stride_op + offs_r[None, :] * stride_or)
    tl.store(o_ptrs, acc, mask=mask_p[:, None] & mask_r[None, :])
