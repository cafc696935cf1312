"""Phase-2 forward (corruption) process and the TACoS sampling step.

Forward at level ``s`` (Soft-Diffusion style)::

    x_s = I(x_0, M_s) + sigma_s * eps * (1 - M_s)        D(x_0, s) := I(x_0, M_s)

Gaussian noise only on missing frames; ``sigma_s`` decreases with ``s`` (``level_sigmas``).
Sampling, coarse to fine (TACoS form of cold diffusion, METHOD.md section 5)::

    x0_hat  = R(x_s, s, M_s)
    x_{s+1} = x_s - D(x0_hat, s) + D(x0_hat, s+1)

**The noise part of the residual follows the level's sigma.** The residual ``x_s - D(x0_hat, s)``
has two parts: ``I(x_s - x0_hat, M_s)``, the restorer's error at the anchors spread over the gaps
(what TACoS carries so that the update stays consistent with the known keyframes), and
``n_s = x_s - I(x_s, M_s)``, the part of ``x_s`` that is not piecewise linear between its
anchors: the noise ``sigma_s eps`` of the corruption (``n_s = 0`` at the anchors). Carried as is,
``n_s`` would keep level 0's noise ``sigma_0 eps`` at every later level, on the frames that become
keyframes too, and in the output, while training shows level ``s+1`` the smaller
``sigma_{s+1}`` and exact keyframes. So the update is (``tacos_step``)::

    x_{s+1} = D(x0_hat, s+1) + I(x_s - x0_hat, M_s) + rho * n_s * (1 - M_{s+1})
    rho     = sigma_{s+1} / sigma_s   (noise "none"; 1 when sigma_s = 0)
            = 0, plus fresh noise_scale * sigma_{s+1} * z on the frames missing in M_{s+1}  (noise "level")
            = 1 when sigma_s is not given (no schedule: plain TACoS, whatever the noise mode)

With ``rho = 1`` this is the literal TACoS update except on the new keyframes of ``M_{s+1}``,
which get no noise (as in training). ``noise="none"`` rescales the sampler's own noise estimate
``n_s / sigma_s`` (DDIM-like, deterministic); ``"level"`` replaces it with fresh noise of the
training scale; ``"constant"`` adds ``noise_scale * z`` on top of the deterministic update, with
``noise_scale`` an absolute std: ``sampling_noise_scale`` ties it to the schedule (``c * sigma_0``,
the level-0 training sigma, for ``c`` times the training noise; ``noise_scale = 1`` would be
unit-variance noise against training sigmas of ~0.01-0.1). The
keyframes of ``M_s`` are then clamped to their values in ``x_s`` (they are known: phase-1
keyframes at level 0, earlier updates later) and positions are clipped when asked. With a
perfect restorer (``x0_hat = x_0``) and ``x_s = I(x_0, M_s) + sigma_s eps (1 - M_s)``, the step
gives exactly ``I(x_0, M_{s+1}) + sigma_{s+1} eps (1 - M_{s+1})`` (noise ``none``): the training
input of level ``s+1``, and the last level (``M_S`` all ones, ``sigma_S = 0``) returns ``x_0``.

``anchor_confidence`` is the per-frame input channel that tells the refiner which frames are
anchors. Training and sampling must build it from the *same* level's mask ``M_s``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from interpdiff.interpolate import interpolate, interpolate_corrupt, neighbours

NOISE_MODES = ("none", "constant", "level")
CONFIDENCE_KINDS = ("mask", "tent")


def level_sigmas(n_levels: int, sigma_max: float = 0.1, sigma_min: float = 0.01, last_zero: bool = True) -> torch.Tensor:
    """Geometric noise levels ``sigma_0 = sigma_max > ... > sigma_min`` for ``n_levels`` levels.

    ``last_zero`` sets the final level's sigma to 0 (its mask has no missing frame when
    ``K_S = T``).
    """
    if n_levels < 1:
        raise ValueError(f"level_sigmas: n_levels must be >= 1, got {n_levels}")
    if not 0 <= sigma_min <= sigma_max:
        raise ValueError(f"level_sigmas: need 0 <= sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    if n_levels == 1:
        return torch.tensor([0.0 if last_zero else sigma_max])
    n = n_levels - 1 if last_zero else n_levels
    if n == 1:
        s = torch.tensor([sigma_max], dtype=torch.float64)
    elif sigma_min > 0:
        s = torch.logspace(torch.log10(torch.tensor(sigma_max)), torch.log10(torch.tensor(sigma_min)), n, dtype=torch.float64)
    else:
        s = torch.linspace(sigma_max, 0.0, n, dtype=torch.float64)
    if last_zero:
        s = torch.cat([s, torch.zeros(1, dtype=torch.float64)])
    return s.float()


def sampling_noise_scale(noise: str, scale: float, sigmas: Sequence[float] | torch.Tensor) -> float:
    """The ``noise_scale`` of ``refine`` / ``tacos_step`` for sampling noise of ``scale`` times the
    training schedule ``sigmas`` (``level_sigmas``; METHOD.md section 5: sampling noise tied to
    the training schedule): ``level`` -> ``scale`` (``tacos_step`` draws ``scale * sigma_{s+1}``),
    ``constant`` -> ``scale * sigmas[0]`` (the level-0 training sigma, the largest, added at every
    step), ``none`` -> ``scale`` (unused)."""
    if noise not in NOISE_MODES:
        raise ValueError(f"sampling_noise_scale: noise={noise!r} is not one of {NOISE_MODES}")
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"sampling_noise_scale: scale={scale}, expected a finite number >= 0")
    return float(scale) * float(sigmas[0]) if noise == "constant" else float(scale)


def anchor_confidence(mask_B_T: torch.Tensor, kind: str = "mask") -> torch.Tensor:
    """Per-frame anchor channel ``[B, T]`` float32 built from a level's mask.

    ``mask``: 1 at keyframes, 0 elsewhere. ``tent``: ``1 - 2 * min(w, 1 - w)`` with ``w`` the
    interpolation weight (1 at keyframes, falling to 0 at the middle of a gap).
    """
    if kind == "mask":
        return mask_B_T.to(torch.float32)
    if kind == "tent":
        _, _, w = neighbours(mask_B_T)
        return torch.where(mask_B_T, torch.ones_like(w), 1 - 2 * torch.minimum(w, 1 - w))
    raise ValueError(f"anchor_confidence: kind={kind!r} is not one of {CONFIDENCE_KINDS}")


def degrade(x0: torch.Tensor, mask_s: torch.Tensor, time_dim: int = 1, backend: str = "auto") -> torch.Tensor:
    """``D(x_0, s) = I(x_0, M_s)``: the deterministic part of the corruption."""
    return interpolate(x0, mask_s, time_dim=time_dim, backend=backend)


def corrupt(
    x0: torch.Tensor,
    mask_s: torch.Tensor,
    sigma_s: torch.Tensor | float,
    eps: torch.Tensor | None = None,
    time_dim: int = 1,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``x_s = I(x_0, M_s) + sigma_s * eps * (1 - M_s)``; ``sigma_s`` a float or ``[B]``."""
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32).to(x0.dtype)
    return interpolate_corrupt(x0, mask_s, sigma_s, eps, time_dim=time_dim, backend=backend)


