"""Triton kernels vs their torch references: masked interpolation and the batched keyframe DP.

    .venv/bin/python benchmarks/bench_kernels.py                                  # CUDA, issue sizes
    .venv/bin/python benchmarks/bench_kernels.py sweep=true json_out=k.json md_out=k.md
    .venv/bin/python benchmarks/bench_kernels.py --cpu-smoke                      # CPU, interpreter
    ncu -k regex:_kernel python benchmarks/bench_kernels.py profile_only=true     # one launch each
    .venv/bin/python benchmarks/bench_kernels.py static_report=true               # sm_90 regs/occupancy, no GPU
    bash benchmarks/run_device.sh                                                 # the device check

Every number is measured in the same run on the same device and printed with the device name,
date and commit:

* **copy bandwidth**: ``dst.copy_(src)`` of a tensor as large as the operand (bytes read +
  bytes written per second), the practical ceiling of a memory-bound kernel;
* **interpolation** ``I(x, M)`` at Wan2.1 latent size (``B=8, C=16, T=21, H=60, W=104`` bf16,
  time at dim 2, ``K in {2, 6, 11}`` random keyframes per sample) and maze size
  (``B=4096, T=128, D=2`` fp32): forward, fused phase-2 corruption, forward+backward. ``GB/s``
  counts the minimal HBM traffic (keyframe rows read, every row written; plus ``eps`` on the
  missing frames for the fused op; for the backward, the gradient read and written), the same
  byte count for the kernel and for the torch reference; ``of copy`` is that rate over the copy
  bandwidth measured at the same size;
* **DP** at ``B=4096, T=128, K in {8, 16, 32}`` and ``T=21, K=6``: the kernel, the torch
  reference (``dp_select_reference``, vectorised over the batch) and a numpy loop over samples
  (run on ``numpy_samples`` samples and scaled linearly to ``B``), and the fraction of the
  bound "read the cost matrices once at copy bandwidth" (``bytes(cost) / copy_bw``) that the
  kernel reaches.

GPU times are ``triton.testing.do_bench`` medians (L2 flushed before each repetition; 20/80 %
quantiles in the JSON). Each kernel result is checked against its reference before it is
timed. ``sweep=true`` also times the kernels' block-size / warp-count options, so one device
run shows whether the defaults are the best choice. ``--cpu-smoke`` runs the same code on tiny
shapes under ``TRITON_INTERPRET=1`` with a wall-clock timer: it checks the script and the
kernels end to end, its times say nothing about performance.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

# the interpreter must be on before the kernel modules are imported (their @triton.jit decides)
if "--cpu-smoke" in sys.argv or "cpu_smoke=true" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402

from interpdiff.config import parse_cli, to_dict  # noqa: E402
from interpdiff.interpolate import interpolate_corrupt, interpolate_reference  # noqa: E402
from interpdiff.io import atomic_write_text, code_version  # noqa: E402
from interpdiff.selection import dp_select_reference  # noqa: E402
from kernels import dp as kdp  # noqa: E402
from kernels import interpolate as kint  # noqa: E402


@dataclass
class BenchKernelsConfig:
    cpu_smoke: bool = False  # tiny shapes on CPU under the Triton interpreter (checks, not speed)
    sweep: bool = False  # also time block-size / warp options of both kernels
    profile_only: bool = False  # one launch of each main kernel at the issue sizes (run under ncu), no timing
    static_report: bool = False  # compile the default variants for sm_90 (no GPU needed): registers, spills, occupancy
    numpy_samples: int = 256  # samples the numpy DP loop runs on (scaled to B)
    warmup_ms: int = 25
    rep_ms: int = 100
    timing: str = "graph"  # graph: CUDA-graph replay, cold L2, no launch overhead; eager: do_bench only
    json_out: str = ""
    md_out: str = ""
    seed: int = 0


# ------------------------------------------------------------------------------ timing


class Timer:
    """Time in ms of ``fn()``.

    CUDA, ``timing="graph"`` (default): GPU time without the host's launch overhead. ``n``
    calls are captured in one CUDA graph, each preceded by a write of ``2 x L2`` bytes that
    evicts the L2, and a second graph holds the evictions alone; the time per call is the
    difference of the two replay times (median of ``replays``), i.e. each call starts with a
    cold L2 as in ``do_bench``. The copy baseline is timed the same way. Where a function cannot
    be captured (a host sync inside) it falls back to the eager timing and says so
    (``"graph": false``). The eager ``triton.testing.do_bench`` median (which also counts the
    Python launch overhead when the kernel is shorter than it) is always reported as
    ``ms_eager``. CPU (smoke only): wall clock.
    """

    def __init__(self, cuda: bool, warmup_ms: int, rep_ms: int, timing: str = "graph", n: int = 30, replays: int = 7):
        self.cuda, self.warmup_ms, self.rep_ms = cuda, warmup_ms, rep_ms
        self.timing, self.n, self.replays = timing, n, replays
        self._flush = None
        if cuda:
            l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20) or (64 << 20)
            self._flush = torch.empty(2 * l2, dtype=torch.int8, device="cuda")

    def _graph_ms(self, fn) -> list[float]:
        flush = self._flush
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
            flush.zero_()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()

        def capture(with_fn: bool):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(self.n):
                    flush.zero_()
                    if with_fn:
                        fn()
            return g

        g_both, g_flush = capture(True), capture(False)

        def replay(g) -> float:
            g.replay()  # warm
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            return a.elapsed_time(b) / self.n

        out = []
        for _ in range(self.replays):
            out.append(replay(g_both) - replay(g_flush))
        del g_both, g_flush
        return out

    def __call__(self, fn) -> dict:
        if self.cuda:
            q = triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.5, 0.2, 0.8])
            eager = {"ms": q[0], "ms_p20": q[1], "ms_p80": q[2]}
            if self.timing != "graph":
                return {**eager, "ms_eager": q[0], "graph": False}
            try:
                ts = sorted(self._graph_ms(fn))
            except Exception as e:  # noqa: BLE001 - not capturable (host sync): eager timing, flagged
                torch.cuda.synchronize()
                return {**eager, "ms_eager": q[0], "graph": False, "graph_error": f"{type(e).__name__}: {e}"[:300]}
            return {"ms": statistics.median(ts), "ms_p20": ts[len(ts) // 5], "ms_p80": ts[(4 * len(ts)) // 5],
                    "ms_eager": q[0], "graph": True}
        fn()
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return {"ms": statistics.median(ts), "ms_p20": min(ts), "ms_p80": max(ts)}


def fill_bandwidth(timer: Timer, nbytes: int, device) -> dict:
    """GB/s of ``dst.fill_(1)`` for ``nbytes`` (written only): the write-only ceiling at that size.
    A forward interpolation with few keyframes is almost all writes (K=2 at T=21: 21 rows
    written, 2 read), so next to the copy rate it shows what a write-dominated kernel can reach."""
    dst = torch.empty(max(1, nbytes // 4), dtype=torch.float32, device=device)
    t = timer(lambda: dst.fill_(1.0))
    moved = dst.numel() * 4
    return {"bytes": moved, **t, "GBps": moved / (t["ms"] * 1e-3) / 1e9}


def copy_bandwidth(timer: Timer, nbytes: int, device) -> dict:
    """GB/s of ``dst.copy_(src)`` for ``nbytes`` (read + write counted)."""
    src = torch.empty(max(1, nbytes // 4), dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    moved = 2 * src.numel() * 4
    return {"bytes": moved, **t, "GBps": moved / (t["ms"] * 1e-3) / 1e9}


# ------------------------------------------------------------------------------ interpolation


def random_masks(B: int, T: int, K: int, device, gen: torch.Generator) -> torch.Tensor:
    """``K`` keyframes per row (both endpoints + ``K-2`` random interior frames)."""
    m = torch.zeros(B, T, dtype=torch.bool)
    if K > 2:
        mid = torch.rand(B, T - 2, generator=gen).argsort(dim=1)[:, : K - 2] + 1
        m.scatter_(1, mid, True)
    m[:, 0] = m[:, -1] = True
    return m.to(device)


def _err_scale(x: torch.Tensor, m: torch.Tensor, td: int, ref: torch.Tensor) -> torch.Tensor:
    """Magnitude the kernel's rounding differences are measured against: ``(1 - w)|xl| + w|xr|``
    (Triton contracts ``xl * (1 - w) + xr * w`` into an FMA: an fp32 ulp of the *terms*, large
    where they cancel) plus ``|ref|`` (the final cast; the interpreter truncates there)."""
    return interpolate_reference(x.abs().float(), m, td).double() + ref.double().abs()


def _check_close(a: torch.Tensor, b: torch.Tensor, what: str, scale: torch.Tensor) -> None:
    """``|a - b| <= eps(dtype) * scale``: rounding-order and cast differences only."""
    fi = torch.finfo(a.dtype)
    err = (a.double() - b.double()).abs()
    bound = fi.eps * scale.double() + fi.tiny
    if bool((err > bound).any()):
        raise AssertionError(f"{what}: kernel differs from the reference by {float(err.max()):.3g} (> 1 ulp)")


def bench_interpolate(timer: Timer, cases: list[dict], device, gen) -> list[dict]:
    """The forward (the kernel the dispatch picks, then every other forward kernel that runs at
    that ``T``), the fused corruption (likewise), and forward+backward, each against its torch
    reference (timed once per ``K``)."""
    rows = []
    copies: dict[int, dict] = {}
    for case in cases:
        shape, td, dtype = tuple(case["shape"]), case["time_dim"], case["dtype"]
        B, T = shape[0], shape[td]
        x = torch.randn(shape, generator=gen).to(dtype).to(device)
        eps = torch.randn(shape, generator=gen).to(dtype).to(device)
        sigma = torch.rand(B, generator=gen).to(device)
        nbytes = x.numel() * x.element_size()
        if nbytes not in copies:
            copies[nbytes] = copy_bandwidth(timer, nbytes, device)
            copies[nbytes]["fill"] = fill_bandwidth(timer, nbytes, device)
        copy = copies[nbytes]
        default_impl = kint._default_impl(T, _inner(shape, td))
        noise_impl = kint._default_impl(T, _inner(shape, td), True)
        others = [i for i in kint.FWD_IMPLS if i != default_impl and kint.supports(i, T)]
        others_c = [i for i in kint.FWD_IMPLS if i != noise_impl and kint.supports(i, T)] if case.get("fused_impls") else []
        for K in case["ks"]:
            m = random_masks(B, T, K, device, gen)
            ref = interpolate_reference(x, m, td)
            scale = _err_scale(x, m, td, ref)
            _check_close(kint.interpolate_triton(x, m, td), ref, f"interpolate {shape} K={K}", scale)
            ref_c = interpolate_corrupt(x, m, sigma, eps, td, backend="torch")
            scale_c = scale + ref_c.double().abs()  # rounded twice (I(x, M) to x's dtype, then the sum)
            _check_close(kint.interpolate_triton(x, m, td, sigma=sigma, eps=eps), ref_c,
                         f"interpolate_corrupt {shape} K={K}", scale_c)
            for impl in others:
                _check_close(kint._forward(x, m, td, impl=impl), ref, f"interpolate {impl} {shape} K={K}", scale)
            for impl in others_c:
                _check_close(kint._forward(x, m, td, sigma=sigma, eps=eps, impl=impl), ref_c,
                             f"interpolate_corrupt {impl} {shape} K={K}", scale_c)
            frac_key = K / T
            refs = {
                "forward": lambda: interpolate_reference(x, m, td),
                "fused": lambda: interpolate_corrupt(x, m, sigma, eps, td, backend="torch", check_values=False),
            }
            # op -> (kernel fn, reference key, bytes moved, kernel name)
            ops = {
                # check=False: the mask was validated above; the value check is a host sync that
                # interpdiff.interpolate.check_mask already does on the public path
                "forward": (lambda: kint.interpolate_triton(x, m, td, check=False), "forward", nbytes * (1 + frac_key),
                            default_impl),
                # keyframe rows of x + missing rows of eps (= one x), every row written
                "fused corruption": (lambda: kint.interpolate_triton(x, m, td, sigma=sigma, eps=eps, check=False),
                                     "fused", 2 * nbytes, noise_impl),
            }
            for impl in others:  # the forward kernels the dispatch does not pick at this shape
                ops[f"forward ({impl} kernel)"] = (lambda impl=impl: kint._forward(x, m, td, impl=impl), "forward",
                                                   nbytes * (1 + frac_key), impl)
            for impl in others_c:
                ops[f"fused corruption ({impl} kernel)"] = (
                    lambda impl=impl: kint._forward(x, m, td, sigma=sigma, eps=eps, impl=impl), "fused", 2 * nbytes, impl)
            if case.get("backward"):
                xg = x.detach().requires_grad_(True)
                g = torch.randn(shape, generator=gen).to(dtype).to(device)

                def kfb():
                    return torch.autograd.grad(kint.interpolate_triton(xg, m, td, check=False), xg, g)

                def rfb():
                    return torch.autograd.grad(interpolate_reference(xg, m, td), xg, g)

                refs["forward+backward"] = rfb
                # forward (keyframes read, all written) + backward (grad read, grad_x written)
                ops["forward+backward"] = (kfb, "forward+backward", nbytes * (1 + frac_key) + 2 * nbytes, default_impl)
            ref_t = {}
            for op, (kfn, rkey, moved, impl) in ops.items():
                tk = timer(kfn)
                if rkey not in ref_t:
                    ref_t[rkey] = timer(refs[rkey])
                tr = ref_t[rkey]
                gbps = moved / (tk["ms"] * 1e-3) / 1e9
                eager = {}
                if "ms_eager" in tk and "ms_eager" in copy:
                    ge = moved / (tk["ms_eager"] * 1e-3) / 1e9
                    ce = copy["bytes"] / (copy["ms_eager"] * 1e-3) / 1e9
                    eager = {"GBps_eager": ge, "copy_GBps_eager": ce, "of_copy_eager": ge / ce,
                             "speedup_eager": tr["ms_eager"] / tk["ms_eager"]}
                rows.append({
                    "case": case["name"], "op": op, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                    "K": K, "bytes": int(moved), "triton": tk, "torch": tr, "GBps": gbps,
                    "copy_GBps": copy["GBps"], "of_copy": gbps / copy["GBps"], "speedup": tr["ms"] / tk["ms"],
                    "fill_GBps": copy["fill"]["GBps"], "impl": impl, **eager,
                })
    return rows


def kernel_summary(rows: list[dict], case: str = "wan") -> list[dict]:
    """Per forward kernel (plain and fused) at one case: ``of copy`` at each ``K`` and the worst
    of them, best first. The acceptance target (>= 75 % at every K) holds for a kernel if its
    worst K does; the dispatch default should be such a kernel."""
    table: dict[tuple[str, str], dict] = {}
    for r in rows:
        if r["case"] != case or r["op"].startswith("forward+backward"):
            continue
        kind = "fused" if r["op"].startswith("fused") else "forward"
        e = table.setdefault((kind, r["impl"]), {"op": kind, "impl": r["impl"], "of_copy": {}, "ms": {},
                                                  "default": False})
        e["of_copy"][r["K"]] = r["of_copy"]
        e["ms"][r["K"]] = r["triton"]["ms"]
        e["default"] |= "(" not in r["op"]
    out = [dict(e, worst=min(e["of_copy"].values())) for e in table.values()]
    out.sort(key=lambda e: (e["op"] != "forward", -e["worst"]))
    return out


# ------------------------------------------------------------------------------ DP


def dp_numpy(cost_T_T: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """One sample, numpy: the per-sample loop a script would write (vectorised over ``t`` only)."""
    T = cost_T_T.shape[0]
    c = np.where(np.triu(np.ones((T, T), dtype=bool), 1), cost_T_T.astype(np.float32), np.float32(np.inf))
    D = np.full(T, np.inf, dtype=np.float32)
    D[0] = 0.0
    back = np.zeros((k, T), dtype=np.int64)
    for r in range(1, k):
        cand = D[:, None] + c
        back[r] = cand.argmin(axis=0)
        D = cand.min(axis=0)
    idx = np.empty(k, dtype=np.int64)
    idx[-1] = T - 1
    for r in range(k - 1, 0, -1):
        idx[r - 1] = back[r, idx[r]]
    return idx, float(D[T - 1])


def bench_dp(timer: Timer, cases: list[dict], numpy_samples: int, device, gen) -> list[dict]:
    rows = []
    for case in cases:
        B, T = case["B"], case["T"]
        cost = (torch.rand(B, T, T, generator=gen) * 10).to(device)
        cost_bytes = cost.numel() * 4
        copy = copy_bandwidth(timer, cost_bytes, device)
        t_bound_ms = cost_bytes / (copy["GBps"] * 1e9) * 1e3  # read once at copy bandwidth
        n_np = min(B, numpy_samples)
        cost_np = cost[:n_np].cpu().numpy()
        for K in case["ks"]:
            idx, tot = kdp.dp_select_triton(cost, K)
            ref_idx, ref_tot = dp_select_reference(cost, K)
            if not (torch.equal(idx, ref_idx) and torch.equal(tot, ref_tot)):
                raise AssertionError(f"dp B={B} T={T} K={K}: kernel differs from dp_select_reference")
            np_idx, np_tot = dp_numpy(cost_np[0], K)
            if not np.array_equal(np_idx, ref_idx[0].cpu().numpy()):
                raise AssertionError(f"dp T={T} K={K}: numpy loop differs from dp_select_reference")
            tk = timer(lambda: kdp.dp_select_triton(cost, K))
            impl = kdp.default_impl(T, K)
            others = {}
            for other in kdp.DP_IMPLS:
                if other == impl or (other == "sweep" and kdp.default_impl(T, K) != "sweep"):
                    continue
                oi, ot = kdp.dp_select_many_triton(cost, [K], impl=other)
                if not (torch.equal(oi[0], ref_idx) and torch.equal(ot[:, 0], ref_tot)):
                    raise AssertionError(f"dp B={B} T={T} K={K} impl={other}: kernel differs from dp_select_reference")
                others[other] = timer(lambda: kdp.dp_select_many_triton(cost, [K], impl=other))
            if impl == "sweep":  # the sweep kernel with the other prefetch setting (kdp.sweep_prefetch)
                pf = not kdp.sweep_prefetch(T, K)
                oi, ot = kdp.dp_select_many_triton(cost, [K], prefetch=pf)
                if not (torch.equal(oi[0], ref_idx) and torch.equal(ot[:, 0], ref_tot)):
                    raise AssertionError(f"dp B={B} T={T} K={K} sweep prefetch={pf}: kernel differs from the reference")
                others["sweep+prefetch" if pf else "sweep-prefetch"] = timer(
                    lambda: kdp.dp_select_many_triton(cost, [K], prefetch=pf))
            tr = timer(lambda: dp_select_reference(cost, K))
            t0 = time.perf_counter()
            for b in range(n_np):
                dp_numpy(cost_np[b], K)
            np_ms = (time.perf_counter() - t0) * 1e3 * B / n_np
            rows.append({
                "B": B, "T": T, "K": K, "cost_bytes": cost_bytes, "triton": tk,
                "impl": impl + ("+prefetch" if impl == "sweep" and kdp.sweep_prefetch(T, K) else ""), "other_impls": others,
                "torch": tr,
                "numpy_ms": np_ms, "numpy_samples": n_np, "speedup_torch": tr["ms"] / tk["ms"],
                "speedup_numpy": np_ms / tk["ms"], "copy_GBps": copy["GBps"], "bound_ms": t_bound_ms,
                "of_bound": t_bound_ms / tk["ms"],
            })
    return rows


# ------------------------------------------------------------------------------ sweep


def sweep(timer: Timer, interp_case: dict, dp_case: dict, device, gen) -> dict:
    """Block sizes / warp counts around the defaults (best first): the tile kernel at the first
    ``K`` of ``interp_case``, every time-walk kernel at each of its ``ks`` (``walks``: per
    configuration the share of the copy bandwidth at each K and the worst one, best first), the
    DP kernels at ``dp_case``."""
    shape, td, ks = tuple(interp_case["shape"]), interp_case["time_dim"], interp_case["ks"]
    x = torch.randn(shape, generator=gen).to(interp_case["dtype"]).to(device)
    nbytes = x.numel() * x.element_size()
    copy_gbps = copy_bandwidth(timer, nbytes, device)["GBps"]
    masks = {K: random_masks(shape[0], shape[td], K, device, gen) for K in ks}
    refs = {K: interpolate_reference(x, masks[K], td) for K in ks}
    scales = {K: _err_scale(x, masks[K], td, refs[K]) for K in ks}
    K = ks[0]
    m, ref, scale = masks[K], refs[K], scales[K]
    t_pad = triton.next_power_of_2(shape[td])
    out: dict = {"interpolate": [], "dp": [], "copy_GBps": copy_gbps}
    for bt in sorted({min(t_pad, v) for v in (4, 8, 16, 32)} | {t_pad}):
        for bq in (128, 256, 512, 1024):
            for nw in (4, 8):
                per_thread = bt * bq // (32 * nw)
                if not 4 <= per_thread <= 32:  # outside this range: too little work or register spills
                    continue
                for qi in (1, 2, 4):
                    got = kint._forward(x, m, td, block_t=bt, block_q=bq, num_warps=nw, q_iters=qi, impl="tile")
                    _check_close(got, ref, f"sweep interpolate BLOCK_T={bt} BLOCK_Q={bq} num_warps={nw} Q_ITERS={qi}",
                                 scale)
                    t = timer(lambda: kint._forward(x, m, td, block_t=bt, block_q=bq, num_warps=nw, q_iters=qi,
                                                    impl="tile"))
                    out["interpolate"].append({"impl": "tile", "K": K, "BLOCK_T": bt, "BLOCK_Q": bq, "num_warps": nw,
                                               "Q_ITERS": qi, **t})
    walks: dict[tuple, dict] = {}
    for impl in [i for i in kint.FWD_IMPLS if i != "tile" and kint.supports(i, shape[td])]:
        for bq in (512, 1024, 2048):
            for nw in (4, 8):
                w = walks.setdefault((impl, bq, nw), {"impl": impl, "BLOCK_Q": bq, "num_warps": nw, "of_copy": {},
                                                      "ms": {}})
                for K in ks:
                    mk = masks[K]
                    got = kint._forward(x, mk, td, block_q=bq, num_warps=nw, impl=impl)
                    _check_close(got, refs[K], f"sweep interpolate {impl} BLOCK_Q={bq} num_warps={nw} K={K}", scales[K])
                    t = timer(lambda: kint._forward(x, mk, td, block_q=bq, num_warps=nw, impl=impl))
                    out["interpolate"].append({"impl": impl, "K": K, "BLOCK_T": 1, "BLOCK_Q": bq, "num_warps": nw,
                                               "Q_ITERS": 1, **t})
                    w["ms"][K] = t["ms"]
                    w["of_copy"][K] = nbytes * (1 + K / shape[td]) / (t["ms"] * 1e-3) / 1e9 / copy_gbps
    out["walks"] = sorted((dict(w, worst=min(w["of_copy"].values())) for w in walks.values()), key=lambda w: -w["worst"])
    # the fused corruption (noise on the missing frames) through each kernel: the tile kernel at its
    # defaults against the walks at the configurations the plain sweep ranks highest
    B = shape[0]
    eps = torch.randn(shape, generator=gen).to(interp_case["dtype"]).to(device)
    sigma = torch.rand(B, generator=gen).to(device)
    refs_c = {K: interpolate_corrupt(x, masks[K], sigma, eps, td, backend="torch") for K in ks}
    scales_c = {K: scales[K] + refs_c[K].double().abs() for K in ks}
    fused: list[dict] = []
    walk_cfgs = ((1024, 4), (2048, 8), (2048, 4), (1024, 8))
    for impl, bq, nw in [("tile", None, None)] + [(i, bq, nw) for i in ("tloop", "seg", "jump", "jump2")
                                                   if kint.supports(i, shape[td]) for bq, nw in walk_cfgs]:
        w = {"impl": impl, "BLOCK_Q": bq, "num_warps": nw, "of_copy": {}, "ms": {}}
        for K in ks:
            mk = masks[K]

            def fn(mk=mk, impl=impl, bq=bq, nw=nw):
                return kint._forward(x, mk, td, sigma=sigma, eps=eps, block_q=bq, num_warps=nw, impl=impl)

            _check_close(fn(), refs_c[K], f"sweep interpolate_corrupt {impl} BLOCK_Q={bq} num_warps={nw} K={K}",
                         scales_c[K])
            t = timer(fn)
            w["ms"][K] = t["ms"]
            w["of_copy"][K] = 2 * nbytes / (t["ms"] * 1e-3) / 1e9 / copy_gbps  # as the main table's fused rows
        fused.append(dict(w, worst=min(w["of_copy"].values())))
    out["fused_walks"] = sorted(fused, key=lambda w: -w["worst"])
    out["interpolate"].sort(key=lambda r: (r["K"] != ks[0], r["ms"]))
    default_impl = kint._default_impl(shape[td], _inner(shape, td))
    if default_impl == "tile":
        default = kint._fwd_blocks(shape[td], _inner(shape, td))
        out["interpolate_default"] = {"impl": "tile", **dict(zip(("BLOCK_T", "BLOCK_Q", "num_warps"), default))}
    else:
        bq, nw = kint._walk_blocks(default_impl, _inner(shape, td), False)
        out["interpolate_default"] = {"impl": default_impl, "BLOCK_T": 1, "BLOCK_Q": bq, "num_warps": nw}
    B, T, K = dp_case["B"], dp_case["T"], dp_case["ks"][0]
    cost = (torch.rand(B, T, T, generator=gen) * 10).to(device)
    ref_idx, _ = dp_select_reference(cost, K)
    for impl in kdp.DP_IMPLS:
        for split in ((1, 2) if impl == "sweep" else (None,)):
            for pf in ((False, True) if impl == "sweep" else (None,)):
                for nw in ((2, 4, 8) if impl == "sweep" else (1, 2, 4, 8, 16)):
                    kw = dict(num_warps=nw, impl=impl, split=split, prefetch=pf)
                    idx, _ = kdp.dp_select_many_triton(cost, [K], **kw)
                    if not torch.equal(idx[0], ref_idx):
                        raise AssertionError(f"sweep dp {kw}: differs from the reference")
                    t = timer(lambda: kdp.dp_select_many_triton(cost, [K], **kw))
                    name = impl if split is None else f"{impl}{split}" + ("+prefetch" if pf else "")
                    out["dp"].append({"B": B, "T": T, "K": K, "impl": name, "num_warps": nw, **t})
    out["dp"].sort(key=lambda r: r["ms"])
    return out


def _inner(shape, td) -> int:
    q = 1
    for s in shape[td + 1 :]:
        q *= s
    return q


def compiled_kernel_info() -> list[dict]:
    """Registers / spills of every compiled variant (CUDA only; empty under the interpreter)."""
    info = []
    for name, fn in [("interp_fwd", kint._interp_fwd_kernel), ("interp_fwd_tloop", kint._interp_fwd_tloop_kernel),
                     ("interp_fwd_seg", kint._interp_fwd_seg_kernel), ("interp_fwd_hybrid", kint._interp_fwd_hybrid_kernel),
                     ("interp_fwd_jump", kint._interp_fwd_jump_kernel), ("interp_bwd", kint._interp_bwd_kernel),
                     ("dp", kdp._dp_kernel), ("dp_sweep", kdp._dp_sweep_kernel), ("dp_backtrack", kdp._backtrack_kernel)]:
        for dev_cache in getattr(fn, "device_caches", {}).values():
            try:
                kernels = dev_cache[0].values()
            except Exception:  # layout of triton's cache differs: report nothing rather than fail
                continue
            for k in kernels:
                meta = getattr(k, "metadata", None)
                info.append({
                    "kernel": name, "num_warps": getattr(meta, "num_warps", None),
                    "n_regs": getattr(k, "n_regs", None), "n_spills": getattr(k, "n_spills", None),
                    "shared": getattr(meta, "shared", None),
                })
    return info


def profile_launches(device, gen, cuda: bool) -> dict:
    """One launch each of the forward (Wan, K=6; default and the other ``impl``), backward (Wan,
    K=6) and DP (T=128, K=16; each impl, the sweep with and without prefetch) kernels.

    Meant for ``ncu -k regex:_kernel python benchmarks/bench_kernels.py profile_only=true``: the
    first launch of each shape compiles, the second is the one to read.
    """
    wan = [8, 16, 21, 60, 104] if cuda else [2, 3, 7, 4, 5]
    x = torch.randn(wan, generator=gen).to(torch.bfloat16).to(device).requires_grad_(True)
    m = random_masks(wan[0], wan[2], 6 if cuda else 3, device, gen)
    m2 = random_masks(wan[0], wan[2], 2, device, gen)
    B, T, K = (4096, 128, 16) if cuda else (4, 16, 4)
    cost = torch.rand(B, T, T, generator=gen).to(device)
    for _ in range(2):
        y = kint.interpolate_triton(x, m, 2)
        y.backward(torch.ones_like(y))
        with torch.no_grad():  # the forward kernels the dispatch does not pick, and K=2 (almost all writes)
            default = kint._default_impl(wan[2], wan[3] * wan[4])
            for impl in kint.FWD_IMPLS:
                if impl != default:
                    kint._forward(x.detach(), m, 2, impl=impl)
            kint._forward(x.detach(), m2, 2)
        for impl in kdp.DP_IMPLS:
            kdp.dp_select_many_triton(cost, [K], impl=impl)
        kdp.dp_select_many_triton(cost, [K], impl="sweep", prefetch=not kdp.sweep_prefetch(T, K))
    if cuda:
        torch.cuda.synchronize()
    print("profile_only: launched interp fwd (both impls)/bwd (Wan, K=6) and DP (B=4096, T=128, K=16, each impl, "
          "sweep with and without prefetch) twice each")
    return {"profile_only": True}


def static_report(cfg: BenchKernelsConfig) -> dict:
    """Registers, spills, barriers and the resulting occupancy of every kernel variant at sm_90,
    compiled as a launch at the issue sizes would be (``kernels.sass``; no GPU needed).
    Occupancy is the register-limited bound ``min(64 warps, 65536 / (regs * 32 * warps))`` per SM."""
    from kernels.sass import compile_for, issue_variants

    rows = []
    for name, fn, args, nw in issue_variants(kint, kdp):
        info = compile_for(fn, args, nw)
        regs = info["regs"]
        warps = min(64, (65536 // (regs * 32 * nw)) * nw)
        config = {k: str(v) for k, v in args.items() if k.isupper()}
        rows.append({"kernel": name, "config": config, "num_warps": nw, "regs": regs, "spill_bytes": info["spill_bytes"],
                     "bar_sync": info["bar_sync"], "warps_per_SM": warps, "occupancy": warps / 64})
    L = [f"Static sm_90 compile report (triton {triton.__version__}, ptxas from triton; no GPU; "
         "specialised on the arguments of a launch at the issue sizes)", "",
         "| kernel | config | warps | regs | spill B | bar.sync | warps/SM (reg-limited) |",
         "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        cfg_s = " ".join(f"{k}={v}" for k, v in r["config"].items())
        L.append(f"| {r['kernel']} | {cfg_s} | {r['num_warps']} | {r['regs']} | {r['spill_bytes']} | {r['bar_sync']} | "
                 f"{r['warps_per_SM']} ({r['occupancy']:.0%}) |")
    md = "\n".join(L) + "\n"
    print(md)
    if cfg.json_out:
        atomic_write_text(cfg.json_out, json.dumps({"static_report": rows}, indent=1))
    if cfg.md_out:
        atomic_write_text(cfg.md_out, md)
    return {"static_report": rows}


# ------------------------------------------------------------------------------ report


def targets(interp_rows: list[dict], dp_rows: list[dict]) -> list[dict]:
    """The issue's acceptance checks, with the measured value next to each target."""
    out = []
    for r in interp_rows:
        if r["case"] == "wan" and r["op"] == "forward":
            out.append({"check": f"interp fwd Wan K={r['K']}: >= 75% of copy bandwidth", "value": r["of_copy"],
                        "target": 0.75, "met": r["of_copy"] >= 0.75})
            out.append({"check": f"interp fwd Wan K={r['K']}: >= 3x torch reference", "value": r["speedup"],
                        "target": 3.0, "met": r["speedup"] >= 3.0})
    for r in dp_rows:
        if r["T"] == 128 and r["K"] == 16:
            out.append({"check": "DP B=4096 T=128 K=16: >= 10x torch reference", "value": r["speedup_torch"],
                        "target": 10.0, "met": r["speedup_torch"] >= 10.0})
            out.append({"check": "DP B=4096 T=128 K=16: >= 100x numpy loop", "value": r["speedup_numpy"],
                        "target": 100.0, "met": r["speedup_numpy"] >= 100.0})
    return out


