"""Triton kernels (``kernels/``) against the torch references and brute force.

CPU: every kernel runs under the Triton interpreter. ``@triton.jit`` picks interpreter or
compiler when the kernel module is *imported* (``triton.knobs.runtime.interpret``, read from
``TRITON_INTERPRET`` at decoration time), so the ``K`` fixture imports fresh copies of
``kernels.interpolate`` / ``kernels.dp`` with ``TRITON_INTERPRET=1`` (and triton's knob unpinned),
and puts the previous modules and environment back afterwards: the tests do not depend on who imported
triton or the kernels first, and leave no interpreter state behind for other test files.

The interpreter emulates a CUDA program in numpy: fp32 arithmetic matches torch's CPU ops
exactly, but its casts to bf16/fp16 truncate where CUDA and torch round to nearest, so low
precision results are compared within one ulp (``finfo.eps * |expected|``).

Compile check: the kernels are also compiled for sm_90 (PTX + ptxas, no GPU needed), which
catches what the lenient interpreter accepts but the compiler rejects, and asserts no spills.

GPU tests (``-m gpu``) repeat the comparisons at the benchmark sizes with compiled kernels.
"""

from __future__ import annotations

import importlib
import itertools
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import triton
from interpdiff.interpolate import interpolate, interpolate_corrupt, interpolate_reference
from interpdiff.selection import dp_select, dp_select_levels, dp_select_reference

from conftest import interpret_mode as _interpret_mode  # noqa: E402

MODS = ("kernels.interpolate", "kernels.dp")


# the time-walk forward kernels (every impl but the tile kernel)
WALKS = ["tloop", "seg", "hybrid", "jump", "jump2"]


def _import_kernels(interpret: bool):
    """Fresh ``kernels.interpolate`` and ``kernels.dp`` decorated in the requested mode.

    ``sys.modules`` is left as it was; ``install()`` puts the fresh modules there (so that the
    dispatch in ``interpdiff`` finds them) and ``restore()`` puts the previous ones back.
    """
    import kernels

    def put(modules: dict) -> None:
        for n, m in modules.items():
            attr = n.split(".")[1]
            sys.modules.pop(n, None)
            if m is not None:
                sys.modules[n] = m
                setattr(kernels, attr, m)
            elif hasattr(kernels, attr):
                delattr(kernels, attr)

    saved = {n: sys.modules.get(n) for n in MODS}
    put({n: None for n in MODS})
    try:
        with _interpret_mode(interpret):
            fresh = {n: importlib.import_module(n) for n in MODS}
    finally:
        put(saved)
    return SimpleNamespace(
        interp=fresh[MODS[0]], dp=fresh[MODS[1]], install=lambda: put(fresh), restore=lambda: put(saved)
    )


@pytest.fixture(scope="module")
def K():
    """Interpreted kernels, installed in ``sys.modules`` with ``TRITON_INTERPRET=1`` for the module."""
    k = _import_kernels(interpret=True)
    with _interpret_mode(True):  # TRITON_INTERPRET=1 also for the dispatch checks
        k.install()
        try:
            yield k
        finally:
            k.restore()


@pytest.fixture(scope="module")
def KG():
    """Compiled (CUDA) kernels."""
    k = _import_kernels(interpret=False)
    k.install()
    try:
        yield k
    finally:
        k.restore()


