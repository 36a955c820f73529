"""Multi-adapter LoRA: the autograd Function and the functional API.

    multi_lora_linear()  ─►  MultiLoRALinearFunction  ─►  posttrain_kernels::multi_lora_fwd / _bwd (op.py)
                                                            ├► launch.py ─► kernels/multi_lora.py
                                                            └► reference.py (CPU tensors)

Validation lives here, above the backend choice.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Optional

import torch
from torch import Tensor

from ..backend import check_backend
from ..common import FLOAT_DTYPES, MAX_RANK, check, check_values, linear_autocast
from ..quant.weight import check_quantized_once, device_of, is_quantized
from .op import run_multi_lora_bwd, run_multi_lora_fwd


# ---------------------------------------------------------------- autograd
class MultiLoRALinearFunction(torch.autograd.Function):
    """Batched multi-adapter LoRA with gradients for x, lora_a, lora_b and
    bias (not for weight, ranks, scales, ids). Saves t (fp32, sorted order)
    and the row order only when some input needs a gradient; the dropout
    masks are regenerated from the seeds, never stored."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, ranks, scales, adapter_ids, slices, dropout_p, seeds,
                backend):
        y, t, perm, sid = run_multi_lora_fwd(x, weight, bias, lora_a, lora_b, ranks, scales, adapter_ids, slices,
                                             dropout_p, seeds, backend)
        dense = isinstance(weight, Tensor)
        ctx.quantized = None if dense else weight  # a quantized frozen weight is kept as it is
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, weight if dense else None, lora_a, lora_b, ranks, scales, t, perm, sid,
                                  dropout_p, seeds)
        ctx.slices, ctx.backend = slices, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(t, perm, sid)
        return y, t, perm, sid

    @staticmethod
    def backward(ctx, dy, _dt, _dperm, _dsid):
        x, weight, lora_a, lora_b, ranks, scales, t, perm, sid, dropout_p, seeds = ctx.saved_tensors
        needs_dx, needs_dbias = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        needs_dlora = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        dx, da, db, dbias = run_multi_lora_bwd(dy, x, weight if ctx.quantized is None else ctx.quantized, lora_a,
                                               lora_b, ranks, scales, t, perm, sid, ctx.slices, needs_dx, needs_dlora,
                                               needs_dbias, dropout_p, seeds, ctx.backend)
        return (dx if needs_dx else None, None, dbias.to(ctx.bias_dtype) if needs_dbias else None,
                da if ctx.needs_input_grad[3] else None, db if ctx.needs_input_grad[4] else None,
                None, None, None, None, None, None, None)


# ---------------------------------------------------------------- functional
_FLT_MAX = torch.finfo(torch.float32).max


def check_multi_lora_args(x, weight, lora_a, lora_b, ranks, scales, adapter_ids, bias, slices, dropout_p):
    """Raise ``ValueError`` naming the bad argument, before any kernel runs
    and whatever the backend; returns (slices as a list or None, slots,
    number of slices). Shapes, dtypes and devices always; the values of the
    index tensors (ids, ranks, scales, rates) as ``ops.common.check_values``
    says (always on CPU; on a GPU one host sync, skipped while capturing a
    CUDA graph or tracing)."""
    quantized = is_quantized(weight)
    if quantized:
        check_quantized_once(weight, "weight")  # a device sync on a GPU: once per storage
    for name, v in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if name == "weight" and quantized:
            continue
        check(isinstance(v, Tensor), name, f"expected a Tensor, got {type(v).__name__}")
        check(v.dtype in FLOAT_DTYPES, name, f"dtype must be float16, bfloat16 or float32, got {v.dtype}")
    for name, v in (("ranks", ranks), ("scales", scales), ("adapter_ids", adapter_ids)):
        check(isinstance(v, Tensor), name, f"expected a Tensor, got {type(v).__name__}")
    check(x.dim() >= 1, "x", "must have at least one dimension [..., in_features]")
    check(len(weight.shape) == 2 and min(weight.shape) >= 1, "weight",
          f"expected [out_features, in_features], both >= 1, got shape {tuple(weight.shape)}")
    N, K = weight.shape
    check(x.shape[-1] == K, "x", f"last dim must be in_features={K}, got shape {tuple(x.shape)}")
    check(quantized or weight.dtype == x.dtype, "weight", f"dtype must match x ({x.dtype}), got {weight.dtype}")
    n_sl = 1
    if slices is not None:
        check(isinstance(slices, (list, tuple))
              and all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in slices), "slices",
              f"expected a list of ints, got {slices!r}")
        slices = [int(w) for w in slices]
        n_sl = len(slices)
        check(n_sl >= 1 and all(w > 0 for w in slices) and sum(slices) == N, "slices",
              f"expected positive widths summing to out_features={N}, got {slices}")
    check(lora_b.dim() == 3 and lora_b.shape[1] == N and lora_b.shape[0] >= 1 and lora_b.shape[2] >= 1, "lora_b",
          f"expected [slots >= 1, {N}, max_rank >= 1], got shape {tuple(lora_b.shape)}")
    S, R = lora_b.shape[0], lora_b.shape[2]
    check(R <= MAX_RANK, "lora_b", f"max_rank = lora_b.shape[2] must be at most {MAX_RANK}, got {R}")
    check(tuple(lora_a.shape) == (S, n_sl * R, K), "lora_a",
          f"expected {(S, n_sl * R, K)}, got shape {tuple(lora_a.shape)}")
    rs_shape = (S,) if slices is None else (n_sl, S)
    check(tuple(ranks.shape) == rs_shape and ranks.dtype == torch.int32, "ranks",
          f"expected int32 {list(rs_shape)}, got {ranks.dtype} {tuple(ranks.shape)}")
    check(tuple(scales.shape) == rs_shape and scales.dtype == torch.float32, "scales",
          f"expected float32 {list(rs_shape)}, got {scales.dtype} {tuple(scales.shape)}")
    M = x.numel() // K
    integer = not (adapter_ids.is_floating_point() or adapter_ids.is_complex() or adapter_ids.dtype == torch.bool)
    check(adapter_ids.numel() == M and integer, "adapter_ids",
          f"expected {M} integer ids (one per token), got {adapter_ids.dtype} {tuple(adapter_ids.shape)}")
    if bias is not None:
        check(isinstance(bias, Tensor) and bias.dtype in FLOAT_DTYPES, "bias",
              f"expected a floating Tensor or None, got {getattr(bias, 'dtype', type(bias).__name__)}")
        check(tuple(bias.shape) == (N,), "bias", f"expected [{N}], got shape {tuple(bias.shape)}")
    for name, v in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("ranks", ranks),
                    ("scales", scales), ("adapter_ids", adapter_ids), ("bias", bias)):
        if v is not None:
            device = device_of(v) if quantized and name == "weight" else v.device
            check(device == x.device, name, f"must be on x's device {x.device}, got {device}")
    if dropout_p is not None:
        check(isinstance(dropout_p, Tensor) and tuple(dropout_p.shape) == (S,) and dropout_p.dtype == torch.float32
              and dropout_p.device == x.device, "dropout_p",
              f"expected a float32 [{S}] tensor on {x.device} (one rate per slot), got {dropout_p!r:.80}")
    check_values((adapter_ids, -1, S - 1, "adapter_ids", f"slot ids (-1 = no adapter; {S} slots)"),
                 (ranks, 0, R, "ranks", f"ranks (max_rank = lora_b.shape[2] = {R})"),
                 (scales, -_FLT_MAX, _FLT_MAX, "scales", "scales (finite)"),
                 (dropout_p, 0.0, 1.0, "dropout_p", "dropout rates"))
    return slices, S, n_sl


