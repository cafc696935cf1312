"""Keyframe selection for the maze: nested DP levels, kp_feat, D_phi, selector masks and diagnostics."""

import itertools
import math

import numpy as np
import pytest
import torch

from interpdiff.interpolate import interpolate
from interpdiff.io import CheckpointError, save_checkpoint
from interpdiff.masks import check_nested
from interpdiff.selection import segment_costs
from maze.mazes import MAZE_NAMES, get_maze
from maze.prepare_keyframes import dp_levels, kp_features, matrix_pair_cost

torch.set_num_threads(1)


def _path_cost(cost_T_T, frames):
    return sum(float(cost_T_T[a, b]) for a, b in zip(frames, frames[1:]))


def test_nested_levels_are_best_superset_brute_force():
    """Level s is the cheapest K_s-set containing level s-1 (brute force over supersets)."""
    gen = torch.Generator().manual_seed(0)
    T = 11
    x = torch.randn(6, T, 2, generator=gen).cumsum(1)
    cost = segment_costs(x)
    budgets = [3, 5, 8, T]
    m = dp_levels(cost, budgets, backend="torch")
    check_nested(m, budgets)
    assert m[:, -1].all()
    for b in range(6):
        # level 0: global optimum
        best0 = min(_path_cost(cost[b], [0, *c, T - 1]) for c in itertools.combinations(range(1, T - 1), 1))
        got0 = _path_cost(cost[b], m[b, 0].nonzero().flatten().tolist())
        assert got0 == pytest.approx(best0, rel=1e-6)
        for s in (1, 2):
            prev = set(m[b, s - 1].nonzero().flatten().tolist())
            free = [t for t in range(T) if t not in prev]
            best = min(
                _path_cost(cost[b], sorted(prev | set(c))) for c in itertools.combinations(free, budgets[s] - len(prev))
            )
            got = _path_cost(cost[b], m[b, s].nonzero().flatten().tolist())
            assert got == pytest.approx(best, rel=1e-5, abs=1e-9)


def test_kp_features_hand_case():
    T = 10
    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[0, [0, 3, 9]] = True
    cost = torch.full((1, T, T), math.inf)
    for i in range(T):
        for j in range(i + 1, T):
            cost[0, i, j] = 10 * i + j  # distinct, easy to read
    f = kp_features(mask, matrix_pair_cost(cost))[0]
    torch.testing.assert_close(f[0], torch.tensor([0, 3 / 10, 0, 0, 3.0]))
    torch.testing.assert_close(f[3], torch.tensor([3 / 10, 6 / 10, 3 / 9, 3.0, 39.0]))
    torch.testing.assert_close(f[9], torch.tensor([6 / 10, 0, 1.0, 39.0, 0]))
    assert (f[[1, 2, 4, 5, 6, 7, 8]] == 0).all()


def _cond(B=6, seed=0):
    rng = np.random.default_rng(seed)
    ms = [get_maze(MAZE_NAMES[k % 3]) for k in range(B)]
    occ = torch.from_numpy(np.stack([m.occ for m in ms]))
    sdf = torch.from_numpy(np.stack([m.sdf for m in ms]))
    st, gl = [], []
    for m in ms:
        free = m.free_cells()
        a, b = rng.choice(len(free), 2, replace=False)
        st.append(m.cell_center_norm(free[a]))
        gl.append(m.cell_center_norm(free[b]))
    return occ, sdf, torch.tensor(np.array(st)).float(), torch.tensor(np.array(gl)).float()


@pytest.mark.parametrize("nms", [0.0, 0.5])
def test_selector_nested_masks_nested_with_endpoints(nms):
    from maze.selector import Selector

    torch.manual_seed(0)
    budgets = [8, 16, 32, 64, 128]
    sel = Selector(128, budgets, d_model=32, enc_depth=1, heads=4, depth=1, nms_radius_scale=nms).eval()
    m = sel.nested_masks(*_cond())
    assert m.shape == (6, 5, 128) and m.dtype == torch.bool
    check_nested(m, budgets)  # nested, endpoints at every level, exact counts
    assert m[:, :, 0].all() and m[:, :, -1].all()


