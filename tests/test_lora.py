"""Fused LoRA linear: the kernels (interpreter on CPU, Triton on CUDA) against
the fp64 / low-precision references, every gradient, dropout, determinism,
edge cases, argument checks, torch.library registration and torch.compile."""
import math

import pytest
import torch
from helpers import ATOL, assert_close_rule

import posttrain_kernels as pk
from posttrain_kernels.ops.dropout import dropout_keep_ref
from posttrain_kernels.ops.lora import reference as ref

pytestmark = pytest.mark.usefixtures("nan_poison")

# (lead dims, K, N, r): each case says what it covers.
SHAPES = [
    pytest.param((1,), 16, 16, 1, id="M1-K16-N16-r1"),  # single token, rank 1
    pytest.param((7,), 33, 20, 4, id="M7-K33-N20-r4"),  # nothing a multiple of a block
    pytest.param((63,), 97, 80, 8, id="M63-K97-N80-r8"),  # several K steps, ragged tiles
    pytest.param((97,), 64, 129, 24, id="M97-K64-N129-r24"),  # r not a power of two, N just over a block
    pytest.param((2, 3, 11), 40, 33, 16, id="B2x3x11-K40-N33-r16"),  # leading dims
    pytest.param((45,), 50, 37, 64, id="M45-K50-N37-r64"),  # r larger than K's blocks
    pytest.param((130,), 40, 48, 4, id="M130-K40-N48-r4"),  # dB over two row splits: slabs summed in the x pass
]

DTYPES = [
    pytest.param(torch.float32, torch.float32, id="fp32"),
    pytest.param(torch.float16, torch.float16, id="fp16"),
    pytest.param(torch.float16, torch.float32, id="fp16-fp32adapters"),  # PEFT's default
]
if torch.cuda.is_available():  # bf16 tl.dot is wrong in the interpreter: GPU only
    DTYPES += [pytest.param(torch.bfloat16, torch.bfloat16, id="bf16"),
               pytest.param(torch.bfloat16, torch.float32, id="bf16-fp32adapters")]


