"""The fused attention JVP kernel (``kernels/attention_jvp.py``) against ``torch.func.jvp`` of the
math attention in fp64, under the Triton interpreter on CPU; compiled for sm_90 without a GPU;
through the tiny Wan with ``distill.jvp_attention=triton``; at a real size on a GPU (``-m gpu``)."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import interpret_mode  # noqa: E402

MOD = "kernels.attention_jvp"


def _fresh(interpret: bool):
    """A fresh ``kernels.attention_jvp`` decorated in the requested mode; ``sys.modules`` as before."""
    saved = sys.modules.pop(MOD, None)
    try:
        with interpret_mode(interpret):
            return importlib.import_module(MOD)
    finally:
        sys.modules.pop(MOD, None)
        if saved is not None:
            sys.modules[MOD] = saved


@pytest.fixture(scope="module")
def A():
    """The interpreted module, installed as ``kernels.attention_jvp`` with ``TRITON_INTERPRET=1``."""
    import kernels

    mod = _fresh(True)
    saved, saved_attr = sys.modules.get(MOD), getattr(kernels, "attention_jvp", None)
    with interpret_mode(True):
        sys.modules[MOD] = mod
        kernels.attention_jvp = mod
        try:
            yield mod
        finally:
            sys.modules.pop(MOD, None)
            if saved is not None:
                sys.modules[MOD] = saved
            if saved_attr is None:
                kernels.__dict__.pop("attention_jvp", None)
            else:
                kernels.attention_jvp = saved_attr


def _math(q, k, v, scale):
    """``softmax(scale Q K^T) V`` on ``[B, L, H, D]``, written out (the reference's primal)."""
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v)


def reference(q, k, v, dq, dk, dv, scale=None):
    """``(O, dO)`` by ``torch.func.jvp`` of the math attention in fp64, and an error scale: the sum of
    the magnitudes of the terms of ``dO`` (``P|dV| + |P dS||V| + |O| rowsum|P dS|``)."""
    f64 = [t.double() for t in (q, k, v, dq, dk, dv)]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    o, do = torch.func.jvp(lambda a, b, c: _math(a, b, c, scale), tuple(f64[:3]), tuple(f64[3:]))
    qd, kd, vd, dqd, dkd, dvd = f64
    p = (torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale).softmax(-1)
    ds = (torch.einsum("bqhd,bkhd->bhqk", dqd, kd) + torch.einsum("bqhd,bkhd->bhqk", qd, dkd)) * scale
    pds = (p * ds).abs()
    mag = (torch.einsum("bhqk,bkhd->bqhd", p, dvd.abs()) + torch.einsum("bhqk,bkhd->bqhd", pds, vd.abs())
           + o.abs() * pds.sum(-1).transpose(1, 2)[..., None])
    return o, do, mag


