"""Timing, result rows and tables shared by the benchmarks."""
from __future__ import annotations

import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time

import torch


@dataclasses.dataclass
class Result:
    """One provider's timing of one (bench, shape, mode); ``rel_err`` and
    ``checks`` on the row whose output was checked against a reference."""

    bench: str
    shape: str  # a label for the tables; the data are in the other fields
    dtype: str
    mode: str
    provider: str
    ms: float  # median
    p20_ms: float
    p80_ms: float
    tflops: float
    gbps: float
    vs: dict  # provider -> this time / that time
    rel_err: float | None = None
    roofline_pct: float | None = None  # floor (measured peaks) / median, in %
    tokens_per_s: float | None = None  # serving benchmarks
    checks: str | None = None  # what rel_err covers ("forward", "forward and every gradient")
    peak_mb: float | None = None  # allocation high-water mark of one call above what was allocated before (CUDA)

    def __post_init__(self):
        if ROWS_TO is not None:  # --rows: every row on disk the moment it exists (a killed run keeps them)
            with open(ROWS_TO, "a") as f:
                f.write(json.dumps(dataclasses.asdict(self)) + "\n")


ROWS_TO: str | None = None  # the JSON-lines file of ``--rows``


def progress(text: str) -> None:
    """One line per benchmark case, as it starts (stderr, unbuffered): a long
    run shows where it is."""
    print(f"... {text}", file=sys.stderr, flush=True)


