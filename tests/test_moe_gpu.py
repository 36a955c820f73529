"""GPU tests of the MoE kernels and layers: bf16 at the benchmark shape
(n=8192, d=4096, E=8, C=2), bitwise determinism there, a whole layer against
the reference backend, and CUDA graph capture (no host synchronisation)."""
import pytest
import torch
from helpers import GPU

import posttrain_kernels as pk
from posttrain_kernels.ops.moe import reference as ref

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("nan_poison")]


def _setup(n=8192, d=4096, E=8, cf=2.0, dtype=torch.bfloat16):
    g = torch.Generator(device=GPU).manual_seed(0)
    x = torch.randn(n, d, device=GPU, generator=g).to(dtype)
    logits = torch.randn(n, E, device=GPU, generator=g)
    gates, idx = pk.expert_choice_route(logits, pk.capacity_from_factor(n, E, cf))
    return x, gates, idx


def test_dispatch_combine_bf16_real_shape():
    x, gates, idx = _setup()
    n = x.shape[0]
    h = pk.moe_dispatch(x, idx)
    assert torch.equal(h, ref.moe_dispatch_ref(x, idx))
    eo = torch.randn_like(h)
    y = pk.moe_combine(eo, idx, gates, n)
    y_ref = ref.moe_combine_ref(eo.double(), idx, gates.double(), n)
    torch.testing.assert_close(y.double(), y_ref, rtol=2 ** -8, atol=2 ** -8)
    g = gates.clone().requires_grad_(True)
    eo.requires_grad_(True)
    dy = torch.randn_like(y)
    deo, dg = torch.autograd.grad(pk.moe_combine(eo, idx, g, n), (eo, g), dy)
    torch.testing.assert_close(deo.float(), (ref.moe_dispatch_ref(dy.float(), idx) * gates[..., None]),
                               rtol=2 ** -8, atol=2 ** -8)
    torch.testing.assert_close(dg, (ref.moe_dispatch_ref(dy.float(), idx) * eo.float()).sum(-1), rtol=1e-3, atol=1e-2)


def test_bitwise_deterministic_real_shape():
    x, gates, idx = _setup()
    x.requires_grad_(True)
    eo = torch.randn(*idx.shape, x.shape[1], device=GPU, dtype=x.dtype)
    first = None
    for _ in range(3):
        y = pk.moe_combine(eo, idx, gates, x.shape[0])
        (dx,) = torch.autograd.grad(pk.moe_dispatch(x, idx), x, eo)
        if first is None:
            first = (y, dx)
        assert torch.equal(first[0], y) and torch.equal(first[1], dx)


