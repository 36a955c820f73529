"""LoRA over a quantized frozen base (QLoRA's 4-bit NF4 / FP4 in bitsandbytes' storage): the
decode kernel against bitsandbytes' dequantisation, the fused-LoRA and multi-adapter kernels
with the weight decoded in their main loop (and through a decoded buffer) against the fp64
reference of the same formula over that dequantised weight, every gradient, isolation, bad
input, the ops' registration and torch.compile. The layers and PEFT models are in
``test_qlora_models.py``."""
import dataclasses
import math

import pytest
import torch
from helpers import ATOL, assert_close_rule
from test_lora import check_against_refs

import posttrain_kernels as pk
from posttrain_kernels.autotune import cache
from posttrain_kernels.ops.backend import OP_CALLS
from posttrain_kernels.ops.lora.launch import _PLANS
from posttrain_kernels.ops.lora.op import qlora_bwd, qlora_fwd
from posttrain_kernels.ops.lora.reference import lora_linear_ref
from posttrain_kernels.ops.multi_lora.op import multi_qlora_fwd
from posttrain_kernels.ops.multi_lora.reference import multi_lora_fwd_ref
from posttrain_kernels.ops.quant import NestedStats, dequantize_nf4, quantize_nf4
from posttrain_kernels.ops.quant.launch import INLOOP_VAR, QUANT_GEMM_VAR, dequantize_triton
from posttrain_kernels.ops.quant.weight import parts

pytestmark = pytest.mark.usefixtures("nan_poison")


def nf4(N, K, blocksize=64, dtype=torch.float32, quant_type="nf4", nested=False, device="cpu", seed=0):
    """A 4-bit weight of a random [N, K] matrix; ``nested``: its absmax double-quantised as
    bitsandbytes does (8-bit codes under a 256-level code book, per 256 blocks, minus the mean)."""
    g = torch.Generator().manual_seed(seed)
    w = quantize_nf4((torch.randn(N, K, generator=g) / math.sqrt(K)).to(dtype), blocksize, quant_type)
    if nested:
        absmax = w.absmax
        offset = float(absmax.mean())
        code2 = torch.linspace(-1, 1, 256)
        blocks2 = math.ceil(absmax.numel() / 256)
        centred = torch.nn.functional.pad(absmax - offset, (0, blocks2 * 256 - absmax.numel()))
        absmax2 = centred.reshape(blocks2, 256).abs().amax(1).clamp(min=1e-12)
        q = ((centred.reshape(blocks2, 256) / absmax2[:, None] + 1) * 127.5).round().clamp(0, 255)
        w = dataclasses.replace(w, absmax=q.reshape(-1)[:absmax.numel()].to(torch.uint8),
                                nested=NestedStats(absmax2, code2, 256, offset))
    return w.to(device)


@pytest.fixture
def quant_gemm(monkeypatch):
    """``set(mode)``: where the 4-bit GEMMs decode (``inloop`` / ``buffer``), plans reset."""
    def set_mode(mode):
        monkeypatch.setenv(QUANT_GEMM_VAR, mode)
        cache.reset()
    yield set_mode
    cache.reset()


# ---------------------------------------------------------------- the decode kernel
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["to-fp32", "to-fp16"])
@pytest.mark.parametrize("N,K,blocksize,nested,quant_type,w_dtype", [
    pytest.param(40, 128, 64, False, "nf4", torch.float32, id="whole-blocks"),
    pytest.param(33, 100, 64, True, "nf4", torch.float16, id="rows-straddle-blocks-nested"),  # element-wise
    pytest.param(9, 256, 128, True, "fp4", torch.float32, id="fp4-128-nested"),
    pytest.param(5, 7, 32, False, "nf4", torch.float16, id="tiny-odd"),
])
def test_decode_equals_the_reference(N, K, blocksize, nested, quant_type, w_dtype, out_dtype, device):
    w = nf4(N, K, blocksize, w_dtype, quant_type, nested, device)
    want = dequantize_nf4(w).to(out_dtype)  # bitsandbytes' rule: to the weight's dtype, then the input's
    assert torch.equal(dequantize_triton(w, out_dtype), want)


