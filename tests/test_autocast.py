"""Layers under autocast behave like ``nn.Linear``: inputs are cast by the
autocast rule, the output has the autocast dtype, gradients flow back to the
fp32 inputs and adapters. CPU autocast here; CUDA autocast in bf16 on a GPU.

fp16 runs the Triton kernels through the interpreter; bf16 runs the PyTorch
reference (``tl.dot`` on bf16 is wrong in the interpreter), on both, the
comparison is against the same layer computed by hand in the autocast dtype.
"""
import pytest
import torch

import posttrain_kernels as pk
from posttrain_kernels.ops.lora import reference as lora_ref

CASES = [pytest.param(torch.float16, "auto", id="fp16-kernels"),
         pytest.param(torch.bfloat16, "reference", id="bf16-reference")]


def _lora_layer(K=24, N=20, r=4):
    torch.manual_seed(0)
    return pk.LoRALinear(K, N, r=r, lora_alpha=8, init_lora_weights=False)


@pytest.mark.parametrize("amp,backend", CASES)
def test_lora_linear_under_autocast_like_nn_linear(amp, backend, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_KERNELS_BACKEND", backend)
    layer = _lora_layer()
    plain = torch.nn.Linear(24, 20)
    plain.load_state_dict({"weight": layer.weight, "bias": layer.bias})
    x = torch.randn(3, 5, 24, requires_grad=True)  # an fp32 input, as o_proj / down_proj see under bf16=True
    with torch.autocast("cpu", dtype=amp):
        y = layer(x)
        y_linear = plain(x)
    assert y.dtype == y_linear.dtype == amp, f"output dtype {y.dtype}, nn.Linear gives {y_linear.dtype}"
    want = lora_ref.lora_linear_ref(x.detach(), layer.weight, layer.lora_A.weight, layer.lora_B.weight,
                                    layer.scaling, layer.bias, compute_dtype=amp)
    torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.weight.grad is None
    # An input already in the autocast dtype is not cast again.
    with torch.autocast("cpu", dtype=amp):
        assert layer(x.detach().to(amp)).dtype == amp


@pytest.mark.parametrize("amp,backend", CASES)
def test_multi_lora_layer_under_autocast(amp, backend, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_KERNELS_BACKEND", backend)
    torch.manual_seed(0)
    layer = pk.MultiLoRALinear(24, 20, max_adapters=2, max_rank=4)
    layer.set_slot(0, torch.randn(4, 24) / 5, torch.randn(20, 4) / 2, 2.0)
    layer.adapter_ids = torch.tensor([0, -1, 0])
    x = torch.randn(3, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=amp):
        y = layer(x)
    assert y.dtype == amp
    xs = x.detach().to(amp)
    want = xs @ layer.weight.to(amp).t() + layer.bias.to(amp)
    want[[0, 2]] += 2.0 * (xs[[0, 2]] @ layer.lora_A[0].to(amp).t()) @ layer.lora_B[0].to(amp).t()
    torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


@pytest.mark.parametrize("cls", [pk.TopKMoE, pk.ExpertChoiceMoE])
def test_moe_layer_under_autocast(cls, monkeypatch):
    """The router stays fp32; the experts follow autocast; the output has
    the autocast dtype, as the dense MLP's last nn.Linear would give."""
    monkeypatch.setenv("POSTTRAIN_KERNELS_BACKEND", "reference")
    torch.manual_seed(0)
    layer = cls(16, 24, 4)
    x = torch.randn(2, 5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        y32 = layer(x)
    torch.testing.assert_close(y.float(), y32, rtol=5e-2, atol=5e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.router.weight.grad.dtype == torch.float32


@pytest.mark.gpu
def test_cuda_autocast_bf16():
    layer = _lora_layer().cuda()
    x = torch.randn(64, 24, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    want = lora_ref.lora_linear_ref(x.detach(), layer.weight, layer.lora_A.weight, layer.lora_B.weight,
                                    layer.scaling, layer.bias, compute_dtype=torch.bfloat16)
    torch.testing.assert_close(y.float(), want.float(), rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
