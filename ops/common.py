"""Small helpers shared by every feature: argument checks, the LoRA scale,
the rank cap, and the base of the layers that wrap a frozen ``nn.Linear``."""
from __future__ import annotations

import math

import torch
from torch import nn

from ..autotune.config import MAX_RANK  # noqa: F401  (the kernels' rank cap, re-exported for the layers)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the dtype's name in config keys."""
    return str(dtype).removeprefix("torch.")


def check(cond: bool, name: str, msg: str) -> None:
    """Raise ``ValueError("name: msg")`` unless ``cond``: argument checks name the argument."""
    if not cond:
        raise ValueError(f"{name}: {msg}")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def lora_scale(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's scaling of the low-rank term: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def lora_alpha_of(scale: float, r: int, use_rslora: bool = False) -> float:
    """The ``lora_alpha`` that gives ``scale`` at rank r (the inverse of ``lora_scale``)."""
    return scale * (math.sqrt(r) if use_rslora else r)


class FrozenLinearWrapper(nn.Module):
    """Base of the layers that wrap an ``nn.Linear`` whose weight and bias
    stay frozen (``LoRALinear``, ``MultiLoRALinear``). A subclass defines
    ``_setup(linear, *args, **kwargs)``; ``from_linear`` reuses the given
    layer's Parameters (no copy), the constructor makes a fresh one."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, *args, **kwargs):
        """Wrap ``linear``: its weight and bias Parameters are reused (no copy) and frozen."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear, *args, **kwargs)
        return self

    def _adopt(self, linear: nn.Linear) -> None:
        """Take ``linear``'s weight and bias as this layer's frozen Parameters."""
        self.out_features, self.in_features = linear.weight.shape
        linear.weight.requires_grad_(False)
        self.register_parameter("weight", linear.weight)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        self.register_parameter("bias", linear.bias)
