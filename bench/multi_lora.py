"""Multi-adapter LoRA benchmarks.

* ``prefill``: M tokens split into requests over A distinct adapters.
* ``decode``: few tokens, each on its own adapter (memory-bound: GB/s counts
  the base weight, the tokens and every active adapter once).
* ``serving``: a stream of requests over many tenants, in tokens/s: ours
  batches every request of a step in one forward; ``peft`` does the same with
  PEFT's mixed batch; ``merge`` merges each request's adapter into the weight,
  runs it, and unmerges.
* ``train``: forward+backward of a batch over several adapters that all
  train (gradients for x and every adapter): ``linear`` is the frozen base
  layer's forward+backward (the floor), ``loop`` the eager loop with autograd.

Providers: ``linear`` (the base layer alone, the floor), ``loop`` (eager
loop over the adapters of the batch), ``peft`` (PEFT's ``adapter_names``
mixed batch, when installed), ``ours``.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..ops.common import dtype_name
from ..ops.multi_lora import multi_lora_linear
from ..ops.multi_lora import reference as ref
from .common import Result, Timer, progress


@dataclasses.dataclass(frozen=True)
class MLShape:
    M: int
    K: int
    N: int
    r: int
    adapters: int
    requests: int
    dtype: torch.dtype = torch.bfloat16
    mode: str = "prefill"

    @property
    def label(self) -> str:
        return (f"M={self.M} K={self.K} N={self.N} r={self.r} adapters={self.adapters} requests={self.requests} "
                f"{dtype_name(self.dtype)}")


GPU_SHAPES = [MLShape(4096, 4096, 4096, 16, a, 64) for a in (1, 8, 64)] + [
    MLShape(64, 4096, 4096, 16, 64, 64, mode="decode")]
SMOKE_SHAPES = [MLShape(48, 64, 40, 8, 4, 8, torch.float32), MLShape(8, 64, 40, 8, 8, 8, torch.float32, "decode")]


def make_pool(s: MLShape, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(s.requests, s.M // s.requests, s.K, generator=g).to(device, s.dtype)
    w = (torch.randn(s.N, s.K, generator=g) / s.K ** 0.5).to(device, s.dtype)
    A = (torch.randn(s.adapters, s.r, s.K, generator=g) / s.K ** 0.5).to(device, s.dtype)
    B = (torch.randn(s.adapters, s.N, s.r, generator=g) / s.r ** 0.5).to(device, s.dtype)
    ranks = torch.full((s.adapters,), s.r, dtype=torch.int32, device=device)
    scales = torch.full((s.adapters,), 2.0, dtype=torch.float32, device=device)
    req_adapter = torch.arange(s.requests, device=device) % s.adapters  # every adapter in use
    return x, w, A, B, ranks, scales, req_adapter


def _loop(x, w, A, B, scales, req_adapter):
    """Eager loop over the adapters present: base GEMM, then one shrink/expand per adapter."""
    y = F.linear(x, w)
    for a in range(A.shape[0]):
        rows = req_adapter == a
        y[rows] += scales[a] * F.linear(F.linear(x[rows], A[a]), B[a])
    return y


def _peft_model(w, A, B):
    import peft
    from .lora import _OneLinear
    N, K = w.shape
    r = A.shape[1]
    base = torch.nn.Linear(K, N, bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        base.weight.copy_(w)
    model = peft.get_peft_model(_OneLinear(base), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]),
                                adapter_name="t0")
    for a in range(1, A.shape[0]):
        model.add_adapter(f"t{a}", peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        for a in range(A.shape[0]):
            layer.lora_A[f"t{a}"].weight.data = A[a].clone()
            layer.lora_B[f"t{a}"].weight.data = B[a].clone()
    return model.eval()


def adapter_bytes(s: MLShape) -> float:
    e = torch.finfo(s.dtype).bits // 8
    return e * (s.N * s.K + s.M * (s.K + s.N) + s.adapters * s.r * (s.K + s.N))


def run(shapes, timer: Timer, peaks=None) -> list[Result]:
    out = []
    try:
        import peft  # noqa: F401
        has_peft = True
    except ImportError:
        has_peft = False
    for i, s in enumerate(shapes):
        progress(f"multi-lora {s.mode} {i + 1}/{len(shapes)}: {s.label}")
        x, w, A, B, ranks, scales, req = make_pool(s, timer.device)
        T = x.shape[1]
        tok_ids = req[:, None].expand(s.requests, T).reshape(-1)
        fns = {
            "linear": lambda: F.linear(x, w),
            "loop": lambda: _loop(x, w, A, B, scales, req),
            "ours": lambda: multi_lora_linear(x, w, A, B, ranks, scales, tok_ids),
        }
        if has_peft:
            pm = _peft_model(w, A, B)
            names = [f"t{a}" for a in req.tolist()]
            fns["peft"] = lambda: pm(x, adapter_names=names)
        with torch.no_grad():
            want = ref.multi_lora_linear_ref(x.reshape(-1, s.K), w, None, A, B, ranks, scales, tok_ids).float()
            got = fns["ours"]().reshape(-1, s.N).float()
            err = ((got - want).norm() / want.norm()).item()
            times = {p: timer.time(fn) for p, fn in fns.items()}
        flops = 2.0 * s.M * s.K * s.N + 2.0 * s.M * s.r * (s.K + s.N)
        nbytes = adapter_bytes(s)
        for p in fns:
            med, p20, p80 = times[p]
            floor = None if peaks is None else max(flops / (peaks[0] * 1e9), nbytes / (peaks[1] * 1e6))
            out.append(Result(bench="multi-lora", shape=s.label, dtype=dtype_name(s.dtype), mode=s.mode, provider=p,
                              ms=med, p20_ms=p20, p80_ms=p80, tflops=flops / med / 1e9, gbps=nbytes / med / 1e6,
                              checks="forward" if p == "ours" else None,
                              vs={q: med / times[q][0] for q in fns if q != p},
                              rel_err=err if p == "ours" else None,
                              roofline_pct=None if floor is None else 100.0 * floor / med))
    return out


def serving(timer: Timer, smoke: bool) -> list[Result]:
    """Tokens/s over a stream of requests from many tenants."""
    s = MLShape(8 * 16, 64, 40, 8, 8, 8, torch.float32) if smoke else MLShape(64 * 256, 4096, 4096, 16, 64, 64)
    progress(f"multi-lora serving: {s.label}")
    x, w, A, B, ranks, scales, _ = make_pool(s, timer.device)
    g = torch.Generator(device="cpu").manual_seed(1)
    req = torch.randint(0, s.adapters, (s.requests,), generator=g).to(timer.device)  # random tenants
    T = x.shape[1]
    tok_ids = req[:, None].expand(s.requests, T).reshape(-1)
    req_list = req.tolist()

    def merge_per_request():
        outs = []
        for i, a in enumerate(req_list):  # merge, run, unmerge: one request at a time
            wa = w + (2.0 * (B[a].float() @ A[a].float())).to(w.dtype)
            outs.append(F.linear(x[i], wa))
        return torch.stack(outs)

    fns = {"ours": lambda: multi_lora_linear(x, w, A, B, ranks, scales, tok_ids), "merge": merge_per_request}
    try:
        pm = _peft_model(w, A, B)
        names = [f"t{a}" for a in req_list]
        fns["peft"] = lambda: pm(x, adapter_names=names)
    except ImportError:
        pass
    with torch.no_grad():
        times = {p: timer.time(fn) for p, fn in fns.items()}
    out = []
    for p in fns:
        med, p20, p80 = times[p]
        out.append(Result(bench="multi-lora serving", shape=s.label, dtype=dtype_name(s.dtype),
                          mode="one step of the stream", provider=p, ms=med, p20_ms=p20, p80_ms=p80, tflops=0.0,
                          gbps=0.0,
                          vs={q: med / times[q][0] for q in fns if q != p}, tokens_per_s=s.M / med * 1e3))
    return out


TRAIN_GPU = MLShape(4096, 4096, 4096, 16, 8, 64, mode="train")
TRAIN_SMOKE = MLShape(48, 64, 40, 8, 4, 8, torch.float32, "train")


def train(timer: Timer, smoke: bool) -> list[Result]:
    """Forward+backward over a batch whose requests train different adapters."""
    s = TRAIN_SMOKE if smoke else TRAIN_GPU
    progress(f"multi-lora train: {s.label}")
    x0, w, A0, B0, ranks, scales, req = make_pool(s, timer.device)
    tok_ids = req[:, None].expand(s.requests, x0.shape[1]).reshape(-1)
    x, A, B = (t.detach().clone().requires_grad_(True) for t in (x0, A0, B0))
    dy = torch.randn(x.shape[0], x.shape[1], s.N, device=timer.device).to(s.dtype)

    def step(fn):
        def run_once():
            x.grad = A.grad = B.grad = None
            fn().backward(dy)
        return run_once

    fns = {"linear": step(lambda: F.linear(x, w)),
           "loop": step(lambda: _loop(x, w, A, B, scales, req)),
           "ours": step(lambda: multi_lora_linear(x, w, A, B, ranks, scales, tok_ids))}
    # correctness of ours against the loop's autograd, on the same inputs
    fns["loop"]()
    want = [t.grad.float().clone() for t in (x, A, B)]
    fns["ours"]()
    err = max(((t.grad.float() - g).norm() / g.norm()).item() for t, g in zip((x, A, B), want))
    times = {p: timer.time(fn) for p, fn in fns.items()}
    # y and dx GEMMs (W0 is frozen: no dW), plus the low-rank work: 2Mr(K+N) forward, 4Mr(K+N) backward
    flops = 2 * (2.0 * s.M * s.K * s.N) + 3 * (2.0 * s.M * s.r * (s.K + s.N))
    out = []
    for p in fns:
        med, p20, p80 = times[p]
        out.append(Result(bench="multi-lora train", shape=s.label, dtype=dtype_name(s.dtype), mode="fwd+bwd",
                          provider=p, ms=med, p20_ms=p20, p80_ms=p80,
                          tflops=flops / med / 1e9, gbps=0.0,
                          checks="forward and every gradient (against the eager loop)" if p == "ours" else None,
                          vs={q: med / times[q][0] for q in fns if q != p},
                          rel_err=err if p == "ours" else None))
    return out
