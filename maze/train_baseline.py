"""Train the full-sequence baseline (Diffuser-style diffusion over all T points).

    python -m maze.train_baseline --config configs/maze/small.yaml --config configs/maze/small_model.yaml

Same data, same kind of backbone (``maze.models.TrajBackbone``) and the same flow-matching
objective as phase-1, but over every frame: ``z0 = 2 (x - 0.5)`` ``[B, T, 2]``,
``z_sigma = (1 - sigma) z0 + sigma eps``, target ``eps - z0``; start/goal are inpainted at frames 0
and T-1 (clean, ``known = 1``, no loss) as Diffuser conditions on its first/last state.
Sampling (``maze.sampler.sample_full``) takes ``baseline.sample_steps`` Euler steps, one network
evaluation each. ``baseline.wall_weight > 0`` adds the same wall penalty as
``phase1.wall_weight`` (``maze.models.flow_wall_penalty``), so the two can be compared alike.

Writes ``<baseline.run_dir>/model.pt``, ``config.yaml`` and ``model_metrics.csv``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from interpdiff.config import save_config, to_dict
from interpdiff.flow import flow_match_target, flow_match_xt, sample_sigmas
from maze.config_model import load_maze_config
from maze.models import FullSequenceDenoiser, flow_wall_penalty, to_z, train_loop
from maze.sampler import endpoints_known


def baseline_loss(model, batch, cfg_b, generator):
    z0 = to_z(batch["pos"])
    B, T, _ = z0.shape
    known = endpoints_known(torch.arange(T).expand(B, T), T)
    sigma = sample_sigmas(B, cfg_b.density, cfg_b.train_shift, generator=generator)
    eps = torch.randn(z0.shape, generator=generator)
    zt = torch.where(known[..., None], z0, flow_match_xt(z0, eps, sigma))
    cond = {k: batch[k] for k in ("occ", "sdf", "start", "goal")}
    v = model(zt, sigma, known, cond)
    w = (~known).float()[..., None]
    loss = ((v - flow_match_target(z0, eps)) ** 2 * w).sum() / (w.sum() * 2)
    if cfg_b.wall_weight > 0:
        loss = loss + cfg_b.wall_weight * flow_wall_penalty(zt, v, sigma, ~known, batch["sdf"])
    return loss


def main(cfg) -> Path:
    from maze.data import load_split

    b = cfg.baseline
    torch.manual_seed(b.optim.seed)
    data = load_split(cfg.data.root, "train", keyframes=False)
    run_dir = Path(b.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    model = FullSequenceDenoiser(b.model, data.T, data.G)
    if b.model.path_prior:
        from maze.encoders import mean_arc_fraction

        model.arc_frac.copy_(mean_arc_fraction(data.pos))
    gen = torch.Generator().manual_seed(b.optim.seed)

    def loss_fn(model, step):
        rows = torch.randint(0, data.N, (b.optim.batch_size,), generator=gen).numpy()
        return baseline_loss(model, data.tensors(rows), b, gen), {}

    path = run_dir / "model.pt"
    train_loop(model, loss_fn, b.optim, path, {"config": to_dict(b), "data_root": cfg.data.root}, "baseline", generator=gen,
               on_start=lambda: save_config(cfg, run_dir))
    print(f"[maze.train_baseline] -> {path}")
    return path


if __name__ == "__main__":
    from maze.common import run_cli

    torch.set_num_threads(1)
    run_cli("maze.train_baseline", lambda: main(load_maze_config(sys.argv[1:])))
