"""Flow matching as Wan2.1 uses it, the timestep shift, and TrigFlow conversions.

Flow time ``sigma`` in [0, 1]: ``x_sigma = (1 - sigma) x0 + sigma eps``, velocity target
``v = eps - x0``, model timestep ``1000 * sigma``; shift
``sigma' = s * sigma / (1 + (s - 1) * sigma)`` (s = 5 for Wan T2V sampling).

TrigFlow (rCM / sCM) time ``theta`` in [0, pi/2]: ``x_theta = cos(theta) x0 + sin(theta) eps``
(``sigma_data = 1``), velocity ``F = d x_theta / d theta = cos(theta) eps - sin(theta) x0``.
The same noisy point up to scale: ``tan(theta) = sigma / (1 - sigma)`` and
``x_sigma = x_theta / (sin(theta) + cos(theta))``.
"""

from __future__ import annotations

import torch

DENSITIES = ("uniform", "logit_normal", "shifted_uniform")


def _time_dtype(like: torch.Tensor) -> torch.dtype:
    """Times and sigmas are computed in float32, or float64 when ``like`` is float64 (never bf16/fp16)."""
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def _b(v: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample ``[B]`` tensor (or float) against ``like`` (batch first)."""
    v = torch.as_tensor(v, device=like.device, dtype=_time_dtype(like))
    if v.dim() == 0:
        return v
    return v.view([-1] + [1] * (like.dim() - 1))


def flow_match_xt(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x_sigma = (1 - sigma) x0 + sigma eps`` (``sigma`` float or ``[B]``)."""
    s = _b(sigma, x0)
    return ((1 - s) * x0.to(s.dtype) + s * eps.to(s.dtype)).to(x0.dtype)


def flow_match_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Velocity target ``eps - x0``."""
    return eps - x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x0 = x_sigma - sigma v``."""
    return x_t - _b(sigma, x_t).to(x_t.dtype) * v


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Timestep shift ``s * sigma / (1 + (s - 1) * sigma)``; ``shift = 1`` is the identity."""
    if shift <= 0:
        raise ValueError(f"shift_sigma: shift must be > 0, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_to_timestep(sigma: torch.Tensor | float) -> torch.Tensor | float:
    """Wan's model timestep for flow time ``sigma``: ``1000 * sigma``."""
    return sigma * 1000.0


def sample_sigmas(
    n: int,
    density: str = "logit_normal",
    shift: float = 1.0,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Training flow times ``[n]``: ``uniform``, ``logit_normal`` (SD3) or ``shifted_uniform``.

    ``shift`` is applied after drawing (identity at 1), so ``shifted_uniform`` with shift 5
    concentrates training on high noise like Wan's sampler.
    """
    if density == "uniform" or density == "shifted_uniform":
        u = torch.rand(n, generator=generator, device=device)
    elif density == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator, device=device))
    else:
        raise ValueError(f"sample_sigmas: density={density!r} is not one of {DENSITIES}")
    return shift_sigma(u, shift)


def sampling_sigmas(steps: int, shift: float = 5.0, device=None) -> torch.Tensor:
    """Descending flow times ``[steps + 1]`` from 1 to 0 with the shift (Euler sampler grid)."""
    s = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    return shift_sigma(s, shift).float()


# --- TrigFlow <-> flow time -------------------------------------------------------------------


def flow_to_trig_time(sigma: torch.Tensor | float) -> torch.Tensor:
    """``theta = atan2(sigma, 1 - sigma)``."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return torch.atan2(s, 1 - s)


def trig_to_flow_time(theta: torch.Tensor | float) -> torch.Tensor:
    """``sigma = sin(theta) / (sin(theta) + cos(theta))``."""
    t = torch.as_tensor(theta, dtype=torch.float64)
    return torch.sin(t) / (torch.sin(t) + torch.cos(t))


def flow_to_trig_x(x_sigma: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x_theta = x_sigma / sqrt((1 - sigma)^2 + sigma^2)`` (same point, TrigFlow scale)."""
    s = _b(sigma, x_sigma)
    return x_sigma / torch.sqrt((1 - s) ** 2 + s**2).to(x_sigma.dtype)


def trig_to_flow_x(x_theta: torch.Tensor, theta: torch.Tensor | float) -> torch.Tensor:
    """``x_sigma = x_theta / (sin(theta) + cos(theta))``."""
    t = _b(theta, x_theta)
    return x_theta / (torch.sin(t) + torch.cos(t)).to(x_theta.dtype)


def flow_velocity_to_trig(v: torch.Tensor, x_sigma: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """TrigFlow velocity ``F = cos(theta) eps - sin(theta) x0`` from a flow velocity ``v``.

    ``x0 = x - sigma v`` and ``eps = x + (1 - sigma) v`` recover the pair the flow model
    implies at ``(x_sigma, sigma)``.
    """
    s = _b(sigma, x_sigma)
    x0 = x_sigma - s * v
    eps = x_sigma + (1 - s) * v
    th = torch.atan2(s, 1 - s)
    return torch.cos(th) * eps - torch.sin(th) * x0


def trig_velocity_to_flow(F: torch.Tensor, x_theta: torch.Tensor, theta: torch.Tensor | float) -> torch.Tensor:
    """Flow velocity ``v = eps - x0`` from a TrigFlow velocity at ``(x_theta, theta)``.

    ``x0 = cos(theta) x - sin(theta) F`` and ``eps = sin(theta) x + cos(theta) F``.
    """
    t = _b(theta, x_theta)
    x0 = torch.cos(t) * x_theta - torch.sin(t) * F
    eps = torch.sin(t) * x_theta + torch.cos(t) * F
    return eps - x0

