"""Keyframe selection: SNR-weighted segment costs and the batched dynamic program.

Segment cost ``c[i, j]`` (``i < j``) is the cost of representing ``x[i..j]`` by interpolating
between ``x_i`` and ``x_j``. It is a KL proxy between a teacher and the student
"keyframes + interpolation": for a Gaussian forward process ``q(x_t|x_0) = N(alpha_t x_0,
sigma_t^2 I)`` the per-step KL between the two marginals is ``SNR(t)/2 * ||x0_teacher -
x0_student||^2``; we sum it over ``t_steps`` steps with weights
``w(t) = clip(SNR(t), s_min, s_max) ** gamma``. With the ground truth as teacher (maze) the
difference does not depend on ``t``, so ``c[i, j] = (sum_t w(t) / 2) * sum_{i<u<j} ||x_u -
I_ij(x)_u||^2``.

The optimal K-keyframe set minimises ``sum_k c[t_k, t_{k+1}]`` with ``t_1 = 0``,
``t_K = T-1``: ``D[k, t] = min_{s<t} D[k-1, s] + c[s, t]``. Ties are broken deterministically:
each back-pointer takes the *smallest* ``s`` reaching the minimum, i.e. among all optimal sets
the one with the smallest last interior index, then the smallest one before it, and so on.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from interpdiff._dispatch import use_triton

SCHEDULES = ("flow", "cosine")


def snr(t: torch.Tensor, schedule: str = "flow") -> torch.Tensor:
    """``SNR(t) = alpha_t^2 / sigma_t^2`` for ``t`` in (0, 1).

    ``flow``: ``alpha = 1 - t, sigma = t`` (rectified flow, as Wan2.1 is trained);
    ``cosine``: ``alpha = cos(pi t / 2), sigma = sin(pi t / 2)`` (VP cosine).
    """
    if schedule == "flow":
        return ((1 - t) / t) ** 2
    if schedule == "cosine":
        return 1.0 / torch.tan(math.pi * t / 2) ** 2
    raise ValueError(f"snr: schedule={schedule!r} is not one of {SCHEDULES}")


def snr_weights(
    t_steps: int = 16,
    s_min: float = 0.1,
    s_max: float = 10.0,
    gamma: float = 1.0,
    schedule: str = "flow",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Diffusion times and their weights ``w(t) = clip(SNR(t), s_min, s_max) ** gamma``.

    The ``t_steps`` times are the midpoints ``t_i = (i + 0.5) / t_steps`` of a uniform grid on
    (0, 1) (midpoints avoid the infinite SNR at t=0). Returns ``(t [t_steps], w [t_steps])`` in
    float64.
    """
    if t_steps < 1:
        raise ValueError(f"snr_weights: t_steps must be >= 1, got {t_steps}")
    if not (0 < s_min <= s_max):
        raise ValueError(f"snr_weights: need 0 < s_min <= s_max, got s_min={s_min}, s_max={s_max}")
    t = (torch.arange(t_steps, dtype=torch.float64) + 0.5) / t_steps
    w = snr(t, schedule).clamp(s_min, s_max) ** gamma
    return t, w


def kl_scale(**snr_kwargs) -> float:
    """``sum_t w(t) / 2``: the factor turning a squared error into the summed KL proxy."""
    return float(snr_weights(**snr_kwargs)[1].sum() / 2)


def m1_of(n: torch.Tensor) -> torch.Tensor:
    """``sum_{v=1..n} v``."""
    return n * (n + 1) / 2


def m2_of(n: torch.Tensor) -> torch.Tensor:
    """``sum_{v=1..n} v^2``."""
    return n * (n + 1) * (2 * n + 1) / 6


