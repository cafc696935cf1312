"""Compile a kernel for a GPU architecture on a machine without one, the way a launch would.

``triton.compile`` runs here without a GPU, and triton ships ``ptxas``, so a kernel's registers,
spills and barriers at sm_90 can be read on CPU (tests, ``bench_kernels.py static_report=true``).
What a launch compiles is *specialised* on its arguments, and the difference matters: an integer
argument equal to 1 becomes a compile-time constant and one divisible by 16 carries that fact,
so a unit-stride load is vectorised (``LDG.E.128``) and needs fewer address registers than the
same load with a runtime stride. ``compile_for`` takes example argument values (the ints of a
real launch, the dtypes of the pointers) and applies the JIT's rule to them (triton 3.x
``native_specialize_impl``: ``1`` -> constexpr, ``% 16 == 0`` -> ``tt.divisibility=16``; pointers
from the torch allocator are 16-byte aligned), so the report is that of the launched kernel.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch
import triton

_PTR = {
    torch.float64: "*fp64", torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16",
    torch.int64: "*i64", torch.int32: "*i32", torch.int16: "*i16", torch.int8: "*i8", torch.uint8: "*u8",
    torch.bool: "*i1",
}
_DIV16 = [["tt.divisibility", 16]]


def tool(name: str) -> str:
    """Path of a binary triton ships for NVIDIA GPUs (``ptxas``, ``cuobjdump``, ``nvdisasm``)."""
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def launch_signature(fn, args: dict) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` of ``fn`` launched with ``args`` (name -> value): an int
    for an integer argument, a float for a float one, a ``torch.dtype`` for a pointer argument, any value for a
    ``tl.constexpr`` parameter. Every parameter must be given."""
    missing = [p.name for p in fn.params if p.name not in args]
    if missing:
        raise ValueError(f"launch_signature({fn.__name__}): no value for {missing}")
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = args[p.name]
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
        elif isinstance(v, torch.dtype):
            sig[p.name] = _PTR[v]
            attrs[(i,)] = _DIV16
        elif isinstance(v, float):
            sig[p.name] = "fp32"  # a Python float is passed as fp32
        elif isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"launch_signature({fn.__name__}): {p.name}={v!r}: expected an int, a float or a torch.dtype")
        elif v == 1:
            sig[p.name], consts[p.name] = "constexpr", 1
        else:
            sig[p.name] = "i32" if -(2**31) <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = _DIV16
    return sig, consts, attrs


