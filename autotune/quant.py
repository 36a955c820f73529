"""Specs of the quantized-base kernels (``kernels/quant.py``, ``kernels/fp8.py``): spaces, defaults,
keys, AOT variants.

The decoding GEMMs (4-bit and fp8 weights alike) decode the weight tile in registers, so they run
where the weight's bytes bound the GEMM: few tokens (``INLOOP_MAX_M``, the launchers' default
crossover; above it a 4-bit weight is decoded once into a buffer for the dense kernels, and an
fp8 one goes to the fp8 tensor-core GEMM). Their tiles are short and their weight tile is 64
columns wide (32 in fp32), a divisor of every 4-bit blocksize from 64 up and of fp8's 128: each
row of a tile is then inside one block (whole bytes of it, for 4 bits), in the forward layout
([N, K]) and the dx one ([K, N]) alike. A weight whose rows do not split so (4 bits: in-features
not a multiple of the blocksize, or a blocksize of 32) is decoded into a buffer instead: the
element-wise decode lives in the decode kernel only (in a GEMM's main loop it spilled at every
tile tried).

The decoding kernels run without fp fusion (``options``): the double-quantised scale is a
product then an offset, as bitsandbytes computes it, and an fma would round it differently.

The fp8 tensor-core GEMM (``fp8_lora_matmul``, sm_89 and up, 16-bit activations) steps K by 128,
the scale block, and holds a 128-deep partial product next to its accumulator: its tiles are at
most 128×128 (a 128×256 one would need 512 fp32 values a thread).
"""
from __future__ import annotations

from ..kernels.fp8 import _fp8_act_quant_kernel, _fp8_lora_matmul_kernel, _fp8_lora_matmul_tma_kernel
from ..kernels.quant import _quant_dequant_kernel, _quant_lora_matmul_kernel, _quant_multi_lora_matmul_kernel
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
# QUANT (the storage, kernels/quant.py): 0 4-bit, fp32 absmax; 1 4-bit, double-quantised absmax;
# 2 fp8, a scale per row; 3 fp8, a scale per 128×128 tile. The weight's pointers per storage:
_NF4 = {"w_ptr": "u8", "scale_ptr": "fp32", "code_ptr": "fp32", "scale2_ptr": "fp32", "code2_ptr": "fp32"}
_NF4_NESTED = {**_NF4, "scale_ptr": "u8"}
_FP8 = {**_NF4, "w_ptr": "fp8e4nv"}


def quant_matmul_space(dtype: str) -> list[Config]:
    """BLOCK_N and BLOCK_K are 64 (or 32): divisors of the blocksize, so both layouts decode
    one block per row (whole bytes of it, for 4 bits)."""
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


