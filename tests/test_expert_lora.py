"""LoRA on MoE experts, the op (ops/moe/lora.py, kernels/moe_lora.py) in the
interpreter: outputs and every gradient against an fp64 per-expert autograd
loop, fp32 and fp16, odd shapes, experts with no rows, rows past the last
expert, the fused and the unfused (dropout, rank > 64) paths, both weight
layouts, PEFT's flattened adapter views, rank patterns, isolation of a
corrupt expert, determinism, stride-0 gradients and bad input. bf16 runs on
the GPU (tests/test_moe_gpu.py)."""
import pytest
import torch

from helpers import ATOL, assert_close_rule
from posttrain_kernels.ops.dropout import dropout_threshold, keep_at
from posttrain_kernels.ops.moe.lora import expert_lora_linear, peft_expert_factors

COUNTS = (7, 0, 19, 1, 33)  # an empty expert in the middle, a one-row expert, odd sizes
PAD = 6  # rows past the last expert (empty slots of a packed table)


def _problem(dtype, K=40, N=36, R=8, counts=COUNTS, layout="in_out", bias=True, seed=0, pad=PAD):
    g = torch.Generator().manual_seed(seed)
    E, M = len(counts), sum(counts) + pad
    ends = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(M, K, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(E, K, N, generator=g) / K ** 0.5).to(dtype)
    if layout == "out_in":
        w = w.transpose(1, 2).contiguous()
    a = (torch.randn(E, R, K, generator=g) / K ** 0.5).requires_grad_()
    b = torch.randn(E, N, R, generator=g).requires_grad_()
    bb = torch.randn(E, N, generator=g).to(dtype).requires_grad_() if bias else None
    dy = torch.randn(M, N, generator=g).to(dtype)
    return x, w, ends, a, b, bb, dy


