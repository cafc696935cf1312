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


@pytest.mark.parametrize("trainer", ["maze.train_phase1", "maze.train_phase2"])
def test_trainers_refuse_keyframes_made_with_other_budgets(tiny_data, tmp_path, trainer):
    """keyframes_train.npz made with k_min=4, n_levels=3 ([4, 11, 32] at T=32); a trainer run with
    k_min=6, n_levels=4 ([6, 10, 18, 32]) would train on the file's levels while the config (and
    every later stage) says otherwise: refused before anything is written, naming the file, both
    budget lists and the fix. The same budgets given explicitly pass the check."""
    import importlib

    from maze.data import check_keyframe_budgets

    root, _ = tiny_data
    main = importlib.import_module(trainer).main
    run = tmp_path / "run"
    args = [f"data.root={root}", "data.T=32", f"phase1.run_dir={run}", f"phase2.run_dir={run}",
            "phase1.optim.steps=1", "phase2.optim.steps=1", "phase1.optim.batch_size=2", "phase2.optim.batch_size=2",
            "phase1.feat_diffs=none", f"dphi.run_dir={tmp_path / 'no_dphi'}", f"selector.run_dir={tmp_path / 'no_sel'}"]
    cfg = load_config(MazeConfig, None, args + ["keyframes.k_min=6", "keyframes.n_levels=4"])
    with pytest.raises(MazeDataError) as e:
        main(cfg)
    msg = str(e.value)
    assert "keyframes_train.npz" in msg and "[4, 11, 32]" in msg and "[6, 10, 18, 32]" in msg, msg
    assert "keyframes.k_min=4" in msg and "keyframes.n_levels=3" in msg, msg  # the settings stored in the file
    assert "python -m maze.prepare_keyframes" in msg, msg
    assert not run.exists()
    same = load_config(MazeConfig, None, args + ["keyframes.budgets=[4,11,32]"])
    assert check_keyframe_budgets(load_split(root, "train"), same.keyframes, root) == [4, 11, 32]


def _corrupt_split(path, how):
    d = _split()
    arrays = {"pos": d.pos, "maze_id": d.maze_id, "start": d.start, "goal": d.goal, "occ": d.occ, "sdf": d.sdf,
              "maze_names": np.array(d.maze_names), "n_steps": d.n_steps}
    if how == "truncated":
        np.savez(path, **arrays)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(4000))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "npy":
        np.save(path.with_suffix(".tmp.npy"), d.pos)
        path.write_bytes(path.with_suffix(".tmp.npy").read_bytes())
    else:
        key, value = {
            "object": ("maze_id", np.array([1, "a", None], dtype=object)),
            "occ_shape": ("occ", d.occ[:, :, :10]),
            "occ_ndim": ("occ", d.occ[0]),
            "pos_ndim": ("pos", d.pos[0, :, 0]),
            "pos_str": ("pos", d.pos.astype(str)),
            "names_num": ("maze_names", np.arange(3)),
            "n_steps": ("n_steps", d.n_steps[:2]),
        }[how]
        arrays[key] = value
        if how == "occ_shape":
            arrays["sdf"] = d.sdf[:, :, :10]
        np.savez(path, **arrays)


@pytest.mark.parametrize("how,match", [
    ("truncated", r"not a readable \.npz file .*expected an \.npz archive"),
    ("garbage", r"not a readable \.npz file .*pickled"),
    ("empty", r"not a readable \.npz file \(EOFError"),
    ("npy", r"holds a single \.npy array \[5, 16, 2\], expected an \.npz archive"),
    ("object", r"array 'maze_id' cannot be read .*no pickled objects"),
    ("occ_shape", r"occ must be \[M=3, G, G\] \(one square grid per maze name\), got \[3, 12, 10\]"),
    ("occ_ndim", r"array 'occ' has shape \[12, 12\], expected float32 \[M, G, G\]"),
    ("pos_ndim", r"array 'pos' has shape \[16\], expected float32 \[N, T, 2\]"),
    ("pos_str", r"array 'pos' has dtype <U\d+, expected float32 \[N, T, 2\]"),
    ("names_num", r"array 'maze_names' is int64 \[3\], expected strings \[M\]"),
    ("n_steps", r"n_steps must be \[N=5\], got \[2\]"),
])
def test_corrupt_split_files_name_the_file_and_array(tmp_path, how, match):
    """Every broken split file is a MazeDataError naming the file and what was expected (numpy's
    own BadZipFile / EOFError / 'pickled data' / 'Object arrays' errors named neither, and a
    non-square occ only failed later inside MazeEncoder)."""
    _corrupt_split(tmp_path / "train.npz", how)
    with pytest.raises(MazeDataError, match=match) as e:
        load_split(tmp_path, "train")
    assert str(tmp_path / "train.npz") in str(e.value)