class Timer:
    """Median and p20/p80 of a callable.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between runs).
    CPU (the interpreter smoke mode): wall clock; these are NOT GPU numbers.
    """

    def __init__(self, device: torch.device, warmup_ms: int = 25, rep_ms: int = 100, cpu_reps: int = 3):
        self.device = device
        self.warmup_ms, self.rep_ms, self.cpu_reps = warmup_ms, rep_ms, cpu_reps

    def time(self, fn) -> tuple[float, float, float]:
        if self.device.type == "cuda":
            import triton.testing
            q = triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.5, 0.2, 0.8])
            return tuple(float(v) for v in q)
        fn()  # warm-up (compiles nothing under the interpreter, but fills caches)
        samples = []
        for _ in range(self.cpu_reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
        samples.sort()
        return statistics.median(samples), samples[0], samples[-1]


def header(device: torch.device) -> str:
    import triton
    if device.type == "cuda":
        gpu = torch.cuda.get_device_name(device)
    else:
        gpu = f"no GPU ({platform.processor() or platform.machine()}): Triton interpreter on the CPU"
    return (f"{gpu} | torch {torch.__version__} | triton {triton.__version__} | "
            f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")


def measure_peaks(device: torch.device) -> tuple[float, float] | None:
    """(bf16 matmul TFLOP/s, copy GB/s counting read + write) measured here;
    None off CUDA. The roofline floor of a benchmark uses these, not datasheet
    numbers."""
    if device.type != "cuda":
        return None
    import triton.testing
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=100, return_mode="median")
    src = torch.randn(256 * 1024 * 1024, device=device, dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    cp_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    return 2 * n ** 3 / mm_ms / 1e9, 2 * src.numel() * 4 / cp_ms / 1e6


def markdown(results: list[Result]) -> str:
    lines = []
    groups = {}
    for r in results:
        groups.setdefault((r.bench, r.shape, r.mode), []).append(r)
    for (bench, shape, mode), rows in groups.items():
        lines.append(f"\n**{bench} {mode}** — {shape}\n")
        cols = [r.provider for r in rows if r.provider != "ours"]  # every baseline of the group
        if any(r.tokens_per_s is not None for r in rows):
            lines.append("| provider | median ms | p20–p80 ms | tokens/s | "
                         + " | ".join(f"time / {b}" for b in cols) + " |")
            lines.append("|---|---:|---:|---:|" + "---:|" * len(cols))
            for r in rows:
                ratios = " | ".join(f"{r.vs[b]:.3f}x" if b in r.vs else "1.000x" for b in cols)
                lines.append(f"| {r.provider} | {r.ms:.4f} | {r.p20_ms:.4f}–{r.p80_ms:.4f} | {r.tokens_per_s:,.0f} | "
                             f"{ratios} |")
            continue
        mem = any(r.peak_mb is not None for r in rows)
        lines.append("| provider | median ms | p20–p80 ms | TFLOP/s | GB/s (min bytes) | % of roofline | "
                     + " | ".join(f"time / {b}" for b in cols) + " | rel. err |" + (" peak MB |" if mem else ""))
        lines.append("|---|---:|---:|---:|---:|---:|" + "---:|" * len(cols) + "---:|" + ("---:|" if mem else ""))
        for r in rows:
            ratios = " | ".join(f"{r.vs[b]:.3f}x" if b in r.vs else "1.000x" for b in cols)
            err = f"{r.rel_err:.1e}" if r.rel_err is not None else ""
            roof = f"{r.roofline_pct:.0f} %" if r.roofline_pct is not None else "n/a"
            peak = (f" {r.peak_mb:.0f} |" if r.peak_mb is not None else " |") if mem else ""
            lines.append(f"| {r.provider} | {r.ms:.4f} | {r.p20_ms:.4f}–{r.p80_ms:.4f} | {r.tflops:.1f} | "
                         f"{r.gbps:.0f} | {roof} | {ratios} | {err} |{peak}")
    return "\n".join(lines)


def smoke_table(results: list[Result], tolerance: dict) -> str:
    """What a smoke run proves: per (bench, shape), the checked outputs'
    relative error against the reference and the tolerance. No timings: the
    interpreter's wall clock says nothing about a GPU."""
    lines = ["| bench | shape | dtype | checked | rel. err | tolerance | result |", "|---|---|---|---|---:|---:|---|"]
    checked = {(r.bench, r.shape) for r in results if r.rel_err is not None}
    seen = set()  # one row per (bench, shape, what was checked): each checked provider of a shape has its own
    for r in results:
        if (r.bench, r.shape, r.checks) in seen or (r.rel_err is None and (r.bench, r.shape) in checked):
            continue
        seen.add((r.bench, r.shape, r.checks))
        if r.rel_err is None:  # a benchmark with no output check of its own: it ran, that is all
            providers = ", ".join(q.provider for q in results if (q.bench, q.shape) == (r.bench, r.shape))
            lines.append(f"| {r.bench} | {r.shape} | {r.dtype} | ran ({providers}) | | | ran |")
            continue
        tol = tolerance[r.dtype]
        ok = "pass" if r.rel_err <= tol else "FAIL"
        lines.append(f"| {r.bench} | {r.shape} | {r.dtype} | {r.checks} | {r.rel_err:.1e} | {tol:.0e} | {ok} |")
    return "\n".join(lines)


def plot(results: list[Result], path: str) -> None:
    """One bar chart per (shape, mode): median ms by provider, p20–p80 as error bars."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib ({e})") from None
    groups = {}
    for r in results:
        groups.setdefault((r.bench, r.shape, r.mode), []).append(r)
    fig, axes = plt.subplots(len(groups), 1, figsize=(7, 2.6 * len(groups)), squeeze=False)
    for ax, ((bench, shape, mode), rows) in zip(axes[:, 0], groups.items()):
        names = [r.provider for r in rows]
        ms = [r.ms for r in rows]
        err = [[r.ms - r.p20_ms for r in rows], [r.p80_ms - r.ms for r in rows]]
        ax.barh(names, ms, xerr=err, color=["tab:orange" if n == "ours" else "tab:gray" for n in names])
        ax.set_title(f"{bench} {mode}: {shape}", fontsize=9)
        ax.set_xlabel("median ms (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def to_json(results: list[Result]) -> str:
    return json.dumps([dataclasses.asdict(r) for r in results], indent=1)


def to_csv(results: list[Result]) -> str:
    keys = ["bench", "shape", "dtype", "mode", "provider", "ms", "p20_ms", "p80_ms", "tflops", "gbps", "roofline_pct",
            "rel_err", "checks"]
    lines = [",".join(keys + ["vs"])]
    for r in results:
        d = dataclasses.asdict(r)
        vs = ";".join(f"{k}={v:.4f}" for k, v in r.vs.items())
        lines.append(",".join(str(d[k]) for k in keys) + f",{vs}")
    return "\n".join(lines)
