"""PEFT's LoRA on MoE experts (``LoraConfig(target_parameters=[...])``, nested
``ParamWrapper`` layers over transformers' fused experts modules) under
``patch_peft``: logits and every LoRA gradient of tiny config-built
Qwen3-MoE, GPT-OSS (transposed, interleaved, biased), Mixtral, OLMoE and
DeepSeek-V3 models equal PEFT's own forward, through the expert-LoRA kernels
(interpreter); one projection only; fallbacks (merged, disabled, several
adapters) keep PEFT's forward; adapters saved and loaded both ways."""
import warnings

import pytest
import torch

import posttrain_kernels as pk
from posttrain_kernels.ops.backend import OP_CALLS

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
if not hasattr(peft.LoraConfig(), "target_parameters"):
    pytest.skip("this peft has no target_parameters", allow_module_level=True)

T = transformers
COMMON = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=16)
MODELS = {
    "qwen3_moe": lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
        intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, head_dim=16, **COMMON)),
    "gpt_oss": lambda: T.GptOssForCausalLM(T.GptOssConfig(
        intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
        layer_types=["full_attention"], **COMMON)),
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(
        intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, head_dim=16, **COMMON)),
    "olmoe": lambda: T.OlmoeForCausalLM(T.OlmoeConfig(
        intermediate_size=24, num_experts=4, num_experts_per_tok=2, eos_token_id=None, pad_token_id=None, **COMMON)),
    "deepseek_v3": lambda: T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
        intermediate_size=48, moe_intermediate_size=24, n_routed_experts=4, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **COMMON)),
}
BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _base(kind, seed=0):
    torch.manual_seed(seed)
    model = MODELS[kind]()
    with torch.no_grad():  # a router that spreads tokens over every expert
        for n, p in model.named_parameters():
            if p.dim() >= 2 and ("gate" in n or "router" in n) and "proj" not in n:
                p.normal_(std=0.5)
    return model


def _peft_model(kind, targets=BOTH, seed=0, **kw):
    model = _base(kind, seed)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_parameters=targets, target_modules=[],
                          init_lora_weights=False, **kw)  # random A and B
    return peft.get_peft_model(model, cfg)


