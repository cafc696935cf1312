"""Maze samplers: phase-1 keyframes, the two-phase pipeline, and the full-sequence baseline.

Two-phase sampling (METHOD.md sections 4-5), per batch of conditions:

1. nested masks ``M_0 ⊂ ... ⊂ M_S`` from the selector's logits (``selector_nested_masks``) or
   the uniform policy; ``K_0 = |M_0|`` keyframes;
2. phase-1: ``steps`` Euler steps of the flow ODE over the K_0 keyframe values from ``z ~ N(0,
   I)`` (``sigma: 1 -> 0`` on ``interpdiff.flow.sampling_sigmas``); the endpoints are the
   start/goal and stay clamped; **oracle** mode takes the ground-truth values instead;
3. ``x_0 = I(keyframes, M_0)`` (linear interpolation);
4. phase-2: ``interpdiff.corruption.refine`` (TACoS): ``x0_hat = R(x_s, s, M_s)`` with the anchor
   confidence built from ``M_s`` (the same function as in training), ``x_{s+1} = x_s - D(x0_hat,
   s) + D(x0_hat, s+1)``, keyframes of ``M_s`` clamped, optional noise ``none|constant|level`` on
   missing frames (``level`` uses the training ``level_sigmas``), positions clipped to [0, 1].

Network evaluations: phase-1 ``steps``, phase-2 ``S - 1`` for ``S`` levels (levels 0..S-2; the
last level holds every frame, so no call), baseline ``steps``. The maze encoder and the
cross-attention keys/values of its tokens run once per model per plan and are cached.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from interpdiff.corruption import level_sigmas, refine, sampling_noise_scale
from interpdiff.flow import sampling_sigmas
from interpdiff.interpolate import interpolate
from interpdiff.masks import mask_to_indices
from maze.models import KP_FEAT_DIM, from_z, to_z


def endpoints_known(idx_B_K: torch.Tensor, T: int) -> torch.Tensor:
    return (idx_B_K == 0) | (idx_B_K == T - 1)


def scatter_keyframes(kp_B_K_2: torch.Tensor, idx_B_K: torch.Tensor, T: int) -> torch.Tensor:
    """Keyframe values into a ``[B, T, 2]`` sequence (zeros elsewhere)."""
    B, K, D = kp_B_K_2.shape
    x = kp_B_K_2.new_zeros(B, T, D)
    return x.scatter(1, idx_B_K[..., None].expand(B, K, D), kp_B_K_2)


def gather_keyframes(x_B_T_2: torch.Tensor, idx_B_K: torch.Tensor) -> torch.Tensor:
    return x_B_T_2.gather(1, idx_B_K[..., None].expand(-1, -1, x_B_T_2.shape[-1]))


def endpoint_values(idx_B_K: torch.Tensor, T: int, start_B_2: torch.Tensor, goal_B_2: torch.Tensor) -> torch.Tensor:
    """``[B, K, 2]`` holding start at index 0, goal at T-1 (zeros elsewhere)."""
    v = torch.zeros(*idx_B_K.shape, 2, device=start_B_2.device)
    v = torch.where((idx_B_K == 0)[..., None], start_B_2[:, None], v)
    return torch.where((idx_B_K == T - 1)[..., None], goal_B_2[:, None], v)


@torch.no_grad()
def sample_keyframes(
    model,
    cond: dict,
    idx_B_K: torch.Tensor,
    kp_feat_B_K_5: torch.Tensor,
    steps: int,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Phase-1 Euler sampler; returns keyframe positions ``[B, K, 2]`` in [0, 1]."""
    T = model.T
    known = endpoints_known(idx_B_K, T)
    z_known = to_z(endpoint_values(idx_B_K, T, cond["start"], cond["goal"]))
    z = torch.randn(*idx_B_K.shape, 2, generator=generator, device=idx_B_K.device)
    z = torch.where(known[..., None], z_known, z)
    enc = model.encode(cond)
    sig = sampling_sigmas(steps, shift, device=z.device)
    B = z.shape[0]
    for i in range(steps):
        v = model(z, sig[i].expand(B), idx_B_K, kp_feat_B_K_5, known, cond, enc)
        z = z + (sig[i + 1] - sig[i]) * v
        z = torch.where(known[..., None], z_known, z)
    return from_z(z).clamp(0, 1)


