"""Teacher segment costs -> video D_phi -> per-clip DP keyframe masks (``train_dphi_teacher.py``).

Three stages (``stages``), each writing into ``run_dir`` atomically and skipped when its output
exists (delete the file to redo it):

1. ``costs``: Wan-teacher segment costs (``interpdiff.video.dphi.teacher_costs``) of the first
   ``num_clips`` clips of ``data.shards`` -> ``teacher_costs.pt`` ``{key: record}``; written
   every ``save_every`` clips, so an interrupted run keeps what it computed and resumes after it.
2. ``dphi``: regression of ``log(cost + floor)`` on random (pair, time) entries of the records,
   ``holdout`` of the clips held out -> ``dphi.pt``, ``metrics.csv``, and ``summary.json`` with the
   held-out Spearman correlation and, where the held-out records hold every pair and time, the
   ratio "teacher cost of the DP keyframes chosen with D_phi's costs / teacher cost of the DP
   keyframes chosen with the teacher's costs" at each level budget (1.0 = as good as the
   teacher); partial records get no ratio (``dp_ratio_skipped_partial`` counts them). The
   summary also says which grid times D_phi was trained on and what share of the DP cost's
   weight lies at times outside them (``time_coverage``: extrapolated in t).
3. ``masks``: for every clip of ``masks.shards`` (default ``data.shards``, one pass, or the first
   ``masks.max_clips``), nested per-level DP masks (``selection.dp_select_levels``) on D_phi's
   cost matrix (``masks.source=dphi``; a ``dphi.pt`` loaded from ``run_dir`` must have been
   trained on this config's cost grid ``costs.t_steps/s_min/s_max/gamma``, else a ``ConfigError``
   names the differing keys, ``check_dphi_grid``) or on the teacher's full costs (``masks.source=teacher``,
   needs ``costs.pairs_per_clip=0`` and every time) -> ``dp_masks.pt`` ``{key: bool [S, T]}``
   (``phase2.dp_mask_file``, ``labels.file`` of the selector) and ``dp_index.pt``
   ``{key: bool [T]}`` at ``masks.phase1_k`` (``phase1.dp_index_file``).

Budgets: ``masks.k_min`` / ``masks.n_levels`` (or ``masks.budgets``), the rule of ``phase2`` in
the video configs, so the files match ``train_phase2.py``'s levels.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from interpdiff.config import ConfigError, save_config
from interpdiff.io import atomic_torch_save, atomic_write_text
from interpdiff.masks import level_budgets
from interpdiff.selection import dp_select, dp_select_levels
from interpdiff.video import wan
from interpdiff.video.data import LatentDataConfig, LatentLoader, resolve_shards
from interpdiff.video.dphi import (
    DphiSizes,
    TeacherCostConfig,
    VideoDphi,
    dp_cost_from_teacher,
    fit_batch,
    load_dphi,
    save_dphi,
    teacher_costs,
)

log = logging.getLogger("interpdiff.dphi")
STAGES = ("costs", "dphi", "masks")


@dataclass
class TeacherConfig:
    path: str = "tiny"  # diffusers folder or hub id of the frozen full-sequence Wan2.1 (tiny: toy preset)
    dtype: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU
    attention: str = "sdpa"
    seed: int = 0  # tiny preset weights


@dataclass
class DphiTrainConfig:
    steps: int = 2000
    lr: float = 1.0e-3
    weight_decay: float = 0.0
    clips_per_batch: int = 8
    entries_per_clip: int = 64
    holdout: float = 0.2  # fraction of clips held out for the summary
    log_every: int = 100


@dataclass
class MasksConfig:
    source: str = "dphi"  # dphi | teacher
    shards: str = ""  # clips to write masks for ("" = data.shards)
    max_clips: int = 0  # 0 = one whole pass
    k_min: int = 6
    n_levels: int = 4
    budgets: list[int] = field(default_factory=list)
    phase1_k: int = 0  # budget of dp_index.pt (0 = the level-0 budget)
    batch: int = 16


@dataclass
class DphiTeacherConfig:
    run_dir: str = "runs/dphi_teacher"
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    device: str = "auto"  # auto = cuda when available
    seed: int = 0
    num_clips: int = 64  # clips whose teacher costs are computed
    save_every: int = 8
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: LatentDataConfig = field(default_factory=lambda: LatentDataConfig(
        shards="", num_workers=0, resampled=False, shuffle_buffer=0, shuffle_shards=False, partial_batches=True))
    costs: TeacherCostConfig = field(default_factory=TeacherCostConfig)
    net: DphiSizes = field(default_factory=DphiSizes)
    train: DphiTrainConfig = field(default_factory=DphiTrainConfig)
    masks: MasksConfig = field(default_factory=MasksConfig)

    def validate(self) -> None:
        bad = [s for s in self.stages if s not in STAGES]
        if bad or not self.stages:
            raise ConfigError(f"stages={list(self.stages)}: expected a non-empty subset of {list(STAGES)}")
        if self.masks.source not in ("dphi", "teacher"):
            raise ConfigError(f"masks.source={self.masks.source!r} is not one of ['dphi', 'teacher']")
        if self.num_clips < 1 or self.save_every < 1:
            raise ConfigError(f"num_clips and save_every must be >= 1, got {self.num_clips}, {self.save_every}")
        if not 0.0 <= self.train.holdout < 1.0:
            raise ConfigError(f"train.holdout must lie in [0, 1), got {self.train.holdout}")
        for name, sub in (("costs", self.costs), ("net", self.net), ("data", self.data)):
            try:
                sub.validate()
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None
        need = []
        if "costs" in self.stages or ("masks" in self.stages and not self.masks.shards):
            need.append(("data.shards", self.data.shards))
        if "masks" in self.stages and self.masks.shards:
            need.append(("masks.shards", self.masks.shards))
        for name, spec in need:
            if not spec or spec == "???":
                raise ConfigError(f"{name} is not set (a shard pattern such as 'data/shard_*.tar'); stages "
                                  f"{list(self.stages)} read clips")
            try:
                resolve_shards(spec)
            except FileNotFoundError as e:
                raise ConfigError(f"{name}: {e}") from None

    def budgets(self, T: int) -> list[int]:
        m = self.masks
        try:
            return level_budgets(T, m.k_min, m.n_levels, m.budgets, "masks.budgets")
        except ValueError as e:
            raise ConfigError(str(e)) from None


def _device(cfg: DphiTeacherConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def _clips(data: LatentDataConfig, limit: int, skip: set | None = None):
    """``(key, latent [C, T, H, W], embedding [L, D])`` of one pass over the shards."""
    d = dataclasses.replace(data, batch_size=1, resampled=False)
    n = 0
    for b in LatentLoader(d):
        for k in range(len(b.keys)):
            key = b.keys[k]
            if skip and key in skip:
                continue
            yield key, b.lat_B_C_T_H_W[k], b.emb_B_L_D[k]
            n += 1
            if limit and n >= limit:
                return


def trim_padding(emb_L_D: torch.Tensor) -> torch.Tensor:
    """The embedding without its trailing zero rows (UMT5 outputs are zero-padded to 512 tokens; a
    prompt uses a few dozen). ``VideoDphi.pooled`` skips zero rows, so the pooled text is the same,
    and ``teacher_costs.pt`` stores ~4 MiB less per clip (it is rewritten every ``save_every``)."""
    nz = (emb_L_D.abs().amax(-1) > 0).nonzero()
    n = int(nz.max()) + 1 if nz.numel() else 1
    return emb_L_D[:n].clone()


def pad_stack(embs: list[torch.Tensor]) -> torch.Tensor:
    """``[B, L_max, D]`` from embeddings of different lengths, zero-padded (see ``trim_padding``)."""
    L = max(e.shape[0] for e in embs)
    return torch.stack([torch.nn.functional.pad(e, (0, 0, 0, L - e.shape[0])) for e in embs])


COSTS_META = "teacher_costs.json"


def cost_settings(cfg: DphiTeacherConfig, dtype: torch.dtype) -> dict:
    """What a teacher record's values depend on: the teacher (weights, dtype), the cost grid (records
    store grid *indices*: another ``t_steps`` would reinterpret every time), the pair sampling and
    the noise seed. Saved next to ``teacher_costs.pt``, compared before records are reused."""
    costs = {k: v for k, v in dataclasses.asdict(cfg.costs).items() if k != "seg_batch"}  # batching only
    return json.loads(json.dumps({"teacher.path": cfg.teacher.path, "teacher.dtype": str(dtype).replace("torch.", ""),
                                  "teacher.seed": cfg.teacher.seed, "seed": cfg.seed,
                                  **{f"costs.{k}": v for k, v in costs.items()}}))


def stage_costs(cfg: DphiTeacherConfig, run: Path, dev: torch.device) -> dict:
    out = run / "teacher_costs.pt"
    meta = run / COSTS_META
    dtype = wan.to_dtype(cfg.teacher.dtype) if cfg.teacher.dtype != "auto" else (
        torch.bfloat16 if dev.type == "cuda" else torch.float32)
    settings = cost_settings(cfg, dtype)
    records: dict = torch.load(out, weights_only=False) if out.is_file() else {}
    if records:
        if meta.is_file():
            saved = json.loads(meta.read_text())
            diff = [f"{k}={settings.get(k)!r} (records: {saved.get(k)!r})" for k in sorted(set(saved) | set(settings))
                    if saved.get(k) != settings.get(k)]
            if diff:
                raise ConfigError(f"{out}: its {len(records)} clips were computed with other settings: {', '.join(diff)}. "
                                  f"Restore them, or move {out.name} and {meta.name} away to recompute the costs")
        else:
            log.warning("costs: %s has no %s (written by an older version): reusing its %d clips without checking "
                        "the teacher and cost grid they were computed with", out, meta.name, len(records))
    if len(records) >= cfg.num_clips:
        log.info("costs: %s holds %d clips, nothing to do", out, len(records))
        return records
    atomic_write_text(meta, json.dumps(settings, indent=1))
    tr = wan.load_transformer(cfg.teacher.path, dtype=dtype, seed=cfg.teacher.seed).to(dev).eval()
    wan.set_attention_backend(tr, cfg.teacher.attention)
    t0, done = time.perf_counter(), len(records)
    for key, lat, emb in _clips(cfg.data, cfg.num_clips - done, skip=set(records)):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + len(records))
        rec = teacher_costs(tr, lat, emb, cfg.costs, g)
        rec["key"] = key
        rec["emb"] = trim_padding(emb).to(torch.bfloat16)  # the text embedding D_phi is trained on
        records[key] = rec
        if len(records) % cfg.save_every == 0:
            atomic_torch_save(records, out)
            log.info("costs: %d / %d clips (%.1f s)", len(records), cfg.num_clips, time.perf_counter() - t0)
    atomic_torch_save(records, out)
    if len(records) < cfg.num_clips:
        log.warning("costs: the shards held %d clips, fewer than num_clips=%d", len(records), cfg.num_clips)
    return records


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks with ties sharing their mean rank (costs of equal segments tie exactly)."""
    xs, order = x.double().sort()
    _, inv, counts = torch.unique_consecutive(xs, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() + 1) / 2
    r = torch.empty_like(xs)
    r[order] = mean_rank[inv]
    return r


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def time_coverage(records: list[dict], cost_cfg: TeacherCostConfig) -> dict:
    """Which grid times the teacher records (D_phi's training data) hold, against the grid the DP cost
    sums over (``VideoDphi.cost_matrix``: every ``t_k`` with weight ``w_k``). Grid times below the
    smallest or above the largest trained time are *extrapolated* by D_phi; ``weight_extrapolated`` is
    their share ``sum w_k / sum w`` of the DP cost's weight (0 when the trained times span the grid).
    With the flow grid the weights ``clip(SNR, s_min, s_max)`` are largest at small t, so leaving out
    the first indices weighs most (``configs/video/dphi_teacher_wan1.3b.yaml``)."""
    t, w, _ = cost_cfg.grid()
    trained = sorted({int(k) for r in records for k in r["times"].tolist()})
    lo, hi = float(t[trained[0]]), float(t[trained[-1]])
    extra = [k for k in range(len(t)) if float(t[k]) < lo or float(t[k]) > hi]
    frac = float(w[extra].sum() / w.sum()) if extra else 0.0
    return {"times_trained": trained, "times_extrapolated": extra, "weight_extrapolated": frac}