def _inputs(B, Lq, Lk, H, D, dtype=torch.float32, seed=0, q_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda L: torch.randn(B, L, H, D, generator=g)  # noqa: E731
    q, k, v = r(Lq) * q_scale, r(Lk), r(Lk)
    dq, dk, dv = r(Lq), r(Lk), r(Lk)
    return [t.to(dtype) for t in (q, k, v, dq, dk, dv)]


@pytest.mark.parametrize("B,Lq,Lk,H,D,blocks", [
    (2, 37, 37, 2, 16, (16, 16)),   # self-attention, several key blocks, ragged last block
    (1, 40, 19, 3, 32, (16, 16)),   # cross-attention (Lk != Lq), ragged query and key blocks
    (1, 5, 70, 1, 16, (16, 32)),    # fewer queries than a block
    (1, 16, 16, 2, 64, (None, None)),  # the default blocks (one partial block each way)
])
def test_tangent_matches_forward_ad_of_math_attention_fp32(A, B, Lq, Lk, H, D, blocks):
    q, k, v, dq, dk, dv = _inputs(B, Lq, Lk, H, D)
    o, do_ref, mag = reference(q, k, v, dq, dk, dv)
    do = A.attention_tangent(q, k, v, dq, dk, dv, block_m=blocks[0], block_n=blocks[1])
    assert do.dtype == torch.float32 and do.shape == q.shape
    err = (do.double() - do_ref).abs()
    assert (err <= 1e-5 * mag + 1e-6).all(), float((err / (mag + 1e-6)).max())


def test_peaked_softmax_and_online_rescale(A):
    """Logits of +-hundreds (a peaked softmax) whose row maxima appear in late key blocks: the running
    maximum rescales what was accumulated; no overflow, the same tangent."""
    q, k, v, dq, dk, dv = _inputs(1, 24, 64, 2, 16, q_scale=40.0, seed=1)
    k[:, 48:] *= 3.0  # the largest logits sit in the last key blocks
    o, do_ref, mag = reference(q, k, v, dq, dk, dv)
    do = A.attention_tangent(q, k, v, dq, dk, dv, block_m=16, block_n=16)
    assert torch.isfinite(do).all()
    assert ((do.double() - do_ref).abs() <= 1e-5 * mag + 1e-5).all()


def test_tangent_fp16_within_rounding(A):
    """fp16 inputs: ``P`` and ``P dS`` are rounded to the input dtype for the value matmuls (as
    FlashAttention does for ``P``), the output once more; the error stays under half a unit of
    rounding of the terms' magnitudes (the kernel: 0.12). (bf16 is checked on the GPU only: the
    interpreter's bf16 ``tl.dot`` returns garbage, ~1e10 off for a 16 x 16 product of N(0, 1)
    values, triton 3.8.)"""
    dtype = torch.float16
    q, k, v, dq, dk, dv = _inputs(2, 33, 40, 2, 16, dtype=dtype, seed=2)
    o, do_ref, mag = reference(q, k, v, dq, dk, dv)
    do = A.attention_tangent(q, k, v, dq, dk, dv, block_m=16, block_n=16)
    assert do.dtype == dtype
    eps = torch.finfo(dtype).eps
    err = (do.double() - do_ref).abs()
    assert (err <= 0.5 * eps * (mag + do_ref.abs())).all(), float((err / (mag + do_ref.abs())).max() / eps)


def test_value_offset_cancels_in_fp16(A):
    """Value rows sharing a large component (offset 16, std 1): ``(P dS) V`` and ``O c`` cancel it.
    The kernel sums ``O``, ``l`` and ``c`` from the same rounded weights, so the tangent's relative
    error stays at the offset-free level (under 1 fp16 ulp of its largest entry); computed with the
    SDPA output for ``O`` it was 5 ulp, growing with the offset."""
    dtype = torch.float16
    q, k, v, dq, dk, dv = _inputs(1, 64, 256, 2, 32, seed=5)
    q, k, v, dq, dk, dv = (t.to(dtype) for t in (q, k, v + 16.0, dq, dk, dv))
    _, do_ref, _ = reference(q, k, v, dq, dk, dv)
    do = A.attention_tangent(q, k, v, dq, dk, dv, block_m=16, block_n=32)
    rel = float((do.double() - do_ref).abs().max() / do_ref.abs().max())
    assert rel < torch.finfo(dtype).eps, rel


def test_autograd_function_under_func_jvp_and_forward_ad(A):
    """``attention_with_jvp`` as ``torch.func.jvp`` and ``torch.autograd.forward_ad`` use it: the
    primal is SDPA's, the tangent the kernel's; inputs without a tangent count as constants; under
    gradients it refuses to be differentiated backwards."""
    q, k, v, dq, dk, dv = _inputs(1, 20, 20, 2, 16, seed=3)
    o_ref, do_ref, mag = reference(q, k, v, dq, dk, dv)
    o, do = torch.func.jvp(lambda a, b, c: A.attention_with_jvp(a, b, c), (q, k, v), (dq, dk, dv))
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-6)
    assert ((do.double() - do_ref).abs() <= 1e-5 * mag + 1e-6).all()
    # tangent in q only (k, v constant): the reference with zero tangents for k, v
    z = torch.zeros_like(k)
    _, do_q_ref, mag_q = reference(q, k, v, dq, z, z)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = A.attention_with_jvp(fwAD.make_dual(q, dq), k, v, 0.25)
        do_q = fwAD.unpack_dual(out).tangent
    _, do_q_ref, mag_q = reference(q, k, v, dq, z, z, scale=0.25)
    assert ((do_q.double() - do_q_ref).abs() <= 1e-5 * mag_q + 1e-6).all()
    qg = q.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="no backward"):
        A.attention_with_jvp(qg, k, v).sum().backward()


