"""Maze networks: phase-1 keypoint denoiser, phase-2 refiner, full-sequence baseline.

All three share one backbone (``TrajBackbone``): a DiT-style transformer over *time tokens*
(keypoints or all T points) with

- a fixed sinusoidal embedding of each token's true frame index ``t in [0, T-1]`` (so phase-1
  knows how far apart its keyframes are),
- adaLN-Zero modulation by a global vector ``c_B_D`` = maze encoder's pooled output + the
  noise-time / level embedding (the pooled condition as a bias on every token: METHOD.md
  section 6 shows that cross-attention alone can give a condition-blind model),
- the maze tokens of ``maze.encoders.MazeEncoder`` (occupancy/SDF + start/goal) either through
  cross-attention in every block (``cond_mode="cross"``) or as prefix tokens of self-attention
  (``cond_mode="prefix"``).

Positions live in ``[0, 1]^2``; the diffusion models work in ``z = (x - 0.5) * 2`` so the data
has roughly unit scale against unit Gaussian noise.

- ``KeypointDenoiser`` (phase-1): flow matching over the K_0 keyframe values. Input per token
  ``[z_sigma (2), kp_feat (5), known (1)]`` (the two segment-cost features enter as
  ``log1p(1000 c)``: maze costs span 1e-4..1e-1); endpoints are *known* (start/goal, clean values,
  ``known = 1``) and clamped; output the velocity ``v = eps - z0``.
- ``Refiner`` (phase-2): ``R(x_s, s, M_s, cond) -> x0_hat`` over all T points. Input per token
  ``[z_s (2), conf (1)]`` with ``conf = anchor_confidence(M_s)``; the level enters as a learned
  embedding of ``s`` plus an MLP of ``K_s / T``. Output form (``output``, stored in the
  checkpoint): ``missing_residual`` (default) ``x0_hat = x_s + (1 - M_s) * out / 2``, i.e. the
  keyframes of ``M_s`` (the frames with ``conf = 1``) are returned *exactly* and only the missing
  frames get a correction; ``residual`` (the form of checkpoints written before this field
  existed) ``x0_hat = x_s + out / 2`` on every frame. The output layer is zero-initialised, so an
  untrained refiner returns its input (the interpolation). Why ``missing_residual`` matters:
  the training loss sees only missing frames, so under ``residual`` the keyframe outputs are
  unconstrained, yet the TACoS step ``x_{s+1} = x_s - I(x0_hat, M_s) + I(x0_hat, M_{s+1})`` gives
  a new keyframe ``t`` the value ``x0_hat_t - I(x0_hat - x_s, M_s)_t``: the untrained keyframe
  outputs leak into every frame (and the per-level ``x0_hat`` is off on the keyframes, which is
  how a refined K = 64 level measured worse than its interpolation). With ``x0_hat = x_s`` on
  ``M_s`` the step is exactly ``x_{s+1} = I(x0_hat, M_{s+1})`` (no sampling noise): the new
  keyframes take the trained prediction.
- ``FullSequenceDenoiser`` (baseline, Diffuser-style): flow matching over all T points, per
  token ``[z_sigma (2), known (1)]`` with start/goal inpainted at frames 0 and T-1.

Sizes are ``maze.config_model.BackboneConfig`` plus ``T``/``n_levels`` and are written to every
checkpoint (``model_meta``); ``build_model(meta)`` rebuilds the network from them alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from interpdiff.config import from_dict
from interpdiff.io import CheckpointError, load_checkpoint, save_checkpoint
from maze.common import load_kind
from maze.config_model import REFINER_OUTPUTS, BackboneConfig

MODEL_KINDS = ("phase1", "phase2", "baseline")
LEGACY_REFINER_OUTPUT = "residual"  # phase-2 checkpoints without an ``output`` field were written with this form
KP_FEAT_DIM = 5
CENTER, SCALE = 0.5, 2.0


def to_z(x: torch.Tensor) -> torch.Tensor:
    """Positions ``[0,1]`` -> model space ``z = (x - 0.5) * 2``."""
    return (x - CENTER) * SCALE


def from_z(z: torch.Tensor) -> torch.Tensor:
    return z / SCALE + CENTER


WALL_MARGIN_CELLS = 0.12  # wall penalty margin (cells): agent radius 0.1 + 0.02; the bilinear SDF under-reads near
# convex wall corners, where 0.9% of the data points read below 0.2 and 0.2% below 0.1 (the data keep >= 0.18)


def sdf_at(sdf_B_G_G: torch.Tensor, x_B_L_2: torch.Tensor) -> torch.Tensor:
    """Bilinear SDF (cells) at normalised points ``x [B, L, 2]`` (``(u, v)``; grid ``[row=v, col=u]``,
    cell centres at ``(i + 0.5) / G``) -> ``[B, L]``; differentiable in ``x``, border-clamped outside."""
    grid = (x_B_L_2 * 2 - 1)[:, :, None, :]  # (B, L, 1, 2): grid_sample's x = u (columns), y = v (rows)
    out = F.grid_sample(sdf_B_G_G[:, None].float(), grid.float(), mode="bilinear", padding_mode="border", align_corners=False)
    return out[:, 0, :, 0]  # (B, L)


def wall_penalty(x_B_L_2: torch.Tensor, sdf_B_G_G: torch.Tensor, margin_cells: float = WALL_MARGIN_CELLS) -> torch.Tensor:
    """Per-point ``(relu(margin - sdf(x)) * 2 / G)^2`` ``[B, L]``: squared depth (in model units ``z``)
    by which a point lies closer than ``margin`` cells to a wall (0 for points with clearance)."""
    G = sdf_B_G_G.shape[-1]
    return ((margin_cells - sdf_at(sdf_B_G_G, x_B_L_2)).clamp_min(0) * (SCALE / G)) ** 2


def flow_wall_penalty(zt_B_L_2, v_B_L_2, sigma_B, free_B_L, sdf_B_G_G) -> torch.Tensor:
    """Wall penalty of a flow model's predicted clean points ``z0_hat = z_sigma - sigma v`` (in ``[0,1]``
    after ``from_z``), averaged over the ``free_B_L`` (not clamped) points with weight ``(1 - sigma)^2``:
    at large sigma ``z0_hat`` is a posterior mean that may lie between two routes, so the penalty acts
    where the sample is nearly decided."""
    x0_hat = from_z(zt_B_L_2 - sigma_B[:, None, None] * v_B_L_2)
    w = free_B_L.float() * (1 - sigma_B[:, None]) ** 2
    return (wall_penalty(x0_hat, sdf_B_G_G) * w).sum() / free_B_L.float().sum().clamp_min(1)


PRIOR_DIM = 5
WALL_FEAT_DIM = 3
WALL_FEAT_RANGE = 2.0  # cells: wall features saturate beyond this distance


@torch.no_grad()
def wall_features(occ_B_G_G: torch.Tensor, x_B_L_2: torch.Tensor, max_cells: float = WALL_FEAT_RANGE) -> torch.Tensor:
    """Exact local wall geometry at each point ``[B, L, 3]``: ``[sd, n_u * a, n_v * a]``.

    ``sd`` is the signed distance in cells to the wall/free boundary of the occupancy grid
    (positive in free space, negative inside a wall cell), clipped to ``[-1, max_cells]``;
    ``n`` is the unit vector pointing away from the nearest wall (free side), and
    ``a = clip(1 - sd / max_cells, 0, 1)`` fades it out far from walls. Cell ``[r, c]`` is the box
    ``u in [c, c+1] / G, v in [r, r+1] / G`` (the ``maze.mazes`` frame; outside the grid is wall, as in
    ``maze.mazes.wall_distance``). Unlike the bilinear ``sdf_at`` (cell-centre samples), this is exact
    at corners, where the interpolation of a plan cuts through walls. The refiner reads it at its input
    ``x_s`` (``BackboneConfig.wall_feat``).
    """
    B, G, _ = occ_B_G_G.shape
    occ = F.pad(occ_B_G_G.float(), (1, 1, 1, 1), value=1.0)  # outside the grid counts as wall (maze.mazes)
    lo = (torch.arange(G + 2, device=x_B_L_2.device, dtype=torch.float32) - 1) / G
    lo_v, lo_u = torch.meshgrid(lo, lo, indexing="ij")  # (G+2, G+2): row -> v, col -> u
    lo_uv = torch.stack([lo_u, lo_v], -1).reshape(1, 1, -1, 2)
    p = x_B_L_2.float()[:, :, None, :]  # (B, L, 1, 2)
    q = torch.minimum(torch.maximum(p, lo_uv), lo_uv + 1.0 / G)  # nearest point of each cell box (B, L, N, 2)
    d = (p - q).norm(dim=-1)  # (B, L, N), N = (G + 2)^2 cells of the padded grid
    wall = (occ.reshape(B, 1, -1) > 0.5).expand_as(d)
    inf = torch.full_like(d, float("inf"))
    d_wall, i_wall = torch.where(wall, d, inf).min(-1)  # (B, L)
    d_free, i_free = torch.where(~wall, d, inf).min(-1)
    q_wall = q.gather(2, i_wall[..., None, None].expand(B, x_B_L_2.shape[1], 1, 2))[:, :, 0]
    q_free = q.gather(2, i_free[..., None, None].expand(B, x_B_L_2.shape[1], 1, 2))[:, :, 0]
    p = p[:, :, 0]
    in_free = d_wall > 0
    vec = torch.where(in_free[..., None], p - q_wall, q_free - p)
    n = vec / vec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sd = (torch.where(in_free, d_wall, -d_free) * G).nan_to_num(posinf=max_cells).clamp(-1.0, max_cells)
    a = (1 - sd / max_cells).clamp(0, 1)
    return torch.cat([sd[..., None], n * a[..., None]], dim=-1)


def path_prior_features(model: nn.Module, cond: dict) -> torch.Tensor | None:
    """The condition-only path prior ``[B, T, 5]`` of ``maze.encoders.path_prior`` (the shortest cell
    path paced by the training data's mean arc-length fraction ``model.arc_frac``), positions in
    model units ``z``, when ``model``'s sizes ask for it (``path_prior``), else ``None``.

    The selector and D_phi read the same prior. It is a breadth-first search on the 12 x 12 grid
    (no matrix products, so ``FlopCounterMode`` counts nothing for it; about 1e5 elementwise
    operations per plan, under 1% of a single network evaluation here)."""
    if not model.backbone.sizes.path_prior:
        return None
    from maze.encoders import path_prior

    pr = path_prior(cond["occ"], cond["start"], cond["goal"], model.T, arc_frac_T=model.arc_frac)
    return torch.cat([to_z(pr[..., :2]), pr[..., 2:]], -1)


def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``[..., dim]`` sin/cos embedding of a float tensor ``t`` (DiT ``timestep_embedding``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ScalarEmbed(nn.Module):
    """Sinusoidal features of a scalar followed by an MLP (DiT ``TimestepEmbedder``)."""

    def __init__(self, d: int, freq_dim: int = 128):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, v_B: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal(v_B, self.freq_dim))


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, cross: bool = False):
        super().__init__()
        self.h = heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.o = nn.Linear(d, d)

    def memory_kv(self, mem_B_N_D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(B, h, N, Dh)`` of a memory (cached across sampling steps)."""
        B, N, D = mem_B_N_D.shape
        k, v = self.kv(mem_B_N_D).view(B, N, 2, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x_B_L_D: torch.Tensor, mem_B_N_D: torch.Tensor | None = None, kv=None) -> torch.Tensor:
        B, L, D = x_B_L_D.shape
        q = self.q(x_B_L_D).view(B, L, self.h, D // self.h).transpose(1, 2)  # (B, h, L, Dh)
        k, v = kv if kv is not None else self.memory_kv(x_B_L_D if mem_B_N_D is None else mem_B_N_D)  # (B, h, N, Dh)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.transpose(1, 2).reshape(B, L, D))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Block(nn.Module):
    """Pre-LN block with adaLN-Zero: self-attention, optional cross-attention, MLP."""

    def __init__(self, d: int, heads: int, mlp_ratio: float, cross: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, heads)
        self.cross = cross
        if cross:
            self.norm_x = nn.LayerNorm(d, eps=1e-6)
            self.xattn = Attention(d, heads, cross=True)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        hidden = int(d * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, d))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, h_B_L_D: torch.Tensor, c_B_D: torch.Tensor, mem_B_N_D: torch.Tensor | None, mem_kv=None) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c_B_D).chunk(6, dim=-1)
        h = h_B_L_D + g1[:, None] * self.attn(modulate(self.norm1(h_B_L_D), sh1, sc1))
        if self.cross and (mem_B_N_D is not None or mem_kv is not None):
            h = h + self.xattn(self.norm_x(h), mem_B_N_D, kv=mem_kv)
        return h + g2[:, None] * self.mlp(modulate(self.norm2(h), sh2, sc2))