def _masks(B: int, T: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        m = torch.rand(B, T, generator=g) < 0.35
    elif kind == "k2":
        m = torch.zeros(B, T, dtype=torch.bool)
    elif kind == "all":
        m = torch.ones(B, T, dtype=torch.bool)
    elif kind == "adjacent":  # runs of neighbouring keyframes next to long gaps
        m = torch.zeros(B, T, dtype=torch.bool)
        m[:, 1] = m[:, T // 2] = m[:, T // 2 + 1] = m[:, T - 2] = True
    else:
        raise ValueError(kind)
    m[:, 0] = m[:, -1] = True
    return m


def assert_ulp_close(
    actual: torch.Tensor, expected: torch.Tensor, n_ulp: int = 1, scale: torch.Tensor | None = None
) -> None:
    """``|actual - expected| <= n_ulp * eps(dtype) * scale`` with ``scale = |expected|`` by default.

    ``scale`` is for results rounded more than once (the sum of the magnitudes rounded at each step).
    """
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    fi = torch.finfo(actual.dtype)
    a, e = actual.double(), expected.double()
    scale = e.abs() if scale is None else scale.double()
    bound = n_ulp * fi.eps * scale + fi.tiny
    bad = (a - e).abs() > bound
    if bool(bad.any()):
        where = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{int(bad.sum())}/{bad.numel()} elements beyond {n_ulp} ulp ({actual.dtype}); first at {where}: "
            f"actual {a[bad][:5].tolist()} expected {e[bad][:5].tolist()}"
        )


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32/fp64: the kernel does the reference's operations in the same order, so the bits agree."""
    if actual.dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    else:
        assert_ulp_close(actual, expected)


# ------------------------------------------------------------------------------ interpolation


@pytest.mark.parametrize("kind", ["random", "k2", "all", "adjacent"])
@pytest.mark.parametrize(
    "shape,td",
    [((3, 9, 5), 1), ((2, 3, 7, 5, 3), 2), ((2, 11), 1), ((2, 4, 6), 2)],
    ids=["B_T_D", "B_C_T_H_W", "B_T", "B_D_T"],
)
def test_interpolate_forward_masks_layouts(K, shape, td, kind):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    m = _masks(shape[0], shape[td], kind)
    assert_same(K.interp.interpolate_triton(x, m, td), interpolate_reference(x, m, td))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_interpolate_forward_dtypes(K, dtype):
    x = (torch.randn(2, 3, 9, 4, 3, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    m = _masks(2, 9, "random", seed=3)
    out = K.interp.interpolate_triton(x, m, 2)
    assert out.dtype == dtype
    assert_same(out, interpolate_reference(x, m, 2))


def test_interpolate_odd_sizes_multi_tile(K, monkeypatch):
    """T=13 (padded to 16) and Q=37 over 5 column tiles of 8, the last one partial."""
    monkeypatch.setattr(K.interp, "TILE_ELEMS", 128)
    x = torch.randn(3, 13, 37, generator=torch.Generator().manual_seed(4))
    m = _masks(3, 13, "random", seed=5)
    assert K.interp._fwd_blocks(13, 37)[:2] == (16, 8)
    assert_same(K.interp.interpolate_triton(x, m, 1), interpolate_reference(x, m, 1))


@pytest.mark.parametrize("block_t,block_q", [(4, 16), (16, 8)])
def test_interpolate_frame_tiles(K, block_t, block_q):
    """Tiles of frames (nearest keyframes by comparison with the whole row) and the full-T scan, with
    partial last tiles in both T=13 and Q=37; plain and fused; fp32 and bf16."""
    g = torch.Generator().manual_seed(26)
    x = torch.randn(2, 1, 13, 37, generator=g)
    eps = torch.randn(2, 1, 13, 37, generator=g)
    sigma = torch.tensor([0.2, 3.0])
    for kind in ("random", "adjacent"):
        m = _masks(2, 13, kind, seed=27)
        for dtype in (torch.float32, torch.bfloat16):
            xd, ed = x.to(dtype), eps.to(dtype)
            out = K.interp._forward(xd, m, 2, block_t=block_t, block_q=block_q, num_warps=2)
            assert_same(out, interpolate_reference(xd, m, 2))
            fused = K.interp._forward(xd, m, 2, sigma, ed, block_t=block_t, block_q=block_q, num_warps=2)
            ref = interpolate_corrupt(xd, m, sigma, ed, 2, backend="torch")
            if dtype == torch.float32:
                assert_same(fused, ref)
            else:
                assert_ulp_close(fused, ref, 1, scale=interpolate_reference(xd, m, 2).abs().float() + ref.abs().float())
    with pytest.raises(ValueError, match="BLOCK_T=32 must be a power of two <= 16"):
        K.interp._forward(x, m, 2, block_t=32)


def test_interpolate_default_blocks():
    k = _import_kernels(interpret=True)
    assert k.interp._fwd_blocks(21, 60 * 104) == (8, 256, 4)  # Wan: frame tiles
    assert k.interp._fwd_blocks(128, 2) == (128, 2, 1)  # maze: the whole sequence per program


def test_interpolate_non_contiguous(K):
    g = torch.Generator().manual_seed(6)
    m = _masks(2, 7, "random", seed=7)
    # Wan latents stored [B, T, C, H, W] and viewed as [B, C, T, H, W]: read in place by strides
    x_perm = torch.randn(2, 7, 3, 4, 5, generator=g).movedim(1, 2)
    # a column slice: Q dims merge with stride 2
    x_slice = torch.randn(2, 3, 7, 4, 10, generator=g)[..., ::2]
    # P dims that cannot merge (swapped): copied first
    x_swap = torch.randn(2, 4, 3, 7, 5, generator=g).transpose(1, 2)
    # column-major mask
    m_cm = m.t().contiguous().t()
    for x in (x_perm, x_slice, x_swap):
        assert not x.is_contiguous()
        td = 2 if x.dim() == 5 and x is not x_swap else 3
        mm = m_cm
        assert_same(K.interp.interpolate_triton(x, mm, td), interpolate_reference(x, m, td))
    assert K.interp._merge((4, 5), (10, 2)) == (20, 2) and K.interp._merge((3, 4), (5, 15)) is None


def test_interpolate_accepts_sorted_indices(K):
    x = torch.randn(2, 8, 3, generator=torch.Generator().manual_seed(8))
    idx = torch.tensor([[0, 3, 7], [0, 1, 7]])
    m = torch.zeros(2, 8, dtype=torch.bool).scatter_(1, idx, True)
    assert_same(K.interp.interpolate_triton(x, idx, 1), interpolate_reference(x, m, 1))
    with pytest.raises(ValueError, match="strictly increasing"):
        K.interp.interpolate_triton(x, torch.tensor([[0, 3, 3, 7], [0, 1, 2, 7]]), 1)


def test_interpolate_bad_inputs_are_clear_errors(K):
    x = torch.randn(2, 5, 3)
    m = _masks(2, 5, "random")
    with pytest.raises(ValueError, match="frames 0 and T-1"):
        K.interp.interpolate_triton(x, m & torch.tensor([True, True, True, True, False]), 1)
    with pytest.raises(ValueError, match=r"shape \[B, T\] = \[2, 5\]"):
        K.interp.interpolate_triton(x, m[:, :4], 1)
    with pytest.raises(ValueError, match="float16/bfloat16/float32/float64"):
        K.interp.interpolate_triton(x.long(), m, 1)
    with pytest.raises(ValueError, match="both sigma and eps"):
        K.interp.interpolate_triton(x, m, 1, sigma=torch.ones(2))


def test_interpolate_unchecked_mask_treats_endpoints_as_keyframes(K):
    """``check=False`` (no host sync): a mask missing an endpoint reads in bounds, as if it were set."""
    g = torch.Generator().manual_seed(24)
    x = torch.randn(2, 9, 3, generator=g)
    m = _masks(2, 9, "random", seed=25)
    bad = m.clone()
    bad[0, 0] = bad[1, -1] = False
    assert_same(K.interp.interpolate_triton(x, bad, 1, check=False), interpolate_reference(x, m, 1))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    K.interp.interpolate_triton(xa, bad, 1, check=False).sum().backward()
    interpolate_reference(xb, m, 1).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6)


# hybrid (seg or tloop per sample) and jump2 (jump with a deeper prefetch) reuse the others'
# arithmetic: they are run in bf16 only, where a changed order of operations would show first
@pytest.mark.parametrize("impl,dtype", [(i, d) for i in WALKS for d in (
    [torch.bfloat16] if i in ("hybrid", "jump2") else [torch.float32, torch.float64, torch.bfloat16])])
@pytest.mark.parametrize("kind", ["random", "k2", "all", "adjacent"])
def test_interpolate_time_walk_kernels(K, impl, kind, dtype):
    """The time-walk forwards (``impl="tloop"``, ``"seg"``, ``"hybrid"``, ``"jump"``, ``"jump2"``) against the reference
    (fp32/fp64 bit-exact) and the tile kernel (same arithmetic, bit-identical in every dtype),
    with and without the fused corruption, on a non-contiguous Wan-layout view and a partial
    last column block."""
    g = torch.Generator().manual_seed(30)
    x = torch.randn(2, 13, 3, 5, generator=g).to(dtype).movedim(1, 2)  # [B, C, T, Q], time not contiguous
    m = _masks(2, 13, kind, seed=31)
    got = K.interp._forward(x, m, 2, block_q=4, impl=impl)
    assert torch.equal(got, K.interp._forward(x, m, 2, impl="tile"))
    assert_same(got, interpolate_reference(x, m, 2))
    eps = torch.randn(x.shape, generator=g).to(dtype)
    sigma = torch.tensor([0.3, 1.5])
    got_c = K.interp._forward(x, m, 2, sigma=sigma, eps=eps, block_q=4, impl=impl)
    assert torch.equal(got_c, K.interp._forward(x, m, 2, sigma=sigma, eps=eps, impl="tile"))
    with pytest.raises(ValueError, match="impl='nope' is not one of"):
        K.interp._forward(x, m, 2, impl="nope")


@pytest.mark.parametrize("impl", ["jump", "jump2"])
def test_interpolate_jump_walk_long_rows(K, impl):
    """The jump walks hold a sample's keyframes as one int64: at their limit T = 63 the high bits
    (frames up to 62, found through an fp32 exponent) give the tile kernel's bits for sparse,
    dense and endpoint-only masks; T = 64 is refused with a pointer to ``tloop``."""
    g = torch.Generator().manual_seed(35)
    T = K.interp.JUMP_MAX_T
    x = torch.randn(3, T, 2, generator=g)
    m = torch.rand(3, T, generator=g) < torch.tensor([[0.1], [0.7], [0.0]])
    m[:, 0] = m[:, -1] = True
    m[0, T - 2] = True  # bits 61 and 62 set together
    assert torch.equal(K.interp._forward(x, m, 1, block_q=2, impl=impl), K.interp._forward(x, m, 1, impl="tile"))
    assert K.interp.supports(impl, 63) and not K.interp.supports(impl, 64) and K.interp.supports("tloop", 10**6)
    assert set(K.interp.WALK_BLOCKS) == set(K.interp.FWD_IMPLS) - {"tile"}  # every walk has its block sizes
    with pytest.raises(ValueError, match=r"T=64 frames exceeds the jump\d? kernel's limit 63; use impl='tloop'"):
        K.interp._forward(torch.randn(1, 64, 2), torch.ones(1, 64, dtype=torch.bool), 1, impl=impl)


@pytest.mark.parametrize("seg_max_k", [0, 3, 100])
def test_interpolate_hybrid_mixed_batch(K, monkeypatch, seg_max_k):
    """One batch whose samples take different paths of the hybrid kernel (2, 3, 6 and all 13
    keyframes; with SEG_MAX_K 0 every sample walks frame by frame, with 100 every sample by
    segments), with and without the fused corruption: bit-identical to the tile kernel."""
    monkeypatch.setattr(K.interp, "HYBRID_SEG_MAX_K", seg_max_k)
    g = torch.Generator().manual_seed(33)
    x = torch.randn(4, 2, 13, 7, generator=g)
    m = torch.zeros(4, 13, dtype=torch.bool)
    m[:, 0] = m[:, -1] = True
    m[1, 5] = True
    m[2, [2, 3, 7, 11]] = True
    m[3] = True
    assert torch.equal(K.interp._forward(x, m, 2, block_q=4, impl="hybrid"), K.interp._forward(x, m, 2, impl="tile"))
    eps, sigma = torch.randn(x.shape, generator=g), torch.rand(4, generator=g)
    assert torch.equal(K.interp._forward(x, m, 2, sigma=sigma, eps=eps, block_q=4, impl="hybrid"),
                       K.interp._forward(x, m, 2, sigma=sigma, eps=eps, impl="tile"))


@pytest.mark.parametrize("impl", WALKS)
@pytest.mark.parametrize("T", [1, 2, 3])
def test_interpolate_time_walk_short_sequences(K, impl, T):
    """T = 1, 2, 3 (no interior frame, one segment) and an unchecked mask that omits frame T-1:
    the walks treat 0 and T-1 as keyframes like the tile kernel."""
    g = torch.Generator().manual_seed(32)
    x = torch.randn(3, T, 6, generator=g)
    m = torch.zeros(3, T, dtype=torch.bool)
    m[:, 0] = True
    assert torch.equal(K.interp._forward(x, m, 1, block_q=4, impl=impl), K.interp._forward(x, m, 1, impl="tile"))
    m[:, -1] = True
    assert_same(K.interp._forward(x, m, 1, block_q=4, impl=impl), interpolate_reference(x, m, 1))


@pytest.mark.parametrize("impl", WALKS)
def test_interpolate_time_walk_unchecked_and_strided_masks(K, impl):
    """An unchecked mask without frame 0 (it is a keyframe by definition, as in the tile kernel)
    and a column-major (non-contiguous) mask."""
    g = torch.Generator().manual_seed(34)
    x = torch.randn(3, 2, 9, 5, generator=g)
    m = torch.rand(9, 3, generator=g).lt(0.4).t()  # [3, 9] view of a column-major tensor
    m[:, -1] = True
    m[0, 0] = False
    assert not m.is_contiguous()
    assert torch.equal(K.interp._forward(x, m, 2, block_q=4, impl=impl), K.interp._forward(x, m, 2, impl="tile"))
    fixed = m.clone()
    fixed[:, 0] = True
    assert_same(K.interp._forward(x, m, 2, block_q=4, impl=impl), interpolate_reference(x, fixed, 2))


def test_interpolate_default_forward_kernel_by_shape(K, monkeypatch):
    """Auto choice: the time walk for many columns per row (Wan, Q = H*W), the tile kernel for
    few (maze, Q = 2) or very long rows; FWD_IMPL forces one kernel."""
    assert K.interp._default_impl(21, 60 * 104) == "jump"  # Wan: 21 latent frames
    assert K.interp._default_impl(64, 60 * 104) == "tloop"  # past the jump kernel's 63 frames
    assert K.interp._default_impl(21, 512) == "tile"
    assert K.interp._default_impl(21, 60 * 104, noise=True) == "tile"  # the fused corruption
    assert K.interp._default_impl(128, 2) == "tile"
    assert K.interp._default_impl(4096, 4096) == "tile"
    monkeypatch.setattr(K.interp, "FWD_IMPL", "seg")
    assert K.interp._default_impl(128, 2) == "seg"
    x, m = torch.zeros(1, 1, 3, 1024), torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="block_t / q_iters are options of the tile kernel, not of impl='seg'"):
        K.interp._forward(x, m, 2, block_t=4)  # the dispatch's choice reaches _forward
    monkeypatch.setattr(K.interp, "FWD_IMPL", "nope")
    with pytest.raises(ValueError, match="impl='nope' is not one of"):
        K.interp.interpolate_triton(x, m, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpolate_fused_corruption(K, dtype):
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, 2, 9, 5, generator=g).to(dtype)
    eps = torch.randn(3, 2, 9, 5, generator=g).to(dtype)
    m = _masks(3, 9, "random", seed=10)
    sigma = torch.tensor([0.0, 0.5, 2.0])
    got = K.interp.interpolate_triton(x, m, 2, sigma=sigma, eps=eps)
    ref = interpolate_corrupt(x, m, sigma, eps, time_dim=2, backend="torch")
    if dtype == torch.float32:
        assert_same(got, ref)
    else:  # rounded twice (I(x, M) to bf16, then the sum): one ulp at each step
        assert_ulp_close(got, ref, 1, scale=interpolate_reference(x, m, 2).abs().float() + ref.abs().float())
    # keyframes carry no noise: exactly x there
    key = m[:, None, :, None].expand_as(x)
    assert torch.equal(got[key], x[key])
    # the public entry with a scalar sigma goes through the kernel (TRITON_INTERPRET is on)
    got, ref = interpolate_corrupt(x, m, 0.7, eps, 2, "triton"), interpolate_corrupt(x, m, 0.7, eps, 2, "torch")
    if dtype == torch.float32:
        assert_same(got, ref)
    else:
        assert_ulp_close(got, ref, 1, scale=interpolate_reference(x, m, 2).abs().float() + ref.abs().float())


@pytest.mark.parametrize("kind", ["random", "adjacent", "k2"])
def test_interpolate_backward_matches_reference_autograd(K, kind):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 11, 6, generator=g)
    gout = torch.randn(2, 3, 11, 6, generator=g)
    m = _masks(2, 11, kind, seed=12)
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    (K.interp.interpolate_triton(xa, m, 2) * gout).sum().backward()
    (interpolate_reference(xb, m, 2) * gout).sum().backward()
    # summation order differs from autograd's scatter-add: fp32 rounding-level differences
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6)
    for b in range(2):  # non-keyframes get exactly zero gradient
        assert torch.all(xa.grad[b][:, ~m[b]] == 0)


