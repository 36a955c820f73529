"""Specs of the fused-LoRA kernels (``kernels/lora.py``): spaces, prune
rules, defaults, cache keys and AOT variants.

The matmul kernels run in two layouts: the forward one and, with transposed
operand views, the backward one (dx). The AOT variants compile both: the
forward layout with its flags on and fp32 adapters (PEFT's default), the
backward layout with and without dropout. ``lora_matmul_tma`` is the sm_90
kernel of the same op: its space is empty below sm_90 and for fp32, and its
AOT variants are every combination a launcher picks (the SASS test checks
each default config of each for HGMMA, TMA and spills).
"""
from __future__ import annotations

from ..kernels.lora import (_lora_dy_kernel, _lora_matmul_kernel, _lora_matmul_tma_kernel, _lora_shrink_kernel,
                            _lora_x_kernel)
from .config import ADAPTER_BYTES, Config, itemsize, rank_block, smem_budget, table
from .registry import AotVariant, KernelSpec, register

# The shrink and the two backward passes hold at most 64 ranks in a tile;
# larger ranks take a program per 64 (a 256-wide fp32 tile spills).
RANK_CHUNK = 64

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


_MATMUL_POINTERS = {"x_ptr": "x", "w_ptr": "x", "t_ptr": "fp32", "u_ptr": "adapter", "bias_ptr": "x", "y_ptr": "x",
                    "seed_ptr": "i32"}
