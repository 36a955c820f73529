"""MoE routing, dispatch and combine: launchers, torch.library ops, autograd
Functions, functionals.

One slot-table format serves both routing modes: ``token_idx [E, C]`` (int64,
the token each expert slot holds, -1 for an empty slot) and ``gates [E, C]``
(fp32, 0 for an empty slot). Every shape is static (E, C and n only), so
nothing here synchronises with the host.

    moe_dispatch(x, token_idx)                      -> [E, C, d]
    moe_combine(expert_out, token_idx, gates, n)    -> [n, d]
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..autotune import cache as tuning
from ..autotune import configs as cfgs
from ..kernels.moe import _moe_gather_kernel, _moe_segment_sum_kernel
from . import reference as ref
from .common import cdiv, dtype_name
from .backend import call_op, check_backend, device_info, use_triton


# ---------------------------------------------------------------- routing
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
    n, E = logits.shape
    g = n if group_size is None else group_size
    if g < 1 or n % g:
        raise ValueError(f"group_size: must divide the token count {n}, got {group_size}")
    return logits.reshape(n // g, g, E)


def _check_logits(router_logits: Tensor, capacity: int) -> None:
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits: expected [tokens, experts], got shape {tuple(router_logits.shape)}")
    if not isinstance(capacity, int) or capacity < 1:
        raise ValueError(f"capacity: expected a positive int, got {capacity!r}")


def expert_choice_route(router_logits: Tensor, capacity: int, group_size: Optional[int] = None):
    """Expert choice (Zhou et al. 2022): each expert picks its top ``capacity``
    tokens by router probability (softmax over experts, fp32).

    Returns ``(gates, token_idx)``, both ``[E, capacity]`` (with groups:
    ``[E, num_groups · capacity]``, each group's slots side by side, token
    indices global). Ties go to the lower token index. When a group has fewer
    tokens than ``capacity``, the extra slots are empty (-1, gate 0).
    """
    _check_logits(router_logits, capacity)
    probs = torch.softmax(router_logits.float(), dim=-1)
    grouped = _grouped(probs, group_size)  # [G, g, E]
    G, g, E = grouped.shape
    take = min(capacity, g)
    # Stable top-k: sort descending with a stable sort so equal probabilities
    # keep token order (torch.topk does not promise an order for ties).
    vals, idx = torch.sort(grouped.transpose(1, 2), dim=-1, descending=True, stable=True)
    vals, idx = vals[..., :take], idx[..., :take]  # [G, E, take]
    idx = idx + (torch.arange(G, device=idx.device) * g)[:, None, None]
    if take < capacity:
        pad = capacity - take
        vals = torch.nn.functional.pad(vals, (0, pad), value=0.0)
        idx = torch.nn.functional.pad(idx, (0, pad), value=-1)
    gates = vals.permute(1, 0, 2).reshape(E, G * capacity)
    token_idx = idx.permute(1, 0, 2).reshape(E, G * capacity)
    return gates.contiguous(), token_idx.contiguous()


DROP_ORDERS = ("position", "probability")


def topk_route(router_logits: Tensor, top_k: int, capacity: int, group_size: Optional[int] = None,
               normalize: bool = True, drop_order: str = "position"):
    """Token choice: each token goes to its ``top_k`` experts (softmax over
    experts in fp32; ``normalize`` rescales the chosen probabilities to sum to
    1, as Mixtral does); each expert keeps at most ``capacity`` tokens.

    Drop order: all first choices are placed before any second choice, and
    within one choice rank tokens are placed in token order
    (``drop_order="position"``, GShard's) or by their top-1 router
    probability, highest first, ties by position (``"probability"``, V-MoE's
    batch prioritized routing); an assignment that finds its expert full is
    dropped (the token then gets less, or nothing, from the layer). Within an
    expert, kept slots follow that placement order. Returns ``(gates,
    token_idx)`` ``[E, capacity]`` (``[E, num_groups · capacity]`` with
    groups) with empty slots at -1 / 0.
    """
    _check_logits(router_logits, capacity)
    n, E = router_logits.shape
    if not isinstance(top_k, int) or not 1 <= top_k <= E:
        raise ValueError(f"top_k: expected an int in [1, {E}], got {top_k!r}")
    if drop_order not in DROP_ORDERS:
        raise ValueError(f"drop_order: expected one of {DROP_ORDERS}, got {drop_order!r}")
    probs = torch.softmax(router_logits.float(), dim=-1)
    topv, topi = torch.topk(probs, top_k, dim=-1)  # [n, K]
    top1 = topv[:, :1]
    if normalize:
        topv = topv / topv.sum(dim=-1, keepdim=True)
    grouped_i = _grouped(topi, group_size)  # [G, g, K]
    grouped_v = _grouped(topv, group_size)
    G, g, K = grouped_i.shape
    # Priority order inside a group: choice rank first, then token (by position or by top-1 probability).
    tok = torch.arange(g, device=topi.device).expand(G, g)
    if drop_order == "probability":
        tok = torch.argsort(_grouped(top1, group_size)[..., 0], dim=1, descending=True, stable=True)  # [G, g]
        grouped_i = grouped_i.gather(1, tok[..., None].expand(G, g, K))
        grouped_v = grouped_v.gather(1, tok[..., None].expand(G, g, K))
    choice = grouped_i.transpose(1, 2).reshape(G, K * g)  # [G, K·g]
    value = grouped_v.transpose(1, 2).reshape(G, K * g)
    token = tok.repeat(1, K) + (torch.arange(G, device=topi.device) * g)[:, None]  # [G, K·g]
    onehot = torch.nn.functional.one_hot(choice, E).to(torch.int32)  # [G, K·g, E]
    position = (torch.cumsum(onehot, dim=1) - 1).gather(2, choice[..., None])[..., 0]  # [G, K·g]
    keep = position < capacity
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


def inverse_index(token_idx: Tensor, num_tokens: int):
    """(order, offsets): slot ids sorted by the token they hold (stable, so by
    slot id within a token; empty slots last) and ``offsets [n + 1]``, token
    t's slots being ``order[offsets[t]:offsets[t + 1]]``. On device, no sync."""
    flat = token_idx.reshape(-1)
    key = torch.where(flat < 0, torch.full_like(flat, num_tokens), flat)
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(num_tokens + 1, device=flat.device, dtype=sorted_key.dtype)
    offsets = torch.searchsorted(sorted_key, bounds)
    return order, offsets


# ---------------------------------------------------------------- launchers
def _pick(kernel: str, device: torch.device, dtype: torch.dtype, D: int, default):
    return tuning.select_memo(kernel, dtype_name(dtype), {"D": D}, device_info(device), default)


def moe_gather(src: Tensor, idx: Tensor, scale: Optional[Tensor] = None, other: Optional[Tensor] = None,
               out_dtype: Optional[torch.dtype] = None):
    """(out [S, D], dot [S] fp32 or None): out[s] = scale[s]·src[idx[s]] (0 where idx < 0);
    dot[s] = <src[idx[s]], other[s]> when ``other`` is given."""
    S, D = idx.numel(), src.shape[1]
    out = torch.empty((S, D), device=src.device, dtype=out_dtype or src.dtype)
    dot = torch.empty((S,), device=src.device, dtype=torch.float32) if other is not None else None
    if S == 0:
        return out, dot
    cfg = _pick("moe_gather", src.device, src.dtype, D, lambda: cfgs.default_moe_gather(D, src.device.type == "cuda"))
    _moe_gather_kernel[(cdiv(S, cfg["BLOCK_S"]),)](
        src_ptr=src, idx_ptr=idx, scale_ptr=scale if scale is not None else out,
        other_ptr=other if other is not None else out, out_ptr=out, dot_ptr=dot if dot is not None else out,
        S=S, D=D, stride_src=src.stride(0), stride_other=other.stride(0) if other is not None else 0,
        stride_out=out.stride(0), HAS_SCALE=scale is not None, HAS_DOT=other is not None, **cfg.launch_kwargs())
    return out, dot


def moe_segment_sum(src: Tensor, order: Tensor, offsets: Tensor, gates: Optional[Tensor], num_tokens: int,
                    out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """out [n, D]: out[t] = Σ gate·src over token t's slots, fp32, in ``order``."""
    D = src.shape[1]
    out = torch.empty((num_tokens, D), device=src.device, dtype=out_dtype or src.dtype)
    if num_tokens == 0:
        return out
    cfg = _pick("moe_segment_sum", src.device, src.dtype, D,
                lambda: cfgs.default_moe_segment_sum(D, src.device.type == "cuda"))
    _moe_segment_sum_kernel[(num_tokens, cdiv(D, cfg["BLOCK_D"]))](
        src_ptr=src, order_ptr=order, offsets_ptr=offsets, gate_ptr=gates if gates is not None else src,
        out_ptr=out, n=num_tokens, D=D, stride_src=src.stride(0), stride_out=out.stride(0),
        HAS_GATES=gates is not None, **cfg.launch_kwargs())
    return out


def _rows(t: Tensor) -> Tensor:
    """2-D view with a contiguous last dim (what the kernels index)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------- torch.library ops
def _dispatch_fwd_impl(x: Tensor, token_idx: Tensor, backend: str) -> Tensor:
    E, C = token_idx.shape
    if use_triton(x.device, backend):
        out, _ = moe_gather(_rows(x), token_idx.reshape(-1))
        return out.reshape(E, C, x.shape[-1])
    return ref.moe_dispatch_ref(x, token_idx)


def _segment_sum_impl(src: Tensor, token_idx: Tensor, gates: Optional[Tensor], num_tokens: int,
                      backend: str) -> Tensor:
    """Σ over each token's slots of gate·src (gates None = 1); src [E, C, d]."""
    E, C, d = src.shape
    if use_triton(src.device, backend):
        order, offsets = inverse_index(token_idx, num_tokens)
        return moe_segment_sum(_rows(src), order, offsets, None if gates is None else gates.reshape(-1),
                               num_tokens)
    ones = torch.ones_like(token_idx, dtype=torch.float32)
    return ref.moe_combine_ref(src, token_idx, ones if gates is None else gates, num_tokens)


def _combine_bwd_impl(dy: Tensor, expert_out: Tensor, token_idx: Tensor, gates: Tensor,
                      backend: str) -> tuple[Tensor, Tensor]:
    """(d expert_out [E, C, d], d gates [E, C] fp32)."""
    E, C, d = expert_out.shape
    if use_triton(dy.device, backend):
        dout, dgates = moe_gather(_rows(dy), token_idx.reshape(-1), gates.reshape(-1).float(),
                                  _rows(expert_out), out_dtype=expert_out.dtype)
        return dout.reshape(E, C, d), dgates.reshape(E, C)
    gathered = ref.moe_dispatch_ref(dy.float(), token_idx)
    dout = (gathered * gates.float()[..., None]).to(expert_out.dtype)
    return dout, (gathered * expert_out.float()).sum(-1)


moe_dispatch_op = torch.library.custom_op("posttrain_kernels::moe_dispatch", mutates_args=())(_dispatch_fwd_impl)
moe_segment_sum_op = torch.library.custom_op("posttrain_kernels::moe_segment_sum",
                                             mutates_args=())(_segment_sum_impl)
moe_combine_bwd_op = torch.library.custom_op("posttrain_kernels::moe_combine_bwd",
                                             mutates_args=())(_combine_bwd_impl)


@moe_dispatch_op.register_fake
def _(x, token_idx, backend):
    return x.new_empty((*token_idx.shape, x.shape[-1]))


@moe_segment_sum_op.register_fake
def _(src, token_idx, gates, num_tokens, backend):
    return src.new_empty((num_tokens, src.shape[-1]))


@moe_combine_bwd_op.register_fake
def _(dy, expert_out, token_idx, gates, backend):
    return expert_out.new_empty(expert_out.shape), gates.new_empty(gates.shape, dtype=torch.float32)


# ---------------------------------------------------------------- autograd
class MoEDispatchFunction(torch.autograd.Function):
    """[E, C, d] = x[token_idx] (zero rows for empty slots). Backward: the
    deterministic segment sum of the slot gradients back onto their tokens."""

    @staticmethod
    def forward(ctx, x, token_idx, backend):
        ctx.save_for_backward(token_idx)
        ctx.num_tokens, ctx.backend = x.shape[0], backend
        return call_op(moe_dispatch_op, _dispatch_fwd_impl, x, token_idx, backend)

    @staticmethod
    def backward(ctx, dout):
        (token_idx,) = ctx.saved_tensors
        dx = call_op(moe_segment_sum_op, _segment_sum_impl, dout, token_idx, None, ctx.num_tokens, ctx.backend)
        return dx, None, None


class MoECombineFunction(torch.autograd.Function):
    """[n, d]: y[t] = Σ gate·expert_out over t's slots (fp32, fixed order).
    Backward: d expert_out = gate·dy[token] and d gate = <dy[token], expert_out>,
    one gather pass."""

    @staticmethod
    def forward(ctx, expert_out, token_idx, gates, num_tokens, backend):
        ctx.save_for_backward(expert_out, token_idx, gates)
        ctx.backend = backend
        return call_op(moe_segment_sum_op, _segment_sum_impl, expert_out, token_idx, gates, num_tokens, backend)

    @staticmethod
    def backward(ctx, dy):
        expert_out, token_idx, gates = ctx.saved_tensors
        dout, dgates = call_op(moe_combine_bwd_op, _combine_bwd_impl, dy, expert_out, token_idx, gates, ctx.backend)
        return dout, None, dgates.to(gates.dtype), None, None


# ---------------------------------------------------------------- functional
def _check_table(token_idx: Tensor, name: str = "token_idx") -> None:
    if not isinstance(token_idx, Tensor) or token_idx.dim() != 2:
        raise ValueError(f"{name}: expected an [experts, capacity] tensor, got "
                         f"{getattr(token_idx, 'shape', type(token_idx).__name__)}")
    if token_idx.dtype != torch.int64:
        raise ValueError(f"{name}: dtype must be int64, got {token_idx.dtype}")


def moe_dispatch(x: Tensor, token_idx: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Gather tokens into expert slots: ``x [n, d]`` → ``[E, C, d]``; empty
    slots (``token_idx == -1``) give zero rows. Differentiable in x."""
    _check_table(token_idx)
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x: expected a floating [tokens, d] tensor, got {getattr(x, 'shape', type(x))}")
    if token_idx.device != x.device:
        raise ValueError(f"token_idx: must be on x's device {x.device}, got {token_idx.device}")
    return MoEDispatchFunction.apply(x, token_idx, check_backend(backend))


def moe_combine(expert_out: Tensor, token_idx: Tensor, gates: Tensor, num_tokens: int, *,
                backend: Optional[str] = None) -> Tensor:
    """Scatter expert outputs back: ``y [n, d]``, ``y[t] = Σ gate·expert_out``
    over the (0 to E) slots holding t, summed in fp32 in a fixed order
    (bitwise deterministic); tokens no slot holds get 0. Differentiable in
    expert_out and gates."""
    _check_table(token_idx)
    if not isinstance(expert_out, Tensor) or expert_out.dim() != 3 or tuple(expert_out.shape[:2]) != tuple(
            token_idx.shape):
        raise ValueError(f"expert_out: expected [E, C, d] with [E, C] = {tuple(token_idx.shape)}, got "
                         f"{getattr(expert_out, 'shape', type(expert_out))}")
    if not isinstance(gates, Tensor) or tuple(gates.shape) != tuple(token_idx.shape) or not gates.is_floating_point():
        raise ValueError(f"gates: expected a floating tensor of shape {tuple(token_idx.shape)}, got "
                         f"{getattr(gates, 'shape', type(gates))}")
    if not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens: expected a non-negative int, got {num_tokens!r}")
    for name, v in (("token_idx", token_idx), ("gates", gates)):
        if v.device != expert_out.device:
            raise ValueError(f"{name}: must be on expert_out's device {expert_out.device}, got {v.device}")
    return MoECombineFunction.apply(expert_out, token_idx, gates, num_tokens, check_backend(backend))
