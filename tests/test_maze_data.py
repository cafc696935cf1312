"""Maze data: file format round trip, maze2d HDF5 and Minari loaders, generation, DP keyframes."""

import json

import h5py
import numpy as np
import pytest
import torch

from interpdiff.config import load_config
from interpdiff.masks import check_nested
from maze.config import MazeConfig
from maze.data import (
    MazeDataError,
    MazeDataset,
    MazeSplit,
    goal_segments,
    load_maze2d_hdf5,
    load_minari,
    load_split,
    resample,
    save_split,
)
from maze.mazes import get_maze, to_norm


def _split(n=5, T=16, seed=0):
    rng = np.random.default_rng(seed)
    pos = rng.uniform(0.1, 0.5, size=(n, T, 2)).astype(np.float32)
    names = ["umaze", "medium", "large"]
    return MazeSplit(
        pos=pos,
        maze_id=rng.integers(0, 3, n),
        start=pos[:, 0].copy(),
        goal=pos[:, -1].copy(),
        occ=np.stack([get_maze(k).occ for k in names]),
        sdf=np.stack([get_maze(k).sdf for k in names]),
        maze_names=names,
        n_steps=np.full(n, 100),
    )


def test_resample_hand_case():
    p = np.array([[0.0, 0.0], [1.0, 2.0], [3.0, 2.0]])
    out = resample(p, 5)  # times 0, .5, 1, 1.5, 2
    np.testing.assert_allclose(out, [[0, 0], [0.5, 1], [1, 2], [2, 2], [3, 2]])
    with pytest.raises(ValueError, match="at least 2"):
        resample(p[:1], 4)


def test_goal_segments():
    g = np.array([[0, 0]] * 3 + [[1, 1]] * 4 + [[2, 2]] * 2, dtype=float)
    assert goal_segments(g) == [(0, 2), (3, 6), (7, 8)]
    ends = np.zeros(9, bool)
    ends[4] = True  # timeout after step 4 cuts the second segment
    assert goal_segments(g, ends) == [(0, 2), (3, 4), (5, 6), (7, 8)]


def test_split_round_trip_and_errors(tmp_path):
    d = _split()
    save_split(tmp_path, "train", d)
    got = load_split(tmp_path, "train")
    for k in ("pos", "maze_id", "start", "goal", "occ", "sdf", "n_steps"):
        np.testing.assert_array_equal(getattr(got, k), getattr(d, k))
    assert got.maze_names == d.maze_names and got.kp_mask_levels is None
    with pytest.raises(MazeDataError, match="eval.npz"):
        load_split(tmp_path, "eval")
    with pytest.raises(MazeDataError, match="unknown split"):
        load_split(tmp_path, "test")
    with pytest.raises(MazeDataError, match="keyframe file"):
        load_split(tmp_path, "train", keyframes=True)
    np.savez(tmp_path / "eval.npz", pos=d.pos)
    with pytest.raises(MazeDataError, match="lacks array 'maze_id'"):
        load_split(tmp_path, "eval")
    bad = _split()
    bad.maze_id[0] = 7
    with pytest.raises(MazeDataError, match="maze_id must lie"):
        save_split(tmp_path, "train", bad)


def test_dataset_collates(tmp_path):
    d = _split(n=6)
    loader = torch.utils.data.DataLoader(MazeDataset(d), batch_size=4)
    b = next(iter(loader))
    assert b["pos"].shape == (4, 16, 2) and b["occ"].shape == (4, 12, 12)
    np.testing.assert_array_equal(b["occ"][1].numpy(), d.occ[d.maze_id[1]])


