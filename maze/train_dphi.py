"""Train and evaluate D_phi, the maze segment-cost predictor.

    python -m maze.train_dphi --config configs/maze/small.yaml
    python -m maze.train_dphi --config configs/maze/small.yaml dphi.train.steps=4000 dphi.run_dir=runs/maze/dphi_long

Data: ``<data.root>/train.npz`` (+ ``keyframes_train.npz`` when present, for DP-adjacent
pairs), evaluation on ``eval.npz``. Each step draws ``batch_size`` trajectories and
``pairs_per_sample`` segments per trajectory: half with a log-uniform gap in ``[1, T-1]`` and a
uniform start, half (when keyframes exist) adjacent keyframes of a random level's DP mask
(the pairs D_phi scores at train/sample time). Target: the true SNR-weighted cost
``c[i, j]`` (``interpdiff.selection.segment_costs``, same scale as ``prepare_keyframes``),
regressed as ``(log(c + eps) - mu) / std`` with MSE.

Evaluation (``eval_dphi``, on ``dphi.eval_samples`` eval trajectories), per level and per maze:

- Spearman rank correlation between predicted and true costs over all pairs with gap >= 2,
  per trajectory, averaged;
- interpolation error (``maze.common.interp_error``) of nested DP masks computed on D_phi's
  cost matrix vs on the true one, and their ratio (target: <= 1.25 at K=8).

Outputs in ``dphi.run_dir``: ``config.yaml``, ``metrics.jsonl``, ``model.pt`` (weights +
sizes; ``maze.dphi.load_dphi``), ``last.pt`` (resume), ``eval.json``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from interpdiff.config import parse_cli, save_config, to_dict
from interpdiff.io import atomic_write_text
from interpdiff.selection import kl_scale, segment_costs
from maze.common import cond_inputs, fit, interp_error
from maze.encoders import mean_arc_fraction
from maze.config import MazeConfig
from maze.data import MazeSplit, load_split
from maze.dphi import DPHI_KIND, DPhi
from maze.prepare_keyframes import dp_levels


def spearman_rows(a_B_P: torch.Tensor, b_B_P: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per row (ties get arbitrary distinct ranks)."""
    ra = a_B_P.argsort(1).argsort(1).double()
    rb = b_B_P.argsort(1).argsort(1).double()
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    return (ra * rb).sum(1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)


