"""Public planning API of the maze prototype.

    from maze import Planner
    planner = Planner.from_checkpoint("runs/maze/small")
    plans = planner.plan("medium", start=(-2.5, 1.0), goal=(2.5, -2.0), n=4, method="two_phase")
    plans.shape  # (4, T, 2): positions in the PointMaze world frame (gymnasium-robotics)

``run_dir`` is a run root with one folder per stage, each holding a ``model.pt``::

    <run_dir>/phase1/model.pt     maze.train_phase1     (needed by two_phase, interp_only)
    <run_dir>/phase2/model.pt     maze.train_phase2     (needed by two_phase)
    <run_dir>/baseline/model.pt   maze.train_baseline   (needed by full)
    <run_dir>/dphi/model.pt       maze.train_dphi       (kp_feat costs of phase-1, if it used them)
    <run_dir>/selector/model.pt   maze.train_selector   (keyframe indices; uniform without it)

Every model is rebuilt from its checkpoint's metadata (sizes, T, G, budgets); sampling settings
(phase-1 steps, level sigmas, anchor confidence, noise mode) come from the metadata too and can
be changed on the instance. Methods:

- ``two_phase``: selector (or uniform) masks -> phase-1 keyframes -> interpolation -> phase-2
  levels (TACoS), ``maze.sampler.two_phase``;
- ``interp_only``: the same without phase-2 (keyframes + linear interpolation);
- ``full``: the full-sequence baseline;
- step-distilled (``maze.distill``; students loaded with ``Planner.load_students``):
  ``full_distilled`` (the few-step consistency baseline), ``two_phase_distilled`` (phase-1 student
  keyframes -> interpolation -> the 1-2 step phase-2 student), ``interp_distilled`` (without phase 2).
  Masks and ``kp_feat`` are built as for ``two_phase``; steps and times come from the students'
  checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from interpdiff.io import CheckpointError
from maze.models import load_model
from maze.sampler import dphi_pair_cost, keyframe_features, policy_masks, sample_full, two_phase

METHODS = ("two_phase", "full", "interp_only", "full_distilled", "two_phase_distilled", "interp_distilled")
STUDENTS_OF = {"full_distilled": ("full",), "two_phase_distilled": ("phase1", "phase2"), "interp_distilled": ("phase1",)}
MODEL_FILE = "model.pt"


def _ckpt(run_dir, what: str, trainer: str) -> Path:
    p = Path(run_dir) / MODEL_FILE
    if not p.is_file():
        raise CheckpointError(
            f"{what} checkpoint {str(p)!r} does not exist (expected the {MODEL_FILE} written by `python -m {trainer}`)"
        )
    return p


def load_dphi_from_run(run_dir):
    """D_phi from ``<run_dir>/model.pt`` (``maze.train_dphi``); a clear error when missing."""
    from maze.dphi import load_dphi

    return load_dphi(_ckpt(run_dir, "D_phi", "maze.train_dphi"))


class SelectorFn:
    """Wraps the part-1 selector as ``selector(cond, budgets) -> nested masks [B, S, T]``.

    Decoding (top-k per level, or NMS when the selector was trained with ``nms_radius_scale``)
    is the selector's own ``nested_masks``; the budgets must be the selector's.
    """

    def __init__(self, model):
        self.model = model
        self.budgets = list(model.budgets)

    @torch.no_grad()
    def __call__(self, cond: dict, budgets) -> torch.Tensor:
        if list(budgets) != self.budgets:
            raise ValueError(f"selector budgets {self.budgets} differ from the requested {list(budgets)}")
        return self.model.nested_masks(cond["occ"], cond["sdf"], cond["start"], cond["goal"])


def load_selector_from_run(run_dir, required: bool = True):
    """The selector of ``<run_dir>/model.pt`` as a ``SelectorFn``; ``None`` if absent and not required."""
    p = Path(run_dir) / MODEL_FILE
    if not p.is_file() and not required:
        return None
    from maze.selector import load_selector

    return SelectorFn(load_selector(_ckpt(run_dir, "selector", "maze.train_selector")))


@dataclass
class SampleSettings:
    """Sampling knobs (defaults from the checkpoints' stored configs)."""

    phase1_steps: int = 8
    phase1_shift: float = 1.0
    baseline_steps: int = 20
    baseline_shift: float = 1.0
    sigma_max: float = 0.02
    sigma_min: float = 0.002
    confidence: str = "mask"
    noise: str = "none"
    noise_scale: float = 1.0
    pos_clip: bool = True
    index_source: str = "selector"  # or "uniform"; falls back to uniform without a selector
    extra: dict = field(default_factory=dict)


class Planner:
    def __init__(self, phase1=None, refiner=None, baseline=None, dphi=None, selector=None, budgets=None,
                 settings: SampleSettings | None = None, feat_diffs: str = "dphi", run_dir: str | None = None):
        models = [m for m in (phase1, refiner, baseline) if m is not None]
        if not models:
            raise ValueError("Planner: needs at least one of phase1, refiner, baseline")
        self.phase1, self.refiner, self.baseline = phase1, refiner, baseline
        self.dphi, self.selector = dphi, selector
        self.T = models[0].T
        self.G = models[0].backbone.G
        for m in models:
            if m.T != self.T or m.backbone.G != self.G:
                raise ValueError(f"Planner: models disagree on T/G ({m.kind}: T={m.T}, G={m.backbone.G}; expected {self.T}, {self.G})")
        self.budgets = list(budgets) if budgets is not None else None
        self.settings = settings or SampleSettings()
        self.feat_diffs = feat_diffs
        self.run_dir = run_dir
        self.students: dict = {}  # distill target -> (model, meta), ``load_students``

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, run_dir, require=("phase1", "phase2"), paths: dict | None = None) -> "Planner":
        """Load every stage found under ``run_dir`` (layout in the module docstring).

        ``require``: stages that must exist (a ``CheckpointError`` names the missing file).
        ``paths``: per-stage folders overriding ``<run_dir>/<stage>``.
        """
        root = Path(run_dir)
        if not root.is_dir():
            raise CheckpointError(f"run folder {str(root)!r} does not exist (expected a folder with phase1/, phase2/, baseline/ ... model.pt)")
        dirs = {s: Path((paths or {}).get(s, root / s)) for s in ("phase1", "phase2", "baseline", "dphi", "selector")}
        trainers = {"phase1": "maze.train_phase1", "phase2": "maze.train_phase2", "baseline": "maze.train_baseline"}
        loaded, metas = {}, {}
        for stage in ("phase1", "phase2", "baseline"):
            f = dirs[stage] / MODEL_FILE
            if stage in require or f.is_file():
                loaded[stage], metas[stage] = load_model(_ckpt(dirs[stage], stage, trainers[stage]), stage)
        st = SampleSettings()
        budgets = None
        feat_diffs = "none"
        if "phase1" in metas:
            c = metas["phase1"].get("config", {})
            st.phase1_steps = int(c.get("sample_steps", st.phase1_steps))
            st.phase1_shift = float(c.get("sample_shift", st.phase1_shift))
            budgets = metas["phase1"]["budgets"]
            feat_diffs = metas["phase1"].get("feat_diffs", "none")
        if "phase2" in metas:
            m = metas["phase2"]
            if budgets is not None and list(m["budgets"]) != list(budgets):
                raise CheckpointError(f"phase-2 budgets {m['budgets']} differ from phase-1's {budgets} ({dirs['phase2']})")
            budgets = m["budgets"]
            st.sigma_max, st.sigma_min, st.confidence = float(m["sigma_max"]), float(m["sigma_min"]), m["confidence"]
            c = m.get("config", {})
            st.noise = c.get("sample_noise", st.noise)
            st.noise_scale = float(c.get("noise_scale", st.noise_scale))
            st.pos_clip = bool(c.get("pos_clip", st.pos_clip))
        if "baseline" in metas:
            c = metas["baseline"].get("config", {})
            st.baseline_steps = int(c.get("sample_steps", st.baseline_steps))
            st.baseline_shift = float(c.get("sample_shift", st.baseline_shift))
        dphi = load_dphi_from_run(dirs["dphi"]) if ("phase1" in loaded and feat_diffs == "dphi") else None
        selector = load_selector_from_run(dirs["selector"], required=False) if budgets is not None else None
        return cls(loaded.get("phase1"), loaded.get("phase2"), loaded.get("baseline"), dphi, selector, budgets, st,
                   feat_diffs, str(root))

    def load_students(self, paths: dict) -> None:
        """Load distilled students ``{target: run folder or model.pt}`` (``maze.distill.load_student``;
        a missing path is a ``CheckpointError`` naming it); their T, G and budgets must match."""
        from maze.distill import load_student

        for target, path in paths.items():
            model, meta = load_student(path, target)
            if model.T != self.T or model.backbone.G != self.G:
                raise CheckpointError(f"distilled {target} student {str(path)!r}: T={model.T}, G={model.backbone.G}; "
                                      f"the planner has T={self.T}, G={self.G}")
            if target != "full" and self.budgets is not None and list(meta.get("budgets", [])) != list(self.budgets):
                raise CheckpointError(f"distilled {target} student {str(path)!r}: budgets {meta.get('budgets')} differ "
                                      f"from the planner's {self.budgets}")
            self.students[target] = (model, meta)

    def _student(self, method: str, target: str):
        if target not in self.students:
            raise CheckpointError(f"Planner: method {method!r} needs the distilled {target} student "
                                  f"(`python -m maze.distill distill.target={target}`, then Planner.load_students)")
        return self.students[target]

    @torch.no_grad()
    def sample_distilled(self, cond: dict, method: str, masks=None, generator=None) -> dict:
        """Plans of the step-distilled methods (module doc), normalised frame."""
        from interpdiff.interpolate import interpolate
        from interpdiff.masks import mask_to_indices
        from maze.distill import (consistency_sample_full, consistency_sample_keyframes, phase2_student_refine,
                                  student_times)
        from maze.sampler import gather_keyframes, scatter_keyframes

        if method == "full_distilled":
            model, meta = self._student(method, "full")
            return {"plan": consistency_sample_full(model, cond, student_times(meta), generator)}
        p1, m1 = self._student(method, "phase1")
        if masks is None:
            masks = self.masks_for(cond, generator=generator)
        m0 = masks[:, 0]
        idx = mask_to_indices(m0)
        feat = gather_keyframes(self.kp_feat(cond, m0), idx)
        kp = consistency_sample_keyframes(p1, cond, idx, feat, student_times(m1), generator)
        interp = interpolate(scatter_keyframes(kp, idx, self.T), m0, time_dim=1)
        out = {"plan": interp, "masks": masks, "keyframes": kp, "interp": interp}
        if method == "two_phase_distilled":
            p2, m2 = self._student(method, "phase2")
            d = m2["distill"]
            out["plan"] = phase2_student_refine(p2, interp, masks, cond, d["levels"], d["confidence"], d["pos_clip"])
        return out

    # ------------------------------------------------------------------ batched sampling (normalised frame)
    def masks_for(self, cond: dict, index_source: str | None = None, generator=None) -> torch.Tensor:
        src = index_source or self.settings.index_source
        if self.budgets is None:
            raise ValueError("Planner: no keyframe budgets (phase-1/phase-2 checkpoints are missing)")
        B = cond["start"].shape[0]
        if src == "selector" and self.selector is not None:
            return policy_masks("selector", B, self.T, self.budgets, selector=self.selector, cond=cond)
        if src not in ("selector", "uniform"):
            raise ValueError(f"Planner: index_source={src!r} is not 'selector' or 'uniform'")
        return policy_masks("uniform", B, self.T, self.budgets, cond=cond)

    def kp_feat(self, cond: dict, mask0_B_T: torch.Tensor) -> torch.Tensor:
        pc = dphi_pair_cost(self.dphi, cond) if (self.feat_diffs == "dphi" and self.dphi is not None) else None
        if self.feat_diffs == "dphi" and self.dphi is None:
            raise CheckpointError("Planner: phase-1 was trained with D_phi features but no D_phi checkpoint was loaded")
        return keyframe_features(mask0_B_T, pc)

    @torch.no_grad()
    def sample(self, cond: dict, method: str = "two_phase", masks=None, oracle_x0=None, generator=None) -> dict:
        """Batched plans in the normalised frame: ``{"plan": [B,T,2], ...}`` (+ masks, keyframes, interp)."""
        st = self.settings
        if method not in METHODS:
            raise ValueError(f"Planner.plan: method={method!r} is not one of {METHODS}")
        if method in STUDENTS_OF:
            if oracle_x0 is not None:
                raise ValueError(f"Planner.sample: oracle_x0 is not supported by method {method!r}")
            return self.sample_distilled(cond, method, masks=masks, generator=generator)
        if method == "full":
            if self.baseline is None:
                raise CheckpointError(f"Planner: method 'full' needs the baseline checkpoint ({self.run_dir}/baseline/{MODEL_FILE})")
            return {"plan": sample_full(self.baseline, cond, st.baseline_steps, st.baseline_shift, generator)}
        if self.phase1 is None and oracle_x0 is None:
            raise CheckpointError(f"Planner: method {method!r} needs the phase-1 checkpoint ({self.run_dir}/phase1/{MODEL_FILE})")
        refiner = self.refiner if method == "two_phase" else None
        if method == "two_phase" and refiner is None:
            raise CheckpointError(f"Planner: method 'two_phase' needs the phase-2 checkpoint ({self.run_dir}/phase2/{MODEL_FILE})")
        if masks is None:
            masks = self.masks_for(cond, generator=generator)
        feat = None if oracle_x0 is not None else self.kp_feat(cond, masks[:, 0])
        out = two_phase(
            self.phase1, refiner, cond, masks, feat, st.phase1_steps, st.phase1_shift, st.sigma_max, st.sigma_min,
            st.confidence, st.noise, st.noise_scale, st.pos_clip, oracle_x0=oracle_x0, generator=generator,
        )
        return {"plan": out.refined, "masks": out.masks, "keyframes": out.keyframes, "interp": out.interp,
                "levels": out.levels, "x0_hats": out.x0_hats}

    def nfe(self, method: str) -> dict:
        """Network evaluations per plan, by model (the maze encoder runs once per model)."""
        st = self.settings
        if method in STUDENTS_OF:
            out = {f"{t}_student": int(self._student(method, t)[1]["distill"]["steps"]) for t in STUDENTS_OF[method]}
            if method != "full_distilled":
                if self.feat_diffs == "dphi":
                    out["dphi"] = 1
                if self.selector is not None and st.index_source == "selector":
                    out["selector"] = 1
            return out
        if method == "full":
            return {"baseline": st.baseline_steps}
        out = {"phase1": st.phase1_steps}
        if self.feat_diffs == "dphi":
            out["dphi"] = 1
        if self.selector is not None and st.index_source == "selector":
            out["selector"] = 1
        if method == "two_phase":
            out["phase2"] = len(self.budgets) - 1
        return out

    # ------------------------------------------------------------------ public API (world frame)
    def condition(self, maze: str, start, goal, n: int = 1) -> tuple[dict, object]:
        from maze.mazes import MAZE_NAMES, get_maze, to_norm, wall_distance

        if maze not in MAZE_NAMES:
            raise ValueError(f"Planner.plan: maze={maze!r} is not one of {list(MAZE_NAMES)}")
        m = get_maze(maze, G=self.G)
        pts = {}
        for name, p in (("start", start), ("goal", goal)):
            a = np.asarray(p, dtype=np.float64)
            if a.shape != (2,) or not np.isfinite(a).all():
                raise ValueError(f"Planner.plan: {name} must be a finite (x, y) world position, got {p!r}")
            u = to_norm(a, m)
            if float(wall_distance(u[None], m)[0]) <= 0.0:
                raise ValueError(f"Planner.plan: {name}={tuple(a)} lies inside a wall of {maze!r}")
            pts[name] = torch.tensor(u, dtype=torch.float32)[None].expand(n, 2)
        occ = torch.tensor(m.occ)[None].expand(n, -1, -1)
        sdf = torch.tensor(m.sdf)[None].expand(n, -1, -1)
        return {"occ": occ, "sdf": sdf, "start": pts["start"], "goal": pts["goal"]}, m

    def plan(self, maze: str, start, goal, n: int = 1, method: str = "two_phase", seed: int | None = None) -> np.ndarray:
        """``n`` plans ``[n, T, 2]`` in the PointMaze world frame of ``maze`` (umaze|medium|large)."""
        from maze.mazes import to_world

        if n < 1:
            raise ValueError(f"Planner.plan: n must be >= 1, got {n}")
        cond, m = self.condition(maze, start, goal, n)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        plan = self.sample(cond, method, generator=gen)["plan"]
        return to_world(plan.double().numpy(), m)
