"""LoRA on MoE experts: a transformers fused-experts module (Qwen3-MoE's
``gate_up_proj [E, 2F, d]`` / ``down_proj [E, d, F]``, SiLU-gated) with
LoRA r on both projections, forward + backward (dX and the LoRA gradients;
the experts frozen), routing given (top-k of random logits).

Providers:

* ``floor``: the two frozen expert GEMMs alone, forward and dX, as grouped
  GEMMs on rows already sorted by expert (``torch.nn.functional.grouped_mm``;
  where it runs, else the frozen module).
* ``frozen``: the frozen module itself (transformers' ``grouped_mm``
  experts forward: sort, gather, two grouped GEMMs, weights, sum), dX only.
* ``ours``: the same module through ``ops/moe/hf_experts.py``, each
  projection one ``expert_lora_linear`` (LoRA fused into the expert GEMM).
* ``peft``: PEFT's ``target_parameters`` path (``ParamWrapper``; one adapter:
  its factors folded into the weight by a ``baddbmm`` every forward).
* ``peft+patch``: that PEFT model after ``patch_peft`` (ours through PEFT's
  modules).
* ``eager``: a per-expert loop, ``x_e·W_eᵀ + s·(x_e·A_eᵀ)·B_eᵀ``.

TFLOP/s counts the frozen GEMMs' FLOPs (fwd + dX) for every provider, so the
column compares like with like; "% of floor" is floor time / provider time.
Peak memory is the allocation high-water mark of one fwd+bwd above what the
inputs and weights already hold. The check: ours' output and LoRA gradients
against the eager loop (fp32 math).
"""
from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from ..ops.adapters.patch import patch_peft
from ..ops.common import dtype_name
from ..ops.moe import grouped, hf_experts
from ..ops.moe.lora import peft_expert_factors
from .common import Result, Timer, progress


@dataclasses.dataclass(frozen=True)
class Shape:
    n: int  # tokens
    d: int
    F: int
    E: int
    k: int  # top-k
    r: int = 16
    dtype: torch.dtype = torch.bfloat16

    @property
    def label(self) -> str:
        return f"tokens={self.n} d={self.d} F={self.F} E={self.E} top-{self.k} r={self.r} {dtype_name(self.dtype)}"


GPU_SHAPES = [Shape(4096, 2048, 768, 128, 8), Shape(8192, 4096, 14336, 8, 2)]  # PEFT's measurement, Mixtral's
SMOKE_SHAPES = [Shape(48, 32, 24, 4, 2, 4, torch.float32)]


class _Experts(nn.Module):
    """What ``ops/moe/hf_experts.py`` and PEFT need of a transformers experts module (Qwen3-MoE's layout)."""

    has_gate, has_bias, is_transposed, is_concatenated, has_post_expert_norm = True, False, False, True, False
    _is_expert_parallel = False

    def __init__(self, s: Shape, device):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.num_experts = s.E
        self.gate_up_proj = nn.Parameter((torch.randn(s.E, 2 * s.F, s.d, generator=g) / math.sqrt(s.d))
                                         .to(device, s.dtype), requires_grad=False)
        self.down_proj = nn.Parameter((torch.randn(s.E, s.d, s.F, generator=g) / math.sqrt(s.F))
                                      .to(device, s.dtype), requires_grad=False)
        self.act_fn = nn.SiLU()

    def _apply_gate(self, h):
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, hidden, top_k_index, top_k_weights):
        return _hf_grouped(self, hidden, top_k_index, top_k_weights)


def _hf_grouped(ex, hidden, top_k_index, top_k_weights):
    """transformers' own grouped_mm experts implementation when installed, else the same steps here."""
    try:
        from transformers.integrations.moe import grouped_mm_experts_forward
        return grouped_mm_experts_forward(ex, hidden, top_k_index, top_k_weights)
    except ImportError:
        return hf_experts.experts_forward(ex, hidden, top_k_index, top_k_weights, {})


class _Block(nn.Module):
    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, hidden, top_k_index, top_k_weights):
        return self.experts(hidden, top_k_index, top_k_weights)


def _adapters(s: Shape, device, g):
    """PEFT-layout factors per projection: lora_A [E·r, in], lora_B [out, r·E] (B random: the check must see it)."""
    out = {}
    for name, (d_in, d_out) in {"gate_up_proj": (s.d, 2 * s.F), "down_proj": (s.F, s.d)}.items():
        a = (torch.randn(s.E * s.r, d_in, generator=g) / math.sqrt(d_in)).to(device, s.dtype).requires_grad_()
        b = (torch.randn(d_out, s.r * s.E, generator=g) * 0.01).to(device, s.dtype).requires_grad_()
        out[name] = (a, b)
    return out


def _eager(ex, hidden, idx, weights, adapters, scale, E):
    """Per-expert loop (PyTorch ops), LoRA unfused."""
    fac = {n: peft_expert_factors(a, b, E) for n, (a, b) in adapters.items()}
    out = torch.zeros_like(hidden, dtype=torch.float32)
    k = idx.shape[1]
    flat = idx.reshape(-1)
    for e in range(E):
        pos = (flat == e).nonzero().squeeze(1)
        if pos.numel() == 0:
            continue
        tok = pos // k
        x = hidden[tok]
        a, b = fac["gate_up_proj"]
        h = x @ ex.gate_up_proj[e].t() + scale * (x @ a[e].t()) @ b[e].t()
        h = ex._apply_gate(h)
        a, b = fac["down_proj"]
        y = h @ ex.down_proj[e].t() + scale * (h @ a[e].t()) @ b[e].t()
        out.index_add_(0, tok, (y * weights.reshape(-1)[pos, None]).float())
    return out.to(hidden.dtype)


