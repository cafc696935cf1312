"""Evaluate the maze planners: open loop, closed loop in PointMaze, sampling cost.

    python -m maze.evaluate --config configs/maze/small.yaml --config configs/maze/small_model.yaml
    python -m maze.evaluate --config configs/maze/full.yaml --config configs/maze/full_model.yaml eval.episodes=100

Reads the checkpoints under the stage run folders (``phase1.run_dir``, ``phase2.run_dir``,
``baseline.run_dir``, ``dphi.run_dir``, ``selector.run_dir``) and writes
``<eval.run_dir>/eval.json`` and ``<eval.run_dir>/eval_samples.npz`` (plans for the figures).

**Open loop** (``eval.n_open_loop`` eval-split trajectories, round-robin over mazes; positions in the
normalised frame, distances reported in world units where stated):

- methods: ``interp`` (phase-1 keyframes + linear interpolation), ``refined`` (two-phase),
  ``full`` (baseline), the two-phase pipeline in **oracle** mode (ground-truth keyframes at the
  same indices), the two-phase pipeline with *uniform* indices (``*_uniform``, when the
  selector is the index source) and the ground-truth data as a reference row;
- ``collision``: fraction of plans with at least one point closer than the agent radius
  (``eval.agent_radius``, world) to a wall; ``collision_pts``: fraction of points;
- ``keyframe_collision``: fraction of two-phase plans with a phase-1 keyframe within the agent
  radius of a wall (a lower bound of the refined collision rate: keyframes stay clamped);
- ``crossings``: fraction of plans with a segment between consecutive points that passes
  through a wall (radius 0, checked every 0.1 cell along the segment,
  ``maze.mazes.segment_crosses_wall``), ``crossings_per_plan``;
- ``mse``: ``mean_t ||x_t - x*_t||^2`` to the ground truth (normalised units);
- ``goal_err``: ``||x_{T-1} - goal||`` (world);
- ``len_ratio``: plan length / shortest path length, the latter the polyline start -> centres of
  the 4-connected shortest cell path -> goal (``maze.mazes.shortest_path``);
- **per level** ``s = 0..S-2``: ``interp_s`` is the sampler's state ``x_s`` (normal) or
  ``I(x*, M_s)`` (oracle, teacher-forced), ``refined_s`` is the refiner's ``x0_hat`` from it.
  The oracle rows test the refiner exactly as trained: refined must not be worse than interp.

**Closed loop**: per maze, ``eval.episodes`` episodes of ``PointMaze_*-v3`` (continuing task, the
standard horizons U-maze 300, Medium 600, Large 800); the start and goal come from the env's
own reset (``seed = eval.seed + episode``), every method plans once from them and a PD controller
follows the plan: target = the first plan point farther than ``eval.lookahead`` from the agent
past the last reached one (the goal once the plan is used up), ``a = clip(kp (target - x) - kd
v, -1, 1)``. Success: the agent came within ``eval.success_dist`` (0.45, PointMaze's threshold)
of the goal. Return ``R`` = the env's sparse reward summed over the horizon (steps spent at the
goal), normalised D4RL-style ``100 (R - R_random) / (R_expert - R_random)`` with ``R_random``
(uniform random actions) and ``R_expert`` (part 1's waypoint controller on the shortest cell path,
without action noise) measured on the same episodes.

**Step-distilled methods** (``maze.distill``; listed in ``eval.methods``, students from
``distill.<target>.run_dir``): ``full_distilled`` (few-step consistency baseline),
``two_phase_distilled`` (phase-1 student + interpolation + 1-2 step phase-2 student) and
``interp_distilled`` (its keyframes + interpolation) get the same open-loop metrics (sampled after
every other method with their own generator, seed ``eval.seed + 1``, so the existing rows do not
change), closed-loop rows and cost; ``distilled_keyframe_collision`` is the phase-1 student's
keyframe bound.

**Cost** per plan (batch 1): network evaluations per model, FLOPs from
``torch.utils.flop_counter.FlopCounterMode`` with attention on the math backend (``counting_flops``:
every matmul and attention of every model the method calls, maze encoders included), and median
wall time over ``eval.cost_repeats`` runs. ``python -m maze.evaluate ... --recount-costs`` recounts
only this section of an existing ``eval.json`` (same checkpoints; the plans are not resampled).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from interpdiff.corruption import anchor_confidence
from interpdiff.interpolate import interpolate
from interpdiff.io import atomic_write_bytes, atomic_write_text
from interpdiff.masks import gap_stats
from maze.config_model import DISTILLED_METHODS, load_maze_config
from maze.planner import Planner

# ----------------------------------------------------------------------------- open-loop metrics


def sample_method(planner: Planner, cond: dict, method: str, generator=None, **kw) -> dict:
    """``planner.sample`` plus ``two_phase_uniform`` (two-phase with uniform keyframe indices)."""
    if method != "two_phase_uniform":
        return planner.sample(cond, method, generator=generator, **kw)
    old = planner.settings.index_source
    planner.settings.index_source = "uniform"
    try:
        return planner.sample(cond, "two_phase", generator=generator, **kw)
    finally:
        planner.settings.index_source = old


def shortest_length_world(maze, start_norm, goal_norm) -> float:
    """Length (world) of start -> centres of the shortest 4-connected cell path -> goal."""
    from maze.mazes import shortest_path, to_world

    path = shortest_path(maze, maze.cell_of(start_norm), maze.cell_of(goal_norm))
    pts = [np.asarray(start_norm)] + [maze.cell_center_norm(np.array(rc)) for rc in path[1:-1]] + [np.asarray(goal_norm)]
    w = to_world(np.stack(pts), maze)
    return float(np.linalg.norm(np.diff(w, axis=0), axis=-1).sum())


def plan_metrics(plans_N_T_2: np.ndarray, gt_N_T_2: np.ndarray, mazes: list, goal_N_2: np.ndarray,
                 radius_world: float, short_len: np.ndarray) -> dict:
    """Open-loop metrics of plans (normalised frame) against the ground truth (module doc)."""
    from maze.mazes import collides, segment_crosses_wall, to_world

    N = len(plans_N_T_2)
    coll_pts = np.zeros(N)
    coll = np.zeros(N, dtype=bool)
    cross = np.zeros(N)
    goal_err = np.zeros(N)
    length = np.zeros(N)
    for n in range(N):
        m, p = mazes[n], plans_N_T_2[n]
        c = collides(p, m, m.radius_norm(radius_world))
        coll_pts[n], coll[n] = c.mean(), c.any()
        cross[n] = segment_crosses_wall(p[:-1], p[1:], m, radius=1e-9, step=0.1 / m.G).sum()
        w = to_world(p, m)
        goal_err[n] = np.linalg.norm(w[-1] - to_world(goal_N_2[n], m))
        length[n] = np.linalg.norm(np.diff(w, axis=0), axis=-1).sum()
    mse = ((plans_N_T_2 - gt_N_T_2) ** 2).sum(-1).mean(-1)
    return {
        "collision": float(coll.mean()),
        "collision_pts": float(coll_pts.mean()),
        "crossings": float((cross > 0).mean()),
        "crossings_per_plan": float(cross.mean()),
        "mse": float(mse.mean()),
        "goal_err": float(goal_err.mean()),
        "len_ratio": float(np.mean(length / np.maximum(short_len, 1e-6))),
    }


def keyframe_collision(kf_N_K_2: np.ndarray, mazes: list, radius_world: float) -> float:
    """Fraction of plans with a phase-1 keyframe closer than the agent radius to a wall. Keyframes are
    clamped through phase 2 (METHOD.md section 5), so this bounds the refined collision rate from below."""
    from maze.mazes import collides

    return float(np.mean([collides(kf_N_K_2[n], m, m.radius_norm(radius_world)).any() for n, m in enumerate(mazes)]))


def balanced_rows(maze_id: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` rows taken round-robin over mazes (every maze represented), sorted."""
    per = [list(np.flatnonzero(maze_id == m)) for m in np.unique(maze_id)]
    out = []
    while len(out) < min(n, len(maze_id)):
        for p in per:
            if p and len(out) < n:
                out.append(p.pop(0))
    return np.sort(np.array(out, dtype=np.int64))