def sample_pairs(B: int, T: int, P: int, gen: torch.Generator, kp_mask_B_S_T: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(i_B_P, j_B_P)`` training pairs (module doc)."""
    n_dp = P // 2 if kp_mask_B_S_T is not None else 0
    n_rand = P - n_dp
    gap = torch.exp(torch.rand(B, n_rand, generator=gen) * math.log(T - 1)).floor().long().clamp(1, T - 1)
    i = (torch.rand(B, n_rand, generator=gen) * (T - gap).float()).floor().long()
    j = i + gap
    if n_dp:
        S = kp_mask_B_S_T.shape[1]
        s = torch.randint(0, max(1, S - 1), (B,), generator=gen)  # the all-frames level has only gap-1 pairs
        m = kp_mask_B_S_T[torch.arange(B), s]  # (B, T)
        t = torch.arange(T).expand(B, T)
        # pick random keyframes other than the last, pair each with its next keyframe
        score = torch.rand(B, n_dp, T, generator=gen).masked_fill(~(m & (t < T - 1))[:, None], -1.0)
        a = score.argmax(-1)  # (B, n_dp)
        nxt = torch.where(m, t, torch.full_like(t, T)).flip(1).cummin(1).values.flip(1)  # next keyframe at or after t
        nxt_after = torch.cat([nxt[:, 1:], torch.full((B, 1), T - 1)], 1)  # strictly after t
        b = nxt_after.gather(1, a)
        i, j = torch.cat([i, a], 1), torch.cat([j, b], 1)
    return i, j


def target_stats(pos_N_T_2: np.ndarray, scale: float, log_eps_rel: float, n: int = 256) -> tuple[float, float, float]:
    """``(log_eps, mu, std)`` of the log-cost target from the first ``n`` trajectories."""
    c = segment_costs(torch.from_numpy(pos_N_T_2[:n]), scale=scale)
    iu, ju = torch.triu_indices(c.shape[1], c.shape[1], 1)
    v = c[:, iu, ju].flatten().double()
    pos = v[v > 0]
    med = float(pos.median()) if pos.numel() else 1.0
    eps = max(log_eps_rel * med, 1e-30)
    lv = torch.log(v + eps)
    return math.log(eps), float(lv.mean()), float(lv.std().clamp_min(1e-6))


def eval_dphi(model: DPhi, data: MazeSplit, budgets: list[int], scale: float, n: int, batch: int = 64) -> dict:
    dev = next(model.parameters()).device
    """Rank correlation and DP-with-D_phi vs DP-with-true interpolation error (module doc)."""
    idx = np.unique(np.linspace(0, data.N - 1, min(n, data.N)).round().astype(np.int64))  # spread over the mazes
    errs_true, errs_hat, rhos, maze = [], [], [], []
    for b0 in range(0, len(idx), batch):
        rows = idx[b0 : b0 + batch]
        b = data.tensors(rows, device=dev)
        x = b["pos"]
        c_true = segment_costs(x, scale=scale)
        c_hat = model.cost_matrix(*cond_inputs(b))
        T = x.shape[1]
        iu, ju = torch.triu_indices(T, T, 2)  # gap >= 2 (gap-1 pairs cost 0 for both)
        rhos.append(spearman_rows(c_hat[:, iu, ju], c_true[:, iu, ju]))
        m_true = dp_levels(c_true, budgets)
        m_hat = dp_levels(c_hat, budgets)
        errs_true.append(torch.stack([interp_error(x, m_true[:, s]) for s in range(len(budgets))], 1))
        errs_hat.append(torch.stack([interp_error(x, m_hat[:, s]) for s in range(len(budgets))], 1))
        maze.append(b["maze_id"])
    et, eh, rho, mz = (torch.cat(v).cpu() for v in (errs_true, errs_hat, rhos, maze))

    def summary(sel):
        out = {"n": int(sel.sum()), "spearman": float(rho[sel].mean()), "levels": []}
        for s, k in enumerate(budgets):
            a, h = float(et[sel, s].mean()), float(eh[sel, s].mean())
            ratio = h / a if a > 0 else (1.0 if h == 0 else math.inf)
            out["levels"].append({"K": k, "err_dp_true": a, "err_dp_dphi": h, "ratio": ratio})
        return out

    res = {"all": summary(torch.ones_like(mz, dtype=torch.bool))}
    for m_id, name in enumerate(data.maze_names):
        sel = mz == m_id
        if bool(sel.any()):
            res[name] = summary(sel)
    return res


def format_eval(res: dict) -> str:
    lines = [f"{'maze':8s} {'spearman':>8s}  " + "  ".join(f"K={lv['K']:<3d} ratio" for lv in res["all"]["levels"])]
    for name, r in res.items():
        lines.append(f"{name:8s} {r['spearman']:8.3f}  " + "  ".join(f"{lv['ratio']:11.3f}" for lv in r["levels"]))
    return "\n".join(lines)


def main(cfg: MazeConfig) -> dict:
    dc, kc, pc = cfg.data, cfg.keyframes, cfg.dphi
    torch.manual_seed(pc.train.seed)
    train = load_split(dc.root, "train")
    evals = load_split(dc.root, "eval", keyframes=False)
    T = train.T
    budgets = kc.resolved_budgets(T)
    scale = kl_scale(**kc.snr_kwargs())
    log_eps, mu, std = target_stats(train.pos, scale, pc.log_eps_rel)
    net = pc.net
    dev = torch.device(pc.train.device)
    model = DPhi(T, net.d_model, net.enc_depth, net.heads, net.depth, train.G, log_eps, mu, std).to(dev)
    model.arc_frac.copy_(mean_arc_fraction(train.pos))
    run_dir = Path(pc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    kp = torch.from_numpy(train.kp_mask_levels) if train.kp_mask_levels is not None else None

    def loss_fn(gen):
        rows = torch.randint(0, train.N, (pc.train.batch_size,), generator=gen).numpy()
        b = train.tensors(rows, device=dev)
        c = segment_costs(b["pos"], scale=scale)  # (B, T, T)
        i, j = sample_pairs(len(rows), T, pc.pairs_per_sample, gen, None if kp is None else kp[rows])
        i, j = i.to(dev), j.to(dev)
        tgt = torch.log(c.reshape(len(rows), T * T).gather(1, i * T + j).double() + math.exp(log_eps)).float()
        pred = model.pair_logits(*model.time_features(*cond_inputs(b)), i, j)
        loss = ((pred - (tgt - mu) / std) ** 2).mean()
        return loss, {}

    def eval_fn():
        return eval_dphi(model, evals, budgets, scale, pc.eval_samples)

    meta = {"kind": DPHI_KIND, "sizes": model.sizes, "budgets": budgets, "cost_scale": scale, "data_root": dc.root, "config": to_dict(cfg)}
    res = fit(model, loss_fn, pc.train, run_dir, meta, eval_fn, desc="maze.train_dphi",
              on_start=lambda: save_config(cfg, run_dir))
    atomic_write_text(run_dir / "eval.json", json.dumps(res, indent=2))
    print(format_eval(res))
    return res


if __name__ == "__main__":
    from maze.common import run_cli

    def _main():
        cfg = parse_cli(MazeConfig, sys.argv[1:])
        torch.set_num_threads(cfg.dphi.train.threads)
        return main(cfg)

    run_cli("maze.train_dphi", _main)