def _oracle(x, w, ends, a, b, bb, scale, layout="in_out", ranks=None, dropout=None, dtype=torch.float64):
    """Per-expert autograd loop in ``dtype``: (y, x, a, b, bias) leaves to read gradients from."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, a, b)]
    xo, ao, bo = leaves
    bo_bias = bb.detach().to(dtype).requires_grad_() if bb is not None else None
    wo = w.detach().to(dtype)
    if layout == "out_in":
        wo = wo.transpose(1, 2)
    rows, lo = [], 0
    for e, end in enumerate(ends.tolist()):
        r = a.shape[1] if ranks is None else ranks[e]
        xe = xo[lo:end]
        xd = xe if dropout is None else dropout(xe, lo, end)
        s = scale[e] if isinstance(scale, (list, tuple)) else scale
        ye = xe @ wo[e] + s * (xd @ ao[e, :r].t()) @ bo[e, :, :r].t()
        rows.append(ye if bo_bias is None else ye + bo_bias[e])
        lo = end
    return torch.cat(rows), xo, ao, bo, bo_bias


def _check(dtype, y, x, a, b, bb, dy, ends, ref_args, **ref_kw):
    """Our outputs and gradients against the fp64 oracle, by the tolerance rule (fp32 oracle as the low precision)."""
    n = int(ends[-1])
    hi = _oracle(*ref_args, **ref_kw)
    lo = _oracle(*ref_args, **ref_kw, dtype=torch.float32)
    for ref in (hi, lo):
        ref[0].backward(dy[:n].to(ref[0].dtype))
    atol = ATOL[dtype] * (4 if dtype == torch.float16 else 1)
    assert_close_rule("y", y[:n].detach(), lo[0].detach(), hi[0].detach(), atol)
    assert_close_rule("dx", x.grad[:n], lo[1].grad[:n], hi[1].grad[:n], atol)
    for name, ours, l, h in (("dA", a.grad, lo[2].grad, hi[2].grad), ("dB", b.grad, lo[3].grad, hi[3].grad)):
        assert_close_rule(name, ours, l, h, atol)
    if bb is not None:
        assert_close_rule("dbias", bb.grad, lo[4].grad, hi[4].grad, atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_fused_path_against_a_loop(dtype, layout):
    x, w, ends, a, b, bb, dy = _problem(dtype, layout=layout)
    y = expert_lora_linear(x, w, ends, a, b, 0.7, bb, weight_layout=layout, backend="triton")
    y.backward(dy)
    _check(dtype, y, x, a, b, bb, dy, ends, (x, w, ends, a, b, bb, 0.7), layout=layout)


@pytest.mark.parametrize("R", [1, 24, 80], ids=["r1", "r24", "r80-unfused"])
def test_ranks_and_the_unfused_path(R):
    x, w, ends, a, b, bb, dy = _problem(torch.float32, K=33, N=70, R=R, bias=False, seed=R)
    y = expert_lora_linear(x, w, ends, a, b, 2.0 / R, None, backend="triton")
    y.backward(dy)
    _check(torch.float32, y, x, a, b, None, dy, ends, (x, w, ends, a, b, None, 2.0 / R))


def test_dropout_matches_the_kernels_mask():
    x, w, ends, a, b, bb, dy = _problem(torch.float32)
    p, seed = 0.3, torch.tensor([1234], dtype=torch.int32)

    def drop(xe, lo, hi):
        rows = torch.arange(lo, hi)[:, None]
        cols = torch.arange(xe.shape[1])[None, :]
        return torch.where(keep_at(seed, rows, cols, dropout_threshold(p)), xe, 0) / (1 - p)

    y = expert_lora_linear(x, w, ends, a, b, 0.5, bb, p, backend="triton", dropout_seed=seed)
    y.backward(dy)
    _check(torch.float32, y, x, a, b, bb, dy, ends, (x, w, ends, a, b, bb, 0.5), dropout=drop)


def test_rank_pattern_and_per_expert_scales():
    """Per-expert ranks (rows of A past an expert's rank ignored, even NaN) and per-expert scales."""
    x, w, ends, a, b, bb, dy = _problem(torch.float32, R=8)
    ranks, scales = [8, 3, 2, 5, 1], [0.5, 1.0, 2.0, 0.25, 4.0]
    with torch.no_grad():
        for e, r in enumerate(ranks):
            a[e, r:] = float("nan")
            b[e, :, r:] = float("nan")
    y = expert_lora_linear(x, w, ends, a, b, torch.tensor(scales), bb, ranks=ranks, backend="triton")
    y.backward(dy)
    for e, r in enumerate(ranks):  # no gradient past an expert's rank
        assert a.grad[e, r:].abs().sum() == 0 and b.grad[e, :, r:].abs().sum() == 0
    with torch.no_grad():
        clean_a, clean_b = a.nan_to_num(0.0), b.nan_to_num(0.0)
    _check(torch.float32, y, x, a, b, bb, dy, ends, (x, w, ends, clean_a, clean_b, bb, scales), ranks=ranks)


def test_experts_without_rows_get_exact_zero_gradients():
    x, w, ends, a, b, bb, dy = _problem(torch.float32, counts=(0, 9, 0, 0, 12, 0))
    expert_lora_linear(x, w, ends, a, b, 1.0, bb, backend="triton").backward(dy)
    for e in (0, 2, 3, 5):
        assert torch.equal(a.grad[e], torch.zeros_like(a.grad[e]))
        assert torch.equal(b.grad[e], torch.zeros_like(b.grad[e]))
        assert torch.equal(bb.grad[e], torch.zeros_like(bb.grad[e]))


def test_no_rows_at_all():
    x, w, ends, a, b, bb, dy = _problem(torch.float32, counts=(0, 0, 0))
    y = expert_lora_linear(x, w, ends, a, b, 1.0, bb, backend="triton")
    y.backward(dy)
    assert a.grad.abs().sum() == 0 and b.grad.abs().sum() == 0


def test_a_corrupt_expert_stays_within_its_rows():
    """NaN in expert 2's adapter (and Inf in its weight): every other expert's rows, and their
    gradients, bitwise equal to a run with a clean expert 2."""
    x, w, ends, a, b, bb, dy = _problem(torch.float32)
    y0 = expert_lora_linear(x, w, ends, a, b, 1.0, bb, backend="triton")
    y0.backward(dy)
    g0 = [t.grad.clone() for t in (x, a, b)]
    bad_a, bad_b, bad_w = a.detach().clone(), b.detach().clone(), w.clone()
    bad_a[2, 0, 0] = float("nan")
    bad_b[2, 5, 1] = float("nan")
    bad_w[2, 3, 4] = float("inf")
    bad_a.requires_grad_()
    bad_b.requires_grad_()
    x.grad = None
    y1 = expert_lora_linear(x, bad_w, ends, bad_a, bad_b, 1.0, bb, backend="triton")
    y1.backward(dy)
    lo, hi = int(ends[1]), int(ends[2])
    keep = torch.ones(y0.shape[0], dtype=torch.bool)
    keep[lo:] = False
    keep[hi:int(ends[-1])] = True
    assert torch.equal(y1[keep], y0[keep]) and torch.isnan(y1[lo:hi]).any()
    assert torch.equal(x.grad[keep], g0[0][keep])
    others = [e for e in range(len(COUNTS)) if e != 2]
    assert torch.equal(bad_a.grad[others], g0[1][others]) and torch.equal(bad_b.grad[others], g0[2][others])


def test_peft_flattened_views_and_strided_operands():
    """PEFT's lora_A [E·r, in] / lora_B [out, r·E] read through views (no copy), a
    non-contiguous x and weight, and the stride-0 gradient of sum()."""
    E, K, N, R = len(COUNTS), 24, 40, 4
    x, w, ends, _, _, bb, _ = _problem(torch.float32, K=K, N=N, R=R)
    flat_a = (torch.randn(E * R, K) / K ** 0.5).requires_grad_()
    flat_b = torch.randn(N, R * E).requires_grad_()
    a, b = peft_expert_factors(flat_a, flat_b, E)
    assert a.data_ptr() == flat_a.data_ptr() and b.data_ptr() == flat_b.data_ptr()
    xt = x.detach().t().contiguous().t().requires_grad_()  # column-major rows
    wt = w.transpose(1, 2).contiguous().transpose(1, 2)  # [E, K, N] with unit K stride
    y = expert_lora_linear(xt, wt, ends, a, b, 0.5, None, backend="triton")
    n = int(ends[-1])
    y.sum().backward()  # the upstream gradient is an expanded stride-0 tensor
    ref = _oracle(x, w, ends, a, b, None, 0.5)
    ref[0].sum().backward()
    torch.testing.assert_close(y[:n].double(), ref[0].detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(xt.grad[:n].double(), ref[1].grad[:n], atol=1e-4, rtol=1e-4)
    # PEFT's layout of the gradients: expert e's rank j of B at column j·E + e
    ga, gb = ref[2].grad, ref[3].grad
    torch.testing.assert_close(flat_a.grad.double(), ga.reshape(E * R, K), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flat_b.grad.double(), gb.permute(1, 2, 0).reshape(N, R * E), atol=1e-4, rtol=1e-4)


def test_deterministic():
    x, w, ends, a, b, bb, dy = _problem(torch.float32)
    runs = []
    for _ in range(2):
        for t in (x, a, b, bb):
            t.grad = None
        y = expert_lora_linear(x, w, ends, a, b, 1.0, bb, backend="triton")
        y.backward(dy)
        runs.append([y.detach()[:int(ends[-1])], x.grad[:int(ends[-1])], a.grad, b.grad, bb.grad])
    for u, v in zip(*runs):
        assert torch.equal(u, v)


def test_reference_backend_agrees():
    x, w, ends, a, b, bb, dy = _problem(torch.float32)
    n = int(ends[-1])
    got = {}
    for be in ("triton", "reference"):
        for t in (x, a, b, bb):
            t.grad = None
        y = expert_lora_linear(x, w, ends, a, b, 0.3, bb, backend=be)
        y.backward(dy)
        got[be] = [y.detach()[:n], x.grad[:n], a.grad, b.grad, bb.grad]
    for u, v in zip(got["triton"], got["reference"]):
        torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("change, name", [
    (lambda k: k.update(lora_a=torch.randn(5, 4, 41)), "lora_a"),
    (lambda k: k.update(lora_b=torch.randn(5, 36, 5)), "lora_b"),
    (lambda k: k.update(lora_a=torch.randn(4, 8, 40)), "lora_a"),
    (lambda k: k.update(ends=torch.tensor([1, 2, 3], dtype=torch.int32)), "ends"),
    (lambda k: k.update(ends=torch.tensor([1, 2, 3, 4, 999], dtype=torch.int32)), "ends"),
    (lambda k: k.update(scale=float("nan")), "scale"),
    (lambda k: k.update(scale=torch.ones(3)), "scale"),
    (lambda k: k.update(ranks=[8, 8, 8, 8, 9]), "ranks"),
    (lambda k: k.update(bias=torch.randn(5, 35)), "bias"),
    (lambda k: k.update(weight=torch.randn(5, 40, 36, dtype=torch.float16)), "weight"),
    (lambda k: k.update(dropout_p=1.0), "dropout_p"),
    (lambda k: k.update(weight_layout="kn"), "weight_layout"),
])
def test_bad_input_names_the_argument(change, name):
    x, w, ends, a, b, bb, _ = _problem(torch.float32)
    kw = dict(x=x, weight=w, ends=ends, lora_a=a, lora_b=b, scale=1.0, bias=bb)
    change(kw)
    with pytest.raises(ValueError, match=f"^{name}:"):
        expert_lora_linear(**kw, backend="triton")


# ---------------------------------------------------------------- mixed batches (multi-tenant serving)
def _mixed_problem(dtype, S=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    E, K, N, R = len(COUNTS), 24, 40, 8
    M = sum(COUNTS) + PAD
    ends = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(E, K, N, generator=g) / K ** 0.5).to(dtype)
    a = torch.randn(S, E, R, K, generator=g) / K ** 0.5
    b = torch.randn(S, E, N, R, generator=g)
    ids = torch.randint(-1, S, (M,), generator=g)
    ranks = torch.randint(0, R + 1, (S, E), generator=g).to(torch.int32)
    bias = torch.randn(E, N, generator=g).to(dtype)
    return x, w, ends, a, b, ids, ranks, bias


def _mixed_oracle(x, w, ends, a, b, ids, ranks, bias, scales):
    """Row by row in fp64."""
    y = torch.zeros(int(ends[-1]), w.shape[2], dtype=torch.float64)
    lo = 0
    for e, end in enumerate(ends.tolist()):
        for j in range(lo, end):
            y[j] = x[j].double() @ w[e].double() + bias[e].double()
            s = int(ids[j])
            if s >= 0:
                r = int(ranks[s, e])
                y[j] += scales[s] * (x[j].double() @ a[s, e, :r].double().t()) @ b[s, e, :, :r].double().t()
        lo = end
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_mixed_batch_against_a_row_loop(dtype):
    from posttrain_kernels.ops.moe.lora import expert_lora_mixed
    x, w, ends, a, b, ids, ranks, bias = _mixed_problem(dtype)
    scales = [0.5, 1.0, 2.0]
    with torch.no_grad():
        y = expert_lora_mixed(x, w, ends, a, b, scales, ids, bias, ranks=ranks, backend="triton")
        y_ref = expert_lora_mixed(x, w, ends, a, b, scales, ids, bias, ranks=ranks, backend="reference")
    n = int(ends[-1])
    want = _mixed_oracle(x, w, ends, a, b, ids, ranks, bias, scales)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y[:n].double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(y_ref[:n].double(), want, rtol=tol, atol=tol)


def test_mixed_batch_isolation():
    """NaN in every other slot's adapters (and past each slot's rank): a row's output bitwise unchanged."""
    from posttrain_kernels.ops.moe.lora import expert_lora_mixed
    x, w, ends, a, b, ids, ranks, bias = _mixed_problem(torch.float32, seed=1)
    ids[:] = torch.where(torch.arange(ids.numel()) % 2 == 0, 1, -1)  # slot 1 and base rows only
    with torch.no_grad():
        y0 = expert_lora_mixed(x, w, ends, a, b, [1.0, 1.0, 1.0], ids, bias, ranks=ranks, backend="triton")
        a2, b2 = a.clone(), b.clone()
        a2[[0, 2]] = float("nan")
        b2[[0, 2]] = float("inf")
        for e in range(a.shape[1]):
            a2[1, e, int(ranks[1, e]):] = float("nan")
        y1 = expert_lora_mixed(x, w, ends, a2, b2, [1.0, 1.0, 1.0], ids, bias, ranks=ranks, backend="triton")
    n = int(ends[-1])
    assert torch.equal(y0[:n], y1[:n])


def test_mixed_batch_refuses_gradients_and_bad_ids():
    from posttrain_kernels.ops.moe.lora import expert_lora_mixed
    x, w, ends, a, b, ids, ranks, bias = _mixed_problem(torch.float32)
    with pytest.raises(ValueError, match="^x:.*inference"):
        expert_lora_mixed(x, w, ends, a.requires_grad_(), b, [1.0] * 3, ids, bias)
    a.requires_grad_(False)
    with torch.no_grad(), pytest.raises(ValueError, match="^adapter_ids:"):
        expert_lora_mixed(x, w, ends, a, b, [1.0] * 3, ids + 5, bias)
    with torch.no_grad(), pytest.raises(ValueError, match="^lora_b:"):
        expert_lora_mixed(x, w, ends, a, b[:2], [1.0] * 3, ids, bias)


# ---------------------------------------------------------------- the sm_90 path (TMA), in the interpreter
@pytest.fixture
def tma_path(monkeypatch):
    """POSTTRAIN_KERNELS_GEMM=tma (the interpreter runs tensor descriptors) and a count of its launches."""
    from posttrain_kernels.ops.moe import lora_launch
    monkeypatch.setenv("POSTTRAIN_KERNELS_GEMM", "tma")
    calls = []
    real = lora_launch._expert_matmul_tma
    monkeypatch.setattr(lora_launch, "_expert_matmul_tma", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("adapters", ["fp16", "fp32-copied"])
def test_tma_path_against_a_loop(tma_path, layout, adapters):
    """x, the expert weight (both orientations: unit N or unit K stride) and A through 3-D
    descriptors, forward and dX (dt fused); A in fp32 is copied to x's dtype for its descriptor."""
    x, w, ends, a, b, bb, dy = _problem(torch.float16, K=48, N=40, layout=layout)
    if adapters == "fp16":
        a, b = (t.detach().half().requires_grad_() for t in (a, b))
    y = expert_lora_linear(x, w, ends, a, b, 0.7, bb, weight_layout=layout, backend="triton")
    y.backward(dy)
    assert len(tma_path) == 2  # forward and dX
    _check(torch.float16, y, x, a, b, bb, dy, ends, (x, w, ends, a, b, bb, 0.7), layout=layout)


def test_tma_path_rank_pattern_ignores_rows_past_each_rank(tma_path):
    x, w, ends, a, b, bb, dy = _problem(torch.float16, K=48, N=40, R=16)
    a, b = (t.detach().half() for t in (a, b))
    ranks = [16, 3, 2, 5, 1]
    for e, r in enumerate(ranks):
        a[e, r:] = float("nan")  # TMA reads these rows: they must count for nothing
        b[e, :, r:] = float("nan")
    a.requires_grad_()
    b.requires_grad_()
    y = expert_lora_linear(x, w, ends, a, b, 0.5, bb, ranks=ranks, backend="triton")
    y.backward(dy)
    assert len(tma_path) == 2
    clean_a, clean_b = a.detach().nan_to_num(0.0), b.detach().nan_to_num(0.0)
    _check(torch.float16, y, x, a, b, bb, dy, ends, (x, w, ends, clean_a, clean_b, bb, 0.5), ranks=ranks)


def test_tma_path_falls_back_on_operands_it_cannot_address(tma_path):
    """K not a multiple of 8 (rows off 16 bytes): the portable kernel, same results."""
    x, w, ends, a, b, bb, dy = _problem(torch.float16, K=41)
    y = expert_lora_linear(x, w, ends, a, b, 0.7, bb, backend="triton")
    y.backward(dy)
    assert tma_path == []
    _check(torch.float16, y, x, a, b, bb, dy, ends, (x, w, ends, a, b, bb, 0.7))


def test_opcheck_and_torch_compile():
    """The three ops pass torch.library.opcheck (every row packed: rows past the last expert are
    undefined by contract); the functional API compiles with fullgraph=True."""
    x, w, ends, a, b, bb, dy = _problem(torch.float32, K=16, N=24, R=4, counts=(3, 0, 5), pad=0)
    xs, as_, bs = (t.detach() for t in (x, a, b))
    ranks, scales = torch.full((3,), 4, dtype=torch.int32), torch.full((3,), 0.5)
    ops = torch.ops.posttrain_kernels
    torch.library.opcheck(ops.expert_lora_fwd.default, (xs, w, ends, as_, bs, ranks, scales, bb.detach(), 0.0, None,
                                                        "auto"))
    y, t = ops.expert_lora_fwd(xs, w, ends, as_, bs, ranks, scales, None, 0.0, None, "auto")
    torch.library.opcheck(ops.expert_lora_bwd.default, (dy, xs, w, ends, as_, bs, ranks, scales, t, 0.0, None, True,
                                                        True, "auto"))
    ids = torch.tensor([0, -1, 1, 0, 1, 1, -1, 0], dtype=torch.int64)
    torch.library.opcheck(ops.expert_lora_mixed.default,
                          (xs, w, ends, as_[None].expand(2, -1, -1, -1).contiguous(),
                           bs[None].expand(2, -1, -1, -1).contiguous(), ranks[None].expand(2, -1).contiguous(),
                           scales[None].expand(2, -1).contiguous(), ids, None, "auto"))
    fn = torch.compile(lambda *args: expert_lora_linear(*args), fullgraph=True, backend="aot_eager")
    got = fn(x, w, ends, a, b, 0.5, bb)
    got.backward(dy)
    want = expert_lora_linear(x.detach(), w, ends, a.detach(), b.detach(), 0.5, bb.detach())
    n = int(ends[-1])
    torch.testing.assert_close(got[:n], want[:n])


def test_tma_path_reads_peft_views(tma_path):
    """PEFT's flattened adapters (B's experts at unit stride: a copy for A's descriptor in the
    backward; A's rows as they are in the forward) on the TMA path, against the loop."""
    E, K, N, R = len(COUNTS), 32, 48, 4
    x, w, ends, _, _, bb, dy = _problem(torch.float16, K=K, N=N, R=R)
    flat_a = (torch.randn(E * R, K) / K ** 0.5).half().requires_grad_()
    flat_b = torch.randn(N, R * E).half().requires_grad_()
    a, b = peft_expert_factors(flat_a, flat_b, E)
    y = expert_lora_linear(x, w, ends, a, b, 0.5, bb, backend="triton")
    y.backward(dy)
    assert len(tma_path) == 2
    n = int(ends[-1])
    ref = _oracle(x, w, ends, a, b, bb, 0.5)
    ref[0].backward(dy[:n].double())
    torch.testing.assert_close(y[:n].double(), ref[0].detach(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(x.grad[:n].double(), ref[1].grad[:n], atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(flat_a.grad.double(), ref[2].grad.reshape(E * R, K), atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(flat_b.grad.double(), ref[3].grad.permute(1, 2, 0).reshape(N, R * E), atol=5e-2,
                               rtol=2e-2)
