"""patch_peft: PEFT's own LoRA layers run through the fused kernels, in the
PeftModel a user already has. On config-built tiny Llama, Qwen2 and GPT-2
(Conv1D) models: patched and unpatched outputs and every LoRA gradient
agree, the op counter shows the kernels ran, and PEFT's features behave as
unpatched; what the kernels do not do keeps PEFT's forward, with a warning."""
import copy
import warnings

import pytest
import torch

import posttrain_kernels as pk
from posttrain_kernels.ops.backend import OP_CALLS

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _base(family, seed=0):
    torch.manual_seed(seed)
    if family == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, vocab_size=64, pad_token_id=2)
        return transformers.LlamaForCausalLM(cfg).eval(), ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    if family == "qwen2":
        cfg = transformers.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, vocab_size=64, pad_token_id=2)
        return transformers.Qwen2ForCausalLM(cfg).eval(), ["q_proj", "v_proj", "gate_proj", "up_proj"]
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=64, pad_token_id=2)
    return transformers.GPT2LMHeadModel(cfg).eval(), ["c_attn", "c_proj", "c_fc"]


def _peft(family, dtype=torch.float32, adapters=("default",), **extra):
    base, targets = _base(family)
    model = None
    for i, name in enumerate(adapters):
        torch.manual_seed(10 + i)
        cfg = peft.LoraConfig(r=4 + 2 * i, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                              fan_in_fan_out=family == "gpt2", **extra)
        if model is None:
            model = peft.get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    return model.to(dtype).eval()


def _ids(rows=3, seed=1):
    return torch.randint(3, 64, (rows, 6), generator=torch.Generator().manual_seed(seed))


def _lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def _fwd_bwd(model, ids, cot):
    out = model(input_ids=ids).logits
    (out.float() * cot).sum().backward()
    return out.detach(), _lora_grads(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_patched_equals_unpatched(family, dtype):
    ref = _peft(family, dtype)
    ours = pk.patch_peft(copy.deepcopy(ref))
    ids = _ids()
    cot = torch.randn(3, 6, 64, generator=torch.Generator().manual_seed(2))
    before = OP_CALLS["lora_fwd_impl"], OP_CALLS["lora_bwd_impl"]
    y, grads = _fwd_bwd(ours, ids, cot)
    assert OP_CALLS["lora_fwd_impl"] > before[0] and OP_CALLS["lora_bwd_impl"] > before[1], "the kernels did not run"
    y_ref, grads_ref = _fwd_bwd(ref, ids, cot)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)
    assert grads.keys() == grads_ref.keys() and grads
    for n, g in grads.items():
        torch.testing.assert_close(g.float(), grads_ref[n].float(), rtol=tol, atol=tol * max(1.0, g.abs().max()),
                                   msg=lambda m: f"{n}: {m}")


def test_peft_features_behave_as_unpatched(tmp_path):
    ref = _peft("llama", adapters=("a", "b"))
    ours = pk.patch_peft(copy.deepcopy(ref))
    ids = _ids()

    def same(step, **kwargs):
        with torch.no_grad():
            got, want = step(ours, **kwargs), step(ref, **kwargs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{step.__name__}: {m}")

    def logits(m, **kw):
        return m(input_ids=ids, **kw).logits

    for name in ("b", "a"):
        ref.set_adapter(name)
        ours.set_adapter(name)
        same(logits)
    with ref.disable_adapter(), ours.disable_adapter():
        same(logits)
    names = ["a", "__base__", "b"]
    calls = OP_CALLS["multi_lora_fwd_impl"]
    same(logits, adapter_names=names)
    assert OP_CALLS["multi_lora_fwd_impl"] > calls, "mixed batches run the multi-adapter kernel"

    def generate(m):
        return m.generate(input_ids=ids, max_new_tokens=3, do_sample=False, adapter_names=names).float()
    same(generate)
    for m in (ref, ours):
        m.merge_adapter()
    same(logits)
    for m in (ref, ours):
        m.unmerge_adapter()
    same(logits)
    ours.save_pretrained(str(tmp_path / "ours"))
    ref.save_pretrained(str(tmp_path / "ref"))
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / d / "a" / "adapter_model.safetensors")) if (tmp_path / d / "a").exists()
            else load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "ref"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    merged_ours, merged_ref = copy.deepcopy(ours).merge_and_unload(), copy.deepcopy(ref).merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged_ours(input_ids=ids).logits, merged_ref(input_ids=ids).logits)
    pk.unpatch_peft(ours)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    assert "forward" not in vars(layer), "unpatch_peft restores PEFT's forward"
    pk.patch_peft(pk.patch_peft(ours))  # idempotent
    from posttrain_kernels.ops.adapters import patch
    assert isinstance(vars(layer)["forward"], patch._Forward)


