"""8-bit float frozen weights (e4m3): the format, its checks, quantisation and the reference
dequantisation.

``FP8Weight``: ``data`` float8_e4m3fn ``[out, in]`` and fp32 ``scale``, the value of an element
being ``data · scale`` (a multiplier, as transformers' ``weight_scale_inv`` and DeepSeek-V3's):

* per output row (``block=None``): ``scale [out]``;
* per ``block = (bn, bk)`` tile (HF FP8 checkpoints and DeepSeek-V3: 128×128): ``scale
  [ceil(out / bn), ceil(in / bk)]``, the last row and column of tiles possibly partial.

``quantize_fp8`` scales each row (or tile) so that its largest magnitude maps to e4m3's largest
finite value, 448, and rounds to nearest (PyTorch's cast): the recipe of torchao's float8 and of
DeepSeek-V3's checkpoints. ``dequantize_fp8`` multiplies in fp32 and rounds once to the target
dtype. ``from_hf_fp8`` reads transformers' ``FP8Linear`` (``weight`` + ``weight_scale_inv``, its
``block_size``) as it is.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..common import FLOAT_DTYPES, check, check_values

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
SCALINGS = ("row", "block")


@dataclasses.dataclass(frozen=True)
class FP8Weight:
    """A frozen ``[out, in]`` weight in fp8 e4m3 with per-row or per-block fp32 scales (module doc)."""

    data: Tensor  # float8_e4m3fn [out, in]
    scale: Tensor  # fp32 [out] (block None) or [ceil(out / bn), ceil(in / bk)]
    block: Optional[tuple]  # None: per-row scales; (bn, bk): per-tile scales
    dtype: torch.dtype  # what it dequantises to (the model's dtype)

    @property
    def shape(self) -> tuple:
        return tuple(self.data.shape)

    @property
    def scaling(self) -> str:
        return "row" if self.block is None else "block"

    def to(self, device) -> "FP8Weight":
        return dataclasses.replace(self, data=self.data.to(device), scale=self.scale.to(device))


def _scale_shape(shape: tuple, block: Optional[tuple]) -> tuple:
    if block is None:
        return (shape[0],)
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def check_fp8(w: FP8Weight, name: str = "weight") -> None:
    """``ValueError`` naming ``name`` (and the field) unless ``w`` is a consistent fp8 weight: a 2-D
    e4m3 ``data``, fp32 scales of the shape its scaling needs, block sizes ≥ 16, one device, finite
    positive scales."""
    check(isinstance(w, FP8Weight), name, f"expected an FP8Weight, got {type(w).__name__}")
    check(isinstance(w.data, Tensor) and w.data.dtype == E4M3 and w.data.dim() == 2 and min(w.data.shape) >= 1,
          f"{name}.data", f"expected float8_e4m3fn [out_features, in_features], got "
          f"{getattr(w.data, 'dtype', type(w.data).__name__)} {tuple(getattr(w.data, 'shape', ()))}")
    check(w.block is None or (isinstance(w.block, tuple) and len(w.block) == 2
                              and all(isinstance(b, int) and b >= 16 for b in w.block)), f"{name}.block",
          f"expected None (per-row scales) or (block_out, block_in), each an int >= 16, got {w.block!r}")
    check(w.dtype in FLOAT_DTYPES, f"{name}.dtype", f"expected float16, bfloat16 or float32, got {w.dtype}")
    want = _scale_shape(w.shape, w.block)
    check(isinstance(w.scale, Tensor) and w.scale.dtype == torch.float32 and tuple(w.scale.shape) == want,
          f"{name}.scale", f"expected fp32 {list(want)} ({'one per output row' if w.block is None else 'one per '}"
          f"{'' if w.block is None else f'{w.block[0]}x{w.block[1]} tile'}), got "
          f"{getattr(w.scale, 'dtype', None)} {tuple(getattr(w.scale, 'shape', ()))}")
    check(w.scale.device == w.data.device, name, f"data and scale on one device, got {w.data.device}, "
          f"{w.scale.device}")
    check_values((w.scale, 0.0, 3.4e38, f"{name}.scale", "scales (finite, >= 0)"))


def quantize_fp8(weight: Union[Tensor, nn.Linear], scaling: str = "row", block: tuple = (128, 128),
                 dtype: Optional[torch.dtype] = None) -> FP8Weight:
    """Quantise a ``[out, in]`` weight (or an ``nn.Linear``'s) to e4m3: ``scaling="row"`` (a scale per
    output row) or ``"block"`` (a scale per ``block`` tile, 128×128 as HF FP8 checkpoints). Each
    row / tile's largest magnitude maps to 448; an all-zero one gets scale 1."""
    w = weight.weight if isinstance(weight, nn.Linear) else weight
    check(isinstance(w, Tensor) and w.dim() == 2 and w.dtype in FLOAT_DTYPES, "weight",
          f"expected a floating [out, in] tensor or an nn.Linear, got {getattr(w, 'shape', type(w).__name__)}")
    check(scaling in SCALINGS, "scaling", f"expected 'row' or 'block', got {scaling!r}")
    check(bool(torch.isfinite(w).all()), "weight", "holds NaN or Inf: no finite scale")
    wf = w.detach().float()
    if scaling == "row":
        amax = wf.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
        data = (wf / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
        return FP8Weight(data, scale, None, dtype or w.dtype)
    check(isinstance(block, tuple) and len(block) == 2 and all(isinstance(b, int) and b >= 16 for b in block),
          "block", f"expected (block_out, block_in), each an int >= 16, got {block!r}")
    bn, bk = block
    N, K = wf.shape
    padded = nn.functional.pad(wf, (0, -K % bk, 0, -N % bn))
    tiles = padded.reshape(padded.shape[0] // bn, bn, padded.shape[1] // bk, bk)
    amax = tiles.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:N, :K]
    data = (wf / full).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return FP8Weight(data, scale, (bn, bk), dtype or w.dtype)


def expanded_scale(w: FP8Weight) -> Tensor:
    """The scale of every element, ``[out, in]`` fp32 (a broadcast view for per-row scales)."""
    N, K = w.shape
    if w.block is None:
        return w.scale[:, None].expand(N, K)
    return w.scale.repeat_interleave(w.block[0], 0).repeat_interleave(w.block[1], 1)[:N, :K]


def dequantize_fp8(w: FP8Weight, dtype: Optional[torch.dtype] = None) -> Tensor:
    """The ``[out, in]`` weight: ``data · scale`` in fp32, rounded once to ``dtype`` (default the
    weight's)."""
    return (w.data.float() * expanded_scale(w)).to(dtype or w.dtype)


def from_hf_fp8(module: nn.Module, checked: bool = True) -> FP8Weight:
    """transformers' ``FP8Linear`` (an HF FP8 checkpoint's linear layer: ``weight`` e4m3 and
    ``weight_scale_inv`` fp32 per ``block_size`` tile) as an ``FP8Weight`` over the same tensors. A
    per-tensor scale (``block_size`` None) becomes a per-row scale of the same value. Scales stored
    as UE8M0 (``scale_fmt="ue8m0"``) are refused."""
    weight, scale = getattr(module, "weight", None), getattr(module, "weight_scale_inv", None)
    check(isinstance(weight, Tensor) and weight.dtype == E4M3 and isinstance(scale, Tensor), "linear",
          f"expected transformers' FP8Linear (an e4m3 weight and its weight_scale_inv), got {type(module).__name__}")
    check(scale.dtype == torch.float32, "linear.weight_scale_inv",
          f"expected fp32 scales, got {scale.dtype} (UE8M0 scales are not supported)")
    block = getattr(module, "block_size", None)
    if block is None or scale.numel() == 1:
        w = FP8Weight(weight.data, scale.data.reshape(1).expand(weight.shape[0]).contiguous(), None,
                      _model_dtype(module))
    else:
        w = FP8Weight(weight.data, scale.data, tuple(int(b) for b in block), _model_dtype(module))
    if checked:
        check_fp8(w, "linear")
    return w


def _model_dtype(module: nn.Module) -> torch.dtype:
    """The dtype an FP8Linear's model computes in: its bias's, else bfloat16 (what FP8 checkpoints
    are served in)."""
    bias = getattr(module, "bias", None)
    return bias.dtype if isinstance(bias, Tensor) and bias.dtype in FLOAT_DTYPES else torch.bfloat16


# ---------------------------------------------------------------- the op boundary
def fp8_parts(w: FP8Weight) -> tuple[list, list, list]:
    """Tensors (data, scale), ints (out, in, block_out or 0, block_in or 0, dtype), no floats."""
    bn, bk = w.block or (0, 0)
    return [w.data, w.scale], [w.shape[0], w.shape[1], bn, bk, FLOAT_DTYPES.index(w.dtype)], []


def fp8_from_parts(tensors: list, ints: list, floats: list) -> FP8Weight:
    block = None if ints[2] == 0 else (ints[2], ints[3])
    return FP8Weight(tensors[0], tensors[1], block, FLOAT_DTYPES[ints[4]])
