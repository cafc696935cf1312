"""Train the video keyframe selector (``interpdiff.video.selector``) on latent shards.

    # CPU, tiny sizes, synthetic shards (labels: online DP on each clip's own latents):
    python -m interpdiff.video.make_shards out_dir=data/tiny num_samples=16 samples_per_shard=4 \
        latent_shape=[16,9,4,6] embed_shape=[16,32]
    python -m interpdiff.video.train_selector --config configs/video/selector_tiny_cpu.yaml \
        data.shards='data/tiny/shard_*.tar'

    # Wan2.1 shards (UMT5 width 4096, 21 latent frames, the budgets of wan1.3b_phase2.yaml), labels
    # from a DP file {key: bool [S, T]} (e.g. DP on the Wan-teacher cost), one GPU:
    accelerate launch --config_file accelerate_configs/1xgpu.yaml -m interpdiff.video.train_selector \
        --config configs/video/selector_tiny_cpu.yaml net.text_dim=4096 net.d_model=256 net.depth=2 \
        levels.k_min=6 levels.n_levels=4 data.latent_shape=[16,21,60,104] data.embed_shape=[512,4096] \
        labels.source=dp_precomputed labels.file=data/wan_dp_masks.pt train.max_steps=20000 \
        train.run_dir=runs/selector_wan data.shards='/data/wan_synth/shard_{000000..000999}.tar'

    # then: phase1.index_policy=...,selector:0.2 phase1.selector_ckpt=runs/selector_tiny/selector.pt
    #       sample.py keyframe_source=selector selector_ckpt=runs/selector_tiny/selector.pt

Each optimizer step draws ONE level ``s`` for the whole batch (uniform over the levels with
``2 < K_s < T``, seeded by the step, so every rank and micro-batch of the step agrees) and trains
the level-``s`` logits (level scalar ``K_s / T``) against the level-``s`` DP mask of every sample
(``selector.selector_loss``). Labels (``labels.source``):

- ``dp``: per-level nested DP masks (``masks.dp_nested_masks``) on the clip's own interpolation
  cost (``selection.segment_costs``: the ground truth as teacher, the same as the ``dp`` index
  policy of ``train_phase1.py`` / ``train_phase2.py``); cheap at T <= 21.
- ``dp_precomputed``: a torch file ``{sample key: bool [S, T]}`` of nested per-level DP masks
  (the format of ``phase2.dp_mask_file``, e.g. DP on the Wan-teacher cost); a sample whose key
  is missing or whose stored mask does not match the level budgets is left out of the loss and
  counted (``label_missing`` in the metrics), wherever it sits in the batch (the level budget
  ``K_s`` comes from the level rule, not from a row); a micro-batch with no labelled sample
  contributes ``0 * logits.sum()`` and is counted (``batch_unlabelled``).

The run uses the shared Accelerate loop (``interpdiff.training.train``: AdamW, warmup + cosine,
EMA, atomic rotating checkpoints, ``--resume latest|PATH``, ``metrics.csv``/``metrics.jsonl``,
``config.yaml``). Every checkpoint's ``trainable/selector.pt`` (and ``trainable_ema/selector.pt``)
is a complete selector file. At the end the last checkpoint's selector (EMA weights when
``train.ema_decay > 0``) is copied to ``run_dir/selector.pt`` and evaluated on ``eval_batches``
batches of the stream (``eval.json``): per level, overlap of the decoded masks with the DP
labels ``(|M_sel & M_dp| - 2) / (K - 2)``, mean absolute index error of the sorted keyframes,
the same for uniform masks, gap statistics (mean of the per-sample largest gap: selector, DP,
uniform), and ``distinct_level0``, the fraction of distinct level-0 keyframe sets (a
condition-blind selector gives one set for every prompt).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from interpdiff.config import ConfigError, parse_cli
from interpdiff.io import CheckpointError, atomic_write_bytes, atomic_write_text, load_checkpoint
from interpdiff.masks import dp_nested_masks, gap_stats, mask_to_indices, uniform_nested_masks
from interpdiff.selection import segment_costs
from interpdiff.training import (
    TrainLoopConfig,
    TrainSpec,
    list_checkpoints,
    resolve_resume,
    resume_flag_to_override,
    sample_generator,
    train,
)
from interpdiff.video.data import LatentDataConfig
from interpdiff.video.selector import (
    LOSSES,
    SELECTOR_FILE,
    LevelRule,
    SelectorSizes,
    VideoSelector,
    load_selector,
    save_selector,
    select_nested,
    selector_loss,
)

LABEL_SOURCES = ("dp", "dp_precomputed")


@dataclass
class LabelConfig:
    source: str = "dp"  # dp (online DP on the clip's own latents) | dp_precomputed (file)
    file: str = ""  # dp_precomputed: torch file {sample key: bool [S, T]} of nested per-level DP masks


@dataclass
class SelectorTrainConfig:
    data: LatentDataConfig = field(default_factory=LatentDataConfig)
    train: TrainLoopConfig = field(
        default_factory=lambda: TrainLoopConfig(run_dir="runs/selector", gradient_checkpointing=False))
    net: SelectorSizes = field(default_factory=SelectorSizes)
    levels: LevelRule = field(default_factory=LevelRule)  # the phase-2 budget rule the selector serves
    labels: LabelConfig = field(default_factory=LabelConfig)
    loss: str = "bce"  # bce | softmax (selector.selector_loss)
    eval_batches: int = 4  # batches of the stream (epoch 0) for validation and eval.json; 0 = none

    def validate(self) -> None:
        self.train.validate()
        try:
            self.data.validate()
            self.net.validate()
            self.levels.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.labels.source not in LABEL_SOURCES:
            raise ConfigError(f"labels.source={self.labels.source!r} is not one of {list(LABEL_SOURCES)}")
        if self.labels.source == "dp_precomputed" and not self.labels.file:
            raise ConfigError("labels.source=dp_precomputed needs labels.file (a torch file {sample key: bool [S, T]})")
        if self.loss not in LOSSES:
            raise ConfigError(f"loss={self.loss!r} is not one of {list(LOSSES)}")
        if self.eval_batches < 0:
            raise ConfigError(f"eval_batches must be >= 0, got {self.eval_batches}")


class DPLabels:
    """Per-sample nested DP masks ``[B, S, T]`` (bool, CPU) and which samples have one (module doc)."""

    def __init__(self, cfg: LabelConfig):
        self.source = cfg.source
        self.missing = 0
        self.table = None
        if cfg.source == "dp_precomputed":
            p = Path(cfg.file)
            if not p.is_file():
                raise ConfigError(f"labels.file={cfg.file!r} does not exist (expected a torch file "
                                  "{sample key: bool [S, T]} of nested per-level DP masks)")
            try:
                self.table = torch.load(p, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ConfigError(f"labels.file={cfg.file!r} could not be read: {type(e).__name__}: {e}") from None
            if not isinstance(self.table, dict) or not self.table:
                raise ConfigError(f"labels.file={cfg.file!r}: expected a non-empty dict {{sample key: bool [S, T]}}")

    def __call__(self, batch: dict, budgets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        lat = batch["lat"]
        B, _, T = lat.shape[:3]
        if self.source == "dp":
            cost = segment_costs(lat.float(), time_dim=2).cpu()  # (B, T, T) on the latents' device
            return dp_nested_masks(cost, budgets, backend="torch"), torch.ones(B, dtype=torch.bool)
        want = torch.tensor(budgets)
        masks = torch.zeros(B, len(budgets), T, dtype=torch.bool)
        have = torch.zeros(B, dtype=torch.bool)
        for b, key in enumerate(batch["keys"]):
            m = self.table.get(str(key))
            ok = (isinstance(m, torch.Tensor) and m.dtype == torch.bool and tuple(m.shape) == (len(budgets), T)
                  and bool((m.sum(-1) == want).all()) and bool((m[:-1] <= m[1:]).all()) and bool(m[:, [0, -1]].all()))
            if ok:
                masks[b], have[b] = m, True
            else:
                self.missing += 1
        return masks, have


def trainable_levels(budgets: list[int], T: int) -> list[int]:
    """Levels with something to learn: ``2 < K_s < T``."""
    lv = [s for s, k in enumerate(budgets) if 2 < k < T]
    if not lv:
        raise ConfigError(f"levels: the budgets {budgets} for T={T} latent frames have no level with 2 < K < T")
    return lv


def level_overlap(logits_B_T: torch.Tensor, mask_B_T: torch.Tensor, K: int,
                  have_B: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample ``|top-(K-2) interior by logits & M| / (K - 2)`` (one level, no nesting) at the
    level budget ``K`` (``2 < K <= T``). Unlabelled rows (``have_B`` False) are skipped: their entry is 0."""
    B, T = mask_B_T.shape
    K = int(K)
    if K <= 2 or K > T:
        raise ValueError(f"level_overlap: level budget K={K} needs 2 < K <= T={T}")
    out = torch.zeros(B, device=logits_B_T.device)
    rows = torch.arange(B) if have_B is None else have_B.detach().cpu().nonzero().flatten()
    if rows.numel() == 0:
        return out
    rows = rows.to(logits_B_T.device)
    lg = logits_B_T.detach().float()[rows].clone()
    lg[:, 0] = lg[:, -1] = -torch.inf
    top = lg.topk(K - 2, dim=1).indices
    out[rows] = mask_B_T.to(logits_B_T.device)[rows].gather(1, top).float().mean(1)
    return out