def test_decode_equals_bitsandbytes_double_quantised(device):
    bnb = pytest.importorskip("bitsandbytes")
    weight = torch.randn(48, 192, generator=torch.Generator().manual_seed(3)) * 0.05
    q, st = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    lin = bnb.nn.Linear4bit(192, 48, bias=False, compress_statistics=True)
    lin.weight = bnb.nn.Params4bit(q, requires_grad=False, quant_state=st, bnb_quantized=True)
    w = pk.from_bnb(lin).to(device)
    assert w.nested is not None
    assert torch.equal(dequantize_triton(w, torch.float32).cpu(), bnb.functional.dequantize_4bit(q, st))


# ---------------------------------------------------------------- fused LoRA over a 4-bit weight
# (lead, K, N, r, blocksize, nested, dropout): each case says what it covers.
CASES = [
    pytest.param((7,), 128, 40, 4, 64, False, 0.0, id="M7-K128-N40-r4-fused-shrink"),  # t from the GEMM's x tiles
    pytest.param((37,), 192, 33, 24, 64, True, 0.0, id="M37-K192-N33-r24-nested"),  # separate shrink, 2 rank steps
    pytest.param((2, 10), 128, 70, 8, 128, False, 0.1, id="B2x10-K128-N70-r8-dropout"),  # dropout: dx masked
    pytest.param((1,), 64, 16, 16, 64, True, 0.0, id="M1-K64-N16-r16-decode"),  # one token, one K step
    pytest.param((9,), 100, 24, 4, 64, False, 0.0, id="M9-K100-rows-straddle-blocks"),  # always the buffer
]
DTYPES = [pytest.param(torch.float32, torch.float32, id="fp32"),
          pytest.param(torch.float16, torch.float32, id="fp16-fp32adapters")]
if torch.cuda.is_available():
    DTYPES.append(pytest.param(torch.bfloat16, torch.float32, id="bf16-fp32adapters"))


def _inputs(lead, K, N, r, dtype, adapter_dtype, device, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g).to(device, dtype)
    a = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(device, adapter_dtype)
    b = (torch.randn(N, r, generator=g) / math.sqrt(r)).to(device, adapter_dtype)
    bias = torch.randn(N, generator=g).to(device, dtype)
    return x, a, b, bias


@pytest.mark.parametrize("mode", ["inloop", "buffer"])
@pytest.mark.parametrize("dtype,adapter_dtype", DTYPES)
@pytest.mark.parametrize("lead,K,N,r,blocksize,nested,p", CASES)
def test_lora_over_nf4(lead, K, N, r, blocksize, nested, p, dtype, adapter_dtype, mode, device, quant_gemm):
    quant_gemm(mode)
    w = nf4(N, K, blocksize, dtype, nested=nested, device=device)
    dense = dequantize_nf4(w).to(dtype)  # what the base computes with: the reference's weight
    x, a, b, bias = _inputs(lead, K, N, r, dtype, adapter_dtype, device)
    dy = torch.randn(*lead, N, device=device).to(dtype)
    seed = torch.tensor([11], dtype=torch.int32, device=device)
    calls = OP_CALLS["qlora_fwd_impl"], OP_CALLS["qlora_bwd_impl"]
    check_against_refs(x, dense, a, b, bias, 1.5, dy, p, seed,
                       ours_fn=lambda x_, w_, a_, b_, bias_: pk.lora_linear(x_, w, a_, b_, 1.5, bias_, p,
                                                                            dropout_seed=seed))
    assert OP_CALLS["qlora_fwd_impl"] > calls[0] and OP_CALLS["qlora_bwd_impl"] > calls[1]
    inloop = [plan.info["path"] == "inloop" for plan in _PLANS.values()]
    assert any(inloop) == (mode == "inloop" and K % blocksize == 0), "the GEMM decoded where it was told to"


def test_sum_backward_and_weight_in_another_dtype(device, quant_gemm):
    # y.sum().backward(): an expanded stride-0 dY; an fp16 weight under fp32 x (decoded to fp16, then fp32)
    quant_gemm("inloop")
    w = nf4(48, 128, 64, torch.float16, device=device)
    x, a, b, bias = _inputs((5, 3), 128, 48, 8, torch.float32, torch.float32, device)
    leaves = [v.clone().requires_grad_(True) for v in (x, a, b)]
    pk.lora_linear(leaves[0], w, leaves[1], leaves[2], 2.0, bias).sum().backward()
    hi = [v.double().requires_grad_(True) for v in (x, a, b)]
    lora_linear_ref(hi[0], dequantize_nf4(w).double(), hi[1], hi[2], 2.0, bias.double()).sum().backward()
    for name, o, h in zip(("dx", "dA", "dB"), leaves, hi):
        torch.testing.assert_close(o.grad.double(), h.grad, rtol=1e-4, atol=1e-4, msg=name)


