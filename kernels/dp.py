"""Triton kernel for the batched keyframe DP (one program per sample).

Recurrence (the torch reference is ``interpdiff.selection.dp_select_reference``)::

    D[0, t] = 0 if t == 0 else +inf
    D[r, t] = min_{s < t} D[r-1, s] + c[s, t],     back[r, t] = smallest argmin s
    idx[K-1] = T-1,  idx[r-1] = back[r, idx[r]]     total = D[K-1, T-1]

Entries ``c[s, t]`` with ``s >= t`` are never read (masked to ``+inf`` at the load). Sums and
minima are the same fp32 operations as the reference, and the ``(value, s)`` reduction keeps the
smallest ``s`` on ties, so indices and totals are bit-identical to it (NaN costs are not
supported: the reference and the kernel may disagree on them).

Sweep (default for ``T <= 128`` and ``K <= 32``, ``_dp_sweep_kernel``): the program walks ``s``
once and relaxes every row with cost row ``s``: ``best[r, t] = min(best[r, t], D[r-1, s] +
c[s, t])``. Column ``s`` of all rows is final when the walk reaches it, so its owner publishes
``D[:, s]`` to a per-sample scratch (one barrier per step); the state is a ``[K, T]`` register
tile and each cost row is read once. Once ``s`` passes the lower half of the columns only the
upper half is relaxed. ``PREFETCH`` (``prefetch=True``; off by default until a GPU run times it)
loads the cost rows of step ``s + 1`` at the top of step ``s``: the walk is a serial chain of ``T``
steps per sample, and without it each step waits for its cost row from HBM on top of the
publish/barrier round trip. On an H200 (B=4096, T=128, K=16) it takes 0.51 ms, 10x the torch
reference and 14x the tile kernel below, which spilled registers with triton 3.6
(``benchmarks/RESULTS.md``).

Tile (``impl="tile"``, ``T <= 128``): the program loads its sample's ``[T, T]`` cost tile into registers once
(128 x 128 fp32 = 64 KB over 4 warps), so the cost matrix is read from HBM exactly once; each
row is a parallel ``[s, t]`` add + min over ``s``. ``D`` stays in registers.

Streaming (``T > 128``): the tile no longer fits; each row walks ``t`` in blocks of
``BLOCK_T`` and ``s`` in blocks of ``BLOCK_S``, re-reading the cost (``K`` reads of the upper
triangle, mostly from L2) and keeping ``D`` in a small per-sample global scratch
(double-buffered rows).

Back-pointers go to a global scratch ``[B, K, T]``, int8 when ``T <= 128`` (pointers are
``< T <= 128``; half the traffic of int16) else int16 (``T <= 32768``); each row is one
coalesced store. Backtracking is a second, tiny kernel with one *thread* per sample: it is a
chain of ``K`` dependent loads, and run inside the DP program that chain (``K`` x L2 latency)
would be paid once per wave of resident samples; across samples the chains overlap, so the
whole batch backtracks in about ``K`` load latencies.

One DP pass serves several budgets: row ``r`` of the table is the same for every budget
``K > r``, so ``dp_select_many_triton(cost, [K_0, ..., K_S])`` runs the rows once up to
``max K`` and backtracks once per budget (what the nested per-level masks need).

The kernel is decorated at import: import this module after setting ``TRITON_INTERPRET=1`` to
run it on CPU tensors (tests); otherwise it needs CUDA tensors. Only ``tl`` builtins are called
(not ``tl.min``/``tl.zeros``/``tl.cdiv``, which ``triton.language.standard`` decorates when
triton is imported and which then fail in the interpreter if triton was imported before
``TRITON_INTERPRET`` was set); the standard argmin *combine* function is handed to
``tl.reduce``, where the interpreter recognises it and reduces with numpy.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

# Largest padded T kept on chip: 128 x 128 fp32 = 64 KB of registers over 4 warps (no spills at sm_90).
MAX_ON_CHIP_T = 128
# Streaming path block sizes: a [BLOCK_S, BLOCK_T] tile = 4096 fp32.
STREAM_BLOCK_T = 128
STREAM_BLOCK_S = 32
# Kernels: ``tile`` (cost tile in registers, one parallel row per step; streaming when T > 128)
# and ``sweep`` (one pass over s relaxing all K rows at once; T <= 128, K <= SWEEP_MAX_K).
DP_IMPLS = ("tile", "sweep")
SWEEP_MAX_K = 32
SWEEP_SPLIT = 2  # column halves in the sweep kernel (1: one full tile)
# Sweep kernel: load the cost rows of step s + 1 during step s. Bit-identical either way. None: by
# shape (`sweep_prefetch`); True/False forces it.
SWEEP_PREFETCH = None


def sweep_prefetch(T: int, k_max: int) -> bool:
    """Whether the sweep kernel prefetches the next cost row. H200 (benchmarks/RESULTS.md,
    B=4096): at T=128 it helps with many rows per step (K=16: 0.325 -> 0.320 ms, K=32: 0.638 ->
    0.605 ms) and costs a little with few (K=8: 0.229 -> 0.231 ms; T=21, K=6: 0.022 -> 0.023 ms):
    the extra registers only pay off when a step's relaxation is long enough to hide the load."""
    if SWEEP_PREFETCH is not None:
        return bool(SWEEP_PREFETCH)
    return T > 64 and k_max >= 16


