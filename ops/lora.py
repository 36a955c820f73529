"""Fused LoRA: launchers, torch.library ops, autograd Function, functional.

Layers, top to bottom:

    lora_linear()  ─►  LoRALinearFunction  ─►  posttrain_kernels::lora_fwd / lora_bwd
                                               ─► launchers (this file) ─► kernels/lora.py
                                               └► ops/reference.py (CPU tensors)
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..autotune import cache as tuning
from ..autotune import configs as cfgs
from ..kernels.lora import _lora_grad_kernel, _lora_matmul_kernel, _lora_shrink_kernel
from . import reference as ref
from .common import cdiv, check, dtype_name
from .backend import call_op, check_backend, compute_capability, device_info, num_sms, use_triton

MAX_RANK = 256
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _config(kernel: str, device: torch.device, dtype: torch.dtype, default, **dims):
    """Pinned, tuned (user cache, then shipped) or heuristic config; see
    autotune/cache.py for the order. ``dims`` form the cache key."""
    return tuning.select_memo(kernel, dtype_name(dtype), dims, device_info(device), default)


# ---------------------------------------------------------------- launchers
# Each launcher: (1) shapes from its arguments, (2) allocate, (3) launch with
# keyword arguments. Validation happens once, in the functional API.

def lora_shrink(x: Tensor, a: Tensor, scale: float, dropout_p: float = 0.0,
                seed: Optional[Tensor] = None) -> Tensor:
    """t [M, R] fp32 = scale · drop(x) [M, K] · aᵀ, with a given as [R, K] (any strides)."""
    M, K = x.shape
    R = a.shape[0]
    t = torch.empty((M, R), device=x.device, dtype=torch.float32)
    if M == 0:
        return t
    block_r = cfgs.rank_block(R)
    cfg = _config("lora_shrink", x.device, x.dtype,
                  lambda: cfgs.default_lora_shrink(M, K, block_r, dtype_name(x.dtype), compute_capability(x.device)),
                  K=K, R=R, layout="a" if a.stride(1) == 1 else "aT", M=M)
    has_dropout = dropout_p > 0.0
    _lora_shrink_kernel[(cdiv(M, cfg["BLOCK_M"]),)](
        x_ptr=x, a_ptr=a, t_ptr=t, seed_ptr=seed if has_dropout else t,
        M=M, K=K, R=R,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_ar=a.stride(0), stride_ak=a.stride(1),
        stride_tm=t.stride(0), stride_tr=t.stride(1),
        scale=float(scale) / (1.0 - dropout_p), drop_threshold=ref.dropout_threshold(dropout_p),
        HAS_DROPOUT=has_dropout, BLOCK_R=block_r, **cfg.launch_kwargs(),
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
    cfg = _config("lora_matmul", x.device, x.dtype,
                  lambda: cfgs.default_lora_matmul(M, N, K, dtype_name(x.dtype), compute_capability(x.device)),
                  N=N, K=K, layout="w" if w.stride(1) == 1 else "wT", M=M)
    has_dropout = dropout_p > 0.0
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    _lora_matmul_kernel[grid](
        x_ptr=x, w_ptr=w, t_ptr=t, u_ptr=u,
        bias_ptr=bias if bias is not None else y, y_ptr=y,
        seed_ptr=seed if has_dropout else y,
        M=M, N=N, K=K, R=R,
        stride_xm=x.stride(0), stride_xk=x.stride(1),
        stride_wn=w.stride(0), stride_wk=w.stride(1),
        stride_tm=t.stride(0), stride_tr=t.stride(1),
        stride_un=u.stride(0), stride_ur=u.stride(1),
        stride_ym=y.stride(0), stride_yn=y.stride(1),
        scale=float(scale) / (1.0 - dropout_p), drop_threshold=ref.dropout_threshold(dropout_p),
        HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, EVEN_K=K % cfg["BLOCK_K"] == 0,
        **cfg.launch_kwargs(),
    )
    return y


def lora_grad(g: Tensor, t: Tensor, scale: float, dropout_p: float = 0.0,
              seed: Optional[Tensor] = None, transpose_out: bool = False) -> Tensor:
    """o [P, R] fp32 = scale · drop(g)ᵀ [P, M] · t [M, R], reduced over M deterministically.

    ``transpose_out`` returns oᵀ [R, P] instead (contiguous; the kernel writes
    the transposed slabs directly)."""
    M, P = g.shape
    R = t.shape[1]
    block_r = cfgs.rank_block(R)
    cfg = _config("lora_grad", g.device, g.dtype,
                  lambda: cfgs.default_lora_grad(M, P, block_r, dtype_name(g.dtype), compute_capability(g.device)),
                  P=P, R=R, layout="oT" if transpose_out else "o", M=M)
    block_m, block_p = cfg["BLOCK_M"], cfg["BLOCK_P"]
    # Split M so that the grid fills the machine about twice; every split
    # owns a whole number of BLOCK_M rows. The split count depends only on
    # the shape and the device, so the summation order is fixed.
    p_blocks = cdiv(P, block_p)
    m_blocks = max(1, cdiv(M, block_m))
    split = max(1, min(m_blocks, cdiv(2 * num_sms(g.device), p_blocks)))
    rows_per_split = cdiv(m_blocks, split) * block_m
    split = max(1, cdiv(M, rows_per_split))
    if transpose_out:
        partial = torch.empty((split, R, P), device=g.device, dtype=torch.float32)
        stride_op, stride_or = partial.stride(2), partial.stride(1)
    else:
        partial = torch.empty((split, P, R), device=g.device, dtype=torch.float32)
        stride_op, stride_or = partial.stride(1), partial.stride(2)
    has_dropout = dropout_p > 0.0
    _lora_grad_kernel[(p_blocks, split)](
        g_ptr=g, t_ptr=t, o_ptr=partial, seed_ptr=seed if has_dropout else partial,
        M=M, P=P, R=R, rows_per_split=rows_per_split,
        stride_gm=g.stride(0), stride_gp=g.stride(1),
        stride_tm=t.stride(0), stride_tr=t.stride(1),
        stride_os=partial.stride(0), stride_op=stride_op, stride_or=stride_or,
        scale=float(scale) / (1.0 - dropout_p), drop_threshold=ref.dropout_threshold(dropout_p),
        HAS_DROPOUT=has_dropout, BLOCK_R=block_r, **cfg.launch_kwargs(),
    )
    # Fixed-order sum over the splits (no atomics anywhere): bitwise reproducible.
    return partial[0] if split == 1 else partial.sum(0)


def _lora_fwd_triton(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed):
    t = lora_shrink(x, lora_a, 1.0, dropout_p, seed)
    y = lora_matmul(x, weight, t, lora_b, bias, scale)
    return y, t


def _lora_bwd_triton(dy, x, weight, lora_a, lora_b, t, scale, dropout_p, seed, needs_dx, needs_dbias):
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


# ---------------------------------------------------------------- torch.library ops
def _lora_fwd_impl(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, bias: Optional[Tensor],
                   scale: float, dropout_p: float, seed: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    """(y [M, N] in x.dtype, t [M, R] fp32) for a 2-D x [M, K]."""
    if use_triton(x.device, backend):
        return _lora_fwd_triton(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed)
    return ref.lora_fwd_ref(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed)


def _lora_bwd_impl(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, t: Tensor,
                   scale: float, dropout_p: float, seed: Optional[Tensor], needs_dx: bool, needs_dbias: bool,
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx [M, K] or empty, dA [R, K], dB [N, R], dbias [N] fp32 or empty)."""
    if use_triton(dy.device, backend):
        return _lora_bwd_triton(dy, x, weight, lora_a, lora_b, t, scale, dropout_p, seed,
                                needs_dx, needs_dbias)
    return ref.lora_bwd_ref(dy, x, weight, lora_a, lora_b, t, scale, dropout_p, seed, needs_dx, needs_dbias)


