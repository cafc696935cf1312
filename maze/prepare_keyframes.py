"""DP keyframes for a maze data set: nested per-level masks and keyframe features.

    python -m maze.prepare_keyframes --config configs/maze/small.yaml
    python -m maze.prepare_keyframes --config configs/maze/small.yaml keyframes.dphi_ckpt=runs/maze/small/dphi/model.pt

For every trajectory ``x`` (``pos [T, 2]``) of both splits:

1. segment costs ``c[i, j] = cost_scale * sum_{i<u<j} ||x_u - I_ij(x)_u||^2`` with
   ``cost_scale = sum_t w(t) / 2`` and ``w(t) = clip(SNR(t), s_min, s_max)^gamma`` over
   ``t_steps`` flow-matching times (``interpdiff.selection.segment_costs``; the maze teacher is
   the ground truth, so the KL proxy is the SNR-weighted squared interpolation error);
2. batched DP for every budget of the schedule, made nested (``dp_select_levels``) ->
   ``kp_mask_levels [N, S, T]``;
3. ``kp_feat [N, S, T, 5]`` at the keyframes of each level (``kp_features``):
   ``[left_gap, right_gap, t_norm, left_diff, right_diff]`` with gaps to the neighbouring
   keyframes divided by ``T``, ``t_norm = t / (T-1)``, and the diffs the costs of the segments
   on each side (0 at the sequence ends). **Which costs**: the true ``c`` when
   ``keyframes.dphi_ckpt`` is empty (``feat_source = "true_cost"``), D_phi's predictions
   otherwise (``feat_source = "dphi:<path>"``, what phase-1 sees at sampling time, where no
   ground truth exists). Costs are in the units of ``c`` (not normalised).

Written next to the data as ``keyframes_{train,eval}.npz`` (format in ``maze.data``).
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import numpy as np
import torch

from interpdiff.config import parse_cli, to_dict
from interpdiff.interpolate import neighbours
from interpdiff.selection import dp_select_levels, kl_scale, segment_costs
from maze.config import KeyframesConfig, MazeConfig
from maze.data import KP_FEAT_DIM, load_split, save_keyframes

PairCostFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (i_B_P, j_B_P) -> cost_B_P


def keyframe_neighbours(mask_B_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Previous and next keyframe of every frame, excluding the frame itself (``[B, T]`` long).

    ``prev[:, 0] = 0`` and ``next[:, T-1] = T-1`` (no neighbour beyond the ends).
    """
    left, right, _ = neighbours(mask_B_T)
    B, T = mask_B_T.shape
    zero = torch.zeros(B, 1, dtype=left.dtype, device=left.device)
    prev = torch.cat([zero, left[:, :-1]], 1)
    nxt = torch.cat([right[:, 1:], zero + (T - 1)], 1)
    return prev, nxt


def kp_features(mask_B_T: torch.Tensor, pair_cost: PairCostFn) -> torch.Tensor:
    """``[B, T, 5]`` features ``[left_gap, right_gap, t_norm, left_diff, right_diff]`` at keyframes, 0 elsewhere.

    ``pair_cost(i_B_P, j_B_P)`` returns the segment costs ``c[i, j]`` (called with ``i < j`` or
    ``i == j``; the latter entries are set to 0 here).
    """
    B, T = mask_B_T.shape
    prev, nxt = keyframe_neighbours(mask_B_T)
    t = torch.arange(T, device=mask_B_T.device).expand(B, T)
    c_left = pair_cost(torch.minimum(prev, t), t)
    c_right = pair_cost(t, torch.maximum(nxt, t))
    c_left = torch.where(prev < t, c_left, torch.zeros_like(c_left))
    c_right = torch.where(nxt > t, c_right, torch.zeros_like(c_right))
    feat = torch.stack(
        [(t - prev).float() / T, (nxt - t).float() / T, t.float() / (T - 1), c_left.float(), c_right.float()], -1
    )
    return torch.where(mask_B_T[..., None], feat, torch.zeros_like(feat))


