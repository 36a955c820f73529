"""Small helpers shared by the launchers and functionals."""
from __future__ import annotations

import torch


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the dtype's name in config keys."""
    return str(dtype).removeprefix("torch.")


def check(cond: bool, name: str, msg: str) -> None:
    """Raise ``ValueError("name: msg")`` unless ``cond``: argument checks name the argument."""
    if not cond:
        raise ValueError(f"{name}: {msg}")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