def randn_rows(shape, generator=None, device=None) -> torch.Tensor:
    """Standard normal float32 noise of ``shape`` on ``device``, from one generator for the whole
    tensor or, with a list of generators (one per batch row), row ``b`` from ``generator[b]``: a
    row's noise then does not depend on the batch it is sampled in (``sample.py``'s per-prompt
    seeds). Each draw happens on its generator's device (a CPU generator draws on the CPU, then the
    noise moves), so the numbers are the generator's whatever ``device``; ``None`` draws on ``device``."""
    shape = tuple(shape)

    def draw(sh, g):
        where = device if g is None else g.device
        return torch.randn(sh, generator=g, device=where, dtype=torch.float32)

    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: expected one per row")
        return torch.stack([draw(shape[1:], g).to(device) for g in generator])
    return draw(shape, generator).to(device)


def _missing(mask_B_T: torch.Tensor, like: torch.Tensor, time_dim: int) -> torch.Tensor:
    shape = [1] * like.dim()
    shape[0], shape[time_dim] = mask_B_T.shape
    return (~mask_B_T).view(shape)


def tacos_step(
    x_s: torch.Tensor,
    x0_hat: torch.Tensor,
    mask_s: torch.Tensor,
    mask_next: torch.Tensor,
    time_dim: int = 1,
    noise: str = "none",
    sigma_next: float | torch.Tensor = 0.0,
    noise_scale: float = 1.0,
    clip: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    sigma_s: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """One coarse-to-fine step ``x_s -> x_{s+1}`` (see the module docstring).

    Args:
        noise: ``none`` (deterministic; the noise in ``x_s`` is rescaled by ``sigma_next /
            sigma_s``), ``level`` (that noise replaced by fresh ``noise_scale * sigma_next``
            noise, the training schedule) or ``constant`` (the deterministic update plus
            ``noise_scale`` noise on every step: an absolute std, see ``sampling_noise_scale``),
            noise only on frames missing in ``mask_next``.
        sigma_next, sigma_s: the corruption sigmas of the next and this level, floats or ``[B]``
            (per-sample levels); ``sigma_s`` ``None`` (or 0) carries the noise part unscaled
            (plain TACoS) with ``noise`` ``none``/``constant``.
        clip: ``(lo, hi)`` to clip values after the update (maze positions: ``(0, 1)``).
        generator: one generator, or one per batch row (``randn_rows``).
    """
    if noise not in NOISE_MODES:
        raise ValueError(f"tacos_step: noise={noise!r} is not one of {NOISE_MODES}")
    if not bool((mask_s <= mask_next).all()):
        raise ValueError("tacos_step: mask_next must contain every keyframe of mask_s (nested levels)")
    td = time_dim % x_s.dim()
    B = x_s.shape[0]
    bshape = [B] + [1] * (x_s.dim() - 1)

    def per_sample(v, name):  # float or [B] -> [B, 1, ...] float64 on x's device
        t = torch.as_tensor(v, dtype=torch.float64).to(x_s.device)
        if t.dim() > 1 or (t.dim() == 1 and t.shape[0] != B):
            raise ValueError(f"tacos_step: {name} must be a float or a [B={B}] tensor, got shape {list(t.shape)}")
        if bool((t < 0).any()):
            raise ValueError(f"tacos_step: {name} must be >= 0, got {t.tolist()}")
        return t.expand(B).reshape(bshape)

    sig_next = per_sample(sigma_next, "sigma_next")
    lin_s = degrade(x_s, mask_s, td, backend)  # I(x_s, M_s)
    # D(x0_hat, s+1) + I(x_s - x0_hat, M_s)  (= D(x0_hat, s+1) + I(x_s, M_s) - D(x0_hat, s))
    x_next = degrade(x0_hat, mask_next, td, backend) + (lin_s - degrade(x0_hat, mask_s, td, backend))
    miss_next = _missing(mask_next, x_s, td)
    if sigma_s is None:  # no schedule: plain TACoS, the noise part carried as is (any noise mode)
        rho = torch.ones_like(sig_next)
    elif noise == "level":  # replaced by fresh noise of the next level's sigma below
        rho = torch.zeros_like(sig_next)
    else:
        sig_s = per_sample(sigma_s, "sigma_s")
        rho = torch.where(sig_s > 0, sig_next / sig_s.clamp_min(1e-300), torch.ones_like(sig_next))
    if bool((rho != 0).any()):
        # n_s = x_s - I(x_s, M_s), rescaled to the next level and kept on the frames still missing
        x_next = x_next + (rho.to(x_s.dtype) * (x_s - lin_s)) * miss_next
    keep = ~_missing(mask_s, x_s, td)
    x_next = torch.where(keep, x_s, x_next)
    if noise != "none":
        scale = torch.full_like(sig_next, noise_scale) if noise == "constant" else noise_scale * sig_next
        if bool((scale > 0).any()):
            eps = randn_rows(x_s.shape, generator, x_s.device).to(x_s.dtype)
            x_next = x_next + scale.to(x_s.dtype) * eps * miss_next
    if clip is not None:
        x_next = x_next.clamp(*clip)
    return x_next


def refine(
    restorer,
    x_start: torch.Tensor,
    masks_B_S_T: torch.Tensor,
    time_dim: int = 1,
    sigmas: Sequence[float] | torch.Tensor | None = None,
    noise: str = "none",
    noise_scale: float = 1.0,
    clip: tuple[float, float] | None = None,
    confidence: str = "mask",
    generator: torch.Generator | None = None,
    backend: str = "auto",
    return_all: bool = False,
):
    """Run the phase-2 sampler from level 0 to the last level.

    ``sigmas[s]`` are the training corruption levels (``level_sigmas``): each step rescales the
    noise in ``x_s`` from ``sigmas[s]`` to ``sigmas[s+1]``; ``None`` = plain TACoS, no sampling noise
    scale (``noise="level"`` then adds none).

    ``restorer(x_s, s, mask_s, conf_s) -> x0_hat`` with ``s`` a python int and ``conf_s`` the
    anchor confidence built from ``mask_s`` (exactly as in training). ``x_start`` is level 0's
    input (usually ``I(keyframes, M_0)``). Returns the final ``x`` (and every level's ``x`` and
    ``x0_hat`` with ``return_all``).
    """
    S = masks_B_S_T.shape[1]
    x = x_start
    xs, x0s = [x], []
    for s in range(S - 1):
        m, m_next = masks_B_S_T[:, s], masks_B_S_T[:, s + 1]
        x0_hat = restorer(x, s, m, anchor_confidence(m, confidence))
        sig = 0.0 if sigmas is None else float(sigmas[s + 1])
        sig_s = None if sigmas is None else float(sigmas[s])
        x = tacos_step(x, x0_hat, m, m_next, time_dim, noise, sig, noise_scale, clip, generator, backend, sig_s)
        xs.append(x)
        x0s.append(x0_hat)
    if return_all:
        return x, xs, x0s
    return x
