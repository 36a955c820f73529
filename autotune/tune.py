"""``posttrain-kernels tune``: time every config of every kernel a model's
LoRA layers launch, check each winner against the reference, write the cache.

A LoRA linear of shape (M tokens, K in, N out, rank r) launches: in the
forward the shrink (unless the sm_90 GEMM fuses it) and the GEMM; in the
backward the dY pass, the x pass and the dx GEMM. Each kernel is one tuning
case, keyed exactly as the launcher keys its lookup (the spec's key
dimensions: model dimensions, operand layout, a bucketed token count), so a
tuned entry is found again at run time. A case times the step it belongs to
(the forward, or the backward up to the output it checks) with the other
kernels at their picks.

This is the one module of ``autotune`` that imports ``ops`` (it runs the
launchers); nothing the launchers import imports it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import sys
from typing import Callable

import torch

from ..ops.common import dtype_name
from ..ops.lora import launch as L
from . import cache
from .config import Config, pin_variable
from .lora import LORA_DY, LORA_MATMUL, LORA_MATMUL_TMA, LORA_SHRINK, LORA_X

# Linear-layer shapes (in_features K, out_features N) of a decoder block.
PRESETS = {
    "llama-3-8b": dict(hidden=4096, intermediate=14336, kv=1024),
    "llama-3-70b": dict(hidden=8192, intermediate=28672, kv=1024),
    "mixtral-8x7b": dict(hidden=4096, intermediate=14336, kv=1024),
}


def preset_shapes(name: str) -> list[tuple[int, int]]:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown {name!r}; known: {', '.join(PRESETS)}")
    p = PRESETS[name]
    h, i, kv = p["hidden"], p["intermediate"], p["kv"]
    # q/o, k/v, gate/up, down
    return sorted({(h, h), (h, kv), (h, i), (i, h)})


@dataclasses.dataclass
class Case:
    kernel: str
    key: str
    space: list
    default: Config
    run: Callable[[], torch.Tensor]  # launches with whatever config is pinned
    reference: torch.Tensor  # fp32


def lora_cases(M: int, K: int, N: int, r: int, dtype: torch.dtype, device: torch.device, cc: int) -> list[Case]:
    """The kernels of one LoRA linear fwd+bwd, with fp32 references."""
    dn = dtype_name(dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
    x, dy = rnd(M, K), rnd(M, N)
    w, a, b = rnd(N, K, scale=K ** -0.5), rnd(r, K, scale=K ** -0.5), rnd(N, r, scale=r ** -0.5)
    t = L.lora_shrink(x, a, 1.0)
    xf, dyf, wf, af, bf = (v.float() for v in (x, dy, w, a, b))
    dt = 2.0 * dyf @ bf
    gemm = LORA_MATMUL_TMA if cc >= 90 and dtype != torch.float32 else LORA_MATMUL

    def case(spec, run, reference, **dims):
        block_r = spec.block_r(r) if spec.rank_blocked else None
        return Case(spec.name, cache.make_key(dn, **dims), spec.configs(dn, cc, block_r), spec.default(dn, cc, dims),
                    run, reference)

    def bwd(i):
        return lambda: L.lora_bwd_triton(dy, x, w, a, b, t, 2.0, 0.0, None, True, False)[i]

    return [
        case(LORA_SHRINK, lambda: L.lora_shrink(x, a, 1.0), xf @ af.t(), K=K, R=r, layout="a", M=M),
        case(gemm, lambda: L.lora_fwd_triton(x, w, a, b, None, 2.0, 0.0, None)[0],
             xf @ wf.t() + 2.0 * (t @ bf.t()), N=N, K=K, layout="w", M=M),
        case(LORA_DY, bwd(2), 2.0 * dyf.t() @ t, N=N, R=r, M=M),
        case(LORA_X, bwd(1), dt.t() @ xf, K=K, R=r, M=M),
        case(gemm, bwd(0), dyf @ wf + dt @ af, N=K, K=N, layout="wT", M=M),
    ]


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def default_timer(fn) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def _progress(i: int, n: int, text: str, stream) -> None:
    width = 24
    done = int(width * i / max(n, 1))
    stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {text[:70]:70s}")
    stream.flush()


def tune_cases(cases: list[Case], timer=default_timer, tolerance: float = 2e-2, stream=sys.stderr) -> list[dict]:
    """Time every config of every case; the fastest config whose output
    passes the reference check wins. Returns one row per case."""
    rows = []
    total = sum(len(c.space) + 1 for c in cases)
    done = 0
    for case in cases:
        var = pin_variable(case.kernel)
        timings = []
        for cfg in [case.default] + [c for c in case.space if c != case.default]:
            _progress(done, total, f"{case.kernel} {case.key} {cfg}", stream)
            with cache.env_override(var, json.dumps(cfg.to_dict())):  # pinned, the plans rebuilt
                try:
                    out = case.run()
                    err = _rel_err(out, case.reference)
                    ms = timer(case.run)
                except Exception as e:  # a config that fails to launch loses, it does not abort the run
                    err, ms = math.inf, math.inf
                    print(f"\n{case.kernel} {case.key} {cfg}: {type(e).__name__}: {str(e)[:200]}", file=stream)
            timings.append((cfg, ms, err))
            done += 1
        default_ms = timings[0][1]
        ok = [(cfg, ms, err) for cfg, ms, err in timings if err <= tolerance and math.isfinite(ms)]
        if not ok:
            rows.append({"kernel": case.kernel, "key": case.key, "config": None, "ms": None,
                         "default_ms": default_ms, "error": "no config passed the reference check"})
            continue
        cfg, ms, err = min(ok, key=lambda v: v[1])
        rows.append({"kernel": case.kernel, "key": case.key, "config": cfg.to_dict(), "ms": ms,
                     "default_ms": default_ms, "rel_err": err})
    _progress(total, total, "done", stream)
    stream.write("\n")
    return rows


def entries_from_rows(rows: list[dict]) -> dict:
    out = {}
    for r in rows:
        if r["config"] is not None:
            out.setdefault(r["kernel"], {})[r["key"]] = {
                "config": r["config"], "ms": r["ms"], "default_ms": r["default_ms"]}
    return out


def main(args) -> int:
    """Entry of ``posttrain-kernels tune`` (arguments parsed by bench/cli.py)."""
    if not torch.cuda.is_available():
        print("posttrain-kernels tune: needs a CUDA GPU (it times the kernels on the device that will run them)",
              file=sys.stderr)
        return 2
    import triton
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    cc = 10 * props.major + props.minor
    dtype = getattr(torch, args.dtype)
    shapes = []
    for preset in args.preset or []:
        shapes += preset_shapes(preset)
    for text in args.shape or []:
        k, n = (int(v) for v in text.split(","))
        shapes.append((k, n))
    if not shapes:
        shapes = preset_shapes("llama-3-8b")
    cases = []
    for (k, n) in sorted(set(shapes)):
        for m in args.tokens:
            for r in args.rank:
                cases += lora_cases(m, k, n, r, dtype, device, cc)
    unique = {}
    for c in cases:  # the same kernel key from two layer shapes is tuned once
        unique.setdefault((c.kernel, c.key), c)
    rows = tune_cases(list(unique.values()))
    path = pathlib.Path(args.output) if args.output else cache.cache_dir() / cache.file_name(
        props.name, triton.__version__)
    cache.write(path, props.name, triton.__version__, entries_from_rows(rows), extra={"torch": torch.__version__})
    print(f"{'kernel':12s} {'key':42s} {'best ms':>9s} {'default ms':>10s} {'speedup':>8s}  config")
    for r in rows:
        if r["config"] is None:
            print(f"{r['kernel']:12s} {r['key']:42s} FAILED: {r['error']}")
            continue
        print(f"{r['kernel']:12s} {r['key']:42s} {r['ms']:9.4f} {r['default_ms']:10.4f} "
              f"{r['default_ms'] / r['ms']:7.2f}x  {json.dumps(r['config'])}")
    print(f"wrote {len([r for r in rows if r['config']])} entries to {path}")
    return 0 if all(r["config"] is not None for r in rows) else 1