@torch.no_grad()
def open_loop(planner: Planner, data, cfg, radius_world: float, generator) -> tuple[dict, dict]:
    """Open-loop tables (module doc) and a dict of arrays for the figures."""
    from maze.data import maze_objects

    ec = cfg.eval
    mz = maze_objects(data, flip_y=cfg.data.flip_y)
    rows = balanced_rows(data.maze_id, ec.n_open_loop)
    n = len(rows)
    mazes = [mz[i] for i in data.maze_id[rows]]
    short = np.array([shortest_length_world(mazes[j], data.start[i], data.goal[i]) for j, i in enumerate(rows)])
    S = len(planner.budgets) if planner.budgets else 0
    keys = ["interp", "refined", "oracle_interp", "oracle_refined", "interp_uniform", "refined_uniform", "full"]
    distilled = [m for m in ec.methods if m in DISTILLED_METHODS]
    keys += [m for m in DISTILLED_METHODS if m in distilled or (m == "interp_distilled" and "two_phase_distilled" in distilled)]
    gen_d = torch.Generator().manual_seed(ec.seed + 1)
    kf_dist = []
    out = {k: [] for k in keys}
    lv = {k: [[] for _ in range(max(S - 1, 0))] for k in ("interp", "refined", "oracle_interp", "oracle_refined")}
    masks_all, kf_all = [], []
    have_two = planner.phase1 is not None and planner.refiner is not None
    for b0 in tqdm(range(0, n, ec.batch_size), desc="eval open loop", mininterval=2.0):
        b = data.tensors(rows[b0 : b0 + ec.batch_size])
        cond = {k: b[k] for k in ("occ", "sdf", "start", "goal")}
        x0 = b["pos"]
        if have_two:
            r = planner.sample(cond, "two_phase", generator=generator)
            masks = r["masks"]
            masks_all.append(masks)
            out["interp"].append(r["interp"])
            out["refined"].append(r["plan"])
            kf_all.append(r["keyframes"])
            o = planner.sample(cond, "two_phase", masks=masks, oracle_x0=x0, generator=generator)
            out["oracle_interp"].append(o["interp"])
            out["oracle_refined"].append(o["plan"])
            B = x0.shape[0]
            for s in range(S - 1):
                lv["interp"][s].append(r["levels"][s])
                x0h = r["x0_hats"][s]  # clipped like the oracle row below (and the sampler's state)
                lv["refined"][s].append(x0h.clamp(0, 1) if planner.settings.pos_clip else x0h)
                m_s = masks[:, s]
                xi = interpolate(x0, m_s)  # teacher-forced oracle input at level s
                conf = anchor_confidence(m_s, planner.settings.confidence)
                xr = planner.refiner(xi, torch.full((B,), s), conf, cond)
                if planner.settings.pos_clip:
                    xr = xr.clamp(0, 1)
                lv["oracle_interp"][s].append(xi)
                lv["oracle_refined"][s].append(xr)
            if planner.selector is not None and planner.settings.index_source == "selector":
                u = sample_method(planner, cond, "two_phase_uniform", generator=generator)
                out["interp_uniform"].append(u["interp"])
                out["refined_uniform"].append(u["plan"])
        if planner.baseline is not None:
            out["full"].append(planner.sample(cond, "full", generator=generator)["plan"])
        for m in distilled:  # after every other method, own generator: the rows above do not change
            if m == "interp_distilled" and "two_phase_distilled" in distilled:
                continue  # the interpolation of two_phase_distilled's keyframes (same sample)
            r = planner.sample(cond, m, generator=gen_d)
            if m == "full_distilled":
                out[m].append(r["plan"])
                continue
            kf_dist.append(r["keyframes"])
            out["interp_distilled"].append(r["interp"])
            if m == "two_phase_distilled":
                out[m].append(r["plan"])
    gt = data.pos[rows]
    goal = data.goal[rows]
    mid = data.maze_id[rows]
    res: dict = {"n": int(n), "radius_world": radius_world, "methods": {}, "levels": {}}
    arrays = {"gt": gt, "maze_id": mid, "start": data.start[rows], "goal": goal, "rows": rows}
    res["methods"]["ground_truth"] = plan_metrics(gt, gt, mazes, goal, radius_world, short)
    res["methods"]["ground_truth"]["per_maze"] = {
        name: plan_metrics(gt[mid == i], gt[mid == i], [mz[i]] * int((mid == i).sum()), goal[mid == i], radius_world, short[mid == i])
        for i, name in enumerate(data.maze_names) if (mid == i).any()
    }
    for k, v in out.items():
        if v:
            a = torch.cat(v).numpy()
            arrays[k] = a
            res["methods"][k] = plan_metrics(a, gt, mazes, goal, radius_world, short)
            res["methods"][k]["per_maze"] = {
                name: plan_metrics(a[mid == i], gt[mid == i], [mz[i]] * int((mid == i).sum()), goal[mid == i], radius_world,
                                   short[mid == i])
                for i, name in enumerate(data.maze_names) if (mid == i).any()
            }
    if distilled:
        kf = torch.cat(kf_dist).numpy() if kf_dist else None
        if kf is not None:
            res["distilled_keyframe_collision"] = keyframe_collision(kf, mazes, radius_world)
            arrays["keyframes_distilled"] = kf
    if have_two:
        for k, per in lv.items():
            res["levels"][k] = [plan_metrics(torch.cat(v).numpy(), gt, mazes, goal, radius_world, short) for v in per]
        masks = torch.cat(masks_all)
        arrays["masks"] = masks.numpy()
        kf = torch.cat(kf_all).numpy()
        arrays["keyframes"] = kf
        res["keyframe_collision"] = keyframe_collision(kf, mazes, radius_world)
        res["budgets"] = list(planner.budgets)
    return res, arrays


