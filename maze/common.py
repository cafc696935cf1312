"""Shared pieces of the cond-only maze networks (D_phi, selector) and their small training loop.

- ``TimeQueryDecoder``: ``T`` time queries that read the maze condition. Query ``t`` starts as
  ``e_t + F(prior_t) + W_p pooled (+ W_l level)``, i.e. the encoder's *pooled* output (and the
  level scalar ``K_s / T`` for the selector) is a bias on every time query, and ``prior_t`` is
  the condition-only path prior of frame ``t`` (``maze.encoders.path_prior``: a position on the
  shortest grid path, its direction and the nearness of a turn), then ``depth`` pre-norm blocks of
  self-attention over time, cross-attention to the maze tokens (``MazeEncoder``) and an MLP
  (``nn.TransformerDecoderLayer``). METHOD.md section 6: without the pooled bias a selector
  learned a condition-blind prior.
- ``interp_error``: per-sample ``mean_t ||x_t - I(x, M)_t||^2`` (sum over the 2 coordinates),
  the interpolation error every diagnostic reports.
- ``fit``: AdamW + linear warm-up / cosine decay, grad clipping, periodic evaluation, metrics
  as JSON lines, atomic checkpoints (``interpdiff.io``) with the metadata that rebuilds the
  model, resume from ``<run_dir>/last.pt`` (model, optimizer, scheduler, step, RNG).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from interpdiff.interpolate import interpolate
from interpdiff.io import CheckpointError, load_checkpoint, save_checkpoint
from maze.config import NetConfig, TrainConfig
from maze.encoders import FourierFeatures


class TimeQueryDecoder(nn.Module):
    """``(tokens_B_N_D, pooled_B_D, prior_B_T_5, level_B | None) -> h_B_T_D`` (module doc)."""

    def __init__(self, T: int, d_model: int, heads: int, depth: int, level_cond: bool):
        super().__init__()
        self.T, self.level_cond = T, level_cond
        self.t_emb = nn.Parameter(torch.randn(T, d_model) * 0.02)
        self.t_ff = FourierFeatures(1, d_model, n_freq=6)
        self.cond_bias = nn.Linear(d_model, d_model)
        self.level_bias = FourierFeatures(1, d_model, n_freq=4) if level_cond else None
        self.prior_in = FourierFeatures(5, d_model, n_freq=5)
        layer = nn.TransformerDecoderLayer(d_model, heads, 4 * d_model, 0.0, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerDecoder(layer, depth)
        self.norm = nn.LayerNorm(d_model)
        self.register_buffer("t_norm", torch.linspace(0, 1, T)[:, None], persistent=False)

    def forward(self, tokens_B_N_D, pooled_B_D, prior_B_T_5, level_B=None):
        q = self.t_emb + self.t_ff(self.t_norm)  # (T, D)
        q = q[None] + self.cond_bias(pooled_B_D)[:, None] + self.prior_in(prior_B_T_5)  # (B, T, D)
        if self.level_cond:
            if level_B is None:
                raise ValueError("TimeQueryDecoder: a level-conditioned decoder needs level_B (K_s / T)")
            q = q + self.level_bias(level_B.float()[:, None])[:, None]
        return self.norm(self.blocks(q, tokens_B_N_D))  # (B, T, D)


def cond_inputs(batch: dict) -> tuple[torch.Tensor, ...]:
    return batch["occ"], batch["sdf"], batch["start"], batch["goal"]


def interp_error(x_B_T_D: torch.Tensor, mask_B_T: torch.Tensor) -> torch.Tensor:
    """Per-sample ``mean_t ||x_t - I(x, M)_t||^2`` (``[B]``)."""
    return ((interpolate(x_B_T_D, mask_B_T) - x_B_T_D) ** 2).sum(-1).mean(-1)


def net_meta(net: NetConfig) -> dict:
    return {"d_model": net.d_model, "enc_depth": net.enc_depth, "heads": net.heads, "depth": net.depth}


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warm-up for ``warmup`` steps, then cosine decay to 10% at ``steps``."""
    if step < tc.warmup:
        return (step + 1) / max(1, tc.warmup)
    p = (step - tc.warmup) / max(1, tc.steps - tc.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p)))


def load_kind(
    path,
    kind: str,
    build: Callable[[dict], nn.Module],
    trainer: str,
    required_meta=("kind", "sizes"),
    state_keys=("model",),
    map_location="cpu",
) -> tuple[nn.Module, dict]:
    """Rebuild a maze model from a checkpoint alone: check its ``kind``, ``build(meta)`` from the
    stored sizes, load the first of ``state_keys`` present in the state, return ``(model.eval(), meta)``.

    ``CheckpointError`` names the path when it is missing, not a checkpoint, of another kind
    (and which ``trainer`` writes the expected one), or when the weights do not fit the sizes.
    """
    ck = load_checkpoint(path, required_meta=required_meta, map_location=map_location)
    meta = ck["meta"]
    if meta["kind"] != kind:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {meta['kind']!r} model; expected {kind!r} (written by {trainer})")
    model = build(meta)
    key = next(k for k in state_keys if k in ck["state"])
    try:
        model.load_state_dict(ck["state"][key])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r}: weights do not fit the sizes in its metadata: {e}") from None
    return model.eval(), meta