def test_decode_nested_nms_spreads_picks():
    from maze.selector import decode_nested

    T, budgets = 33, [5, 9]
    logits = torch.full((1, 2, T), -5.0)
    logits[0, :, 10:14] = torch.tensor([4.0, 5.0, 4.5, 3.0])  # one broad peak
    logits[0, :, 25] = 1.0
    plain = decode_nested(logits, budgets, 0.0)
    assert plain[0, 0].nonzero().flatten().tolist() == [0, 10, 11, 12, 32]  # top-k clusters on the peak
    nms = decode_nested(logits, budgets, 0.5)  # radius 0.5 * 32 / 4 = 4 frames
    idx = nms[0, 0].nonzero().flatten().tolist()
    assert idx[0] == 0 and idx[-1] == 32 and 11 in idx and 25 in idx
    assert min(np.diff(idx)) >= 4
    check_nested(nms, budgets)
    # the result equals what selector_nested_masks makes of the same picks
    from interpdiff.masks import selector_nested_masks

    assert torch.equal(selector_nested_masks(nms.float(), budgets), nms)


def test_selector_eval_with_perfect_logits_matches_dp(tmp_path):
    """Diagnostics: a selector whose logits are the DP labels has overlap 1, MAE 0, DP's error."""
    from maze.data import MazeSplit
    from maze.selector import Selector
    from maze.train_selector import eval_selector

    torch.manual_seed(0)
    occ, sdf, st, gl = _cond(B=6)
    T, budgets = 32, [4, 8, 32]
    x = torch.cumsum(torch.randn(6, T, 2) * 0.01, 1) + 0.3
    kp = dp_levels(segment_costs(x), budgets, backend="torch")
    data = MazeSplit(
        pos=x.numpy(), maze_id=np.arange(6) % 3, start=x[:, 0].numpy(), goal=x[:, -1].numpy(),
        occ=np.stack([get_maze(n).occ for n in MAZE_NAMES]), sdf=np.stack([get_maze(n).sdf for n in MAZE_NAMES]),
        maze_names=list(MAZE_NAMES), kp_mask_levels=kp.numpy(), budgets=budgets,
        kp_feat=np.zeros((6, 3, T, 5), np.float32), cost_scale=1.0,
    )
    sel = Selector(T, budgets, d_model=16, enc_depth=0, heads=2, depth=1).eval()
    sel.level_logits = lambda *a: kp.float() * 10  # perfect logits
    res = eval_selector(sel, data, n=6)
    for lv in res["all"]["levels"]:
        assert lv["overlap"] == pytest.approx(1.0) and lv["index_mae"] == 0
        assert lv["err"]["selector"] == pytest.approx(lv["err"]["dp"])
    e_unif = ((interpolate(x, torch.from_numpy(np.isin(np.arange(T), [0, 10, 21, 31]))[None].expand(6, T)) - x) ** 2).sum(-1).mean()
    assert res["all"]["levels"][0]["err"]["uniform"] == pytest.approx(float(e_unif), rel=1e-5)
    assert set(res) == {"all", *MAZE_NAMES}


def test_selector_loss_matches_manual_bce():
    from maze.train_selector import selector_loss

    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5, -0.2]])
    mask = torch.tensor([[True, False, True, False, True]])
    K, T = 3, 5
    pw = (T - K) / (K - 2)
    p = torch.sigmoid(logits[0])
    terms = [-(pw * math.log(p[2])), -math.log(1 - p[1]), -math.log(1 - p[3])]  # interior frames only
    ref = sum(terms) / (pw + 2)
    assert float(selector_loss(logits, mask, K)) == pytest.approx(float(ref), rel=1e-5)


