"""The attention JVP of sCM distillation at Wan2.1-1.3B sizes: the fused kernel
(``kernels/attention_jvp.py``, ``distill.jvp_attention=triton``) against the query-chunked math
attention JVP the distillation runs by default (``distill.jvp_attention=math``, ``jvp_chunk=2048``).

    python benchmarks/bench_attention_jvp.py json_out=attn_jvp.json          # CUDA, ~1 minute
    python benchmarks/bench_attention_jvp.py sweep=true                      # + the kernel's tile sizes
    python benchmarks/bench_attention_jvp.py --cpu-smoke                     # tiny shapes, interpreter

Per case (batch 1, 12 heads of 128, bf16; the self-attention of the full 81 x 480 x 832 sequence,
32,760 tokens; of phase 1's six keyframes, 9,360 tokens; the cross-attention to 512 text tokens):

* ``sdpa``: the primal alone (``scaled_dot_product_attention``, the backend torch picks);
* ``math JVP``: ``torch.func.jvp`` through diffusers' math attention entry, chunked over queries as
  ``distill_wan.jvp_attention`` does (primal and tangent);
* ``fused JVP``: ``torch.func.jvp`` through ``attention_with_jvp`` (SDPA primal + the kernel);
* ``kernel``: the tangent kernel alone, its TFLOP/s counting its six matmuls
  (``12 B H Lq Lk D`` FLOPs).

Both JVPs are checked against the math JVP in fp32 (the error columns: max |err| / max |ref| of
the tangent, for the bf16 math JVP and for the fused one; the script exits 1 when the fused one
exceeds ``max_err``). Times are ``triton.testing.do_bench``
medians (ms). Nothing is timed under the interpreter (``--cpu-smoke`` checks the script).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if "--cpu-smoke" in sys.argv or "cpu_smoke=true" in sys.argv:  # before the kernels are imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import triton  # noqa: E402

from interpdiff.config import parse_cli, to_dict  # noqa: E402
from interpdiff.io import atomic_write_text, code_version  # noqa: E402
from kernels import attention_jvp as AJ  # noqa: E402


@dataclass
class BenchAttentionJvpConfig:
    cpu_smoke: bool = False  # tiny shapes on CPU under the Triton interpreter (checks, not speed)
    sweep: bool = False  # also time the kernel's tile sizes on the first case
    chunk: int = 2048  # query chunk of the math JVP (the 1.3B configs' distill.jvp_chunk)
    warmup_ms: int = 50
    rep_ms: int = 300
    json_out: str = ""
    md_out: str = ""
    seed: int = 0
    v_offset: float = 0.0  # added to the values (a component shared by all value rows; see kernels/attention_jvp.py)
    max_err: float = 2e-2  # exit 1 when the fused tangent's relative max error against the fp32 math JVP exceeds it


# (name, Lq, Lk)
CASES = [("full self-attention", 32760, 32760), ("phase-1 self-attention", 9360, 9360),
         ("full cross-attention", 32760, 512)]
SMOKE_CASES = [("self", 40, 40), ("cross", 40, 19)]
SWEEP = [(128, 32, 8, 2), (128, 32, 8, 3), (64, 32, 4, 2), (64, 32, 4, 3), (64, 64, 8, 2), (128, 64, 8, 2),
         (32, 32, 4, 1), (64, 64, 4, 2)]


def math_attention_entry(chunk: int):
    """diffusers' math attention entry, chunked over queries as ``distill_wan.jvp_attention`` runs it."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from interpdiff.video.distill_wan import _chunked_math_attention

    inner = _AttentionBackendRegistry._backends[AttentionBackendName._NATIVE_MATH]
    return _chunked_math_attention(chunk, inner)


