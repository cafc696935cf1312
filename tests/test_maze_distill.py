"""Step distillation of the maze teachers (``maze.distill``), against independent references.

- few-step samplers: a model whose TrigFlow consistency function is the exact PF-ODE map of a
  Gaussian (closed form) makes the 1-step sampler return that map of the initial noise, with the
  start/goal inpainted exactly (full and keyframe samplers, raw-sigma model input);
- the JVP through a real maze model (math SDPA kernel under forward AD) agrees with a float64
  central difference; the sCM tangent is 0 at the known endpoints;
- phase-2: the student's training target equals a numpy TACoS chain (np.interp), the 1- and 2-step
  student samplers equal their step-by-step definition, and a student that outputs the target
  reproduces it in 1 and 2 steps;
- training: a few steps on one repeated batch reduce the phase-2 regression loss; ``main`` writes a
  checkpoint that ``load_student`` rebuilds into the same sampler (and the planner / NFE use it);
- errors name the bad path / target / key.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from interpdiff.config import load_config
from interpdiff.io import CheckpointError
from maze.config import MazeConfig
from maze.config_model import BackboneConfig
from maze.models import FullSequenceDenoiser, KeypointDenoiser, Refiner, from_z, save_model, to_z

torch.set_num_threads(1)
T, G = 16, 12
BUDGETS = [4, 8, 16]


def perturb(model, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def cond(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    occ = torch.zeros(B, G, G)
    occ[:, 0], occ[:, -1], occ[:, :, 0], occ[:, :, -1] = 1, 1, 1, 1
    return {"occ": occ, "sdf": torch.rand(B, G, G, generator=g), "start": 0.2 + 0.6 * torch.rand(B, 2, generator=g),
            "goal": 0.2 + 0.6 * torch.rand(B, 2, generator=g)}


class GaussianConsistencyModel(nn.Module):
    """A flow 'network' ``v(z, sigma)`` (raw flow time, like the maze models) whose TrigFlow consistency
    function is the exact PF-ODE map of the data ``N(mu, s^2)`` per coordinate:
    ``f(x_t, t) = mu + s (x_t - cos t mu) / sqrt(cos^2 t s^2 + sin^2 t)``."""

    def __init__(self, kind, mu, s):
        super().__init__()
        self.kind, self.T, self.mu, self.s = kind, T, mu, s

    def encode(self, cond):
        return None

    def forward(self, z, sigma_B, *args):
        sig = sigma_B.double()[:, None, None]
        t = torch.atan2(sig, 1 - sig)
        x_t = z.double() * (torch.sin(t) + torch.cos(t))
        f = self.mu + self.s * (x_t - torch.cos(t) * self.mu) / torch.sqrt(torch.cos(t) ** 2 * self.s**2 + torch.sin(t) ** 2)
        eps = (x_t - torch.cos(t) * f) / torch.sin(t)
        return (eps - f).float()


@pytest.mark.parametrize("kind", ["baseline", "phase1"])
def test_one_step_sampler_reproduces_the_exact_consistency_map_with_endpoints_inpainted(kind):
    from maze.distill import consistency_sample_full, consistency_sample_keyframes

    mu, s, B, sigma_max = 0.1, 0.3, 3, 80.0
    model = GaussianConsistencyModel(kind, mu, s)
    c = cond(B)
    t0 = math.atan(sigma_max)
    if kind == "baseline":
        shape = (B, T, 2)
        out = consistency_sample_full(model, c, [t0], torch.Generator().manual_seed(5))
        first, last = out[:, 0], out[:, -1]
    else:
        idx = torch.tensor([0, 3, 9, T - 1]).expand(B, 4)
        shape = (B, 4, 2)
        out = consistency_sample_keyframes(model, c, idx, torch.rand(B, 4, 5), [t0], torch.Generator().manual_seed(5))
        first, last = out[:, 0], out[:, -1]
    eps = torch.randn(shape, generator=torch.Generator().manual_seed(5)).double()
    x_t0 = math.sin(t0) * eps
    ref_z = mu + s * (x_t0 - math.cos(t0) * mu) / math.sqrt(math.cos(t0) ** 2 * s**2 + math.sin(t0) ** 2)
    ref = ((ref_z / 2 + 0.5).clamp(0, 1)).float()
    torch.testing.assert_close(out[:, 1:-1], ref[:, 1:-1], atol=2e-5, rtol=0)
    assert torch.equal(first, c["start"]) and torch.equal(last, c["goal"])  # inpainted exactly


def test_multistep_sampler_with_exact_map_follows_the_renoising_recursion():
    """4 steps: x0_i = f(x_i, t_i), x_{i+1} = cos t_{i+1} x0_i + sin t_{i+1} e_{i+1} (fresh noise from the
    same generator, drawn after the initial noise)."""
    from maze.distill import consistency_sample_full

    mu, s, B = -0.2, 0.25, 2
    model = GaussianConsistencyModel("baseline", mu, s)
    times = [math.atan(80.0), 1.25, 0.8, 0.35]
    out = consistency_sample_full(model, cond(B), times, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    x = math.sin(times[0]) * torch.randn(B, T, 2, generator=g).double()
    for i, t in enumerate(times):
        x0 = mu + s * (x - math.cos(t) * mu) / math.sqrt(math.cos(t) ** 2 * s**2 + math.sin(t) ** 2)
        if i + 1 < len(times):
            x = math.cos(times[i + 1]) * x0 + math.sin(times[i + 1]) * torch.randn(B, T, 2, generator=g).double()
    torch.testing.assert_close(out[:, 1:-1], (x0 / 2 + 0.5).clamp(0, 1).float()[:, 1:-1], atol=2e-5, rtol=0)


@pytest.mark.parametrize("kind", ["baseline", "phase1"])
def test_autograd_jvp_through_maze_model_matches_central_difference(kind):
    """Forward-mode AD through the real maze model (attention on the math SDPA kernel) = a central
    difference (the maze models compute in float32: h = 1e-2 keeps the rounding error ~1e-5, the
    O(h^2) truncation ~1e-4 relative); the known endpoints are constants of the adapter (zero tangent)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from interpdiff import distill as D
    from maze.distill import trig_F

    torch.manual_seed(0)
    B = 2
    sizes = BackboneConfig(d_model=32, depth=2, heads=4, enc_depth=1, patch=1)
    if kind == "baseline":
        model = perturb(FullSequenceDenoiser(sizes, T, G), 0.1).eval()
        L = T
        idx = torch.arange(T).expand(B, T)
        extra = ()
    else:
        model = perturb(KeypointDenoiser(sizes, T, G), 0.1).eval()
        idx = torch.tensor([0, 4, 7, T - 1]).expand(B, 4)
        L = 4
        extra = (idx, torch.rand(B, 4, 5))
    known = (idx == 0) | (idx == T - 1)
    F = trig_F(model, cond(B), known, torch.randn(B, L, 2), None, *extra)
    x = torch.randn(B, L, 2)
    t = torch.tensor([0.4, 1.1])
    dx, dt = torch.randn_like(x), torch.tensor([0.3, 0.7])
    for dx_, dt_, h in ((dx, torch.zeros_like(dt), 1e-2), (torch.zeros_like(dx), dt, 1e-4)):
        with sdpa_kernel(SDPBackend.MATH):
            out, jv = D.jvp(F, x, t, dx_, dt_, "autograd")
        _, fd = D.jvp(F, x, t, dx_, dt_, "finite_difference", fd_size=h)
        rel = float((jv - fd).norm() / fd.norm())
        assert fd.norm() > 1e-2 and rel < 2e-3, rel
    # a perturbation of the known points alone changes nothing at the free points (the network sees the
    # clean known values; F at the known points themselves is masked out of every loss)
    dx_known = torch.where(known[..., None], torch.randn_like(x), torch.zeros_like(x))
    with sdpa_kernel(SDPBackend.MATH):
        _, jk = D.jvp(F, x, t, dx_known, torch.zeros_like(t), "autograd")
    assert jk[~known].abs().max() == 0 and jv[~known].abs().max() > 0


