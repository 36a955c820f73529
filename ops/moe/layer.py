"""MoE layers. They call the routing and functional APIs only; no Triton here.

``ExpertChoiceMoE``: each expert takes its top ``ceil(C·n/E)`` tokens.
``TopKMoE``: each token goes to its top-K experts, each expert keeps at most
``ceil(C·K·n/E)``. Both route in fp32, dispatch with ``moe_dispatch``, run the
experts as one batched GEMM over ``[E, capacity, d]`` and combine with
``moe_combine``: static shapes, no host synchronisation.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Union

import torch
from torch import nn

from ..common import autocast_dtype, check
from .function import moe_combine, moe_dispatch
from .routing import (DROP_ORDERS, capacity_from_factor, expert_choice_route, load_balancing_loss, router_z_loss,
                      topk_route)

ACTIVATIONS = {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
               "silu": lambda: nn.SiLU(), "relu": lambda: nn.ReLU()}


def _activation(act: Union[str, nn.Module]) -> nn.Module:
    if isinstance(act, nn.Module):
        return act
    if act not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)} or an nn.Module, got {act!r}")
    return ACTIVATIONS[act]()


class Experts(nn.Module):
    """E expert MLPs stored stacked, run as batched GEMMs over ``[E, C, d]``.

    Plain: ``act(h·w1 + b1)·w2 + b2``. Gated (Llama): ``(act(h·w_gate) * h·w_up)·w_down``.
    Weights are ``[E, in, out]`` so that ``torch.baddbmm`` takes them as they are.
    """

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, gated: bool, activation="gelu",
                 bias: bool = True, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.gated = gated
        kw = dict(device=device, dtype=dtype)
        E = num_experts
        if gated:
            self.w_gate = nn.Parameter(torch.empty(E, d_model, d_hidden, **kw))
            self.w_up = nn.Parameter(torch.empty(E, d_model, d_hidden, **kw))
        else:
            self.w1 = nn.Parameter(torch.empty(E, d_model, d_hidden, **kw))
        self.w2 = nn.Parameter(torch.empty(E, d_hidden, d_model, **kw))
        self.b1 = nn.Parameter(torch.zeros(E, 1, d_hidden, **kw)) if bias and not gated else None
        self.b_up = nn.Parameter(torch.zeros(E, 1, d_hidden, **kw)) if bias and gated else None
        self.b_gate = nn.Parameter(torch.zeros(E, 1, d_hidden, **kw)) if bias and gated else None
        self.b2 = nn.Parameter(torch.zeros(E, 1, d_model, **kw)) if bias else None
        self.act = _activation(activation)
        self.dropout = nn.Dropout(dropout)
        with torch.no_grad():
            for p in ([self.w_gate, self.w_up] if gated else [self.w1]) + [self.w2]:
                nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[1]))

    @staticmethod
    def _mm(h, w, b):
        return torch.bmm(h, w) if b is None else torch.baddbmm(b, h, w)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            a = self.act(self._mm(h, self.w_gate, self.b_gate)) * self._mm(h, self.w_up, self.b_up)
        else:
            a = self.act(self._mm(h, self.w1, self.b1))
        return self.dropout(self._mm(a, self.w2, self.b2))


class _MoEBase(nn.Module):
    def __init__(self, d_model, d_hidden, num_experts, capacity_factor, gated, activation, bias, dropout,
                 group_size, capacity_multiple, device, dtype, backend=None):
        super().__init__()
        self.backend = backend  # None/"auto", "triton" or "reference" (ops/backend.py)
        if num_experts < 1:
            raise ValueError(f"num_experts: expected >= 1, got {num_experts}")
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor: expected > 0, got {capacity_factor}")
        self.d_model, self.d_hidden, self.num_experts = d_model, d_hidden, num_experts
        self.capacity_factor, self.group_size, self.capacity_multiple = capacity_factor, group_size, capacity_multiple
        # The router runs in fp32 whatever the experts' dtype, initialised N(0, 0.02).
        self.router = nn.Linear(d_model, num_experts, bias=False, device=device, dtype=torch.float32)
        nn.init.normal_(self.router.weight, std=0.02)
        self.experts = Experts(num_experts, d_model, d_hidden, gated, activation, bias, dropout, device, dtype)
        self.aux_losses: dict = {}
        self.expert_shard = None  # set by shard_experts: this rank's share of the experts

    def shard_experts(self, group=None, exchange: str = "exact", grad_reduction: str = "mean") -> "_MoEBase":
        """Expert parallelism: keep this rank's ``num_experts // world``
        experts (``group``: any ``torch.distributed`` process group, default
        the world), replicate the router, and exchange tokens with
        ``all_to_all_single`` in forward and backward. Routing is over the
        tokens of every rank of the group, concatenated in rank order, so
        outputs, drops and (expert choice) choices equal the single-process
        layer's on the concatenated batch. ``exchange``: ``"exact"`` (only
        the rows that move; one host sync a call for the split sizes) or
        ``"static"`` (fixed-size blocks, no host sync; every rank then needs
        the same token count). ``grad_reduction``: ``"mean"`` (DDP's
        convention) or ``"sum"``; the layer all-reduces its router and keeps
        its experts' gradients local, so keep its parameters out of DDP /
        FSDP (``expert_parallel_parameter_names``). Returns the layer."""
        from .parallel import shard_experts
        shard_experts(self, group, exchange, grad_reduction)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check(isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] == self.d_model, "x",
              f"expected [..., d_model={self.d_model}], got shape {tuple(getattr(x, 'shape', ()))}")
        flat = x.reshape(-1, self.d_model)
        n = flat.shape[0]
        # The router runs in fp32 even under autocast; the experts' GEMMs follow
        # autocast, and the output has the dtype an nn.Linear there would give.
        amp = autocast_dtype(x.device)
        with torch.autocast(x.device.type, enabled=False) if amp is not None else contextlib.nullcontext():
            logits = torch.nn.functional.linear(flat.float(), self.router.weight)
        if self.expert_shard is not None:
            y = self._forward_sharded(flat, logits)
        else:
            gates, token_idx = self._route(logits, self.group_size or n)  # defined by each subclass
            self.aux_losses = self._aux(logits)
            h = moe_dispatch(flat, token_idx, backend=self.backend)
            out = self.experts(h.to(self.experts.w2.dtype))
            y = moe_combine(out, token_idx, gates, n, backend=self.backend)
        return y.to(amp or x.dtype).reshape(x.shape)

    def _forward_sharded(self, flat: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The expert-parallel forward (``ops/moe/parallel.py``): route over
        every rank's tokens, send tokens to their experts' ranks and back."""
        from . import parallel
        shard = self.expert_shard
        all_logits, offsets = parallel.gather_logits(logits, shard)
        gates, token_idx = self._route(all_logits, self.group_size or offsets[-1])
        self.aux_losses = self._aux(all_logits)
        plan = parallel.plan_exchange(token_idx, offsets, shard)
        h = parallel.dispatch(flat, plan, token_idx.shape[1], shard, self.backend)
        out = self.experts(h.to(self.experts.w2.dtype))
        return parallel.combine(out, gates, token_idx, plan, flat.shape[0], shard, self.backend)


