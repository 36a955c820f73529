"""Experts as grouped GEMMs over the kept slots (ops/moe/grouped.py): the
packing, the grouped GEMM and bias Functions against per-expert loops in
fp64, the whole layer against the padded (baddbmm) path on both backends,
every gradient, empty experts, undefined rows that must not leak, and
determinism, torch.compile. The bf16 CUDA path runs in
tests/test_moe_gpu.py."""
import pytest
import torch

import posttrain_kernels as pk
from posttrain_kernels.ops.moe import grouped

pytestmark = pytest.mark.skipif(grouped.grouped_mm_fn() is None, reason="this torch has no grouped_mm")


def test_pack_slots_layout():
    token_idx = torch.tensor([[3, -1, 5], [-1, -1, -1], [0, 2, -1], [-1, 4, 1]])
    gates = torch.rand(4, 3)
    tok, g, offs = grouped.pack_slots(token_idx, gates)
    assert tok.tolist() == [[3, 5, 0, 2, 4, 1, -1, -1, -1, -1, -1, -1]]
    assert offs.tolist() == [2, 2, 4, 6] and offs.dtype == torch.int32
    assert torch.equal(g[0, :6], torch.stack([gates[0, 0], gates[0, 2], gates[2, 0], gates[2, 1], gates[3, 1],
                                              gates[3, 2]]))
    assert grouped.row_experts(offs, 12).tolist() == [0, 0, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3]


def _loop(a, w, offs, bias=None):
    """Per-group a·w[e] (+ bias[e]) in fp64; rows past offs[-1] are 0."""
    out = torch.zeros(a.shape[0], w.shape[-1], dtype=torch.float64)
    start = 0
    for e, end in enumerate(offs.tolist()):
        out[start:end] = a[start:end].double() @ w[e].double() + (0 if bias is None else bias[e].double())
        start = end
    return out


@pytest.mark.parametrize("with_bias", [False, True])
def test_grouped_linear_against_a_loop(with_bias):
    """Odd group sizes, empty groups (first, middle, last), unused tail rows:
    forward and the gradients of a, w and the bias."""
    g = torch.Generator().manual_seed(0)
    E, K, N, M = 5, 12, 20, 23
    offs = torch.tensor([0, 7, 7, 16, 16], dtype=torch.int32)
    a = torch.randn(M, K, generator=g, requires_grad=True)
    w = torch.randn(E, K, N, generator=g, requires_grad=True)
    b = torch.randn(E, 1, N, generator=g, requires_grad=True) if with_bias else None
    out = grouped.grouped_linear(a, w, offs, b, grouped.row_experts(offs, M) if with_bias else None)
    live = int(offs[-1])
    want = _loop(a, w, offs, None if b is None else b[:, 0])
    torch.testing.assert_close(out[:live].double(), want[:live], rtol=1e-5, atol=1e-5)
    dout = torch.randn(M, N, generator=g)
    dout[live:] = float("nan")  # rows past offs[-1] must not reach any gradient
    grads = torch.autograd.grad(out, [a, w] + ([b] if with_bias else []), dout)
    ref = [t.detach().double().requires_grad_() for t in [a, w] + ([b] if with_bias else [])]
    want = _loop(ref[0], ref[1], offs, ref[2][:, 0] if with_bias else None)
    want_grads = torch.autograd.grad(want[:live], ref, dout[:live].double())
    torch.testing.assert_close(grads[0][:live].double(), want_grads[0][:live], rtol=1e-5, atol=1e-5)
    for got, exp in zip(grads[1:], want_grads[1:]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-5)
    assert not grads[1][[0, 2, 4]].any(), "empty experts get a zero weight gradient"


