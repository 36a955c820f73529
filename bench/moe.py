"""MoE benchmarks.

* ``moe-dc``: dispatch + combine (expert-choice slot table), providers
  ``ours`` (moe_dispatch + moe_combine), ``index`` (``index_select`` +
  ``index_add_``), ``onehot`` (flaxformer's one-hot einsums). GB/s counts the
  fewest bytes (dispatch: read the tokens, write the slots; combine: read the
  slots, write the tokens), and "% of roofline" compares with the copy
  bandwidth measured in the same run.
* ``moe-layer``: an MoE layer forward+backward (expert choice, or top-2 at
  a capacity factor), providers ``padded`` (our dispatch / combine, experts
  as batched GEMMs over every slot), ``grouped`` (experts as grouped GEMMs
  over the kept slots only; where PyTorch's grouped GEMM runs), ``eager``
  (the padded layer on the index-based reference path) and ``floor`` (the
  two expert GEMMs alone, forward and backward, on exactly the kept tokens,
  pre-gathered: grouped GEMM where it runs, else batched GEMM). TFLOP/s
  counts the kept tokens' FLOPs for every provider.
"""
from __future__ import annotations

import dataclasses

import torch

from ..ops import moe as M
from ..ops.common import dtype_name
from ..ops.moe import ExpertChoiceMoE, TopKMoE, grouped
from ..ops.moe import reference as ref
from .common import Result, Timer, progress


@dataclasses.dataclass(frozen=True)
class DCShape:
    n: int
    d: int
    E: int
    cf: float
    dtype: torch.dtype = torch.bfloat16

    @property
    def capacity(self) -> int:
        return M.capacity_from_factor(self.n, self.E, self.cf)

    @property
    def label(self) -> str:
        return f"n={self.n} d={self.d} E={self.E} C={self.cf:g} {dtype_name(self.dtype)}"


@dataclasses.dataclass(frozen=True)
class LayerShape:
    n: int
    d: int
    F: int
    E: int
    cf: float
    dtype: torch.dtype = torch.bfloat16
    top_k: int = 0  # 0: expert choice

    @property
    def label(self) -> str:
        router = f"top-{self.top_k} CF" if self.top_k else "EC C"
        return f"n={self.n} d={self.d} F={self.F} E={self.E} {router}={self.cf:g} {dtype_name(self.dtype)}"

    def layer(self, device, **kw):
        if self.top_k:
            return TopKMoE(self.d, self.F, self.E, top_k=self.top_k, capacity_factor=self.cf, gated=False,
                           activation="gelu", bias=False, device=device, dtype=self.dtype, **kw)
        return ExpertChoiceMoE(self.d, self.F, self.E, capacity_factor=self.cf, bias=False, device=device,
                               dtype=self.dtype, **kw)


GPU_DC = [DCShape(8192, 4096, 8, 2.0)]
GPU_LAYER = [LayerShape(8192, 2048, 8192, 8, 2.0), LayerShape(8192, 2048, 8192, 8, 1.25, top_k=2)]
SMOKE_DC = [DCShape(96, 80, 4, 2.0, torch.float32)]
SMOKE_LAYER = [LayerShape(64, 32, 48, 4, 2.0, torch.float32), LayerShape(63, 32, 48, 4, 1.25, torch.float32, top_k=2)]


def _index_dc(x, idx, gates, n):
    """index_select + index_add_ (fp32 accumulation, as ours)."""
    valid = (idx >= 0).reshape(-1)
    flat = idx.reshape(-1).clamp_min(0)
    h = x.index_select(0, flat) * valid[:, None].to(x.dtype)
    y = torch.zeros(n, x.shape[1], device=x.device, dtype=torch.float32)
    y.index_add_(0, flat, h.float() * (gates.reshape(-1) * valid)[:, None])
    return y.to(x.dtype)


def _onehot_dc(x, idx, gates, n):
    disp, comb = ref.moe_onehot_masks(idx, gates, n)
    h = torch.einsum("nd,nec->ecd", x, disp.to(x.dtype))
    return torch.einsum("ecd,nec->nd", h, comb.to(x.dtype))


def _ours_dc(x, idx, gates, n):
    return M.moe_combine(M.moe_dispatch(x, idx), idx, gates, n)


def dc_bytes(s: DCShape) -> float:
    e = torch.finfo(s.dtype).bits // 8
    slots = s.E * s.capacity
    return e * (s.n * s.d + slots * s.d) * 2  # dispatch: n·d in, S·d out; combine: S·d in, n·d out


