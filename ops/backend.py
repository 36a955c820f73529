"""Which implementation runs: the Triton kernels or the PyTorch reference.

Rule (one place, used by every op):

* CUDA tensors run the Triton kernels.
* CPU tensors run the reference, unless ``TRITON_INTERPRET=1`` is set, in
  which case the Triton kernels run on the CPU through Triton's interpreter
  (that is how the test suite exercises the real kernels without a GPU).
* The override: the environment variable ``POSTTRAIN_KERNELS_BACKEND`` set
  to ``triton`` or ``reference`` forces that path for every op (``auto``, the
  default, applies the rule above). The functional API's ``backend=`` argument
  does the same for one call and wins over the variable.
"""
from __future__ import annotations

import collections
import functools
import os

import torch

BACKENDS = ("auto", "triton", "reference")
ENV_VAR = "POSTTRAIN_KERNELS_BACKEND"


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def release(version: str) -> tuple:
    """(major, minor) of a version string: ``"3.6.0+git1a2b"`` -> (3, 6)."""
    return tuple(int(p) for p in version.split("+")[0].split(".")[:2])


def interpreter_problem() -> str | None:
    """Why this environment's Triton interpreter cannot run the kernels, or None.

    Triton 3.6's interpreter calls ``int()`` on one-element numpy arrays,
    which numpy 2.4 refuses (later Triton releases do not; 3.9 runs with
    numpy 2.4): with Triton < 3.7 it needs numpy < 2.4."""
    import numpy
    import triton
    if release(triton.__version__) < (3, 7) and release(numpy.__version__) >= (2, 4):
        return (f"the Triton {triton.__version__} interpreter needs numpy < 2.4 (installed: numpy "
                f"{numpy.__version__}): pip install 'numpy<2.4', or a newer Triton")
    return None


def check_backend(backend: str | None) -> str:
    if backend in BACKENDS:  # already checked (the ops pass it on): the per-call fast path
        return backend
    if backend is None:
        backend = os.environ.get(ENV_VAR, "auto") or "auto"
    backend = backend.lower()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (argument or ${ENV_VAR}), got {backend!r}")
    return backend


def use_triton(device: torch.device, backend: str | None = None) -> bool:
    """True if the Triton kernels should run for tensors on ``device``."""
    backend = check_backend(backend)
    if backend == "reference":
        return False
    if device.type == "cuda":
        return True
    if device.type == "cpu" and interpreter_enabled():
        return True
    if backend == "triton":
        raise ValueError(
            f"backend='triton' needs CUDA tensors or TRITON_INTERPRET=1 for CPU tensors; got device {device}")
    return False


def compute_capability(device: torch.device) -> int | None:
    """sm number (90 for H100) of a CUDA device; None under the interpreter."""
    props = _props(device)
    return None if props is None else props[0]


def num_sms(device: torch.device) -> int:
    props = _props(device)
    return 4 if props is None else props[1]  # interpreter: a few programs, enough to exercise the split paths


def device_info(device: torch.device) -> tuple[str, int] | None:
    """(GPU name, compute capability) for the tuning cache; None off CUDA."""
    props = _props(device)
    return None if props is None else (props[2], props[0])


def _props(device: torch.device) -> tuple[int, int, str] | None:
    """(cc, SMs, name) of a CUDA device; off CUDA None, or the GPU a compile count pretends
    to plan for (``autotune/compile_only.py``: launches are stubbed in that mode)."""
    if device.type == "cuda":
        return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())
    return _PRETEND


# A compile count on a machine without the GPU (autotune/compile_only.py): launches are stubbed
# (POSTTRAIN_KERNELS_COMPILE_ONLY) and CPU tensors are planned as for this GPU. Honoured only in
# that mode, so a real run never plans for a GPU it does not have.
PRETEND_VAR, COMPILE_ONLY_VAR = "POSTTRAIN_KERNELS_PRETEND_GPU", "POSTTRAIN_KERNELS_COMPILE_ONLY"


def pretend_gpu() -> tuple | None:
    """(name, cc, SMs) of ``$POSTTRAIN_KERNELS_PRETEND_GPU`` ("NVIDIA H100 80GB HBM3:90:132"),
    in compile-only mode only; else None."""
    value = os.environ.get(PRETEND_VAR)
    if not value or not os.environ.get(COMPILE_ONLY_VAR):
        return None
    name, cc, sms = value.rsplit(":", 2)
    return name, int(cc), int(sms)


def _pretend_props() -> tuple | None:
    gpu = pretend_gpu()
    return None if gpu is None else (gpu[1], gpu[2], gpu[0])  # (cc, SMs, name), as _cuda_props


_PRETEND = _pretend_props()


@functools.lru_cache(maxsize=None)
def _cuda_props(index: int) -> tuple[int, int, str]:
    p = torch.cuda.get_device_properties(index)
    return 10 * p.major + p.minor, p.multi_processor_count, p.name


OP_CALLS: collections.Counter = collections.Counter()  # op implementation name -> calls (eager and traced)


def traced(first: torch.Tensor) -> bool:
    """Whether an op call must go through the registered op: torch.compile is tracing, or the
    tensors are meta tensors (the fake implementation gives the shapes)."""
    return torch.compiler.is_compiling() or first.device.type == "meta"


