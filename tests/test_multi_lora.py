"""Batched multi-adapter LoRA kernels against a per-row reference loop, over
odd shapes: mixed ranks 1 to 64, -1 rows, every row on one adapter, every row
on a different one, a single token; argument checks and the torch.library op."""
import pytest
import torch

import posttrain_kernels as pk
from posttrain_kernels.ops.multi_lora import reference as ref

from helpers import assert_close_rule

pytestmark = pytest.mark.usefixtures("nan_poison")

RANKS = [1, 64, 0, 17, 8, 33, 16]  # slot 2 empty


def _pool(S, N, K, R, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ranks = torch.tensor(RANKS[:S], dtype=torch.int32)
    A = torch.randn(S, R, K, generator=g) / K ** 0.5
    B = torch.randn(S, N, R, generator=g) / 4
    for s, r in enumerate(ranks.tolist()):  # padding beyond each rank is garbage the kernel must not read
        A[s, r:] = float("nan")
        B[s, :, r:] = float("nan")
    return A.to(device, dtype), B.to(device, dtype), ranks.to(device), torch.rand(S, generator=g).to(device)


def _ids(kind, M, S, device):
    g = torch.Generator().manual_seed(3)
    if kind == "mixed":
        ids = torch.randint(-1, S, (M,), generator=g)
        ids[ids == 2] = 1  # slot 2 is empty: point its rows elsewhere
    elif kind == "one-adapter":
        ids = torch.full((M,), 3)
    elif kind == "all-different":
        ids = torch.tensor([s for s in range(S) if s != 2][:M])
    elif kind == "none":
        ids = torch.full((M,), -1)
    return ids.to(device)


CASES = [
    pytest.param(37, 40, 33, "mixed", id="M37-K40-N33-mixed"),
    pytest.param(70, 97, 80, "mixed", id="M70-K97-N80-mixed"),  # several tiles and K steps
    pytest.param(29, 48, 24, "one-adapter", id="every-row-one-adapter"),
    pytest.param(6, 40, 33, "all-different", id="every-row-different"),
    pytest.param(1, 40, 33, "mixed", id="single-token"),
    pytest.param(9, 40, 33, "none", id="no-adapter-rows"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M,K,N,kind", CASES)
def test_against_per_row_loop(M, K, N, kind, dtype, device):
    S, R = 7, 64
    A, B, ranks, scales = _pool(S, N, K, R, dtype, device)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    w = (torch.randn(N, K, generator=torch.Generator().manual_seed(2)) / K ** 0.5).to(device, dtype)
    bias = torch.randn(N, device=device).to(dtype)
    ids = _ids(kind, M, S, device)
    y = pk.multi_lora_linear(x, w, A, B, ranks, scales, ids, bias)
    want = ref.multi_lora_linear_ref(x.double(), w.double(), bias.double(), A.double(), B.double(), ranks, scales, ids)
    lowp = ref.multi_lora_linear_ref(x, w, bias, A, B, ranks, scales, ids)
    err = (y.double() - want).abs().max().item()
    bound = 2 * (lowp.double() - want).abs().max().item() + (1e-5 if dtype == torch.float32 else 2e-3) * max(
        1.0, want.abs().max().item())
    assert torch.isfinite(y).all(), "y: non-finite values"
    assert err <= bound, f"y: max error {err:.3e} > {bound:.3e}"


def test_leading_dims_and_per_row_ids(device):
    S, R, K, N = 7, 64, 32, 24
    A, B, ranks, scales = _pool(S, N, K, R, torch.float32, device)
    x = torch.randn(3, 5, K, device=device)
    w = torch.randn(N, K, device=device)
    ids = torch.tensor([[0, 0, 0, 0, 0], [-1, -1, -1, -1, -1], [5, 5, 5, 5, 5]], device=device)
    y = pk.multi_lora_linear(x, w, A, B, ranks, scales, ids)
    for b in range(3):
        want = ref.multi_lora_linear_ref(x[b], w, None, A, B, ranks, scales, ids[b])
        torch.testing.assert_close(y[b], want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mutate,text", [
    (lambda a: dict(a, ranks=a["ranks"].long()), "^ranks"),
    (lambda a: dict(a, adapter_ids=a["adapter_ids"][:-1]), "^adapter_ids"),
    (lambda a: dict(a, lora_b=a["lora_b"][:, :-1]), "^lora_b"),
    (lambda a: dict(a, x=a["x"][:, :-1]), "^x"),
])
def test_bad_arguments(mutate, text, device):
    A, B, ranks, scales = _pool(7, 24, 32, 64, torch.float32, device)
    args = dict(x=torch.randn(4, 32, device=device), weight=torch.randn(24, 32, device=device), lora_a=A,
                lora_b=B, ranks=ranks, scales=scales, adapter_ids=torch.zeros(4, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match=text):
        pk.multi_lora_linear(**mutate(args))


def test_opcheck(device):
    # Small on purpose (opcheck runs the op a dozen times per call, under the
    # interpreter here): 4 slots of rank <= 16, one empty, and -1 rows.
    S, R, K, N = 4, 16, 16, 24
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(S, R, K, generator=g).to(device), torch.randn(S, N, R, generator=g).to(device)
    ranks = torch.tensor([1, 16, 0, 5], dtype=torch.int32, device=device)
    scales = torch.rand(S, generator=g).to(device)
    x, w = torch.randn(9, K, generator=g).to(device), torch.randn(N, K, generator=g).to(device)
    ids = torch.tensor([0, 1, -1, 3, 3, 1, 0, -1, 3], device=device)
    fwd, bwd = torch.ops.posttrain_kernels.multi_lora_fwd.default, torch.ops.posttrain_kernels.multi_lora_bwd.default
    sl_a = torch.randn(S, 3 * R, K, generator=g).to(device)
    sl_rs = ranks.repeat(3, 1)
    p, seeds = torch.rand(S, generator=g).to(device) * 0.5, torch.tensor([5, 6, 7], device=device, dtype=torch.int32)
    flags_all = ((True, True, True), (False, True, False), (True, False, False))
    # one slice without dropout: every needs-flag combination; fused slices with dropout: all gradients
    for a, rs, sc, slices, drop, sd, flags in ((A, ranks, scales, None, None, None, flags_all),
                                               (sl_a, sl_rs, scales.repeat(3, 1), [8, 8, 8], p, seeds, flags_all[:1])):
        torch.library.opcheck(fwd, (x, w, None, a, B, rs, sc, ids, slices, drop, sd, "auto"))
        _, t, perm, sid = fwd(x, w, None, a, B, rs, sc, ids, slices, drop, sd, "auto")
        dy = torch.randn(9, 24, device=device)
        for needs_dx, needs_dlora, needs_dbias in flags:
            torch.library.opcheck(bwd, (dy, x, w, a, B, rs, sc, t, perm, sid, slices, needs_dx, needs_dlora,
                                        needs_dbias, drop, sd, "auto"))


def _sliced_case(widths, device, seed, S=5, R=32, K=48, M=23):
    """A fused projection of output ``widths`` over S slots, one adapter per
    slice with random ranks up to R (slot 2 has none for slice 1)."""
    N = sum(widths)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device)
    w = torch.randn(N, K, generator=g).to(device)
    bias = torch.randn(N, generator=g).to(device)
    A = torch.randn(S, len(widths) * R, K, generator=g).to(device)
    B = torch.randn(S, N, R, generator=g).to(device)
    ranks = torch.randint(1, R + 1, (len(widths), S), generator=g).to(device, torch.int32)
    ranks[1, 2] = 0
    scales = torch.rand(len(widths), S, generator=g).to(device)
    ids = torch.randint(-1, S, (M,), generator=g).to(device)
    return x, w, bias, A, B, ranks, scales, ids


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _grads(out, leaves, dy):
    gs = torch.autograd.grad(out, leaves, dy, allow_unused=True)
    return [torch.zeros_like(l) if g is None else g for g, l in zip(gs, leaves)]


def _ref_grads(x, w, bias, A, B, ranks, scales, ids, dy, dtype, slices=None):
    """Gradients of the per-row reference loop by autograd, every operand in ``dtype``."""
    leaves = _leaves(x.to(dtype), A.to(dtype), B.to(dtype), bias.to(dtype))
    y = ref.multi_lora_linear_ref(leaves[0], w.to(dtype), leaves[3], leaves[1], leaves[2], ranks, scales, ids,
                                  slices)
    return _grads(y, leaves, dy.to(dtype))


def _mixed_case(M, K, N, kind, dtype, device):
    """(x, w, bias, dy, A, B, ranks, scales, ids) of a 7-slot pool with ranks 1 to 64 (NaN rank padding)."""
    S, R = 7, 64
    A, B, ranks, scales = _pool(S, N, K, R, dtype, device)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, dtype)
    bias = torch.randn(N, generator=g).to(device, dtype)
    dy = torch.randn(M, N, generator=g).to(device, dtype)
    return x, w, bias, dy, A, B, ranks, scales, _ids(kind, M, S, device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("M,K,N,kind", CASES)
def test_gradients_against_per_row_loop(M, K, N, kind, dtype, device):
    """dx, dA, dB, dbias of a batch mixing adapters (ranks 1 to 64, -1 rows)
    against autograd through the per-row loop in fp64. Rank padding holds NaN
    in the pool; its gradient, and that of slots no row uses, must be 0."""
    x, w, bias, dy, A, B, ranks, scales, ids = _mixed_case(M, K, N, kind, dtype, device)
    leaves = _leaves(x, A, B, bias)
    y = pk.multi_lora_linear(leaves[0], w, leaves[1], leaves[2], ranks, scales, ids, leaves[3])
    ours = _grads(y, leaves, dy)
    want = _ref_grads(x, w, bias, A, B, ranks, scales, ids, dy, torch.float64)
    lowp = _ref_grads(x, w, bias, A, B, ranks, scales, ids, dy, dtype)
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    for name, o, hi, lo in zip(("dx", "dA", "dB", "dbias"), ours, want, lowp):
        assert o.dtype == dtype, f"{name}: dtype {o.dtype}"
        assert_close_rule(name, o, lo, hi, atol)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("widths", [[40, 16, 16], [33, 7, 9]], ids=["gqa-q40-kv16", "odd-widths"])
def test_gradients_fused_slices(widths, backend, device):
    """Gradients of a fused q/k/v projection (one adapter per slice, GQA
    widths), Triton and the reference backward, against autograd in fp64;
    x needs no gradient here (the dx GEMM is skipped)."""
    x, w, bias, A, B, ranks, scales, ids = _sliced_case(widths, device, seed=8)
    M, N = x.shape[0], w.shape[0]
    g = torch.Generator().manual_seed(9)
    dy = torch.randn(M, N, generator=g).to(device)
    a, b = _leaves(A, B)
    y = pk.multi_lora_linear(x, w, a, b, ranks, scales, ids, bias, slices=widths, backend=backend)
    ours = _grads(y, [a, b], dy)
    want = _ref_grads(x, w, bias, A, B, ranks, scales, ids, dy, torch.float64, widths)[1:3]
    lowp = _ref_grads(x, w, bias, A, B, ranks, scales, ids, dy, torch.float32, widths)[1:3]
    for name, o, hi, lo in zip(("dA", "dB"), ours, want, lowp):
        assert_close_rule(name, o, lo, hi, 1e-5)


@pytest.mark.parametrize("widths", [None, [33, 7, 9]], ids=["one-slice", "fused-slices"])
def test_dropout_forward_and_gradients(widths, device):
    """Per-slot LoRA dropout (rates 0 to 0.9, one slot at p=1), each slice its
    own mask: y and every gradient against autograd through the reference
    with the same seeds (the kernels and the reference drop the same
    elements); the rates matter (y differs from the dropout-free forward)."""
    S, R, K, M = 5, 32, 48, 29
    N = 49 if widths is None else sum(widths)
    n_sl = 1 if widths is None else len(widths)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(M, K, generator=g).to(device)
    w = torch.randn(N, K, generator=g).to(device)
    A = torch.randn(S, n_sl * R, K, generator=g).to(device)
    B = torch.randn(S, N, R, generator=g).to(device)
    ranks = torch.randint(1, R + 1, (n_sl, S) if widths else (S,), generator=g).to(device, torch.int32)
    scales = torch.rand(ranks.shape, generator=g).to(device)
    ids = torch.randint(-1, S, (M,), generator=g).to(device)
    p = torch.tensor([0.0, 0.3, 0.9, 1.0, 0.5], device=device)
    dy = torch.randn(M, N, generator=g).to(device)
    leaves = _leaves(x, A, B)
    torch.manual_seed(3)
    y = pk.multi_lora_linear(leaves[0], w, leaves[1], leaves[2], ranks, scales, ids, None, widths, p)
    torch.manual_seed(3)  # the same seeds again, for the reference
    seeds = torch.randint(0, 2**31 - 1, (n_sl,), device=device, dtype=torch.int32)
    ours = _grads(y, leaves, dy)
    refs = {}
    for dt in (torch.float64, torch.float32):  # the truth, and PyTorch in the inputs' precision
        ref_leaves = _leaves(x.to(dt), A.to(dt), B.to(dt))
        ref_y = ref.multi_lora_linear_ref(ref_leaves[0], w.to(dt), None, ref_leaves[1], ref_leaves[2], ranks, scales,
                                          ids, widths, p, seeds)
        refs[dt] = [ref_y.detach(), *_grads(ref_y, ref_leaves, dy.to(dt))]
    for name, o, hi, lo in zip(("y", "dx", "dA", "dB"), [y.detach(), *ours], refs[torch.float64], refs[torch.float32]):
        assert_close_rule(name, o, lo, hi, 1e-5)
    plain = ref.multi_lora_linear_ref(x, w, None, A, B, ranks, scales, ids, widths)
    assert (y.detach() - plain).abs().max() > 1e-2, "dropout changed nothing"


def test_gradient_of_sum_and_compile(device):
    """``y.sum().backward()`` (a stride-0 dY), and torch.compile(fullgraph)
    of the forward and backward: both match eager autograd of the reference."""
    S, R, K, N, M = 4, 64, 24, 20, 13
    A, B, ranks, scales = _pool(S, N, K, R, torch.float32, device)
    A, B = A.nan_to_num(), B.nan_to_num()
    ids = torch.tensor([0, 1, -1, 3, 3, 1, 0, 0, 1, -1, 3, 1, 0], device=device)
    x = torch.randn(M, K, device=device)
    w = torch.randn(N, K, device=device)

    def loss(x, a, b):
        return pk.multi_lora_linear(x, w, a, b, ranks, scales, ids).sum()

    leaves = _leaves(x, A, B)
    y = ref.multi_lora_linear_ref(leaves[0], w, None, leaves[1], leaves[2], ranks, scales, ids)
    want = _grads(y.sum(), leaves, None)
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        leaves = _leaves(x, A, B)
        fn(*leaves).backward()
        for name, l, hi in zip(("dx", "dA", "dB"), leaves, want):
            torch.testing.assert_close(l.grad, hi, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_input_gradient_through_frozen_adapters(device):
    """Served (frozen) adapters in a model whose earlier layers train: only
    dx is computed, and it equals autograd through the reference."""
    x, w, bias, A, B, ranks, scales, ids = _sliced_case([40, 16, 16], device, seed=10)
    xx = x.clone().requires_grad_(True)
    y = pk.multi_lora_linear(xx, w, A, B, ranks, scales, ids, bias, slices=[40, 16, 16])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(11)).to(device)
    (dx,) = torch.autograd.grad(y, xx, dy)
    want = _ref_grads(x, w, bias, A, B, ranks, scales, ids, dy, torch.float64, [40, 16, 16])[0]
    lowp = _ref_grads(x, w, bias, A, B, ranks, scales, ids, dy, torch.float32, [40, 16, 16])[0]
    assert_close_rule("dx", dx, lowp, want, 1e-5)


@pytest.mark.parametrize("widths", [[40, 16, 16], [33, 7, 9]], ids=["gqa-q40-kv16", "odd-widths"])
def test_fused_slices_equal_separate_projections(widths, device):
    """Fused q/k/v (GQA: k and v narrower than q): one launch over the slices
    equals one single-slice call per projection, each with its own adapter."""
    x, w, bias, A, B, ranks, scales, ids = _sliced_case(widths, device, seed=7)
    R, N = B.shape[2], w.shape[0]
    y = pk.multi_lora_linear(x, w, A, B, ranks, scales, ids, bias, slices=widths)
    lo = 0
    for i, width in enumerate(widths):
        part = pk.multi_lora_linear(x, w[lo:lo + width], A[:, i * R:(i + 1) * R], B[:, lo:lo + width].contiguous(),
                                    ranks[i].contiguous(), scales[i].contiguous(), ids, bias[lo:lo + width])
        torch.testing.assert_close(y[:, lo:lo + width], part, rtol=1e-5, atol=1e-4, msg=lambda m: f"slice {i}: {m}")
        lo += width
    want = ref.multi_lora_linear_ref(x, w, bias, A, B, ranks, scales, ids, widths)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="^slices"):
        pk.multi_lora_linear(x, w, A, B, ranks, scales, ids, slices=[N, 1])  # widths must sum to N


def test_fused_qkv_layer_equals_three_layers(device):
    """MultiLoRALinear with slices: a fused q/k/v projection serves each
    slice's own adapter, as three separate layers would."""
    torch.manual_seed(0)
    widths, K = [32, 16, 16], 24
    q, k, v = (torch.nn.Linear(K, w, device=device) for w in widths)
    fused_lin = torch.nn.Linear(K, sum(widths), device=device)
    with torch.no_grad():
        fused_lin.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        fused_lin.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
    fused = pk.MultiLoRALinear.from_linear(fused_lin, max_adapters=3, max_rank=8, slices=widths)
    parts = [pk.MultiLoRALinear.from_linear(m, max_adapters=3, max_rank=8) for m in (q, k, v)]
    for slot in range(3):
        for i, (part, w) in enumerate(zip(parts, widths)):
            r = 1 + (slot + i) % 8
            a, b = torch.randn(r, K, device=device), torch.randn(w, r, device=device)
            part.set_slot(slot, a, b, 0.5 + slot)
            fused.set_slot(slot, a, b, 0.5 + slot, slice_index=i)
    x = torch.randn(2, 5, K, device=device)
    ids = torch.tensor([2, -1], device=device)
    for layer in [fused] + parts:
        layer.adapter_ids = ids
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1), rtol=1e-5, atol=1e-4)
    fused.clear_slot(2)
    assert (fused.ranks[:, 2] == 0).all()


