"""Experts as a grouped GEMM over the kept tokens: no FLOPs on empty slots.

The slot table ``[E, C]`` is packed, on device and without a host sync, into
one list of ``E·C`` slots: the kept slots first, sorted by expert (slot order
within an expert), the empty ones last. ``offs[e]`` is where expert e's rows
end. The experts then run as ``torch.nn.functional.grouped_mm`` calls over
those rows (PyTorch's grouped GEMM; ``torch._grouped_mm`` in older
releases): rows past ``offs[-1]`` are neither read nor written by it, so
empty slots cost no FLOPs. Their values are left undefined, which is safe
because every consumer selects on the slot table: dispatch writes zeros
there, and combine and its backward skip slots holding -1 (the Triton
kernels mask their loads; the reference selects rows).

``GroupedMM`` is the autograd Function: the forward and both gradients are
grouped GEMMs (``dA = dOut·Wᵀ`` per group, ``dW = Aᵀ·dOut`` with the groups
along the reduction dimension), no atomics, so the result does not depend on
scheduling. The incoming gradient is made dense first (``grouped_mm`` refuses
the stride-0 gradients of ``sum()``).

Where ``grouped_mm`` runs: PyTorch documents bf16 on CUDA devices of compute
capability 8.0 and up; its CPU implementation takes fp32, bf16 and fp16
(the tests use fp32, and bf16 for ``torch.compile``, whose shape function
accepts bf16 only). Every operand needs 16-byte aligned strides, so ``d_model`` and
``d_hidden`` must be multiples of 16 bytes' worth of elements.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..backend import compute_capability


def grouped_mm_fn() -> Optional[Callable]:
    """The installed PyTorch's grouped GEMM, or None."""
    fn = getattr(torch.nn.functional, "grouped_mm", None)
    return fn if fn is not None else getattr(torch, "_grouped_mm", None)


def grouped_supported(device: torch.device, dtype: torch.dtype, *dims: int) -> tuple[bool, str]:
    """(whether the grouped path runs here, why not). ``dims``: the GEMM
    dimensions that become strides (``d_model``, ``d_hidden``)."""
    if grouped_mm_fn() is None:
        return False, f"torch {torch.__version__} has no grouped_mm"
    if device.type == "cuda":
        if dtype != torch.bfloat16:
            return False, f"grouped_mm on CUDA takes bfloat16, got {dtype}"
        if compute_capability(device) < 80:
            return False, "grouped_mm needs a CUDA device of compute capability 8.0 or newer"
    elif device.type == "cpu":
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False, f"grouped_mm on CPU takes float32, bfloat16 or float16, got {dtype}"
    else:
        return False, f"grouped_mm does not run on {device.type}"
    per16 = 16 // dtype.itemsize
    bad = [d for d in dims if d % per16]
    if bad:
        return False, f"grouped_mm needs dims that are multiples of {per16} for {dtype} (16-byte strides), got {bad}"
    return True, ""


def pack_slots(token_idx: Tensor, gates: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(token_idx [1, E·C], gates [1, E·C], offs [E] int32): the kept slots
    first, by expert, then the empty ones. Differentiable in ``gates``."""
    E, C = token_idx.shape
    flat = token_idx.reshape(-1)
    kept = flat >= 0
    expert = torch.arange(E, device=flat.device).repeat_interleave(C)
    key = torch.where(kept, expert, torch.full_like(expert, E))
    order = torch.sort(key, stable=True).indices
    offs = torch.cumsum(kept.reshape(E, C).sum(1), 0).to(torch.int32)
    return flat[order][None], gates.reshape(-1)[order][None], offs


def row_experts(offs: Tensor, rows: int) -> Tensor:
    """[rows]: the expert each packed row belongs to (rows past the last
    offset get the last expert; their values are unused)."""
    r = torch.arange(rows, device=offs.device, dtype=offs.dtype)
    return torch.searchsorted(offs, r, right=True).clamp_max(offs.numel() - 1)


class GroupedMM(torch.autograd.Function):
    """out [M, N] = a [M, K] · w[e] [K, N] for the rows of each group e
    (``offs``: group ends); rows past ``offs[-1]`` are undefined."""

    @staticmethod
    def forward(ctx, a: Tensor, w: Tensor, offs: Tensor) -> Tensor:
        ctx.save_for_backward(a, w, offs)
        return grouped_mm_fn()(a, w, offs=offs)

    @staticmethod
    def backward(ctx, dout: Tensor):
        a, w, offs = ctx.saved_tensors
        dout = dout.contiguous()
        mm = grouped_mm_fn()
        da = mm(dout, w.transpose(1, 2), offs=offs) if ctx.needs_input_grad[0] else None
        dw = mm(a.t(), dout, offs=offs) if ctx.needs_input_grad[1] else None
        return da, dw, None


class GroupedBias(torch.autograd.Function):
    """out + bias[e] on the rows of each group e. Backward: each group's
    column sums of the gradient, as a grouped GEMM with a ones operand, so
    the undefined rows past ``offs[-1]`` never reach ``dbias`` and the sum
    has a fixed order."""

    @staticmethod
    def forward(ctx, out: Tensor, bias: Tensor, offs: Tensor, experts: Tensor) -> Tensor:
        ctx.save_for_backward(offs)
        return out + bias[:, 0][experts]

    @staticmethod
    def backward(ctx, dout: Tensor):
        (offs,) = ctx.saved_tensors
        dout = dout.contiguous()
        per16 = 16 // dout.element_size()  # the ones operand's width: 16-byte strides
        ones = dout.new_ones((dout.shape[0], per16))
        dbias = grouped_mm_fn()(ones.t(), dout, offs=offs)[:, :1] if ctx.needs_input_grad[1] else None
        return dout, dbias, None, None


def grouped_linear(a: Tensor, w: Tensor, offs: Tensor, bias: Optional[Tensor] = None,
                   experts: Optional[Tensor] = None) -> Tensor:
    """``a · w[e] (+ bias[e])`` over packed rows; ``bias`` [E, 1, N] goes
    by row (``experts``: ``row_experts(offs, M)``)."""
    out = GroupedMM.apply(a, w, offs)
    return out if bias is None else GroupedBias.apply(out, bias, offs, experts)
