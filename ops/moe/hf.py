"""Hugging Face MoE blocks as ``TopKMoE`` layers: ``from_hf(block)`` and
``convert_moe(model)``.

Each converter reads the block's router (weight, bias, selection bias,
groups, normalisation, scaling), its experts (the fused ``gate_up_proj`` /
``down_proj`` layouts of transformers 5, DBRX's ``w1 / v1 / w2``, Switch's
per-expert ``wi / wo``, GPT-OSS's interleaved projections with biases) and
its shared expert, and builds the layer that computes the same function.
Blocks without a capacity get ``capacity_factor = E / top_k``, which drops
nothing; Switch keeps its per-sequence ``expert_capacity``. The shared expert
module (and its sigmoid gate) is kept as it is, so nothing of it is copied.

Blocks that return ``(hidden_states, router_output)`` (GPT-OSS, Llama 4) give
layers that do too (``tuple_output``), so ``convert_moe`` can replace them in
place.

NLLB-MoE converts to the function its router defines: each token's kept
choices, weighted by the router's combine weights. (The ``NllbMoeExperts``
forward of transformers 5 indexes its experts by the one-hot top-1 mask and
does not compute that function, so the tests compare with the router's
weights applied to the block's own experts, and the drops exactly.) Its
``padding_mask`` argument is accepted and not used: padding tokens are
routed like the others (``router_ignore_padding_tokens=True``). In eval, with
the default ``moe_eval_capacity_token_fraction=1.0``, nothing is dropped and
padding changes nothing. Convert before the block's first eval pass or set
``router.expert_capacity`` back: that pass overwrites it with the eval
capacity, which the block then keeps in training too.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..common import set_submodule
from .layer import ClampedSwiGLU, TopKMoE


def _act(fn) -> nn.Module:
    """A Hugging Face activation as a module (ACT2FN entries already are)."""
    if isinstance(fn, nn.Module):
        return fn
    if fn is torch.nn.functional.silu:
        return nn.SiLU()
    raise ValueError(f"block: unsupported expert activation {fn!r}")


def _fused(experts, layout: str):
    """(w_gate, w_up, w_down as [E, in, out], b_gate, b_up, b_down or None) of fused expert weights."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    if layout == "mixtral":  # gate_up [E, 2F, d] (gate rows first), down [E, d, F]
        F_ = gate_up.shape[1] // 2
        return gate_up[:, :F_].transpose(1, 2), gate_up[:, F_:].transpose(1, 2), down.transpose(1, 2), None, None, None
    if layout == "llama4":  # gate_up [E, d, 2F] (gate columns first), down [E, F, d]
        F_ = gate_up.shape[2] // 2
        return gate_up[..., :F_], gate_up[..., F_:], down, None, None, None
    # gpt_oss: gate_up [E, d, 2F] with gate and up interleaved, down [E, F, d], biases [E, 2F] and [E, d]
    b = experts.gate_up_proj_bias
    return (gate_up[..., ::2], gate_up[..., 1::2], down, b[:, None, ::2], b[:, None, 1::2],
            experts.down_proj_bias[:, None, :])


def _build(router_weight, weights, act, top_k: int, *, router_bias=None, selection_bias=None, shared=None,
           shared_gate=None, capacity_factor: Optional[float] = None, **options) -> TopKMoE:
    w_gate, w_up, w_down, b_gate, b_up, b_down = weights
    E, d = router_weight.shape
    layer = TopKMoE(d, w_gate.shape[-1], E, top_k=top_k, capacity_factor=capacity_factor or E / top_k, gated=True,
                    activation=act, bias=b_gate is not None, router_bias=router_bias is not None,
                    selection_bias=selection_bias is not None, device=w_gate.device, dtype=w_gate.dtype, **options)
    ex = layer.experts
    with torch.no_grad():
        layer.router.weight.copy_(router_weight.float())
        if router_bias is not None:
            layer.router.bias.copy_(router_bias.float())
        if selection_bias is not None:
            layer.e_score_correction_bias.copy_(selection_bias.reshape(-1).float())
        for dst, src in ((ex.w_gate, w_gate), (ex.w_up, w_up), (ex.w2, w_down), (ex.b_gate, b_gate), (ex.b_up, b_up),
                         (ex.b2, b_down)):
            if dst is not None:
                dst.copy_(src)
    layer.shared_expert, layer.shared_expert_gate = shared, shared_gate
    return layer


def _mixtral(block):
    gate, experts = block.gate, block.experts
    top_k = getattr(block, "top_k", None) or gate.top_k
    jitter = getattr(block, "jitter_noise", 0.0) or 0.0
    if hasattr(experts, "gate_up_proj"):
        return _build(gate.weight, _fused(experts, "mixtral"), _act(experts.act_fn), top_k, jitter=jitter)
    # transformers 4.x: a ModuleList of (w1 gate, w3 up, w2 down) Linears
    weights = (torch.stack([e.w1.weight.t() for e in experts]), torch.stack([e.w3.weight.t() for e in experts]),
               torch.stack([e.w2.weight.t() for e in experts]), None, None, None)
    return _build(gate.weight, weights, _act(experts[0].act_fn), top_k, jitter=jitter)


