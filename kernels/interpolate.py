"""Triton kernel for ``I(x, M)`` (masked linear interpolation in time), forward and backward.

Formula (the torch reference is ``interpdiff.interpolate.interpolate_reference``): for sample
``b``, frame ``t``, ``l(t)`` the nearest keyframe at or before ``t`` and ``r(t)`` the nearest at
or after it::

    out[b, t] = (1 - w) * x[b, l] + w * x[b, r],      w = (t - l) / (r - l)   (0 when l == r)

with ``w`` and the products computed in the accumulation dtype (fp32; fp64 for fp64 inputs),
the same operations in the same order as the reference; the output has ``x``'s dtype. With
``sigma`` ``[B]`` and ``eps`` (``x``'s shape) it also adds the phase-2 corruption on the
missing frames::

    out[b, t] = round(I(x, M)[b, t]) + sigma[b] * eps[b, t] * (1 - M[b, t])     (in fp32)

where ``round`` is the cast to ``x.dtype``, as ``interpdiff.interpolate.interpolate_corrupt``'s
reference does it, so both paths give the same bits.

Layout: any tensor with batch at dim 0 and time at ``time_dim`` is seen as ``[B, P, T, Q]``
(``P`` = product of the dims between batch and time, ``Q`` = product of the dims after time):
``[B, T, D]`` is ``P=1, Q=D``; Wan's ``[B, C, T, H, W]`` is ``P=C, Q=H*W``. Strides are passed
to the kernel, so permuted or sliced views are read in place; only a layout whose ``P`` or
``Q`` dims cannot be merged into one stride is copied first. The output is contiguous.

Forward, one pass over memory: a program owns a ``[BLOCK_T, BLOCK_Q]`` tile (frames x columns)
of one ``(b, p)`` plane. It loads the sample's mask row and computes ``l(t)`` and ``r(t)`` for its
frames: with two prefix scans (max-scan of ``t`` where ``M``, min-scan reversed) when the tile
holds all ``T`` frames, else by comparing its frames with the whole row. It then gathers
``x[l(t)]`` and ``x[r(t)]`` as two ``[BLOCK_T, BLOCK_Q]`` tiles. Only keyframe rows are
addressed, so HBM reads are the keyframe rows (the repeated rows hit L1/L2), every output row
is written once, and no ``[B, T, ...]`` temporary exists. All loads of a program are independent
(no serial chain over keyframes). This ``tile`` kernel is the default for few columns per row
(maze) and for the fused corruption.

Two time-walk forwards read each keyframe row exactly once: a program owns ``BLOCK_Q`` columns
of one ``(b, p)`` row and streams the output frames, holding the current left and right
keyframe rows in registers. ``tloop`` tests the mask frame by frame (the default for the plain
forward at video sizes); ``seg`` loads the mask row as one vector, jumps from keyframe to
keyframe by reductions and prefetches the next keyframe row (fastest with few keyframes).
Written after the last GPU run, not measured yet: ``hybrid`` takes ``seg`` for samples with at
most ``HYBRID_SEG_MAX_K`` keyframes and ``tloop`` for the others; ``jump`` is ``seg`` with the
sample's keyframes held as one int64 (``T <= 63``), so the next keyframe is a lowest-set-bit
computation in scalar registers instead of a cross-warp reduction per segment, and ``jump2``
loads keyframe rows two segments ahead instead of one. The choice by shape and its
measurements are in ``_default_impl``.

Backward (``d out[t] / d x[l] = 1 - w``, ``d out[t] / d x[r] = w``): a program owns a
``(b, p)`` plane and a ``BLOCK_Q`` tile and walks ``t`` once, keeping the gradient of the
current left keyframe and of the next right keyframe in registers, so each ``grad_out`` row is
read once and each ``grad_x`` row written once (zero on non-keyframes). ``eps`` gets
``sigma * grad * (1 - M)`` when it requires grad; ``sigma`` gets none.

The kernels are decorated at import: import this module after setting ``TRITON_INTERPRET=1``
to run them on CPU tensors (tests); otherwise they need CUDA tensors. They call only ``tl``
builtins and their own ``@triton.jit`` helpers, not the ``@jit`` functions of
``triton.language.standard`` (``tl.zeros``, ``tl.max``, ``tl.cdiv``, ...): those are decorated
when triton itself is imported, so they would not run in the interpreter if triton was imported
before ``TRITON_INTERPRET`` was set. (The standard max/min *combine* functions are handed to
``tl.reduce``; the interpreter recognises them and reduces with numpy without calling them.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest padded T one program holds in registers (the scans and the [BLOCK_T, BLOCK_Q] tile).
MAX_BLOCK_T = 8192
# Elements per forward tile when one tile holds all T frames (small Q): 4096 (16 KB of fp32 per
# operand) keeps two gathered operands and the result in registers at 8 warps without spilling.
TILE_ELEMS = 4096
# Columns per backward program: a 1-D row tile; 1024 elements = 8 fp32 registers per thread at 4 warps.
BWD_BLOCK_Q = 1024

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# max / min combine functions of triton's standard library, passed to the builtin ``tl.reduce``:
# the interpreter recognises them and reduces with numpy (and ``tl.max``/``tl.min`` are
# standard-library ``@jit`` functions, unusable in the interpreter if triton was imported first)
_ELEMENTWISE_MAX = tl.standard._elementwise_max
_ELEMENTWISE_MIN = tl.standard._elementwise_min
_SUM = tl.standard._sum_combine


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


@triton.jit
def _div(a, b, ACC: tl.constexpr):
    """``a / b`` of two integers in ``ACC``, correctly rounded like torch's division: Triton's
    ``/`` on fp32 is the approximate ``div.full.f32`` (up to 2 ulp off); fp64 ``/`` is exact."""
    if ACC == tl.float32:
        return tl.math.div_rn(a.to(ACC), b.to(ACC))
    else:
        return a.to(ACC) / b.to(ACC)


@triton.jit
def _interp_fwd_kernel(
    x_ptr, m_ptr, eps_ptr, sig_ptr, out_ptr,
    T, P, Q,
    sxb, sxp, sxt, sxq,
    seb, sep, set_, seq,
    smb, smt,
    T_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    ACC: tl.constexpr,
    Q_ITERS: tl.constexpr = 1,
):
    """out[b, p, t, q] = (1 - w) x[b, p, l(t), q] + w x[b, p, r(t), q] (+ noise), see module doc."""
    pid_bp = tl.program_id(0)
    pid_t = tl.program_id(1)
    pid_q = tl.program_id(2)
    b = (pid_bp // P).to(tl.int64)  # int64 base offsets: B*P*T*Q may exceed 2**31
    p = (pid_bp % P).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T

    # frames 0 and T-1 are keyframes by definition (also when an unchecked mask says otherwise)
    key = (tl.load(m_ptr + b * smb + t * smt, mask=t_ok, other=0) != 0) | (t == 0) | (t == T - 1)
    if BLOCK_T == T_PAD:
        # the tile holds every frame: prefix max / reversed prefix min of the keyframe indices
        left = tl.associative_scan(tl.where(key, t, -1), 0, _max_combine)
        right = tl.associative_scan(tl.where(key, t, T_PAD), 0, _min_combine, reverse=True)
    else:
        # a tile of frames: compare with the whole mask row ([BLOCK_T, T_PAD], cheap next to the
        # [BLOCK_T, BLOCK_Q] data tile; used when Q is large)
        s = tl.arange(0, T_PAD)
        ks = (tl.load(m_ptr + b * smb + s * smt, mask=s < T, other=0) != 0) | (s == 0) | (s == T - 1)
        ks = ks[None, :]
        sb = tl.broadcast_to(s[None, :], (BLOCK_T, T_PAD))
        left = tl.reduce(tl.where(ks & (sb <= t[:, None]), sb, -1), 1, _ELEMENTWISE_MAX)
        right = tl.reduce(tl.where(ks & (sb >= t[:, None]), sb, T_PAD), 1, _ELEMENTWISE_MIN)
    right = tl.minimum(right, T - 1)  # padded rows t >= T have no right keyframe; they are masked
    # the reference's w: division of the integer offsets in the accumulation dtype, correctly
    # rounded (Triton's ``/`` on fp32 is the approximate ``div.full.f32``, up to 2 ulp off torch's)
    w = _div(t - left, tl.maximum(right - left, 1), ACC)

    # the frame-index work above is done once per program; it then covers Q_ITERS column blocks
    for qi in tl.static_range(Q_ITERS):
        q = (pid_q * Q_ITERS + qi) * BLOCK_Q + tl.arange(0, BLOCK_Q)
        q_ok = q < Q
        io_ok = t_ok[:, None] & q_ok[None, :]
        base = x_ptr + b * sxb + p * sxp + (q * sxq)[None, :]
        xl = tl.load(base + (left * sxt)[:, None], mask=io_ok, other=0.0).to(ACC)
        xr = tl.load(base + (right * sxt)[:, None], mask=io_ok, other=0.0).to(ACC)
        w2 = w[:, None]
        out = xl * (1 - w2) + xr * w2
        if HAS_NOISE:
            sig = tl.load(sig_ptr + b).to(tl.float32)
            # eps is read on the missing frames only (keyframe rows get no noise)
            e_ok = io_ok & (~key)[:, None]
            e = tl.load(eps_ptr + b * seb + p * sep + (t * set_)[:, None] + (q * seq)[None, :], mask=e_ok, other=0.0)
            miss = tl.where(key, 0.0, 1.0)[:, None]
            # round to x's dtype first, then add the noise in fp32 (the reference's order)
            base_val = out.to(out_ptr.dtype.element_ty).to(tl.float32)
            out = base_val + (sig * e.to(tl.float32)) * miss
        row = (b * P + p) * T
        tl.store(out_ptr + (row + t)[:, None] * Q + q[None, :], out.to(out_ptr.dtype.element_ty), mask=io_ok)


@triton.jit
def _fill_segment(o_base, e_base, xl, xr, l, r, Q, set_, sig, q_ok, HAS_NOISE: tl.constexpr, ACC: tl.constexpr):
    """Rows ``l < u < r`` of the output: ``(1 - w) x_l + w x_r`` (+ noise), ``w = (u - l) / (r - l)``."""
    span = r - l
    for u in range(l + 1, r):
        w = _div(u - l, span, ACC)
        out = xl * (1 - w) + xr * w
        if HAS_NOISE:
            e = tl.load(e_base + u * set_, mask=q_ok, other=0.0)
            # round to x's dtype first, then add the noise in fp32 (the reference's order)
            out = out.to(o_base.dtype.element_ty).to(tl.float32) + sig * e.to(tl.float32)
        tl.store(o_base + u * Q, out.to(o_base.dtype.element_ty), mask=q_ok)


@triton.jit
def _tloop_walk(x_base, o_base, e_base, m_row, smt, sxt, set_, T, Q, q_ok, sig,
                HAS_NOISE: tl.constexpr, ACC: tl.constexpr):
    """The walk frame by frame: each frame's mask entry is read in turn; at a keyframe its row
    is loaded and the segment since the previous keyframe is written."""
    x_l = tl.load(x_base, mask=q_ok, other=0.0)
    tl.store(o_base, x_l, mask=q_ok)  # frame 0 is a keyframe
    xl = x_l.to(ACC)
    l = 0
    for t in range(1, T):
        if (tl.load(m_row + t * smt) != 0) | (t == T - 1):  # T-1 is a keyframe by definition
            x_r = tl.load(x_base + t * sxt, mask=q_ok, other=0.0)
            xr = x_r.to(ACC)
            _fill_segment(o_base, e_base, xl, xr, l, t, Q, set_, sig, q_ok, HAS_NOISE, ACC)
            tl.store(o_base + t * Q, x_r, mask=q_ok)
            xl = xr
            l = t


@triton.jit
def _seg_walk(x_base, o_base, e_base, key, ts, sxt, set_, T, Q, q_ok, sig,
              HAS_NOISE: tl.constexpr, ACC: tl.constexpr):
    """The walk by segments over the mask row ``key`` (a ``[T_PAD]`` vector): the next keyframe
    is a min-reduction, its row is loaded one segment ahead, and the rows of frames 0 and T-1
    are loaded at the start."""
    x_first = tl.load(x_base, mask=q_ok, other=0.0)
    x_last = tl.load(x_base + (T - 1) * sxt, mask=q_ok, other=0.0)
    tl.store(o_base, x_first, mask=q_ok)  # frame 0 is a keyframe
    # first keyframe after 0 (T-1 when T == 1: the loop below does not run)
    r = tl.reduce(tl.where(key & (ts > 0), ts, T - 1), 0, _ELEMENTWISE_MIN)
    x_r = tl.where(r == T - 1, x_last, tl.load(x_base + r * sxt, mask=q_ok & (r != T - 1), other=0.0))
    xl = x_first.to(ACC)
    l = r * 0
    while l < T - 1:
        # prefetch the keyframe after r (none after T-1: the load is masked off)
        r_next = tl.reduce(tl.where(key & (ts > r), ts, T - 1), 0, _ELEMENTWISE_MIN)
        x_n = tl.where(r_next == T - 1, x_last,
                       tl.load(x_base + r_next * sxt, mask=q_ok & (r_next != T - 1), other=0.0))
        xr = x_r.to(ACC)
        _fill_segment(o_base, e_base, xl, xr, l, r, Q, set_, sig, q_ok, HAS_NOISE, ACC)
        tl.store(o_base + r * Q, x_r, mask=q_ok)
        xl = xr
        l = r
        r = r_next
        x_r = x_n


@triton.jit
def _low_bit(v):
    """Index of the lowest set bit of the int64 ``v`` (``0 < v < 2**63``), without a loop or a
    libdevice call: ``v & -v`` is that bit alone, a power of two converts to fp32 exactly, and
    the exponent field of the result is the index."""
    return (((v & -v).to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127).to(tl.int32)


@triton.jit
def _jump_walk(x_base, o_base, e_base, bits, sxt, set_, T, Q, q_ok, sig,
               HAS_NOISE: tl.constexpr, ACC: tl.constexpr, AHEAD: tl.constexpr):
    """The walk from keyframe to keyframe over the sample's keyframe set held as one int64
    ``bits`` (bit ``t`` set for a keyframe ``t``; ``T <= 63``): the next keyframe is the lowest
    set bit of the rest, a few scalar instructions (``seg`` needs a cross-warp reduction per
    segment, ``tloop`` a dependent mask load per frame). The rows of frame 0 and of the next
    ``AHEAD`` keyframes (1 or 2) are loaded together at the start (at ``K=2`` the first of them
    is ``T-1``), and each later keyframe row is loaded ``AHEAD`` segments before it is needed,
    so its latency overlaps the stores of the segments in between. Invariant of the loop: the
    lowest bit of ``rest`` is the last keyframe whose row load has been issued."""
    rest = bits & -2  # keyframes after frame 0; T-1 is one of them when T > 1
    r = tl.where(rest != 0, _low_bit(rest), T - 1)  # T == 1: r = 0, the loop below does not run
    x_l = tl.load(x_base, mask=q_ok, other=0.0)
    x_r = tl.load(x_base + r * sxt, mask=q_ok, other=0.0)
    r2 = r
    x_r2 = x_r
    if AHEAD == 2:
        rest = rest & (rest - 1)
        r2 = tl.where(rest != 0, _low_bit(rest), T - 1)
        x_r2 = tl.load(x_base + r2 * sxt, mask=q_ok & (rest != 0), other=0.0)
    tl.store(o_base, x_l, mask=q_ok)  # frame 0 is a keyframe
    xl = x_l.to(ACC)
    l = r * 0
    while l < T - 1:
        rest = rest & (rest - 1)  # drop the last issued keyframe: the next one is the lowest bit
        r_next = tl.where(rest != 0, _low_bit(rest), T - 1)
        x_n = tl.load(x_base + r_next * sxt, mask=q_ok & (rest != 0), other=0.0)  # none after T-1
        xr = x_r.to(ACC)
        _fill_segment(o_base, e_base, xl, xr, l, r, Q, set_, sig, q_ok, HAS_NOISE, ACC)
        tl.store(o_base + r * Q, x_r, mask=q_ok)
        xl = xr
        l = r
        if AHEAD == 2:
            r = r2
            x_r = x_r2
            r2 = r_next
            x_r2 = x_n
        else:
            r = r_next
            x_r = x_n


@triton.jit
def _key_bits(m_row, smt, ts, T):
    """The keyframe set of a sample as an int64 (bit ``t`` for frame ``t``; frames 0 and T-1
    always): one reduction over the mask row, ``ts = [0, T_PAD)`` with ``T_PAD <= 64``."""
    key = _key_row(m_row, smt, ts, T) | (ts == 0)
    one = tl.full(ts.shape, 1, tl.int64)
    return tl.reduce(tl.where(key, one << ts.to(tl.int64), 0), 0, _SUM)


@triton.jit
def _key_row(m_row, smt, ts, T):
    """The sample's keyframe flags over ``ts = [0, T_PAD)`` (frame T-1 always; padding never)."""
    return ((tl.load(m_row + ts * smt, mask=ts < T, other=0) != 0) | (ts == T - 1)) & (ts < T)