def make_inputs(lead, K, N, r, dtype, adapter_dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = rnd(*lead, K).to(device, dtype)
    w = (rnd(N, K) / math.sqrt(K)).to(device, dtype)
    a = (rnd(r, K) / math.sqrt(K)).to(device, adapter_dtype)
    b = (rnd(N, r) / math.sqrt(r)).to(device, adapter_dtype)
    bb = rnd(N).to(device, dtype) if bias else None
    return x, w, a, b, bb


def run_with_grads(fn, x, w, a, b, bias, dy, cast=None):
    """Forward + backward through ``fn``; returns (y, dx, da, db, dbias)."""
    leaves = [v.detach().clone() if cast is None else v.detach().to(cast) for v in (x, a, b)]
    bias_leaf = None if bias is None else (bias.detach().clone() if cast is None else bias.detach().to(cast))
    for v in leaves + ([bias_leaf] if bias_leaf is not None else []):
        v.requires_grad_(True)
    wc = w if cast is None else w.to(cast)
    y = fn(leaves[0], wc, leaves[1], leaves[2], bias_leaf)
    y.backward(dy if cast is None else dy.to(cast))
    grads = [v.grad for v in leaves] + [None if bias_leaf is None else bias_leaf.grad]
    return (y.detach(), *grads)


def check_against_refs(x, w, a, b, bias, scale, dy, dropout_p=0.0, seed=None, ours_fn=None):
    dtype = x.dtype
    ours_fn = ours_fn or (lambda x_, w_, a_, b_, bias_: pk.lora_linear(x_, w_, a_, b_, scale, bias_, dropout_p))
    ours = run_with_grads(ours_fn, x, w, a, b, bias, dy)
    # The low-precision baseline: PyTorch in x's dtype (adapters cast to it, as
    # under autocast); the truth: the same formula in fp64.
    ref_fn = lambda cd: (lambda x_, w_, a_, b_, bias_: ref.lora_linear_ref(  # noqa: E731
        x_, w_, a_, b_, scale, bias_, dropout_p, seed, compute_dtype=cd))
    lowp = run_with_grads(ref_fn(dtype), x, w, a, b, bias, dy)
    hi = run_with_grads(ref_fn(torch.float64), x, w, a, b, bias, dy, cast=torch.float64)
    for name, o, lo, h in zip(("y", "dx", "dA", "dB", "dbias"), ours, lowp, hi):
        if h is None:
            assert o is None, f"{name}: expected no gradient"
            continue
        assert o.dtype == (x.dtype if name in ("y", "dx") else {"dA": a, "dB": b, "dbias": bias}[name].dtype), \
            f"{name}: dtype {o.dtype}"
        assert_close_rule(name, o, lo, h, ATOL[dtype])


@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N,r", SHAPES)
def test_forward_backward(lead, K, N, r, dtype, adapter_dtype, device):
    x, w, a, b, bias = make_inputs(lead, K, N, r, dtype, adapter_dtype, device)
    dy = torch.randn(*lead, N, device=device).to(dtype)
    check_against_refs(x, w, a, b, bias, 1.7, dy)


@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES[:2])
def test_no_bias_sum_backward(dtype, adapter_dtype, device):
    # out.sum().backward() hands the backward an expanded stride-0 dY.
    x, w, a, b, _ = make_inputs((5, 13), 48, 40, 8, dtype, adapter_dtype, device, bias=False)
    dy = torch.ones(5, 13, 40, device=device, dtype=dtype)
    fn = lambda x_, w_, a_, b_, bias_: pk.lora_linear(x_, w_, a_, b_, 2.0, bias_)  # noqa: E731
    ours = run_with_grads(lambda *v: fn(*v).sum(), x, w, a, b, None, torch.tensor(1.0, device=device, dtype=dtype))
    check_against_refs(x, w, a, b, None, 2.0, dy)  # explicit ones, contiguous
    hi = run_with_grads(lambda *v: ref.lora_linear_ref(*v[:4], 2.0, v[4], compute_dtype=torch.float64).sum(),
                        x, w, a, b, None, torch.tensor(1.0, dtype=torch.float64), cast=torch.float64)
    lowp = run_with_grads(lambda *v: ref.lora_linear_ref(*v[:4], 2.0, v[4], compute_dtype=dtype).sum(),
                          x, w, a, b, None, torch.tensor(1.0, device=device, dtype=dtype))
    for name, o, lo, h in zip(("dx", "dA", "dB"), ours[1:4], lowp[1:4], hi[1:4]):
        assert_close_rule(f"sum-backward {name}", o, lo, h, ATOL[dtype])


def test_non_contiguous_x(device):
    x, w, a, b, bias = make_inputs((40, 24), 56, 36, 8, torch.float32, torch.float32, device)
    x = x.transpose(0, 1)  # [24, 40, 56] view with non-trivial strides
    assert not x.is_contiguous()
    dy = torch.randn(24, 40, 36, device=device)
    check_against_refs(x, w, a, b, bias, 0.5, dy)
    xs = make_inputs((30, 2 * 56), 56, 36, 8, torch.float32, torch.float32, device)[0][:, ::2]  # stride_k = 2
    y = pk.lora_linear(xs, w, a, b, 0.5, bias)
    torch.testing.assert_close(y, ref.lora_linear_ref(xs, w, a, b, 0.5, bias), rtol=1e-5, atol=1e-5)


def test_x_without_grad(device):
    x, w, a, b, bias = make_inputs((9,), 24, 20, 4, torch.float32, torch.float32, device)
    a.requires_grad_(True)
    b.requires_grad_(True)
    y = pk.lora_linear(x, w, a, b, 1.0, bias)
    y.backward(torch.randn_like(y))
    assert x.grad is None and w.grad is None and bias.grad is None
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_weight_gets_no_gradient(device):
    x, w, a, b, bias = make_inputs((9,), 24, 20, 4, torch.float32, torch.float32, device)
    w.requires_grad_(True)
    a.requires_grad_(True)
    pk.lora_linear(x, w, a, b, 1.0, bias).sum().backward()
    assert w.grad is None, "weight must get no gradient"


