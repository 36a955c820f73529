"""4-bit frozen weights in bitsandbytes' storage (QLoRA's NF4, and FP4),
read as they are: the format, its checks, quantisation and the reference
dequantisation.

bitsandbytes' layout (``bnb.nn.Params4bit`` / ``Linear4bit``, 0.4x-0.50):

* ``packed``: the weight ``[out, in]`` flattened row-major, two 4-bit codes
  a byte, the first element in the high nibble; ``ceil(n / 2)`` bytes
  (stored as ``[n/2, 1]`` uint8, or viewed as another ``quant_storage``
  dtype: the bytes are the same).
* ``absmax``: fp32 ``[ceil(n / blocksize)]``, the largest magnitude of each
  block of ``blocksize`` consecutive elements (a last, shorter block too).
  With double quantisation (``compress_statistics``) it is uint8 codes of
  ``absmax - offset`` under an 8-bit code book (``code2 [256]``) with its own
  fp32 absmax per ``blocksize2`` (256) blocks: absmax = code2[q]·absmax2 + offset.
* ``code``: the 16 levels (NF4: the normal-float levels of the QLoRA paper;
  FP4: bitsandbytes' fp4 table); element = code[nibble]·absmax[block].

``quantize_nf4`` reproduces bitsandbytes' quantiser (each scaled value
bucketed by the midpoints of the sorted levels), so its codes and absmax are
bit-identical to ``bitsandbytes.functional.quantize_4bit`` on the same
weight; ``dequantize_nf4`` is bitsandbytes' dequantisation (fp32 products,
cast once). This module is the format the quantized-base kernels read; it
needs no bitsandbytes (``from_bnb`` reads its objects when it is installed).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..common import FLOAT_DTYPES, check, check_values

# The 16 levels, as bitsandbytes stores them (fp32), in code order.
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
# FP4 (1 sign, 2 exponent, 1 mantissa bit, bitsandbytes' bias) in bit-pattern order, normalised to [-1, 1]
# in fp32 as bitsandbytes normalises it.
FP4_LEVELS = tuple((torch.tensor([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0,
                                  -2.0, -3.0], dtype=torch.float32) / 12.0).tolist())
LEVELS = {"nf4": NF4_LEVELS, "fp4": FP4_LEVELS}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes accepts for 4-bit blocks


@dataclasses.dataclass(frozen=True)
class NestedStats:
    """Double quantisation of the absmax: ``absmax = code2[q]·absmax2[i // blocksize2] + offset``."""

    absmax2: Tensor  # fp32 [ceil(blocks / blocksize2)]
    code2: Tensor  # fp32 [256]
    blocksize2: int
    offset: float


@dataclasses.dataclass(frozen=True)
class NF4Weight:
    """A frozen ``[out, in]`` weight in 4-bit blocks (bitsandbytes' layout, module doc)."""

    packed: Tensor  # uint8 [ceil(n / 2)]
    absmax: Tensor  # fp32 [blocks], or uint8 [blocks] with ``nested``
    shape: tuple  # (out_features, in_features)
    blocksize: int
    quant_type: str  # "nf4" or "fp4"
    code: Tensor  # fp32 [16]
    dtype: torch.dtype  # what it dequantises to
    nested: Optional[NestedStats] = None

    @property
    def blocks(self) -> int:
        return math.ceil(self.shape[0] * self.shape[1] / self.blocksize)

    def absmax_fp32(self) -> Tensor:
        """The per-block scales in fp32 (nested ones dequantised as bitsandbytes does)."""
        if self.nested is None:
            return self.absmax
        s = self.nested
        q = s.code2[self.absmax.to(torch.int64)]
        n = q.numel()
        full = n - n % s.blocksize2
        out = torch.empty(n, dtype=torch.float32, device=q.device)
        out[:full] = (q[:full].reshape(-1, s.blocksize2) * s.absmax2[:full // s.blocksize2, None]).reshape(-1)
        if full < n:
            out[full:] = q[full:] * s.absmax2[-1]
        return out + s.offset

    def to(self, device) -> "NF4Weight":
        nested = None if self.nested is None else dataclasses.replace(
            self.nested, absmax2=self.nested.absmax2.to(device), code2=self.nested.code2.to(device))
        return dataclasses.replace(self, packed=self.packed.to(device), absmax=self.absmax.to(device),
                                   code=self.code.to(device), nested=nested)


def check_nf4(w: NF4Weight, name: str = "weight") -> None:
    """``ValueError`` naming ``name`` (and the field) unless ``w`` is a consistent 4-bit weight:
    shapes of the packed codes and of every scale table, blocksizes bitsandbytes allows, dtypes,
    one device, and finite scales (NaN / Inf scales would turn whole blocks into NaN)."""
    check(isinstance(w, NF4Weight), name, f"expected an NF4Weight, got {type(w).__name__}")
    check(len(w.shape) == 2 and all(isinstance(d, int) and d >= 1 for d in w.shape), f"{name}.shape",
          f"expected (out_features, in_features), got {w.shape!r}")
    check(w.quant_type in LEVELS, f"{name}.quant_type", f"expected 'nf4' or 'fp4', got {w.quant_type!r}")
    check(w.blocksize in BLOCKSIZES, f"{name}.blocksize", f"expected one of {BLOCKSIZES}, got {w.blocksize!r}")
    check(w.dtype in FLOAT_DTYPES, f"{name}.dtype", f"expected float16, bfloat16 or float32, got {w.dtype}")
    n = w.shape[0] * w.shape[1]
    check(isinstance(w.packed, Tensor) and w.packed.dtype == torch.uint8 and w.packed.dim() == 1
          and w.packed.numel() == (n + 1) // 2, f"{name}.packed",
          f"expected uint8 [{(n + 1) // 2}] (two codes a byte), got {getattr(w.packed, 'dtype', None)} "
          f"{tuple(getattr(w.packed, 'shape', ()))}")
    check(isinstance(w.code, Tensor) and w.code.dtype == torch.float32 and tuple(w.code.shape) == (16,),
          f"{name}.code", f"expected fp32 [16], got {getattr(w.code, 'dtype', None)} "
          f"{tuple(getattr(w.code, 'shape', ()))}")
    want = (torch.uint8 if w.nested is not None else torch.float32)
    check(isinstance(w.absmax, Tensor) and w.absmax.dtype == want and tuple(w.absmax.shape) == (w.blocks,),
          f"{name}.absmax", f"expected {str(want).removeprefix('torch.')} [{w.blocks}] (one per {w.blocksize} "
          f"elements), got {getattr(w.absmax, 'dtype', None)} {tuple(getattr(w.absmax, 'shape', ()))}")
    tensors = [w.packed, w.absmax, w.code]
    if w.nested is not None:
        s = w.nested
        blocks2 = math.ceil(w.blocks / s.blocksize2) if isinstance(s.blocksize2, int) and s.blocksize2 > 0 else -1
        check(blocks2 > 0 and s.absmax2.dtype == torch.float32 and tuple(s.absmax2.shape) == (blocks2,),
              f"{name}.nested.absmax2", f"expected fp32 [{blocks2}], got {s.absmax2.dtype} {tuple(s.absmax2.shape)}")
        check(s.code2.dtype == torch.float32 and tuple(s.code2.shape) == (256,), f"{name}.nested.code2",
              f"expected fp32 [256], got {s.code2.dtype} {tuple(s.code2.shape)}")
        check(math.isfinite(s.offset), f"{name}.nested.offset", f"must be finite, got {s.offset!r}")
        tensors += [s.absmax2, s.code2]
    for t in tensors[1:]:
        check(t.device == w.packed.device, name, f"every tensor on one device ({w.packed.device}), got {t.device}")
    big = 3.4e38
    check_values((w.absmax if w.nested is None else w.nested.absmax2, -big, big, f"{name}.absmax", "block scales"),
                 (w.code, -1.0, 1.0, f"{name}.code", "4-bit levels"))


def quantize_nf4(weight: Union[Tensor, nn.Linear], blocksize: int = 64, quant_type: str = "nf4") -> NF4Weight:
    """Quantise a ``[out, in]`` weight (or an ``nn.Linear``'s) to 4-bit blocks, bitsandbytes'
    quantiser: the codes and absmax equal ``bitsandbytes.functional.quantize_4bit(weight,
    blocksize, quant_type=quant_type)``'s bit for bit. No double quantisation here (read a
    ``compress_statistics`` weight with ``from_bnb``)."""
    w = weight.weight if isinstance(weight, nn.Linear) else weight
    check(isinstance(w, Tensor) and w.dim() == 2 and w.dtype in FLOAT_DTYPES, "weight",
          f"expected a floating [out, in] tensor or an nn.Linear, got {getattr(w, 'shape', type(w).__name__)}")
    check(blocksize in BLOCKSIZES, "blocksize", f"expected one of {BLOCKSIZES}, got {blocksize!r}")
    check(quant_type in LEVELS, "quant_type", f"expected 'nf4' or 'fp4', got {quant_type!r}")
    check(bool(torch.isfinite(w).all()), "weight", "holds NaN or Inf: no finite block scale")
    code = torch.tensor(LEVELS[quant_type], dtype=torch.float32, device=w.device)
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    body = flat[:full].reshape(-1, blocksize)
    absmax = body.abs().amax(dim=-1)
    scaled = torch.clamp(body * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    if full < n:
        tail = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail, -1, 1)])
    if scaled.numel() % 2:
        scaled = nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, bounds, out_int32=True)
    q = (q if quant_type == "nf4" else order[q]).to(torch.uint8)
    packed = (q[::2] << 4) | q[1::2]
    return NF4Weight(packed, absmax, tuple(w.shape), blocksize, quant_type, code, w.dtype)


