"""The maze condition encoder, shared by D_phi, the selector and phase-1.

``MazeEncoder(d_model, depth, heads)``::

    tokens_B_N_D, pooled_B_D = enc(occ_B_G_G, sdf_B_G_G, start_B_2, goal_B_2)

Inputs: unified occupancy (1 = wall) and SDF (cells) ``[B, G, G]`` indexed ``[row=v, col=u]``,
start/goal in normalised ``(u, v)``. ``N = G*G + 2``.

Tokens:

- one **cell token** per grid cell (``G*G``) from 5 channels: occupancy, ``sdf / 4`` (tanh),
  a start heatmap and a goal heatmap (Gaussians of std ``heat_std`` cells at the start/goal,
  so the positions are seen spatially), and the goal-distance field (4-connected geodesic
  distance from every free cell to the goal cell, ``/ G``, 0 in walls); plus a learned 2-D
  position embedding of the cell and Fourier features of its centre ``(u, v)`` (so that
  queries carrying a position, e.g. ``path_prior``, can attend to the cells around it);
- a **start/goal token**: Fourier features of ``(start, goal, goal - start)``;
- a **goal-distance token**: the geodesic cell distance from the start cell to the goal cell and
  the Euclidean start-goal distance (both normalised by ``G`` / 1), Fourier features.

A pre-norm transformer (``depth`` layers) mixes all tokens. ``pooled_B_D`` = LayerNorm of the
mean over tokens concatenated with the start/goal token, projected back to ``D``. Consumers use
``tokens`` for cross-attention and ``pooled`` as a global bias (METHOD.md section 6: a selector
that only cross-attends learns a condition-blind prior; the pooled bias makes it follow the
maze).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def geodesic_distance(occ_B_G_G: torch.Tensor, goal_rc_B_2: torch.Tensor, max_iter: int | None = None) -> torch.Tensor:
    """4-connected shortest-path length (cells) from every cell to the goal cell; ``inf`` in walls.

    Batched Bellman relaxation ``d <- min(d, min_neighbour(d) + 1)`` on free cells until no
    change (at most ``G*G`` sweeps). A goal cell that is a wall gives ``inf`` everywhere.
    """
    B, G, _ = occ_B_G_G.shape
    free = occ_B_G_G < 0.5
    inf = torch.tensor(math.inf, device=occ_B_G_G.device)
    d = torch.full((B, G, G), math.inf, device=occ_B_G_G.device)
    rows = torch.arange(B, device=occ_B_G_G.device)
    r = goal_rc_B_2[:, 0].clamp(0, G - 1)
    c = goal_rc_B_2[:, 1].clamp(0, G - 1)
    d[rows, r, c] = 0.0
    d = torch.where(free, d, inf)
    for _ in range(max_iter or G * G):
        p = F.pad(d, (1, 1, 1, 1), value=math.inf)
        nb = torch.minimum(torch.minimum(p[:, :-2, 1:-1], p[:, 2:, 1:-1]), torch.minimum(p[:, 1:-1, :-2], p[:, 1:-1, 2:]))
        new = torch.where(free, torch.minimum(d, nb + 1), inf)
        if torch.equal(new, d):
            break
        d = new
    return d


def cell_of(p_B_2: torch.Tensor, G: int) -> torch.Tensor:
    """Grid cell ``(row, col)`` of normalised ``(u, v)`` points (long)."""
    return torch.stack([(p_B_2[:, 1] * G).floor(), (p_B_2[:, 0] * G).floor()], -1).long().clamp(0, G - 1)


def heatmap(p_B_2: torch.Tensor, G: int, std_cells: float) -> torch.Tensor:
    """Gaussian bump ``exp(-|c - p|^2 / (2 std^2))`` at each cell centre ``c`` (normalised units)."""
    ctr = (torch.arange(G, device=p_B_2.device, dtype=p_B_2.dtype) + 0.5) / G
    dv = (ctr[None, :, None] - p_B_2[:, 1, None, None]) ** 2
    du = (ctr[None, None, :] - p_B_2[:, 0, None, None]) ** 2
    return torch.exp(-(du + dv) / (2 * (std_cells / G) ** 2))


@torch.no_grad()
def mean_arc_fraction(pos_N_T_2) -> torch.Tensor:
    """Mean over trajectories of the arc-length fraction covered by frame ``t`` (``[T]``, 0 -> 1).

    The time warp of ``path_prior``: frame ``t`` of a typical trajectory is this far along its
    path (slower at the start and the end, where the agent accelerates and settles).
    """
    x = torch.as_tensor(pos_N_T_2, dtype=torch.float64)
    seg = (x[:, 1:] - x[:, :-1]).norm(dim=-1)
    arc = torch.cat([torch.zeros(x.shape[0], 1, dtype=x.dtype), seg.cumsum(1)], 1)
    arc = arc / arc[:, -1:].clamp_min(1e-12)
    m = arc.mean(0).cummax(0).values
    m[0], m[-1] = 0.0, 1.0
    return m.float()


def path_prior(occ_B_G_G: torch.Tensor, start_B_2: torch.Tensor, goal_B_2: torch.Tensor, T: int, corner_width: float = 0.03,
               arc_frac_T: torch.Tensor | None = None) -> torch.Tensor:
    """A condition-only guess of the trajectory: ``[B, T, 5]`` = ``(u, v, tangent_u, tangent_v, corner)``.

    The 4-connected shortest cell path from the start cell to the goal cell (steepest descent on
    ``geodesic_distance``; ties go to the first of up/down/left/right) gives the polyline
    ``start -> centres of the intermediate cells -> goal`` (the waypoints of the data's
    controller). Frame ``t`` is placed at arc-length fraction ``arc_frac_T[t]`` of it (default
    ``t / (T-1)``; models pass ``mean_arc_fraction`` of their training data); ``tangent`` is the unit
    direction of its polyline piece and ``corner = exp(-(d / corner_width)^2)`` with ``d`` the
    arc-length distance (as a fraction of the path) to the nearest turning vertex (0 if none).
    Time is not exactly a fixed warp of arc length (turns, noise), so this is a prior for the
    time queries, not a prediction; an unreachable goal gives a straight start-goal line.
    """
    B, G, _ = occ_B_G_G.shape
    dev = occ_B_G_G.device
    start, goal = start_B_2.float(), goal_B_2.float()
    gc, sc = cell_of(goal, G), cell_of(start, G)
    dist = geodesic_distance(occ_B_G_G, gc)
    dpad = F.pad(dist, (1, 1, 1, 1), value=math.inf)
    rows = torch.arange(B, device=dev)
    moves = torch.tensor([[-1, 0], [1, 0], [0, -1], [0, 1]], device=dev)
    cur = sc.clone()
    cells = [cur]
    for _ in range(G * G):
        done = (cur == gc).all(1) | ~torch.isfinite(dist[rows, cur[:, 0], cur[:, 1]])
        if bool(done.all()):
            break
        nb = cur[:, None, :] + moves[None]  # (B, 4, 2)
        dn = dpad[rows[:, None], nb[..., 0] + 1, nb[..., 1] + 1]  # (B, 4)
        step = moves[dn.argmin(1)]
        cur = torch.where(done[:, None], cur, cur + step)
        cells.append(cur)
    path = torch.stack(cells, 1)  # (B, L, 2) (row, col), padded by repeating the goal cell
    ctr = torch.stack([(path[..., 1] + 0.5) / G, (path[..., 0] + 0.5) / G], -1)  # (B, L, 2) (u, v)
    L = ctr.shape[1]
    is_goal = (path == gc[:, None]).all(-1)
    # vertices: start, intermediate cell centres, then the goal (repeated as padding)
    verts = torch.where(is_goal[..., None], goal[:, None], ctr)
    verts = torch.cat([start[:, None], verts[:, 1:] if L > 1 else goal[:, None]], 1)
    verts[:, -1] = goal
    seg = verts[:, 1:] - verts[:, :-1]  # (B, L-1, 2)
    seg_len = seg.norm(dim=-1)
    cum = torch.cat([torch.zeros(B, 1, device=dev), seg_len.cumsum(1)], 1)  # (B, L)
    total = cum[:, -1:].clamp_min(1e-9)
    frac = torch.linspace(0, 1, T, device=dev) if arc_frac_T is None else arc_frac_T.to(dev).float()
    s_t = frac[None] * total  # (B, T)
    k = torch.searchsorted(cum[:, 1:].contiguous(), s_t.contiguous(), right=False).clamp(max=seg.shape[1] - 1)  # piece index
    l0 = cum.gather(1, k)
    ln = seg_len.gather(1, k).clamp_min(1e-9)
    w = ((s_t - l0) / ln).clamp(0, 1)[..., None]
    v0 = verts.gather(1, k[..., None].expand(-1, -1, 2))
    v1 = verts.gather(1, (k + 1)[..., None].expand(-1, -1, 2))
    pos = v0 * (1 - w) + v1 * w
    tangent = (v1 - v0) / ln[..., None]
    tangent = torch.where(seg_len.gather(1, k)[..., None] > 1e-9, tangent, torch.zeros_like(tangent))
    # turning vertices: interior vertices whose in/out directions differ
    u = seg / seg_len.clamp_min(1e-9)[..., None]
    turn = ((u[:, 1:] * u[:, :-1]).sum(-1) < 0.5) & (seg_len[:, 1:] > 1e-9) & (seg_len[:, :-1] > 1e-9)  # (B, L-2)
    s_corner = torch.where(turn, cum[:, 1:-1], torch.full_like(cum[:, 1:-1], math.inf))
    if s_corner.shape[1] == 0:
        corner = torch.zeros(B, T, device=dev)
    else:
        d = ((s_t[..., None] - s_corner[:, None]).abs().amin(-1)) / total
        corner = torch.exp(-((d / corner_width) ** 2))
    return torch.cat([pos, tangent, corner[..., None]], -1)


class FourierFeatures(nn.Module):
    """``x -> [x, sin(2^k pi x), cos(2^k pi x)]_{k < n_freq}`` then a 2-layer MLP to ``d``."""

    def __init__(self, in_dim: int, d: int, n_freq: int = 6):
        super().__init__()
        self.register_buffer("freq", (2.0 ** torch.arange(n_freq)) * math.pi, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(in_dim * (1 + 2 * n_freq), d), nn.GELU(), nn.Linear(d, d))

    def forward(self, x_B_I: torch.Tensor) -> torch.Tensor:
        a = x_B_I[..., None] * self.freq  # (..., I, F)
        f = torch.cat([x_B_I, a.sin().flatten(-2), a.cos().flatten(-2)], -1)
        return self.mlp(f)


class MazeEncoder(nn.Module):
    """Condition encoder: ``(occ, sdf, start, goal) -> (tokens_B_N_D, pooled_B_D)`` (module doc)."""

    N_CH = 5

    def __init__(self, d_model: int = 128, depth: int = 2, heads: int = 4, G: int = 12, heat_std: float = 0.75, dropout: float = 0.0):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"MazeEncoder: d_model={d_model} must be divisible by heads={heads}")
        self.d_model, self.depth, self.heads, self.G, self.heat_std = d_model, depth, heads, G, heat_std
        self.cell_in = nn.Sequential(nn.Linear(self.N_CH, d_model), nn.GELU(), nn.Linear(d_model, d_model))
        self.pos_emb = nn.Parameter(torch.randn(G * G, d_model) * 0.02)
        self.cell_xy = FourierFeatures(2, d_model, n_freq=4)  # fixed (u, v) of the cell centre -> matches spatial queries
        ctr = (torch.arange(G, dtype=torch.float32) + 0.5) / G
        vv, uu = torch.meshgrid(ctr, ctr, indexing="ij")
        self.register_buffer("cell_uv", torch.stack([uu, vv], -1).reshape(G * G, 2), persistent=False)
        self.sg_tok = FourierFeatures(6, d_model)
        self.dist_tok = FourierFeatures(2, d_model, n_freq=4)
        self.type_emb = nn.Parameter(torch.randn(3, d_model) * 0.02)  # cell, start/goal, distance
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False) if depth > 0 else None
        self.norm = nn.LayerNorm(d_model)
        self.pool = nn.Sequential(nn.LayerNorm(2 * d_model), nn.Linear(2 * d_model, d_model))

    def config(self) -> dict:
        return {"d_model": self.d_model, "depth": self.depth, "heads": self.heads, "G": self.G, "heat_std": self.heat_std}

    def features(self, occ_B_G_G, sdf_B_G_G, start_B_2, goal_B_2):
        """Cell channels ``[B, G*G, 5]`` and the two scalar distance features ``[B, 2]``."""
        B, G, G2 = occ_B_G_G.shape
        if G != self.G or G2 != self.G:
            raise ValueError(f"MazeEncoder: occupancy must be [B, {self.G}, {self.G}], got {list(occ_B_G_G.shape)}")
        with torch.no_grad():
            dist = geodesic_distance(occ_B_G_G, cell_of(goal_B_2, G))  # (B, G, G)
            sc = cell_of(start_B_2, G)
            d_start = dist[torch.arange(B, device=dist.device), sc[:, 0], sc[:, 1]]
            d_start = torch.where(torch.isfinite(d_start), d_start, torch.full_like(d_start, 2.0 * G))
            dist_f = torch.where(torch.isfinite(dist), dist / G, torch.zeros_like(dist))
        chans = torch.stack(
            [
                occ_B_G_G,
                torch.tanh(sdf_B_G_G / 4),
                heatmap(start_B_2, G, self.heat_std),
                heatmap(goal_B_2, G, self.heat_std),
                dist_f,
            ],
            -1,
        ).reshape(B, G * G, self.N_CH)
        scal = torch.stack([d_start / G, (goal_B_2 - start_B_2).norm(dim=-1)], -1)
        return chans, scal

    def forward(self, occ_B_G_G, sdf_B_G_G, start_B_2, goal_B_2):
        chans, scal = self.features(occ_B_G_G.float(), sdf_B_G_G.float(), start_B_2.float(), goal_B_2.float())
        cells = self.cell_in(chans) + self.pos_emb + self.cell_xy(self.cell_uv) + self.type_emb[0]  # (B, G*G, D)
        sg = self.sg_tok(torch.cat([start_B_2, goal_B_2, goal_B_2 - start_B_2], -1).float()) + self.type_emb[1]  # (B, D)
        dt = self.dist_tok(scal) + self.type_emb[2]  # (B, D)
        x = torch.cat([cells, sg[:, None], dt[:, None]], 1)  # (B, N, D)
        if self.blocks is not None:
            x = self.blocks(x)
        tokens = self.norm(x)
        pooled = self.pool(torch.cat([tokens.mean(1), tokens[:, -2]], -1))  # (B, D)
        return tokens, pooled
