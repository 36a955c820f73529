"""Small helpers shared by every feature: argument checks, the LoRA scale,
the rank cap, and the base of the layers that wrap a frozen ``nn.Linear``."""
from __future__ import annotations

import math
import os

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


CHECKS_VAR = "POSTTRAIN_KERNELS_CHECKS"


def values_checked(t: torch.Tensor) -> bool:
    """Whether the values of ``t`` (indices, ranks, rates) are checked before
    any kernel runs. Always for CPU tensors. For device tensors the check
    costs one device-to-host sync per op call: done by default, skipped while
    a CUDA graph is being captured, while torch.compile traces (fake tensors)
    and with ``POSTTRAIN_KERNELS_CHECKS=off``; then the kernels' own masking
    keeps every access inside the tensors (an out-of-range index reads as
    empty). docs/reliability.md has the whole policy."""
    if t.device.type == "meta" or torch.compiler.is_compiling() or _is_fake(t):
        return False
    if t.device.type == "cpu":
        return True
    if os.environ.get(CHECKS_VAR, "on").lower() in ("off", "0", "false", "no"):
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(t, FakeTensor)


def check_values(*specs) -> None:
    """Raise ``ValueError`` naming the argument unless every value of each
    tensor lies in its closed range and is not NaN. ``specs``: (tensor, low,
    high, name, what) tuples; one host sync for all of them (on failure a
    second one, for the message)."""
    specs = [sp for sp in specs if sp[0] is not None and sp[0].numel() and values_checked(sp[0])]
    if not specs:
        return
    flags = torch.stack([((t < lo) | (t > hi) | (t != t)).any() for t, lo, hi, _, _ in specs]).tolist()
    for bad, (t, lo, hi, name, what) in zip(flags, specs):
        if bad:
            found = "NaN" if bool(torch.isnan(t).any()) else f"values in [{t.min().item()}, {t.max().item()}]"
            raise ValueError(f"{name}: {what} must be in [{lo}, {hi}], got {found}")


def is_number(v) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


FP32_MAX = 3.4028234663852886e38


def is_fp32_number(v) -> bool:
    """A finite int or float that stays finite in fp32 (scales and alphas are kept in fp32)."""
    return is_number(v) and abs(v) <= FP32_MAX


def check_rate(value, name: str) -> None:
    """A LoRA dropout rate: a number in [0, 1)."""
    check(is_number(value) and 0.0 <= value < 1.0, name, f"expected a dropout rate in [0, 1), got {value!r}")


def lora_scale(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's scaling of the low-rank term: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def lora_alpha_of(scale: float, r: int, use_rslora: bool = False) -> float:
    """The ``lora_alpha`` that gives ``scale`` at rank r (the inverse of ``lora_scale``)."""
    return scale * (math.sqrt(r) if use_rslora else r)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes linear layers in on ``device``, or None when autocast is off there."""
    if device.type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def linear_autocast(x, weight, bias):
    """``(x, weight, bias, context)`` as ``nn.Linear`` sees them under autocast:
    floating inputs cast to the autocast dtype (the output then has that
    dtype), and a context that turns autocast off for the op's own internals
    (the reference's fp32 matmuls must stay fp32). Outside autocast: the
    arguments unchanged and None for the context (nothing to enter)."""
    dtype = autocast_dtype(x.device) if isinstance(x, torch.Tensor) else None
    if dtype is None or x.dtype not in FLOAT_DTYPES:
        return x, weight, bias, None
    cast = lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES else t  # noqa: E731
    return cast(x), cast(weight), cast(bias), torch.autocast(x.device.type, enabled=False)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's projections): a linear layer whose
    weight is stored ``[in, out]`` (PEFT's ``fan_in_fan_out``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D``: what LoRA can wrap."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_out_in(linear: nn.Module) -> torch.Tensor:
    """The weight of an ``nn.Linear`` or a ``Conv1D`` as ``[out, in]`` (a view for Conv1D)."""
    return linear.weight.t() if is_conv1d(linear) else linear.weight


def all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    """A contiguous copy of ``t`` summed over the ranks of ``group`` (``t`` itself untouched)."""
    import torch.distributed as dist
    t = t.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(t, group=group)
    return t


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` of ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


class FrozenLinearWrapper(nn.Module):
    """Base of the layers that wrap a linear layer (``nn.Linear``, or
    transformers' ``Conv1D`` whose weight is ``[in, out]``) whose weight and
    bias stay frozen (``LoRALinear``, ``MultiLoRALinear``). A subclass
    defines ``_setup(linear, *args, **kwargs)``; ``from_linear`` reuses the
    given layer's Parameters (no copy), the constructor makes a fresh one.
    ``weight_nk`` is the weight as ``[out, in]`` whatever its storage."""

    @classmethod
    def from_linear(cls, linear: nn.Module, *args, **kwargs):
        """Wrap ``linear``: its weight and bias Parameters are reused (no copy) and frozen."""
        if not (is_linear(linear) or getattr(cls, "quantized", False)):  # quantized bases: the layer's _adopt checks
            raise ValueError(f"linear: expected an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear, *args, **kwargs)
        return self

    def _adopt(self, linear: nn.Module) -> None:
        """Take ``linear``'s weight and bias as this layer's frozen Parameters
        (a Conv1D's ``[in, out]`` weight is kept as it is: state-dict keys and
        shapes stay the model's own)."""
        self.fan_in_fan_out = is_conv1d(linear)
        self.out_features, self.in_features = weight_out_in(linear).shape
        linear.weight.requires_grad_(False)
        self.register_parameter("weight", linear.weight)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        self.register_parameter("bias", linear.bias)

    @property
    def weight_nk(self) -> torch.Tensor:
        """The base weight as ``[out_features, in_features]`` (a view for Conv1D)."""
        return self.weight.t() if self.fan_in_fan_out else self.weight

    @property
    def base_device(self) -> torch.device:
        return self.weight.device

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype the base layer computes in."""
        return self.weight.dtype

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer alone (merged or disabled adapters)."""
        return nn.functional.linear(x, self.weight_nk, self.bias)

    def base_linear(self) -> nn.Module:
        """A plain layer of the original kind (``nn.Linear`` or ``Conv1D``)
        sharing this layer's weight and bias."""
        if self.fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D
            layer = Conv1D(self.out_features, self.in_features)
        else:
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        layer.weight = self.weight
        layer.bias = self.bias
        return layer
