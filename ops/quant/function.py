"""Functionals of a quantized frozen weight alone (no adapter): the dense copy a GEMM reads, and the
plain linear layer over it. With an adapter, ``lora_linear`` / ``multi_lora_linear`` take the
quantized weight themselves (their kernels decode it in the GEMM)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backend import check_backend, use_triton
from .weight import check_quantized_once, dequantize, device_of


def dequantize_weight(w, dtype: torch.dtype, backend: Optional[str] = None) -> Tensor:
    """The dense ``[out, in]`` weight in ``dtype`` (the format's own decoding, bit for bit): the
    Triton decode kernel on CUDA (and under the interpreter), PyTorch on the CPU."""
    if use_triton(device_of(w), check_backend(backend)):
        from .launch import dequantize_triton
        return dequantize_triton(w, dtype)
    return dequantize(w, dtype)


def quant_linear(x: Tensor, w, bias: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """``x·Wᵀ + bias`` for a quantized frozen ``W`` (what bitsandbytes' ``Linear4bit`` computes):
    the weight decoded to its dtype, then to x's; differentiable in x and bias."""
    check_quantized_once(w, "weight")
    return F.linear(x, dequantize_weight(w, x.dtype, backend), None if bias is None else bias.to(x.dtype))
