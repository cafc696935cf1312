"""Wan-teacher segment costs and the video segment-cost predictor D_phi (METHOD.md section 3).

**Teacher cost** of a segment ``(i, j)`` (``j >= i + 2``) of a clip ``x0`` ``[C, T, H, W]`` with
text embedding ``e``, at each of ``t_steps`` flow times ``sigma_k`` (midpoints of a uniform grid,
``interpdiff.selection.snr_weights``; rectified flow as Wan2.1 is trained, no sampling shift)::

    eps            ~ N(0, I), one draw per clip and time, shared by both inputs
    x_t            = (1 - sigma) x0 + sigma eps                     the noised true latents
    y_t            = (1 - sigma) I_ij(x0) + sigma eps               frames i+1..j-1 replaced by the
                                                                    linear interpolation of x0_i, x0_j
    x0_hat(z)      = z - sigma v(z, 1000 sigma, e)                  Wan predicts v = eps - x0
    cost_k[i, j]   = sum_{u = i+1}^{j-1} mean_{c,h,w} (x0_hat(x_t) - x0_hat(y_t))[u]^2

and the DP cost is the KL proxy ``c[i, j] = sum_k w_k / 2 cost_k[i, j]`` with
``w_k = clip(SNR_k, s_min, s_max)^gamma``. Choices where METHOD.md is silent: the comparison is
restricted to the segment's *interpolated* frames ``i+1..j-1`` (the endpoints are equal in both
inputs), so the costs of a keyframe set add up over its segments with every missing frame counted
once; every interior frame is summed, none sampled (METHOD.md's ``segment_cost_samples`` would save
no forward here: one forward per segment and time covers the whole clip); frames outside the
segment stay true in ``y_t`` (the teacher sees the real context); adjacent keyframes cost 0.

One clip costs ``t_steps x (#pairs + 1)`` teacher forwards (``T = 21``, all 190 pairs, 16 times:
3,056), which is why the method learns **D_phi**: a small network predicting
``cost_k[i, j]`` from what a sampler has (pooled text embedding, clip length, the endpoints
``i / (T-1)``, ``j / (T-1)``, the gap and the flow time), trained by regression on teacher costs
of a subset of pairs and times per clip, then used to build full cost matrices for the DP
(``VideoDphi.cost_matrix``). It regresses ``log(cost + floor)`` (costs span orders of
magnitude); ``floor`` is stored in the checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from interpdiff.interpolate import interpolate
from interpdiff.io import CheckpointError, load_checkpoint, save_checkpoint
from interpdiff.selection import snr_weights
from interpdiff.video.selector import fourier

DPHI_KIND = "video-dphi"


# ------------------------------------------------------------------------------ teacher costs


@dataclass
class TeacherCostConfig:
    t_steps: int = 16  # flow-time grid of the KL proxy
    s_min: float = 0.1
    s_max: float = 10.0
    gamma: float = 1.0
    times: list[int] = dataclasses.field(default_factory=list)  # grid indices to evaluate (empty = all)
    pairs_per_clip: int = 0  # 0: every pair (i, j), j >= i + 2; else this many random pairs per clip
    max_gap: int = 0  # 0: no limit on j - i
    seg_batch: int = 4  # segment sequences per teacher forward

    def validate(self) -> None:
        if self.t_steps < 1 or self.seg_batch < 1 or self.pairs_per_clip < 0 or self.max_gap < 0:
            raise ValueError(f"costs: t_steps and seg_batch must be >= 1, pairs_per_clip and max_gap >= 0, got "
                             f"{dataclasses.asdict(self)}")
        bad = [k for k in self.times if not 0 <= int(k) < self.t_steps]
        if bad:
            raise ValueError(f"costs.times={list(self.times)}: indices must lie in [0, t_steps={self.t_steps})")

    def grid(self) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """``(t [t_steps], w [t_steps], evaluated indices)`` (float64)."""
        t, w = snr_weights(self.t_steps, self.s_min, self.s_max, self.gamma, "flow")
        idx = sorted({int(k) for k in self.times}) if self.times else list(range(self.t_steps))
        return t, w, idx


def segment_pairs(T: int, max_gap: int = 0) -> torch.Tensor:
    """Every ``(i, j)`` with ``2 <= j - i`` (``<= max_gap`` if set), ``[P, 2]`` long."""
    ii, jj = torch.triu_indices(T, T, offset=2)
    keep = (jj - ii <= max_gap) if max_gap else torch.ones_like(ii, dtype=torch.bool)
    return torch.stack([ii[keep], jj[keep]], 1)


def segment_masks(pairs_P_2: torch.Tensor, T: int) -> torch.Tensor:
    """``[P, T]`` masks keeping every frame but the interior ``i+1..j-1`` of each pair ``(i, j)``:
    ``interpolate(x, mask)`` then fills exactly the segment from its two endpoints."""
    t = torch.arange(T, device=pairs_P_2.device)
    return ~((t[None] > pairs_P_2[:, :1]) & (t[None] < pairs_P_2[:, 1:]))


def teacher_x0(transformer, z_B_C_T_H_W: torch.Tensor, sigma: float, emb_B_L_D: torch.Tensor) -> torch.Tensor:
    """The teacher's clean-latent prediction ``z - sigma v`` (fp32)."""
    B = z_B_C_T_H_W.shape[0]
    p = next(transformer.parameters())
    ts = torch.full((B,), 1000.0 * sigma, device=z_B_C_T_H_W.device, dtype=torch.float32)
    v = transformer(hidden_states=z_B_C_T_H_W.to(p.dtype), timestep=ts, encoder_hidden_states=emb_B_L_D.to(p.dtype),
                    return_dict=False)[0]
    return z_B_C_T_H_W.float() - sigma * v.float()


