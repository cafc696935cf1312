"""Phase-2 forward (corruption) process and the TACoS sampling step.

Forward at level ``s`` (Soft-Diffusion style)::

    x_s = I(x_0, M_s) + sigma_s * eps * (1 - M_s)        D(x_0, s) := I(x_0, M_s)

Gaussian noise only on missing frames; ``sigma_s`` decreases with ``s`` (``level_sigmas``).
Sampling, coarse to fine (TACoS form of cold diffusion)::

    x0_hat  = R(x_s, s, M_s)
    x_{s+1} = x_s - D(x0_hat, s) + D(x0_hat, s+1)

then the keyframes of ``M_s`` are clamped to their values in ``x_s`` (they are known: phase-1
keyframes at level 0, earlier updates later; the update leaves them unchanged in exact
arithmetic, the clamp removes rounding drift), optional sampling noise is added on the frames
still missing at ``s+1`` and positions are clipped when asked. With a perfect restorer
(``x0_hat = x_0``) and no sampling noise, ``x_{s+1} = I(x_0, M_{s+1})`` and the last level
(``M_S`` all ones) returns ``x_0`` exactly.

``anchor_confidence`` is the per-frame input channel that tells the refiner which frames are
anchors. Training and sampling must build it from the *same* level's mask ``M_s``.
"""

from __future__ import annotations

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
    sigma_next: float = 0.0,
    noise_scale: float = 1.0,
    clip: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One coarse-to-fine step ``x_s -> x_{s+1}`` (see the module docstring).

    Args:
        noise: ``none`` (deterministic), ``constant`` (``noise_scale`` on every step) or
            ``level`` (``noise_scale * sigma_next``, the training schedule), added only on frames
            missing in ``mask_next``.
        clip: ``(lo, hi)`` to clip values after the update (maze positions: ``(0, 1)``).
    """
    if noise not in NOISE_MODES:
        raise ValueError(f"tacos_step: noise={noise!r} is not one of {NOISE_MODES}")
    if not bool((mask_s <= mask_next).all()):
        raise ValueError("tacos_step: mask_next must contain every keyframe of mask_s (nested levels)")
    td = time_dim % x_s.dim()
    x_next = x_s - degrade(x0_hat, mask_s, td, backend) + degrade(x0_hat, mask_next, td, backend)
    keep = ~_missing(mask_s, x_s, td)
    x_next = torch.where(keep, x_s, x_next)
    if noise != "none":
        scale = noise_scale if noise == "constant" else noise_scale * float(sigma_next)
        if scale > 0:
            eps = torch.randn(x_s.shape, generator=generator, device=x_s.device, dtype=torch.float32).to(x_s.dtype)
            x_next = x_next + scale * eps * _missing(mask_next, x_s, td)
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
        x = tacos_step(x, x0_hat, m, m_next, time_dim, noise, sig, noise_scale, clip, generator, backend)
        xs.append(x)
        x0s.append(x0_hat)
    if return_all:
        return x, xs, x0s
    return x