@pytest.mark.parametrize("how,match", [
    ("truncated", r"keyframes_train\.npz' is not a readable \.npz file.*maze\.prepare_keyframes"),
    ("kp_feat", r"keyframes_train\.npz: kp_feat must be \[N=5, S=2, T=16, 5\], got \[5, 2, 16, 3\]"),
    ("cost_scale", r"keyframes_train\.npz': array 'cost_scale' is float64 \[2\], expected one number"),
    ("budgets", r"keyframes_train\.npz': array 'budgets' has shape \[\], expected int64 \[S\]"),
])
def test_corrupt_keyframe_files_name_the_file_and_array(tmp_path, how, match):
    from maze.data import save_keyframes

    d = _split()
    save_split(tmp_path, "train", d)
    masks = np.zeros((5, 2, 16), bool)
    masks[:, :, [0, 15]] = True
    masks[:, 1] = True
    feat = np.zeros((5, 2, 16, 5), np.float32)
    path = save_keyframes(tmp_path, "train", masks, [2, 16], feat, 1.0, "true_cost", d.pos, config={"k_min": 2})
    with np.load(path) as z:
        arrays = dict(z)
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        arrays[how] = {"kp_feat": feat[..., :3], "cost_scale": np.ones(2), "budgets": np.int64(2)}[how]
        np.savez(path, **arrays)
    with pytest.raises(MazeDataError, match=match):
        load_split(tmp_path, "train")


def _write_maze2d(path, obs, goal, timeouts, terminals=None):
    with h5py.File(path, "w") as f:
        f["observations"] = obs
        f["timeouts"] = timeouts
        f["infos/goal"] = goal
        if terminals is not None:
            f["terminals"] = terminals


def test_maze2d_hdf5_bad_files_name_the_file_and_dataset(tmp_path):
    """A garbage file, datasets of other lengths/shapes and NaN observations (which used to give
    N=0 silently: no segment 'reached' its goal) are MazeDataErrors naming the file and dataset."""
    obs, goal, timeouts, _, _ = _d4rl_stream()
    obs4 = np.concatenate([obs, np.zeros_like(obs)], 1)
    p = tmp_path / "m.hdf5"
    p.write_bytes(b"not an hdf5 file" * 10)
    with pytest.raises(MazeDataError, match=r"m\.hdf5' is not a readable HDF5 file"):
        load_maze2d_hdf5(p, "umaze")
    _write_maze2d(p, obs4, goal, timeouts[:-5])
    with pytest.raises(MazeDataError, match=r"m\.hdf5': dataset 'timeouts' has 85 rows but 'observations' has 90"):
        load_maze2d_hdf5(p, "umaze")
    _write_maze2d(p, obs4, goal, timeouts, terminals=np.zeros(3, bool))
    with pytest.raises(MazeDataError, match=r"dataset 'terminals' has 3 rows"):
        load_maze2d_hdf5(p, "umaze")
    _write_maze2d(p, obs4[:, 0], goal, timeouts)
    with pytest.raises(MazeDataError, match=r"dataset 'observations' is float64 \[90\], expected numbers \[N, >= 2\]"):
        load_maze2d_hdf5(p, "umaze")
    _write_maze2d(p, np.full_like(obs4, np.nan), goal, timeouts)
    with pytest.raises(MazeDataError, match=r"m\.hdf5': observations\[:, :2\] holds non-finite .* in 90 of 90 rows"):
        load_maze2d_hdf5(p, "umaze")
    _write_maze2d(p, obs4, goal, timeouts)
    with pytest.raises(MazeDataError, match=r"none of its 3 constant-goal segments .*goal_tol=0.001"):
        load_maze2d_hdf5(p, "umaze", T=8, goal_tol=0.001, min_steps=1000)
    assert load_maze2d_hdf5(p, "umaze", T=8, goal_tol=0.1).N == 2
    (tmp_path / "mn" / "data").mkdir(parents=True)
    (tmp_path / "mn" / "data" / "main_data.hdf5").write_bytes(b"\x00" * 64)
    with pytest.raises(MazeDataError, match=r"main_data\.hdf5' is not a readable HDF5 file"):
        load_minari(tmp_path / "mn", "medium")
