"""``posttrain-kernels``: the benchmark / self-check and tuning command.

    posttrain-kernels bench [lora|multi-lora|moe|all] [--quick] [--smoke] [--providers P,..] [--modes M,..]
                            [--json F] [--csv F] [--md F] [--plot F.png]
    posttrain-kernels tune [--preset llama-3-8b] [--shape K,N] [--tokens 8192] [--rank 16] [--output F]

On a CUDA machine it benchmarks the kernels at model shapes against the
baselines and checks every result against a fp32 reference. Without CUDA it
runs a smoke mode: the real kernels through the Triton interpreter at small
shapes, correctness checked, and it says plainly that its timings are not
GPU numbers.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

BENCHES = ("lora", "multi-lora", "moe")
# Relative error (norm-wise, fwd and every gradient) allowed per dtype.
TOLERANCE = {"float32": 1e-5, "float16": 3e-3, "bfloat16": 2e-2}


def _reexec_under_interpreter(argv) -> int:
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.call([sys.executable, "-m", "posttrain_kernels.bench", *argv], env=env)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="posttrain-kernels", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="benchmarks against eager PyTorch, with a correctness check")
    b.add_argument("which", nargs="?", default="all", choices=(*BENCHES, "all"))
    b.add_argument("--smoke", action="store_true", help="small shapes (the default without CUDA)")
    b.add_argument("--json", help="write the rows as JSON")
    b.add_argument("--csv", help="write the rows as CSV")
    b.add_argument("--md", help="write the markdown table")
    b.add_argument("--plot", help="write PNG bar charts to this file (needs matplotlib)")
    b.add_argument("--quick", action="store_true", help="GPU: the headline shape only")
    b.add_argument("--providers", help="comma-separated subset of linear,eager,compile,peft,ours")
    b.add_argument("--modes", help="comma-separated subset of fwd,bwd,fwd+bwd")
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

    from . import common, lora
    device = torch.device("cuda" if has_cuda else "cpu")
    smoke = args.smoke or not has_cuda
    timer = common.Timer(device)
    print(common.header(device), flush=True)
    providers = args.providers.split(",") if args.providers else None
    if smoke:
        print("smoke mode: small shapes" + ("" if has_cuda else
              "; timings are interpreter wall-clock on the CPU, NOT GPU numbers"), flush=True)
        if providers is None:  # torch.compile of the baseline adds a minute of C++ builds on a CPU
            providers = [p for p in lora.available_providers() if p != "compile"]
    modes = args.modes.split(",") if args.modes else lora.MODES
    peaks = common.measure_peaks(device)
    if peaks:
        print(f"measured peaks: {peaks[0]:.0f} TFLOP/s bf16 matmul, {peaks[1]:.0f} GB/s copy (read + write)",
              flush=True)
    results = []
    for which in (BENCHES if args.which == "all" else (args.which,)):
        if which == "lora":
            shapes = lora.SMOKE_SHAPES if smoke else lora.GPU_SHAPES[:1] if args.quick else lora.GPU_SHAPES
            results += lora.run(shapes, timer, providers=providers, modes=modes, peaks=peaks)
        if which == "multi-lora":
            from . import multi_lora
            results += multi_lora.run(multi_lora.SMOKE_SHAPES if smoke else multi_lora.GPU_SHAPES, timer, peaks)
            results += multi_lora.serving(timer, smoke)
            results += multi_lora.train(timer, smoke)
        if which == "moe":
            from . import moe
            results += moe.run_dc(moe.SMOKE_DC if smoke else moe.GPU_DC, timer, peaks)
            results += moe.run_layer(moe.SMOKE_LAYER if smoke else moe.GPU_LAYER, timer, peaks)
    table = common.markdown(results)
    print(table)
    if args.plot:
        common.plot(results, args.plot)
    for path, text in ((args.json, common.to_json(results)), (args.csv, common.to_csv(results)),
                       (args.md, common.header(device) + (f"\nmeasured peaks: {peaks[0]:.0f} TFLOP/s, "
                                  f"{peaks[1]:.0f} GB/s" if peaks else "") + "\n" + table + "\n")):
        if path:
            with open(path, "w") as f:
                f.write(text)
    bad = [r for r in results if r.rel_err is not None
           and not r.rel_err <= TOLERANCE[r.shape.rsplit(" ", 1)[-1]]]
    for r in bad:
        print(f"CHECK FAILED: {r.bench} {r.shape}: relative error {r.rel_err:.2e}", file=sys.stderr)
    if not bad:
        print(f"\nself-check passed: {len({(r.bench, r.shape) for r in results})} shapes, every checked output "
              f"(LoRA and multi-LoRA train: forward and every gradient; multi-LoRA, MoE: forward) "
              f"within tolerance of the reference")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
