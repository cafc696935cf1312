"""D_phi: segment-cost predictor from the maze condition alone (METHOD.md section 3).

``DPhi(T, d_model, enc_depth, heads, depth)`` predicts ``log(c[i, j] + eps)`` for segments
``i < j`` of a length-``T`` trajectory from

- the condition: ``MazeEncoder`` tokens (occupancy/SDF cells + start/goal heatmaps, start/goal
  token, goal-distance token) and its pooled vector, which includes start and goal;
- the segment's endpoints ``i/(T-1)``, ``j/(T-1)`` and its gap ``(j-i)/(T-1)``;
- per time index, the condition-only path prior ``maze.encoders.path_prior`` (where frame t
  would be on the shortest grid path, its direction, nearness of a turn) on the time queries.

It is noise-agnostic (the maze teacher is the ground truth; the "level" of the maze is the
keyframe budget, which a cost does not depend on). Factorised for speed: a
``TimeQueryDecoder`` turns the condition into one feature ``h_t`` per time index (``O(T)`` per
sample); a pair head scores ``(i, j)`` from ``A h_i + B h_j + F(i, j, gap)`` with a small MLP,
so a full ``T x T`` matrix costs ``O(T^2 d)`` cheap operations and adjacent-keyframe pairs
(what training/sampling of phase-1 need) cost ``O(K d)``.

Costs: ``cost = max(exp(pred) - eps, 0)``; ``eps`` (stored in the checkpoint) is
``log_eps_rel`` times the median positive training cost, so adjacent pairs (true cost 0) are
regressed to ``log(eps)`` instead of ``-inf``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from maze.common import TimeQueryDecoder, cond_inputs, load_kind
from maze.encoders import FourierFeatures, MazeEncoder, path_prior

DPHI_KIND = "maze-dphi"


class DPhi(nn.Module):
    def __init__(self, T: int = 128, d_model: int = 128, enc_depth: int = 2, heads: int = 4, depth: int = 2, G: int = 12,
                 log_eps: float = math.log(1e-6), log_mean: float = 0.0, log_std: float = 1.0):
        super().__init__()
        self.T = T
        self.sizes = {"T": T, "d_model": d_model, "enc_depth": enc_depth, "heads": heads, "depth": depth, "G": G}
        self.encoder = MazeEncoder(d_model, enc_depth, heads, G)
        self.decoder = TimeQueryDecoder(T, d_model, heads, depth, level_cond=False)
        self.a = nn.Linear(d_model, d_model)
        self.b = nn.Linear(d_model, d_model, bias=False)
        self.pair_ff = FourierFeatures(3, d_model, n_freq=5)
        self.head = nn.Sequential(nn.LayerNorm(d_model), nn.GELU(), nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, 1))
        # target normalisation (set from the training data, stored in the state dict)
        self.register_buffer("log_eps", torch.tensor(float(log_eps)))
        self.register_buffer("log_mean", torch.tensor(float(log_mean)))
        self.register_buffer("log_std", torch.tensor(float(log_std)))
        # time warp of the path prior (maze.encoders.mean_arc_fraction of the training data)
        self.register_buffer("arc_frac", torch.linspace(0, 1, T))

    def time_features(self, occ, sdf, start, goal) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A h_B_T_D, B h_B_T_D)``: per-time features for the pair head."""
        tokens, pooled = self.encoder(occ, sdf, start, goal)
        h = self.decoder(tokens, pooled, path_prior(occ, start, goal, self.T, arc_frac_T=self.arc_frac))
        return self.a(h), self.b(h)

    def pair_logits(self, ha_B_T_D, hb_B_T_D, i_B_P, j_B_P) -> torch.Tensor:
        """Normalised log-cost prediction ``[B, P]`` for pairs ``(i, j)``."""
        D = ha_B_T_D.shape[-1]
        gi = ha_B_T_D.gather(1, i_B_P[..., None].expand(-1, -1, D))
        gj = hb_B_T_D.gather(1, j_B_P[..., None].expand(-1, -1, D))
        tt = torch.stack([i_B_P, j_B_P, j_B_P - i_B_P], -1).float() / (self.T - 1)
        return self.head(gi + gj + self.pair_ff(tt)).squeeze(-1)

    def log_cost(self, ha, hb, i_B_P, j_B_P) -> torch.Tensor:
        """``log(c + eps)`` in natural units."""
        return self.pair_logits(ha, hb, i_B_P, j_B_P) * self.log_std + self.log_mean

    def forward(self, occ, sdf, start, goal, i_B_P, j_B_P) -> torch.Tensor:
        ha, hb = self.time_features(occ, sdf, start, goal)
        return self.log_cost(ha, hb, i_B_P, j_B_P)

    def to_cost(self, log_cost: torch.Tensor) -> torch.Tensor:
        return (log_cost.exp() - self.log_eps.exp()).clamp_min(0)

    @torch.no_grad()
    def pair_costs(self, occ, sdf, start, goal, i_B_P, j_B_P) -> torch.Tensor:
        """Predicted costs ``c[i, j]`` (``[B, P]``; 0 where ``i >= j``)."""
        c = self.to_cost(self(occ, sdf, start, goal, i_B_P, j_B_P.clamp_min(0)))
        return torch.where(i_B_P < j_B_P, c, torch.zeros_like(c))

    @torch.no_grad()
    def cost_matrix(self, occ, sdf, start, goal, chunk: int = 4096) -> torch.Tensor:
        """Full predicted ``[B, T, T]`` (``+inf`` for ``i >= j``, like ``segment_costs``)."""
        B, T = occ.shape[0], self.T
        ha, hb = self.time_features(occ, sdf, start, goal)
        iu, ju = torch.triu_indices(T, T, 1, device=occ.device)
        out = torch.full((B, T, T), math.inf, device=occ.device)
        for p0 in range(0, iu.numel(), chunk):
            i = iu[p0 : p0 + chunk].expand(B, -1)
            j = ju[p0 : p0 + chunk].expand(B, -1)
            out[:, i[0], j[0]] = self.to_cost(self.log_cost(ha, hb, i, j))
        return out


def build_dphi(sizes: dict) -> DPhi:
    return DPhi(**{k: sizes[k] for k in ("T", "d_model", "enc_depth", "heads", "depth", "G")})


def load_dphi(path, map_location="cpu") -> DPhi:
    """Rebuild D_phi from a ``model.pt`` written by ``maze.train_dphi`` (sizes from its metadata)."""
    return load_kind(path, DPHI_KIND, lambda m: build_dphi(m["sizes"]), "maze.train_dphi", map_location=map_location)[0]


def dphi_pair_cost_for_rows(model: DPhi, split, batch_size: int = 256):
    """``rows -> pair_cost(i, j)`` closure over a ``MazeSplit`` (for ``prepare_keyframes``)."""

    def for_rows(rows):
        b = split.tensors(np.asarray(rows))
        ha, hb = None, None
        with torch.no_grad():
            ha, hb = model.time_features(*cond_inputs(b))

        def fn(i, j):
            with torch.no_grad():
                c = model.to_cost(model.log_cost(ha, hb, i, j))
            return torch.where(i < j, c, torch.zeros_like(c))

        return fn

    return for_rows
