"""QLoRA models: LoRA layers over bitsandbytes' 4-bit ``Linear4bit`` and our ``QuantLinear``, the
adapter pool over a 4-bit model, and PEFT's QLoRA models (tiny config-built Llama / Qwen2 loaded
in 4 bits by transformers, on the CPU) under ``patch_peft``: PEFT's logits and every LoRA
gradient, mixed adapter batches, files both ways, and what falls back.

bitsandbytes repacks a 4-bit weight for its CPU inference kernel on the first eval forward
without gradients, on CPUs with AVX512-BF16 (absmax rounded to bfloat16): the tests turn that
off (``_no_cpu_repack``), so every machine runs the 4-bit layout a GPU runs."""
import copy
import warnings

import pytest
import torch
from torch import nn

import posttrain_kernels as pk
from posttrain_kernels.ops.backend import OP_CALLS
from posttrain_kernels.ops.quant import dequantize_nf4

pytestmark = pytest.mark.usefixtures("nan_poison")
bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _linear4bit(K=128, N=48, compress=True, quant_type="nf4", compute=torch.float32, storage=torch.uint8, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(K, N)
    q = bnb.nn.Linear4bit(K, N, compute_dtype=compute, compress_statistics=compress, quant_type=quant_type,
                          quant_storage=storage)
    q.load_state_dict(dense.state_dict())
    return q.to("cpu")  # bitsandbytes quantises on the move to a device


# ---------------------------------------------------------------- LoRALinear over a 4-bit base
@pytest.mark.parametrize("compress,quant_type,storage", [(True, "nf4", torch.uint8), (False, "fp4", torch.bfloat16)],
                         ids=["nf4-double-quant", "fp4-bf16-storage"])
def test_qlora_linear_over_bitsandbytes(compress, quant_type, storage):
    base = _linear4bit(compress=compress, quant_type=quant_type, storage=storage)
    layer = pk.LoRALinear.from_linear(base, r=8, lora_alpha=16, init_lora_weights=False)
    assert isinstance(layer, pk.QLoRALinear) and layer.base_layer is base
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A.weight", "lora_B.weight"]
    x = torch.randn(2, 5, 128, requires_grad=True)
    calls = OP_CALLS["qlora_fwd_impl"]
    y = layer(x)
    assert OP_CALLS["qlora_fwd_impl"] == calls + 1
    A, B = (p.detach().clone().requires_grad_(True) for p in (layer.lora_A.weight, layer.lora_B.weight))
    xr = x.detach().clone().requires_grad_(True)
    # PEFT's QLoRA formula: bitsandbytes' layer, then the adapter in fp32 on the input
    want = base(xr) + (xr @ A.t() @ B.t()) * 2.0
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    want.backward(g)
    for name, ours, ref in (("dx", x.grad, xr.grad), ("dA", layer.lora_A.weight.grad, A.grad),
                            ("dB", layer.lora_B.weight.grad, B.grad)):
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5, msg=name)
    with pytest.raises(RuntimeError, match="quantized"):
        layer.merge()
    merged = layer.merged_linear()
    torch.testing.assert_close(merged(x.detach()), y.detach(), rtol=1e-5, atol=1e-5)
    with pk.disable_adapter(nn.Sequential(layer)):
        torch.testing.assert_close(layer(x.detach()), base(x.detach()))


def test_qlora_linear_state_dict():
    # Over bitsandbytes: the base's own entries (its quant state included, which transformers' loader
    # reads; bitsandbytes' layer itself loads none back), the adapter's beside them.
    layer = pk.LoRALinear.from_linear(_linear4bit(), r=4, init_lora_weights=False)
    state = layer.state_dict()
    assert {"base_layer.weight", "base_layer.weight.absmax", "base_layer.weight.nested_absmax", "base_layer.bias",
            "lora_A.weight", "lora_B.weight"} <= set(state) and "bias" not in state
    # Over our QuantLinear: the whole layer round-trips through its state dict.
    layer = pk.LoRALinear.from_linear(pk.QuantLinear.from_linear(nn.Linear(128, 40), blocksize=128), r=4,
                                      init_lora_weights=False)
    twin = pk.LoRALinear.from_linear(pk.QuantLinear.from_linear(nn.Linear(128, 40), blocksize=128), r=4)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(3, 128)
    torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)


# ---------------------------------------------------------------- our 4-bit layers, no bitsandbytes needed
def _tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=64, pad_token_id=2)
    return transformers.LlamaForCausalLM(cfg).train()


def test_quantize_model_apply_lora_and_files(tmp_path):
    model = _tiny_llama()
    dense = copy.deepcopy(model)
    names = pk.quantize_model(model)
    assert "lm_head" not in names and len(names) == 14  # 7 linear layers a block
    q = model.model.layers[0].mlp.down_proj
    bnb_q, _ = bnb.functional.quantize_4bit(dense.model.layers[0].mlp.down_proj.weight.detach(), blocksize=64,
                                            quant_type="nf4")
    assert torch.equal(q.packed, bnb_q.reshape(-1)), "bitsandbytes' codes, bit for bit"
    wrapped = pk.apply_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, lora_alpha=8, init_lora_weights=False)
    assert len(wrapped) == 6 and all(isinstance(model.get_submodule(n), pk.QLoRALinear) for n in wrapped)
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids).logits
    # the same model with each 4-bit weight decoded into an nn.Linear, the adapters as PEFT computes them
    for n in names:
        ql = model.get_submodule(n)
        ql = ql.base_layer if isinstance(ql, pk.QLoRALinear) else ql
        lin = dense.get_submodule(n)
        with torch.no_grad():
            lin.weight.copy_(dequantize_nf4(ql.quantized_weight()))
    ref = peft.get_peft_model(dense, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                        "down_proj"]))
    pk.save_adapter(model, tmp_path / "a")
    ref.load_adapter(str(tmp_path / "a"), adapter_name="ours")
    ref.set_adapter("ours")
    torch.testing.assert_close(out, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    # and back: a fresh 4-bit model reads the file
    fresh = _tiny_llama()
    pk.quantize_model(fresh)
    pk.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(input_ids=ids).logits, out, rtol=0, atol=0)