def segment_costs(
    x: torch.Tensor,
    time_dim: int = 1,
    scale: float | None = None,
    segment_cost_samples: int | None = None,
    max_elems: int = 1 << 23,
    **snr_kwargs,
) -> torch.Tensor:
    """Cost matrix ``[B, T, T]`` with the ground truth as teacher.

    ``c[b, i, j] = scale * sum_{i<u<j} ||x[b, u] - I_ij(x)[b, u]||^2`` for ``i < j`` and ``+inf``
    for ``i >= j``, where ``scale = kl_scale(**snr_kwargs)`` unless given. Adjacent pairs cost 0.

    Exact mode (``segment_cost_samples=None``) expands the squared error into dot products of
    frames: the Gram matrix ``x x^T`` and its (``u``-weighted) prefix sums give every segment's
    error (one ``[T, D] x [D, T]`` matmul and O(T^2) memory per sample, float64 against
    cancellation).
    ``segment_cost_samples=n``: a segment with more than ``n`` interior frames is estimated from
    ``n`` evenly spaced interior frames, rescaled by ``#interior / n`` (METHOD.md section 3's
    option; the maze keyframe preparation exposes it as ``keyframes.segment_cost_samples``, default
    ``None`` = exact). The video teacher (``interpdiff.video.dphi.teacher_costs``) does not
    sample: it sums every interior frame of a segment, since one teacher forward over the whole
    clip per (segment, time) gives all of them at once and sampling frames would save no
    forward (at ``T = 21`` latent frames a segment has at most 19 interior frames). Returned as
    float32; work is chunked over the batch so that a temporary holds about ``max_elems`` elements.
    """
    if scale is None:
        scale = kl_scale(**snr_kwargs)
    xt = x.movedim(time_dim, 1)
    B, T = xt.shape[:2]
    xt = xt.reshape(B, T, -1).to(torch.float64)
    Dm = xt.shape[2]
    dev = x.device
    ar = torch.arange(T, device=dev)
    I, J = torch.meshgrid(ar, ar, indexing="ij")  # (T, T)
    valid = J > I
    n = (J - I - 1).clamp_min(0).to(torch.float64)  # interior frames
    span = (J - I).clamp_min(1).to(torch.float64)
    out = torch.empty(B, T, T, dtype=torch.float32, device=dev)
    per = T * T * (max(T, 8) if segment_cost_samples is None else Dm * int(segment_cost_samples))
    chunk = max(1, max_elems // max(per, 1))
    if segment_cost_samples is not None:
        n_s = int(segment_cost_samples)
        if n_s < 1:
            raise ValueError(f"segment_costs: segment_cost_samples must be >= 1 or None, got {n_s}")
        k = torch.arange(n_s, device=dev, dtype=torch.float64)
        dense = n[..., None] <= n_s
        spaced = torch.floor((k + 0.5) * n[..., None] / n_s).long() + 1
        U = torch.where(dense, (k.long() + 1)[None, None].expand(T, T, n_s), spaced) + I[..., None]
        weight = ((U < J[..., None]) & valid[..., None]).to(torch.float64)
        weight = weight * torch.where(n > n_s, n / n_s, torch.ones_like(n))[..., None]
        U = U.clamp(max=T - 1)
        wr = ((U - I[..., None]).to(torch.float64) / span[..., None]).clamp(0, 1)[..., None]  # (T,T,S,1)
    for b0 in range(0, B, chunk):
        xb = xt[b0 : b0 + chunk]  # (b, T, D)
        if segment_cost_samples is None:
            # Every term is a dot product of frames, so the Gram matrix G = x x^T ([b, T, T]) and its
            # prefix sums carry all of it: memory O(T^2) per sample, not O(T^2 D) (a Wan latent,
            # D = 16 x 60 x 104, needed 2 GB of temporaries), and one matmul over D.
            # centred per sample first: the cost is shift-invariant, and a large common offset would
            # otherwise cancel catastrophically in the Gram terms (|x|^2 ~ D M^2)
            xc = xb - xb.mean(1, keepdim=True)
            G = xc @ xc.transpose(1, 2)  # (b, T, T)
            arf = ar.to(xb)
            zero = G.new_zeros(G.shape[0], T, 1)
            P = torch.cat([zero, G.cumsum(2)], 2)  # P[k, t] = sum_{u<t} x_k . x_u      (b, T, T+1)
            R = torch.cat([zero, (G * arf).cumsum(2)], 2)  # R[k, t] = sum_{u<t} u x_k . x_u
            dg = torch.diagonal(G, dim1=1, dim2=2)  # ||x_t||^2                        (b, T)
            q2 = torch.cat([zero[:, 0], dg.cumsum(1)], 1)  # sum_{u<t} ||x_u||^2     (b, T+1)
            nxt = (ar + 1).clamp(max=T)
            # sums over the interior u in (i, j) of x_i . x_u and x_j . x_u (and u-weighted), [i, j]
            Pi = P[:, :, :T] - P[:, ar, nxt][:, :, None]
            Ri = R[:, :, :T] - R[:, ar, nxt][:, :, None]
            Pj = P[:, ar, ar][:, None, :] - P[:, :, 1:].transpose(1, 2)
            Rj = R[:, ar, ar][:, None, :] - R[:, :, 1:].transpose(1, 2)
            S2 = q2[:, None, :T] - q2[:, 1:, None]  # sum of interior ||x_u||^2
            gii, gjj = dg[:, :, None], dg[:, None, :]
            iv = arf[:, None]  # i on dim 1
            # sum_v ||y_v - a v||^2 with y_v = x_{i+v} - x_i, a = (x_j - x_i) / span, v = u - i
            e_yy = S2 - 2 * Pi + n * gii
            e_ya = ((Rj - iv * Pj) - (Ri - iv * Pi) - m1_of(n) * (G - gii)) / span
            a2 = (gjj - 2 * G + gii) / span**2
            err = (e_yy - 2 * e_ya + a2 * m2_of(n)).clamp_min(0)
        else:
            xi, xj = xb[:, I], xb[:, J]  # (b, T, T, D)
            xu = xb[:, U]  # (b, T, T, S, D)
            pred = xi[:, :, :, None] * (1 - wr) + xj[:, :, :, None] * wr
            err = (((xu - pred) ** 2).sum(-1) * weight).sum(-1)
        c = torch.where(valid, err * scale, torch.full_like(err, math.inf))
        out[b0 : b0 + chunk] = c.to(torch.float32)
    return out


def _check_cost(cost: torch.Tensor, op: str) -> None:
    if cost.dim() != 3 or cost.shape[1] != cost.shape[2]:
        raise ValueError(f"{op}: cost must have shape [B, T, T], got {list(cost.shape)}")
    if not cost.is_floating_point():
        raise ValueError(f"{op}: cost must be a float tensor, got {cost.dtype}")


def _check_k(k: int, T: int, op: str) -> None:
    if not 2 <= int(k) <= T:
        raise ValueError(f"{op}: k must satisfy 2 <= k <= T={T} (both endpoints are keyframes), got k={k}")


def dp_select_reference(cost_B_T_T: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of the batched DP (vectorised over samples and end frames)."""
    B, T, _ = cost_B_T_T.shape
    c = cost_B_T_T.to(torch.float32)
    upper = torch.ones(T, T, dtype=torch.bool, device=c.device).triu(1)  # s < t
    c = torch.where(upper, c, torch.full_like(c, math.inf))
    inf = torch.full((B, T), math.inf, device=c.device)
    D = inf.clone()
    D[:, 0] = 0.0
    back = torch.zeros(k, B, T, dtype=torch.long, device=c.device)
    for row in range(1, k):
        cand = D[:, :, None] + c  # (B, s, t)
        D, arg = cand.min(dim=1)  # first (smallest) s on ties
        back[row] = arg
    total = D[:, T - 1]
    idx = torch.empty(B, k, dtype=torch.long, device=c.device)
    cur = torch.full((B,), T - 1, dtype=torch.long, device=c.device)
    idx[:, k - 1] = cur
    for row in range(k - 1, 0, -1):
        cur = back[row].gather(1, cur[:, None]).squeeze(1)
        idx[:, row - 1] = cur
    return idx, total


def dp_select(cost_B_T_T: torch.Tensor, k: int, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal ``k`` keyframes per sample.

    Returns ``(idx_B_K, total_B)``: sorted long indices with ``idx[:, 0] = 0`` and
    ``idx[:, -1] = T-1``, and the minimal total cost (float32). Entries ``cost[b, i, j]`` with
    ``i >= j`` are ignored.
    """
    _check_cost(cost_B_T_T, "dp_select")
    _check_k(k, cost_B_T_T.shape[1], "dp_select")
    if use_triton(backend, cost_B_T_T, "dp_select"):
        from kernels.dp import dp_select_triton

        return dp_select_triton(cost_B_T_T, int(k))
    return dp_select_reference(cost_B_T_T, int(k))


def check_budgets(budgets: Sequence[int], T: int, op: str) -> list[int]:
    b = [int(v) for v in budgets]
    if not b or any(x >= y for x, y in zip(b, b[1:])):
        raise ValueError(f"{op}: budgets must be strictly increasing, got {b}")
    if b[0] < 2 or b[-1] > T:
        raise ValueError(f"{op}: budgets must lie in [2, T={T}], got {b}")
    return b


def indices_to_mask(idx_B_K: torch.Tensor, T: int) -> torch.Tensor:
    mask = torch.zeros(idx_B_K.shape[0], T, dtype=torch.bool, device=idx_B_K.device)
    mask.scatter_(1, idx_B_K, True)
    return mask


def keep_cost(cost_B_T_T: torch.Tensor, keep_B_T: torch.Tensor) -> torch.Tensor:
    """``cost`` with ``+inf`` on every segment ``(i, j)`` holding a ``keep`` frame strictly inside.

    A DP on it can only return keyframe sets that contain every ``keep`` frame (given enough
    budget), so it solves "the best ``K``-set that keeps ``keep``" exactly.
    """
    cnt = keep_B_T.to(torch.int32).cumsum(1)  # kept frames in [0, t]
    before = torch.cat([torch.zeros_like(cnt[:, :1]), cnt[:, :-1]], 1)  # kept frames in [0, t-1]
    inside = before[:, None, :] - cnt[:, :, None]  # kept frames in (i, j) for j > i
    return torch.where(inside > 0, torch.full_like(cost_B_T_T, math.inf), cost_B_T_T)


def dp_select_levels(cost_B_T_T: torch.Tensor, budgets: Sequence[int], backend: str = "auto") -> torch.Tensor:
    """Nested per-level DP masks ``[B, S, T]`` for increasing ``budgets`` (``S = len(budgets)``).

    Level 0 is the optimal ``budgets[0]``-set. Level ``s`` is the optimal ``K_s``-set among the
    sets that contain level ``s-1``: the same DP on the cost matrix with every segment that
    jumps over a level-``(s-1)`` keyframe forbidden (``keep_cost``), so it keeps level ``s-1``
    and adds the ``K_s - K_{s-1}`` indices that lower the total cost most *jointly*. When level
    ``s-1`` is a subset of an unconstrained optimum, level ``s`` has the optimal cost. (Adding
    only frames of the unconstrained optimum, greedily, can be far worse than uniform at high
    budgets once the optimal sets stop being nested.)
    """
    _check_cost(cost_B_T_T, "dp_select_levels")
    B, T, _ = cost_B_T_T.shape
    budgets = check_budgets(budgets, T, "dp_select_levels")
    masks = []
    prev = None
    for k in budgets:
        if prev is None:
            idx, _ = dp_select(cost_B_T_T, k, backend=backend)
        else:
            idx, _ = dp_select(keep_cost(cost_B_T_T, prev), k, backend=backend)
        prev = indices_to_mask(idx, T)
        masks.append(prev)
    return torch.stack(masks, dim=1)