def _qwen_like(block):  # Qwen2-MoE (with a gated shared expert), Qwen3-MoE, OLMoE
    gate = block.gate
    return _build(gate.weight, _fused(block.experts, "mixtral"), _act(block.experts.act_fn), gate.top_k,
                  normalize=bool(gate.norm_topk_prob), shared=getattr(block, "shared_expert", None),
                  shared_gate=getattr(block, "shared_expert_gate", None))


def _jamba(block):
    return _build(block.router.weight, _fused(block.experts, "mixtral"), _act(block.experts.act_fn),
                  block.router.top_k, normalize=False)


def _granite(block):  # softmax over the top-k logits
    return _build(block.router.weight, _fused(block.experts, "mixtral"), _act(block.experts.act_fn),
                  block.router.top_k, score_over="topk")


def _dbrx(block):
    mlp, E = block.experts.mlp, block.experts.num_experts
    F_ = mlp.w1.shape[0] // E
    w = lambda t: t.reshape(E, F_, -1)  # noqa: E731  [E, F, d]
    weights = (w(mlp.w1).transpose(1, 2), w(mlp.v1).transpose(1, 2), w(mlp.w2), None, None, None)
    p = block.moe_normalize_expert_weights
    return _build(block.router.layer.weight, weights, _act(mlp.activation_fn), block.top_k,
                  normalize=p is not None, norm_p=float(p or 1.0), jitter=block.router.moe_jitter_eps or 0.0)


def _ernie(block):
    gate = block.gate
    return _build(gate.weight, _fused(block.experts, "mixtral"), _act(block.experts.act_fn), gate.top_k,
                  selection_bias=gate.moe_statics.e_score_correction_bias, norm_min=float(gate.norm_min),
                  shared=block.shared_experts)


def _deepseek_v2(block):
    gate = block.gate
    groups = dict(n_group=gate.num_group, topk_group=gate.topk_group) if gate.topk_method == "group_limited_greedy" \
        else {}
    if gate.topk_method not in ("greedy", "group_limited_greedy"):
        raise ValueError(f"block: unsupported DeepSeek-V2 topk_method {gate.topk_method!r}")
    return _build(gate.weight, _fused(block.experts, "mixtral"), _act(block.experts.act_fn), gate.top_k,
                  normalize=False, routed_scaling_factor=float(gate.routed_scaling_factor),
                  shared=block.shared_experts, **groups)


def _deepseek_v3(block):
    gate = block.gate
    return _build(gate.weight, _fused(block.experts, "mixtral"), _act(block.experts.act_fn), gate.top_k,
                  scoring="sigmoid", selection_bias=gate.e_score_correction_bias, n_group=gate.num_group,
                  topk_group=gate.topk_group, group_score="top2_sum", normalize=bool(gate.norm_topk_prob),
                  norm_eps=1e-20, routed_scaling_factor=float(gate.routed_scaling_factor), shared=block.shared_experts)


def _gpt_oss(block):
    router, experts = block.router, block.experts
    layer = _build(router.weight, _fused(experts, "gpt_oss"), ClampedSwiGLU(experts.alpha, experts.limit),
                   router.top_k, router_bias=router.bias, score_over="topk")
    layer.tuple_output = True
    return layer


def _llama4(block):
    experts = block.experts
    layer = _build(block.router.weight, _fused(experts, "llama4"), _act(experts.act_fn), block.router.top_k,
                   scoring="sigmoid", normalize=False, gate_input=True, shared=block.shared_expert)
    layer.tuple_output = True
    return layer


def _lfm2(block):
    gate = block.gate
    return _build(gate.weight, _fused(block.experts, "mixtral"), _act(block.experts.act_fn), gate.top_k,
                  scoring="sigmoid", selection_bias=block.expert_bias if block.use_expert_bias else None,
                  normalize=bool(gate.norm_topk_prob), norm_eps=1e-6,
                  routed_scaling_factor=float(gate.routed_scaling_factor))


def _switch(block):
    router, experts = block.router, block.experts
    dense = [experts[f"expert_{i}"] for i in range(router.num_experts)]
    return _per_expert(router.classifier, [e.wi for e in dense], [e.wo for e in dense], top_k=1,
                       activation=dense[0].act, normalize=False, capacity=router.expert_capacity, group_by="sequence",
                       jitter=router.jitter_noise or 0.0, dropout=dense[0].dropout.p)


