"""The maze prototype end to end on one config: data -> keyframes -> D_phi -> selector -> phase-1
-> phase-2 -> baseline -> evaluation -> report.

    python -m maze.demo --config configs/maze/small.yaml
    python -m maze.demo --config configs/maze/small.yaml demo.stages='[phase2,evaluate,report]' demo.resume=false

``--config X.yaml`` is merged with its model overlay ``X_model.yaml`` when that file exists
(``configs/maze/small.yaml`` + ``configs/maze/small_model.yaml``); more ``--config`` files and
``key=value`` overrides follow. With ``demo.resume`` (default) a stage whose output is complete
is skipped: the data and keyframe files exist, or a model checkpoint holds its configured
number of steps; once a stage runs, every later stage runs again. Stage times go to ``<eval.run_dir>/demo_times.json`` and into the report.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from interpdiff.io import atomic_write_text, load_checkpoint
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


def _ckpt_done(path: Path, steps: int) -> bool:
    if not path.is_file():
        return False
    try:
        return int(load_checkpoint(path)["meta"].get("step", -1)) >= steps
    except Exception:
        return False


def stage_done(cfg, stage: str) -> bool:
    root = Path(cfg.data.root)
    if stage == "generate":
        return all((root / f).is_file() for f in ("meta.json", "train.npz", "eval.npz"))
    if stage == "keyframes":
        return all((root / f"keyframes_{s}.npz").is_file() for s in ("train", "eval"))
    if stage == "dphi":
        return _ckpt_done(Path(cfg.dphi.run_dir) / "model.pt", cfg.dphi.train.steps)
    if stage == "selector":
        return _ckpt_done(Path(cfg.selector.run_dir) / "model.pt", cfg.selector.train.steps)
    if stage in ("phase1", "phase2", "baseline"):
        sec = getattr(cfg, stage)
        return _ckpt_done(Path(sec.run_dir) / "model.pt", sec.optim.steps)
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
        raise ValueError(f"demo.stages: unknown {bad}; expected a subset of {list(STAGES)}")
    if "phase1" in cfg.demo.stages and cfg.phase1.feat_diffs == "dphi" and "dphi" not in cfg.demo.stages:
        if not (Path(cfg.dphi.run_dir) / "model.pt").is_file():
            raise FileNotFoundError(f"phase1 uses D_phi features but {cfg.dphi.run_dir}/model.pt is missing and 'dphi' is not a demo stage")
    run_dir = Path(cfg.eval.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    times_path = run_dir / "demo_times.json"
    times = json.loads(times_path.read_text()) if (cfg.demo.resume and times_path.is_file()) else {}
    t_all = time.time()
    ran = False  # once a stage runs, every later stage runs too (its inputs changed)
    for stage in STAGES:
        if stage not in cfg.demo.stages or stage == "report":
            continue
        if cfg.demo.resume and not ran and stage_done(cfg, stage):
            print(f"[maze.demo] {stage}: done already (demo.resume=true), skipping")
            continue
        print(f"[maze.demo] === {stage} ===", flush=True)
        t0 = time.time()
        run_stage(cfg, stage)
        ran = True
        times[stage] = time.time() - t0
        atomic_write_text(times_path, json.dumps(times, indent=1))
    times["total (this invocation)"] = time.time() - t_all
    atomic_write_text(times_path, json.dumps(times, indent=1))
    from maze.report import write_report

    path = write_report(cfg, stage_times=times) if "report" in cfg.demo.stages else run_dir / "report.md"
    print(f"[maze.demo] finished in {times['total (this invocation)'] / 60:.1f} min -> {path}")
    return path


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1:])
