"""Step distillation of the maze teachers (METHOD.md section 1's milestone, on the prototype).

    python -m maze.distill --config configs/maze/small.yaml --config configs/maze/small_model.yaml \\
        --config configs/maze/small_result.yaml --config configs/maze/distill_small.yaml distill.target=full
    ... distill.target=phase1
    ... distill.target=phase2
    python -m maze.evaluate (same four files)      # methods full_distilled, two_phase_distilled, interp_distilled

The rCM math is ``interpdiff.distill``'s (TrigFlow conversion ``trig_model``, ``jvp``, ``scm_tangent``,
``scm_loss``, ``discrete_consistency_loss``, ``consistency_sample``); this module is the maze glue,
like ``interpdiff.video.distill_wan`` is the Wan glue. Every student starts as a copy of its
teacher's weights (the maze models are small: no LoRA) and is written with ``maze.models``'
``train_loop`` (AdamW, warm-up/cosine, grad clip, EMA, atomic checkpoint with the sizes and a
``distill`` metadata entry, resume), so ``load_student`` rebuilds it from the checkpoint alone.

Targets (``distill.target``; teachers from ``baseline.run_dir`` / ``phase1.run_dir`` / ``phase2.run_dir``):

* ``full``: the full-sequence baseline (20 Euler steps) -> a ``distill.full.steps``-step (4)
  consistency student: the "4-step rCM full-sequence model" of the milestone.
* ``phase1``: the keyframe model (8 Euler steps) -> a ``distill.phase1.steps``-step (1-2) student,
  with the keyframe indices / ``kp_feat`` / known endpoints built as in ``maze.train_phase1``
  (the teacher's stored index-policy mix and ``feat_diffs``) and ``maze.sampler.sample_keyframes``.
* ``phase2``: the refiner over its S levels -> a 1 or 2 step refiner (``distill.phase2.steps``).

**Flow model -> TrigFlow.** The maze flow models are called ``model(z, sigma, ...)`` with the raw
flow time ``sigma`` in [0, 1] (they embed ``1000 sigma`` themselves) in the model space
``z = 2 (x - 0.5)`` (about unit scale, so TrigFlow's ``sigma_d = 1`` fits). ``flow_velocity`` is the
adapter ``velocity(x_sigma, 1000 sigma)`` that ``interpdiff.distill.trig_model`` expects.

**Known endpoints (start/goal).** The teachers were trained with the known points *clean* at every
noise level (``known = 1``, no loss) and ``sample_full`` / ``sample_keyframes`` clamp them after
every Euler step. The adapter does the same in TrigFlow space: it replaces the known points of its
input by their clean values before every network call (so the network sees exactly the inputs of
training and of the Euler samplers, the JVP's tangent is 0 there), the sCM / discrete losses are
masked to the free points, and the consistency sampler clamps ``x0`` at the known points after its
last step (the intermediate ``x0`` at the known points is re-noised and then overwritten by the
adapter again, so clamping after every step would give the same plan).

**sCM** (``distill.mode=scm``): data ``z0``, ``t = atan(exp(N(p_mean, p_std^2)))``,
``x_t = cos t z0 + sin t eps``, teacher velocity ``dx/dt = F_teacher(x_t, t)``, the rearranged JVP
``cos t sin t dF_student/dt`` along it (``distill.jvp=autograd``: ``torch.func.jvp`` with the
attention on the math SDPA kernel, ``torch.nn.attention.sdpa_kernel(MATH)``, because CPU's flash SDPA
has no forward-AD rule; ``finite_difference``: central difference with ``distill.fd_size``), the
tangent ``g`` (tangent warm-up ``r`` over ``distill.tangent_warmup`` steps, normalised per sample) and
``scm_weight * sum (F_theta - sg(F_theta) - g)^2`` over the free points. No adaptive weighting,
no DMD regulariser (sCM alone). **Discrete** (``distill.mode=discrete``): one TrigFlow DDIM
teacher step ``t -> t - delta`` and ``|f_theta(x_t, t) - sg(f_theta(x_t', t'))|^2 / delta^2``.

**sCM on these teachers** (measured, ``configs/maze/distill_small.yaml``): the maze models embed the flow time
as ``1000 sigma`` through unit-frequency sinusoids, so ``F`` wiggles in ``t`` on a ~1e-2 rad scale and the
JVP's time part is as large as its ``x`` part (a central difference at 1e-2 rad differs from the exact JVP by
40 % at ``t = 0.3``). sCM training degraded the students (phase-1 collapsed within 500 steps at lr 1e-4; at
1e-5 the few-step plans got worse than the teacher's own weights in the same sampler); the discrete mode,
which only sees the teacher ODE over ``delta = 0.05`` rad, did not, so the CPU runs use it. sCM's remedy
(a small time-embedding scale) would need teachers trained with it. ``distill.init_only`` writes the
teacher-initialised student without training: the step-0 reference of what distillation adds.

**Few-step sampling**: ``interpdiff.distill.consistency_sample`` at the TrigFlow times
``consistency_times(steps, distill.<target>.mid_times, distill.sigma_max)`` (stored in the checkpoint).

**Phase-2 student.** The phase-2 corruption is not Gaussian (no PF-ODE, nothing for a JVP), so
as in ``interpdiff.video.distill_wan``: the student maps the level-0 state (1 step), or the
level-0 state and a mid level ``m = (S-1)//2`` (2 steps), to the output of the teacher's full
TACoS chain (``maze.sampler.refine_levels`` with the teacher's sigmas, anchor confidence and position
clip, sampling noise ``distill.phase2_teacher_noise`` = ``none``: a deterministic target). Loss: the
refiner's own ``mean ||z(x0_hat) - z(target)||^2`` over the missing frames of the input level. The
level-0 state in training is ``I(x*, M_0)`` with the data's keyframes at ``M_0`` (the teacher's
stored mask-policy mix); at sampling it is the interpolation of the phase-1 student's keyframes
(the maze two-phase sampler adds no level-0 noise). In the 2-step student the level-m input is the
TACoS jump ``tacos_step(x_0, x0_hat, M_0, M_m)`` (positions clipped): from the teacher target in
training, from the student's own level-0 prediction at sampling. Keyframes of the current level
stay clamped (the refiner's ``missing_residual`` output and a final ``where``), positions are
clipped to [0, 1].
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from interpdiff import distill as D
from interpdiff.corruption import anchor_confidence, tacos_step
from interpdiff.interpolate import interpolate
from interpdiff.io import CheckpointError
from interpdiff.masks import mask_to_indices
from maze.config_model import DISTILL_TARGETS
from maze.models import from_z, load_model, to_z
from maze.sampler import endpoint_values, endpoints_known, gather_keyframes, refine_levels

TEACHER_KIND = {"full": "baseline", "phase1": "phase1", "phase2": "phase2"}  # distill.target -> model kind
TEACHER_TRAINER = {"full": "maze.train_baseline", "phase1": "maze.train_phase1", "phase2": "maze.train_phase2"}
MODEL_FILE = "model.pt"


# --- flow model -> TrigFlow ---------------------------------------------------------------------


def flow_velocity(model, cond: dict, known_B_L: torch.Tensor, z_known_B_L_2: torch.Tensor, enc=None,
                  idx_B_K: torch.Tensor | None = None, feat_B_K_5: torch.Tensor | None = None):
    """``velocity(x_sigma, 1000 sigma) -> v`` of a maze flow model (baseline or phase-1) for
    ``interpdiff.distill.trig_model``; the known points are held at ``z_known`` (module doc)."""
    if model.kind not in ("baseline", "phase1"):
        raise ValueError(f"flow_velocity: model kind {model.kind!r} is not a flow model (baseline | phase1)")
    if model.kind == "phase1" and (idx_B_K is None or feat_B_K_5 is None):
        raise ValueError("flow_velocity: a phase-1 model needs idx_B_K and feat_B_K_5")

    def v(x_sigma: torch.Tensor, ts_B: torch.Tensor) -> torch.Tensor:
        x = torch.where(known_B_L[..., None], z_known_B_L_2.to(x_sigma.dtype), x_sigma)
        sigma_B = ts_B / 1000.0  # the maze models take the raw flow time and embed 1000 sigma themselves
        if model.kind == "phase1":
            return model(x, sigma_B, idx_B_K, feat_B_K_5, known_B_L, cond, enc)
        return model(x, sigma_B, known_B_L, cond, enc)

    return v


def trig_F(model, cond, known_B_L, z_known_B_L_2, enc=None, idx_B_K=None, feat_B_K_5=None) -> D.TrigModel:
    """TrigFlow velocity ``F(x_t, t)`` of a maze flow model (``trig_model`` of ``flow_velocity``)."""
    return D.trig_model(flow_velocity(model, cond, known_B_L, z_known_B_L_2, enc, idx_B_K, feat_B_K_5))


# --- few-step samplers ---------------------------------------------------------------------------


def student_times(meta: dict) -> list[float]:
    """The consistency times stored in a full / phase-1 student's checkpoint metadata."""
    d = meta.get("distill") or {}
    if "times" not in d:
        raise CheckpointError(f"student metadata has no distill.times (keys {sorted(d)}); not a maze.distill checkpoint")
    return [float(t) for t in d["times"]]