def dequantize_nf4(w: NF4Weight, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The ``[out, in]`` weight: code[nibble]·absmax[block] in fp32, cast once to ``dtype``
    (default the weight's), as ``bitsandbytes.functional.dequantize_4bit``."""
    n = w.shape[0] * w.shape[1]
    nib = torch.empty(w.packed.numel() * 2, dtype=torch.int64, device=w.packed.device)
    nib[::2] = (w.packed >> 4).to(torch.int64)
    nib[1::2] = (w.packed & 0xF).to(torch.int64)
    vals = w.code[nib[:n]]
    absmax = w.absmax_fp32()
    full = n - n % w.blocksize
    out = torch.empty(n, dtype=torch.float32, device=vals.device)
    out[:full] = (vals[:full].reshape(-1, w.blocksize) * absmax[:full // w.blocksize, None]).reshape(-1)
    if full < n:
        out[full:] = vals[full:] * absmax[-1]
    return out.reshape(w.shape).to(dtype or w.dtype)


def from_bnb(obj, checked: bool = True) -> NF4Weight:
    """bitsandbytes' ``Linear4bit`` / ``Params4bit`` (quantized, any ``quant_storage``, with or without
    ``compress_statistics``) as an ``NF4Weight`` over the same storage (views, no copy of the codes).
    ``checked=False`` skips ``check_nf4`` (a caller that checked this storage before)."""
    param = getattr(obj, "weight", obj)
    st = getattr(param, "quant_state", None)
    check(st is not None, "weight", f"expected a quantized bitsandbytes Params4bit / Linear4bit, got "
          f"{type(obj).__name__} without a quant_state (move it to its device first to quantize it)")
    check(not getattr(st, "packing_format_for_cpu", False), "weight",
          "bitsandbytes repacked this weight for its CPU inference kernel (packing_format_for_cpu, absmax "
          "rounded to bfloat16), which is not its 4-bit layout any more; run the model once in training mode "
          "or with inputs that require grad before that happens, or move it to a GPU (.cuda() restores it)")
    data = param.data if isinstance(param, Tensor) else param
    packed = data.reshape(-1).view(torch.uint8) if data.dtype != torch.uint8 else data.reshape(-1)
    nested = None
    if getattr(st, "nested", False) or st.state2 is not None:
        s2 = st.state2
        nested = NestedStats(s2.absmax.float(), s2.code.float(), int(s2.blocksize), float(st.offset))
    shape = tuple(int(d) for d in st.shape)
    w = NF4Weight(packed, st.absmax, shape, int(st.blocksize), st.quant_type, st.code.float(), st.dtype, nested)
    if checked:
        check_nf4(w)
    return w


# ---------------------------------------------------------------- the op boundary
_QUANT_TYPES = tuple(LEVELS)


def nf4_parts(w: NF4Weight) -> tuple[list, list, list]:
    """``w`` as the flat lists a ``torch.library`` op takes: tensors (packed, absmax, code, and with
    double quantisation absmax2, code2), ints (out, in, blocksize, blocksize2 or 0, dtype, quant
    type) and floats (offset)."""
    s = w.nested
    tensors = [w.packed, w.absmax, w.code] + ([] if s is None else [s.absmax2, s.code2])
    ints = [w.shape[0], w.shape[1], w.blocksize, 0 if s is None else s.blocksize2, FLOAT_DTYPES.index(w.dtype),
            _QUANT_TYPES.index(w.quant_type)]
    return tensors, ints, [0.0 if s is None else float(s.offset)]


def nf4_from_parts(tensors: list, ints: list, floats: list) -> NF4Weight:
    """The inverse of ``nf4_parts``."""
    nested = None if ints[3] == 0 else NestedStats(tensors[3], tensors[4], ints[3], floats[0])
    return NF4Weight(tensors[0], tensors[1], (ints[0], ints[1]), ints[2], _QUANT_TYPES[ints[5]], tensors[2],
                     FLOAT_DTYPES[ints[4]], nested)
