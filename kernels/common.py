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
