"""The benchmark suite in smoke mode (interpreter on CPU, small shapes): every
provider and mode runs and ours is checked; the pytest-benchmark entry times
the fused forward (benchmarks are disabled, run once, under pytest-xdist)."""
import json

import pytest
import torch

import posttrain_kernels as pk
from posttrain_kernels.bench import common, lora


def test_smoke_rows_tables_and_outputs(device, tmp_path):
    shape = lora.LoRAShape(24, 40, 36, 4, torch.float32)
    providers = [p for p in lora.available_providers() if p != "compile"]
    results = lora.run([shape], common.Timer(device, cpu_reps=1), providers=providers)
    assert {(r.mode, r.provider) for r in results} == {(m, p) for m in lora.MODES for p in providers}
    ours = [r for r in results if r.provider == "ours"]
    assert all(r.rel_err is not None and r.rel_err < 1e-5 for r in ours), "ours is checked against fp64"
    assert all(r.ms > 0 and r.p20_ms <= r.ms <= r.p80_ms for r in results)
    table = common.markdown(results)
    assert "| ours |" in table and "time / eager" in table
    rows = json.loads(common.to_json(results))
    assert len(rows) == len(results) and rows[0]["bench"] == "lora"
    assert common.to_csv(results).count("\n") == len(results)
    pytest.importorskip("matplotlib")
    common.plot(results, str(tmp_path / "lora.png"))
    assert (tmp_path / "lora.png").stat().st_size > 1000


def test_flops_and_bytes_model():
    s = lora.LoRAShape(8192, 4096, 4096, 16)
    base = 2 * 8192 * 4096 * 4096
    assert lora.flops(s, "linear", "fwd") == base
    assert lora.flops(s, "ours", "fwd") == base + 2 * 8192 * 16 * 8192  # 2·M·r·(K+N)
    assert lora.flops(s, "ours", "fwd+bwd") == lora.flops(s, "ours", "fwd") + lora.flops(s, "ours", "bwd")
    assert lora.min_bytes(s, "fwd") == 2 * (8192 * 4096 * 2 + 4096 * 4096 + 16 * 8192)


def test_benchmark_fused_forward(benchmark, device):
    shape = lora.LoRAShape(32, 48, 40, 8, torch.float32)
    x, w, a, b, bias, _ = lora.make_inputs(shape, device)
    y = benchmark(lambda: pk.lora_linear(x, w, a, b, 2.0, bias))
    torch.testing.assert_close(y, lora.eager_lora(x, w, a, b, 2.0, bias), rtol=1e-5, atol=1e-5)


def test_peft_provider_computes_the_same_layer(device):
    pytest.importorskip("peft")
    shape = lora.LoRAShape(12, 32, 24, 4, torch.float32)
    inputs = lora.make_inputs(shape, device)
    x, w, a, b, bias, _ = inputs
    for provider in ("peft", "peft+patch"):
        got = lora.provider_fn(provider, "fwd", shape, inputs)()
        torch.testing.assert_close(got, lora.eager_lora(x, w, a, b, 2.0, bias), rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{provider}: {m}")


def test_multi_lora_and_moe_smoke(device):
    from posttrain_kernels.bench import moe, multi_lora
    timer = common.Timer(device, cpu_reps=1)
    rows = (multi_lora.run(multi_lora.SMOKE_SHAPES[:1], timer) + multi_lora.serving(timer, smoke=True)
            + multi_lora.train(timer, smoke=True))
    ours = [r for r in rows if r.provider == "ours" and r.rel_err is not None]
    assert ours and all(r.rel_err < 1e-5 for r in ours)
    assert any(r.tokens_per_s for r in rows) and "tokens/s" in common.markdown(rows)
    rows = moe.run_dc(moe.SMOKE_DC, timer) + moe.run_layer(moe.SMOKE_LAYER, timer)
    assert {r.provider for r in rows} == {"index", "onehot", "ours", "eager", "padded", "grouped", "floor"}
    assert {r.shape for r in rows if r.provider == "grouped" and r.rel_err is not None} == \
        {s.label for s in moe.SMOKE_LAYER}, "the grouped path is checked at every layer shape"
    assert all(r.rel_err < 1e-5 for r in rows if r.rel_err is not None)


def test_peft_mixed_batch_provider_matches_ours(device):
    pytest.importorskip("peft")
    from posttrain_kernels.bench import multi_lora
    s = multi_lora.SMOKE_SHAPES[0]
    x, w, A, B, ranks, scales, req = multi_lora.make_pool(s, device)
    pm = multi_lora._peft_model(w, A, B)
    with torch.no_grad():
        got = pm(x, adapter_names=[f"t{a}" for a in req.tolist()])
    ids = req[:, None].expand(x.shape[0], x.shape[1]).reshape(-1)
    torch.testing.assert_close(got, pk.multi_lora_linear(x, w, A, B, ranks, scales, ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(multi_lora._loop(x, w, A, B, scales, req), got, rtol=1e-5, atol=1e-5)


def test_host_overhead_tool_runs_and_restores():
    from posttrain_kernels.bench import host_overhead
    from posttrain_kernels.ops.lora import launch as L
    before = L.LORA_MATMUL
    assert host_overhead.measure(reps=5, rounds=1) > 0
    assert L.LORA_MATMUL is before, "the stubs must be removed again"


def test_cli_smoke_run_shows_checks_not_timings(capsys):
    """Without a GPU, ``posttrain-kernels bench moe --quick`` prints a line
    per case as it goes, a per-shape correctness table with no timing
    columns, and a closing line naming only what ran."""
    if torch.cuda.is_available():
        pytest.skip("smoke output without a GPU")
    from posttrain_kernels.bench.cli import main
    assert main(["bench", "moe", "--quick"]) == 0
    out, err = capsys.readouterr()
    assert "... moe dispatch+combine 1/1" in err and "... moe layer 1/1" in err
    assert "| moe-dc |" in out and "| pass |" in out
    for fake in ("TFLOP", "median ms", "roofline", "x |"):
        assert fake not in out, f"smoke output shows {fake!r}"
    closing = out.strip().splitlines()[-1]
    assert closing.startswith("self-check passed (moe)") and "lora" not in closing


def test_moe_lora_smoke(device):
    """The expert-LoRA benchmark's providers all run (PEFT's ParamWrapper path among them); ours is
    checked against the eager loop; the peak-memory column shows when measured (CUDA)."""
    pytest.importorskip("peft")
    from posttrain_kernels.bench import moe_lora
    rows = moe_lora.run(moe_lora.SMOKE_SHAPES, common.Timer(device, cpu_reps=1))
    assert {r.provider for r in rows} == {"ours", "floor", "frozen", "eager", "peft", "peft+patch"}
    ours = [r for r in rows if r.rel_err is not None]
    assert [r.provider for r in ours] == ["ours"] and ours[0].rel_err < 1e-5
    rows[0].peak_mb = 12.0
    assert "peak MB" in common.markdown(rows)