@pytest.mark.parametrize("mode", ["scm", "discrete"])
def test_consistency_loss_runs_on_real_models_and_trains_only_free_points(mode):
    from maze.distill import consistency_loss

    torch.manual_seed(0)
    cfg = load_config(MazeConfig, None, [f"distill.mode={mode}", "distill.tangent_warmup=0"])
    sizes = BackboneConfig(d_model=32, depth=1, heads=4, enc_depth=0, patch=1)
    teacher = perturb(FullSequenceDenoiser(sizes, T, G), seed=1).eval()
    student = perturb(FullSequenceDenoiser(sizes, T, G), seed=2)
    B = 3
    z0 = to_z(torch.rand(B, T, 2))
    known = ((torch.arange(T) == 0) | (torch.arange(T) == T - 1)).expand(B, T)
    loss, logs = consistency_loss(student, teacher, z0, known, cond(B), cfg.distill, 10, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters() if p.requires_grad)
    if mode == "scm":
        assert logs["tangent_r"] == 1.0 and logs["tangent_rms"] > 0


# --- phase 2 ---------------------------------------------------------------------------------------


def np_interp(x_B_T_2, m_B_T):
    out = np.empty_like(x_B_T_2)
    for b in range(x_B_T_2.shape[0]):
        k = np.flatnonzero(m_B_T[b])
        for d in range(2):
            out[b, :, d] = np.interp(np.arange(x_B_T_2.shape[1]), k, x_B_T_2[b, k, d])
    return out