def run_cli(prog: str, fn: Callable[[], Any]) -> Any:
    """Run an entry point's ``fn``; a config, checkpoint or data error (which names the key, file or
    value) ends the process with that one line instead of a traceback, as the video scripts do."""
    import sys

    from interpdiff.config import ConfigError
    from maze.data import MazeDataError

    try:
        return fn()
    except (ConfigError, CheckpointError, MazeDataError) as e:
        sys.exit(f"{prog}: error: {e}")


def fit(
    model: nn.Module,
    loss_fn: Callable[[torch.Generator], tuple[torch.Tensor, dict]],
    tc: TrainConfig,
    run_dir: str | Path,
    meta: dict,
    eval_fn: Callable[[], dict] | None = None,
    resume: bool = True,
    desc: str = "train",
    on_start: Callable[[], None] | None = None,
    sizes_not_compared: Sequence[str] = (),
) -> dict:
    """Train ``model`` for ``tc.steps`` steps of ``loss_fn(generator) -> (loss, logs)``.

    Writes ``<run_dir>/metrics.jsonl``, ``last.pt`` (resume state) and ``model.pt`` (weights +
    ``meta``; the file the consumers load). Returns the last evaluation. A ``last.pt`` of another
    model (``meta`` ``kind`` / ``sizes``) is refused naming both, before anything is written;
    ``on_start()`` (e.g. writing the run's config.yaml) runs once that check passed;
    ``sizes_not_compared``: ``sizes`` entries that are settings of use, not of training (the
    selector's decoding), which a rerun may change.
    """
    from tqdm import tqdm

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, tc))
    gen = torch.Generator().manual_seed(tc.seed)
    step = 0
    last = run_dir / "last.pt"
    if resume and last.is_file():
        ck = load_checkpoint(last, required_meta=["step"])
        def cmp(k, v):
            return {x: y for x, y in v.items() if x not in sizes_not_compared} if k == "sizes" and isinstance(v, dict) else v

        diff = [f"{k} = {ck['meta'].get(k)} in the file, {meta[k]} in this run" for k in ("kind", "sizes")
                if k in meta and cmp(k, ck["meta"].get(k)) != cmp(k, meta[k])]
        if diff:
            raise CheckpointError(f"[{desc}] {str(last)!r} is the resume state of another model ({'; '.join(diff)}). "
                                  f"Not overwriting it: use another run_dir, or delete {last.name} to retrain")
        model.load_state_dict(ck["state"]["model"])
        opt.load_state_dict(ck["state"]["opt"])
        sched.load_state_dict(ck["state"]["sched"])
        gen.set_state(ck["state"]["gen"])
        step = int(ck["meta"]["step"])
        print(f"[{desc}] resumed from {last} at step {step}")
    if on_start is not None:
        on_start()
    metrics_path = run_dir / "metrics.jsonl"
    evaluation: dict = {}
    t0 = time.time()
    # one-batch check before the loop: a broken loss fails here, not after a long run
    with torch.no_grad():
        l0, _ = loss_fn(torch.Generator().manual_seed(tc.seed + 1))
    if not torch.isfinite(l0):
        raise RuntimeError(f"[{desc}] first-batch loss is not finite ({float(l0)})")
    bar = tqdm(total=tc.steps, initial=step, desc=desc, mininterval=5.0)
    run_avg = None
    while step < tc.steps:
        model.train()
        loss, logs = loss_fn(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        sched.step()
        step += 1
        bar.update(1)
        lv = loss.item()
        run_avg = lv if run_avg is None else 0.98 * run_avg + 0.02 * lv
        if step % tc.log_every == 0 or step == tc.steps:
            rec = {"step": step, "loss": lv, "loss_avg": run_avg, "grad_norm": float(gn), "lr": sched.get_last_lr()[0],
                   "seconds": round(time.time() - t0, 1), **logs}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{run_avg:.4f}")
        if eval_fn is not None and (step % tc.eval_every == 0 or step == tc.steps):
            model.eval()
            with torch.no_grad():
                evaluation = eval_fn()
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": step, "eval": evaluation}) + "\n")
        if step % tc.eval_every == 0 or step == tc.steps:
            m = dict(meta, step=step)
            save_checkpoint(last, {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state()}, m)
            save_checkpoint(run_dir / "model.pt", {"model": model.state_dict()}, m)
    bar.close()
    if not evaluation and eval_fn is not None:  # resumed a finished run: evaluate only
        model.eval()
        with torch.no_grad():
            evaluation = eval_fn()
    return evaluation
