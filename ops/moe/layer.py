"""MoE layers. They call the routing and functional APIs only; no Triton here.

``ExpertChoiceMoE``: each expert takes its top ``ceil(C·n/E)`` tokens.
``TopKMoE``: each token goes to its top-K experts, each expert keeps at most
``ceil(C·K·n/E)``. Both route in fp32, dispatch with ``moe_dispatch``, run the
experts as batched GEMMs over ``[E, capacity, d]`` (``expert_gemm="padded"``)
or as grouped GEMMs over the kept slots only (``"grouped"``, ``grouped.py``)
and combine with ``moe_combine``: static shapes, no host synchronisation.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Union

import torch
from torch import nn

from ..common import MAX_RANK, autocast_dtype, check, check_rate, is_fp32_number, lora_scale
from . import grouped
from .function import moe_combine, moe_dispatch
from .lora import expert_lora_linear
from .routing import (DROP_ORDERS, SCORINGS, capacity_from_factor, expert_choice_route, load_balancing_loss,
                      router_z_loss, select_experts, topk_route)

EXPERT_GEMMS = ("auto", "padded", "grouped")
ACTIVATIONS = {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
               "silu": lambda: nn.SiLU(), "relu": lambda: nn.ReLU()}


def _activation(act: Union[str, nn.Module]) -> nn.Module:
    if isinstance(act, nn.Module):
        return act
    if act not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)} or an nn.Module, got {act!r}")
    return ACTIVATIONS[act]()


class ClampedSwiGLU(nn.Module):
    """GPT-OSS's gated activation of (gate, up): ``(clamp(up, ±limit) + 1) ·
    g·sigmoid(alpha·g)`` with ``g = clamp(gate, max=limit)``."""

    takes_gate_and_up = True

    def __init__(self, alpha: float = 1.702, limit: float = 7.0):
        super().__init__()
        self.alpha, self.limit = alpha, limit

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, limit={self.limit}"


EXPERT_LORA_TARGETS = ("gate_up", "down")


class ExpertLoRA(nn.Module):
    """One projection's adapters, one per expert: ``lora_A [E, r, in]``,
    ``lora_B [E, out, r]`` (PEFT's ``target_parameters`` adapter, unflattened),
    per-expert ``ranks`` (≤ r; a rank pattern) and ``scales`` (α_e / r_e, or
    α_e / √r_e with rsLoRA), LoRA dropout ``p`` on the projection's input.
    Initialised as PEFT does: A Kaiming-uniform, B zeros (the layer's output
    is unchanged until training moves B)."""

    def __init__(self, num_experts: int, d_in: int, d_out: int, r: int, ranks, scales, dropout: float,
                 device=None, dtype=None, alphas=None, use_rslora: bool = False):
        super().__init__()
        self.r, self.dropout = r, dropout
        self.alphas, self.use_rslora = tuple(alphas) if alphas is not None else None, use_rslora  # as configured
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, d_in, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, d_out, r, device=device, dtype=dtype))
        with torch.no_grad():
            for e in range(num_experts):  # nn.Linear's (and PEFT's) init of each expert's A
                nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))
        self.register_buffer("ranks", torch.tensor(ranks, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32, device=device))

    def delta(self, lo: int = 0, hi: Optional[int] = None) -> torch.Tensor:
        """The merged weight update ``[E, in, out]`` in fp32, of output columns lo:hi:
        ``s_e · A_e[:r_e]ᵀ · B_e[lo:hi, :r_e]ᵀ``."""
        keep = (torch.arange(self.r, device=self.ranks.device)[None, :] < self.ranks[:, None]).float()
        a = self.lora_A.float() * keep[:, :, None]
        b = self.lora_B[:, lo:hi].float()
        return torch.einsum("erk,enr->ekn", a, b) * self.scales[:, None, None]

    def extra_repr(self) -> str:
        return f"experts={self.lora_A.shape[0]}, r={self.r}, in={self.lora_A.shape[2]}, " \
               f"out={self.lora_B.shape[1]}, dropout={self.dropout}"


class Experts(nn.Module):
    """E expert MLPs stored stacked, run as batched GEMMs over ``[E, C, d]``.

    Plain: ``act(h·w1 + b1)·w2 + b2``. Gated (Llama): ``(act(h·w_gate) * h·w_up)·w_down``,
    or ``act(h·w_gate, h·w_up)`` for an activation of the pair (``ClampedSwiGLU``).
    Weights are ``[E, in, out]`` so that ``torch.baddbmm`` takes them as they are.
    ``dropout`` acts on the output (GPT-2's MLP) or, with
    ``dropout_position="hidden"``, between the two GEMMs (fc1/fc2 and T5 MLPs).
    """

    def __init__(self, num_experts: int, d_model: int, d_hidden: int, gated: bool, activation="gelu",
                 bias: bool = True, dropout: float = 0.0, device=None, dtype=None, dropout_position: str = "output"):
        super().__init__()
        check(dropout_position in ("output", "hidden"), "dropout_position",
              f"expected 'output' or 'hidden', got {dropout_position!r}")
        self.gated, self.dropout_position = gated, dropout_position
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
        self.lora = nn.ModuleDict()  # target name -> ExpertLoRA (add_lora)
        with torch.no_grad():
            for p in ([self.w_gate, self.w_up] if gated else [self.w1]) + [self.w2]:
                nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[1]))

    @staticmethod
    def _mm(h, w, b):
        return torch.bmm(h, w) if b is None else torch.baddbmm(b, h, w)

    def forward(self, h: torch.Tensor, offs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``h [E, C, d]`` → ``[E, C, d]`` (batched GEMMs over every slot),
        or, with ``offs``, ``h [M, d]`` packed by expert (``grouped.py``) →
        ``[M, d]`` as grouped GEMMs over the kept rows only. A projection with
        an active adapter (``add_lora``) runs ``expert_lora_linear`` instead,
        over the packed rows (the padded layout as E runs of C rows)."""
        if offs is None:
            mm = self._mm
        else:
            rows = grouped.row_experts(offs, h.shape[0]) if self.b2 is not None else None
            mm = lambda a, w, b: grouped.grouped_linear(a, w, offs, b, rows)  # noqa: E731
        projs = self.projections()
        if self._lora_active():
            proj = self._lora_projection(h, offs, mm, projs)
        else:
            proj = lambda x, name, i: mm(x, projs[name][0][i], projs[name][1][i])  # noqa: E731
        if self.gated:
            gate, up = proj(h, "gate_up", 0), proj(h, "gate_up", 1)
            a = self.act(gate, up) if getattr(self.act, "takes_gate_and_up", False) else self.act(gate) * up
        else:
            a = self.act(proj(h, "gate_up", 0))
        if self.dropout_position == "hidden":
            return proj(self.dropout(a), "down", 0)
        return self.dropout(proj(a, "down", 0))

    # ---- LoRA on the experts
    lora_merged: bool = False
    lora_enabled: bool = True
    backend: Optional[str] = None  # of the expert-LoRA op; the MoE layer sets its own before each call

    def projections(self) -> dict:
        """target name -> (weights, biases) of the projection, weights ``[E, in, out]``."""
        first = ([self.w_gate, self.w_up], [self.b_gate, self.b_up]) if self.gated else ([self.w1], [self.b1])
        return {"gate_up": first, "down": ([self.w2], [self.b2])}

    def _lora_active(self) -> bool:
        return len(self.lora) > 0 and not self.lora_merged and self.lora_enabled

    def _lora_projection(self, h: torch.Tensor, offs: Optional[torch.Tensor], mm, projs: dict):
        """``proj(x, target, index)``: projection ``index`` of ``target`` (gate 0 and up 1 of
        ``gate_up``), through ``expert_lora_linear`` where the target has an adapter, else ``mm``."""
        ends = offs if offs is not None else \
            torch.arange(1, h.shape[0] + 1, device=h.device, dtype=torch.int32) * h.shape[1]

        def proj(x, name, index):
            w, b = projs[name][0][index], projs[name][1][index]
            if name not in self.lora:
                return mm(x, w, b)
            ad = self.lora[name]
            width = w.shape[2]
            lora_b = ad.lora_B[:, index * width:(index + 1) * width]
            p = ad.dropout if self.training else 0.0
            y = expert_lora_linear(x.reshape(-1, x.shape[-1]), w, ends, ad.lora_A, lora_b, ad.scales, b, p,
                                   ranks=ad.ranks, backend=self.backend)
            return y.reshape(*x.shape[:-1], width)
        return proj

    def add_lora(self, r: int, alpha: float, targets=EXPERT_LORA_TARGETS, dropout: float = 0.0,
                 rank_pattern: Optional[dict] = None, alpha_pattern: Optional[dict] = None,
                 use_rslora: bool = False) -> None:
        """See ``_MoEBase.add_expert_lora``."""
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        check(len(targets) > 0 and all(t in EXPERT_LORA_TARGETS for t in targets), "targets",
              f"expected a subset of {EXPERT_LORA_TARGETS}, got {targets!r}")
        check(isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= MAX_RANK, "r",
              f"expected an int in [1, {MAX_RANK}], got {r!r}")
        check(is_fp32_number(alpha), "alpha", f"expected a finite number, got {alpha!r}")
        check_rate(dropout, "dropout")
        check(not self.lora_merged, "targets", "unmerge the adapters before adding new ones")
        E = self.w2.shape[0]
        ranks, alphas = [r] * E, [float(alpha)] * E
        for pattern, values, name, ok in ((rank_pattern, ranks, "rank_pattern",
                                           lambda v: isinstance(v, int) and 0 <= v <= MAX_RANK),
                                          (alpha_pattern, alphas, "alpha_pattern", is_fp32_number)):
            for e, v in (pattern or {}).items():
                check(isinstance(e, int) and 0 <= e < E, name, f"expected expert indices in [0, {E}), got {e!r}")
                check(ok(v), name, f"expert {e}: bad value {v!r}")
                values[e] = v
        r_max = max(max(ranks), 1)
        scales = [lora_scale(a, k, use_rslora) if k > 0 else 0.0 for a, k in zip(alphas, ranks)]
        for name in targets:
            ws, _ = self.projections()[name]
            d_in, d_out = ws[0].shape[1], sum(w.shape[2] for w in ws)
            self.lora[name] = ExpertLoRA(E, d_in, d_out, r_max, ranks, scales, dropout, ws[0].device, ws[0].dtype,
                                         alphas, use_rslora)
        for p in self.parameters(recurse=False):  # the experts are frozen, as PEFT freezes the base model
            p.requires_grad_(False)

    @torch.no_grad()
    def merge_lora(self) -> None:
        """W_e += ΔW_e for every adapted projection (zero-latency inference); ``unmerge_lora`` undoes it."""
        check(len(self.lora) > 0, "lora", "no adapters on these experts")
        if self.lora_merged:
            return
        self._apply_delta(+1.0)
        self.lora_merged = True

    @torch.no_grad()
    def unmerge_lora(self) -> None:
        if not self.lora_merged:
            return
        self._apply_delta(-1.0)
        self.lora_merged = False

    def _apply_delta(self, sign: float) -> None:
        for name, ad in self.lora.items():
            ws, _ = self.projections()[name]
            lo = 0
            for w in ws:
                hi = lo + w.shape[2]
                w.add_((sign * ad.delta(lo, hi)).to(w.dtype))
                lo = hi


class SharedExpert(nn.Module):
    """A dense MLP every token goes through, beside the routed experts
    (Qwen2-MoE, DeepSeek, Ernie 4.5, Llama 4): one ``Experts`` of one expert."""

    def __init__(self, d_model: int, d_hidden: int, gated: bool, activation, bias: bool, device=None, dtype=None):
        super().__init__()
        self.mlp = Experts(1, d_model, d_hidden, gated, activation, bias, 0.0, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x[None])[0]


class _MoEBase(nn.Module):
    """What both routers share: the router (fp32), the experts, routing groups
    and capacity, shared experts, and the expert-parallel path."""

    def __init__(self, d_model, d_hidden, num_experts, capacity_factor, gated, activation, bias, dropout,
                 group_size, capacity_multiple, device, dtype, backend=None, *, capacity=None, group_by=None,
                 scoring="softmax", router_bias=False, jitter=0.0, shared_hidden=None, shared_gate=False,
                 dropout_position="output", expert_gemm="auto", token_dropout=0.0, eval_capacity_fraction=None):
        super().__init__()
        self.backend = backend  # None/"auto", "triton" or "reference" (ops/backend.py)
        check(isinstance(num_experts, int) and num_experts >= 1, "num_experts", f"expected >= 1, got {num_experts!r}")
        check(capacity_factor > 0, "capacity_factor", f"expected > 0, got {capacity_factor!r}")
        check(capacity is None or (isinstance(capacity, int) and capacity >= 1), "capacity",
              f"expected a positive int (slots per expert and group) or None, got {capacity!r}")
        check(group_by in (None, "sequence"), "group_by", f"expected None or 'sequence', got {group_by!r}")
        check(group_by is None or group_size is None, "group_size", "give group_size or group_by, not both")
        check(scoring in SCORINGS, "scoring", f"expected one of {SCORINGS}, got {scoring!r}")
        check(0.0 <= jitter < 1.0, "jitter", f"expected a noise level in [0, 1), got {jitter!r}")
        check(expert_gemm in EXPERT_GEMMS, "expert_gemm", f"expected one of {EXPERT_GEMMS}, got {expert_gemm!r}")
        check(0.0 <= token_dropout < 1.0, "token_dropout", f"expected a rate in [0, 1), got {token_dropout!r}")
        check(eval_capacity_fraction is None or eval_capacity_fraction > 0, "eval_capacity_fraction",
              f"expected a positive fraction of the tokens or None, got {eval_capacity_fraction!r}")
        self.d_model, self.d_hidden, self.num_experts = d_model, d_hidden, num_experts
        self.capacity_factor, self.group_size, self.capacity_multiple = capacity_factor, group_size, capacity_multiple
        self.fixed_capacity, self.group_by, self.scoring, self.jitter = capacity, group_by, scoring, jitter
        self.expert_gemm, self.token_dropout, self.eval_capacity_fraction = (expert_gemm, token_dropout,
                                                                              eval_capacity_fraction)
        # The router runs in fp32 whatever the experts' dtype, initialised N(0, 0.02).
        self.router = nn.Linear(d_model, num_experts, bias=router_bias, device=device, dtype=torch.float32)
        nn.init.normal_(self.router.weight, std=0.02)
        if router_bias:
            nn.init.zeros_(self.router.bias)
        self.experts = Experts(num_experts, d_model, d_hidden, gated, activation, bias, dropout, device, dtype,
                               dropout_position)
        self.shared_expert = (SharedExpert(d_model, shared_hidden, gated, activation, bias, device, dtype)
                              if shared_hidden else None)
        self.shared_expert_gate = (nn.Linear(d_model, 1, bias=False, device=device, dtype=dtype)
                                   if shared_gate else None)
        self.gate_input = False  # the gate scales the expert's input, not its output (Llama 4)
        self.tuple_output = False  # return (y, router logits), as some Hugging Face blocks do
        self.aux_losses: dict = {}
        self.expert_shard = None  # set by shard_experts: this rank's share of the experts

    def __getstate__(self):
        """``aux_losses`` detached: after a grad-enabled forward they are non-leaf tensors, which
        ``copy.deepcopy`` (and pickling) refuse."""
        state = dict(self.__dict__)
        state["aux_losses"] = {k: v.detach() if isinstance(v, torch.Tensor) else v
                               for k, v in self.aux_losses.items()}
        return state

    def _groups(self, x: torch.Tensor, n: int) -> Optional[int]:
        """The routing group size of this call: fixed, one per sequence
        (``group_by="sequence"``: x's second-to-last dim), or all n tokens."""
        if self.group_by == "sequence":
            return x.shape[-2] if x.dim() >= 3 else n
        return self.group_size

    def _capacity(self, n_group: int, k: int) -> int:
        if not self.training and self.eval_capacity_fraction is not None:  # NLLB-MoE's eval capacity
            return max(1, math.ceil(self.eval_capacity_fraction * n_group))
        if self.fixed_capacity is not None:
            return self.fixed_capacity
        return capacity_from_factor(n_group, self.num_experts, self.capacity_factor, k, self.capacity_multiple)

    def add_expert_lora(self, r: int, alpha: float, targets=EXPERT_LORA_TARGETS, dropout: float = 0.0,
                        rank_pattern: Optional[dict] = None, alpha_pattern: Optional[dict] = None,
                        use_rslora: bool = False) -> "_MoEBase":
        """LoRA on every routed expert, fused into the expert GEMMs
        (``expert_lora_linear``): for each target, one adapter per expert,
        ``lora_A [E, r, in]`` and ``lora_B [E, out, r]`` (PEFT's
        ``target_parameters`` adapter of the fused 3-D expert parameter).
        ``targets``: ``"gate_up"`` (the first projection: gate and up
        together, one A shared by both and B over their concatenated outputs,
        as PEFT's adapter of ``gate_up_proj``; fc1 of plain experts) and/or
        ``"down"``. ``rank_pattern`` / ``alpha_pattern``: ``{expert: value}``
        (rank 0 switches an expert's adapter off). ``dropout``: LoRA dropout
        on each projection's input, regenerated from a seed in the backward.
        The experts' weights and biases are frozen (PEFT's convention); the
        router and shared experts are left as they are. Returns the layer.
        On sharded experts (``shard_experts``) the expert indices are this
        rank's local ones; add adapters before sharding to use global ones."""
        self.experts.add_lora(r, alpha, targets, dropout, rank_pattern, alpha_pattern, use_rslora)
        return self

    def merge_expert_lora(self) -> None:
        """Fold the expert adapters into the expert weights (``W_e += s_e·A_eᵀB_eᵀ``);
        the forward then runs the frozen GEMMs alone. ``unmerge_expert_lora`` undoes it."""
        self.experts.merge_lora()

    def unmerge_expert_lora(self) -> None:
        self.experts.unmerge_lora()

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

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """``x [..., d_model]`` → the same shape (``(y, router logits)``
        with ``tuple_output``). ``padding_mask`` is accepted for the blocks
        whose callers pass one (NLLB-MoE) and not used: padding tokens are
        routed like the others."""
        check(isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] == self.d_model, "x",
              f"expected [..., d_model={self.d_model}], got shape {tuple(getattr(x, 'shape', ()))}")
        flat = x.reshape(-1, self.d_model)
        n = flat.shape[0]
        # The router runs in fp32 even under autocast; the experts' GEMMs follow
        # autocast, and the output has the dtype an nn.Linear there would give.
        amp = autocast_dtype(x.device)
        with torch.autocast(x.device.type, enabled=False) if amp is not None else contextlib.nullcontext():
            router_in = flat.float()
            if self.training and self.jitter > 0:  # Switch's multiplicative noise on the router's input
                router_in = router_in * torch.empty_like(router_in).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            # fp32 whatever the router's storage dtype (after .half() / .to(bfloat16) of the layer)
            w, b = self.router.weight, self.router.bias
            logits = nn.functional.linear(router_in, w.float(), None if b is None else b.float())
        if self.expert_shard is not None:
            y = self._forward_sharded(flat, logits)
        else:
            n_group = self._groups(x, n)
            gates, token_idx = self._route(logits, n_group or n, n_group)  # defined by each subclass
            self.aux_losses = self._aux(logits)
            y = self._experts_and_combine(flat, gates, token_idx, n)
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            y = y + shared.to(y.dtype)
        y = y.to(amp or x.dtype).reshape(x.shape)
        return (y, logits) if self.tuple_output else y

    def uses_grouped_gemm(self, x: torch.Tensor) -> bool:
        """Whether a call on ``x`` runs the experts as grouped GEMMs over the
        kept slots: ``expert_gemm="grouped"`` (an error where PyTorch's
        grouped GEMM cannot run), or ``"auto"`` on CUDA where it can
        (bf16, compute capability 8.0+, 16-byte aligned dims)."""
        if self.expert_gemm == "padded":
            return False
        w = self.experts.w2
        amp = autocast_dtype(x.device)
        ok, why = grouped.grouped_supported(x.device, amp or w.dtype, self.d_model, self.d_hidden)
        ok = ok and (amp is None or amp == w.dtype)
        if self.expert_gemm == "grouped":
            check(ok, "expert_gemm", f"'grouped' cannot run here: {why or 'autocast to another dtype'}")
            return True
        return ok and x.device.type == "cuda"

    def _experts_and_combine(self, flat, gates, token_idx, n):
        offs = None
        if self.uses_grouped_gemm(flat):
            token_idx, gates, offs = grouped.pack_slots(token_idx, gates)
        h = moe_dispatch(flat, token_idx, backend=self.backend).to(self.experts.w2.dtype)
        if self.gate_input:  # the gate scales what the expert sees; the outputs then add up unweighted
            h = h * gates[..., None].to(h.dtype)
            gates = (token_idx >= 0).to(gates.dtype)
        out = self._expert_outputs(h) if offs is None else self._expert_outputs(h[0], offs)[None]
        return moe_combine(out, token_idx, gates, n, backend=self.backend)

    def _expert_outputs(self, h, offs=None):
        self.experts.backend = self.backend
        out = self.experts(h, offs)
        if self.token_dropout:  # NLLB-MoE: dropout on each expert output, its expectation in eval
            out = (nn.functional.dropout(out, self.token_dropout) if self.training
                   else out * (1.0 - self.token_dropout))
        return out

    def _forward_sharded(self, flat: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The expert-parallel forward (``ops/moe/parallel.py``): route over
        every rank's tokens, send tokens to their experts' ranks and back."""
        from . import parallel
        shard = self.expert_shard
        all_logits, offsets = parallel.gather_logits(logits, shard)
        check(self.group_by is None, "group_by", "per-sequence groups are not supported with sharded experts")
        gates, token_idx = self._route(all_logits, self.group_size or offsets[-1], self.group_size)
        self.aux_losses = self._aux(all_logits)
        plan = parallel.plan_exchange(token_idx, offsets, shard)
        check(not self.gate_input, "gate_input", "not supported with sharded experts")
        h = parallel.dispatch(flat, plan, token_idx.shape[1], shard, self.backend)
        out = self._expert_outputs(h.to(self.experts.w2.dtype))
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
                 backend: Optional[str] = None, *, capacity: Optional[int] = None, group_by: Optional[str] = None,
                 scoring: str = "softmax", shared_hidden: Optional[int] = None, shared_gate: bool = False,
                 dropout_position: str = "output", expert_gemm: str = "auto"):
        super().__init__(d_model, d_hidden, num_experts, capacity_factor, gated, activation, bias, dropout,
                         group_size, capacity_multiple, device, dtype, backend, capacity=capacity, group_by=group_by,
                         scoring=scoring, shared_hidden=shared_hidden, shared_gate=shared_gate,
                         dropout_position=dropout_position, expert_gemm=expert_gemm)

    def capacity(self, n_group: int) -> int:
        """Slots per expert and routing group; slots beyond the group's token
        count stay empty."""
        return self._capacity(n_group, 1)

    def _route(self, logits, n_group, group_size):
        return expert_choice_route(logits, self.capacity(n_group), group_size, scoring=self.scoring)

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
                 backend: Optional[str] = None, *, capacity: Optional[int] = None, group_by: Optional[str] = None,
                 scoring: str = "softmax", score_over: str = "experts", selection_bias: bool = False,
                 n_group: Optional[int] = None, topk_group: Optional[int] = None, group_score: str = "max",
                 norm_p: float = 1.0, norm_min: float = 0.0, norm_eps: float = 0.0,
                 routed_scaling_factor: float = 1.0, renormalize_after_drop: bool = False,
                 router_bias: bool = False, jitter: float = 0.0, gate_input: bool = False,
                 shared_hidden: Optional[int] = None, shared_gate: bool = False, dropout_position: str = "output",
                 expert_gemm: str = "auto", token_dropout: float = 0.0,
                 eval_capacity_fraction: Optional[float] = None):
        super().__init__(d_model, d_hidden, num_experts, capacity_factor, gated, activation, bias, dropout,
                         group_size, capacity_multiple, device, dtype, backend, capacity=capacity, group_by=group_by,
                         scoring=scoring, router_bias=router_bias, jitter=jitter, shared_hidden=shared_hidden,
                         shared_gate=shared_gate, dropout_position=dropout_position, expert_gemm=expert_gemm,
                         token_dropout=token_dropout, eval_capacity_fraction=eval_capacity_fraction)
        check(isinstance(top_k, int) and 1 <= top_k <= num_experts, "top_k",
              f"expected an int in [1, {num_experts}], got {top_k!r}")
        check(drop_order in DROP_ORDERS, "drop_order", f"expected one of {DROP_ORDERS}, got {drop_order!r}")
        self.top_k, self.normalize, self.drop_order = top_k, normalize, drop_order
        self.renormalize_after_drop, self.gate_input = renormalize_after_drop, gate_input
        # e_score_correction_bias: chooses the experts, does not weight them (DeepSeek-V3, Ernie 4.5, LFM2)
        self.register_buffer("e_score_correction_bias",
                             torch.zeros(num_experts, dtype=torch.float32, device=device) if selection_bias else None)
        self.router_options = dict(scoring=scoring, score_over=score_over, n_group=n_group, topk_group=topk_group,
                                   group_score=group_score, norm_p=norm_p, norm_min=norm_min, norm_eps=norm_eps,
                                   routed_scaling_factor=routed_scaling_factor)
        select_experts(torch.zeros(1, num_experts), top_k, normalize=normalize, **self.router_options)  # checks

    def capacity(self, n_group: int) -> int:
        return self._capacity(n_group, self.top_k)

    def _route(self, logits, n_group, group_size):
        return topk_route(logits, self.top_k, self.capacity(n_group), group_size, self.normalize, self.drop_order,
                          renormalize_after_drop=self.renormalize_after_drop,
                          selection_bias=self.e_score_correction_bias, **self.router_options)

    def _aux(self, logits):
        return {"z_loss": router_z_loss(logits), "load_balancing_loss": load_balancing_loss(logits, self.top_k)}

    @classmethod
    def from_hf(cls, block: nn.Module, capacity_factor: Optional[float] = None) -> "TopKMoE":
        """The layer computing a Hugging Face MoE block's function; see
        ``posttrain_kernels.ops.moe.hf.from_hf`` for the supported blocks."""
        from .hf import from_hf
        return from_hf(block, capacity_factor)

    @classmethod
    def from_mixtral(cls, block: nn.Module, capacity_factor: Optional[float] = None) -> "TopKMoE":
        """``from_hf`` for a Mixtral block (transformers 4.x ModuleList of
        w1/w2/w3 experts, or 5.x fused ``gate_up_proj`` / ``down_proj``)."""
        from .hf import from_hf
        return from_hf(block, capacity_factor)