def default_impl(T: int, k_max: int) -> str:
    return "sweep" if T <= MAX_ON_CHIP_T and k_max <= SWEEP_MAX_K else "tile"


# Samples per backtracking program (one per thread): the K dependent loads of all samples overlap.
BACKTRACK_BLOCK_B = 128


# (min, index) with the smaller index on equal values: the combine function ``tl.min(...,
# return_indices=True, return_indices_tie_break_left=True)`` uses, passed to the builtin
# ``tl.reduce`` directly so that the interpreter recognises it and reduces with numpy instead of
# calling it per element (and so that ``tl.min``, a standard-library ``@jit``, is not needed).
_ARGMIN_LEFT = tl.standard._argmin_combine_tie_break_left


# ``scj`` (the cost's column stride, 1 for a contiguous cost) is not specialised: when the
# compiler cannot prove that columns are contiguous it lays the [s, t] tile out with one column
# ``t`` per thread and the 4 warps side by side along ``t``, so the min over ``s`` is entirely
# in-thread (no cross-warp reduction, 2 barriers per row instead of 12 at sm_90 in triton 3.8;
# 742 vs 769 instructions per row and thread, 206 registers, no spills). With ``scj == 1``
# specialised it would vectorise the load (4 columns per thread) and put the warps along ``s``.
@triton.jit(do_not_specialize=["scj"])
def _dp_kernel(
    c_ptr, back_ptr, dbuf_ptr, dlast_ptr,
    T, k_max,
    scb, sci, scj,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ON_CHIP: tl.constexpr,
):
    """DP rows 1..k_max-1 for sample ``program_id(0)``: back-pointers and ``D[r, T-1]`` to scratch."""
    b = tl.program_id(0).to(tl.int64)
    c_base = c_ptr + b * scb
    back_base = back_ptr + b * k_max * T
    dlast_base = dlast_ptr + b * k_max
    inf = float("inf")

    if ON_CHIP:
        s = tl.arange(0, BLOCK_T)
        t = tl.arange(0, BLOCK_T)
        valid = (s[:, None] < t[None, :]) & (t[None, :] < T)
        c = tl.load(c_base + s[:, None] * sci + t[None, :] * scj, mask=valid, other=inf).to(tl.float32)
        D = tl.where(s == 0, 0.0, inf)
        for r in range(1, k_max):
            cand = D[:, None] + c
            D, arg = tl.reduce((cand, tl.broadcast_to(s[:, None], cand.shape)), 0, _ARGMIN_LEFT)
            tl.store(back_base + r * T + t, arg.to(back_ptr.dtype.element_ty), mask=t < T)
            tl.store(dlast_base + r + t * 0, D, mask=t == T - 1)  # D[r, T-1]: one lane stores
    else:
        # D rows live in dbuf[b, 2, BLOCK_T * ceil(T / BLOCK_T)]; row r reads buffer (r-1)%2
        n_pad = (T + BLOCK_T - 1) // BLOCK_T * BLOCK_T
        dbuf_base = dbuf_ptr + b * 2 * n_pad
        tt = tl.arange(0, BLOCK_T)
        for t0 in range(0, n_pad, BLOCK_T):
            tl.store(dbuf_base + t0 + tt, tl.where(t0 + tt == 0, 0.0, inf))
        tl.debug_barrier()
        for r in range(1, k_max):
            src = dbuf_base + ((r - 1) % 2) * n_pad
            dst = dbuf_base + (r % 2) * n_pad
            for t0 in range(0, T, BLOCK_T):
                t = t0 + tt
                best = tl.full([BLOCK_T], inf, tl.float32)
                best_s = tl.full([BLOCK_T], 0, tl.int32)
                for s0 in range(0, t0 + BLOCK_T, BLOCK_S):  # only s < t matters: stop at the block's end
                    sl = tl.arange(0, BLOCK_S)  # local index: what the reduction returns
                    s = s0 + sl
                    valid = (s[:, None] < t[None, :]) & (t[None, :] < T)
                    c = tl.load(c_base + s[:, None] * sci + t[None, :] * scj, mask=valid, other=inf).to(tl.float32)
                    d = tl.load(src + s, mask=s < T, other=inf)
                    cand = d[:, None] + c
                    m, a = tl.reduce((cand, tl.broadcast_to(sl[:, None], cand.shape)), 0, _ARGMIN_LEFT)
                    take = m < best  # strict: an earlier s block keeps its (smaller) s on ties
                    best = tl.where(take, m, best)
                    best_s = tl.where(take, s0 + a, best_s)
                tl.store(dst + t, best)
                tl.store(back_base + r * T + t, best_s.to(back_ptr.dtype.element_ty), mask=t < T)
                tl.store(dlast_base + r + t * 0, best, mask=t == T - 1)
            tl.debug_barrier()  # row r fully written before row r+1 reads it



