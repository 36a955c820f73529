"""GPU tests of batched multi-adapter LoRA: bf16 at the prefill benchmark
shape (M=4096, K=N=4096, r=16, 64 adapters) and at decode (M=64, each token
its own adapter) against the per-row reference, and CUDA graph capture
(grouping by adapter happens on the device, no host synchronisation)."""
import pytest
import torch
from helpers import GPU

import posttrain_kernels as pk
from posttrain_kernels.ops.multi_lora import reference as ref

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("nan_poison")]


def _case(M, adapters, K=4096, N=4096, r=16, dtype=torch.bfloat16):
    g = torch.Generator(device=GPU).manual_seed(0)
    x = torch.randn(M, K, device=GPU, generator=g).to(dtype)
    w = (torch.randn(N, K, device=GPU, generator=g) / K ** 0.5).to(dtype)
    A = (torch.randn(adapters, r, K, device=GPU, generator=g) / K ** 0.5).to(dtype)
    B = (torch.randn(adapters, N, r, device=GPU, generator=g) / r ** 0.5).to(dtype)
    ranks = torch.randint(1, r + 1, (adapters,), device=GPU, generator=g).to(torch.int32)
    scales = torch.rand(adapters, device=GPU, generator=g)
    ids = torch.randint(-1, adapters, (M,), device=GPU, generator=g)
    return x, w, A, B, ranks, scales, ids


@pytest.mark.parametrize("M,adapters", [(4096, 64), (4096, 1), (64, 64)], ids=["prefill-64", "prefill-1", "decode"])
def test_bf16_against_reference(M, adapters):
    x, w, A, B, ranks, scales, ids = _case(M, adapters)
    y = pk.multi_lora_linear(x, w, A, B, ranks, scales, ids)
    want = ref.multi_lora_linear_ref(x.float(), w.float(), None, A.float(), B.float(), ranks, scales, ids)
    lowp = ref.multi_lora_linear_ref(x, w, None, A, B, ranks, scales, ids)
    err = (y.float() - want).abs().max().item()
    assert err <= 2 * (lowp.float() - want).abs().max().item() + 1e-2 * want.abs().max().item()


def test_cuda_graph_capture():
    x, w, A, B, ranks, scales, ids = _case(256, 8, K=512, N=384)
    for _ in range(2):  # warm-up compiles the kernels outside the capture
        pk.multi_lora_linear(x, w, A, B, ranks, scales, ids)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = pk.multi_lora_linear(x, w, A, B, ranks, scales, ids)
    ids.copy_(torch.randint(-1, 8, ids.shape, device=GPU))  # new tenants, same graph
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, pk.multi_lora_linear(x, w, A, B, ranks, scales, ids), rtol=0, atol=0)


@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
def test_bf16_gradients_against_reference(dropout):
    """Multi-adapter training in bf16 on the GPU: dx, dA, dB of a batch over
    16 adapters (optionally with per-slot LoRA dropout) against autograd
    through the per-row reference in fp32 with the same seeds."""
    x, w, A, B, ranks, scales, ids = _case(1024, 16, K=1024, N=768)
    dy = torch.randn(1024, 768, device=GPU).to(torch.bfloat16)
    p = torch.linspace(0.0, 0.5, 16, device=GPU) if dropout else None
    torch.manual_seed(3)
    seeds = torch.randint(0, 2**31 - 1, (1,), device=GPU, dtype=torch.int32)

    def grads(dtype, fn):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, A, B)]
        y = fn(leaves[0], w.to(dtype), leaves[1], leaves[2])
        return torch.autograd.grad(y, leaves, dy.to(dtype))

    def ours_fn(x, w, a, b):
        torch.manual_seed(3)  # the functional draws the same seeds
        return pk.multi_lora_linear(x, w, a, b, ranks, scales, ids, dropout_p=p)

    ours = grads(torch.bfloat16, ours_fn)
    ref_fn = lambda x, w, a, b: ref.multi_lora_linear_ref(x, w, None, a, b, ranks, scales, ids,  # noqa: E731
                                                          None, p, seeds if dropout else None)
    want, lowp = grads(torch.float32, ref_fn), grads(torch.bfloat16, ref_fn)
    for name, o, hi, lo in zip(("dx", "dA", "dB"), ours, want, lowp):
        err = (o.float() - hi).abs().max().item()
        bound = 2 * (lo.float() - hi).abs().max().item() + 1e-2 * max(1.0, hi.abs().max().item())
        assert err <= bound, f"{name}: max error {err:.3e} > {bound:.3e}"


def test_tma_and_portable_paths_agree(monkeypatch):
    """The sm_90 multi-adapter GEMM (weight through TMA, persistent grid) and
    the portable kernel on the same bf16 batch of 64 adapters, forward and dx."""
    from posttrain_kernels.ops.backend import GEMM_VAR, compute_capability
    if (compute_capability(GPU) or 0) < 90:
        pytest.skip("the TMA GEMM needs sm_90")
    x, w, A, B, ranks, scales, ids = _case(1024, 64)
    dy = torch.randn(x.shape[0], w.shape[0], device=GPU).to(x.dtype)
    outs = {}
    for path in ("tma", "portable"):
        monkeypatch.setenv(GEMM_VAR, path)
        xs = x.detach().requires_grad_(True)
        y = pk.multi_lora_linear(xs, w, A, B, ranks, scales, ids)
        outs[path] = (y.detach(), torch.autograd.grad(y, xs, dy)[0])
    for name, u, v in zip(("y", "dx"), outs["tma"], outs["portable"]):
        assert (u.float() - v.float()).abs().max().item() <= 2e-2 * v.float().abs().max().item() + 1e-3, name
