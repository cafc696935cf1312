"""The maze prototype end to end on one config: data -> keyframes -> D_phi -> selector -> phase-1
-> phase-2 -> baseline -> evaluation -> report.

    python -m maze.demo --config configs/maze/small.yaml
    python -m maze.demo --config configs/maze/small.yaml demo.stages='[phase2,evaluate,report]' demo.resume=false

``--config X.yaml`` is merged with its model overlay ``X_model.yaml`` when that file exists
(``configs/maze/small.yaml`` + ``configs/maze/small_model.yaml``); more ``--config`` files and
``key=value`` overrides follow. With ``demo.resume`` (default) a stage whose output is complete
is skipped: the data and keyframe files exist and were made with the current ``data`` /
``keyframes`` settings, or a model checkpoint was trained with the current settings (its section;
D_phi and the selector also ``data`` and ``keyframes``; step counts, paths and threads aside) and
holds its configured number of steps. A checkpoint with fewer steps resumes. Once a stage runs,
the stages that read its output (``DEPENDS``) run again, and a model stage that runs again for
that reason, with ``demo.resume=false`` or after a settings change trains from scratch: its
previous outputs are moved to ``<run_dir>/previous/`` first. Stage times go to ``<eval.run_dir>/demo_times.json`` and into the report.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from interpdiff.config import ConfigError
from interpdiff.io import CheckpointError, atomic_write_text, load_checkpoint
from maze.config_model import load_maze_config

STAGES = ("generate", "keyframes", "dphi", "selector", "phase1", "phase2", "baseline", "evaluate", "report")


def with_overlay(argv: list[str]) -> list[str]:
    """Insert ``X_model.yaml`` after the first ``--config X.yaml`` when it exists and is not given."""
    args = list(argv)
    for i, a in enumerate(args):
        if a in ("--config", "-c") and i + 1 < len(args):
            p = Path(args[i + 1])
            ov = p.with_name(p.stem + "_model" + p.suffix)
            if ov.is_file() and str(ov) not in args:
                args[i + 2 : i + 2] = ["--config", str(ov)]
            break
    return args


MODEL_STAGES = ("dphi", "selector", "phase1", "phase2", "baseline")
# what each stage reads: a stage runs again (from scratch) when one of these ran in this invocation
DEPENDS = {
    "generate": (),
    "keyframes": ("generate",),
    "dphi": ("generate", "keyframes"),
    "selector": ("generate", "keyframes"),
    "phase1": ("generate", "keyframes", "dphi", "selector"),  # D_phi features, selector policy
    "phase2": ("generate", "keyframes", "selector"),  # dp_precomputed masks, selector policy
    "baseline": ("generate",),
    "evaluate": ("generate", "keyframes", "dphi", "selector", "phase1", "phase2", "baseline"),
}
# files a model stage writes in its run_dir (train_loop: model.pt + model_metrics.csv; fit: last.pt, model.pt,
# metrics.jsonl, eval.json); moved to <run_dir>/previous/ before a stage is trained again from scratch
STAGE_OUTPUTS = ("model.pt", "model_metrics.csv", "last.pt", "metrics.jsonl", "eval.json")
# settings that may change without making a stored result stale: more steps resume it, paths
# move, and the sampling-time settings (read by maze.evaluate, not by training)
IGNORED = {"root", "run_dir", "steps", "threads", "device", "log_every", "ckpt_every", "eval_every",
           "sample_steps", "sample_shift", "sample_noise", "noise_scale", "pos_clip"}
IGNORED_KEYS = {"keyframes.batch_size", "keyframes.backend"}  # how the DP runs, not what it finds


def config_diff(saved: Any, current: Any, prefix: str) -> list[str]:
    """Dotted keys (``prefix`` + key) whose values differ between a stored config dict and the
    current one; ``IGNORED`` leaf names and ``IGNORED_KEYS`` skipped."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current)):
            if k in IGNORED or f"{prefix}{k}" in IGNORED_KEYS:
                continue
            out += config_diff(saved.get(k), current.get(k), f"{prefix}{k}.")
        return out
    return [] if saved == current else [prefix[:-1]]


# settings a finished model stage can take without retraining: its stage runs again in place (fit
# re-evaluates a finished run; the selector re-saves with its new decoding)
IN_PLACE = {"dphi": {"eval_samples"}, "selector": {"eval_samples", "nms_radius_scale", "max_gap_scale", "gap_bonus"}}


def _stored_config(stage: str, meta: dict, cfg) -> list[str]:
    """What of ``cfg`` the stored ``meta`` of a stage's model disagrees with (its section, and for
    D_phi / the selector, which store the whole config, also the data and keyframe settings)."""
    from interpdiff.config import to_dict

    saved = meta.get("config")
    if not isinstance(saved, dict):
        return ["config (not recorded)"]
    if stage in ("dphi", "selector"):
        return [k for sec in (stage, "data", "keyframes") for k in config_diff(saved.get(sec), to_dict(getattr(cfg, sec)), f"{sec}.")]
    return config_diff(saved, to_dict(getattr(cfg, stage)), f"{stage}.")


