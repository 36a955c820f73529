"""transformers' fused expert modules (``@use_experts_implementation``:
Qwen2/3-MoE, Mixtral, OLMoE, DeepSeek-V2/V3, GPT-OSS, GLM-4 MoE, ... stored as
3-D ``gate_up_proj`` / ``up_proj`` and ``down_proj`` parameters) run through
the expert-LoRA op, with or without an adapter on each projection.

``experts_forward(experts, hidden, top_k_index, top_k_weights, adapters)``
computes what transformers' own ``grouped_mm`` implementation computes
(``integrations/moe.py``): the token-expert pairs sorted by expert, each
projection a grouped GEMM over its expert's rows, the module's own
``_apply_gate`` (or activation), the routing weights, the per-token sum in
a fixed order. Each projection's LoRA (``adapters[name] = (A [E, r, in],
B [E, out, r], scale)``, PEFT's ``ParamWrapper`` factors) is fused into its
GEMM; no E×in×out delta is ever formed. No host sync.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .lora import expert_lora_linear, expert_lora_mixed

_CONTRACT = ("has_gate", "has_bias", "is_transposed", "down_proj", "_apply_gate")


def unsupported(experts: nn.Module) -> Optional[str]:
    """Why ``experts_forward`` cannot run this module, or None."""
    missing = [a for a in _CONTRACT if not hasattr(experts, a)]
    if missing:
        return f"{type(experts).__name__} is not a transformers fused-experts module (no {', '.join(missing)})"
    if getattr(experts, "_is_expert_parallel", False):
        return "transformers' expert parallelism (sentinel rows)"
    first = experts.gate_up_proj if experts.has_gate else getattr(experts, "up_proj", None)
    for p in (first, experts.down_proj):
        if not isinstance(p, Tensor) or p.dim() != 3:
            return "expert weights that are not 3-D tensors (quantized or sharded)"
        if p.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"expert weights in {p.dtype}"
    return None


def projection_names(experts: nn.Module) -> tuple[str, str]:
    return ("gate_up_proj" if experts.has_gate else "up_proj"), "down_proj"


def _project(experts, name: str, x: Tensor, ends: Tensor, adapters: dict, slots: Optional[Tensor] = None) -> Tensor:
    w = getattr(experts, name)
    layout = "in_out" if experts.is_transposed else "out_in"
    n_out = w.shape[2] if experts.is_transposed else w.shape[1]
    bias = getattr(experts, f"{name}_bias") if experts.has_bias else None
    if slots is not None and name in adapters:  # a mixed batch: (A [S, E, r, in], B [S, E, out, r], scales, ranks)
        a, b, scales, ranks = adapters[name]
        return expert_lora_mixed(x, w, ends, a, b, scales, slots, bias, ranks=ranks, weight_layout=layout)
    if name in adapters:
        a, b, scale = adapters[name]
    else:  # a projection without an adapter: the same GEMM with a zero rank-1 term
        a, b, scale = x.new_zeros((w.shape[0], 1, x.shape[1])), x.new_zeros((w.shape[0], n_out, 1)), 0.0
    return expert_lora_linear(x, w, ends, a, b, scale, bias, weight_layout=layout)


def experts_forward(experts: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                    adapters: dict, token_slots: Optional[Tensor] = None) -> Tensor:
    """The fused-experts module's output ``[tokens, d]`` with LoRA on the
    projections named in ``adapters`` (``"gate_up_proj"`` / ``"up_proj"`` /
    ``"down_proj"``): ``(A [E, r, in], B [E, out, r], scale)`` each, or, for a
    mixed batch (``token_slots [tokens]``: each token's adapter slot, -1 =
    the base model; inference), ``(A [S, E, r, in], B [S, E, out, r],
    scales [S], ranks [S, E])``. A mixed batch sorts each expert's rows by
    slot, so a row tile holds few adapters."""
    E = getattr(experts, "num_experts", None) or experts.down_proj.shape[0]
    k = top_k_index.shape[-1]
    n = hidden_states.shape[0]
    expert_ids = top_k_index.reshape(-1).to(torch.int64)
    slots = None
    if token_slots is None:
        key, width = expert_ids, 1
    else:  # by expert, then by slot within the expert
        slot_of_pair = token_slots.to(torch.int64).repeat_interleave(k)
        width = int(max((a[0].shape[0] for a in adapters.values()), default=0)) + 1
        key = expert_ids * width + (slot_of_pair + 1).clamp(0, width - 1)
    key_g, perm = torch.sort(key, stable=True)
    x = hidden_states[perm // k]
    weights_g = top_k_weights.reshape(-1)[perm]
    if token_slots is not None:
        slots = slot_of_pair[perm]
    bounds = torch.arange(1, E + 1, device=key_g.device, dtype=key_g.dtype) * width
    ends = torch.searchsorted(key_g, bounds, right=False).to(torch.int32)  # rows of expert e end at ends[e]
    first, down = projection_names(experts)
    h = _project(experts, first, x, ends, adapters, slots)
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    out = _project(experts, down, h, ends, adapters, slots)
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    out = out * weights_g.unsqueeze(-1)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return out[inv].view(n, k, -1).sum(dim=1).to(hidden_states.dtype)