def _d4rl_stream():
    """Two goal-reaching segments in D4RL's maze frame of the U-maze (cell (i,j) at (i,j))."""
    seg1 = np.stack([np.linspace(1, 1, 30), np.linspace(1, 3, 30)], 1)  # along row 1
    seg2 = np.stack([np.linspace(1, 3, 40), np.linspace(3, 3, 40)], 1)  # down column 3
    seg3 = np.stack([np.linspace(3, 3, 20), np.linspace(3, 2, 20)], 1)  # cut by a timeout (never reaches)
    obs = np.concatenate([seg1, seg2, seg3])
    goal = np.concatenate([np.tile([1, 3], (30, 1)), np.tile([3, 3], (40, 1)), np.tile([3, 1], (20, 1))]).astype(float)
    timeouts = np.zeros(len(obs), bool)
    timeouts[-1] = True
    return obs, goal, timeouts, seg1, seg2


def test_maze2d_hdf5_loader(tmp_path):
    obs, goal, timeouts, seg1, seg2 = _d4rl_stream()
    path = tmp_path / "maze2d-umaze-sparse-v1.hdf5"
    with h5py.File(path, "w") as f:
        f["observations"] = np.concatenate([obs, np.zeros_like(obs)], 1)
        f["actions"] = np.zeros((len(obs), 2))
        f["rewards"] = np.zeros(len(obs))
        f["terminals"] = np.zeros(len(obs), bool)
        f["timeouts"] = timeouts
        f["infos/goal"] = goal
        f["infos/qpos"] = obs
        f["infos/qvel"] = np.zeros_like(obs)
    d = load_maze2d_hdf5(path, "umaze", T=8, goal_tol=0.1)
    assert d.N == 2 and d.pos.shape == (2, 8, 2) and d.maze_names == ["umaze", "medium", "large"]
    assert (d.maze_id == 0).all() and list(d.n_steps) == [30, 40]
    # independent conversion: D4RL (i, j) -> world ((j + .5) - 2.5, 2.5 - (i + .5)) -> u=(x+2.5)/12, v=(y+2.5)/12
    def ref(ij):
        x, y = ij[:, 1] + 0.5 - 2.5, 2.5 - (ij[:, 0] + 0.5)
        return np.stack([(x + 2.5) / 12, (y + 2.5) / 12], 1)

    np.testing.assert_allclose(d.pos[0], ref(resample(seg1, 8)), atol=1e-6)
    np.testing.assert_allclose(d.pos[1], ref(resample(seg2, 8)), atol=1e-6)
    np.testing.assert_allclose(d.start, d.pos[:, 0])
    np.testing.assert_allclose(d.goal, d.pos[:, -1])
    with h5py.File(tmp_path / "bad.hdf5", "w") as f:
        f["observations"] = obs
    with pytest.raises(MazeDataError, match="infos/goal"):
        load_maze2d_hdf5(tmp_path / "bad.hdf5", "umaze")