@torch.no_grad()
def sample_full(model, cond: dict, steps: int, shift: float = 1.0, generator=None):
    """Baseline Euler sampler over all T points with start/goal inpainted; ``[B, T, 2]`` in [0,1]."""
    B, T = cond["start"].shape[0], model.T
    idx = torch.arange(T, device=cond["start"].device).expand(B, T)
    known = endpoints_known(idx, T)
    z_known = to_z(endpoint_values(idx, T, cond["start"], cond["goal"]))
    z = torch.randn(B, T, 2, generator=generator, device=cond["start"].device)
    z = torch.where(known[..., None], z_known, z)
    enc = model.encode(cond)
    sig = sampling_sigmas(steps, shift, device=z.device)
    for i in range(steps):
        v = model(z, sig[i].expand(B), known, cond, enc)
        z = z + (sig[i + 1] - sig[i]) * v
        z = torch.where(known[..., None], z_known, z)
    return from_z(z).clamp(0, 1)


@dataclass
class TwoPhaseOut:
    masks: torch.Tensor  # [B, S, T] bool
    keyframes: torch.Tensor  # [B, K_0, 2]
    interp: torch.Tensor  # [B, T, 2]   I(keyframes, M_0)
    refined: torch.Tensor  # [B, T, 2]
    levels: list  # x_s for every level (len S)
    x0_hats: list  # the refiner's x0_hat at levels 0..S-2


@torch.no_grad()
def refine_levels(
    refiner,
    x_start_B_T_2: torch.Tensor,
    masks_B_S_T: torch.Tensor,
    cond: dict,
    sigma_max: float,
    sigma_min: float,
    confidence: str = "mask",
    noise: str = "none",
    noise_scale: float = 1.0,
    pos_clip: bool = True,
    generator=None,
):
    """Phase-2 over the levels with ``interpdiff.corruption.refine``; returns ``(x, [x_s], [x0_hat_s])``."""
    S = masks_B_S_T.shape[1]
    enc = refiner.encode(cond)
    B = x_start_B_T_2.shape[0]

    def restorer(x, s, m, conf):
        return refiner(x, torch.full((B,), s, device=x.device), conf, cond, enc)

    sig = level_sigmas(S, sigma_max, sigma_min)
    # noise_scale is relative to the training schedule ("constant": noise_scale * sigma_0 at every step)
    x, xs, x0s = refine(
        restorer, x_start_B_T_2, masks_B_S_T, time_dim=1, sigmas=sig, noise=noise,
        noise_scale=sampling_noise_scale(noise, noise_scale, sig),
        clip=(0.0, 1.0) if pos_clip else None, confidence=confidence, generator=generator, return_all=True,
    )
    return x, xs, x0s


@torch.no_grad()
def two_phase(
    phase1,
    refiner,
    cond: dict,
    masks_B_S_T: torch.Tensor,
    kp_feat_B_T_5: torch.Tensor | None,
    phase1_steps: int,
    phase1_shift: float = 1.0,
    sigma_max: float = 0.02,
    sigma_min: float = 0.002,
    confidence: str = "mask",
    noise: str = "none",
    noise_scale: float = 1.0,
    pos_clip: bool = True,
    oracle_x0: torch.Tensor | None = None,
    generator=None,
) -> TwoPhaseOut:
    """Full two-phase sample. ``oracle_x0 [B,T,2]`` replaces phase-1 by the ground-truth keyframes.

    ``kp_feat_B_T_5``: keyframe features at level 0 (``[left_gap, right_gap, t_norm, left_diff,
    right_diff]``, read at the indices of ``M_0``); unused in oracle mode. ``refiner=None`` stops
    after the interpolation (``refined = interp``).
    """
    m0 = masks_B_S_T[:, 0]
    T = m0.shape[1]
    idx = mask_to_indices(m0)
    if oracle_x0 is not None:
        kp = gather_keyframes(oracle_x0, idx)
    else:
        if kp_feat_B_T_5 is None:
            raise ValueError("two_phase: kp_feat_B_T_5 is required unless oracle_x0 is given")
        if kp_feat_B_T_5.shape[-1] != KP_FEAT_DIM:
            raise ValueError(f"two_phase: kp_feat must have {KP_FEAT_DIM} features, got {list(kp_feat_B_T_5.shape)}")
        feat = gather_keyframes(kp_feat_B_T_5, idx)
        kp = sample_keyframes(phase1, cond, idx, feat, phase1_steps, phase1_shift, generator)
    interp = interpolate(scatter_keyframes(kp, idx, T), m0, time_dim=1)
    if refiner is None:
        return TwoPhaseOut(masks_B_S_T, kp, interp, interp, [interp], [])
    refined, xs, x0s = refine_levels(
        refiner, interp, masks_B_S_T, cond, sigma_max, sigma_min, confidence, noise, noise_scale, pos_clip, generator
    )
    return TwoPhaseOut(masks_B_S_T, kp, interp, refined, xs, x0s)