def quant_matmul_smem(cfg: Config, dtype: str) -> int:
    """Pipelined x tiles and packed weight bytes, the decoded tile handed to the MMA."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    return cfg.num_stages * (bm * bk * itemsize(dtype) + bn * bk // 2 + MATMUL_BLOCK_R * bk * ADAPTER_BYTES) \
        + bn * bk * itemsize(dtype)


def prune_quant_matmul(cfgs, dtype: str, cc: int, block_r=None) -> list[Config]:
    return [c for c in cfgs if min(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) >= 16
            and quant_matmul_smem(c, dtype) <= smem_budget(cc)]


def default_quant_matmul(dtype: str, cc, dims: dict) -> Config:
    """By the token count (the launchers use these kernels up to INLOOP_MAX_M tokens).
    ``cc=None`` (the interpreter): small tiles, several of them at the tests' shapes."""
    if cc is None:
        return Config.make(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=2, num_stages=2)
    space = prune_quant_matmul(quant_matmul_space(dtype), dtype, cc)
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
_FWD_ONES = frozenset({"stride_xk", "stride_tr", "stride_ur", "stride_ak", "stride_yn"})
_DX_ONES = frozenset({"stride_xk", "stride_tr", "stride_un", "stride_ak", "stride_yn"})
QUANT_LORA_MATMUL = register(KernelSpec(
    name="quant_lora_matmul", fn=_quant_lora_matmul_kernel, key=("N", "K", "layout", "M"), layouts=("w", "wT"),
    space=quant_matmul_space, prune=prune_quant_matmul, default=default_quant_matmul,
    constants={"BLOCK_R": MATMUL_BLOCK_R}, floats=frozenset({"scale", "offset"}), options=NO_FUSION,
    variants=(
        AotVariant("4-bit, forward, shrink fused, bias on, double-quantised scales",
                   pointers={**_MATMUL_POINTERS, **_NF4_NESTED},
                   flags={"W_NMAJOR": False, "QUANT": 1, "W_ROUND": 0, "HAS_BIAS": True,
                          "HAS_DROPOUT": False, "FUSE_SHRINK": True, "EVEN_K": True},
                   ones=_FWD_ONES, plain=_MATMUL_PLAIN, adapter_fp32=True),
        AotVariant("4-bit, forward after a separate shrink, fp32 scales, weight rounded to float16 first",
                   pointers=_MATMUL_POINTERS,
                   flags={"W_NMAJOR": False, "QUANT": 0, "W_ROUND": 1, "HAS_BIAS": False,
                          "HAS_DROPOUT": False, "FUSE_SHRINK": False, "EVEN_K": True},
                   ones=_FWD_ONES, plain=_MATMUL_PLAIN | {"stride_xm"}),
        AotVariant("4-bit, backward dx, dropout on, double-quantised scales",
                   pointers={**_MATMUL_POINTERS, **_NF4_NESTED},
                   flags={"W_NMAJOR": True, "QUANT": 1, "W_ROUND": 0, "HAS_BIAS": False,
                          "HAS_DROPOUT": True, "FUSE_SHRINK": False, "EVEN_K": False},
                   ones=_DX_ONES, plain=_MATMUL_PLAIN | {"K", "WN"}),
        AotVariant("fp8, forward, shrink fused, bias on, 128x128 tile scales",
                   pointers={**_MATMUL_POINTERS, **_FP8},
                   flags={"W_NMAJOR": False, "QUANT": 3, "W_ROUND": 0, "HAS_BIAS": True,
                          "HAS_DROPOUT": False, "FUSE_SHRINK": True, "EVEN_K": True},
                   ones=_FWD_ONES, plain=_MATMUL_PLAIN, adapter_fp32=True, min_cc=89),
        AotVariant("fp8, backward dx, dropout off, row scales",
                   pointers={**_MATMUL_POINTERS, **_FP8},
                   flags={"W_NMAJOR": True, "QUANT": 2, "W_ROUND": 0, "HAS_BIAS": False,
                          "HAS_DROPOUT": False, "FUSE_SHRINK": False, "EVEN_K": False},
                   ones=_DX_ONES, plain=_MATMUL_PLAIN | {"K", "WN", "WK"}, min_cc=89),
    )))


# ---------------------------------------------------------------- multi-adapter forward
_MULTI_POINTERS = {"x_ptr": "x", **_NF4, "bias_ptr": "x", "perm_ptr": "i64", "sid_ptr": "i64", "t_ptr": "fp32",
                   "b_ptr": "adapter", "rank_ptr": "i32", "lora_scale_ptr": "fp32", "bounds_ptr": "i32", "y_ptr": "x"}
