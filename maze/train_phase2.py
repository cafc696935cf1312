"""Train phase-2, the interpolation-level refiner (METHOD.md section 5).

    python -m maze.train_phase2 --config configs/maze/small.yaml --config configs/maze/small_model.yaml

Per batch: a nested mask stack ``M_0 ⊂ ... ⊂ M_S`` from ``phase2.policy_mix``
(``selector|uniform|random_nested|dp_precomputed``; ``selector`` is dropped, with a note, when
no selector checkpoint exists), a level ``s ~ U{0..S-2}`` per sample (the last level has no
missing frame), the corruption ``x_s = I(x0, M_s) + sigma_s eps (1 - M_s)``
(``interpdiff.corruption.corrupt``, ``sigma_s = level_sigmas(S, sigma_max, sigma_min)[s]``),
the anchor confidence ``anchor_confidence(M_s, phase2.confidence)`` (the very function
``refine`` calls at sampling) and the loss ``mean ||z(x0_hat) - z(x0)||^2`` over missing
frames (``z = 2 (x - 0.5)``), per-sample weighted by level when ``phase2.level_weight=inv_sigma2``
(``1 / sigma_s^2``, mean 1 over levels), plus ``phase2.wall_weight`` times ``maze.models.wall_penalty``
of ``x0_hat`` on missing frames. The refiner's output form is ``phase2.output``
(``missing_residual``: keyframes of ``M_s`` returned exactly).

Reads ``<data.root>/keyframes_train.npz``, which must hold the budgets of this config's
``keyframes.*`` (else a ``MazeDataError`` before anything is written: rerun
``maze.prepare_keyframes``). Writes ``<phase2.run_dir>/model.pt`` (sizes, T, G, n_levels, budgets, sigmas, confidence in its
metadata), ``config.yaml`` and ``model_metrics.csv``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from interpdiff.config import save_config, to_dict
from interpdiff.corruption import anchor_confidence, corrupt, level_sigmas
from interpdiff.masks import parse_policy_mix, sample_policy
from maze.config_model import PHASE2_POLICIES, load_maze_config
from maze.models import Refiner, to_z, train_loop, wall_penalty
from maze.sampler import policy_masks


def phase2_loss(model, batch, masks_B_S_T, sigmas_S, confidence: str, generator, level_weight: str = "none",
                wall_weight: float = 0.0):
    """Mean squared error in ``z`` over missing frames (module doc), per-sample weighted by level
    (``level_weight``), plus ``wall_weight`` x the wall penalty of ``x0_hat`` at missing frames."""
    x0 = batch["pos"]
    B, S, T = masks_B_S_T.shape
    s = torch.randint(0, S - 1, (B,), generator=generator)
    m = masks_B_S_T[torch.arange(B), s]  # (B, T)
    x_s = corrupt(x0, m, sigmas_S[s], generator=generator)
    cond = {k: batch[k] for k in ("occ", "sdf", "start", "goal")}
    x0_hat = model(x_s, s, anchor_confidence(m, confidence), cond)
    w = (~m).float()  # (B, T)
    if level_weight == "inv_sigma2":
        lw = 1.0 / sigmas_S[: S - 1].double() ** 2
        w = w * (lw / lw.mean()).float()[s][:, None]
    elif level_weight != "none":
        raise ValueError(f"phase2_loss: level_weight={level_weight!r} is not one of ['none', 'inv_sigma2']")
    n = (~m).float().sum()
    loss = ((to_z(x0_hat) - to_z(x0)) ** 2 * w[..., None]).sum() / (n * 2)
    if wall_weight > 0:
        loss = loss + wall_weight * (wall_penalty(x0_hat, batch["sdf"]) * (~m).float()).sum() / n
    return loss


def main(cfg) -> Path:
    from maze.data import check_keyframe_budgets, load_split
    from maze.planner import load_selector_from_run

    p2 = cfg.phase2
    torch.manual_seed(p2.optim.seed)
    data = load_split(cfg.data.root, "train", keyframes=True)
    budgets = check_keyframe_budgets(data, cfg.keyframes, cfg.data.root)  # a file of other budgets: refused
    mix = parse_policy_mix(p2.policy_mix, PHASE2_POLICIES)
    selector = load_selector_from_run(cfg.selector.run_dir, required=False) if "selector" in mix else None
    if "selector" in mix and selector is None:
        print(f"[maze.train_phase2] no selector checkpoint in {cfg.selector.run_dir!r}: dropping 'selector' from the mask mix")
        mix = parse_policy_mix({k: v for k, v in mix.items() if k != "selector"}, PHASE2_POLICIES)
    run_dir = Path(p2.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = Refiner(p2.model, data.T, data.G, len(budgets), p2.output)
    sig = level_sigmas(len(budgets), p2.sigma_max, p2.sigma_min)
    gen = torch.Generator().manual_seed(p2.optim.seed)
    counts = {k: 0 for k in mix}

    def loss_fn(model, step):
        rows = torch.randint(0, data.N, (p2.optim.batch_size,), generator=gen).numpy()
        batch = data.tensors(rows)
        cond = {k: batch[k] for k in ("occ", "sdf", "start", "goal")}
        pol = sample_policy(mix, gen)
        counts[pol] += 1
        masks = policy_masks(pol, len(rows), data.T, budgets, batch, gen, selector, cond)
        return phase2_loss(model, batch, masks, sig, p2.confidence, gen, p2.level_weight, p2.wall_weight), {}

    path = run_dir / "model.pt"
    extra = {"budgets": budgets, "sigmas": sig.tolist(), "sigma_max": p2.sigma_max, "sigma_min": p2.sigma_min,
             "confidence": p2.confidence, "config": to_dict(p2), "policy_mix": mix, "data_root": cfg.data.root}
    train_loop(model, loss_fn, p2.optim, path, extra, "phase2", generator=gen,
               on_start=lambda: save_config(cfg, run_dir))
    print(f"[maze.train_phase2] mask policies used {counts} -> {path}")
    return path


if __name__ == "__main__":
    from maze.common import run_cli

    torch.set_num_threads(1)
    run_cli("maze.train_phase2", lambda: main(load_maze_config(sys.argv[1:])))