@torch.no_grad()
def consistency_sample_full(student, cond: dict, times, generator=None) -> torch.Tensor:
    """Few-step consistency sampling of a distilled baseline: ``[B, T, 2]`` in [0, 1], start/goal
    inpainted at frames 0 and T-1 (held in the adapter, clamped in the result)."""
    B, T = cond["start"].shape[0], student.T
    dev = cond["start"].device
    idx = torch.arange(T, device=dev).expand(B, T)
    known = endpoints_known(idx, T)
    x_known = endpoint_values(idx, T, cond["start"], cond["goal"])
    F = trig_F(student, cond, known, to_z(x_known), student.encode(cond))
    z = _consistency(F, (B, T, 2), times, generator, dev)
    return torch.where(known[..., None], x_known, from_z(z).clamp(0, 1))  # start/goal exactly (no z round trip)


@torch.no_grad()
def consistency_sample_keyframes(student, cond: dict, idx_B_K: torch.Tensor, kp_feat_B_K_5: torch.Tensor, times,
                                 generator=None) -> torch.Tensor:
    """Few-step consistency sampling of a distilled phase-1 model: keyframes ``[B, K, 2]`` in [0, 1]
    (same indices, features and known endpoints as ``maze.sampler.sample_keyframes``)."""
    T = student.T
    known = endpoints_known(idx_B_K, T)
    x_known = endpoint_values(idx_B_K, T, cond["start"], cond["goal"])
    F = trig_F(student, cond, known, to_z(x_known), student.encode(cond), idx_B_K, kp_feat_B_K_5)
    z = _consistency(F, (*idx_B_K.shape, 2), times, generator, idx_B_K.device)
    return torch.where(known[..., None], x_known, from_z(z).clamp(0, 1))


