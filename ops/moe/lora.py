"""LoRA on MoE experts: the ops, the autograd Function and the functional API.

    expert_lora_linear(x, weight, ends, lora_a, lora_b, scale)  ->  [M, N]

over packed rows grouped by expert (``grouped.pack_slots``), each expert's
frozen GEMM with its adapter fused in (``kernels/moe_lora.py``):
``y_e = x_e·W_e + s_e·(drop(x_e)·A_eᵀ)·B_eᵀ (+ bias_e)``. The ops
``posttrain_kernels::expert_lora_fwd`` / ``expert_lora_bwd`` run the Triton
launchers (``lora_launch.py``) or the references (``reference.py``) by the
backend rule of ``ops/backend.py``. Validation lives here, above the backend
choice.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..backend import call_op, check_backend, use_triton
from ..common import FLOAT_DTYPES, MAX_RANK, check, check_values, is_fp32_number, linear_autocast
from .lora_launch import expert_lora_bwd_triton, expert_lora_fwd_triton, expert_lora_mixed_triton
from .reference import expert_lora_bwd_ref, expert_lora_fwd_ref, expert_lora_mixed_ref, expert_rows

WEIGHT_LAYOUTS = ("in_out", "out_in")


# ---------------------------------------------------------------- ops
def expert_lora_fwd_impl(x: Tensor, weight: Tensor, ends: Tensor, lora_a: Tensor, lora_b: Tensor, ranks: Tensor,
                         scales: Tensor, bias: Optional[Tensor], dropout_p: float, seed: Optional[Tensor],
                         backend: str) -> tuple[Tensor, Tensor]:
    """(y [M, N], t [M, R] fp32); weight read as [E, K, N]."""
    impl = expert_lora_fwd_triton if use_triton(x.device, backend) else expert_lora_fwd_ref
    return impl(x, weight, ends, lora_a, lora_b, ranks, scales, bias, dropout_p, seed)


def expert_lora_bwd_impl(dy: Tensor, x: Tensor, weight: Tensor, ends: Tensor, lora_a: Tensor, lora_b: Tensor,
                         ranks: Tensor, scales: Tensor, t: Tensor, dropout_p: float, seed: Optional[Tensor],
                         needs_dx: bool, needs_dbias: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx or empty, dA [E, R, K], dB [E, N, R], dbias [E, N] or empty), gradients in fp32."""
    impl = expert_lora_bwd_triton if use_triton(dy.device, backend) else expert_lora_bwd_ref
    return impl(dy, x, weight, ends, lora_a, lora_b, ranks, scales, t, dropout_p, seed, needs_dx, needs_dbias)


def expert_lora_mixed_impl(x: Tensor, weight: Tensor, ends: Tensor, lora_a: Tensor, lora_b: Tensor, ranks: Tensor,
                           scales: Tensor, adapter_ids: Tensor, bias: Optional[Tensor], backend: str) -> Tensor:
    """y [M, N] of a mixed batch (inference); weight read as [E, K, N]."""
    impl = expert_lora_mixed_triton if use_triton(x.device, backend) else expert_lora_mixed_ref
    return impl(x, weight, ends, lora_a, lora_b, ranks, scales, adapter_ids, bias)


expert_lora_fwd = torch.library.custom_op("posttrain_kernels::expert_lora_fwd",
                                          mutates_args=())(expert_lora_fwd_impl)
expert_lora_bwd = torch.library.custom_op("posttrain_kernels::expert_lora_bwd",
                                          mutates_args=())(expert_lora_bwd_impl)
expert_lora_mixed = torch.library.custom_op("posttrain_kernels::expert_lora_mixed",
                                            mutates_args=())(expert_lora_mixed_impl)


@expert_lora_mixed.register_fake
def _(x, weight, ends, lora_a, lora_b, ranks, scales, adapter_ids, bias, backend):
    return x.new_empty((x.shape[0], weight.shape[2]))


@expert_lora_fwd.register_fake
def _(x, weight, ends, lora_a, lora_b, ranks, scales, bias, dropout_p, seed, backend):
    return x.new_empty((x.shape[0], weight.shape[2])), x.new_empty((x.shape[0], lora_a.shape[1]), dtype=torch.float32)


