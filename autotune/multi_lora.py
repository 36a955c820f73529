"""Specs of the multi-adapter LoRA kernels (``kernels/multi_lora.py``).

The fused matmul shares the single-adapter matmul's space (but for fp32),
prune rule and default (the same GEMM core, ``kernels/common.py: gemm_tile``); its sm_90
version shares the Hopper core (the weight through TMA, a persistent grid)
with a space of its own. AOT
variants: the forward layout with one slice and fp32 pool adapters, and the
backward layout (transposed adapter reads) with three fused slices and
adapters in the compute dtype; dropout is on where that layout can have it
(shrink forward, dA, dx).
"""
from __future__ import annotations

from ..kernels.multi_lora import (_multi_lora_grad_kernel, _multi_lora_matmul_kernel, _multi_lora_matmul_tma_kernel,
                                  _multi_lora_shrink_kernel)
from .config import ADAPTER_BYTES, Config, itemsize, rank_block, smem_budget, table
from .lora import default_matmul, matmul_space, prune_matmul, prune_tma
from .registry import AotVariant, KernelSpec, register

# Rank step of the shrink and the fused matmul: the tl.dot minimum. A tile
# walks each adapter's rank 16 at a time up to that adapter's own rank.
BLOCK_R = 16

_POOL = {"perm_ptr": "i64", "sid_ptr": "i64", "rank_ptr": "i32", "bounds_ptr": "i32",
         "seed_ptr": "i32", "thr_ptr": "i32", "inv_ptr": "fp32"}


# ---------------------------------------------------------------- multi_lora_shrink
def shrink_space(dtype: str) -> list[Config]:
    """t[j, :r_a] = A_a·x[perm[j]] per adapter run: memory-bound. Row copies
    and small dots: every config fits every target's shared memory."""
    if dtype == "float32":
        return table(("BLOCK_M", "BLOCK_K"), [(32, 32, 4, 2)])
    return table(("BLOCK_M", "BLOCK_K"), [(16, 128, 4, 3), (64, 64, 4, 3)])


def default_shrink(dtype: str, cc, dims: dict) -> Config:
    if cc is None:
        return Config.make(BLOCK_M=16, BLOCK_K=32, num_warps=2, num_stages=1)
    return shrink_space(dtype)[0]


MULTI_LORA_SHRINK = register(KernelSpec(
    name="multi_lora_shrink", fn=_multi_lora_shrink_kernel, key=("K", "M"),
    space=shrink_space, default=default_shrink, constants={"BLOCK_R": BLOCK_R},
    variants=(
        AotVariant("forward layout (t), one slice, dropout on",
                   pointers={"x_ptr": "x", "a_ptr": "adapter", "t_ptr": "fp32", **_POOL},
                   flags={"NUM_SLICES": 1, "SLICED_REDUCTION": False, "HAS_DROPOUT": True},
                   ones=frozenset({"stride_xk", "stride_ak", "stride_tr"}),
                   plain=frozenset({"M", "stride_tm", "R_MAX", "SLOTS", "stride_a_slice", "K_PER_SPLIT"}),
                   adapter_fp32=True),
        AotVariant("backward layout (dt = dY·B), three slices",
                   pointers={"x_ptr": "x", "a_ptr": "adapter", "t_ptr": "fp32", **_POOL},
                   flags={"NUM_SLICES": 3, "SLICED_REDUCTION": True, "HAS_DROPOUT": False},
                   ones=frozenset({"stride_xk", "stride_ar", "stride_tr"}),
                   plain=frozenset({"M", "stride_tm", "R_MAX", "SLOTS", "stride_a_slice", "K_PER_SPLIT"})),
    )))


# ---------------------------------------------------------------- multi_lora_matmul
_MATMUL_PTRS = {"x_ptr": "x", "w_ptr": "x", "bias_ptr": "x", "y_ptr": "x", "t_ptr": "fp32", "b_ptr": "adapter",
                "scale_ptr": "fp32", **_POOL}

def multi_matmul_space(dtype: str) -> list[Config]:
    """The single-adapter matmul's space, except fp32: the expand's fp32
    products need 8 warps at 64×64 to stay in registers (4 spill on sm_90)."""
    if dtype == "float32":
        return table(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), [(64, 64, 32, 8, 8, 3)])
    return matmul_space(dtype)


