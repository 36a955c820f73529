"""Linear layers over a quantized frozen weight, and what the LoRA layers need to wrap them.

* ``QuantLinear``: our own quantized linear layer, 4 bits (bitsandbytes' storage, no bitsandbytes
  needed) or fp8: ``QuantLinear.from_linear(linear, format)``, or ``quantize_model(model, format)``
  for every linear layer.
* ``is_quantized_linear(m)``: a ``QuantLinear``, bitsandbytes' ``Linear4bit`` (QLoRA's base) or
  transformers' ``FP8Linear`` (an HF FP8 checkpoint's layer).
* ``quantized_weight(m)``: its weight as an ``NF4Weight`` / ``FP8Weight`` over the same storage (no
  copy), memoised per storage: the layers call it every forward.
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
from .fp8 import E4M3, from_hf_fp8, quantize_fp8
from .function import quant_linear
from .nf4 import from_bnb, quantize_nf4
from .weight import check_quantized, device_of, from_parts, parts

_BNB_4BIT = ("Linear4bit", "LinearNF4", "LinearFP4")
# QuantLinear's buffers per format: NF4Weight's fields, and an fp8 weight under HF FP8 checkpoints' names
_BUFFERS = {"nf4": ("packed", "absmax", "code", "absmax2", "code2"), "fp8": ("weight", "weight_scale_inv")}


class QuantLinear(nn.Module):
    """A frozen linear layer over a quantized weight, for models without bitsandbytes or an FP8
    checkpoint: 4 bits in bitsandbytes' layout (``NF4Weight``: buffers ``packed``, ``absmax``,
    ``code`` and, with double-quantised scales, ``absmax2`` / ``code2``) or fp8 e4m3 (``FP8Weight``:
    ``weight`` and ``weight_scale_inv``, HF FP8 checkpoints' names); ``bias`` a frozen Parameter.
    ``forward(x)`` = ``x·Wᵀ + bias`` with W decoded to its dtype, then to x's."""

    def __init__(self, weight, bias: Optional[torch.Tensor] = None):
        super().__init__()
        check_quantized(weight, "weight")
        self.format, tensors, self._ints, self._floats = parts(weight)
        self.out_features, self.in_features = weight.shape
        for name, t in zip(_BUFFERS[self.format], tensors):
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str = "nf4", **options) -> "QuantLinear":
        """``linear``'s weight quantized, its bias kept: ``format="nf4"`` (``quantize_nf4``:
        bitsandbytes' codes bit for bit; options ``blocksize``, ``quant_type``) or ``"fp8"``
        (``quantize_fp8``; options ``scaling="row"|"block"``, ``block``)."""
        check(type(linear) is nn.Linear, "linear", f"expected an nn.Linear, got {type(linear).__name__}")
        check(format in _BUFFERS, "format", f"expected 'nf4' or 'fp8', got {format!r}")
        quantize = quantize_nf4 if format == "nf4" else quantize_fp8
        return cls(quantize(linear.weight, **options), linear.bias)

    def quantized_weight(self):
        """The weight over this layer's buffers (no copy); the same object while the buffers are
        the same tensors (a ``.to()`` or a load makes new ones, and a new weight)."""
        tensors = [getattr(self, name) for name in _BUFFERS[self.format] if hasattr(self, name)]
        key = tuple(id(t) for t in tensors)
        cached = self.__dict__.get("_weight")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_weight"] = (key, from_parts(self.format, tensors, self._ints, self._floats))
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        w = self.quantized_weight()
        kind = (f"{w.quant_type} blocksize={w.blocksize}" if self.format == "nf4" else
                f"fp8 e4m3, {'row' if w.block is None else 'x'.join(map(str, w.block))} scales")
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{kind}, dtype={str(w.dtype).removeprefix('torch.')}")