def stage_dphi(cfg: DphiTeacherConfig, run: Path, records: dict, dev: torch.device) -> tuple[VideoDphi, dict]:
    keys = sorted(records)
    if len(keys) < 2:
        raise ConfigError(f"dphi: {len(keys)} clip(s) with teacher costs; need at least 2 (raise num_clips)")
    g = torch.Generator().manual_seed(cfg.seed)
    perm = [keys[i] for i in torch.randperm(len(keys), generator=g).tolist()]
    n_hold = min(len(keys) - 1, max(1, round(cfg.train.holdout * len(keys)))) if cfg.train.holdout > 0 else 0
    hold, fit = perm[:n_hold], perm[n_hold:]
    all_cost = torch.cat([records[k]["cost"].flatten() for k in fit])
    floor = float(max(all_cost.mean().item(), 1e-12) * 1e-3)
    torch.manual_seed(cfg.seed)
    model = VideoDphi(cfg.net, floor=floor).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.train.steps))
    grid_t, _, _ = cfg.costs.grid()
    rows = []
    for step in range(1, cfg.train.steps + 1):
        pick = torch.randint(0, len(fit), (min(cfg.train.clips_per_batch, len(fit)),), generator=g).tolist()
        recs = [records[fit[i]] for i in pick]
        _, i, j, t, y = fit_batch(recs, grid_t, cfg.train.entries_per_clip, g)
        emb = pad_stack([r["emb"] for r in recs]).to(dev)
        T = int(recs[0]["T"])
        pred = model(model.pooled(emb), T, i.to(dev), j.to(dev), t.to(dev))
        loss = (pred - (y.to(dev) + floor).log()).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            rows.append({"step": step, "loss": loss.item(), "lr": sched.get_last_lr()[0]})
            log.info("dphi step %d loss %.4f", step, rows[-1]["loss"])
    model.eval()
    summary = {"clips_fit": len(fit), "clips_holdout": len(hold), "floor": floor, "final_loss": rows[-1]["loss"],
               **time_coverage([records[k] for k in fit], cfg.costs)}
    if summary["times_extrapolated"]:
        log.warning("dphi: trained on grid times %s of %d; the DP cost extrapolates D_phi to times %s, %.0f%% of its "
                    "weight (costs.times)", summary["times_trained"], cfg.costs.t_steps,
                    summary["times_extrapolated"], 100 * summary["weight_extrapolated"])
    if hold:
        summary.update(evaluate_dphi(model, [records[k] for k in hold], cfg, dev))
    save_dphi(run / "dphi.pt", model.cpu(), cfg.costs, {"holdout": hold, "summary": summary})
    model.to(dev)
    with open(run / "metrics.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "loss", "lr"])
        w.writeheader()
        w.writerows(rows)
    (run / "metrics.csv.tmp").replace(run / "metrics.csv")
    atomic_write_text(run / "summary.json", json.dumps(summary, indent=1))
    return model, summary


@torch.no_grad()
def evaluate_dphi(model: VideoDphi, recs: list[dict], cfg: DphiTeacherConfig, dev: torch.device) -> dict:
    """Held-out Spearman of predicted vs teacher entries; DP quality ratio on full records."""
    grid_t, _, _ = cfg.costs.grid()
    preds, trues, ratios, n_partial = [], [], {}, 0
    for r in recs:
        S, P = r["cost"].shape
        i = r["pairs"][:, 0].float().repeat(S)[None]
        j = r["pairs"][:, 1].float().repeat(S)[None]
        t = grid_t[r["times"]].float().repeat_interleave(P)[None]
        emb = r["emb"][None].to(dev)
        p = model.predict_cost(model.pooled(emb), int(r["T"]), i.to(dev), j.to(dev), t.to(dev))[0].cpu()
        preds.append(p)
        trues.append(r["cost"].flatten())
        try:
            c_true = dp_cost_from_teacher(r, cfg.costs)
        except ValueError:
            n_partial += 1
            continue  # a partial record (some pairs or times): no DP comparison
        T = int(r["T"])
        c_pred = model.cost_matrix(emb, T, cfg.costs)[0].cpu()
        for K in cfg.budgets(T)[:-1]:
            idx_p, _ = dp_select(c_pred[None], K, backend="torch")
            idx_t, tot_t = dp_select(c_true[None], K, backend="torch")
            tot_p = c_true[idx_p[0, :-1], idx_p[0, 1:]].sum()
            ratios.setdefault(K, []).append(float(tot_p / tot_t.clamp_min(1e-30)))
    out = {"holdout_spearman": _spearman(torch.cat(preds), torch.cat(trues)), "dp_ratio_skipped_partial": n_partial}
    if n_partial:
        log.warning("dphi: %d of %d held-out records hold only some pairs/times (costs.pairs_per_clip, costs.times): "
                    "no DP cost ratio for them; only the Spearman of the computed entries checks D_phi",
                    n_partial, len(recs))
    if ratios:
        out["dp_cost_ratio_dphi_over_teacher"] = {str(k): sum(v) / len(v) for k, v in ratios.items()}
    return out


GRID_KEYS = ("t_steps", "s_min", "s_max", "gamma")  # the fields of TeacherCostConfig that define the DP cost


def check_dphi_grid(ckpt: TeacherCostConfig, cur: TeacherCostConfig, path: Path | str) -> None:
    """Refuse to build D_phi cost matrices on another grid than the one it was trained on.

    ``VideoDphi.cost_matrix`` sums its predictions over the flow-time grid of ``costs`` with the
    weights ``clip(SNR, s_min, s_max)^gamma``, so ``t_steps``, ``s_min``, ``s_max`` and ``gamma``
    define the DP cost; a checkpoint trained on one grid and queried on another would give masks
    of another cost, silently. ``costs.times``, ``pairs_per_clip``, ``max_gap`` and ``seg_batch``
    only choose which teacher entries were computed and do not enter the matrix, so they may differ.
    ``ConfigError`` names every differing key with the checkpoint's value and the config's."""
    diff = [k for k in GRID_KEYS if float(getattr(ckpt, k)) != float(getattr(cur, k))]
    if diff:
        both = ", ".join(f"costs.{k}={getattr(cur, k)!r} (checkpoint: {getattr(ckpt, k)!r})" for k in diff)
        raise ConfigError(f"masks: the D_phi checkpoint {str(path)!r} was trained on another cost grid than this "
                          f"config's: {both}; set these keys to the checkpoint's values (its grid: "
                          f"{ {k: getattr(ckpt, k) for k in GRID_KEYS} }) or retrain D_phi with stages=[dphi,masks]")


def stage_masks(cfg: DphiTeacherConfig, run: Path, records: dict, model: VideoDphi | None, dev: torch.device) -> dict:
    spec = cfg.masks.shards or cfg.data.shards
    data = dataclasses.replace(cfg.data, shards=spec)
    masks, index, n_teacher_missing = {}, {}, 0
    for key, lat, emb in _clips(data, cfg.masks.max_clips):
        T = int(lat.shape[1])
        budgets = cfg.budgets(T)
        if cfg.masks.source == "teacher":
            if key not in records:
                n_teacher_missing += 1
                continue
            cost = dp_cost_from_teacher(records[key], cfg.costs)[None]
        else:
            cost = model.cost_matrix(emb[None].to(dev), T, cfg.costs).cpu()
        lv = dp_select_levels(cost, budgets, backend="torch")[0]  # [S, T] nested
        masks[key] = lv.clone()
        k1 = cfg.masks.phase1_k or budgets[0]
        if k1 in budgets:
            index[key] = lv[budgets.index(k1)].clone()
        else:
            idx, _ = dp_select(cost, k1, backend="torch")
            m = torch.zeros(T, dtype=torch.bool)
            m[idx[0]] = True
            index[key] = m
    if not masks:
        raise ConfigError(f"masks: no clip got a mask (masks.source={cfg.masks.source!r}, shards {spec!r}; "
                          f"{n_teacher_missing} clips without teacher costs)")
    atomic_torch_save(masks, run / "dp_masks.pt")
    atomic_torch_save(index, run / "dp_index.pt")
    return {"clips": len(masks), "skipped_without_teacher_costs": n_teacher_missing}


def run(cfg: DphiTeacherConfig) -> dict:
    cfg.validate()
    run_dir = Path(cfg.run_dir)
    dev = _device(cfg)
    model = None
    if "masks" in cfg.stages and cfg.masks.source == "dphi" and "dphi" not in cfg.stages:
        # the D_phi of an earlier run: load it and check its cost grid before anything is written or run
        model, ck_costs = load_dphi(run_dir / "dphi.pt")
        check_dphi_grid(ck_costs, cfg.costs, run_dir / "dphi.pt")
        model.to(dev)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir)
    result: dict = {}
    records: dict = {}
    if "costs" in cfg.stages:
        records = stage_costs(cfg, run_dir, dev)
    elif (run_dir / "teacher_costs.pt").is_file():
        records = torch.load(run_dir / "teacher_costs.pt", weights_only=False)
    if "dphi" in cfg.stages:
        if not records:
            raise ConfigError(f"stage dphi: no teacher costs in {str(run_dir / 'teacher_costs.pt')!r}; run stage costs")
        model, result["dphi"] = stage_dphi(cfg, run_dir, records, dev)
    if "masks" in cfg.stages:
        result["masks"] = stage_masks(cfg, run_dir, records, model, dev)
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=1, default=str))
    print(format_result(result, run_dir), flush=True)
    return result


def format_result(result: dict, run_dir: Path) -> str:
    """The numbers a run is judged by, for the console (all of them are in ``result.json``)."""
    lines = [f"[train_dphi_teacher] -> {run_dir}/result.json"]
    d = result.get("dphi") or {}
    if d:
        sp = d.get("holdout_spearman")
        lines.append(f"  D_phi: {d.get('clips_fit')} clips fit, {d.get('clips_holdout')} held out; final loss "
                     f"{d.get('final_loss', float('nan')):.4g}; held-out Spearman "
                     + (f"{sp:.3f}" if isinstance(sp, (int, float)) else "n/a (no held-out clip)"))
        ratios = d.get("dp_cost_ratio_dphi_over_teacher")
        if ratios:
            lines.append("  teacher cost of D_phi's DP keyframes / the teacher's own DP, by K: "
                         + ", ".join(f"K={k}: {v:.3f}" for k, v in ratios.items()))
    m = result.get("masks")
    if isinstance(m, dict) and m:
        lines.append("  masks: " + ", ".join(f"{k}={v}" for k, v in m.items() if not isinstance(v, (dict, list)))[:300])
    return "\n".join(lines)

