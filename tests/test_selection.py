import itertools
import math

import pytest
import torch

from interpdiff.masks import check_nested
from interpdiff.selection import dp_select, dp_select_levels, kl_scale, segment_costs, snr_weights


def brute_costs(x, scale=1.0):
    """c[i,j] by an explicit loop over segments and interior frames."""
    B, T, _ = x.shape
    c = torch.full((B, T, T), math.inf, dtype=torch.float64)
    x = x.double()
    for b in range(B):
        for i in range(T):
            for j in range(i + 1, T):
                e = 0.0
                for u in range(i + 1, j):
                    w = (u - i) / (j - i)
                    e += float(((x[b, u] - ((1 - w) * x[b, i] + w * x[b, j])) ** 2).sum())
                c[b, i, j] = e * scale
    return c


def brute_dp(cost, k):
    """Enumerate every k-set with both endpoints; ties -> smallest last interior index, then
    the one before it, ... (the DP's documented rule)."""
    T = cost.shape[0]
    best = None
    for mid in itertools.combinations(range(1, T - 1), k - 2):
        idx = (0,) + mid + (T - 1,)
        tot = sum(float(cost[a, b]) for a, b in zip(idx, idx[1:]))
        key = (tot, tuple(reversed(idx)))
        if best is None or key < best[0]:
            best = (key, idx)
    return list(best[1]), best[0][0]


def test_snr_weights_defaults():
    t, w = snr_weights()
    assert t.shape == (16,) and w.shape == (16,)
    assert torch.all(w >= 0.1) and torch.all(w <= 10)
    snr = ((1 - t) / t) ** 2
    assert torch.allclose(w, snr.clamp(0.1, 10))
    _, w2 = snr_weights(gamma=2.0, s_min=0.5, s_max=4.0, schedule="cosine")
    assert torch.allclose(w2, (1 / torch.tan(math.pi * t / 2) ** 2).clamp(0.5, 4.0) ** 2)
    assert kl_scale() == pytest.approx(float(w.sum()) / 2)


def test_segment_costs_exact_matches_loop():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 3, generator=gen).cumsum(1)
    got = segment_costs(x, scale=2.5)
    ref = brute_costs(x, scale=2.5)
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), fin)
    assert torch.allclose(got[fin].double(), ref[fin], rtol=1e-5, atol=1e-5)
    # video layout [B, C, T, H, W] with time at dim 2 gives the same as flattening channels
    v = torch.randn(2, 3, 7, 2, 2, generator=gen)
    flat = v.permute(0, 2, 1, 3, 4).reshape(2, 7, -1)
    assert torch.allclose(segment_costs(v, time_dim=2, scale=1.0), segment_costs(flat, scale=1.0), rtol=1e-5)


def test_segment_costs_exact_with_a_large_offset():
    """Frames with a large common offset (|x| ~ 1e6, D = 200): the exact mode keeps fp32-level
    agreement with the loop (a Gram matrix of the raw frames cancelled to ~1e-3 relative error)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 9, 200, generator=gen, dtype=torch.float64) + 1e6
    ref = brute_costs(x)
    got = segment_costs(x, scale=1.0)
    fin = torch.isfinite(ref) & (ref > 0)
    assert torch.allclose(got[fin].double(), ref[fin], rtol=1e-5, atol=0)


def test_segment_costs_sampled():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 12, 2, generator=gen)
    exact = segment_costs(x, scale=1.0)
    est = segment_costs(x, scale=1.0, segment_cost_samples=3)
    # segments with <= 3 interior frames are exact
    for i in range(12):
        for j in range(i + 1, min(12, i + 5)):
            assert est[0, i, j] == pytest.approx(float(exact[0, i, j]), rel=1e-5, abs=1e-6)
    # a longer segment uses 3 evenly spaced interior frames, rescaled by n/3
    i, j, n = 0, 10, 9
    us = [i + 1 + int((k + 0.5) * n / 3) for k in range(3)]
    e = sum(float(((x[0, u] - (x[0, i] + (u - i) / (j - i) * (x[0, j] - x[0, i]))) ** 2).sum()) for u in us)
    assert est[0, i, j] == pytest.approx(e * n / 3, rel=1e-5)


@pytest.mark.parametrize("T", [5, 8, 12])
def test_dp_matches_brute_force_random_costs(T):
    gen = torch.Generator().manual_seed(T)
    cost = torch.rand(6, T, T, generator=gen) * 10
    for k in sorted({2, 3, 4, min(6, T), T}):
        idx, tot = dp_select(cost, k, backend="torch")
        assert idx.shape == (6, k)
        for b in range(6):
            want_idx, want_tot = brute_dp(cost[b], k)
            assert idx[b].tolist() == want_idx
            assert float(tot[b]) == pytest.approx(want_tot, rel=1e-5)


def test_dp_ties_are_deterministic():
    gen = torch.Generator().manual_seed(7)
    cost = torch.randint(0, 3, (20, 9, 9), generator=gen).float()  # many exact ties
    for k in (3, 4, 5):
        idx, tot = dp_select(cost, k, backend="torch")
        for b in range(20):
            want_idx, want_tot = brute_dp(cost[b], k)
            assert idx[b].tolist() == want_idx
            assert float(tot[b]) == want_tot


def test_dp_total_never_increases_with_k():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 40, 2, generator=gen).cumsum(1)
    cost = segment_costs(x)
    totals = torch.stack([dp_select(cost, k)[1] for k in range(2, 41)], 1)
    assert torch.all(totals[:, 1:] <= totals[:, :-1] * (1 + 1e-6) + 1e-6)
    assert torch.allclose(totals[:, -1], torch.zeros(8))
    # superadditive costs (c[i,j] >= c[i,m] + c[m,j]) guarantee monotonicity as well
    w = torch.rand(8, 40, generator=gen)
    pre = torch.cat([torch.zeros(8, 1), w.cumsum(1)], 1)
    span = pre[:, None, :40] - pre[:, :40, None]
    sup = span**2
    t2 = torch.stack([dp_select(sup, k)[1] for k in range(2, 12)], 1)
    assert torch.all(t2[:, 1:] <= t2[:, :-1] + 1e-5)


def test_dp_levels_nested_and_optimal_when_consistent():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(16, 64, 2, generator=gen).cumsum(1)
    cost = segment_costs(x)
    budgets = [4, 8, 16, 64]
    m = dp_select_levels(cost, budgets)
    check_nested(m, budgets)
    # level 0 is the optimum; every level costs at least the optimum for its budget
    idx0, _ = dp_select(cost, 4)
    assert torch.equal(m[:, 0].nonzero()[:, 1].view(16, 4), idx0)
    for s, k in enumerate(budgets):
        keys = m[:, s]
        _, opt = dp_select(cost, k)
        got = []
        for b in range(16):
            t = keys[b].nonzero().flatten().tolist()
            got.append(sum(float(cost[b, a, c]) for a, c in zip(t, t[1:])))
        assert torch.all(torch.tensor(got) >= opt * (1 - 1e-5))


@pytest.mark.parametrize("k", [1, 0, 9])
def test_dp_bad_k(k):
    with pytest.raises(ValueError, match="k must satisfy"):
        dp_select(torch.rand(1, 8, 8), k)


def test_dp_bad_shape():
    with pytest.raises(ValueError, match="shape"):
        dp_select(torch.rand(8, 8), 3)
    with pytest.raises(ValueError, match="strictly increasing"):
        dp_select_levels(torch.rand(1, 8, 8), [4, 4])