def make_loss(cfg: SelectorTrainConfig, labels: DPLabels):
    """Loss of one step (module docstring). A batch with no labelled sample (``dp_precomputed``)
    gives ``0 * logits.sum()`` (no update, same graph on every rank) and is counted
    (``batch_unlabelled`` in the metrics, next to ``label_missing``)."""
    seed = cfg.train.seed
    unlabelled = [0]

    def loss_fn(model, batch, step):
        emb = batch["emb"]
        T = int(batch["lat"].shape[2])
        budgets = cfg.levels.budgets_for(T)
        lv = trainable_levels(budgets, T)
        g = sample_generator(seed, step, "selector-level")
        s = lv[int(torch.randint(len(lv), (1,), generator=g))]
        K = budgets[s]
        masks, have = labels(batch, budgets)
        m_B_T = masks[:, s].to(emb.device)
        level_B = torch.full((emb.shape[0],), K / T, device=emb.device)
        logits = model(emb, T, level_B)
        loss = selector_loss(logits, m_B_T, cfg.loss, have, K=K)
        if not bool(have.any()):
            unlabelled[0] += 1
        w = have.float().to(emb.device)
        overlap = (level_overlap(logits, m_B_T, K, have) * w).sum() / w.sum().clamp_min(1.0)
        return loss, {"level": K / T, "overlap": overlap.detach(), "label_missing": float(labels.missing),
                      "batch_unlabelled": float(unlabelled[0])}

    return loss_fn