@pytest.mark.parametrize("cls,kwargs", [(pk.ExpertChoiceMoE, {}), (pk.TopKMoE, {"top_k": 2})])
def test_layer_against_reference_backend(cls, kwargs):
    torch.manual_seed(0)
    layer = cls(512, 1024, 8, device=GPU, dtype=torch.bfloat16, **kwargs)
    eager = cls(512, 1024, 8, device=GPU, dtype=torch.bfloat16, backend="reference", **kwargs)
    eager.load_state_dict(layer.state_dict())
    x = torch.randn(4, 256, 512, device=GPU, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    got = torch.autograd.grad(layer(x), [x] + list(layer.parameters()), dy)
    want = torch.autograd.grad(eager(x), [x] + list(eager.parameters()), dy)
    for (name, _), a, b in zip([("x", None)] + list(layer.named_parameters()), got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=lambda m: f"{name}: {m}")


def test_cuda_graph_capture_layer():
    layer = pk.ExpertChoiceMoE(256, 512, 8, device=GPU, dtype=torch.bfloat16)
    x = torch.randn(512, 256, device=GPU, dtype=torch.bfloat16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            layer(x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)


def test_grouped_experts_bf16():
    """Top-2 at capacity factor 1.25 on a bf16 layer: the grouped path is
    what "auto" picks on this GPU (where PyTorch's grouped GEMM runs), it
    matches the padded path in the output and every gradient, and two
    backward passes are bitwise equal."""
    from posttrain_kernels.ops.moe import grouped
    ok, why = grouped.grouped_supported(GPU, torch.bfloat16, 512, 1024)
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    kw = dict(top_k=2, capacity_factor=1.25, gated=True, device=GPU, dtype=torch.bfloat16)
    auto = pk.TopKMoE(512, 1024, 8, **kw)
    padded = pk.TopKMoE(512, 1024, 8, expert_gemm="padded", **kw)
    padded.load_state_dict(auto.state_dict())
    x = torch.randn(4, 1000, 512, device=GPU, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    assert auto.uses_grouped_gemm(x)
    runs = []
    for layer in (auto, auto, padded):
        y = layer(x)
        runs.append([y] + list(torch.autograd.grad(y, [x] + list(layer.parameters()), dy)))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b), "grouped path not deterministic"
    for got, want in zip(runs[0], runs[2]):
        scale = want.float().abs().max().clamp_min(1e-3)
        assert ((got.float() - want.float()).abs().max() / scale).item() < 2e-2


@pytest.mark.parametrize("E, d, F, rows, R", [(128, 2048, 768, 256, 16), (8, 1024, 2816, 700, 64)],
                         ids=["peft-shape", "wide-r64"])
def test_expert_lora_bf16(E, d, F, rows, R):
    """The expert-LoRA GEMM in bf16 (fused shrink, dt fused into dX; the sm_90 wgmma path), uneven
    and empty experts, against fp32 math by the tolerance rule; the gradient kernels deterministic."""
    from helpers import assert_close_rule
    g = torch.Generator(device=GPU).manual_seed(0)
    counts = torch.randint(0, 2 * rows, (E,), generator=g, device=GPU)
    counts[::7] = 0
    ends = counts.cumsum(0).to(torch.int32)
    M = int(ends[-1])
    x = torch.randn(M, d, device=GPU, generator=g).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(E, F, d, device=GPU, generator=g) / d ** 0.5).to(torch.bfloat16)  # transformers' [E, out, in]
    a = (torch.randn(E, R, d, device=GPU, generator=g) / d ** 0.5).to(torch.bfloat16).requires_grad_()
    b = (torch.randn(E, F, R, device=GPU, generator=g) * 0.1).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(M, F, device=GPU, generator=g).to(torch.bfloat16)
    grads = []
    for _ in range(2):
        y = pk.ops.moe.lora.expert_lora_linear(x, w, ends, a, b, 2.0, weight_layout="out_in")
        grads.append(torch.autograd.grad(y, [x, a, b], dy) + (y,))
    for u, v in zip(*grads):
        assert torch.equal(u, v), "not deterministic"
    got = grads[0]
    ref = {}
    for dt in (torch.float32, torch.bfloat16):
        xs, as_, bs = (t.detach().to(dt).requires_grad_() for t in (x, a, b))
        e_of = torch.repeat_interleave(torch.arange(E, device=GPU), counts)
        ys = torch.zeros(M, F, device=GPU, dtype=dt)
        for e in range(E):
            rows_e = e_of == e
            if rows_e.any():
                xe = xs[rows_e]
                ys[rows_e] = xe @ w[e].to(dt).t() + 2.0 * (xe @ as_[e].t()) @ bs[e].t()
        ref[dt] = torch.autograd.grad(ys, [xs, as_, bs], dy.to(dt)) + (ys,)
    for name, i in (("dx", 0), ("dA", 1), ("dB", 2), ("y", 3)):
        assert_close_rule(name, got[i].float(), ref[torch.bfloat16][i].float(), ref[torch.float32][i].double(), 1e-2)


@pytest.mark.parametrize("gemm", ["padded", "grouped"])
def test_layer_with_expert_lora_against_reference_backend_and_in_a_cuda_graph(gemm):
    """A bf16 top-2 layer with LoRA on every expert projection: the kernels (TMA path on sm_90)
    against the reference backend, output and every adapter gradient; then captured in a CUDA graph."""
    from posttrain_kernels.ops.moe import grouped
    if gemm == "grouped" and not grouped.grouped_supported(GPU, torch.bfloat16, 512, 1024)[0]:
        pytest.skip("grouped_mm does not run here")
    torch.manual_seed(0)
    kw = dict(top_k=2, capacity_factor=1.25, device=GPU, dtype=torch.bfloat16, expert_gemm=gemm)
    layer = pk.TopKMoE(512, 1024, 8, **kw).add_expert_lora(16, 32)
    with torch.no_grad():
        for adapter in layer.experts.lora.values():
            adapter.lora_B.normal_(std=0.02)
    eager = pk.TopKMoE(512, 1024, 8, backend="reference", **kw).add_expert_lora(16, 32)
    eager.load_state_dict(layer.state_dict())
    x = torch.randn(4, 256, 512, device=GPU, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    got = torch.autograd.grad(layer(x), [x] + params, dy)
    want = torch.autograd.grad(eager(x), [x] + [p for p in eager.parameters() if p.requires_grad], dy)
    for a, b in zip(got, want):
        scale = b.float().abs().max().clamp_min(1e-3)
        assert ((a.float() - b.float()).abs().max() / scale).item() < 2e-2
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(s):
        for _ in range(2):
            layer(x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        y = layer(x)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