def default_multi_matmul(dtype: str, cc, dims: dict) -> Config:
    if dtype == "float32" and cc is not None:
        return multi_matmul_space(dtype)[0]
    return default_matmul(dtype, cc, dims)


MULTI_LORA_MATMUL = register(KernelSpec(
    name="multi_lora_matmul", fn=_multi_lora_matmul_kernel, key=("N", "K", "M"),
    # On sm_90 the 16-bit launches take multi_lora_matmul_tma (this kernel
    # only when the weight is not TMA-aligned).
    picked=lambda dtype, cc: cc < 90 or dtype == "float32",
    space=multi_matmul_space, prune=prune_matmul, default=default_multi_matmul, constants={"BLOCK_R": BLOCK_R},
    variants=(
        AotVariant("forward layout (y), one slice, bias on",
                   pointers=_MATMUL_PTRS,
                   flags={"HAS_BIAS": True, "NUM_SLICES": 1, "SLICED_OUTPUT": True, "HAS_DROPOUT": False},
                   ones=frozenset({"stride_xk", "stride_wk", "stride_tr", "stride_br", "stride_yn"}),
                   plain=frozenset({"M", "stride_tm", "stride_bn", "R_MAX", "SLOTS", "stride_b_slice"}),
                   adapter_fp32=True),
        AotVariant("backward layout (dx), three slices, dropout on",
                   pointers=_MATMUL_PTRS,
                   flags={"HAS_BIAS": False, "NUM_SLICES": 3, "SLICED_OUTPUT": False, "HAS_DROPOUT": True},
                   ones=frozenset({"stride_xk", "stride_wn", "stride_tr", "stride_bn", "stride_yn"}),
                   plain=frozenset({"M", "stride_tm", "R_MAX", "SLOTS", "stride_b_slice"})),
    )))


# ---------------------------------------------------------------- multi_lora_matmul_tma
def matmul_tma_space(dtype: str) -> list[Config]:
    """The sm_90 multi-adapter GEMM (bf16/fp16). Its expand loop (runs ×
    slices, each with an isolation tile) costs registers the single-adapter
    kernel does not spend, so the tiles are smaller: every entry compiles
    without spills for every variant (read from the SASS; 128×128 only with
    a two-stage pipeline, 64-row tiles with 8 warps)."""
    if dtype == "float32":
        return []
    return table(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), [
        (64, 256, 64, 8, 8, 3),
        (128, 128, 64, 8, 8, 2),
        (64, 128, 64, 8, 8, 4),
        (64, 64, 128, 8, 4, 4),
    ])


def default_matmul_tma(dtype: str, cc, dims: dict) -> Config:
    """By the output shape; ``cc=None`` (the interpreter, when a test asks for
    this kernel): small tiles."""
    if cc is None:
        return Config.make(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2)
    by_tile = {(c["BLOCK_M"], c["BLOCK_N"]): c for c in prune_tma(matmul_tma_space(dtype), dtype, cc)}
    M, N = dims["M"], dims["N"]
    if M >= 2048 and N >= 2048:
        return by_tile[(64, 256)]
    if M > 64:
        return by_tile[(64, 128)]
    return by_tile[(64, 64)]


