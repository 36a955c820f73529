"""Ahead-of-time compile of every kernel config for a GPU target, no GPU needed.

``python -m posttrain_kernels.autotune.aot --cc 90 --cc 80`` compiles every
(kernel, config, dtype, rank block) the launchers may pick, from the specs in
``REGISTRY``, through Triton's full pipeline down to cubin (with the bundled
ptxas), and checks the shared memory each needs against the target's
budget. This catches what the interpreter hides: dot dims < 16, shared
memory over budget, unsupported dtype combinations. It must run without
``TRITON_INTERPRET`` (the interpreter replaces the JIT functions); the test
suite runs it in a subprocess.

Each spec lists its AOT variants (operand layout, flags, pointer dtypes,
integer specialisation). The variants are dealt round-robin over the
kernel's (dtype, rank block, config) jobs, so each layout is compiled across
the whole space without multiplying the compile count; a spec with two
variants compiles each on every other job. On sm_90 the configs the
heuristic defaults pick (``KernelSpec.defaults``) are compiled with every variant, and
their rows carry what the SASS says (read with the ``cuobjdump`` Triton
bundles): registers, stack bytes, and the counts of ``HGMMA`` (wgmma),
``UTMALDG``/``UTMASTG`` (TMA), ``LDGSTS`` (cp.async) and ``LDL``/``STL``
(spills). ``tests/test_aot_compile.py`` asserts no spills for each of them and
the Hopper instructions for the sm_90 GEMM.

``--mode`` (``$POSTTRAIN_KERNELS_AOT`` in the test) picks what a run covers: ``space`` (the
whole config space, no SASS: the README's test command), ``sass`` (the default picks with
every variant and their SASS: CI runs it with the GPU machines' Triton), ``full`` (both; this
command's default).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from . import REGISTRY
from .config import SMEM_BYTES, Config

_PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}


MODES = ("space", "sass", "full")
MODE_VAR = "POSTTRAIN_KERNELS_AOT"


def mode_from_env() -> str:
    """``$POSTTRAIN_KERNELS_AOT``: ``space`` (default), ``sass`` or ``full`` (see ``jobs``)."""
    mode = (os.environ.get(MODE_VAR) or "space").lower()
    if mode not in MODES:
        raise ValueError(f"{MODE_VAR} must be one of {MODES}, got {mode!r}")
    return mode


def jobs(cc: int, kernels: list[str] | None = None, mode: str = "full") -> list[tuple]:
    """(kernel, cc, config dict, dtype, rank block, variant index, is a default pick) of every compile.

    ``space``: every (config, dtype, rank block) the launchers may pick, the variants dealt
    round-robin (compile errors, shared memory). ``sass`` (sm_90 and up; else as ``space``): every
    default pick with every variant, each read from its SASS. ``full``: both."""
    out, seen = [], {}
    sass = mode in ("sass", "full") and cc >= 90
    for name, spec in REGISTRY.items():
        if kernels is not None and name not in kernels:
            continue
        variants = spec.variant_indices(cc)
        if mode != "sass" or not sass:
            for i, (cfg, dtype, block_r) in enumerate(spec.compiled_space(cc)):
                job = (name, cc, cfg.to_dict(), dtype, block_r, variants[i % len(variants)])
                seen[_ident(job)] = len(out)
                out.append(job + (False,))
        for cfg, dtype, block_r in sorted(spec.defaults(cc) if sass else (), key=str):
            for v in variants:
                job = (name, cc, cfg.to_dict(), dtype, block_r, v)
                if _ident(job) in seen:
                    out[seen[_ident(job)]] = job + (True,)
                else:
                    seen[_ident(job)] = len(out)
                    out.append(job + (True,))
    return out


def _ident(job: tuple) -> str:
    return json.dumps(job[:6], sort_keys=True)


SASS_OPS = ("HGMMA", "QGMMA", "HMMA", "UTMALDG", "UTMASTG", "LDGSTS", "LDL", "STL")


def sass_stats(cubin: bytes) -> dict:
    """Registers, stack bytes and instruction counts of a cubin, from Triton's bundled cuobjdump."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    usage = re.search(r"REG:(\d+) STACK:(\d+)", res)
    out = {"regs": int(usage.group(1)), "stack": int(usage.group(2))}
    out.update({op: len(re.findall(r"\b" + op + r"\b", sass)) for op in SASS_OPS})
    return out


