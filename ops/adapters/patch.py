"""The one-line switch for PEFT users: ``patch_peft(model)`` runs PEFT's own
LoRA layers through the fused kernels, in the model they already have.

Every PEFT LoRA ``Linear`` whose base is an ``nn.Linear`` or transformers'
``Conv1D`` (GPT-2, ``fan_in_fan_out``), and every QLoRA layer (PEFT's
``lora.bnb.Linear4bit`` over bitsandbytes' 4-bit ``Linear4bit``) gets a
forward that calls
``lora_linear`` (one active adapter) or ``multi_lora_linear`` (a mixed batch,
``adapter_names=[...]``) on PEFT's own parameters: nothing is copied (the
4-bit codes are read where bitsandbytes keeps them and decoded inside the
kernels), so ``set_adapter``, ``disable_adapter()``, merging,
``save_pretrained``, optimizers and gradient checkpointing see the same
model. Whatever the kernels do not do keeps PEFT's forward, decided per
call: DoRA and other LoRA variants, ``lora_bias``, several active adapters
summed, a trainable base weight, weights that a sharding wrapper holds (FSDP
units of their own), extra forward arguments, a 4-bit weight bitsandbytes
repacked for its CPU inference kernel. Layers PEFT builds on other bases
(8-bit Linear, Embedding, Conv2d) are not patched at all. At patch time one
warning per reason names the layers that fall back.

LoRA on MoE experts (``LoraConfig(target_parameters=[...])``): PEFT wraps a
transformers fused-experts module (``gate_up_proj`` / ``down_proj`` 3-D
parameters) in one ``ParamWrapper`` per targeted parameter, nested. The
outermost wrapper gets a forward that runs the module through the
expert-LoRA op (``ops/moe/hf_experts.py``) with every wrapper's factors,
instead of PEFT's per-forward delta of the whole expert stack; the inner
wrappers are left as they are (their forward only runs on a fallback).

No Triton here: the forward calls the functional API.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from ..common import is_conv1d, weight_out_in
from ..lora.function import lora_linear
from ..quant.layer import compute_dtype, is_quantized_linear, quantized_weight
from ..moe import hf_experts
from ..moe.lora import peft_expert_factors
from ..multi_lora.function import multi_lora_linear

_PATCHED = "_posttrain_patched"


def _lora_linear_classes() -> tuple:
    """PEFT's LoRA Linear classes the kernels run: ``lora.Linear``, and ``lora.bnb.Linear4bit`` where
    bitsandbytes is installed."""
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError as e:  # pragma: no cover - peft is an optional dependency
        raise ImportError("patch_peft needs peft installed (pip install peft)") from e
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:  # no bitsandbytes
        return (Linear,)
    return Linear, Linear4bit


def _base_weight(layer):
    """The base weight as ``[out, in]`` (a view for Conv1D), an ``NF4Weight`` over a quantized base's
    own storage, or None if the base is something else (an 8-bit Linear, a Linear subclass)."""
    base = layer.get_base_layer()
    if is_quantized_linear(base):
        return quantized_weight(base)
    return weight_out_in(base) if type(base) is nn.Linear or is_conv1d(base) else None


def _fallback_reason(layer) -> Optional[str]:
    """Why this call must take PEFT's own forward, or None if the kernels do it."""
    if layer.lora_variant:
        return "a LoRA variant (DoRA, ...)"
    if any(layer.lora_bias.values()):
        return "lora_bias"
    base = layer.get_base_layer()
    if base.weight.requires_grad:
        return "a trainable base weight"
    quantized = is_quantized_linear(base)
    for mod in (*layer.lora_A.values(), *layer.lora_B.values(), *(() if quantized else (base,))):
        if type(mod.weight) not in (torch.Tensor, nn.Parameter) or mod.weight.dim() != 2:
            # FSDP wrapped a LoRA Linear as a unit of its own: only its own forward gathers the weight
            return "sharded weights (FSDP units of their own)"
    if quantized and getattr(getattr(base.weight, "quant_state", None), "packing_format_for_cpu", False):
        return "a 4-bit weight bitsandbytes repacked for its CPU inference kernel"
    return None


def _patchable_base(layer) -> bool:
    """A base the kernels run: a plain linear layer, or a 4-bit one (whatever its storage's state:
    a repacked bitsandbytes weight falls back per call)."""
    base = layer.get_base_layer()
    return is_quantized_linear(base) or type(base) is nn.Linear or is_conv1d(base)


def _active(layer) -> list[str]:
    """The active adapters this layer holds."""
    return [a for a in layer.active_adapters if a in layer.lora_A]


