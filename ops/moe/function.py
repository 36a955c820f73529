"""MoE dispatch and combine: the autograd Functions and the functional API.

    moe_dispatch(x, token_idx)                      -> [E, C, d]
    moe_combine(expert_out, token_idx, gates, n)    -> [n, d]

Slot tables as in ``routing.py``. Validation lives here, above the backend choice.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import call_op, check_backend
from .op import (combine_bwd_impl, dispatch_impl, moe_combine_bwd_op, moe_dispatch_op, moe_segment_sum_op,
                 segment_sum_impl)


# ---------------------------------------------------------------- autograd
class MoEDispatchFunction(torch.autograd.Function):
    """[E, C, d] = x[token_idx] (zero rows for empty slots). Backward: the
    deterministic segment sum of the slot gradients back onto their tokens."""

    @staticmethod
    def forward(ctx, x, token_idx, backend):
        ctx.save_for_backward(token_idx)
        ctx.num_tokens, ctx.backend = x.shape[0], backend
        return call_op(moe_dispatch_op, dispatch_impl, x, token_idx, backend)

    @staticmethod
    def backward(ctx, dout):
        (token_idx,) = ctx.saved_tensors
        dx = call_op(moe_segment_sum_op, segment_sum_impl, dout, token_idx, None, ctx.num_tokens, ctx.backend)
        return dx, None, None


class MoECombineFunction(torch.autograd.Function):
    """[n, d]: y[t] = Σ gate·expert_out over t's slots (fp32, fixed order).
    Backward: d expert_out = gate·dy[token] and d gate = <dy[token], expert_out>,
    one gather pass."""

    @staticmethod
    def forward(ctx, expert_out, token_idx, gates, num_tokens, backend):
        ctx.save_for_backward(expert_out, token_idx, gates)
        ctx.backend = backend
        return call_op(moe_segment_sum_op, segment_sum_impl, expert_out, token_idx, gates, num_tokens, backend)

    @staticmethod
    def backward(ctx, dy):
        expert_out, token_idx, gates = ctx.saved_tensors
        dout, dgates = call_op(moe_combine_bwd_op, combine_bwd_impl, dy, expert_out, token_idx, gates, ctx.backend)
        return dout, None, dgates.to(gates.dtype), None, None


# ---------------------------------------------------------------- functional
def _check_table(token_idx: Tensor, name: str = "token_idx") -> None:
    if not isinstance(token_idx, Tensor) or token_idx.dim() != 2:
        raise ValueError(f"{name}: expected an [experts, capacity] tensor, got "
                         f"{getattr(token_idx, 'shape', type(token_idx).__name__)}")
    if token_idx.dtype != torch.int64:
        raise ValueError(f"{name}: dtype must be int64, got {token_idx.dtype}")


def moe_dispatch(x: Tensor, token_idx: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Gather tokens into expert slots: ``x [n, d]`` → ``[E, C, d]``; empty
    slots (``token_idx == -1``) give zero rows. Differentiable in x."""
    _check_table(token_idx)
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x: expected a floating [tokens, d] tensor, got {getattr(x, 'shape', type(x))}")
    if token_idx.device != x.device:
        raise ValueError(f"token_idx: must be on x's device {x.device}, got {token_idx.device}")
    return MoEDispatchFunction.apply(x, token_idx, check_backend(backend))


def moe_combine(expert_out: Tensor, token_idx: Tensor, gates: Tensor, num_tokens: int, *,
                backend: Optional[str] = None) -> Tensor:
    """Scatter expert outputs back: ``y [n, d]``, ``y[t] = Σ gate·expert_out``
    over the (0 to E) slots holding t, summed in fp32 in a fixed order
    (bitwise deterministic); tokens no slot holds get 0. Differentiable in
    expert_out and gates."""
    _check_table(token_idx)
    if not isinstance(expert_out, Tensor) or expert_out.dim() != 3 or tuple(expert_out.shape[:2]) != tuple(
            token_idx.shape):
        raise ValueError(f"expert_out: expected [E, C, d] with [E, C] = {tuple(token_idx.shape)}, got "
                         f"{getattr(expert_out, 'shape', type(expert_out))}")
    if not isinstance(gates, Tensor) or tuple(gates.shape) != tuple(token_idx.shape) or not gates.is_floating_point():
        raise ValueError(f"gates: expected a floating tensor of shape {tuple(token_idx.shape)}, got "
                         f"{getattr(gates, 'shape', type(gates))}")
    if not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens: expected a non-negative int, got {num_tokens!r}")
    for name, v in (("token_idx", token_idx), ("gates", gates)):
        if v.device != expert_out.device:
            raise ValueError(f"{name}: must be on expert_out's device {expert_out.device}, got {v.device}")
    return MoECombineFunction.apply(expert_out, token_idx, gates, num_tokens, check_backend(backend))
