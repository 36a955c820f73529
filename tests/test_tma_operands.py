"""Every operand of every sm_90 (TMA) kernel, in every layout a caller can hand over.

The interpreter runs tensor descriptors and refuses what TMA cannot address
(a base off 16 bytes, a row stride off 16 bytes), which on a GPU is a CUDA
error that kills the context. Each case first makes a call that builds a TMA
plan for the same shapes (contiguous, aligned operands), then calls again with
one operand in another layout: an odd storage offset (same shapes and strides:
what a plan keyed on too little would reuse), a padded row stride, a
transposed view, an expanded view (row stride 0), and shapes whose rows are
not 16-byte multiples. It asserts the path the call took and its result
against the fp64 reference, gradients included.

Also here: every launcher runs with its tensors' CUDA device current (checked
with fake devices: the launchers are stubbed, nothing reaches CUDA).
"""
import pytest
import torch

import posttrain_kernels as pk
from helpers import ATOL, assert_close_rule
from posttrain_kernels.ops import backend
from posttrain_kernels.ops.lora import launch as L
from posttrain_kernels.ops.lora import reference as lora_ref
from posttrain_kernels.ops.multi_lora import launch as ML
from posttrain_kernels.ops.multi_lora import reference as multi_ref

pytestmark = pytest.mark.usefixtures("nan_poison")
F16 = torch.float16


def relayout(t, kind):
    """``t`` (2-D) with the same values in another layout; the storage around it is NaN."""
    rows, cols = t.shape
    if kind == "contiguous":
        out = torch.empty_like(t, memory_format=torch.contiguous_format)
    elif kind == "offset":  # one element in: same shape and strides, base 2 bytes off 16
        out = torch.empty(rows * cols + 16, device=t.device, dtype=t.dtype)[1:1 + rows * cols].view(rows, cols)
    elif kind == "padded":  # rows 8 elements apart more than needed (16-byte multiples when cols is)
        out = torch.empty(rows, cols + 8, device=t.device, dtype=t.dtype)[:, :cols]
    elif kind == "transposed":
        out = torch.empty(cols, rows, device=t.device, dtype=t.dtype).t()
    elif kind == "stride0":  # every row the first one: an expanded view
        return t[:1].clone().expand(rows, cols)
    else:
        raise ValueError(kind)
    return out.copy_(t)


class RecordingPlans(dict):
    """``launch._PLANS`` that records which plans the calls looked up."""

    def __init__(self):
        super().__init__()
        self.looked_up = []

    def get(self, key, default=None):
        self.looked_up.append(key)
        return super().get(key, default)

    def used(self, kind):
        """The plans the calls since the last ``reset`` used, of ``"fwd"`` or ``"bwd"``."""
        return [self[k] for k in self.looked_up if k[0] == kind]

    def reset(self):
        self.looked_up = []


def _tma_or_skip(device, monkeypatch):
    """The interpreter runs the TMA kernels when asked to; a GPU runs them on sm_90 and newer."""
    if device.type == "cpu":
        monkeypatch.setenv(backend.GEMM_VAR, "tma")
    elif (backend.compute_capability(device) or 0) < 90:
        pytest.skip("the TMA kernels need sm_90")


@pytest.fixture
def plans(device, monkeypatch):
    _tma_or_skip(device, monkeypatch)
    recording = RecordingPlans()
    monkeypatch.setattr(L, "_PLANS", recording)
    return recording


def _lora_inputs(M, K, N, r, adapter_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device, F16)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, F16)
    a = (torch.randn(r, K, generator=g) / K ** 0.5).to(device, adapter_dtype)
    b = (torch.randn(N, r, generator=g) / r ** 0.5).to(device, adapter_dtype)
    bias = torch.randn(N, generator=g).to(device, F16)
    dy = torch.randn(M, N, generator=g).to(device, F16)
    return dict(x=x, w=w, a=a, b=b, bias=bias, dy=dy)


def _lora_run(ops, scale=0.7):
    """(y, dx, dA, dB, dbias) through the public op, every operand in the layout given."""
    x, a, b, bias = (ops[k].detach().requires_grad_(True) for k in ("x", "a", "b", "bias"))
    y = pk.lora_linear(x, ops["w"], a, b, scale, bias)
    y.backward(ops["dy"])
    return y.detach(), x.grad, a.grad, b.grad, bias.grad