def make_cond(split, rows, device=None) -> dict:
    """Condition dict for ``rows`` of a ``maze.data.MazeSplit``: occ/sdf ``[B,G,G]``, start/goal ``[B,2]``."""
    rows = torch.as_tensor(rows, dtype=torch.long)
    mid = torch.as_tensor(split.maze_id)[rows]
    occ = torch.as_tensor(split.occ)[mid]
    sdf = torch.as_tensor(split.sdf)[mid]
    return {
        "occ": occ.float().to(device),
        "sdf": sdf.float().to(device),
        "start": torch.as_tensor(split.start)[rows].float().to(device),
        "goal": torch.as_tensor(split.goal)[rows].float().to(device),
    }


# --- keyframe masks and features shared by training and sampling --------------------------------


def policy_masks(policy: str, B: int, T: int, budgets, batch: dict | None = None, generator=None, selector=None, cond=None):
    """Nested masks ``[B, S, T]`` of one index policy.

    ``uniform`` (and phase-1's ``uniform``): ``uniform_nested_masks``; ``random`` /
    ``random_nested``: ``random_nested_masks``; ``dp`` / ``dp_precomputed``: the data's per-level
    DP masks ``batch["kp_mask"]`` (must match ``budgets``); ``selector``: the selector's nested
    masks for ``cond`` (``selector(cond, budgets) -> mask [B,S,T]``, ``maze.planner.SelectorFn``).
    """
    from interpdiff.masks import random_nested_masks, uniform_nested_masks

    dev = None if cond is None else cond["start"].device
    if policy == "uniform":
        return uniform_nested_masks(B, T, budgets, device=dev)
    if policy in ("random", "random_nested"):
        return random_nested_masks(B, T, budgets, generator=generator, device=dev)
    if policy in ("dp", "dp_precomputed"):
        if batch is None or "kp_mask" not in batch:
            raise ValueError(f"policy {policy!r} needs the data's DP masks (run `python -m maze.prepare_keyframes`)")
        m = batch["kp_mask"]
        got = m.sum(-1)[0].tolist()
        if got != list(budgets):
            raise ValueError(f"policy {policy!r}: data keyframe budgets {got} differ from the model's {list(budgets)}")
        return m
    if policy == "selector":
        if selector is None:
            raise ValueError("policy 'selector' needs a selector (train it with `python -m maze.train_selector`)")
        with torch.no_grad():
            return selector(cond, budgets)
    raise ValueError(f"unknown index policy {policy!r}")


def keyframe_features(mask_B_T: torch.Tensor, pair_cost=None) -> torch.Tensor:
    """``kp_feat [B, T, 5]`` at the keyframes of ``mask_B_T`` (``maze.prepare_keyframes.kp_features``).

    ``pair_cost(i_B_P, j_B_P) -> c_B_P`` gives the segment costs (D_phi at sampling); ``None``
    zeros the two cost features (``phase1.feat_diffs = "none"``).
    """
    from maze.prepare_keyframes import kp_features

    if pair_cost is None:
        return kp_features(mask_B_T, lambda i, j: torch.zeros(i.shape, device=i.device))
    return kp_features(mask_B_T, pair_cost)


def dphi_pair_cost(dphi, cond: dict):
    """``pair_cost(i, j)`` from D_phi's predictions for the conditions ``cond`` (no ground truth)."""
    with torch.no_grad():
        ha, hb = dphi.time_features(cond["occ"], cond["sdf"], cond["start"], cond["goal"])

    def fn(i, j):
        with torch.no_grad():
            c = dphi.to_cost(dphi.log_cost(ha, hb, i, j))
        return torch.where(i < j, c, torch.zeros_like(c))

    return fn