def compile_for(fn, args: dict, num_warps: int, arch: int = 90, sass: bool = False,
                num_stages: int | None = None) -> dict:
    """Compile ``fn`` for ``sm_<arch>`` as a launch with ``args`` would be compiled (see
    ``launch_signature``) and assemble it with triton's ``ptxas``. Returns ``regs``,
    ``spill_bytes`` (stores + loads), ``bar_sync`` (in the PTX), ``ptxas`` (its report), ``ptx``
    and, with ``sass=True``, ``sass`` (the disassembly)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs = launch_signature(fn, args)
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, **({"num_stages": num_stages} if num_stages else {})})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        src, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        res = subprocess.run([tool("ptxas"), "-v", f"--gpu-name={gpu}", src, "-o", cubin], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"ptxas failed on {fn.__name__}: {res.stderr.strip()}")
        dis = subprocess.run([tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout if sass else None
    info = res.stderr
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    out = {"regs": int(re.search(r"Used (\d+) registers", info).group(1)), "spill_bytes": spills,
           "bar_sync": ptx.count("bar.sync"), "ptxas": info, "ptx": ptx}
    if sass:
        out["sass"] = dis
    return out


def issue_variants(interp, dp, sweep: bool = True) -> list[tuple[str, object, dict, int]]:
    """``(name, kernel, launch args, num_warps)`` of every kernel variant at the sizes of the
    kernels issue, with the block sizes the host functions choose there: the forward kernels at
    Wan latent size (``8 x 16 x 21 x 60 x 104`` bf16; every time-walk ``impl`` at its default
    and, with ``sweep``, at the other warp count the bench sweeps) and maze size (``4096 x 128 x 2`` fp32), the
    backward at Wan size, the DP kernels at ``B=4096, T=128`` (and ``T=256`` streaming). The
    modules are passed in, so a test can hand over freshly imported ones."""
    import triton.language as tl

    B, P, T, Q = 8, 16, 21, 60 * 104
    wan = dict(x_ptr=torch.bfloat16, m_ptr=torch.uint8, eps_ptr=torch.bfloat16, sig_ptr=torch.float32,
               out_ptr=torch.bfloat16, T=T, P=P, Q=Q, sxb=P * T * Q, sxp=T * Q, sxt=Q, sxq=1, seb=P * T * Q, sep=T * Q,
               set_=Q, seq=1, smb=T, smt=1, ACC=tl.float32)
    maze = dict(wan, x_ptr=torch.float32, eps_ptr=torch.float32, out_ptr=torch.float32, T=128, P=1, Q=2, sxb=256,
                sxp=1, sxt=2, seb=256, sep=1, set_=2, smb=128)
    out = []
    bt, bq, nw = interp._fwd_blocks(T, Q)
    for noise in (False, True):
        out.append((f"interp fwd tile, Wan bf16{', +corruption' if noise else ''}", interp._interp_fwd_kernel,
                    dict(wan, T_PAD=32, BLOCK_T=bt, BLOCK_Q=bq, HAS_NOISE=noise, Q_ITERS=interp.FWD_Q_ITERS), nw))
    bt, bq, nw = interp._fwd_blocks(128, 2)
    out.append(("interp fwd tile, maze fp32", interp._interp_fwd_kernel,
                dict(maze, T_PAD=128, BLOCK_T=bt, BLOCK_Q=bq, HAS_NOISE=False, Q_ITERS=1), nw))
    walks = {"tloop": (interp._interp_fwd_tloop_kernel, {}),
             "seg": (interp._interp_fwd_seg_kernel, dict(T_PAD=32)),
             "hybrid": (interp._interp_fwd_hybrid_kernel, dict(T_PAD=32, SEG_MAX_K=interp.HYBRID_SEG_MAX_K)),
             "jump": (interp._interp_fwd_jump_kernel, dict(T_PAD=32, AHEAD=1)),
             "jump2": (interp._interp_fwd_jump_kernel, dict(T_PAD=32, AHEAD=2))}
    assert set(walks) == set(interp.FWD_IMPLS) - {"tile"}, "a time-walk impl without a compile check"
    for impl, (fn, extra) in walks.items():
        for noise in (False, True):
            bq, nw = interp._walk_blocks(impl, Q, noise)
            for w in (nw, 12 - nw) if sweep else (nw,):  # the default and the other of 4 / 8 warps
                out.append((f"interp fwd {impl}, Wan bf16{', +corruption' if noise else ''}" + (" (sweep)" if w != nw else ""),
                            fn, dict(wan, BLOCK_Q=bq, HAS_NOISE=noise, **extra), w))
    bwd = dict(g_ptr=torch.bfloat16, m_ptr=torch.uint8, gx_ptr=torch.bfloat16, T=T, P=P, Q=Q, sgb=P * T * Q, sgp=T * Q,
               sgt=Q, sgq=1, smb=T, smt=1, BLOCK_Q=interp.BWD_BLOCK_Q, ACC=tl.float32)
    out.append(("interp bwd, Wan bf16", interp._interp_bwd_kernel, bwd, max(1, min(8, interp.BWD_BLOCK_Q // 256))))
    Bd, Td, K = 4096, 128, 16
    cost = dict(c_ptr=torch.float32, dlast_ptr=torch.float32, T=Td, k_max=K, scb=Td * Td, sci=Td, scj=1)
    out.append(("dp tile on chip, T=128", dp._dp_kernel,
                dict(cost, back_ptr=torch.int8, dbuf_ptr=torch.float32, BLOCK_T=128, BLOCK_S=128, ON_CHIP=True), 4))
    out.append(("dp tile streaming, T=256", dp._dp_kernel,
                dict(cost, T=256, scb=256 * 256, sci=256, back_ptr=torch.int16, dbuf_ptr=torch.float32,
                     BLOCK_T=dp.STREAM_BLOCK_T, BLOCK_S=dp.STREAM_BLOCK_S, ON_CHIP=False), 4))
    for k_pad in (8, 16, 32):
        for split in (1, 2):
            for pf in (False, True):
                out.append((f"dp sweep, T=128 K<={k_pad} split={split}{' +prefetch' if pf else ''}", dp._dp_sweep_kernel,
                            dict(cost, k_max=k_pad, back_ptr=torch.int8, dcol_ptr=torch.float32, BLOCK_T=128, K_PAD=k_pad,
                                 SPLIT=split, PREFETCH=pf), 4))
    out.append(("dp backtrack", dp._backtrack_kernel,
                dict(back_ptr=torch.int8, dlast_ptr=torch.float32, ks_ptr=torch.int32, offs_ptr=torch.int32,
                     idx_ptr=torch.int64, tot_ptr=torch.float32, B=Bd, T=Td, k_max=K, n_k=1, n_idx=K,
                     BLOCK_B=dp.BACKTRACK_BLOCK_B), 4))
    return out
