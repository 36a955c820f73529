"""Specs of the quantized-base kernels (``kernels/quant.py``): spaces, defaults, keys, AOT variants.

The 4-bit GEMMs decode the weight tile in registers, so they run where the weight's bytes bound
the GEMM: few tokens (``INLOOP_MAX_M``, the launchers' default crossover; above it they decode
once into a buffer and run the dense kernels). Their tiles are short and their weight tile is
64 columns wide (32 in fp32), a divisor of every blocksize from 64 up: each row of a tile is then
whole bytes inside one block, in the forward layout ([N, K]) and the dx one ([K, N]) alike. A
weight whose rows do not split so (in-features not a multiple of the blocksize, a blocksize of
32 under 64-wide tiles) is decoded into a buffer instead: the element-wise decode lives in the
decode kernel only (in a GEMM's main loop it spilled at every tile tried).

Every launch runs without fp fusion (``options``): the double-quantised scale is a product then
an offset, as bitsandbytes computes it, and an fma would round it differently.
"""
from __future__ import annotations

from ..kernels.quant import _nf4_dequant_kernel, _nf4_lora_matmul_kernel, _nf4_multi_lora_matmul_kernel
from .config import ADAPTER_BYTES, Config, itemsize, smem_budget, table
from .lora import MATMUL_BLOCK_R
from .registry import AotVariant, KernelSpec, register

# Token counts up to which the 4-bit GEMMs decode in the main loop. Cost model: a tile decode
# costs c ≈ 5 ALU instructions an element of the weight tile, against 2·BLOCK_M tensor-core
# FLOPs an element of the GEMM; at 128 SM lanes against ~4096 FLOP/clk per SM the decode
# matches the MMAs near BLOCK_M = 16·c = 80, so above a few hundred tokens one decode into a
# buffer (2.5 bytes an element of traffic) is cheaper. Not yet measured on a GPU.
INLOOP_MAX_M = 256
NO_FUSION = {"enable_fp_fusion": False}
_NF4 = {"packed_ptr": "u8", "absmax_ptr": "fp32", "code_ptr": "fp32", "absmax2_ptr": "fp32", "code2_ptr": "fp32"}
_NF4_NESTED = {**_NF4, "absmax_ptr": "u8"}


def nf4_matmul_space(dtype: str) -> list[Config]:
    """BLOCK_N and BLOCK_K are 64 (or 32): divisors of the blocksize, so both layouts decode
    whole bytes of one block per row."""
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
    if dtype == "float32":
        return table(names, [(32, 32, 32, 8, 4, 1)])  # no stack in 3.6 or 3.9 (others tried kept one)
    return table(names, [
        (16, 32, 64, 8, 4, 3),  # decode: twice the programs of 64 columns at N = 4096
        (16, 64, 64, 8, 8, 3),  # (4 warps: an 8-byte stack in one variant)
        (32, 64, 64, 8, 4, 3),
        (64, 64, 64, 8, 4, 3),
        (128, 64, 64, 8, 8, 3),
    ])


def nf4_matmul_smem(cfg: Config, dtype: str) -> int:
    """Pipelined x tiles and packed weight bytes, the decoded tile handed to the MMA."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    return cfg.num_stages * (bm * bk * itemsize(dtype) + bn * bk // 2 + MATMUL_BLOCK_R * bk * ADAPTER_BYTES) \
        + bn * bk * itemsize(dtype)


def prune_nf4_matmul(cfgs, dtype: str, cc: int, block_r=None) -> list[Config]:
    return [c for c in cfgs if min(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) >= 16
            and nf4_matmul_smem(c, dtype) <= smem_budget(cc)]


def default_nf4_matmul(dtype: str, cc, dims: dict) -> Config:
    """By the token count (the launchers use these kernels up to INLOOP_MAX_M tokens).
    ``cc=None`` (the interpreter): small tiles, several of them at the tests' shapes."""
    if cc is None:
        return Config.make(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=2, num_stages=2)
    space = prune_nf4_matmul(nf4_matmul_space(dtype), dtype, cc)
    if dtype == "float32":
        return space[0]
    by_m = {(c["BLOCK_M"], c["BLOCK_N"]): c for c in space}
    M, N = dims["M"], dims["N"]
    if M <= 16:
        return by_m[(16, 32)] if N <= 8192 else by_m[(16, 64)]  # not yet timed on a GPU
    if M <= 32:
        return by_m[(32, 64)]
    if M <= 64:
        return by_m[(64, 64)]
    return by_m[(128, 64)]


_MATMUL_POINTERS = {"x_ptr": "x", **_NF4, "t_ptr": "fp32", "u_ptr": "adapter", "a_ptr": "adapter",
                    "bias_ptr": "x", "y_ptr": "x", "seed_ptr": "i32"}