@triton.jit
def _sweep_row(c_base, s, t, T, sci, scj):
    """Cost row ``c[s, t]`` as a ``[1, BLOCK]`` tile for the columns ``t`` of one block (``+inf``
    where ``t <= s`` or ``t >= T``). Loaded in 2-D so that it gets the layout of the ``[K, BLOCK]``
    state tile it is added to: a 1-D load got a layout of its own and went through shared memory
    (two layout conversions, i.e. barriers) at every step."""
    t2 = t[None, :]
    return tl.load(c_base + s * sci + t2 * scj, mask=(t2 > s) & (t2 < T), other=float("inf")).to(tl.float32)


@triton.jit
def _sweep_relax(best, arg, d_prev, c_row, s):
    """``best[r, t] = min(best[r, t], D[r-1, s] + c[s, t])`` for the columns ``t`` of one block;
    strict ``<`` over increasing ``s`` keeps the smallest ``s`` on ties. Row 0 gets
    ``d_prev = inf`` and never changes."""
    cand = d_prev[:, None] + c_row
    take = cand < best
    return tl.where(take, cand, best), tl.where(take, s, arg)


@triton.jit
def _sweep_finish(best, arg, t, r2, back_base, dlast_base, T, k_max, back_ptr):
    t2 = t[None, :]
    ok = (r2 >= 1) & (r2 < k_max) & (t2 < T)
    tl.store(back_base + r2 * T + t2, arg.to(back_ptr.dtype.element_ty), mask=ok)
    tl.store(dlast_base + r2 + t2 * 0, best, mask=ok & (t2 == T - 1))


