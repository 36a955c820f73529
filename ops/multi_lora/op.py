"""The multi-adapter LoRA ops: ``posttrain_kernels::multi_lora_fwd`` / ``multi_lora_bwd``, and
``multi_qlora_fwd`` / ``multi_qlora_bwd`` for a quantized frozen weight.

The flat ``torch.library`` boundary (the schema takes the pool as plain
tensors; ``launch.py`` builds its objects from them): each op runs the
Triton launchers or the PyTorch reference, by the backend rule of
``ops/backend.py``, and has a fake implementation for tracing. A quantized
weight crosses it as in ``ops/lora/op.py`` (``run_multi_lora_fwd`` / ``_bwd``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import use_triton
from ..quant.weight import call_weight_op, dense, from_parts
from .launch import multi_lora_bwd_triton, multi_lora_fwd_triton
from .reference import multi_lora_bwd_ref, multi_lora_fwd_ref


def multi_lora_fwd_impl(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                         ranks: Tensor, scales: Tensor, adapter_ids: Tensor, slices: Optional[list[int]],
                         dropout_p: Optional[Tensor], seeds: Optional[Tensor],
                         backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y [M, N], t [M, slices·R_MAX] fp32, perm [M] int64, sid [M] int64) for a 2-D x."""
    if use_triton(x.device, backend):
        return multi_lora_fwd_triton(x, weight, bias, lora_a, lora_b, ranks, scales, adapter_ids, slices, dropout_p,
                                     seeds)
    return multi_lora_fwd_ref(x, dense(weight, x.dtype), bias, lora_a, lora_b, ranks, scales, adapter_ids, slices,
                              dropout_p, seeds)


def multi_lora_bwd_impl(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, ranks: Tensor,
                         scales: Tensor, t: Tensor, perm: Tensor, sid: Tensor, slices: Optional[list[int]],
                         needs_dx: bool, needs_dlora: bool, needs_dbias: bool, dropout_p: Optional[Tensor],
                         seeds: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx [M, K] or empty, dA like lora_a and dB like lora_b or both empty,
    dbias [N] fp32 or empty)."""
    impl = multi_lora_bwd_triton if use_triton(dy.device, backend) else multi_lora_bwd_ref
    if impl is multi_lora_bwd_ref:
        weight = dense(weight, x.dtype)
    return impl(dy, x, weight, lora_a, lora_b, ranks, scales, t, perm, sid, slices, needs_dx, needs_dlora,
                needs_dbias, dropout_p, seeds)


def multi_qlora_fwd_impl(x: Tensor, wq: list[Tensor], fmt: str, wint: list[int], wfloat: list[float],
                         bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, ranks: Tensor, scales: Tensor,
                         adapter_ids: Tensor, slices: Optional[list[int]], dropout_p: Optional[Tensor],
                         seeds: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``multi_lora_fwd`` with the quantized weight as ``ops/quant/weight.py: parts`` gives it."""
    return multi_lora_fwd_impl(x, from_parts(fmt, wq, wint, wfloat), bias, lora_a, lora_b, ranks, scales,
                               adapter_ids, slices, dropout_p, seeds, backend)


def multi_qlora_bwd_impl(dy: Tensor, x: Tensor, wq: list[Tensor], fmt: str, wint: list[int], wfloat: list[float],
                         lora_a: Tensor, lora_b: Tensor, ranks: Tensor, scales: Tensor, t: Tensor, perm: Tensor,
                         sid: Tensor, slices: Optional[list[int]], needs_dx: bool, needs_dlora: bool,
                         needs_dbias: bool, dropout_p: Optional[Tensor], seeds: Optional[Tensor],
                         backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return multi_lora_bwd_impl(dy, x, from_parts(fmt, wq, wint, wfloat), lora_a, lora_b, ranks, scales, t, perm,
                               sid, slices, needs_dx, needs_dlora, needs_dbias, dropout_p, seeds, backend)


multi_lora_fwd = torch.library.custom_op("posttrain_kernels::multi_lora_fwd", mutates_args=())(multi_lora_fwd_impl)
multi_lora_bwd = torch.library.custom_op("posttrain_kernels::multi_lora_bwd", mutates_args=())(multi_lora_bwd_impl)
multi_qlora_fwd = torch.library.custom_op("posttrain_kernels::multi_qlora_fwd",
                                          mutates_args=())(multi_qlora_fwd_impl)
multi_qlora_bwd = torch.library.custom_op("posttrain_kernels::multi_qlora_bwd",
                                          mutates_args=())(multi_qlora_bwd_impl)


def run_multi_lora_fwd(x, weight, *args):
    """``multi_lora_fwd`` (a dense weight) or ``multi_qlora_fwd`` (a quantized one): ``call_weight_op``."""
    return call_weight_op((multi_lora_fwd, multi_lora_fwd_impl, multi_qlora_fwd, multi_qlora_fwd_impl), 1, x, weight,
                          *args)


def run_multi_lora_bwd(dy, x, weight, *args):
    return call_weight_op((multi_lora_bwd, multi_lora_bwd_impl, multi_qlora_bwd, multi_qlora_bwd_impl), 2, dy, x,
                          weight, *args)


def _fwd_fake(x, N, lora_b, slices):
    M, n_sl = x.shape[0], 1 if slices is None else len(slices)
    return (x.new_empty((M, N)), x.new_empty((M, n_sl * lora_b.shape[2]), dtype=torch.float32),
            x.new_empty((M,), dtype=torch.int64), x.new_empty((M,), dtype=torch.int64))


@multi_lora_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, ranks, scales, adapter_ids, slices, dropout_p, seeds, backend):
    return _fwd_fake(x, weight.shape[0], lora_b, slices)


@multi_qlora_fwd.register_fake
def _(x, wq, fmt, wint, wfloat, bias, lora_a, lora_b, ranks, scales, adapter_ids, slices, dropout_p, seeds, backend):
    return _fwd_fake(x, wint[0], lora_b, slices)


def _bwd_fake(dy, x, lora_a, lora_b, needs_dx, needs_dlora, needs_dbias):
    dx = x.new_empty(x.shape) if needs_dx else x.new_empty(0)
    dbias = dy.new_empty((dy.shape[1],) if needs_dbias else (0,), dtype=torch.float32)
    if not needs_dlora:
        return dx, lora_a.new_empty(0), lora_b.new_empty(0), dbias
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape), dbias


@multi_lora_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, ranks, scales, t, perm, sid, slices, needs_dx, needs_dlora, needs_dbias,
      dropout_p, seeds, backend):
    return _bwd_fake(dy, x, lora_a, lora_b, needs_dx, needs_dlora, needs_dbias)


@multi_qlora_bwd.register_fake
def _(dy, x, wq, fmt, wint, wfloat, lora_a, lora_b, ranks, scales, t, perm, sid, slices, needs_dx, needs_dlora,
      needs_dbias, dropout_p, seeds, backend):
    return _bwd_fake(dy, x, lora_a, lora_b, needs_dx, needs_dlora, needs_dbias)
