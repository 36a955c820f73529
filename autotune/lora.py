"""Specs of the fused-LoRA kernels (``kernels/lora.py``): spaces, prune
rules, defaults, cache keys and AOT variants.

Each kernel runs in two layouts: the forward one and, with transposed
operand views, the backward one (dt, dx, dA). The AOT variants compile both:
the forward layout with every flag on and fp32 adapters (PEFT's default),
the backward layout with flags off and adapters in the compute dtype.
"""
from __future__ import annotations

from ..kernels.lora import _lora_grad_kernel, _lora_matmul_kernel, _lora_shrink_kernel
from .config import ADAPTER_BYTES, Config, itemsize, rank_block, smem_budget, table
from .registry import AotVariant, KernelSpec, register

# The low-rank term of the matmul steps the rank 16 at a time: the tl.dot
# minimum, so r = 16 costs one unpadded step and no registers the main loop needs.
MATMUL_BLOCK_R = 16


# ---------------------------------------------------------------- lora_matmul
def matmul_space(dtype: str) -> list[Config]:
    """Y = X·Wᵀ + s·T·Uᵀ: the big GEMM, forward y and backward dx.

    fp32 runs IEEE FMA products (no tensor cores): one moderate tile, not
    tuned. The low-rank loop is not software-pipelined (``num_stages=1`` in
    the kernel), so only the main loop's tiles count against shared memory.
    """
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
    if dtype == "float32":
        return table(names, [(64, 64, 32, 8, 4, 3)])
    return table(names, [
        (128, 256, 64, 16, 8, 3),  # measured best on H100 for fwd and dx (docs/benchmarks.md)
        (128, 128, 64, 8, 8, 4),
        (128, 128, 64, 8, 4, 4),
        (128, 64, 64, 8, 4, 4),
        (64, 128, 64, 8, 4, 4),
        (64, 64, 64, 8, 4, 3),
        (32, 64, 128, 8, 4, 4),  # few tokens (decode): twice the programs of 64×64 on a memory-bound GEMM
    ])


def matmul_smem(cfg: Config, dtype: str) -> int:
    """Pipelined operand tiles: stages × (BM·BK + BK·BN) elements."""
    return cfg.num_stages * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * itemsize(dtype)


def prune_matmul(cfgs, dtype: str, cc: int, block_r=None) -> list[Config]:
    return [c for c in cfgs
            if min(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) >= 16 and matmul_smem(c, dtype) <= smem_budget(cc)]


def default_matmul(dtype: str, cc, dims: dict) -> Config:
    """Heuristic pick by the output shape. ``cc=None`` is the interpreter:
    small tiles, so that the small shapes of the tests still cover several
    tiles and K steps."""
    if cc is None:
        return Config.make(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=2, num_stages=2)
    M, N = dims["M"], dims["N"]
    space = prune_matmul(matmul_space(dtype), dtype, cc)
    if dtype == "float32":
        return space[0]
    by_tile = {(c["BLOCK_M"], c["BLOCK_N"]): c for c in space}
    if M >= 2048 and N >= 2048 and (128, 256) in by_tile:
        return by_tile[(128, 256)]
    if M >= 256:
        return by_tile[(128, 128)]
    if M <= 64 and (32, 64) in by_tile:
        return by_tile[(32, 64)]  # not yet timed on a GPU: chosen for programs ≈ SMs at N = 4096
    return by_tile[(64, 64)]


LORA_MATMUL = register(KernelSpec(
    name="lora_matmul", fn=_lora_matmul_kernel, key=("N", "K", "layout", "M"),
    space=matmul_space, prune=prune_matmul, default=default_matmul,
    constants={"BLOCK_R": MATMUL_BLOCK_R}, floats=frozenset({"scale"}),
    variants=(
        AotVariant("forward layout, bias and dropout on",
                   pointers={"x_ptr": "x", "w_ptr": "x", "t_ptr": "fp32", "u_ptr": "adapter", "bias_ptr": "x",
                             "y_ptr": "x", "seed_ptr": "i32"},
                   flags={"HAS_BIAS": True, "HAS_DROPOUT": True, "EVEN_K": True},
                   ones=frozenset({"stride_xk", "stride_wk", "stride_tr", "stride_ur", "stride_yn"}),
                   plain=frozenset({"M", "R", "drop_threshold", "stride_tm", "stride_un"}), adapter_fp32=True),
        AotVariant("backward layout (dx), flags off",
                   pointers={"x_ptr": "x", "w_ptr": "x", "t_ptr": "fp32", "u_ptr": "adapter", "bias_ptr": "x",
                             "y_ptr": "x", "seed_ptr": "i32"},
                   flags={"HAS_BIAS": False, "HAS_DROPOUT": False, "EVEN_K": False},
                   ones=frozenset({"stride_xk", "stride_wn", "stride_tr", "stride_un", "stride_yn"}),
                   plain=frozenset({"M", "R", "drop_threshold", "stride_tm"})),
    )))


