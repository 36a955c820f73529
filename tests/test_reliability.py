"""Reliability as properties, drawn by hypothesis (bounded, derandomized, small
shapes, interpreter on CPU) for every public op: valid, odd and invalid
inputs. For each draw one of:

* a ``ValueError`` whose message starts with the argument's name, the same
  type and message on the Triton and the reference backend;
* a result equal to the reference on contiguous copies, and bitwise equal to
  the op's own result on contiguous copies whatever the strides of any
  argument (views, transposes, ``[::2]``);
* isolation, bitwise: a row's output and a slot's gradient do not change
  when other slots hold NaN, Inf or 1e38; a token's MoE output does not
  change when slots that do not hold it change.

docs/reliability.md lists the guarantees these tests prove.
"""
import math

import pytest
import torch
from helpers import GPU

import posttrain_kernels as pk
from posttrain_kernels.ops.lora import reference as lora_ref
from posttrain_kernels.ops.moe import reference as moe_ref
from posttrain_kernels.ops.multi_lora import reference as ml_ref

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PROPERTY = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))
POISONS = [float("nan"), float("inf"), float("-inf"), 1e38]
LAYOUTS = ["contiguous", "step", "transposed"]


def _strided(t, how):
    """The same values as ``t`` with other strides: ``step`` every other
    element of a twice-as-wide buffer, ``transposed`` column-major storage."""
    if t is None or how == "contiguous" or t.dim() == 0:
        return t
    if how == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    buf = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    out = buf[..., ::2]
    assert torch.equal(out, t)
    return out


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(t.is_floating_point()) for t in ts]


def _grads(y, leaves, dy):
    wrt = [v for v in leaves if v is not None and v.requires_grad]
    gs = torch.autograd.grad(y, wrt, dy, allow_unused=True)
    return [torch.zeros_like(v) if g is None else g for g, v in zip(gs, wrt)]


def _assert_same(contiguous, strided, names, layouts):
    """Bitwise equal, except dbias: it is ``dy.sum(0)``, a PyTorch reduction
    whose summation order follows dy's strides (last-bit differences)."""
    for name, c, s in zip(names, contiguous, strided):
        if name == "dbias":
            torch.testing.assert_close(c, s, rtol=1e-6, atol=1e-6, msg=lambda m: f"dbias, strides {layouts}: {m}")
        else:
            assert torch.equal(c, s), f"{name}: strides {layouts} change the result"


def _same_error(call, name):
    """``call(backend)`` raises the same ValueError, naming ``name``, on both backends."""
    msgs = []
    for backend in ("triton", "reference"):
        with pytest.raises(ValueError) as info:
            call(backend)
        msgs.append(str(info.value))
    assert msgs[0].startswith(f"{name}:"), f"expected an error naming {name!r}, got {msgs[0]!r}"
    assert msgs[0] == msgs[1], f"backends disagree: {msgs}"


# ---------------------------------------------------------------- lora_linear
@st.composite
def lora_case(draw):
    lead = draw(st.sampled_from([(0,), (1,), (7,), (2, 5)]))
    K, N, r = draw(st.integers(1, 33)), draw(st.integers(1, 33)), draw(st.integers(1, 20))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(*lead, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / math.sqrt(K)).to(dtype)
    a, b = torch.randn(r, K, generator=g) / math.sqrt(K), torch.randn(N, r, generator=g) / math.sqrt(r)
    bias = torch.randn(N, generator=g).to(dtype) if draw(st.booleans()) else None
    dy = torch.randn(*lead, N, generator=g).to(dtype)
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(6)]
    return x, w, a, b, bias, dy, layouts


@PROPERTY
@given(lora_case())
def test_lora_linear_any_strides_equal_contiguous(case):
    x, w, a, b, bias, dy, layouts = case
    contiguous = _run_lora(x, w, a, b, bias, dy)
    strided = _run_lora(*(_strided(t, how) for t, how in zip((x, w, a, b, bias, dy), layouts)))
    _assert_same(contiguous, strided, ("y", "dx", "dA", "dB", "dbias"), layouts)
    want = lora_ref.lora_linear_ref(x.double(), w.double(), a.double(), b.double(), 1.5,
                                    None if bias is None else bias.double())
    tol = 1e-4 if x.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(contiguous[0].double(), want, rtol=tol, atol=tol)


def _run_lora(x, w, a, b, bias, dy):
    leaves = _leaves(x, a, b, bias)
    y = pk.lora_linear(leaves[0], w, leaves[1], leaves[2], 1.5, leaves[3])
    return [y.detach(), *_grads(y, leaves, dy)]


