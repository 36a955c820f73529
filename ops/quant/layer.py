"""Linear layers over a quantized frozen weight, and what the LoRA layers need to wrap them.

* ``QuantLinear``: our own 4-bit linear layer (bitsandbytes' storage, no bitsandbytes needed):
  ``QuantLinear.from_linear(linear)``, or ``quantize_model(model)`` for every linear layer.
* ``is_quantized_linear(m)``: a ``QuantLinear`` or bitsandbytes' ``Linear4bit`` (QLoRA's base).
* ``quantized_weight(m)``: its weight as an ``NF4Weight`` over the same storage (no copy),
  memoised per storage: the layers call it every forward.
* ``QuantizedBase``: the part of ``LoRALinear`` / ``MultiLoRALinear`` that differs over such a
  base (``ops/lora/layer.py: QLoRALinear``, ``ops/multi_lora/layer.py``): the base layer is kept
  as ``base_layer`` (its own state-dict entries, bitsandbytes' quant state included), the forward
  computes in the base's compute dtype, and merging in place is refused (the sum is not 4-bit;
  ``QLoRALinear.merged_linear()`` gives a dense merged copy).

No Triton here: the forward calls the functional API.
"""
from __future__ import annotations

import re
import weakref
from typing import Iterable, Optional

import torch
from torch import nn

from ..common import FLOAT_DTYPES, check, set_submodule
from .function import quant_linear
from .nf4 import BLOCKSIZES, LEVELS, NestedStats, NF4Weight, check_nf4, from_bnb, quantize_nf4

_BNB_4BIT = ("Linear4bit", "LinearNF4", "LinearFP4")


class QuantLinear(nn.Module):
    """A frozen linear layer over a 4-bit weight in bitsandbytes' layout (``NF4Weight``), for models
    without bitsandbytes. Buffers (saved in the state dict): ``packed`` (uint8 codes), ``absmax``,
    ``code`` and, with double-quantised scales, ``absmax2`` / ``code2``; ``bias`` a frozen Parameter.
    ``forward(x)`` = ``x·Wᵀ + bias`` with W decoded to its dtype, then to x's, as ``Linear4bit``."""

    def __init__(self, weight: NF4Weight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        check_nf4(weight)
        self.out_features, self.in_features = weight.shape
        self.blocksize, self.quant_type, self.dtype = weight.blocksize, weight.quant_type, weight.dtype
        self.register_buffer("packed", weight.packed)
        self.register_buffer("absmax", weight.absmax)
        self.register_buffer("code", weight.code)
        s = weight.nested
        self.nested = None if s is None else (s.blocksize2, s.offset)
        if s is not None:
            self.register_buffer("absmax2", s.absmax2)
            self.register_buffer("code2", s.code2)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, quant_type: str = "nf4") -> "QuantLinear":
        """``linear``'s weight quantized (``quantize_nf4``: bitsandbytes' codes bit for bit), its bias kept."""
        check(type(linear) is nn.Linear, "linear", f"expected an nn.Linear, got {type(linear).__name__}")
        return cls(quantize_nf4(linear.weight, blocksize, quant_type), linear.bias)

    def quantized_weight(self) -> NF4Weight:
        """The weight over this layer's buffers (no copy)."""
        nested = None if self.nested is None else NestedStats(self.absmax2, self.code2, *self.nested)
        return NF4Weight(self.packed, self.absmax, (self.out_features, self.in_features), self.blocksize,
                         self.quant_type, self.code, self.dtype, nested)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.quant_type} blocksize={self.blocksize}, dtype={str(self.dtype).removeprefix('torch.')}")


def quantize_model(model: nn.Module, blocksize: int = 64, quant_type: str = "nf4",
                   skip: Iterable[str] = ("lm_head",)) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (but those whose name matches one of ``skip``, a
    name or its last component, or a full-match regex) by a ``QuantLinear`` of its weight. Returns
    the replaced names. The 4-bit codes equal bitsandbytes' for the same weights."""
    check(blocksize in BLOCKSIZES, "blocksize", f"expected one of {BLOCKSIZES}, got {blocksize!r}")
    check(quant_type in LEVELS, "quant_type", f"expected 'nf4' or 'fp4', got {quant_type!r}")
    skip = list(skip)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n
             and not any(n == s or n.endswith("." + s) or re.fullmatch(s, n) for s in skip)]
    for n in names:
        set_submodule(model, n, QuantLinear.from_linear(model.get_submodule(n), blocksize, quant_type))
    return names