@expert_lora_bwd.register_fake
def _(dy, x, weight, ends, lora_a, lora_b, ranks, scales, t, dropout_p, seed, needs_dx, needs_dbias, backend):
    E, R, K = lora_a.shape
    N = weight.shape[2]
    f32 = dict(dtype=torch.float32)
    return (x.new_empty(x.shape) if needs_dx else x.new_empty(0), x.new_empty((E, R, K), **f32),
            x.new_empty((E, N, R), **f32), x.new_empty((E, N) if needs_dbias else (0,), **f32))


# ---------------------------------------------------------------- autograd
class ExpertLoRAFunction(torch.autograd.Function):
    """y = x·W_e + s_e·(drop(x)·A_eᵀ)·B_eᵀ + bias_e per expert's rows. Saves x,
    t (fp32 [M, R]) and the dropout seed (the mask is regenerated). A frozen
    weight gets no gradient; a trainable one gets its gradient from a loop
    over experts (``_weight_grad``: a slow path with a host sync, for
    completeness)."""

    @staticmethod
    def forward(ctx, x, weight, ends, lora_a, lora_b, ranks, scales, bias, dropout_p, seed, backend):
        y, t = call_op(expert_lora_fwd, expert_lora_fwd_impl, x, weight, ends, lora_a, lora_b, ranks, scales, bias,
                       dropout_p, seed, backend)
        ctx.save_for_backward(x, weight, ends, lora_a, lora_b, ranks, scales, t, seed)
        ctx.dropout_p, ctx.backend = dropout_p, backend
        ctx.bias_shape = None if bias is None else bias.shape
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, ends, lora_a, lora_b, ranks, scales, t, seed = ctx.saved_tensors
        needs_dx, needs_dw, needs_dbias = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[7]
        dx, da, db, dbias = call_op(expert_lora_bwd, expert_lora_bwd_impl, dy, x, weight, ends, lora_a, lora_b, ranks,
                                    scales, t, ctx.dropout_p, seed, needs_dx, needs_dbias, ctx.backend)
        dw = _weight_grad(x, dy, ends, weight) if needs_dw else None
        return (dx if needs_dx else None, dw, None, da.to(lora_a.dtype), db.to(lora_b.dtype), None, None,
                dbias.reshape(ctx.bias_shape).to(dy.dtype) if needs_dbias else None, None, None, None)


def _weight_grad(x: Tensor, dy: Tensor, ends: Tensor, weight: Tensor) -> Tensor:
    """dW_e = x_eᵀ·dY_e per expert (fp32 sums), shaped as ``weight`` [E, K, N]."""
    dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
    for e, lo, hi in expert_rows(ends, x.shape[0]):
        dw[e] = x[lo:hi].float().t() @ dy[lo:hi].float()
    return dw.to(weight.dtype)


# ---------------------------------------------------------------- functional
def _in_out(x, weight, bias, weight_layout: str):
    """``(x, weight as [E, in, out], bias, autocast context)``: ``nn.Linear``'s autocast rule
    (``linear_autocast``), then transformers' ``[E, out, in]`` read as a transposed view."""
    check(weight_layout in WEIGHT_LAYOUTS, "weight_layout", f"expected one of {WEIGHT_LAYOUTS}, got {weight_layout!r}")
    x, weight, bias, autocast_off = linear_autocast(x, weight, bias)
    if isinstance(weight, Tensor) and weight.dim() == 3 and weight_layout == "out_in":
        weight = weight.transpose(1, 2)
    return x, weight, bias, autocast_off


def _outside_autocast(autocast_off, fn, *args):
    """``fn(*args)``, inside ``autocast_off`` (the op's internals without autocast) when there is one."""
    if autocast_off is None:
        return fn(*args)
    with autocast_off:
        return fn(*args)