def test_layer_trains_adapters_like_separate_lora_layers(device):
    """MultiLoRALinear with trainable slots: one mixed batch gives each slot
    the gradients its own LoRALinear would get from its rows alone."""
    torch.manual_seed(0)
    K, N = 24, 20
    base = torch.nn.Linear(K, N, device=device)
    layer = pk.MultiLoRALinear.from_linear(base, max_adapters=3, max_rank=8)
    singles = []
    for slot, r in enumerate([3, 8]):
        single = pk.LoRALinear.from_linear(torch.nn.Linear(K, N, device=device), r=r, lora_alpha=2 * r)
        with torch.no_grad():
            single.weight.copy_(base.weight)
            single.bias.copy_(base.bias)
            single.lora_B.weight.normal_()
        layer.set_slot(slot, single.lora_A.weight, single.lora_B.weight, single.scaling)
        singles.append(single)
    layer.lora_A.requires_grad_(True)
    layer.lora_B.requires_grad_(True)
    x = torch.randn(5, 7, K, device=device)
    dy = torch.randn(5, 7, N, device=device)
    ids = torch.tensor([0, 1, -1, 1, 0], device=device)
    layer.adapter_ids = ids
    layer(x).backward(dy)
    for slot, single in enumerate(singles):
        rows = ids == slot
        single(x[rows]).backward(dy[rows])
        r = single.r
        torch.testing.assert_close(layer.lora_A.grad[slot, :r], single.lora_A.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.lora_B.grad[slot, :, :r], single.lora_B.weight.grad, rtol=1e-5, atol=1e-5)
        assert not layer.lora_A.grad[slot, r:].any() and not layer.lora_B.grad[slot, :, r:].any()
    assert not layer.lora_A.grad[2].any(), "an unused slot gets a zero gradient"


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e38], ids=["nan", "inf", "1e38"])
@pytest.mark.parametrize("widths", [None, [12, 5, 7]], ids=["one-slice", "fused-slices"])
def test_other_slots_cannot_touch_a_row(poison, widths, device):
    """Tenant isolation: fill every slot but the ones a row uses with NaN,
    Inf or 1e38 (A and B, every slice); the row's output, its dx and the
    used slots' gradients stay bitwise the same (forward and backward)."""
    S, R, K, M = 5, 16, 24, 13
    N = 24 if widths is None else sum(widths)
    n_sl = 1 if widths is None else len(widths)
    g = torch.Generator().manual_seed(21)
    A = torch.randn(S, n_sl * R, K, generator=g).to(device)
    B = torch.randn(S, N, R, generator=g).to(device)
    ranks = torch.randint(1, R + 1, (n_sl, S) if widths else (S,), generator=g).to(device, torch.int32)
    scales = torch.rand(ranks.shape, generator=g).to(device)
    x, w = torch.randn(M, K, generator=g).to(device), torch.randn(N, K, generator=g).to(device)
    ids = torch.tensor([0, 1, -1, 3, 3, 1, 0, 0, 1, -1, 3, 1, 0], device=device)
    dy = torch.randn(M, N, generator=g).to(device)

    def run(A, B):
        leaves = _leaves(x, A, B)
        y = pk.multi_lora_linear(leaves[0], w, leaves[1], leaves[2], ranks, scales, ids, slices=widths)
        return [y.detach(), *_grads(y, leaves, dy)]

    clean = run(A, B)
    bad_A, bad_B = A.clone(), B.clone()
    for slot in (2, 4):  # no row uses them
        bad_A[slot], bad_B[slot] = poison, poison
    dirty = run(bad_A, bad_B)
    for name, c, d in (("y", clean[0], dirty[0]), ("dx", clean[1], dirty[1])):
        assert torch.equal(c, d), f"{name}: rows changed by the contents of slots no row uses"
    for name, c, d in (("dA", clean[2], dirty[2]), ("dB", clean[3], dirty[3])):
        assert torch.equal(c[[0, 1, 3]], d[[0, 1, 3]]), f"{name}: a used slot's gradient changed"
    # A poisoned slot that rows do use reaches its own rows only.
    bad_B = B.clone()
    bad_B[3] = poison
    dirty = run(A, bad_B)
    others = ids != 3
    assert torch.equal(clean[0][others], dirty[0][others]), "y: slot 3's payload reached other rows"