LORA_BAD = [  # (argument named, how the call goes wrong)
    ("x", lambda x, w, a, b, bias: dict(x=x[..., :-1])),
    ("x", lambda x, w, a, b, bias: dict(x=torch.tensor(1.0))),
    ("x", lambda x, w, a, b, bias: dict(x=x.long())),
    ("weight", lambda x, w, a, b, bias: dict(weight=w.double())),
    ("lora_a", lambda x, w, a, b, bias: dict(lora_a=a[:0], lora_b=b[:, :0])),
    ("lora_a", lambda x, w, a, b, bias: dict(lora_a=torch.zeros(300, a.shape[1]), lora_b=torch.zeros(b.shape[0], 300))),
    ("lora_b", lambda x, w, a, b, bias: dict(lora_b=b.t())),
    ("bias", lambda x, w, a, b, bias: dict(bias=torch.zeros(w.shape[0] + 1))),
    ("scale", lambda x, w, a, b, bias: dict(scale=float("nan"))),
    ("dropout_p", lambda x, w, a, b, bias: dict(dropout_p=-0.5)),
    ("dropout_p", lambda x, w, a, b, bias: dict(dropout_p=float("nan"))),
    ("dropout_p", lambda x, w, a, b, bias: dict(dropout_p=1.0)),
]


@pytest.mark.parametrize("name,mutate", LORA_BAD, ids=[f"{i}-{n}" for i, (n, _) in enumerate(LORA_BAD)])
def test_lora_linear_bad_arguments_same_error_on_both_backends(name, mutate):
    g = torch.Generator().manual_seed(0)
    x, w, a, b = torch.randn(5, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(3, 8), torch.randn(6, 3)
    args = dict(x=x, weight=w, lora_a=a, lora_b=b, scale=1.0, bias=torch.zeros(6), dropout_p=0.0)
    args.update(mutate(x, w, a, b, args["bias"]))
    _same_error(lambda backend: pk.lora_linear(**args, backend=backend), name)


# ---------------------------------------------------------------- multi_lora_linear
@st.composite
def multi_lora_case(draw):
    S, R = draw(st.integers(1, 5)), draw(st.sampled_from([1, 4, 16, 24]))
    M, K, N = draw(st.integers(0, 19)), draw(st.integers(1, 33)), draw(st.integers(1, 33))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x, w = torch.randn(M, K, generator=g).to(dtype), (torch.randn(N, K, generator=g) / math.sqrt(K)).to(dtype)
    A, B = torch.randn(S, R, K, generator=g) / math.sqrt(K), torch.randn(S, N, R, generator=g) / 2
    ranks = torch.randint(0, R + 1, (S,), generator=g, dtype=torch.int32)
    scales = torch.rand(S, generator=g)
    ids = torch.randint(-1, S, (M,), generator=g)
    bias = torch.randn(N, generator=g).to(dtype) if draw(st.booleans()) else None
    dy = torch.randn(M, N, generator=g).to(dtype)
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(9)]
    return x, w, A, B, ranks, scales, ids, bias, dy, layouts


def _run_multi(x, w, A, B, ranks, scales, ids, bias, dy, backend=None):
    leaves = _leaves(x, A, B, bias)
    y = pk.multi_lora_linear(leaves[0], w, leaves[1], leaves[2], ranks, scales, ids, leaves[3], backend=backend)
    return [y.detach(), *_grads(y, leaves, dy)]


@PROPERTY
@given(multi_lora_case())
def test_multi_lora_any_strides_equal_contiguous(case):
    *tensors, layouts = case
    contiguous = _run_multi(*tensors)
    strided = _run_multi(*(_strided(t, how) for t, how in zip(tensors, layouts)))
    _assert_same(contiguous, strided, ("y", "dx", "dA", "dB", "dbias"), layouts)
    x, w, A, B, ranks, scales, ids, bias, dy = tensors
    want = ml_ref.multi_lora_linear_ref(x.double(), w.double(), None if bias is None else bias.double(),
                                        A.double(), B.double(), ranks, scales, ids)
    tol = 1e-4 if x.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(contiguous[0].double(), want, rtol=tol, atol=tol)


