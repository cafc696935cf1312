"""Train phase-1, the keyframe denoiser (METHOD.md section 4).

    python -m maze.train_phase1 --config configs/maze/small.yaml --config configs/maze/small_model.yaml
    python -m maze.train_phase1 --config configs/maze/small.yaml --config configs/maze/small_model.yaml phase1.optim.steps=50

Flow matching over the ``K_0`` level-0 keyframe values ``z0 = (x[idx] - 0.5) * 2``:
``z_sigma = (1 - sigma) z0 + sigma eps``, target ``v = eps - z0`` (``interpdiff.flow``), loss
``mean ||v_hat - v||^2`` over the interior keyframes; the endpoints (start, goal) are given clean
with ``known = 1`` and carry no loss (they are clamped at sampling).

Index policy per batch from ``phase1.policy_mix`` (default ``dp:0.7,uniform:0.2,random:0.1``;
``phase1.wall_weight > 0`` adds ``maze.models.flow_wall_penalty`` (walls near the predicted clean
keyframes). ``selector`` is added with ``phase1.selector_weight`` when ``<selector.run_dir>/model.pt``
exists). ``kp_feat`` is recomputed for the chosen indices with D_phi's segment costs (the same
function the sampler uses, so training and sampling features match), or zeros with
``phase1.feat_diffs=none``.

Reads ``<data.root>/keyframes_train.npz``, which must hold the budgets of this config's
``keyframes.*`` (else a ``MazeDataError`` before anything is written: rerun
``maze.prepare_keyframes``). Writes ``<phase1.run_dir>/model.pt`` (sizes, T, G, budgets in its metadata), ``config.yaml``
and ``model_metrics.csv``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from interpdiff.config import save_config, to_dict
from interpdiff.flow import flow_match_target, flow_match_xt, sample_sigmas
from interpdiff.masks import mask_to_indices, parse_policy_mix, sample_policy
from maze.config_model import PHASE1_POLICIES, load_maze_config
from maze.models import KeypointDenoiser, flow_wall_penalty, to_z, train_loop
from maze.sampler import dphi_pair_cost, endpoints_known, gather_keyframes, keyframe_features, policy_masks


def load_aux(cfg, need_dphi: bool, want_selector: bool):
    """D_phi and the selector from their run folders (clear error when D_phi is needed and missing)."""
    from maze.planner import load_dphi_from_run, load_selector_from_run

    dphi = load_dphi_from_run(cfg.dphi.run_dir) if need_dphi else None
    sel = load_selector_from_run(cfg.selector.run_dir, required=False) if want_selector else None
    return dphi, sel


def phase1_mix(cfg, have_selector: bool) -> dict[str, float]:
    mix = parse_policy_mix(cfg.phase1.policy_mix, PHASE1_POLICIES)
    if have_selector and "selector" not in mix and cfg.phase1.selector_weight > 0:
        mix = parse_policy_mix({**mix, "selector": cfg.phase1.selector_weight}, PHASE1_POLICIES)
    if not have_selector:
        mix = {k: v for k, v in mix.items() if k != "selector"}
        mix = parse_policy_mix(mix, PHASE1_POLICIES)
    return mix


def phase1_loss(model, batch, mask0_B_T, pair_cost, cfg, generator):
    """Flow-matching loss over interior keyframes; ``batch`` from ``MazeSplit.tensors``."""
    p1 = cfg.phase1
    idx = mask_to_indices(mask0_B_T)
    B, K = idx.shape
    cond = {k: batch[k] for k in ("occ", "sdf", "start", "goal")}
    feat = gather_keyframes(keyframe_features(mask0_B_T, pair_cost), idx)
    z0 = to_z(gather_keyframes(batch["pos"], idx))
    known = endpoints_known(idx, model.T)
    sigma = sample_sigmas(B, p1.density, p1.train_shift, generator=generator)
    eps = torch.randn(z0.shape, generator=generator)
    zt = torch.where(known[..., None], z0, flow_match_xt(z0, eps, sigma))
    v = model(zt, sigma, idx, feat, known, cond)
    w = (~known).float()[..., None]
    loss = ((v - flow_match_target(z0, eps)) ** 2 * w).sum() / (w.sum() * 2)
    if p1.wall_weight > 0:
        loss = loss + p1.wall_weight * flow_wall_penalty(zt, v, sigma, ~known, batch["sdf"])
    return loss


def main(cfg) -> Path:
    from maze.data import check_keyframe_budgets, load_split

    torch.manual_seed(cfg.phase1.optim.seed)
    p1 = cfg.phase1
    data = load_split(cfg.data.root, "train", keyframes=True)
    budgets = check_keyframe_budgets(data, cfg.keyframes, cfg.data.root)  # a file of other budgets: refused
    dphi, selector = load_aux(cfg, p1.feat_diffs == "dphi", "selector" in p1.policy_mix or p1.selector_weight > 0)
    mix = phase1_mix(cfg, selector is not None)
    run_dir = Path(p1.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = KeypointDenoiser(p1.model, data.T, data.G)
    if p1.model.path_prior:
        from maze.encoders import mean_arc_fraction

        model.arc_frac.copy_(mean_arc_fraction(data.pos))
    gen = torch.Generator().manual_seed(p1.optim.seed)
    counts = {k: 0 for k in mix}

    def loss_fn(model, step):
        rows = torch.randint(0, data.N, (p1.optim.batch_size,), generator=gen).numpy()
        batch = data.tensors(rows)
        cond = {k: batch[k] for k in ("occ", "sdf", "start", "goal")}
        pol = sample_policy(mix, gen)
        counts[pol] += 1
        mask0 = policy_masks(pol, len(rows), data.T, budgets, batch, gen, selector, cond)[:, 0]
        pc = dphi_pair_cost(dphi, cond) if dphi is not None else None
        return phase1_loss(model, batch, mask0, pc, cfg, gen), {}

    path = run_dir / "model.pt"
    extra = {"budgets": budgets, "config": to_dict(p1), "policy_mix": mix, "feat_diffs": p1.feat_diffs,
             "data_root": cfg.data.root}
    train_loop(model, loss_fn, p1.optim, path, extra, "phase1", generator=gen,
               on_start=lambda: save_config(cfg, run_dir))
    print(f"[maze.train_phase1] policies used {counts} -> {path}")
    return path


if __name__ == "__main__":
    from maze.common import run_cli

    torch.set_num_threads(1)
    run_cli("maze.train_phase1", lambda: main(load_maze_config(sys.argv[1:])))
