"""Sparse upcycling (Komatsuzaki et al. 2022): MoE layers whose experts start
as copies of a dense MLP, in one block or across a Hugging Face model."""
from __future__ import annotations

import re
from typing import Optional, Union

import torch
from torch import nn

from ..common import is_linear, weight_out_in
from .layer import ExpertChoiceMoE, TopKMoE


def _dense_weights(mlp: nn.Module):
    """(gated, activation, dropout p, dropout position, [(weight [in, out], bias)])
    of a dense MLP.

    Understands GPT-2's (c_fc, c_proj as Conv1D, act; dropout on the output),
    Llama's (gate_proj, up_proj, down_proj, act_fn), T5's (wi, wo and gated
    wi_0 / wi_1, wo; dropout between the GEMMs) and fc1/fc2 with act /
    activation_fn / act_fn (CLIP, Phi, NLLB-style; dropout between the GEMMs).
    """
    def lin(m):  # (weight [in, out], bias or None) of nn.Linear or HF Conv1D
        if not is_linear(m):
            raise ValueError(f"mlp: unsupported projection {type(m).__name__}")
        return weight_out_in(m).t(), m.bias

    p = 0.0
    drop = getattr(mlp, "dropout", None)
    if isinstance(drop, nn.Dropout):
        p = drop.p
    if all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj")):
        return True, mlp.act_fn, p, "output", [lin(mlp.gate_proj), lin(mlp.up_proj), lin(mlp.down_proj)]
    if hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):
        return False, mlp.act, p, "output", [lin(mlp.c_fc), lin(mlp.c_proj)]
    if all(hasattr(mlp, a) for a in ("wi_0", "wi_1", "wo")):  # T5 v1.1 / Flan-T5: act(wi_0 x) * wi_1 x
        return True, mlp.act, p, "hidden", [lin(mlp.wi_0), lin(mlp.wi_1), lin(mlp.wo)]
    if hasattr(mlp, "wi") and hasattr(mlp, "wo"):  # T5
        return False, mlp.act, p, "hidden", [lin(mlp.wi), lin(mlp.wo)]
    if hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):
        act = getattr(mlp, "act", None) or getattr(mlp, "activation_fn", None) or getattr(mlp, "act_fn", None)
        if act is None:
            raise ValueError("mlp: found fc1/fc2 but no act / activation_fn / act_fn")
        return False, act, p, "hidden", [lin(mlp.fc1), lin(mlp.fc2)]
    raise ValueError(f"mlp: unsupported MLP {type(mlp).__name__} (expected GPT-2, Llama, T5 or fc1/fc2 style)")


def upcycle_mlp(mlp: nn.Module, num_experts: int, router: str = "expert_choice", capacity_factor: float = 2.0,
                top_k: int = 2, group_size: Optional[int] = None) -> nn.Module:
    """Sparse upcycling (Komatsuzaki et al. 2022): an MoE layer whose
    ``num_experts`` experts are copies of ``mlp``'s weights and whose router
    is new (fp32, N(0, 0.02)). ``router``: ``"expert_choice"`` or ``"topk"``.

    With expert choice and ``capacity_factor = num_experts`` every expert
    takes every token, the gates of a token sum to 1, and the layer computes
    exactly the dense MLP.
    """
    gated, act, p, position, weights = _dense_weights(mlp)
    w_in = weights[0][0]
    d_model, d_hidden = w_in.shape
    bias = weights[-1][1] is not None
    common = dict(gated=gated, activation=act, bias=bias, dropout=p, dropout_position=position,
                  group_size=group_size, device=w_in.device, dtype=w_in.dtype)
    if router == "expert_choice":
        layer = ExpertChoiceMoE(d_model, d_hidden, num_experts, capacity_factor=capacity_factor, **common)
    elif router == "topk":
        layer = TopKMoE(d_model, d_hidden, num_experts, top_k=top_k, capacity_factor=capacity_factor, **common)
    else:
        raise ValueError(f"router: expected 'expert_choice' or 'topk', got {router!r}")
    ex = layer.experts
    with torch.no_grad():
        if gated:
            (wg, bg), (wu, bu), (wd, bd) = weights
            targets = [(ex.w_gate, wg, ex.b_gate, bg), (ex.w_up, wu, ex.b_up, bu), (ex.w2, wd, ex.b2, bd)]
        else:
            (w1, b1), (w2, b2) = weights
            targets = [(ex.w1, w1, ex.b1, b1), (ex.w2, w2, ex.b2, b2)]
        for w_dst, w_src, b_dst, b_src in targets:
            w_dst.copy_(w_src.detach().expand_as(w_dst))
            if b_dst is not None:
                b_dst.copy_(b_src.detach().reshape(1, 1, -1).expand_as(b_dst))
    return layer.train(mlp.training)  # an eval-mode model stays in eval mode (dropout off)


def _mlp_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of each dense MLP of a Hugging Face model, in
    order: the blocks of the first ModuleList whose entries have an ``mlp``
    (GPT-2's ``h``, Llama's ``layers``), or else every T5 feed-forward
    layer's ``DenseReluDense`` (encoder blocks, then decoder blocks)."""
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(hasattr(b, "mlp") for b in m):
            return [(b, "mlp") for b in m]
    t5 = [(m, "DenseReluDense") for m in model.modules() if hasattr(m, "DenseReluDense")]
    if t5:
        return t5
    raise ValueError("model: found no list of blocks with an .mlp attribute and no T5 feed-forward layers")


def upcycle_model(model: nn.Module, num_experts: int, layers: Union[str, list] = "every_other",
                  **kwargs) -> list[int]:
    """Replace the MLP blocks of a Hugging Face model by upcycled MoE layers,
    in place. ``layers``: ``"every_other"`` (blocks 1, 3, 5, ..., as in the
    paper), ``"last:L"`` (the last L blocks), ``"all"``, or a list of block
    indices; for T5 models the indices count the feed-forward layers of the
    encoder, then of the decoder. Other keyword arguments go to
    :func:`upcycle_mlp`. Returns the indices replaced."""
    slots = _mlp_slots(model)
    n = len(slots)
    if layers == "every_other":
        chosen = list(range(1, n, 2))
    elif layers == "all":
        chosen = list(range(n))
    elif isinstance(layers, str) and re.fullmatch(r"last:\d+", layers):
        L = int(layers.split(":")[1])
        chosen = list(range(max(0, n - L), n))
    elif isinstance(layers, (list, tuple)) and all(isinstance(i, int) and -n <= i < n for i in layers):
        chosen = sorted({i % n for i in layers})
    else:
        raise ValueError(f"layers: expected 'every_other', 'all', 'last:L' or block indices < {n}, got {layers!r}")
    for i in chosen:
        parent, attr = slots[i]
        setattr(parent, attr, upcycle_mlp(getattr(parent, attr), num_experts, **kwargs))
    return chosen