def test_empty_batch(device):
    x, w, a, b, bias = make_inputs((0,), 24, 20, 4, torch.float32, torch.float32, device)
    for v in (x, a, b, bias):
        v.requires_grad_(True)
    y = pk.lora_linear(x, w, a, b, 1.0, bias)
    assert y.shape == (0, 20)
    y.sum().backward()
    assert x.grad.shape == (0, 24)
    for name, v in (("dA", a), ("dB", b), ("dbias", bias)):
        assert torch.equal(v.grad, torch.zeros_like(v)), f"{name} must be zero for M = 0"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dropout_matches_reference_mask(dtype, device):
    """The kernels drop exactly the elements the reference hash drops, in the
    forward and (regenerated from the seed) in the backward."""
    p = 0.3
    x, w, a, b, bias = make_inputs((29,), 70, 45, 8, dtype, torch.float32, device)
    seed = torch.tensor([123457], dtype=torch.int32, device=device)
    dy = torch.randn(29, 45, device=device).to(dtype)
    ours_fn = lambda x_, w_, a_, b_, bias_: pk.LoRALinearFunction.apply(  # noqa: E731
        x_, w_, a_, b_, bias_, 1.3, p, seed, "auto")
    check_against_refs(x, w, a, b, bias, 1.3, dy, dropout_p=p, seed=seed, ours_fn=ours_fn)


def test_dropout_mask_statistics(device):
    seed = torch.tensor([7], dtype=torch.int32, device=device)
    keep = dropout_keep_ref(seed, 256, 512, 0.25)
    frac = keep.float().mean().item()
    assert abs(frac - 0.75) < 0.01, f"keep fraction {frac}"
    other = dropout_keep_ref(torch.tensor([8], dtype=torch.int32, device=device), 256, 512, 0.25)
    assert (keep != other).float().mean().item() > 0.3, "different seeds must give different masks"
    # Rows and columns are not correlated: the per-row and per-column rates stay near 0.75.
    assert keep.float().mean(1).sub(0.75).abs().max() < 0.1
    assert keep.float().mean(0).sub(0.75).abs().max() < 0.15


def test_dropout_fresh_seed_each_call(device):
    x, w, a, b, _ = make_inputs((16,), 32, 24, 4, torch.float32, torch.float32, device)
    y1 = pk.lora_linear(x, w, a, b, 1.0, None, 0.5)
    y2 = pk.lora_linear(x, w, a, b, 1.0, None, 0.5)
    assert not torch.equal(y1, y2), "two calls with dropout must draw two masks"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_bitwise_deterministic(dtype, device):
    x, w, a, b, bias = make_inputs((150,), 72, 56, 4, dtype, torch.float32, device)  # two row splits
    dy = torch.randn(150, 56, device=device).to(dtype)
    seed = torch.tensor([99], dtype=torch.int32, device=device)
    runs = []
    for _ in range(3):
        outs = run_with_grads(lambda x_, w_, a_, b_, bias_: pk.LoRALinearFunction.apply(
            x_, w_, a_, b_, bias_, 0.7, 0.1, seed, "auto"), x, w, a, b, bias, dy)
        runs.append(outs)
    for name, i in (("y", 0), ("dx", 1), ("dA", 2), ("dB", 3), ("dbias", 4)):
        assert torch.equal(runs[0][i], runs[1][i]) and torch.equal(runs[0][i], runs[2][i]), \
            f"{name} differs between identical runs"


BAD_ARGS = [
    ("x", lambda x, w, a, b, bias: (x[..., :-1], w, a, b, bias), "last dim"),
    ("weight", lambda x, w, a, b, bias: (x, w.half(), a, b, bias), "dtype"),
    ("weight", lambda x, w, a, b, bias: (x, w[None], a, b, bias), "out_features"),
    ("lora_a", lambda x, w, a, b, bias: (x, w, a[:, :-1], b, bias), "in_features"),
    ("lora_b", lambda x, w, a, b, bias: (x, w, a, b[:, :-1], bias), "r="),
    ("bias", lambda x, w, a, b, bias: (x, w, a, b, bias[:-1]), "out_features"),
    ("x", lambda x, w, a, b, bias: (x.long(), w, a, b, bias), "dtype"),
    ("lora_a", lambda x, w, a, b, bias: (x, w, a.to(torch.int32), b, bias), "dtype"),
]


@pytest.mark.parametrize("name,mutate,text", BAD_ARGS, ids=[f"{n}-{t}" for n, _, t in BAD_ARGS])
def test_bad_arguments_raise_value_error(name, mutate, text, device):
    args = mutate(*make_inputs((5,), 16, 12, 4, torch.float32, torch.float32, device))
    with pytest.raises(ValueError, match=rf"^{name}: .*{text}"):
        pk.lora_linear(args[0], args[1], args[2], args[3], 1.0, args[4])


