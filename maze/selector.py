"""Level-conditioned keyframe selector: keyframe logits per time index from the condition only.

``Selector(T, budgets, d_model, enc_depth, heads, depth)``::

    logits_B_T   = sel(occ, sdf, start, goal, level_B)          # level_B = K_s / T
    logits_B_S_T = sel.level_logits(occ, sdf, start, goal)      # every level of the schedule
    mask_B_S_T   = sel.nested_masks(occ, sdf, start, goal)      # nested, endpoints set

Architecture (METHOD.md sections 3 and 6): a ``MazeEncoder`` (occupancy/SDF cell tokens with the
start/goal heatmaps, a start/goal token, a goal-distance token) gives tokens and a pooled
vector; ``T`` time queries are biased by the pooled vector and by the level scalar
``K_s / T`` (Fourier features) and carry the condition-only path prior of their frame
(``maze.encoders.path_prior``), then read the maze through spatial cross-attention
(``maze.common.TimeQueryDecoder``); a linear head gives one logit per frame.

Nested masks: level 0 takes the top ``K_0 - 2`` interior frames by the level-0 logits, level s
keeps level s-1 and adds the top ``K_s - K_{s-1}`` new frames by the level-s logits
(``interpdiff.masks.selector_nested_masks``). With ``nms_radius_scale = r > 0`` the picks of
a level are made greedily instead, skipping frames closer than ``r (T-1)/(K_s-1)`` to a chosen
keyframe (non-maximum suppression; rows where every free frame is suppressed fall back to plain
order); the picks are then handed to ``selector_nested_masks`` as rank logits, so both decoders
share its nesting and endpoint guarantees. NMS is the remedy for the failure mode of
METHOD.md section 6 (neighbouring frames of one peak all win and leave long gaps elsewhere).
``max_gap_scale = g > 0`` bounds the gap tail as well: while some gap is longer than
``g (T-1)/(K_s-1)``, the next pick is the best-scoring frame in the central half of the
longest gap (so each such pick leaves at most 3/4 of it on either side).
``gap_bonus = b > 0`` adds ``b log(gap)`` to the logits of the frames of each gap (the current
gap around a frame), favouring long gaps, whose interpolation error grows fastest.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from interpdiff.interpolate import neighbours
from interpdiff.masks import selector_nested_masks
from interpdiff.selection import check_budgets
from maze.common import TimeQueryDecoder, load_kind
from maze.encoders import MazeEncoder, path_prior

SELECTOR_KIND = "maze-selector"


class Selector(nn.Module):
    def __init__(self, T: int, budgets: Sequence[int], d_model: int = 128, enc_depth: int = 2, heads: int = 4, depth: int = 2,
                 G: int = 12, nms_radius_scale: float = 0.0, max_gap_scale: float = 0.0, gap_bonus: float = 0.0):
        super().__init__()
        self.T = T
        self.budgets = check_budgets(budgets, T, "Selector")
        self.nms_radius_scale = float(nms_radius_scale)
        self.max_gap_scale = float(max_gap_scale)
        self.gap_bonus = float(gap_bonus)
        self.sizes = {"T": T, "budgets": self.budgets, "d_model": d_model, "enc_depth": enc_depth, "heads": heads, "depth": depth,
                      "G": G, "nms_radius_scale": self.nms_radius_scale, "max_gap_scale": self.max_gap_scale,
                      "gap_bonus": self.gap_bonus}
        self.encoder = MazeEncoder(d_model, enc_depth, heads, G)
        self.decoder = TimeQueryDecoder(T, d_model, heads, depth, level_cond=True)
        self.head = nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, 1))
        # time warp of the path prior (maze.encoders.mean_arc_fraction of the training data)
        self.register_buffer("arc_frac", torch.linspace(0, 1, T))

    def forward(self, occ, sdf, start, goal, level_B, enc=None) -> torch.Tensor:
        """Logits ``[B, T]`` at level ``K_s / T = level_B``; ``enc`` = precomputed (tokens, pooled, prior)."""
        if enc is None:
            enc = (*self.encoder(occ, sdf, start, goal), path_prior(occ, start, goal, self.T, arc_frac_T=self.arc_frac))
        tokens, pooled, prior = enc
        return self.head(self.decoder(tokens, pooled, prior, level_B)).squeeze(-1)

    def level_logits(self, occ, sdf, start, goal) -> torch.Tensor:
        """Logits ``[B, S, T]`` for every budget (the encoder runs once)."""
        tokens, pooled = self.encoder(occ, sdf, start, goal)
        prior = path_prior(occ, start, goal, self.T, arc_frac_T=self.arc_frac)
        B, S = occ.shape[0], len(self.budgets)
        lv = torch.tensor([k / self.T for k in self.budgets], device=occ.device).repeat_interleave(B)
        enc = (tokens.repeat(S, 1, 1), pooled.repeat(S, 1), prior.repeat(S, 1, 1))
        return self(occ, sdf, start, goal, lv, enc=enc).view(S, B, self.T).transpose(0, 1)

    @torch.no_grad()
    def nested_masks(self, occ, sdf, start, goal, nms_radius_scale: float | None = None, max_gap_scale: float | None = None) -> torch.Tensor:
        r = self.nms_radius_scale if nms_radius_scale is None else nms_radius_scale
        g = self.max_gap_scale if max_gap_scale is None else max_gap_scale
        return decode_nested(self.level_logits(occ, sdf, start, goal), self.budgets, r, g, self.gap_bonus)


def decode_nested(logits_B_S_T: torch.Tensor, budgets: Sequence[int], nms_radius_scale: float = 0.0,
                  max_gap_scale: float = 0.0, gap_bonus: float = 0.0) -> torch.Tensor:
    """Nested masks ``[B, S, T]`` from per-level logits (module doc); all knobs ``0`` = plain top-k."""
    if nms_radius_scale <= 0 and max_gap_scale <= 0 and gap_bonus <= 0:
        return selector_nested_masks(logits_B_S_T, budgets)
    B, S, T = logits_B_S_T.shape
    budgets = check_budgets(budgets, T, "decode_nested")
    rows = torch.arange(B, device=logits_B_S_T.device)
    t = torch.arange(T, device=logits_B_S_T.device).expand(B, T)
    mask = torch.zeros(B, T, dtype=torch.bool, device=logits_B_S_T.device)
    mask[:, 0] = mask[:, -1] = True
    rank = torch.full_like(logits_B_S_T, -1e9, dtype=torch.float32)
    have = 2
    neg = torch.tensor(-torch.inf, device=logits_B_S_T.device)
    for s, k in enumerate(budgets):
        n_add = k - have
        radius = nms_radius_scale * (T - 1) / (k - 1)
        cap = max_gap_scale * (T - 1) / (k - 1) if max_gap_scale > 0 else float("inf")
        score = logits_B_S_T[:, s].float()
        for a in range(n_add):
            left, right, _ = neighbours(mask)
            dist = torch.minimum(t - left, right - t).float()
            free = ~mask
            gap = (right - left).float()
            # gap cap: while some gap is longer than `cap`, pick inside the longest gap only
            widest = gap.masked_fill(mask, -1).amax(1, keepdim=True)
            central = (t - (left + right) / 2).abs() <= gap / 4  # central half: each split leaves <= 3/4
            in_widest = free & (gap == widest) & (widest > cap) & central
            free = torch.where(in_widest.any(1, keepdim=True), in_widest, free)
            sc_all = score + gap_bonus * torch.log(gap.clamp_min(1)) if gap_bonus > 0 else score
            sc = torch.where(free & (dist >= radius), sc_all, neg)
            none = torch.isinf(sc).all(1, keepdim=True)
            sc = torch.where(none, torch.where(free, sc_all, neg), sc)
            pick = sc.argmax(1)
            mask[rows, pick] = True
            rank[rows, s, pick] = float(n_add - a)
        have = k
    return selector_nested_masks(rank, budgets)


def build_selector(sizes: dict) -> Selector:
    kw = {k: sizes[k] for k in ("T", "budgets", "d_model", "enc_depth", "heads", "depth", "G", "nms_radius_scale")}
    return Selector(**kw, max_gap_scale=sizes.get("max_gap_scale", 0.0), gap_bonus=sizes.get("gap_bonus", 0.0))


def load_selector(path, map_location="cpu") -> Selector:
    """Rebuild the selector from a ``model.pt`` written by ``maze.train_selector`` (sizes from metadata)."""
    return load_kind(path, SELECTOR_KIND, lambda m: build_selector(m["sizes"]), "maze.train_selector", map_location=map_location)[0]
