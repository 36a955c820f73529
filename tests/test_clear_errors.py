"""Malformed input gets a ValueError naming the argument (or the file and the field), before
anything runs or changes: never a TypeError, AttributeError or re.error from deep inside."""
import json

import pytest
import torch
from torch import nn

import posttrain_kernels as pk
from posttrain_kernels.ops.adapters.format import read_adapter_file

pytestmark = pytest.mark.usefixtures("nan_poison")


def _saved_adapter(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    pool = pk.AdapterPool(model, target_modules=["0", "2"], max_adapters=2, max_rank=4)
    pool.add("a", r=2, init_lora_weights=False)
    pool.save("a", tmp_path / "a")
    return pool, tmp_path / "a"


def _with_config(path, change):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg = change(cfg)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("change,field", [
    (lambda c: [c], "JSON list"), (lambda c: None, "JSON NoneType"),
    (lambda c: {**c, "rank_pattern": {"(": 2}}, "rank_pattern"),
    (lambda c: {**c, "alpha_pattern": {"[q": 2}}, "alpha_pattern"),
    (lambda c: {**c, "target_modules": "(unclosed"}, "target_modules"),
    (lambda c: {**c, "target_modules": 5}, "target_modules"),
], ids=["list", "null", "rank-regex", "alpha-regex", "target-regex", "target-int"])
def test_malformed_config_names_file_and_field(change, field, tmp_path):
    pool, path = _saved_adapter(tmp_path)
    _with_config(path, change)
    with pytest.raises(ValueError, match=field) as e:
        pool.load("b", path)
    assert "adapter_config.json" in str(e.value)
    assert pool.names == ["a"]


def test_two_tensors_for_one_module_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    pool, path = _saved_adapter(tmp_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.startswith("base_model.model.") and "lora_A" in k)
    tensors[key.removeprefix("base_model.model.")] = tensors[key] * 2  # the same module, without the prefix
    save_file(tensors, str(path / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="two lora_A tensors"):
        read_adapter_file(path)


def test_pool_load_refuses_none_as_a_name(tmp_path):
    pool, path = _saved_adapter(tmp_path)
    pool.unload("a")
    with pytest.raises(ValueError, match="^name"):
        pool.load(None, path)
    with pytest.raises(ValueError, match="^name"):
        pool.add(None, r=2)
    assert pool.names == []


def test_topk_route_refuses_a_bool_top_k():
    with pytest.raises(ValueError, match="^top_k"):
        pk.topk_route(torch.randn(6, 4), top_k=True, capacity=3)


def test_lora_linear_scale_must_be_finite_in_fp32(device):
    x, w = torch.randn(3, 8, device=device), torch.randn(4, 8, device=device)
    a, b = torch.randn(2, 8, device=device), torch.randn(4, 2, device=device)
    with pytest.raises(ValueError, match="^scale"):
        pk.lora_linear(x, w, a, b, 1e39)
    with pytest.raises(ValueError, match="^bias.*float16, bfloat16 or float32"):
        pk.lora_linear(x, w, a, b, 1.0, torch.randn(4, device=device, dtype=torch.float64))


def test_multi_lora_slices_refuse_bools(device):
    x, w = torch.randn(3, 8, device=device), torch.randn(6, 8, device=device)
    A, B = torch.randn(2, 4, 8, device=device), torch.randn(2, 6, 2, device=device)
    ranks = torch.ones(2, 2, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="^slices"):
        pk.multi_lora_linear(x, w, A, B, ranks, torch.ones(2, 2, device=device), torch.zeros(3, dtype=torch.int64,
                             device=device), slices=[True, 5])