def test_bad_rank_dropout_backend(device):
    x, w, a, b, bias = make_inputs((5,), 16, 300, 4, torch.float32, torch.float32, device)
    big_a = torch.randn(257, 16, device=device)
    with pytest.raises(ValueError, match="^lora_a: rank"):
        pk.lora_linear(x, w, big_a, torch.randn(300, 257, device=device), 1.0)
    with pytest.raises(ValueError, match="^dropout_p"):
        pk.lora_linear(x, w, a, b, 1.0, dropout_p=1.0)
    with pytest.raises(ValueError, match="backend"):
        pk.lora_linear(x, w, a, b, 1.0, backend="cuBLAS")


def test_reference_backend_override(device, monkeypatch):
    x, w, a, b, bias = make_inputs((9,), 24, 20, 4, torch.float32, torch.float32, device)
    y_ref = pk.lora_linear(x, w, a, b, 1.0, bias, backend="reference")
    monkeypatch.setenv("POSTTRAIN_KERNELS_BACKEND", "reference")
    y_env = pk.lora_linear(x, w, a, b, 1.0, bias)
    assert torch.equal(y_ref, y_env)
    y_tri = pk.lora_linear(x, w, a, b, 1.0, bias, backend="triton")
    torch.testing.assert_close(y_tri, y_ref, rtol=1e-5, atol=1e-5)


def test_interpreter_is_active_without_cuda():
    # The CPU suite is only meaningful if the Triton kernels really run.
    from posttrain_kernels.kernels.lora import _lora_matmul_kernel
    if not torch.cuda.is_available():
        assert type(_lora_matmul_kernel).__name__ == "InterpretedFunction"


@pytest.mark.parametrize("with_dropout", [False, True])
def test_opcheck(with_dropout, device):
    x, w, a, b, bias = make_inputs((11,), 32, 24, 8, torch.float32, torch.float32, device)
    p = 0.2 if with_dropout else 0.0
    seed = torch.tensor([5], dtype=torch.int32, device=device) if with_dropout else None
    torch.library.opcheck(torch.ops.posttrain_kernels.lora_fwd.default,
                          (x, w, a, b, bias, 1.5, p, seed, "auto"))
    y, t = torch.ops.posttrain_kernels.lora_fwd(x, w, a, b, bias, 1.5, p, seed, "auto")
    dy = torch.randn_like(y)
    for needs_dx, needs_dbias in ((True, True), (False, False)):
        torch.library.opcheck(torch.ops.posttrain_kernels.lora_bwd.default,
                              (dy, x, w, a, b, t, 1.5, p, seed, needs_dx, needs_dbias, "auto"))


def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    layer = pk.LoRALinear(40, 24, r=8, lora_alpha=16, lora_dropout=0.1, init_lora_weights=False).to(device)
    model = torch.nn.Sequential(layer, torch.nn.GELU())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 7, 40, device=device, requires_grad=True)
    model.eval()
    y_eager = model(x)
    y_comp = compiled(x)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    model.train()
    compiled(x).sum().backward()  # dropout on: the seed is generated inside the graph
    assert torch.isfinite(layer.lora_A.weight.grad).all() and torch.isfinite(x.grad).all()


# ---------------------------------------------------------------- the sm_90 path, run by the interpreter
TMA_CASES = [
    pytest.param(37, 40, 48, 5, 0.0, True, id="fused-shrink-bias"),  # r ≤ 16: t from the GEMM's own x tiles
    pytest.param(50, 64, 72, 24, 0.0, False, id="separate-shrink"),  # r > 16: the shrink runs first
    pytest.param(33, 48, 40, 8, 0.2, True, id="dropout"),  # shrink with the mask; dx masks per quarter tile
]