def model_state(cfg, stage: str) -> tuple[str, list[str]]:
    """``(state, changed keys)`` of a model stage's checkpoint: ``absent``, ``stale`` (trained with
    other settings than ``cfg``), ``partial`` (fewer steps than configured), ``rerun`` (finished,
    but an ``IN_PLACE`` setting changed: run the stage again without retraining) or ``done``."""
    sec = getattr(cfg, stage)
    path = Path(sec.run_dir) / "model.pt"
    if not path.is_file():
        return "absent", []
    try:
        meta = load_checkpoint(path)["meta"]
    except Exception as e:  # unreadable: retrain (the file is moved aside, not deleted)
        return "stale", [f"unreadable ({type(e).__name__})"]
    changed = _stored_config(stage, meta, cfg)
    in_place = IN_PLACE.get(stage, set())
    if changed and not all(k.startswith(f"{stage}.") and k[len(stage) + 1:] in in_place for k in changed):
        return "stale", changed
    steps = sec.train.steps if stage in ("dphi", "selector") else sec.optim.steps
    if int(meta.get("step", -1)) < steps:
        return "partial", changed
    return ("rerun" if changed else "done"), changed


def data_state(cfg) -> tuple[str, list[str]]:
    from interpdiff.config import to_dict

    root = Path(cfg.data.root)
    if not all((root / f).is_file() for f in ("meta.json", "train.npz", "eval.npz")):
        return "absent", []
    try:
        saved = json.loads((root / "meta.json").read_text()).get("generation")
    except ValueError:
        return "stale", ["meta.json (unreadable)"]
    changed = config_diff(saved, to_dict(cfg.data), "data.")
    return ("stale" if changed else "done"), changed


def keyframes_state(cfg) -> tuple[str, list[str]]:
    import numpy as np

    from interpdiff.config import to_dict

    paths = [Path(cfg.data.root) / f"keyframes_{s}.npz" for s in ("train", "eval")]
    if not all(p.is_file() for p in paths):
        return "absent", []
    changed: list[str] = []
    for p in paths:
        try:
            with np.load(p, allow_pickle=False) as z:
                saved = json.loads(str(z["config_json"])) if "config_json" in z.files else None
        except (OSError, ValueError) as e:
            return "stale", [f"{p.name} unreadable ({type(e).__name__})"]
        if saved is None:  # written before the settings were recorded: judge by what the file holds
            try:
                with np.load(p, allow_pickle=False) as z:
                    budgets, source = [int(b) for b in z["budgets"]], str(z["feat_source"])
            except (OSError, ValueError, KeyError) as e:
                return "stale", [f"{p.name} unreadable ({type(e).__name__})"]
            kc = cfg.keyframes
            want_source = f"dphi:{kc.dphi_ckpt}" if kc.dphi_ckpt else "true_cost"
            try:
                want = kc.resolved_budgets(cfg.data.T)
            except ValueError:
                want = None
            if budgets != want or source != want_source:
                changed += [k for k in ("keyframes.budgets", "keyframes.feat_source") if k not in changed]
            continue
        changed += [k for k in config_diff(saved, to_dict(cfg.keyframes), "keyframes.") if k not in changed]
    return ("stale" if changed else "done"), changed


def move_aside(run_dir: Path) -> list[str]:
    """Move a model stage's outputs to ``<run_dir>/previous/`` (replacing an older ``previous``),
    so the stage trains from scratch and the last result is still on disk."""
    run_dir = Path(run_dir)
    found = [n for n in STAGE_OUTPUTS if (run_dir / n).exists()]
    if not found:
        return []
    prev = run_dir / "previous"
    if prev.exists():
        shutil.rmtree(prev)
    prev.mkdir(parents=True)
    for n in found:
        os.replace(run_dir / n, prev / n)
    return found


def stage_done(cfg, stage: str) -> bool:
    root = Path(cfg.data.root)
    if stage == "generate":
        return data_state(cfg)[0] == "done"
    if stage == "keyframes":
        return keyframes_state(cfg)[0] == "done"
    if stage in MODEL_STAGES:
        return model_state(cfg, stage)[0] == "done"
    if stage == "evaluate":
        return (Path(cfg.eval.run_dir) / "eval.json").is_file()
    return False