@torch.no_grad()
def teacher_costs(transformer, lat_C_T_H_W: torch.Tensor, emb_L_D: torch.Tensor, cfg: TeacherCostConfig,
                  generator: torch.Generator, pairs_P_2: torch.Tensor | None = None) -> dict:
    """Teacher costs of one clip: ``{"pairs" [P, 2] long, "times" [S] long (grid indices),
    "cost" [S, P] float32, "T": T}`` (unweighted ``cost_k``; see the module doc)."""
    cfg.validate()
    C, T, H, W = lat_C_T_H_W.shape
    dev = next(transformer.parameters()).device
    x0 = lat_C_T_H_W.to(dev, torch.float32)
    emb = emb_L_D.to(dev)[None]
    if pairs_P_2 is None:
        pairs_P_2 = segment_pairs(T, cfg.max_gap)
        if cfg.pairs_per_clip and cfg.pairs_per_clip < len(pairs_P_2):
            pick = torch.randperm(len(pairs_P_2), generator=generator)[: cfg.pairs_per_clip].sort().values
            pairs_P_2 = pairs_P_2[pick]
    t, _, idx = cfg.grid()
    cost = torch.zeros(len(idx), len(pairs_P_2), dtype=torch.float32)
    for si, k in enumerate(idx):
        sigma = float(t[k])
        eps = torch.randn(x0.shape, generator=generator).to(dev)
        ref = teacher_x0(transformer, ((1 - sigma) * x0 + sigma * eps)[None], sigma, emb)[0]
        for a in range(0, len(pairs_P_2), cfg.seg_batch):
            chunk = pairs_P_2[a : a + cfg.seg_batch]
            m = segment_masks(chunk, T).to(dev)
            ys = (1 - sigma) * interpolate(x0[None].expand(len(chunk), -1, -1, -1, -1), m, time_dim=2) + sigma * eps
            pred = teacher_x0(transformer, ys, sigma, emb.expand(len(chunk), -1, -1))
            err_B_T = (pred - ref[None]).pow(2).mean(dim=(1, 3, 4))  # per frame, mean over C, H, W
            cost[si, a : a + len(chunk)] = (err_B_T * (~m).float()).sum(1).cpu()  # interior frames only
    return {"pairs": pairs_P_2.clone(), "times": torch.tensor(idx, dtype=torch.long), "cost": cost, "T": T}