def test_plan_depends_on_the_weight_structure(device, quant_gemm):
    # Same shapes, another blocksize / nesting: another plan, never a stale one.
    quant_gemm("inloop")
    x, a, b, bias = _inputs((6,), 256, 32, 4, torch.float32, torch.float32, device)
    for w in (nf4(32, 256, 64, device=device), nf4(32, 256, 128, nested=True, device=device),
              nf4(32, 256, 256, quant_type="fp4", device=device)):
        y = pk.lora_linear(x, w, a, b, 1.0, bias)
        want = lora_linear_ref(x.double(), dequantize_nf4(w).double(), a.double(), b.double(), 1.0, bias.double())
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- multi-adapter LoRA over a 4-bit weight
def _pool(S, R, K, N, device, seed=2):
    g = torch.Generator().manual_seed(seed)
    A = (torch.randn(S, R, K, generator=g) / math.sqrt(K)).to(device)
    B = (torch.randn(S, N, R, generator=g) / math.sqrt(R)).to(device)
    ranks = torch.tensor([R, 1, R // 2], dtype=torch.int32, device=device)[:S]
    scales = torch.tensor([1.5, -0.5, 2.0], device=device)[:S]
    return A, B, ranks, scales


@pytest.mark.parametrize("mode", ["inloop", "buffer"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_multi_lora_over_nf4(mode, dtype, device, quant_gemm):
    quant_gemm(mode)
    M, K, N, S, R = 21, 128, 40, 3, 8
    w = nf4(N, K, 64, dtype, nested=True, device=device)
    A, B, ranks, scales = _pool(S, R, K, N, device)
    x = torch.randn(M, K, device=device).to(dtype)
    ids = torch.tensor([i % 4 - 1 for i in range(M)], device=device)  # -1 = base only, mixed order
    bias = torch.randn(N, device=device).to(dtype)
    calls = OP_CALLS["multi_qlora_fwd_impl"]
    y = pk.multi_lora_linear(x, w, A, B, ranks, scales, ids, bias)
    assert OP_CALLS["multi_qlora_fwd_impl"] == calls + 1
    dense = dequantize_nf4(w).to(dtype)
    hi = multi_lora_fwd_ref(x.double(), dense.double(), bias.double(), A.double(), B.double(), ranks, scales, ids)[0]
    lowp = pk.multi_lora_linear(x, dense, A, B, ranks, scales, ids, bias, backend="reference")
    assert_close_rule("y", y, lowp, hi, ATOL[dtype])
    # Isolation: whatever another slot holds (NaN, Inf), a row's output is bitwise the same.
    A2, B2 = A.clone(), B.clone()
    A2[1], B2[2] = float("nan"), float("inf")
    y2 = pk.multi_lora_linear(x, w, A2, B2, ranks, scales, ids, bias)
    rows = ids == 0
    assert torch.equal(y2[rows], y[rows]) and torch.equal(y2[ids == -1], y[ids == -1])


def test_multi_lora_over_nf4_gradients(device, quant_gemm):
    quant_gemm("inloop")  # the forward decodes in its loop; dx always reads a decoded buffer
    M, K, N, S, R = 13, 128, 24, 3, 4
    w = nf4(N, K, 64, device=device)
    A, B, ranks, scales = _pool(S, R, K, N, device)
    x = torch.randn(M, K, device=device)
    ids = torch.tensor([i % 3 for i in range(M)], device=device)
    dy = torch.randn(M, N, device=device)
    grads = []
    for weight in (w, dequantize_nf4(w)):
        leaves = [v.clone().requires_grad_(True) for v in (x, A, B)]
        pk.multi_lora_linear(leaves[0], weight, leaves[1], leaves[2], ranks, scales, ids).backward(dy)
        grads.append([v.grad for v in leaves])
    for name, q, d in zip(("dx", "dA", "dB"), *grads):
        torch.testing.assert_close(q, d, rtol=1e-5, atol=1e-5, msg=name)


# ---------------------------------------------------------------- bad input, ops, compile
def test_bad_quantized_weight_is_refused_before_any_launch(device):
    w = nf4(24, 64, device=device)
    x, a, b, bias = _inputs((3,), 64, 24, 4, torch.float32, torch.float32, device)
    bad_scale = dataclasses.replace(w, absmax=torch.where(torch.arange(w.blocks, device=device) == 2,
                                                          float("inf"), w.absmax))
    with pytest.raises(ValueError, match="weight.absmax"):
        pk.lora_linear(x, bad_scale, a, b, 1.0)
    with pytest.raises(ValueError, match="weight.packed"):
        pk.lora_linear(x, dataclasses.replace(w, packed=w.packed[:-2]), a, b, 1.0)
    with pytest.raises(ValueError, match="^x: last dim"):
        pk.lora_linear(x[:, :32], w, a, b, 1.0)
    with pytest.raises(ValueError, match="weight.absmax"):
        pk.multi_lora_linear(x, bad_scale, a[None], b[None], torch.tensor([4], dtype=torch.int32, device=device),
                             torch.ones(1, device=device), torch.zeros(3, dtype=torch.int64, device=device))


def test_opcheck_and_torch_compile(device):
    w = nf4(24, 64, nested=True, device=device)
    x, a, b, bias = _inputs((5,), 64, 24, 4, torch.float32, torch.float32, device)
    fmt, wq, wint, wfloat = parts(w)
    torch.library.opcheck(qlora_fwd, (x, wq, fmt, wint, wfloat, a, b, bias, 2.0, 0.0, None, "auto"))
    y, t = qlora_fwd(x, wq, fmt, wint, wfloat, a, b, bias, 2.0, 0.0, None, "auto")
    dy = torch.randn_like(y)
    torch.library.opcheck(qlora_bwd, (dy, x, wq, fmt, wint, wfloat, a, b, t, 2.0, 0.0, None, True, True, "auto"))
    ids = torch.tensor([0, -1, 0, 0, -1], device=device)
    ranks, scales = torch.tensor([4], dtype=torch.int32, device=device), torch.tensor([2.0], device=device)
    torch.library.opcheck(multi_qlora_fwd, (x, wq, fmt, wint, wfloat, bias, a[None], b[None], ranks, scales, ids,
                                            None, None, None, "auto"))
    fn = torch.compile(lambda x_, a_, b_: pk.lora_linear(x_, w, a_, b_, 2.0, bias), fullgraph=True,
                       backend="aot_eager")
    leaves = [v.clone().requires_grad_(True) for v in (x, a, b)]
    out = fn(*leaves)
    out.backward(dy)
    eager = [v.clone().requires_grad_(True) for v in (x, a, b)]
    pk.lora_linear(*eager[:1], w, *eager[1:], 2.0, bias).backward(dy)
    torch.testing.assert_close(out, y)
    for o, e in zip(leaves, eager):
        torch.testing.assert_close(o.grad, e.grad)


def test_inloop_threshold_is_read_per_call(device, monkeypatch):
    # The default: decode in the loop up to INLOOP_MAX_M tokens, a buffer above; the knob moves it.
    monkeypatch.setenv(INLOOP_VAR, "8")
    cache.reset()
    w = nf4(16, 64, device=device)
    for M, inloop in ((8, True), (9, False)):
        _PLANS.clear()
        x, a, b, _ = _inputs((M,), 64, 16, 4, torch.float32, torch.float32, device)
        pk.lora_linear(x, w, a, b, 1.0)
        assert any(p.info["path"] == "inloop" for p in _PLANS.values()) == inloop, M
    cache.reset()


def test_strided_storage_reads_as_its_contiguous_copy(device, quant_gemm):
    # codes and scales held as strided views (every other element of a larger buffer)
    quant_gemm("inloop")
    w = nf4(24, 128, 64, device=device)
    spread = dataclasses.replace(w, packed=torch.stack([w.packed, w.packed]).t().reshape(-1)[::2],
                                 absmax=torch.stack([w.absmax, w.absmax]).t().reshape(-1)[::2])
    assert spread.packed.stride() == (2,) and torch.equal(spread.packed, w.packed)
    x, a, b, bias = _inputs((5,), 128, 24, 4, torch.float32, torch.float32, device)
    torch.testing.assert_close(pk.lora_linear(x, spread, a, b, 1.0, bias), pk.lora_linear(x, w, a, b, 1.0, bias),
                               rtol=0, atol=0)