def masks_for(B, seed=0):
    from interpdiff.masks import random_nested_masks

    return random_nested_masks(B, T, BUDGETS, generator=torch.Generator().manual_seed(seed))


def refiner(seed=0, std=0.05):
    r = Refiner(BackboneConfig(d_model=32, depth=1, heads=4, enc_depth=0, patch=4), T, G, len(BUDGETS))
    return perturb(r, std, seed).eval()


P2 = {"sigma_max": 0.01, "sigma_min": 0.001, "confidence": "mask", "pos_clip": True}


def test_phase2_target_is_the_teacher_tacos_chain():
    from maze.distill import phase2_teacher_target

    B = 3
    teacher, c, masks = refiner(), cond(B), masks_for(B)
    x_start = torch.from_numpy(np_interp(torch.rand(B, T, 2).numpy(), masks[:, 0].numpy())).float()
    got = phase2_teacher_target(teacher, x_start, masks, c, P2)
    x = x_start.numpy().copy()
    with torch.no_grad():
        for s in range(len(BUDGETS) - 1):
            m, mn = masks[:, s].numpy(), masks[:, s + 1].numpy()
            x0 = teacher(torch.from_numpy(x), torch.full((B,), s), torch.from_numpy(m).float(), c).numpy()
            nxt = x - np_interp(x0, m) + np_interp(x0, mn)
            x = np.clip(np.where(m[..., None], x, nxt), 0, 1)
    np.testing.assert_allclose(got.numpy(), x, atol=1e-5)
    assert not np.allclose(x, x_start.numpy(), atol=1e-3)  # the teacher does change the plan


def test_phase2_student_sampler_matches_its_definition_and_a_perfect_student_hits_the_target():
    from interpdiff.distill import phase2_student_levels
    from maze.distill import phase2_student_refine, phase2_teacher_target

    B = 3
    student, c, masks = refiner(seed=3), cond(B), masks_for(B, 1)
    x_start = torch.from_numpy(np_interp(torch.rand(B, T, 2).numpy(), masks[:, 0].numpy())).float()
    with torch.no_grad():
        one = phase2_student_refine(student, x_start, masks, c, [0])
        x0 = student(x_start, torch.zeros(B), masks[:, 0].float(), c)
        torch.testing.assert_close(one, torch.where(masks[:, 0, :, None], x_start, x0).clamp(0, 1))
        mid = phase2_student_levels(len(BUDGETS), 2)
        assert mid == [0, 1]
        two = phase2_student_refine(student, x_start, masks, c, mid)
        xm = x_start - torch.from_numpy(np_interp(x0.numpy(), masks[:, 0].numpy())) + torch.from_numpy(
            np_interp(x0.numpy(), masks[:, 1].numpy()))
        xm = torch.where(masks[:, 0, :, None], x_start, xm).clamp(0, 1)
        x1 = student(xm, torch.ones(B), masks[:, 1].float(), c)
        torch.testing.assert_close(two, torch.where(masks[:, 1, :, None], xm, x1).clamp(0, 1), atol=1e-5, rtol=0)
    # a student that returns the teacher's chain output on missing frames reproduces it in 1 and 2 steps
    target = phase2_teacher_target(refiner(), x_start, masks, c, P2)

    class Oracle(nn.Module):
        kind, T = "phase2", T

        def encode(self, cond):
            return None

        def forward(self, x, s, conf, cond, enc=None):
            return torch.where(conf[..., None] > 0.999, x, target)

    for lv in ([0], [0, 1]):
        torch.testing.assert_close(phase2_student_refine(Oracle(), x_start, masks, c, lv), target, atol=1e-6, rtol=0)