@triton.jit(do_not_specialize=["scj"])
def _dp_sweep_kernel(
    c_ptr, back_ptr, dcol_ptr, dlast_ptr,
    T, k_max,
    scb, sci, scj,
    BLOCK_T: tl.constexpr,
    K_PAD: tl.constexpr,
    SPLIT: tl.constexpr = 2,
    PREFETCH: tl.constexpr = False,
):
    """All DP rows in one sweep over ``s`` for sample ``program_id(0)``; each cost row read once.

    ``best[r, t]`` (rows ``r < K_PAD`` x columns ``t``, registers) holds
    ``min_{s' < s} D[r-1, s'] + c[s', t]`` after step ``s``. Column ``s`` of every row is final
    at the start of step ``s`` (it depends on ``s' < s`` only), so its owner publishes
    ``D[:, s]`` to a per-sample scratch (double-buffered by the parity of ``s``, one barrier per
    step) and every row is relaxed with the one cost row ``c[s, :]``.

    ``SPLIT=2`` keeps the columns as two halves: once ``s`` reaches the upper half, the lower
    half is final (``t <= s``) and only the upper half is relaxed, 3/4 of the work of a full
    tile (``SPLIT=1``)."""
    b = tl.program_id(0).to(tl.int64)
    c_base = c_ptr + b * scb
    dcol_base = dcol_ptr + b * 2 * K_PAD
    back_base = back_ptr + b * k_max * T
    dlast_base = dlast_ptr + b * k_max
    inf = float("inf")
    r = tl.arange(0, K_PAD)
    r2 = r[:, None]
    H: tl.constexpr = BLOCK_T // SPLIT
    t_lo = tl.arange(0, H)
    t_hi = H + tl.arange(0, H)
    # row 0 = D[0]: 0 at t = 0, +inf elsewhere (only the lower block holds t = 0)
    best_lo = tl.where((r2 == 0) & (t_lo[None, :] == 0), 0.0, tl.full([K_PAD, H], inf, tl.float32))
    arg_lo = tl.full([K_PAD, H], 0, tl.int32)
    best_hi = tl.full([K_PAD, H], inf, tl.float32)
    arg_hi = tl.full([K_PAD, H], 0, tl.int32)
    # PREFETCH: the cost rows of step s + 1 are loaded at the top of step s, so their HBM latency
    # overlaps the publish / barrier / relax of step s instead of stalling step s + 1 (the loop is
    # a serial chain of T steps per sample; without it every step waits for one DRAM round trip)
    if PREFETCH:
        c_lo = _sweep_row(c_base, 0, t_lo, T, sci, scj)
        c_hi = _sweep_row(c_base, 0, t_hi, T, sci, scj)
    for s in range(0, tl.minimum(H, T - 1)):
        if PREFETCH:
            n_lo = _sweep_row(c_base, s + 1, t_lo, T, sci, scj)
            n_hi = _sweep_row(c_base, s + 1, t_hi, T, sci, scj)
        else:
            c_lo = _sweep_row(c_base, s, t_lo, T, sci, scj)
            c_hi = _sweep_row(c_base, s, t_hi, T, sci, scj)
        buf = dcol_base + (s % 2) * K_PAD
        # the owner of column s publishes D[:, s]. The address is buf + r on the active lane; the
        # "+ (t - s)" makes it contiguous along t like the state tile, so the compiler keeps the
        # tile's layout for the store (with "+ t * 0" it chose a layout contiguous along r, kept a
        # second copy of the lower tile in it and relaxed that copy too: 96 instead of 64 registers)
        tl.store(buf + r2 + (t_lo[None, :] - s), best_lo, mask=t_lo[None, :] == s)
        tl.debug_barrier()
        d_prev = tl.load(buf + r - 1, mask=r >= 1, other=inf)  # D[r-1, s] for row r
        best_lo, arg_lo = _sweep_relax(best_lo, arg_lo, d_prev, c_lo, s)
        if SPLIT == 2:
            best_hi, arg_hi = _sweep_relax(best_hi, arg_hi, d_prev, c_hi, s)
        if PREFETCH:
            c_lo = n_lo
            c_hi = n_hi
    if SPLIT == 2:
        for s in range(H, T - 1):
            if PREFETCH:
                n_hi = _sweep_row(c_base, s + 1, t_hi, T, sci, scj)
            else:
                c_hi = _sweep_row(c_base, s, t_hi, T, sci, scj)
            buf = dcol_base + (s % 2) * K_PAD
            tl.store(buf + r2 + (t_hi[None, :] - s), best_hi, mask=t_hi[None, :] == s)  # see above
            tl.debug_barrier()
            d_prev = tl.load(buf + r - 1, mask=r >= 1, other=inf)
            best_hi, arg_hi = _sweep_relax(best_hi, arg_hi, d_prev, c_hi, s)
            if PREFETCH:
                c_hi = n_hi
        _sweep_finish(best_hi, arg_hi, t_hi, r2, back_base, dlast_base, T, k_max, back_ptr)
    _sweep_finish(best_lo, arg_lo, t_lo, r2, back_base, dlast_base, T, k_max, back_ptr)


