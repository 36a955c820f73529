"""Device helpers shared by every kernel file.

Dropout masks are a counter-based hash of (seed, row, col), not a stored
tensor: the forward and the backward regenerate the same mask from the seed,
and ``ops.reference.dropout_keep_ref`` reproduces it bit for bit in PyTorch,
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