def _step(model, ids):
    model.zero_grad()
    logits = model(ids).logits
    cot = torch.randn(logits.shape, generator=torch.Generator().manual_seed(3))
    (logits * cot).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _ids():
    return torch.randint(0, 16, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", list(MODELS))
def test_patched_experts_equal_peft(kind):
    model = _peft_model(kind)
    want_y, want_g = _step(model, _ids())
    assert any(".experts.base_layer.lora_A" in n for n in want_g)  # both projections, nested wrappers
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing falls back
        pk.patch_peft(model)
    calls = OP_CALLS["expert_lora_fwd_impl"], OP_CALLS["expert_lora_bwd_impl"]
    y, g = _step(model, _ids())
    assert OP_CALLS["expert_lora_fwd_impl"] >= calls[0] + 2 and OP_CALLS["expert_lora_bwd_impl"] >= calls[1] + 2
    torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-5)
    assert set(g) == set(want_g)
    for n in g:
        torch.testing.assert_close(g[n], want_g[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("target", BOTH)
def test_one_projection(target):
    model = _peft_model("qwen3_moe", targets=[target])
    want_y, want_g = _step(model, _ids())
    pk.patch_peft(model)
    y, g = _step(model, _ids())
    torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-5)
    for n in want_g:
        torch.testing.assert_close(g[n], want_g[n], rtol=1e-4, atol=1e-5)


def test_fallbacks_keep_peft_forward():
    model = _peft_model("qwen3_moe")
    pk.patch_peft(model)
    ids = _ids()
    with torch.no_grad():
        lora_y = model(ids).logits
        with model.disable_adapter():
            calls = OP_CALLS["expert_lora_fwd_impl"]
            base_y = model(ids).logits
            assert OP_CALLS["expert_lora_fwd_impl"] == calls  # PEFT's own forward: the base model
        model.merge_adapter()
        torch.testing.assert_close(model(ids).logits, lora_y, rtol=1e-4, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(model(ids).logits, lora_y, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base_y, lora_y)
    pk.unpatch_peft(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, lora_y, rtol=1e-4, atol=1e-5)


def test_adapter_files_round_trip(tmp_path):
    """Saved by a patched model, loaded by PEFT unpatched (and the other way): the same logits."""
    model = _peft_model("gpt_oss", seed=5)
    pk.patch_peft(model)
    with torch.no_grad():
        y = model(_ids()).logits
    model.save_pretrained(tmp_path / "a")
    fresh = peft.PeftModel.from_pretrained(_base("gpt_oss", seed=5), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids()).logits, y, rtol=1e-4, atol=1e-5)
    pk.patch_peft(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(_ids()).logits, y, rtol=1e-4, atol=1e-5)


def test_mixed_adapter_batch():
    """PEFT's ``adapter_names`` (one adapter per sequence, ``"__base__"`` for none) over LoRA'd experts:
    PEFT itself refuses it on ParamWrapper layers; patched, each sequence equals that adapter alone."""
    model = _peft_model("qwen3_moe")
    model.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=3, target_parameters=BOTH, target_modules=[],
                                               init_lora_weights=False))
    model.eval()
    ids = torch.randint(0, 16, (3, 7), generator=torch.Generator().manual_seed(2))
    names = ["other", "__base__", "default"]
    want = []
    with torch.no_grad():
        for i, n in enumerate(names):
            if n == "__base__":
                with model.disable_adapter():
                    want.append(model(ids[i:i + 1]).logits)
            else:
                model.set_adapter(n)
                want.append(model(ids[i:i + 1]).logits)
        model.set_adapter("default")
        pk.patch_peft(model)
        calls = OP_CALLS["expert_lora_mixed_impl"]
        got = model(ids, adapter_names=names).logits
    assert OP_CALLS["expert_lora_mixed_impl"] == calls + 2
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])  # [E, out, in] concatenated; [E, in, out] interleaved
@pytest.mark.parametrize("targets", [BOTH, ["mlp.experts.down_proj"]], ids=["both", "down"])
def test_peft_expert_files_into_converted_models_and_back(kind, targets, tmp_path):
    """A PEFT file with target_parameters (and a target_modules Linear) loads into the
    convert_moe'd model (``load_adapter``) with PEFT's logits; ``save_adapter`` of that model writes a
    file PEFT loads into the original transformers model, again with the same logits."""
    import copy
    base = _base(kind).eval()
    ours = copy.deepcopy(base)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_parameters=targets, target_modules=["q_proj"],
                          init_lora_weights=False)
    model = peft.get_peft_model(base, cfg).eval()
    with torch.no_grad():
        want = model(_ids()).logits
    model.save_pretrained(tmp_path / "peft")
    pk.convert_moe(ours)
    names = pk.load_adapter(ours, tmp_path / "peft")
    assert {f"model.layers.0.{t}" for t in targets} | {"model.layers.0.self_attn.q_proj"} == set(names)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, _ in ours.named_parameters() if ".lora" in n}
    with torch.no_grad():
        torch.testing.assert_close(ours(_ids()).logits, want, rtol=1e-4, atol=1e-5)
    pk.save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(_base(kind).eval(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(_ids()).logits, want, rtol=1e-4, atol=1e-5)


def test_a_bad_expert_adapter_file_changes_nothing(tmp_path):
    from safetensors.torch import load_file, save_file
    model = _peft_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    f = tmp_path / "adapter_model.safetensors"
    tensors = load_file(f)
    key = next(k for k in tensors if k.endswith("experts.lora_A.weight"))
    tensors[key] = tensors[key][:-1]  # E·r - 1 rows: not r rows per expert
    save_file(tensors, f)
    ours = _base("qwen3_moe")
    pk.convert_moe(ours)
    before = {n: p.clone() for n, p in ours.state_dict().items()}
    with pytest.raises(ValueError, match="^path: .*experts.down_proj"):
        pk.load_adapter(ours, tmp_path)
    after = ours.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
