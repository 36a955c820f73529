"""The tuning cache and the tuner, on CPU: file format, lookup order, bucketed
keys, stale/corrupt files (ignored with a warning, never a crash), and the
tuner's flow (every config timed, the winner checked against the reference
before it is written) with the kernels under the interpreter and a fake timer."""
import json
import os

import pytest
import torch

from posttrain_kernels.autotune import cache, tune
from posttrain_kernels.autotune import config as C
from posttrain_kernels.autotune.lora import LORA_MATMUL, LORA_SHRINK

GPU = ("Test GPU 80GB", 90)
TRITON = __import__("triton").__version__
KEY = cache.make_key("bfloat16", N=4096, K=4096, layout="w", M=8192)
SPACE = LORA_MATMUL.configs("bfloat16", 90)
DEFAULT = LORA_MATMUL.default("bfloat16", 90, dict(N=4096, K=4096, layout="w", M=8192))
OTHER = next(c for c in SPACE if c != DEFAULT)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_KERNELS_CACHE_DIR", str(tmp_path / "user"))
    monkeypatch.setattr(cache, "SHIPPED_DIR", tmp_path / "shipped")
    for var in [v for v in os.environ if v.startswith("POSTTRAIN_KERNELS_CONFIG_")] + ["POSTTRAIN_KERNELS_TUNING"]:
        monkeypatch.delenv(var, raising=False)
    cache.reset()
    yield tmp_path
    cache.reset()


def _write(dirname, tmp, cfg, key=KEY, kernel="lora_matmul"):
    path = tmp / dirname / cache.file_name(GPU[0], TRITON)
    cache.write(path, GPU[0], TRITON, {kernel: {key: {"config": cfg.to_dict(), "ms": 1.0, "default_ms": 1.2}}})
    return path


def _select(key=KEY):
    return cache.select("lora_matmul", key, GPU, lambda: DEFAULT)


def test_key_buckets_token_count():
    assert cache.make_key("bfloat16", N=1, M=5000) == "bfloat16|N=1|M<=8192"
    assert cache.make_key("bfloat16", N=1, M=8192) == cache.make_key("bfloat16", N=1, M=4097)
    assert cache.make_key("bfloat16", N=1, M=1) == "bfloat16|N=1|M<=16"
    assert cache.file_name("NVIDIA H100 80GB HBM3", "3.6.0") == "NVIDIA_H100_80GB_HBM3__triton-3.6.0.json"


def test_key_parses_back_by_the_spec():
    """A key is read back through the kernel's spec (its key dimensions in
    order); a key of other dimensions is rejected, not guessed at."""
    assert cache.parse_key(LORA_MATMUL, KEY) == ("bfloat16", dict(N=4096, K=4096, layout="w", M=8192))
    key = cache.make_key("float16", K=4096, R=24, layout="aT", M=100)
    assert cache.parse_key(LORA_SHRINK, key) == ("float16", dict(K=4096, R=24, layout="aT", M=128))
    for bad in ("bfloat16|N=4096|w|M<=8192", "bfloat16|K=4096|N=4096|w|M<=8192", "bfloat16|N=4096|K=4096|w|8192"):
        with pytest.raises(ValueError):
            cache.parse_key(LORA_MATMUL, bad)


def test_file_format_round_trip(isolated_cache):
    path = _write("user", isolated_cache, OTHER)
    data = json.loads(path.read_text())
    assert data["format"] == cache.FORMAT and data["gpu"] == GPU[0] and data["triton"] == TRITON
    assert data["kernels"]["lora_matmul"][KEY]["config"] == OTHER.to_dict()
    assert cache.load_file(path, GPU[0], TRITON, 90) == {"lora_matmul": {KEY: OTHER}}


def test_lookup_order(isolated_cache, monkeypatch):
    assert _select() == DEFAULT, "no cache: the heuristic default"
    shipped = next(c for c in SPACE if c not in (DEFAULT, OTHER))
    _write("shipped", isolated_cache, shipped)
    assert _select() == shipped, "shipped defaults beat the heuristic"
    _write("user", isolated_cache, OTHER)
    assert _select() == OTHER, "the user cache beats the shipped defaults"
    monkeypatch.setenv("POSTTRAIN_KERNELS_TUNING", "off")
    assert _select() == DEFAULT, "tuning off: caches ignored"
    pin = C.Config.make(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)
    monkeypatch.setenv("POSTTRAIN_KERNELS_CONFIG_LORA_MATMUL", json.dumps(pin.to_dict()))
    assert _select() == pin, "a pinned config wins over everything"
    assert cache.select("lora_matmul", KEY, None, lambda: DEFAULT) == pin
    monkeypatch.delenv("POSTTRAIN_KERNELS_CONFIG_LORA_MATMUL")
    monkeypatch.delenv("POSTTRAIN_KERNELS_TUNING")
    assert cache.select("lora_matmul", KEY, None, lambda: DEFAULT) == DEFAULT, "interpreter: no cache"
    other_key = cache.make_key("bfloat16", N=4096, K=4096, layout="w", M=100)
    assert _select(other_key) == DEFAULT, "another token bucket is another entry"