@triton.jit
def _backtrack_kernel(
    back_ptr, dlast_ptr, ks_ptr, offs_ptr, idx_ptr, tot_ptr,
    B, T, k_max, n_k, n_idx,
    BLOCK_B: tl.constexpr,
):
    """``idx[K-1] = T-1, idx[r-1] = back[r, idx[r]]`` for ``BLOCK_B`` samples at once, every budget."""
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    ok = b < B
    b = b.to(tl.int64)
    for i in range(0, n_k):
        k = tl.load(ks_ptr + i)
        out = idx_ptr + b * n_idx + tl.load(offs_ptr + i)
        tl.store(tot_ptr + b * n_k + i, tl.load(dlast_ptr + b * k_max + k - 1, mask=ok), mask=ok)
        cur = tl.full([BLOCK_B], 0, tl.int64) + (T - 1)
        tl.store(out + k - 1, cur, mask=ok)
        for j in range(1, k):
            r = k - j
            cur = tl.load(back_ptr + (b * k_max + r) * T + cur, mask=ok, other=0).to(tl.int64)
            tl.store(out + r - 1, cur, mask=ok)


def _is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def _check_inputs(cost: torch.Tensor, ks: list[int], op: str) -> None:
    if not isinstance(cost, torch.Tensor) or cost.dim() != 3 or cost.shape[1] != cost.shape[2]:
        raise ValueError(f"{op}: cost must be a [B, T, T] tensor, got {list(getattr(cost, 'shape', []))}")
    if not cost.is_floating_point():
        raise ValueError(f"{op}: cost must be a float tensor, got {cost.dtype}")
    T = cost.shape[1]
    if T > 32768:
        raise ValueError(f"{op}: T={T} exceeds the int16 back-pointer range (32768); use backend='torch'")
    if not ks:
        raise ValueError(f"{op}: need at least one budget k")
    for k in ks:
        if not 2 <= k <= T:
            raise ValueError(f"{op}: k must satisfy 2 <= k <= T={T} (both endpoints are keyframes), got k={k}")
    if not cost.is_cuda and not _is_interpreted(_dp_kernel):
        raise RuntimeError(
            f"{op}: got a {cost.device.type} tensor but kernels.dp was compiled for CUDA; run on CUDA tensors, "
            "or set TRITON_INTERPRET=1 before kernels.dp is first imported to use the Triton interpreter on CPU"
        )