def _timer(cfg, cuda: bool):
    """Median ms of ``fn()`` (``do_bench``, L2 flushed between repetitions); CPU: one untimed call (nan)."""
    def t(fn) -> float:
        if not cuda:
            fn()
            return float("nan")
        ms = triton.testing.do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, quantiles=[0.5])
        return float(ms[0] if isinstance(ms, (list, tuple)) else ms)
    return t


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def bench_case(cfg, name: str, Lq: int, Lk: int, H: int, D: int, dtype, dev, timer, save) -> dict:
    """One case; ``save(res)`` is called with the case's row before its tile sweep (a timeout in the
    sweep keeps the row) and again after."""
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    r = lambda L: torch.randn(1, L, H, D, generator=g).to(dev, dtype)  # noqa: E731
    q, k, v, dq, dk, dv = r(Lq), r(Lk), r(Lk) + cfg.v_offset, r(Lq), r(Lk), r(Lk)
    chunk = cfg.chunk if not cfg.cpu_smoke else 16
    entry = math_attention_entry(chunk)
    with torch.no_grad():
        def math_jvp(*xs):
            return torch.func.jvp(lambda a, b, c: entry(a, b, c), xs[:3], xs[3:])

        def fused_jvp():
            return torch.func.jvp(lambda a, b, c: AJ.attention_with_jvp(a, b, c), (q, k, v), (dq, dk, dv))

        o_ref, do_ref = math_jvp(*(t.float() for t in (q, k, v, dq, dk, dv)))
        _, do_m = math_jvp(q, k, v, dq, dk, dv)
        o_f, do_f = fused_jvp()
        res = {
            "case": name, "Lq": Lq, "Lk": Lk, "heads": H, "head_dim": D, "dtype": str(dtype).replace("torch.", ""),
            "err_math": _rel_err(do_m, do_ref), "err_fused": _rel_err(do_f, do_ref),
            "err_primal_fused": _rel_err(o_f, o_ref),
        }
        res["sdpa_ms"] = timer(lambda: AJ.sdpa(q, k, v))
        res["math_jvp_ms"] = timer(lambda: math_jvp(q, k, v, dq, dk, dv))
        res["fused_jvp_ms"] = timer(fused_jvp)
        res["kernel_ms"] = timer(lambda: AJ.attention_tangent(q, k, v, dq, dk, dv))
        res["blocks"] = list(AJ.default_blocks(D, dtype))
        flops = 12 * H * Lq * Lk * D  # six matmuls
        res["kernel_tflops"] = flops / (res["kernel_ms"] * 1e-3) / 1e12
        res["speedup"] = res["math_jvp_ms"] / res["fused_jvp_ms"]
        save(res)
        if cfg.sweep and name == (SMOKE_CASES if cfg.cpu_smoke else CASES)[0][0]:
            sweep = []
            for bm, bn, nw, ns in (SWEEP if not cfg.cpu_smoke else [(16, 16, 4, 1), (32, 16, 4, 1)]):
                try:
                    got = AJ.attention_tangent(q, k, v, dq, dk, dv, block_m=bm, block_n=bn, num_warps=nw,
                                               num_stages=ns)
                    err = _rel_err(got, do_ref)
                    ms = timer(lambda: AJ.attention_tangent(q, k, v, dq, dk, dv, block_m=bm, block_n=bn,
                                                            num_warps=nw, num_stages=ns))
                    sweep.append({"blocks": [bm, bn, nw, ns], "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12,
                                  "err": err})
                except Exception as e:  # noqa: BLE001 - a tile that does not compile (shared memory) is reported
                    sweep.append({"blocks": [bm, bn, nw, ns], "error": f"{type(e).__name__}: {e}"[:300]})
            res["sweep"] = sorted(sweep, key=lambda s: s.get("ms", float("inf")))
            save(res)
    return res


def to_markdown(out: dict) -> str:
    m = out["machine"]
    L = [f"Device: **{m['device']}**, {m['date']}, commit `{m['commit']}`, torch {m['torch']}, triton {m['triton']}", "",
         "| case | Lq x Lk | sdpa ms | math JVP ms | fused JVP ms | speedup | kernel ms | kernel TFLOP/s | "
         "err math | err fused |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in out["cases"]:
        L.append(f"| {r['case']} | {r['Lq']} x {r['Lk']} | {r['sdpa_ms']:.3f} | {r['math_jvp_ms']:.3f} | "
                 f"{r['fused_jvp_ms']:.3f} | {r['speedup']:.1f}x | {r['kernel_ms']:.3f} | {r['kernel_tflops']:.0f} | "
                 f"{r['err_math']:.1e} | {r['err_fused']:.1e} |")
    for r in out["cases"]:
        if r.get("sweep"):
            L += ["", f"Tile sweep ({r['case']}; BLOCK_M, BLOCK_N, warps, stages; default {r['blocks']}): " + ", ".join(
                f"{s['blocks']}: {s['ms']:.3f} ms ({s['tflops']:.0f} TFLOP/s, err {s['err']:.1e})" if "ms" in s
                else f"{s['blocks']}: {s['error']}" for s in r["sweep"])]
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = ["cpu_smoke=true" if a == "--cpu-smoke" else a for a in argv]
    cfg = parse_cli(BenchAttentionJvpConfig, argv)
    cuda = torch.cuda.is_available() and not cfg.cpu_smoke
    if not cuda and not cfg.cpu_smoke:
        raise SystemExit("bench_attention_jvp: no CUDA device; run with --cpu-smoke to check the script on CPU")
    if cfg.cpu_smoke and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("bench_attention_jvp: --cpu-smoke needs TRITON_INTERPRET=1 before the kernels are imported")
    dev = torch.device("cuda" if cuda else "cpu")
    H, D, dtype = (12, 128, torch.bfloat16) if cuda else (2, 16, torch.float32)
    machine = {"device": torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
               "triton": triton.__version__, "commit": os.environ.get("INTERPDIFF_COMMIT") or code_version()}
    out = {"machine": machine, "config": to_dict(cfg), "cases": []}
    timer = _timer(cfg, cuda)
    def save(res: dict) -> None:  # a timeout keeps what was measured
        if not out["cases"] or out["cases"][-1] is not res:
            out["cases"].append(res)
        if cfg.json_out:
            atomic_write_text(cfg.json_out, json.dumps(out, indent=1))

    for name, Lq, Lk in (CASES if cuda else SMOKE_CASES):
        bench_case(cfg, name, Lq, Lk, H, D, dtype, dev, timer, save)
        if cuda:
            torch.cuda.empty_cache()
    md = to_markdown(out)
    print(md)
    if cfg.md_out:
        atomic_write_text(cfg.md_out, md)
    bad = [f"{r['case']}: {r['err_fused']:.2e}" for r in out["cases"] if not r["err_fused"] <= cfg.max_err]
    if bad:
        raise SystemExit(f"bench_attention_jvp: the fused JVP differs from the fp32 math JVP by more than "
                         f"max_err={cfg.max_err:g} (relative max error): {', '.join(bad)}")
    return out


if __name__ == "__main__":
    main()