LORA_MATMUL = register(KernelSpec(
    name="lora_matmul", fn=_lora_matmul_kernel, key=("N", "K", "layout", "M"), layouts=("w", "wT"),
    # On sm_90 the 16-bit launches take lora_matmul_tma; this kernel only when
    # the operands are not TMA-aligned (odd strides or offsets).
    picked=lambda dtype, cc: cc < 90 or dtype == "float32",
    space=matmul_space, prune=prune_matmul, default=default_matmul,
    constants={"BLOCK_R": MATMUL_BLOCK_R}, floats=frozenset({"scale"}),
    variants=(
        AotVariant("forward layout, bias on",
                   pointers=_MATMUL_POINTERS, flags={"HAS_BIAS": True, "HAS_DROPOUT": False, "EVEN_K": True},
                   ones=frozenset({"stride_xk", "stride_wk", "stride_tr", "stride_ur", "stride_yn"}),
                   plain=frozenset({"M", "R", "drop_threshold", "stride_tm", "stride_un"}), adapter_fp32=True),
        AotVariant("backward layout (dx), dropout on",
                   pointers=_MATMUL_POINTERS, flags={"HAS_BIAS": False, "HAS_DROPOUT": True, "EVEN_K": False},
                   ones=frozenset({"stride_xk", "stride_wn", "stride_tr", "stride_un", "stride_yn"}),
                   plain=frozenset({"M", "R", "drop_threshold", "stride_tm"})),
        AotVariant("backward layout (dx), dropout off",
                   pointers=_MATMUL_POINTERS, flags={"HAS_BIAS": False, "HAS_DROPOUT": False, "EVEN_K": True},
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
    return prune_shrink(shrink_space(dtype), dtype, cc, min(rank_block(dims["R"]), RANK_CHUNK))[0]


LORA_SHRINK = register(KernelSpec(
    name="lora_shrink", fn=_lora_shrink_kernel, key=("K", "R", "layout", "M"), layouts=("a",),
    space=shrink_space, prune=prune_shrink, default=default_shrink, rank_blocked=True, rank_cap=RANK_CHUNK,
    floats=frozenset({"scale"}),
    variants=(
        AotVariant("forward layout (t), dropout on",
                   pointers={"x_ptr": "x", "a_ptr": "adapter", "t_ptr": "fp32", "seed_ptr": "i32"},
                   flags={"HAS_DROPOUT": True}, ones=frozenset({"stride_xk", "stride_ak", "stride_tr"}),
                   plain=frozenset({"M", "R", "drop_threshold", "stride_tm"}), adapter_fp32=True),
        AotVariant("forward layout (t), dropout off, adapters in the compute dtype",
                   pointers={"x_ptr": "x", "a_ptr": "adapter", "t_ptr": "fp32", "seed_ptr": "i32"},
                   flags={"HAS_DROPOUT": False}, ones=frozenset({"stride_xk", "stride_ak", "stride_tr"}),
                   plain=frozenset({"M", "R", "drop_threshold", "stride_tm"})),
    )))


# ---------------------------------------------------------------- lora_matmul_tma
def tma_space(dtype: str) -> list[Config]:
    """The sm_90 persistent TMA GEMM (bf16/fp16 only: fp32 has no wgmma path
    at PyTorch's IEEE precision). Every entry compiles without spills for
    every variant (tests/test_aot_compile.py reads the SASS)."""
    if dtype == "float32":
        return []
    return table(("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"), [
        (128, 256, 64, 8, 8, 3),  # the widest tile that fits the registers with the epilogue (no stack)
        (128, 128, 64, 8, 8, 4),
        (64, 128, 64, 8, 4, 4),
        (64, 64, 128, 8, 4, 4),  # few tokens: more tiles over the SMs
    ])


def tma_smem(cfg: Config, dtype: str) -> int:
    """Pipelined x, w and (fused shrink) a tiles, plus the half-tile store buffer."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    return (cfg.num_stages * (bm + bn + MATMUL_BLOCK_R) * bk + bm * bn // 2) * itemsize(dtype)


def prune_tma(cfgs, dtype: str, cc: int, block_r=None) -> list[Config]:
    return [c for c in cfgs if cc is not None and cc >= 90 and tma_smem(c, dtype) <= smem_budget(cc)]


def default_tma(dtype: str, cc, dims: dict) -> Config:
    """By the output shape, as the portable kernel. ``cc=None`` (the
    interpreter, which runs this kernel only when a test asks for it): small
    tiles, so that small shapes cover several tiles, K steps and programs."""
    if cc is None:
        return Config.make(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=2)
    by_tile = {(c["BLOCK_M"], c["BLOCK_N"]): c for c in prune_tma(tma_space(dtype), dtype, cc)}
    M, N = dims["M"], dims["N"]
    if M >= 2048 and N >= 2048:
        return by_tile[(128, 256)]
    if M >= 256:
        return by_tile[(128, 128)]
    if M > 64:
        return by_tile[(64, 128)]
    return by_tile[(64, 64)]


_TMA_POINTERS = {"x_ptr": "x", "w_ptr": "x", "t_ptr": "fp32", "u_ptr": "adapter", "a_ptr": "x", "bias_ptr": "x",
                 "y_ptr": "x", "seed_ptr": "i32"}
_TMA_PLAIN = frozenset({"M", "R", "num_programs", "drop_threshold", "stride_tm", "stride_un", "stride_ur"})
LORA_MATMUL_TMA = register(KernelSpec(
    name="lora_matmul_tma", fn=_lora_matmul_tma_kernel, key=("N", "K", "layout", "M"), layouts=("w", "wT"),
    space=tma_space, prune=prune_tma, default=default_tma,
    constants={"BLOCK_R": MATMUL_BLOCK_R}, floats=frozenset({"scale"}),
    variants=(
        AotVariant("forward, shrink fused, bias on",
                   pointers=_TMA_POINTERS, flags={"W_NMAJOR": False, "FUSE_SHRINK": True, "HAS_BIAS": True,
                                                  "HAS_DROPOUT": False},
                   ones=frozenset({"stride_tr", "stride_ur"}), plain=_TMA_PLAIN, adapter_fp32=True),
        AotVariant("forward after a separate shrink, bias on",
                   pointers=_TMA_POINTERS, flags={"W_NMAJOR": False, "FUSE_SHRINK": False, "HAS_BIAS": True,
                                                  "HAS_DROPOUT": False},
                   ones=frozenset({"stride_tr", "stride_ur"}), plain=_TMA_PLAIN, adapter_fp32=True),
        AotVariant("backward dx, dropout on",
                   pointers=_TMA_POINTERS, flags={"W_NMAJOR": True, "FUSE_SHRINK": False, "HAS_BIAS": False,
                                                  "HAS_DROPOUT": True},
                   ones=frozenset({"stride_tr", "stride_un"}), plain=_TMA_PLAIN),
        AotVariant("backward dx, dropout off",
                   pointers=_TMA_POINTERS, flags={"W_NMAJOR": True, "FUSE_SHRINK": False, "HAS_BIAS": False,
                                                  "HAS_DROPOUT": False},
                   ones=frozenset({"stride_tr", "stride_un"}), plain=_TMA_PLAIN),
    )))


# ---------------------------------------------------------------- lora_dy
def dy_space(dtype: str) -> list[Config]:
    """One pass over dY for dt, dB, dbias: memory-bound. BLOCK_R comes from R."""
    names = ("BLOCK_M", "BLOCK_N")
    if dtype == "float32":
        return table(names, [(16, 32, 8, 2)])
    return table(names, [(64, 128, 8, 3), (32, 128, 8, 3), (32, 64, 4, 3), (16, 64, 4, 3)])


# The widest rank tile each tile shape holds without spilling on sm_90 (read
# from the SASS, dbias variant included: its column sum costs registers).
_DY_MAX_BLOCK_R = {(64, 128, 8): 16, (32, 128, 8): 32, (32, 64, 4): 64, (16, 64, 4): 64, (16, 32, 8): 64}


def dy_smem(cfg: Config, block_r: int, dtype: str) -> int:
    return cfg.num_stages * cfg["BLOCK_M"] * (cfg["BLOCK_N"] * itemsize(dtype) + 2 * block_r * 4)


def prune_dy(cfgs, dtype: str, cc: int, block_r: int) -> list[Config]:
    return [c for c in cfgs
            if block_r <= _DY_MAX_BLOCK_R.get((c["BLOCK_M"], c["BLOCK_N"], c.num_warps), 0)
            and dy_smem(c, block_r, dtype) <= smem_budget(cc)]


def default_dy(dtype: str, cc, dims: dict) -> Config:
    """The tallest row block the rank allows, shorter at mid-size M so that
    the splits (about one program per SM, each owning whole row blocks) cover
    the machine."""
    if cc is None:
        return Config.make(BLOCK_M=16, BLOCK_N=32, num_warps=2, num_stages=2)
    space = prune_dy(dy_space(dtype), dtype, cc, min(rank_block(dims["R"]), RANK_CHUNK))
    M = dims["M"]
    fits = [c for c in space if c["BLOCK_M"] <= (64 if M >= 8192 else 32 if M >= 2048 else 16)]
    return (fits or space)[0]


LORA_DY = register(KernelSpec(
    name="lora_dy", fn=_lora_dy_kernel, key=("N", "R", "M"),
    space=dy_space, prune=prune_dy, default=default_dy, rank_blocked=True, rank_cap=RANK_CHUNK,
    floats=frozenset({"scale"}),
    variants=tuple(
        AotVariant(f"dbias {'on' if dbias else 'off'}",
                   pointers={"dy_ptr": "x", "b_ptr": "adapter", "t_ptr": "fp32", "dt_ptr": "fp32", "db_ptr": "fp32",
                             "dbias_ptr": "fp32"},
                   flags={"HAS_DBIAS": dbias}, ones=frozenset({"stride_dyn", "stride_br", "stride_tr", "stride_dtr",
                                                               "stride_dbr"}),
                   plain=frozenset({"M", "R", "rows_per_split", "stride_bn", "stride_tm", "stride_dtm",
                                    "stride_dbn", "stride_dbs"}), adapter_fp32=dbias)
        for dbias in (True, False))))


# ---------------------------------------------------------------- lora_x
def x_space(dtype: str) -> list[Config]:
    """One pass over x for dA (no split over M), plus the dB/dbias slab sums."""
    names = ("BLOCK_M", "BLOCK_K", "BLOCK_N")
    if dtype == "float32":
        return table(names, [(32, 32, 32, 4, 2)])
    return table(names, [(128, 32, 64, 4, 3), (64, 64, 64, 4, 3),
                         (32, 32, 32, 4, 2)])  # large ranks


def x_smem(cfg: Config, block_r: int, dtype: str) -> int:
    return cfg.num_stages * cfg["BLOCK_M"] * (cfg["BLOCK_K"] * itemsize(dtype) + block_r * 4)


def prune_x(cfgs, dtype: str, cc: int, block_r: int) -> list[Config]:
    return [c for c in cfgs
            if min(c["BLOCK_M"], c["BLOCK_K"], c["BLOCK_N"]) >= 16 and c["BLOCK_K"] * block_r <= 16384
            and c["BLOCK_N"] * block_r <= 16384 and x_smem(c, block_r, dtype) <= smem_budget(cc)]


def default_x(dtype: str, cc, dims: dict) -> Config:
    """Column blocks narrow enough that cdiv(K, BLOCK_K) programs cover the
    machine (each reads every row of its columns)."""
    if cc is None:
        return Config.make(BLOCK_M=16, BLOCK_K=16, BLOCK_N=16, num_warps=2, num_stages=2)
    space = prune_x(x_space(dtype), dtype, cc, min(rank_block(dims["R"]), RANK_CHUNK))
    if dtype == "float32":
        return space[0]
    by_k = {}
    for c in space:
        by_k.setdefault(c["BLOCK_K"], c)
    return by_k[64] if dims["K"] >= 8192 and 64 in by_k else space[0]


LORA_X = register(KernelSpec(
    name="lora_x", fn=_lora_x_kernel, key=("K", "R", "M"),
    space=x_space, prune=prune_x, default=default_x, rank_blocked=True, rank_cap=RANK_CHUNK,
    floats=frozenset({"scale"}),
    variants=tuple(
        AotVariant(f"dropout and dbias {'on' if on else 'off'}",
                   pointers={"x_ptr": "x", "dt_ptr": "fp32", "da_ptr": "adapter", "seed_ptr": "i32",
                             "db_part_ptr": "fp32", "db_ptr": "adapter", "dbias_part_ptr": "fp32", "dbias_ptr": "fp32"},
                   flags={"HAS_DROPOUT": on, "HAS_DBIAS": on}, adapter_fp32=on,
                   ones=frozenset({"stride_xk", "stride_dtr", "stride_dak", "stride_dbr"}),
                   plain=frozenset({"M", "R", "N", "SPLIT", "k_programs", "drop_threshold", "stride_dtm",
                                    "stride_dar", "stride_dbn", "stride_dbs", "stride_dbias_s"}))
        for on in (True, False))))
