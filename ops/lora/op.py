"""The fused-LoRA ops: ``posttrain_kernels::lora_fwd`` / ``lora_bwd``, and ``qlora_fwd`` /
``qlora_bwd`` for a quantized frozen weight.

The flat ``torch.library`` boundary: each op runs the Triton launchers
(``launch.py``) or the PyTorch reference (``reference.py``), by the backend
rule of ``ops/backend.py``, and has a fake implementation for tracing. A
quantized weight (``ops/quant``) is an object; eager calls hand it to the
implementations as it is, and traced ones cross the boundary as the
``q*`` ops' flat lists (``ops/quant/weight.py: parts``, ``call_weight_op``).
``run_lora_fwd`` / ``run_lora_bwd`` pick the op by the weight.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import use_triton
from ..quant.weight import call_weight_op, dense, from_parts
from .launch import lora_bwd_triton, lora_fwd_triton
from .reference import lora_bwd_ref, lora_fwd_ref


def lora_fwd_impl(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Optional[Tensor],
                  scale: float, dropout_p: float, seed: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    """(y [M, N] in x.dtype, t [M, R] fp32) for a 2-D x [M, K]."""
    if use_triton(x.device, backend):
        return lora_fwd_triton(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed)
    return lora_fwd_ref(x, dense(weight, x.dtype), lora_a, lora_b, bias, scale, dropout_p, seed)


def lora_bwd_impl(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, t: Tensor,
                  scale: float, dropout_p: float, seed: Optional[Tensor], needs_dx: bool, needs_dbias: bool,
                  backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx [M, K] or empty, dA [R, K], dB [N, R], dbias [N] fp32 or empty)."""
    if use_triton(dy.device, backend):
        return lora_bwd_triton(dy, x, weight, lora_a, lora_b, t, scale, dropout_p, seed, needs_dx, needs_dbias)
    return lora_bwd_ref(dy, x, dense(weight, x.dtype), lora_a, lora_b, t, scale, dropout_p, seed, needs_dx,
                        needs_dbias)


def qlora_fwd_impl(x: Tensor, wq: list[Tensor], fmt: str, wint: list[int], wfloat: list[float], lora_a: Tensor,
                   lora_b: Tensor, bias: Optional[Tensor], scale: float, dropout_p: float, seed: Optional[Tensor],
                   backend: str) -> tuple[Tensor, Tensor]:
    """``lora_fwd`` with the quantized weight as ``parts`` gives it."""
    return lora_fwd_impl(x, from_parts(fmt, wq, wint, wfloat), lora_a, lora_b, bias, scale, dropout_p, seed,
                         backend)


def qlora_bwd_impl(dy: Tensor, x: Tensor, wq: list[Tensor], fmt: str, wint: list[int], wfloat: list[float],
                   lora_a: Tensor, lora_b: Tensor, t: Tensor, scale: float, dropout_p: float, seed: Optional[Tensor],
                   needs_dx: bool, needs_dbias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return lora_bwd_impl(dy, x, from_parts(fmt, wq, wint, wfloat), lora_a, lora_b, t, scale, dropout_p, seed,
                         needs_dx, needs_dbias, backend)


lora_fwd = torch.library.custom_op("posttrain_kernels::lora_fwd", mutates_args=())(lora_fwd_impl)
lora_bwd = torch.library.custom_op("posttrain_kernels::lora_bwd", mutates_args=())(lora_bwd_impl)
qlora_fwd = torch.library.custom_op("posttrain_kernels::qlora_fwd", mutates_args=())(qlora_fwd_impl)
qlora_bwd = torch.library.custom_op("posttrain_kernels::qlora_bwd", mutates_args=())(qlora_bwd_impl)


def run_lora_fwd(x, weight, *args):
    """``lora_fwd`` (a dense weight) or ``qlora_fwd`` (a quantized one): ``call_weight_op``."""
    return call_weight_op((lora_fwd, lora_fwd_impl, qlora_fwd, qlora_fwd_impl), 1, x, weight, *args)


def run_lora_bwd(dy, x, weight, *args):
    return call_weight_op((lora_bwd, lora_bwd_impl, qlora_bwd, qlora_bwd_impl), 2, dy, x, weight, *args)


@lora_fwd.register_fake
def _(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, backend):
    M, N, R = x.shape[0], weight.shape[0], lora_a.shape[0]
    return x.new_empty((M, N)), x.new_empty((M, R), dtype=torch.float32)


@qlora_fwd.register_fake
def _(x, wq, fmt, wint, wfloat, lora_a, lora_b, bias, scale, dropout_p, seed, backend):
    M, N, R = x.shape[0], wint[0], lora_a.shape[0]
    return x.new_empty((M, N)), x.new_empty((M, R), dtype=torch.float32)


def _bwd_fake(dy, x, lora_a, lora_b, needs_dx, needs_dbias):
    dx = x.new_empty(x.shape) if needs_dx else x.new_empty(0)
    dbias = dy.new_empty((dy.shape[1],) if needs_dbias else (0,), dtype=torch.float32)
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape), dbias


@lora_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, t, scale, dropout_p, seed, needs_dx, needs_dbias, backend):
    return _bwd_fake(dy, x, lora_a, lora_b, needs_dx, needs_dbias)


@qlora_bwd.register_fake
def _(dy, x, wq, fmt, wint, wfloat, lora_a, lora_b, t, scale, dropout_p, seed, needs_dx, needs_dbias, backend):
    return _bwd_fake(dy, x, lora_a, lora_b, needs_dx, needs_dbias)