def _consistency(F, shape, times, generator, device) -> torch.Tensor:
    def randn():
        return torch.randn(shape, generator=generator).to(device)

    return D.consistency_sample(F, randn(), list(times), randn)


@torch.no_grad()
def phase2_student_refine(student, x_start_B_T_2: torch.Tensor, masks_B_S_T: torch.Tensor, cond: dict, levels,
                          confidence: str = "mask", pos_clip: bool = True) -> torch.Tensor:
    """The 1-2 step phase-2 student (module doc): ``x0_hat`` at each of ``levels`` with a TACoS jump
    between them, the last prediction with the current level's keyframes clamped; ``[B, T, 2]``."""
    return _phase2_student_forward(student, x_start_B_T_2, masks_B_S_T, cond, levels, confidence, pos_clip,
                                   student.encode(cond))


def _phase2_student_forward(student, x, masks_B_S_T, cond, levels, confidence, pos_clip, enc=None):
    B = x.shape[0]
    clip = (0.0, 1.0) if pos_clip else None
    for i, s in enumerate(levels):
        m = masks_B_S_T[:, s]
        x0_hat = student(x, torch.full((B,), s, device=x.device), anchor_confidence(m, confidence), cond, enc)
        if i + 1 < len(levels):
            x = tacos_step(x, x0_hat, m, masks_B_S_T[:, levels[i + 1]], time_dim=1, clip=clip)
        else:
            x = torch.where(m[..., None], x, x0_hat)
            x = x.clamp(*clip) if clip else x
    return x


