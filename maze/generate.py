"""Generate PointMaze goal-reaching data with a waypoint controller.

    python -m maze.generate --config configs/maze/small.yaml
    python -m maze.generate --config configs/maze/full.yaml data.root=data/maze/full

For each maze (``PointMaze_UMaze-v3``, ``PointMaze_Medium-v3``, ``PointMaze_Large-v3`` from
gymnasium-robotics, MuJoCo, headless) and each split, one continuing episode is driven the way
the D4RL maze2d data sets were made:

1. a goal cell is drawn uniformly among the free cells other than the agent's, the goal point is
   its centre plus uniform noise of ``goal_noise`` cells per axis;
2. the 4-connected shortest cell path on the unified grid (``maze.mazes.shortest_path``, the
   same path ``maze.encoders.path_prior`` reconstructs from the condition) gives waypoints at
   the cell centres, the last one being the goal point;
3. PD control toward the current waypoint, ``a = clip(p_gain (w - x) + d_gain v + N(0,
   action_noise^2), -1, 1)``; the waypoint advances within ``waypoint_tol`` of it;
4. the segment ends when the agent is within ``goal_tol`` of the goal and slower than
   ``stop_speed`` (it settles at the goal); then a new goal is drawn from where the agent is.
   Settling makes every segment start from (near) rest, like the first one of an episode, so
   a segment's timing depends on its start, goal and maze only (plus the action noise), which
   is what a condition-only selector can learn; ``stop_speed = inf`` gives maze2d-style
   fly-through goals.

Each segment (the agent's positions from goal assignment to arrival) is resampled uniformly in
time to ``T`` frames and converted to the normalised frame. Segments shorter than
``min_segment_steps`` or running past ``max_segment_steps`` (the env is then reset) are dropped;
so is any segment whose stored points come closer than the agent's radius to a wall (checked on
the unified occupancy grid); the counts go to ``meta.json``. The train split uses seed ``seed``,
the eval split ``seed + eval_seed_offset`` (different goals and noise, same layouts).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from interpdiff.config import parse_cli, to_dict
from interpdiff.io import atomic_write_text
from maze.config import DataConfig, MazeConfig
from maze.data import FORMAT, VERSION, MazeSplit, concat_splits, resample, save_split, segments_to_split
from maze.mazes import Maze, collides, get_maze, shortest_path, to_norm, to_world, unified_size


def make_env(maze: Maze):
    import gymnasium as gym
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)
    # unwrapped: the controller owns goals and episode length (no TimeLimit truncation)
    return gym.make(maze.env_id, continuing_task=True, reset_target=False, max_episode_steps=10**9).unwrapped


def _cell_center_world(maze: Maze, rc) -> np.ndarray:
    s = maze.scaling
    return np.array([(rc[1] + 0.5) * s - maze.W * s / 2, maze.H * s / 2 - (rc[0] + 0.5) * s])


def _world_cell(maze: Maze, xy) -> tuple[int, int]:
    s = maze.scaling
    i = int(np.floor((maze.H * s / 2 - xy[1]) / s))
    j = int(np.floor((xy[0] + maze.W * s / 2) / s))
    return min(max(i, 0), maze.H - 1), min(max(j, 0), maze.W - 1)


class WaypointController:
    """PD control toward cell-centre waypoints of the shortest grid path (module doc, steps 2-3)."""

    def __init__(self, maze: Maze, cfg: DataConfig, rng: np.random.Generator):
        self.maze, self.cfg, self.rng = maze, cfg, rng
        self.waypoints: list[np.ndarray] = []

    def plan(self, pos_world: np.ndarray, goal_world: np.ndarray) -> None:
        """Shortest path on the unified grid (the one ``path_prior`` uses, same tie-breaking)."""
        m = self.maze
        path = shortest_path(m, m.cell_of(to_norm(pos_world, m)), m.cell_of(to_norm(goal_world, m)))
        self.waypoints = [to_world(m.cell_center_norm(np.array(rc)), m) for rc in path[1:-1]] + [goal_world]

    def act(self, pos: np.ndarray, vel: np.ndarray) -> np.ndarray:
        while len(self.waypoints) > 1 and np.linalg.norm(self.waypoints[0] - pos) < self.cfg.waypoint_tol:
            self.waypoints.pop(0)
        a = self.cfg.p_gain * (self.waypoints[0] - pos) + self.cfg.d_gain * vel
        a = a + self.rng.normal(0.0, self.cfg.action_noise, size=2)
        return np.clip(a, -1.0, 1.0)


def rollout_segments(maze: Maze, cfg: DataConfig, n_segments: int, seed: int, progress=None) -> tuple[list[np.ndarray], dict]:
    """Drive one PointMaze env until ``n_segments`` accepted segments (world frame ``[L, 2]``)."""
    rng = np.random.default_rng(seed)
    env = make_env(maze)
    free = [tuple(rc) for rc in np.argwhere(maze.grid_H_W == 0)]
    ctrl = WaypointController(maze, cfg, rng)
    unified = get_maze(maze.name, G=maze.G, flip_y=maze.flip_y)
    r_norm = unified.radius_norm(cfg.agent_radius)
    stats = {"accepted": 0, "too_short": 0, "timeout": 0, "collision": 0, "env_steps": 0}
    segs: list[np.ndarray] = []

    def reset():
        rc = free[rng.integers(len(free))]
        obs, _ = env.reset(seed=int(rng.integers(2**31)), options={"reset_cell": np.array(rc)})
        return obs["observation"]

    obs = reset()
    n_goals = 0
    while len(segs) < n_segments:
        if n_goals >= cfg.goals_per_episode:
            obs, n_goals = reset(), 0
        here = _world_cell(maze, obs[:2])
        cands = [rc for rc in free if rc != here]
        gc = cands[rng.integers(len(cands))]
        goal = _cell_center_world(maze, gc) + rng.uniform(-cfg.goal_noise, cfg.goal_noise, size=2) * maze.scaling
        env.goal = goal.copy()
        env.update_target_site_pos()
        ctrl.plan(obs[:2], goal)
        traj = [obs[:2].copy()]
        reached = False
        for _ in range(cfg.max_segment_steps):
            o, *_ = env.step(ctrl.act(obs[:2], obs[2:4]))
            obs = o["observation"]
            traj.append(obs[:2].copy())
            if np.linalg.norm(obs[:2] - goal) <= cfg.goal_tol and np.linalg.norm(obs[2:4]) <= cfg.stop_speed:
                reached = True
                break
        stats["env_steps"] += len(traj) - 1
        n_goals += 1
        if not reached:
            stats["timeout"] += 1
            obs, n_goals = reset(), 0
            continue
        seg = np.asarray(traj)
        if len(seg) < cfg.min_segment_steps:
            stats["too_short"] += 1
            continue
        stored = resample(to_norm(seg, unified), cfg.T)
        if bool(collides(stored, unified, r_norm).any()):
            stats["collision"] += 1
            continue
        segs.append(seg)
        stats["accepted"] += 1
        if progress is not None:
            progress.update(1)
    env.close()
    return segs, stats


def generate_split(cfg: DataConfig, split: str) -> tuple[MazeSplit, dict]:
    from tqdm import tqdm

    n = cfg.n_train_per_maze if split == "train" else cfg.n_eval_per_maze
    base = cfg.seed if split == "train" else cfg.seed + cfg.eval_seed_offset
    G = unified_size(cfg.mazes)
    parts, stats = [], {}
    with tqdm(total=n * len(cfg.mazes), desc=f"maze.generate {split}", unit="seg", mininterval=2.0) as bar:
        for k, name in enumerate(cfg.mazes):
            maze = get_maze(name, G=G, flip_y=cfg.flip_y)
            segs, st = rollout_segments(maze, cfg, n, seed=base * 1000 + k, progress=bar)
            stats[name] = st
            parts.append(segments_to_split(segs, [name] * len(segs), cfg.T, cfg.mazes, cfg.flip_y))
    return concat_splits(parts), stats


def main(cfg: MazeConfig) -> dict:
    from pathlib import Path

    dc = cfg.data
    root = Path(dc.root)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    splits = {}
    for split in ("train", "eval"):
        data, stats = generate_split(dc, split)
        mazes = [get_maze(n, G=data.G, flip_y=dc.flip_y) for n in data.maze_names]
        bad = sum(bool(collides(p, mazes[m], mazes[m].radius_norm(dc.agent_radius)).any()) for p, m in zip(data.pos, data.maze_id))
        if bad:
            raise RuntimeError(f"maze.generate: {bad} stored {split} trajectories touch a wall (bug: they were filtered)")
        save_split(root, split, data)
        splits[split] = {"N": data.N, "per_maze": stats, "mean_steps": float(data.n_steps.mean())}
        print(f"[maze.generate] {split}: {data.N} trajectories -> {root / (split + '.npz')}  {json.dumps(stats)}")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "T": dc.T,
        "G": unified_size(dc.mazes),
        "maze_names": list(dc.mazes),
        "flip_y": dc.flip_y,
        "agent_radius": dc.agent_radius / unified_size(dc.mazes),
        "generation": to_dict(dc),
        "splits": splits,
        "seconds": round(time.time() - t0, 1),
    }
    atomic_write_text(root / "meta.json", json.dumps(meta, indent=2))
    return meta


if __name__ == "__main__":
    import torch

    from maze.common import run_cli

    torch.set_num_threads(1)
    run_cli("maze.generate", lambda: main(parse_cli(MazeConfig, sys.argv[1:])))
