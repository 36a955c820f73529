"""MoE token movement: gather rows into expert slots, and sum slots back per token.

Letters: n tokens, D model dim, S = E·C slots (E experts × C capacity).
Slot table: ``idx[s]`` is the token held by slot s, or -1 for an empty slot.
A token index outside [0, n) is read as an empty slot, so no index value,
however wrong, makes a kernel touch memory outside its tensors (the
launchers reject such indices before any launch, except while a CUDA graph
is being captured).

Two kernels cover dispatch and combine, forward and backward:

* ``_moe_gather_kernel``       out[s] = scale[s]·src[idx[s]]  (+ dot[s] = <src[idx[s]], other[s]>)
    dispatch forward (scale 1) and combine backward (scale = gates, dot = d gates)
* ``_moe_segment_sum_kernel``  out[t] = Σ_{s holding t} gate[s]·src[s], fp32, fixed order
    combine forward and dispatch backward (no gates)

Neither uses atomics: every output element is owned by one program, and the
segment sum visits a token's slots in the order of a stable sort, so results
are bitwise reproducible.
"""
import triton
import triton.language as tl


@triton.jit
def _moe_gather_kernel(
    src_ptr,  # [n, D]  rows to gather (x for dispatch, dY for combine backward)
    idx_ptr,  # [S] int64  token of each slot, -1 = empty
    scale_ptr,  # [S] fp32  per-slot multiplier, read only when HAS_SCALE
    other_ptr,  # [S, D]  second operand of the per-slot dot, read only when HAS_DOT
    out_ptr,  # [S, D]  gathered rows (zero rows for empty slots)
    dot_ptr,  # [S] fp32  per-slot dot products, written only when HAS_DOT
    n, S, D,
    stride_src, stride_other, stride_out,  # row strides; the D dim is contiguous
    HAS_SCALE: tl.constexpr, HAS_DOT: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid: (cdiv(S, BLOCK_S),). Each program owns BLOCK_S slots and walks D
    in BLOCK_D chunks, so a slot's dot product is summed in one fixed order."""
    # ---- program ids -> slots
    pid = tl.program_id(0)
    offs_s = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    tok = tl.load(idx_ptr + offs_s, mask=mask_s, other=-1)
    valid = mask_s & (tok >= 0) & (tok < n)
    # int64 row offsets: n·D and S·D overflow int32 at real sizes.
    src_rows = src_ptr + tl.where(valid, tok, 0).to(tl.int64)[:, None] * stride_src
    out_rows = out_ptr + offs_s.to(tl.int64)[:, None] * stride_out
    if HAS_SCALE:
        scale = tl.load(scale_ptr + offs_s, mask=valid, other=0.0).to(tl.float32)
    if HAS_DOT:
        other_rows = other_ptr + offs_s.to(tl.int64)[:, None] * stride_other
        dot = tl.zeros((BLOCK_S,), dtype=tl.float32)

    # ---- walk the model dim
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + offs_d
        mask_d = cols < D
        row = tl.load(src_rows + cols[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0)
        val = row.to(tl.float32)
        if HAS_SCALE:
            val = val * scale[:, None]
        tl.store(out_rows + cols[None, :], val.to(out_ptr.dtype.element_ty),
                 mask=mask_s[:, None] & mask_d[None, :])
        if HAS_DOT:
            oth = tl.load(other_rows + cols[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0)
            dot += tl.sum(row.to(tl.float32) * oth.to(tl.float32), axis=1)

    if HAS_DOT:
        tl.store(dot_ptr + offs_s, dot, mask=mask_s)


@triton.jit
def _moe_segment_sum_kernel(
    src_ptr,  # [S, D]  per-slot rows (expert outputs, or d dispatch)
    order_ptr,  # [S] int64  slot ids sorted by token (stable: by slot id within a token)
    offsets_ptr,  # [n + 1] int64  token t's slots are order[offsets[t]:offsets[t+1]]
    gate_ptr,  # [S] fp32  per-slot weight, read only when HAS_GATES
    out_ptr,  # [n, D]
    n, D,
    stride_src, stride_out,  # row strides; the D dim is contiguous
    HAS_GATES: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[t, d-block] = Σ_j gate[order[j]]·src[order[j], d-block] over token t's slots.

    Grid: (n, cdiv(D, BLOCK_D)). A token with no slot gets zeros. The sum runs
    in fp32 in the sorted order: no atomics, bitwise reproducible."""
    # ---- program ids
    t = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cols < D
    start = tl.load(offsets_ptr + t)
    end = tl.load(offsets_ptr + t + 1)

    # ---- the token's slots, in order
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j in range(start, end):
        s = tl.load(order_ptr + j)
        row = tl.load(src_ptr + s * stride_src + cols, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_GATES:
            row = row * tl.load(gate_ptr + s).to(tl.float32)
        acc += row

    tl.store(out_ptr + t.to(tl.int64) * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=mask_d)
