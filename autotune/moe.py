"""Specs of the MoE token-movement kernels (``kernels/moe.py``): row copies
and fp32 segment sums, memory-bound, no ``tl.dot`` and little shared memory,
so every config fits every target."""
from __future__ import annotations

from ..kernels.moe import _moe_gather_kernel, _moe_segment_sum_kernel
from .config import Config, table
from .registry import AotVariant, KernelSpec, register


def gather_space(dtype: str) -> list[Config]:
    """out[s] = scale·src[idx[s]]: BLOCK_S slots a program."""
    return table(("BLOCK_S", "BLOCK_D"), [(4, 512, 4, 2), (2, 1024, 4, 2), (8, 256, 4, 2)])


def default_gather(dtype: str, cc, dims: dict) -> Config:
    if cc is None:  # interpreter: a short D block, so the D loop runs several steps
        return Config.make(BLOCK_S=2, BLOCK_D=64, num_warps=2, num_stages=1)
    return gather_space(dtype)[0]


_GATHER_PTRS = {"src_ptr": "x", "idx_ptr": "i64", "scale_ptr": "fp32", "other_ptr": "x", "out_ptr": "x",
                "dot_ptr": "fp32"}

MOE_GATHER = register(KernelSpec(
    name="moe_gather", fn=_moe_gather_kernel, key=("D",), space=gather_space, default=default_gather,
    variants=(
        AotVariant("dispatch forward (plain gather)", pointers=_GATHER_PTRS,
                   flags={"HAS_SCALE": False, "HAS_DOT": False}, plain=frozenset({"n", "S"})),
        AotVariant("combine backward (gates as scale, per-slot dot)", pointers=_GATHER_PTRS,
                   flags={"HAS_SCALE": True, "HAS_DOT": True}, plain=frozenset({"n", "S"})),
    )))


def segment_sum_space(dtype: str) -> list[Config]:
    """out[t] = Σ gate·src[slot]: one token × BLOCK_D columns a program."""
    return table(("BLOCK_D",), [(1024, 4, 1), (512, 4, 1), (2048, 8, 1)])


def default_segment_sum(dtype: str, cc, dims: dict) -> Config:
    if cc is None:
        return Config.make(BLOCK_D=64, num_warps=2, num_stages=1)
    space = segment_sum_space(dtype)
    return space[0] if dims["D"] >= 1024 else space[1]


_SEGMENT_PTRS = {"src_ptr": "x", "order_ptr": "i64", "offsets_ptr": "i64", "gate_ptr": "fp32", "out_ptr": "x"}

MOE_SEGMENT_SUM = register(KernelSpec(
    name="moe_segment_sum", fn=_moe_segment_sum_kernel, key=("D",), space=segment_sum_space,
    default=default_segment_sum,
    variants=(
        AotVariant("combine forward (gated)", pointers=_SEGMENT_PTRS, flags={"HAS_GATES": True},
                   plain=frozenset({"n"})),
        AotVariant("dispatch backward (plain sum)", pointers=_SEGMENT_PTRS, flags={"HAS_GATES": False},
                   plain=frozenset({"n"})),
    )))