class ExpertChoiceMoE(_MoEBase):
    """Expert-choice MoE (Zhou et al. 2022): every expert takes its top
    ``capacity = ceil(capacity_factor · n / num_experts)`` tokens (per routing
    group of ``group_size`` tokens if given), rounded up to a multiple of
    ``capacity_multiple``. A token is processed by 0 to E experts; with
    ``capacity_factor = num_experts`` every expert takes every token.

    After each forward, ``aux_losses["z_loss"]`` holds the router z-loss.
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, capacity_factor: float = 2.0,
                 gated: bool = False, activation="gelu", bias: bool = True, dropout: float = 0.0,
                 group_size: Optional[int] = None, capacity_multiple: int = 1, device=None, dtype=None,
                 backend: Optional[str] = None):
        super().__init__(d_model, d_hidden, num_experts, capacity_factor, gated, activation, bias, dropout,
                         group_size, capacity_multiple, device, dtype, backend)

    def capacity(self, n_group: int) -> int:
        """Slots per expert and routing group; slots beyond the group's token
        count stay empty."""
        return capacity_from_factor(n_group, self.num_experts, self.capacity_factor, 1, self.capacity_multiple)

    def _route(self, logits, n_group):
        return expert_choice_route(logits, self.capacity(n_group), self.group_size)

    def _aux(self, logits):
        return {"z_loss": router_z_loss(logits)}


class TopKMoE(_MoEBase):
    """Token-choice top-K MoE with a capacity: each token goes to its ``top_k``
    experts (probabilities renormalised over the K when ``normalize``); each
    expert keeps at most ``capacity = ceil(capacity_factor · top_k · n / E)``
    assignments, dropping the rest in ``drop_order`` (all first choices
    before any second choice; tokens in order for ``"position"``, by top-1
    router probability for ``"probability"``; see ``topk_route``).
    ``capacity_factor = E / top_k`` drops nothing.

    After each forward, ``aux_losses`` holds ``z_loss`` and
    ``load_balancing_loss``.
    """

    def __init__(self, d_model: int, d_hidden: int, num_experts: int, top_k: int = 2,
                 capacity_factor: float = 1.25, gated: bool = True, activation="silu", bias: bool = False,
                 dropout: float = 0.0, normalize: bool = True, group_size: Optional[int] = None,
                 capacity_multiple: int = 1, drop_order: str = "position", device=None, dtype=None,
                 backend: Optional[str] = None):
        super().__init__(d_model, d_hidden, num_experts, capacity_factor, gated, activation, bias, dropout,
                         group_size, capacity_multiple, device, dtype, backend)
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: expected in [1, {num_experts}], got {top_k}")
        if drop_order not in DROP_ORDERS:
            raise ValueError(f"drop_order: expected one of {DROP_ORDERS}, got {drop_order!r}")
        self.top_k, self.normalize, self.drop_order = top_k, normalize, drop_order

    def capacity(self, n_group: int) -> int:
        return capacity_from_factor(n_group, self.num_experts, self.capacity_factor, self.top_k,
                                    self.capacity_multiple)

    def _route(self, logits, n_group):
        return topk_route(logits, self.top_k, self.capacity(n_group), self.group_size, self.normalize,
                          self.drop_order)

    def _aux(self, logits):
        return {"z_loss": router_z_loss(logits), "load_balancing_loss": load_balancing_loss(logits, self.top_k)}

    @classmethod
    def from_mixtral(cls, block: nn.Module, capacity_factor: Optional[float] = None) -> "TopKMoE":
        """Convert a Hugging Face Mixtral sparse MoE block (transformers 4.x
        ``experts`` ModuleList of w1/w2/w3, or 5.x fused ``gate_up_proj`` /
        ``down_proj``). The default capacity factor, E / top_k, drops no token,
        so the converted layer computes the block's function."""
        gate = block.gate
        router_w = gate.weight
        E, d = router_w.shape
        top_k = getattr(block, "top_k", None) or getattr(gate, "top_k")
        experts = block.experts
        if hasattr(experts, "gate_up_proj"):  # transformers >= 5: [E, 2F, d] and [E, d, F]
            F_ = experts.gate_up_proj.shape[1] // 2
            w_gate = experts.gate_up_proj[:, :F_, :].transpose(1, 2)
            w_up = experts.gate_up_proj[:, F_:, :].transpose(1, 2)
            w_down = experts.down_proj.transpose(1, 2)
            act = experts.act_fn
        else:  # transformers 4.x: ModuleList of (w1 gate, w3 up, w2 down) Linears
            w_gate = torch.stack([e.w1.weight.t() for e in experts])
            w_up = torch.stack([e.w3.weight.t() for e in experts])
            w_down = torch.stack([e.w2.weight.t() for e in experts])
            F_ = w_gate.shape[-1]
            act = experts[0].act_fn
        layer = cls(d, F_, E, top_k=top_k, capacity_factor=capacity_factor or E / top_k, gated=True,
                    activation=act, bias=False, normalize=True, device=w_gate.device, dtype=w_gate.dtype)
        with torch.no_grad():
            layer.router.weight.copy_(router_w.float())
            layer.experts.w_gate.copy_(w_gate)
            layer.experts.w_up.copy_(w_up)
            layer.experts.w2.copy_(w_down)
        return layer