class _Forward:
    """The patched forward of one layer, an instance attribute. A callable object, not a bound
    function: ``torch.save`` / ``pickle`` of a patched model would store a bound function by its
    name, which the class lacks (the checkpoint could not be loaded); this pickles with the layer."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return _fused_forward(self.layer, x, *args, **kwargs)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoRA Linear forward, through the fused kernels where they apply."""
    original = type(self).forward
    adapter_names = kwargs.get("adapter_names")
    extra = {k: v for k, v in kwargs.items() if k != "adapter_names" and v is not None}
    if args or extra or self.disable_adapters or self.merged or _fallback_reason(self) is not None:
        return original(self, x, *args, **kwargs)
    base = self.get_base_layer()
    weight = _base_weight(self)
    active = _active(self)
    if adapter_names is None and len(active) != 1:  # none (the base alone) or several summed: PEFT's forward
        return original(self, x, *args, **kwargs)
    # A quantized base computes in its compute dtype (bitsandbytes casts the input to it, and the
    # output back to the input's dtype); a plain one in x's.
    dtype = compute_dtype(base, x) if is_quantized_linear(base) else x.dtype
    xc = x.to(dtype)
    if adapter_names is not None:
        return _mixed_batch(self, xc, adapter_names, weight, base.bias, original).to(x.dtype)
    name = active[0]
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
    return lora_linear(xc, weight, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                       base.bias, p).to(x.dtype)


def _stack(layer, names: list[str], device: torch.device):
    """This layer's adapters stacked into slots: (A, B, ranks, scales, slot of each name).

    Built per call, not cached: an edit through ``.data`` (``lora_B[n].weight.data.mul_(2)``,
    as some training loops and weight-averaging tools do) bumps no version counter, so no
    cheap key sees it. The copies are R·(K + N) elements per adapter, small next to the GEMM."""
    A = [layer.lora_A[n].weight for n in names]
    B = [layer.lora_B[n].weight for n in names]
    R = max(a.shape[0] for a in A)
    dtype = torch.promote_types(A[0].dtype, B[0].dtype)
    stack_a = torch.zeros(len(names), R, A[0].shape[1], dtype=dtype, device=device)
    stack_b = torch.zeros(len(names), B[0].shape[0], R, dtype=dtype, device=device)
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(A, B)):
            stack_a[i, :a.shape[0]] = a
            stack_b[i, :, :b.shape[1]] = b
    ranks = torch.tensor([a.shape[0] for a in A], dtype=torch.int32, device=device)
    scales = torch.tensor([float(layer.scaling[n]) for n in names], dtype=torch.float32, device=device)
    return stack_a, stack_b, ranks, scales, {n: i for i, n in enumerate(names)}


def _mixed_batch(layer, x, adapter_names, weight, bias, original):
    """PEFT's mixed batch (one adapter name per row, ``"__base__"`` for the
    base model) as one multi-adapter launch."""
    names = sorted(layer.lora_A.keys())
    rows = x.shape[0] if x.dim() >= 2 else 1
    if not names or len(adapter_names) != rows:
        return original(layer, x, adapter_names=adapter_names)  # PEFT raises its own error
    A, B, ranks, scales, slot = _stack(layer, names, x.device)
    ids = torch.tensor([slot.get(n, -1) for n in adapter_names], dtype=torch.int64, device=x.device)
    per_token = ids.reshape(rows, *([1] * (x.dim() - 2))).expand(*x.shape[:-1]).reshape(-1)
    return multi_lora_linear(x, weight, A, B, ranks, scales, per_token, bias)


# ---------------------------------------------------------------- ParamWrapper (LoRA on MoE experts)
def _param_wrapper_class():
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:  # a peft without target_parameters
        return None
    return ParamWrapper


def _wrapper_chain(outer) -> list:
    """The nested ParamWrappers from ``outer`` inwards."""
    cls = _param_wrapper_class()
    chain, m = [], outer
    while isinstance(m, cls):
        chain.append(m)
        m = m.base_layer
    return chain


def _experts_static_reason(outer) -> Optional[str]:
    """Why a ParamWrapper stack cannot take the fused forward at all, or None."""
    base = outer.get_base_layer()
    why = hf_experts.unsupported(base)
    if why is not None:
        return why
    names = set(hf_experts.projection_names(base))
    for w in _wrapper_chain(outer):
        if w.parameter_name not in names:
            return f"a ParamWrapper of {w.parameter_name!r}, not an expert projection"
    return None


def _experts_call_reason(chain, kwargs) -> Optional[str]:
    """Why this call must take PEFT's forward, or None."""
    if set(kwargs) - {"adapter_names"}:
        return "extra forward arguments"
    for w in chain:
        if w.disable_adapters or w.merged or w.lora_variant or any(w.lora_bias.values()):
            return "disabled, merged or a variant"
        if w.get_param().requires_grad:
            return "a trainable base weight"
        if len(_active(w)) > 1 and kwargs.get("adapter_names") is None:
            return "several active adapters summed"
    return None