@PROPERTY
@given(multi_lora_case(), st.sampled_from(POISONS), st.data())
def test_multi_lora_isolation(case, poison, data):
    """Slots no row uses hold NaN / Inf / 1e38: y, dx and the used slots'
    gradients are bitwise unchanged. A used slot's payload stays in its rows."""
    x, w, A, B, ranks, scales, ids, bias, dy, _ = case
    clean = _run_multi(x, w, A, B, ranks, scales, ids, bias, dy)
    S = A.shape[0]
    used = sorted(set(ids.tolist()) - {-1})
    unused = [s for s in range(S) if s not in used]
    if unused:
        bad_A, bad_B = A.clone(), B.clone()
        bad_A[unused], bad_B[unused] = poison, poison
        dirty = _run_multi(x, w, bad_A, bad_B, ranks, scales, ids, bias, dy)
        for name, c, d in zip(("y", "dx"), clean[:2], dirty[:2]):
            assert torch.equal(c, d), f"{name}: changed by slots no row uses"
        for name, c, d in zip(("dA", "dB"), clean[2:4], dirty[2:4]):
            assert torch.equal(c[used], d[used]), f"{name}: a used slot's gradient changed"
    if used:
        victim = data.draw(st.sampled_from(used))
        bad_B = B.clone()
        bad_B[victim] = poison
        dirty = _run_multi(x, w, A, bad_B, ranks, scales, ids, bias, dy)
        others = ids != victim
        assert torch.equal(clean[0][others], dirty[0][others]), "y: a slot's payload reached other rows"


def _multi_args():
    g = torch.Generator().manual_seed(0)
    S, R, K, N, M = 3, 4, 8, 6, 5
    return dict(x=torch.randn(M, K, generator=g), weight=torch.randn(N, K, generator=g),
                lora_a=torch.randn(S, R, K, generator=g), lora_b=torch.randn(S, N, R, generator=g),
                ranks=torch.tensor([4, 0, 2], dtype=torch.int32), scales=torch.ones(S),
                adapter_ids=torch.tensor([0, -1, 2, 2, 0]), bias=None, dropout_p=None)


MULTI_BAD = [
    ("adapter_ids", dict(adapter_ids=torch.tensor([0, -2, 2, 2, 0]))),
    ("adapter_ids", dict(adapter_ids=torch.tensor([0, 3, 2, 2, 0]))),
    ("adapter_ids", dict(adapter_ids=torch.tensor([0, 2**40, 2, 2, 0]))),
    ("adapter_ids", dict(adapter_ids=None)),
    ("adapter_ids", dict(adapter_ids=torch.tensor([0.0, 1, 2, 2, 0]))),
    ("ranks", dict(ranks=torch.tensor([5, 0, 2], dtype=torch.int32))),
    ("ranks", dict(ranks=torch.tensor([-1, 0, 2], dtype=torch.int32))),
    ("ranks", dict(ranks=[4, 0, 2])),
    ("scales", dict(scales=torch.tensor([1.0, float("nan"), 1.0]))),
    ("dropout_p", dict(dropout_p=torch.tensor([0.1, -0.5, 0.0]))),
    ("dropout_p", dict(dropout_p=torch.tensor([0.1, float("nan"), 0.0]))),
    ("dropout_p", dict(dropout_p=torch.tensor([0.1, 1.5, 0.0]))),
    ("x", dict(x=torch.tensor(1.0))),
    ("weight", dict(weight=torch.zeros(6, 0), x=torch.zeros(5, 0))),
    ("bias", dict(bias=torch.zeros(7))),
    ("slices", dict(slices=[3, 4])),
]


@pytest.mark.parametrize("name,update", MULTI_BAD, ids=[f"{i}-{n}" for i, (n, _) in enumerate(MULTI_BAD)])
def test_multi_lora_bad_arguments_same_error_on_both_backends(name, update):
    args = {**_multi_args(), **update}
    _same_error(lambda backend: pk.multi_lora_linear(**args, backend=backend), name)


