"""AdapterPool on a tiny Llama built from a config (no download): the pool's
logits for a mixed batch equal PEFT's mixed-batch logits (``adapter_names=``)
for the same adapters; per-token ids; malformed or mismatched adapters raise
and leave the pool exactly as it was; a full pool raises or evicts the least
recently used adapter; adapters trained in one mixed batch get PEFT's
gradients and save to directories PEFT loads (rank/alpha patterns kept)."""
import copy
import json

import pytest
import torch

import posttrain_kernels as pk

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama):
    """PEFT adapters of different ranks, alphas and targets (d: per-module rank
    and alpha patterns), saved with save_pretrained."""
    out = {}
    patterns = dict(rank_pattern={"o_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3})
    for i, (name, r, alpha, targets, extra) in enumerate([
            ("a", 4, 8, TARGETS, {}), ("b", 8, 4, ["q_proj", "v_proj"], {}), ("c", 16, 16, ["o_proj", "up_proj"], {}),
            ("d", 4, 8, ["q_proj", "o_proj"], patterns)]):
        torch.manual_seed(10 + i)
        model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                              init_lora_weights=False, **extra))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(str(path))
        out[name] = path
    return out


def _ids(device, rows=3):
    return torch.randint(0, 64, (rows, 6), generator=torch.Generator().manual_seed(5)).to(device)


def test_mixed_batch_matches_peft(adapters, device, tiny_llama):
    base = tiny_llama().to(device)
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
        plain = tiny_llama().to(device)(ids).logits
    torch.testing.assert_close(base(ids).logits, plain, rtol=1e-5, atol=1e-5)


def test_per_token_ids_for_packed_batches(adapters, device, tiny_llama):
    base = tiny_llama().to(device)
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


def test_bad_adapters_leave_pool_unchanged(adapters, tmp_path, device, tiny_llama):
    base = tiny_llama().to(device)
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


def test_full_pool_raises_or_evicts_lru(adapters, device, tiny_llama):
    base = tiny_llama().to(device)
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


def _peft_lora(peft_model, name, which):
    return peft_model.base_model.model.get_submodule(name).__getattr__(f"lora_{which}")["default"].weight


def test_train_adapters_in_one_mixed_batch_like_peft(tmp_path, device, tiny_llama):
    """Two new adapters (ranks 4 and 8, one with rsLoRA) trained in one mixed
    batch: each slot's gradient equals PEFT's gradient of that adapter on its
    own rows; after an optimizer step, ``save`` writes adapters that PEFT,
    and a fresh pool, load back with the pool's logits."""
    model = tiny_llama().to(device)
    base = copy.deepcopy(model)
    pool = pk.AdapterPool(model, target_modules=TARGETS, max_adapters=3, max_rank=8)
    torch.manual_seed(1)
    pool.add("a", r=4, lora_alpha=8, init_lora_weights=False)
    pool.add("b", r=8, lora_alpha=4, use_rslora=True, init_lora_weights=False)
    for name in ("a", "b"):
        pool.save(name, tmp_path / f"init-{name}")
    params = pool.trainable_parameters()
    ids = _ids(device, rows=4)
    rows = ["a", "b", None, "a"]
    with pool.batch(rows):
        logits = model(ids).logits
    cot = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2)).to(device)
    (logits * cot).sum().backward()

    for name in ("a", "b"):
        ref_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / f"init-{name}"),
                                                   is_trainable=True)
        mine = [i for i, n in enumerate(rows) if n == name]
        (ref_model(ids[mine]).logits * cot[mine]).sum().backward()
        slot = pool.slot(name)
        for n, layer in pool.layers.items():
            r = int(layer.ranks[slot])
            torch.testing.assert_close(layer.lora_A.grad[slot, :r], _peft_lora(ref_model, n, "A").grad,
                                       rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {n} dA: {m}")
            torch.testing.assert_close(layer.lora_B.grad[slot, :, :r], _peft_lora(ref_model, n, "B").grad,
                                       rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} {n} dB: {m}")
    assert all(not layer.lora_A.grad[2].any() for layer in pool.layers.values()), "the free slot gets no gradient"

    torch.optim.SGD(params, lr=0.5).step()
    for name in ("a", "b"):
        pool.save(name, tmp_path / name)
        with torch.no_grad(), pool.batch([name] * 2):
            got = model(ids[:2]).logits
        want = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / name))(ids[:2]).logits
        torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
        fresh = pk.AdapterPool(copy.deepcopy(base), target_modules=TARGETS, max_adapters=1, max_rank=8)
        fresh.load(name, tmp_path / name)
        with torch.no_grad(), fresh.batch([name] * 2):
            torch.testing.assert_close(fresh.model(ids[:2]).logits, got, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="^r"):
        pool.add("c", r=9)
    with pytest.raises(ValueError, match="^init_lora_weights"):
        pool.add("c", r=2, init_lora_weights="orthogonal")
    assert pool.names == ["a", "b"], "a rejected add leaves the pool as it was"


