"""Planner API, evaluation metrics and sampling cost.

- ``Planner.from_checkpoint``: missing folder / stage file -> errors naming the path and the
  trainer that writes it; plans in the PointMaze world frame start and end at the given
  start/goal for every method;
- evaluation metrics against hand-computed cases (a segment through a wall, a path in one cell);
- FLOPs of the baseline sample = steps x the FLOPs of one forward (counted separately);
- closed loop: the PD follower drives the real PointMaze agent along a hand-made plan to the goal.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from interpdiff.io import CheckpointError
from maze.config_model import BackboneConfig
from maze.models import FullSequenceDenoiser, KeypointDenoiser, Refiner, save_model
from maze.planner import Planner

torch.set_num_threads(1)
T, G = 32, 12
BUDGETS = [4, 8, 16, 32]
SZ = BackboneConfig(d_model=32, depth=1, heads=4, enc_depth=0, patch=1)
SZ4 = BackboneConfig(d_model=32, depth=1, heads=4, enc_depth=0, patch=4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("run")
    save_model(root / "phase1" / "model.pt", KeypointDenoiser(SZ, T, G),
               extra_meta={"budgets": BUDGETS, "feat_diffs": "none", "config": {"sample_steps": 3, "sample_shift": 1.0}})
    save_model(root / "phase2" / "model.pt", Refiner(SZ4, T, G, len(BUDGETS)),
               extra_meta={"budgets": BUDGETS, "sigma_max": 0.02, "sigma_min": 0.002, "confidence": "mask",
                           "config": {"sample_noise": "none"}})
    save_model(root / "baseline" / "model.pt", FullSequenceDenoiser(SZ4, T, G), extra_meta={"config": {"sample_steps": 5}})
    return root


def test_missing_run_and_stage_files_are_named(tmp_path, run_dir):
    with pytest.raises(CheckpointError, match="run folder .*nothing.* does not exist"):
        Planner.from_checkpoint(tmp_path / "nothing")
    (tmp_path / "r" / "phase1").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"phase1 checkpoint .*r/phase1/model.pt.* does not exist .*maze.train_phase1"):
        Planner.from_checkpoint(tmp_path / "r")
    p = Planner.from_checkpoint(run_dir, require=("baseline",), paths={"phase1": tmp_path / "x", "phase2": tmp_path / "y"})
    with pytest.raises(CheckpointError, match="phase-1 checkpoint"):
        p.plan("umaze", (-1.0, -1.0), (1.0, 1.0), method="two_phase")
    (tmp_path / "bad" / "phase1").mkdir(parents=True)
    (tmp_path / "bad" / "phase1" / "model.pt").write_text("garbage")
    with pytest.raises(CheckpointError, match="bad/phase1/model.pt.*could not be read"):
        Planner.from_checkpoint(tmp_path / "bad")


@pytest.mark.parametrize("method", ["two_phase", "interp_only", "full"])
def test_plans_are_world_frame_and_hit_start_and_goal(run_dir, method):
    from maze.mazes import get_maze, to_norm

    p = Planner.from_checkpoint(run_dir)
    assert (p.settings.phase1_steps, p.settings.baseline_steps, p.budgets) == (3, 5, BUDGETS)
    start, goal = np.array([-1.0, 1.0]), np.array([-1.2, -1.0])  # U-maze: top-left and bottom-left cells
    plans = p.plan("umaze", start, goal, n=3, method=method, seed=0)
    assert plans.shape == (3, T, 2) and plans.dtype == np.float64
    np.testing.assert_allclose(plans[:, 0], np.broadcast_to(start, (3, 2)), atol=1e-5)
    np.testing.assert_allclose(plans[:, -1], np.broadcast_to(goal, (3, 2)), atol=1e-5)
    u = to_norm(plans, get_maze("umaze"))
    assert u.min() >= 0 and u.max() <= 1
    again = p.plan("umaze", start, goal, n=3, method=method, seed=0)
    np.testing.assert_array_equal(plans, again)  # seeded


def test_bad_plan_arguments(run_dir):
    p = Planner.from_checkpoint(run_dir)
    with pytest.raises(ValueError, match="maze='hedge'"):
        p.plan("hedge", (0, 0), (1, 1))
    with pytest.raises(ValueError, match="start=.*inside a wall of 'umaze'"):
        p.plan("umaze", (0.0, 0.0), (-1.0, 1.0))  # U-maze centre cell is a wall
    with pytest.raises(ValueError, match="method="):
        p.plan("umaze", (-1.0, 1.0), (-1.0, -1.0), method="ddim")
    with pytest.raises(ValueError, match="goal must be"):
        p.plan("umaze", (-1.0, 1.0), (1.0, 2.0, 3.0))


def test_flops_and_nfe_are_counted_honestly(run_dir):
    from maze.evaluate import counting_flops as FlopCounterMode  # the evaluator's counter (attention included)
    from maze.evaluate import sampling_cost

    p = Planner.from_checkpoint(run_dir)
    cond, _ = p.condition("medium", (-2.5, 2.0), (2.5, -2.0), 1)

    class One:  # data stand-in with one row
        def tensors(self, rows):
            return {k: v.clone() for k, v in cond.items()}

    full = sampling_cost(p, One(), "full", repeats=1)
    assert full["nfe"] == {"baseline": 5}
    # independent count: one baseline forward (encoder included), times the 5 steps
    z = torch.zeros(1, T, 2)
    known = torch.zeros(1, T, dtype=torch.bool)
    with FlopCounterMode() as fc:
        with torch.no_grad():
            p.baseline(z, torch.ones(1), known, cond)
    with FlopCounterMode() as fe:
        with torch.no_grad():
            p.baseline.encode(cond)
    one_fwd, enc = fc.get_total_flops(), fe.get_total_flops()
    assert full["flops"] == 5 * (one_fwd - enc) + enc  # encoder cached across the steps
    two = sampling_cost(p, One(), "two_phase", repeats=1)
    assert two["nfe"] == {"phase1": 3, "phase2": 3}
    assert two["flops"] > 0 and two["wall_s"] > 0


def test_flop_counter_counts_attention():
    """One ``scaled_dot_product_attention`` call counts its two matmuls, ``4 B h L N d`` (torch's
    counter alone gives 0 for the CPU flash kernel), on top of the projections around it."""
    import torch.nn.functional as F

    from maze.evaluate import counting_flops

    B, h, L, N, d = 2, 4, 16, 144, 16
    q, k, v = torch.randn(B, h, L, d), torch.randn(B, h, N, d), torch.randn(B, h, N, d)
    with counting_flops() as fc:
        F.scaled_dot_product_attention(q, k, v)
    assert fc.get_total_flops() == 4 * B * h * L * N * d
    lin = torch.nn.Linear(d, d, bias=False)
    with counting_flops() as fc:
        F.scaled_dot_product_attention(lin(q), k, v)
    assert fc.get_total_flops() == 4 * B * h * L * N * d + 2 * B * h * L * d * d


def test_open_loop_metrics_hand_cases():
    from maze.evaluate import plan_metrics, shortest_length_world
    from maze.mazes import get_maze, to_norm

    m = get_maze("umaze")
    # U-maze (world): free cells y=+1 row x in [-1,1], y=0 only x=+1, y=-1 row x in [-1, 1]
    a, b = np.array([-1.0, 1.0]), np.array([-1.0, -1.0])
    through = to_norm(np.stack([a + (b - a) * t for t in np.linspace(0, 1, 9)]), m)[None]  # crosses the centre wall
    around_w = np.concatenate([np.linspace(a, [1.0, 1.0], 6), np.linspace([1.0, 1.0], [1.0, -1.0], 6)[1:],
                               np.linspace([1.0, -1.0], b, 6)[1:]])
    around = to_norm(around_w, m)[None]
    short = np.array([shortest_length_world(m, around[0, 0], around[0, -1])])
    np.testing.assert_allclose(short, [6.0], atol=1e-9)  # start/goal at cell centres: 6 cell moves
    r = plan_metrics(through, through, [m], through[:, -1], 0.1, short)
    assert r["collision"] == 1.0 and r["crossings"] == 1.0 and r["mse"] == 0.0 and r["goal_err"] == 0.0
    assert r["len_ratio"] == pytest.approx(2.0 / 6.0)
    r = plan_metrics(around, through[:, :1].repeat(16, 1), [m], around[:, -1], 0.1, short)
    assert r["collision"] == 0.0 and r["crossings"] == 0.0 and r["len_ratio"] == pytest.approx(1.0)
    same_cell = shortest_length_world(m, to_norm(np.array([-1.2, 1.1]), m), to_norm(np.array([-0.9, 0.8]), m))
    assert same_cell == pytest.approx(np.hypot(0.3, 0.3))
    # keyframe collision: a keyframe at world (0, 0) lies in the centre wall; cell centres of free cells are clear
    from maze.evaluate import keyframe_collision

    kf_free = to_norm(np.array([[-1.0, 1.0], [1.0, 0.0], [-1.0, -1.0]]), m)
    kf_wall = to_norm(np.array([[-1.0, 1.0], [0.0, 0.0], [-1.0, -1.0]]), m)
    kf_near = to_norm(np.array([[-1.0, 1.0], [1.0, 0.0], [-1.0, -0.55]]), m)  # 0.05 from the wall face at y = -0.5
    assert keyframe_collision(np.stack([kf_free, kf_wall, kf_near]), [m] * 3, 0.1) == pytest.approx(2 / 3)
    assert keyframe_collision(kf_near[None], [m], 0.04) == 0.0


def test_pd_follower_reaches_goal_in_pointmaze():
    """The U-maze detour plan, followed by the PD controller in the real env, reaches the goal;
    random actions from the same start do not (an independent sanity check of the rollout)."""
    from maze.evaluate import PlanFollower, make_eval_env, rollout
    from maze.mazes import get_maze

    m = get_maze("umaze")
    env = make_eval_env(m)
    obs, _ = env.reset(seed=0, options={"reset_cell": np.array([1, 1]), "goal_cell": np.array([3, 1])})
    start, goal = obs["achieved_goal"].copy(), obs["desired_goal"].copy()
    plan = np.concatenate([np.linspace(start, [1.0, 1.0], 20), np.linspace([1.0, 1.0], [1.0, -1.0], 20),
                           np.linspace([1.0, -1.0], goal, 20)])

    env_reset = env.reset
    env.reset = lambda seed=None, options=None: env_reset(seed=0, options={"reset_cell": np.array([1, 1]), "goal_cell": np.array([3, 1])})
    R, ok, d = rollout(env, 0, PlanFollower(plan, goal, 10.0, 1.0, 0.5).act, 300, 0.45)
    assert ok and d < 0.45 and R > 50
    rng = np.random.default_rng(0)
    R0, ok0, _ = rollout(env, 0, lambda p, v: rng.uniform(-1, 1, 2), 300, 0.45)
    assert not ok0 and R0 == 0
    env.close()


def test_demo_adds_model_overlay_and_checks_stage_completion(tmp_path):
    from maze.demo import stage_done, with_overlay
    from maze.config_model import load_maze_config

    base = tmp_path / "x.yaml"
    base.write_text("data:\n  root: " + str(tmp_path / "data") + "\n")
    assert with_overlay(["--config", str(base), "a=1"]) == ["--config", str(base), "a=1"]
    ov = tmp_path / "x_model.yaml"
    ov.write_text("phase1:\n  run_dir: " + str(tmp_path / "p1") + "\n  optim: {steps: 7}\n")
    args = with_overlay(["--config", str(base), "a=1"])
    assert args == ["--config", str(base), "--config", str(ov), "a=1"]
    cfg = load_maze_config(args[:-1])
    assert cfg.phase1.optim.steps == 7 and not stage_done(cfg, "phase1") and not stage_done(cfg, "generate")
    from interpdiff.config import to_dict
    from maze.demo import model_state

    m = KeypointDenoiser(SZ, T, G)
    p1 = to_dict(cfg.phase1)
    save_model(tmp_path / "p1" / "model.pt", m, extra_meta={"step": 5, "config": p1})
    assert not stage_done(cfg, "phase1") and model_state(cfg, "phase1") == ("partial", [])  # 5 of 7 steps
    save_model(tmp_path / "p1" / "model.pt", m, extra_meta={"step": 7, "config": p1})
    assert stage_done(cfg, "phase1")
    # sampling-time settings, paths and step counts do not make it stale; training settings do
    cfg2 = load_maze_config(args[:-1] + ["phase1.sample_steps=3", "phase1.optim.steps=5", "phase1.optim.log_every=1"])
    assert stage_done(cfg2, "phase1")
    cfg3 = load_maze_config(args[:-1] + ["phase1.model.d_model=48", "phase1.train_shift=2.0"])
    assert model_state(cfg3, "phase1") == ("stale", ["phase1.model.d_model", "phase1.train_shift"])
    save_model(tmp_path / "p1" / "model.pt", m, extra_meta={"step": 7})  # written before configs were stored
    assert model_state(cfg, "phase1")[0] == "stale"


def test_demo_retrains_stale_or_rerun_stages_from_scratch_and_keeps_the_previous(tmp_path, monkeypatch):
    """The demo loop with the trainers replaced by a recorder: a complete stage is skipped, a stage
    trained with other settings or downstream of a stage that ran is moved to previous/ and trained
    from scratch, a partial one of the same settings resumes (its file is left in place), and data
    generated with other settings is generated again."""
    import json

    from interpdiff.config import to_dict
    from maze import demo
    from maze.config_model import load_maze_config

    base = tmp_path / "x.yaml"
    base.write_text(f"data:\n  root: {tmp_path / 'data'}\neval:\n  run_dir: {tmp_path / 'ev'}\n"
                    f"phase1:\n  run_dir: {tmp_path / 'p1'}\n  feat_diffs: none\n  optim: {{steps: 7}}\n"
                    f"dphi:\n  run_dir: {tmp_path / 'dphi'}\nselector:\n  run_dir: {tmp_path / 'sel'}\n"
                    f"phase2:\n  run_dir: {tmp_path / 'p2'}\n  optim: {{steps: 7}}\n"
                    "demo:\n  stages: [generate, keyframes, phase1, phase2]\n")
    calls = []

    def fake_stage(cfg, stage):
        if stage == "generate":
            root = Path(cfg.data.root)
            root.mkdir(parents=True, exist_ok=True)
            for f in ("train.npz", "eval.npz"):
                (root / f).write_bytes(b"x")
            (root / "meta.json").write_text(json.dumps({"generation": to_dict(cfg.data)}))
        elif stage == "keyframes":
            for split in ("train", "eval"):
                np.savez(Path(cfg.data.root) / f"keyframes_{split}.npz",
                         config_json=np.array(json.dumps(to_dict(cfg.keyframes))))
            calls.append(stage)
        else:
            sec = getattr(cfg, stage)
            prev = Path(sec.run_dir) / "model.pt"
            calls.append((stage, prev.is_file()))  # (stage, resumed from a file in place)
            save_model(prev, KeypointDenoiser(SZ, T, G), extra_meta={"step": sec.optim.steps, "config": to_dict(sec)})
        calls.append(stage) if stage == "generate" else None

    monkeypatch.setattr(demo, "run_stage", fake_stage)
    monkeypatch.setattr("maze.report.write_report", lambda cfg, stage_times=None: tmp_path / "report.md")
    run = lambda *o: demo.main(["--config", str(base), *o])  # noqa: E731
    run()
    assert calls == ["generate", "keyframes", ("phase1", False), ("phase2", False)]
    calls.clear()
    run("keyframes.batch_size=3", "phase1.sample_steps=2")  # how the DP runs / sampling-only: nothing is stale
    assert calls == []
    run("keyframes.k_min=4")  # other keyframes: made again, and the models after them retrained
    assert calls == ["keyframes", ("phase1", False), ("phase2", False)]
    calls.clear()
    run("keyframes.k_min=4")
    assert calls == []  # everything done
    run("keyframes.k_min=4", "phase2.sigma_max=0.03")  # phase-2 training setting: phase 2 again, from scratch
    assert calls == [("phase2", False)] and (tmp_path / "p2" / "previous" / "model.pt").is_file()
    calls.clear()
    save_model(tmp_path / "p2" / "model.pt", KeypointDenoiser(SZ, T, G),
               extra_meta={"step": 3, "config": to_dict(load_maze_config([
                   "--config", str(base), "phase2.sigma_max=0.03"]).phase2)})
    run("keyframes.k_min=4", "phase2.sigma_max=0.03")  # partial, same settings: resumes in place
    assert calls == [("phase2", True)]
    calls.clear()
    run("keyframes.k_min=4", "phase2.sigma_max=0.03", "data.n_train_per_maze=7")  # new data: all again
    assert calls == ["generate", "keyframes", ("phase1", False), ("phase2", False)]
    calls.clear()
    run("keyframes.k_min=4", "phase2.sigma_max=0.03", "data.n_train_per_maze=7", "demo.resume=false")
    assert calls == ["generate", "keyframes", ("phase1", False), ("phase2", False)]
    calls.clear()
    # more phase-1 steps: phase 1 resumes in place; phase 2 does not read phase 1 and stays done
    run("keyframes.k_min=4", "phase2.sigma_max=0.03", "data.n_train_per_maze=7", "phase1.optim.steps=9")
    assert calls == [("phase1", True)]
    calls.clear()
    # an invocation that stops after remaking the keyframes: the next one still retrains phase 1 and 2
    good = demo.run_stage

    def dies_in_phase1(cfg, stage):
        if stage == "phase1":
            raise KeyboardInterrupt
        good(cfg, stage)

    monkeypatch.setattr(demo, "run_stage", dies_in_phase1)
    with pytest.raises(KeyboardInterrupt):
        run("keyframes.k_min=5", "phase2.sigma_max=0.03", "data.n_train_per_maze=7", "phase1.optim.steps=9")
    assert calls == ["keyframes"]
    calls.clear()
    monkeypatch.setattr(demo, "run_stage", good)
    run("keyframes.k_min=5", "phase2.sigma_max=0.03", "data.n_train_per_maze=7", "phase1.optim.steps=9")
    assert calls == [("phase1", False), ("phase2", False)]
    calls.clear()
    run("keyframes.k_min=5", "phase2.sigma_max=0.03", "data.n_train_per_maze=7", "phase1.optim.steps=9")
    assert calls == []


def test_demo_reruns_dphi_and_selector_in_place_for_evaluation_and_decoding_settings(tmp_path, monkeypatch):
    """D_phi / selector settings of use, not of training (eval_samples; the selector's decoding) run
    the finished stage again without retraining; only a decoding change reaches the stages after it.
    Keyframe files written before their settings were recorded count as done when their budgets fit."""
    import json

    from interpdiff.config import to_dict
    from maze import demo
    from maze.data import keyframes_path

    base = tmp_path / "x.yaml"
    base.write_text(f"data:\n  root: {tmp_path / 'data'}\neval:\n  run_dir: {tmp_path / 'ev'}\n"
                    f"dphi:\n  run_dir: {tmp_path / 'dphi'}\n  train: {{steps: 3}}\n"
                    f"selector:\n  run_dir: {tmp_path / 'sel'}\n  train: {{steps: 3}}\n"
                    f"phase1:\n  run_dir: {tmp_path / 'p1'}\n  optim: {{steps: 3}}\n"
                    "demo:\n  stages: [keyframes, dphi, selector, phase1]\n")
    calls = []

    def fake_stage(cfg, stage):
        if stage == "keyframes":
            Path(cfg.data.root).mkdir(parents=True, exist_ok=True)
            for split in ("train", "eval"):  # the format before config_json
                np.savez(keyframes_path(cfg.data.root, split), budgets=np.array(cfg.keyframes.resolved_budgets(cfg.data.T)),
                         feat_source=np.array("true_cost"))
            calls.append(stage)
            return
        sec = getattr(cfg, stage)
        model = Path(sec.run_dir) / "model.pt"
        calls.append((stage, model.is_file()))
        steps = sec.train.steps if stage in ("dphi", "selector") else sec.optim.steps
        conf = to_dict(cfg) if stage in ("dphi", "selector") else to_dict(sec)
        save_model(model, KeypointDenoiser(SZ, T, G), extra_meta={"step": steps, "config": conf})

    monkeypatch.setattr(demo, "run_stage", fake_stage)
    monkeypatch.setattr("maze.report.write_report", lambda cfg, stage_times=None: tmp_path / "report.md")
    run = lambda *o: demo.main(["--config", str(base), *o])  # noqa: E731
    run()
    assert calls == ["keyframes", ("dphi", False), ("selector", False), ("phase1", False)]
    calls.clear()
    run()
    assert calls == []  # legacy keyframe files with the configured budgets: done
    run("dphi.eval_samples=7")
    assert calls == [("dphi", True)]  # re-evaluated in place; nothing after it changes
    calls.clear()
    run("dphi.eval_samples=7", "selector.nms_radius_scale=0.3")
    assert calls == [("selector", True), ("phase1", False)]  # new decoding: re-saved in place, phase 1 retrained
    calls.clear()
    run("dphi.eval_samples=7", "selector.nms_radius_scale=0.3", "keyframes.k_min=4")
    assert calls == ["keyframes", ("dphi", False), ("selector", False), ("phase1", False)]
    # stages outside demo.stages that read what was remade are remembered for a later invocation
    assert json.loads((tmp_path / "ev" / "demo_pending.json").read_text()) == ["evaluate", "phase2"]