# --- losses --------------------------------------------------------------------------------------


def consistency_loss(student, teacher, z0_B_L_2, known_B_L, cond, dc, step: int, generator,
                     idx_B_K=None, feat_B_K_5=None) -> tuple[torch.Tensor, dict]:
    """sCM (or discrete consistency) loss of a full / phase-1 student against its teacher, masked to
    the free (not known) points (module doc). ``z0`` is the data in model units (known points clean)."""
    B = z0_B_L_2.shape[0]
    z_known = z0_B_L_2
    free = (~known_B_L).to(torch.float64)[..., None]  # (B, L, 1)
    t_B = D.sample_trig_times(B, dc.p_mean, dc.p_std, 1.0, generator).float()
    eps = torch.randn(z0_B_L_2.shape, generator=generator)
    x_t = D.trig_noise(z0_B_L_2, eps, t_B)
    with torch.no_grad():
        F_T = trig_F(teacher, cond, known_B_L, z_known, teacher.encode(cond), idx_B_K, feat_B_K_5)(x_t, t_B)
    F_theta = trig_F(student, cond, known_B_L, z_known, None, idx_B_K, feat_B_K_5)(x_t, t_B)  # with gradients
    with torch.no_grad():
        enc_sg = student.encode(cond)
    F_sg_fn = trig_F(student, cond, known_B_L, z_known, enc_sg, idx_B_K, feat_B_K_5)
    logs = {"t_mean": float(t_B.mean())}
    if dc.mode == "scm":
        cs = torch.cos(t_B) * torch.sin(t_B)
        with sdpa_kernel(SDPBackend.MATH):  # CPU flash SDPA has no forward-AD rule; the math kernel has one
            _, jv = D.jvp(F_sg_fn, x_t, t_B, D._bc(cs, x_t) * F_T, cs, dc.jvp, dc.fd_size)
        F_sg = F_theta.detach()
        r = D.tangent_warmup(step, dc.tangent_warmup)
        g_raw = D.scm_tangent(x_t, t_B, F_sg, F_T, jv, r, norm_c=0.0) * free
        g = D.normalise_tangent(g_raw, dc.tangent_norm) if dc.tangent_norm > 0 else g_raw
        loss_B = dc.scm_weight * D.scm_loss(F_theta * free, F_sg * free, g)
        n_free = free.flatten(1).sum(1) * 2
        logs.update(tangent_rms=float((g_raw.pow(2).flatten(1).sum(1) / n_free).sqrt().mean()), tangent_r=r)
    else:
        delta_B = torch.minimum(torch.full_like(t_B, dc.delta), t_B)
        x_prev = D.trig_ddim_step(x_t, F_T, delta_B)
        t_prev = t_B - delta_B
        with torch.no_grad():
            f_target = D.consistency_fn(x_prev, t_prev, F_sg_fn(x_prev, t_prev))
        f_theta = D.consistency_fn(x_t, t_B, F_theta)
        # discrete_consistency_loss takes the mean over all elements; rescale to the mean over free points
        frac = free.flatten(1).mean(1)
        loss_B = D.discrete_consistency_loss(f_theta * free, f_target * free, delta_B) / frac
    return loss_B.mean().float(), logs


