"""Forward-mode derivative (JVP) of softmax attention, fused in one pass over the keys.

sCM distillation (``interpdiff.distill``, rCM) differentiates the student in time with
``torch.func.jvp``. Through attention ``O = softmax(s Q K^T) V`` the tangent is

    dS = s (dQ K^T + Q dK^T)
    dO = P dV + (P * dS) V - O * rowsum(P * dS)

with ``P`` the softmax. Without a fused kernel the JVP runs on the math attention, which
materialises ``P`` and ``dS`` (chunked over queries, ``distill.jvp_chunk``): on an H200 that JVP is
20.4 s of a 31.9 s training step at 32,760 tokens, 25x a plain forward (benchmarks/RESULTS.md).
This kernel streams the keys FlashAttention-style: per block of queries it keeps the running
row max ``m``, the softmax denominator ``l = sum exp(S - m)``, ``c = sum exp(S - m) dS`` and the
unnormalised ``sum exp(S - m) V`` and ``sum exp(S - m) (dV + dS V)``, rescaled when ``m`` grows,
and writes

    dO = acc / l - O * c / l

Six matmuls per key block (``Q K^T``, ``dQ K^T``, ``Q dK^T``, ``P V``, ``P dV``, ``(P * dS) V``), fp32
accumulation, nothing of size ``L x L`` in memory. ``O`` is recomputed in the kernel rather than
read from the SDPA output: ``(P * dS) V`` and ``O c`` cancel where the value rows share a
component, and only with ``O``, ``l`` and ``c`` summed from the same rounded ``P`` / ``P * dS``
that feed the matmuls does that component cancel exactly. Measured in the interpreter (fp16,
2 x 64 queries, 256 keys, head_dim 32; relative max error against fp64 with the values offset
by 0 / 4 / 16): 2.9e-4 / 2.9e-4 / 3.5e-4 this way, 3.2e-4 / 1.2e-3 / 4.8e-3 with the SDPA
output for ``O`` (the first version of this kernel).

``attention_with_jvp``: an ``autograd.Function`` whose forward is
``torch.nn.functional.scaled_dot_product_attention`` and whose ``jvp`` is this kernel; it has no
backward (the sCM JVP runs under no_grad). Layout ``[B, L, H, D]`` (diffusers' attention
dispatch), ``Lq`` and ``Lk`` may differ (cross-attention), ``D`` one of 16, 32, 64, 128.
Tested on CPU under ``TRITON_INTERPRET=1`` against ``torch.func.jvp`` of the math attention in
fp64 (``tests/test_attention_jvp.py``) and compiled for sm_90 there; speed is measured on a GPU
by ``benchmarks/bench_attention_jvp.py``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)  # 256 spills registers at every tile in fp32 (sm_90); Wan uses 128


def default_blocks(D: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)``: the largest tiles that compile for sm_90
    without register spills (``kernels.sass``; tests/test_attention_jvp.py), not yet timed on a GPU
    (``benchmarks/bench_attention_jvp.py`` sweeps them). bf16/fp16 at head_dim 128 (Wan): 128 x 32
    at 8 warps, 229 registers. fp32 runs its matmuls as TF32 (an IEEE fp32 ``tl.dot`` spills
    kilobytes at every tile size) on 32 x 32 tiles, 16 x 32 at head_dim 128."""
    if dtype == torch.float32:
        return (32, 32, 4, 1) if D <= 64 else (16, 32, 4, 1)
    if D <= 64:
        return 64, 64, 4, 2
    return 128, 32, 8, 2


# The kernel calls only ``tl`` builtins: the ``@jit`` functions of ``triton.language.standard``
# (``tl.zeros``, ``tl.max``, ``tl.sum``) are decorated when triton is imported and do not run in the
# interpreter if that was before ``TRITON_INTERPRET=1`` (see ``kernels.interpolate``); their combine
# functions handed to the builtin ``tl.reduce`` do.
_MAX = tl.standard._elementwise_max
_SUM = tl.standard._sum_combine