def test_interpolate_backward_bf16_and_non_contiguous_grad(K):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 9, 3, 5, generator=g).movedim(1, 2)  # non-contiguous [B, C, T, D]
    gout = torch.randn(2, 3, 9, 5, generator=g)
    m = _masks(2, 9, "random", seed=14)
    xa = x.to(torch.bfloat16).detach().requires_grad_(True)
    out = K.interp.interpolate_triton(xa, m, 2)
    out.backward(gout.to(torch.bfloat16).transpose(0, 1).contiguous().transpose(0, 1))  # strided grad
    xr = x.to(torch.bfloat16).float().requires_grad_(True)  # reference in fp32 on the same values
    interpolate_reference(xr, m, 2).backward(gout.to(torch.bfloat16).float())
    # the kernel accumulates in fp32 and rounds once; the fp32 reference rounded to bf16 is the target
    assert_ulp_close(xa.grad, xr.grad.to(torch.bfloat16), n_ulp=2)


def test_interpolate_fused_eps_gradient(K):
    g = torch.Generator().manual_seed(15)
    x = torch.randn(2, 8, 4, generator=g)
    eps = torch.randn(2, 8, 4, generator=g)
    m = _masks(2, 8, "random", seed=16)
    sigma = torch.tensor([0.3, 1.5])
    xa, ea = x.clone().requires_grad_(True), eps.clone().requires_grad_(True)
    xb, eb = x.clone().requires_grad_(True), eps.clone().requires_grad_(True)
    gout = torch.randn(2, 8, 4, generator=g)
    (K.interp.interpolate_triton(xa, m, 1, sigma=sigma, eps=ea) * gout).sum().backward()
    (interpolate_corrupt(xb, m, sigma, eb, 1, backend="torch") * gout).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ea.grad, eb.grad, rtol=0, atol=0)