def gap_table(planner: Planner, data, n: int) -> dict:
    """Gap statistics per level for the selector, uniform, random and DP policies (eval split)."""
    from maze.sampler import policy_masks

    rows = balanced_rows(data.maze_id, n)
    b = data.tensors(rows)
    cond = {k: b[k] for k in ("occ", "sdf", "start", "goal")}
    gen = torch.Generator().manual_seed(0)
    out, masks = {}, {}
    pols = ["uniform", "random_nested"] + (["dp_precomputed"] if "kp_mask" in b else []) + (["selector"] if planner.selector else [])
    for pol in pols:
        m = policy_masks(pol, len(rows), planner.T, planner.budgets, b, gen, planner.selector, cond)
        masks[pol] = m.numpy()
        out[pol] = [vars(g) for g in gap_stats(m)]
    return out, masks


# ----------------------------------------------------------------------------- closed loop


class PlanFollower:
    """PD tracking of a world-frame plan ``[T, 2]`` with a lookahead target (module doc)."""

    def __init__(self, plan_T_2: np.ndarray, goal: np.ndarray, kp: float, kd: float, lookahead: float):
        self.plan, self.goal, self.kp, self.kd, self.look = plan_T_2, goal, kp, kd, lookahead
        self.i = 0

    def act(self, pos: np.ndarray, vel: np.ndarray) -> np.ndarray:
        while self.i < len(self.plan) and np.linalg.norm(self.plan[self.i] - pos) < self.look:
            self.i += 1
        target = self.plan[self.i] if self.i < len(self.plan) else self.goal
        return np.clip(self.kp * (target - pos) - self.kd * vel, -1.0, 1.0)