@triton.jit
def _attn_jvp_kernel(
    q_ptr, k_ptr, v_ptr, dq_ptr, dk_ptr, dv_ptr, do_ptr,
    Lq, Lk, H,
    sqb, sql, sqh,  # strides of q, dq, do ([B, Lq, H, D], unit stride in D)
    skb, skl, skh,  # strides of k, dk, v, dv ([B, Lk, H, D])
    qk_scale,  # softmax scale * log2(e)
    scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    m_ok = offs_m < Lq
    q_off = b.to(tl.int64) * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sql + offs_d[None, :]
    q = tl.load(q_ptr + q_off, mask=m_ok[:, None], other=0.0)
    dq = tl.load(dq_ptr + q_off, mask=m_ok[:, None], other=0.0)
    kv_base = b.to(tl.int64) * skb + h * skh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    c_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc_o = tl.full([BLOCK_M, D], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, D], 0.0, tl.float32)
    for start in range(0, Lk, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        # keys as [D, BLOCK_N] (transposed loads), values as [BLOCK_N, D]
        kt_off = kv_base + offs_n[None, :].to(tl.int64) * skl + offs_d[:, None]
        v_off = kv_base + offs_n[:, None].to(tl.int64) * skl + offs_d[None, :]
        kt = tl.load(k_ptr + kt_off, mask=n_ok[None, :], other=0.0)
        dkt = tl.load(dk_ptr + kt_off, mask=n_ok[None, :], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC)
        ds = tl.dot(dq, kt, input_precision=PREC)
        ds = tl.dot(q, dkt, ds, input_precision=PREC)
        s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))  # base-2 logits
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(v_ptr + v_off, mask=n_ok[:, None], other=0.0)
        dv = tl.load(dv_ptr + v_off, mask=n_ok[:, None], other=0.0)
        # P and P dS rounded to the value dtype once, and l, c, O all summed from those rounded
        # weights: then a component shared by all value rows cancels exactly between (P dS) V and
        # O c (with the SDPA output for O, or l / c from unrounded weights, it is amplified)
        p = tl.exp2(s - m_new[:, None]).to(v.dtype)
        pds = (p.to(tl.float32) * (ds * scale)).to(v.dtype)
        l_i = l_i * alpha + tl.reduce(p.to(tl.float32), 1, _SUM)
        c_i = c_i * alpha + tl.reduce(pds.to(tl.float32), 1, _SUM)
        acc_o = tl.dot(p, v, acc_o * alpha[:, None], input_precision=PREC)
        acc = tl.dot(p, dv, acc * alpha[:, None], input_precision=PREC)
        acc = tl.dot(pds, v, acc, input_precision=PREC)
        m_i = m_new
    inv_l = 1.0 / l_i
    o = acc_o * inv_l[:, None]
    do = acc * inv_l[:, None] - o * (c_i * inv_l)[:, None]
    tl.store(do_ptr + q_off, do.to(do_ptr.dtype.element_ty), mask=m_ok[:, None])


def _check(name: str, t: torch.Tensor, like: torch.Tensor, L: int) -> None:
    if t.shape != (like.shape[0], L, like.shape[2], like.shape[3]) or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(f"attention_jvp: {name} is {tuple(t.shape)} {t.dtype} on {t.device}; expected "
                         f"{(like.shape[0], L, like.shape[2], like.shape[3])} {like.dtype} on {like.device}")


