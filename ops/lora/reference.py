"""Fused LoRA in plain PyTorch: the references of the two ops, with the
launchers' signatures, and PEFT's differentiable formula for the tests.

They run on CPU tensors (the default backend there) and are what the tests
compare the kernels against. Dropout uses the kernels' hash (``ops/dropout.py``),
so reference and kernels drop exactly the same elements.
"""
from __future__ import annotations

import torch

from ..dropout import dropout_keep_ref


def _dropped(x2d: torch.Tensor, dropout_p: float, seed: torch.Tensor | None) -> torch.Tensor:
    if dropout_p == 0.0:
        return x2d
    keep = dropout_keep_ref(seed, x2d.shape[0], x2d.shape[1], dropout_p)
    return torch.where(keep, x2d, 0) / (1.0 - dropout_p)


def lora_fwd_ref(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed):
    """(y, t): y = x·Wᵀ + s·t·Bᵀ + bias with t = drop(x)·Aᵀ; x is [M, K].

    Computed in fp32 on upcast inputs; y in x's dtype, t in fp32 (as saved
    by the kernels for the backward).
    """
    xf = x.float()
    t = _dropped(xf, dropout_p, seed) @ lora_a.float().t()
    y = xf @ weight.float().t() + scale * (t @ lora_b.float().t())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype), t


def lora_bwd_ref(dy, x, weight, lora_a, lora_b, t, scale, dropout_p, seed,
                 needs_dx=True, needs_dbias=False):
    """(dx, dA, dB, dbias) of ``lora_fwd_ref``; dx and dbias are empty when
    not asked for (as the op returns them)."""
    dyf = dy.float()
    dt = scale * (dyf @ lora_b.float())
    db = scale * (dyf.t() @ t.float())
    da = dt.t() @ _dropped(x.float(), dropout_p, seed)
    if needs_dx:
        lora_dx = dt @ lora_a.float()
        if dropout_p:
            lora_dx = _dropped(lora_dx, dropout_p, seed)
        dx = (dyf @ weight.float() + lora_dx).to(x.dtype)
    else:
        dx = x.new_empty(0)
    dbias = dyf.sum(0) if needs_dbias else dy.new_empty(0, dtype=torch.float32)
    return dx, da.to(lora_a.dtype), db.to(lora_b.dtype), dbias


def lora_linear_ref(x, weight, lora_a, lora_b, scale, bias=None, dropout_p=0.0, seed=None,
                    compute_dtype=None):
    """Differentiable LoRA linear for tests, PEFT's formula.

    ``compute_dtype`` runs every operand and every product in that dtype
    (bf16/fp16 = the low-precision baseline of the tolerance rule; fp64 = the
    high-precision reference); None keeps the inputs' dtypes.
    """
    if compute_dtype is not None:
        x, weight, lora_a, lora_b = (v.to(compute_dtype) for v in (x, weight, lora_a, lora_b))
        bias = None if bias is None else bias.to(compute_dtype)
    x2d = x.reshape(-1, x.shape[-1])
    lora_in = _dropped(x2d, dropout_p, seed) if dropout_p else x2d
    y = x2d @ weight.t() + scale * ((lora_in @ lora_a.t()) @ lora_b.t())
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])