@pytest.fixture
def undefined_rows_are_nan(monkeypatch):
    """Make the rows a grouped GEMM leaves undefined NaN, as uninitialised
    memory may be on a GPU: they must never reach an output or a gradient."""
    real = grouped.grouped_mm_fn()

    def poisoned(a, b, offs=None):
        out = real(a, b, offs=offs)
        if a.dim() == 2 and b.dim() == 3:
            out[int(offs[-1]):] = float("nan")
        return out
    monkeypatch.setattr(grouped, "grouped_mm_fn", lambda: poisoned)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("cls,kwargs", [
    (pk.TopKMoE, dict(top_k=2, capacity_factor=1.25, gated=True, bias=True)),
    (pk.TopKMoE, dict(top_k=2, capacity_factor=1.0, gated=False, bias=True, dropout=0.0, gate_input=True)),
    (pk.ExpertChoiceMoE, dict(capacity_factor=1.5, gated=False, bias=True)),
    (pk.ExpertChoiceMoE, dict(capacity_factor=2.0, gated=True, bias=False, shared_hidden=12)),
], ids=["topk-gated-bias", "topk-gate-input", "ec-plain", "ec-gated-shared"])
def test_layer_grouped_equals_padded(cls, kwargs, backend, monkeypatch, undefined_rows_are_nan):
    """The grouped path gives the padded path's output and every gradient
    (input, router, expert weights and biases): odd token count, drops,
    NaN in the rows it leaves undefined."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch.manual_seed(0)
    padded = cls(16, 24, 4, expert_gemm="padded", backend=backend, **kwargs)
    grouped_layer = cls(16, 24, 4, expert_gemm="grouped", backend=backend, **kwargs)
    grouped_layer.load_state_dict(padded.state_dict())
    x = torch.randn(3, 7, 16, requires_grad=True)
    dy = torch.randn(3, 7, 16)
    results = []
    for layer in (padded, grouped_layer):
        y = layer(x)
        results.append([y] + list(torch.autograd.grad(y, [x] + list(layer.parameters()), dy)))
    assert grouped_layer.uses_grouped_gemm(x) and not padded.uses_grouped_gemm(x)
    for want, got in zip(*results):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_empty_experts_and_determinism(undefined_rows_are_nan):
    """Experts no token picks (a router bias of -1e4 on two of them) get
    zero gradients; two backward passes give bitwise equal gradients."""
    torch.manual_seed(0)
    layer = pk.TopKMoE(16, 24, 4, top_k=1, capacity_factor=2.0, router_bias=True, expert_gemm="grouped",
                       backend="reference")
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([0.0, -1e4, 0.0, -1e4]))
    x = torch.randn(9, 16)
    runs = [torch.autograd.grad(layer(x).square().sum(), list(layer.experts.parameters())) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    for g in runs[0]:
        assert not g[[1, 3]].any() and g[[0, 2]].any()


def test_when_the_grouped_path_runs():
    layer = pk.TopKMoE(16, 24, 4)
    x = torch.randn(5, 16)
    assert layer.expert_gemm == "auto" and not layer.uses_grouped_gemm(x), "auto: CUDA only"
    for dims, dtype, match in (((16, 24), torch.float64, "float32"), ((16, 18), torch.float32, "multiples of 4")):
        layer = pk.TopKMoE(*dims, 4, expert_gemm="grouped", dtype=dtype)
        with pytest.raises(ValueError, match=match):
            layer(torch.randn(5, dims[0], dtype=dtype))
    with pytest.raises(ValueError, match="expert_gemm"):
        pk.TopKMoE(16, 24, 4, expert_gemm="fast")


def test_compile_fullgraph_bf16():
    """The grouped layer compiles without graph breaks (bf16: the shape
    function of PyTorch's grouped GEMM takes bf16 only) and gives eager's
    output and gradients to bf16 rounding (normwise). The aot_eager backend:
    dynamo and AOT autograd trace the whole graph, forward and backward, which
    is what a graph break would stop; inductor's C++ build of the same graph
    took 38 s of a 2-core CI run."""
    torch.manual_seed(0)
    layer = pk.TopKMoE(16, 32, 4, top_k=2, bias=True, expert_gemm="grouped", backend="reference",
                       dtype=torch.bfloat16)
    x = torch.randn(2, 9, 16, dtype=torch.bfloat16, requires_grad=True)
    params = [x] + list(layer.parameters())
    runs = []
    for fn in (layer, torch.compile(layer, fullgraph=True, backend="aot_eager")):
        y = fn(x)
        runs.append([y] + list(torch.autograd.grad(y.float().square().sum(), params)))
    for want, got in zip(*runs):
        err = (got.float() - want.float()).norm() / want.float().norm()
        assert err < 2e-2, f"relative error {err:.1e}"