def _floor(ex, hidden, idx, dy):
    """The frozen GEMMs alone on rows sorted beforehand: fwd + dX."""
    k = idx.shape[1]
    ids, perm = torch.sort(idx.reshape(-1), stable=True)
    ends = torch.searchsorted(ids, torch.arange(1, ex.num_experts + 1, device=ids.device)).to(torch.int32)
    x = hidden.detach()[perm // k].contiguous().requires_grad_()
    dyr = dy[perm // k].contiguous()
    w1, w2 = ex.gate_up_proj.transpose(1, 2), ex.down_proj.transpose(1, 2)
    if grouped.grouped_supported(x.device, x.dtype, ex.down_proj.shape[1], ex.down_proj.shape[2])[0]:
        def fn():
            h = ex._apply_gate(grouped.GroupedMM.apply(x, w1, ends))
            return torch.autograd.grad(grouped.GroupedMM.apply(h, w2, ends), [x], dyr)
        return fn
    return lambda: torch.autograd.grad(ex(hidden, idx, torch.ones_like(idx, dtype=hidden.dtype)), [hidden], dy)


def _peft_block(ex, adapters, s: Shape):
    try:
        import peft
    except ImportError:
        return None
    block = _Block(ex)
    cfg = peft.LoraConfig(r=s.r, lora_alpha=2 * s.r, target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                          target_modules=[])
    model = peft.get_peft_model(block, cfg)
    with torch.no_grad():
        for w in (model.base_model.model.experts, model.base_model.model.experts.base_layer):
            a, b = adapters[w.parameter_name]
            w.lora_A["default"].weight.copy_(a)
            w.lora_B["default"].weight.copy_(b)
    return model


def _peak_mb(fn, device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def run(shapes, timer: Timer, peaks=None) -> list[Result]:
    out = []
    dev = timer.device
    for i, s in enumerate(shapes):
        progress(f"moe expert LoRA {i + 1}/{len(shapes)}: {s.label}")
        g = torch.Generator().manual_seed(1)
        ex = _Experts(s, dev)
        hidden = torch.randn(s.n, s.d, generator=g).to(dev, s.dtype).requires_grad_()
        logits = torch.randn(s.n, s.E, generator=g).to(dev)
        w, idx = torch.topk(torch.softmax(logits, -1), s.k, dim=-1)
        weights = (w / w.sum(-1, keepdim=True)).to(s.dtype)
        dy = torch.randn(s.n, s.d, generator=g).to(dev, s.dtype)
        adapters = _adapters(s, dev, g)
        scale = 2.0
        lora_params = [t for pair in adapters.values() for t in pair]

        def ours():
            fac = {n: (*peft_expert_factors(a, b, s.E), scale) for n, (a, b) in adapters.items()}
            y = hf_experts.experts_forward(ex, hidden, idx, weights, fac)
            return torch.autograd.grad(y, [hidden] + lora_params, dy)

        fns = {"ours": ours,
               "floor": _floor(ex, hidden, idx, dy),
               "frozen": lambda: torch.autograd.grad(ex(hidden, idx, weights), [hidden], dy),
               "eager": lambda: torch.autograd.grad(_eager(ex, hidden, idx, weights, adapters, scale, s.E),
                                                    [hidden] + lora_params, dy)}
        model = _peft_block(ex, adapters, s)
        if model is not None:
            peft_params = [p for p in model.parameters() if p.requires_grad]
            fns["peft"] = lambda: torch.autograd.grad(model(hidden, idx, weights), [hidden] + peft_params, dy)
            patched = patch_peft(copy.deepcopy(model))
            patched_params = [p for p in patched.parameters() if p.requires_grad]
            fns["peft+patch"] = lambda: torch.autograd.grad(patched(hidden, idx, weights),
                                                            [hidden] + patched_params, dy)
        # the check: ours against the eager loop, output and every LoRA gradient (fp32 math there)
        got, want = ours(), fns["eager"]()
        err = max(((u.float() - v.float()).norm() / v.float().norm().clamp_min(1e-30)).item()
                  for u, v in zip(got, want))
        times = {p: timer.time(fns[p]) for p in fns}
        mem = {p: _peak_mb(fns[p], dev) for p in fns}
        kept = s.n * s.k
        flops = 2 * 2.0 * kept * s.d * (3 * s.F)  # gate_up (2F) + down (F), forward and dX
        for p in times:
            med, p20, p80 = times[p]
            roof = None if peaks is None else 100.0 * (flops / (peaks[0] * 1e9)) / med
            out.append(Result(bench="moe-lora", shape=s.label, dtype=dtype_name(s.dtype), mode="fwd+bwd", provider=p,
                              ms=med, p20_ms=p20, p80_ms=p80, tflops=flops / med / 1e9, gbps=0.0,
                              checks="dX and every LoRA gradient against the eager loop" if p == "ours" else None,
                              vs={q: med / times[q][0] for q in times if q != p},
                              rel_err=err if p == "ours" else None, roofline_pct=roof, peak_mb=mem[p]))
    return out