@torch.no_grad()
def phase2_teacher_target(teacher, x_start_B_T_2, masks_B_S_T, cond, p2: dict, noise: str = "none", generator=None):
    """The teacher's full TACoS chain output (``maze.sampler.refine_levels``) with its stored settings
    ``p2`` (``sigma_max``, ``sigma_min``, ``confidence``, ``pos_clip``, ``noise_scale``)."""
    x, _, _ = refine_levels(teacher, x_start_B_T_2, masks_B_S_T, cond, p2["sigma_max"], p2["sigma_min"],
                            p2["confidence"], noise, p2.get("noise_scale", 1.0), p2.get("pos_clip", True), generator)
    return x


def phase2_loss(student, teacher, x0_B_T_2, masks_B_S_T, cond, p2: dict, levels, noise: str, generator):
    """Regression of the 1-2 step student to the teacher chain (module doc) over the missing frames of
    the input level; returns ``(loss, logs)``."""
    B = x0_B_T_2.shape[0]
    x_start = interpolate(x0_B_T_2, masks_B_S_T[:, 0], time_dim=1)
    target = phase2_teacher_target(teacher, x_start, masks_B_S_T, cond, p2, noise, generator)
    pick = torch.randint(0, len(levels), (B,), generator=generator)
    s_B = torch.tensor(levels)[pick]
    ar = torch.arange(B)
    m_in = masks_B_S_T[ar, s_B]
    clip = (0.0, 1.0) if p2.get("pos_clip", True) else None
    with torch.no_grad():  # the input of level s as the sampler builds it: the TACoS jump from x_start by the target
        x_jump = tacos_step(x_start, target, masks_B_S_T[:, levels[0]], m_in, time_dim=1, clip=clip)
        x_in = torch.where((s_B == levels[0])[:, None, None], x_start, x_jump)
    x0_hat = student(x_in, s_B, anchor_confidence(m_in, p2["confidence"]), cond)
    miss = (~m_in).float()[..., None]
    n = miss.sum().clamp_min(1) * 2
    loss = ((to_z(x0_hat) - to_z(target)) ** 2 * miss).sum() / n
    with torch.no_grad():
        start_err = ((to_z(x_start) - to_z(target)) ** 2 * (~masks_B_S_T[:, 0]).float()[..., None]).sum() / (
            (~masks_B_S_T[:, 0]).float().sum().clamp_min(1) * 2)
    return loss, {"level_mean": float(s_B.float().mean()), "start_vs_teacher_mse": float(start_err)}


# --- checkpoints ---------------------------------------------------------------------------------


def teacher_dir(cfg, target: str) -> str:
    if target not in DISTILL_TARGETS:
        raise ValueError(f"distill.target={target!r} is not one of {list(DISTILL_TARGETS)}")
    return {"full": cfg.baseline.run_dir, "phase1": cfg.phase1.run_dir, "phase2": cfg.phase2.run_dir}[target]


def _model_file(run_dir, what: str, writer: str) -> Path:
    p = Path(run_dir) / MODEL_FILE
    if not p.is_file():
        raise CheckpointError(f"{what} checkpoint {str(p)!r} does not exist (expected the {MODEL_FILE} written by "
                              f"`python -m {writer}`)")
    return p


def load_teacher(cfg, target: str):
    """The trained teacher of ``target`` (EMA weights) and its metadata; a clear error names a missing path."""
    path = _model_file(teacher_dir(cfg, target), f"distill.target={target} teacher", TEACHER_TRAINER[target])
    model, meta = load_model(path, TEACHER_KIND[target])
    if meta.get("distill"):
        raise CheckpointError(f"teacher checkpoint {str(path)!r} is itself a distilled student (target "
                              f"{meta['distill'].get('target')!r}); expected a {TEACHER_TRAINER[target]} checkpoint")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), meta