def is_quantized_linear(module: nn.Module) -> bool:
    """A linear layer whose weight is stored quantized: ``QuantLinear``, or bitsandbytes'
    ``Linear4bit`` once quantized (its weight carries a quant state)."""
    if isinstance(module, QuantLinear):
        return True
    return type(module).__name__ in _BNB_4BIT and getattr(module.weight, "quant_state", None) is not None


# bitsandbytes weights seen before: id(Params4bit) -> (weak reference, storage key, NF4Weight), checked
# once per storage. An entry goes with its parameter (a finalizer), so its views keep no storage alive.
_BNB_SEEN: dict = {}


def quantized_weight(module: nn.Module) -> NF4Weight:
    """The layer's weight as an ``NF4Weight`` over its own storage. For bitsandbytes' layer, the
    first call for a storage checks it (shapes, dtypes, finite scales); later calls only build the
    view (a forward pays no device sync)."""
    if isinstance(module, QuantLinear):
        return module.quantized_weight()
    param = module.weight
    st = param.quant_state
    key = (param.data_ptr(), id(st), st.absmax.data_ptr(), st.absmax._version,
           getattr(st, "packing_format_for_cpu", False))
    seen = _BNB_SEEN.get(id(param))
    if seen is not None and seen[0]() is param and seen[1] == key:
        return seen[2]
    w = from_bnb(module)
    if seen is None:
        weakref.finalize(param, _BNB_SEEN.pop, id(param), None)
    _BNB_SEEN[id(param)] = (weakref.ref(param), key, w)
    return w


def compute_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype a quantized layer computes in: bitsandbytes' ``compute_dtype`` when set (the input
    is cast to it and the output back), else the input's."""
    dtype = getattr(module, "compute_dtype", None) if not isinstance(module, QuantLinear) else None
    return dtype if dtype in FLOAT_DTYPES else x.dtype


class QuantizedBase:
    """Mixin of the LoRA layers over a quantized base (``QLoRALinear``, ``QMultiLoRALinear``): put
    before the layer's class. ``_adopt`` keeps the base layer as ``base_layer``; ``bias`` is the
    base's; ``weight_nk`` is the ``NF4Weight`` the kernels decode."""

    quantized = True

    def _adopt(self, linear: nn.Module) -> None:
        check(is_quantized_linear(linear), "linear", f"expected a quantized linear layer, got {type(linear).__name__}")
        self.fan_in_fan_out = False
        w = quantized_weight(linear)
        self.out_features, self.in_features = w.shape
        for p in linear.parameters():
            p.requires_grad_(False)
        self.base_layer = linear

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    @property
    def weight_nk(self) -> NF4Weight:
        return quantized_weight(self.base_layer)

    @property
    def base_device(self) -> torch.device:
        return self.weight_nk.packed.device

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype the base computes in (bitsandbytes' compute dtype, else the weight's)."""
        dtype = getattr(self.base_layer, "compute_dtype", None)
        return dtype if dtype in FLOAT_DTYPES else self.weight_nk.dtype

    def base_linear(self) -> nn.Module:
        return self.base_layer

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's forward in the base's compute dtype (bitsandbytes casts the input to it and
        its output back), the base decoded inside the kernels."""
        dtype = compute_dtype(self.base_layer, x)
        return super().forward(x.to(dtype)).to(x.dtype)

    def merge(self) -> None:
        raise RuntimeError(f"{type(self).__name__}.merge(): the base weight is quantized, and base + s·B·A is not "
                           f"representable in its 4-bit codes: merging would requantize the sum and change the "
                           f"base for good (PEFT warns of the same rounding). Keep the adapter unmerged (a rank-r "
                           f"term inside the fused kernel), or take a dense merged copy with merged_linear()")

    def unmerge(self) -> None:
        raise RuntimeError(f"{type(self).__name__}.unmerge(): a layer over a quantized base is never merged")

    def dense_weight(self) -> torch.Tensor:
        """The base weight decoded, ``[out, in]`` in its dtype."""
        from .function import dequantize_weight
        w = self.weight_nk
        return dequantize_weight(w, w.dtype)


def linear_layer(module: nn.Module) -> bool:
    """What a LoRA layer can wrap: ``nn.Linear``, transformers' ``Conv1D``, or a quantized linear."""
    from ..common import is_linear
    return is_quantized_linear(module) or is_linear(module)

