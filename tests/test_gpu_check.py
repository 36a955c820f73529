"""The GPU check (bench/gpu_check.sh) and what it rests on, without a GPU: its time budget, the
compile-only mode that warms and counts its compiles, and results that reach the disk as they
are produced (a step killed at its limit keeps them)."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from posttrain_kernels.autotune import compile_only

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_default_steps_fit_the_budget():
    """A GPU is lent for minutes, at most 10 per command: the default steps' limits add up to
    ≤ 470 s (8 minutes with the install), in priority order: correctness before speed."""
    text = SCRIPT.read_text()
    default = re.search(r'STEPS=\$\{STEPS:-([^}]*)\}', text).group(1).split()
    limits = dict(re.findall(r"^step (\S+) (\d+) ", text, re.M))
    assert default == ["warm", "gpu-tests", "bench", "host", "cuda-tests"]
    assert set(default) <= set(limits) and "tune" in limits
    assert sum(int(limits[s]) for s in default) <= 470, limits


def test_specialisation_classes_follow_triton():
    names = [("x_ptr", False), ("M", False), ("N", False), ("scale", False), ("BLOCK", True), ("FLAG", True)]
    x = torch.empty(8, dtype=torch.float16)
    key = compile_only.specialisation(names, (x, 1, 4096), dict(scale=0.5, BLOCK=64, FLAG=False, num_warps=4))
    assert key == ["*float16:16", "1", "i32:16", "fp32", "64", "False", "num_warps=4"]
    off = x[1:]
    assert compile_only.specialisation(names[:3], (off, 33, 2 ** 40), {}) == ["*float16", "i32", "i64:16"]


def test_compile_only_records_sm90_launches(tmp_path):
    """With launches stubbed and an H100 pretended on the CPU, a LoRA fwd+bwd plans the sm_90
    path (the TMA GEMM) and records each launch's specialisation."""
    code = (
        "import torch, posttrain_kernels as pk\n"
        "x = torch.randn(256, 128, dtype=torch.float16, requires_grad=True)\n"
        "w = torch.randn(192, 128, dtype=torch.float16)\n"
        "a = torch.randn(16, 128, requires_grad=True); b = torch.randn(192, 16, requires_grad=True)\n"
        "y = pk.lora_linear(x, w, a, b, 2.0)\n"
        "y.backward(torch.randn_like(y))\n")
    env = dict(os.environ, TRITON_INTERPRET="1", POSTTRAIN_KERNELS_COMPILE_ONLY=str(tmp_path / "rec"),
               POSTTRAIN_KERNELS_PRETEND_GPU="NVIDIA H100 80GB HBM3:90:132")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = compile_only.count(str(tmp_path / "rec"))
    # forward: the TMA GEMM with the shrink fused; backward: dY pass, x pass, the TMA dx GEMM
    assert counts == {"lora_dy": (1, 1), "lora_matmul_tma": (2, 2), "lora_x": (1, 1)}, counts
    out = subprocess.run([sys.executable, "-m", "posttrain_kernels.bench.compile_count", str(tmp_path / "rec")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "4 specialisations, 4 launches" in out.stdout, out.stdout + out.stderr


def test_pretend_gpu_needs_compile_only_mode(monkeypatch):
    """The pretended GPU plans CPU tensors only while launches are stubbed: never in a real run."""
    from posttrain_kernels.ops import backend
    assert backend.COMPILE_ONLY_VAR == compile_only.VAR
    monkeypatch.setenv(backend.PRETEND_VAR, "NVIDIA H100 80GB HBM3:90:132")
    monkeypatch.delenv(compile_only.VAR, raising=False)
    assert backend.pretend_gpu() is None
    monkeypatch.setenv(compile_only.VAR, "/tmp/x")
    assert backend.pretend_gpu() == ("NVIDIA H100 80GB HBM3", 90, 132)


def test_bench_rows_reach_the_disk_as_measured(tmp_path, monkeypatch):
    """``--rows``: one JSON line per benchmark row, written when the row is made."""
    if torch.cuda.is_available():
        pytest.skip("smoke shapes without a GPU")
    from posttrain_kernels.bench import common
    from posttrain_kernels.bench.cli import main
    rows = tmp_path / "rows.jsonl"
    monkeypatch.setattr(common, "ROWS_TO", None)
    assert main(["bench", "moe", "--quick", "--rows", str(rows), "--json", str(tmp_path / "all.json")]) == 0
    streamed = [json.loads(line) for line in rows.read_text().splitlines()]
    assert streamed == json.loads((tmp_path / "all.json").read_text()) and streamed
    common.ROWS_TO = None


def test_test_log_gets_a_line_per_test(tmp_path):
    log = tmp_path / "tests.txt"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2",
         "test_packaging.py::test_every_package_is_listed_in_pyproject",
         "test_gpu_check.py::test_default_steps_fit_the_budget"],
        cwd=ROOT / "tests", env=dict(os.environ, POSTTRAIN_KERNELS_TEST_LOG=str(log)),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    lines = sorted(log.read_text().splitlines())
    assert len(lines) == 2, lines
    assert lines[0].startswith("passed ") and lines[0].endswith("test_gpu_check.py::test_default_steps_fit_the_budget")
    assert lines[1].endswith("test_packaging.py::test_every_package_is_listed_in_pyproject")