def quantize_model(model: nn.Module, format: str = "nf4", skip: Iterable[str] = ("lm_head",),
                   **options) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` (but those whose name matches one of ``skip``, a
    name or its last component, or a full-match regex) by a ``QuantLinear`` of its weight in
    ``format`` (``QuantLinear.from_linear``'s options: 4 bits ``blocksize=64, quant_type="nf4"``,
    whose codes equal bitsandbytes' for the same weights; fp8 ``scaling="row"|"block"``). Returns
    the replaced names."""
    check(format in _BUFFERS, "format", f"expected 'nf4' or 'fp8', got {format!r}")
    skip = list(skip)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n
             and not any(n == s or n.endswith("." + s) or re.fullmatch(s, n) for s in skip)]
    layers = {n: QuantLinear.from_linear(model.get_submodule(n), format, **options) for n in names}  # checks first
    for n, layer in layers.items():
        set_submodule(model, n, layer)
    return names


def _hf_fp8(module: nn.Module) -> bool:
    """transformers' ``FP8Linear`` holding e4m3 weights (an HF FP8 checkpoint's linear layer)."""
    return type(module).__name__ == "FP8Linear" and getattr(getattr(module, "weight", None), "dtype", None) == E4M3


def is_quantized_linear(module: nn.Module) -> bool:
    """A linear layer whose weight is stored quantized: ``QuantLinear``, bitsandbytes' ``Linear4bit``
    once quantized (its weight carries a quant state), or transformers' ``FP8Linear``."""
    if isinstance(module, QuantLinear) or _hf_fp8(module):
        return True
    return type(module).__name__ in _BNB_4BIT and getattr(module.weight, "quant_state", None) is not None


# Library layers seen before: id(weight Parameter) -> (weak reference, storage key, quantized weight),
# checked once per storage. An entry goes with its parameter (a finalizer), so its views keep no storage alive.
_SEEN: dict = {}


def quantized_weight(module: nn.Module):
    """The layer's weight as an ``NF4Weight`` / ``FP8Weight`` over its own storage. For a library's
    layer (bitsandbytes, transformers' FP8), the first call for a storage checks it (shapes, dtypes,
    finite scales); later calls only build the view (a forward pays no device sync)."""
    if isinstance(module, QuantLinear):
        return module.quantized_weight()
    param = module.weight
    if _hf_fp8(module):
        scale = module.weight_scale_inv
        key = (param.data_ptr(), param._version, scale.data_ptr(), scale._version)
        read = from_hf_fp8
    else:
        st = param.quant_state
        key = (param.data_ptr(), id(st), st.absmax.data_ptr(), st.absmax._version,
               getattr(st, "packing_format_for_cpu", False))
        read = from_bnb
    seen = _SEEN.get(id(param))
    if seen is not None and seen[0]() is param and seen[1] == key:
        return seen[2]
    w = read(module)
    if seen is None:
        weakref.finalize(param, _SEEN.pop, id(param), None)
    _SEEN[id(param)] = (weakref.ref(param), key, w)
    return w


def _library_dtype(module: nn.Module) -> Optional[torch.dtype]:
    """bitsandbytes' ``compute_dtype`` of a layer when set (the input is cast to it and the output
    back), else None (transformers' FP8Linear and QuantLinear compute in the input's dtype)."""
    dtype = getattr(module, "compute_dtype", None)
    return dtype if dtype in FLOAT_DTYPES else None


def compute_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype a quantized layer computes in: its library's compute dtype, else the input's."""
    return _library_dtype(module) or x.dtype


class QuantizedBase:
    """Mixin of the LoRA layers over a quantized base (``QLoRALinear``, ``QMultiLoRALinear``): put
    before the layer's class. ``_adopt`` keeps the base layer as ``base_layer``; ``bias`` is the
    base's; ``weight_nk`` is the quantized weight the kernels read."""

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
    def weight_nk(self):
        return quantized_weight(self.base_layer)

    @property
    def base_device(self) -> torch.device:
        return device_of(self.weight_nk)

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype the base computes in (bitsandbytes' compute dtype, else the weight's)."""
        return _library_dtype(self.base_layer) or self.weight_nk.dtype

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
                           f"representable in its quantized codes: merging would requantize the sum and change "
                           f"the base for good (PEFT warns of the same rounding). Keep the adapter unmerged (a rank-r "
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

