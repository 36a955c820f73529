"""What every quantized frozen base offers the ops above it, whatever its format.

* ``is_quantized(w)``: a weight object of one of the formats (not a plain tensor).
* ``parts`` / ``from_parts``: the weight as flat lists for a ``torch.library`` op (tensors, ints,
  floats) and back; the format travels as a string.
* ``dequantize(w, dtype)``: the dense ``[out, in]`` weight in ``dtype``, as the format's own
  library computes it (bitsandbytes: to the weight's dtype, then to the input's).
* ``structure(w)``: a hashable key of everything but the values (plans and memoised checks).
* ``check_quantized(w, name)``: ``ValueError`` naming the field of a bad weight.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

from .fp8 import FP8Weight, check_fp8, dequantize_fp8, fp8_from_parts, fp8_parts
from .nf4 import NF4Weight, check_nf4, dequantize_nf4, nf4_from_parts, nf4_parts

QuantizedWeight = Union[NF4Weight, FP8Weight]
FORMATS = {"nf4": (NF4Weight, nf4_parts, nf4_from_parts, dequantize_nf4, check_nf4),
           "fp8": (FP8Weight, fp8_parts, fp8_from_parts, dequantize_fp8, check_fp8)}


def is_quantized(w) -> bool:
    return isinstance(w, (NF4Weight, FP8Weight))


def device_of(w) -> torch.device:
    """The device a quantized weight's tensors are on."""
    return parts(w)[1][0].device


def format_of(w) -> str:
    for name, (cls, *_rest) in FORMATS.items():
        if isinstance(w, cls):
            return name
    raise ValueError(f"weight: expected a tensor or a quantized weight ({', '.join(FORMATS)}), got {type(w).__name__}")


def parts(w) -> tuple[str, list, list, list]:
    """(format, tensors, ints, floats) of a quantized weight. Computed once per weight object and
    kept in its ``__dict__`` (the weights are frozen dataclasses: nothing a field holds changes; a
    ``dataclasses.replace`` makes a new object): every call of a layer reads them several times."""
    cached = w.__dict__.get("_parts")
    if cached is None:
        fmt = format_of(w)
        cached = w.__dict__["_parts"] = (fmt, *FORMATS[fmt][1](w))
    return cached


def from_parts(fmt: str, tensors: list, ints: list, floats: list):
    return FORMATS[fmt][2](list(tensors), list(ints), list(floats))


def dequantize(w, dtype: torch.dtype) -> Tensor:
    """The dense ``[out, in]`` weight in ``dtype``: decoded to the weight's own dtype, then cast
    (what bitsandbytes' layer multiplies the input with)."""
    return FORMATS[format_of(w)][3](w).to(dtype)


def dense(weight, dtype: torch.dtype) -> Tensor:
    """A dense weight as it is, a quantized one decoded as its library decodes it (the references'
    weight)."""
    return weight if isinstance(weight, Tensor) else dequantize(weight, dtype)


def structure(w) -> tuple:
    """Everything a launch plan depends on, values aside: format, shapes, dtypes, block sizes
    (kept on the weight object, as ``parts``)."""
    cached = w.__dict__.get("_structure")
    if cached is None:
        fmt, tensors, ints, _ = parts(w)
        cached = w.__dict__["_structure"] = (fmt, tuple(ints),
                                             tuple((t.shape, t.stride(), t.dtype, t.device) for t in tensors))
    return cached


def check_quantized(w, name: str = "weight") -> None:
    FORMATS[format_of(w)][4](w, name)


def value_key(w) -> tuple:
    """``structure(w)`` and the identity, storage and version of each tensor: what a memoised
    check of the values (finite scales) is keyed on (an in-place change is checked again)."""
    return structure(w), tuple((id(t), t.data_ptr(), t._version) for t in parts(w)[1])


_CHECKED: set = set()


def check_quantized_once(w, name: str = "weight") -> None:
    """``check_quantized``, skipped for a weight whose ``value_key`` passed before: the value
    check costs a device sync, and a frozen weight is the same every step."""
    if torch.compiler.is_compiling():  # traced: the checks of shapes run, values are not read (check_values)
        check_quantized(w, name)
        return
    key = value_key(w)
    if key in _CHECKED:
        return
    check_quantized(w, name)
    if len(_CHECKED) > 4096:
        _CHECKED.clear()
    _CHECKED.add(key)


def weight_shape(w) -> tuple:
    """(out_features, in_features) of a dense or quantized weight."""
    return tuple(w.shape)




def call_weight_op(ops: tuple, pos: int, *args):
    """``ops = (op, impl, quantized op, quantized impl)`` called as ``backend.call_op`` calls an op, the
    weight being ``args[pos]``: a dense weight goes to ``op``; a quantized one, when traced, to the
    quantized op with the weight as ``parts`` (its tensors, format, ints, floats in its place), and
    in eager calls to ``impl`` as the object it is (no flattening on the per-call path; counted in
    ``OP_CALLS`` under the quantized implementation's name)."""
    from ..backend import OP_CALLS, call_op, traced
    op, impl, qop, qimpl = ops
    weight = args[pos]
    if isinstance(weight, Tensor):
        return call_op(op, impl, *args)
    if traced(args[0]):
        fmt, tensors, ints, floats = parts(weight)
        return qop(*args[:pos], tensors, fmt, ints, floats, *args[pos + 1:])
    OP_CALLS[qimpl.__name__] += 1
    return impl(*args)
