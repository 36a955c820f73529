"""moe_dispatch / moe_combine kernels (interpreter on CPU, Triton on CUDA)
against the index reference and flaxformer's one-hot einsum, every gradient,
bitwise determinism, edge cases, argument checks, torch.library registration."""
import pytest
import torch

import posttrain_kernels as pk
from posttrain_kernels.ops.moe import reference as ref

pytestmark = pytest.mark.usefixtures("nan_poison")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # no tl.dot here: bf16 is exact in the interpreter too

# (n tokens, d, E, capacity, router): each case says what it covers.
CASES = [
    pytest.param(37, 70, 4, 12, "ec", id="n37-d70-E4-C12-ec"),  # d not a multiple of the block
    pytest.param(29, 33, 3, 9, "topk", id="n29-d33-E3-C9-topk"),  # dropped assignments, empty slots
    pytest.param(3, 16, 8, 2, "ec", id="n<E"),
    pytest.param(5, 24, 3, 9, "ec", id="capacity>n"),  # padding slots
    pytest.param(1, 40, 4, 1, "ec", id="single-token"),  # one token held by every expert
    pytest.param(16, 48, 4, 16, "ec", id="every-token-every-expert"),
]


def _route(n, E, C, router, device, seed=0):
    logits = torch.randn(n, E, generator=torch.Generator().manual_seed(seed)).to(device)
    if router == "ec":
        return pk.expert_choice_route(logits, C)
    return pk.topk_route(logits, 2, C)


def _x(n, d, dtype, device, seed=1):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n,d,E,C,router", CASES)
def test_dispatch_forward_backward(n, d, E, C, router, dtype, device):
    gates, idx = _route(n, E, C, router, device)
    x = _x(n, d, dtype, device).requires_grad_(True)
    out = pk.moe_dispatch(x, idx)
    assert torch.equal(out, ref.moe_dispatch_ref(x.detach(), idx)), "dispatch must copy rows exactly"
    disp_mask, _ = ref.moe_onehot_masks(idx, gates, n)
    onehot = torch.einsum("nd,nec->ecd", x.detach().double(), disp_mask.double())
    torch.testing.assert_close(out.double(), onehot, rtol=0, atol=0)
    dout = torch.randn(E, C, d, device=device).to(dtype)
    (dx,) = torch.autograd.grad(out, x, dout)
    xr = x.detach().double().requires_grad_(True)
    (dx_ref,) = torch.autograd.grad(ref.moe_dispatch_ref(xr, idx), xr, dout.double())
    torch.testing.assert_close(dx.double(), dx_ref, rtol=2 * torch.finfo(dtype).eps, atol=1e-6,
                               msg=lambda m: f"dx: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("n,d,E,C,router", CASES)
def test_combine_forward_backward(n, d, E, C, router, dtype, device):
    gates, idx = _route(n, E, C, router, device)
    eo = torch.randn(E, C, d, device=device).to(dtype).requires_grad_(True)
    g = gates.clone().requires_grad_(True)
    y = pk.moe_combine(eo, idx, g, n)
    assert y.dtype == dtype and y.shape == (n, d)
    eor, gr = eo.detach().double().requires_grad_(True), gates.double().requires_grad_(True)
    y_ref = ref.moe_combine_ref(eor, idx, gr, n)
    _, comb = ref.moe_onehot_masks(idx, gr, n)
    y_onehot = torch.einsum("ecd,nec->nd", eor, comb)
    torch.testing.assert_close(y_ref, y_onehot, rtol=1e-12, atol=1e-12)
    # fp32 sum, one rounding to the output dtype
    tol = torch.finfo(dtype).eps
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol, msg=lambda m: f"y: {m}")
    dy = torch.randn(n, d, device=device).to(dtype)
    deo, dg = torch.autograd.grad(y, (eo, g), dy)
    deo_ref, dg_ref = torch.autograd.grad(y_ref, (eor, gr), dy.double())
    torch.testing.assert_close(deo.double(), deo_ref, rtol=tol, atol=tol, msg=lambda m: f"d expert_out: {m}")
    torch.testing.assert_close(dg.double(), dg_ref, rtol=1e-4, atol=1e-4 * d, msg=lambda m: f"d gates: {m}")
    assert dg.dtype == gates.dtype