_MULTI_ONES = frozenset({"stride_xk", "stride_tr", "stride_br", "stride_yn"})
_MULTI_PLAIN = frozenset({"M", "R_MAX", "SLOTS", "stride_tm", "stride_bn", "blocksize2"})
QUANT_MULTI_LORA_MATMUL = register(KernelSpec(
    name="quant_multi_lora_matmul", fn=_quant_multi_lora_matmul_kernel, key=("N", "K", "M"),
    space=quant_matmul_space, prune=prune_quant_matmul, default=default_quant_matmul,
    constants={"BLOCK_R": MATMUL_BLOCK_R}, floats=frozenset({"offset"}), options=NO_FUSION,
    variants=(
        AotVariant("4-bit, one slice, bias on, fp32 pool adapters, double-quantised scales",
                   pointers={**_MULTI_POINTERS, **_NF4_NESTED},
                   flags={"QUANT": 1, "W_ROUND": 0, "HAS_BIAS": True, "SLICED_OUTPUT": False,
                          "NUM_SLICES": 1, "EVEN_K": True},
                   ones=_MULTI_ONES, plain=_MULTI_PLAIN, adapter_fp32=True),
        AotVariant("4-bit, three fused slices, fp32 scales",
                   pointers=_MULTI_POINTERS,
                   flags={"QUANT": 0, "W_ROUND": 0, "HAS_BIAS": False, "SLICED_OUTPUT": True,
                          "NUM_SLICES": 3, "EVEN_K": True},
                   ones=_MULTI_ONES, plain=_MULTI_PLAIN),
        AotVariant("fp8, one slice, 128x128 tile scales",
                   pointers={**_MULTI_POINTERS, **_FP8},
                   flags={"QUANT": 3, "W_ROUND": 0, "HAS_BIAS": False, "SLICED_OUTPUT": False,
                          "NUM_SLICES": 1, "EVEN_K": False},
                   ones=_MULTI_ONES, plain=_MULTI_PLAIN | {"K"}, min_cc=89),
    )))


# ---------------------------------------------------------------- the decode into a buffer
def dequant_space(dtype: str) -> list[Config]:
    """Memory-bound: 64-column tiles (whole bytes of one block per row), many rows."""
    return table(("BLOCK_N", "BLOCK_K"), [(32, 64, 4, 1)])


def default_dequant(dtype: str, cc, dims: dict) -> Config:
    if cc is None:
        return Config.make(BLOCK_N=16, BLOCK_K=32, num_warps=2, num_stages=1)
    return dequant_space(dtype)[0]


QUANT_DEQUANT = register(KernelSpec(
    name="quant_dequant", fn=_quant_dequant_kernel, key=("N", "K"),
    space=dequant_space, default=default_dequant, floats=frozenset({"offset"}), options=NO_FUSION,
    variants=(
        AotVariant("4-bit, double-quantised scales, whole bytes",
                   pointers={**_NF4_NESTED, "out_ptr": "x"}, flags={"QUANT": 1, "ALIGNED": True, "W_ROUND": 0},
                   plain=frozenset({"blocksize2"})),
        AotVariant("4-bit, fp32 scales, element-wise, through bfloat16",
                   pointers={**_NF4, "out_ptr": "x"}, flags={"QUANT": 0, "ALIGNED": False, "W_ROUND": 2},
                   plain=frozenset({"N", "K", "stride_on"})),
        AotVariant("fp8, tile scales, a scale per element",
                   pointers={**_FP8, "out_ptr": "x"}, flags={"QUANT": 3, "ALIGNED": False, "W_ROUND": 0},
                   plain=frozenset({"N", "K", "stride_on"}), min_cc=89),
    )))


# ---------------------------------------------------------------- the fp8 tensor-core path
FP8_BLOCK = 128  # the scale block: activations 1×128, weights 128×128 (or a row)


def act_quant_space(dtype: str) -> list[Config]:
    """One pass over the activations (memory-bound): short row blocks, 128-wide steps; the rank
    tile (the fused shrink) comes from R."""
    if dtype == "float32":
        return []
    return table(("BLOCK_M", "BLOCK_K"), [(16, FP8_BLOCK, 4, 2)])


def default_act_quant(dtype: str, cc, dims: dict) -> Config:
    if cc is None:
        return Config.make(BLOCK_M=16, BLOCK_K=FP8_BLOCK, num_warps=2, num_stages=1)
    return act_quant_space(dtype)[0]