def test_bad_inputs_are_named(A):
    q, k, v, dq, dk, dv = _inputs(1, 8, 8, 1, 16)
    with pytest.raises(ValueError, match=r"dk is \(1, 7, 1, 16\)"):
        A.attention_tangent(q, k, v, dq, dk[:, :7], dv)
    with pytest.raises(ValueError, match="head_dim=12 is not one of"):
        A.attention_tangent(*(t[..., :12] for t in (q, k, v, dq, dk, dv)))
    with pytest.raises(ValueError, match="dtype torch.float64"):
        A.attention_tangent(*(t.double() for t in (q, k, v, dq, dk, dv)))
    with pytest.raises(ValueError, match=r"expected \[B, L, heads, head_dim\]"):
        A.attention_tangent(q[0], k, v, dq, dk, dv)


def test_through_tiny_wan_equals_math_jvp(A, monkeypatch):
    """``jvp_attention(kernel="triton")`` inside the sCM JVP of the tiny Wan (fp32, head_dim 16,
    LoRA adapter on, keyframe rope): the same primal and tangent as the math attention's JVP, with
    every self- and cross-attention call on the fused kernel; backends restored on exit."""
    from interpdiff import distill as D
    from interpdiff.video import distill_wan as DW
    from interpdiff.video import wan

    torch.manual_seed(0)
    tr = wan.build_tiny_transformer(seed=0, dtype=torch.float32, attention_head_dim=16)
    wan.install_keyframe_rope(tr)
    wan.set_attention_backend(tr, "sdpa")
    DW.add_adapters(tr, wan.LoraSpec(rank=2, alpha=2), [DW.STUDENT], seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in tr.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 4, 6, generator=g)
    t = torch.tensor([0.4, 1.1])
    emb = torch.randn(2, 16, 32, generator=g)
    idx = torch.tensor([[0, 4, 8], [0, 2, 8]])
    F = D.trig_model(lambda xs, ts: wan.wan_forward(tr, xs, ts, emb, frame_idx_B_K=idx))
    dx, dt = torch.randn(x.shape, generator=g), torch.tensor([0.3, -0.2])
    calls = []
    inner = A.attention_tangent
    monkeypatch.setattr(A, "attention_tangent", lambda *a, **k: calls.append((a[0].shape[1], a[1].shape[1])) or inner(*a, **k))
    with torch.no_grad():
        with DW.jvp_attention(tr):
            out_m, jv_m = D.jvp(F, x, t, dx, dt, "autograd")
        with DW.jvp_attention(tr, kernel="triton"):
            out_t, jv_t = D.jvp(F, x, t, dx, dt, "autograd")
    n_layers = tr.config.num_layers
    assert len(calls) == 2 * n_layers  # self- and cross-attention of every block
    assert set(calls) == {(18, 18), (18, emb.shape[1])}  # 3 x 2 x 3 video tokens; keys: those and the 16 text tokens
    torch.testing.assert_close(out_t, out_m, rtol=1e-5, atol=1e-5)
    scale = float(jv_m.abs().max())
    assert scale > 0.1
    torch.testing.assert_close(jv_t, jv_m, rtol=1e-4, atol=1e-4 * scale)
    procs = [m.processor for m in tr.modules() if hasattr(m, "processor")]
    assert all(str(p._attention_backend) != "AttentionBackendName._NATIVE_MATH" for p in procs)