def attention_tangent(q, k, v, dq, dk, dv, scale: float | None = None, block_m: int | None = None,
                      block_n: int | None = None, num_warps: int | None = None, num_stages: int | None = None):
    """``dO``, the forward-mode derivative of ``O = softmax(scale Q K^T) V`` along ``(dQ, dK, dV)``,
    Layout ``[B, L, H, D]``; ``q``/``dq`` share ``[B, Lq, H, D]``,
    ``k``/``dk``/``v``/``dv`` share ``[B, Lk, H, D]``, one dtype (fp32, bf16, fp16). ``scale``
    defaults to ``1 / sqrt(D)``."""
    if q.dim() != 4:
        raise ValueError(f"attention_jvp: q is {tuple(q.shape)}; expected [B, L, heads, head_dim]")
    B, Lq, H, D = q.shape
    Lk = k.shape[1]
    for name, t in (("dq", dq),):
        _check(name, t, q, Lq)
    for name, t in (("k", k), ("dk", dk), ("v", v), ("dv", dv)):
        _check(name, t, q, Lk)
    if D not in HEAD_DIMS:
        raise ValueError(f"attention_jvp: head_dim={D} is not one of {list(HEAD_DIMS)}")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"attention_jvp: dtype {q.dtype} is not one of float32, bfloat16, float16")
    if Lk == 0:
        raise ValueError("attention_jvp: no keys (Lk = 0): the softmax is undefined")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    # the q-side tensors share one set of strides, the k-side ones another (unit stride in D)
    q, dq = q.contiguous(), dq.contiguous()
    k, dk, v, dv = (t.contiguous() for t in (k, dk, v, dv))
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    bm, bn, nw, ns = default_blocks(D, q.dtype)
    block_m, block_n = block_m or bm, block_n or bn
    num_warps, num_stages = num_warps or nw, num_stages or ns
    grid = (triton.cdiv(Lq, block_m), B * H)
    _attn_jvp_kernel[grid](
        q, k, v, dq, dk, dv, out,
        Lq, Lk, H,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        scale * LOG2E, scale,
        D=D, BLOCK_M=block_m, BLOCK_N=block_n, PREC=precision(q),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def precision(q: torch.Tensor) -> str:
    """``tl.dot``'s fp32 input precision: exact (``ieee``) in the interpreter, TF32 on a GPU (see
    ``default_blocks``); it does not apply to bf16/fp16."""
    return "ieee" if not q.is_cuda else "tf32"


def sdpa(q, k, v, scale: float | None = None):
    """``scaled_dot_product_attention`` on ``[B, L, H, D]`` tensors (torch's layout is ``[B, H, L, D]``)."""
    o = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         scale=scale)
    return o.transpose(1, 2)


def _register_tangent_op():
    """``attention_tangent`` as a torch custom op. Inside ``torch.func.jvp`` an ``autograd.Function``'s
    ``jvp`` receives functorch-wrapped tensors (no storage for a Triton launch); a custom op is
    dispatched through functorch's layers and gets the plain tensors. A re-import of this module
    (the tests import it once interpreted, once compiled) registers under a new name."""
    base = "interpdiff::attention_jvp_tangent"
    for i in range(1000):
        name = base if i == 0 else f"{base}_{i}"
        try:
            op = torch.library.custom_op(name, mutates_args=())(_tangent_op_impl)
        except RuntimeError as e:  # already registered by an earlier import
            if "already" not in str(e) and "registered" not in str(e):
                raise
            continue
        op.register_fake(lambda q, k, v, dq, dk, dv, scale: torch.empty_like(q))
        return op
    raise RuntimeError(f"could not register {base}")


def _tangent_op_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                     dv: torch.Tensor, scale: float) -> torch.Tensor:
    return attention_tangent(q, k, v, dq, dk, dv, scale)


_tangent_op = _register_tangent_op()


class _AttentionJVP(torch.autograd.Function):
    """Attention whose primal is torch's SDPA and whose forward-mode derivative is the fused kernel.
    For JVPs under no_grad only (the sCM stop-gradient student): it has no backward."""

    @staticmethod
    def forward(q, k, v, scale):
        return sdpa(q, k, v, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        ctx.save_for_forward(q, k, v)
        ctx.scale = scale

    @staticmethod
    def jvp(ctx, dq, dk, dv, _dscale):
        q, k, v = ctx.saved_tensors
        dq, dk, dv = (torch.zeros_like(t) if d is None else d for t, d in ((q, dq), (k, dk), (v, dv)))
        D = q.shape[-1]
        return _tangent_op(q, k, v, dq, dk, dv, D ** -0.5 if ctx.scale is None else float(ctx.scale))

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("attention_with_jvp is for forward-mode JVPs without gradients only (no backward)")


def attention_with_jvp(q, k, v, scale: float | None = None):
    """``O = softmax(scale Q K^T) V`` on ``[B, L, H, D]`` tensors, with the fused forward-mode
    derivative for ``torch.func.jvp`` / ``torch.autograd.forward_ad``."""
    return _AttentionJVP.apply(q, k, v, scale)