def multi_lora_linear(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, ranks: Tensor, scales: Tensor,
                      adapter_ids: Tensor, bias: Optional[Tensor] = None, slices: Optional[list[int]] = None,
                      dropout_p: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """``y[i] = x[i]·weightᵀ + scales[a]·lora_b[a, :, :r_a]·(lora_a[a, :r_a]·x[i]) (+ bias)``
    with ``a = adapter_ids[i]`` (-1: no adapter) and ``r_a = ranks[a]``.

    ``x [..., K]``; ``adapter_ids`` has one entry per token (``x.shape[:-1]``
    flattened). The pool: ``lora_a [SLOTS, R_MAX, K]``, ``lora_b [SLOTS, N,
    R_MAX]``, ``ranks [SLOTS]`` int32 (0 = empty slot), ``scales [SLOTS]``
    fp32 (e.g. ``lora_alpha / r``). Differentiable in x,
    lora_a, lora_b and bias (several adapters trained in one batch); the
    gradient of a slot is zero outside its rank and when no row uses it;
    ``weight`` gets none.

    ``dropout_p``: LoRA dropout per slot, a float32 ``[SLOTS]`` tensor of
    rates in [0, 1] (PEFT's ``lora_dropout`` of each adapter), applied to the
    adapter input whenever given, as ``F.dropout(training=True)`` would; each
    slice of a fused projection draws its own mask. None: no dropout.

    Every argument is checked before any kernel runs (``ValueError`` naming
    it; ids in [-1, SLOTS), ranks in [0, R_MAX]: see docs/reliability.md for
    when device-resident values are checked), and a row's output depends on
    its own adapter only, whatever the other slots hold. Under autocast, x,
    weight and bias are cast as ``nn.Linear`` casts them.

    ``slices``: output widths of fused projections sharing x (fused q/k/v,
    e.g. ``[4096, 1024, 1024]`` with GQA), each with its own adapter: then
    ``lora_a`` is ``[SLOTS, len(slices)·R_MAX, K]`` (slice i at rows
    ``i·R_MAX``), ``lora_b`` ``[SLOTS, N, R_MAX]`` (row n belongs to the slice
    of column n), ``ranks`` / ``scales`` ``[len(slices), SLOTS]``. One launch
    for all slices. ``weight`` may be a quantized frozen weight (``NF4Weight``), as in
    ``lora_linear``: serving many adapters over one 4-bit base.
    """
    # nn.Linear's dtype rule under autocast (a quantized weight is used in x's autocast dtype as it is)
    x, weight, bias, autocast_off = linear_autocast(x, weight, bias)
    autocast_off = autocast_off or contextlib.nullcontext()
    slices, S, n_sl = check_multi_lora_args(x, weight, lora_a, lora_b, ranks, scales, adapter_ids, bias, slices,
                                            dropout_p)
    N, K = weight.shape
    seeds = None
    if dropout_p is not None:
        # device tensors, not Python ints: no host sync, graph capturable
        seeds = torch.randint(0, 2**31 - 1, (n_sl,), device=x.device, dtype=torch.int32)
    with autocast_off:
        y = MultiLoRALinearFunction.apply(x.reshape(-1, K), weight, bias, lora_a, lora_b, ranks, scales,
                                          adapter_ids.reshape(-1), slices, dropout_p, seeds, check_backend(backend))[0]
    return y.reshape(*x.shape[:-1], N)