# ---------------------------------------------------------------- lora_shrink
def shrink_space(dtype: str) -> list[Config]:
    """t = s·drop(X)·Aᵀ: memory-bound, one pass over X. BLOCK_R comes from R."""
    names = ("BLOCK_M", "BLOCK_K")
    if dtype == "float32":
        return table(names, [(32, 32, 4, 2)])
    return table(names, [(16, 128, 4, 4), (16, 64, 4, 2)])


def shrink_smem(cfg: Config, block_r: int, dtype: str) -> int:
    return cfg.num_stages * cfg["BLOCK_K"] * (cfg["BLOCK_M"] * itemsize(dtype) + block_r * ADAPTER_BYTES)


def prune_shrink(cfgs, dtype: str, cc: int, block_r: int) -> list[Config]:
    # The fp32 accumulator is BLOCK_M × BLOCK_R: cap it at 64 KiB so it stays in registers.
    return [c for c in cfgs
            if c["BLOCK_M"] >= 16 and c["BLOCK_K"] >= 16 and c["BLOCK_M"] * block_r <= 16384
            and shrink_smem(c, block_r, dtype) <= smem_budget(cc)]


def default_shrink(dtype: str, cc, dims: dict) -> Config:
    if cc is None:
        return Config.make(BLOCK_M=16, BLOCK_K=64, num_warps=2, num_stages=2)
    # Thin row blocks with long K steps: many programs, each streaming its
    # rows once (measured fastest at M=8192, K=4096, r=16 on H100).
    return prune_shrink(shrink_space(dtype), dtype, cc, rank_block(dims["R"]))[0]


LORA_SHRINK = register(KernelSpec(
    name="lora_shrink", fn=_lora_shrink_kernel, key=("K", "R", "layout", "M"),
    space=shrink_space, prune=prune_shrink, default=default_shrink, rank_blocked=True,
    floats=frozenset({"scale"}),
    variants=(
        AotVariant("forward layout (t), dropout on",
                   pointers={"x_ptr": "x", "a_ptr": "adapter", "t_ptr": "fp32", "seed_ptr": "i32"},
                   flags={"HAS_DROPOUT": True}, ones=frozenset({"stride_xk", "stride_ak", "stride_tr"}),
                   plain=frozenset({"M", "R", "drop_threshold", "stride_tm"}), adapter_fp32=True),
        AotVariant("backward layout (dt = dY·B)",
                   pointers={"x_ptr": "x", "a_ptr": "adapter", "t_ptr": "fp32", "seed_ptr": "i32"},
                   flags={"HAS_DROPOUT": False}, ones=frozenset({"stride_xk", "stride_ar", "stride_tr"}),
                   plain=frozenset({"M", "R", "drop_threshold", "stride_tm", "stride_ak"})),
    )))


# ---------------------------------------------------------------- lora_grad
def grad_space(dtype: str) -> list[Config]:
    """O = s·drop(X)ᵀ·T split over M: memory-bound. BLOCK_R comes from R."""
    names = ("BLOCK_M", "BLOCK_P")
    if dtype == "float32":
        return table(names, [(32, 32, 4, 2)])
    return table(names, [(64, 128, 4, 3), (32, 64, 4, 2)])


def grad_smem(cfg: Config, block_r: int, dtype: str) -> int:
    return cfg.num_stages * cfg["BLOCK_M"] * (cfg["BLOCK_P"] * itemsize(dtype) + block_r * ADAPTER_BYTES)


def prune_grad(cfgs, dtype: str, cc: int, block_r: int) -> list[Config]:
    return [c for c in cfgs
            if c["BLOCK_M"] >= 16 and c["BLOCK_P"] >= 16 and c["BLOCK_P"] * block_r <= 16384
            and grad_smem(c, block_r, dtype) <= smem_budget(cc)]


def default_grad(dtype: str, cc, dims: dict) -> Config:
    if cc is None:
        return Config.make(BLOCK_M=32, BLOCK_P=32, num_warps=2, num_stages=2)
    return prune_grad(grad_space(dtype), dtype, cc, rank_block(dims["R"]))[0]


LORA_GRAD = register(KernelSpec(
    name="lora_grad", fn=_lora_grad_kernel, key=("P", "R", "layout", "M"),
    space=grad_space, prune=prune_grad, default=default_grad, rank_blocked=True,
    floats=frozenset({"scale"}),
    variants=(
        AotVariant("dA layout (o as [P, R]), dropout on",
                   pointers={"x_ptr": "x", "t_ptr": "fp32", "o_ptr": "fp32", "seed_ptr": "i32"},
                   flags={"HAS_DROPOUT": True}, ones=frozenset({"stride_xp", "stride_tr", "stride_or"}),
                   plain=frozenset({"M", "R", "rows_per_split", "drop_threshold", "stride_tm", "stride_op"})),
        AotVariant("transposed output (o as [R, P])",
                   pointers={"x_ptr": "x", "t_ptr": "fp32", "o_ptr": "fp32", "seed_ptr": "i32"},
                   flags={"HAS_DROPOUT": False}, ones=frozenset({"stride_xp", "stride_tr", "stride_op"}),
                   plain=frozenset({"M", "R", "rows_per_split", "drop_threshold", "stride_tm"})),
    )))