def dp_cost_from_teacher(rec: dict, cfg: TeacherCostConfig) -> torch.Tensor:
    """``[T, T]`` DP cost ``sum_k w_k / 2 cost_k[i, j]`` from a full ``teacher_costs`` record (every
    pair, every time): 0 for adjacent frames, ``+inf`` on and below the diagonal."""
    T = int(rec["T"])
    _, w, _ = cfg.grid()
    want = segment_pairs(T, 0)
    if rec["pairs"].shape != want.shape or not torch.equal(rec["pairs"], want) or len(rec["times"]) != cfg.t_steps:
        raise ValueError("dp_cost_from_teacher: the record must hold every pair (costs.pairs_per_clip=0, "
                         "costs.max_gap=0) and every time (costs.times=[]); use D_phi otherwise")
    c = torch.full((T, T), math.inf, dtype=torch.float32)
    idx = torch.arange(T - 1)
    c[idx, idx + 1] = 0.0
    tot = (w[rec["times"]].float()[:, None] / 2 * rec["cost"]).sum(0)
    c[rec["pairs"][:, 0], rec["pairs"][:, 1]] = tot
    return c


# ------------------------------------------------------------------------------ D_phi


@dataclass
class DphiSizes:
    text_dim: int = 4096
    d_model: int = 256
    hidden: int = 512
    depth: int = 3
    n_freq: int = 6
    t_ref: int = 21  # clip length the length feature is normalised by

    def validate(self) -> None:
        if min(self.text_dim, self.d_model, self.hidden, self.depth, self.n_freq, self.t_ref) < 1:
            raise ValueError(f"dphi sizes must be positive, got {dataclasses.asdict(self)}")


class VideoDphi(nn.Module):
    """``log(cost_k[i, j] + floor)`` from (pooled text, T, i, j, gap, flow time).

    The text enters as a masked mean of ``Linear(LayerNorm(emb))`` over the non-padding tokens
    (UMT5 rows past the prompt are zero); it is concatenated with Fourier features of
    ``i / (T-1)``, ``j / (T-1)``, ``(j - i) / (T-1)``, ``t`` and ``T / t_ref`` and fed to an MLP.
    """

    def __init__(self, sizes: DphiSizes, floor: float = 1e-6):
        super().__init__()
        sizes.validate()
        self.sizes, self.floor = sizes, float(floor)
        self.text = nn.Sequential(nn.LayerNorm(sizes.text_dim), nn.Linear(sizes.text_dim, sizes.d_model))
        n_in = sizes.d_model + 5 * (1 + 2 * sizes.n_freq)
        layers: list[nn.Module] = []
        for k in range(sizes.depth):
            layers += [nn.Linear(n_in if k == 0 else sizes.hidden, sizes.hidden), nn.SiLU()]
        layers.append(nn.Linear(sizes.hidden, 1))
        self.mlp = nn.Sequential(*layers)

    def pooled(self, emb_B_L_D: torch.Tensor) -> torch.Tensor:
        keep = (emb_B_L_D.abs().amax(-1) > 0).float()  # padding rows are zero
        keep[:, 0] = 1.0  # an all-zero embedding still pools its first row
        h = self.text(emb_B_L_D.float())
        return (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)

    def forward(self, pooled_B_d: torch.Tensor, T: int, i_B_N: torch.Tensor, j_B_N: torch.Tensor,
                t_B_N: torch.Tensor) -> torch.Tensor:
        """Predicted ``log(cost + floor)`` ``[B, N]`` for ``N`` (pair, time) queries per clip."""
        n = self.sizes.n_freq
        span = max(T - 1, 1)
        feats = torch.cat([
            fourier(i_B_N / span, n), fourier(j_B_N / span, n), fourier((j_B_N - i_B_N) / span, n),
            fourier(t_B_N, n), fourier(torch.full_like(t_B_N, T / self.sizes.t_ref), n),
        ], -1)
        B, N = i_B_N.shape
        x = torch.cat([pooled_B_d[:, None].expand(B, N, -1), feats], -1)
        return self.mlp(x)[..., 0]

    def predict_cost(self, *args) -> torch.Tensor:
        return (self.forward(*args).exp() - self.floor).clamp_min(0.0)

    @torch.no_grad()
    def pair_costs(self, emb_B_L_D: torch.Tensor, T: int, i_B_P: torch.Tensor, j_B_P: torch.Tensor,
                   cfg: TeacherCostConfig) -> torch.Tensor:
        """``[B, P]`` predicted DP cost ``sum_k w_k / 2 cost_k`` (the cost grid's flow times ``t_k``
        and weights ``w_k``) of the segments ``(i, j)``, ``i < j``."""
        t, w, _ = cfg.grid()
        dev = next(self.parameters()).device
        B, P = i_B_P.shape
        S = len(t)
        i = i_B_P.float().to(dev).repeat(1, S)
        j = j_B_P.float().to(dev).repeat(1, S)
        tt = t.float().to(dev).repeat_interleave(P)[None].expand(B, -1)
        pred = self.predict_cost(self.pooled(emb_B_L_D.to(dev)), T, i, j, tt).view(B, S, P)
        return (w.float().to(dev)[None, :, None] / 2 * pred).sum(1)

    @torch.no_grad()
    def cost_matrix(self, emb_B_L_D: torch.Tensor, T: int, cfg: TeacherCostConfig) -> torch.Tensor:
        """``[B, T, T]`` predicted DP cost (``pair_costs``) over the whole grid: 0 for adjacent
        frames, ``+inf`` on and below the diagonal."""
        B = emb_B_L_D.shape[0]
        dev = next(self.parameters()).device
        pairs = segment_pairs(T, 0).to(dev)
        tot = self.pair_costs(emb_B_L_D, T, pairs[:, 0][None].expand(B, -1), pairs[:, 1][None].expand(B, -1), cfg)
        c = torch.full((B, T, T), math.inf, device=dev)
        ar = torch.arange(T - 1, device=dev)
        c[:, ar, ar + 1] = 0.0
        c[:, pairs[:, 0], pairs[:, 1]] = tot
        return c