def matrix_pair_cost(cost_B_T_T: torch.Tensor) -> PairCostFn:
    """``pair_cost`` reading a cost matrix (finite entries for ``i < j``; ``i == j`` gives 0)."""

    def fn(i, j):
        T = cost_B_T_T.shape[-1]
        c = cost_B_T_T.reshape(cost_B_T_T.shape[0], T * T).gather(1, i * T + j)
        return torch.where(i < j, c, torch.zeros_like(c))

    return fn


def dp_levels(cost_B_T_T: torch.Tensor, budgets: list[int], backend: str = "auto") -> torch.Tensor:
    """``dp_select_levels``, with a level of budget ``T`` (every frame) filled in without a DP."""
    T = cost_B_T_T.shape[-1]
    sub = [k for k in budgets if k < T]
    m = dp_select_levels(cost_B_T_T, sub, backend=backend) if sub else cost_B_T_T.new_zeros(cost_B_T_T.shape[0], 0, T, dtype=torch.bool)
    if len(sub) < len(budgets):
        m = torch.cat([m, torch.ones_like(cost_B_T_T[:, :1], dtype=torch.bool)], 1)
    return m


def keyframes_for_split(pos_N_T_2: np.ndarray, cfg: KeyframesConfig, pair_cost_for_rows=None, progress: bool = True):
    """``(kp_mask_levels [N,S,T] bool, kp_feat [N,S,T,5] float32, cost_scale)`` for one split.

    ``pair_cost_for_rows(rows) -> PairCostFn`` supplies the features' costs (D_phi); ``None``
    uses the true costs.
    """
    from tqdm import tqdm

    N, T, _ = pos_N_T_2.shape
    budgets = cfg.resolved_budgets(T)
    scale = kl_scale(**cfg.snr_kwargs())
    masks = np.zeros((N, len(budgets), T), dtype=bool)
    feats = np.zeros((N, len(budgets), T, KP_FEAT_DIM), dtype=np.float32)
    for b0 in tqdm(range(0, N, cfg.batch_size), desc="maze.prepare_keyframes", disable=not progress, mininterval=2.0):
        rows = np.arange(b0, min(N, b0 + cfg.batch_size))
        x = torch.from_numpy(pos_N_T_2[rows])
        cost = segment_costs(x, time_dim=1, scale=scale, segment_cost_samples=cfg.segment_cost_samples)
        m = dp_levels(cost, budgets, cfg.backend)  # (b, S, T)
        fn = matrix_pair_cost(cost) if pair_cost_for_rows is None else pair_cost_for_rows(rows)
        for s in range(len(budgets)):
            feats[rows, s] = kp_features(m[:, s], fn).numpy()
        masks[rows] = m.numpy()
    return masks, feats, scale


def main(cfg: MazeConfig) -> dict:
    kc = cfg.keyframes
    root = cfg.data.root
    out = {}
    for split in ("train", "eval"):
        data = load_split(root, split, keyframes=False)
        t0 = time.time()
        pair_fn, source = None, "true_cost"
        if kc.dphi_ckpt:
            from maze.dphi import load_dphi, dphi_pair_cost_for_rows

            model = load_dphi(kc.dphi_ckpt)
            pair_fn, source = dphi_pair_cost_for_rows(model, data), f"dphi:{kc.dphi_ckpt}"
        masks, feats, scale = keyframes_for_split(data.pos, kc, pair_fn)
        path = save_keyframes(root, split, masks, kc.resolved_budgets(data.T), feats, scale, source, data.pos,
                              config=to_dict(kc))
        out[split] = {"N": data.N, "seconds": round(time.time() - t0, 1), "path": str(path)}
        print(f"[maze.prepare_keyframes] {split}: {data.N} x budgets {kc.resolved_budgets(data.T)} "
              f"(kp_feat diffs from {source}) -> {path} in {out[split]['seconds']} s")
    return out


if __name__ == "__main__":
    from maze.common import run_cli

    torch.set_num_threads(1)
    run_cli("maze.prepare_keyframes", lambda: main(parse_cli(MazeConfig, sys.argv[1:])))
