"""Spec of the expert-LoRA GEMM (``kernels/moe_lora.py``): each expert's
GEMM with its adapter fused in, forward and backward dX.

Two specs of the portable kernel: the fused case (rank-blocked: ``BLOCK_R``
holds the whole rank of the fused shrink, R ≤ 64, the ``rank_cap``) and the
run-by-run case (``BLOCK_R`` = 16, the expand's rank step), so the AOT
harness compiles each layout only at the rank tiles it launches with. The space is
the dense GEMM's, less the 128×256 tile (the fused shrink's extra
accumulator and adapter tile spill there), pruned by the same shared-memory
rule plus the adapter tile. The key's ``M`` is the rows per expert (packed
rows / experts): what decides the row tile.
"""
from __future__ import annotations

from ..kernels.moe_lora import _expert_lora_matmul_kernel, _expert_lora_matmul_tma_kernel
from .config import ADAPTER_BYTES, Config, itemsize, rank_block, smem_budget, table
from .registry import AotVariant, KernelSpec, register

RANK_CAP = 64  # widest rank the forward fuses into its main loop


def space(dtype: str) -> list[Config]:
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
    if dtype == "float32":
        return table(names, [(32, 32, 16, 8, 4, 2)])
    return table(names, [
        (128, 128, 64, 8, 8, 3),
        (64, 128, 64, 8, 8, 3),
        (32, 64, 64, 8, 4, 4),  # few rows per expert (decode, many experts)
    ])


def smem(cfg: Config, dtype: str, block_r: int) -> int:
    """Pipelined tiles: stages × (x, weight and adapter tiles of one K step)."""
    return cfg.num_stages * cfg["BLOCK_K"] * ((cfg["BLOCK_M"] + cfg["BLOCK_N"]) * itemsize(dtype)
                                              + block_r * ADAPTER_BYTES)


def prune(cfgs, dtype: str, cc: int, block_r=None) -> list[Config]:
    br = block_r or 16
    return [c for c in cfgs if min(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) >= 16
            and smem(c, dtype, br) <= smem_budget(cc)]


def default(dtype: str, cc, dims: dict) -> Config:
    """By the rows per expert; ``cc=None`` (the interpreter): small tiles, so
    the tests' few rows per expert still span several tiles and K steps."""
    if cc is None:
        return Config.make(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=2, num_stages=1)
    cfgs = space(dtype)
    if dtype == "float32":
        return cfgs[0]
    by_tile = {(c["BLOCK_M"], c["BLOCK_N"]): c for c in cfgs}
    M = dims["M"]
    if M >= 256:
        return by_tile[(128, 128)]
    if M >= 64:
        return by_tile[(64, 128)]
    return by_tile[(32, 64)]


_PTRS = {"x_ptr": "x", "w_ptr": "x", "bias_ptr": "x", "tile_e_ptr": "i32", "tile_row_ptr": "i32",
         "ends_ptr": "i32", "sid_ptr": "i64", "a_ptr": "adapter", "t_ptr": "fp32", "b_ptr": "adapter",
         "rank_ptr": "i32", "scale_ptr": "fp32", "y_ptr": "x", "seed_ptr": "i32", "thr_ptr": "i32",
         "inv_ptr": "fp32"}
_PLAIN = frozenset({"M", "E", "R_MAX", "SLOTS", "TILES", "stride_tm", "stride_as", "stride_bs", "stride_br",
                    "stride_ar"})

EXPERT_LORA_MATMUL = register(KernelSpec(
    name="expert_lora_matmul", fn=_expert_lora_matmul_kernel, key=("N", "K", "R", "M"),
    # The fused case (FUSE_SHRINK). On sm_90 its 16-bit launches take expert_lora_matmul_tma (this kernel
    # only for operands TMA cannot address), so its sm_90 default picks are the fp32 ones.
    picked=lambda dtype, cc: cc < 90 or dtype == "float32",
    space=space, prune=prune, default=default, rank_blocked=True, rank_cap=RANK_CAP,
    variants=(
        # The layer's [E, in, out] weight: unit stride along N.
        AotVariant("forward (y), shrink fused, bias on", pointers=_PTRS,
                   flags={"HAS_BIAS": True, "FUSE_SHRINK": True, "HAS_DROPOUT": False},
                   ones=frozenset({"stride_xk", "stride_wn", "stride_ak", "stride_tr", "stride_yn"}),
                   plain=_PLAIN, adapter_fp32=True),
        # dX = dY·W_eᵀ + s·(dY·B_e)·A_e: the same weight read transposed (unit stride along K).
        AotVariant("backward (dX), dt fused", pointers=_PTRS,
                   flags={"HAS_BIAS": False, "FUSE_SHRINK": True, "HAS_DROPOUT": False},
                   ones=frozenset({"stride_xk", "stride_wk", "stride_tr", "stride_bn", "stride_yn"}),
                   plain=_PLAIN),
    )))

