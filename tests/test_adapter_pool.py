"""AdapterPool on a tiny Llama built from a config (no download): the pool's
logits for a mixed batch equal PEFT's mixed-batch logits (``adapter_names=``)
for the same adapters; per-token ids; malformed or mismatched adapters raise
and leave the pool exactly as it was; a full pool raises or evicts the least
recently used adapter."""
import copy

import pytest
import torch

import posttrain_kernels as pk

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=64, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Three PEFT adapters of different ranks, alphas and targets, saved with save_pretrained."""
    out = {}
    for i, (name, r, alpha, targets) in enumerate([("a", 4, 8, TARGETS), ("b", 8, 4, ["q_proj", "v_proj"]),
                                                   ("c", 16, 16, ["o_proj", "up_proj"])]):
        torch.manual_seed(10 + i)
        model = peft.get_peft_model(_llama(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                              init_lora_weights=False))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(str(path))
        out[name] = path
    return out


def _ids(device, rows=3):
    return torch.randint(0, 64, (rows, 6), generator=torch.Generator().manual_seed(5)).to(device)


def test_mixed_batch_matches_peft(adapters, device):
    base = _llama().to(device)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapters["a"]), adapter_name="a")
    peft_model.load_adapter(str(adapters["b"]), adapter_name="b")
    peft_model.eval()
    ids = _ids(device, rows=4)
    want = peft_model(ids, adapter_names=["a", "b", "__base__", "a"]).logits

    pool = pk.AdapterPool(base, target_modules=TARGETS, max_adapters=4, max_rank=16)
    pool.load("a", adapters["a"])
    pool.load("b", adapters["b"])
    with pool.batch(["a", "b", None, "a"]):
        got = base(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # outside the block the model is the base model again
    with torch.no_grad():
        plain = _llama().to(device)(ids).logits
    torch.testing.assert_close(base(ids).logits, plain, rtol=1e-5, atol=1e-5)


def test_per_token_ids_for_packed_batches(adapters, device):
    base = _llama().to(device)
    pool = pk.AdapterPool(base, target_modules=TARGETS, max_adapters=4, max_rank=16)
    pool.load("a", adapters["a"])
    pool.load("c", adapters["c"])
    ids = _ids(device, rows=2)
    with pool.batch(["a", "c"]):
        per_row = base(ids).logits
    per_token = torch.tensor([pool.slot("a")] * 6 + [pool.slot("c")] * 6, device=device)
    with pool.batch(per_token):
        got = base(ids).logits
    torch.testing.assert_close(got, per_row, rtol=0, atol=0)


def _snapshot(pool):
    return {n: (l.lora_A.clone(), l.lora_B.clone(), l.ranks.clone(), l.scales.clone())
            for n, l in pool.layers.items()}, dict(pool.slots)


def _same(a, b):
    return a[1] == b[1] and all(all(torch.equal(u, v) for u, v in zip(a[0][n], b[0][n])) for n in a[0])


def test_bad_adapters_leave_pool_unchanged(adapters, tmp_path, device):
    base = _llama().to(device)
    pool = pk.AdapterPool(base, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"], max_adapters=2,
                          max_rank=8)
    pool.load("b", adapters["b"])
    before = _snapshot(pool)
    with pytest.raises(ValueError, match="max_rank"):
        pool.load("c16", adapters["c"])  # rank 16 > 8
    with pytest.raises(ValueError, match="not a layer of this pool"):
        pool.load("a", adapters["a"])  # also targets k_proj, which the pool lacks
    (tmp_path / "adapter_config.json").write_text("{broken")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="JSON"):
        pool.load("x", tmp_path)
    with pytest.raises(ValueError, match="already loaded"):
        pool.load("b", adapters["b"])
    assert _same(before, _snapshot(pool))


def test_full_pool_raises_or_evicts_lru(adapters, device):
    base = _llama().to(device)
    pool = pk.AdapterPool(base, target_modules=["q_proj", "v_proj"], max_adapters=2, max_rank=8)
    pool.load("b1", adapters["b"])
    pool.load("b2", adapters["b"])
    with pytest.raises(RuntimeError, match="full"):
        pool.load("b3", adapters["b"])
    with pool.batch(["b1"]):  # b1 is now the most recently used
        pass
    slot = pool.load("b3", adapters["b"], evict=True)
    assert set(pool.names) == {"b1", "b3"} and slot == 1
    pool.unload("b1")
    assert pool.names == ["b3"]
    assert all((layer.ranks[0] == 0).item() for layer in pool.layers.values()), "unload empties the slot"
    with pytest.raises(KeyError):
        pool.slot("b1")