def test_tokens_nobody_picked_get_zero(device):
    n, d = 10, 20
    idx = torch.tensor([[0, 3, -1], [3, 9, -1]], device=device)
    gates = torch.tensor([[0.5, 0.25, 0.0], [0.75, 1.0, 0.0]], device=device)
    eo = torch.randn(2, 3, d, device=device)
    y = pk.moe_combine(eo, idx, gates, n)
    unpicked = [t for t in range(n) if t not in (0, 3, 9)]
    assert (y[unpicked] == 0).all()
    torch.testing.assert_close(y[3], 0.25 * eo[0, 1] + 0.75 * eo[1, 0])


def test_sum_backward_stride0(device):
    gates, idx = _route(21, 4, 12, "ec", device)
    x = _x(21, 36, torch.float32, device).requires_grad_(True)
    pk.moe_dispatch(x, idx).sum().backward()  # expanded stride-0 upstream gradient
    counts = torch.bincount(idx[idx >= 0].reshape(-1).cpu(), minlength=21).float().to(device)
    torch.testing.assert_close(x.grad, counts[:, None].expand(21, 36))
    eo = torch.randn(4, 12, 36, device=device, requires_grad=True)
    pk.moe_combine(eo, idx, gates, 21).sum().backward()
    torch.testing.assert_close(eo.grad, (gates * (idx >= 0))[..., None].expand(4, 12, 36))


def test_bitwise_deterministic(device):
    n, d, E, C = 40, 70, 6, 24  # most tokens held by several experts
    gates, idx = _route(n, E, C, "ec", device)
    x = _x(n, d, torch.float16, device).requires_grad_(True)
    eo = torch.randn(E, C, d, device=device).half().requires_grad_(True)
    dy = torch.randn(n, d, device=device).half()
    runs = []
    for _ in range(3):
        g = gates.clone().requires_grad_(True)
        y = pk.moe_combine(eo, idx, g, n)
        h = pk.moe_dispatch(x, idx)
        runs.append((y, *torch.autograd.grad(y, (eo, g), dy), *torch.autograd.grad(h, x, torch.ones_like(h))))
    for name, i in (("y", 0), ("d expert_out", 1), ("d gates", 2), ("dx", 3)):
        assert all(torch.equal(runs[0][i], r[i]) for r in runs[1:]), f"{name} differs between runs"


def test_empty_batch(device):
    idx = torch.full((3, 2), -1, dtype=torch.int64, device=device)
    x = torch.randn(0, 8, device=device)
    assert (pk.moe_dispatch(x, idx) == 0).all()
    y = pk.moe_combine(torch.randn(3, 2, 8, device=device), idx, torch.zeros(3, 2, device=device), 0)
    assert y.shape == (0, 8)


@pytest.mark.parametrize("call,text", [
    (lambda x, i, g, e: pk.moe_dispatch(x, i.int()), "^token_idx: dtype"),
    (lambda x, i, g, e: pk.moe_dispatch(x[None], i), "^x: "),
    (lambda x, i, g, e: pk.moe_dispatch(x, i[0]), "^token_idx: expected"),
    (lambda x, i, g, e: pk.moe_combine(e[:, :1], i, g, 5), "^expert_out: "),
    (lambda x, i, g, e: pk.moe_combine(e, i, g[:, :1], 5), "^gates: "),
    (lambda x, i, g, e: pk.moe_combine(e, i, g, -1), "^num_tokens: "),
])
def test_bad_arguments(call, text, device):
    gates, idx = _route(5, 3, 2, "ec", device)
    with pytest.raises(ValueError, match=text):
        call(torch.randn(5, 8, device=device), idx, gates, torch.randn(3, 2, 8, device=device))


def test_opcheck(device):
    gates, idx = _route(13, 4, 5, "topk", device)
    x = torch.randn(13, 24, device=device)
    eo = torch.randn(4, 5, 24, device=device)
    torch.library.opcheck(torch.ops.posttrain_kernels.moe_dispatch.default, (x, idx, "auto"))
    torch.library.opcheck(torch.ops.posttrain_kernels.moe_segment_sum.default, (eo, idx, gates, 13, "auto"))
    torch.library.opcheck(torch.ops.posttrain_kernels.moe_segment_sum.default, (eo, idx, None, 13, "auto"))
    torch.library.opcheck(torch.ops.posttrain_kernels.moe_combine_bwd.default,
                          (torch.randn(13, 24, device=device), eo, idx, gates, "auto"))