# The same kernel without the fused shrink (dropout, ranks over 64, mixed batches; on every target):
# t is read and each adapter run expanded in rank steps of 16, so BLOCK_R is a constant, not the rank.
EXPERT_LORA_RUNS = register(KernelSpec(
    name="expert_lora_matmul_runs", fn=_expert_lora_matmul_kernel, key=("N", "K", "M"),
    space=space, prune=prune, default=default, constants={"BLOCK_R": 16},
    variants=(
        # A mixed batch (y, serving): t from the multi-adapter shrink, every adapter run of the tile expanded.
        AotVariant("forward (y), mixed batch, runs expanded, bias on", pointers=_PTRS,
                   flags={"HAS_BIAS": True, "FUSE_SHRINK": False, "HAS_DROPOUT": False},
                   ones=frozenset({"stride_xk", "stride_wn", "stride_tr", "stride_br", "stride_yn"}),
                   plain=_PLAIN),
        # Dropout (dX): the same, each run's term masked by the forward's keep mask.
        AotVariant("backward (dX), runs expanded, dropout on", pointers=_PTRS,
                   flags={"HAS_BIAS": False, "FUSE_SHRINK": False, "HAS_DROPOUT": True},
                   ones=frozenset({"stride_xk", "stride_wk", "stride_tr", "stride_bn", "stride_yn"}),
                   plain=_PLAIN),
    )))


# ---------------------------------------------------------------- expert_lora_matmul_tma (sm_90)
def tma_space(dtype: str) -> list[Config]:
    """The fused case on sm_90 (16-bit): x, W and A through TMA, persistent grid."""
    if dtype == "float32":
        return []
    return table(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), [
        (128, 128, 64, 8, 8, 3),
        (64, 128, 64, 8, 8, 3),
    ])


def tma_smem(cfg: Config, dtype: str, block_r: int) -> int:
    """Stages × (x, weight and A tiles of one K step), all in the compute dtype."""
    return cfg.num_stages * cfg["BLOCK_K"] * (cfg["BLOCK_M"] + cfg["BLOCK_N"] + block_r) * itemsize(dtype)


def prune_tma(cfgs, dtype: str, cc: int, block_r=None) -> list[Config]:
    """Shared memory within the target's; no 128×128 tile with the 64-wide rank tile (its
    accumulators spill with Triton 3.9: 272 bytes of stack)."""
    br = block_r or 16
    return [c for c in cfgs if cc is not None and cc >= 90 and tma_smem(c, dtype, br) <= smem_budget(cc)
            and not (br >= 64 and c["BLOCK_M"] * c["BLOCK_N"] >= 128 * 128)]


def default_tma(dtype: str, cc, dims: dict) -> Config:
    if cc is None:  # the interpreter (POSTTRAIN_KERNELS_GEMM=tma): small tiles
        return Config.make(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2)
    by_tile = {(c["BLOCK_M"], c["BLOCK_N"]): c
               for c in prune_tma(tma_space(dtype), dtype, cc, min(rank_block(dims["R"]), RANK_CAP))}
    if dims["M"] >= 256 and (128, 128) in by_tile:
        return by_tile[(128, 128)]
    return by_tile[(64, 128)]  # few rows per expert too: a 64-row tile is wgmma's smallest at 8 warps


_TMA_PTRS = {"x_ptr": "x", "w_ptr": "x", "bias_ptr": "x", "tile_e_ptr": "i32", "tile_row_ptr": "i32",
             "used_ptr": "i64", "ends_ptr": "i32", "a_ptr": "x", "t_ptr": "fp32", "b_ptr": "adapter",
             "rank_ptr": "i32", "scale_ptr": "fp32", "y_ptr": "x"}
_TMA_PLAIN = frozenset({"M", "E", "R_MAX", "num_programs", "stride_tm", "stride_as", "stride_ar", "stride_bs",
                        "stride_br"})

EXPERT_LORA_MATMUL_TMA = register(KernelSpec(
    name="expert_lora_matmul_tma", fn=_expert_lora_matmul_tma_kernel, key=("N", "K", "R", "M"),
    picked=lambda dtype, cc: cc >= 90,
    space=tma_space, prune=prune_tma, default=default_tma, rank_blocked=True, rank_cap=RANK_CAP,
    variants=(
        AotVariant("weight [E, K, N] (unit N stride), bias on", pointers=_TMA_PTRS,
                   flags={"W_NMAJOR": True, "HAS_BIAS": True},
                   ones=frozenset({"stride_tr", "stride_yn"}), plain=_TMA_PLAIN, adapter_fp32=True),
        AotVariant("weight [E, N, K] (unit K stride)", pointers=_TMA_PTRS,
                   flags={"W_NMAJOR": False, "HAS_BIAS": False},
                   ones=frozenset({"stride_tr", "stride_yn", "stride_bn"}), plain=_TMA_PLAIN),
    )))
