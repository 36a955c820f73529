"""Ahead-of-time compile of every kernel config for sm_90 and sm_80.

Runs ``posttrain_kernels.autotune.aot`` in a subprocess without
TRITON_INTERPRET (the interpreter replaces the JIT functions in this
process). Catches what the interpreter hides: dot dims < 16, shared memory
over the target's budget, dtype combinations the compiler rejects.
"""
import json
import os
import subprocess
import sys

import pytest

from posttrain_kernels.autotune import REGISTRY
from posttrain_kernels.autotune import config as C

pytestmark = pytest.mark.aot


@pytest.mark.parametrize("cc", [90, 80], ids=["sm_90", "sm_80"])
def test_every_config_compiles(cc, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = tmp_path / "rows.json"
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain_kernels.autotune.aot", "--cc", str(cc), "--json", str(out),
         "--workers", str(min(4, os.cpu_count() or 1))],
        env=env, capture_output=True, text=True, timeout=1500)
    assert out.exists(), f"aot compile did not run:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    rows = json.loads(out.read_text())
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "\n".join(f"{r['kernel']} {r['dtype']} R{r['block_r']} {r['config']}: {r['error']}" for r in bad)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    # The compile covered every kernel, dtype and rank block, and every layout of each spec.
    seen = {(r["kernel"], r["dtype"], r["block_r"]) for r in rows}
    for d in C.DTYPES:
        assert ("lora_matmul", d, None) in seen
        for br in C.RANK_BLOCKS:
            assert ("lora_shrink", d, br) in seen and ("lora_grad", d, br) in seen
    assert len(rows) == sum(len(spec.compiled_space(cc)) for spec in REGISTRY.values())
    for name, spec in REGISTRY.items():
        assert {r["dtype"] for r in rows if r["kernel"] == name} == set(C.DTYPES), name
        assert {r["variant"] for r in rows if r["kernel"] == name} == {v.name for v in spec.variants}, name