_BUDGETS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _budget_tensors(ks: tuple[int, ...], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Budgets and their offsets in the packed index output, on ``dev`` (cached: no copy per call)."""
    key = (ks, str(dev))
    if key not in _BUDGETS:
        offs = [0]
        for k in ks[:-1]:
            offs.append(offs[-1] + k)
        as_i32 = lambda v: torch.tensor(v, dtype=torch.int32, device=dev)  # noqa: E731
        _BUDGETS[key] = (as_i32(list(ks)), as_i32(offs))
    return _BUDGETS[key]


def dp_select_many_triton(
    cost_B_T_T: torch.Tensor, ks: Sequence[int], num_warps: int | None = None, impl: str | None = None,
    split: int | None = None, prefetch: bool | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Optimal index sets for several budgets from one DP pass.

    Returns ``([idx_B_K for K in ks], total_B_N float32)`` where ``idx`` are sorted long indices
    (``0`` first, ``T-1`` last) and ``total[:, i]`` is the minimal cost for ``ks[i]``; each
    equals ``dp_select_reference(cost, ks[i])`` bit for bit.
    """
    ks = [int(k) for k in ks]
    _check_inputs(cost_B_T_T, ks, "dp_select_triton")
    B, T, _ = cost_B_T_T.shape
    dev = cost_B_T_T.device
    k_max = max(ks)
    impl = impl or default_impl(T, k_max)
    if impl not in DP_IMPLS:
        raise ValueError(f"dp_select_triton: impl={impl!r} is not one of {list(DP_IMPLS)}")
    if impl == "sweep" and (T > MAX_ON_CHIP_T or k_max > SWEEP_MAX_K):
        raise ValueError(f"dp_select_triton: impl='sweep' needs T <= {MAX_ON_CHIP_T} and max K <= {SWEEP_MAX_K}, "
                         f"got T={T}, K={k_max}")
    on_chip = T <= MAX_ON_CHIP_T
    if on_chip:
        block_t = block_s = max(16, triton.next_power_of_2(T))
        # 4 warps at T=128: one column t per thread (128 fp32 of the tile), so the min over s is
        # in-thread; more warps split s across warps (fewer registers, a cross-warp step per row)
        nw = num_warps or max(1, min(4, block_t * block_t // 2048))
        dbuf = torch.empty(1, dtype=torch.float32, device=dev)
    else:
        block_t, block_s = STREAM_BLOCK_T, STREAM_BLOCK_S
        nw = num_warps or 4
        n_pad = triton.cdiv(T, block_t) * block_t
        dbuf = torch.empty(B, 2, n_pad, dtype=torch.float32, device=dev)
    back = torch.empty(B, k_max, T, dtype=torch.int8 if T <= 128 else torch.int16, device=dev)
    dlast = torch.empty(B, k_max, dtype=torch.float32, device=dev)
    ks_t, offs_t = _budget_tensors(tuple(ks), dev)
    n_idx = sum(ks)
    idx = torch.empty(B, n_idx, dtype=torch.long, device=dev)
    tot = torch.empty(B, len(ks), dtype=torch.float32, device=dev)
    if B > 0:
        c = cost_B_T_T if cost_B_T_T.dtype == torch.float32 else cost_B_T_T.to(torch.float32)
        if impl == "sweep":
            bt = max(16, triton.next_power_of_2(T))
            k_pad = max(2, triton.next_power_of_2(k_max))
            dcol = torch.empty(B, 2, k_pad, dtype=torch.float32, device=dev)
            _dp_sweep_kernel[(B,)](
                c, back, dcol, dlast,
                T, k_max,
                c.stride(0), c.stride(1), c.stride(2),
                BLOCK_T=bt, K_PAD=k_pad, SPLIT=split or SWEEP_SPLIT,
                PREFETCH=sweep_prefetch(T, k_max) if prefetch is None else bool(prefetch),
                num_warps=num_warps or max(1, min(4, bt // 32)),
            )
        else:
            _dp_kernel[(B,)](
                c, back, dbuf, dlast,
                T, k_max,
                c.stride(0), c.stride(1), c.stride(2),
                BLOCK_T=block_t, BLOCK_S=block_s, ON_CHIP=on_chip,
                num_warps=nw,
            )
        _backtrack_kernel[(triton.cdiv(B, BACKTRACK_BLOCK_B),)](
            back, dlast, ks_t, offs_t, idx, tot,
            B, T, k_max, len(ks), n_idx,
            BLOCK_B=BACKTRACK_BLOCK_B,
            num_warps=4,
        )
    return list(idx.split(ks, dim=1)), tot


def dp_select_triton(cost_B_T_T: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx_B_K long, total_B float32)``, bit-identical to ``dp_select_reference(cost, k)``."""
    idx, tot = dp_select_many_triton(cost_B_T_T, [int(k)])
    return idx[0], tot[:, 0]