def load_student(path, target: str):
    """A distilled student ``(model, meta)`` rebuilt from its checkpoint alone (file or run folder).

    ``CheckpointError`` names the path when it is missing, is not a ``maze.distill`` student, or was
    distilled for another target."""
    if target not in DISTILL_TARGETS:
        raise ValueError(f"load_student: target={target!r} is not one of {list(DISTILL_TARGETS)}")
    p = Path(path)
    if p.is_dir() or p.suffix != ".pt":
        p = _model_file(p, f"distilled {target} student", f"maze.distill distill.target={target}")
    elif not p.is_file():
        raise CheckpointError(f"distilled {target} student checkpoint {str(p)!r} does not exist "
                              f"(written by `python -m maze.distill distill.target={target}`)")
    model, meta = load_model(p, TEACHER_KIND[target])
    d = meta.get("distill")
    if not d:
        raise CheckpointError(f"checkpoint {str(p)!r} is an undistilled {TEACHER_KIND[target]} model (no 'distill' "
                              f"metadata); expected a student written by `python -m maze.distill distill.target={target}`")
    if d.get("target") != target:
        raise CheckpointError(f"checkpoint {str(p)!r} holds a distill.target={d.get('target')!r} student; expected {target!r}")
    return model.eval(), meta


# --- training ------------------------------------------------------------------------------------


def _cond(batch: dict) -> dict:
    return {k: batch[k] for k in ("occ", "sdf", "start", "goal")}


def make_loss(cfg, target: str, teacher, tmeta: dict, data, gen: torch.Generator):
    """``loss_fn(model, step) -> (loss, logs)`` for ``maze.models.train_loop`` and the metadata the
    sampler needs (``distill`` entry of the checkpoint)."""
    from interpdiff.masks import parse_policy_mix, sample_policy
    from maze.config_model import PHASE1_POLICIES, PHASE2_POLICIES
    from maze.planner import load_dphi_from_run, load_selector_from_run
    from maze.sampler import dphi_pair_cost, keyframe_features, policy_masks

    dc = cfg.distill
    st = dc.student(target)
    bs = st.optim.batch_size
    meta: dict = {"target": target, "steps": st.steps, "mode": dc.mode if target != "phase2" else "regression",
                  "teacher": str(_model_file(teacher_dir(cfg, target), "teacher", TEACHER_TRAINER[target])),
                  "teacher_step": tmeta.get("step")}

    if target == "full":
        meta["times"] = D.consistency_times(st.steps, st.mid_times, dc.sigma_max)

        def loss_fn(model, step):
            b = data.tensors(torch.randint(0, data.N, (bs,), generator=gen).numpy())
            z0 = to_z(b["pos"])
            B, T, _ = z0.shape
            known = endpoints_known(torch.arange(T).expand(B, T), T)
            return consistency_loss(model, teacher, z0, known, _cond(b), dc, step, gen)

        return loss_fn, meta

    mix = parse_policy_mix(tmeta.get("policy_mix") or ("uniform:1" if target == "phase1" else "uniform:1"),
                           PHASE1_POLICIES if target == "phase1" else PHASE2_POLICIES)
    selector = None
    if "selector" in mix:
        selector = load_selector_from_run(cfg.selector.run_dir, required=False)
        if selector is None:
            print(f"[maze.distill] no selector checkpoint in {cfg.selector.run_dir!r}: dropping 'selector' from the mix")
            mix = parse_policy_mix({k: v for k, v in mix.items() if k != "selector"},
                                   PHASE1_POLICIES if target == "phase1" else PHASE2_POLICIES)
    budgets = list(tmeta["budgets"])
    if list(data.budgets) != budgets:
        from maze.data import MazeDataError

        raise MazeDataError(f"data keyframe budgets {list(data.budgets)} ({cfg.data.root}) differ from the teacher's "
                            f"{budgets}: rerun python -m maze.prepare_keyframes with the teacher's keyframes settings")
    meta.update(policy_mix=mix)

    if target == "phase1":
        meta["times"] = D.consistency_times(st.steps, st.mid_times, dc.sigma_max)
        dphi = load_dphi_from_run(cfg.dphi.run_dir) if tmeta.get("feat_diffs", "none") == "dphi" else None

        def loss_fn(model, step):
            b = data.tensors(torch.randint(0, data.N, (bs,), generator=gen).numpy())
            cond = _cond(b)
            pol = sample_policy(mix, gen)
            m0 = policy_masks(pol, bs, data.T, budgets, b, gen, selector, cond)[:, 0]
            idx = mask_to_indices(m0)
            feat = gather_keyframes(keyframe_features(m0, dphi_pair_cost(dphi, cond) if dphi is not None else None), idx)
            z0 = to_z(gather_keyframes(b["pos"], idx))
            known = endpoints_known(idx, data.T)
            return consistency_loss(model, teacher, z0, known, cond, dc, step, gen, idx, feat)

        return loss_fn, meta

    p2 = {"sigma_max": float(tmeta["sigma_max"]), "sigma_min": float(tmeta["sigma_min"]), "confidence": tmeta["confidence"],
          "pos_clip": bool((tmeta.get("config") or {}).get("pos_clip", True)),
          "noise_scale": float((tmeta.get("config") or {}).get("noise_scale", 1.0))}
    levels = D.phase2_student_levels(len(budgets), st.steps, dc.phase2_levels)
    meta.update(levels=levels, teacher_noise=dc.phase2_teacher_noise, **p2)

    def loss_fn(model, step):
        b = data.tensors(torch.randint(0, data.N, (bs,), generator=gen).numpy())
        cond = _cond(b)
        masks = policy_masks(sample_policy(mix, gen), bs, data.T, budgets, b, gen, selector, cond)
        return phase2_loss(model, teacher, b["pos"], masks, cond, p2, levels, dc.phase2_teacher_noise, gen)

    return loss_fn, meta


