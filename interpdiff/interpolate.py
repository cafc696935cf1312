"""``I(x, M)``: keep ``x`` at keyframes, fill the other frames by linear interpolation.

For each sample ``b`` and frame ``t`` let ``l(t)`` be the nearest keyframe at or before ``t`` and
``r(t)`` the nearest keyframe at or after ``t``. Then::

    I(x, M)[b, t] = (1 - w) * x[b, l] + w * x[b, r],   w = (t - l) / (r - l)   (w = 0 when l == r)

applied to every channel / pixel independently. Index 0 and ``T - 1`` must be keyframes in every
row. Gradients flow to the keyframe values only (``d out[t] / d x[l] = 1 - w``,
``d out[t] / d x[r] = w``); non-keyframe inputs get zero gradient.

``interpolate`` validates, then dispatches to the Triton kernel in ``kernels/`` (CUDA, or CPU
under ``TRITON_INTERPRET=1`` when forced) or to ``interpolate_reference`` (torch).
"""

from __future__ import annotations

import torch

from interpdiff._dispatch import use_triton


def check_mask(mask: torch.Tensor, batch: int, length: int, name: str = "mask", values: bool = True) -> None:
    """Raise a ValueError naming the problem when ``mask`` is not a valid ``[B, T]`` keyframe mask.

    ``values=False`` checks dtype and shape only: the endpoint check reads the mask on the host,
    which is a device sync on CUDA (the Triton kernel then forces the endpoints itself).
    """
    if mask.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor [B, T], got dtype {mask.dtype}")
    if mask.dim() != 2 or tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} must have shape [B, T] = [{batch}, {length}], got {list(mask.shape)}")
    if length < 2:
        raise ValueError(f"{name}: a sequence needs at least 2 frames (both endpoints), got T={length}")
    if not values:
        return
    bad = ~(mask[:, 0] & mask[:, -1])
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:8].tolist()
        raise ValueError(
            f"{name}: frames 0 and T-1 must be keyframes in every row; rows {rows} "
            f"(of {int(bad.sum())} bad) miss an endpoint"
        )


def neighbours(mask_B_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left/right keyframe index and right weight for every frame.

    Returns ``(left_B_T long, right_B_T long, w_B_T float32)`` with ``w = (t-l)/(r-l)``
    (0 at keyframes). Assumes a valid mask (endpoints set).
    """
    B, T = mask_B_T.shape
    t = torch.arange(T, device=mask_B_T.device).expand(B, T)
    neg = torch.full_like(t, -1)
    big = torch.full_like(t, T)
    left = torch.where(mask_B_T, t, neg).cummax(dim=1).values
    right = torch.where(mask_B_T, t, big).flip(1).cummin(dim=1).values.flip(1)
    span = (right - left).clamp_min(1)
    w = (t - left).to(torch.float32) / span.to(torch.float32)
    return left, right, w


def interpolate_reference(x: torch.Tensor, mask: torch.Tensor, time_dim: int = 1) -> torch.Tensor:
    """Torch reference of ``I(x, M)`` (gather + lerp, fp32 accumulation, output in ``x.dtype``)."""
    xt = x.movedim(time_dim, 1)  # (B, T, ...)
    B, T = xt.shape[:2]
    left, right, _ = neighbours(mask)
    extra = (1,) * (xt.dim() - 2)
    idx_shape = (B, T) + extra
    xl = torch.gather(xt, 1, left.view(idx_shape).expand_as(xt))
    xr = torch.gather(xt, 1, right.view(idx_shape).expand_as(xt))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    t = torch.arange(T, device=x.device)
    w = ((t - left).to(acc) / (right - left).clamp_min(1).to(acc)).view(idx_shape)
    out = xl.to(acc) * (1 - w) + xr.to(acc) * w
    return out.to(x.dtype).movedim(1, time_dim)


def _check_x(x: torch.Tensor, mask: torch.Tensor, time_dim: int, check_values: bool = True) -> int:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"interpolate: x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 2:
        raise ValueError(f"interpolate: x must have a batch and a time dimension, got shape {list(x.shape)}")
    td = time_dim % x.dim()
    if td == 0:
        raise ValueError("interpolate: time_dim cannot be the batch dimension 0")
    check_mask(mask, x.shape[0], x.shape[td], values=check_values or not x.is_cuda)
    if mask.device != x.device:
        raise ValueError(f"interpolate: mask is on {mask.device} but x is on {x.device}")
    return td


def interpolate(
    x: torch.Tensor, mask: torch.Tensor, time_dim: int = 1, backend: str = "auto", check_values: bool = True
) -> torch.Tensor:
    """``I(x, M)`` for ``x`` of any layout with batch at dim 0 and time at ``time_dim``.

    Args:
        x: ``[B, T, D]`` (``time_dim=1``) or ``[B, C, T, H, W]`` (``time_dim=2``), any float dtype.
        mask: bool ``[B, T]``; per-sample keyframes; ``mask[:, 0]`` and ``mask[:, -1]`` set.
        backend: ``"auto" | "triton" | "torch"`` (see ``interpdiff._dispatch``).
        check_values: check that every row has both endpoints (a host sync on CUDA). Hot loops
            whose masks come from ``interpdiff.masks`` may pass False on CUDA; CPU always checks.
    """
    td = _check_x(x, mask, time_dim, check_values)
    if use_triton(backend, x, "interpolate"):
        from kernels.interpolate import interpolate_triton

        return interpolate_triton(x, mask, time_dim=td, check=False)  # validated above
    return interpolate_reference(x, mask, td)


def interpolate_corrupt(
    x: torch.Tensor,
    mask: torch.Tensor,
    sigma: torch.Tensor | float,
    eps: torch.Tensor,
    time_dim: int = 1,
    backend: str = "auto",
    check_values: bool = True,
) -> torch.Tensor:
    """``I(x, M) + sigma * eps * (1 - M)``: the phase-2 corruption, fused on the Triton path.

    ``sigma`` is a float or a ``[B]`` tensor (one noise level per sample); ``check_values`` as
    in ``interpolate``.
    """
    td = _check_x(x, mask, time_dim, check_values)
    if not isinstance(eps, torch.Tensor) or eps.shape != x.shape or not eps.is_floating_point() or eps.device != x.device:
        got = (f"{list(eps.shape)} {eps.dtype} on {eps.device}" if isinstance(eps, torch.Tensor) else type(eps).__name__)
        raise ValueError(f"interpolate_corrupt: eps must be a float tensor of x's shape {list(x.shape)} on {x.device}, "
                         f"got {got}")
    B = x.shape[0]
    sigma_B = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
    if sigma_B.numel() == 1:
        sigma_B = sigma_B.expand(B)
    if sigma_B.numel() != B:
        raise ValueError(f"interpolate_corrupt: sigma must be a float or a [B]={B} tensor, got {sigma_B.numel()} values")
    if use_triton(backend, x, "interpolate_corrupt"):
        from kernels.interpolate import interpolate_triton

        return interpolate_triton(x, mask, time_dim=td, sigma=sigma_B, eps=eps, check=False)
    base = interpolate_reference(x, mask, td)
    shape = [B] + [1] * (x.dim() - 1)
    miss = (~mask).to(torch.float32)
    miss = miss.view([B] + [1] * (td - 1) + [mask.shape[1]] + [1] * (x.dim() - td - 1))
    noise = sigma_B.view(shape) * eps.to(torch.float32) * miss
    return (base.to(torch.float32) + noise).to(x.dtype)