def test_minari_loader(tmp_path):
    m = get_maze("medium")
    root = tmp_path / "pointmaze-medium-v2"
    (root / "data").mkdir(parents=True)
    rng = np.random.default_rng(0)
    segs = []
    with h5py.File(root / "data" / "main_data.hdf5", "w") as f:
        for e in range(2):
            a = m.cell_center_norm(np.array([1, 1]))
            # world-frame straight segment between two cell centres, goal = its end
            p0, p1 = np.array([-2.0, 2.0]), np.array([-2.0, 2.0]) + rng.uniform(-0.3, 0.3, 2)
            L = 25 + e
            pos = np.linspace(p0, p1, L + 1)
            segs.append(pos)
            g = f.create_group(f"episode_{e}")
            o = g.create_group("observations")
            o["observation"] = np.concatenate([pos, np.zeros_like(pos)], 1)
            o["achieved_goal"] = pos
            o["desired_goal"] = np.tile(p1, (L + 1, 1))
            g["actions"] = np.zeros((L, 2))
            g["rewards"] = np.zeros(L)
            g["terminations"] = np.zeros(L, bool)
            g["truncations"] = np.zeros(L, bool)
            g.create_group("infos")
    (root / "data" / "metadata.json").write_text(json.dumps({"dataset_id": "D4RL/pointmaze/medium-v2"}))
    d = load_minari(root, "medium", T=16)
    assert d.N == 2 and (d.maze_id == 1).all()
    for k in range(2):
        np.testing.assert_allclose(d.pos[k], to_norm(resample(segs[k], 16), get_maze("medium")), atol=1e-6)
    with pytest.raises(MazeDataError, match="main_data.hdf5"):
        load_minari(tmp_path / "nothing", "medium")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A real (tiny) PointMaze data set: 4 train / 2 eval trajectories per maze, T=32, + keyframes."""
    from maze.generate import main as generate
    from maze.prepare_keyframes import main as prepare

    root = tmp_path_factory.mktemp("mz")
    cfg = load_config(MazeConfig, None, [f"data.root={root}", "data.T=32", "data.n_train_per_maze=4", "data.n_eval_per_maze=2",
                                          "keyframes.k_min=4", "keyframes.n_levels=3"])
    torch.set_num_threads(1)
    generate(cfg)
    prepare(cfg)
    return root, cfg


def test_generated_data_stays_out_of_walls(tiny_data):
    root, cfg = tiny_data
    meta = json.loads((root / "meta.json").read_text())
    assert meta["T"] == 32 and meta["G"] == 12 and meta["maze_names"] == ["umaze", "medium", "large"]
    for split, n in (("train", 12), ("eval", 6)):
        d = load_split(root, split)
        assert d.N == n and np.bincount(d.maze_id, minlength=3).tolist() == [n // 3] * 3
        np.testing.assert_array_equal(d.start, d.pos[:, 0])
        np.testing.assert_array_equal(d.goal, d.pos[:, -1])
        # brute-force clearance: distance from every point to every wall box >= agent radius
        r = 0.1 / 12
        for p, k in zip(d.pos, d.maze_id):
            walls = np.argwhere(d.occ[k] > 0.5)
            lo_u, lo_v = walls[:, 1] / 12, walls[:, 0] / 12
            du = np.maximum(np.maximum(lo_u[None] - p[:, :1], p[:, :1] - lo_u[None] - 1 / 12), 0)
            dv = np.maximum(np.maximum(lo_v[None] - p[:, 1:], p[:, 1:] - lo_v[None] - 1 / 12), 0)
            assert np.hypot(du, dv).min() >= r
    tr, ev = load_split(root, "train"), load_split(root, "eval")
    assert not np.allclose(tr.pos[:2], ev.pos[:2])  # different seeds


def test_keyframes_file(tiny_data):
    from interpdiff.selection import dp_select, segment_costs

    root, cfg = tiny_data
    d = load_split(root, "train", keyframes=True)
    assert d.budgets == [4, 11, 32]  # round(4 * 8 ** 0.5) and d.feat_source == "true_cost"
    m = torch.from_numpy(d.kp_mask_levels)
    check_nested(m, d.budgets)
    # level 0 is the exact DP optimum for the SNR-weighted cost
    cost = segment_costs(torch.from_numpy(d.pos), scale=d.cost_scale)
    idx, _ = dp_select(cost, 4)
    assert torch.equal(m[:, 0].nonzero()[:, 1].view(-1, 4), idx)
    # kp_feat by hand for sample 0, level 0
    t = idx[0].tolist()
    f = d.kp_feat[0, 0]
    for a, tk in enumerate(t):
        prev = t[a - 1] if a > 0 else tk
        nxt = t[a + 1] if a + 1 < len(t) else tk
        exp = [(tk - prev) / 32, (nxt - tk) / 32, tk / 31,
               float(cost[0, prev, tk]) if prev < tk else 0.0, float(cost[0, tk, nxt]) if nxt > tk else 0.0]
        np.testing.assert_allclose(f[tk], exp, rtol=1e-5, atol=1e-9)
    off = np.ones(32, bool)
    off[t] = False
    assert (f[off] == 0).all()
    # a stale keyframe file is refused
    d2 = load_split(root, "eval", keyframes=False)
    d2.pos[0, 1] += 0.01
    save_split(root, "eval", d2)
    with pytest.raises(MazeDataError, match="checksum"):
        load_split(root, "eval")