def markdown(res: dict) -> str:
    smoke = " (CPU smoke: Triton interpreter, times are not performance)" if res["cpu_smoke"] else ""
    L = [f"Device: **{res['device']}**, {res['date']}, commit `{res['commit']}`, torch {res['torch']}, "
         f"triton {res['triton']}{smoke}", ""]
    L += ["| interpolation | op | K | triton ms | GB/s | copy GB/s | of copy | torch ms | speedup | eager: triton ms, "
          "of copy, speedup |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["interpolate"]:
        eg = (f"{r['triton']['ms_eager']:.4f}, {r['of_copy_eager']:.0%}, {r['speedup_eager']:.1f}x"
              if "of_copy_eager" in r else "-")
        flag = "" if r["triton"].get("graph", True) and r["torch"].get("graph", True) else " (eager)"
        L.append(f"| {r['case']} {'x'.join(map(str, r['shape']))} {r['dtype']} | {r['op']} | {r['K']} | "
                 f"{r['triton']['ms']:.4f} | {r['GBps']:.0f} | {r['copy_GBps']:.0f} | {r['of_copy']:.0%} | "
                 f"{r['torch']['ms']:.4f}{flag} | {r['speedup']:.1f}x | {eg} |")
    fills = {}
    for r in res["interpolate"]:
        fills.setdefault(f"{r['case']} {'x'.join(map(str, r['shape']))} {r['dtype']}", (r.get("fill_GBps"), r["copy_GBps"]))
    L += ["", "Write-only ceiling at the same size (`fill_`, GB/s written; copy GB/s = read + written): " + "; ".join(
        f"{k}: fill {f:.0f}, copy {c:.0f}" for k, (f, c) in fills.items() if f is not None) + ". `forward` rows use "
        "the kernel the dispatch picks at that shape (" + ", ".join(sorted({f"{r['case']}: {r['impl']}" for r in res["interpolate"]
                                                                            if r["op"] == "forward" and "impl" in r})) + ")."]
    L += ["", "| DP | K | triton ms (impl) | other impl ms | torch ms | vs torch | numpy ms (scaled) | vs numpy | "
          "bound ms | of bound | eager: triton ms, torch ms, vs torch |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["dp"]:
        oth = ", ".join(f"{k} {v['ms']:.4f}" for k, v in r.get("other_impls", {}).items()) or "-"
        eg = (f"{r['triton']['ms_eager']:.4f}, {r['torch']['ms_eager']:.3f}, "
              f"{r['torch']['ms_eager'] / r['triton']['ms_eager']:.1f}x" if "ms_eager" in r["triton"] else "-")
        flag = "" if r["triton"].get("graph", True) and r["torch"].get("graph", True) else " (eager)"
        L.append(f"| B={r['B']} T={r['T']} | {r['K']} | {r['triton']['ms']:.4f} ({r.get('impl', '')}) | {oth} | "
                 f"{r['torch']['ms']:.3f}{flag} | "
                 f"{r['speedup_torch']:.1f}x | {r['numpy_ms']:.1f} | {r['speedup_numpy']:.0f}x | "
                 f"{r['bound_ms']:.4f} | {r['of_bound']:.0%} | {eg} |")
    if res["targets"]:
        L += ["", "| acceptance check | measured | met |", "|---|---:|:-:|"]
        for t in res["targets"]:
            L.append(f"| {t['check']} | {t['value']:.2f} | {'yes' if t['met'] else '**no**'} |")
    if res.get("kernels_wan"):
        ks = sorted({k for e in res["kernels_wan"] for k in e["of_copy"]})
        L += ["", "Forward kernels at Wan size, share of the copy bandwidth at each K (worst first column; "
              "target >= 75 % at every K; * = the dispatch default):", "",
              "| op | kernel | worst | " + " | ".join(f"K={k}" for k in ks) + " |",
              "|---|---|---:|" + "---:|" * len(ks)]
        for e in res["kernels_wan"]:
            cells = " | ".join(f"{e['of_copy'][k]:.1%} ({e['ms'][k] * 1e3:.2f} us)" if k in e["of_copy"] else "-"
                               for k in ks)
            L.append(f"| {e['op']} | {e['impl']}{' *' if e['default'] else ''} | {e['worst']:.1%} | {cells} |")
    if res.get("sweep"):
        sw = res["sweep"]
        k0 = sw["interpolate"][0].get("K") if sw["interpolate"] else None
        if sw.get("walks"):
            L += _walk_table(f"Sweep of the time-walk kernels (copy {sw['copy_GBps']:.0f} GB/s), best worst-K first:",
                             sw["walks"][:12])
        if sw.get("fused_walks"):
            L += _walk_table("Sweep of the fused corruption (tile at its defaults, the walks at four configurations), "
                             "best worst-K first:", sw["fused_walks"])
        L += ["", f"Sweep (best first, K={k0}): interpolation " + ", ".join(
            f"{r.get('impl', 'tile')} {r['BLOCK_T']}x{r['BLOCK_Q']}/w{r['num_warps']}/q{r.get('Q_ITERS', 1)}: {r['ms']:.4f} ms"
            for r in sw["interpolate"][:5] if r.get("K") == k0)
              + f" (default {res['sweep']['interpolate_default']}); DP " + ", ".join(
            f"{r.get('impl', '')}/w{r['num_warps']}: {r['ms']:.3f} ms" for r in res["sweep"]["dp"])]
    return "\n".join(L) + "\n"


def _walk_table(title: str, walks: list[dict]) -> list[str]:
    """Markdown lines: one row per kernel configuration, its share of the copy bandwidth at each K."""
    ks = sorted({k for w in walks for k in w["of_copy"]}, key=int)
    L = ["", title, "", "| kernel | BLOCK_Q | warps | worst | " + " | ".join(f"K={k}" for k in ks) + " |",
         "|---|---:|---:|---:|" + "---:|" * len(ks)]
    for w in walks:
        L.append(f"| {w['impl']} | {w['BLOCK_Q'] or 'default'} | {w['num_warps'] or 'default'} | {w['worst']:.1%} | "
                 + " | ".join(f"{w['of_copy'][k]:.1%}" for k in ks) + " |")
    return L


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["cpu_smoke=true" if a == "--cpu-smoke" else a for a in argv]
    cfg = parse_cli(BenchKernelsConfig, argv)
    torch.set_num_threads(1)
    cuda = torch.cuda.is_available() and not cfg.cpu_smoke
    if not cuda and not cfg.cpu_smoke and not cfg.static_report:
        raise SystemExit("bench_kernels: no CUDA device; run with --cpu-smoke to check the script on CPU")
    if cfg.static_report:
        return static_report(cfg)
    if cfg.cpu_smoke and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("bench_kernels: --cpu-smoke needs TRITON_INTERPRET=1 before the kernels are imported")
    device = torch.device("cuda" if cuda else "cpu")
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.profile_only:
        return profile_launches(device, gen, cuda)
    timer = Timer(cuda, cfg.warmup_ms, cfg.rep_ms, cfg.timing)
    if cuda:
        interp_cases = [
            {"name": "wan", "shape": [8, 16, 21, 60, 104], "time_dim": 2, "dtype": torch.bfloat16, "ks": [2, 6, 11],
             "backward": True, "fused_impls": True},
            {"name": "maze", "shape": [4096, 128, 2], "time_dim": 1, "dtype": torch.float32, "ks": [8, 16, 32]},
        ]
        dp_cases = [{"B": 4096, "T": 128, "ks": [8, 16, 32]}, {"B": 4096, "T": 21, "ks": [6]}]
    else:
        interp_cases = [
            {"name": "wan", "shape": [2, 3, 7, 4, 5], "time_dim": 2, "dtype": torch.bfloat16, "ks": [2, 3],
             "backward": True, "fused_impls": True},
            {"name": "maze", "shape": [4, 16, 2], "time_dim": 1, "dtype": torch.float32, "ks": [4]},
        ]
        dp_cases = [{"B": 4, "T": 16, "ks": [4]}, {"B": 4, "T": 21, "ks": [6]}]
    res = {
        "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        # a device machine gets the working tree without .git: the caller passes the commit
        "commit": os.environ.get("INTERPDIFF_COMMIT") or code_version(), "torch": torch.__version__,
        "triton": triton.__version__,
        "cpu_smoke": cfg.cpu_smoke, "config": to_dict(cfg),
    }
    res["interpolate"] = bench_interpolate(timer, interp_cases, device, gen)
    res["dp"] = bench_dp(timer, dp_cases, cfg.numpy_samples, device, gen)
    res["targets"] = targets(res["interpolate"], res["dp"]) if cuda else []
    res["kernels_wan"] = kernel_summary(res["interpolate"])
    if cfg.sweep:  # the tables so far reach the files before the sweep, which a timeout may cut short
        res["compiled"] = compiled_kernel_info() if cuda else []
        _write(res, cfg, markdown(res))
        # the tile kernel at K=6, the walks at every K of the table (the default must hold at all of them)
        wan = {**interp_cases[0], "ks": [6, 2, 11] if cuda else [3, 2]}
        res["sweep"] = sweep(timer, wan, {**dp_cases[0], "ks": [16 if cuda else 4]}, device, gen)
    res["compiled"] = compiled_kernel_info() if cuda else []
    md = markdown(res)
    print(md)
    _write(res, cfg, md)
    return res


def _write(res: dict, cfg: BenchKernelsConfig, md: str) -> None:
    if cfg.json_out:
        atomic_write_text(cfg.json_out, json.dumps(res, indent=1, default=str))
    if cfg.md_out:
        atomic_write_text(cfg.md_out, md)


if __name__ == "__main__":
    main()