def make_eval_env(maze):
    import gymnasium as gym
    import gymnasium_robotics

    gym.register_envs(gymnasium_robotics)
    return gym.make(maze.env_id, continuing_task=True, reset_target=False, max_episode_steps=10**9).unwrapped


def rollout(env, seed: int, policy, horizon: int, success_dist: float) -> tuple[float, bool, float]:
    """Return (sum of rewards, success, final distance) of one episode from ``env.reset(seed)``."""
    obs, _ = env.reset(seed=seed)
    goal = obs["desired_goal"].copy()
    R, ok = 0.0, False
    for _ in range(horizon):
        o = obs["observation"]
        a = policy(o[:2], o[2:])
        obs, r, term, trunc, _ = env.step(a.astype(np.float32))
        R += float(r)
        d = float(np.linalg.norm(obs["achieved_goal"] - goal))
        ok = ok or d <= success_dist
    return R, ok, d


def closed_loop(planner: Planner, cfg, generator) -> dict:
    from maze.config import DataConfig
    from maze.mazes import get_maze, to_norm, to_world

    ec = cfg.eval
    res = {}
    for name in cfg.data.mazes:
        maze = get_maze(name, G=planner.G, flip_y=cfg.data.flip_y)
        env = make_eval_env(maze)
        horizon = int(ec.horizons.get(name, 600))
        seeds = [ec.seed + 10_000 * (1 + list(cfg.data.mazes).index(name)) + e for e in range(ec.episodes)]
        starts, goals = [], []
        for sd in seeds:
            obs, _ = env.reset(seed=sd)
            starts.append(obs["achieved_goal"].copy())
            goals.append(obs["desired_goal"].copy())
        starts, goals = np.stack(starts), np.stack(goals)
        cond = {
            "occ": torch.tensor(maze.occ)[None].expand(len(seeds), -1, -1),
            "sdf": torch.tensor(maze.sdf)[None].expand(len(seeds), -1, -1),
            "start": torch.tensor(to_norm(starts, maze), dtype=torch.float32).clamp(0, 1),
            "goal": torch.tensor(to_norm(goals, maze), dtype=torch.float32).clamp(0, 1),
        }
        plans = {}
        for method in ec.methods:
            try:
                chunks = []
                for b0 in range(0, len(seeds), ec.batch_size):
                    c = {k: v[b0 : b0 + ec.batch_size] for k, v in cond.items()}
                    chunks.append(sample_method(planner, c, method, generator)["plan"])
                plans[method] = to_world(torch.cat(chunks).double().numpy(), maze)
            except FileNotFoundError as e:  # a stage that was not trained
                print(f"[maze.evaluate] closed loop: skipping {method}: {e}")
        rng = np.random.default_rng(ec.seed)
        dc = DataConfig(action_noise=0.0)
        policies = {
            "random": lambda i: (lambda p, v: rng.uniform(-1, 1, size=2)),
            "expert": lambda i: _expert(maze, dc, starts[i], goals[i]),
            **{m: (lambda i, m=m: PlanFollower(plans[m][i], goals[i], ec.kp, ec.kd, ec.lookahead).act) for m in plans},
        }
        out = {}
        for pol, make in policies.items():
            Rs, oks, ds = [], [], []
            for i, sd in enumerate(tqdm(seeds, desc=f"closed loop {name} {pol}", mininterval=2.0, leave=False)):
                R, ok, d = rollout(env, sd, make(i), horizon, ec.success_dist)
                Rs.append(R), oks.append(ok), ds.append(d)
            out[pol] = {"return": float(np.mean(Rs)), "success": float(np.mean(oks)), "final_dist": float(np.mean(ds))}
        r_rand, r_exp = out["random"]["return"], out["expert"]["return"]
        for pol in out:
            den = r_exp - r_rand
            out[pol]["score"] = float(100 * (out[pol]["return"] - r_rand) / den) if abs(den) > 1e-9 else float("nan")
        res[name] = {"episodes": len(seeds), "horizon": horizon, "policies": out, "plans": {k: v[:8].tolist() for k, v in plans.items()},
                     "starts": starts[:8].tolist(), "goals": goals[:8].tolist()}
        env.close()
    return res