# ---------------------------------------------------------------- the sm_90 GEMM, run by the interpreter
@pytest.fixture
def tma_gemm(device, monkeypatch):
    """Route the multi-adapter GEMM to the sm_90 kernel (the interpreter runs
    its tensor descriptors) and count its launches."""
    from posttrain_kernels.ops import backend
    from posttrain_kernels.ops.multi_lora import launch as L
    if device.type == "cpu":
        monkeypatch.setenv(backend.GEMM_VAR, "tma")
    calls = []
    spec = L.MULTI_LORA_MATMUL_TMA

    class Counting:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            calls.append(grid)
            return self.fn[grid]

    import dataclasses
    monkeypatch.setattr(L, "MULTI_LORA_MATMUL_TMA", dataclasses.replace(spec, fn=Counting(spec.fn)))
    return calls


@pytest.mark.parametrize("M,K,N,kind", [CASES[0], pytest.param(70, 96, 80, "mixed", id="M70-K96-N80-mixed")])
def test_tma_gemm_gradients_against_per_row_loop(M, K, N, kind, device, tma_gemm):
    """The persistent TMA GEMM (forward y, backward dx through the
    transposed-weight descriptor) against autograd through the per-row loop,
    fp16, mixed ranks with NaN rank padding."""
    dtype = torch.float16
    x, w, bias, dy, A, B, ranks, scales, ids = _mixed_case(M, K, N, kind, dtype, device)
    leaves = _leaves(x, A, B, bias)
    y = pk.multi_lora_linear(leaves[0], w, leaves[1], leaves[2], ranks, scales, ids, leaves[3])
    ours = [y.detach(), *_grads(y, leaves, dy)]
    assert len(tma_gemm) == 2, "forward y and backward dx both take the TMA GEMM"
    want_y = ref.multi_lora_linear_ref(x.double(), w.double(), bias.double(), A.double(), B.double(), ranks, scales,
                                       ids)
    lowp_y = ref.multi_lora_linear_ref(x, w, bias, A, B, ranks, scales, ids)
    want = [want_y, *_ref_grads(x, w, bias, A, B, ranks, scales, ids, dy, torch.float64)]
    lowp = [lowp_y, *_ref_grads(x, w, bias, A, B, ranks, scales, ids, dy, dtype)]
    for name, o, hi, lo in zip(("y", "dx", "dA", "dB", "dbias"), ours, want, lowp):
        assert_close_rule(name, o, lo, hi, 2e-3)


