"""Compile without launching, and count what a run compiles.

With ``POSTTRAIN_KERNELS_COMPILE_ONLY=<folder>`` set before the package is
imported, every kernel launch (``spec.fn[grid](...)``, whichever launcher
makes it) is replaced by

* a record of the launch's specialisation, a JSON line in
  ``<folder>/<pid>.jsonl``: what Triton keys its compile cache on (the
  kernel, each pointer's dtype and 16-byte alignment, each integer's
  "is 1" / "multiple of 16" / 64-bit class, every constexpr, the warps and
  stages);
* on CUDA, Triton's ``warmup`` (compile into the on-disk cache, or load from
  it; nothing is launched).

Nothing is written to any output, so the run's results are garbage: its use
is the GPU check's warm-up (``bench/gpu_check.sh`` runs the GPU tests and the
benchmarks this way in parallel processes, which fills Triton's cache from
every core before the timed, serial part) and the count of the
specialisations each step compiles (``count``;
``python -m posttrain_kernels.bench.compile_count <folder>`` prints it).

Without a GPU, ``POSTTRAIN_KERNELS_PRETEND_GPU="NVIDIA H100 80GB HBM3:90:132"``
(name, compute capability, SMs; honoured only in this mode, by
``ops/backend.py``) makes the launchers plan CPU tensors as for that GPU (the
sm_90 paths and configs), so the same count can be taken with launches
stubbed on a CPU.
"""
from __future__ import annotations

import collections
import json
import os

VAR = "POSTTRAIN_KERNELS_COMPILE_ONLY"


def folder() -> str | None:
    return os.environ.get(VAR) or None


def _int_class(v: int) -> str:
    if v == 1:
        return "1"
    return ("i32" if -2 ** 31 <= v < 2 ** 31 else "i64") + (":16" if v % 16 == 0 else "")


def specialisation(names: list, args: tuple, kwargs: dict) -> list:
    """What Triton's compile cache distinguishes between two launches of one kernel."""
    bound = dict(zip((n for n, _ in names), args))
    bound.update(kwargs)
    out = []
    for name, constexpr in names:
        v = bound.get(name)
        if constexpr or isinstance(v, (bool, str)) or v is None:
            out.append(repr(v))
        elif hasattr(v, "data_ptr"):
            out.append(f"*{str(v.dtype).replace('torch.', '')}" + (":16" if v.data_ptr() % 16 == 0 else ""))
        elif isinstance(v, int):
            out.append(_int_class(v))
        elif isinstance(v, float):
            out.append("fp32")
        else:
            out.append(type(v).__name__)
    extra = sorted((k, repr(v)) for k, v in kwargs.items() if k not in {n for n, _ in names})
    return out + [f"{k}={v}" for k, v in extra]


class CompileOnly:
    """Stands in for a spec's ``@triton.jit`` function: ``[grid](...)`` records and warms up."""

    def __init__(self, kernel, name: str, names: list, out: str):
        self.kernel, self.name, self.names, self.out = kernel, name, names, out
        os.makedirs(out, exist_ok=True)

    @property
    def fn(self):  # the Python function (KernelSpec.arguments reads its signature)
        return getattr(self.kernel, "fn", self.kernel)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            key = specialisation(self.names, args, kwargs)
            with open(os.path.join(self.out, f"{os.getpid()}.jsonl"), "a") as f:
                f.write(json.dumps({"kernel": self.name, "key": key}) + "\n")
            first = next((a for a in args if hasattr(a, "device")), None)
            if first is not None and first.device.type == "cuda" and hasattr(self.kernel, "warmup"):
                self.kernel.warmup(*args, grid=grid, **kwargs)
        return launch


def install(spec) -> None:
    """Replace ``spec.fn`` (called by ``register`` when the mode is on)."""
    out = folder()
    if out and not isinstance(spec.fn, CompileOnly):
        object.__setattr__(spec, "fn", CompileOnly(spec.fn, spec.name, spec.arguments(), out))


def records(path: str):
    """(kernel, key as JSON) of every launch recorded under ``path``."""
    for root, _, files in os.walk(path):
        for name in files:
            if name.endswith(".jsonl"):
                with open(os.path.join(root, name)) as f:
                    for line in f:
                        rec = json.loads(line)
                        yield rec["kernel"], json.dumps(rec["key"])


def count(path: str) -> dict:
    """{kernel: (distinct specialisations, launches)} of every record under ``path``."""
    keys, launches = collections.defaultdict(set), collections.Counter()
    for kernel, key in records(path):
        keys[kernel].add(key)
        launches[kernel] += 1
    return {k: (len(keys[k]), launches[k]) for k in sorted(keys)}