FP8_ACT_QUANT = register(KernelSpec(
    name="fp8_act_quant", fn=_fp8_act_quant_kernel, key=("K", "R", "M"),
    space=act_quant_space, default=default_act_quant, rank_blocked=True, rank_cap=64,
    prune=lambda cfgs, dtype, cc, block_r: [c for c in cfgs if cc is not None and cc >= 89],
    floats=frozenset({"scale"}), picked=lambda dtype, cc: cc >= 89,
    variants=(
        AotVariant("forward: x, the shrink fused",
                   pointers={"x_ptr": "x", "xq_ptr": "fp8e4nv", "sx_ptr": "fp32", "col_ptr": "fp32",
                             "a_ptr": "adapter", "t_ptr": "fp32"},
                   flags={"HAS_COL_SCALE": False, "FUSE_SHRINK": True, "EXACT_CAST": False},
                   ones=frozenset({"stride_xk", "stride_ak", "stride_tr"}),
                   plain=frozenset({"M", "R", "KB", "stride_tm", "stride_ar"}), adapter_fp32=True),
        AotVariant("backward: dY, a per-row weight scale folded in",
                   pointers={"x_ptr": "x", "xq_ptr": "fp8e4nv", "sx_ptr": "fp32", "col_ptr": "fp32",
                             "a_ptr": "adapter", "t_ptr": "fp32"},
                   flags={"HAS_COL_SCALE": True, "FUSE_SHRINK": False, "EXACT_CAST": False},
                   ones=frozenset({"stride_ak", "stride_tr"}),
                   plain=frozenset({"M", "K", "R", "KB", "stride_tm", "stride_ar", "stride_xk"})),
    )))


def fp8_matmul_space(dtype: str) -> list[Config]:
    if dtype == "float32":
        return []
    return table(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), [
        (128, 128, FP8_BLOCK, 8, 8, 3),
        (64, 128, FP8_BLOCK, 8, 4, 3),
        (64, 64, FP8_BLOCK, 8, 4, 4),
    ])


def fp8_matmul_smem(cfg: Config) -> int:
    """Pipelined x and w tiles, one byte an element."""
    return cfg.num_stages * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"]


def prune_fp8_matmul(cfgs, dtype: str, cc: int, block_r=None) -> list[Config]:
    # fp8 tensor cores: sm_89 (Ada) and sm_90 (Hopper) up
    return [c for c in cfgs if cc is not None and cc >= 89 and fp8_matmul_smem(c) <= smem_budget(cc)]


def _fp8_pick(space: list, dims: dict) -> Config:
    """The tile by the output shape (not yet timed on a GPU)."""
    by_tile = {(c["BLOCK_M"], c["BLOCK_N"]): c for c in space}
    M, N = dims["M"], dims["N"]
    if M >= 1024 and N >= 1024:
        return by_tile[(128, 128)]
    if M >= 128:
        return by_tile[(64, 128)]
    return by_tile[(64, 64)]


def default_fp8_matmul(dtype: str, cc, dims: dict) -> Config:
    """By the token count; ``cc=None`` (the interpreter, which runs fp8 dots exactly): small tiles."""
    if cc is None:
        return Config.make(BLOCK_M=16, BLOCK_N=32, BLOCK_K=FP8_BLOCK, GROUP_M=2, num_warps=2, num_stages=1)
    return _fp8_pick(prune_fp8_matmul(fp8_matmul_space(dtype), dtype, cc), dims)


_FP8_MM_POINTERS = {"xq_ptr": "fp8e4nv", "sx_ptr": "fp32", "w_ptr": "fp8e4nv", "sw_ptr": "fp32", "t_ptr": "fp32",
                    "u_ptr": "adapter", "bias_ptr": "x", "y_ptr": "x", "seed_ptr": "i32"}
_FP8_MM_PLAIN = frozenset({"M", "R", "KB", "drop_threshold", "stride_tm", "stride_un", "stride_ur", "stride_sn",
                           "stride_sk"})
