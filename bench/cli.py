"""``posttrain-kernels``: the benchmark / self-check and tuning command.

    posttrain-kernels bench [lora|multi-lora|moe|moe-lora|qlora|all] [--quick] [--smoke] [--providers P,..]
                            [--modes M,..] [--json F] [--csv F] [--md F] [--plot F.png]
    posttrain-kernels tune [--preset llama-3-8b] [--shape K,N] [--tokens 8192] [--rank 16] [--output F]

On a CUDA machine it benchmarks the kernels at model shapes against the
baselines and checks every result against a fp32 reference. Without CUDA it
runs a smoke mode: the real kernels through the Triton interpreter at small
shapes, each checked against the reference; it prints that check per shape
and no timings (the interpreter's wall clock says nothing about a GPU).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

BENCHES = ("lora", "multi-lora", "moe", "moe-lora", "qlora")
# Relative error (norm-wise, fwd and every gradient) allowed per dtype.
TOLERANCE = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}


def _reexec_under_interpreter(argv) -> int:
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.call([sys.executable, "-m", "posttrain_kernels.bench", *argv], env=env)


def _shapes(smoke: bool, quick: bool, smoke_shapes: list, gpu_shapes: list, headline: int = 1) -> list:
    """The shapes of one bench: small ones in smoke mode, model shapes on a
    GPU; ``--quick`` keeps the first ``headline`` (the headline shapes) in either mode."""
    shapes = smoke_shapes if smoke else gpu_shapes
    return shapes[:headline] if quick else shapes


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="posttrain-kernels", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="benchmarks against eager PyTorch, with a correctness check")
    b.add_argument("which", nargs="?", default="all", choices=(*BENCHES, "all"),
                   help="which benchmark family to run (default: all of them)")
    b.add_argument("--smoke", action="store_true", help="small shapes (the default without CUDA)")
    b.add_argument("--json", help="write the rows as JSON")
    b.add_argument("--csv", help="write the rows as CSV")
    b.add_argument("--md", help="write the markdown table")
    b.add_argument("--plot", help="write PNG bar charts to this file (needs matplotlib; GPU runs)")
    b.add_argument("--quick", action="store_true", help="the headline shape of each benchmark only")
    b.add_argument("--rows", help="append each row to this JSON-lines file as it is measured")
    b.add_argument("--gpu-shapes", action="store_true",
                   help="the GPU shapes even without CUDA (to count compiles with launches stubbed: "
                        "posttrain_kernels.autotune.compile_only)")
    b.add_argument("--providers",
                   help="comma-separated subset of linear,eager,compile,peft,peft+patch,ours,ours-portable (LoRA)")
    b.add_argument("--modes", help="comma-separated subset of fwd,bwd,fwd+bwd (LoRA)")
    t = sub.add_parser("tune", help="tune the kernels for a model's shapes and write the cache (GPU)")
    t.add_argument("--preset", action="append", help="model preset (llama-3-8b, llama-3-70b, mixtral-8x7b)")
    t.add_argument("--shape", action="append", help="an explicit linear shape: in_features,out_features")
    t.add_argument("--tokens", type=lambda v: [int(x) for x in v.split(",")], default=[8192],
                   help="token counts, comma-separated (bucketed to powers of two in the cache key)")
    t.add_argument("--rank", type=lambda v: [int(x) for x in v.split(",")], default=[16],
                   help="LoRA ranks, comma-separated")
    t.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    t.add_argument("--output", help="cache file to write (default: the user cache of this GPU)")
    args = ap.parse_args(argv)
    if args.command == "tune":
        from ..autotune import tune
        return tune.main(args)

    import torch
    has_cuda = torch.cuda.is_available()
    if not has_cuda and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        print("No CUDA device: running the kernels through the Triton interpreter (TRITON_INTERPRET=1).",
              flush=True)
        return _reexec_under_interpreter(argv)

    if not has_cuda:
        from ..ops.backend import interpreter_problem
        if interpreter_problem():
            print(f"Cannot run the kernels here: {interpreter_problem()}.", file=sys.stderr)
            return 2
    from . import common, lora
    device = torch.device("cuda" if has_cuda else "cpu")
    smoke = (args.smoke or not has_cuda) and not args.gpu_shapes
    common.ROWS_TO = args.rows
    # Without a GPU every provider still runs (once: its time is not shown),
    # so the smoke run proves that each one works at these shapes.
    timer = common.Timer(device) if has_cuda else common.Timer(device, cpu_reps=1)
    print(common.header(device), flush=True)
    providers = args.providers.split(",") if args.providers else None
    if smoke:
        print("smoke mode: the real kernels at small shapes, each checked against the reference"
              + ("" if has_cuda else " (Triton interpreter on the CPU: no timings are shown, they would say "
                 "nothing about a GPU)") + ". Progress on stderr; about 30 s on 2 CPU cores.", flush=True)
        if providers is None:  # torch.compile of the baseline adds a minute of C++ builds on a CPU
            # and "ours-portable" is "ours" there (the interpreter takes the portable GEMM anyway)
            providers = [p for p in lora.available_providers() if p not in ("compile", "ours-portable")]
    modes = args.modes.split(",") if args.modes else lora.MODES
    peaks = None if smoke else common.measure_peaks(device)
    if peaks:
        print(f"measured peaks: {peaks[0]:.0f} TFLOP/s bf16 matmul, {peaks[1]:.0f} GB/s copy (read + write)",
              flush=True)
    results = []
    ran = []

    def table():
        return common.smoke_table(results, TOLERANCE) if smoke and not has_cuda else common.markdown(results)

    def write_outputs():  # after each family too: a run killed later keeps the tables of those before
        for path, text in ((args.json, common.to_json(results)), (args.csv, common.to_csv(results)),
                           (args.md, common.header(device) + (f"\nmeasured peaks: {peaks[0]:.0f} TFLOP/s, "
                                      f"{peaks[1]:.0f} GB/s" if peaks else "") + "\n" + table() + "\n")):
            if path:
                with open(path, "w") as f:
                    f.write(text)

    for which in (BENCHES if args.which == "all" else (args.which,)):
        ran.append(which)
        if which == "lora":
            results += lora.run(_shapes(smoke, args.quick, lora.SMOKE_SHAPES, lora.GPU_SHAPES), timer,
                                providers=providers, modes=modes, peaks=peaks)
        if which == "multi-lora":
            from . import multi_lora
            results += multi_lora.run(_shapes(smoke, args.quick, multi_lora.SMOKE_SHAPES, multi_lora.GPU_SHAPES),
                                      timer, peaks)
            results += multi_lora.serving(timer, smoke)
            results += multi_lora.train(timer, smoke)
        if which == "moe":
            from . import moe
            results += moe.run_dc(_shapes(smoke, args.quick, moe.SMOKE_DC, moe.GPU_DC), timer, peaks)
            results += moe.run_layer(_shapes(smoke, args.quick, moe.SMOKE_LAYER, moe.GPU_LAYER), timer, peaks)
        if which == "moe-lora":
            from . import moe_lora
            results += moe_lora.run(_shapes(smoke, args.quick, moe_lora.SMOKE_SHAPES, moe_lora.GPU_SHAPES), timer,
                                    peaks)
        if which == "qlora":
            from . import qlora
            results += qlora.run(_shapes(smoke, args.quick, qlora.SMOKE_SHAPES, qlora.GPU_SHAPES, qlora.HEADLINE),
                                 timer, peaks)
        write_outputs()
    print(table())
    if args.plot:
        common.plot(results, args.plot)
    checked = [r for r in results if r.rel_err is not None]
    bad = [r for r in checked if not r.rel_err <= TOLERANCE[r.dtype]]
    for r in bad:
        print(f"CHECK FAILED: {r.bench} {r.shape}: relative error {r.rel_err:.2e}", file=sys.stderr)
    if not bad:
        what = "; ".join(sorted({f"{r.bench}: {r.checks}" for r in checked}))
        print(f"\nself-check passed ({', '.join(ran)}): {len({(r.bench, r.shape) for r in checked})} shapes within "
              f"tolerance of the reference ({what})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
