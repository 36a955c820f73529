"""The fused-LoRA ops: ``posttrain_kernels::lora_fwd`` / ``lora_bwd``.

The flat ``torch.library`` boundary: each op runs the Triton launchers
(``launch.py``) or the PyTorch reference (``reference.py``), by the backend
rule of ``ops/backend.py``, and has a fake implementation for tracing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import use_triton
from .launch import lora_bwd_triton, lora_fwd_triton
from .reference import lora_bwd_ref, lora_fwd_ref


def lora_fwd_impl(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Optional[Tensor],
                  scale: float, dropout_p: float, seed: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    """(y [M, N] in x.dtype, t [M, R] fp32) for a 2-D x [M, K]."""
    impl = lora_fwd_triton if use_triton(x.device, backend) else lora_fwd_ref
    return impl(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed)


def lora_bwd_impl(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, t: Tensor,
                  scale: float, dropout_p: float, seed: Optional[Tensor], needs_dx: bool, needs_dbias: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx [M, K] or empty, dA [R, K], dB [N, R], dbias [N] fp32 or empty)."""
    impl = lora_bwd_triton if use_triton(dy.device, backend) else lora_bwd_ref
    return impl(dy, x, weight, lora_a, lora_b, t, scale, dropout_p, seed, needs_dx, needs_dbias)


lora_fwd = torch.library.custom_op("posttrain_kernels::lora_fwd", mutates_args=())(lora_fwd_impl)
lora_bwd = torch.library.custom_op("posttrain_kernels::lora_bwd", mutates_args=())(lora_bwd_impl)


@lora_fwd.register_fake
def _(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, backend):
    M, N, R = x.shape[0], weight.shape[0], lora_a.shape[0]
    return x.new_empty((M, N)), x.new_empty((M, R), dtype=torch.float32)


@lora_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, t, scale, dropout_p, seed, needs_dx, needs_dbias, backend):
    dx = x.new_empty(x.shape) if needs_dx else x.new_empty(0)
    dbias = dy.new_empty((dy.shape[1],) if needs_dbias else (0,), dtype=torch.float32)
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape), dbias
