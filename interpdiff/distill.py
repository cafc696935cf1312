"""Step distillation math (rCM: sCM + DMD regulariser, TrigFlow time) as pure functions.

Modality-agnostic: every function takes tensors and callables; the Wan-specific glue (adapters,
teacher merge, keyframe rope, phase-2 chains) lives in ``interpdiff.video.distill_wan``.

**TrigFlow** (``sigma_d = 1``, Wan's latents are normalised): ``x_t = cos t x0 + sin t eps`` for
``t`` in ``[0, pi/2]``, velocity ``F = dx_t/dt = cos t eps - sin t x0``, consistency function
``f(x_t, t) = cos t x_t - sin t F(x_t, t)`` (= ``x0`` for the exact ``F``). A Wan flow-matching
model ``v(x_sigma, 1000 sigma)`` becomes a TrigFlow model through ``interpdiff.flow``'s conversions
(``trig_model``): ``sigma = sin t / (sin t + cos t)``, ``x_sigma = x_t / (sin t + cos t)``,
``F = flow_velocity_to_trig(v, x_sigma, sigma)``.

**sCM** (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency
Models", eq. for the tangent with tangent warmup and normalisation)::

    dx_t/dt = F_teacher(x_t, t)                                      (PF-ODE, CFG applied)
    JVP     = d/ds F_sg(x_t + s cos t sin t dx_t/dt, t + s cos t sin t)   = cos t sin t dF_sg/dt
    g       = -cos^2 t (F_sg - dx_t/dt) - r (cos t sin t x_t + JVP)       (r: tangent warmup 0 -> 1)
    g       = g / (||g|| + c)                                             (per sample, c = 0.1)
    loss    = sum (F_theta(x_t, t) - F_sg - g)^2                          (per sample; F_sg = stop-grad F_theta)

The JVP tangent is scaled by ``cos t sin t`` (the "rearranged" JVP of sCM section 5.1 /
rCM) so it stays bounded near ``t = pi/2``. With ``r = 1``, ``g = cos t * df/dt`` along the
teacher ODE: at the exact consistency function of the teacher ``g = 0`` and the gradient vanishes
(the test checks this on a Gaussian toy flow whose consistency function is closed form). The loss
*value* is ``||g||^2`` (``F_theta = F_sg`` numerically); only its gradient trains, so a falling
sCM loss value means a shrinking tangent, not a fitted target. sCM's learned adaptive weighting
``w_psi(t)`` is not used (one trainable adapter per role keeps the ZeRO loop unchanged).

The JVP (``jvp``): ``autograd`` = ``torch.func.jvp`` (forward-mode AD) or ``finite_difference``
= ``(F(x + h dx, t + h dt) - F(x - h dx, t - h dt)) / 2h`` (two extra forwards, no
forward-AD rules needed; less exact in bf16, see ``fd_size``).

**Discrete-time fallback** (no JVP): one teacher step from ``t`` to ``t' = t - delta`` with the
TrigFlow DDIM update ``x_t' = cos(delta) x_t - sin(delta) F_teacher(x_t, t)`` (exact when the
teacher's ``x0``/``eps`` predictions are constant over the step: the Euler step of TrigFlow's
exponential integrator), target ``f_sg(x_t', t')`` from the stop-grad student (the current
weights under ``no_grad``, sCM/ECT style, not a separate EMA network), loss
``mean (f_theta(x_t, t) - f_sg(x_t', t'))^2 / delta^2`` (the ``1/delta^2`` makes it the discrete
version of ``(df/dt)^2`` and comparable across ``delta``).

**DMD** (DMD2 / rCM): a student sample ``x0_G`` (one consistency step from noise at ``t_max``),
noised to ``t_D`` (``x_D = cos t_D x0_G + sin t_D eps``); the frozen teacher gives
``x0_real`` (CFG), a fake-score model trained on student samples gives ``x0_fake``; the student
gradient is ``(x0_fake - x0_real) / mean|x0_G - x0_real|`` through ``x0_G``
(``dmd_generator_loss``), the fake score learns flow matching on detached student samples.

**Few-step sampling** (``consistency_sample``): ``x = eps`` scaled to ``t_0 = atan(sigma_max)``
(rCM: ``sigma_max = 80``), then ``x0 = f(x, t_i)``, re-noise to ``t_{i+1}`` with fresh noise;
intermediate times ``mid_times`` default ``[1.5, 1.4, 1.0][:steps-1]`` (rCM's Wan sampler).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from interpdiff.flow import flow_to_trig_time, flow_velocity_to_trig, shift_sigma, trig_to_flow_time, trig_to_flow_x

MODES = ("scm", "discrete")
JVP_METHODS = ("autograd", "finite_difference")
# attention inside the autograd JVP: "math" (diffusers' math SDPA, query-chunked by jvp_chunk) or "triton"
# (kernels.attention_jvp: SDPA primal + the fused forward-mode kernel; CUDA, or CPU under TRITON_INTERPRET=1)
JVP_ATTENTION = ("math", "triton")
DEFAULT_MID_TIMES = (1.5, 1.4, 1.0)

TrigModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # F(x_t [B, ...], t [B]) -> [B, ...]


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` against ``like`` (keeps ``v``'s dtype and any dual tangent)."""
    return v.reshape([-1] + [1] * (like.dim() - 1))


