"""Test harness shared by every op's tests.

* Without CUDA the Triton interpreter is switched on (before the package is
  imported), so the real kernels run on the CPU.
* ``nan_poison``: every float tensor made by ``torch.empty*`` is filled with
  NaN, so an element a kernel forgets to write fails the comparison.
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


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """Where the kernel tests run: CUDA if present, else CPU + interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def nan_poison(monkeypatch):
    real_empty, real_empty_like, real_new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty

    def poison(t):
        if t.is_floating_point() and t.device.type != "meta":
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison(real_new_empty(self, *a, **k)))
    yield