FP8_LORA_MATMUL = register(KernelSpec(
    name="fp8_lora_matmul", fn=_fp8_lora_matmul_kernel, key=("N", "K", "layout", "M"), layouts=("w", "wT"),
    space=fp8_matmul_space, prune=prune_fp8_matmul, default=default_fp8_matmul,
    # on sm_90 the TMA kernel below runs, this one only for operands a descriptor cannot address
    constants={"BLOCK_R": MATMUL_BLOCK_R}, floats=frozenset({"scale"}), picked=lambda dtype, cc: 89 <= cc < 90,
    variants=(
        AotVariant("forward, 128x128 tile scales, bias on",
                   pointers=_FP8_MM_POINTERS, flags={"W_SCALE": 2, "HAS_BIAS": True, "HAS_DROPOUT": False},
                   ones=frozenset({"stride_wk", "stride_tr", "stride_ur"}), plain=_FP8_MM_PLAIN, adapter_fp32=True),
        AotVariant("forward, row scales",
                   pointers=_FP8_MM_POINTERS, flags={"W_SCALE": 1, "HAS_BIAS": False, "HAS_DROPOUT": False},
                   ones=frozenset({"stride_wk", "stride_tr", "stride_ur"}), plain=_FP8_MM_PLAIN),
        AotVariant("backward dx, 128x128 tile scales, dropout on",
                   pointers=_FP8_MM_POINTERS, flags={"W_SCALE": 2, "HAS_BIAS": False, "HAS_DROPOUT": True},
                   ones=frozenset({"stride_wn", "stride_tr", "stride_un"}), plain=_FP8_MM_PLAIN),
        AotVariant("backward dx, row scales folded into dY",
                   pointers=_FP8_MM_POINTERS, flags={"W_SCALE": 0, "HAS_BIAS": False, "HAS_DROPOUT": False},
                   ones=frozenset({"stride_wn", "stride_tr", "stride_un"}), plain=_FP8_MM_PLAIN | {"K"}),
    )))


def prune_fp8_tma(cfgs, dtype: str, cc: int, block_r=None) -> list[Config]:
    return [c for c in cfgs if cc is not None and cc >= 90 and fp8_matmul_smem(c) <= smem_budget(cc)]


def default_fp8_tma(dtype: str, cc, dims: dict) -> Config:
    """As the pointer kernel's; ``cc=None`` (the interpreter runs it only when a test asks): small tiles."""
    if cc is None:
        return default_fp8_matmul(dtype, None, dims)
    return _fp8_pick(prune_fp8_tma(fp8_matmul_space(dtype), dtype, cc), dims)


_FP8_TMA_PLAIN = frozenset({"M", "R", "KB", "num_programs", "drop_threshold", "stride_tm", "stride_un", "stride_ur",
                            "stride_sn", "stride_sk"})
FP8_LORA_MATMUL_TMA = register(KernelSpec(
    name="fp8_lora_matmul_tma", fn=_fp8_lora_matmul_tma_kernel, key=("N", "K", "layout", "M"), layouts=("w", "wT"),
    space=fp8_matmul_space, prune=prune_fp8_tma, default=default_fp8_tma,
    constants={"BLOCK_R": MATMUL_BLOCK_R}, floats=frozenset({"scale"}),
    variants=(
        AotVariant("forward, 128x128 tile scales, bias on",
                   pointers=_FP8_MM_POINTERS,
                   flags={"W_NMAJOR": False, "W_SCALE": 2, "HAS_BIAS": True, "HAS_DROPOUT": False},
                   ones=frozenset({"stride_tr", "stride_ur"}), plain=_FP8_TMA_PLAIN, adapter_fp32=True),
        AotVariant("forward, row scales",
                   pointers=_FP8_MM_POINTERS,
                   flags={"W_NMAJOR": False, "W_SCALE": 1, "HAS_BIAS": False, "HAS_DROPOUT": False},
                   ones=frozenset({"stride_tr", "stride_ur"}), plain=_FP8_TMA_PLAIN),
        AotVariant("backward dx, 128x128 tile scales, dropout on",
                   pointers=_FP8_MM_POINTERS,
                   flags={"W_NMAJOR": True, "W_SCALE": 2, "HAS_BIAS": False, "HAS_DROPOUT": True},
                   ones=frozenset({"stride_tr", "stride_un"}), plain=_FP8_TMA_PLAIN),
        AotVariant("backward dx, row scales folded into dY",
                   pointers=_FP8_MM_POINTERS,
                   flags={"W_NMAJOR": True, "W_SCALE": 0, "HAS_BIAS": False, "HAS_DROPOUT": False},
                   ones=frozenset({"stride_tr", "stride_un"}), plain=_FP8_TMA_PLAIN),
    )))
