"""rCM step distillation (interpdiff.distill, interpdiff.video.distill_wan, distill_rcm.py, sample.py students).

References: a Gaussian toy flow whose teacher velocity and exact consistency function are closed
form (the sCM tangent must vanish there and equal ``cos t df/dt`` from a finite difference along
the exact ODE elsewhere); central finite differences for the JVP through the tiny Wan (fp64);
a hand-written discrete consistency loss; peft's own LoRA forward for the teacher merge; the
loss of a control run with lr ~ 0 for overfitting; an uninterrupted run for resume; decoders
(imageio, decord) for the mp4s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from interpdiff import distill as D
from interpdiff.config import ConfigError, load_config
from interpdiff.io import CheckpointError
from interpdiff.video import wan
from interpdiff.video import distill_wan as DW
from interpdiff.video.make_shards import MakeShardsConfig, make_shards
from interpdiff.video.objectives import Phase1Config, Phase2Config

REPO = Path(__file__).resolve().parents[1]


from conftest import load_script as _load  # noqa: E402


distill_rcm = _load("distill_rcm")
sample = _load("sample")


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# --- the Gaussian toy flow ----------------------------------------------------------------------
# x0 ~ N(0, s^2 I): v(t) = cos^2 t s^2 + sin^2 t, teacher F_T = sin t cos t (1 - s^2) / v(t) x,
# ODE solution x(t') = x(t) sqrt(v(t') / v(t)), exact consistency function f = s x / sqrt(v(t)).


def _v(t, s):
    return torch.cos(t) ** 2 * s**2 + torch.sin(t) ** 2


def _teacher(x, t, s):
    t = t.view(-1, *[1] * (x.dim() - 1))
    return torch.sin(t) * torch.cos(t) * (1 - s**2) / _v(t, s) * x


def _student(a):
    """Consistency family: the exact one for data std ``a``; F = (cos t x - f) / sin t."""

    def F(x, t):
        t = t.view(-1, *[1] * (x.dim() - 1))
        return (torch.cos(t) - a / torch.sqrt(_v(t, a))) * x / torch.sin(t)

    return F


@pytest.mark.parametrize("method", ["autograd", "finite_difference"])
def test_scm_tangent_vanishes_at_the_exact_consistency_function(method):
    s = 0.6
    g0 = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, generator=g0, dtype=torch.float64)
    t = torch.tensor([0.1, 0.4, 0.8, 1.2, 1.5], dtype=torch.float64)
    cs = torch.cos(t) * torch.sin(t)
    F_T = _teacher(x, t, s)

    def tangent(a):
        F_sg, jv = D.jvp(_student(a), x, t, D._bc(cs, x) * F_T, cs, method, fd_size=1e-5)
        return F_sg, D.scm_tangent(x, t, F_sg, F_T, jv, r=1.0, norm_c=0.0)

    _, g = tangent(torch.tensor(s, dtype=torch.float64))
    assert g.abs().max() < (1e-12 if method == "autograd" else 1e-7)
    # elsewhere: g = cos t * df/dt along the exact teacher ODE (central difference in t)
    a = torch.tensor(1.3 * s, dtype=torch.float64)
    _, g = tangent(a)
    h = 1e-5

    def f_along(dt):
        tt = t + dt
        xx = x * torch.sqrt(_v(tt, s) / _v(t, s)).view(-1, 1, 1)
        return D.consistency_fn(xx, tt, _student(a)(xx, tt))

    ref = torch.cos(t).view(-1, 1, 1) * (f_along(h) - f_along(-h)) / (2 * h)
    assert g.abs().max() > 1e-2
    torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-8)


def test_scm_gradient_vanishes_only_at_the_exact_student():
    """The gradient the sCM loss gives the student's parameter (the data std ``a`` of the family)
    is ~0 at ``a = s`` and pushes ``a`` towards ``s`` from either side."""
    s = 0.6
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = D.sample_trig_times(64, -0.8, 1.6, generator=torch.Generator().manual_seed(2))
    cs = torch.cos(t) * torch.sin(t)
    F_T = _teacher(x, t, s)
    grads = {}
    for a0 in (0.45, 0.6, 0.75):
        a = torch.tensor(a0, dtype=torch.float64, requires_grad=True)
        F_sg, jv = D.jvp(_student(a.detach()), x, t, D._bc(cs, x) * F_T, cs)
        g = D.scm_tangent(x, t, F_sg, F_T, jv, r=1.0, norm_c=0.1)
        D.scm_loss(_student(a)(x, t), F_sg, g).mean().backward()
        grads[a0] = float(a.grad)
    assert abs(grads[0.6]) < 1e-9
    assert grads[0.45] < -1e-4 and grads[0.75] > 1e-4  # gradient descent moves a towards s


@pytest.mark.parametrize("mode", ["scm", "discrete"])
def test_training_on_the_toy_flow_finds_the_exact_consistency_function(mode):
    """Adam on the sCM (tangent warmup, normalisation) or the discrete loss, Gaussian data of std
    0.5, a student family whose member ``a = s`` is the exact consistency function: ``a`` goes
    from 1.0 to ``s`` (the discrete fixed point is off by the DDIM step's error, O(delta))."""
    s = 0.5
    a = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([a], lr=0.02)
    g = torch.Generator().manual_seed(0)
    for step in range(300):
        x0 = s * torch.randn(32, 4, generator=g, dtype=torch.float64)
        eps = torch.randn(32, 4, generator=g, dtype=torch.float64)
        t = D.sample_trig_times(32, -0.8, 1.6, generator=g)
        x_t = D.trig_noise(x0, eps, t)
        F_T = _teacher(x_t, t, s)
        if mode == "scm":
            cs = torch.cos(t) * torch.sin(t)
            F_sg, jv = D.jvp(_student(a.detach()), x_t, t, D._bc(cs, x_t) * F_T, cs)
            g_t = D.scm_tangent(x_t, t, F_sg, F_T, jv, r=D.tangent_warmup(step, 50), norm_c=0.1)
            loss = D.scm_loss(_student(a)(x_t, t), F_sg, g_t).mean()
        else:
            d = torch.minimum(torch.full_like(t, 0.01), t / 2)  # the toy family is singular at t = 0
            x_prev = D.trig_ddim_step(x_t, F_T, d)
            with torch.no_grad():
                f_tgt = D.consistency_fn(x_prev, t - d, _student(a)(x_prev, t - d))
            loss = D.discrete_consistency_loss(D.consistency_fn(x_t, t, _student(a)(x_t, t)), f_tgt, d).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(a) == pytest.approx(s, abs=0.01 if mode == "scm" else 0.03), float(a)


def test_consistency_sampler_with_the_exact_function_draws_the_data_distribution():
    s = 0.6
    eps = torch.randn(20000, 4, generator=torch.Generator().manual_seed(3))
    F = _student(torch.tensor(s, dtype=torch.float64))
    for steps in (1, 3):
        out = D.consistency_sample(lambda x, t: F(x.double(), t.double()), eps, D.consistency_times(steps),
                                   noise=lambda: torch.randn(20000, 4))
        assert out.std().item() == pytest.approx(s, rel=0.02)
    assert D.consistency_times(4) == [math.atan(80.0), 1.5, 1.4, 1.0]


def test_discrete_loss_equals_a_hand_computation():
    """Student F = a x t, teacher F = 0.3 x + t; one TrigFlow DDIM teacher step of delta, the
    stop-grad target f(x', t'), the loss mean (f - f')^2 / delta^2, written out by hand."""
    a, delta = 0.7, 0.1
    x = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)
    t = torch.tensor([0.9, 0.3], dtype=torch.float64)

    def F_s(x, t):
        return a * x * t.view(-1, 1)

    def F_t(x, t):
        return 0.3 * x + t.view(-1, 1)

    d = torch.full_like(t, delta)
    x_prev = D.trig_ddim_step(x, F_t(x, t), d)
    f_target = D.consistency_fn(x_prev, t - d, F_s(x_prev, t - d))
    got = D.discrete_consistency_loss(D.consistency_fn(x, t, F_s(x, t)), f_target, d)
    want = []
    for b in range(2):
        tb = float(t[b])
        errs = []
        for i in range(2):
            xi = float(x[b, i])
            xp = math.cos(delta) * xi - math.sin(delta) * (0.3 * xi + tb)
            tp = tb - delta
            f_tgt = math.cos(tp) * xp - math.sin(tp) * a * xp * tp
            f_st = math.cos(tb) * xi - math.sin(tb) * a * xi * tb
            errs.append((f_st - f_tgt) ** 2)
        want.append(sum(errs) / 2 / delta**2)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    # the DDIM step is exact for x_t = cos t x0 + sin t eps with the true F
    x0, e = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    tt = torch.tensor([0.5, 1.0, 1.4], dtype=torch.float64)
    Ftrue = torch.cos(tt)[:, None] * e - torch.sin(tt)[:, None] * x0
    torch.testing.assert_close(D.trig_ddim_step(D.trig_noise(x0, e, tt), Ftrue, torch.full_like(tt, 0.3)),
                               D.trig_noise(x0, e, tt - 0.3))