lora_fwd = torch.library.custom_op("posttrain_kernels::lora_fwd", mutates_args=())(_lora_fwd_impl)
lora_bwd = torch.library.custom_op("posttrain_kernels::lora_bwd", mutates_args=())(_lora_bwd_impl)


@lora_fwd.register_fake
def _(x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, backend):
    M, N, R = x.shape[0], weight.shape[0], lora_a.shape[0]
    return x.new_empty((M, N)), x.new_empty((M, R), dtype=torch.float32)


@lora_bwd.register_fake
def _(dy, x, weight, lora_a, lora_b, t, scale, dropout_p, seed, needs_dx, needs_dbias, backend):
    dx = x.new_empty(x.shape) if needs_dx else x.new_empty(0)
    dbias = dy.new_empty((dy.shape[1],) if needs_dbias else (0,), dtype=torch.float32)
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape), dbias


# ---------------------------------------------------------------- autograd
class LoRALinearFunction(torch.autograd.Function):
    """y = x·W0ᵀ + scale·(drop(x)·Aᵀ)·Bᵀ + bias. W0 gets no gradient.

    Saves x, t (fp32 [M, R]) and the dropout seed; the mask is regenerated
    in the backward, never stored.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, backend):
        x2d = x.reshape(-1, x.shape[-1])
        y, t = call_op(lora_fwd, _lora_fwd_impl, x2d, weight, lora_a, lora_b, bias, scale,
                         dropout_p, seed, backend)
        ctx.save_for_backward(x2d, weight, lora_a, lora_b, t, seed)
        ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_a, lora_b, t, seed = ctx.saved_tensors
        needs_dx = ctx.needs_input_grad[0]
        needs_dbias = ctx.needs_input_grad[4]
        dx, da, db, dbias = call_op(
            lora_bwd, _lora_bwd_impl, dy.reshape(-1, dy.shape[-1]), x2d, weight, lora_a, lora_b, t,
            ctx.scale, ctx.dropout_p, seed, needs_dx, needs_dbias, ctx.backend)
        return (dx.reshape(ctx.x_shape) if needs_dx else None, None, da, db,
                dbias.to(ctx.bias_dtype) if needs_dbias else None, None, None, None, None)


# ---------------------------------------------------------------- functional
def check_lora_args(x, weight, lora_a, lora_b, scale, bias, dropout_p) -> None:
    """Raise ValueError naming the bad argument, before any kernel runs."""
    for name, v in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        check(isinstance(v, Tensor), name, f"expected a Tensor, got {type(v).__name__}")
        check(v.dtype in FLOAT_DTYPES, name, f"dtype must be float16, bfloat16 or float32, got {v.dtype}")
    check(x.dim() >= 1, "x", "must have at least one dimension [..., in_features]")
    check(weight.dim() == 2, "weight", f"expected [out_features, in_features], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    check(K >= 1 and N >= 1, "weight", f"needs at least one in- and out-feature, got shape {tuple(weight.shape)}")
    check(x.shape[-1] == K, "x", f"last dim must be in_features={K}, got shape {tuple(x.shape)}")
    check(weight.dtype == x.dtype, "weight", f"dtype must match x ({x.dtype}), got {weight.dtype}")
    check(lora_a.dim() == 2 and lora_a.shape[1] == K, "lora_a",
           f"expected [r, in_features={K}], got shape {tuple(lora_a.shape)}")
    R = lora_a.shape[0]
    check(1 <= R <= MAX_RANK, "lora_a", f"rank r = lora_a.shape[0] must be in [1, {MAX_RANK}], got {R}")
    check(tuple(lora_b.shape) == (N, R), "lora_b",
           f"expected [out_features={N}, r={R}], got shape {tuple(lora_b.shape)}")
    if bias is not None:
        check(isinstance(bias, Tensor), "bias", f"expected a Tensor or None, got {type(bias).__name__}")
        check(tuple(bias.shape) == (N,), "bias", f"expected [out_features={N}], got shape {tuple(bias.shape)}")
        check(bias.dtype in FLOAT_DTYPES, "bias", f"dtype must be floating, got {bias.dtype}")
    for name, v in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if v is not None:
            check(v.device == x.device, name, f"must be on x's device {x.device}, got {v.device}")
    check(isinstance(scale, (int, float)) and math.isfinite(scale), "scale",
           f"expected a finite float, got {scale!r}")
    check(isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0, "dropout_p",
           f"must be in [0, 1), got {dropout_p!r}")


def lora_linear(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                bias: Optional[Tensor] = None, dropout_p: float = 0.0, *,
                backend: Optional[str] = None) -> Tensor:
    """Fused LoRA linear: ``x·weightᵀ + scale·(dropout(x)·lora_aᵀ)·lora_bᵀ + bias``.

    Shapes as PEFT: ``x [..., K]``, ``weight [N, K]``, ``lora_a [r, K]``,
    ``lora_b [N, r]``, ``bias [N]``; returns ``[..., N]`` in x's dtype.
    ``weight`` gets no gradient. Dropout (on the LoRA input only) is applied
    whenever ``dropout_p > 0``, as ``F.dropout(training=True)`` would.
    ``backend``: ``"auto"`` (default), ``"triton"`` or ``"reference"``; see
    ``ops/backend.py``.
    """
    check_lora_args(x, weight, lora_a, lora_b, scale, bias, dropout_p)
    backend = check_backend(backend)
    dropout_p = float(dropout_p)
    seed = None
    if dropout_p > 0.0:
        # A device tensor, not a Python int: no host sync, graph capturable.
        seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int32)
    return LoRALinearFunction.apply(x, weight, lora_a, lora_b, bias, float(scale), dropout_p, seed, backend)