def test_tma_gemm_keeps_tenants_apart(device, tma_gemm):
    """Tenant isolation in the TMA GEMM's quartered expand: a NaN in a slot no
    row uses, or in another row's slot, leaves every other row bitwise the same."""
    S, R, K, M, widths = 5, 16, 24, 13, [12, 8, 12]
    N = sum(widths)
    g = torch.Generator().manual_seed(21)
    A = torch.randn(S, 3 * R, K, generator=g).to(device, torch.float16)
    B = torch.randn(S, N, R, generator=g).to(device, torch.float16)
    ranks = torch.randint(1, R + 1, (3, S), generator=g).to(device, torch.int32)
    scales = torch.rand(ranks.shape, generator=g).to(device)
    x = torch.randn(M, K, generator=g).to(device, torch.float16)
    w = torch.randn(N, K, generator=g).to(device, torch.float16)
    ids = torch.tensor([0, 1, -1, 3, 3, 1, 0, 0, 1, -1, 3, 1, 0], device=device)
    run = lambda B_: pk.multi_lora_linear(x, w, A, B_, ranks, scales, ids, slices=widths)  # noqa: E731
    clean = run(B)
    bad = B.clone()
    bad[2], bad[3] = float("nan"), float("nan")
    dirty = run(bad)
    others = ids != 3
    assert torch.equal(clean[others], dirty[others]), "a slot's NaN reached other rows"
    assert torch.isnan(dirty[~others]).any(), "slot 3's own rows see its NaN"
    assert tma_gemm, "the TMA GEMM did not run"