class TrajBackbone(nn.Module):
    """Transformer over time tokens conditioned on a maze (see the module docstring).

    ``forward(feat_B_L_F, t_idx_B_L, extra_c_B_D, cond) -> out_B_L_O`` with ``cond`` the dict
    ``{occ [B,G,G], sdf [B,G,G], start [B,2], goal [B,2]}`` (normalised positions).
    """

    def __init__(self, d_in: int, d_out: int, sizes: BackboneConfig, G: int):
        super().__init__()
        from maze.encoders import MazeEncoder

        d = sizes.d_model
        self.sizes = sizes
        self.G = G
        self.patch = sizes.patch
        self.inp = nn.Linear(d_in * self.patch, d)
        self.encoder = MazeEncoder(d_model=d, depth=sizes.enc_depth, heads=sizes.heads, G=G)
        self.cond_proj = nn.Sequential(nn.SiLU(), nn.Linear(d, d))
        cross = sizes.cond_mode == "cross"
        self.blocks = nn.ModuleList([Block(d, sizes.heads, sizes.mlp_ratio, cross) for _ in range(sizes.depth)])
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.d_out = d_out
        self.out = nn.Linear(d, d_out * self.patch)
        for m in (self.ada_out[1], self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def encode(self, cond: dict) -> tuple:
        """``(tokens [B, N, D], pooled [B, D], per-block cross-attention K/V or None)``.

        Everything here depends on the condition only, so samplers compute it once per plan and
        pass it as ``enc`` to every step (like caching a text encoder's cross-attention K/V).
        """
        tokens, pooled = self.encoder(cond["occ"], cond["sdf"], cond["start"], cond["goal"])
        kv = [blk.xattn.memory_kv(tokens) for blk in self.blocks] if self.sizes.cond_mode == "cross" else None
        return tokens, pooled, kv

    def forward(
        self,
        feat_B_L_F: torch.Tensor,
        t_idx_B_L: torch.Tensor,
        extra_c_B_D: torch.Tensor,
        cond: dict,
        enc: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        mem_B_N_D, pooled_B_D, mem_kv = self.encode(cond) if enc is None else enc
        d, p = self.sizes.d_model, self.patch
        B, L0, Fi = feat_B_L_F.shape
        if L0 % p:
            raise ValueError(f"TrajBackbone: sequence length {L0} is not a multiple of patch={p}")
        feat = feat_B_L_F.reshape(B, L0 // p, p * Fi)  # (B, L, p*F): p consecutive frames per token
        t_tok = t_idx_B_L.float().reshape(B, L0 // p, p).mean(-1)  # token time = mean frame index
        h = self.inp(feat) + sinusoidal(t_tok, d)  # (B, L, D)
        c = self.cond_proj(pooled_B_D) + extra_c_B_D  # (B, D)
        L = h.shape[1]
        if self.sizes.cond_mode == "prefix":
            h = torch.cat([mem_B_N_D, h], dim=1)
        cross = self.sizes.cond_mode == "cross"
        for i, blk in enumerate(self.blocks):
            h = blk(h, c, mem_B_N_D if cross else None, mem_kv[i] if cross else None)
        h = h[:, -L:]
        sh, sc = self.ada_out(c).chunk(2, dim=-1)
        return self.out(modulate(self.norm_out(h), sh, sc)).reshape(B, L0, self.d_out)  # (B, L0, O)


class KeypointDenoiser(nn.Module):
    """Phase-1: velocity ``v_B_K_2`` for the noisy keyframe values ``z_B_K_2`` at flow time sigma."""

    kind = "phase1"

    def __init__(self, sizes: BackboneConfig, T: int, G: int):
        super().__init__()
        self.T = T
        if sizes.patch != 1:
            raise ValueError(f"KeypointDenoiser: patch must be 1 (keyframes are irregular in time), got {sizes.patch}")
        if sizes.wall_feat:
            raise ValueError("KeypointDenoiser: wall_feat is a refiner input (phase-1 sees noisy keyframes); use path_prior")
        self.backbone = TrajBackbone(2 + KP_FEAT_DIM + 1 + (PRIOR_DIM if sizes.path_prior else 0), 2, sizes, G)
        self.sigma_emb = ScalarEmbed(sizes.d_model)
        if sizes.path_prior:  # time warp of the path prior (mean_arc_fraction of the training data, set by the trainer)
            self.register_buffer("arc_frac", torch.linspace(0, 1, T))

    def encode(self, cond: dict):
        """``(backbone encoding, path prior [B,T,5] or None)`` for ``cond`` (once per plan, passed as ``enc``)."""
        return self.backbone.encode(cond), path_prior_features(self, cond)

    def forward(self, z_B_K_2, sigma_B, idx_B_K, kp_feat_B_K_5, known_B_K, cond, enc=None):
        bb, prior_B_T_5 = self.encode(cond) if enc is None else enc
        # gaps and t_norm are in [0, 1]; the segment costs (diffs) span decades -> log1p(1000 c)
        f = torch.cat([kp_feat_B_K_5[..., :3], torch.log1p(1000.0 * kp_feat_B_K_5[..., 3:].clamp_min(0))], -1)
        parts = [z_B_K_2, f, known_B_K.float()[..., None]]
        if prior_B_T_5 is not None:
            parts.append(prior_B_T_5.gather(1, idx_B_K[..., None].expand(-1, -1, PRIOR_DIM)))  # (B, K, 5)
        return self.backbone(torch.cat(parts, dim=-1), idx_B_K, self.sigma_emb(sigma_B * 1000.0), cond, bb)


class FullSequenceDenoiser(nn.Module):
    """Baseline: velocity ``v_B_T_2`` over all T points (start/goal known at frames 0 and T-1)."""

    kind = "baseline"

    def __init__(self, sizes: BackboneConfig, T: int, G: int):
        super().__init__()
        self.T = T
        if sizes.wall_feat:
            raise ValueError("FullSequenceDenoiser: wall_feat is a refiner input (the baseline sees noisy points); use path_prior")
        self.backbone = TrajBackbone(3 + (PRIOR_DIM if sizes.path_prior else 0), 2, sizes, G)
        self.sigma_emb = ScalarEmbed(sizes.d_model)
        if sizes.path_prior:
            self.register_buffer("arc_frac", torch.linspace(0, 1, T))

    def encode(self, cond: dict):
        """``(backbone encoding, path prior [B,T,5] or None)`` for ``cond`` (once per plan, passed as ``enc``)."""
        return self.backbone.encode(cond), path_prior_features(self, cond)

    def forward(self, z_B_T_2, sigma_B, known_B_T, cond, enc=None):
        bb, prior_B_T_5 = self.encode(cond) if enc is None else enc
        B, T, _ = z_B_T_2.shape
        idx = torch.arange(T, device=z_B_T_2.device).expand(B, T)
        parts = [z_B_T_2, known_B_T.float()[..., None]] + ([prior_B_T_5] if prior_B_T_5 is not None else [])
        return self.backbone(torch.cat(parts, dim=-1), idx, self.sigma_emb(sigma_B * 1000.0), cond, bb)


class Refiner(nn.Module):
    """Phase-2: ``x0_hat`` from ``(x_s, s, conf_s, K_s / T, cond)``, positions in [0,1] (module doc).

    ``output="missing_residual"``: ``x0_hat = where(M_s, x_s, x_s + out / 2)`` with ``M_s = conf_s > 0.999``
    (keyframes exactly preserved); ``output="residual"``: ``x0_hat = x_s + out / 2`` everywhere (legacy).
    """

    kind = "phase2"

    def __init__(self, sizes: BackboneConfig, T: int, G: int, n_levels: int, output: str = "missing_residual"):
        super().__init__()
        if output not in REFINER_OUTPUTS:
            raise ValueError(f"Refiner: output={output!r} is not one of {REFINER_OUTPUTS}")
        if sizes.path_prior:
            raise ValueError("Refiner: path_prior is a phase-1 / baseline input (the refiner sees the interpolated plan)")
        self.T = T
        self.n_levels = n_levels
        self.output = output
        self.backbone = TrajBackbone(3 + (WALL_FEAT_DIM if sizes.wall_feat else 0), 2, sizes, G)
        self.level_emb = nn.Embedding(n_levels, sizes.d_model)
        self.frac_emb = ScalarEmbed(sizes.d_model)

    def encode(self, cond: dict):
        """Maze tokens and pooled vector for ``cond`` (computed once per plan, passed as ``enc``)."""
        return self.backbone.encode(cond)

    def forward(self, x_s_B_T_2, level_B, conf_B_T, cond, enc=None):
        B, T, _ = x_s_B_T_2.shape
        if T != self.T:
            raise ValueError(f"Refiner: sequence length {T} differs from the trained T={self.T}")
        idx = torch.arange(T, device=x_s_B_T_2.device).expand(B, T)
        anchor_B_T = conf_B_T.gt(0.999)  # keyframes of M_s: anchor_confidence is exactly 1 there (mask and tent)
        frac = anchor_B_T.float().mean(1)  # K_s / T (the anchor count of this level)
        c = self.level_emb(level_B.long().clamp(0, self.n_levels - 1)) + self.frac_emb(frac * 1000.0)
        feat = [to_z(x_s_B_T_2), conf_B_T[..., None]]
        if self.backbone.sizes.wall_feat:
            feat.append(wall_features(cond["occ"], x_s_B_T_2))
        feat = torch.cat(feat, dim=-1)
        delta = self.backbone(feat, idx, c, cond, enc) / SCALE  # (B, T, 2) in [0,1] units
        if self.output == "residual":
            return x_s_B_T_2 + delta
        return torch.where(anchor_B_T[..., None], x_s_B_T_2, x_s_B_T_2 + delta)


# --- checkpoints ------------------------------------------------------------------------------


def model_meta(model: nn.Module) -> dict:
    meta = {"kind": model.kind, "sizes": asdict(model.backbone.sizes), "T": model.T, "G": model.backbone.G}
    if isinstance(model, Refiner):
        meta["n_levels"] = model.n_levels
        meta["output"] = model.output
    return meta


def build_model(meta: dict) -> nn.Module:
    """Rebuild an (untrained) network from checkpoint metadata alone."""
    kind = meta.get("kind")
    if kind not in MODEL_KINDS:
        raise CheckpointError(f"model metadata kind={kind!r} is not one of {MODEL_KINDS}")
    sizes = from_dict(BackboneConfig, meta["sizes"])
    if kind == "phase1":
        return KeypointDenoiser(sizes, int(meta["T"]), int(meta["G"]))
    if kind == "baseline":
        return FullSequenceDenoiser(sizes, int(meta["T"]), int(meta["G"]))
    # phase-2 checkpoints written before the ``output`` field existed used the all-frames residual
    output = meta.get("output", LEGACY_REFINER_OUTPUT)
    if output not in REFINER_OUTPUTS:
        raise CheckpointError(f"phase-2 model metadata output={output!r} is not one of {REFINER_OUTPUTS}")
    return Refiner(sizes, int(meta["T"]), int(meta["G"]), int(meta["n_levels"]), output)


def save_model(path, model: nn.Module, ema: nn.Module | None = None, extra_meta: dict | None = None, train_state=None):
    """Write ``{model, ema?, train_state?}`` with the sizes needed to rebuild the model."""
    state = {"model": model.state_dict()}
    if ema is not None:
        state["ema"] = ema.state_dict()
    if train_state is not None:
        state["train_state"] = train_state
    meta = {**model_meta(model), **(extra_meta or {})}
    return save_checkpoint(path, state, meta)


def load_model(path, kind: str, use_ema: bool = True, map_location="cpu") -> tuple[nn.Module, dict]:
    """Load a checkpoint written by ``save_model``; sizes come from its metadata, never a config.

    Raises ``CheckpointError`` naming the path when it is missing, not a checkpoint, or holds
    another kind of model.
    """
    keys = ("ema", "model") if use_ema else ("model",)
    trainer = {"phase1": "maze.train_phase1", "phase2": "maze.train_phase2", "baseline": "maze.train_baseline"}.get(kind, "maze")
    return load_kind(path, kind, build_model, trainer, ("kind", "sizes", "T", "G"), keys, map_location)


# --- the training loop the three trainers share ------------------------------------------------


class EMA:
    """Exponential moving average of a model's parameters (``decay`` per step)."""

    def __init__(self, model: nn.Module, decay: float):
        import copy

        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for pe, p in zip(self.model.parameters(), model.parameters()):
            pe.lerp_(p.detach(), 1 - self.decay)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))


def train_loop(model: nn.Module, loss_fn, optim_cfg, ckpt_path, extra_meta: dict, desc: str, generator=None,
               on_start=None):
    """AdamW + warm-up/cosine + grad clip + EMA; ``loss_fn(model, step) -> (loss, logs)``.

    Writes ``ckpt_path`` (atomic, with sizes in the metadata) every ``ckpt_every`` steps and at
    the end, and ``<ckpt stem>_metrics.csv`` (step, loss, lr, seconds). Resumes from
    ``ckpt_path`` when it holds a train state with fewer steps than asked (model, EMA,
    optimizer, step and RNG are restored); one that already has the steps asked for is left as it
    is. A ``ckpt_path`` of another model (sizes, kind, refiner output) or without a train state
    is refused with a ``CheckpointError`` naming both, never overwritten. ``on_start()`` (e.g.
    writing the run's config.yaml) runs once that check passed. Returns the list of logged rows.
    """
    import csv
    import time
    from pathlib import Path

    from tqdm.auto import tqdm

    ckpt_path = Path(ckpt_path)
    csv_path = ckpt_path.with_name(ckpt_path.stem + "_metrics.csv")
    opt = torch.optim.AdamW(model.parameters(), lr=optim_cfg.lr, weight_decay=optim_cfg.weight_decay)
    ema = EMA(model, optim_cfg.ema) if optim_cfg.ema > 0 else None
    step0, rows = 0, []
    if ckpt_path.exists():
        ck = load_checkpoint(ckpt_path, required_meta=("kind", "sizes"))
        ts = ck["state"].get("train_state")
        mm, ckm = model_meta(model), ck["meta"]
        theirs = {"kind": ckm.get("kind"), "sizes": ckm.get("sizes"), "T": ckm.get("T", mm["T"])}
        mine = {"kind": mm["kind"], "sizes": mm["sizes"], "T": mm["T"]}
        if "output" in mm:
            theirs["output"], mine["output"] = ckm.get("output", LEGACY_REFINER_OUTPUT), mm["output"]
        diff = [f"{k} = {theirs[k]} in the file, {mine[k]} in this run" for k in mine if theirs[k] != mine[k]]
        step0_export = not diff and ts is None and int(ckm.get("step", -1)) == 0  # maze.distill's init_only
        if (diff or ts is None) and not step0_export:
            why = "; ".join(diff) if diff else "it holds no train state (a finished export, not a resumable run)"
            raise CheckpointError(
                f"{desc}: {str(ckpt_path)!r} holds another model than this run would train ({why}). Not overwriting "
                f"it: use another run_dir, or move the file away to retrain")
        if ts is not None:  # else a step-0 export: training starts from scratch over it
            model.load_state_dict(ck["state"]["model"])
            if ema is not None and "ema" in ck["state"]:
                ema.model.load_state_dict(ck["state"]["ema"])
            opt.load_state_dict(ts["optimizer"])
            step0 = int(ts["step"])
            torch.set_rng_state(ts["rng"])
            if generator is not None and "gen_rng" in ts:
                generator.set_state(ts["gen_rng"])
            rows = list(ts.get("rows", []))
    total = optim_cfg.steps
    if on_start is not None:
        on_start()
    if step0 >= total:
        print(f"[{desc}] {ckpt_path} already holds {step0} steps (asked for {total}): nothing to do, left as it is")
        model.eval()
        return rows

    def save(step):
        ts = {"optimizer": opt.state_dict(), "step": step, "rng": torch.get_rng_state(), "rows": rows}
        if generator is not None:
            ts["gen_rng"] = generator.get_state()
        save_model(ckpt_path, model, ema.model if ema else None, {**extra_meta, "step": step}, train_state=ts)

    model.train()
    t0 = time.time()
    run_loss, n_run = 0.0, 0
    bar = tqdm(range(step0, total), desc=desc, initial=step0, total=total, dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = optim_cfg.lr * lr_factor(step, optim_cfg.warmup, total)
        loss, logs = loss_fn(model, step)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if optim_cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model)
        run_loss += float(loss.detach())
        n_run += 1
        if (step + 1) % optim_cfg.log_every == 0 or step + 1 == total:
            row = {"step": step + 1, "loss": run_loss / n_run, "lr": opt.param_groups[0]["lr"],
                   "seconds": time.time() - t0, **{k: float(v) for k, v in logs.items()}}
            rows.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4g}")
            run_loss, n_run = 0.0, 0
        if (step + 1) % optim_cfg.ckpt_every == 0 and step + 1 < total:
            save(step + 1)
    save(total)
    if rows:
        from interpdiff.io import atomic_write_text
        import io as _io

        buf = _io.StringIO()
        keys = list(dict.fromkeys(k for r in rows for k in r))
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
        atomic_write_text(csv_path, buf.getvalue())
    model.eval()
    return rows