def test_dphi_cost_matrix_pairs_and_checkpoint(tmp_path):
    from maze.dphi import DPhi, load_dphi

    torch.manual_seed(0)
    T = 16
    model = DPhi(T, d_model=32, enc_depth=1, heads=4, depth=1, log_eps=math.log(1e-4), log_mean=-3.0, log_std=2.0).eval()
    cond = _cond(B=3)
    C = model.cost_matrix(*cond, chunk=17)
    assert C.shape == (3, T, T)
    low = torch.ones(T, T, dtype=torch.bool).triu(1)
    assert torch.isinf(C[:, ~low]).all() and (C[:, low] >= 0).all()
    i = torch.tensor([[0, 2, 5], [1, 1, 14], [3, 7, 0]])
    j = torch.tensor([[4, 3, 15], [2, 9, 15], [3, 8, 15]])
    pc = model.pair_costs(*cond, i, j)
    ref = torch.where(i < j, torch.stack([C[b, i[b], j[b]] for b in range(3)]), torch.zeros(3, 3))
    torch.testing.assert_close(pc, ref)
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"model": model.state_dict()}, {"kind": "maze-dphi", "sizes": model.sizes})
    again = load_dphi(path)
    torch.testing.assert_close(again.cost_matrix(*cond), C)
    save_checkpoint(tmp_path / "sel.pt", {"model": {}}, {"kind": "maze-selector", "sizes": {}})
    with pytest.raises(CheckpointError, match="expected 'maze-dphi'"):
        load_dphi(tmp_path / "sel.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dphi(tmp_path / "none" / "model.pt")


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    from maze.train_dphi import spearman_rows

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(4, 50, generator=gen)
    b = a + 0.7 * torch.randn(4, 50, generator=gen)
    got = spearman_rows(a, b)
    for r in range(4):
        assert float(got[r]) == pytest.approx(spearmanr(a[r].numpy(), b[r].numpy()).statistic, abs=1e-9)


def test_path_prior_follows_the_grid_path():
    from maze.encoders import path_prior
    from maze.mazes import shortest_path

    m = get_maze("medium")
    free = m.free_cells()
    s, g = free[0], free[-1]
    start = torch.tensor(m.cell_center_norm(s)).float()[None]
    goal = torch.tensor(m.cell_center_norm(g)).float()[None]
    pp = path_prior(torch.from_numpy(m.occ)[None], start, goal, 64)[0]
    torch.testing.assert_close(pp[0, :2], start[0])
    torch.testing.assert_close(pp[-1, :2], goal[0])
    cells = {tuple(c) for c in shortest_path(m, s, g)}
    for u, v in pp[:, :2].tolist():  # every prior point lies in a cell of the shortest path
        assert (int(v * 12), int(u * 12)) in cells or min(abs(u * 12 - round(u * 12)), abs(v * 12 - round(v * 12))) < 1e-4
    # uniform in arc length: away from turns consecutive points are (path length) / (T-1) apart
    steps = (pp[1:, :2] - pp[:-1, :2]).norm(dim=-1)
    arc = (len(cells) - 1) / 12 / 63
    assert float((steps - arc).abs().lt(1e-5).float().mean()) > 0.8 and bool((steps <= arc + 1e-5).all())
    assert (pp[:, 4] > 0.5).any()  # the path turns


def test_decode_nested_gap_cap_bounds_the_tail():
    from maze.selector import decode_nested

    T, budgets = 65, [9, 17]
    logits = torch.full((3, 2, T), -5.0)
    logits[:, :, 2:12] = torch.linspace(1, 3, 10)  # everything wants the start
    plain = decode_nested(logits, budgets, 0.0, 0.0)
    capped = decode_nested(logits, budgets, 0.0, 1.5)
    check_nested(capped, budgets)
    for s, k in enumerate(budgets):
        g_plain = plain[0, s].nonzero().flatten().diff().max()
        g_cap = capped[0, s].nonzero().flatten().diff().max()
        assert g_plain > 1.5 * (T - 1) / (k - 1)
        assert g_cap <= 1.5 * (T - 1) / (k - 1)


def test_kp_feat_from_dphi_matches_pair_costs():
    from maze.data import MazeSplit
    from maze.dphi import DPhi, dphi_pair_cost_for_rows

    torch.manual_seed(1)
    T = 16
    occ, sdf, st, gl = _cond(B=3)
    model = DPhi(T, d_model=16, enc_depth=0, heads=2, depth=1, log_eps=math.log(1e-3)).eval()
    data = MazeSplit(
        pos=np.zeros((3, T, 2), np.float32), maze_id=np.arange(3), start=st.numpy(), goal=gl.numpy(),
        occ=occ.numpy(), sdf=sdf.numpy(), maze_names=list(MAZE_NAMES),  # _cond: sample k is maze k % 3
    )
    mask = torch.zeros(3, T, dtype=torch.bool)
    mask[:, [0, 5, 9, 15]] = True
    f = kp_features(mask, dphi_pair_cost_for_rows(model, data)(np.arange(3)))
    C = model.cost_matrix(occ, sdf, st, gl)
    torch.testing.assert_close(f[:, 5, 3], C[:, 0, 5])
    torch.testing.assert_close(f[:, 5, 4], C[:, 5, 9])
    torch.testing.assert_close(f[:, 15, 3], C[:, 9, 15])
