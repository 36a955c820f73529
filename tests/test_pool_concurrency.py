"""The adapter pool as a serving system uses it: several threads, nested batches, loads and
unloads while others serve, and loads that fail halfway.

Concurrency model (docs/reliability.md): a batch's adapter selection belongs to the thread
(context) that opened it, and nests; the slots a batch names are in use until it ends, so they
cannot be unloaded or evicted under it; a load writes a free slot (which no batch names) and is
published to ``batch`` only when complete. Every test interleaves threads with events, never
with timing, so none can flake.
"""
import json
import math
import threading

import pytest
import torch
from torch import nn

import posttrain_kernels as pk

pytestmark = pytest.mark.usefixtures("nan_poison")


def _model(device):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8)).to(device).eval()


def _pool(device, slots=3):
    pool = pk.AdapterPool(_model(device), target_modules=["0", "2"], max_adapters=slots, max_rank=4)
    torch.manual_seed(1)
    for name in ("a", "b", "c")[:slots]:
        pool.add(name, r=4, lora_alpha=8, init_lora_weights=False)
    return pool


def _x(device, rows=3):
    return torch.randn(rows, 16, generator=torch.Generator().manual_seed(7)).to(device)


@torch.no_grad()
def _out(pool, names, x):
    with pool.batch(names):
        return pool.model(x)


def _snapshot(pool):
    return {n: [t.clone() for t in (l.lora_A, l.lora_B, l.ranks, l.scales, l.lora_dropout)] + [dict(l._dropout)]
            for n, l in pool.layers.items()}, dict(pool.slots)


def _same(u, v):
    return u[1] == v[1] and all(
        all((torch.equal(p, q) if isinstance(p, torch.Tensor) else p == q) for p, q in zip(u[0][n], v[0][n]))
        for n in u[0])


class Worker(threading.Thread):
    """Runs ``steps`` (callables) in order, each after its ``go`` event; records results and errors."""

    def __init__(self, steps):
        super().__init__(daemon=True)
        self.steps, self.go = steps, [threading.Event() for _ in steps]
        self.done = [threading.Event() for _ in steps]
        self.results, self.error = [], None

    def run(self):
        try:
            for step, go, done in zip(self.steps, self.go, self.done):
                assert go.wait(30), "never released"
                self.results.append(step())
                done.set()
        except BaseException as e:  # noqa: BLE001  (reported by the test)
            self.error = e
            for done in self.done:
                done.set()

    def step(self, i):
        self.go[i].set()
        assert self.done[i].wait(60), "step did not finish"
        if self.error is not None:
            raise self.error


# ---------------------------------------------------------------- batches belong to their thread
def test_two_threads_serve_two_tenants_at_once(device):
    pool = _pool(device)
    x = _x(device)
    want_a, want_b = _out(pool, ["a"] * 3, x), _out(pool, ["b"] * 3, x)
    blocks = {}

    def enter(name):
        blocks[name] = pool.batch([name] * 3)
        blocks[name].__enter__()

    def forward():
        with torch.no_grad():
            return pool.model(x)

    ta = Worker([lambda: enter("a"), forward, lambda: blocks["a"].__exit__(None, None, None)])
    tb = Worker([lambda: enter("b"), forward, lambda: blocks["b"].__exit__(None, None, None)])
    ta.start(), tb.start()
    ta.step(0)
    tb.step(0)  # both blocks open: b entered after a
    ta.step(1)
    tb.step(1)
    ta.step(2), tb.step(2)
    assert torch.equal(ta.results[1], want_a), "thread a got another tenant's output"
    assert torch.equal(tb.results[1], want_b), "thread b got another tenant's output"
    # the main thread, in no block, sees the base model: the plain layers' output, bit for bit (an
    # all-None batch runs the multi-LoRA kernel, another GEMM whose last bit may differ on some CPUs)
    with torch.no_grad():
        base, plain = pool.model(x), _model(device)(x)
    torch.testing.assert_close(base, plain, rtol=0, atol=0)
    torch.testing.assert_close(base, _out(pool, [None] * 3, x), rtol=1e-6, atol=1e-6)


def test_nested_batches_restore_the_outer_one(device):
    pool = _pool(device)
    x = _x(device)
    want_a, want_b = _out(pool, ["a", "a", None], x), _out(pool, ["b", None, "b"], x)
    with torch.no_grad(), pool.batch(["a", "a", None]):
        with pool.batch(["b", None, "b"]):
            assert torch.equal(pool.model(x), want_b)
        assert torch.equal(pool.model(x), want_a), "leaving the inner block dropped the outer batch"


