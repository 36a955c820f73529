"""LoRA over an fp8 e4m3 frozen base (per-row scales, or 128×128 tile scales as HF FP8 checkpoints):
the format (quantisation, transformers' FP8Linear read as it is, bad storage refused), the decode
kernel exact, the activation quantisation bit for bit PyTorch's cast, and the fused LoRA over the
weight in each way a GEMM runs it (decoded in the main loop, decoded into a buffer, the fp8
tensor-core GEMM with its pointer and TMA kernels), forward and every gradient, against the fp64
formula over the decoded weight (the tensor-core path: over the activations as quantised).

Tolerances: the decode and the activation quantisation are exact; the GEMMs follow the rule of
docs/testing.md against their reference. The fp8 GEMM quantises x (and dY) to e4m3: its reference
takes x̂ = x_q·sx, the values it multiplies, so the comparison sees accumulation order only."""
import dataclasses
import math

import pytest
import torch
from helpers import ATOL, assert_close_rule

import posttrain_kernels as pk
from posttrain_kernels.autotune import cache
from posttrain_kernels.ops.backend import GEMM_VAR, OP_CALLS
from posttrain_kernels.ops.lora.launch import _PLANS
from posttrain_kernels.ops.lora.reference import lora_linear_ref
from posttrain_kernels.ops.multi_lora.reference import multi_lora_fwd_ref
from posttrain_kernels.ops.quant.fp8 import dequantize_fp8, from_hf_fp8, quantize_fp8
from posttrain_kernels.ops.quant.launch import QUANT_GEMM_VAR, dequantize_triton, fp8_quantize_act
from posttrain_kernels.ops.quant.layer import is_quantized_linear

pytestmark = pytest.mark.usefixtures("nan_poison")


def fp8(N, K, scaling="block", dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) / math.sqrt(K)
    w[:, : K // 3] *= 8  # blocks of different magnitudes: the scales matter
    return quantize_fp8(w.to(dtype), scaling, dtype=dtype).to(device)


def x_hat(x, col=None):
    """x as the fp8 GEMM multiplies it: quantised per 1×128 block, then scaled back (fp64)."""
    xq, sx, _ = fp8_quantize_act(x, col_scale=col)
    return xq.double() * sx.double().repeat_interleave(128, 1)[:, :x.shape[1]]


@pytest.fixture
def quant_gemm(monkeypatch):
    def set_mode(mode, gemm=None):
        monkeypatch.setenv(QUANT_GEMM_VAR, mode)
        if gemm:
            monkeypatch.setenv(GEMM_VAR, gemm)
        else:
            monkeypatch.delenv(GEMM_VAR, raising=False)
        cache.reset()
    yield set_mode
    cache.reset()


# ---------------------------------------------------------------- the format
@pytest.mark.parametrize("scaling", ["row", "block"])
def test_quantize_fp8(scaling):
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(1)) * 0.02
    q = quantize_fp8(w, scaling)
    assert q.data.dtype == torch.float8_e4m3fn and q.scale.dtype == torch.float32
    assert q.scale.shape == ((200,) if scaling == "row" else (2, 3))
    full = q.data.float().abs()
    # every row (tile) reaches 448 at its largest element
    if scaling == "row":
        assert torch.equal(full.amax(1), torch.full((200,), 448.0))
    else:
        assert float(full[:128, :128].amax()) == 448.0 and float(full[128:, 256:].amax()) == 448.0
    err = (dequantize_fp8(q, torch.float32) - w).abs() / w.abs().clamp(min=1e-3)
    assert float(err.median()) < 2 ** -4, "e4m3 keeps 3 mantissa bits"


def test_from_hf_fp8_linear():
    fp8_mod = pytest.importorskip("transformers.integrations.finegrained_fp8")
    layer = fp8_mod.FP8Linear(256, 130, block_size=(128, 128), has_bias=True)
    q = fp8(130, 256, "block")
    with torch.no_grad():
        layer.weight.copy_(q.data)
        layer.weight_scale_inv.copy_(q.scale)
        layer.bias.copy_(torch.randn(130))
    w = from_hf_fp8(layer)
    assert w.data.data_ptr() == layer.weight.data_ptr() and w.block == (128, 128)
    assert torch.equal(dequantize_fp8(w, torch.float32), dequantize_fp8(q, torch.float32))
    assert is_quantized_linear(layer)


@pytest.mark.parametrize("change, field", [
    (lambda w: dataclasses.replace(w, data=w.data.float()), "weight.data"),
    (lambda w: dataclasses.replace(w, scale=w.scale[:, :1]), "weight.scale"),
    (lambda w: dataclasses.replace(w, scale=w.scale.double()), "weight.scale"),
    (lambda w: dataclasses.replace(w, block=(128, 8)), "weight.block"),
    (lambda w: dataclasses.replace(w, scale=torch.full_like(w.scale, float("nan"))), "weight.scale"),
    (lambda w: dataclasses.replace(w, scale=-w.scale), "weight.scale"),
], ids=["data-fp32", "scale-shape", "scale-fp64", "block-8", "scale-nan", "scale-negative"])
def test_bad_fp8_weight_is_refused(change, field):
    w = fp8(130, 256)
    x = torch.randn(3, 256)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        pk.lora_linear(x, change(w), torch.randn(4, 256), torch.randn(130, 4), 1.0)


