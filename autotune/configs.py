"""Config spaces: one generator and one prune rule per kernel.

A ``Config`` is the set of meta-parameters a launcher passes to a kernel
(block sizes, ``num_warps``, ``num_stages``). Each kernel has:

* a space (every config the tuner may pick),
* a prune rule (``tl.dot`` dims ≥ 16, the shared-memory budget of the target),
* a default rule, used when no tuned entry exists.

The ahead-of-time compile tests compile every pruned config of every kernel
for sm_80 and sm_90 in each dtype, so the spaces are kept small on purpose.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from typing import Iterable

# Shared memory a block may use (bytes), by compute capability major.minor.
SMEM_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclasses.dataclass(frozen=True)
class Config:
    """Meta-parameters of one kernel launch."""

    meta: tuple  # sorted ((name, value), ...) of the kernel's constexpr blocks
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def make(cls, num_warps: int = 4, num_stages: int = 3, **meta) -> "Config":
        return cls(tuple(sorted(meta.items())), num_warps, num_stages)

    @property
    def kwargs(self) -> dict:
        return dict(self.meta)

    def __getitem__(self, name):
        for k, v in self.meta:
            if k == name:
                return v
        raise KeyError(name)

    def launch_kwargs(self) -> dict:
        return {**self.kwargs, "num_warps": self.num_warps, "num_stages": self.num_stages}

    def to_dict(self) -> dict:
        return {**self.kwargs, "num_warps": self.num_warps, "num_stages": self.num_stages}

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = dict(d)
        return cls.make(num_warps=int(d.pop("num_warps")), num_stages=int(d.pop("num_stages")),
                        **{k: int(v) for k, v in d.items()})

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def pinned(kernel: str) -> Config | None:
    """The config pinned by ``POSTTRAIN_KERNELS_CONFIG_<KERNEL>`` (a JSON
    object of meta-parameters with num_warps and num_stages), or None."""
    text = os.environ.get(f"POSTTRAIN_KERNELS_CONFIG_{kernel.upper()}")
    if not text:
        return None
    try:
        return Config.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"POSTTRAIN_KERNELS_CONFIG_{kernel.upper()}: not a config ({e}): {text!r}") from None


def _itemsize(dtype_name: str) -> int:
    return {"float16": 2, "bfloat16": 2, "float32": 4}[dtype_name]


def rank_block(r: int) -> int:
    """BLOCK_R for the shrink and grad kernels: R padded to a power of two ≥ 16
    (``tl.dot`` needs every block dim ≥ 16)."""
    if not 1 <= r <= 256:
        raise ValueError(f"rank must be in [1, 256], got {r}")
    return max(16, 1 << (r - 1).bit_length())


# Adapters and the low-rank activations may be fp32 whatever the compute
# dtype: shared-memory estimates count their tiles at 4 bytes.
_ADAPTER_BYTES = 4


def _space(rows, names) -> list[Config]:
    return [Config.make(num_warps=r[-2], num_stages=r[-1], **dict(zip(names, r[:-2]))) for r in rows]


# ---------------------------------------------------------------- lora_matmul
def lora_matmul_space(dtype_name: str) -> list[Config]:
    """Y = X·Wᵀ + s·T·Uᵀ: the big GEMM, forward y and backward dx.

    fp32 runs IEEE FMA products (no tensor cores): one moderate tile, not
    tuned. The low-rank loop is not software-pipelined (``num_stages=1`` in
    the kernel), so only the main loop's tiles count against shared memory.
    """
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
    if dtype_name == "float32":
        return _space([(64, 64, 32, 8, 4, 3)], names)
    return _space([
        (128, 256, 64, 16, 8, 3),  # measured best on H100 for fwd and dx (docs/benchmarks.md)
        (128, 128, 64, 8, 8, 4),
        (128, 128, 64, 8, 4, 4),
        (128, 64, 64, 8, 4, 4),
        (64, 128, 64, 8, 4, 4),
        (64, 64, 64, 8, 4, 3),
        (32, 64, 128, 8, 4, 4),  # few tokens (decode): twice the programs of 64×64 on a memory-bound GEMM
    ], names)


def lora_matmul_smem(cfg: Config, dtype_name: str) -> int:
    """Pipelined operand tiles: stages × (BM·BK + BK·BN) elements."""
    return cfg.num_stages * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * _itemsize(dtype_name)


def prune_lora_matmul(cfgs: Iterable[Config], dtype_name: str, cc: int) -> list[Config]:
    budget = SMEM_BYTES.get(cc, SMEM_BYTES[80])
    return [c for c in cfgs
            if min(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) >= 16
            and lora_matmul_smem(c, dtype_name) <= budget]


@functools.lru_cache(maxsize=4096)
def default_lora_matmul(M: int, N: int, K: int, dtype_name: str, cc: int | None) -> Config:
    """Heuristic pick. ``cc=None`` is the interpreter: small tiles, so that
    the small shapes of the tests still cover several tiles and K steps."""
    if cc is None:
        return Config.make(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=2, num_stages=2)
    space = prune_lora_matmul(lora_matmul_space(dtype_name), dtype_name, cc)
    if dtype_name == "float32":
        return space[0]
    by_tile = {(c["BLOCK_M"], c["BLOCK_N"]): c for c in space}
    if M >= 2048 and N >= 2048 and (128, 256) in by_tile:
        return by_tile[(128, 256)]
    if M >= 256:
        return by_tile[(128, 128)]
    if M <= 64 and (32, 64) in by_tile:
        return by_tile[(32, 64)]  # not yet timed on a GPU: chosen for programs ≈ SMs at N = 4096
    return by_tile[(64, 64)]


# ---------------------------------------------------------------- lora_shrink
def lora_shrink_space(dtype_name: str) -> list[Config]:
    """t = s·drop(X)·Aᵀ: memory-bound, one pass over X. BLOCK_R comes from R."""
    names = ("BLOCK_M", "BLOCK_K")
    if dtype_name == "float32":
        return _space([(32, 32, 4, 2)], names)
    return _space([(16, 128, 4, 4), (16, 64, 4, 2)], names)


def lora_shrink_smem(cfg: Config, block_r: int, dtype_name: str) -> int:
    return cfg.num_stages * cfg["BLOCK_K"] * (cfg["BLOCK_M"] * _itemsize(dtype_name) + block_r * _ADAPTER_BYTES)


def prune_lora_shrink(cfgs: Iterable[Config], block_r: int, dtype_name: str, cc: int) -> list[Config]:
    budget = SMEM_BYTES.get(cc, SMEM_BYTES[80])
    # The fp32 accumulator is BLOCK_M × BLOCK_R: cap it at 64 KiB so it stays
    # in registers.
    return [c for c in cfgs
            if c["BLOCK_M"] >= 16 and c["BLOCK_K"] >= 16
            and c["BLOCK_M"] * block_r <= 16384
            and lora_shrink_smem(c, block_r, dtype_name) <= budget]


@functools.lru_cache(maxsize=4096)
def default_lora_shrink(M: int, K: int, block_r: int, dtype_name: str, cc: int | None) -> Config:
    if cc is None:
        return Config.make(BLOCK_M=16, BLOCK_K=64, num_warps=2, num_stages=2)
    space = prune_lora_shrink(lora_shrink_space(dtype_name), block_r, dtype_name, cc)
    # Thin row blocks with long K steps: many programs, each streaming its
    # rows once (measured fastest at M=8192, K=4096, r=16 on H100).
    return space[0]


# ---------------------------------------------------------------- lora_grad
def lora_grad_space(dtype_name: str) -> list[Config]:
    """O = s·drop(G)ᵀ·T split over M: memory-bound. BLOCK_R comes from R."""
    names = ("BLOCK_M", "BLOCK_P")
    if dtype_name == "float32":
        return _space([(32, 32, 4, 2)], names)
    return _space([(64, 128, 4, 3), (32, 64, 4, 2)], names)


def lora_grad_smem(cfg: Config, block_r: int, dtype_name: str) -> int:
    return cfg.num_stages * cfg["BLOCK_M"] * (cfg["BLOCK_P"] * _itemsize(dtype_name) + block_r * _ADAPTER_BYTES)


def prune_lora_grad(cfgs: Iterable[Config], block_r: int, dtype_name: str, cc: int) -> list[Config]:
    budget = SMEM_BYTES.get(cc, SMEM_BYTES[80])
    return [c for c in cfgs
            if c["BLOCK_M"] >= 16 and c["BLOCK_P"] >= 16
            and c["BLOCK_P"] * block_r <= 16384
            and lora_grad_smem(c, block_r, dtype_name) <= budget]


@functools.lru_cache(maxsize=4096)
def default_lora_grad(M: int, P: int, block_r: int, dtype_name: str, cc: int | None) -> Config:
    if cc is None:
        return Config.make(BLOCK_M=32, BLOCK_P=32, num_warps=2, num_stages=2)
    space = prune_lora_grad(lora_grad_space(dtype_name), block_r, dtype_name, cc)
    return space[0]


# ---------------------------------------------------------------- moe
def moe_gather_space() -> list[Config]:
    """out[s] = scale·src[idx[s]]: memory-bound row copies, BLOCK_S slots a program."""
    return _space([(4, 512, 4, 2), (2, 1024, 4, 2), (8, 256, 4, 2)], ("BLOCK_S", "BLOCK_D"))


def moe_segment_sum_space() -> list[Config]:
    """out[t] = Σ gate·src[slot]: one token × BLOCK_D columns a program."""
    return _space([(1024, 4, 1), (512, 4, 1), (2048, 8, 1)], ("BLOCK_D",))


@functools.lru_cache(maxsize=256)
def default_moe_gather(D: int, on_gpu: bool) -> Config:
    if not on_gpu:  # interpreter: a short D block, so the D loop runs several steps
        return Config.make(BLOCK_S=2, BLOCK_D=64, num_warps=2, num_stages=1)
    return moe_gather_space()[0]


@functools.lru_cache(maxsize=256)
def default_moe_segment_sum(D: int, on_gpu: bool) -> Config:
    if not on_gpu:
        return Config.make(BLOCK_D=64, num_warps=2, num_stages=1)
    return moe_segment_sum_space()[0] if D >= 1024 else moe_segment_sum_space()[1]


# ---------------------------------------------------------------- multi-adapter LoRA
def mlora_shrink_space(dtype_name: str) -> list[Config]:
    """t[j, :r_a] = A_a·x[perm[j]] per adapter run: memory-bound. (The fused
    matmul of multi-LoRA uses the lora_matmul space.)"""
    if dtype_name == "float32":
        return _space([(32, 32, 4, 2)], ("BLOCK_M", "BLOCK_K"))
    return _space([(16, 128, 4, 3), (64, 64, 4, 3)], ("BLOCK_M", "BLOCK_K"))


@functools.lru_cache(maxsize=4096)
def default_mlora_shrink(M: int, dtype_name: str, cc: int | None) -> Config:
    if cc is None:
        return Config.make(BLOCK_M=16, BLOCK_K=32, num_warps=2, num_stages=1)
    return mlora_shrink_space(dtype_name)[0]


def mlora_grad_space(dtype_name: str) -> list[Config]:
    """dA / dB of multi-LoRA: one [BLOCK_R, BLOCK_D] tile of one adapter's
    gradient per program, summed over its rows in BLOCK_M steps. Ranks above
    64 take several rank blocks (a grid dimension)."""
    names = ("BLOCK_M", "BLOCK_D", "BLOCK_R")
    if dtype_name == "float32":
        return _space([(32, 32, 16, 4, 2), (32, 32, 32, 4, 2), (32, 64, 64, 4, 2)], names)
    return _space([(64, 64, 16, 4, 3), (64, 64, 32, 4, 3), (64, 64, 64, 4, 3), (32, 128, 64, 8, 3)], names)


def mlora_grad_smem(cfg: Config, dtype_name: str) -> int:
    return cfg.num_stages * cfg["BLOCK_M"] * (cfg["BLOCK_D"] * _itemsize(dtype_name) + cfg["BLOCK_R"] * _ADAPTER_BYTES)


def prune_mlora_grad(cfgs: Iterable[Config], dtype_name: str, cc: int) -> list[Config]:
    budget = SMEM_BYTES.get(cc, SMEM_BYTES[80])
    return [c for c in cfgs if min(c["BLOCK_M"], c["BLOCK_D"], c["BLOCK_R"]) >= 16
            and mlora_grad_smem(c, dtype_name) <= budget]


@functools.lru_cache(maxsize=4096)
def default_mlora_grad(R: int, dtype_name: str, cc: int | None) -> Config:
    """The first config whose rank block covers R (up to 64)."""
    if cc is None:
        return Config.make(BLOCK_M=16, BLOCK_D=32, BLOCK_R=16, num_warps=2, num_stages=1)
    block_r = min(64, rank_block(R))
    return next(c for c in prune_mlora_grad(mlora_grad_space(dtype_name), dtype_name, cc) if c["BLOCK_R"] == block_r)


RANK_BLOCKS = (16, 32, 64, 128, 256)
DTYPES = ("float16", "bfloat16", "float32")


def all_spaces(cc: int) -> dict[str, list[tuple]]:
    """Every (config, dtype, BLOCK_R) the launchers may use on this target."""
    spaces = {
        "lora_matmul": [(c, d, None) for d in DTYPES
                        for c in prune_lora_matmul(lora_matmul_space(d), d, cc)],
        "lora_shrink": [(c, d, br) for d, br in itertools.product(DTYPES, RANK_BLOCKS)
                        for c in prune_lora_shrink(lora_shrink_space(d), br, d, cc)],
        "lora_grad": [(c, d, br) for d, br in itertools.product(DTYPES, RANK_BLOCKS)
                      for c in prune_lora_grad(lora_grad_space(d), br, d, cc)],
        # Row copies: no dot, little shared memory; every config fits every target.
        "mlora_shrink": [(c, d, None) for d in DTYPES for c in mlora_shrink_space(d)],
        "mlora_matmul": [(c, d, None) for d in DTYPES
                         for c in prune_lora_matmul(lora_matmul_space(d), d, cc)],
        "mlora_grad": [(c, d, None) for d in DTYPES for c in prune_mlora_grad(mlora_grad_space(d), d, cc)],
        "moe_gather": [(c, d, None) for d in DTYPES for c in moe_gather_space()],
        "moe_segment_sum": [(c, d, None) for d in DTYPES for c in moe_segment_sum_space()],
    }
    return spaces