# ---------------------------------------------------------------- slots in use are not swapped under a batch
def test_unload_of_an_adapter_in_use_is_refused(device):
    pool = _pool(device)
    x = _x(device)
    want = _out(pool, ["a"] * 3, x)
    with torch.no_grad(), pool.batch(["a"] * 3):
        with pytest.raises(RuntimeError, match="in use"):
            pool.unload("a")
        assert torch.equal(pool.model(x), want)
    pool.unload("a")
    assert "a" not in pool.names


def test_eviction_skips_adapters_in_use(device, tmp_path):
    pool = _pool(device)  # full: a, b, c
    x = _x(device)
    want = _out(pool, ["a"] * 3, x)
    _out(pool, ["b"], x[:1]), _out(pool, ["c"], x[:1])  # a is now the least recently used
    pool.save("b", tmp_path / "b")
    with torch.no_grad(), pool.batch(["a"] * 3):
        pool.load("d", tmp_path / "b", evict=True)  # evicts b (LRU among the adapters not in use), not a
        assert set(pool.names) == {"a", "c", "d"}
        assert torch.equal(pool.model(x), want)
    with torch.no_grad(), pool.batch(["a", "c", "d"]):
        before = _snapshot(pool)
        with pytest.raises(RuntimeError, match="in use"):
            pool.add("e", r=2, evict=True)  # every adapter is in use: nothing to evict
        assert _same(before, _snapshot(pool))


def test_load_and_unload_while_another_thread_serves(device, tmp_path):
    pool = _pool(device, slots=3)
    pool.unload("c")
    x = _x(device)
    want = _out(pool, ["a", "b", None], x)
    pool.save("b", tmp_path / "b")
    block = pool.batch(["a", "b", None])

    def forward():
        with torch.no_grad():
            return pool.model(x)

    server = Worker([block.__enter__, forward, lambda: block.__exit__(None, None, None)])
    server.start()
    server.step(0)  # the server's batch is open on a and b
    with pytest.raises(RuntimeError, match="in use"):
        pool.unload("a")
    pool.load("c", tmp_path / "b")  # a free slot: no open batch names it
    server.step(1)
    server.step(2)
    assert torch.equal(server.results[1], want), "a concurrent load or unload changed a served tenant"
    pool.unload("a")  # the batch has ended


def test_tensor_batches_keep_every_loaded_slot(device):
    """Slot ids given as a tensor may name any slot: every loaded adapter stays until the batch ends."""
    pool = _pool(device)
    with pool.batch(torch.tensor([0, 1, 2], device=device)):
        with pytest.raises(RuntimeError, match="in use"):
            pool.unload("c")
    pool.unload("c")


