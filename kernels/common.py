"""Device helpers shared by every kernel file.

Dropout masks are a counter-based hash of (seed, row, col), not a stored
tensor: the forward and the backward regenerate the same mask from the seed,
and ``ops/dropout.py`` reproduces it bit for bit in PyTorch,
so the tests compare kernels and reference exactly even with dropout on.
"""
import triton
import triton.language as tl


@triton.jit
def _fmix32(h):
    # MurmurHash3's 32-bit finaliser: full avalanche, uint32 wrap-around.
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def dropout_keep(seed, rows, cols, threshold):
    """True where element (rows, cols) survives dropout.

    seed: uint32 scalar; rows, cols: integer blocks (broadcastable), global
    indices of the element in the un-transposed [M, K] input; threshold:
    round(p * 2**24). The top 24 bits of the hash are compared, so the keep
    probability is 1 - threshold / 2**24.
    """
    h = _fmix32(rows.to(tl.uint32) ^ seed)
    h = _fmix32(h + cols.to(tl.uint32))
    return (h >> 8).to(tl.int32) >= threshold


@triton.jit
def mma(a, b, acc):
    """acc += a @ b with fp32 accumulation.

    fp32 operands use IEEE products (PyTorch's default for fp32 matmul on
    CUDA is no TF32); fp16/bf16 operands use the tensor cores' native path.
    """
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def grouped_pid(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a 1-D GEMM grid in grouped order: GROUP_M row
    blocks in a row share their weight tiles in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def gemm_tile(x_ptrs, w_ptrs, K, stride_xk, stride_wk,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] = Σ over K of x·w, from the pointer tiles
    ``x_ptrs [BLOCK_M, BLOCK_K]`` and ``w_ptrs [BLOCK_K, BLOCK_N]`` at k = 0.
    With EVEN_K (K a multiple of BLOCK_K) the loads carry no mask, so they can
    be plain 16-byte vectors."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            mask_k = (k0 + offs_k) < K
            x = tl.load(x_ptrs, mask=mask_k[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=mask_k[:, None], other=0.0)
        acc = mma(x, w, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    return acc


@triton.jit
def column_quarters(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The four column quarters of a [BLOCK_M, BLOCK_N] tile, left to right.
    The epilogues that need a second tile-sized temporary (a masked or
    isolated low-rank term) work a quarter at a time, so the temporary takes
    a quarter of the registers."""
    HALF: tl.constexpr = BLOCK_N // 2
    QUARTER: tl.constexpr = BLOCK_N // 4
    h0, h1 = acc.reshape(BLOCK_M, 2, HALF).permute(0, 2, 1).split()
    q0, q1 = h0.reshape(BLOCK_M, 2, QUARTER).permute(0, 2, 1).split()
    q2, q3 = h1.reshape(BLOCK_M, 2, QUARTER).permute(0, 2, 1).split()
    return q0, q1, q2, q3


# ---------------------------------------------------------------- Hopper core
# The sm_90 GEMM core: operand tiles through tensor descriptors (TMA copies
# into shared memory, wgmma reading them there) over a persistent grid, one
# program per SM walking the output tiles. Descriptors are made on the device
# (``tl.make_tensor_descriptor``); they need a global scratch allocator at
# run time (``triton.set_allocator``, set by the launchers) and run in the
# interpreter as well, so the tests exercise this path without a GPU.


@triton.jit
def tma_weight(w_ptr, N, K, stride_w, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_NMAJOR: tl.constexpr):
    """Descriptor of the weight: [N, K] with unit K stride (``W_NMAJOR``
    false: the forward's weight), or [K, N] with unit N stride (``W_NMAJOR``:
    the weight read transposed, the dx of the backward). ``stride_w`` is the
    other stride. TMA needs 16-byte aligned bases and row strides; the
    launchers check that before choosing this path."""
    if W_NMAJOR:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[stride_w, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_w, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    return w_desc


@triton.jit
def tma_weight_tile(w_desc, off_n, k0, W_NMAJOR: tl.constexpr):
    """The [BLOCK_K, BLOCK_N] weight tile at (k0, off_n), either layout."""
    if W_NMAJOR:
        w = w_desc.load([k0, off_n])
    else:
        w = w_desc.load([off_n, k0]).T
    return w


@triton.jit
def tma_operands(x_ptr, w_ptr, M, N, K, stride_xm, stride_w,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, W_NMAJOR: tl.constexpr):
    """Descriptors of x [M, K] (rows of stride ``stride_xm``, unit column
    stride) and of the weight (``tma_weight``)."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    return x_desc, tma_weight(w_ptr, N, K, stride_w, BLOCK_N, BLOCK_K, W_NMAJOR)


@triton.jit
def gathered_tma_gemm_tile(x_rows, stride_xk, w_desc, off_n, K,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           W_NMAJOR: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_N] Σ_k x·wᵀ where x's rows are gathered (``x_rows``
    [BLOCK_M] pointers to the rows' first element: rows in adapter order,
    which no tensor descriptor can address on sm_90) and the weight comes
    through TMA. The row pointers are widened to the tile at each step
    rather than carried as a [BLOCK_M, BLOCK_K] pointer tile."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        x = tl.load(x_rows[:, None] + ks[None, :] * stride_xk, mask=(ks < K)[None, :], other=0.0)
        acc = tl.dot(x, tma_weight_tile(w_desc, off_n, k0, W_NMAJOR), acc)
    return acc


@triton.jit
def tma_gemm_tile(x_desc, w_desc, a_desc, off_m, off_n, K,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                  W_NMAJOR: tl.constexpr, FUSE_SHRINK: tl.constexpr):
    """(acc, t): acc = fp32 [BLOCK_M, BLOCK_N] Σ_k x·wᵀ of the output tile
    at (off_m, off_n); with ``FUSE_SHRINK``, t = fp32 [BLOCK_M, BLOCK_R]
    x·aᵀ for a [R, K] (descriptor ``a_desc``, x's dtype), computed from the
    same x tiles while they sit in shared memory (no second pass over x).
    TMA zero-fills the tiles past M, N, K and R, so no load is masked."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = x_desc.load([off_m, k0])
        acc = tl.dot(x, tma_weight_tile(w_desc, off_n, k0, W_NMAJOR), acc)
        if FUSE_SHRINK:
            t = tl.dot(x, a_desc.load([0, k0]).T, t)
    return acc, t