def main(cfg) -> Path:
    """Distil ``cfg.distill.target``'s teacher into ``<distill.<target>.run_dir>/model.pt``."""
    from interpdiff.config import save_config, to_dict
    from maze.data import load_split
    from maze.models import train_loop

    dc = cfg.distill
    target = dc.target
    st = dc.student(target)
    if not st.run_dir:
        raise ValueError(f"distill.{target}.run_dir is empty: expected the folder the student's model.pt goes to")
    torch.manual_seed(st.optim.seed)
    teacher, tmeta = load_teacher(cfg, target)
    data = load_split(cfg.data.root, "train", keyframes=target != "full")
    if data.T != teacher.T:
        raise ValueError(f"data.root={cfg.data.root!r} has T={data.T}; the teacher was trained with T={teacher.T}")
    gen = torch.Generator().manual_seed(st.optim.seed)
    loss_fn, dmeta = make_loss(cfg, target, teacher, tmeta, data, gen)
    run_dir = Path(st.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    student = copy.deepcopy(teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    keep = {k: tmeta[k] for k in ("budgets", "feat_diffs", "sigmas", "sigma_max", "sigma_min", "confidence", "data_root")
            if k in tmeta}
    extra = {**keep, "config": tmeta.get("config", {}), "distill": {**dmeta, "config": to_dict(dc)}}
    path = run_dir / MODEL_FILE
    if dc.init_only:  # the step-0 reference: the teacher's weights under the student's sampler
        from maze.models import save_model

        save_model(path, student, student, {**extra, "step": 0})
        save_config(cfg, run_dir)
        print(f"[maze.distill] {target} student at step 0 (teacher weights, distill.init_only) -> {path}")
        return path
    train_loop(student, loss_fn, st.optim, path, extra, f"distill {target}", generator=gen,
               on_start=lambda: save_config(cfg, run_dir))
    print(f"[maze.distill] {target} student ({st.steps} steps) -> {path}")
    return path


if __name__ == "__main__":
    from maze.config_model import load_maze_config

    from maze.common import run_cli

    torch.set_num_threads(1)
    run_cli("maze.distill", lambda: main(load_maze_config(sys.argv[1:])))
