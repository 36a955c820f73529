"""Test harness shared by every op's tests.

* Without CUDA the Triton interpreter is switched on (before the package is
  imported), so the real kernels run on the CPU.
* NaN poisoning, on for every test (``@pytest.mark.no_nan_poison`` opts out):
  every float tensor made by ``torch.empty*`` is filled with NaN, so an
  element a kernel forgets to write fails the comparison.
* ``tiny_llama`` / ``tiny_gpt2``: factories of tiny Hugging Face models built
  from configs (no download), shared by the model-level tests.
* The versions a run used (torch, triton, transformers, peft, numpy, ...)
  are its first line, ``-q`` or not: CI installs the newest releases, so a
  red run says whether one changed.
* Markers: ``gpu`` tests skip without CUDA; ``aot`` tests compile for sm_80
  and sm_90 and need no GPU.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import posttrain_kernels  # noqa: E402,F401  (after the interpreter switch)


VERSIONED = ("torch", "triton", "transformers", "peft", "numpy", "safetensors", "kernels", "bitsandbytes")


def versions() -> str:
    """``python 3.11.7 torch 2.13.0+cpu triton 3.9.0 ...`` (distributions not installed are left out)."""
    import importlib.metadata
    import platform
    found = [f"python {platform.python_version()}"]
    for name in VERSIONED:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return " ".join(found) + (" (CUDA: " + torch.cuda.get_device_name() + ")" if HAS_CUDA else " (no CUDA)")


def pytest_sessionstart(session):
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller prints it
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("versions: " + versions())
    from posttrain_kernels.ops.backend import interpreter_enabled, interpreter_problem
    if interpreter_enabled() and interpreter_problem():  # one clear line, not a hundred failed tests
        pytest.exit(f"cannot run the interpreter tests: {interpreter_problem()}", returncode=4)


TEST_LOG = os.environ.get("POSTTRAIN_KERNELS_TEST_LOG")  # bench/gpu_check.sh: a line per test as it ends


_IS_WORKER = False


def pytest_configure(config):
    global _IS_WORKER
    _IS_WORKER = hasattr(config, "workerinput")  # (not $PYTEST_XDIST_WORKER: a pytest run by a test inherits it)


def pytest_runtest_logreport(report):
    """With ``POSTTRAIN_KERNELS_TEST_LOG``: ``<outcome> <seconds> <test id>`` appended the moment a
    test's outcome is known (the controller's hook under xdist), so a run killed at its time limit
    keeps every result it had."""
    if not TEST_LOG or _IS_WORKER:  # xdist workers: the controller writes it
        return
    if not (report.when == "call" or (report.when == "setup" and not report.passed)):
        return
    outcome = "error" if report.when == "setup" and report.failed else report.outcome
    os.makedirs(os.path.dirname(os.path.abspath(TEST_LOG)), exist_ok=True)
    with open(TEST_LOG, "a") as f:
        f.write(f"{outcome} {report.duration:.1f}s {report.nodeid}\n")


def pytest_collection_modifyitems(config, items):
    from helpers import COUNTING_ON_CPU  # a compile count runs the GPU tests on the CPU, launches stubbed
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA and not COUNTING_ON_CPU:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """Where the kernel tests run: CUDA if present, else CPU + interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(autouse=True)
def nan_poison(request, monkeypatch):
    if request.node.get_closest_marker("no_nan_poison"):
        yield
        return
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t):
        if t.is_floating_point() and t.device.type != "meta":
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(real_new_empty(self, *a, **k)))
    yield


@pytest.fixture(scope="session")
def tiny_llama():
    """``make(seed=0)``: a 2-layer Llama (hidden 32, GQA 2:1 heads, vocab 64) in eval mode."""
    transformers = pytest.importorskip("transformers")

    def make(seed: int = 0):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, vocab_size=64, bos_token_id=0,
                                       eos_token_id=0)
        return transformers.LlamaForCausalLM(cfg).eval()
    return make


@pytest.fixture(scope="session")
def tiny_gpt2():
    """``make(n_layer=2, seed=0)``: a GPT-2 body (Conv1D projections, n_embd 32) in eval mode."""
    transformers = pytest.importorskip("transformers")

    def make(n_layer: int = 2, seed: int = 0):
        torch.manual_seed(seed)
        cfg = transformers.GPT2Config(n_embd=32, n_layer=n_layer, n_head=2, n_positions=16, vocab_size=64,
                                      bos_token_id=0, eos_token_id=0)
        return transformers.GPT2Model(cfg).eval()
    return make