# --- TrigFlow model wrappers -------------------------------------------------------------------


def trig_model(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> TrigModel:
    """TrigFlow ``F(x_t, t)`` from a flow-matching model ``velocity(x_sigma, 1000 sigma) -> v``.

    Differentiable in ``x_t`` and ``t`` (also under forward-mode AD): the conversions are
    ``interpdiff.flow``'s. The flow time is computed in the time tensor's dtype."""

    def F(x_t: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
        sigma_B = trig_to_flow_time(t_B).to(t_B.dtype)
        x_sigma = trig_to_flow_x(x_t, t_B)
        v = velocity(x_sigma, sigma_B * 1000.0).to(x_t.dtype)
        return flow_velocity_to_trig(v, x_sigma, sigma_B)

    return F


def consistency_fn(x_t: torch.Tensor, t_B: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """``f(x_t, t) = cos t x_t - sin t F`` (the ``x0`` estimate)."""
    t = _bc(t_B, x_t).to(x_t.dtype)
    return torch.cos(t) * x_t - torch.sin(t) * F


def trig_noise(x0: torch.Tensor, eps: torch.Tensor, t_B: torch.Tensor) -> torch.Tensor:
    """``x_t = cos t x0 + sin t eps``."""
    t = _bc(t_B, x0).to(x0.dtype)
    return torch.cos(t) * x0 + torch.sin(t) * eps


def trig_ddim_step(x_t: torch.Tensor, F: torch.Tensor, delta_B: torch.Tensor) -> torch.Tensor:
    """``x_{t - delta} = cos(delta) x_t - sin(delta) F(x_t, t)`` (see the module docstring)."""
    d = _bc(delta_B, x_t).to(x_t.dtype)
    return torch.cos(d) * x_t - torch.sin(d) * F


def cfg(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``uncond + scale (cond - uncond)`` (Wan's CFG rule; ``scale = 1`` or no ``uncond``: ``cond``)."""
    if uncond is None or scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)


# --- training times ---------------------------------------------------------------------------


def sample_trig_times(n: int, p_mean: float, p_std: float, scale: float = 1.0,
                      generator: torch.Generator | None = None, t_min: float = 1e-4) -> torch.Tensor:
    """Student training times ``t = atan(scale * exp(p_mean + p_std z))`` (sCM's log-normal
    proposal on ``tan t``; rCM multiplies by ``sqrt(latent frames)`` for video), float64 ``[n]``."""
    z = torch.randn(n, generator=generator, dtype=torch.float64)
    t = torch.atan(scale * torch.exp(p_mean + p_std * z))
    return t.clamp(t_min, math.pi / 2 - t_min)


def sample_shifted_trig_times(n: int, shift: float, generator: torch.Generator | None = None,
                              t_min: float = 1e-4) -> torch.Tensor:
    """DMD / fake-score times: flow time ``sigma = shift(u)``, ``u ~ U(0, 1)`` (Wan's shift), as
    TrigFlow ``t = atan(sigma / (1 - sigma))``, float64 ``[n]``."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return flow_to_trig_time(shift_sigma(u, shift)).clamp(t_min, math.pi / 2 - t_min)


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """sCM's tangent warmup ``r``: linear from 0 to 1 over ``warmup_steps`` (0 = always 1)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


# --- JVP ----------------------------------------------------------------------------------------


def jvp(F: TrigModel, x_t: torch.Tensor, t_B: torch.Tensor, dx: torch.Tensor, dt_B: torch.Tensor,
        method: str = "autograd", fd_size: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F(x_t, t), d/ds F(x_t + s dx, t + s dt)|_{s=0})`` without gradients.

    ``autograd``: ``torch.func.jvp`` (every op on the path needs a forward-AD rule; for Wan the
    attention must run on a math kernel, see ``interpdiff.video.distill_wan.jvp_attention``).
    ``finite_difference``: central difference with step ``fd_size`` (3 forwards in all). For Wan
    the step must be small: its sinusoidal timestep embedding (timestep ``1000 sigma``, frequencies
    up to 1 per unit) makes ``F`` oscillate in ``t`` on a ~1e-3 rad scale (tiny preset, fp64:
    error 0.6 % of the JVP's size at 1e-3, 0.09 % at 1e-4), and at 1e-4 bf16 rounding of the
    forwards dominates; hence ``autograd`` is the default."""
    if method not in JVP_METHODS:
        raise ValueError(f"jvp: method={method!r} is not one of {JVP_METHODS}")
    with torch.no_grad():
        if method == "autograd":
            out, tangent = torch.func.jvp(F, (x_t, t_B), (dx, dt_B))
            return out, tangent
        h = fd_size
        out = F(x_t, t_B)
        plus = F(x_t + h * dx, t_B + h * dt_B)
        minus = F(x_t - h * dx, t_B - h * dt_B)
        return out, (plus - minus) / (2 * h)


# --- losses ---------------------------------------------------------------------------------------


def scm_tangent(x_t: torch.Tensor, t_B: torch.Tensor, F_sg: torch.Tensor, dxdt: torch.Tensor, jvp_cs: torch.Tensor,
                r: float = 1.0, norm_c: float = 0.1) -> torch.Tensor:
    """sCM tangent ``g`` (module docstring), normalised per sample when ``norm_c > 0``.

    ``jvp_cs`` is the rearranged JVP ``cos t sin t dF_sg/dt``; ``dxdt`` the teacher velocity.
    Computed in float64 (rCM does the same: ``g`` is a small difference of large terms)."""
    x, Fs, v, j = (a.double() for a in (x_t, F_sg, dxdt, jvp_cs))
    t = _bc(t_B.double(), x)
    c, s = torch.cos(t), torch.sin(t)
    g = -c * c * (Fs - v) - r * (c * s * x + j)
    return normalise_tangent(g, norm_c) if norm_c > 0 else g


def normalise_tangent(g: torch.Tensor, norm_c: float = 0.1) -> torch.Tensor:
    """``g / (||g|| + c)`` per sample (norm over all non-batch elements)."""
    return g / (g.flatten(1).norm(dim=1).view([-1] + [1] * (g.dim() - 1)) + norm_c)


def scm_loss(F_theta: torch.Tensor, F_sg: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample ``sum (F_theta - F_sg - g)^2`` ``[B]`` (gradient ``-2 g dF_theta``)."""
    return ((F_theta.double() - F_sg.double() - g) ** 2).flatten(1).sum(1)


def discrete_consistency_loss(f_theta: torch.Tensor, f_target: torch.Tensor, delta_B: torch.Tensor) -> torch.Tensor:
    """Per-sample ``mean (f_theta - sg(f_target))^2 / delta^2`` ``[B]``."""
    d = delta_B.to(torch.float64)
    return ((f_theta.double() - f_target.detach().double()) ** 2).flatten(1).mean(1) / d**2


def normalised_discrete_loss(f_theta: torch.Tensor, f_target: torch.Tensor, delta_B: torch.Tensor,
                             norm_c: float = 0.1) -> torch.Tensor:
    """The discrete consistency step with sCM's tangent normalisation, per sample ``[B]``:
    ``d = (f_theta - sg(f_target)) / delta`` (a finite-difference stand-in for sCM's tangent),
    ``g = d / (||d|| + norm_c)``, loss ``sum (f_theta - sg(f_theta - g))^2`` = ``||g||^2`` with
    gradient ``2 g df_theta``. Its gradient is bounded like ``scm_loss``'s, so ``scm_weight``
    balances it against DMD's per-sample sum the same way in both modes (the element mean of
    ``discrete_consistency_loss`` is ~1/N of that at Wan size: DMD alone would train)."""
    ft = f_theta.double()
    with torch.no_grad():
        d = (ft - f_target.double()) / _bc(delta_B.to(torch.float64), ft)
        g = d / _bc(d.flatten(1).norm(dim=1) + norm_c, d)
    return ((ft - (ft.detach() - g)) ** 2).flatten(1).sum(1)


def dmd_generator_loss(x0_G: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor,
                       min_weight: float = 1e-5) -> torch.Tensor:
    """DMD2's generator loss per sample ``[B]``: ``sum (x0_G - sg(x0_G - grad))^2`` with
    ``grad = (x0_fake - x0_real) / mean|x0_G - x0_real|``; its gradient w.r.t. ``x0_G`` is
    ``2 grad`` (the score difference, normalised per sample). Only ``x0_G`` carries gradients."""
    xg = x0_G.double()
    with torch.no_grad():
        w = (xg - x0_real.double()).abs().flatten(1).mean(1).clamp_min(min_weight)
        grad = (x0_fake.double() - x0_real.double()) / _bc(w, xg)
        target = xg - grad
    return ((xg - target) ** 2).flatten(1).sum(1)


# --- few-step sampling --------------------------------------------------------------------------


def consistency_times(steps: int, mid_times: Sequence[float] | None = None, sigma_max: float = 80.0) -> list[float]:
    """TrigFlow times ``[t_0 = atan(sigma_max), mid_1, ..., mid_{steps-1}]`` (decreasing)."""
    if steps < 1:
        raise ValueError(f"consistency_times: steps must be >= 1, got {steps}")
    if not sigma_max > 0:  # also refuses nan (inf is the limit t_0 = pi/2: pure noise)
        raise ValueError(f"consistency_times: sigma_max={sigma_max}, expected > 0")
    mids = list(DEFAULT_MID_TIMES if mid_times is None or len(mid_times) == 0 else mid_times)
    if len(mids) < steps - 1:
        raise ValueError(f"consistency_times: {steps} steps need {steps - 1} intermediate times, got {mids}")
    times = [math.atan(sigma_max), *[float(m) for m in mids[: steps - 1]]]
    # written so that nan fails: every time finite, each strictly below the one before, the last > 0
    if not (all(math.isfinite(t) for t in times) and all(b < a for a, b in zip(times, times[1:])) and times[-1] > 0):
        raise ValueError(f"consistency_times: times {times} must decrease strictly and stay > 0 "
                         f"(all finite; t_0 = atan(sigma_max={sigma_max}))")
    return times


@torch.no_grad()
def consistency_sample(F: TrigModel, eps: torch.Tensor, times: Sequence[float],
                       noise: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """Multistep consistency sampling: ``x = sin t_0 eps`` (+ ``cos t_0 * 0``), then for each
    time ``x0 = cos t x - sin t F(x, t)``; between steps ``x = cos t' x0 + sin t' eps'`` with fresh
    noise from ``noise()``. Returns the last ``x0`` (float32)."""
    B = eps.shape[0]
    x = math.sin(times[0]) * eps.double()
    x0 = x
    for i, t in enumerate(times):
        t_B = torch.full((B,), t, dtype=torch.float64, device=eps.device)
        Fx = F(x.float(), t_B.float()).double()
        x0 = math.cos(t) * x - math.sin(t) * Fx
        if i + 1 < len(times):
            e = noise() if noise is not None else torch.randn_like(eps)
            x = math.cos(times[i + 1]) * x0 + math.sin(times[i + 1]) * e.double()
    return x0.float()


def phase2_student_levels(S: int, steps: int, levels: Sequence[int] | None = None) -> list[int]:
    """The levels a 1-2 step phase-2 student runs at (video and maze): ``[0]`` (1 step),
    ``[0, max(1, (S-1)//2)]`` (2 steps) or ``levels`` (strictly increasing from 0, at most ``S - 2``:
    the last level has no missing frame). ``ValueError`` names ``distill.phase2_levels`` / the steps."""
    if levels:
        lv = [int(x) for x in levels]
        if lv[0] != 0 or any(b <= a for a, b in zip(lv, lv[1:])) or lv[-1] > S - 2 or len(lv) != steps:
            raise ValueError(f"distill.phase2_levels={lv}: expected {steps} strictly increasing levels starting at 0 "
                             f"and <= {S - 2} (S = {S} levels)")
        return lv
    if steps == 1:
        return [0]
    if steps != 2:
        raise ValueError(f"phase-2 student steps={steps}: the phase-2 student takes 1 or 2 steps")
    if S < 3:
        raise ValueError(f"a 2-step phase-2 student needs >= 3 levels, the teacher has {S}")
    return [0, max(1, (S - 1) // 2)]


# --- config -----------------------------------------------------------------------------------


def check_number(key: str, value: float, ok: bool, expected: str) -> None:
    """``ValueError`` naming ``key`` and the ``expected`` range unless ``value`` is finite and ``ok``
    (its range test). nan passes a bare ``v < lo`` check and would silently switch a term off
    (``weight > 0`` is ``False`` for nan) or train on nan; inf passes ``v > 0``."""
    if not (math.isfinite(value) and ok):
        raise ValueError(f"{key}={value}: expected a finite number {expected}")


@dataclass
class DmdConfig:
    weight: float = 0.0  # DMD generator-loss weight (rCM: 1 against scm_weight 100); 0 = sCM only, no fake score
    fake_weight: float = 1.0  # fake-score flow-matching loss weight
    start_step: int = 0  # the generator term starts here (the fake score trains from step 0)
    shift: float = 5.0  # DMD / fake-score times: shifted uniform flow time (Wan's shift)
    sigma_max: float = 80.0  # student generation starts at t_max = atan(sigma_max)

    def validate(self, prefix: str = "distill.dmd") -> None:
        check_number(f"{prefix}.weight", self.weight, self.weight >= 0, ">= 0 (0 = no DMD term)")
        check_number(f"{prefix}.fake_weight", self.fake_weight, self.fake_weight > 0, "> 0")
        if self.start_step < 0:
            raise ValueError(f"{prefix}.start_step={self.start_step}: expected a step >= 0")
        check_number(f"{prefix}.shift", self.shift, self.shift > 0, "> 0 (Wan's timestep shift; 1 = none)")
        check_number(f"{prefix}.sigma_max", self.sigma_max, self.sigma_max > 0, "> 0 (t_max = atan(sigma_max))")


@dataclass
class SamplerConfig:
    steps: int = 4  # consistency steps (phase-2 target: 1 or 2 refiner steps)
    mid_times: list[float] = field(default_factory=lambda: list(DEFAULT_MID_TIMES))  # TrigFlow times after t_0
    sigma_max: float = 80.0  # t_0 = atan(sigma_max)

    def validate(self, prefix: str = "distill.sampler", times: bool = True) -> None:
        """Finite values; with ``times`` also the consistency times they give (``consistency_times``)."""
        if self.steps < 1:
            raise ValueError(f"{prefix}.steps={self.steps}: expected >= 1")
        check_number(f"{prefix}.sigma_max", self.sigma_max, self.sigma_max > 0, "> 0 (t_0 = atan(sigma_max))")
        if not all(math.isfinite(float(t)) for t in self.mid_times):
            raise ValueError(f"{prefix}.mid_times={list(self.mid_times)}: expected finite TrigFlow times")
        if times:
            try:
                consistency_times(self.steps, self.mid_times, self.sigma_max)
            except ValueError as e:
                raise ValueError(f"{prefix}.steps={self.steps}, {prefix}.mid_times={list(self.mid_times)}, "
                                 f"{prefix}.sigma_max={self.sigma_max}: {e}") from None


def check_phase2_levels(levels: Sequence[int], steps: int, key: str = "distill.phase2_levels") -> None:
    """What ``phase2_student_levels`` requires of explicit levels without knowing the level count S:
    one level per student step (``steps``), strictly increasing from 0 (the upper bound ``S - 2``
    needs the teacher's budgets and the clip length: ``phase2_student_levels``)."""
    lv = [int(x) for x in levels]
    if lv and (lv[0] != 0 or any(b <= a for a, b in zip(lv, lv[1:])) or len(lv) != steps):
        raise ValueError(f"{key}={lv}: expected {steps} strictly increasing levels starting at 0 (one per "
                         f"student step, distill.sampler.steps={steps}), or [] for the default")


@dataclass
class DistillConfig:
    """The ``distill.*`` section of ``distill_rcm.py``'s config."""

    target: str = "full"  # full | phase1 | phase2
    mode: str = "scm"  # scm (continuous time, JVP) | discrete (no JVP)
    jvp: str = "autograd"  # autograd (torch.func.jvp, math attention) | finite_difference
    jvp_chunk: int = 0  # autograd: query-chunk size of the math attention inside the JVP (0 = unchunked)
    jvp_attention: str = "math"  # autograd: attention inside the JVP: math (chunked, jvp_chunk) | triton (fused kernel)
    fd_size: float = 1e-4  # finite-difference step in TrigFlow time (radians; rCM's; see jvp())
    teacher_lora: str = ""  # phase1 / phase2: the trained phase LoRA folder (merged into the base = teacher); full: optional
    teacher_guidance: float = 5.0  # CFG scale of the teacher (Wan rule; 1 = no CFG)
    negative: str = "encode"  # negative embedding for CFG: encode (Wan's negative prompt) | zeros | path to a torch [L, D] tensor
    p_mean: float = -0.8  # student times: tan t = scale * exp(N(p_mean, p_std^2)) (rCM's Wan setting)
    p_std: float = 1.6
    scale_by_frames: bool = True  # scale = sqrt(latent frames of the student's sequence) (rCM)
    tangent_warmup: int = 1000  # steps of sCM tangent warmup (r: 0 -> 1)
    tangent_norm: float = 0.1  # c in g / (||g|| + c); 0 disables
    scm_weight: float = 100.0  # rCM's loss scale of the sCM term (mode=discrete: of the normalised discrete term)
    delta: float = 0.05  # discrete mode: teacher step t -> t - delta (radians)
    dmd: DmdConfig = field(default_factory=DmdConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    phase2_levels: list[int] = field(default_factory=list)  # phase2: the student's levels; [] = [0] (1 step) or [0, mid] (2 steps)
    phase2_teacher_noise: str = "none"  # phase2: sampling noise of the teacher chain (none = a deterministic map)

    def validate(self) -> None:
        """``ValueError`` naming the key and the expected range; every float must be finite."""
        if self.target not in ("full", "phase1", "phase2"):
            raise ValueError(f"distill.target={self.target!r} is not one of ['full', 'phase1', 'phase2']")
        if self.mode not in MODES:
            raise ValueError(f"distill.mode={self.mode!r} is not one of {list(MODES)}")
        if self.jvp not in JVP_METHODS:
            raise ValueError(f"distill.jvp={self.jvp!r} is not one of {list(JVP_METHODS)}")
        if self.jvp_chunk < 0:
            raise ValueError(f"distill.jvp_chunk={self.jvp_chunk}: expected >= 0 (0 = unchunked)")
        if self.jvp_attention not in JVP_ATTENTION:
            raise ValueError(f"distill.jvp_attention={self.jvp_attention!r} is not one of {list(JVP_ATTENTION)}")
        check_number("distill.fd_size", self.fd_size, self.fd_size > 0, "> 0 (radians)")
        check_number("distill.delta", self.delta, 0 < self.delta < math.pi / 2, "in (0, pi/2) (radians)")
        check_number("distill.teacher_guidance", self.teacher_guidance, self.teacher_guidance >= 1.0,
                     ">= 1 (1 = no CFG)")
        check_number("distill.p_mean", self.p_mean, True, "(mean of log tan t)")
        check_number("distill.p_std", self.p_std, self.p_std > 0, "> 0")
        check_number("distill.tangent_norm", self.tangent_norm, self.tangent_norm >= 0, ">= 0 (0 = no normalisation)")
        check_number("distill.scm_weight", self.scm_weight, self.scm_weight > 0, "> 0")
        if self.tangent_warmup < 0:
            raise ValueError(f"distill.tangent_warmup={self.tangent_warmup}: expected >= 0 steps (0 = no warmup)")
        self.dmd.validate()
        self.sampler.validate(times=self.target != "phase2")  # phase 2: levels, not consistency times
        if self.target == "phase2":
            if self.sampler.steps not in (1, 2):
                raise ValueError(f"distill.sampler.steps={self.sampler.steps}: the phase-2 student takes 1 or 2 steps")
            if self.dmd.weight > 0:
                raise ValueError("distill.dmd.weight > 0 with distill.target=phase2: the phase-2 corruption is not "
                                 "Gaussian, there is no teacher score to match; use dmd.weight=0")
            if self.phase2_teacher_noise not in ("none", "level"):
                raise ValueError(f"distill.phase2_teacher_noise={self.phase2_teacher_noise!r} is not one of ['none', 'level']")
            check_phase2_levels(self.phase2_levels, self.sampler.steps)
