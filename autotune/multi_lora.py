"""Specs of the multi-adapter LoRA kernels (``kernels/multi_lora.py``).

The fused matmul shares the single-adapter matmul's space, prune rule and
default (the same GEMM core, ``kernels/common.py: gemm_tile``). AOT
variants: the forward layout with one slice and fp32 pool adapters, and the
backward layout (transposed adapter reads) with three fused slices and
adapters in the compute dtype; dropout is on where that layout can have it
(shrink forward, dA, dx).
"""
from __future__ import annotations

from ..kernels.multi_lora import _multi_lora_grad_kernel, _multi_lora_matmul_kernel, _multi_lora_shrink_kernel
from .config import ADAPTER_BYTES, Config, itemsize, rank_block, smem_budget, table
from .lora import default_matmul, matmul_space, prune_matmul
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

MULTI_LORA_MATMUL = register(KernelSpec(
    name="multi_lora_matmul", fn=_multi_lora_matmul_kernel, key=("N", "K", "M"),
    space=matmul_space, prune=prune_matmul, default=default_matmul, constants={"BLOCK_R": BLOCK_R},
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


# ---------------------------------------------------------------- multi_lora_grad
def grad_space(dtype: str) -> list[Config]:
    """dA / dB: one [BLOCK_R, BLOCK_D] tile of one adapter's gradient per
    program, summed over its rows in BLOCK_M steps. Ranks above 64 take
    several rank blocks (a grid dimension)."""
    names = ("BLOCK_M", "BLOCK_D", "BLOCK_R")
    if dtype == "float32":
        return table(names, [(32, 32, 16, 4, 2), (32, 32, 32, 4, 2), (32, 64, 64, 4, 2)])
    return table(names, [(64, 64, 16, 4, 3), (64, 64, 32, 4, 3), (64, 64, 64, 4, 3), (32, 128, 64, 8, 3)])


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