def _mixed_expert_stacks(chain, names: list[str], device) -> dict:
    """Each wrapper's adapters stacked into slots (``names`` order) for a mixed batch:
    ``(A [S, E, r, in], B [S, E, out, r], scales [S], ranks [S, E])``; a slot the wrapper lacks
    has rank 0. Built per call (as ``_stack``: ``.data`` edits bump no version counter)."""
    out = {}
    for w in chain:
        present = [n for n in names if n in w.lora_A]
        if not present:
            continue
        E = w.num_experts
        fac = {n: peft_expert_factors(w.lora_A[n].weight, w.lora_B[n].weight, E) for n in present}
        R = max(a.shape[1] for a, _ in fac.values())
        a0, b0 = next(iter(fac.values()))
        A = torch.zeros((len(names), E, R, a0.shape[2]), dtype=a0.dtype, device=device)
        B = torch.zeros((len(names), E, b0.shape[1], R), dtype=b0.dtype, device=device)
        ranks = torch.zeros((len(names), E), dtype=torch.int32)
        scales = torch.zeros(len(names), dtype=torch.float32)
        with torch.no_grad():
            for i, n in enumerate(names):
                if n in fac:
                    a, b = fac[n]
                    A[i, :, :a.shape[1]] = a
                    B[i, :, :, :b.shape[2]] = b
                    ranks[i] = a.shape[1]
                    scales[i] = float(w.scaling[n])
        out[w.parameter_name] = (A, B, scales.to(device), ranks.to(device))
    return out


class _ExpertsForward:
    """The patched forward of the outermost ParamWrapper of a fused-experts
    module (a callable object, as ``_Forward``, so the model pickles)."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, hidden_states, *args, **kwargs):
        outer = self.layer
        original = type(outer).forward
        chain = _wrapper_chain(outer)
        if len(args) != 2 or _experts_call_reason(chain, kwargs) is not None \
                or _experts_static_reason(outer) is not None:
            return original(outer, hidden_states, *args, **kwargs)
        base = outer.get_base_layer()
        top_k_index, top_k_weights = args
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is not None:  # PEFT's mixed batch: one adapter name per sequence, "__base__" = none
            n, seqs = hidden_states.shape[0], len(adapter_names)
            if seqs == 0 or n % seqs:
                return original(outer, hidden_states, *args, **kwargs)  # PEFT raises its own error
            names = sorted({a for w in chain for a in w.lora_A.keys()})
            slot = {a: i for i, a in enumerate(names)}
            per_seq = torch.tensor([slot.get(a, -1) for a in adapter_names], dtype=torch.int64,
                                   device=hidden_states.device)
            return hf_experts.experts_forward(base, hidden_states, top_k_index, top_k_weights,
                                              _mixed_expert_stacks(chain, names, hidden_states.device),
                                              per_seq.repeat_interleave(n // seqs))
        adapters = {}
        for w in chain:
            active = _active(w)
            if active:
                name = active[0]
                a, b = peft_expert_factors(w.lora_A[name].weight, w.lora_B[name].weight, w.num_experts)
                adapters[w.parameter_name] = (a, b, float(w.scaling[name]))
        return hf_experts.experts_forward(base, hidden_states, top_k_index, top_k_weights, adapters)


def patch_peft(model: nn.Module) -> nn.Module:
    """Run the PEFT LoRA layers of ``model`` (a ``PeftModel``, or any model
    with PEFT LoRA layers injected) through the fused kernels; returns
    ``model``. Idempotent. Layers or calls the kernels do not cover keep
    PEFT's forward, never a different result; one warning per reason names
    the layers that fall back now. ``unpatch_peft`` restores PEFT's forward."""
    linear_classes = _lora_linear_classes()
    from peft.tuners.lora.layer import LoraLayer
    wrapper_cls = _param_wrapper_class()
    fallbacks: dict[str, list[str]] = {}
    inner = {id(m.base_layer) for m in model.modules() if wrapper_cls is not None and isinstance(m, wrapper_cls)}
    for name, m in model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        if wrapper_cls is not None and isinstance(m, wrapper_cls):
            if id(m) in inner:  # a nested wrapper: its outermost one runs the whole experts module
                continue
            reason = _experts_static_reason(m)
            if reason is not None:
                fallbacks.setdefault(reason, []).append(name)
                continue
            if not getattr(m, _PATCHED, False):
                m.forward = _ExpertsForward(m)
                setattr(m, _PATCHED, True)
            continue
        if type(m) not in linear_classes or not _patchable_base(m):
            fallbacks.setdefault(f"its base layer is a {type(m.get_base_layer()).__name__} (or the LoRA layer a "
                                 f"{type(m).__name__}), not an nn.Linear / Conv1D / 4-bit Linear", []).append(name)
            continue
        reason = _fallback_reason(m) or ("several active adapters summed" if len(_active(m)) > 1 else None)
        if reason is not None:
            fallbacks.setdefault(reason, []).append(name)
        if not getattr(m, _PATCHED, False):
            m.forward = _Forward(m)
            setattr(m, _PATCHED, True)
    for reason, names in fallbacks.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        warnings.warn(f"patch_peft: {len(names)} LoRA layer(s) keep PEFT's forward because of {reason}: {shown}",
                      stacklevel=2)
    return model


def unpatch_peft(model: nn.Module) -> nn.Module:
    """Restore PEFT's own forward on every layer ``patch_peft`` patched; returns ``model``."""
    for m in model.modules():
        if getattr(m, _PATCHED, False):
            del m.forward
            delattr(m, _PATCHED)
    return model