_MATMUL_PLAIN = frozenset({"M", "R", "drop_threshold", "stride_tm", "stride_un", "stride_ar", "blocksize2"})
NF4_LORA_MATMUL = register(KernelSpec(
    name="nf4_lora_matmul", fn=_nf4_lora_matmul_kernel, key=("N", "K", "layout", "M"), layouts=("w", "wT"),
    space=nf4_matmul_space, prune=prune_nf4_matmul, default=default_nf4_matmul,
    constants={"BLOCK_R": MATMUL_BLOCK_R}, floats=frozenset({"scale", "offset"}), options=NO_FUSION,
    variants=(
        AotVariant("forward, shrink fused, bias on, double-quantised scales",
                   pointers={**_MATMUL_POINTERS, **_NF4_NESTED},
                   flags={"W_NMAJOR": False, "NESTED": True, "W_ROUND": 0, "HAS_BIAS": True,
                          "HAS_DROPOUT": False, "FUSE_SHRINK": True, "EVEN_K": True},
                   ones=frozenset({"stride_xk", "stride_tr", "stride_ur", "stride_ak", "stride_yn"}),
                   plain=_MATMUL_PLAIN, adapter_fp32=True),
        AotVariant("forward after a separate shrink, fp32 scales, weight rounded to float16 first",
                   pointers=_MATMUL_POINTERS,
                   flags={"W_NMAJOR": False, "NESTED": False, "W_ROUND": 1, "HAS_BIAS": False,
                          "HAS_DROPOUT": False, "FUSE_SHRINK": False, "EVEN_K": True},
                   ones=frozenset({"stride_xk", "stride_tr", "stride_ur", "stride_ak", "stride_yn"}),
                   plain=_MATMUL_PLAIN | {"stride_xm"}),
        AotVariant("backward dx, dropout on, double-quantised scales",
                   pointers={**_MATMUL_POINTERS, **_NF4_NESTED},
                   flags={"W_NMAJOR": True, "NESTED": True, "W_ROUND": 0, "HAS_BIAS": False,
                          "HAS_DROPOUT": True, "FUSE_SHRINK": False, "EVEN_K": False},
                   ones=frozenset({"stride_xk", "stride_tr", "stride_un", "stride_ak", "stride_yn"}),
                   plain=_MATMUL_PLAIN | {"K", "WN"}),
    )))


# ---------------------------------------------------------------- multi-adapter forward
_MULTI_POINTERS = {"x_ptr": "x", **_NF4, "bias_ptr": "x", "perm_ptr": "i64", "sid_ptr": "i64", "t_ptr": "fp32",
                   "b_ptr": "adapter", "rank_ptr": "i32", "scale_ptr": "fp32", "bounds_ptr": "i32", "y_ptr": "x"}
NF4_MULTI_LORA_MATMUL = register(KernelSpec(
    name="nf4_multi_lora_matmul", fn=_nf4_multi_lora_matmul_kernel, key=("N", "K", "M"),
    space=nf4_matmul_space, prune=prune_nf4_matmul, default=default_nf4_matmul,
    constants={"BLOCK_R": MATMUL_BLOCK_R}, floats=frozenset({"offset"}), options=NO_FUSION,
    variants=(
        AotVariant("one slice, bias on, fp32 pool adapters, double-quantised scales",
                   pointers={**_MULTI_POINTERS, **_NF4_NESTED},
                   flags={"NESTED": True, "W_ROUND": 0, "HAS_BIAS": True, "SLICED_OUTPUT": False,
                          "NUM_SLICES": 1, "EVEN_K": True},
                   ones=frozenset({"stride_xk", "stride_tr", "stride_br", "stride_yn"}),
                   plain=frozenset({"M", "R_MAX", "SLOTS", "stride_tm", "stride_bn", "blocksize2"}),
                   adapter_fp32=True),
        AotVariant("three fused slices, fp32 scales",
                   pointers=_MULTI_POINTERS,
                   flags={"NESTED": False, "W_ROUND": 0, "HAS_BIAS": False, "SLICED_OUTPUT": True,
                          "NUM_SLICES": 3, "EVEN_K": True},
                   ones=frozenset({"stride_xk", "stride_tr", "stride_br", "stride_yn"}),
                   plain=frozenset({"M", "R_MAX", "SLOTS", "stride_tm", "stride_bn", "blocksize2"})),
    )))


# ---------------------------------------------------------------- the decode into a buffer
def dequant_space(dtype: str) -> list[Config]:
    """Memory-bound: 64-column tiles (whole bytes of one block per row), many rows."""
    return table(("BLOCK_N", "BLOCK_K"), [(32, 64, 4, 1)])


def default_dequant(dtype: str, cc, dims: dict) -> Config:
    if cc is None:
        return Config.make(BLOCK_N=16, BLOCK_K=32, num_warps=2, num_stages=1)
    return dequant_space(dtype)[0]


NF4_DEQUANT = register(KernelSpec(
    name="nf4_dequant", fn=_nf4_dequant_kernel, key=("N", "K"),
    space=dequant_space, default=default_dequant, floats=frozenset({"offset"}), options=NO_FUSION,
    variants=(
        AotVariant("double-quantised scales, whole bytes",
                   pointers={**_NF4_NESTED, "out_ptr": "x"}, flags={"NESTED": True, "ALIGNED": True, "W_ROUND": 0},
                   plain=frozenset({"blocksize2"})),
        AotVariant("fp32 scales, element-wise, through bfloat16",
                   pointers={**_NF4, "out_ptr": "x"}, flags={"NESTED": False, "ALIGNED": False, "W_ROUND": 2},
                   plain=frozenset({"N", "K", "stride_on"})),
    )))