def test_dmd_generator_loss_gradient_is_the_normalised_score_difference():
    xg = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    fake, real = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    D.dmd_generator_loss(xg, fake, real).sum().backward()
    w = (xg.detach() - real).abs().mean(1, keepdim=True)
    torch.testing.assert_close(xg.grad, 2 * (fake - real) / w)


# --- tiny Wan: JVP, merge, adapters ---------------------------------------------------------------


def _tiny(dtype=torch.float64, rope=True, seed=0):
    tr = wan.build_tiny_transformer(seed=seed, dtype=dtype)
    if rope:
        wan.install_keyframe_rope(tr)
    return tr


def _randomise_lora(tr, std=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in tr.named_parameters():
            if "lora_B" in n:
                p.copy_(std * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def _jvp_case():
    """A tiny fp64 Wan with a random student adapter and keyframe rope, its TrigFlow model ``F`` and a
    JVP point ``(x, t)`` with tangent ``(dx, dt)``."""
    torch.manual_seed(0)
    tr = _tiny()
    wan.set_attention_backend(tr, "sdpa")
    DW.add_adapters(tr, wan.LoraSpec(rank=2, alpha=2), [DW.STUDENT], seed=0)
    tr.double()
    _randomise_lora(tr)
    B, C, K, H, W = 2, 16, 3, 4, 6
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, K, H, W, generator=g, dtype=torch.float64)
    t = torch.tensor([0.4, 1.1], dtype=torch.float64)
    emb = torch.randn(B, 16, 32, generator=g, dtype=torch.float64)
    idx = torch.tensor([[0, 4, 8], [0, 2, 8]])
    F = D.trig_model(lambda xs, ts: wan.wan_forward(tr, xs, ts, emb, frame_idx_B_K=idx))
    dx, dt = torch.randn(x.shape, generator=g, dtype=torch.float64), torch.tensor([0.3, -0.2], dtype=torch.float64)
    return tr, F, x, t, dx, dt


def test_forward_ad_through_wan_attention_and_fd_jvp():
    """Finding (written in distill_wan's docstring): the CPU SDPA kernel diffusers' sdpa backend
    dispatches to has no forward-AD rule; the math kernel (``jvp_attention``, also chunked) has,
    and the autograd JVP through attention, LoRA and keyframe rope equals a central difference."""
    tr, F, x, t, dx, dt = _jvp_case()
    with pytest.raises(NotImplementedError, match="forward AD"):
        D.jvp(F, x, t, dx, dt, "autograd")
    with DW.jvp_attention(tr):
        out, jv = D.jvp(F, x, t, dx, dt, "autograd")
    with DW.jvp_attention(tr, chunk=7):  # 3 x 2 x 3 = 18 tokens -> chunks of 7, 7, 4
        out_c, jv_c = D.jvp(F, x, t, dx, dt, "autograd")
    procs = [m.processor for m in tr.modules() if hasattr(m, "processor")]
    assert all(str(p._attention_backend) != "AttentionBackendName._NATIVE_MATH" for p in procs)  # restored
    torch.testing.assert_close(out, F(x, t))
    torch.testing.assert_close(jv_c, jv, rtol=1e-10, atol=1e-10)
    # Wan's sinusoidal timestep embedding (timestep 1000 sigma, frequencies up to 1 per unit) makes F
    # oscillate in t on a ~1e-3 rad scale: the difference converges only for steps ~1e-4 (rCM's fd_size)
    err = {h: float((D.jvp(F, x, t, dx, dt, "finite_difference", fd_size=h)[1] - jv).abs().max()) for h in (1e-3, 1e-4)}
    scale = float(jv.abs().max())
    assert scale > 0.1 and err[1e-4] < 2e-3 * scale and err[1e-4] < 0.3 * err[1e-3], (err, scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_installed_teacher_is_the_trained_phase_lora(tmp_path, dtype):
    """The distillation teacher (``install_teacher``: the LoRA as a frozen adapter, phase-2 widening
    included) gives the bits of the trained LoRA model loaded as ``sample.py`` loads it
    (``wan.load_lora``), alone and under a fresh student adapter (B = 0), with an fp32 and a bf16
    base. Merging the LoRA into a bf16 base (the previous layout, written out here) does not:
    rounding ``W + delta`` to bf16 loses LoRA entries below half a bf16 step of the weight."""
    tr = _tiny(torch.float32, rope=False)
    wan.widen_patch_embedding(tr, ("mask",))
    wan.add_lora(tr, wan.LoraSpec(rank=4, alpha=8))
    _randomise_lora(tr, std=0.02)
    with torch.no_grad():
        tr.patch_embedding.extra_weight.normal_(0, 0.1)
    wan.save_lora(tr, tmp_path / "t", extra_meta={"phase": 2})
    ref = _tiny(dtype, rope=False, seed=0)
    wan.load_lora(ref, tmp_path / "t")
    teacher = _tiny(dtype, rope=False, seed=0)
    DW.install_teacher(teacher, tmp_path / "t")
    assert not [n for n, p in teacher.named_parameters() if p.requires_grad]
    assert teacher.patch_embedding.extra_weight.dtype == torch.float32
    assert torch.equal(teacher.patch_embedding.extra_weight, tr.patch_embedding.extra_weight.detach())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 3, 4, 6, generator=g).to(dtype)
    extra = torch.rand(2, 1, 3, 4, 6, generator=g).to(dtype)
    emb = torch.randn(2, 16, 32, generator=g).to(dtype)
    ts = torch.tensor([300.0, 800.0])
    with torch.no_grad():
        a = wan.wan_forward(ref.eval(), x, ts, emb, extra_B_E_T_H_W=extra)
        b = wan.wan_forward(teacher.eval(), x, ts, emb, extra_B_E_T_H_W=extra)
        assert torch.equal(a, b)
        DW.add_adapters(teacher, wan.LoraSpec(rank=2, alpha=2), [DW.STUDENT], seed=0)
        assert DW.active_adapter(teacher) == DW.STUDENT
        assert torch.equal(wan.wan_forward(teacher.eval(), x, ts, emb, extra_B_E_T_H_W=extra), a)
        with DW.use_adapter(teacher, None):
            assert DW.active_adapter(teacher) is None
            assert torch.equal(wan.wan_forward(teacher.eval(), x, ts, emb, extra_B_E_T_H_W=extra), a)
        if dtype == torch.bfloat16:  # the merged layout, for comparison
            base = _tiny(dtype, rope=False, seed=0)
            mods = dict(base.named_modules())
            for n, m in ref.named_modules():
                if hasattr(m, "lora_A") and "default" in m.lora_A:
                    delta = m.scaling["default"] * (m.lora_B["default"].weight.float() @ m.lora_A["default"].weight.float())
                    w = mods[n].weight
                    w.copy_((w.float() + delta).to(w.dtype))
            lost = sum(int(((mods[n].weight.float() - m.base_layer.weight.float()) == 0).sum()) for n, m in ref.named_modules()
                       if hasattr(m, "lora_A") and "default" in m.lora_A)
            assert lost > 0  # LoRA entries rounded away by the merge


def test_student_metadata_records_the_tacos_rule(tmp_path):
    """Students record which phase-2 jump they were trained on (the noise-rescaled TACoS step), so a
    2-step phase-2 student from before the change can be recognised at load."""
    cfg = _cfg(tmp_path)
    assert DW.distill_meta(cfg, None)["distill"]["tacos_rule"] == DW.TACOS_RULE == "noise_rescaled"


def _cfg(tmp_path, shards="unused_*.tar", *over):
    return load_config(DW.DistillTrainConfig, REPO / "configs/video/rcm_tiny_cpu.yaml",
                       [f"data.shards={shards}", f"train.run_dir={tmp_path}/r", *over])


def _batch(B=2, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"lat": torch.randn(B, 16, T, 4, 6, generator=g), "emb": torch.randn(B, 16, 32, generator=g),
            "keys": [f"k{i}" for i in range(B)], "prompts": ["x"] * B}


def _grads(tr, name):
    return [p.grad for _, p in DW.adapter_parameters(tr, name)]


def _is_zero(gs):
    return all(g is None or float(g.abs().max()) == 0.0 for g in gs)


def _is_nonzero(gs):
    return all(g is not None for g in gs) and sum(float(g.abs().sum()) for g in gs) > 0


@pytest.mark.parametrize("mode", ["scm", "discrete"])
def test_each_adapter_gets_gradients_only_from_its_own_terms(tmp_path, monkeypatch, mode):
    cfg = _cfg(tmp_path, "unused_*.tar", f"distill.mode={mode}", "distill.dmd.start_step=0", "distill.teacher_guidance=1")
    tr = DW.build_distill_transformer(cfg, None)
    _randomise_lora(tr, 0.05)  # both adapters away from zero: every term has a non-trivial graph
    base = [p for n, p in tr.named_parameters() if "lora_" not in n]
    assert base and not any(p.requires_grad for p in base)
    ctx = DW.LossContext(cfg=cfg, policy=None, neg_L_D=None, p2=None, seed=0)
    batch = _batch()

    def run(**scale):
        tr.zero_grad(set_to_none=True)
        for fn in ("scm_loss", "normalised_discrete_loss", "dmd_generator_loss"):
            orig = getattr(D, fn)
            k = scale.get(fn, 1.0)
            monkeypatch.setattr(D, fn, lambda *a, _o=orig, _k=k, **kw: _k * _o(*a, **kw))
        c = dataclasses.replace(cfg, distill=dataclasses.replace(
            cfg.distill, dmd=dataclasses.replace(cfg.distill.dmd, fake_weight=scale.get("fake", 1.0))))
        loss, metrics = DW.gaussian_target_loss(tr, batch, 3, dataclasses.replace(ctx, cfg=c))
        loss.backward()
        monkeypatch.undo()
        return metrics

    cons = "scm_loss" if mode == "scm" else "normalised_discrete_loss"
    m = run()
    assert {"loss_dmd", "loss_fake"} <= set(m)
    assert _is_nonzero(_grads(tr, DW.STUDENT)) and _is_nonzero(_grads(tr, DW.FAKE))
    assert all(p.grad is None for p in base)  # the teacher (frozen base) gets nothing
    run(**{cons: 0.0, "dmd_generator_loss": 0.0})  # only the fake-score term
    assert _is_zero(_grads(tr, DW.STUDENT)) and _is_nonzero(_grads(tr, DW.FAKE))
    run(**{cons: 0.0, "fake": 0.0})  # only the DMD generator term
    assert _is_nonzero(_grads(tr, DW.STUDENT)) and _is_zero(_grads(tr, DW.FAKE))
    run(**{"dmd_generator_loss": 0.0, "fake": 0.0})  # only the consistency term
    assert _is_nonzero(_grads(tr, DW.STUDENT)) and _is_zero(_grads(tr, DW.FAKE))


def test_scm_loss_uses_the_students_own_forward_as_the_stop_gradient_copy(tmp_path, monkeypatch):
    """The JVP's primal comes from another attention kernel (math, chunked) than the student forward,
    so in bf16 it differs from it; it must not enter the loss (rCM uses ``F_theta.detach()``): shifting
    the primal the JVP returns by a constant leaves the loss and the student's gradients unchanged."""
    cfg = _cfg(tmp_path, "unused_*.tar", "distill.dmd.weight=0", "distill.teacher_guidance=1")
    tr = DW.build_distill_transformer(cfg, None)
    _randomise_lora(tr, 0.05)
    ctx = DW.LossContext(cfg=cfg, policy=None, neg_L_D=None, p2=None, seed=0)
    orig = D.jvp

    def run(shift):
        tr.zero_grad(set_to_none=True)
        monkeypatch.setattr(D, "jvp", lambda *a, **k: (lambda o: (o[0] + shift, o[1]))(orig(*a, **k)))
        loss, _ = DW.gaussian_target_loss(tr, _batch(), 3, ctx)
        loss.backward()
        monkeypatch.undo()
        return loss.detach(), [g.clone() for g in _grads(tr, DW.STUDENT)]

    (l0, g0), (l1, g1) = run(0.0), run(0.5)
    assert _is_nonzero(g0)
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_gradient_checkpointing_keeps_each_forwards_adapter(tmp_path):
    """Recomputation in backward runs after the adapter context is left: the checkpoint wrapper
    must restore each block's adapter, so the gradients equal those without checkpointing."""
    cfg = _cfg(tmp_path, "unused_*.tar", "distill.dmd.start_step=0", "distill.teacher_guidance=1", "distill.mode=discrete")
    ctx = DW.LossContext(cfg=cfg, policy=None, neg_L_D=None, p2=None, seed=0)
    out = []
    for policy in (None, "full", "attention"):
        tr = DW.build_distill_transformer(cfg, None)
        _randomise_lora(tr, 0.05)
        if policy:
            assert DW.enable_checkpointing(tr, 1.0, policy) == [0, 1]
        loss, _ = DW.gaussian_target_loss(tr, _batch(), 3, ctx)
        loss.backward()
        out.append({n: p.grad.clone() for n, p in tr.named_parameters() if p.requires_grad})
    for other in out[1:]:
        for n in out[0]:
            torch.testing.assert_close(other[n], out[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_student_sample_shapes_and_phase2_levels():
    tr = _tiny(torch.float32)
    DW.add_adapters(tr, wan.LoraSpec(rank=2, alpha=2), [DW.STUDENT], seed=0)
    emb = torch.randn(2, 16, 32)
    out = DW.student_sample(tr, emb, (16, 5, 4, 6), steps=1)
    assert out.shape == (2, 16, 5, 4, 6) and torch.isfinite(out).all()
    idx = torch.tensor([[0, 4, 8], [0, 5, 8]])
    key = DW.student_sample(tr, emb, (16, 3, 4, 6), steps=2, idx_B_K=idx, generator=torch.Generator().manual_seed(0))
    assert key.shape == (2, 16, 3, 4, 6)
    # one generator per row (sample.py's per-prompt seeds): each row equals its own single-row run
    gens = lambda: [torch.Generator().manual_seed(s) for s in (5, 6)]  # noqa: E731
    both = DW.student_sample(tr, emb, (16, 3, 4, 6), steps=2, idx_B_K=idx, generator=gens())
    for b in range(2):
        one = DW.student_sample(tr, emb[b : b + 1], (16, 3, 4, 6), steps=2, idx_B_K=idx[b : b + 1],
                                generator=[gens()[b]])
        torch.testing.assert_close(both[b : b + 1], one, rtol=1e-5, atol=1e-5)
    assert DW.phase2_student_levels(4, 1) == [0] and DW.phase2_student_levels(4, 2) == [0, 1]
    assert DW.phase2_student_levels(5, 2) == [0, 2]
    with pytest.raises(ConfigError, match=r"phase2_levels=\[0, 3\]"):
        DW.phase2_student_levels(4, 2, [0, 3])


# --- entry script -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    make_shards(MakeShardsConfig(out_dir=str(out), num_samples=4, samples_per_shard=2, latent_shape=[16, 9, 4, 6],
                                 embed_shape=[16, 32], seed=0))
    return str(out / "shard_*.tar")


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Phase-1 and phase-2 teacher LoRAs as train_phase1/2.py save them (random B: a merge that
    changes the model), K = 3 keyframes, budgets [3, 6, 9] on T = 9."""
    out = tmp_path_factory.mktemp("teachers")
    extra = {"phase1": dataclasses.asdict(Phase1Config(num_keyframes=3)),
             "phase2": dataclasses.asdict(Phase2Config(k_min=3, n_levels=3))}
    t1 = _tiny(torch.float32)
    wan.add_lora(t1, wan.LoraSpec(rank=4, alpha=4))
    _randomise_lora(t1, 0.05)
    wan.save_lora(t1, out / "p1", extra_meta={"phase": 1, **extra})
    t2 = _tiny(torch.float32, rope=False)
    pe = wan.widen_patch_embedding(t2, ("mask",))
    wan.add_lora(t2, wan.LoraSpec(rank=4, alpha=4))
    _randomise_lora(t2, 0.05)
    with torch.no_grad():
        pe.extra_weight.normal_(0, 0.05)
    wan.save_lora(t2, out / "p2", extra_meta={"phase": 2, **extra})
    return {"phase1": out / "p1", "phase2": out / "p2"}


def _args(shards, run_dir, *extra):
    return ["--config", str(REPO / "configs/video/rcm_tiny_cpu.yaml"), f"data.shards={shards}", f"train.run_dir={run_dir}",
            "train.tracker=none", "train.log_every=1", "train.validate_every=0", *extra]


def _run(argv):
    _reset_accelerate()
    return distill_rcm.main(argv)


def _adapter_files(run_dir, step, which="trainable"):
    from safetensors.torch import load_file

    d = Path(run_dir) / "checkpoints" / f"step_{step:08d}" / which
    return {n: load_file(str(d / n / wan.LORA_WEIGHT_NAME)) for n in (DW.STUDENT, DW.FAKE)}


def test_full_target_checkpoints_and_resume_equals_uninterrupted(shards, tmp_path):
    common = ["train.max_steps=4", "train.checkpoint_every=2", "train.batch_size=1", "distill.dmd.start_step=1"]
    full = _run(_args(shards, tmp_path / "full", *common))
    _run(_args(shards, tmp_path / "split", *common, "train.stop_at_step=2"))
    resumed = _run(_args(shards, tmp_path / "split", *common, "--resume", "latest"))
    assert resumed.state.step == 4 and resumed.losses == full.losses[2:]
    for which in ("trainable", "trainable_ema"):
        a, b = _adapter_files(tmp_path / "full", 4, which), _adapter_files(tmp_path / "split", 4, which)
        for name in a:
            assert a[name].keys() == b[name].keys() and a[name]
            for k in a[name]:
                assert torch.equal(a[name][k], b[name][k]), (which, name, k)
    st = a[DW.STUDENT]
    assert all(k.startswith("transformer.blocks.") for k in st)
    assert any(v.abs().sum() > 0 for k, v in st.items() if "lora_B" in k)  # the student did train
    assert any(v.abs().sum() > 0 for k, v in a[DW.FAKE].items() if "lora_B" in k)
    meta = DW.read_student_meta(tmp_path / "full" / "checkpoints" / "step_00000004" / "trainable" / DW.STUDENT)
    assert meta["extra"]["distill"]["target"] == "full" and meta["extra"]["phase"] is None
    import json

    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    assert {"loss_scm", "tangent_rms", "loss_dmd", "loss_fake"} <= set(rows[-1])
    assert rows[0]["loss_dmd"] == 0.0 and rows[-1]["loss_dmd"] > 0


def test_resume_with_another_target_or_teacher_is_refused(shards, teachers, tmp_path):
    common = ["train.max_steps=2", "train.checkpoint_every=2", "train.batch_size=1", "distill.dmd.weight=0"]
    _run(_args(shards, tmp_path / "run", *common))
    with pytest.raises(CheckpointError, match=r"(?s)distill_target = 'full' in the checkpoint, 'phase1' in this run.*"
                                              r"teacher_id = '' in the checkpoint"):
        _run(_args(shards, tmp_path / "run", *common, "train.max_steps=4", "distill.target=phase1",
                   f"distill.teacher_lora={teachers['phase1']}", "--resume", "latest"))
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000002"]


def test_phase2_student_overfits_one_batch(shards, teachers, tmp_path):
    """A 1-step refiner regressing one batch onto the teacher's 3-level chain, against a control run
    with lr ~ 0 (same masks, levels and noise at every step). The target moves with each step's
    corruption noise, so 30 steps do not fit it: 0.80 of the control measured (2026-11-26). (Before
    the refiner returned its keyframes exactly, the teacher chain also carried a fixed offset from
    its untrained keyframe outputs, which the student fit within a few steps: below 0.5.)"""
    one = shards.replace("shard_*", "shard_000000")
    common = ["distill.target=phase2", f"distill.teacher_lora={teachers['phase2']}", "distill.dmd.weight=0",
              "distill.teacher_guidance=1", "distill.sampler.steps=1", "train.max_steps=30", "train.checkpoint_every=30",
              "train.ema_decay=0", "phase2.policy_mix=uniform:1"]
    res = _run(_args(one, tmp_path / "p2", *common, "train.optim.lr=1e-2"))
    ctl = _run(_args(one, tmp_path / "c2", *common, "train.optim.lr=1e-9"))
    L, C = res.losses, ctl.losses
    assert L[0] == pytest.approx(C[0], rel=1e-6)
    assert sum(L[-10:]) < 0.9 * sum(C[-10:]), (L, C)
    meta = wan.read_lora_meta(tmp_path / "p2" / "checkpoints" / "step_00000030" / "trainable" / DW.STUDENT)
    assert meta["widening"]["channels"] == ["mask"] and meta["extra"]["phase2"]["k_min"] == 3
    assert not (tmp_path / "p2" / "checkpoints" / "step_00000030" / "trainable" / DW.FAKE).exists()


def test_students_sample_playable_mp4_through_sample_py(shards, teachers, tmp_path):
    one = shards.replace("shard_*", "shard_000000")
    steps = ["train.max_steps=2", "train.checkpoint_every=2", "train.validate_every=2"]
    _run(_args(one, tmp_path / "full", *steps))
    _run(_args(one, tmp_path / "p1", *steps, "distill.target=phase1", f"distill.teacher_lora={teachers['phase1']}",
               "distill.mode=discrete"))
    _run(_args(one, tmp_path / "p2", *steps, "distill.target=phase2", f"distill.teacher_lora={teachers['phase2']}",
               "distill.dmd.weight=0", "distill.teacher_guidance=1", "distill.sampler.steps=2"))
    import json

    for k, key in (("full", "gap_1step"), ("p1", "gap_1step"), ("p2", "student_vs_teacher_mse")):
        val = tmp_path / k / "validation"
        row = json.loads((val / "metrics.jsonl").read_text().splitlines()[-1])
        assert row["step"] == 2 and math.isfinite(row[key]) and (val / "val_00000002.png").is_file(), (k, row)
    st = {k: tmp_path / k / "checkpoints" / "step_00000002" / "trainable_ema" / DW.STUDENT for k in ("full", "p1", "p2")}
    base = ["prompts=[a dog runs on the beach,a red car]", "num_frames=17", "height=32", "width=64", "model_path=tiny",
            "batch_size=2"]
    two = sample.main([*base, f"phase1_student_lora={st['p1']}", f"phase2_student_lora={st['p2']}", "student_steps=2",
                       f"out_dir={tmp_path / 'two'}"])
    full = sample.main([*base, "mode=full", f"student_lora={st['full']}", "student_steps=1", f"out_dir={tmp_path / 'f'}"])
    import decord
    import imageio.v2 as imageio

    for path in two["videos"] + full["videos"]:
        frames = [f for f in imageio.get_reader(str(path))]
        assert len(frames) == 17 and frames[0].shape == (32, 64, 3), path
        assert len(decord.VideoReader(str(path))) == 17
    assert len(two["videos"]) == 2 and two["keyframes"][0] == [0, 2, 4]  # T = 5 latent frames, K = 3
    with pytest.raises(ConfigError, match="distilled 'full' student, expected 'phase1'"):
        sample.main([*base, f"phase1_student_lora={st['full']}", f"phase2_student_lora={st['p2']}", f"out_dir={tmp_path / 'x'}"])


# --- bad inputs: clear errors before any model work -------------------------------------------------


def test_finite_difference_jvp_is_refused_on_a_half_precision_base(tmp_path):
    cfg = _cfg(tmp_path, "unused_*.tar", "distill.jvp=finite_difference", "model.dtype=bfloat16")
    with pytest.raises(ConfigError, match="distill.jvp=finite_difference with a torch.bfloat16 base"):
        DW.build_distill_transformer(cfg, None)
    DW.build_distill_transformer(_cfg(tmp_path, "unused_*.tar", "distill.jvp=finite_difference"), None)  # fp32: fine


@pytest.mark.parametrize("override,exc,match", [
    ("distill.jvp_mode=fast", ConfigError, r"distill\.jvp_mode"),
    ("distill.target=keyframes", ConfigError, r"distill\.target='keyframes'.*full.*phase1.*phase2"),
    ("distill.target=phase1", ConfigError, r"distill\.teacher_lora is not set.*phase1"),
    ("distill.mode=ect", ConfigError, r"distill\.mode='ect'"),
    ("distill.jvp=forward", ConfigError, r"distill\.jvp='forward'"),
    ("distill.sampler.mid_times=[1.6]", ConfigError, r"must decrease"),
    ("model.lora.dropout=0.1", ConfigError, r"model\.lora\.dropout=0\.1 with distill\.mode=scm"),
])
def test_bad_distill_inputs_fail_at_startup(shards, tmp_path, no_model, override, exc, match):
    with pytest.raises(exc, match=match):
        _run(_args(shards, tmp_path / "r", override))
    assert not (tmp_path / "r").exists()


def test_missing_or_wrong_teacher_checkpoint(shards, teachers, tmp_path, no_model):
    with pytest.raises(CheckpointError, match=r"distill\.teacher_lora=.*no_such_dir.*pytorch_lora_weights"):
        _run(_args(shards, tmp_path / "r", "distill.target=phase2", f"distill.teacher_lora={tmp_path / 'no_such_dir'}",
                   "distill.dmd.weight=0"))
    with pytest.raises(ConfigError, match=r"trained for phase 1, distill\.target=phase2"):
        _run(_args(shards, tmp_path / "r", "distill.target=phase2", f"distill.teacher_lora={teachers['phase1']}",
                   "distill.dmd.weight=0"))
    with pytest.raises(ConfigError, match=r"phase1\.num_keyframes=4.*3 keyframes"):
        _run(_args(shards, tmp_path / "r", "distill.target=phase1", f"distill.teacher_lora={teachers['phase1']}",
                   "phase1.num_keyframes=4"))
    with pytest.raises(ConfigError, match=r"dmd\.weight > 0 with distill\.target=phase2"):
        _run(_args(shards, tmp_path / "r", "distill.target=phase2", f"distill.teacher_lora={teachers['phase2']}"))
    assert not (tmp_path / "r").exists()


FLOAT_KEYS = ["distill.fd_size", "distill.delta", "distill.teacher_guidance", "distill.p_mean", "distill.p_std",
              "distill.tangent_norm", "distill.scm_weight", "distill.dmd.weight", "distill.dmd.fake_weight",
              "distill.dmd.shift", "distill.dmd.sigma_max", "distill.sampler.sigma_max"]


@pytest.mark.parametrize("key,bad", [(k, v) for k in FLOAT_KEYS for v in ("nan", "inf")])
def test_non_finite_distill_values_are_refused_by_name(tmp_path, key, bad):
    """nan passes ``x < bound`` checks: ``tangent_norm=nan`` switched normalisation off (``nan > 0`` is
    False), ``dmd.weight=nan`` the DMD term, ``teacher_guidance=nan`` / ``scm_weight=nan`` trained on
    nan. Every float of the distill section must be finite and in range, refused by its key."""
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}={bad}: expected a finite number"):
        _cfg(tmp_path, "unused_*.tar", f"{key}={bad}")
    _cfg(tmp_path, "unused_*.tar")  # the shipped values pass


@pytest.mark.parametrize("override,match", [
    ("distill.sampler.mid_times=[nan]", r"distill\.sampler\.mid_times=\[nan\]: expected finite"),
    ("distill.sampler.mid_times=[inf]", r"distill\.sampler\.mid_times=\[inf\]: expected finite"),
    ("distill.dmd.start_step=-1", r"distill\.dmd\.start_step=-1"),
    ("distill.tangent_norm=-0.1", r"distill\.tangent_norm=-0\.1: expected a finite number >= 0"),
    ("distill.teacher_guidance=0.5", r"distill\.teacher_guidance=0\.5: expected a finite number >= 1"),
])  # fmt: skip
def test_bad_distill_ranges_are_refused_by_name(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, "unused_*.tar", override)


def test_consistency_times_refuse_nan():
    """``consistency_times`` (the students' sampler, also sample.py's check) must not let nan through its
    ordering test (``nan >= t`` is False)."""
    for steps, mids, sigma_max in ((2, [math.nan], 80.0), (1, None, math.nan), (3, [1.5, math.nan], 80.0)):
        with pytest.raises(ValueError, match="consistency_times"):
            D.consistency_times(steps, mids, sigma_max)
    assert D.consistency_times(2, [1.0], math.inf) == [math.pi / 2, 1.0]  # t_0 = pi/2: the pure-noise limit


def _p2_cfg(tmp_path, teachers, *over):
    return _cfg(tmp_path, "unused_*.tar", "distill.target=phase2", f"distill.teacher_lora={teachers['phase2']}",
                "distill.dmd.weight=0", *over)


@pytest.mark.parametrize("levels,steps", [("[1,2]", 2), ("[0]", 2), ("[0,0]", 2), ("[0,1]", 1)])
def test_phase2_levels_checked_without_the_clip_length(tmp_path, teachers, levels, steps):
    """``distill.phase2_levels``: one level per student step, strictly increasing from 0 (what
    ``phase2_student_levels`` requires in the loss), checked at start-up even when T is unknown."""
    with pytest.raises(ConfigError, match=r"distill\.phase2_levels=\[.*strictly increasing levels starting at 0"):
        _p2_cfg(tmp_path, teachers, f"distill.phase2_levels={levels}", f"distill.sampler.steps={steps}")


def test_phase2_levels_checked_against_the_teachers_levels_when_T_is_known(tmp_path, teachers):
    """The teacher's budgets [3, 6, 9] on T = 9 (``data.latent_shape``) give S = 3 levels: the last
    student level is at most S - 2 = 1. Without T the bound is not known at start-up."""
    T9 = "data.latent_shape=[16,9,-1,-1]"
    with pytest.raises(ConfigError, match=r"distill\.phase2_levels=\[0, 2\].*<= 1 \(S = 3 levels\)"):
        _p2_cfg(tmp_path, teachers, T9, "distill.phase2_levels=[0,2]", "distill.sampler.steps=2")
    _p2_cfg(tmp_path, teachers, T9, "distill.phase2_levels=[0,1]", "distill.sampler.steps=2")
    _p2_cfg(tmp_path, teachers, "distill.phase2_levels=[0,2]", "distill.sampler.steps=2")  # T unknown: not checkable


def test_distill_checks_the_policy_mixes_of_its_target(tmp_path, teachers):
    """``phase1.index_policy`` / ``phase2.policy_mix`` (and the selector checkpoint they need) are refused
    by name at start-up, not as a bare ValueError once the data loader exists."""
    p1 = ["distill.target=phase1", f"distill.teacher_lora={teachers['phase1']}"]
    with pytest.raises(ConfigError, match=r"phase1\.index_policy: .*weight of 'uniform' is nan"):
        _cfg(tmp_path, "unused_*.tar", *p1, "phase1.index_policy=uniform:nan")
    with pytest.raises(ConfigError, match=r"phase1\.index_policy.*phase1\.selector_ckpt"):
        _cfg(tmp_path, "unused_*.tar", *p1, "phase1.index_policy=selector:1")
    with pytest.raises(ConfigError, match=r"phase1\.num_keyframes=3 exceeds the clip's T=2"):
        _cfg(tmp_path, "unused_*.tar", *p1, "data.latent_shape=[16,2,-1,-1]")
    with pytest.raises(ConfigError, match=r"phase2\.policy_mix: .*unknown policy 'bogus'"):
        _p2_cfg(tmp_path, teachers, "phase2.policy_mix=bogus:1")
    with pytest.raises(ConfigError, match=r"phase2\.policy_mix.*phase2\.selector_ckpt"):
        _p2_cfg(tmp_path, teachers, "phase2.policy_mix=selector:1")


def test_phase2_target_checks_the_teachers_settings_not_the_replaced_ones(tmp_path, teachers):
    """For target=phase2 the budgets and sigmas are the teacher's (its metadata: k_min 3, 3 levels):
    this config's own phase2.k_min / sigmas are replaced, so they must not refuse a valid run; the
    teacher's settings are checked against T, with an error naming the teacher folder."""
    T9 = "data.latent_shape=[16,9,-1,-1]"
    cfg = _p2_cfg(tmp_path, teachers, T9, "phase2.k_min=12", "phase2.sigma_max=-1")
    assert DW.teacher_phase2_config(cfg, DW.check_teacher(cfg)).k_min == 3
    with pytest.raises(ConfigError, match=r"distill\.teacher_lora=.*phase-2 settings stored with it.*T=4"):
        _p2_cfg(tmp_path, teachers, "data.latent_shape=[16,4,-1,-1]")


def test_cli_prints_clear_message_and_exits_nonzero(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "distill_rcm.py", "--config", "configs/video/rcm_tiny_cpu.yaml",
                          "data.shards=x.tar", "distill.target=phase3"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "distill_rcm.py: error: distill.target='phase3'" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_sample_refuses_a_lora_that_is_not_a_student(teachers, tmp_path, no_model):
    with pytest.raises(wan.WanLoadError, match="not a distilled student"):
        DW.read_student_meta(teachers["phase1"])
    with pytest.raises(wan.WanLoadError, match="student_lora"):
        sample.main(["prompts=[x]", "mode=full", f"student_lora={tmp_path / 'nope'}", "num_frames=17", "height=32",
                     "width=64"])


@pytest.mark.parametrize("name,target", [("rcm_tiny_cpu", "full"), ("rcm_wan1.3b_full", "full"),
                                         ("rcm_wan1.3b_phase1", "phase1"), ("rcm_wan1.3b_phase2", "phase2")])
def test_shipped_configs_load(name, target, tmp_path):
    over = ["data.shards=x.tar"]
    if target != "full":  # a teacher as train_phase1/2.py would save it with the 1.3B keyframe count
        tr = _tiny(torch.float32, rope=target == "phase1")
        if target == "phase2":
            wan.widen_patch_embedding(tr, ("mask",))
        wan.add_lora(tr, wan.LoraSpec(rank=2, alpha=2))
        wan.save_lora(tr, tmp_path / "t", extra_meta={"phase": int(target[-1]), "phase1": {"num_keyframes": 6}})
        over.append(f"distill.teacher_lora={tmp_path / 't'}")
    cfg = load_config(DW.DistillTrainConfig, REPO / "configs" / "video" / f"{name}.yaml", over)
    assert cfg.distill.target == target
    if name != "rcm_tiny_cpu":
        assert cfg.data.latent_shape == [16, 21, 60, 104] and cfg.train.gradient_checkpointing and not cfg.model.compile
        if target != "phase2":
            assert cfg.distill.jvp == "autograd" and cfg.distill.jvp_chunk > 0 and cfg.distill.dmd.weight > 0
    if target == "phase2":
        with pytest.raises(ConfigError, match=r"distill\.teacher_lora"):
            load_config(DW.DistillTrainConfig, REPO / "configs" / "video" / f"{name}.yaml", ["data.shards=x.tar"])


@pytest.mark.slow
def test_deepspeed_zero2_two_processes_equal_one(tmp_path):
    """``accelerate launch`` + DeepSpeed ZeRO-2 on 2 CPU processes (batch 1 each) against one process
    (batch 2) on one-sample shards: the same global batch, so the same losses and adapters. Checks
    that the several forwards per step (teacher, JVP, student, fake score; adapters switched on one
    module) go through the engine's gradient reduction like one process's backward."""
    import socket

    make_shards(MakeShardsConfig(out_dir=str(tmp_path / "d"), num_samples=2, samples_per_shard=1,
                                 latent_shape=[16, 9, 4, 6], embed_shape=[16, 32], seed=0))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(k, None)
    common = [f"data.shards={tmp_path / 'd' / 'shard_*.tar'}", "train.tracker=none", "train.log_every=1",
              "train.validate_every=0", "train.max_steps=3", "train.checkpoint_every=3", "distill.dmd.start_step=1",
              "train.optim.kind=adamw"]

    def run(cmd):
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-6000:]

    run([sys.executable, "distill_rcm.py", "--config", "configs/video/rcm_tiny_cpu.yaml", *common,
         f"train.run_dir={tmp_path / 'one'}", "train.batch_size=2"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env["DS_ACCELERATOR"] = "cpu"
    run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu_zero2_2proc.yaml",
         "--main_process_port", str(port), "distill_rcm.py", "--config", "configs/video/rcm_tiny_cpu.yaml", *common,
         f"train.run_dir={tmp_path / 'two'}", "train.batch_size=1"])
    a, b = _adapter_files(tmp_path / "one", 3), _adapter_files(tmp_path / "two", 3)
    for name in a:
        for k in a[name]:
            torch.testing.assert_close(b[name][k], a[name][k], rtol=1e-4, atol=5e-5, msg=lambda m: f"{name} {k}: {m}")
    loss = lambda run_dir: [float(r.split(",")[1]) for r in (run_dir / "metrics.csv").read_text().splitlines()[1:]]  # noqa: E731
    assert loss(tmp_path / "two") == pytest.approx(loss(tmp_path / "one"), rel=1e-4)


def test_jvp_constant_weights_same_tangent_fewer_matmuls():
    """``jvp_constant_weights``: the JVP through the tiny Wan (LoRA adapter on, keyframe rope) equals
    ``torch.func.jvp``'s own in fp64, with 2 instead of 3 matmuls per linear layer (FlopCounterMode:
    the tangent's linear-layer FLOPs halve), and the plain forwards are restored on exit."""
    from torch.utils.flop_counter import FlopCounterMode

    tr, F, x, t, dx, dt = _jvp_case()

    def run(const):
        with DW.jvp_attention(tr), DW.jvp_constant_weights(tr, const), FlopCounterMode(display=False) as fc:
            out, jv = D.jvp(F, x, t, dx, dt, "autograd")
        return out, jv, fc.get_total_flops()

    out0, jv0, fl0 = run(False)
    out1, jv1, fl1 = run(True)
    torch.testing.assert_close(out1, out0, rtol=0, atol=0)
    torch.testing.assert_close(jv1, jv0, rtol=1e-12, atol=1e-12)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        F(x, t)
    fwd = fc.get_total_flops()
    assert fl0 > 2.5 * fwd and fl1 < fl0 - 0.5 * fwd, (fwd, fl0, fl1)  # one matmul per linear layer saved
    assert not any("forward" in m.__dict__ for m in tr.modules())


def test_sample_student_sampler_defaults_come_from_the_student():
    """sample.py's full / phase-1 students sample with the steps, mid times and sigma_max they were
    distilled with unless the sample config sets them; other step counts fall back to the default times."""
    from interpdiff.video.pipeline import SampleConfig, student_sampler_args

    meta = {"extra": {"distill": {"sampler": {"steps": 3, "mid_times": [1.2, 0.7, 0.3], "sigma_max": 40.0}}}}
    assert student_sampler_args(SampleConfig(), meta) == {"steps": 3, "mid_times": [1.2, 0.7, 0.3], "sigma_max": 40.0}
    assert student_sampler_args(SampleConfig(student_steps=2), meta) == {"steps": 2, "mid_times": None, "sigma_max": 40.0}
    assert student_sampler_args(SampleConfig(student_steps=2, student_mid_times=[0.9]), meta)["mid_times"] == [0.9]
    assert student_sampler_args(SampleConfig(), {}) == {"steps": 4, "mid_times": None, "sigma_max": 80.0}


def test_normalised_discrete_loss_has_a_size_independent_bounded_gradient():
    """Video mode=discrete: the gradient is 2 g with g = d / (||d|| + c), d = (f - f_target) / delta,
    so its norm is below 2 at any latent size, like scm_loss's (the element-mean form's gradient
    shrinks as 1/N: at Wan size DMD alone trained), and a step along it moves f toward the target."""
    g = torch.Generator().manual_seed(0)
    for n in (100, 100_000):
        f = torch.randn(2, n, generator=g, dtype=torch.float64, requires_grad=True)
        tgt = f.detach() + 0.01 * torch.randn(2, n, generator=g, dtype=torch.float64)
        delta = torch.tensor([0.05, 0.1], dtype=torch.float64)
        D.normalised_discrete_loss(f, tgt, delta, 0.1).sum().backward()
        d = (f.detach() - tgt) / delta[:, None]
        torch.testing.assert_close(f.grad, 2 * d / (d.norm(dim=1, keepdim=True) + 0.1))
        assert (f.grad.norm(dim=1) < 2).all() and (f.grad.norm(dim=1) > 1.0).all()
        assert ((f.detach() - 1e-3 * f.grad - tgt).norm(dim=1) < (f.detach() - tgt).norm(dim=1)).all()
        f.grad = None
        D.discrete_consistency_loss(f, tgt, delta).sum().backward()
        if n == 100_000:
            assert (f.grad.norm(dim=1) < 0.05).all()  # the mean form: 0.025 / 0.006 here, shrinking as 1/sqrt(N)