# ---------------------------------------------------------------- kernels
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["to-fp32", "to-fp16"])
@pytest.mark.parametrize("scaling,N,K", [("row", 40, 128), ("block", 130, 300), ("block", 33, 100)])
def test_decode_equals_the_reference(scaling, N, K, out_dtype, device):
    w = fp8(N, K, scaling, torch.float16, device)
    assert torch.equal(dequantize_triton(w, out_dtype), dequantize_fp8(w).to(out_dtype))


@pytest.mark.parametrize("K", [300, 128, 7])
def test_activation_quantisation_is_pytorchs_cast(K, device):
    x = (torch.randn(9, K) * torch.logspace(-4, 2, K)).to(device, torch.float16)
    x[0, :3] = 0.0
    x[1, 0] = -0.0
    xq, sx, _ = fp8_quantize_act(x)
    KB = math.ceil(K / 128)
    blocks = torch.nn.functional.pad(x.float(), (0, KB * 128 - K)).reshape(9, KB, 128)
    amax = blocks.abs().amax(-1)
    want_s = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    want_q = (blocks / want_s[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(9, -1)[:, :K]
    assert torch.equal(sx, want_s), "sx"
    assert torch.equal(xq.view(torch.uint8), want_q.view(torch.uint8)), "x_q: bit for bit PyTorch's RTNE cast"


# (lead, K, N, r, scaling, dropout): each case says what it covers.
CASES = [
    pytest.param((20,), 300, 140, 8, "block", 0.0, id="M20-K300-N140-r8-tiles"),  # partial 128-blocks both ways
    pytest.param((2, 9), 256, 64, 24, "row", 0.0, id="B2x9-K256-N64-r24-rows"),  # rank over one rank tile
    pytest.param((13,), 128, 48, 4, "block", 0.1, id="M13-K128-N48-r4-dropout"),  # dropout: shrink separate
]
MODES = [pytest.param("inloop", None, id="inloop"), pytest.param("buffer", None, id="buffer"),
         pytest.param("mma", None, id="mma"), pytest.param("mma", "tma", id="mma-tma")]


@pytest.mark.parametrize("mode,gemm", MODES)
@pytest.mark.parametrize("lead,K,N,r,scaling,p", CASES)
def test_lora_over_fp8(lead, K, N, r, scaling, p, mode, gemm, device, quant_gemm):
    quant_gemm(mode, gemm)
    dtype = torch.float16  # the tensor-core path takes 16-bit activations; bf16 on the GPU
    w = fp8(N, K, scaling, dtype, device)
    dense = dequantize_fp8(w, torch.float64)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*lead, K, generator=g).to(device, dtype)
    a = (torch.randn(r, K, generator=g) / math.sqrt(K)).to(device)
    b = (torch.randn(N, r, generator=g) / math.sqrt(r)).to(device)
    bias = torch.randn(N, generator=g).to(device, dtype)
    dy = torch.randn(*lead, N, generator=g).to(device, dtype)
    seed = torch.tensor([5], dtype=torch.int32, device=device)
    leaves = [v.clone().requires_grad_(True) for v in (x, a, b)]
    y = pk.lora_linear(leaves[0], w, leaves[1], leaves[2], 1.5, bias, p, dropout_seed=seed)
    y.backward(dy)
    ran = {plan.info["path"] for plan in _PLANS.values()}
    assert (mode if mode != "buffer" else "portable") in ran, f"the GEMM ran {ran}, not {mode}"  # buffer: dense
    kernels = {launch.kernel for plan in _PLANS.values() for launch in plan.launches if launch is not None}
    # TMA reads 16-byte rows: K = 300 takes the pointer kernel even when TMA is asked for
    assert ("fp8_lora_matmul_tma" in kernels) == (gemm == "tma" and K % 16 == 0), kernels
    # the reference: the formula in fp64, the base over the values the GEMM multiplies
    x2, dy2 = x.reshape(-1, K), dy.reshape(-1, N)
    mma = mode == "mma"
    base_x = x_hat(x2) if mma else x2.double()
    base_dy = x_hat(dy2, w.scale if scaling == "row" else None) if mma else dy2.double()
    w_dy = w.data.double() if mma and scaling == "row" else dense  # row scales folded into dY
    hi = [v.double().requires_grad_(True) for v in (x2, a, b)]
    low_rank = lora_linear_ref(hi[0], torch.zeros_like(dense), hi[1], hi[2], 1.5, None, p,
                                                     seed)
    y_ref = base_x @ dense.t() + low_rank + bias.double()
    g_lr = torch.autograd.grad(low_rank, hi, dy2.double())
    want = {"y": y_ref, "dx": base_dy @ w_dy + g_lr[0], "dA": g_lr[1], "dB": g_lr[2]}
    got = {"y": y.detach().reshape(-1, N), "dx": leaves[0].grad.reshape(-1, K), "dA": leaves[1].grad,
           "dB": leaves[2].grad}
    for name in want:
        lowp = want[name].to(dtype if name in ("y", "dx") else torch.float32)
        assert_close_rule(name, got[name], lowp, want[name], ATOL[dtype])


def test_multi_lora_over_fp8(device, quant_gemm):
    quant_gemm("inloop")  # serving: the weight decoded in the main loop
    M, K, N, S, R = 15, 256, 72, 3, 8
    w = fp8(N, K, "block", torch.float16, device)
    g = torch.Generator().manual_seed(3)
    A = (torch.randn(S, R, K, generator=g) / math.sqrt(K)).to(device)
    B = (torch.randn(S, N, R, generator=g) / math.sqrt(R)).to(device)
    ranks = torch.tensor([R, 2, 5], dtype=torch.int32, device=device)
    scales = torch.tensor([1.0, 2.0, -1.0], device=device)
    ids = torch.tensor([i % 4 - 1 for i in range(M)], device=device)
    x = torch.randn(M, K, generator=g).to(device, torch.float16)
    calls = OP_CALLS["multi_qlora_fwd_impl"]
    y = pk.multi_lora_linear(x, w, A, B, ranks, scales, ids)
    assert OP_CALLS["multi_qlora_fwd_impl"] == calls + 1
    dense = dequantize_fp8(w)
    hi = multi_lora_fwd_ref(x.double(), dense.double(), None, A.double(), B.double(), ranks, scales, ids)[0]
    lowp = pk.multi_lora_linear(x, dense, A, B, ranks, scales, ids, backend="reference")
    assert_close_rule("y", y, lowp, hi, ATOL[torch.float16])


def test_fp8_layers_and_peft(device):
    """QuantLinear(fp8) under LoRALinear, and PEFT's LoRA over transformers' FP8Linear under
    patch_peft, against the same formula over the decoded weight."""
    peft = pytest.importorskip("peft")
    fp8_mod = pytest.importorskip("transformers.integrations.finegrained_fp8")
    torch.manual_seed(0)
    base = fp8_mod.FP8Linear(256, 96, block_size=(128, 128), has_bias=True)
    q = fp8(96, 256, "block", torch.float32)
    with torch.no_grad():
        base.weight.copy_(q.data)
        base.weight_scale_inv.copy_(q.scale)
        base.bias.copy_(torch.randn(96))

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = base

        def forward(self, x):
            return self.proj(x)

    model = peft.get_peft_model(One(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"],
                                                       init_lora_weights=False))
    pk.patch_peft(model)
    x = torch.randn(5, 256, requires_grad=True)
    calls = OP_CALLS["qlora_fwd_impl"]
    y = model(x)
    assert OP_CALLS["qlora_fwd_impl"] == calls + 1
    layer = model.base_model.model.proj
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = x @ dequantize_fp8(q, torch.float32).t() + base.bias + 2.0 * (x @ A.t()) @ B.t()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    ours = pk.LoRALinear.from_linear(pk.QuantLinear.from_linear(torch.nn.Linear(256, 96), "fp8", scaling="row"),
                                     r=4, init_lora_weights=False)
    assert isinstance(ours, pk.QLoRALinear) and ours(torch.randn(3, 256)).shape == (3, 96)
    with pytest.raises(RuntimeError, match="quantized"):
        ours.merge()


def test_hf_fp8_checkpoint_state_loads_into_quant_linear():
    """An HF FP8 checkpoint's linear layer (``weight`` e4m3, ``weight_scale_inv`` per 128×128 tile,
    ``bias``) loads into ``QuantLinear(fp8, block)`` as it is: the same names and shapes."""
    q = fp8(130, 256, "block")
    state = {"weight": q.data.clone(), "weight_scale_inv": q.scale.clone(), "bias": torch.randn(130)}
    layer = pk.QuantLinear.from_linear(torch.nn.Linear(256, 130), "fp8", scaling="block")
    before = layer.quantized_weight()
    layer.load_state_dict(state)
    w = layer.quantized_weight()
    assert w is before and torch.equal(w.data.view(torch.uint8), q.data.view(torch.uint8))  # loaded in place
    x = torch.randn(4, 256)
    torch.testing.assert_close(layer(x), x @ dequantize_fp8(q, torch.float32).t() + state["bias"], rtol=1e-5,
                               atol=1e-5)