def save_dphi(path: str | Path, model: VideoDphi, cost_cfg: TeacherCostConfig, extra: dict | None = None) -> None:
    meta = {"kind": DPHI_KIND, "sizes": dataclasses.asdict(model.sizes), "floor": model.floor,
            "costs": dataclasses.asdict(cost_cfg), **(extra or {})}
    save_checkpoint(path, {k: v.detach().cpu() for k, v in model.state_dict().items()}, meta)


def load_dphi(path: str | Path, map_location="cpu") -> tuple[VideoDphi, TeacherCostConfig]:
    """Rebuild ``VideoDphi`` and its cost grid from a checkpoint; errors name the path."""
    p = Path(path)
    if p.is_dir():
        p = p / "dphi.pt"
    if not p.is_file():
        raise CheckpointError(f"video D_phi checkpoint {str(p)!r} does not exist (expected the dphi.pt written by "
                              "train_dphi_teacher.py)")
    ck = load_checkpoint(p, map_location=map_location)
    state, meta = ck["state"], ck.get("meta", {})
    if meta.get("kind") != DPHI_KIND:
        raise CheckpointError(f"{str(p)!r} is a {meta.get('kind')!r} checkpoint, not a {DPHI_KIND!r} one")
    try:
        model = VideoDphi(DphiSizes(**meta["sizes"]), floor=meta["floor"])
        model.load_state_dict(state)
        cost_cfg = TeacherCostConfig(**meta["costs"])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{str(p)!r}: cannot rebuild the video D_phi from its metadata/weights: {e}") from None
    return model.eval(), cost_cfg


def fit_batch(records: Sequence[dict], grid_t: torch.Tensor, n: int, generator: torch.Generator) -> tuple:
    """A regression batch: for each record (one clip), ``n`` random (pair, time) entries."""
    i_l, j_l, t_l, y_l, keys = [], [], [], [], []
    for rec in records:
        S, P = rec["cost"].shape
        s = torch.randint(0, S, (n,), generator=generator)
        q = torch.randint(0, P, (n,), generator=generator)
        i_l.append(rec["pairs"][q, 0].float())
        j_l.append(rec["pairs"][q, 1].float())
        t_l.append(grid_t[rec["times"][s]].float())
        y_l.append(rec["cost"][s, q])
        keys.append(rec["key"])
    return keys, torch.stack(i_l), torch.stack(j_l), torch.stack(t_l), torch.stack(y_l)
