"""The MoE ops: ``posttrain_kernels::moe_dispatch``, ``moe_segment_sum``,
``moe_combine_bwd``. Each runs the Triton launchers (``launch.py``) or the
PyTorch reference (``reference.py``), by the backend rule of
``ops/backend.py``, and has a fake implementation for tracing.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import use_triton
from .launch import moe_combine_bwd_triton, moe_dispatch_triton, moe_segment_sum_triton
from .reference import moe_combine_bwd_ref, moe_dispatch_ref, moe_segment_sum_ref


def dispatch_impl(x: Tensor, token_idx: Tensor, backend: str) -> Tensor:
    """[E, C, d]: x[token_idx], zero rows for empty slots."""
    impl = moe_dispatch_triton if use_triton(x.device, backend) else moe_dispatch_ref
    return impl(x, token_idx)


def segment_sum_impl(src: Tensor, token_idx: Tensor, gates: Optional[Tensor], num_tokens: int,
                     backend: str) -> Tensor:
    """Σ over each token's slots of gate·src (gates None = 1); src [E, C, d]."""
    impl = moe_segment_sum_triton if use_triton(src.device, backend) else moe_segment_sum_ref
    return impl(src, token_idx, gates, num_tokens)


def combine_bwd_impl(dy: Tensor, expert_out: Tensor, token_idx: Tensor, gates: Tensor,
                     backend: str) -> tuple[Tensor, Tensor]:
    """(d expert_out [E, C, d], d gates [E, C] fp32)."""
    impl = moe_combine_bwd_triton if use_triton(dy.device, backend) else moe_combine_bwd_ref
    return impl(dy, expert_out, token_idx, gates)


moe_dispatch_op = torch.library.custom_op("posttrain_kernels::moe_dispatch", mutates_args=())(dispatch_impl)
moe_segment_sum_op = torch.library.custom_op("posttrain_kernels::moe_segment_sum",
                                             mutates_args=())(segment_sum_impl)
moe_combine_bwd_op = torch.library.custom_op("posttrain_kernels::moe_combine_bwd",
                                             mutates_args=())(combine_bwd_impl)


@moe_dispatch_op.register_fake
def _(x, token_idx, backend):
    return x.new_empty((*token_idx.shape, x.shape[-1]))


@moe_segment_sum_op.register_fake
def _(src, token_idx, gates, num_tokens, backend):
    return src.new_empty((num_tokens, src.shape[-1]))


@moe_combine_bwd_op.register_fake
def _(dy, expert_out, token_idx, gates, backend):
    return expert_out.new_empty(expert_out.shape), gates.new_empty(gates.shape, dtype=torch.float32)