def _per_expert(classifier: nn.Linear, fc_in: list, fc_out: list, **options) -> TopKMoE:
    """A plain (not gated) TopKMoE from a router Linear and each expert's two
    Linears (Switch's wi / wo, NLLB's fc1 / fc2), biases where they have them;
    dropout between the GEMMs, as both apply it."""
    w1 = torch.stack([m.weight.t() for m in fc_in])
    w2 = torch.stack([m.weight.t() for m in fc_out])
    bias = fc_in[0].bias is not None
    layer = TopKMoE(w1.shape[1], w1.shape[2], len(fc_in), gated=False, bias=bias,
                    router_bias=classifier.bias is not None, dropout_position="hidden", device=w1.device,
                    dtype=w1.dtype, **options)
    with torch.no_grad():
        layer.router.weight.copy_(classifier.weight.float())
        if classifier.bias is not None:
            layer.router.bias.copy_(classifier.bias.float())
        layer.experts.w1.copy_(w1)
        layer.experts.w2.copy_(w2)
        if bias:
            layer.experts.b1.copy_(torch.stack([m.bias for m in fc_in])[:, None])
            layer.experts.b2.copy_(torch.stack([m.bias for m in fc_out])[:, None])
    return layer


def _nllb(block):
    """NLLB-MoE: top-2 over softmax probabilities, a fixed capacity in
    training and ``ceil(moe_eval_capacity_token_fraction · n)`` in eval,
    normalisation before or after the drops, fc1/fc2 experts with biases,
    activation dropout between the GEMMs and token dropout on the outputs."""
    router, experts = block.router, block.experts
    if router.second_expert_policy != "all":
        raise ValueError(f"block: NLLB-MoE second_expert_policy {router.second_expert_policy!r} samples the second "
                         "expert; only 'all' converts")
    dense = [experts[f"expert_{i}"] for i in range(router.num_experts)]
    before = bool(router.normalize_router_prob_before_dropping)
    fraction = router.moe_eval_capacity_token_fraction
    return _per_expert(router.classifier, [e.fc1 for e in dense], [e.fc2 for e in dense], top_k=2,
                       activation=dense[0].act, normalize=before, renormalize_after_drop=not before,
                       capacity=router.expert_capacity,
                       capacity_factor=1.0, capacity_multiple=2,  # no expert_capacity: 2·ceil(n / E), as NLLB
                       eval_capacity_fraction=fraction if fraction > 0 else None,
                       drop_order="probability" if router.batch_prioritized_routing else "position",
                       dropout=dense[0].dropout.p, token_dropout=experts.moe_token_dropout)


CONVERTERS = {
    "MixtralSparseMoeBlock": _mixtral, "Qwen2MoeSparseMoeBlock": _qwen_like, "Qwen3MoeSparseMoeBlock": _qwen_like,
    "OlmoeSparseMoeBlock": _qwen_like, "JambaSparseMoeBlock": _jamba, "GraniteMoeMoE": _granite, "DbrxFFN": _dbrx,
    "Ernie4_5_MoeSparseMoeBlock": _ernie, "DeepseekV2Moe": _deepseek_v2, "DeepseekV3MoE": _deepseek_v3,
    "GptOssMLP": _gpt_oss, "Llama4TextMoe": _llama4, "Lfm2MoeSparseMoeBlock": _lfm2,
    "SwitchTransformersSparseMLP": _switch, "NllbMoeSparseMLP": _nllb,
}


def from_hf(block: nn.Module, capacity_factor: Optional[float] = None) -> TopKMoE:
    """The ``TopKMoE`` layer computing a Hugging Face MoE block's function
    (Mixtral, Qwen2/3-MoE, OLMoE, Jamba, GraniteMoE, DBRX, Ernie 4.5,
    DeepSeek-V2/V3, GPT-OSS, Llama 4, LFM2, Switch, NLLB-MoE). Same outputs
    when nothing is dropped (the default for blocks without a capacity; pass
    a smaller ``capacity_factor`` to train with drops), Switch's per-sequence
    and NLLB's per-batch drops where they have them. The layer keeps the block's train/eval mode."""
    name = type(block).__name__
    if name not in CONVERTERS:
        raise ValueError(f"block: no converter for {name}; supported: {', '.join(sorted(CONVERTERS))}")
    layer = CONVERTERS[name](block)
    # how the block's fused gate_up_proj orders its rows (PEFT's expert adapter files follow it)
    layer.experts.hf_layout = "interleaved" if name == "GptOssMLP" else "concatenated"
    if capacity_factor is not None:
        layer.capacity_factor = capacity_factor
    return layer.train(block.training)


def convert_moe(model: nn.Module, capacity_factor: Optional[float] = None) -> list[str]:
    """Replace every supported MoE block of a Hugging Face model by its
    ``TopKMoE`` layer, in place; returns the replaced module names. The
    model's logits and ``generate`` tokens stay the same (tested on tiny
    models of each family)."""
    names = [n for n, m in model.named_modules() if type(m).__name__ in CONVERTERS]
    if not names:
        raise ValueError("model: has no MoE block this package converts "
                         f"(supported: {', '.join(sorted(CONVERTERS))})")
    for n in names:
        set_submodule(model, n, from_hf(model.get_submodule(n), capacity_factor))
    return names