# --- evaluation -------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_selector(sel: VideoSelector, batches: list[dict], labels: DPLabels) -> dict:
    """Per level: overlap / index MAE of the decoded nested masks against the DP labels, for the
    selector and for uniform masks; mean of the per-sample largest gap (selector, DP, uniform);
    ``distinct_level0`` of the selector and of the DP labels (module docstring)."""
    dev = next(sel.parameters()).device
    acc: dict[tuple[int, int], dict[str, list[float]]] = {}
    level0_sel, level0_dp = set(), set()
    n = 0
    for batch in batches:
        lat, emb = batch["lat"], batch["emb"].to(dev)
        T = int(lat.shape[2])
        budgets = sel.levels.budgets_for(T)
        dp, have = labels(batch, budgets)
        if not bool(have.any()):
            continue
        dp = dp[have]
        pred = sel.nested_masks(emb[have.to(dev)], T, budgets).cpu()
        uni = uniform_nested_masks(pred.shape[0], T, budgets)
        n += pred.shape[0]
        level0_sel.update(tuple(r.nonzero().flatten().tolist()) for r in pred[:, 0])
        level0_dp.update(tuple(r.nonzero().flatten().tolist()) for r in dp[:, 0])
        for s, K in enumerate(budgets):
            if K >= T:
                continue
            d = acc.setdefault((T, K), {})
            for name, m in (("selector", pred[:, s]), ("uniform", uni[:, s])):
                inter = (m & dp[:, s]).sum(1).float()
                d.setdefault(f"overlap_{name}", []).extend(((inter - 2) / max(K - 2, 1)).tolist())
                mae = (mask_to_indices(m) - mask_to_indices(dp[:, s])).abs().float().mean(1)
                d.setdefault(f"index_mae_{name}", []).extend(mae.tolist())
            for name, m in (("selector", pred[:, s]), ("dp", dp[:, s]), ("uniform", uni[:, s])):
                d.setdefault(f"mean_max_gap_{name}", []).append(gap_stats(m[:, None])[0].mean_max_gap * m.shape[0])
    levels = []
    for (T, K), d in sorted(acc.items()):
        row = {"T": T, "K": K, "n": len(d["overlap_selector"])}
        for k, v in d.items():
            row[k] = sum(v) / row["n"] if k.startswith("mean_max_gap") else sum(v) / len(v)
        levels.append(row)
    return {"samples": n, "levels": levels, "distinct_level0": len(level0_sel) / max(n, 1),
            "distinct_level0_dp": len(level0_dp) / max(n, 1), "label_missing": labels.missing}


# --- run --------------------------------------------------------------------------------------


def build_selector(cfg: SelectorTrainConfig) -> VideoSelector:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        levels = dataclasses.replace(cfg.levels, budgets=list(cfg.levels.budgets))
        return VideoSelector(dataclasses.replace(cfg.net), levels)