def call_op(op, impl, *args):
    """The registered torch.library op while torch.compile traces (an opaque
    node with a fake implementation) and for meta tensors (the fake
    implementation gives the shapes); the same implementation called directly
    in eager mode. ``args[0]`` is the op's first tensor.

    Why: on the H100 host, the eager dispatch of a Python custom op cost about
    0.5 ms of CPU per call, more than the kernels of a K=N=4096 LoRA layer
    take on the GPU, which made the training step launch-bound.
    """
    if traced(args[0]):
        return op(*args)
    OP_CALLS[impl.__name__] += 1  # what ran: tests (and users) check that a model really uses the kernels
    return impl(*args)


# ---------------------------------------------------------------- which GEMM kernel
GEMM_VAR = "POSTTRAIN_KERNELS_GEMM"
_SIXTEEN_BIT = (torch.float16, torch.bfloat16)


def aligned(*tensors) -> bool:
    """Every tensor's data starts on a 16-byte boundary (what TMA needs)."""
    for t in tensors:
        if t.data_ptr() % 16:
            return False
    return True


def misalignment(*tensors) -> tuple:
    """Each tensor's data pointer modulo 16: with the shapes, strides and
    dtypes, all a launch plan's choice of path depends on (memoised plans are
    keyed on it, so a plan built for aligned operands is never reused for a
    call whose operand a descriptor cannot address)."""
    return tuple(t.data_ptr() % 16 for t in tensors)


def gemm_path(x: torch.Tensor, w: torch.Tensor, n_out: int, choice: str | None, x_tma: bool = True) -> str:
    """``"tma"`` when the sm_90 GEMM may run on these operands, else ``"portable"``.

    ``choice``: the value of ``POSTTRAIN_KERNELS_GEMM`` (``auto`` when unset:
    the TMA kernel on sm_90 and newer; ``tma`` also under the interpreter,
    which runs tensor descriptors; ``portable``). TMA needs 16-bit data, the
    weight ``w`` ([n_out, K] view) with a unit-stride dimension and a 16-byte
    aligned other stride, and, when x is read through a descriptor too
    (``x_tma``), the same of x's rows and of the contiguous output's rows.
    Anything else takes the portable kernel, whatever the choice."""
    choice = (choice or "auto").lower()
    if choice not in ("auto", "tma", "portable"):
        raise ValueError(f"{GEMM_VAR} must be auto, tma or portable, got {choice!r}")
    if choice == "portable" or x.dtype not in _SIXTEEN_BIT:
        return "portable"
    if choice == "auto" and (compute_capability(x.device) or 0) < 90:
        return "portable"
    w_ok = tma_addressable(w) or tma_addressable(w.t())
    x_ok = not x_tma or (tma_addressable(x) and (n_out * x.element_size()) % 16 == 0)
    return "tma" if w_ok and x_ok else "portable"


def tma_addressable(t: torch.Tensor) -> bool:
    """A 2-D tensor a descriptor can read by rows: unit column stride, rows
    that do not overlap (a row stride of at least a row: an expanded view's
    stride 0, e.g. the upstream gradient of ``y.sum(0)``, is not something
    TMA was measured to accept, so it takes the portable path), and its row
    stride and base on 16-byte boundaries."""
    return (t.stride(1) == 1 and t.stride(0) >= max(t.shape[1], 1) and (t.stride(0) * t.element_size()) % 16 == 0
            and aligned(t))


def tma_row_stride(cols: int, dtype: torch.dtype) -> int:
    """The smallest row stride (elements) ≥ ``cols`` whose bytes are a
    multiple of 16: how a copy made for a descriptor is laid out."""
    per = 16 // dtype.itemsize
    return -(-cols // per) * per


def descriptor_copy(a: torch.Tensor, dtype: torch.dtype, row_stride: int) -> torch.Tensor:
    """``a`` (any leading dims, rows along the last) in ``dtype``, in fresh storage with rows
    ``row_stride`` elements apart (a new allocation: its base is aligned, unlike an offset view
    that ``.to`` would return as is): what a tensor descriptor reads when ``a`` itself cannot be."""
    out = torch.empty((*a.shape[:-1], row_stride), device=a.device, dtype=dtype)[..., :a.shape[-1]]
    out.copy_(a)
    return out


def _tma_allocator(size: int, alignment: int, stream) -> torch.Tensor:
    # The launchers run with their tensors' device current (``on_device``): the scratch goes there.
    return torch.empty(size, device=torch.device("cuda", torch.cuda.current_device()), dtype=torch.int8)


def ensure_tma_allocator() -> None:
    """Device-side tensor descriptors need a global scratch allocator. It is a
    per-thread context variable in Triton (autograd runs the backward on its
    own thread), so it is checked before every TMA launch and set where none
    is; an allocator the user set is kept."""
    try:
        from triton.runtime import _allocation
        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):  # another Triton layout: set ours
        pass
    import triton
    triton.set_allocator(_tma_allocator)


# ---------------------------------------------------------------- which device a launch runs on
def on_device(launcher):
    """Run ``launcher`` with the device of its first (tensor) argument
    current. Triton launches a kernel on the current CUDA device and the TMA
    scratch allocator allocates there, so a model spread over GPUs
    (``device_map="auto"``, pipeline stages, a pool per GPU) would otherwise
    launch layer k's kernels on cuda:0 while its tensors live on cuda:1.
    Every launcher entry point (the ``*_triton`` functions the ops call) is
    wrapped; the guard costs one device query when the device is already
    current."""
    @functools.wraps(launcher)
    def run(first, *args, **kwargs):
        device = first.device
        if device.type == "cuda" and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):
                return launcher(first, *args, **kwargs)
        return launcher(first, *args, **kwargs)
    run.on_device = True
    return run