MULTI_LORA_MATMUL_TMA = register(KernelSpec(
    name="multi_lora_matmul_tma", fn=_multi_lora_matmul_tma_kernel, key=("N", "K", "M"),
    space=matmul_tma_space, prune=prune_tma, default=default_matmul_tma,
    constants={"BLOCK_R": BLOCK_R},
    variants=(
        AotVariant("forward layout (y), one slice, bias on",
                   pointers=_MATMUL_PTRS,
                   flags={"W_NMAJOR": False, "HAS_BIAS": True, "NUM_SLICES": 1, "SLICED_OUTPUT": True,
                          "HAS_DROPOUT": False},
                   ones=frozenset({"stride_xk", "stride_tr", "stride_br", "stride_yn"}),
                   plain=frozenset({"M", "stride_tm", "stride_bn", "R_MAX", "SLOTS", "stride_b_slice",
                                    "num_programs"}),
                   adapter_fp32=True),
        AotVariant("forward layout (y), three slices (fused q/k/v)",
                   pointers=_MATMUL_PTRS,
                   flags={"W_NMAJOR": False, "HAS_BIAS": False, "NUM_SLICES": 3, "SLICED_OUTPUT": True,
                          "HAS_DROPOUT": False},
                   ones=frozenset({"stride_xk", "stride_tr", "stride_br", "stride_yn"}),
                   plain=frozenset({"M", "stride_tm", "stride_bn", "R_MAX", "SLOTS", "stride_b_slice",
                                    "num_programs"}),
                   adapter_fp32=True),
        AotVariant("backward layout (dx), three slices, dropout on",
                   pointers=_MATMUL_PTRS,
                   flags={"W_NMAJOR": True, "HAS_BIAS": False, "NUM_SLICES": 3, "SLICED_OUTPUT": False,
                          "HAS_DROPOUT": True},
                   ones=frozenset({"stride_xk", "stride_tr", "stride_bn", "stride_yn"}),
                   plain=frozenset({"M", "stride_tm", "R_MAX", "SLOTS", "stride_b_slice", "num_programs"})),
    )))


# ---------------------------------------------------------------- multi_lora_grad
def grad_space(dtype: str) -> list[Config]:
    """dA / dB: one [BLOCK_R, BLOCK_D] tile of one adapter's gradient per
    program, summed over its rows in BLOCK_M steps. Ranks above 64 take
    several rank blocks (a grid dimension)."""
    names = ("BLOCK_M", "BLOCK_D", "BLOCK_R")
    if dtype == "float32":
        return table(names, [(32, 32, 16, 4, 2), (32, 32, 32, 4, 2), (32, 64, 64, 8, 2)])
    # 8 warps at rank tiles 32 and 64: with 4 the dB layout of fused slices spills on sm_90
    return table(names, [(64, 64, 16, 4, 3), (64, 64, 32, 8, 3), (64, 64, 64, 8, 3), (32, 128, 64, 8, 3)])


def grad_smem(cfg: Config, dtype: str) -> int:
    return cfg.num_stages * cfg["BLOCK_M"] * (cfg["BLOCK_D"] * itemsize(dtype) + cfg["BLOCK_R"] * ADAPTER_BYTES)


def prune_grad(cfgs, dtype: str, cc: int, block_r=None) -> list[Config]:
    return [c for c in cfgs if min(c["BLOCK_M"], c["BLOCK_D"], c["BLOCK_R"]) >= 16
            and grad_smem(c, dtype) <= smem_budget(cc)]


def default_grad(dtype: str, cc, dims: dict) -> Config:
    """The first config whose rank block covers R (up to 64)."""
    if cc is None:
        return Config.make(BLOCK_M=16, BLOCK_D=32, BLOCK_R=16, num_warps=2, num_stages=1)
    block_r = min(64, rank_block(dims["R"]))
    return next(c for c in prune_grad(grad_space(dtype), dtype, cc) if c["BLOCK_R"] == block_r)


_GRAD_PTRS = {"p_ptr": "fp32", "q_ptr": "x", "o_ptr": "fp32", "seg_ptr": "i64", "scale_ptr": "fp32", **_POOL}
del _GRAD_PTRS["sid_ptr"]

MULTI_LORA_GRAD = register(KernelSpec(
    name="multi_lora_grad", fn=_multi_lora_grad_kernel, key=("D", "R", "M"),
    space=grad_space, prune=prune_grad, default=default_grad,
    variants=(
        AotVariant("dA layout, one slice, dropout on",
                   pointers=_GRAD_PTRS, flags={"NUM_SLICES": 1, "SLICED_OUTPUT": False, "HAS_DROPOUT": True},
                   ones=frozenset({"stride_pr", "stride_qd", "stride_od"}),
                   plain=frozenset({"M", "stride_pm", "R_MAX", "SLOTS", "stride_o_slice"})),
        AotVariant("dB layout (o read transposed), three slices",
                   pointers=_GRAD_PTRS, flags={"NUM_SLICES": 3, "SLICED_OUTPUT": True, "HAS_DROPOUT": False},
                   ones=frozenset({"stride_pr", "stride_qd", "stride_or"}),
                   plain=frozenset({"M", "stride_pm", "R_MAX", "SLOTS", "stride_o_slice"})),
    )))