def run_stage(cfg, stage: str):
    if stage == "generate":
        from maze.generate import main
    elif stage == "keyframes":
        from maze.prepare_keyframes import main
    elif stage == "dphi":
        from maze.train_dphi import main
    elif stage == "selector":
        from maze.train_selector import main
    elif stage == "phase1":
        from maze.train_phase1 import main
    elif stage == "phase2":
        from maze.train_phase2 import main
    elif stage == "baseline":
        from maze.train_baseline import main
    elif stage == "evaluate":
        from maze.evaluate import main
    else:
        raise ValueError(stage)
    return main(cfg)


def main(argv) -> Path:
    cfg = load_maze_config(with_overlay(argv))
    bad = [s for s in cfg.demo.stages if s not in STAGES]
    if bad:
        raise ConfigError(f"demo.stages: unknown {bad}; expected a subset of {list(STAGES)}")
    if "phase1" in cfg.demo.stages and cfg.phase1.feat_diffs == "dphi" and "dphi" not in cfg.demo.stages:
        if not (Path(cfg.dphi.run_dir) / "model.pt").is_file():
            raise CheckpointError(f"phase1 uses D_phi features but {cfg.dphi.run_dir}/model.pt is missing and 'dphi' is not a "
                                  "demo stage (add it to demo.stages, or set phase1.feat_diffs=none)")
    run_dir = Path(cfg.eval.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    times_path = run_dir / "demo_times.json"
    times = json.loads(times_path.read_text()) if (cfg.demo.resume and times_path.is_file()) else {}
    t_all = time.time()
    ran_stages: set[str] = set()  # a stage whose inputs ran again in this invocation runs again too
    # ... and in an earlier invocation that stopped before reaching it (a kill, an error): kept on disk
    pending_path = run_dir / "demo_pending.json"
    pending: set[str] = set(json.loads(pending_path.read_text())) if (cfg.demo.resume and pending_path.is_file()) else set()

    def save_pending():
        atomic_write_text(pending_path, json.dumps(sorted(pending)))

    for stage in STAGES:
        if stage not in cfg.demo.stages or stage == "report":
            continue
        ran = bool(ran_stages & set(DEPENDS[stage])) or stage in pending
        if cfg.demo.resume and not ran and stage_done(cfg, stage):
            print(f"[maze.demo] {stage}: done already (demo.resume=true), skipping")
            continue
        if stage in ("generate", "keyframes"):
            state, changed = (data_state if stage == "generate" else keyframes_state)(cfg)
            if state == "stale":
                print(f"[maze.demo] {stage}: the files in {cfg.data.root} were made with other settings "
                      f"({', '.join(changed[:6])}): making them again")
        if stage in MODEL_STAGES:
            run_dir_s = Path(getattr(cfg, stage).run_dir)
            state, changed = model_state(cfg, stage)
            # resume only a partial run of the same settings whose inputs did not change
            fresh = state == "stale" or (state != "absent" and (ran or not cfg.demo.resume))
            if state == "rerun" and not fresh:
                print(f"[maze.demo] {stage}: finished; {', '.join(changed)} changed: running it again without "
                      "retraining")
            if fresh:
                why = (f"trained with other settings ({', '.join(changed[:6])})" if state == "stale" else
                       f"its inputs ({', '.join(sorted(ran_stages & set(DEPENDS[stage])) or ['in an earlier run'])}) "
                       "were made again" if ran else "demo.resume=false")
                moved = move_aside(run_dir_s)
                print(f"[maze.demo] {stage}: {why}: training from scratch; the previous {', '.join(moved)} moved "
                      f"to {run_dir_s / 'previous'}")
        changes_outputs = not (stage in MODEL_STAGES and state == "rerun" and not fresh
                               and all(k.endswith(".eval_samples") for k in changed))  # a re-evaluation changes no model
        if changes_outputs:  # what reads this stage's output must run again, even if this invocation stops
            pending |= {s for s in STAGES if stage in DEPENDS.get(s, ())}
            save_pending()
        print(f"[maze.demo] === {stage} ===", flush=True)
        t0 = time.time()
        run_stage(cfg, stage)
        if changes_outputs:
            ran_stages.add(stage)
        if stage in pending:
            pending.discard(stage)
            save_pending()
        times[stage] = time.time() - t0
        atomic_write_text(times_path, json.dumps(times, indent=1))
    times["total (this invocation)"] = time.time() - t_all
    atomic_write_text(times_path, json.dumps(times, indent=1))
    from maze.report import write_report

    path = write_report(cfg, stage_times=times) if "report" in cfg.demo.stages else run_dir / "report.md"
    done = f"-> {path}" if "report" in cfg.demo.stages else "(no report stage: the report was not written)"
    print(f"[maze.demo] finished in {times['total (this invocation)'] / 60:.1f} min {done}")
    return path


if __name__ == "__main__":
    from maze.common import run_cli

    torch.set_num_threads(1)
    run_cli("maze.demo", lambda: main(sys.argv[1:]))
