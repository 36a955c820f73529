"""Fused LoRA: the autograd Function and the functional API.

    lora_linear()  ─►  LoRALinearFunction  ─►  posttrain_kernels::lora_fwd / lora_bwd (op.py)
                                                 ├► launch.py ─► kernels/lora.py
                                                 └► reference.py (CPU tensors)

Validation lives here, above the backend choice: both backends see the same
checked arguments and raise nothing of their own.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..backend import check_backend
from ..common import FLOAT_DTYPES, MAX_RANK, check, is_fp32_number, linear_autocast
from ..quant.weight import check_quantized_once, device_of, is_quantized, value_key
from .op import run_lora_bwd, run_lora_fwd


# ---------------------------------------------------------------- autograd
class LoRALinearFunction(torch.autograd.Function):
    """y = x·W0ᵀ + scale·(drop(x)·Aᵀ)·Bᵀ + bias. W0 gets no gradient.

    Saves x, t (fp32 [M, R]) and the dropout seed; the mask is regenerated
    in the backward, never stored. ``weight`` is a tensor or a quantized
    frozen weight (``ops/quant``), which the context keeps as it is.
    """

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, bias, scale, dropout_p, seed, backend):
        x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y, t = run_lora_fwd(x2d, weight, lora_a, lora_b, bias, scale, dropout_p, seed, backend)
        dense = isinstance(weight, Tensor)
        ctx.save_for_backward(x2d, weight if dense else None, lora_a, lora_b, t, seed)
        ctx.quantized = None if dense else weight
        ctx.scale, ctx.dropout_p, ctx.backend = scale, dropout_p, backend
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, lora_a, lora_b, t, seed = ctx.saved_tensors
        needs_dx = ctx.needs_input_grad[0]
        needs_dbias = ctx.needs_input_grad[4]
        dx, da, db, dbias = run_lora_bwd(
            dy if dy.dim() == 2 else dy.reshape(-1, dy.shape[-1]), x2d,
            weight if ctx.quantized is None else ctx.quantized, lora_a, lora_b, t,
            ctx.scale, ctx.dropout_p, seed, needs_dx, needs_dbias, ctx.backend)
        return (dx.reshape(ctx.x_shape) if needs_dx and len(ctx.x_shape) != 2 else dx if needs_dx else None, None,
                da, db,
                dbias.to(ctx.bias_dtype) if needs_dbias else None, None, None, None, None)


# The C++ Function.apply, without the Python wrapper's functorch handling
# (about 3 us a call): used in plain eager calls only; under torch.compile or
# a functorch transform the full ``LoRALinearFunction.apply`` runs.
_BASE_APPLY = super(torch.autograd.Function, LoRALinearFunction).apply


def _apply(*args):
    if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return LoRALinearFunction.apply(*args)
    return _BASE_APPLY(*args)


# ---------------------------------------------------------------- functional
_CHECKED: set = set()  # signatures that passed check_lora_args: a repeat call skips the checks


def _signature(x, weight, lora_a, lora_b, scale, bias, dropout_p):
    """What check_lora_args depends on, as a hashable key, or None when an
    argument is not even a tensor (the full check then says which). A
    quantized weight's values count too (its scales are checked finite):
    the key holds its scale tensors' identity and version."""
    try:
        if is_quantized(weight):
            weight = _QuantKey(weight)
        return (x.shape, x.dtype, x.device, weight.shape, weight.dtype, weight.device, lora_a.shape, lora_a.dtype,
                lora_a.device, lora_b.shape, lora_b.dtype, lora_b.device,
                None if bias is None else (bias.shape, bias.dtype, bias.device), type(scale), scale,
                type(dropout_p), dropout_p)
    except AttributeError:
        return None


class _QuantKey:
    """A quantized weight in a check signature: its structure, and the identity and version of
    its tensors (a changed scale is checked again)."""

    def __init__(self, w):
        self.shape, self.dtype, self.device = w.shape, w.dtype, device_of(w)
        self.key = value_key(w)

    def __eq__(self, other):
        return isinstance(other, _QuantKey) and self.key == other.key

    def __hash__(self):
        return hash(self.key)