# ---------------------------------------------------------------- MoE dispatch / combine
@st.composite
def moe_case(draw):
    n, d, E, C = draw(st.integers(0, 17)), draw(st.integers(0, 40)), draw(st.integers(1, 5)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(n, d, generator=g).to(dtype)
    idx = torch.randint(-1, max(n, 1), (E, C), generator=g) if n else torch.full((E, C), -1)
    out = torch.randn(E, C, d, generator=g).to(dtype)
    gates = torch.rand(E, C, generator=g)
    layouts = [draw(st.sampled_from(LAYOUTS)) for _ in range(4)]
    return x, idx, out, gates, layouts


@PROPERTY
@given(moe_case())
def test_moe_any_strides_equal_contiguous_and_reference(case):
    x, idx, out, gates, layouts = case
    n = x.shape[0]

    def run(x, idx, out, gates):
        xl, ol, gl = _leaves(x, out, gates)
        h = pk.moe_dispatch(xl, idx)
        y = pk.moe_combine(ol, idx, gl, n)
        dh, dy = torch.ones_like(h), torch.ones_like(y)
        return [h.detach(), y.detach(), *_grads(h, [xl], dh), *_grads(y, [ol, gl], dy)]

    contiguous = run(x, idx, out, gates)
    strided = run(*(_strided(t, how) for t, how in zip((x, idx, out, gates), layouts)))
    for name, c, s in zip(("dispatch", "combine", "dx", "d expert_out", "d gates"), contiguous, strided):
        assert torch.equal(c, s), f"{name}: strides {layouts} change the result"
    assert torch.equal(contiguous[0], moe_ref.moe_dispatch_ref(x, idx)), "dispatch differs from the reference"
    want = moe_ref.moe_combine_ref(out.double(), idx, gates.double(), n)
    torch.testing.assert_close(contiguous[1].double(), want, rtol=2e-3, atol=2e-3)


@PROPERTY
@given(moe_case(), st.sampled_from(POISONS))
def test_moe_token_isolation(case, poison):
    """Expert outputs of empty slots, and of slots holding other tokens, do
    not change a token's combined output (bitwise)."""
    x, idx, out, gates, _ = case
    n = x.shape[0]
    if n == 0:
        return
    t = int(torch.randint(0, n, (1,), generator=torch.Generator().manual_seed(n)))
    clean = pk.moe_combine(out, idx, gates, n)
    dirty_out = out.clone()
    dirty_out[idx != t] = poison
    dirty = pk.moe_combine(dirty_out, idx, gates, n)
    assert torch.equal(clean[t], dirty[t]), "token's output changed by slots that do not hold it"


MOE_BAD = [
    ("token_idx", lambda x, idx, out, g: (pk.moe_dispatch, (x, idx - 1))),  # -2 present
    ("token_idx", lambda x, idx, out, g: (pk.moe_dispatch, (x, idx.clamp_min(0) + x.shape[0]))),
    ("token_idx", lambda x, idx, out, g: (pk.moe_dispatch, (x, idx.int()))),
    ("token_idx", lambda x, idx, out, g: (pk.moe_combine, (out, torch.full_like(idx, 2**40), g, x.shape[0]))),
    ("x", lambda x, idx, out, g: (pk.moe_dispatch, (x[0], idx))),
    ("gates", lambda x, idx, out, g: (pk.moe_combine, (out, idx, g[:, :1], x.shape[0]))),
    ("num_tokens", lambda x, idx, out, g: (pk.moe_combine, (out, idx, g, -1))),
    ("expert_out", lambda x, idx, out, g: (pk.moe_combine, (out[:, :1], idx, g, x.shape[0]))),
]


@pytest.mark.parametrize("name,make", MOE_BAD, ids=[f"{i}-{n}" for i, (n, _) in enumerate(MOE_BAD)])
def test_moe_bad_arguments_same_error_on_both_backends(name, make):
    g = torch.Generator().manual_seed(0)
    x, idx = torch.randn(6, 8, generator=g), torch.tensor([[0, 5, -1], [2, 2, 1]])
    fn, args = make(x, idx, torch.randn(2, 3, 8, generator=g), torch.rand(2, 3, generator=g))
    _same_error(lambda backend: fn(*args, backend=backend), name)


def test_routing_bad_arguments_and_empty_batches():
    logits = torch.randn(6, 3)
    for call, name in ((lambda: pk.expert_choice_route(logits, 0), "capacity"),
                       (lambda: pk.topk_route(logits, 4, 2), "top_k"),
                       (lambda: pk.topk_route(logits, 2, 2, group_size=4), "group_size"),
                       (lambda: pk.expert_choice_route(logits[0], 2), "router_logits")):
        with pytest.raises(ValueError, match=f"^{name}"):
            call()
    for route in (lambda lg: pk.expert_choice_route(lg, 2), lambda lg: pk.topk_route(lg, 2, 2)):
        gates, idx = route(torch.randn(0, 3))
        assert idx.shape == (3, 2) and bool((idx == -1).all()) and bool((gates == 0).all())
    for layer in (pk.ExpertChoiceMoE(8, 12, 3), pk.TopKMoE(8, 12, 3)):
        assert layer(torch.randn(0, 8)).shape == (0, 8)
        assert layer(torch.randn(2, 0, 8)).shape == (2, 0, 8)
        with pytest.raises(ValueError, match="^x"):
            layer(torch.tensor(1.0))


def test_meta_tensors_give_shapes():
    """Meta tensors (shape inference, no data) go through the fake
    implementations: right shapes, no data-dependent code."""
    x = torch.empty(3, 4, device="meta", requires_grad=True)
    w = torch.empty(5, 4, device="meta")
    y = pk.lora_linear(x, w, torch.empty(2, 4, device="meta"), torch.empty(5, 2, device="meta"), 1.0)
    assert y.shape == (3, 5) and y.device.type == "meta"
    ids = torch.empty(3, dtype=torch.int64, device="meta")
    y = pk.multi_lora_linear(x, w, torch.empty(2, 4, 4, device="meta"), torch.empty(2, 5, 4, device="meta"),
                             torch.empty(2, dtype=torch.int32, device="meta"), torch.empty(2, device="meta"), ids)
    assert y.shape == (3, 5)
    idx = torch.empty(2, 2, dtype=torch.int64, device="meta")
    h = pk.moe_dispatch(x, idx)
    assert h.shape == (2, 2, 4) and pk.moe_combine(h, idx, torch.empty(2, 2, device="meta"), 3).shape == (3, 4)


# ---------------------------------------------------------------- on a GPU, bf16
def _cuda_pool(S=4, R=16, K=256, N=192, M=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    dev, dt = GPU, torch.bfloat16
    return (torch.randn(M, K, generator=g).to(dev, dt), (torch.randn(N, K, generator=g) / 16).to(dev, dt),
            (torch.randn(S, R, K, generator=g) / 16).to(dev, dt), (torch.randn(S, N, R, generator=g) / 4).to(dev, dt),
            torch.full((S,), R, dtype=torch.int32, device=dev), torch.rand(S, generator=g).to(dev),
            torch.randint(-1, S - 1, (M,), generator=g).to(dev))  # slot S-1 unused


@pytest.mark.gpu
@pytest.mark.parametrize("poison", POISONS)
def test_cuda_bf16_isolation(poison):
    x, w, A, B, ranks, scales, ids = _cuda_pool()
    dy = torch.randn(x.shape[0], w.shape[0], device=GPU, dtype=torch.bfloat16)
    clean = _run_multi(x, w, A, B, ranks, scales, ids, None, dy)
    bad_A, bad_B = A.clone(), B.clone()
    bad_A[-1], bad_B[-1] = poison, poison
    dirty = _run_multi(x, w, bad_A, bad_B, ranks, scales, ids, None, dy)
    for name, c, d in zip(("y", "dx"), clean[:2], dirty[:2]):
        assert torch.equal(c, d), f"{name}: changed by a slot no row uses"


@pytest.mark.gpu
def test_cuda_out_of_range_values_raise_before_any_launch():
    x, w, A, B, ranks, scales, ids = _cuda_pool()
    S = A.shape[0]
    for name, kwargs in (("adapter_ids", dict(adapter_ids=torch.full_like(ids, S))),
                         ("adapter_ids", dict(adapter_ids=torch.full_like(ids, -2))),
                         ("ranks", dict(ranks=ranks + 1))):
        args = dict(x=x, weight=w, lora_a=A, lora_b=B, ranks=ranks, scales=scales, adapter_ids=ids, **kwargs)
        with pytest.raises(ValueError, match=f"^{name}"):
            pk.multi_lora_linear(**args)
    xs = torch.randn(10, 64, device=GPU, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="^token_idx"):
        pk.moe_dispatch(xs, torch.full((2, 3), 10, device=GPU))


@pytest.mark.gpu
def test_cuda_graph_capture_skips_checks_and_stays_in_bounds():
    """While a CUDA graph is captured the value checks (a host sync) are
    skipped; replayed with out-of-range ids the kernels read those rows as
    base-only rows and never touch memory outside the pool."""
    x, w, A, B, ranks, scales, ids = _cuda_pool()
    static_ids = ids.clone()
    pk.multi_lora_linear(x, w, A, B, ranks, scales, static_ids)  # warm-up (compiles) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = pk.multi_lora_linear(x, w, A, B, ranks, scales, static_ids)
    static_ids.copy_(torch.where(ids >= 0, ids + 1000, ids))  # every adapter row now out of range
    graph.replay()
    torch.cuda.synchronize()
    base = torch.nn.functional.linear(x, w)
    torch.testing.assert_close(y, base, rtol=2e-2, atol=2e-2)