@triton.jit
def _walk_bases(x_ptr, eps_ptr, sig_ptr, out_ptr, T, P, Q, sxb, sxp, sxq, seb, sep, seq,
                BLOCK_Q: tl.constexpr, HAS_NOISE: tl.constexpr):
    """Sample index and the column pointers of a walk program (``(b, p)`` row, ``BLOCK_Q`` columns)."""
    pid_bp = tl.program_id(0)
    pid_q = tl.program_id(1)
    b = (pid_bp // P).to(tl.int64)
    p = (pid_bp % P).to(tl.int64)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < Q
    x_base = x_ptr + b * sxb + p * sxp + q * sxq
    o_base = out_ptr + (b * P + p) * T * Q + q
    e_base = eps_ptr + b * seb + p * sep + q * seq
    sig = 0.0
    if HAS_NOISE:
        sig = tl.load(sig_ptr + b).to(tl.float32)
    return b, q_ok, x_base, o_base, e_base, sig


@triton.jit
def _interp_fwd_tloop_kernel(
    x_ptr, m_ptr, eps_ptr, sig_ptr, out_ptr,
    T, P, Q,
    sxb, sxp, sxt, sxq,
    seb, sep, set_, seq,
    smb, smt,
    BLOCK_Q: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    ACC: tl.constexpr,
):
    """The forward as a walk over time (``impl="tloop"``): a program owns ``BLOCK_Q`` columns of
    one ``(b, p)`` row, keeps the two current keyframe rows in registers and streams the output
    frames, so every keyframe row is read once and every output row written once (the tile
    kernel reads two keyframe rows per output row, from L1/L2). Same arithmetic as the tile
    kernel: keyframe rows are copied, missing rows are ``(1 - w) x_l + w x_r`` (+ noise)."""
    b, q_ok, x_base, o_base, e_base, sig = _walk_bases(
        x_ptr, eps_ptr, sig_ptr, out_ptr, T, P, Q, sxb, sxp, sxq, seb, sep, seq, BLOCK_Q, HAS_NOISE)
    _tloop_walk(x_base, o_base, e_base, m_ptr + b * smb, smt, sxt, set_, T, Q, q_ok, sig, HAS_NOISE, ACC)


@triton.jit
def _interp_fwd_seg_kernel(
    x_ptr, m_ptr, eps_ptr, sig_ptr, out_ptr,
    T, P, Q,
    sxb, sxp, sxt, sxq,
    seb, sep, set_, seq,
    smb, smt,
    T_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    ACC: tl.constexpr,
):
    """The time walk by segments (``impl="seg"``): like ``tloop`` a program owns ``BLOCK_Q``
    columns of one ``(b, p)`` row and reads each keyframe row once, but it loads the mask row as
    one vector and jumps from keyframe to keyframe (the next one is a min-reduction over the
    row, not a chain of per-frame scalar loads), and it issues the load of the *next* keyframe
    row before writing the current segment, so a keyframe load overlaps the stores instead of
    stalling them. Frames 0 and ``T-1`` are keyframes by definition: both rows are loaded at
    the start together with the mask (no dependent load before the first segment at ``K=2``).
    Same arithmetic as the other kernels."""
    b, q_ok, x_base, o_base, e_base, sig = _walk_bases(
        x_ptr, eps_ptr, sig_ptr, out_ptr, T, P, Q, sxb, sxp, sxq, seb, sep, seq, BLOCK_Q, HAS_NOISE)
    ts = tl.arange(0, T_PAD)
    key = _key_row(m_ptr + b * smb, smt, ts, T)
    _seg_walk(x_base, o_base, e_base, key, ts, sxt, set_, T, Q, q_ok, sig, HAS_NOISE, ACC)


@triton.jit
def _interp_fwd_hybrid_kernel(
    x_ptr, m_ptr, eps_ptr, sig_ptr, out_ptr,
    T, P, Q,
    sxb, sxp, sxt, sxq,
    seb, sep, set_, seq,
    smb, smt,
    T_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    ACC: tl.constexpr,
    SEG_MAX_K: tl.constexpr,
):
    """``impl="hybrid"``: per sample, the ``seg`` walk when the sample has at most ``SEG_MAX_K``
    keyframes (frames 0 and T-1 counted) and the ``tloop`` walk otherwise: on the H200 ``seg``
    was the fastest forward at K=2 (83 % of copy against 67 %) and ``tloop`` at K=6 and 11. The
    branch is on one scalar of the sample (all programs of a sample take the same path)."""
    b, q_ok, x_base, o_base, e_base, sig = _walk_bases(
        x_ptr, eps_ptr, sig_ptr, out_ptr, T, P, Q, sxb, sxp, sxq, seb, sep, seq, BLOCK_Q, HAS_NOISE)
    ts = tl.arange(0, T_PAD)
    key = _key_row(m_ptr + b * smb, smt, ts, T)
    n_key = tl.reduce((key | (ts == 0)).to(tl.int32), 0, _SUM)
    if n_key <= SEG_MAX_K:
        _seg_walk(x_base, o_base, e_base, key, ts, sxt, set_, T, Q, q_ok, sig, HAS_NOISE, ACC)
    else:
        _tloop_walk(x_base, o_base, e_base, m_ptr + b * smb, smt, sxt, set_, T, Q, q_ok, sig, HAS_NOISE, ACC)


@triton.jit
def _interp_fwd_jump_kernel(
    x_ptr, m_ptr, eps_ptr, sig_ptr, out_ptr,
    T, P, Q,
    sxb, sxp, sxt, sxq,
    seb, sep, set_, seq,
    smb, smt,
    T_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    ACC: tl.constexpr,
    AHEAD: tl.constexpr,
):
    """The time walk by jumps (``impl="jump"``, ``T <= 63``): the ``seg`` walk (each keyframe row
    read once, the next one loaded a segment ahead) with the next keyframe found by scalar bit
    arithmetic on the sample's keyframe set instead of a reduction over the mask row, so the
    only cross-warp step is the one reduction that builds the set."""
    b, q_ok, x_base, o_base, e_base, sig = _walk_bases(
        x_ptr, eps_ptr, sig_ptr, out_ptr, T, P, Q, sxb, sxp, sxq, seb, sep, seq, BLOCK_Q, HAS_NOISE)
    bits = _key_bits(m_ptr + b * smb, smt, tl.arange(0, T_PAD), T)
    _jump_walk(x_base, o_base, e_base, bits, sxt, set_, T, Q, q_ok, sig, HAS_NOISE, ACC, AHEAD)


@triton.jit
def _interp_bwd_kernel(
    g_ptr, m_ptr, gx_ptr,
    T, P, Q,
    sgb, sgp, sgt, sgq,
    smb, smt,
    BLOCK_Q: tl.constexpr,
    ACC: tl.constexpr,
):
    """grad_x[l] += (1 - w_t) g[t], grad_x[r] += w_t g[t] over all t; 0 at non-keyframes."""
    pid_bp = tl.program_id(0)
    pid_q = tl.program_id(1)
    b = (pid_bp // P).to(tl.int64)
    p = (pid_bp % P).to(tl.int64)
    q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q < Q
    g_base = g_ptr + b * sgb + p * sgp + q * sgq
    gx_base = gx_ptr + (b * P + p) * T * Q + q
    # frame 0 is a keyframe: its accumulator starts with its own gradient (w = 0 there)
    acc_l = tl.load(g_base, mask=q_ok, other=0.0).to(ACC)
    zero = tl.full([BLOCK_Q], 0.0, ACC)
    l = 0
    for t in range(1, T):
        if (tl.load(m_ptr + b * smb + t * smt) != 0) | (t == T - 1):  # T-1 is a keyframe by definition
            acc_r = tl.load(g_base + t * sgt, mask=q_ok, other=0.0).to(ACC)
            span = t - l
            for u in range(l + 1, t):
                g = tl.load(g_base + u * sgt, mask=q_ok, other=0.0).to(ACC)
                w = _div(u - l, span, ACC)
                acc_l += (1 - w) * g
                acc_r += w * g
                tl.store(gx_base + u * Q, zero.to(gx_ptr.dtype.element_ty), mask=q_ok)
            tl.store(gx_base + l * Q, acc_l.to(gx_ptr.dtype.element_ty), mask=q_ok)
            acc_l = acc_r
            l = t
    tl.store(gx_base + l * Q, acc_l.to(gx_ptr.dtype.element_ty), mask=q_ok)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------


def _merge(sizes: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, int] | None:
    """``(numel, stride)`` of dims that can be walked with one stride, else ``None``."""
    n = 1
    for s in sizes:
        n *= s
    dims = [(sz, st) for sz, st in zip(sizes, strides) if sz != 1]
    if not dims:
        return n, 1
    for (sz_hi, st_hi), (sz_lo, st_lo) in zip(dims, dims[1:]):
        if st_hi != sz_lo * st_lo:
            return None
    return n, dims[-1][1]


def _as_bptq(x: torch.Tensor, td: int) -> tuple[torch.Tensor, tuple[int, int, int, int], tuple[int, int, int, int]]:
    """View ``x`` as ``[B, P, T, Q]``: returns (tensor to read, sizes, strides); copies only if needed."""
    for attempt in (x, None):
        y = x if attempt is not None else x.contiguous()
        P = _merge(tuple(y.shape[1:td]), tuple(y.stride()[1:td]))
        Q = _merge(tuple(y.shape[td + 1 :]), tuple(y.stride()[td + 1 :]))
        if P is not None and Q is not None:
            sizes = (y.shape[0], P[0], y.shape[td], Q[0])
            return y, sizes, (y.stride(0), P[1], y.stride(td), Q[1])
    raise AssertionError("unreachable: a contiguous tensor always merges")


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def _check_runnable(t: torch.Tensor, op: str) -> None:
    if not t.is_cuda and not _is_interpreted(_interp_fwd_kernel):
        raise RuntimeError(
            f"{op}: got a {t.device.type} tensor but kernels.interpolate was compiled for CUDA; run on CUDA "
            "tensors, or set TRITON_INTERPRET=1 before kernels.interpolate is first imported to use the "
            "Triton interpreter on CPU"
        )


def _mask_from(mask_or_idx: torch.Tensor, B: int, T: int, check: bool) -> torch.Tensor:
    """Bool ``[B, T]`` mask from a mask or from sorted keyframe indices ``[B, K]`` (integer).

    The value checks (endpoints set, indices increasing) read the tensor on the host, a device
    sync; ``check=False`` skips them (the kernel treats frames 0 and ``T-1`` as keyframes
    whatever the mask says, so a bad mask never reads out of bounds).
    """
    if mask_or_idx.dtype == torch.bool:
        if tuple(mask_or_idx.shape) != (B, T):
            raise ValueError(
                f"interpolate_triton: mask must have shape [B, T] = [{B}, {T}], got {list(mask_or_idx.shape)}"
            )
        mask = mask_or_idx
    elif not mask_or_idx.is_floating_point() and not mask_or_idx.is_complex():
        idx = mask_or_idx
        if idx.dim() != 2 or idx.shape[0] != B or idx.shape[1] < 2:
            raise ValueError(
                f"interpolate_triton: keyframe indices must have shape [B={B}, K>=2], got {list(idx.shape)}"
            )
        bad = (idx[:, 1:] <= idx[:, :-1]).any() | (idx[:, 0] != 0).any() | (idx[:, -1] != T - 1).any()
        if check and bool(bad):
            raise ValueError(
                f"interpolate_triton: keyframe indices must be strictly increasing from 0 to T-1={T - 1} per row"
            )
        mask = torch.zeros(B, T, dtype=torch.bool, device=idx.device)
        mask.scatter_(1, idx.long().clamp(0, T - 1), True)
    else:
        raise ValueError(
            f"interpolate_triton: mask must be bool [B, T] or integer indices [B, K], got {mask_or_idx.dtype}"
        )
    if check and not bool((mask[:, 0] & mask[:, -1]).all()):
        raise ValueError("interpolate_triton: frames 0 and T-1 must be keyframes in every row")
    return mask


# Column blocks per forward program: the frame-index work (mask load, left/right keyframe
# reductions, weights) is done once and reused for Q_ITERS blocks of BLOCK_Q columns.
FWD_Q_ITERS = 4  # best of the H200 sweep at Wan size (benchmarks/RESULTS.md)
# Forward kernels: "tile" (frames x columns tiles), "tloop" (a walk over time reading each
# keyframe row once), "seg" (the walk by segments: mask row as one vector, next keyframe row
# prefetched), "hybrid" (seg or tloop per sample), "jump"/"jump2" (seg with the keyframe set in
# one int64; rows prefetched one / two segments ahead). FWD_IMPL=None picks by shape
# (`_default_impl`); a name forces that kernel everywhere.
FWD_IMPLS = ("tile", "tloop", "seg", "hybrid", "jump", "jump2")
FWD_IMPL = None
# "hybrid": per sample, seg with at most this many keyframes (0 and T-1 counted), else tloop
HYBRID_SEG_MAX_K = 3
# The walks run T sequential steps per program (seg holds the mask row as one [T_PAD] vector):
# for few columns per row or very long rows the tile kernel is the better shape.
WALK_MIN_Q = 1024
WALK_MAX_T = 1024
# "jump" holds a sample's keyframe set in one int64
JUMP_MAX_T = 63


def _default_impl(T: int, Q: int, noise: bool = False) -> str:
    """The forward kernel for a ``[B, P, T, Q]`` problem, from the H200 runs of 2026-11-26
    (benchmarks/RESULTS.md, % of the copy bandwidth at Wan size, K = 2 / 6 / 11 keyframes, each
    kernel at its ``WALK_BLOCKS``):

    * plain forward (session 8 sweep): ``jump`` 97 / 85 / 82, ``jump2`` 92 / 85 / 82, ``seg``
      97 / 86 / 81, ``tloop`` 83 / 80 / 77, ``tile`` 67 / 68 / 70. The walks by segments
      (``seg``/``jump``/``jump2``) lead only at 4 warps per 1024 columns (or 8 per 2048): at 8
      warps per 1024 they fall to 66 % at K = 11. ``jump`` (T <= 63, the Wan latents' 21 frames)
      then ``tloop`` (longer clips, up to ``WALK_MAX_T``).
    * fused corruption (the phase-2 training call; session 8 sweep): ``tile`` 76 / 75 / 74,
      ``jump`` 74 / 77 / 78 (at 4 warps per 1024 columns), ``seg`` 73 / 77 / 78, ``tloop``
      70 / 72 / 72: ``tile`` has the best worst K.
    * few columns per row (maze, ``Q = 2``): ``tile``; a walk has too little work per program
      (``tloop`` 4.5x, ``seg`` 2.7x slower).
    """
    if FWD_IMPL is not None:
        return FWD_IMPL
    if noise or Q < WALK_MIN_Q or T > WALK_MAX_T:
        return "tile"
    return "jump" if supports("jump", T) else "tloop"


def _fwd_blocks(T: int, Q: int) -> tuple[int, int, int]:
    """Default ``(BLOCK_T, BLOCK_Q, num_warps)`` of the forward kernel.

    Large ``Q`` (video latents, ``Q = H*W``): tiles of 8 frames x 256 columns (2048 elements, 16
    per thread over 4 warps): few padded frames (T=21 -> 24 rows) and small register use, so
    many programs are resident per SM to keep loads in flight. Small ``Q`` (maze ``[B, T, 2]``):
    one tile holds every frame (the scans are cheaper than the comparisons there). The bench's
    sweep times the alternatives.
    """
    t_pad = triton.next_power_of_2(T)
    if Q >= 64 and t_pad <= 256:
        block_t = min(t_pad, 8)
        block_q = min(triton.next_power_of_2(Q), 256)
    else:
        block_t = t_pad
        block_q = max(1, min(triton.next_power_of_2(Q), TILE_ELEMS // block_t))
    num_warps = max(1, min(8, (block_t * block_q) // 512))
    return block_t, block_q, num_warps


def _forward(x, mask, td, sigma=None, eps=None, block_t=None, block_q=None, num_warps=None, q_iters=None,
             impl=None):
    xr, (B, P, T, Q), sx = _as_bptq(x, td)
    impl = impl or _default_impl(T, Q, eps is not None)
    if impl not in FWD_IMPLS:
        raise ValueError(f"interpolate_triton: impl={impl!r} is not one of {list(FWD_IMPLS)}")
    if impl in ("tloop", "seg", "hybrid", "jump", "jump2"):
        if block_t is not None or q_iters is not None:
            raise ValueError(f"interpolate_triton: block_t / q_iters are options of the tile kernel, not of impl={impl!r} "
                             "(pass impl='tile')")
        return _forward_walk(impl, x, xr, (B, P, T, Q), sx, mask, td, sigma, eps, block_q, num_warps)
    if T > MAX_BLOCK_T:
        raise ValueError(
            f"interpolate_triton: T={T} frames exceeds the kernel's limit {MAX_BLOCK_T}; use backend='torch'"
        )
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    bt, bq, nw = _fwd_blocks(T, Q)
    block_t, block_q, num_warps = block_t or bt, block_q or bq, num_warps or nw
    t_pad = triton.next_power_of_2(T)
    if block_t > t_pad or t_pad % block_t:
        raise ValueError(f"interpolate_triton: BLOCK_T={block_t} must be a power of two <= {t_pad}")
    m8 = mask.view(torch.uint8)
    if eps is not None:
        er, _, se = _as_bptq(eps, td)
        sig = sigma.to(device=x.device, dtype=torch.float32).contiguous()
    else:
        er, se, sig = xr, sx, m8  # unused (HAS_NOISE=False); any valid pointers
    q_iters = q_iters or max(1, min(FWD_Q_ITERS, triton.cdiv(Q, block_q)))
    grid = (B * P, triton.cdiv(T, block_t), triton.cdiv(Q, block_q * q_iters))
    _interp_fwd_kernel[grid](
        xr, m8, er, sig, out,
        T, P, Q,
        *sx, *se,
        m8.stride(0), m8.stride(1),
        T_PAD=t_pad, BLOCK_T=block_t, BLOCK_Q=block_q, HAS_NOISE=eps is not None, ACC=_acc_dtype(x.dtype),
        Q_ITERS=q_iters, num_warps=num_warps,
    )
    return out


def supports(impl: str, T: int) -> bool:
    """Whether forward kernel ``impl`` runs with ``T`` frames (``jump``/``jump2``: ``T <= JUMP_MAX_T``;
    ``seg``/``hybrid`` hold the mask row in registers: ``T <= MAX_BLOCK_T``; ``tloop``: any ``T``)."""
    if impl not in FWD_IMPLS:
        raise ValueError(f"interpolate_triton: impl={impl!r} is not one of {list(FWD_IMPLS)}")
    if impl in ("jump", "jump2"):
        return T <= JUMP_MAX_T
    return impl == "tloop" or T <= MAX_BLOCK_T


# (BLOCK_Q, num_warps) of each walk kernel, without / with the fused noise. Without noise: the best
# worst-K configuration of each kernel in the H200 sweep of session 8 (Wan size, K = 2 / 6 / 11;
# benchmarks/RESULTS.md): 128 or 256 columns per warp; 8 warps per 1024 columns cost the segment
# walks 15 points at K = 11. With noise (the fused corruption; the dispatch uses the tile kernel
# there, 74 % worst K): 4 warps per 1024 columns, 73-74 % worst K against 56-57 % at 8 warps in the
# session-8 fused sweep (hybrid: not swept, as measured before). At sm_90, compiled as launched at
# Wan size (kernels.sass), no variant spills at 4 or 8 warps (31-64 registers).
WALK_BLOCKS = {
    "tloop": ((1024, 4), (1024, 4)),
    "seg": ((1024, 4), (1024, 4)),
    "hybrid": ((2048, 8), (1024, 8)),
    "jump": ((2048, 8), (1024, 4)),
    "jump2": ((2048, 8), (1024, 4)),
}


def _walk_blocks(impl: str, Q: int, noise: bool) -> tuple[int, int]:
    """Default ``(BLOCK_Q, num_warps)`` of a walk kernel (``WALK_BLOCKS``), for rows of ``Q``
    columns: ``BLOCK_Q`` at most the next power of two of ``Q``, and at least 128 columns per warp."""
    bq, nw = WALK_BLOCKS[impl][int(bool(noise))]
    block_q = max(1, min(triton.next_power_of_2(Q), bq))
    return block_q, max(1, min(nw, block_q // 128))


def _forward_walk(impl, x, xr, dims, sx, mask, td, sigma, eps, block_q, num_warps):
    B, P, T, Q = dims
    if not supports(impl, T):
        limit = JUMP_MAX_T if impl in ("jump", "jump2") else MAX_BLOCK_T
        raise ValueError(
            f"interpolate_triton: T={T} frames exceeds the {impl} kernel's limit {limit}; use impl='tloop'"
        )
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    bq, nw = _walk_blocks(impl, Q, eps is not None)
    block_q, num_warps = block_q or bq, num_warps or nw
    m8 = mask.view(torch.uint8)
    if eps is not None:
        er, _, se = _as_bptq(eps, td)
        sig = sigma.to(device=x.device, dtype=torch.float32).contiguous()
    else:
        er, se, sig = xr, sx, m8  # unused (HAS_NOISE=False); any valid pointers
    grid = (B * P, triton.cdiv(Q, block_q))
    args = (xr, m8, er, sig, out, T, P, Q, *sx, *se, m8.stride(0), m8.stride(1))
    meta = dict(BLOCK_Q=block_q, HAS_NOISE=eps is not None, ACC=_acc_dtype(x.dtype), num_warps=num_warps)
    if impl == "seg":
        _interp_fwd_seg_kernel[grid](*args, T_PAD=triton.next_power_of_2(T), **meta)
    elif impl == "jump":
        _interp_fwd_jump_kernel[grid](*args, T_PAD=triton.next_power_of_2(T), AHEAD=1, **meta)
    elif impl == "jump2":
        _interp_fwd_jump_kernel[grid](*args, T_PAD=triton.next_power_of_2(T), AHEAD=2, **meta)
    elif impl == "hybrid":
        _interp_fwd_hybrid_kernel[grid](*args, T_PAD=triton.next_power_of_2(T), SEG_MAX_K=HYBRID_SEG_MAX_K, **meta)
    else:
        _interp_fwd_tloop_kernel[grid](*args, **meta)
    return out


def _backward(g, mask, td, x_shape, x_dtype):
    gr, (B, P, T, Q), sg = _as_bptq(g, td)
    gx = torch.empty(x_shape, dtype=x_dtype, device=g.device)
    if gx.numel() == 0:
        return gx
    block_q = max(1, min(triton.next_power_of_2(Q), BWD_BLOCK_Q))
    m8 = mask.view(torch.uint8)
    grid = (B * P, triton.cdiv(Q, block_q))
    _interp_bwd_kernel[grid](
        gr, m8, gx,
        T, P, Q,
        *sg,
        m8.stride(0), m8.stride(1),
        BLOCK_Q=block_q, ACC=_acc_dtype(x_dtype),
        num_warps=max(1, min(8, block_q // 256)),
    )
    return gx


class InterpolateFunction(torch.autograd.Function):
    """``I(x, M) (+ sigma * eps * (1 - M))`` with the scatter-to-neighbours backward."""

    @staticmethod
    def forward(ctx, x, mask, time_dim, sigma, eps):
        # eps is kept only when sigma needs a gradient (d out / d sigma_b = sum of grad * eps on missing frames)
        keep_eps = eps if (sigma is not None and sigma.requires_grad) else None
        ctx.save_for_backward(mask, sigma, keep_eps)
        ctx.time_dim = time_dim
        ctx.x_meta = (x.shape, x.dtype)
        ctx.eps_meta = None if eps is None else (eps.shape, eps.dtype)
        return _forward(x, mask, time_dim, sigma, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        mask, sigma, eps = ctx.saved_tensors
        td = ctx.time_dim
        grad_x = grad_sigma = grad_eps = None
        if ctx.needs_input_grad[0]:
            grad_x = _backward(grad_out, mask, td, *ctx.x_meta)
        if ctx.eps_meta is not None and (ctx.needs_input_grad[4] or ctx.needs_input_grad[3]):
            B, T = mask.shape
            nd = len(ctx.eps_meta[0])
            miss = (~mask).to(torch.float32).view([B] + [1] * (td - 1) + [T] + [1] * (nd - td - 1))
            g_miss = grad_out.to(torch.float32) * miss
            if ctx.needs_input_grad[4]:
                grad_eps = (g_miss * sigma.view([B] + [1] * (nd - 1))).to(ctx.eps_meta[1])
            if ctx.needs_input_grad[3]:
                grad_sigma = (g_miss * eps.to(torch.float32)).reshape(B, -1).sum(1).to(sigma.dtype)
        return grad_x, None, None, grad_sigma, grad_eps


def interpolate_triton(
    x: torch.Tensor,
    mask_B_T: torch.Tensor,
    time_dim: int = 1,
    sigma: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    *,
    check: bool = True,
) -> torch.Tensor:
    """``I(x, M)``, or the fused ``I(x, M) + sigma * eps * (1 - M)`` when ``sigma``/``eps`` are given.

    Args:
        x: float16/bfloat16/float32/float64, batch at dim 0, time at ``time_dim``
            (``[B, T, D]``, ``[B, C, T, H, W]`` with ``time_dim=2``, ...); any strides.
        mask_B_T: bool ``[B, T]`` with frames 0 and ``T-1`` set, or sorted keyframe indices
            ``[B, K]`` (integer) starting at 0 and ending at ``T-1``.
        sigma: ``[B]`` noise level per sample (float32), with ``eps`` of ``x``'s shape.
        check: verify the mask's values (endpoints set; increasing indices) on the host. That is a
            device sync; ``interpdiff.interpolate`` has already checked, and ``check=False`` keeps
            the call asynchronous (CUDA graphs, benchmarks): frames 0 and ``T-1`` are then
            keyframes whatever the mask says.
    Returns a contiguous tensor of ``x``'s shape and dtype. Differentiable in ``x`` (and ``eps`` and
    ``sigma``, as the torch path is); first-order only (``once_differentiable``).
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in _FLOATS:
        got = getattr(x, "dtype", type(x))
        raise ValueError(f"interpolate_triton: x must be a float16/bfloat16/float32/float64 tensor, got {got}")
    if x.dim() < 2:
        raise ValueError(f"interpolate_triton: x needs a batch and a time dim, got shape {list(x.shape)}")
    td = time_dim % x.dim()
    if td == 0:
        raise ValueError("interpolate_triton: time_dim cannot be the batch dimension 0")
    _check_runnable(x, "interpolate_triton")
    B, T = x.shape[0], x.shape[td]
    if mask_B_T.device != x.device:
        raise ValueError(f"interpolate_triton: mask is on {mask_B_T.device} but x is on {x.device}")
    mask = _mask_from(mask_B_T, B, T, check)
    if (sigma is None) != (eps is None):
        raise ValueError("interpolate_triton: give both sigma and eps (fused corruption) or neither")
    if eps is not None:
        if eps.shape != x.shape or eps.device != x.device or eps.dtype not in _FLOATS:
            raise ValueError(
                f"interpolate_triton: eps must be a float tensor of x's shape {list(x.shape)} on {x.device}, "
                f"got {list(eps.shape)} {eps.dtype} on {eps.device}"
            )
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(B)
        if sigma.numel() != B:
            raise ValueError(f"interpolate_triton: sigma must be a float or [B]={B} values, got {sigma.numel()}")
        sigma = sigma.contiguous()
    return InterpolateFunction.apply(x, mask, td, sigma, eps)
