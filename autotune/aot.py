"""Ahead-of-time compile of every kernel config for a GPU target, no GPU needed.

``python -m posttrain_kernels.autotune.aot --cc 90 --cc 80`` compiles every
(kernel, config, dtype, rank block) the launchers may pick through Triton's
full pipeline down to cubin (with the bundled ptxas), and checks the shared
memory each needs against the target's budget. This catches what the
interpreter hides: dot dims < 16, shared memory over budget, unsupported
dtype combinations. It must run without ``TRITON_INTERPRET`` (the
interpreter replaces the JIT functions); the test suite runs it in a
subprocess.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import sys
import time

from . import configs as C

_PTR = {"float16": "*fp16", "bfloat16": "*bf16", "float32": "*fp32"}


def _variants(kernel: str, dtype: str, index: int):
    """Pointer dtypes, flags and integer specialisation for one compile.

    Even-indexed configs compile the forward layout with everything on (fp32
    adapters, bias, dropout); odd-indexed ones the backward layout (the
    transposed operands of dx / dt / dA) with adapters in the compute dtype
    and flags off. Both variants are compiled across each space without
    doubling the compile count. Returns (pointer types, constexpr flags,
    integer args that equal 1, integer args not divisible by 16; K is divisible by BLOCK_K only in the
    forward layout); every other
    integer is specialised as a multiple of 16, as the JIT does at model
    shapes.
    """
    fwd = index % 2 == 0
    adapter = "float32" if fwd else dtype
    d = _PTR[dtype]
    plain = {"M", "R", "rows_per_split", "drop_threshold"}
    if kernel == "lora_matmul":
        ones = ({"stride_xk", "stride_wk", "stride_tr", "stride_ur", "stride_yn"} if fwd
                else {"stride_xk", "stride_wn", "stride_tr", "stride_un", "stride_yn"})
        return ({"x_ptr": d, "w_ptr": d, "t_ptr": "*fp32", "u_ptr": _PTR[adapter], "bias_ptr": d,
                 "y_ptr": d, "seed_ptr": "*i32"}, {"HAS_BIAS": fwd, "HAS_DROPOUT": fwd, "EVEN_K": fwd}, ones,
                plain | ({"stride_tm", "stride_un"} if fwd else {"stride_tm"}))
    if kernel == "lora_shrink":
        ones = {"stride_xk", "stride_ak", "stride_tr"} if fwd else {"stride_xk", "stride_ar", "stride_tr"}
        return ({"x_ptr": d, "a_ptr": _PTR[adapter], "t_ptr": "*fp32", "seed_ptr": "*i32"},
                {"HAS_DROPOUT": fwd}, ones, plain | {"stride_tm"} | (set() if fwd else {"stride_ak"}))
    if kernel == "lora_grad":
        ones = {"stride_gp", "stride_tr", "stride_or"} if fwd else {"stride_gp", "stride_tr", "stride_op"}
        return ({"g_ptr": d, "t_ptr": "*fp32", "o_ptr": "*fp32", "seed_ptr": "*i32"},
                {"HAS_DROPOUT": fwd}, ones, plain | {"stride_tm"} | ({"stride_op"} if fwd else set()))
    # Multi-LoRA: even configs compile the forward layout with one slice (pool
    # adapters fp32), odd ones the backward layout (transposed adapter reads,
    # three sliced projections, adapters in the compute dtype); dropout is on
    # where that layout can have it (shrink forward, dA, dx).
    if kernel == "mlora_shrink":
        return ({"x_ptr": d, "perm_ptr": "*i64", "sid_ptr": "*i64", "a_ptr": _PTR[adapter], "rank_ptr": "*i32",
                 "kb_ptr": "*i32", "t_ptr": "*fp32", "seed_ptr": "*i32", "thr_ptr": "*i32", "inv_ptr": "*fp32"},
                {"BLOCK_R": 16, "NUM_SLICES": 1 if fwd else 3, "SLICED_K": not fwd, "HAS_DROPOUT": fwd},
                {"stride_xk", "stride_ak", "stride_tr"} if fwd else {"stride_xk", "stride_ar", "stride_tr"},
                {"M", "stride_tm", "R_MAX", "SLOTS", "stride_a_slice", "K_PER_SPLIT"})
    if kernel == "mlora_matmul":
        return ({"x_ptr": d, "w_ptr": d, "bias_ptr": d, "perm_ptr": "*i64", "sid_ptr": "*i64", "t_ptr": "*fp32",
                 "b_ptr": _PTR[adapter], "rank_ptr": "*i32", "scale_ptr": "*fp32", "bounds_ptr": "*i32", "y_ptr": d,
                 "seed_ptr": "*i32", "thr_ptr": "*i32", "inv_ptr": "*fp32"},
                {"HAS_BIAS": fwd, "BLOCK_R": 16, "NUM_SLICES": 1 if fwd else 3, "SLICE_COLS": fwd,
                 "HAS_DROPOUT": not fwd},
                ({"stride_xk", "stride_wk", "stride_tr", "stride_br", "stride_yn"} if fwd
                 else {"stride_xk", "stride_wn", "stride_tr", "stride_bn", "stride_yn"}),
                {"M", "stride_tm", "stride_bn", "R_MAX", "SLOTS", "stride_b_slice"})
    if kernel == "mlora_grad":
        # Forward layout here = dA (o rows along R, slices stacked); backward = dB (o read transposed).
        return ({"p_ptr": "*fp32", "q_ptr": d, "perm_ptr": "*i64", "seg_ptr": "*i64", "rank_ptr": "*i32",
                 "scale_ptr": "*fp32", "bounds_ptr": "*i32", "o_ptr": "*fp32", "seed_ptr": "*i32", "thr_ptr": "*i32",
                 "inv_ptr": "*fp32"},
                {"NUM_SLICES": 1 if fwd else 3, "SLICE_COLS": not fwd, "HAS_DROPOUT": fwd},
                {"stride_pr", "stride_qd", "stride_od"} if fwd else {"stride_pr", "stride_qd", "stride_or"},
                {"M", "stride_pm", "R_MAX", "SLOTS", "stride_o_slice"})
    if kernel == "moe_gather":
        # Forward layout: dispatch (no scale, no dot); backward: combine's (both).
        return ({"src_ptr": d, "idx_ptr": "*i64", "scale_ptr": "*fp32", "other_ptr": d, "out_ptr": d,
                 "dot_ptr": "*fp32"}, {"HAS_SCALE": not fwd, "HAS_DOT": not fwd}, set(), {"S"})
    if kernel == "moe_segment_sum":
        return ({"src_ptr": d, "order_ptr": "*i64", "offsets_ptr": "*i64", "gate_ptr": "*fp32", "out_ptr": d},
                {"HAS_GATES": fwd}, set(), {"n"})
    raise KeyError(kernel)


def _kernel_fn(kernel: str):
    from ..kernels import lora, moe, multi_lora
    return {"lora_matmul": lora._lora_matmul_kernel, "lora_shrink": lora._lora_shrink_kernel,
            "lora_grad": lora._lora_grad_kernel, "mlora_shrink": multi_lora._mlora_shrink_kernel,
            "mlora_matmul": multi_lora._mlora_matmul_kernel, "mlora_grad": multi_lora._mlora_grad_kernel,
            "moe_gather": moe._moe_gather_kernel,
            "moe_segment_sum": moe._moe_segment_sum_kernel}[kernel]


def jobs(cc: int) -> list[tuple]:
    out = []
    for kernel, entries in C.all_spaces(cc).items():
        for i, (cfg, dtype, block_r) in enumerate(entries):
            out.append((kernel, cc, cfg.to_dict(), dtype, block_r, i))
    return out


def compile_one(job: tuple) -> dict:
    """Compile one job; returns a row with the resources, or the error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, cc, cfg_dict, dtype, block_r, index = job
    cfg = C.Config.from_dict(cfg_dict)
    fn = _kernel_fn(kernel)
    ptrs, flags, ones, plain = _variants(kernel, dtype, index)
    constexprs = {**cfg.kwargs, **flags, **{name: 1 for name in ones}}
    if block_r is not None:
        constexprs["BLOCK_R"] = block_r
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ptrs:
            signature[name] = ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"  # sizes, strides, thresholds
            if name not in plain:
                attrs[(i,)] = [["tt.divisibility", 16]]
    row = {"kernel": kernel, "cc": cc, "dtype": dtype, "block_r": block_r, "config": cfg_dict,
           "flags": flags}
    t0 = time.time()
    try:
        src = ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        shared = int(compiled.metadata.shared)
        budget = C.SMEM_BYTES[cc]
        row.update(ok=shared <= budget, shared=shared, budget=budget,
                   error=None if shared <= budget else f"shared memory {shared} > {budget}")
    except Exception as e:  # report every failure, not only the first
        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
    row["seconds"] = round(time.time() - t0, 2)
    return row


def run(ccs: list[int], workers: int, kernels: list[str] | None = None) -> list[dict]:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("ahead-of-time compile needs TRITON_INTERPRET unset")
    todo = [j for cc in ccs for j in jobs(cc) if kernels is None or j[0] in kernels]
    if workers <= 1:
        return [compile_one(j) for j in todo]
    with cf.ProcessPoolExecutor(workers) as pool:
        return list(pool.map(compile_one, todo, chunksize=4))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cc", type=int, action="append", help="compute capability (80, 90); repeatable")
    ap.add_argument("--kernel", action="append", help="only these kernels")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", help="write every row to this file")
    args = ap.parse_args(argv)
    rows = run(args.cc or [90, 80], args.workers, args.kernel)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if not r["ok"]]
    for r in bad:
        print(f"FAIL {r['kernel']} sm_{r['cc']} {r['dtype']} R{r['block_r']} {r['config']}: {r['error']}")
    print(f"compiled {len(rows) - len(bad)}/{len(rows)} kernel configs for "
          f"{', '.join('sm_%d' % c for c in args.cc or [90, 80])}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
