"""MoE benchmarks.

* ``moe-dc``: dispatch + combine (expert-choice slot table), providers
  ``ours`` (moe_dispatch + moe_combine), ``index`` (``index_select`` +
  ``index_add_``), ``onehot`` (flaxformer's one-hot einsums). GB/s counts the
  fewest bytes (dispatch: read the tokens, write the slots; combine: read the
  slots, write the tokens), and "% of roofline" compares with the copy
  bandwidth measured in the same run.
* ``moe-layer``: an expert-choice MoE layer forward+backward, ``ours``
  against the same layer on the eager index-based reference path (``eager``).
"""
from __future__ import annotations

import dataclasses

import torch

from ..ops import moe as M
from ..ops.common import dtype_name
from ..ops.moe import ExpertChoiceMoE
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

    @property
    def label(self) -> str:
        return f"n={self.n} d={self.d} F={self.F} E={self.E} C={self.cf:g} {dtype_name(self.dtype)}"


GPU_DC = [DCShape(8192, 4096, 8, 2.0)]
GPU_LAYER = [LayerShape(8192, 2048, 8192, 8, 2.0)]
SMOKE_DC = [DCShape(96, 80, 4, 2.0, torch.float32)]
SMOKE_LAYER = [LayerShape(64, 32, 48, 4, 2.0, torch.float32)]


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


def run_layer(shapes, timer: Timer, peaks=None) -> list[Result]:
    out = []
    for i, s in enumerate(shapes):
        progress(f"moe layer {i + 1}/{len(shapes)}: {s.label}")
        torch.manual_seed(0)
        ours = ExpertChoiceMoE(s.d, s.F, s.E, capacity_factor=s.cf, device=timer.device, dtype=s.dtype)
        eager = ExpertChoiceMoE(s.d, s.F, s.E, capacity_factor=s.cf, device=timer.device, dtype=s.dtype,
                                backend="reference")
        eager.load_state_dict(ours.state_dict())
        x = torch.randn(s.n, s.d, device=timer.device, dtype=s.dtype, requires_grad=True)
        dy = torch.randn(s.n, s.d, device=timer.device, dtype=s.dtype)
        y_o, y_e = ours(x), eager(x)
        err = ((y_o.float() - y_e.float()).norm() / y_e.float().norm()).item()
        params = {"ours": list(ours.parameters()), "eager": list(eager.parameters())}
        layers = {"ours": ours, "eager": eager}
        times = {p: timer.time(lambda p=p: torch.autograd.grad(layers[p](x), [x] + params[p], dy))
                 for p in ("eager", "ours")}
        cap = M.capacity_from_factor(s.n, s.E, s.cf)
        flops = 3 * 2 * 2.0 * s.E * cap * s.d * s.F  # two expert GEMMs, fwd + 2 bwd
        for p in ("eager", "ours"):
            med, p20, p80 = times[p]
            roof = None if peaks is None else 100.0 * (flops / (peaks[0] * 1e9)) / med
            out.append(Result(bench="moe-layer", shape=s.label, dtype=dtype_name(s.dtype), mode="fwd+bwd", provider=p,
                              ms=med, p20_ms=p20, p80_ms=p80,
                              tflops=flops / med / 1e9, gbps=0.0,
                              checks="forward (against the reference backend)" if p == "ours" else None,
                              vs={q: med / times[q][0] for q in times if q != p},
                              rel_err=err if p == "ours" else None, roofline_pct=roof))
    return out