def signature(spec, cfg: Config, dtype: str, block_r, variant_index: int) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attributes) of one compile, as the JIT would
    specialise the kernel at model shapes."""
    v = spec.variants[variant_index]
    constexprs = {**cfg.kwargs, **spec.constants, **v.flags, **{name: 1 for name in v.ones}}
    if spec.rank_blocked:
        constexprs["BLOCK_R"] = block_r
    adapter = "float32" if v.adapter_fp32 else dtype
    sig, attrs = {}, {}
    for i, (name, is_constexpr) in enumerate(spec.arguments()):
        if name in constexprs:
            sig[name] = "constexpr"
        elif is_constexpr:
            raise ValueError(f"{spec.name}: constexpr {name} has no value in variant {v.name!r}")
        elif name in v.pointers:
            kind = v.pointers[name]
            sig[name] = _PTR[dtype] if kind == "x" else _PTR[adapter] if kind == "adapter" else "*" + kind
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in spec.floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"  # sizes, strides, thresholds
            if name not in v.plain:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs


def compile_one(job: tuple) -> dict:
    """Compile one job; returns a row with the resources, or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, cc, cfg_dict, dtype, block_r, variant, is_default = job
    spec = REGISTRY[kernel]
    cfg = Config.from_dict(cfg_dict)
    row = {"kernel": kernel, "cc": cc, "dtype": dtype, "block_r": block_r, "config": cfg_dict,
           "variant": spec.variants[variant].name, "default": is_default}
    t0 = time.time()
    try:
        sig, constexprs, attrs = signature(spec, cfg, dtype, block_r, variant)
        src = ASTSource(spec.fn, signature=sig, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **spec.options})
        shared = int(compiled.metadata.shared)
        budget = SMEM_BYTES[cc]
        row.update(ok=shared <= budget, shared=shared, budget=budget,
                   error=None if shared <= budget else f"shared memory {shared} > {budget}")
        if is_default:
            row["sass"] = sass_stats(compiled.asm["cubin"])
    except Exception as e:  # report every failure, not only the first
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
    row["seconds"] = round(time.time() - t0, 2)
    return row


def run(ccs: list[int], workers: int, kernels: list[str] | None = None, progress=None,
        mode: str = "full") -> list[dict]:
    """Compile every job of ``mode`` for the targets ``ccs``. ``progress(done, total, row)``
    is called after each compile."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("ahead-of-time compile needs TRITON_INTERPRET unset")
    todo = [j for cc in ccs for j in jobs(cc, kernels, mode)]
    rows = []
    if workers <= 1:
        results = map(compile_one, todo)
    else:
        pool = cf.ProcessPoolExecutor(workers)
        results = pool.map(compile_one, todo)
    try:
        for row in results:
            rows.append(row)
            if progress is not None:
                progress(len(rows), len(todo), row)
    finally:
        if workers > 1:
            pool.shutdown()
    return rows


def _print_progress(done: int, total: int, row: dict) -> None:
    status = "ok" if row["ok"] else "FAIL"
    if row.get("sass"):
        status += f" regs {row['sass']['regs']} stack {row['sass']['stack']}"
    print(f"[{done}/{total}] sm_{row['cc']} {row['kernel']} {row['dtype']}"
          f"{'' if row['block_r'] is None else ' R' + str(row['block_r'])} {status} {row['seconds']:.1f}s",
          file=sys.stderr, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", type=int, action="append", help="compute capability (80, 90); repeatable")
    ap.add_argument("--kernel", action="append", help=f"only these kernels ({', '.join(REGISTRY)})")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--mode", choices=MODES, default="full",
                    help="space: every config a launcher may pick; sass: every default pick with every variant, "
                         "its SASS read (sm_90); full: both (default)")
    ap.add_argument("--json", help="write every row to this file")
    ap.add_argument("--quiet", action="store_true", help="no progress line per compile")
    args = ap.parse_args(argv)
    ccs = args.cc or [90, 80]
    rows = run(ccs, args.workers, args.kernel, None if args.quiet else _print_progress, args.mode)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if not r["ok"]]
    for r in bad:
        print(f"FAIL {r['kernel']} sm_{r['cc']} {r['dtype']} R{r['block_r']} {r['config']}: {r['error']}")
    for r in rows:
        if r.get("sass") and (r["sass"]["stack"] or r["sass"]["LDL"] or r["sass"]["STL"]):
            print(f"SPILLS {r['kernel']} sm_{r['cc']} {r['dtype']} R{r['block_r']} {r['config']} "
                  f"({r['variant']}): {r['sass']}")
    print(f"compiled {len(rows) - len(bad)}/{len(rows)} kernel configs for {', '.join('sm_%d' % c for c in ccs)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