def _expert(maze, dc, start, goal):
    from maze.generate import WaypointController

    ctrl = WaypointController(maze, dc, np.random.default_rng(0))
    ctrl.plan(np.asarray(start), np.asarray(goal))
    return ctrl.act


# ----------------------------------------------------------------------------- cost


@contextlib.contextmanager
def counting_flops():
    """``FlopCounterMode`` with attention counted: on CPU ``F.scaled_dot_product_attention`` runs as
    ``aten._scaled_dot_product_flash_attention_for_cpu``, which has no formula in torch's flop registry
    (it counted 0: every maze figure before 2026-11-26 lacked attention). Under the math backend the
    attention is its two batched matmuls, ``4 B h L N d`` FLOPs, counted like any matmul, on CPU and GPU
    alike. Yields the counter (``get_total_flops()``)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        yield fc


@torch.no_grad()
def sampling_cost(planner: Planner, data, method: str, repeats: int) -> dict:
    b = data.tensors([0])
    cond = {k: b[k] for k in ("occ", "sdf", "start", "goal")}
    gen = torch.Generator().manual_seed(0)
    with counting_flops() as fc:
        sample_method(planner, cond, method, gen)
    flops = int(fc.get_total_flops())
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        sample_method(planner, cond, method, gen)
        times.append(time.perf_counter() - t0)
    src = planner.settings.index_source
    if method == "two_phase_uniform":
        planner.settings.index_source = "uniform"
    nfe = planner.nfe("two_phase" if method == "two_phase_uniform" else method)
    out = {"nfe": nfe, "nfe_total": int(sum(nfe.values())), "flops": flops, "wall_s": float(np.median(times))}
    if method not in ("full", "full_distilled"):  # where the FLOPs go: index selection, D_phi features, phase-1 + phase-2
        with counting_flops() as fs:
            masks = planner.masks_for(cond)
        with counting_flops() as fd:
            planner.kp_feat(cond, masks[:, 0])
        sel, dph = int(fs.get_total_flops()), int(fd.get_total_flops())
        out["flops_breakdown"] = {"index_selection": sel, "dphi_features": dph, "phase1_phase2": flops - sel - dph}
    planner.settings.index_source = src
    return out


# ----------------------------------------------------------------------------- main


def load_planner(cfg) -> Planner:
    """The planner of every stage's run folder, plus the distilled students the ``eval.methods`` need."""
    from maze.planner import STUDENTS_OF

    planner = Planner.from_checkpoint(
        cfg.eval.run_dir, require=(),
        paths={"phase1": cfg.phase1.run_dir, "phase2": cfg.phase2.run_dir, "baseline": cfg.baseline.run_dir,
               "dphi": cfg.dphi.run_dir, "selector": cfg.selector.run_dir},
    )
    targets = sorted({t for m in cfg.eval.methods if m in STUDENTS_OF for t in STUDENTS_OF[m]})
    if targets:
        planner.load_students({t: cfg.distill.student(t).run_dir for t in targets})
    return planner