def test_distill_step_with_fused_jvp_equals_math(A, monkeypatch):
    """One rCM training step (``bench_distill.bench_variant``: the library's sCM + DMD loss, backward,
    optimizer) of the tiny full-sequence config, head_dim 16: ``distill.jvp_attention=triton``
    gives the loss of ``math`` and runs the kernel in the JVP (self- and cross-attention of each
    block) and nowhere else."""
    import importlib.util
    import types

    from interpdiff.video import wan

    spec = importlib.util.spec_from_file_location("bench_distill", Path(__file__).resolve().parents[1]
                                                  / "benchmarks" / "bench_distill.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tiny = wan.tiny_transformer_config
    monkeypatch.setattr(wan, "tiny_transformer_config", lambda **o: tiny(**{"attention_head_dim": 16, **o}))
    calls = []
    inner = A.attention_tangent
    monkeypatch.setattr(A, "attention_tangent", lambda *a, **k: calls.append(1) or inner(*a, **k))
    loss = {}
    for kernel in ("math", "triton"):
        args = types.SimpleNamespace(tiny=True, steps=1, warmup=0, peak_tflops=1.0,
                                     set=[f"distill.jvp_attention={kernel}"])
        r = bench.bench_variant("full", args, torch.device("cpu"))
        assert r["passes"]["jvp"] == 1 and r["jvp_attention"] == kernel
        loss[kernel] = r["loss"]
    assert len(calls) == 2 * tiny()["num_layers"]
    assert loss["triton"] == pytest.approx(loss["math"], rel=1e-4), loss


def test_mixed_dtypes_cast_under_autocast_else_fallback(A, monkeypatch):
    """q / k in fp32 next to a low-precision v (what autocast's fp32 ``rms_norm`` gives Wan's
    processor from torch 2.12 on CUDA): under autocast the entry casts all three to the autocast
    dtype and runs the kernel (the tangent of the cast inputs); without autocast it hands mixed
    dtypes to the math fallback instead of failing."""
    from interpdiff.video import distill_wan as DW

    used = []

    def fallback(q, k, v, **kw):
        used.append("math")
        return _math(q.float(), k.float(), v.float(), q.shape[-1] ** -0.5).to(v.dtype)

    calls = []
    inner = A.attention_tangent
    monkeypatch.setattr(A, "attention_tangent", lambda *a, **k: calls.append(a[0].dtype) or inner(*a, **k))
    attn = DW._fused_jvp_attention(fallback)
    q, k, v, dq, dk, dv = _inputs(1, 20, 24, 2, 16, seed=6)
    v, dv = v.half(), dv.half()
    with torch.no_grad():
        attn(q, k, v)
        assert used == ["math"] and calls == []
        with torch.autocast("cpu", dtype=torch.float16):
            _, do = torch.func.jvp(lambda a, b, c: attn(a, b, c), (q, k, v), (dq, dk, dv))
    assert used == ["math"] and calls == [torch.float16] and do.dtype == torch.float16
    _, do_ref, mag = reference(*(t.half() for t in (q, k, v, dq, dk, dv)))
    eps = torch.finfo(torch.float16).eps
    assert ((do.double() - do_ref).abs() <= 0.5 * eps * (mag + do_ref.abs())).all()


def test_triton_jvp_attention_refuses_cpu_without_interpreter(monkeypatch):
    """``distill.jvp_attention=triton`` on CPU tensors without ``TRITON_INTERPRET=1``: the error says
    so (rather than a failure deep inside triton)."""
    from interpdiff.video import distill_wan as DW

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    attn = DW._fused_jvp_attention(lambda *a, **k: None)
    q = torch.zeros(1, 4, 1, 16)
    with pytest.raises(RuntimeError, match="distill.jvp_attention=triton.*TRITON_INTERPRET=1"):
        attn(q, q, q)
    # what the kernel does not support goes to the fallback (here: a mask)
    assert attn(q, q, q, attn_mask=torch.ones(4, 4, dtype=torch.bool)) is None


def test_bench_script_cpu_smoke(tmp_path):
    """``benchmarks/bench_attention_jvp.py --cpu-smoke``: every case and the tile sweep run through
    the interpreter, and the fused JVP agrees with the math one."""
    import json
    import subprocess

    out = tmp_path / "aj.json"
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_attention_jvp.py"), "--cpu-smoke", "sweep=true",
                          f"json_out={out}"], capture_output=True, text=True, cwd=root, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [c["case"] for c in data["cases"]] == ["self", "cross"]
    assert all(c["err_fused"] < 1e-5 and c["err_primal_fused"] < 1e-5 for c in data["cases"])
    assert [len(c.get("sweep", [])) for c in data["cases"]] == [2, 0]
    assert all(s["err"] < 1e-5 for s in data["cases"][0]["sweep"])