def test_adapter_pool_over_a_4bit_model():
    model = _tiny_llama()
    pk.quantize_model(model)
    pool = pk.AdapterPool(model, target_modules=["q_proj", "v_proj"], max_adapters=2, max_rank=4)
    assert all(isinstance(m, pk.QMultiLoRALinear) for m in pool.layers.values())
    torch.manual_seed(3)
    pool.add("a", r=4, lora_alpha=8, init_lora_weights=False)
    pool.add("b", r=2, lora_alpha=4, init_lora_weights=False)
    ids = torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        with pool.batch(["a", "b", None]):
            mixed = model(input_ids=ids).logits
        for row, name in enumerate(["a", "b", None]):
            with pool.batch([name]):
                alone = model(input_ids=ids[row:row + 1]).logits
            torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-5, atol=1e-5)
    calls = OP_CALLS["multi_qlora_fwd_impl"]
    with torch.no_grad(), pool.batch(["a"] * 3):
        model(input_ids=ids)
    assert OP_CALLS["multi_qlora_fwd_impl"] > calls


# ---------------------------------------------------------------- PEFT's QLoRA models under patch_peft
def _qlora(family, tmp_path, adapters=("default",), compute=torch.float32):
    torch.manual_seed(0)
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=1, vocab_size=64, pad_token_id=2)
    if family == "llama":
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    else:
        base = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    base.save_pretrained(tmp_path / "base")
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    model = _no_cpu_repack(transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quant, device_map="cpu", dtype=torch.float32))
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    for i, name in enumerate(adapters):
        torch.manual_seed(10 + i)
        cfg = peft.LoraConfig(r=4 + 2 * i, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        model = peft.get_peft_model(model, cfg, adapter_name=name) if i == 0 else model
        if i:
            model.add_adapter(name, cfg)
    return model.train()


def _no_cpu_repack(model):
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def _run(model, ids, cot):
    out = model(input_ids=ids).logits
    (out * cot).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_patched_qlora_equals_peft(family, tmp_path):
    ref = _qlora(family, tmp_path)
    assert type(ref.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ours = copy.deepcopy(ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer falls back
        pk.patch_peft(ours)
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    cot = torch.randn(2, 6, 64, generator=torch.Generator().manual_seed(2))
    calls = OP_CALLS["qlora_fwd_impl"], OP_CALLS["qlora_bwd_impl"]
    y, grads = _run(ours, ids, cot)
    assert OP_CALLS["qlora_fwd_impl"] >= calls[0] + 10 and OP_CALLS["qlora_bwd_impl"] >= calls[1] + 10
    y_ref, grads_ref = _run(ref, ids, cot)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    assert grads.keys() == grads_ref.keys() and len(grads) == 20
    for n, g in grads.items():
        torch.testing.assert_close(g, grads_ref[n], rtol=1e-4, atol=1e-4 * max(1.0, g.abs().max()),
                                   msg=lambda m: f"{n}: {m}")


def test_patched_qlora_mixed_batch_and_files(tmp_path):
    model = _qlora("llama", tmp_path, adapters=("first", "second")).eval()  # PEFT: mixed batches in eval only
    pk.patch_peft(model)
    ids = torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(4))
    names = ["first", "__base__", "second"]
    calls = OP_CALLS["multi_qlora_fwd_impl"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        assert OP_CALLS["multi_qlora_fwd_impl"] > calls
        for row, name in enumerate(names):
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(input_ids=ids[row:row + 1]).logits
            else:
                model.set_adapter(name)
                alone = model(input_ids=ids[row:row + 1]).logits
            torch.testing.assert_close(mixed[row:row + 1], alone, rtol=1e-4, atol=1e-4)
    # PEFT's files of a QLoRA model load into our 4-bit model of the same weights, same logits
    model.set_adapter("first")
    model.save_pretrained(tmp_path / "files", selected_adapters=["first"])
    ours = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base").train()
    for n, m in list(ours.named_modules()):
        if type(m) is nn.Linear and n != "lm_head":
            q = model.base_model.model.get_submodule(n)
            q = q.get_base_layer() if hasattr(q, "get_base_layer") else q
            from posttrain_kernels.ops.common import set_submodule
            set_submodule(ours, n, pk.QuantLinear(pk.from_bnb(q), q.bias))
    pk.load_adapter(ours, tmp_path / "files" / "first")
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_repacked_bitsandbytes_weight_falls_back():
    from posttrain_kernels.ops.adapters.patch import _fallback_reason
    base = _linear4bit()
    layer = peft.tuners.lora.bnb.Linear4bit(base, "default", peft.LoraConfig(r=4), r=4, lora_alpha=8)
    assert _fallback_reason(layer) is None
    base.weight.quant_state.packing_format_for_cpu = True  # as bitsandbytes marks its CPU inference layout
    assert "repacked" in _fallback_reason(layer)
    with pytest.raises(ValueError, match="packing_format_for_cpu"):
        pk.from_bnb(base)