def main(cfg, closed: bool = True) -> dict:
    from maze.data import agent_radius_norm, load_split

    ec = cfg.eval
    Path(ec.run_dir).mkdir(parents=True, exist_ok=True)
    planner = load_planner(cfg)
    planner.settings.index_source = ec.index_source
    data = load_split(cfg.data.root, ec.split)
    gen = torch.Generator().manual_seed(ec.seed)
    t0 = time.time()
    res = {"config": {"index_source": ec.index_source, "episodes": ec.episodes, "n_open_loop": ec.n_open_loop,
                      "selector": planner.selector is not None, "settings": vars(planner.settings)}}
    res["open_loop"], arrays = open_loop(planner, data, cfg, ec.agent_radius, gen)
    if planner.budgets:
        res["gaps"], gap_masks = gap_table(planner, data, ec.n_open_loop)
        arrays.update({f"gapmask_{k}": v for k, v in gap_masks.items()})
    res["cost"] = {}
    res["cost_counter"] = "FlopCounterMode, attention on the math SDPA backend (maze.evaluate.counting_flops)"
    for m in ec.methods:
        try:
            res["cost"][m] = sampling_cost(planner, data, m, ec.cost_repeats)
        except FileNotFoundError as e:
            print(f"[maze.evaluate] cost: skipping {m}: {e}")
    if closed:
        res["closed_loop"] = closed_loop(planner, cfg, gen)
    res["seconds"] = time.time() - t0
    import io

    atomic_write_text(Path(ec.run_dir) / "eval.json", json.dumps(res, indent=1, default=float))
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    atomic_write_bytes(Path(ec.run_dir) / "eval_samples.npz", buf.getvalue())
    print(summary(res))
    return res


