"""MoE routing in plain PyTorch: expert choice and top-K token choice with a
capacity, and the router's auxiliary losses.

One slot-table format serves both routing modes: ``token_idx [E, C]`` (int64,
the token each expert slot holds, -1 for an empty slot) and ``gates [E, C]``
(fp32, 0 for an empty slot). Every shape is static (E, C and n only), so
nothing here synchronises with the host.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


SCORINGS = ("softmax", "sigmoid")
SCORE_OVER = ("experts", "topk")
GROUP_SCORES = ("max", "top2_sum")


def capacity_from_factor(num_tokens: int, num_experts: int, capacity_factor: float, top_k: int = 1,
                         multiple_of: int = 1) -> int:
    """Slots per expert: ``ceil(capacity_factor · top_k · num_tokens / num_experts)``,
    rounded up to a multiple of ``multiple_of``, at least 1.

    Expert choice uses top_k = 1 (T = C·n/E of the paper); top-K routing
    counts the K assignments of every token.
    """
    if num_experts < 1 or capacity_factor <= 0 or top_k < 1 or multiple_of < 1:
        raise ValueError("capacity_from_factor: num_experts, capacity_factor, top_k and multiple_of must be "
                         f"positive, got {num_experts}, {capacity_factor}, {top_k}, {multiple_of}")
    cap = max(1, math.ceil(capacity_factor * top_k * num_tokens / num_experts - 1e-9))
    return -(-cap // multiple_of) * multiple_of


def _grouped(logits: Tensor, group_size: Optional[int]) -> Tensor:
    """[groups, group size, ...]; without ``group_size`` one group of all n
    tokens (also when n = 0: one empty group, whose slots are all empty)."""
    n = logits.shape[0]
    if group_size is None:
        return logits.reshape(1, n, *logits.shape[1:])
    if not isinstance(group_size, int) or group_size < 1 or n % group_size:
        raise ValueError(f"group_size: must be a positive int dividing the token count {n}, got {group_size!r}")
    return logits.reshape(n // group_size, group_size, *logits.shape[1:])


def _check_logits(router_logits: Tensor, capacity: int) -> None:
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits: expected [tokens, experts], got shape {tuple(router_logits.shape)}")
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity: expected a positive int, got {capacity!r}")


def expert_choice_route(router_logits: Tensor, capacity: int, group_size: Optional[int] = None,
                        scoring: str = "softmax"):
    """Expert choice (Zhou et al. 2022): each expert picks its top ``capacity``
    tokens by router probability (softmax over experts, fp32; or a sigmoid
    per expert with ``scoring="sigmoid"``).

    Returns ``(gates, token_idx)``, both ``[E, capacity]`` (with groups:
    ``[E, num_groups · capacity]``, each group's slots side by side, token
    indices global). Ties go to the lower token index. When a group has fewer
    tokens than ``capacity``, the extra slots are empty (-1, gate 0).
    """
    _check_logits(router_logits, capacity)
    if scoring not in SCORINGS:
        raise ValueError(f"scoring: expected one of {SCORINGS}, got {scoring!r}")
    logits = router_logits.float()
    probs = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    # A token whose probabilities are not finite (NaN, +inf or all -inf logits) sorts after every
    # finite token in every expert: it never displaces a healthy token (it gets a slot only where an
    # expert has more slots than finite tokens, and its NaN gate then stays in its own row).
    bad = ~torch.isfinite(probs).all(dim=-1, keepdim=True)
    key = torch.where(bad, float("-inf"), probs)
    grouped = _grouped(probs, group_size)  # [G, g, E]
    G, g, E = grouped.shape
    take = min(capacity, g)
    # Stable top-k: sort descending with a stable sort so equal probabilities
    # keep token order (torch.topk does not promise an order for ties).
    _, idx = torch.sort(_grouped(key, group_size).transpose(1, 2), dim=-1, descending=True, stable=True)
    idx = idx[..., :take]  # [G, E, take]
    vals = torch.gather(grouped.transpose(1, 2), -1, idx)
    idx = idx + (torch.arange(G, device=idx.device) * g)[:, None, None]
    if take < capacity:
        pad = capacity - take
        vals = torch.nn.functional.pad(vals, (0, pad), value=0.0)
        idx = torch.nn.functional.pad(idx, (0, pad), value=-1)
    gates = vals.permute(1, 0, 2).reshape(E, G * capacity)
    token_idx = idx.permute(1, 0, 2).reshape(E, G * capacity)
    return gates.contiguous(), token_idx.contiguous()


DROP_ORDERS = ("position", "probability")


def select_experts(router_logits: Tensor, top_k: int, *, scoring: str = "softmax", score_over: str = "experts",
                   selection_bias: Optional[Tensor] = None, n_group: Optional[int] = None,
                   topk_group: Optional[int] = None, group_score: str = "max", normalize: bool = True,
                   norm_p: float = 1.0, norm_min: float = 0.0, norm_eps: float = 0.0,
                   routed_scaling_factor: float = 1.0):
    """Each token's ``top_k`` experts and their weights, before any capacity:
    ``(weights [n, K] fp32, experts [n, K] int64, priority [n] fp32)``, the
    experts in decreasing order of their selection score; ``priority`` is
    the token's best score (``drop_order="probability"``).

    The router families of current models, in fp32:

    * ``scoring``: ``"softmax"`` over the experts (Mixtral, Qwen, OLMoE,
      DeepSeek-V2, DBRX, Ernie) or ``"sigmoid"`` per expert (DeepSeek-V3,
      Llama 4, LFM2).
    * ``score_over="topk"``: softmax over the K largest logits only (GPT-OSS,
      GraniteMoE) instead of over all experts.
    * ``selection_bias`` ``[E]``: added to the scores to choose the experts,
      not to weight them (DeepSeek-V3 ``e_score_correction_bias``, Ernie 4.5
      ``moe_statics``, LFM2 ``expert_bias``).
    * ``n_group`` / ``topk_group``: choose among the ``topk_group`` best of
      ``n_group`` expert groups, a group scored by its best expert
      (``group_score="max"``, DeepSeek-V2) or its two best
      (``"top2_sum"``, DeepSeek-V3).
    * ``normalize``: divide the K weights by their ``norm_p``-norm (1: their
      sum, Mixtral; DBRX's ``moe_normalize_expert_weights``) plus ``norm_eps``
      (LFM2, DeepSeek-V3), clamped below at ``norm_min`` (Ernie 4.5); off for
      Qwen's ``norm_topk_prob=False``, Jamba and DeepSeek-V2.
    * ``routed_scaling_factor``: multiplies the weights last (DeepSeek, LFM2).
    """
    n, E = router_logits.shape
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= E:
        raise ValueError(f"top_k: expected an int in [1, {E}], got {top_k!r}")
    if scoring not in SCORINGS:
        raise ValueError(f"scoring: expected one of {SCORINGS}, got {scoring!r}")
    if score_over not in SCORE_OVER or (score_over == "topk" and scoring != "softmax"):
        raise ValueError(f"score_over: expected one of {SCORE_OVER} ('topk' with softmax scoring), got {score_over!r}")
    if group_score not in GROUP_SCORES:
        raise ValueError(f"group_score: expected one of {GROUP_SCORES}, got {group_score!r}")
    logits = router_logits.float()
    if score_over == "topk":  # the K largest logits, softmax over them alone
        top_logits, experts = torch.topk(logits, top_k, dim=-1)
        weights = torch.softmax(top_logits, dim=-1)
        return weights * routed_scaling_factor, experts, weights[:, 0]
    scores = torch.softmax(logits, dim=-1) if scoring == "softmax" else torch.sigmoid(logits)
    choice = scores if selection_bias is None else scores + selection_bias.float()
    if n_group is not None and n_group > 1:
        if E % n_group or not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
            raise ValueError(f"n_group / topk_group: {n_group} groups must divide {E} experts and "
                             f"1 <= topk_group <= n_group, got {topk_group!r}")
        per_group = choice.reshape(n, n_group, E // n_group)
        group = per_group.max(-1).values if group_score == "max" else per_group.topk(2, dim=-1).values.sum(-1)
        kept = torch.zeros_like(group, dtype=torch.bool).scatter_(1, torch.topk(group, topk_group, dim=-1).indices,
                                                                  True)
        choice = choice.masked_fill(~kept.repeat_interleave(E // n_group, dim=1), float("-inf"))
    experts = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(1, experts)
    priority = scores.max(dim=-1).values
    if normalize:
        norm = weights.sum(-1, keepdim=True) if norm_p == 1.0 else torch.norm(weights, p=norm_p, dim=-1, keepdim=True)
        norm = norm + norm_eps if norm_eps else norm
        weights = weights / (norm.clamp_min(norm_min) if norm_min > 0 else norm)
    return weights * routed_scaling_factor, experts, priority


def topk_route(router_logits: Tensor, top_k: int, capacity: int, group_size: Optional[int] = None,
               normalize: bool = True, drop_order: str = "position", *, renormalize_after_drop: bool = False,
               **router):
    """Token choice: each token goes to its ``top_k`` experts (chosen and
    weighted by ``select_experts``: softmax over experts in fp32 by default;
    ``normalize`` rescales the chosen weights to sum to 1, as Mixtral does;
    ``router`` takes the other options of current routers: sigmoid scoring,
    a selection bias, expert groups, p-norms, a scaling factor); each expert
    keeps at most ``capacity`` tokens.

    Drop order: all first choices are placed before any second choice, and
    within one choice rank tokens are placed in token order
    (``drop_order="position"``, GShard's) or by their top-1 router
    probability, highest first, ties by position (``"probability"``, V-MoE's
    batch prioritized routing); an assignment that finds its expert full is
    dropped (the token then gets less, or nothing, from the layer). With
    ``renormalize_after_drop`` a token's kept weights are rescaled to sum to
    1 after the drops (NLLB-MoE's ``normalize_router_prob_before_dropping=
    False``: a token that lost one choice gets weight 1 on the other). Within
    an expert, kept slots follow the placement order. Returns ``(gates,
    token_idx)`` ``[E, capacity]`` (``[E, num_groups · capacity]`` with
    groups) with empty slots at -1 / 0.
    """
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ValueError(f"top_k: expected a positive int, got {top_k!r}")
    _check_logits(router_logits, capacity)
    n, E = router_logits.shape
    if drop_order not in DROP_ORDERS:
        raise ValueError(f"drop_order: expected one of {DROP_ORDERS}, got {drop_order!r}")
    topv, topi, top1 = select_experts(router_logits, top_k, normalize=normalize, **router)  # [n, K]
    grouped_i = _grouped(topi, group_size)  # [G, g, K]
    grouped_v = _grouped(topv, group_size)
    G, g, K = grouped_i.shape
    # Priority order inside a group: choice rank first, then token (by position or by top-1 probability).
    tok = torch.arange(g, device=topi.device).expand(G, g)
    if drop_order == "probability":
        tok = torch.argsort(_grouped(top1, group_size), dim=1, descending=True, stable=True)  # [G, g]
        grouped_i = grouped_i.gather(1, tok[..., None].expand(G, g, K))
        grouped_v = grouped_v.gather(1, tok[..., None].expand(G, g, K))
    choice = grouped_i.transpose(1, 2).reshape(G, K * g)  # [G, K·g]
    value = grouped_v.transpose(1, 2).reshape(G, K * g)
    token = tok.repeat(1, K) + (torch.arange(G, device=topi.device) * g)[:, None]  # [G, K·g]
    onehot = torch.nn.functional.one_hot(choice, E).to(torch.int32)  # [G, K·g, E]
    position = (torch.cumsum(onehot, dim=1) - 1).gather(2, choice[..., None])[..., 0]  # [G, K·g]
    keep = position < capacity
    if renormalize_after_drop:  # each token's kept weights, rescaled to sum to 1
        kept = torch.where(keep, value, 0.0)  # [G, K·g]: choice rank major, the same token order in each rank
        total = kept.reshape(G, K, g).sum(1).repeat(1, K)
        value = kept / total.clamp_min(torch.finfo(kept.dtype).eps)
    # Each kept assignment owns a distinct slot, so the scatter has no
    # collisions; dropped ones go to a sink slot that is cut off.
    slot = choice * capacity + position
    sink = E * capacity
    flat = torch.where(keep, slot, torch.full_like(slot, sink))
    token_idx = torch.full((G, sink + 1), -1, dtype=torch.int64, device=topi.device)
    gates = torch.zeros((G, sink + 1), dtype=torch.float32, device=topi.device)
    token_idx.scatter_(1, flat, torch.where(keep, token, -1))
    gates.scatter_(1, flat, torch.where(keep, value, 0.0))
    token_idx = token_idx[:, :sink].reshape(G, E, capacity).permute(1, 0, 2).reshape(E, G * capacity)
    gates = gates[:, :sink].reshape(G, E, capacity).permute(1, 0, 2).reshape(E, G * capacity)
    return gates.contiguous(), token_idx.contiguous()


def router_z_loss(router_logits: Tensor) -> Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)²."""
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()


def load_balancing_loss(router_logits: Tensor, top_k: int) -> Tensor:
    """Switch/GShard auxiliary loss for top-K routing: E · Σ_e f_e · P_e, with
    f_e the fraction of token assignments (before capacity drops) to expert e
    and P_e its mean router probability. 1.0 when perfectly balanced."""
    n, E = router_logits.shape
    probs = torch.softmax(router_logits.float(), dim=-1)
    chosen = torch.topk(probs, top_k, dim=-1).indices
    f = torch.nn.functional.one_hot(chosen, E).float().sum(dim=(0, 1)) / (n * top_k)
    return E * (f * probs.mean(dim=0)).sum()