def test_interpolate_gradcheck_fp64(K):
    x = torch.randn(2, 1, 6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(17), requires_grad=True)
    m = _masks(2, 6, "random", seed=18)
    assert torch.autograd.gradcheck(lambda v: K.interp.interpolate_triton(v, m, 2), (x,), eps=1e-6, atol=1e-9)


def test_fused_corruption_gradients_match_torch_path_sigma_included(K):
    """The fused kernel's gradients w.r.t. x, eps and sigma equal the torch path's (the sigma
    gradient was dropped; the fused noise is added in fp32 on both paths, so no fp64 gradcheck);
    double backward refuses."""
    g = torch.Generator().manual_seed(23)
    x = torch.randn(2, 3, 7, 2, dtype=torch.float64, generator=g)
    eps = torch.randn(x.shape, dtype=torch.float64, generator=g)
    sig = torch.tensor([0.3, 0.7], dtype=torch.float32)
    m = _masks(2, 7, "random", seed=24)
    grads = {}
    for be in ("torch", "triton"):
        xx, ee, ss = (t.clone().requires_grad_() for t in (x, eps, sig))
        out = interpolate_corrupt(xx, m, ss, ee, time_dim=2, backend=be)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
        grads[be] = (xx.grad, ee.grad, ss.grad)
    for a, b in zip(grads["torch"], grads["triton"]):
        assert b is not None
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    xx = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(K.interp.interpolate_triton(xx, m, 2).sum(), xx, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        gx.sum().backward()


# ------------------------------------------------------------------------------ dispatch


def test_dispatch_forced_triton_runs_kernel_under_interpreter(K, monkeypatch):
    x = torch.randn(2, 9, 3)
    m = _masks(2, 9, "random", seed=19)
    calls = []
    real = K.interp.interpolate_triton
    monkeypatch.setattr(K.interp, "interpolate_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert_same(interpolate(x, m, 1, backend="triton"), interpolate_reference(x, m, 1))
    assert calls == [1]
    # auto on CPU takes the reference, even with the interpreter on
    interpolate(x, m, 1, backend="auto")
    assert calls == [1]
    c = torch.rand(3, 8, 8)
    real_dp = K.dp.dp_select_triton
    monkeypatch.setattr(K.dp, "dp_select_triton", lambda *a: calls.append(2) or real_dp(*a))
    for got, ref in zip(dp_select(c, 4, backend="triton"), dp_select_reference(c, 4)):
        assert torch.equal(got, ref)
    dp_select(c, 4, backend="auto")
    assert calls == [1, 2]


def test_dispatch_forced_triton_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        interpolate(torch.randn(2, 5, 3), _masks(2, 5, "random"), backend="triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        dp_select(torch.rand(2, 5, 5), 3, backend="triton")


def test_compiled_kernels_on_cpu_tensors_are_a_clear_error():
    """Kernels imported without the interpreter, called directly with CPU tensors."""
    k = _import_kernels(interpret=False)
    assert type(k.interp._interp_fwd_kernel).__name__ == "JITFunction"
    with pytest.raises(RuntimeError, match="compiled for CUDA.*TRITON_INTERPRET=1"):
        k.interp.interpolate_triton(torch.randn(2, 5, 3), _masks(2, 5, "random"), 1)
    with pytest.raises(RuntimeError, match="compiled for CUDA.*TRITON_INTERPRET=1"):
        k.dp.dp_select_triton(torch.rand(2, 5, 5), 3)


# ------------------------------------------------------------------------------ DP


def _brute_force(cost_T_T: torch.Tensor, k: int) -> tuple[list[int], float]:
    """All k-sets with both endpoints: the minimum, ties to the smallest last interior index, then earlier."""
    T = cost_T_T.shape[0]
    best = None
    for mid in itertools.combinations(range(1, T - 1), k - 2):
        idx = (0, *mid, T - 1)
        tot = sum(float(cost_T_T[a, b]) for a, b in zip(idx, idx[1:]))
        key = (tot, tuple(reversed(idx)))
        if best is None or key < best[0]:
            best = (key, idx)
    return list(best[1]), best[0][0]


def _dp(K, c, k, impl):
    # "sweep_prefetch": the sweep kernel loading cost row s + 1 during step s
    pf = impl == "sweep_prefetch"
    idx, tot = K.dp.dp_select_many_triton(c, [k], impl="sweep" if pf else impl, prefetch=pf)
    return idx[0], tot[:, 0]


DP_VARIANTS = ["tile", "sweep", "sweep_prefetch"]


@pytest.mark.parametrize("impl", DP_VARIANTS)
def test_dp_brute_force_with_ties(K, impl):
    """Integer costs in {0, 1, 2}: many optimal sets; kernel and reference pick the documented one."""
    T = 9
    c = torch.randint(0, 3, (6, T, T), generator=torch.Generator().manual_seed(20)).float()
    for k in (2, 3, 5, T):
        idx, tot = _dp(K, c, k, impl)
        ref_idx, ref_tot = dp_select_reference(c, k)
        assert torch.equal(idx, ref_idx) and torch.equal(tot, ref_tot)
        for b in range(c.shape[0]):
            bf_idx, bf_tot = _brute_force(c[b], k)
            assert idx[b].tolist() == bf_idx and float(tot[b]) == bf_tot


@pytest.mark.parametrize("impl", DP_VARIANTS)
@pytest.mark.parametrize("T", [2, 5, 17, 33])
def test_dp_matches_reference_bitwise(K, T, impl):
    g = torch.Generator().manual_seed(T)
    c = torch.rand(4, T, T, generator=g) * 10
    c = c.masked_fill(~torch.ones(T, T, dtype=torch.bool).triu(1), float("nan"))  # i >= j is ignored
    for k in sorted({2, min(3, T), max(2, (T + 1) // 2), T}):
        if impl.startswith("sweep") and k > K.dp.SWEEP_MAX_K:
            with pytest.raises(ValueError, match="impl='sweep' needs"):
                _dp(K, c, k, impl)
            continue
        idx, tot = _dp(K, c, k, impl)
        ref_idx, ref_tot = dp_select_reference(c, k)
        assert idx.dtype == torch.long and tot.dtype == torch.float32
        assert torch.equal(idx, ref_idx), (T, k)
        assert torch.equal(tot, ref_tot), (T, k)


def test_dp_sweep_prefetch_default_by_shape(K, monkeypatch):
    """Prefetch where the H200 timing favours it (T=128 with K >= 16), not for few rows or short
    sequences; SWEEP_PREFETCH forces it either way."""
    assert K.dp.sweep_prefetch(128, 16) and K.dp.sweep_prefetch(128, 32)
    assert not K.dp.sweep_prefetch(128, 8) and not K.dp.sweep_prefetch(21, 6)
    monkeypatch.setattr(K.dp, "SWEEP_PREFETCH", False)
    assert not K.dp.sweep_prefetch(128, 32)
    calls = []
    monkeypatch.setattr(K.dp, "sweep_prefetch", lambda T, k: calls.append((T, k)) or False)
    K.dp.dp_select_many_triton(torch.rand(2, 9, 9), [4], impl="sweep")
    assert calls == [(9, 4)]  # the kernel launch asks the rule


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("prefetch", [False, True])
def test_dp_sweep_split_prefetch_bitwise(K, split, prefetch):
    """Every sweep variant (one full tile or two column halves; cost rows loaded in the step or
    one step ahead) gives the reference's indices and totals, incl. T = 3 (one step) and T = 40
    (padded to 64, the second half partly past T)."""
    for T in (3, 17, 40):
        c = torch.rand(3, T, T, generator=torch.Generator().manual_seed(T + 100)) * 10
        ks = sorted({2, min(T, 5), min(T, 32)})
        idx, tot = K.dp.dp_select_many_triton(c, ks, impl="sweep", split=split, prefetch=prefetch)
        for i, k in enumerate(ks):
            ref_idx, ref_tot = dp_select_reference(c, k)
            assert torch.equal(idx[i], ref_idx) and torch.equal(tot[:, i], ref_tot), (T, k)


def test_dp_non_contiguous_fp64_and_inf(K):
    T = 10
    g = torch.Generator().manual_seed(21)
    c64 = (torch.rand(3, T, T, generator=g, dtype=torch.float64) * 5).transpose(1, 2).contiguous().transpose(1, 2)
    assert not c64.is_contiguous()
    c64[0, 0, T - 1] = math.inf  # some forbidden segments (finite alternatives remain)
    c64[1, :, 5] = math.inf
    for k in (2, 4, 7):
        for got, ref in zip(K.dp.dp_select_triton(c64, k), dp_select_reference(c64, k)):
            assert torch.equal(got, ref), k


def test_dp_streaming_path_large_T_logic(K, monkeypatch):
    """The T > 128 path (cost re-read per row in [BLOCK_S, BLOCK_T] tiles) at a small T by lowering the limits."""
    monkeypatch.setattr(K.dp, "MAX_ON_CHIP_T", 4)
    monkeypatch.setattr(K.dp, "STREAM_BLOCK_T", 8)
    monkeypatch.setattr(K.dp, "STREAM_BLOCK_S", 4)
    T = 19
    c = torch.randint(0, 4, (3, T, T), generator=torch.Generator().manual_seed(22)).float()  # ties across s blocks
    for k in (2, 5):
        for got, ref in zip(K.dp.dp_select_triton(c, k), dp_select_reference(c, k)):
            assert torch.equal(got, ref), k


def test_dp_many_budgets_one_pass_and_levels(K):
    T = 12
    c = torch.rand(5, T, T, generator=torch.Generator().manual_seed(23))
    ks = [2, 4, 7, 12]
    idxs, tot = K.dp.dp_select_many_triton(c, ks)
    assert tot.shape == (5, 4)
    for i, k in enumerate(ks):
        ref_idx, ref_tot = dp_select_reference(c, k)
        assert torch.equal(idxs[i], ref_idx) and torch.equal(tot[:, i], ref_tot)
    levels = [3, 6, 12]
    assert torch.equal(dp_select_levels(c, levels, backend="triton"), dp_select_levels(c, levels, backend="torch"))


def test_dp_bad_inputs_are_clear_errors(K):
    with pytest.raises(ValueError, match=r"2 <= k <= T=5"):
        K.dp.dp_select_triton(torch.rand(2, 5, 5), 6)
    with pytest.raises(ValueError, match=r"\[B, T, T\]"):
        K.dp.dp_select_triton(torch.rand(2, 5, 4), 3)
    with pytest.raises(ValueError, match="float"):
        K.dp.dp_select_triton(torch.ones(2, 5, 5, dtype=torch.long), 3)


# ------------------------------------------------------------------------------ compile (no GPU)


def test_kernels_compile_for_sm90_without_spills():
    """The interpreter accepts programs the compiler rejects; compile each variant to SASS here
    (no GPU), specialised on the arguments of a launch at the issue sizes as the JIT does."""
    from kernels.sass import compile_for, issue_variants, tool

    if not os.path.exists(tool("ptxas")):
        pytest.skip("triton's bundled ptxas is not installed")
    import triton.language as tl

    if type(tl.standard._argmin_combine_tie_break_left).__name__ == "InterpretedFunction":
        pytest.skip("triton was imported under TRITON_INTERPRET=1: its standard library cannot be compiled here")
    k = _import_kernels(interpret=False)
    variants = issue_variants(k.interp, k.dp, sweep=False)  # what the host functions launch
    assert len(variants) >= 25
    for name, fn, args, nw in variants:
        info = compile_for(fn, args, nw)
        assert info["spill_bytes"] == 0, (name, info["ptxas"])
        assert info["regs"] <= 255, (name, info["regs"])


def test_compile_for_specialises_like_a_launch():
    """``compile_for`` applies the JIT's rule (ints equal to 1 are constants, multiples of 16 carry
    the divisibility hint, pointers are 16-byte aligned): a unit-stride bf16 row load of the
    walk kernel becomes 128-bit vector loads, and a runtime stride keeps it scalar."""
    from kernels.sass import compile_for, issue_variants, launch_signature, tool

    if not os.path.exists(tool("cuobjdump")):
        pytest.skip("triton's bundled cuobjdump is not installed")
    import triton.language as tl

    if type(tl.standard._argmin_combine_tie_break_left).__name__ == "InterpretedFunction":
        pytest.skip("triton was imported under TRITON_INTERPRET=1: its standard library cannot be compiled here")
    k = _import_kernels(interpret=False)
    _, fn, args, _ = next(v for v in issue_variants(k.interp, k.dp) if v[0] == "interp fwd tloop, Wan bf16")
    sig, consts, attrs = launch_signature(fn, args)
    assert sig["sxq"] == "constexpr" and consts["sxq"] == 1 and sig["sxt"] == "i32" and sig["smb"] == "i32"
    names = [p.name for p in fn.params]
    assert (names.index("sxt"),) in attrs and (names.index("smb"),) not in attrs  # 6240 = 16 * 390; 21 is not
    vec = compile_for(fn, args, 4, sass=True)["sass"]
    scalar = compile_for(fn, dict(args, sxq=3), 4, sass=True)["sass"]
    assert "LDG.E.128" in vec and "LDG.E.128" not in scalar
    with pytest.raises(ValueError, match="no value for"):
        launch_signature(fn, {"T": 21})
    with pytest.raises(ValueError, match="sxt=.2.5."):
        launch_signature(fn, dict(args, sxt="2.5"))


# ------------------------------------------------------------------------------ GPU, real sizes


def _gpu_scale(x: torch.Tensor, m: torch.Tensor, td: int, ref: torch.Tensor) -> torch.Tensor:
    """Error scale on the GPU: Triton contracts ``xl * (1 - w) + xr * w`` into an FMA, which
    differs from torch's separately rounded ops by an fp32 ulp of the *terms*
    (``(1 - w)|xl| + w|xr|``, large where they cancel), and then the output rounding (``|ref|``)."""
    return interpolate_reference(x.abs().float(), m, td) + ref.abs().float()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_interpolate_wan_size(KG, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 16, 21, 60, 104, device="cuda", generator=g).to(dtype)
    m = _masks(8, 21, "random").cuda()
    out = KG.interp.interpolate_triton(x, m, 2)
    ref = interpolate_reference(x, m, 2)
    assert_ulp_close(out, ref, 1, scale=_gpu_scale(x, m, 2, ref))
    for impl in KG.interp.FWD_IMPLS:
        assert_ulp_close(KG.interp._forward(x, m, 2, impl=impl), ref, 1, scale=_gpu_scale(x, m, 2, ref))
    eps = torch.randn_like(x)
    sig = torch.rand(8, device="cuda")
    ref_c = interpolate_corrupt(x, m, sig, eps, 2, backend="torch")
    got_c = KG.interp.interpolate_triton(x, m, 2, sigma=sig, eps=eps)
    assert_ulp_close(got_c, ref_c, 1, scale=_gpu_scale(x, m, 2, ref) + ref_c.abs().float())
    for impl in KG.interp.FWD_IMPLS:  # the fused corruption through every forward kernel
        got_c = KG.interp._forward(x, m, 2, sigma=sig, eps=eps, impl=impl)
        assert_ulp_close(got_c, ref_c, 1, scale=_gpu_scale(x, m, 2, ref) + ref_c.abs().float())
    xa = x.detach().float().requires_grad_(True)
    xb = x.detach().float().requires_grad_(True)
    gout = torch.randn(x.shape, device="cuda", generator=g)
    KG.interp.interpolate_triton(xa, m, 2).backward(gout)
    interpolate_reference(xb, m, 2).backward(gout)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["random", "k2", "all", "adjacent"])
def test_gpu_interpolate_maze_size_and_layouts(KG, kind):
    x = torch.randn(4096, 128, 2, device="cuda")
    m = _masks(4096, 128, kind).cuda()
    ref = interpolate_reference(x, m, 1)
    assert_ulp_close(KG.interp.interpolate_triton(x, m, 1), ref, 1, scale=_gpu_scale(x, m, 1, ref))
    xp = torch.randn(4, 21, 16, 30, 52, device="cuda").movedim(1, 2)  # non-contiguous Wan view
    mp = _masks(4, 21, kind).cuda()
    ref = interpolate_reference(xp, mp, 2)
    assert_ulp_close(KG.interp.interpolate_triton(xp, mp, 2), ref, 1, scale=_gpu_scale(xp, mp, 2, ref))
    xd = torch.randn(2, 1, 9, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: KG.interp.interpolate_triton(v, _masks(2, 9, kind).cuda(), 2), (xd,))


@pytest.mark.gpu
@pytest.mark.parametrize("B,T,ks", [(4096, 128, [8, 16, 32]), (4096, 21, [2, 6, 21]), (64, 300, [2, 16])])
def test_gpu_dp_bitwise(KG, B, T, ks):
    g = torch.Generator(device="cuda").manual_seed(T)
    c = torch.rand(B, T, T, device="cuda", generator=g)
    ci = torch.randint(0, 3, (B, T, T), device="cuda", generator=g).float()  # ties
    for cost in (c, ci):
        for impl, pf in (("tile", None), ("sweep", False), ("sweep", True)):
            if impl == "sweep" and (T > KG.dp.MAX_ON_CHIP_T or max(ks) > KG.dp.SWEEP_MAX_K):
                continue
            idxs, tot = KG.dp.dp_select_many_triton(cost, ks, impl=impl, prefetch=pf)
            for i, k in enumerate(ks):
                ref_idx, ref_tot = dp_select_reference(cost, k)
                assert torch.equal(idxs[i], ref_idx) and torch.equal(tot[:, i], ref_tot), (B, T, k, impl, pf)


# ------------------------------------------------------------------------------ benchmark script


@pytest.mark.slow
def test_bench_kernels_cpu_smoke(tmp_path):
    """``bench_kernels.py --cpu-smoke`` runs end to end (its own result checks included) and writes its JSON."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        [sys.executable, os.path.join(root, "benchmarks", "bench_kernels.py"), "--cpu-smoke", "numpy_samples=2",
         f"json_out={out}"],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    data = json.loads(out.read_text())
    assert data["cpu_smoke"] and data["device"].startswith("CPU")
    walks = ("tloop", "seg", "hybrid", "jump", "jump2")
    ops = {"forward", "fused corruption", "forward+backward"} | {f"forward ({i} kernel)" for i in walks}
    assert {r["op"] for r in data["interpolate"] if r["case"] == "maze"} == ops - {"forward+backward"}
    assert {r["op"] for r in data["interpolate"] if r["case"] == "wan"} == ops | {f"fused corruption ({i} kernel)"
                                                                                  for i in walks}
    assert {r["impl"] for r in data["interpolate"] if r["op"] == "forward"} == {"tile"}  # tiny shapes: Q < WALK_MIN_Q
    # the per-kernel summary: every forward kernel at every K of the Wan case, worst K first column
    summary = {(e["op"], e["impl"]): e for e in data["kernels_wan"]}
    assert set(summary) == {(op, i) for op in ("forward", "fused") for i in ("tile",) + walks}
    assert all(sorted(e["of_copy"]) == ["2", "3"] and e["worst"] == min(e["of_copy"].values()) for e in summary.values())
    assert [i for (op, i), e in summary.items() if e["default"]] == ["tile", "tile"]
    assert all(r["fill_GBps"] > 0 for r in data["interpolate"])
    assert [(r["T"], r["K"]) for r in data["dp"]] == [(16, 4), (21, 6)]