def summary(res: dict) -> str:
    lines = ["[maze.evaluate] open loop (eval split, n=%d):" % res["open_loop"]["n"]]
    for k, v in res["open_loop"]["methods"].items():
        lines.append(f"  {k:15s} collision {v['collision']:.3f}  crossings {v['crossings']:.3f}  mse {v['mse']:.2e}  len_ratio {v['len_ratio']:.2f}")
    for k, v in res.get("cost", {}).items():
        lines.append(f"  cost {k:12s} nfe {v['nfe_total']:3d}  flops {v['flops'] / 1e6:9.1f} M  wall {v['wall_s'] * 1e3:7.1f} ms")
    for name, r in res.get("closed_loop", {}).items():
        s = "  ".join(f"{p} {v['success']:.2f}/{v['score']:.0f}" for p, v in r["policies"].items())
        lines.append(f"  closed loop {name} (success/score, {r['episodes']} ep): {s}")
    return "\n".join(lines)


def recount_costs(cfg) -> dict:
    """Recount FLOPs and NFE in the ``cost`` section of ``<eval.run_dir>/eval.json`` with the current
    counter (the rest of the file, measured on the same checkpoints, and the wall times are kept);
    the previous section is kept under ``cost_previous``. ``FileNotFoundError`` names a missing
    eval.json."""
    from maze.data import load_split

    path = Path(cfg.eval.run_dir) / "eval.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no eval.json to recount (run python -m maze.evaluate first)")
    res = json.loads(path.read_text())
    planner = load_planner(cfg)
    planner.settings.index_source = cfg.eval.index_source
    data = load_split(cfg.data.root, cfg.eval.split)
    old = res.get("cost", {})
    new = {}
    for m in old:
        try:
            new[m] = sampling_cost(planner, data, m, 1)
        except FileNotFoundError as e:  # a student not loaded with this config: keep its old entry
            print(f"[maze.evaluate] recount: keeping {m} as it was: {e}")
            new[m] = old[m]
            continue
        if "wall_s" in old[m]:  # FLOPs and NFE recounted; the wall time stays the original run's
            new[m]["wall_s"] = old[m]["wall_s"]
    res.setdefault("cost_previous", old)  # the first recount keeps the original numbers
    res["cost"] = new
    res["cost_counter"] = "FlopCounterMode, attention on the math SDPA backend (maze.evaluate.counting_flops)"
    atomic_write_text(path, json.dumps(res, indent=1, default=float))
    print(summary(res))
    return res


if __name__ == "__main__":
    from maze.common import run_cli

    torch.set_num_threads(1)
    argv = sys.argv[1:]
    if "--recount-costs" in argv:
        argv.remove("--recount-costs")
        run_cli("maze.evaluate", lambda: recount_costs(load_maze_config(argv)))
    else:
        run_cli("maze.evaluate", lambda: main(load_maze_config(argv)))