def test_save_keeps_rank_and_alpha_patterns(adapters, tmp_path, device, tiny_llama):
    """An adapter whose modules differ in rank and alpha (PEFT's rank_pattern /
    alpha_pattern) goes through load and save unchanged: PEFT reads the saved
    directory back with the pool's logits."""
    base = tiny_llama().to(device)
    pool = pk.AdapterPool(copy.deepcopy(base), target_modules=TARGETS, max_adapters=2, max_rank=8)
    pool.load("d", adapters["d"])
    ids = _ids(device, rows=2)
    with torch.no_grad(), pool.batch(["d", "d"]):
        got = pool.model(ids).logits
    want = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapters["d"]))(ids).logits
    torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-4)
    pool.save("d", tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["o_proj", "q_proj"]
    assert set(config["rank_pattern"].values()) == {2} and set(config["alpha_pattern"].values()) == {3}
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))(ids).logits
    torch.testing.assert_close(got, again.detach(), rtol=1e-4, atol=1e-4)


def test_lora_dropout_per_adapter(tmp_path, device, tiny_llama):
    """An adapter's lora_dropout acts on its rows in training mode only, is
    written by ``save`` and read back by ``load``; other rows are untouched."""
    model = tiny_llama().to(device)
    pool = pk.AdapterPool(model, target_modules=["q_proj", "v_proj"], max_adapters=2, max_rank=4)
    pool.add("drop", r=4, lora_dropout=0.5, init_lora_weights=False)
    pool.add("keep", r=4, init_lora_weights=False)
    ids = _ids(device, rows=3)
    names = ["drop", "keep", None]
    with torch.no_grad(), pool.batch(names):
        model.eval()
        ev = model(ids).logits
        model.train()
        tr1, tr2 = model(ids).logits, model(ids).logits
    assert not torch.allclose(tr1[0], ev[0]) and not torch.allclose(tr1[0], tr2[0]), "dropout acts in training"
    torch.testing.assert_close(tr1[1:], ev[1:], rtol=1e-5, atol=1e-5, msg="rows of other adapters are untouched")
    pool.save("drop", tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_dropout"] == 0.5
    fresh = pk.AdapterPool(tiny_llama().to(device), target_modules=["q_proj", "v_proj"], max_adapters=1, max_rank=4)
    slot = fresh.load("drop", tmp_path)
    assert all(float(layer.lora_dropout[slot]) == 0.5 for layer in fresh.layers.values())
    with pytest.raises(ValueError, match="^lora_dropout"):
        pool.add("bad", r=2, lora_dropout=1.0)


def _tamper(src, dst, how):
    """A copy of the PEFT adapter directory ``src`` made inconsistent in one way."""
    from safetensors.torch import load_file, save_file
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(str(src / "adapter_model.safetensors"))
    if how == "r-mismatch":
        config["r"] = 2 * config["r"]  # rank-8 tensors under r=16
    elif how == "targets-without-weights":
        config["target_modules"] = sorted(set(config["target_modules"]) | {"o_proj"})
    elif how == "integer-tensors":
        tensors = {k: (v * 100).to(torch.int32) for k, v in tensors.items()}
    elif how == "alpha-pattern-text":
        config["alpha_pattern"] = {"q_proj": "sixteen"}
    elif how == "rank-zero":
        tensors = {k: v[:0] if ".lora_A." in k else v[:, :0] for k, v in tensors.items()}
        config["r"] = 0
    (dst / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.mark.parametrize("how", ["r-mismatch", "targets-without-weights", "integer-tensors", "alpha-pattern-text",
                                 "rank-zero"])
def test_inconsistent_adapters_rejected_by_pool_and_load_adapter(adapters, tmp_path, how, tiny_llama):
    """One validator for both loaders: an adapter whose config and tensors
    disagree raises ValueError naming ``path`` and changes nothing."""
    bad = _tamper(adapters["b"], tmp_path / how, how)
    pool = pk.AdapterPool(tiny_llama(), target_modules=["q_proj", "v_proj", "o_proj"], max_adapters=2, max_rank=16)
    pool.load("b", adapters["b"])
    before = _snapshot(pool)
    with pytest.raises(ValueError, match="^path"):
        pool.load("bad", bad)
    assert _same(before, _snapshot(pool)), "a rejected load changed the pool"
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="^path"):
        pk.load_adapter(model, bad)
    assert model.state_dict().keys() == state.keys() and all(torch.equal(v, state[k])
                                                             for k, v in model.state_dict().items())


def test_set_slot_checks_everything_before_writing():
    layer = pk.MultiLoRALinear(8, 6, max_adapters=2, max_rank=4)
    layer.set_slot(1, torch.randn(3, 8), torch.randn(6, 3), 2.0, dropout=0.1)
    before = [t.clone() for t in (layer.lora_A, layer.lora_B, layer.ranks, layer.scales, layer.lora_dropout)]
    for kwargs, name in ((dict(lora_b=torch.randn(5, 3)), "lora_b"), (dict(lora_a=torch.randn(5, 8)), "lora_a"),
                         (dict(scale=float("nan")), "scale"), (dict(dropout=1.0), "dropout"),
                         (dict(slot=2), "slot"), (dict(slice_index=0), "slice_index"),
                         (dict(lora_a=torch.ones(3, 8, dtype=torch.int64)), "lora_a")):
        args = {**dict(slot=1, lora_a=torch.randn(3, 8), lora_b=torch.randn(6, 3), scale=1.0), **kwargs}
        with pytest.raises(ValueError, match=f"^{name}"):
            layer.set_slot(**args)
        after = (layer.lora_A, layer.lora_B, layer.ranks, layer.scales, layer.lora_dropout)
        assert all(torch.equal(a, b) for a, b in zip(before, after)), f"{name}: a rejected write changed the slot"


def test_batch_names_and_ids_must_fit(adapters, device, tiny_llama):
    pool = pk.AdapterPool(tiny_llama().to(device), target_modules=["q_proj", "v_proj"], max_adapters=2, max_rank=8)
    pool.load("b", adapters["b"])
    ids = _ids(device, rows=2)[:, :3]  # a [2, 3] batch
    # per-token counts, a count that does not divide, and one name for two rows: outside generate() a name
    # never spreads over several rows (a tenant's rows must not silently run another tenant's adapter)
    for names in (["b"] * 6, ["b"] * 3, ["b", None, "b"], ["b"]):
        with pytest.raises(ValueError, match="^adapters"), pool.batch(names):
            pool.model(ids)
    with pytest.raises(ValueError, match="^adapters"):
        with pool.batch(["nope", None]):
            pass
    for bad in (torch.tensor([5, 0]), torch.tensor([-2, 0]), torch.tensor([0.0, 1.0])):
        with pytest.raises(ValueError, match="^adapters"):
            with pool.batch(bad.to(device)):
                pass
    with pytest.raises(ValueError, match="^adapter_ids"), pool.batch(torch.zeros(5, dtype=torch.int64, device=device)):
        pool.model(ids)  # per-token ids must count the tokens


def _peft_pair(adapters, tiny_llama):
    """PEFT holding adapters b and d, and our pool holding the same."""
    base = tiny_llama()
    base.generation_config.pad_token_id = 2
    ref = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(adapters["b"]), adapter_name="b").eval()
    ref.load_adapter(str(adapters["d"]), adapter_name="d")
    pool = pk.AdapterPool(base, target_modules=["q_proj", "v_proj", "o_proj"], max_adapters=2, max_rank=8)
    pool.load("b", adapters["b"])
    pool.load("d", adapters["d"])
    return ref, pool