# ---------------------------------------------------------------- a failed load changes nothing
def _adapter_dir(pool, tmp_path, **config):
    path = tmp_path / "bad"
    pool.save("a", path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(config)
    (path / "adapter_config.json").write_text(json.dumps(cfg))  # NaN / Infinity as Python's json writes them
    return path


@pytest.mark.parametrize("alpha", [math.nan, math.inf, 1e40], ids=["nan", "inf", "1e40"])
@pytest.mark.parametrize("where", ["lora_alpha", "alpha_pattern"])
def test_bad_alpha_is_refused_before_any_change(alpha, where, device, tmp_path):
    pool = _pool(device)  # full
    config = {"lora_alpha": alpha} if where == "lora_alpha" else {"alpha_pattern": {"0": alpha}}
    path = _adapter_dir(pool, tmp_path, **config)
    before = _snapshot(pool)
    with pytest.raises(ValueError, match="alpha"):
        pool.load("x", path, evict=True)
    assert _same(before, _snapshot(pool)), "a refused load evicted a tenant"
    pool.unload("c")  # a free slot, without evict
    before = _snapshot(pool)
    with pytest.raises(ValueError, match="alpha"):
        pool.load("x", path)
    assert _same(before, _snapshot(pool)), "a refused load half-wrote a free slot"


@pytest.mark.parametrize("r", [True, 2.0, 0, 5])
def test_add_with_a_bad_rank_evicts_nothing(r, device):
    pool = _pool(device)
    before = _snapshot(pool)
    with pytest.raises(ValueError, match="^r"):
        pool.add("x", r=r, evict=True)
    assert _same(before, _snapshot(pool))


@pytest.mark.parametrize("bad", ["scale", "meta-a", "meta-b", "dropout"])
def test_set_slot_checks_everything_before_writing(bad, device):
    layer = pk.MultiLoRALinear(16, 8, max_adapters=2, max_rank=4).to(device)
    g = torch.Generator().manual_seed(3)
    layer.set_slot(1, torch.randn(3, 16, generator=g).to(device), torch.randn(8, 3, generator=g).to(device), 0.5,
                   dropout=0.1)
    before = [t.clone() for t in (layer.lora_A, layer.lora_B, layer.ranks, layer.scales, layer.lora_dropout)]
    a, b, kw = torch.randn(2, 16).to(device), torch.randn(8, 2).to(device), dict(scale=2.0, dropout=0.3)
    if bad == "scale":
        kw["scale"] = 1e39  # finite in float64, not in the fp32 scales
    elif bad == "meta-a":
        a = a.to("meta")
    elif bad == "meta-b":
        b = b.to("meta")
    else:
        kw["dropout"] = 1.0
    with pytest.raises(ValueError):
        layer.set_slot(1, a, b, **kw)
    after = [layer.lora_A, layer.lora_B, layer.ranks, layer.scales, layer.lora_dropout]
    assert all(torch.equal(u, v) for u, v in zip(before, after)) and layer._dropout == {1: 0.1}


def test_a_forward_recomputed_in_backward_finds_its_batch(device, monkeypatch):
    """On CUDA, autograd's backward runs on its own threads, outside the caller's context: a
    forward recomputed there (activation checkpointing) takes the one open batch of the pool,
    and refuses to guess between several."""
    from posttrain_kernels.ops.multi_lora import layer as ML
    pool = _pool(device)
    group = pool._group
    seen = {}

    def engine_thread(key):  # a thread with no context of its own, "inside a backward"
        monkeypatch.setattr(torch._C, "_current_graph_task_id", lambda: 0)
        try:
            seen[key] = ML.current_selection(group)
        except RuntimeError as e:
            seen[key] = e

    t = threading.Thread(target=engine_thread, args=("none",))
    t.start(), t.join()
    with pool.batch(["a"]) as ids:
        t = threading.Thread(target=engine_thread, args=("one",))
        t.start(), t.join()
        block = pool.batch(["b"])
        other = Worker([block.__enter__, lambda: block.__exit__(None, None, None)])
        other.start()
        other.step(0)  # a second batch, open in another thread
        t = threading.Thread(target=engine_thread, args=("two",))
        t.start(), t.join()
        other.step(1)
    monkeypatch.undo()
    assert seen["none"] is None
    assert seen["one"] is not None and seen["one"].ids is ids
    assert isinstance(seen["two"], RuntimeError) and "several" in str(seen["two"])


# ---------------------------------------------------------------- state that survives a round trip
@pytest.mark.parametrize("target_merged", [False, True], ids=["into-unmerged", "into-merged"])
def test_merged_lora_linear_state_dict_round_trip(target_merged, device):
    """A merged layer's state_dict loaded into a fresh layer does not apply the delta twice."""
    torch.manual_seed(0)
    layer = pk.LoRALinear(16, 12, r=4, lora_alpha=8, init_lora_weights=False).to(device).eval()
    x = torch.randn(5, 16, device=device)
    with torch.no_grad():
        want = layer(x)
        layer.merge()
        merged_out = layer(x)
    fresh = pk.LoRALinear(16, 12, r=4, lora_alpha=8).to(device).eval()
    if target_merged:
        fresh.merge()
    fresh.load_state_dict(layer.state_dict())
    assert fresh.merged == target_merged and layer.merged
    with torch.no_grad():
        got = fresh(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_out, want, rtol=1e-5, atol=1e-5)


def test_multi_lora_state_dict_keeps_slot_dropout(device):
    layer = pk.MultiLoRALinear(16, 8, max_adapters=2, max_rank=4).to(device)
    g = torch.Generator().manual_seed(3)
    layer.set_slot(0, torch.randn(4, 16, generator=g).to(device), torch.randn(8, 4, generator=g).to(device), 0.5,
                   dropout=0.4)
    fresh = pk.MultiLoRALinear(16, 8, max_adapters=2, max_rank=4).to(device)
    fresh.load_state_dict(layer.state_dict())
    x = torch.randn(6, 16, generator=g).to(device)
    outs = []
    for m in (layer, fresh):
        m.train()
        m.adapter_ids = torch.zeros(6, dtype=torch.int64, device=device)
        torch.manual_seed(11)
        with torch.no_grad():
            outs.append(m(x))
    assert fresh._dropout == {0: pytest.approx(0.4)}
    assert torch.equal(outs[0], outs[1]), "training-mode output differs after a state_dict round trip"
