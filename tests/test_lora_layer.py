"""LoRALinear: the drop-in nn.Linear (init, from_linear, merge/unmerge,
state-dict keys, scale, argument checks)."""
import math

import pytest
import torch
from torch import nn

import posttrain_kernels as pk
from posttrain_kernels.ops.lora import reference as ref


def test_fresh_from_linear_equals_linear(device):
    torch.manual_seed(0)
    linear = nn.Linear(37, 29, device=device)
    layer = pk.LoRALinear.from_linear(linear, r=8, lora_alpha=16)
    x = torch.randn(3, 5, 37, device=device)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)


def test_from_linear_reuses_and_freezes_weights(device):
    linear = nn.Linear(16, 12, device=device)
    layer = pk.LoRALinear.from_linear(linear, r=4)
    assert layer.weight is linear.weight and layer.bias is linear.bias, "no copy of the base weights"
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    assert layer.lora_A.weight.dtype == torch.float32, "adapters default to fp32, as PEFT"
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.weight", "lora_B.weight"}


def test_from_linear_without_bias(device):
    linear = nn.Linear(16, 12, bias=False, device=device)
    layer = pk.LoRALinear.from_linear(linear, r=4, init_lora_weights=False)
    assert layer.bias is None
    x = torch.randn(6, 16, device=device)
    expected = ref.lora_linear_ref(x, linear.weight, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_state_dict_keys_match_peft_suffixes(device):
    layer = pk.LoRALinear(16, 12, r=4, device=device)
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}
    assert layer.lora_A.weight.shape == (4, 16) and layer.lora_B.weight.shape == (12, 4)


@pytest.mark.parametrize("use_rslora,expected", [(False, 32 / 16), (True, 32 / 4)])
def test_scaling(use_rslora, expected):
    assert pk.LoRALinear(8, 8, r=16, lora_alpha=32, use_rslora=use_rslora).scaling == expected


def test_init_kaiming_and_gaussian():
    torch.manual_seed(0)
    layer = pk.LoRALinear(512, 64, r=64)
    assert torch.count_nonzero(layer.lora_B.weight) == 0, "B starts at zero"
    bound = 1 / math.sqrt(512)  # kaiming-uniform with a = sqrt(5) on fan_in 512
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.9 * bound
    g = pk.LoRALinear(512, 64, r=64, init_lora_weights="gaussian")
    assert abs(g.lora_A.weight.std().item() - 1 / 64) < 0.1 / 64
    assert torch.count_nonzero(g.lora_B.weight) == 0


def test_forward_matches_reference_with_random_adapter(device):
    torch.manual_seed(1)
    layer = pk.LoRALinear(45, 30, r=6, lora_alpha=12, init_lora_weights=False, device=device)
    x = torch.randn(4, 9, 45, device=device, requires_grad=True)
    y = layer(x)
    expected = ref.lora_linear_ref(x, layer.weight, layer.lora_A.weight, layer.lora_B.weight, 2.0, layer.bias)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert layer.weight.grad is None and layer.lora_A.weight.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merge_unmerge_round_trip(dtype, device):
    torch.manual_seed(2)
    layer = pk.LoRALinear(48, 40, r=8, lora_alpha=16, init_lora_weights=False, device=device, dtype=dtype)
    w0 = layer.weight.detach().clone()
    x = torch.randn(7, 48, device=device, dtype=dtype)
    y_unmerged = layer(x)
    layer.merge()
    assert layer.merged
    y_merged = layer(x)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y_merged, y_unmerged, rtol=tol, atol=tol)
    layer.unmerge()
    assert not layer.merged
    eps = torch.finfo(dtype).eps
    # Within rounding: one rounding for the merge, one for the unmerge.
    assert (layer.weight - w0).abs().max() <= 2 * eps * (w0.abs().max() + layer.delta_weight().abs().max())
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_merged_forward_is_one_plain_linear(device, monkeypatch):
    layer = pk.LoRALinear(16, 12, r=4, init_lora_weights=False, device=device)
    layer.merge()
    from posttrain_kernels.ops.lora import layer as layers

    def boom(*a, **k):
        raise AssertionError("merged forward must not call the LoRA kernels")

    monkeypatch.setattr(layers, "lora_linear", boom)
    layer(torch.randn(3, 16, device=device))


def test_dropout_only_in_training(device):
    torch.manual_seed(3)
    layer = pk.LoRALinear(32, 24, r=4, lora_dropout=0.5, init_lora_weights=False, device=device)
    x = torch.randn(10, 32, device=device)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("kwargs,text", [
    ({"r": 0}, "^r: "), ({"r": 300}, "^r: "), ({"lora_dropout": 1.0}, "^lora_dropout: "),
    ({"init_lora_weights": "orthogonal"}, "^init_lora_weights: "),
])
def test_layer_bad_arguments(kwargs, text):
    with pytest.raises(ValueError, match=text):
        pk.LoRALinear(8, 8, **kwargs)
    with pytest.raises(ValueError, match="^linear: "):
        pk.LoRALinear.from_linear(nn.Conv1d(2, 2, 1))
