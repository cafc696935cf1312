"""Train and evaluate the level-conditioned keyframe selector.

    python -m maze.train_selector --config configs/maze/small.yaml
    python -m maze.train_selector --config configs/maze/small.yaml selector.nms_radius_scale=0.4   # finished run: re-evaluate (and re-save) with other decoding

Needs ``keyframes_train.npz`` / ``keyframes_eval.npz`` (``python -m maze.prepare_keyframes``).
Each step draws a batch and ONE level ``s`` (uniform over the levels with ``K_s < T``) and
trains the level-``s`` logits (level scalar ``K_s/T``) with per-frame BCE against the level-s
DP mask, endpoints excluded, positives weighted by ``(T - K_s) / (K_s - 2)``
(``selector.soft_label_sigma > 0`` replaces the 0/1 labels by Gaussian bumps in time).

Diagnostics (``eval_selector``), per level and per maze, on ``selector.eval_samples`` eval
trajectories:

- ``overlap``: ``(|M_sel & M_dp| - 2) / (K_s - 2)`` (interior keyframes shared with the DP labels);
- ``index_mae``: mean ``|t_sel - t_dp|`` over the sorted keyframe indices;
- gap statistics (mean gap, mean of the per-sample max gap, largest gap) for selector, uniform,
  random and DP masks;
- interpolation error of selector, uniform, random (``random_nested_masks``, seed 0) and DP
  masks, and ``sel/uniform`` (target <= 0.7 at K=8);
- ``distinct``: fraction of distinct level-0 keyframe sets among the samples (a condition-blind
  selector gives ~0).

Outputs in ``selector.run_dir``: ``config.yaml``, ``metrics.jsonl``, ``model.pt``
(``maze.selector.load_selector``), ``last.pt``, ``eval.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from interpdiff.config import parse_cli, save_config, to_dict
from interpdiff.io import atomic_write_text, save_checkpoint
from interpdiff.masks import gap_stats, mask_to_indices, random_nested_masks, uniform_nested_masks
from maze.common import cond_inputs, fit, interp_error
from maze.encoders import mean_arc_fraction
from maze.config import MazeConfig
from maze.data import MazeDataError, MazeSplit, check_keyframe_budgets, load_split
from maze.selector import SELECTOR_KIND, Selector


def soft_labels(mask_B_T: torch.Tensor, sigma: float) -> torch.Tensor:
    """``max_k exp(-(t - t_k)^2 / (2 sigma^2))`` over keyframes ``t_k`` (the mask itself for sigma <= 0)."""
    if sigma <= 0:
        return mask_B_T.float()
    T = mask_B_T.shape[1]
    t = torch.arange(T, dtype=torch.float32, device=mask_B_T.device)
    d2 = (t[:, None] - t[None, :]) ** 2  # (T, T)
    bump = torch.exp(-d2 / (2 * sigma**2))  # (T frame, T key)
    return (bump[None] * mask_B_T[:, None, :].float()).amax(-1)


def selector_loss(logits_B_T: torch.Tensor, mask_B_T: torch.Tensor, K: int, sigma: float = 0.0) -> torch.Tensor:
    """Weighted BCE on interior frames (module doc)."""
    T = mask_B_T.shape[1]
    y = soft_labels(mask_B_T, sigma)
    w = torch.where(mask_B_T, torch.full_like(y, (T - K) / max(K - 2, 1)), torch.ones_like(y))
    w[:, 0] = w[:, -1] = 0.0
    return (F.binary_cross_entropy_with_logits(logits_B_T, y, reduction="none") * w).sum() / w.sum()


def _gap(m_B_T):
    g = gap_stats(m_B_T[:, None])[0]
    return {"mean_gap": g.mean_gap, "mean_max_gap": g.mean_max_gap, "max_gap": g.max_gap}


def eval_selector(model: Selector, data: MazeSplit, n: int, nms_radius_scale: float | None = None, batch: int = 128) -> dict:
    """Per-level, per-maze diagnostics (module doc)."""
    if data.kp_mask_levels is None:
        raise MazeDataError("eval_selector: the eval split has no keyframes (run python -m maze.prepare_keyframes)")
    budgets = model.budgets
    if list(data.budgets) != list(budgets):
        raise MazeDataError(f"eval_selector: data budgets {data.budgets} differ from the selector's {budgets}")
    idx = np.unique(np.linspace(0, data.N - 1, min(n, data.N)).round().astype(np.int64))  # spread over the mazes
    dev = next(model.parameters()).device
    sel = []
    for b0 in range(0, len(idx), batch):
        b = data.tensors(idx[b0 : b0 + batch], device=dev)
        sel.append(model.nested_masks(*cond_inputs(b), nms_radius_scale=nms_radius_scale).cpu())
    sel = torch.cat(sel)  # (n, S, T)
    b = data.tensors(idx)
    x, dp, mz = b["pos"], b["kp_mask"], b["maze_id"]
    B, S, T = dp.shape
    uni = uniform_nested_masks(B, T, budgets)
    rnd = random_nested_masks(B, T, budgets, generator=torch.Generator().manual_seed(0))

    def summary(r):
        out = {"n": int(r.sum()), "levels": []}
        for s, k in enumerate(budgets):
            ms, md, mu, mr = sel[r, s], dp[r, s], uni[r, s], rnd[r, s]
            e = {p: float(interp_error(x[r], m).mean()) for p, m in (("selector", ms), ("uniform", mu), ("random", mr), ("dp", md))}
            lv = {
                "K": k,
                "overlap": float((((ms & md).sum(1) - 2).float() / max(k - 2, 1)).mean()),
                "index_mae": float((mask_to_indices(ms) - mask_to_indices(md)).abs().float().mean()),
                "err": e,
                "sel_over_uniform": e["selector"] / e["uniform"] if e["uniform"] > 0 else float("nan"),
                "gaps": {p: _gap(m) for p, m in (("selector", ms), ("uniform", mu), ("random", mr), ("dp", md))},
            }
            out["levels"].append(lv)
        lvl0 = sel[r, 0]
        out["distinct"] = len({tuple(row.nonzero().flatten().tolist()) for row in lvl0}) / max(1, int(r.sum()))
        return out

    res = {"all": summary(torch.ones(B, dtype=torch.bool))}
    for m_id, name in enumerate(data.maze_names):
        r = mz == m_id
        if bool(r.any()):
            res[name] = summary(r)
    return res


def format_eval(res: dict) -> str:
    head = f"{'maze':8s} {'K':>4s} {'overlap':>7s} {'idxMAE':>6s} {'err sel':>9s} {'err uni':>9s} {'err rnd':>9s} {'err dp':>9s} {'sel/uni':>7s} {'maxgap sel/uni/dp (mean of per-sample max)':>10s}"
    lines = [head]
    for name, r in res.items():
        for lv in r["levels"]:
            e, g = lv["err"], lv["gaps"]
            lines.append(
                f"{name:8s} {lv['K']:4d} {lv['overlap']:7.3f} {lv['index_mae']:6.2f} {e['selector']:9.2e} {e['uniform']:9.2e} "
                f"{e['random']:9.2e} {e['dp']:9.2e} {lv['sel_over_uniform']:7.3f} "
                f"{g['selector']['max_gap']:3d}/{g['uniform']['max_gap']:3d}/{g['dp']['max_gap']:3d} "
                f"({g['selector']['mean_max_gap']:.1f}/{g['uniform']['mean_max_gap']:.1f}/{g['dp']['mean_max_gap']:.1f})"
            )
        lines.append(f"{name:8s} distinct level-0 sets: {r['distinct']:.2f}")
    return "\n".join(lines)


DECODING_KEYS = ("nms_radius_scale", "max_gap_scale", "gap_bonus")  # stored in sizes; a rerun may change them


def main(cfg: MazeConfig) -> dict:
    dc, sc = cfg.data, cfg.selector
    torch.manual_seed(sc.train.seed)
    train = load_split(dc.root, "train", keyframes=True)
    evals = load_split(dc.root, "eval", keyframes=True)
    T, budgets = train.T, check_keyframe_budgets(train, cfg.keyframes, dc.root)  # a file of other budgets: refused
    check_keyframe_budgets(evals, cfg.keyframes, dc.root, "eval")
    net = sc.net
    dev = torch.device(sc.train.device)
    model = Selector(T, budgets, net.d_model, net.enc_depth, net.heads, net.depth, train.G, sc.nms_radius_scale,
                     sc.max_gap_scale, sc.gap_bonus).to(dev)
    model.arc_frac.copy_(mean_arc_fraction(train.pos))
    run_dir = Path(sc.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainable = [s for s, k in enumerate(budgets) if k < T]
    kp = torch.from_numpy(train.kp_mask_levels)

    def loss_fn(gen):
        rows = torch.randint(0, train.N, (sc.train.batch_size,), generator=gen).numpy()
        s = trainable[int(torch.randint(0, len(trainable), (1,), generator=gen))]
        b = train.tensors(rows, device=dev)
        level = torch.full((len(rows),), budgets[s] / T, device=dev)
        logits = model(*cond_inputs(b), level)
        loss = selector_loss(logits, kp[rows, s].to(dev), budgets[s], sc.soft_label_sigma)
        return loss, {"level": budgets[s]}

    def eval_fn():
        model.max_gap_scale, model.gap_bonus = float(sc.max_gap_scale), float(sc.gap_bonus)
        return eval_selector(model, evals, sc.eval_samples, nms_radius_scale=sc.nms_radius_scale)

    meta = {"kind": SELECTOR_KIND, "sizes": model.sizes, "data_root": dc.root, "config": to_dict(cfg)}
    res = fit(model, loss_fn, sc.train, run_dir, meta, eval_fn, desc="maze.train_selector",
              on_start=lambda: save_config(cfg, run_dir), sizes_not_compared=DECODING_KEYS)
    # the decoding setting is part of the model file (a finished run re-run with another
    # selector.nms_radius_scale re-evaluates and re-saves with it)
    model.sizes["nms_radius_scale"] = model.nms_radius_scale = float(sc.nms_radius_scale)
    model.sizes["max_gap_scale"] = model.max_gap_scale = float(sc.max_gap_scale)
    model.sizes["gap_bonus"] = model.gap_bonus = float(sc.gap_bonus)
    save_checkpoint(run_dir / "model.pt", {"model": model.state_dict()}, dict(meta, sizes=model.sizes, step=sc.train.steps))
    atomic_write_text(run_dir / "eval.json", json.dumps(res, indent=2))
    print(format_eval(res))
    return res


if __name__ == "__main__":
    from maze.common import run_cli

    def _main():
        cfg = parse_cli(MazeConfig, sys.argv[1:])
        torch.set_num_threads(cfg.selector.train.threads)
        return main(cfg)

    run_cli("maze.train_selector", _main)
