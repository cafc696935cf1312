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
        config_json    str     []            the ``keyframes`` settings that made the file (JSON)

``load_split(root, split)`` returns a ``MazeSplit`` with these fields (keyframe fields ``None``
when no keyframe file exists). A file that is not such an archive (truncated, empty, garbage,
pickled objects) or holds an array of another dtype or shape is a ``MazeDataError`` naming the
file, the array and what was expected. ``check_keyframe_budgets`` refuses a keyframe file made
with other budgets than the run's ``keyframes`` config (the trainers call it).

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
    keyframes_config: dict | None = None  # the keyframes settings stored in the keyframe file ({} = not stored)

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
        if self.pos.ndim != 3 or self.pos.shape[2] != 2:
            raise MazeDataError(f"{where}: pos must be [N, T, 2], got {list(self.pos.shape)}")
        N, T = self.pos.shape[:2]
        M = len(self.maze_names)
        occ = self.occ.shape
        checks = [
            (T >= 2, f"pos must hold T >= 2 frames, got {list(self.pos.shape)}"),
            (self.maze_id.shape == (N,), f"maze_id must be [N={N}], got {list(self.maze_id.shape)}"),
            (self.start.shape == (N, 2), f"start must be [N={N}, 2], got {list(self.start.shape)}"),
            (self.goal.shape == (N, 2), f"goal must be [N={N}, 2], got {list(self.goal.shape)}"),
            (self.n_steps is None or self.n_steps.shape == (N,),
             f"n_steps must be [N={N}], got {list(getattr(self.n_steps, 'shape', []))}"),
            (M >= 1, "maze_names is empty (expected the names of the M >= 1 mazes)"),
            (len(occ) == 3 and occ[0] == M and occ[1] == occ[2] and occ[1] >= 1,
             f"occ must be [M={M}, G, G] (one square grid per maze name), got {list(occ)}"),
            (self.sdf.shape == occ, f"sdf {list(self.sdf.shape)} must match occ {list(occ)}"),
            (N == 0 or (0 <= self.maze_id.min() and self.maze_id.max() < M), f"maze_id must lie in [0, {M})"),
            (bool(np.isfinite(self.pos).all()), "pos holds non-finite values"),
        ]
        if self.kp_mask_levels is not None:
            S = len(self.budgets or [])
            checks += [
                (S >= 1, f"budgets must list S >= 1 keyframe budgets, got {self.budgets}"),
                (self.kp_mask_levels.shape == (N, S, T),
                 f"kp_mask_levels must be [N={N}, S={S}, T={T}], got {list(self.kp_mask_levels.shape)}"),
                (self.kp_feat is not None and self.kp_feat.shape == (N, S, T, KP_FEAT_DIM),
                 f"kp_feat must be [N={N}, S={S}, T={T}, {KP_FEAT_DIM}], got {list(getattr(self.kp_feat, 'shape', []))}"),
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
            pick(self.kp_feat), self.cost_scale, self.feat_source, self.keyframes_config,
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


SPLIT_ARRAYS = ("pos", "maze_id", "start", "goal", "occ", "sdf", "maze_names")
KEYFRAME_ARRAYS = ("kp_mask_levels", "budgets", "kp_feat", "cost_scale", "feat_source", "pos_checksum")
_REMAKE_SPLIT = "regenerate it with `python -m maze.generate` (same config)"
_REMAKE_KEYFRAMES = "rerun `python -m maze.prepare_keyframes` with the same config"


def _read_npz(path: Path, required: Sequence[str], optional: Sequence[str], remake: str) -> dict[str, np.ndarray]:
    """All ``required`` (+ present ``optional``) arrays of an ``.npz``, read now; any way the file
    can be broken (empty, truncated, not a zip, pickled objects, a bad member) is a
    ``MazeDataError`` naming the file (and the array)."""
    import zipfile
    import zlib

    bad = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, RuntimeError, TypeError)
    expect = f"expected an .npz archive (np.savez) of arrays {list(required)}"
    try:
        z = np.load(path, allow_pickle=False)
    except bad as e:
        raise MazeDataError(f"{str(path)!r} is not a readable .npz file ({type(e).__name__}: {e}); {expect}; "
                            f"{remake}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise MazeDataError(f"{str(path)!r} holds a single .npy array {list(np.shape(z))}, {expect}; {remake}")
    out = {}
    with z:
        for key in [*required, *optional]:
            if key not in z.files:
                if key in required:
                    raise MazeDataError(f"{str(path)!r} lacks array {key!r} (has {sorted(z.files)}); {remake}")
                continue
            try:
                out[key] = z[key]
            except bad as e:
                raise MazeDataError(f"{str(path)!r}: array {key!r} cannot be read ({type(e).__name__}: {e}); expected a "
                                    f"numeric or string array (no pickled objects); {remake}") from None
    return out


def _num(arrays: dict, key: str, path: Path, dtype, ndim: int | None = None, what: str = "") -> np.ndarray:
    """``arrays[key]`` as ``dtype``; a non-numeric array (strings, objects) or one with another
    number of dimensions is a ``MazeDataError`` naming the file, the array and the expectation."""
    a = arrays[key]
    want = f"{np.dtype(dtype).name} {what}".strip()
    if a.dtype.kind not in "biuf":
        raise MazeDataError(f"{str(path)!r}: array {key!r} has dtype {a.dtype}, expected {want}")
    if ndim is not None and a.ndim != ndim:
        raise MazeDataError(f"{str(path)!r}: array {key!r} has shape {list(a.shape)}, expected {want}")
    return a.astype(dtype)


def _scalar(arrays: dict, key: str, path: Path) -> float:
    a = arrays[key]
    if a.dtype.kind not in "biuf" or a.size != 1:
        raise MazeDataError(f"{str(path)!r}: array {key!r} is {a.dtype} {list(a.shape)}, expected one number")
    return float(a.reshape(()))


def _strings(arrays: dict, key: str, path: Path, ndim: int) -> np.ndarray:
    a = arrays[key]
    if a.dtype.kind not in "US" or a.ndim != ndim:
        raise MazeDataError(f"{str(path)!r}: array {key!r} is {a.dtype} {list(a.shape)}, expected "
                            f"{'a string' if ndim == 0 else 'strings [M]'}")
    return a.astype(str)


def load_split(root, split: str, keyframes: bool | None = None) -> MazeSplit:
    """Load ``<root>/<split>.npz`` (+ ``keyframes_<split>.npz`` if present, or required when
    ``keyframes=True``; ``keyframes=False`` skips it)."""
    path = _need(split_path(root, split), f"maze {split} split")
    z = _read_npz(path, SPLIT_ARRAYS, ("n_steps",), _REMAKE_SPLIT)
    data = MazeSplit(
        pos=_num(z, "pos", path, np.float32, 3, "[N, T, 2]"),
        maze_id=_num(z, "maze_id", path, np.int64, 1, "[N]"),
        start=_num(z, "start", path, np.float32, 2, "[N, 2]"),
        goal=_num(z, "goal", path, np.float32, 2, "[N, 2]"),
        occ=_num(z, "occ", path, np.float32, 3, "[M, G, G]"),
        sdf=_num(z, "sdf", path, np.float32, 3, "[M, G, G]"),
        maze_names=[str(n) for n in _strings(z, "maze_names", path, 1)],
        n_steps=_num(z, "n_steps", path, np.int64, 1, "[N]") if "n_steps" in z else None,
    )
    data.validate(str(path))
    kp = keyframes_path(root, split)
    if keyframes is True or (keyframes is None and kp.is_file()):
        _need(kp, f"keyframe file for split {split!r}")
        z = _read_npz(kp, KEYFRAME_ARRAYS, ("config_json",), _REMAKE_KEYFRAMES)
        data.kp_mask_levels = _num(z, "kp_mask_levels", kp, bool, 3, "[N, S, T]")
        data.budgets = [int(b) for b in _num(z, "budgets", kp, np.int64, 1, "[S]")]
        data.kp_feat = _num(z, "kp_feat", kp, np.float32, 4, f"[N, S, T, {KP_FEAT_DIM}]")
        data.cost_scale = _scalar(z, "cost_scale", kp)
        data.feat_source = str(_strings(z, "feat_source", kp, 0))
        chk = _scalar(z, "pos_checksum", kp)
        data.keyframes_config = {}
        if "config_json" in z:
            try:
                data.keyframes_config = json.loads(str(_strings(z, "config_json", kp, 0)))
            except ValueError as e:
                raise MazeDataError(f"{str(kp)!r}: array 'config_json' is not JSON ({e}); {_REMAKE_KEYFRAMES}") from None
        if not np.isclose(chk, float(data.pos.astype(np.float64).sum()), rtol=1e-9, atol=1e-6):
            raise MazeDataError(f"{str(kp)!r} was computed for other data than {str(path)!r} (pos checksum differs); rerun maze.prepare_keyframes")
        data.validate(str(kp))
    return data


def check_keyframe_budgets(data: MazeSplit, keyframes_cfg, root, split: str = "train") -> list[int]:
    """The budgets of ``data``'s keyframe file when they are the config's
    (``keyframes_cfg.resolved_budgets(T)``), else a ``MazeDataError`` naming the file, both budget
    lists (and the settings stored in the file) and the fix: a model trained on the file's levels
    while the config (and every later stage reading it) says otherwise would be silently wrong."""
    kp = keyframes_path(root, split)
    remake = ("rerun `python -m maze.prepare_keyframes` with the same config (the same --config files and "
              "keyframes.* overrides), or train with the keyframes settings the file was made with")
    try:
        want = keyframes_cfg.resolved_budgets(data.T)
    except ValueError as e:
        raise MazeDataError(f"{str(kp)!r} holds budgets {data.budgets} for T={data.T}, but the config's keyframes "
                            f"settings do not fit this T: {e}") from None
    if data.budgets != want:
        made = data.keyframes_config or {}
        made_txt = ", ".join(f"keyframes.{k}={made[k]}" for k in ("k_min", "n_levels", "budgets") if k in made)
        raise MazeDataError(
            f"{str(kp)!r} holds keyframes for budgets {data.budgets}" + (f" (made with {made_txt})" if made_txt else "")
            + f", but the config gives budgets {want} (keyframes.k_min={keyframes_cfg.k_min}, "
            f"keyframes.n_levels={keyframes_cfg.n_levels}, keyframes.budgets={list(keyframes_cfg.budgets)}, "
            f"T={data.T}); {remake}")
    return want


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
    A file that is not HDF5, datasets of other shapes or lengths, non-finite positions, or no
    goal-reaching segment at all are a ``MazeDataError`` naming the file and dataset.
    """
    p = Path(path)
    if not p.is_file():
        raise MazeDataError(f"maze2d file {str(p)!r} does not exist")
    if frame not in ("d4rl", "gymnasium"):
        raise MazeDataError(f"load_maze2d_hdf5: frame={frame!r}, expected 'd4rl' or 'gymnasium'")
    m = get_maze(maze)
    layout = "maze2d layout: observations [N, 4], actions, infos/goal [N, 2], timeouts [N], terminals [N]"
    with _open_hdf5(p, layout) as f:
        for key in ("observations", "infos/goal", "timeouts"):
            if key not in f:
                raise MazeDataError(f"{str(p)!r} lacks dataset {key!r} ({layout})")
        n = _h5_shape(f, "observations", p, layout, 2, min_cols=2)[0]
        _h5_shape(f, "infos/goal", p, layout, 2, min_cols=2, n=n)
        _h5_shape(f, "timeouts", p, layout, 1, n=n)
        if "terminals" in f:
            _h5_shape(f, "terminals", p, layout, 1, n=n)
        try:
            obs = np.asarray(f["observations"][:, :2], dtype=np.float64)
            goal = np.asarray(f["infos/goal"][:, :2], dtype=np.float64)
            ends = np.asarray(f["timeouts"][:], dtype=bool)
            if "terminals" in f:
                ends |= np.asarray(f["terminals"][:], dtype=bool)
        except (OSError, ValueError, TypeError) as e:
            raise MazeDataError(f"{str(p)!r}: cannot read its datasets ({type(e).__name__}: {e}); {layout}") from None
    for name, a in (("observations[:, :2]", obs), ("infos/goal", goal)):
        bad = ~np.isfinite(a).all(1)
        if bad.any():
            raise MazeDataError(f"{str(p)!r}: {name} holds non-finite (NaN/inf) values in {int(bad.sum())} of {len(a)} "
                                f"rows (first at row {int(np.flatnonzero(bad)[0])}); expected finite positions")
    conv = (lambda a: d4rl_to_world(a, m)) if frame == "d4rl" else (lambda a: a)  # noqa: E731
    obs_w, goal_w = conv(obs), conv(goal)
    segs = []
    spans = goal_segments(goal, ends)
    for a, b in spans:
        seg = obs_w[a : b + 1]
        if len(seg) >= min_steps and _reached(seg, goal_w[b], goal_tol):
            segs.append(seg)
    if not segs:
        raise MazeDataError(f"{str(p)!r}: none of its {len(spans)} constant-goal segments ({n} steps) is a goal-reaching "
                            f"one of >= min_steps={min_steps} steps ending within goal_tol={goal_tol} of its goal "
                            f"(maze={maze!r}, frame={frame!r}; check that they match the file)")
    return segments_to_split(segs, [maze] * len(segs), T, maze_names, flip_y)


def _open_hdf5(p: Path, layout: str):
    """``h5py.File(p, "r")``; a file that is not HDF5 (garbage, truncated) is a ``MazeDataError``."""
    import h5py

    try:
        return h5py.File(p, "r")
    except OSError as e:
        raise MazeDataError(f"{str(p)!r} is not a readable HDF5 file ({e}); expected the {layout}") from None


def _h5_shape(f, key: str, p: Path, layout: str, ndim: int, min_cols: int = 0, n: int | None = None) -> tuple:
    """The shape of dataset ``key``, checked: ``ndim`` dims, a numeric dtype, ``>= min_cols`` columns,
    ``n`` rows (when given, the length of ``observations``)."""
    import h5py

    d = f[key]
    if not isinstance(d, h5py.Dataset):
        raise MazeDataError(f"{str(p)!r}: {key!r} is a group, expected a dataset ({layout})")
    shape = tuple(d.shape or ())
    ok = len(shape) == ndim and d.dtype.kind in "biuf" and (ndim < 2 or shape[1] >= min_cols)
    if not ok:
        want = "[N]" if ndim == 1 else f"[N, >= {min_cols}]"
        raise MazeDataError(f"{str(p)!r}: dataset {key!r} is {d.dtype} {list(shape)}, expected numbers {want} ({layout})")
    if n is not None and shape[0] != n:
        raise MazeDataError(f"{str(p)!r}: dataset {key!r} has {shape[0]} rows but 'observations' has {n}; "
                            f"every dataset holds one row per step ({layout})")
    return shape


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
    with _open_hdf5(f_path, "Minari layout: episode_<k> groups") as f:
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
