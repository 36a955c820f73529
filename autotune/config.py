"""What a kernel launch is configured with, and the limits every space obeys.

A ``Config`` is the set of meta-parameters a launcher passes to a kernel
(block sizes, ``num_warps``, ``num_stages``). The spaces, prune rules and
default picks of each kernel live in its feature's spec module
(``autotune/lora.py``, ``multi_lora.py``, ``moe.py``), registered in
``autotune/registry.py``.
"""
from __future__ import annotations

import dataclasses
import json
import os

# Shared memory a block may use (bytes), by compute capability major.minor.
SMEM_BYTES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
DTYPES = ("float16", "bfloat16", "float32")
# Rank tiles of the kernels whose rank lives in one tile (shrink, grad): R
# padded to a power of two >= 16, the tl.dot minimum. The largest one is the
# rank cap of the whole package.
RANK_BLOCKS = (16, 32, 64, 128, 256)
MAX_RANK = RANK_BLOCKS[-1]
# Adapters and the low-rank activations may be fp32 whatever the compute
# dtype: shared-memory estimates count their tiles at 4 bytes.
ADAPTER_BYTES = 4


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
        return self.launch_kwargs()

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        d = dict(d)
        return cls.make(num_warps=int(d.pop("num_warps")), num_stages=int(d.pop("num_stages")),
                        **{k: int(v) for k, v in d.items()})

    def __str__(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def pin_variable(kernel: str) -> str:
    return f"POSTTRAIN_KERNELS_CONFIG_{kernel.upper()}"


def pinned(kernel: str) -> Config | None:
    """The config pinned by ``POSTTRAIN_KERNELS_CONFIG_<KERNEL>`` (a JSON
    object of meta-parameters with num_warps and num_stages), or None."""
    text = os.environ.get(pin_variable(kernel))
    if not text:
        return None
    try:
        return Config.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{pin_variable(kernel)}: not a config ({e}): {text!r}") from None


def itemsize(dtype_name: str) -> int:
    return {"float16": 2, "bfloat16": 2, "float32": 4}[dtype_name]


def smem_budget(cc: int) -> int:
    return SMEM_BYTES.get(cc, SMEM_BYTES[80])


def rank_block(r: int) -> int:
    """BLOCK_R of the kernels that hold the whole rank in one tile: R padded
    to a power of two >= 16 (``tl.dot`` needs every block dim >= 16)."""
    if not 1 <= r <= MAX_RANK:
        raise ValueError(f"rank must be in [1, {MAX_RANK}], got {r}")
    return max(16, 1 << (r - 1).bit_length())


def table(names: tuple, rows: list) -> list[Config]:
    """Configs from rows of (meta values..., num_warps, num_stages)."""
    return [Config.make(num_warps=r[-2], num_stages=r[-1], **dict(zip(names, r[:-2]))) for r in rows]
