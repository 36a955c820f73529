"""GPU tests of the fused LoRA kernels: bf16 at a real shape (M=8192,
K=N=4096, r=16), determinism there, torch.compile with inductor, and CUDA
graph capture (no host synchronisation in forward or backward). The small
odd-shape grids of test_lora.py also run on CUDA, bf16 included."""
import math

import pytest
import torch
from helpers import GPU, assert_close_rule

import posttrain_kernels as pk
from posttrain_kernels.ops.lora import reference as ref

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("nan_poison")]


def _inputs(M, K, N, r, dtype, adapter_dtype, seed=0):
    g = torch.Generator(device=GPU).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device=GPU)  # noqa: E731
    return (rnd(M, K).to(dtype), (rnd(N, K) / math.sqrt(K)).to(dtype),
            (rnd(r, K) / math.sqrt(K)).to(adapter_dtype), (rnd(N, r) / math.sqrt(r)).to(adapter_dtype),
            rnd(N).to(dtype), rnd(M, N).to(dtype))


def _fwd_bwd(x, w, a, b, bias, dy, scale, fn, cast=None):
    leaves = [v.detach().to(cast or v.dtype).requires_grad_(True) for v in (x, a, b, bias)]
    y = fn(leaves[0], w.to(cast or w.dtype), leaves[1], leaves[2], scale, leaves[3])
    return [y.detach(), *torch.autograd.grad(y, leaves, dy.to(cast or dy.dtype))]


@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32adapters"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_real_shape(dtype, adapter_dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    M, K, N, r = 8192, 4096, 4096, 16
    x, w, a, b, bias, dy = _inputs(M, K, N, r, dtype, adapter_dtype)
    ours = _fwd_bwd(x, w, a, b, bias, dy, 2.0, pk.lora_linear)
    lowp = _fwd_bwd(x, w, a.to(dtype), b.to(dtype), bias, dy, 2.0,
                    lambda *v: ref.lora_linear_ref(*v[:5], bias=v[5]))
    hi = _fwd_bwd(x, w, a, b, bias, dy, 2.0, lambda *v: ref.lora_linear_ref(*v[:5], bias=v[5]),
                  cast=torch.float32)
    for name, o, lo, h in zip(("y", "dx", "dA", "dB", "dbias"), ours, lowp, hi):
        assert_close_rule(name, o, lo, h, 1e-2)


def test_real_shape_deterministic_with_dropout():
    M, K, N, r = 8192, 4096, 4096, 16
    x, w, a, b, bias, dy = _inputs(M, K, N, r, torch.bfloat16, torch.float32)
    seed = torch.tensor([4242], dtype=torch.int32, device=GPU)
    fn = lambda x_, w_, a_, b_, s_, bias_: pk.LoRALinearFunction.apply(  # noqa: E731
        x_, w_, a_, b_, bias_, s_, 0.1, seed, "auto")
    first = _fwd_bwd(x, w, a, b, bias, dy, 2.0, fn)
    for _ in range(2):
        again = _fwd_bwd(x, w, a, b, bias, dy, 2.0, fn)
        for name, u, v in zip(("y", "dx", "dA", "dB", "dbias"), first, again):
            assert torch.equal(u, v), f"{name} differs between identical runs"


def test_torch_compile_inductor_fullgraph():
    torch._dynamo.reset()
    layer = pk.LoRALinear(512, 384, r=16, lora_alpha=32, init_lora_weights=False, device=GPU,
                          dtype=torch.bfloat16)
    model = torch.nn.Sequential(layer, torch.nn.SiLU())
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(4, 100, 512, device=GPU, dtype=torch.bfloat16, requires_grad=True)
    y = compiled(x)
    torch.testing.assert_close(y, model(x), rtol=2e-2, atol=2e-2)
    y.float().pow(2).sum().backward()
    assert torch.isfinite(layer.lora_B.weight.grad).all()


def test_cuda_graph_capture_forward_backward():
    layer = pk.LoRALinear(256, 320, r=8, lora_dropout=0.1, init_lora_weights=False, device=GPU,
                          dtype=torch.bfloat16)
    x = torch.randn(77, 256, device=GPU, dtype=torch.bfloat16, requires_grad=True)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up compiles the kernels outside the capture
        for _ in range(2):
            layer(x).float().sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
        y.float().sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(y).all() and torch.isfinite(layer.lora_A.weight.grad).all()


def _paths():
    from posttrain_kernels.ops.backend import compute_capability
    if (compute_capability(GPU) or 0) < 90:
        pytest.skip("the TMA GEMM needs sm_90")
    return ("tma", "portable")


@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["fused-shrink", "dropout"])
def test_tma_and_portable_paths_agree(dropout, monkeypatch):
    """The sm_90 GEMM (TMA, persistent, shrink fused without dropout) and the
    portable kernel on the same bf16 inputs: each within the reference rule,
    and close to each other, forward and every gradient."""
    from posttrain_kernels.autotune import cache
    from posttrain_kernels.ops.backend import GEMM_VAR
    M, K, N, r = 2048, 4096, 4096, 16
    x, w, a, b, bias, dy = _inputs(M, K, N, r, torch.bfloat16, torch.float32)
    seed = torch.tensor([11], dtype=torch.int32, device=GPU)
    fn = lambda x_, w_, a_, b_, s_, bias_: pk.LoRALinearFunction.apply(  # noqa: E731
        x_, w_, a_, b_, bias_, s_, dropout, seed if dropout else None, "auto")
    outs = {}
    for path in _paths():
        monkeypatch.setenv(GEMM_VAR, path)
        cache.reset()  # the plans read the knob when built
        outs[path] = _fwd_bwd(x, w, a, b, bias, dy, 2.0, fn)
    cache.reset()
    for name, u, v in zip(("y", "dx", "dA", "dB", "dbias"), outs["tma"], outs["portable"]):
        scale = v.float().abs().max().item()
        assert (u.float() - v.float()).abs().max().item() <= 2e-2 * scale + 1e-3, name
