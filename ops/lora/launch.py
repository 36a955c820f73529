"""Fused-LoRA launchers: the only code of the feature that touches Triton.

Each launcher: (1) shapes from its arguments, (2) config from the kernel's
spec (pinned, tuned or default; ``autotune/cache.py``), (3) allocate,
(4) launch with keyword arguments. Validation happens once, in the
functional API (``function.py``), before any of this runs.

``lora_fwd_triton`` / ``lora_bwd_triton`` have the signatures of
``reference.lora_fwd_ref`` / ``lora_bwd_ref``: the op (``op.py``) calls one
or the other.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...autotune.cache import select_config
from ...autotune.config import rank_block
from ...autotune.lora import LORA_GRAD, LORA_MATMUL, LORA_SHRINK
from ..backend import device_info, num_sms
from ..common import cdiv, dtype_name
from ..dropout import dropout_threshold


def lora_shrink(x: Tensor, a: Tensor, scale: float, dropout_p: float = 0.0,
                seed: Optional[Tensor] = None) -> Tensor:
    """t [M, R] fp32 = scale · drop(x) [M, K] · aᵀ, with a given as [R, K] (any strides)."""
    M, K = x.shape
    R = a.shape[0]
    t = torch.empty((M, R), device=x.device, dtype=torch.float32)
    if M == 0:
        return t
    cfg = select_config(LORA_SHRINK, dtype_name(x.dtype), device_info(x.device),
                        K=K, R=R, layout="a" if a.stride(1) == 1 else "aT", M=M)
    has_dropout = dropout_p > 0.0
    LORA_SHRINK.fn[(cdiv(M, cfg["BLOCK_M"]),)](
        x_ptr=x, a_ptr=a, t_ptr=t, seed_ptr=seed if has_dropout else t,
        M=M, K=K, R=R,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_ar=a.stride(0), stride_ak=a.stride(1),
        stride_tm=t.stride(0), stride_tr=t.stride(1),
        scale=float(scale) / (1.0 - dropout_p), drop_threshold=dropout_threshold(dropout_p),
        HAS_DROPOUT=has_dropout, **LORA_SHRINK.launch_kwargs(cfg, rank_block(R)),
    )
    return t


def lora_matmul(x: Tensor, w: Tensor, t: Tensor, u: Tensor, bias: Optional[Tensor], scale: float,
                dropout_p: float = 0.0, seed: Optional[Tensor] = None) -> Tensor:
    """y [M, N] = x [M, K]·wᵀ + scale·(t [M, R]·uᵀ)(⊙ keep/(1-p)) + bias, w as [N, K], u as [N, R]."""
    M, K = x.shape
    N = w.shape[0]
    R = t.shape[1]
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    cfg = select_config(LORA_MATMUL, dtype_name(x.dtype), device_info(x.device),
                        N=N, K=K, layout="w" if w.stride(1) == 1 else "wT", M=M)
    has_dropout = dropout_p > 0.0
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    LORA_MATMUL.fn[grid](
        x_ptr=x, w_ptr=w, t_ptr=t, u_ptr=u,
        bias_ptr=bias.contiguous() if bias is not None else y, y_ptr=y,  # the kernel reads bias at unit stride
        seed_ptr=seed if has_dropout else y,
        M=M, N=N, K=K, R=R,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_wn=w.stride(0), stride_wk=w.stride(1),
        stride_tm=t.stride(0), stride_tr=t.stride(1),
        stride_un=u.stride(0), stride_ur=u.stride(1),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        scale=float(scale) / (1.0 - dropout_p), drop_threshold=dropout_threshold(dropout_p),
        HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, EVEN_K=K % cfg["BLOCK_K"] == 0,
        **LORA_MATMUL.launch_kwargs(cfg),
    )
    return y


def lora_grad(x: Tensor, t: Tensor, scale: float, dropout_p: float = 0.0,
              seed: Optional[Tensor] = None, transpose_out: bool = False) -> Tensor:
    """o [P, R] fp32 = scale · drop(x)ᵀ [P, M] · t [M, R], reduced over M deterministically.

    ``x`` [M, P] is x for dA and dY for dB. ``transpose_out`` returns oᵀ
    [R, P] instead (contiguous; the kernel writes the transposed slabs
    directly)."""
    M, P = x.shape
    R = t.shape[1]
    cfg = select_config(LORA_GRAD, dtype_name(x.dtype), device_info(x.device),
                        P=P, R=R, layout="oT" if transpose_out else "o", M=M)
    block_m, block_p = cfg["BLOCK_M"], cfg["BLOCK_P"]
    # Split M so that the grid fills the machine about twice; every split
    # owns a whole number of BLOCK_M rows. The split count depends only on
    # the shape and the device, so the summation order is fixed.
    p_blocks = cdiv(P, block_p)
    m_blocks = max(1, cdiv(M, block_m))
    split = max(1, min(m_blocks, cdiv(2 * num_sms(x.device), p_blocks)))
    rows_per_split = cdiv(m_blocks, split) * block_m
    split = max(1, cdiv(M, rows_per_split))
    if transpose_out:
        partial = torch.empty((split, R, P), device=x.device, dtype=torch.float32)
        stride_op, stride_or = partial.stride(2), partial.stride(1)
    else:
        partial = torch.empty((split, P, R), device=x.device, dtype=torch.float32)
        stride_op, stride_or = partial.stride(1), partial.stride(2)
    has_dropout = dropout_p > 0.0
    LORA_GRAD.fn[(p_blocks, split)](
        x_ptr=x, t_ptr=t, o_ptr=partial, seed_ptr=seed if has_dropout else partial,
        M=M, P=P, R=R, rows_per_split=rows_per_split,
        stride_xm=x.stride(0), stride_xp=x.stride(1),
        stride_tm=t.stride(0), stride_tr=t.stride(1),
        stride_os=partial.stride(0), stride_op=stride_op, stride_or=stride_or,
        scale=float(scale) / (1.0 - dropout_p), drop_threshold=dropout_threshold(dropout_p),
        HAS_DROPOUT=has_dropout, **LORA_GRAD.launch_kwargs(cfg, rank_block(R)),
    )
    # Fixed-order sum over the splits (no atomics anywhere): bitwise reproducible.
    return partial[0] if split == 1 else partial.sum(0)


def lora_fwd_triton(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed):
    """(y [M, N] in x.dtype, t [M, R] fp32) for a 2-D x [M, K]: shrink, then one fused GEMM."""
    t = lora_shrink(x, lora_a, 1.0, dropout_p, seed)
    y = lora_matmul(x, weight, t, lora_b, bias, scale)
    return y, t


def lora_bwd_triton(dy, x, weight, lora_a, lora_b, t, scale, dropout_p, seed, needs_dx, needs_dbias):
    """(dx [M, K] or empty, dA [R, K], dB [N, R], dbias [N] fp32 or empty)."""
    M = x.shape[0]
    if M == 0:
        dt = dy.new_empty((0, lora_a.shape[0]), dtype=torch.float32)
    else:
        # dt = s·dY·B: B [N, R] read as the "A" [R, N] of the shrink.
        dt = lora_shrink(dy, lora_b.t(), scale)
    # dB = s·dYᵀ·t [N, R]; dA = dtᵀ·drop(x) [R, K], reduced as (drop(x)ᵀ·dt)ᵀ.
    db = lora_grad(dy, t, scale) if M else dy.new_zeros(lora_b.shape, dtype=torch.float32)
    da = (lora_grad(x, dt, 1.0, dropout_p, seed, transpose_out=True) if M
          else x.new_zeros(lora_a.shape, dtype=torch.float32))
    if needs_dx:
        # dx = dY·W0 + (dt·A)⊙keep/(1-p): W0 [N, K] read as a [K, N] "w",
        # A [R, K] read as a [K, R] "u".
        dx = lora_matmul(dy, weight.t(), dt, lora_a.t(), None, 1.0, dropout_p, seed)
    else:
        dx = x.new_empty(0)
    dbias = dy.sum(0, dtype=torch.float32) if needs_dbias else dy.new_empty(0, dtype=torch.float32)
    return dx, da.to(lora_a.dtype), db.to(lora_b.dtype), dbias