def test_bad_pin_raises(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_KERNELS_CONFIG_LORA_MATMUL", "{not json")
    with pytest.raises(ValueError, match="POSTTRAIN_KERNELS_CONFIG_LORA_MATMUL"):
        _select()


@pytest.mark.parametrize("content", ["{corrupt", "[]", json.dumps({"format": 99, "kernels": {}}),
                                     json.dumps({"format": 1, "gpu": GPU[0], "triton": "0.0.1", "kernels": {}})],
                         ids=["corrupt-json", "not-an-object", "other-format", "other-triton"])
def test_unusable_file_is_ignored_with_warning(isolated_cache, content):
    path = isolated_cache / "user" / cache.file_name(GPU[0], TRITON)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.warns(UserWarning, match="ignoring tuning cache"):
        assert _select() == DEFAULT


def test_stale_entry_is_ignored_with_warning(isolated_cache):
    stale = C.Config.make(BLOCK_M=512, BLOCK_N=512, BLOCK_K=128, GROUP_M=8, num_warps=8, num_stages=5)
    path = _write("user", isolated_cache, stale)
    data = json.loads(path.read_text())
    data["kernels"]["lora_matmul"]["bfloat16|N=8|K=8|w|M<=16"] = {"config": {"BLOCK_M": "x"}}
    data["kernels"]["lora_matmul"]["bfloat16|R=8|w|M<=16"] = {"config": OTHER.to_dict()}  # not this kernel's key
    data["kernels"]["no_such_kernel"] = {KEY: {"config": OTHER.to_dict()}}
    path.write_text(json.dumps(data))
    cache.reset()
    with pytest.warns(UserWarning) as record:
        assert _select() == DEFAULT
    text = " ".join(str(w.message) for w in record)
    assert "not in this GPU's space" in text and "bad entry" in text


def test_tune_picks_fastest_checked_config_and_writes_cache(isolated_cache):
    torch.manual_seed(0)
    cases = tune.lora_cases(40, 48, 56, 4, torch.float16, torch.device("cpu"), 90)
    assert [c.kernel for c in cases] == ["lora_shrink", "lora_matmul_tma", "lora_dy", "lora_x", "lora_matmul_tma"]
    fake_ms = {}

    def timer(fn):
        # Deterministic fake timing: the last config of each space is fastest.
        cfg = next(v for k, v in os.environ.items() if k.startswith("POSTTRAIN_KERNELS_CONFIG_"))
        fake_ms.setdefault(cfg, 1.0 / (len(fake_ms) + 1))
        return fake_ms[cfg]

    rows = tune.tune_cases(cases, timer=timer, stream=open(os.devnull, "w"))
    assert all(r["config"] is not None for r in rows), rows
    for case, row in zip(cases, rows):
        assert C.Config.from_dict(row["config"]) in case.space
        assert row["rel_err"] < 2e-2
    assert not any(k.startswith("POSTTRAIN_KERNELS_CONFIG_") for k in os.environ), "pins restored"
    path = isolated_cache / "user" / cache.file_name(GPU[0], TRITON)
    cache.write(path, GPU[0], TRITON, tune.entries_from_rows(rows))
    for row in rows:
        got = cache.select(row["kernel"], row["key"], GPU, lambda: None)
        assert got == C.Config.from_dict(row["config"]), row["key"]


def test_tune_rejects_a_fast_wrong_config():
    good, bad = SPACE[0], SPACE[1]
    ref = torch.ones(4, 4)

    def run():
        cfg = C.Config.from_dict(json.loads(os.environ["POSTTRAIN_KERNELS_CONFIG_LORA_MATMUL"]))
        return ref * (2.0 if cfg == bad else 1.0)  # the "fast" config computes the wrong thing

    def timer(fn):
        cfg = C.Config.from_dict(json.loads(os.environ["POSTTRAIN_KERNELS_CONFIG_LORA_MATMUL"]))
        return 0.1 if cfg == bad else 1.0

    case = tune.Case("lora_matmul", KEY, [good, bad], good, run, ref)
    (row,) = tune.tune_cases([case], timer=timer, stream=open(os.devnull, "w"))
    assert row["config"] == good.to_dict(), "the wrong config must lose despite its time"


def test_presets():
    assert tune.preset_shapes("llama-3-8b") == [(4096, 1024), (4096, 4096), (4096, 14336), (14336, 4096)]
    with pytest.raises(ValueError, match="preset"):
        tune.preset_shapes("gpt-5")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_tune_command_needs_a_gpu(capsys):
    from posttrain_kernels.bench.cli import main
    assert main(["tune", "--preset", "llama-3-8b"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_memoised_pick_follows_pins_and_new_files(isolated_cache, monkeypatch):
    dims = dict(N=4096, K=4096, layout="w", M=8192)
    pick = lambda: cache.select_config(LORA_MATMUL, "bfloat16", GPU, **dims)  # noqa: E731
    assert pick() == DEFAULT
    _write("user", isolated_cache, OTHER)  # write() resets the memo
    assert pick() == OTHER
    pin = C.Config.make(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=2)
    monkeypatch.setenv("POSTTRAIN_KERNELS_CONFIG_LORA_MATMUL", json.dumps(pin.to_dict()))
    assert pick() == pin
    monkeypatch.delenv("POSTTRAIN_KERNELS_CONFIG_LORA_MATMUL")
    assert pick() == OTHER