def test_phase2_loss_falls_when_overfitting_one_batch():
    from maze.distill import phase2_loss

    torch.manual_seed(0)
    B = 8
    teacher, c, masks = refiner(seed=0, std=0.05), cond(B), masks_for(B, 2)
    student = Refiner(BackboneConfig(d_model=32, depth=1, heads=4, enc_depth=0, patch=4), T, G, len(BUDGETS))
    student.load_state_dict(refiner(seed=9, std=0.05).state_dict())
    x0 = torch.rand(B, T, 2)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss, _ = phase2_loss(student, teacher, x0, masks, c, P2, [0, 1], "none", torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::8]


# --- end to end: config, main, checkpoint round trip, planner, errors ---------------------------------


def tiny_split(N=24, seed=0):
    from maze.data import MazeSplit
    from interpdiff.masks import random_nested_masks

    g = torch.Generator().manual_seed(seed)
    c = cond(1, seed)
    start, goal = 0.2 + 0.6 * torch.rand(N, 2, generator=g), 0.2 + 0.6 * torch.rand(N, 2, generator=g)
    w = torch.linspace(0, 1, T)[None, :, None]
    pos = (1 - w) * start[:, None] + w * goal[:, None] + 0.02 * torch.randn(N, T, 2, generator=g)
    pos[:, 0], pos[:, -1] = start, goal
    return MazeSplit(pos=pos.numpy(), maze_id=np.zeros(N, dtype=np.int64), start=start.numpy(), goal=goal.numpy(),
                     occ=c["occ"].numpy(), sdf=c["sdf"].numpy(), maze_names=["umaze"],
                     kp_mask_levels=random_nested_masks(N, T, BUDGETS, generator=g).numpy(), budgets=BUDGETS,
                     kp_feat=np.zeros((N, len(BUDGETS), T, 5), dtype=np.float32))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    sz1 = BackboneConfig(d_model=32, depth=1, heads=4, enc_depth=0, patch=1)
    sz4 = BackboneConfig(d_model=32, depth=1, heads=4, enc_depth=0, patch=4)
    save_model(root / "phase1" / "model.pt", perturb(KeypointDenoiser(sz1, T, G), 0.1, 1),
               extra_meta={"budgets": BUDGETS, "feat_diffs": "none", "policy_mix": {"uniform": 0.5, "dp": 0.5},
                           "config": {"sample_steps": 3, "sample_shift": 1.0}, "step": 7})
    save_model(root / "phase2" / "model.pt", perturb(Refiner(sz4, T, G, len(BUDGETS)), 0.05, 2),
               extra_meta={"budgets": BUDGETS, "sigma_max": 0.01, "sigma_min": 0.001, "confidence": "mask",
                           "policy_mix": {"uniform": 0.5, "random_nested": 0.5}, "config": {"sample_noise": "none"}})
    save_model(root / "baseline" / "model.pt", perturb(FullSequenceDenoiser(sz4, T, G), 0.1, 3),
               extra_meta={"config": {"sample_steps": 5}})
    return root


def distill_cfg(root, target, mode="scm", extra=()):
    over = [f"phase1.run_dir={root}/phase1", f"phase2.run_dir={root}/phase2", f"baseline.run_dir={root}/baseline",
            f"distill.target={target}", f"distill.mode={mode}", "distill.tangent_warmup=2"]
    for t in ("full", "phase1", "phase2"):
        over += [f"distill.{t}.run_dir={root}/distill/{t}", f"distill.{t}.optim.steps=3", f"distill.{t}.optim.batch_size=4",
                 f"distill.{t}.optim.warmup=1", f"distill.{t}.optim.log_every=1", f"distill.{t}.optim.ckpt_every=100"]
    return load_config(MazeConfig, None, over + list(extra))


