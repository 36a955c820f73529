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
from ..common import check, check_values
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
def _check_table(token_idx: Tensor, num_tokens: int) -> None:
    """A slot table: int64 [E, C], every entry -1 (empty) or a token in
    [0, num_tokens). Values as ``ops.common.check_values`` says."""
    check(isinstance(token_idx, Tensor) and token_idx.dim() == 2, "token_idx",
          f"expected an [experts, capacity] tensor, got {getattr(token_idx, 'shape', type(token_idx).__name__)}")
    check(token_idx.dtype == torch.int64, "token_idx", f"dtype must be int64, got {token_idx.dtype}")
    check_values((token_idx, -1, num_tokens - 1, "token_idx", f"token indices (-1 = empty slot; {num_tokens} tokens)"))


def moe_dispatch(x: Tensor, token_idx: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Gather tokens into expert slots: ``x [n, d]`` → ``[E, C, d]``; empty
    slots (``token_idx == -1``) give zero rows. Differentiable in x.
    ``token_idx`` values outside [-1, n) raise ``ValueError`` (see
    docs/reliability.md for when device-resident values are checked)."""
    check(isinstance(x, Tensor) and x.dim() == 2 and x.is_floating_point(), "x",
          f"expected a floating [tokens, d] tensor, got {getattr(x, 'shape', type(x).__name__)}")
    _check_table(token_idx, x.shape[0])
    check(token_idx.device == x.device, "token_idx", f"must be on x's device {x.device}, got {token_idx.device}")
    return MoEDispatchFunction.apply(x, token_idx, check_backend(backend))


def moe_combine(expert_out: Tensor, token_idx: Tensor, gates: Tensor, num_tokens: int, *,
                backend: Optional[str] = None) -> Tensor:
    """Scatter expert outputs back: ``y [n, d]``, ``y[t] = Σ gate·expert_out``
    over the (0 to E) slots holding t, summed in fp32 in a fixed order
    (bitwise deterministic); tokens no slot holds get 0. Differentiable in
    expert_out and gates."""
    check(isinstance(num_tokens, int) and not isinstance(num_tokens, bool) and num_tokens >= 0, "num_tokens",
          f"expected a non-negative int, got {num_tokens!r}")
    check(isinstance(token_idx, Tensor) and token_idx.dim() == 2, "token_idx",
          f"expected an [experts, capacity] tensor, got {getattr(token_idx, 'shape', type(token_idx).__name__)}")
    check(isinstance(expert_out, Tensor) and expert_out.dim() == 3 and expert_out.is_floating_point()
          and tuple(expert_out.shape[:2]) == tuple(token_idx.shape), "expert_out",
          f"expected a floating [E, C, d] tensor with [E, C] = {tuple(token_idx.shape)}, got "
          f"{getattr(expert_out, 'shape', type(expert_out).__name__)}")
    check(isinstance(gates, Tensor) and tuple(gates.shape) == tuple(token_idx.shape) and gates.is_floating_point(),
          "gates", f"expected a floating tensor of shape {tuple(token_idx.shape)}, got "
          f"{getattr(gates, 'shape', type(gates).__name__)}")
    for name, v in (("token_idx", token_idx), ("gates", gates)):
        check(v.device == expert_out.device, name, f"must be on expert_out's device {expert_out.device}, got {v.device}")
    _check_table(token_idx, num_tokens)
    return MoECombineFunction.apply(expert_out, token_idx, gates, num_tokens, check_backend(backend))