def _lora_check(ours, ops, scale=0.7):
    for dtype, name in ((torch.float64, "hi"), (F16, "lo")):
        leaves = {k: ops[k].detach().to(dtype if k != "w" else dtype).contiguous().requires_grad_(k != "w")
                  for k in ("x", "w", "a", "b", "bias")}
        y = lora_ref.lora_linear_ref(leaves["x"], leaves["w"], leaves["a"], leaves["b"], scale, leaves["bias"],
                                     compute_dtype=dtype)
        y.backward(ops["dy"].to(dtype))
        got = (y.detach(), *(leaves[k].grad for k in ("x", "a", "b", "bias")))
        if name == "hi":
            hi = got
        else:
            lo = got
    for name, o, h, low in zip(("y", "dx", "dA", "dB", "dbias"), ours, hi, lo):
        assert_close_rule(name, o, low, h, ATOL[F16])


# (operand, layout, TMA expected for the GEMM that reads it through a descriptor)
FORWARD_CASES = [
    ("x", "offset", False), ("x", "padded", True), ("x", "transposed", False), ("x", "stride0", False),
    ("w", "offset", False), ("w", "padded", True), ("w", "transposed", True),
    ("a", "offset", True), ("a", "padded", True), ("a", "transposed", True),  # A is copied where TMA cannot read it
]
BACKWARD_CASES = [("dy", "offset", False), ("dy", "padded", True), ("dy", "transposed", False),
                  ("dy", "stride0", False), ("w", "offset", False)]


@pytest.mark.parametrize("r", [5, 24], ids=["fused-shrink", "separate-shrink"])
@pytest.mark.parametrize("operand,kind,tma", FORWARD_CASES + BACKWARD_CASES,
                         ids=[f"{o}-{k}" for o, k, _ in FORWARD_CASES + BACKWARD_CASES])
def test_lora_operand_layout_after_a_tma_plan(operand, kind, tma, r, device, plans):
    if r > 16 and operand == "a":
        pytest.skip("A goes through a descriptor only in the fused shrink (r ≤ 16)")
    ops = _lora_inputs(37, 40, 48, r, F16, device)
    _lora_run(ops)  # builds the TMA plans for these shapes and strides
    assert all(p.info["tma"] for p in plans.used("fwd") + plans.used("bwd")), "the first call did not take TMA"
    plans.reset()
    ops[operand] = relayout(ops[operand], kind)
    ours = _lora_run(ops)
    forward, backward = plans.used("fwd"), plans.used("bwd")
    assert len(forward) == len(backward) == 1
    # The forward reads x, W (and A when fused) through descriptors; the backward's dx GEMM dY and W.
    want_fwd = tma if operand in ("x", "w", "a") else True
    want_bwd = tma if operand in ("dy", "w") else True
    assert forward[0].info["tma"] == want_fwd, f"forward path with {operand} {kind}"
    assert backward[0].info["tma"] == want_bwd, f"backward dx path with {operand} {kind}"
    if operand == "a":
        copied = forward[0].info["a_stride"] is not None
        assert copied == (kind != "padded"), "A is copied exactly when a descriptor cannot read it as it is"
    _lora_check(ours, ops)


@pytest.mark.parametrize("then", ["x", "w"])
def test_a_plan_for_a_misaligned_adapter_is_not_reused_for_a_misaligned_input(then, device, plans):
    """The collision of a plan keyed on "all operands aligned": A off 16 bytes (fp32, so the fused
    shrink reads an aligned fp16 copy: TMA), then x (or W) off 16 bytes with the same shapes,
    strides and dtypes, which TMA cannot read: a plan of its own, the portable GEMM."""
    ops = _lora_inputs(37, 40, 48, 5, torch.float32, device)
    first = dict(ops, a=relayout(ops["a"], "offset"))
    _lora_check(_lora_run(first), first)
    assert plans.used("fwd")[0].info["tma"]
    plans.reset()
    second = dict(ops, **{then: relayout(ops[then], "offset")})
    ours = _lora_run(second)
    assert not plans.used("fwd")[0].info["tma"], "a TMA plan was reused for an operand TMA cannot address"
    _lora_check(ours, second)