def test_patched_model_pickles_and_loads(tmp_path):
    """torch.save of a patched model writes a checkpoint torch.load reads back, still patched,
    with the same outputs (single adapter and mixed batch)."""
    ours = pk.patch_peft(_peft("llama", adapters=("a", "b")))
    ids = _ids()
    with torch.no_grad():
        want = ours(input_ids=ids).logits, ours(input_ids=ids, adapter_names=["a", "__base__", "b"]).logits
    torch.save(ours, tmp_path / "model.pt")
    back = torch.load(tmp_path / "model.pt", weights_only=False)
    calls = OP_CALLS["lora_fwd_impl"]
    with torch.no_grad():
        got = back(input_ids=ids).logits, back(input_ids=ids, adapter_names=["a", "__base__", "b"]).logits
    assert OP_CALLS["lora_fwd_impl"] > calls, "the loaded model is still patched"
    for u, v in zip(got, want):
        assert torch.equal(u, v)


def test_mixed_batch_sees_edits_through_data():
    """An in-place edit through ``.data`` (no version bump) reaches the next mixed batch."""
    ref = _peft("llama", adapters=("a", "b"))
    ours = pk.patch_peft(copy.deepcopy(ref))
    ids, names = _ids(), ["a", "__base__", "b"]
    with torch.no_grad():
        ours(input_ids=ids, adapter_names=names)  # a first mixed batch (what a cache would keep)
        for m in (ref, ours):
            for mod in m.modules():
                if hasattr(mod, "lora_B") and "b" in getattr(mod, "lora_B", {}):
                    mod.lora_B["b"].weight.data.mul_(2)
        torch.testing.assert_close(ours(input_ids=ids, adapter_names=names).logits,
                                   ref(input_ids=ids, adapter_names=names).logits, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_and_dropout():
    """Training mode with LoRA dropout: gradient checkpointing recomputes the
    same dropout masks (the seed comes from torch's RNG, which checkpointing
    restores), so gradients equal those without checkpointing."""
    model = pk.patch_peft(_peft("llama", lora_dropout=0.2)).train()
    ids = _ids()
    runs = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        torch.manual_seed(5)
        model(input_ids=ids, labels=ids).loss.backward()
        runs.append(_lora_grads(model))
    for n, g in runs[0].items():
        torch.testing.assert_close(runs[1][n], g, rtol=1e-5, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 8))
    model = peft.get_peft_model(net, peft.LoraConfig(r=4, target_modules=["0", "2"], init_lora_weights=False))
    ref = copy.deepcopy(model)
    pk.patch_peft(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 16)
    y = compiled(x)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    ref(x).sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_hf_trainer_bf16(tmp_path, monkeypatch):
    """HF Trainer with bf16=True (CPU autocast) trains a patched PeftModel:
    the losses follow the unpatched model's. (bf16 runs the reference
    backend on the CPU: the interpreter's bf16 dot is wrong.)"""
    monkeypatch.setenv("POSTTRAIN_KERNELS_BACKEND", "reference")
    ids = _ids(rows=8, seed=3)
    data = [{"input_ids": row, "labels": row} for row in ids]

    def train(patch):
        model = _peft("llama")
        if patch:
            pk.patch_peft(model)
        args = transformers.TrainingArguments(output_dir=str(tmp_path / str(patch)), per_device_train_batch_size=4,
                                              max_steps=3, learning_rate=1e-2, bf16=True, use_cpu=True,
                                              logging_steps=1, report_to=[], save_strategy="no", seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    before = OP_CALLS["lora_fwd_impl"]
    got = train(True)
    assert OP_CALLS["lora_fwd_impl"] > before
    want = train(False)
    assert len(got) == len(want) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-2, atol=2e-2)


def test_what_the_kernels_do_not_do_keeps_peft_forward():
    for extra, reason in ((dict(use_dora=True), "variant"), (dict(lora_bias=True), "lora_bias")):
        ref = _peft("llama", **extra)
        with pytest.warns(UserWarning, match=reason):
            ours = pk.patch_peft(copy.deepcopy(ref))
        ids = _ids()
        calls = OP_CALLS["lora_fwd_impl"]
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids=ids).logits, ref(input_ids=ids).logits)
        assert OP_CALLS["lora_fwd_impl"] == calls, f"{reason}: the kernels must not run"
    ref = _peft("llama", adapters=("a", "b"))
    ref.base_model.set_adapter(["a", "b"])  # two active adapters, summed
    with pytest.warns(UserWarning, match="several active adapters"):
        ours = pk.patch_peft(copy.deepcopy(ref))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=_ids()).logits, ref(input_ids=_ids()).logits)
    gpt2 = _peft("gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pk.patch_peft(gpt2)  # nothing falls back: no warning