def test_config_key_is_validated():
    from interpdiff.distill import DistillConfig

    DistillConfig(jvp_attention="triton").validate()
    with pytest.raises(ValueError, match=r"distill.jvp_attention='flash' is not one of \['math', 'triton'\]"):
        DistillConfig(jvp_attention="flash").validate()


def test_compiles_for_sm90_without_spills():
    """The interpreter accepts programs the compiler rejects: compile the kernel for sm_90 (no GPU)
    at its default tiles for every head dim and dtype, as launched at Wan2.1-1.3B size (12 heads,
    32,760 tokens), without register spills."""
    from kernels.sass import compile_for, tool

    if not os.path.exists(tool("ptxas")):
        pytest.skip("triton's bundled ptxas is not installed")
    import triton.language as tl

    if type(tl.standard._argmin_combine_tie_break_left).__name__ == "InterpretedFunction":
        pytest.skip("triton was imported under TRITON_INTERPRET=1: its standard library cannot be compiled here")
    mod = _fresh(False)
    L, H = 32760, 12
    for D in mod.HEAD_DIMS:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            bm, bn, nw, ns = mod.default_blocks(D, dtype)
            args = {n: dtype for n in ("q_ptr", "k_ptr", "v_ptr", "dq_ptr", "dk_ptr", "dv_ptr", "do_ptr")}
            args.update(Lq=L, Lk=L, H=H, sqb=L * H * D, sql=H * D, sqh=D, skb=L * H * D, skl=H * D, skh=D,
                        qk_scale=0.13, scale=0.09, D=D, BLOCK_M=bm, BLOCK_N=bn, PREC="tf32")
            info = compile_for(mod._attn_jvp_kernel, args, nw, num_stages=ns)
            assert info["spill_bytes"] == 0, (D, dtype, info["ptxas"])


@pytest.mark.gpu
def test_gpu_wan_size_bf16():
    """At the size of one Wan2.1-1.3B self-attention call (12 heads of 128) with 4,096 tokens, bf16,
    compiled: under half a unit of rounding of the terms' magnitudes against the fp64 reference
    (computed on the GPU); with the values offset by 16 the relative error stays under one bf16 ulp
    of the largest entry (the offset cancels, ``test_value_offset_cancels_in_fp16``)."""
    mod = _fresh(False)
    eps = torch.finfo(torch.bfloat16).eps
    for offset in (0.0, 16.0):
        q, k, v, dq, dk, dv = (t.cuda() for t in _inputs(1, 4096, 4096, 12, 128, seed=4))
        q, k, v, dq, dk, dv = (t.to(torch.bfloat16) for t in (q, k, v + offset, dq, dk, dv))
        o, do_ref, mag = reference(q, k, v, dq, dk, dv)
        do = mod.attention_tangent(q, k, v, dq, dk, dv)
        err = (do.double() - do_ref).abs()
        if offset == 0:
            assert (err <= 0.5 * eps * (mag + do_ref.abs())).all(), float((err / (mag + do_ref.abs())).max() / eps)
        rel = float(err.max() / do_ref.abs().max())
        assert rel < eps, (offset, rel)