@pytest.mark.parametrize("target,mode", [("full", "scm"), ("phase1", "discrete"), ("phase2", "scm")])
def test_main_writes_a_student_that_rebuilds_from_its_checkpoint(monkeypatch, teachers, target, mode):
    import maze.data
    from maze.distill import load_student, main
    from maze.planner import Planner

    monkeypatch.setattr(maze.data, "load_split", lambda root, split, keyframes=None: tiny_split())
    extra = ["distill.phase2.steps=2"] if target == "phase2" else []
    cfg = distill_cfg(teachers, target, mode, extra)
    path = main(cfg)
    assert path == teachers / "distill" / target / "model.pt" and (path.parent / "config.yaml").is_file()
    model, meta = load_student(path.parent, target)
    d = meta["distill"]
    assert d["target"] == target and d["teacher_step"] == (7 if target == "phase1" else None)
    ck = torch.load(path, weights_only=False)
    ema = {k: v for k, v in ck["state"]["ema"].items()}
    assert all(torch.equal(model.state_dict()[k], ema[k]) for k in ema)  # sampling uses the EMA weights
    p = Planner.from_checkpoint(teachers)
    p.settings.index_source = "uniform"
    c = cond(2)
    if target == "full":
        assert d["times"] == pytest.approx([math.atan(80.0), 1.25, 0.8, 0.35])
        p.load_students({"full": path})
        a = p.sample(c, "full_distilled", generator=torch.Generator().manual_seed(0))["plan"]
        from maze.distill import consistency_sample_full

        b = consistency_sample_full(model, c, d["times"], torch.Generator().manual_seed(0))
        assert torch.equal(a, b) and p.nfe("full_distilled") == {"full_student": 4}
        assert torch.equal(a[:, 0], c["start"]) and torch.equal(a[:, -1], c["goal"])
    elif target == "phase1":
        assert d["mode"] == "discrete" and d["times"] == pytest.approx([math.atan(80.0), 0.8])
        p.load_students({"phase1": path.parent})
        r = p.sample(c, "interp_distilled", generator=torch.Generator().manual_seed(0))
        assert torch.equal(r["plan"][:, 0], c["start"]) and torch.equal(r["plan"][:, -1], c["goal"])
        assert p.nfe("interp_distilled") == {"phase1_student": 2}
        with pytest.raises(CheckpointError, match="distilled phase2 student"):
            p.sample(c, "two_phase_distilled")
    else:
        assert d["levels"] == [0, 1] and d["steps"] == 2 and d["mode"] == "regression"
        rows = list(csv_rows(path.parent / "model_metrics.csv"))
        assert len(rows) == 3 and all(float(r["loss"]) >= 0 for r in rows)