@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.float32], ids=["fp16", "fp32adapters"])
@pytest.mark.parametrize("M,K,N,r,p,bias", TMA_CASES)
def test_tma_path_forward_backward(M, K, N, r, p, bias, adapter_dtype, device, monkeypatch):
    """The persistent TMA GEMM (tensor descriptors, which the interpreter
    runs) against the references: forward y and t, backward dx through the
    transposed-weight descriptor."""
    from posttrain_kernels.ops.lora import launch as L
    if device.type == "cpu":
        monkeypatch.setenv(L.GEMM_VAR, "tma")
    L.clear_plans()
    x, w, a, b, bb = make_inputs((M,), K, N, r, torch.float16, adapter_dtype, device, bias=bias)
    dy = torch.randn(M, N, device=device).to(torch.float16)
    seed = torch.tensor([7], dtype=torch.int32, device=device)
    fn = lambda x_, w_, a_, b_, bias_: pk.LoRALinearFunction.apply(  # noqa: E731
        x_, w_, a_, b_, bias_, 1.3, p, seed if p else None, "auto")
    check_against_refs(x, w, a, b, bb, 1.3, dy, p, seed if p else None, ours_fn=fn)
    plans = list(L._PLANS.values())
    assert plans and all(plan.info["tma"] for plan in plans), "the TMA GEMM did not run"
    fwd = [plan for plan in plans if len(plan.launches) == 2]  # (shrink or None, GEMM); the backward has 3
    assert fwd and all((plan.launches[0] is None) == (r <= 16 and p == 0.0) for plan in fwd), \
        "the shrink is fused exactly when r ≤ 16 and no dropout"


def test_tma_path_falls_back_when_operands_do_not_allow(device, monkeypatch):
    """K·2 bytes not a multiple of 16 (K = 33): no descriptor over x's rows,
    so the launcher takes the portable GEMM, whatever the knob says."""
    from posttrain_kernels.ops.lora import launch as L
    monkeypatch.setenv(L.GEMM_VAR, "tma")
    L.clear_plans()
    x, w, a, b, bb = make_inputs((9,), 33, 24, 4, torch.float16, torch.float32, device)
    dy = torch.randn(9, 24, device=device).to(torch.float16)
    check_against_refs(x, w, a, b, bb, 0.5, dy)
    assert L._PLANS and not any(plan.info["tma"] for plan in L._PLANS.values())


def test_tma_backward_bitwise_deterministic(device, monkeypatch):
    from posttrain_kernels.ops.lora import launch as L
    if device.type == "cpu":
        monkeypatch.setenv(L.GEMM_VAR, "tma")
    x, w, a, b, bias = make_inputs((70,), 48, 56, 12, torch.float16, torch.float32, device)
    dy = torch.randn(70, 56, device=device).to(torch.float16)
    seed = torch.tensor([5], dtype=torch.int32, device=device)
    runs = [run_with_grads(lambda x_, w_, a_, b_, bias_: pk.LoRALinearFunction.apply(
        x_, w_, a_, b_, bias_, 0.7, 0.1, seed, "auto"), x, w, a, b, bias, dy) for _ in range(2)]
    for name, u, v in zip(("y", "dx", "dA", "dB", "dbias"), *runs):
        assert torch.equal(u, v), f"{name} differs between identical runs"


def test_plans_are_memoised_and_reset_with_the_cache(device):
    """One plan per call signature: a second call with the same shapes builds
    nothing; another shape builds its own; resetting the tuning cache drops them."""
    from posttrain_kernels.autotune import cache
    from posttrain_kernels.ops.lora import launch as L
    L.clear_plans()
    x, w, a, b, bb = make_inputs((12,), 32, 24, 4, torch.float32, torch.float32, device)
    for _ in range(2):
        pk.lora_linear(x, w, a, b, 1.0, bb)
    assert len(L._PLANS) == 1
    first = next(iter(L._PLANS.values()))
    pk.lora_linear(x, w, a, b, 1.0, bb)
    assert next(iter(L._PLANS.values())) is first and len(L._PLANS) == 1
    pk.lora_linear(x[:5], w, a, b, 1.0, bb)
    assert len(L._PLANS) == 2
    # Same x and the same strides of every operand, another out_features: a plan of its own.
    w2, b2 = w[:16].clone(), b[:16].clone()
    assert w2.stride() == w.stride() and b2.stride() == b.stride()
    torch.testing.assert_close(pk.lora_linear(x, w2, a, b2, 1.0), ref.lora_linear_ref(x, w2, a, b2, 1.0))
    assert len(L._PLANS) == 3
    cache.reset()
    assert not L._PLANS