def check_lora_args(x, weight, lora_a, lora_b, scale, bias, dropout_p) -> None:
    """Raise ValueError naming the bad argument, before any kernel runs. ``weight``: a tensor, or a
    quantized weight (checked by its format: shapes, dtypes, finite scales) in any dtype of x."""
    quantized = is_quantized(weight)
    if quantized:
        check_quantized_once(weight, "weight")  # a device sync on a GPU: once per storage
    for name, v in (("x", x), ("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b)):
        if name == "weight" and quantized:
            continue
        check(isinstance(v, Tensor), name, f"expected a Tensor, got {type(v).__name__}")
        check(v.dtype in FLOAT_DTYPES, name, f"dtype must be float16, bfloat16 or float32, got {v.dtype}")
    check(x.dim() >= 1, "x", "must have at least one dimension [..., in_features]")
    check(len(weight.shape) == 2, "weight", f"expected [out_features, in_features], got shape {tuple(weight.shape)}")
    N, K = weight.shape
    check(K >= 1 and N >= 1, "weight", f"needs at least one in- and out-feature, got shape {tuple(weight.shape)}")
    check(x.shape[-1] == K, "x", f"last dim must be in_features={K}, got shape {tuple(x.shape)}")
    check(quantized or weight.dtype == x.dtype, "weight", f"dtype must match x ({x.dtype}), got {weight.dtype}")
    check(lora_a.dim() == 2 and lora_a.shape[1] == K, "lora_a",
           f"expected [r, in_features={K}], got shape {tuple(lora_a.shape)}")
    R = lora_a.shape[0]
    check(1 <= R <= MAX_RANK, "lora_a", f"rank r = lora_a.shape[0] must be in [1, {MAX_RANK}], got {R}")
    check(tuple(lora_b.shape) == (N, R), "lora_b",
           f"expected [out_features={N}, r={R}], got shape {tuple(lora_b.shape)}")
    if bias is not None:
        check(isinstance(bias, Tensor), "bias", f"expected a Tensor or None, got {type(bias).__name__}")
        check(tuple(bias.shape) == (N,), "bias", f"expected [out_features={N}], got shape {tuple(bias.shape)}")
        check(bias.dtype in FLOAT_DTYPES, "bias", f"dtype must be float16, bfloat16 or float32, got {bias.dtype}")
    for name, v in (("weight", weight), ("lora_a", lora_a), ("lora_b", lora_b), ("bias", bias)):
        if v is not None:
            device = device_of(v) if quantized and name == "weight" else v.device
            check(device == x.device, name, f"must be on x's device {x.device}, got {device}")
    check(is_fp32_number(scale), "scale", f"expected a float finite in fp32 (|scale| <= 3.4e38), got {scale!r}")
    check(isinstance(dropout_p, (int, float)) and 0.0 <= dropout_p < 1.0, "dropout_p",
           f"must be in [0, 1), got {dropout_p!r}")


def lora_linear(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                bias: Optional[Tensor] = None, dropout_p: float = 0.0, *,
                backend: Optional[str] = None, dropout_seed: Optional[Tensor] = None) -> Tensor:
    """Fused LoRA linear: ``x·weightᵀ + scale·(dropout(x)·lora_aᵀ)·lora_bᵀ + bias``.

    Shapes as PEFT: ``x [..., K]``, ``weight [N, K]``, ``lora_a [r, K]``,
    ``lora_b [N, r]``, ``bias [N]``; returns ``[..., N]`` in x's dtype.
    ``weight`` gets no gradient. It may be a quantized frozen weight
    (``NF4Weight``: QLoRA's 4-bit base, bitsandbytes' storage), used in any of
    x's dtypes as bitsandbytes' layer uses it (decoded to the weight's dtype,
    then to x's). Dropout (on the LoRA input only) is applied
    whenever ``dropout_p > 0``, as ``F.dropout(training=True)`` would.
    Under autocast, x, weight and bias are cast as ``nn.Linear`` casts them
    and the output has the autocast dtype. ``backend``: ``"auto"`` (default),
    ``"triton"`` or ``"reference"``; see ``ops/backend.py``. ``dropout_seed``:
    the int32 ``[1]`` tensor the dropout mask is hashed from (drawn from
    torch's RNG when None; tensor parallelism offsets it per shard).
    """
    x, weight, bias, autocast_off = linear_autocast(x, weight, bias)  # nn.Linear's dtype rule under autocast
    # (a quantized weight is not a tensor: it is left as it is, and used in x's autocast dtype)
    sig = _signature(x, weight, lora_a, lora_b, scale, bias, dropout_p)
    if sig is None or sig not in _CHECKED:
        check_lora_args(x, weight, lora_a, lora_b, scale, bias, dropout_p)
        if sig is not None:
            if len(_CHECKED) > 4096:
                _CHECKED.clear()
            _CHECKED.add(sig)
    backend = check_backend(backend)
    dropout_p = float(dropout_p)
    seed = None
    if dropout_p > 0.0:
        # A device tensor, not a Python int: no host sync, graph capturable.
        if dropout_seed is None:
            seed = torch.randint(0, 2**31 - 1, (1,), device=x.device, dtype=torch.int32)
        else:
            seed = dropout_seed
            check(isinstance(seed, Tensor) and seed.dtype == torch.int32 and seed.numel() == 1
                  and seed.device == x.device, "dropout_seed",
                  f"expected an int32 [1] tensor on x's device, got {type(seed).__name__} "
                  f"{getattr(seed, 'dtype', '')} {tuple(getattr(seed, 'shape', ()))}")
    if autocast_off is None:
        return _apply(x, weight, lora_a, lora_b, bias, float(scale), dropout_p, seed, backend)
    with autocast_off:
        return _apply(x, weight, lora_a, lora_b, bias, float(scale), dropout_p, seed, backend)