@pytest.mark.parametrize("kwargs", [dict(do_sample=False), dict(do_sample=True, top_k=0), dict(num_beams=2),
                                    dict(num_beams=2, num_return_sequences=2),
                                    dict(do_sample=True, num_return_sequences=2)],
                         ids=["greedy", "sampling", "beams", "beams-2-sequences", "sampling-2-sequences"])
def test_generate_like_peft(adapters, kwargs, tiny_llama):
    """``model.generate`` inside ``pool.batch(names)`` gives PEFT's tokens for
    ``generate(adapter_names=...)``: left-padded rows, a base-model row, beams
    and several returned sequences (each name covers its row's copies)."""
    ref, pool = _peft_pair(adapters, tiny_llama)
    ids = torch.randint(3, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 2, 0  # left padding
    names = ["b", None, "d"]
    peft_names = [n or "__base__" for n in names]
    if kwargs.get("do_sample") and kwargs.get("num_return_sequences", 1) > 1:
        # PEFT expands adapter_names for beams only: give it one name per returned sequence.
        peft_names = [n for n in peft_names for _ in range(kwargs["num_return_sequences"])]
    torch.manual_seed(0)
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, adapter_names=peft_names, **kwargs)
    torch.manual_seed(0)
    with pool.batch(names):
        got = pool.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, **kwargs)
    assert torch.equal(got, want), f"tokens differ:\n{got}\n{want}"
