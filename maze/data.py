"""Maze data sets: the one on-disk format, loaders for maze2d HDF5 / Minari, a torch Dataset.

On-disk format (a folder ``<root>``, e.g. ``data/maze/small/``)::

    meta.json             {"format": "interpdiff-maze", "version": 1, "T": 128, "G": 12,
                           "maze_names": [...], "flip_y": true, "agent_radius": <normalised>,
                           "generation": {...config...}, "splits": {"train": {...counts}, ...}}
    train.npz, eval.npz   one file per split (np.savez, no pickled objects):
        pos        float32 [N, T, 2]  positions in normalised [0,1]^2 (see maze.mazes), resampled
                                      uniformly in time to T frames from a goal-reaching segment
        maze_id    int64   [N]        index into maze_names / occ / sdf
        start      float32 [N, 2]     = pos[:, 0]
        goal       float32 [N, 2]     = pos[:, -1]
        n_steps    int64   [N]        simulator steps of the segment before resampling
        occ        float32 [M, G, G]  unified occupancy (1 = wall), indexed [row=v, col=u]
        sdf        float32 [M, G, G]  signed grid distance in cells (maze.mazes.sdf_from_occupancy)
        maze_names str     [M]
    keyframes_train.npz, keyframes_eval.npz   (python -m maze.prepare_keyframes; savez_compressed)
        kp_mask_levels bool    [N, S, T]     nested per-level DP masks (level s has budgets[s] frames)
        budgets        int64   [S]
        kp_feat        float32 [N, S, T, 5]  [left_gap, right_gap, t_norm, left_diff, right_diff]
                                             at keyframes of level s, zeros elsewhere
        cost_scale     float64 []            sum_t w(t)/2 used for the costs (KL proxy scale)
        feat_source    str     []            "true_cost" or "dphi:<checkpoint path>"
        pos_checksum   float64 []            sum of pos of the split (guards against a stale file)

``load_split(root, split)`` returns a ``MazeSplit`` with these fields (keyframe fields ``None``
when no keyframe file exists).

External formats (``load_maze2d_hdf5``, ``load_minari``) are cut into goal-reaching segments
(a segment ends where the commanded goal changes or the episode ends, and is kept when its
last position lies within ``goal_tol`` of its goal), resampled to ``T`` and converted to the
normalised frame, giving the same ``MazeSplit``.

- D4RL maze2d HDF5 (``maze2d-*.hdf5``): one flat stream with datasets ``observations [N, 4]``
  (qpos x, y, qvel x, y), ``actions [N, 2]``, ``rewards``, ``terminals``, ``timeouts [N]`` and
  ``infos/goal [N, 2]`` (plus ``infos/qpos``, ``infos/qvel``). Coordinates are D4RL's maze
  frame (``frame="d4rl"``: cell ``(i, j)`` at ``(i, j)``), converted with
  ``maze.mazes.d4rl_to_world``; pass ``frame="gymnasium"`` for files written in the
  gymnasium-robotics frame.
- Minari (``minari`` >= 0.4 on-disk layout, read directly with h5py, the ``minari`` package is not
  needed): ``<dataset>/data/main_data.hdf5`` holding one group ``episode_<k>`` per episode with
  ``observations`` (a group for dict observations: ``observation [L+1, 4]``,
  ``achieved_goal [L+1, 2]``, ``desired_goal [L+1, 2]``), ``actions [L, 2]``, ``rewards``,
  ``terminations``, ``truncations [L]`` and an ``infos`` group. PointMaze datasets
  (``D4RL/pointmaze/*``) are recorded in the gymnasium-robotics world frame.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from maze.mazes import AGENT_RADIUS, Maze, d4rl_to_world, get_maze, to_norm

FORMAT = "interpdiff-maze"
VERSION = 1
SPLITS = ("train", "eval")
KP_FEAT_DIM = 5


class MazeDataError(ValueError):
    """A data file is missing or does not hold what the format says."""


@dataclass
class MazeSplit:
    """One split in memory (numpy arrays; shapes as in the module docstring)."""

    pos: np.ndarray  # float32 [N, T, 2]
    maze_id: np.ndarray  # int64 [N]
    start: np.ndarray  # float32 [N, 2]
    goal: np.ndarray  # float32 [N, 2]
    occ: np.ndarray  # float32 [M, G, G]
    sdf: np.ndarray  # float32 [M, G, G]
    maze_names: list[str]
    n_steps: np.ndarray | None = None  # int64 [N]
    kp_mask_levels: np.ndarray | None = None  # bool [N, S, T]
    budgets: list[int] | None = None
    kp_feat: np.ndarray | None = None  # float32 [N, S, T, 5]
    cost_scale: float | None = None
    feat_source: str | None = None

    @property
    def N(self) -> int:
        return int(self.pos.shape[0])

    @property
    def T(self) -> int:
        return int(self.pos.shape[1])

    @property
    def G(self) -> int:
        return int(self.occ.shape[-1])

    def validate(self, where: str = "MazeSplit") -> "MazeSplit":
        N, T = self.pos.shape[:2]
        M = len(self.maze_names)
        checks = [
            (self.pos.ndim == 3 and self.pos.shape[2] == 2, f"pos must be [N, T, 2], got {self.pos.shape}"),
            (self.maze_id.shape == (N,), f"maze_id must be [N={N}], got {self.maze_id.shape}"),
            (self.start.shape == (N, 2) and self.goal.shape == (N, 2), "start/goal must be [N, 2]"),
            (self.occ.shape[0] == M and self.occ.ndim == 3, f"occ must be [M={M}, G, G], got {self.occ.shape}"),
            (self.sdf.shape == self.occ.shape, f"sdf {self.sdf.shape} must match occ {self.occ.shape}"),
            (N == 0 or (0 <= self.maze_id.min() and self.maze_id.max() < M), f"maze_id must lie in [0, {M})"),
            (bool(np.isfinite(self.pos).all()), "pos holds non-finite values"),
        ]
        if self.kp_mask_levels is not None:
            S = len(self.budgets or [])
            checks += [
                (self.kp_mask_levels.shape == (N, S, T), f"kp_mask_levels must be [N={N}, S={S}, T={T}], got {self.kp_mask_levels.shape}"),
                (self.kp_feat is not None and self.kp_feat.shape == (N, S, T, KP_FEAT_DIM), f"kp_feat must be [N, S, T, {KP_FEAT_DIM}]"),
            ]
        for ok, msg in checks:
            if not ok:
                raise MazeDataError(f"{where}: {msg}")
        return self

    def subset(self, idx) -> "MazeSplit":
        idx = np.asarray(idx)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        return MazeSplit(
            self.pos[idx], self.maze_id[idx], self.start[idx], self.goal[idx], self.occ, self.sdf,
            list(self.maze_names), pick(self.n_steps), pick(self.kp_mask_levels), self.budgets,
            pick(self.kp_feat), self.cost_scale, self.feat_source,
        )

    def tensors(self, idx=None, device=None) -> dict[str, torch.Tensor]:
        """Batch dict of tensors: ``pos_B_T_2, maze_id_B, start_B_2, goal_B_2, occ_B_G_G, sdf_B_G_G``
        (+ ``kp_mask_B_S_T, kp_feat_B_S_T_5`` when keyframes are loaded)."""
        idx = np.arange(self.N) if idx is None else np.asarray(idx)
        mid = self.maze_id[idx]
        out = {
            "pos": torch.from_numpy(np.ascontiguousarray(self.pos[idx])),
            "maze_id": torch.from_numpy(mid.astype(np.int64)),
            "start": torch.from_numpy(np.ascontiguousarray(self.start[idx])),
            "goal": torch.from_numpy(np.ascontiguousarray(self.goal[idx])),
            "occ": torch.from_numpy(self.occ[mid]),
            "sdf": torch.from_numpy(self.sdf[mid]),
        }
        if self.kp_mask_levels is not None:
            out["kp_mask"] = torch.from_numpy(self.kp_mask_levels[idx])
            out["kp_feat"] = torch.from_numpy(self.kp_feat[idx])
        return {k: v.to(device) for k, v in out.items()} if device is not None else out


class MazeDataset(torch.utils.data.Dataset):
    """Per-sample dicts of tensors (see ``MazeSplit.tensors``); default collate stacks them."""

    def __init__(self, split: MazeSplit):
        self.split = split

    def __len__(self) -> int:
        return self.split.N

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.split.tensors([i]).items()}


def iterate_batches(split: MazeSplit, batch_size: int, generator: torch.Generator | None = None, shuffle=True, drop_last=True):
    """Yield batch dicts for one pass over the split (shuffled with ``generator`` when ``shuffle``)."""
    order = torch.randperm(split.N, generator=generator).numpy() if shuffle else np.arange(split.N)
    stop = split.N - (split.N % batch_size if drop_last and split.N >= batch_size else 0)
    for b0 in range(0, stop, batch_size):
        yield split.tensors(order[b0 : b0 + batch_size])


# --------------------------------------------------------------------------- files
def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise MazeDataError(f"{what} {str(path)!r} does not exist (run `python -m maze.generate` / `python -m maze.prepare_keyframes` first)")
    return path


def read_meta(root: str | os.PathLike) -> dict:
    p = _need(Path(root) / "meta.json", "maze meta file")
    meta = json.loads(p.read_text())
    if meta.get("format") != FORMAT:
        raise MazeDataError(f"{str(p)!r}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def split_path(root, split: str) -> Path:
    if split not in SPLITS:
        raise MazeDataError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return Path(root) / f"{split}.npz"


def keyframes_path(root, split: str) -> Path:
    if split not in SPLITS:
        raise MazeDataError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    return Path(root) / f"keyframes_{split}.npz"


def _npz_bytes(arrays: dict, compressed: bool) -> bytes:
    import io

    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


def save_split(root, split: str, data: MazeSplit) -> Path:
    """Write ``<root>/<split>.npz`` atomically (the format of the module docstring)."""
    from interpdiff.io import atomic_write_bytes

    data.validate(f"save_split({split})")
    arrays = {
        "pos": data.pos.astype(np.float32),
        "maze_id": data.maze_id.astype(np.int64),
        "start": data.start.astype(np.float32),
        "goal": data.goal.astype(np.float32),
        "n_steps": (data.n_steps if data.n_steps is not None else np.zeros(data.N)).astype(np.int64),
        "occ": data.occ.astype(np.float32),
        "sdf": data.sdf.astype(np.float32),
        "maze_names": np.array(data.maze_names, dtype=str),
    }
    return atomic_write_bytes(split_path(root, split), _npz_bytes(arrays, compressed=False))


def save_keyframes(root, split: str, kp_mask_levels, budgets, kp_feat, cost_scale: float, feat_source: str, pos,
                   config: dict | None = None) -> Path:
    """``config``: the ``keyframes`` settings that made the file (stored as JSON; ``maze.demo``
    compares them to decide whether the file is stale)."""
    import json

    from interpdiff.io import atomic_write_bytes

    arrays = {
        "config_json": np.array(json.dumps(config if config is not None else {}, sort_keys=True), dtype=str),
        "kp_mask_levels": np.asarray(kp_mask_levels, dtype=bool),
        "budgets": np.asarray(budgets, dtype=np.int64),
        "kp_feat": np.asarray(kp_feat, dtype=np.float32),
        "cost_scale": np.float64(cost_scale),
        "feat_source": np.array(feat_source, dtype=str),
        "pos_checksum": np.float64(np.asarray(pos, dtype=np.float64).sum()),
    }
    return atomic_write_bytes(keyframes_path(root, split), _npz_bytes(arrays, compressed=True))


def _get(z, key: str, path: Path):
    if key not in z.files:
        raise MazeDataError(f"{str(path)!r} lacks array {key!r} (has {sorted(z.files)})")
    return z[key]


def load_split(root, split: str, keyframes: bool | None = None) -> MazeSplit:
    """Load ``<root>/<split>.npz`` (+ ``keyframes_<split>.npz`` if present, or required when
    ``keyframes=True``; ``keyframes=False`` skips it)."""
    path = _need(split_path(root, split), f"maze {split} split")
    with np.load(path, allow_pickle=False) as z:
        data = MazeSplit(
            pos=_get(z, "pos", path).astype(np.float32),
            maze_id=_get(z, "maze_id", path).astype(np.int64),
            start=_get(z, "start", path).astype(np.float32),
            goal=_get(z, "goal", path).astype(np.float32),
            occ=_get(z, "occ", path).astype(np.float32),
            sdf=_get(z, "sdf", path).astype(np.float32),
            maze_names=[str(s) for s in _get(z, "maze_names", path)],
            n_steps=z["n_steps"].astype(np.int64) if "n_steps" in z.files else None,
        )
    data.validate(str(path))
    kp = keyframes_path(root, split)
    if keyframes is True or (keyframes is None and kp.is_file()):
        _need(kp, f"keyframe file for split {split!r}")
        with np.load(kp, allow_pickle=False) as z:
            data.kp_mask_levels = _get(z, "kp_mask_levels", kp).astype(bool)
            data.budgets = [int(b) for b in _get(z, "budgets", kp)]
            data.kp_feat = _get(z, "kp_feat", kp).astype(np.float32)
            data.cost_scale = float(_get(z, "cost_scale", kp))
            data.feat_source = str(_get(z, "feat_source", kp))
            chk = float(_get(z, "pos_checksum", kp))
        if not np.isclose(chk, float(data.pos.astype(np.float64).sum()), rtol=1e-9, atol=1e-6):
            raise MazeDataError(f"{str(kp)!r} was computed for other data than {str(path)!r} (pos checksum differs); rerun maze.prepare_keyframes")
        data.validate(str(kp))
    return data


# --------------------------------------------------------------------------- segments
def resample(pos_L_2: np.ndarray, T: int) -> np.ndarray:
    """Linear resampling in time of an ``L``-step trajectory to ``T`` frames (first and last kept)."""
    pos = np.asarray(pos_L_2, dtype=np.float64)
    L = pos.shape[0]
    if L < 2:
        raise ValueError(f"resample: need at least 2 steps, got {L}")
    t = np.linspace(0, L - 1, T)
    lo = np.floor(t).astype(np.int64).clip(0, L - 2)
    w = (t - lo)[:, None]
    return pos[lo] * (1 - w) + pos[lo + 1] * w


def goal_segments(goal_L_2: np.ndarray, ends: np.ndarray | None = None) -> list[tuple[int, int]]:
    """``[(a, b)]`` index ranges (inclusive) of constant commanded goal, cut also after ``ends``."""
    goal = np.asarray(goal_L_2)
    L = len(goal)
    cut = np.zeros(L, dtype=bool)
    cut[1:] = np.any(np.abs(np.diff(goal, axis=0)) > 1e-9, axis=1)
    if ends is not None:
        e = np.asarray(ends, dtype=bool)
        cut[1:] |= e[:-1]
    starts = np.flatnonzero(cut).tolist()
    bounds = [0] + starts + [L]
    return [(a, b - 1) for a, b in zip(bounds, bounds[1:]) if b - 1 > a]


def segments_to_split(
    segs_world: Sequence[np.ndarray], maze_of_seg: Sequence[str], T: int, maze_names: Sequence[str], flip_y: bool = True
) -> MazeSplit:
    """World-frame segments (each ``[L, 2]``) of the named mazes -> a normalised ``MazeSplit``."""
    names = list(maze_names)
    G = max(max(get_maze(n).H, get_maze(n).W) for n in names)
    mazes = {n: get_maze(n, G=G, flip_y=flip_y) for n in names}
    pos = np.stack([resample(to_norm(s, mazes[m]), T) for s, m in zip(segs_world, maze_of_seg)]) if segs_world else np.zeros((0, T, 2))
    pos = pos.astype(np.float32)
    return MazeSplit(
        pos=pos,
        maze_id=np.array([names.index(m) for m in maze_of_seg], dtype=np.int64),
        start=pos[:, 0].copy(),
        goal=pos[:, -1].copy(),
        occ=np.stack([mazes[n].occ for n in names]),
        sdf=np.stack([mazes[n].sdf for n in names]),
        maze_names=names,
        n_steps=np.array([len(s) for s in segs_world], dtype=np.int64),
    ).validate("segments_to_split")


def _reached(seg_pos: np.ndarray, goal: np.ndarray, goal_tol: float) -> bool:
    return float(np.linalg.norm(seg_pos[-1] - goal)) <= goal_tol


def load_maze2d_hdf5(
    path, maze: str, T: int = 128, frame: str = "d4rl", goal_tol: float = 0.5, min_steps: int = 10,
    maze_names: Sequence[str] = ("umaze", "medium", "large"), flip_y: bool = True,
) -> MazeSplit:
    """Read a D4RL maze2d HDF5 file (layout in the module docstring) as a ``MazeSplit``.

    ``goal_tol`` is in world units (D4RL's controller switches goals within 0.5 of the target).
    """
    import h5py

    p = Path(path)
    if not p.is_file():
        raise MazeDataError(f"maze2d file {str(p)!r} does not exist")
    if frame not in ("d4rl", "gymnasium"):
        raise MazeDataError(f"load_maze2d_hdf5: frame={frame!r}, expected 'd4rl' or 'gymnasium'")
    m = get_maze(maze)
    with h5py.File(p, "r") as f:
        for key in ("observations", "infos/goal", "timeouts"):
            if key not in f:
                raise MazeDataError(f"{str(p)!r} lacks dataset {key!r} (maze2d layout: observations, actions, infos/goal, timeouts)")
        obs = np.asarray(f["observations"][:, :2], dtype=np.float64)
        goal = np.asarray(f["infos/goal"][:], dtype=np.float64)
        ends = np.asarray(f["timeouts"][:], dtype=bool)
        if "terminals" in f:
            ends |= np.asarray(f["terminals"][:], dtype=bool)
    conv = (lambda a: d4rl_to_world(a, m)) if frame == "d4rl" else (lambda a: a)  # noqa: E731
    obs_w, goal_w = conv(obs), conv(goal)
    segs = []
    for a, b in goal_segments(goal, ends):
        seg = obs_w[a : b + 1]
        if len(seg) >= min_steps and _reached(seg, goal_w[b], goal_tol):
            segs.append(seg)
    return segments_to_split(segs, [maze] * len(segs), T, maze_names, flip_y)


def _minari_file(path: Path) -> Path:
    for cand in (path, path / "data" / "main_data.hdf5", path / "main_data.hdf5"):
        if cand.is_file():
            return cand
    raise MazeDataError(f"minari dataset {str(path)!r}: no main_data.hdf5 (expected <dataset>/data/main_data.hdf5)")


def load_minari(
    path, maze: str, T: int = 128, goal_tol: float = 0.45, min_steps: int = 10,
    maze_names: Sequence[str] = ("umaze", "medium", "large"), flip_y: bool = True,
) -> MazeSplit:
    """Read a Minari PointMaze dataset folder (or its ``main_data.hdf5``) as a ``MazeSplit``.

    Segments: within each episode, cut where ``desired_goal`` changes; keep those ending within
    ``goal_tol`` (world units, PointMaze's success radius 0.45) of their goal.
    """
    import h5py

    f_path = _minari_file(Path(path))
    segs = []
    with h5py.File(f_path, "r") as f:
        eps = sorted((k for k in f.keys() if k.startswith("episode_")), key=lambda k: int(k.split("_")[1]))
        if not eps:
            raise MazeDataError(f"{str(f_path)!r} holds no 'episode_<k>' groups (Minari layout)")
        for k in eps:
            g = f[k]
            if "observations" not in g:
                raise MazeDataError(f"{str(f_path)!r}: {k} lacks 'observations'")
            o = g["observations"]
            if isinstance(o, h5py.Group):
                if "achieved_goal" not in o or "desired_goal" not in o:
                    raise MazeDataError(f"{str(f_path)!r}: {k}/observations lacks achieved_goal/desired_goal")
                pos = np.asarray(o["achieved_goal"][:], dtype=np.float64)
                goal = np.asarray(o["desired_goal"][:], dtype=np.float64)
            else:
                raise MazeDataError(f"{str(f_path)!r}: {k}/observations is not a dict group (PointMaze layout expected)")
            for a, b in goal_segments(goal):
                seg = pos[a : b + 1]
                if len(seg) >= min_steps and _reached(seg, goal[b], goal_tol):
                    segs.append(seg)
    return segments_to_split(segs, [maze] * len(segs), T, maze_names, flip_y)


def concat_splits(parts: Sequence[MazeSplit]) -> MazeSplit:
    """Concatenate splits sharing the same maze list."""
    names = parts[0].maze_names
    for p in parts[1:]:
        if p.maze_names != names:
            raise MazeDataError(f"concat_splits: maze lists differ: {names} vs {p.maze_names}")
    cat = lambda k: np.concatenate([getattr(p, k) for p in parts])  # noqa: E731
    return MazeSplit(
        cat("pos"), cat("maze_id"), cat("start"), cat("goal"), parts[0].occ, parts[0].sdf, list(names),
        cat("n_steps") if all(p.n_steps is not None for p in parts) else None,
    )


def agent_radius_norm(meta_or_G, scaling: float = 1.0) -> float:
    G = meta_or_G["G"] if isinstance(meta_or_G, dict) else int(meta_or_G)
    return AGENT_RADIUS / (G * scaling)


def maze_objects(split: MazeSplit, flip_y: bool = True) -> list[Maze]:
    """The ``Maze`` of each maze id of a split (same unified size)."""
    return [get_maze(n, G=split.G, flip_y=flip_y) for n in split.maze_names]