def _trainer_meta(cfg: SelectorTrainConfig) -> dict:
    return {"trainer": "interpdiff.video.train_selector", "labels": dataclasses.asdict(cfg.labels), "loss": cfg.loss}


def make_selector_spec(cfg: SelectorTrainConfig) -> tuple[TrainSpec, DPLabels, callable]:
    """``TrainSpec`` for ``interpdiff.training.train`` (cheap checks first: shards, labels file)."""
    from interpdiff.video.objectives import make_batches

    batches, loader = make_batches(cfg)  # resolves data.shards now (a clear ConfigError when missing)
    labels = DPLabels(cfg.labels)
    model = build_selector(cfg)
    held: dict = {}

    def eval_batches() -> list[dict]:
        if "b" not in held:
            held["b"] = []
            for b in batches(0, 0):
                if len(held["b"]) >= cfg.eval_batches:
                    break
                held["b"].append(b)
        return held["b"]

    def save_trainable(m, folder: Path):
        save_selector(Path(folder) / SELECTOR_FILE, m, _trainer_meta(cfg))

    def load_trainable(m, folder: Path):
        path = Path(folder) / SELECTOR_FILE
        ck = load_checkpoint(path, required_meta=("kind", "sizes"))
        try:
            m.load_state_dict(ck["state"]["model"])
        except (RuntimeError, KeyError) as e:
            raise CheckpointError(f"checkpoint {str(path)!r}: weights do not fit this selector: {e}") from None

    def validate(m, step: int, folder: Path, is_main: bool):
        if not is_main or cfg.eval_batches == 0:
            return
        res = evaluate_selector(m, eval_batches(), labels)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **res}) + "\n")

    spec = TrainSpec(
        model=model,
        loss_fn=make_loss(cfg, labels),
        batches=batches,
        save_trainable=save_trainable,
        load_trainable=load_trainable,
        validate=validate,
        batch_size=lambda b: int(b["lat"].shape[0]),
        meta={"kind": "video-selector", "sizes": dataclasses.asdict(cfg.net), "levels": dataclasses.asdict(cfg.levels),
              **_trainer_meta(cfg)},
        resume_keys=("kind", "sizes", "levels"),
        data_settings=loader.settings,
    )
    return spec, labels, eval_batches


def export_final(run_dir: Path) -> Path:
    """Copy the newest checkpoint's selector (EMA weights when present) to ``run_dir/selector.pt``."""
    cks = list_checkpoints(run_dir / "checkpoints")
    if not cks:
        raise CheckpointError(f"{str(run_dir / 'checkpoints')!r} holds no checkpoint to export")
    for sub in ("trainable_ema", "trainable"):
        src = cks[-1] / sub / SELECTOR_FILE
        if src.is_file():
            return atomic_write_bytes(run_dir / SELECTOR_FILE, src.read_bytes())
    raise CheckpointError(f"checkpoint {str(cks[-1])!r} holds no {SELECTOR_FILE}")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(SelectorTrainConfig, resume_flag_to_override(sys.argv[1:] if argv is None else argv))
    resolve_resume(cfg.train.resume, cfg.train.run_dir)  # a bad resume path fails before anything is built
    spec, labels, eval_batches = make_selector_spec(cfg)
    res = train(cfg.train, spec, full_config=cfg)
    out = {"losses": res.losses, "run_dir": str(res.run_dir)}
    if res.accelerator is None or res.accelerator.is_main_process:
        path = export_final(Path(cfg.train.run_dir))
        out["selector"] = str(path)
        if cfg.eval_batches > 0:
            ev = evaluate_selector(load_selector(path), eval_batches(), labels)
            atomic_write_text(Path(cfg.train.run_dir) / "eval.json", json.dumps(ev, indent=1))
            out["eval"] = ev
            for row in ev["levels"]:
                print(f"T={row['T']} K={row['K']}: overlap selector {row['overlap_selector']:.3f} vs uniform "
                      f"{row['overlap_uniform']:.3f}, index MAE {row['index_mae_selector']:.2f} vs "
                      f"{row['index_mae_uniform']:.2f}")
            print(f"distinct level-0 sets: selector {ev['distinct_level0']:.2f}, DP {ev['distinct_level0_dp']:.2f}")
        print(f"selector written to {path}")
    return out


if __name__ == "__main__":
    from interpdiff.training import finish_distributed
    from interpdiff.video.data import TooManySkipsError

    try:
        main()
        finish_distributed()  # on success only: a failed rank exits and the launcher stops the others
    except (ConfigError, CheckpointError, TooManySkipsError) as e:
        sys.exit(f"train_selector: error: {e}")