def check_expert_lora_args(x, weight, ends, lora_a, lora_b, scale, bias, dropout_p, ranks) -> None:
    """Raise ValueError naming the bad argument, before any kernel runs.
    ``weight`` is already ``[E, K, N]`` here."""
    for name, v in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        check(isinstance(v, Tensor), name, f"expected a Tensor, got {type(v).__name__}")
        check(v.dtype in FLOAT_DTYPES, name, f"dtype must be float16, bfloat16 or float32, got {v.dtype}")
    check(x.dim() == 2, "x", f"expected packed rows [M, in_features], got shape {tuple(x.shape)}")
    check(weight.dim() == 3, "weight", f"expected [experts, in, out] or [experts, out, in], got {tuple(weight.shape)}")
    E, K, N = weight.shape
    check(E >= 1 and K >= 1 and N >= 1, "weight", f"needs experts and features, got shape {tuple(weight.shape)}")
    check(x.shape[1] == K, "x", f"last dim must be in_features={K}, got shape {tuple(x.shape)}")
    check(weight.dtype == x.dtype, "weight", f"dtype must match x ({x.dtype}), got {weight.dtype}")
    check(isinstance(ends, Tensor) and ends.dim() == 1 and ends.numel() == E
          and ends.dtype in (torch.int32, torch.int64), "ends",
          f"expected an int32/int64 [{E}] tensor of each expert's end row, got "
          f"{getattr(ends, 'dtype', type(ends).__name__)} {tuple(getattr(ends, 'shape', ()))}")
    check(lora_a.dim() == 3 and lora_a.shape[0] == E and lora_a.shape[2] == K, "lora_a",
          f"expected [experts={E}, r, in_features={K}], got shape {tuple(lora_a.shape)}")
    R = lora_a.shape[1]
    check(1 <= R <= MAX_RANK, "lora_a", f"rank r = lora_a.shape[1] must be in [1, {MAX_RANK}], got {R}")
    check(tuple(lora_b.shape) == (E, N, R), "lora_b",
          f"expected [experts={E}, out_features={N}, r={R}], got shape {tuple(lora_b.shape)}")
    if bias is not None:
        check(isinstance(bias, Tensor) and bias.dtype in FLOAT_DTYPES and bias.numel() == E * N
              and bias.shape[0] == E and bias.shape[-1] == N, "bias",
              f"expected a floating [experts={E}, out_features={N}] (or [E, 1, N]) tensor, got "
              f"{tuple(getattr(bias, 'shape', ()))}")
    for name, v in (("weight", weight), ("ends", ends), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if v is not None:
            check(v.device == x.device, name, f"must be on x's device {x.device}, got {v.device}")
    if isinstance(scale, Tensor):
        check(scale.numel() == E and scale.is_floating_point() and scale.device == x.device, "scale",
              f"expected a float or a floating [{E}] tensor on x's device, got {tuple(scale.shape)} {scale.dtype}")
    else:
        check(is_fp32_number(scale), "scale", f"expected a float finite in fp32 (|scale| <= 3.4e38), got {scale!r}")
    check(isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0, "dropout_p",
          f"must be in [0, 1), got {dropout_p!r}")
    if ranks is not None:
        check(isinstance(ranks, Tensor) and ranks.numel() == E and not ranks.is_floating_point()
              and ranks.device == x.device, "ranks", f"expected an integer [{E}] tensor on x's device, got "
              f"{getattr(ranks, 'dtype', type(ranks).__name__)} {tuple(getattr(ranks, 'shape', ()))}")
    check_values((ends, 0, x.shape[0], "ends", f"expert end rows ({x.shape[0]} rows)"),
                 (ranks, 0, R, "ranks", f"per-expert ranks (r = {R})"),
                 (scale if isinstance(scale, Tensor) else None, -3.4e38, 3.4e38, "scale", "per-expert scales"))


def expert_lora_linear(x: Tensor, weight: Tensor, ends: Tensor, lora_a: Tensor, lora_b: Tensor,
                       scale: Union[float, Tensor], bias: Optional[Tensor] = None, dropout_p: float = 0.0, *,
                       ranks: Union[None, Tensor, Sequence[int]] = None, weight_layout: str = "in_out",
                       backend: Optional[str] = None, dropout_seed: Optional[Tensor] = None) -> Tensor:
    """LoRA on every expert of a grouped GEMM: ``y[j] = x[j]·W_e + s_e·(drop(x[j])·A_eᵀ)·B_eᵀ (+ bias_e)``
    for the packed rows j of expert e (rows ``ends[e-1]:ends[e]``, ``ends`` int32 [E] as
    ``grouped.pack_slots`` gives it; rows past ``ends[-1]`` are left undefined).

    ``weight``: ``[E, in, out]`` (``weight_layout="in_out"``, this package's
    ``Experts``; GPT-OSS) or ``[E, out, in]`` (``"out_in"``, transformers'
    Qwen3-MoE / Mixtral / OLMoE / DeepSeek ``gate_up_proj`` and ``down_proj``),
    frozen (no gradient buffer; a trainable one gets a slow per-expert gradient).
    ``lora_a [E, r, in]``, ``lora_b [E, out, r]``: any strides (PEFT's
    flattened ``lora_A [E·r, in]`` / ``lora_B [out, r·E]`` are views of these,
    ``peft_expert_factors``). ``scale``: a float or ``[E]`` (per-expert
    alphas); ``ranks``: ``[E]`` ranks ≤ r (rank patterns; rows of A past an
    expert's rank are ignored), None = r for all. ``bias`` ``[E, out]`` or
    ``[E, 1, out]``. Dropout on the LoRA input whenever ``dropout_p > 0``
    (regenerated from ``dropout_seed`` in the backward, never stored).
    Deterministic: no atomics anywhere; an expert with no rows gets exact
    zero adapter gradients."""
    x, weight, bias, autocast_off = _in_out(x, weight, bias, weight_layout)
    if ranks is not None and not isinstance(ranks, Tensor):
        ranks = torch.tensor(list(ranks), dtype=torch.int32, device=x.device)
    check_expert_lora_args(x, weight, ends, lora_a, lora_b, scale, bias, dropout_p, ranks)
    E, R = weight.shape[0], lora_a.shape[1]
    backend = check_backend(backend)
    ends = ends if ends.dtype == torch.int32 and ends.is_contiguous() else ends.to(torch.int32).contiguous()
    ranks = (torch.full((E,), R, dtype=torch.int32, device=x.device) if ranks is None
             else ranks.to(torch.int32).contiguous())
    scales = (scale.detach().float().reshape(E).contiguous() if isinstance(scale, Tensor)
              else torch.full((E,), float(scale), dtype=torch.float32, device=x.device))
    if bias is not None:
        bias = bias.reshape(E, weight.shape[2])
    dropout_p = float(dropout_p)
    seed = None
    if dropout_p > 0.0:
        seed = dropout_seed if dropout_seed is not None else torch.randint(
            0, 2**31 - 1, (1,), device=x.device, dtype=torch.int32)
        check(isinstance(seed, Tensor) and seed.dtype == torch.int32 and seed.numel() == 1
              and seed.device == x.device, "dropout_seed", "expected an int32 [1] tensor on x's device")
    return _outside_autocast(autocast_off, ExpertLoRAFunction.apply, x, weight, ends, lora_a, lora_b, ranks, scales,
                             bias, dropout_p, seed, backend)


def peft_expert_factors(lora_a_weight: Tensor, lora_b_weight: Tensor, num_experts: int) -> tuple[Tensor, Tensor]:
    """PEFT's ``target_parameters`` adapter of a 3-D expert parameter as
    ``(lora_a [E, r, in], lora_b [E, out, r])`` views, no copy: PEFT keeps
    ``lora_A.weight [E·r, in]`` (expert e's rows e·r:(e+1)·r) and
    ``lora_B.weight [out, r·E]`` (column j·E + e is rank j of expert e)."""
    E = num_experts
    check(lora_a_weight.dim() == 2 and lora_a_weight.shape[0] % E == 0, "lora_A",
          f"expected [experts·r, in] with experts={E}, got {tuple(lora_a_weight.shape)}")
    r = lora_a_weight.shape[0] // E
    check(lora_b_weight.dim() == 2 and lora_b_weight.shape[1] == r * E, "lora_B",
          f"expected [out, r·experts={r * E}], got {tuple(lora_b_weight.shape)}")
    a = lora_a_weight.reshape(E, r, lora_a_weight.shape[1])
    b = lora_b_weight.reshape(lora_b_weight.shape[0], r, E).permute(2, 0, 1)
    return a, b


def expert_lora_mixed(x: Tensor, weight: Tensor, ends: Tensor, lora_a: Tensor, lora_b: Tensor,
                      scales: Union[Tensor, Sequence[float]], adapter_ids: Tensor, bias: Optional[Tensor] = None, *,
                      ranks: Optional[Tensor] = None, weight_layout: str = "in_out",
                      backend: Optional[str] = None) -> Tensor:
    """A mixed batch of expert adapters (multi-tenant serving of an MoE model):
    packed row j of expert e (rows as ``expert_lora_linear``) gets
    ``x[j]·W_e (+ bias_e)`` plus, when ``s = adapter_ids[j]`` is a slot in
    ``[0, S)``, ``s_{s,e}·(x[j]·A_{s,e}ᵀ)·B_{s,e}ᵀ``; -1 = the base model.
    ``lora_a [S, E, r, in]``, ``lora_b [S, E, out, r]`` (the adapter pool's
    slots × experts), ``scales`` ``[S]`` or ``[S, E]``, ``ranks`` ``[S]`` or
    ``[S, E]`` (None: r). Inference: no gradient (``ValueError`` if one would
    be needed). A row's output depends only on its expert and its own slot:
    a NaN in another slot's adapter never reaches it."""
    x, weight, bias, autocast_off = _in_out(x, weight, bias, weight_layout)
    check(isinstance(lora_a, Tensor) and lora_a.dim() == 4, "lora_a",
          f"expected [slots, experts, r, in], got {tuple(getattr(lora_a, 'shape', ()))}")
    check(isinstance(lora_b, Tensor) and lora_b.dim() == 4, "lora_b",
          f"expected [slots, experts, out, r], got {tuple(getattr(lora_b, 'shape', ()))}")
    S = lora_a.shape[0]
    check(lora_b.shape[0] == S, "lora_b", f"expected {S} slots as lora_a, got {lora_b.shape[0]}")
    E = lora_a.shape[1]
    check_expert_lora_args(x, weight, ends, lora_a[0], lora_b[0], 1.0, bias, 0.0, None)
    R = lora_a.shape[2]
    check(isinstance(adapter_ids, Tensor) and adapter_ids.dim() == 1 and adapter_ids.numel() == x.shape[0]
          and not adapter_ids.is_floating_point() and adapter_ids.device == x.device, "adapter_ids",
          f"expected an integer [{x.shape[0]}] tensor on x's device, got "
          f"{getattr(adapter_ids, 'dtype', type(adapter_ids).__name__)} {tuple(getattr(adapter_ids, 'shape', ()))}")
    scales = scales if isinstance(scales, Tensor) else torch.tensor(list(scales), dtype=torch.float32,
                                                                    device=x.device)
    check(scales.device == x.device and scales.numel() in (S, S * E) and scales.is_floating_point(), "scales",
          f"expected a floating [{S}] or [{S}, {E}] tensor on x's device, got {tuple(scales.shape)}")
    scales = scales.float().reshape(S, -1).expand(S, E)
    if ranks is None:
        ranks = torch.full((S, E), R, dtype=torch.int32, device=x.device)
    check(isinstance(ranks, Tensor) and ranks.numel() in (S, S * E) and not ranks.is_floating_point()
          and ranks.device == x.device, "ranks", f"expected an integer [{S}] or [{S}, {E}] tensor on x's device")
    ranks = ranks.to(torch.int32).reshape(S, -1).expand(S, E)
    check_values((ranks, 0, R, "ranks", f"per-slot ranks (r = {R})"),
                 (adapter_ids, -1, S - 1, "adapter_ids", f"adapter slots (-1 = none; {S} slots)"),
                 (scales, -3.4e38, 3.4e38, "scales", "per-slot scales"))
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, lora_a, lora_b,
                                                                                           bias))
    check(not needs_grad, "x", "a mixed batch of expert adapters runs inference only: call it under torch.no_grad()")
    ends = ends.to(torch.int32).contiguous()
    if bias is not None:
        bias = bias.reshape(E, weight.shape[2])
    return _outside_autocast(autocast_off, call_op, expert_lora_mixed, expert_lora_mixed_impl, x, weight, ends, lora_a,
                             lora_b, ranks.contiguous(), scales.contiguous(), adapter_ids.to(torch.int64), bias,
                             check_backend(backend))
