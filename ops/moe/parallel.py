"""Expert parallelism over ``torch.distributed``: each rank of a process group
holds ``E / world`` experts, every rank routes over the tokens of the whole
group, and tokens move to their experts and back with ``all_to_all_single``.

Why the routing is global: both routers decide per group of tokens (expert
choice: each expert's top ``capacity`` tokens; top-K: which assignments fit
an expert's capacity, in order). Every rank gathers the router logits of all
ranks (``[n, E]`` fp32, small next to the tokens), concatenated in rank
order, and runs the same deterministic routing on them: the slot table
``[E, C]`` is then the one the single-process layer computes on the
concatenated batch, on every rank, without exchanging it. Expert choice
across ranks falls out of this: each expert picks among all ranks' tokens.

Each rank then derives, from the global table alone, which of its tokens go
to which rank (and the split sizes), sends them, runs its experts on its
``[E/world, C, d]`` slots, and sends the results back to the tokens' owners,
who combine them in the global slot order: the same fp32 sums, in the same
order, as the single-process layer (``moe_combine``).

Two exchanges:

* ``exact`` (default): only the rows that move, with split sizes from the
  table (one host sync per layer call to read them, as
  ``all_to_all_single`` takes host ints).
* ``static``: every (source, destination) pair exchanges a fixed
  ``[E/world · C, d]`` block, zero where the source owns no token of the
  slot: static shapes and no host sync (CUDA-graph friendly when every rank
  has the same token count), for ``world`` times the bytes.

Gradients: the collectives are autograd Functions (the logits' all-gather
reduce-scatters in the backward, each all-to-all runs in reverse). Experts'
gradients stay on their rank; the router's are all-reduced by a hook on its
weight. ``grad_reduction="mean"`` (default) matches DDP's convention (the
objective is the mean of the ranks' losses: router gradients averaged,
expert gradients divided by ``world``); ``"sum"`` gives the gradients of the
sum of the ranks' losses. The layer's parameters are then synchronised by
the layer itself: tell DDP / FSDP to leave them alone
(``expert_parallel_parameter_names``; docs/distributed.md).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..common import all_reduce_sum, check
from .function import moe_combine, moe_dispatch

EXCHANGES = ("exact", "static")
REDUCTIONS = ("mean", "sum")


@dataclasses.dataclass(frozen=True)
class ExpertShard:
    """This rank's share of a layer's experts: experts ``first .. first + local - 1``."""

    group: object
    world: int
    rank: int
    local: int
    exchange: str
    grad_reduction: str

    @property
    def first(self) -> int:
        return self.rank * self.local


def shard_experts(layer: nn.Module, group=None, exchange: str = "exact", grad_reduction: str = "mean") -> None:
    """Keep this rank's ``num_experts // world`` experts of ``layer`` (an
    ``ExpertChoiceMoE`` / ``TopKMoE``), replicate its router, and install
    the gradient hooks; see the module doc."""
    check(dist.is_available() and dist.is_initialized(), "group", "torch.distributed is not initialised")
    check(exchange in EXCHANGES, "exchange", f"expected one of {EXCHANGES}, got {exchange!r}")
    check(grad_reduction in REDUCTIONS, "grad_reduction", f"expected one of {REDUCTIONS}, got {grad_reduction!r}")
    check(getattr(layer, "expert_shard", None) is None, "layer", "its experts are already sharded")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    E = layer.num_experts
    check(E % world == 0, "group", f"the world size {world} must divide num_experts={E}")
    local = E // world
    shard = ExpertShard(group, world, rank, local, exchange, grad_reduction)
    experts = layer.experts
    for name, p in list(experts.named_parameters(recurse=False)):
        kept = nn.Parameter(p.detach()[shard.first:shard.first + local].clone(), requires_grad=p.requires_grad)
        setattr(experts, name, kept)
        # each expert's gradient sums every rank's loss: divide, as DDP averages (frozen experts: no gradient)
        if grad_reduction == "mean" and kept.requires_grad:
            kept.register_hook(lambda g, w=world: g / w)
    for adapter in experts.lora.values():  # the adapters live with their experts
        for name, t in list(adapter.named_parameters(recurse=False)) + list(adapter.named_buffers(recurse=False)):
            kept = t.detach()[shard.first:shard.first + local].clone()
            if isinstance(t, nn.Parameter):
                kept = nn.Parameter(kept, requires_grad=t.requires_grad)
                if grad_reduction == "mean" and kept.requires_grad:
                    kept.register_hook(lambda g, w=world: g / w)
                setattr(adapter, name, kept)
            else:
                adapter.register_buffer(name, kept)
    layer.router.weight.register_hook(lambda g: _all_reduce(g, shard))
    layer.expert_shard = shard


def _all_reduce(g: Tensor, shard: ExpertShard) -> Tensor:
    g = all_reduce_sum(g, shard.group)
    return g / shard.world if shard.grad_reduction == "mean" else g


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows, with its own reverse as the backward."""

    @staticmethod
    def forward(ctx, rows, out_rows, out_splits, in_splits, group):
        ctx.rows, ctx.out_splits, ctx.in_splits, ctx.group = rows.shape[0], out_splits, in_splits, group
        out = rows.new_empty((out_rows, *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        back = _AllToAll.apply(grad.contiguous(), ctx.rows, ctx.in_splits, ctx.out_splits, ctx.group)
        return back, None, None, None, None


class _AllGather(torch.autograd.Function):
    """All-gather of equal-sized row blocks, concatenated in rank order. The
    backward sums each block's gradient over the ranks back onto its owner
    (a reduce-scatter, done with all_to_all, which gloo has)."""

    @staticmethod
    def forward(ctx, t, group):
        ctx.group, ctx.world = group, dist.get_world_size(group)
        parts = [torch.empty_like(t) for _ in range(ctx.world)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        mine = _AllToAll.apply(grad.contiguous(), grad.shape[0], None, None, ctx.group)
        return mine.reshape(ctx.world, -1, *grad.shape[1:]).sum(0), None


def gather_logits(logits: Tensor, shard: ExpertShard) -> tuple[Tensor, list[int]]:
    """(the router logits of every rank concatenated in rank order [N, E],
    the token offset of each rank [world + 1]); differentiable."""
    n = logits.shape[0]
    if shard.exchange == "static":
        counts = [n] * shard.world  # static: every rank has the same token count (checked by the gather's shapes)
    else:
        sizes = torch.tensor([n], dtype=torch.int64, device=logits.device)
        gathered = [torch.zeros_like(sizes) for _ in range(shard.world)]
        dist.all_gather(gathered, sizes, group=shard.group)
        counts = [int(c) for c in torch.cat(gathered).tolist()]
    longest = max(counts)
    padded = torch.nn.functional.pad(logits, (0, 0, 0, longest - n))
    parts = _AllGather.apply(padded, shard.group).reshape(shard.world, longest, -1)
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]), offsets


@dataclasses.dataclass(frozen=True)
class ExchangePlan:
    """Who sends which row to whom, derived from the global slot table alone.

    ``owner``: [E·C] the rank holding each slot's token (-1: empty slot);
    ``local_idx``: [E·C] the slot's token as an index on this rank, -1 for
    slots whose token lives elsewhere (or nowhere). Exact exchange only:
    ``owned`` (bool [E·C]), ``send_idx`` (this rank's tokens of the owned
    slots, in global slot order, which is destination-rank order),
    ``send_splits`` / ``recv_splits`` (rows to / from each rank, host ints)
    and ``recv_pos`` (where the rows from each source land among this rank's
    ``E/world · C`` slots)."""

    owner: Tensor
    local_idx: Tensor
    owned: Optional[Tensor] = None
    send_idx: Optional[Tensor] = None
    send_splits: Optional[list] = None
    recv_pos: Optional[Tensor] = None
    recv_splits: Optional[list] = None


def plan_exchange(token_idx: Tensor, offsets: list[int], shard: ExpertShard) -> ExchangePlan:
    E, C = token_idx.shape
    flat = token_idx.reshape(-1)
    if shard.exchange == "static":  # equal token counts: the owner is a division, no host data at all
        n = offsets[1]
        owner = torch.where(flat >= 0, flat // max(n, 1), -1)
    else:
        bounds = torch.tensor(offsets[1:], dtype=flat.dtype, device=flat.device)
        owner = torch.where(flat >= 0, torch.searchsorted(bounds, flat, right=True), -1)
    local_idx = torch.where(owner == shard.rank, flat - offsets[shard.rank], -1)
    if shard.exchange == "static":
        return ExchangePlan(owner, local_idx)
    owned = owner == shard.rank
    mine = owner.reshape(E, C)[shard.first:shard.first + shard.local].reshape(-1)
    order = torch.sort(torch.where(mine >= 0, mine, shard.world), stable=True).indices  # by source, empty last
    per_dest = owned.reshape(shard.world, shard.local * C).sum(1)
    per_src = torch.bincount(mine[mine >= 0], minlength=shard.world)
    send_splits, recv_splits = (v.tolist() for v in torch.stack([per_dest, per_src]))  # one host sync
    return ExchangePlan(owner, local_idx, owned, local_idx[owned], send_splits, order[:sum(recv_splits)],
                        recv_splits)


def _all_to_all(rows: Tensor, out_rows: int, out_splits, in_splits, shard: ExpertShard) -> Tensor:
    return _AllToAll.apply(rows, out_rows, out_splits, in_splits, shard.group)


def _gather(x: Tensor, idx: Tensor, backend) -> Tensor:
    """x[idx] (zero rows where idx is -1) by the deterministic dispatch
    kernel: a token picked by several experts gets its gradient summed in a
    fixed order, not by atomics."""
    return moe_dispatch(x, idx[None], backend=backend)[0]


def dispatch(x: Tensor, plan: ExchangePlan, C: int, shard: ExpertShard, backend) -> Tensor:
    """This rank's expert slots ``[E/world, C, d]``: the rows of every rank's
    tokens its experts picked (zero rows for empty slots)."""
    d, slots = x.shape[-1], shard.local * C
    if shard.exchange == "exact":
        recv = _all_to_all(_gather(x, plan.send_idx, backend), sum(plan.recv_splits), plan.recv_splits,
                           plan.send_splits, shard)
        h = x.new_zeros((slots, d)).index_copy(0, plan.recv_pos, recv)
    else:
        # Every slot of every rank, this rank's tokens filled in, zero elsewhere: block q goes to rank q,
        # and the blocks received from all ranks add up to this rank's slots (one source per filled slot).
        full = _gather(x, plan.local_idx, backend)
        h = _all_to_all(full, full.shape[0], None, None, shard).reshape(shard.world, slots, d).sum(0)
    return h.reshape(shard.local, C, d)


def combine(out: Tensor, gates: Tensor, token_idx: Tensor, plan: ExchangePlan, n_local: int,
            shard: ExpertShard, backend) -> Tensor:
    """``[n_local, d]``: this rank's tokens, summed in fp32 over the slots (on
    any rank) that hold them, in global slot order, as the single-process
    combine sums them."""
    E, C = token_idx.shape
    d = out.shape[-1]
    rows = out.reshape(shard.local * C, d)
    if shard.exchange == "exact":
        back = _all_to_all(rows[plan.recv_pos], int(plan.send_idx.numel()), plan.send_splits, plan.recv_splits,
                           shard)
        return moe_combine(back[None], plan.send_idx[None], gates.reshape(-1)[plan.owned][None], n_local,
                           backend=backend)
    dest = plan.owner.reshape(E, C)[shard.first:shard.first + shard.local].reshape(1, -1, 1)
    ranks = torch.arange(shard.world, device=out.device).reshape(-1, 1, 1)
    blocks = torch.where(dest == ranks, rows[None], torch.zeros((), dtype=out.dtype, device=out.device))
    back = _all_to_all(blocks.reshape(-1, d), shard.world * shard.local * C, None, None, shard)
    return moe_combine(back.reshape(E, C, d), plan.local_idx.reshape(E, C), gates, n_local, backend=backend)


def expert_parallel_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters that sharded MoE layers synchronise themselves
    (local experts, all-reduced router): pass them to DDP
    (``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``)
    or keep them out of FSDP, so they are not reduced twice."""
    names = []
    for prefix, m in model.named_modules():
        if getattr(m, "expert_shard", None) is not None:
            for n, _ in m.named_parameters():
                if n.startswith(("experts.", "router.")):
                    names.append(f"{prefix}.{n}" if prefix else n)
    return names