def test_lora_fp32_adapter_cast_gets_addressable_rows(device, plans):
    """K = 60: x and W are views of 64-wide buffers (TMA reads them), A is fp32, so the fused
    shrink reads a fp16 copy of A, whose rows (60·2 = 120 bytes) need a 16-byte stride: 64."""
    ops = _lora_inputs(29, 60, 40, 6, torch.float32, device)
    ops["x"] = torch.empty(29, 64, device=device, dtype=F16)[:, :60].copy_(ops["x"])
    ops["w"] = torch.empty(40, 64, device=device, dtype=F16)[:, :60].copy_(ops["w"])
    ours = _lora_run(ops)
    (forward,) = plans.used("fwd")
    assert forward.info["tma"] and forward.info["a_stride"] == 64
    _lora_check(ours, ops)


@pytest.mark.parametrize("K,N", [(44, 48), (40, 44)], ids=["K44", "N44"])
def test_lora_rows_not_16_byte_multiples_take_the_portable_gemm(K, N, device, plans):
    ops = _lora_inputs(21, K, N, 4, F16, device)
    ours = _lora_run(ops)
    assert not any(p.info["tma"] for p in plans.used("fwd") + plans.used("bwd"))
    _lora_check(ours, ops)


# ---------------------------------------------------------------- multi-LoRA: the weight is the TMA operand
@pytest.fixture
def multi_tma(device, monkeypatch):
    """Route the multi-adapter GEMM to the sm_90 kernel and record which path each matmul takes."""
    _tma_or_skip(device, monkeypatch)
    paths = []
    real = ML.gemm_path

    def recording(*args, **kwargs):
        paths.append(real(*args, **kwargs))
        return paths[-1]

    monkeypatch.setattr(ML, "gemm_path", recording)
    return paths


def _multi_inputs(M, K, N, device):
    S, R = 3, 8
    g = torch.Generator().manual_seed(3)
    A = (torch.randn(S, R, K, generator=g) / K ** 0.5).to(device, F16)
    B = (torch.randn(S, N, R, generator=g) / R ** 0.5).to(device, F16)
    ranks = torch.tensor([8, 3, 5], device=device, dtype=torch.int32)
    scales = torch.tensor([0.5, 1.5, 2.0], device=device)
    ids = torch.randint(-1, S, (M,), generator=g).to(device)
    x = torch.randn(M, K, generator=g).to(device, F16)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, F16)
    dy = torch.randn(M, N, generator=g).to(device, F16)
    return dict(x=x, w=w, A=A, B=B, ranks=ranks, scales=scales, ids=ids, dy=dy)


def _multi_run(ops):
    x, A, B = (ops[k].detach().requires_grad_(True) for k in ("x", "A", "B"))
    y = pk.multi_lora_linear(x, ops["w"], A, B, ops["ranks"], ops["scales"], ops["ids"])
    y.backward(ops["dy"])
    return y.detach(), x.grad, A.grad, B.grad


def _multi_check(ours, ops):
    got = {}
    for dtype in (torch.float64, F16):
        x, A, B = (ops[k].detach().to(dtype).contiguous().requires_grad_(True) for k in ("x", "A", "B"))
        y = multi_ref.multi_lora_linear_ref(x, ops["w"].to(dtype), None, A, B, ops["ranks"], ops["scales"],
                                            ops["ids"])
        y.backward(ops["dy"].to(dtype))
        got[dtype] = (y.detach(), x.grad, A.grad, B.grad)
    for name, o, h, low in zip(("y", "dx", "dA", "dB"), ours, got[torch.float64], got[F16]):
        assert_close_rule(name, o, low, h, ATOL[F16])


MULTI_CASES = [("w", "offset", False), ("w", "padded", True), ("w", "transposed", True),
               ("x", "offset", True), ("x", "transposed", True), ("x", "stride0", True),
               ("dy", "offset", True), ("dy", "stride0", True), ("dy", "transposed", True)]