def csv_rows(path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


def test_two_phase_distilled_planner_end_to_end(monkeypatch, teachers):
    """Phase-1 and phase-2 students in one planner: plans hit start/goal, NFE = 2 + 1."""
    import maze.data
    from maze.distill import main
    from maze.planner import Planner

    monkeypatch.setattr(maze.data, "load_split", lambda root, split, keyframes=None: tiny_split())
    root = teachers / "e2e"
    for t in ("phase1", "phase2"):
        cfg = distill_cfg(teachers, t, "scm", [f"distill.{t}.run_dir={root}/{t}"])
        main(cfg)
    p = Planner.from_checkpoint(teachers)
    p.settings.index_source = "uniform"
    p.load_students({"phase1": root / "phase1", "phase2": root / "phase2" / "model.pt"})
    c = cond(3)
    r = p.sample(c, "two_phase_distilled", generator=torch.Generator().manual_seed(0))
    assert r["plan"].shape == (3, T, 2) and torch.equal(r["plan"][:, 0], c["start"]) and torch.equal(r["plan"][:, -1], c["goal"])
    assert ((r["plan"] >= 0) & (r["plan"] <= 1)).all()
    assert p.nfe("two_phase_distilled") == {"phase1_student": 2, "phase2_student": 1}


def test_errors_name_the_path_target_and_key(tmp_path, teachers):
    from maze.distill import load_student, load_teacher, main

    with pytest.raises(CheckpointError, match=r"distilled full student checkpoint .*nowhere/model.pt.* does not exist"):
        load_student(tmp_path / "nowhere", "full")
    with pytest.raises(CheckpointError, match=r"nothing\.pt.* does not exist"):
        load_student(tmp_path / "nothing.pt", "phase1")
    with pytest.raises(CheckpointError, match=r"baseline/model.pt. is an undistilled baseline model"):
        load_student(teachers / "baseline" / "model.pt", "full")
    with pytest.raises(CheckpointError, match=r"holds a 'phase1' model; expected 'baseline'"):
        load_student(teachers / "phase1" / "model.pt", "full")
    with pytest.raises(ValueError, match="target='phase3'"):
        load_student(teachers / "phase1", "phase3")
    cfg = distill_cfg(teachers, "phase2", extra=[f"phase2.run_dir={tmp_path}/missing_p2"])
    with pytest.raises(CheckpointError, match=r"distill.target=phase2 teacher checkpoint .*missing_p2/model.pt.* maze.train_phase2"):
        main(cfg)
    with pytest.raises(CheckpointError, match="missing_p2"):
        load_teacher(cfg, "phase2")
    with pytest.raises(ValueError, match=r"distill.target='phase3'"):
        load_config(MazeConfig, None, ["distill.target=phase3"])
    with pytest.raises(ValueError, match=r"distill.phase2.steps=3"):
        load_config(MazeConfig, None, ["distill.phase2.steps=3"])
    with pytest.raises(ValueError, match=r"distill.full.steps=4, distill.full.mid_times=\[1.0\]"):
        load_config(MazeConfig, None, ["distill.full.mid_times=[1.0]"])
    with pytest.raises(ValueError, match=r"distill.mode='dmd'"):
        load_config(MazeConfig, None, ["distill.mode=dmd"])
    with pytest.raises(ValueError, match=r"eval.methods: 'full_distiled'"):
        load_config(MazeConfig, None, ["eval.methods=[full_distiled]"])
    from interpdiff.distill import phase2_student_levels

    with pytest.raises(ValueError, match=r"distill.phase2_levels=\[0, 3\]"):
        phase2_student_levels(4, 2, [0, 3])


def test_milestone_checks_on_hand_built_measurements():
    from maze.report import milestone, milestone_markdown, milestone_rows

    def m(c, x, e):
        return {"collision": c, "crossings": x, "mse": e}

    res = {"open_loop": {"n": 10, "methods": {"two_phase_distilled": m(0.02, 0.01, 5e-5), "full_distilled": m(0.01, 0.01, 4e-5),
                                              "full": m(0.0, 0.0, 3e-5)}},
           "closed_loop": {"umaze": {"episodes": 4, "policies": {"two_phase_distilled": {"success": 1.0},
                                                                  "full_distilled": {"success": 0.75}, "full": {"success": 1.0}}}},
           "cost": {"two_phase_distilled": {"flops": 20, "nfe_total": 3, "nfe": {"phase1_student": 2, "phase2_student": 1}},
                    "full_distilled": {"flops": 50, "nfe_total": 4, "nfe": {"full_student": 4}},
                    "full": {"flops": 200, "nfe_total": 20, "nfe": {"baseline": 20}}}}
    checks = {name.split(":")[0]: ok for name, ok, _ in milestone(res)}
    assert checks == {"(a) collision": False, "(a) crossings": True, "(a) mse": False,
                      "(a) closed-loop success (umaze)": True, "(b) FLOPs per plan": True}
    rows = milestone_rows(res)
    assert [r["method"] for r in rows] == ["two_phase_distilled", "full_distilled", "full"]
    assert rows[1]["success"] == 0.75 and rows[0]["flops"] == 20 and rows[2]["nfe"] == 20
    md = "\n".join(milestone_markdown(res))
    assert "| two-phase, distilled | 0.020 | 0.010 | 5.00e-05 | 1.00 | 0.0 M | 3 (phase1_student 2, phase2_student 1) |" in md
    assert "| (b) FLOPs per plan: two-phase distilled <= 0.5 x full-sequence distilled | PASS | " in md
    del res["open_loop"]["methods"]["full_distilled"]
    assert milestone(res) == []


def test_init_only_writes_the_teacher_weights_as_a_step_zero_student(monkeypatch, teachers):
    import maze.data
    from maze.distill import load_student, load_teacher, main

    monkeypatch.setattr(maze.data, "load_split", lambda root, split, keyframes=None: tiny_split())
    cfg = distill_cfg(teachers, "full", extra=["distill.init_only=true", f"distill.full.run_dir={teachers}/init/full"])
    model, meta = load_student(main(cfg), "full")
    teacher, _ = load_teacher(cfg, "full")
    assert meta["step"] == 0 and meta["distill"]["times"][0] == pytest.approx(math.atan(80.0))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), teacher.state_dict().values()))