def run_dc(shapes, timer: Timer, peaks=None, providers=("index", "onehot", "ours")) -> list[Result]:
    out = []
    for i, s in enumerate(shapes):
        progress(f"moe dispatch+combine {i + 1}/{len(shapes)}: {s.label}")
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(s.n, s.d, generator=g).to(timer.device, s.dtype)
        logits = torch.randn(s.n, s.E, generator=g).to(timer.device)
        gates, idx = M.expert_choice_route(logits, s.capacity)
        want = ref.moe_combine_ref(ref.moe_dispatch_ref(x.float(), idx), idx, gates, s.n)
        got = _ours_dc(x, idx, gates, s.n).float()
        err = ((got - want).norm() / want.norm()).item()
        fns = {"ours": _ours_dc, "index": _index_dc, "onehot": _onehot_dc}
        times = {p: timer.time(lambda p=p: fns[p](x, idx, gates, s.n)) for p in providers}
        nbytes = dc_bytes(s)
        for p in providers:
            med, p20, p80 = times[p]
            roof = None if peaks is None else 100.0 * (nbytes / (peaks[1] * 1e6)) / med
            out.append(Result(bench="moe-dc", shape=s.label, dtype=dtype_name(s.dtype), mode="fwd", provider=p,
                              ms=med, p20_ms=p20, p80_ms=p80, tflops=0.0, gbps=nbytes / med / 1e6,
                              checks="forward" if p == "ours" else None,
                              vs={q: med / times[q][0] for q in providers if q != p},
                              rel_err=err if p == "ours" else None, roofline_pct=roof))
    return out


def _floor(layer, x):
    """(fn, kept rows): the layer's two expert GEMMs, forward and backward,
    on exactly the tokens its routing keeps, gathered beforehand."""
    with torch.no_grad():
        logits = layer.router(x.float())
        n_group = layer._groups(x, x.shape[0])
        gates, token_idx = layer._route(logits, n_group or x.shape[0], n_group)
        tok, _, offs = grouped.pack_slots(token_idx, gates)
        kept = int(offs[-1])
        h = x.detach()[tok[0, :kept]].contiguous().requires_grad_()
        dy = torch.randn_like(h)
    params = list(layer.experts.parameters())
    ex = layer.experts
    if grouped.grouped_supported(x.device, x.dtype, layer.d_model, layer.d_hidden)[0]:
        return (lambda: torch.autograd.grad(ex(h, offs), [h] + params, dy)), kept
    # no grouped GEMM here: batched GEMM on [E, C, d], exact when every slot is kept (expert choice)
    hb = x.detach()[token_idx.clamp_min(0)].requires_grad_()
    dyb = torch.randn_like(hb)
    return (lambda: torch.autograd.grad(ex(hb), [hb] + params, dyb)), kept


def run_layer(shapes, timer: Timer, peaks=None) -> list[Result]:
    out = []
    for i, s in enumerate(shapes):
        progress(f"moe layer {i + 1}/{len(shapes)}: {s.label}")
        torch.manual_seed(0)
        layers = {"padded": s.layer(timer.device, expert_gemm="padded"),
                  "eager": s.layer(timer.device, expert_gemm="padded", backend="reference")}
        if grouped.grouped_supported(timer.device, s.dtype, s.d, s.F)[0]:
            layers["grouped"] = s.layer(timer.device, expert_gemm="grouped")
        for layer in layers.values():
            layer.load_state_dict(layers["padded"].state_dict())
        x = torch.randn(s.n, s.d, device=timer.device, dtype=s.dtype, requires_grad=True)
        dy = torch.randn(s.n, s.d, device=timer.device, dtype=s.dtype)
        want = layers["eager"](x).float()
        errs = {p: ((layers[p](x).float() - want).norm() / want.norm()).item() for p in layers if p != "eager"}
        fns = {p: (lambda p=p: torch.autograd.grad(layers[p](x), [x] + list(layers[p].parameters()), dy))
               for p in layers}
        fns["floor"], kept = _floor(layers["padded"], x)
        times = {p: timer.time(fns[p]) for p in fns}
        flops = 3 * 2 * 2.0 * kept * s.d * s.F  # two expert GEMMs on the kept tokens, fwd + 2 bwd
        for p in times:
            med, p20, p80 = times[p]
            roof = None if peaks is None else 100.0 * (flops / (peaks[0] * 1e9)) / med
            out.append(Result(bench="moe-layer", shape=s.label, dtype=dtype_name(s.dtype), mode="fwd+bwd", provider=p,
                              ms=med, p20_ms=p20, p80_ms=p80, tflops=flops / med / 1e9, gbps=0.0,
                              checks=f"forward of {p} (against the reference backend)" if p in errs else None,
                              vs={q: med / times[q][0] for q in times if q != p},
                              rel_err=errs.get(p), roofline_pct=roof))
    return out