@pytest.mark.parametrize("operand,kind,tma", MULTI_CASES, ids=[f"{o}-{k}" for o, k, _ in MULTI_CASES])
def test_multi_lora_operand_layout_after_a_tma_call(operand, kind, tma, device, multi_tma):
    """x and dY rows are gathered by pointer (any layout); only W goes through a descriptor."""
    ops = _multi_inputs(23, 40, 48, device)
    _multi_run(ops)
    assert multi_tma == ["tma", "tma"], "the first call did not take TMA (forward y, backward dx)"
    multi_tma.clear()
    ops[operand] = relayout(ops[operand], kind)
    ours = _multi_run(ops)
    assert multi_tma == ["tma" if tma else "portable"] * 2, f"paths with {operand} {kind}"
    _multi_check(ours, ops)


# ---------------------------------------------------------------- the device each launch runs on
LAUNCHERS = [(L, "lora_fwd_triton"), (L, "lora_bwd_triton"), (L, "lora_shrink"),
             (ML, "multi_lora_fwd_triton"), (ML, "multi_lora_bwd_triton")]


def _moe_launchers():
    from posttrain_kernels.ops.moe import launch as MoE
    return [(MoE, "moe_dispatch_triton"), (MoE, "moe_segment_sum_triton"), (MoE, "moe_combine_bwd_triton")]


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two fake CUDA devices: ``torch.cuda.current_device`` / ``torch.cuda.device`` keep a
    variable, nothing touches a driver."""
    state = {"current": 0, "entered": []}

    class FakeDevice:
        def __init__(self, device):
            self.index = device if isinstance(device, int) else device.index

        def __enter__(self):
            self.prev, state["current"] = state["current"], self.index
            state["entered"].append(self.index)

        def __exit__(self, *exc):
            state["current"] = self.prev

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    return state


class FakeCudaTensor:
    def __init__(self, index):
        self.device = torch.device("cuda", index)


def test_every_launcher_is_pinned_to_its_tensors_device():
    for module, name in LAUNCHERS + _moe_launchers():
        fn = getattr(module, name)
        assert getattr(fn, "on_device", False), f"{module.__name__}.{name} is not pinned to its tensors' device"
        assert fn.__wrapped__.__name__ == name


@pytest.mark.parametrize("index", [0, 1])
def test_a_pinned_launcher_sees_its_tensors_device_current(index, fake_cuda):
    """The body sees the first tensor's device current (entered only when it is not already),
    and the caller's current device is restored after it, on return and on error."""
    seen = []

    @backend.on_device
    def launcher(first, *rest, fail=False):
        seen.append(torch.cuda.current_device())
        if fail:
            raise RuntimeError("launch failed")
        return rest

    assert launcher(FakeCudaTensor(index), 1, 2) == (1, 2)
    with pytest.raises(RuntimeError):
        launcher(FakeCudaTensor(index), fail=True)
    assert seen == [index, index] and fake_cuda["current"] == 0
    assert fake_cuda["entered"] == ([1, 1] if index == 1 else [])
    launcher(torch.zeros(1))  # a CPU tensor (the interpreter): no device switch
    assert fake_cuda["entered"] == ([1, 1] if index == 1 else [])


def test_tma_scratch_is_allocated_on_the_current_device(fake_cuda, monkeypatch):
    """Triton calls the allocator inside the launch (under ``on_device``): it allocates on the current device,
    not on cuda:0."""
    made = []
    monkeypatch.setattr(torch, "empty", lambda size, device=None, dtype=None: made.append((size, device, dtype)))
    with torch.cuda.device(1):
        backend._tma_allocator(256, 128, None)
    assert made == [(256, torch.device("cuda", 1), torch.int8)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_second_gpu_with_the_first_current():
    """Real devices: tensors on cuda:1 while cuda:0 is current, TMA path, bf16; results equal
    the same call made with cuda:1 current, and cuda:0 stays current."""
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    ops = {k: v.to(dev, torch.bfloat16) for k, v in _lora_inputs(257, 512, 384, 16, F16, "cpu").items()}
    first = _lora_run(ops)
    assert torch.cuda.current_device() == 0
    with torch.cuda.device(1):
        second = _lora_run(ops)
    for u, v in zip(first, second):
        assert u.device == dev and torch.equal(u, v)
