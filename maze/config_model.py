"""Config sections of the maze models: ``phase1``, ``phase2``, ``baseline``, ``eval``, ``demo``.

Dataclasses are the schema (``interpdiff.config``); the YAML overlays
``configs/maze/small_model.yaml`` / ``full_model.yaml`` fill them and ``a.b=value`` overrides on
the command line change single keys. ``maze.config.MazeConfig`` embeds these sections next to
the data / keyframes / D_phi / selector ones, and ``load_maze_config`` merges the YAML files.

Defaults are the *full* configuration of METHOD.md (d_model 384, 12 layers); the small CPU demo
shrinks them in ``small_model.yaml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from interpdiff.corruption import CONFIDENCE_KINDS, NOISE_MODES
from interpdiff.flow import DENSITIES
from interpdiff.masks import parse_policy_mix

COND_MODES = ("cross", "prefix")
PHASE1_POLICIES = ("dp", "uniform", "random", "selector")
PHASE2_POLICIES = ("selector", "uniform", "random_nested", "dp_precomputed")
INDEX_SOURCES = ("selector", "uniform")
REFINER_OUTPUTS = ("missing_residual", "residual")  # maze.models.Refiner's x0_hat forms
LEVEL_WEIGHTS = ("none", "inv_sigma2")
# two_phase_uniform: the two-phase planner with uniform keyframe indices (no selector, no D_phi cost at sampling
# beyond the features), to separate the selector's effect and cost from the rest of the method
EVAL_METHODS = ("two_phase", "full", "interp_only", "two_phase_uniform")
# step-distilled planners (maze.distill): the 4-step consistency baseline, and phase-1 student + interpolation
# + the 1-2 step phase-2 student (two_phase_distilled) or without phase 2 (interp_distilled)
DISTILLED_METHODS = ("full_distilled", "two_phase_distilled", "interp_distilled")
DISTILL_TARGETS = ("full", "phase1", "phase2")
DISTILL_MODES = ("scm", "discrete")
DISTILL_JVP = ("autograd", "finite_difference")


@dataclass
class BackboneConfig:
    """Sizes of a trajectory transformer (stored in every checkpoint's metadata).

    ``cond_mode``: ``cross`` = cross-attention from the time tokens to the maze tokens in every
    block; ``prefix`` = the maze tokens are prepended to the sequence of self-attention.
    ``enc_depth``: depth of the maze encoder (``maze.encoders.MazeEncoder``).
    ``patch``: frames per token (DiT-style temporal patches, ``T % patch == 0``) for the refiner
    and the baseline; phase-1 keyframes are irregular in time and always use 1.
    ``path_prior``: phase-1 and the baseline read ``maze.encoders.path_prior`` at each token's frame
    (the prior the selector and D_phi already use); checkpoints without the key load with ``False``.
    ``wall_feat``: the refiner reads ``maze.models.wall_features`` at each frame of its input ``x_s``
    (signed distance to the nearest wall, in cells, and the direction away from it); phase-1 and the
    baseline see noisy positions and do not take it. Checkpoints without the key load with ``False``.
    """

    d_model: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    cond_mode: str = "cross"
    enc_depth: int = 4
    patch: int = 1  # consecutive frames per token for the full-sequence models (refiner, baseline)
    # phase-1 / baseline: add the condition-only path prior (maze.encoders.path_prior: position on the
    # shortest cell path at frame t, its direction, nearness of a turn) to every token's input
    path_prior: bool = False
    # phase-2: exact local wall geometry at each frame of x_s (maze.models.wall_features)
    wall_feat: bool = False

    def validate(self, where: str) -> None:
        if self.d_model % self.heads != 0:
            raise ValueError(f"{where}.d_model={self.d_model} must be divisible by {where}.heads={self.heads}")
        if self.depth < 1 or self.enc_depth < 0:
            raise ValueError(f"{where}: depth must be >= 1 and enc_depth >= 0, got {self.depth}, {self.enc_depth}")
        if self.patch < 1:
            raise ValueError(f"{where}.patch={self.patch} must be >= 1")
        if self.cond_mode not in COND_MODES:
            raise ValueError(f"{where}.cond_mode={self.cond_mode!r} is not one of {COND_MODES}")


@dataclass
class OptimConfig:
    steps: int = 20000
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 500
    grad_clip: float = 1.0
    ema: float = 0.999  # 0 disables the EMA copy; sampling uses the EMA weights when present
    log_every: int = 50
    ckpt_every: int = 2000
    seed: int = 0

    def validate(self, where: str) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"{where}: steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"{where}.ema={self.ema} must lie in [0, 1)")


@dataclass
class Phase1Config:
    """Keyframe diffusion over the K_0 level-0 keypoints (flow matching, few Euler steps)."""

    run_dir: str = "runs/maze/small/phase1"  # holds model.pt, config.yaml, model_metrics.csv
    model: BackboneConfig = field(default_factory=BackboneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    policy_mix: str = "dp:0.7,uniform:0.2,random:0.1"
    selector_weight: float = 0.2  # added to the mix (then renormalised) when a selector checkpoint exists
    feat_diffs: str = "dphi"  # kp_feat segment costs: "dphi" (D_phi's predictions, train and sample) or "none" (zeros)
    density: str = "logit_normal"
    train_shift: float = 1.0
    sample_steps: int = 8
    sample_shift: float = 1.0
    # weight of the wall penalty on the predicted clean keyframes z0_hat = z_sigma - sigma v, weighted by
    # (1 - sigma)^2 (maze.models.wall_penalty: points closer than 0.12 cells to a wall); 0 = off
    wall_weight: float = 0.0

    def validate(self) -> None:
        self.model.validate("phase1.model")
        self.optim.validate("phase1.optim")
        parse_policy_mix(self.policy_mix, PHASE1_POLICIES)
        if self.feat_diffs not in ("dphi", "none"):
            raise ValueError(f"phase1.feat_diffs={self.feat_diffs!r} is not one of ['dphi', 'none']")
        if self.density not in DENSITIES:
            raise ValueError(f"phase1.density={self.density!r} is not one of {DENSITIES}")
        if self.sample_steps < 1:
            raise ValueError(f"phase1.sample_steps must be >= 1, got {self.sample_steps}")
        if self.wall_weight < 0:
            raise ValueError(f"phase1.wall_weight={self.wall_weight} must be >= 0")


@dataclass
class Phase2Config:
    """Interpolation-level refiner R(x_s, s, M_s, cond) -> x0_hat (METHOD.md section 5)."""

    run_dir: str = "runs/maze/small/phase2"  # holds model.pt, config.yaml, model_metrics.csv
    model: BackboneConfig = field(default_factory=BackboneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    policy_mix: str = "selector:0.3,uniform:0.2,random_nested:0.2,dp_precomputed:0.3"
    # x0_hat form: "missing_residual" (keyframes of M_s returned exactly, a correction on missing frames
    # only) or "residual" (the form before this option: a correction on every frame); maze.models.Refiner
    output: str = "missing_residual"
    sigma_max: float = 0.02  # corruption noise on missing frames at level 0, in normalised [0,1] units
    sigma_min: float = 0.002
    confidence: str = "mask"
    sample_noise: str = "none"
    noise_scale: float = 1.0
    pos_clip: bool = True
    # per-sample loss weight by level: "none" or "inv_sigma2" (1 / sigma_s^2, normalised to mean 1 over the
    # levels): every level's denoising error counts alike, so the fine levels (K = 32, 64), whose
    # interpolation is already close, are not drowned by the K = 8 errors
    level_weight: str = "none"
    wall_weight: float = 0.0  # wall penalty on x0_hat at missing frames (maze.models.wall_penalty); 0 = off

    def validate(self) -> None:
        self.model.validate("phase2.model")
        self.optim.validate("phase2.optim")
        parse_policy_mix(self.policy_mix, PHASE2_POLICIES)
        if self.output not in REFINER_OUTPUTS:
            raise ValueError(f"phase2.output={self.output!r} is not one of {REFINER_OUTPUTS}")
        if not 0 <= self.sigma_min <= self.sigma_max:
            raise ValueError(f"phase2: need 0 <= sigma_min <= sigma_max, got {self.sigma_min}, {self.sigma_max}")
        if self.confidence not in CONFIDENCE_KINDS:
            raise ValueError(f"phase2.confidence={self.confidence!r} is not one of {CONFIDENCE_KINDS}")
        if self.level_weight not in LEVEL_WEIGHTS:
            raise ValueError(f"phase2.level_weight={self.level_weight!r} is not one of {LEVEL_WEIGHTS}")
        if self.wall_weight < 0:
            raise ValueError(f"phase2.wall_weight={self.wall_weight} must be >= 0")
        if self.sample_noise not in NOISE_MODES:
            raise ValueError(f"phase2.sample_noise={self.sample_noise!r} is not one of {NOISE_MODES}")
        if not (math.isfinite(self.noise_scale) and self.noise_scale >= 0):
            raise ValueError(f"phase2.noise_scale={self.noise_scale}: expected a finite number >= 0 (a multiple of the "
                             "training noise: level sigma_{s+1} for sample_noise=level, sigma_0 for constant)")


@dataclass
class BaselineConfig:
    """Diffuser-style full-sequence flow-matching model over all T points."""

    run_dir: str = "runs/maze/small/baseline"  # holds model.pt, config.yaml, model_metrics.csv
    model: BackboneConfig = field(default_factory=BackboneConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    density: str = "logit_normal"
    train_shift: float = 1.0
    sample_steps: int = 20
    sample_shift: float = 1.0
    wall_weight: float = 0.0  # as phase1.wall_weight, on the predicted clean sequence (same option, fair comparison)

    def validate(self) -> None:
        self.model.validate("baseline.model")
        self.optim.validate("baseline.optim")
        if self.density not in DENSITIES:
            raise ValueError(f"baseline.density={self.density!r} is not one of {DENSITIES}")
        if self.sample_steps < 1:
            raise ValueError(f"baseline.sample_steps must be >= 1, got {self.sample_steps}")
        if self.wall_weight < 0:
            raise ValueError(f"baseline.wall_weight={self.wall_weight} must be >= 0")


@dataclass
class EvalConfig:
    """Open-loop and closed-loop evaluation (``python -m maze.evaluate``)."""

    run_dir: str = "runs/maze/small"  # run root: evaluation JSON, report.md and figures go here
    split: str = "eval"
    n_open_loop: int = 512  # eval trajectories for the open-loop tables (first n of the split)
    batch_size: int = 128
    index_source: str = "selector"  # where two-phase keyframe indices come from at sampling
    agent_radius: float = 0.1  # world units (PointMaze cell = 1)
    episodes: int = 100  # closed-loop episodes per maze (>= 100 in the full config)
    horizons: dict[str, int] = field(default_factory=lambda: {"umaze": 300, "medium": 600, "large": 800})
    success_dist: float = 0.45  # PointMaze's own goal threshold
    kp: float = 10.0  # PD gains of the plan follower (action = kp * (target - pos) - kd * vel)
    kd: float = 1.0
    lookahead: float = 0.5  # world units: track the first plan point farther than this from the agent
    replan: bool = False
    methods: list[str] = field(default_factory=lambda: ["two_phase", "full", "interp_only", "two_phase_uniform"])
    cost_repeats: int = 3
    seed: int = 0

    def validate(self) -> None:
        if self.index_source not in INDEX_SOURCES:
            raise ValueError(f"eval.index_source={self.index_source!r} is not one of {INDEX_SOURCES}")
        for m in self.methods:
            if m not in EVAL_METHODS + DISTILLED_METHODS:
                raise ValueError(f"eval.methods: {m!r} is not one of {list(EVAL_METHODS + DISTILLED_METHODS)}")
        if self.episodes < 1 or self.n_open_loop < 1:
            raise ValueError(f"eval: episodes and n_open_loop must be >= 1, got {self.episodes}, {self.n_open_loop}")


@dataclass
class StudentConfig:
    """One distilled student (``maze.distill``): its run folder, sampling steps and training schedule."""

    run_dir: str = ""  # holds model.pt (+ config.yaml, model_metrics.csv); the evaluator reads it from here
    steps: int = 1  # consistency steps (full / phase1) or refiner calls (phase2: 1 or 2)
    # TrigFlow times after t_0 = atan(sigma_max) (full / phase1); [] = interpdiff.distill's default (rCM's Wan times)
    mid_times: list[float] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(steps=2000, batch_size=64, lr=1e-4, warmup=100, ema=0.99,
                                                                    ckpt_every=500))


@dataclass
class MazeDistillConfig:
    """Step distillation of the maze teachers (``python -m maze.distill``; module doc of ``maze.distill``).

    ``target`` picks the teacher (``full``: ``baseline.run_dir``, ``phase1``: ``phase1.run_dir``,
    ``phase2``: ``phase2.run_dir``) and the student section written (``distill.<target>``).
    """

    target: str = "full"  # full | phase1 | phase2
    mode: str = "scm"  # scm (continuous time, JVP) | discrete (no JVP)
    jvp: str = "autograd"  # autograd (torch.func.jvp, attention on the math SDPA kernel) | finite_difference
    fd_size: float = 1e-3  # finite-difference step in TrigFlow time (radians)
    p_mean: float = 0.0  # student times: tan t = exp(N(p_mean, p_std^2)) (sCM's log-normal proposal)
    p_std: float = 1.6
    tangent_warmup: int = 500  # steps of sCM tangent warmup (r: 0 -> 1)
    tangent_norm: float = 0.1  # c in g / (||g|| + c); 0 disables
    scm_weight: float = 1.0  # loss scale of the sCM term (AdamW is scale-free; it only matters against grad_clip)
    delta: float = 0.05  # discrete mode: teacher step t -> t - delta (radians)
    sigma_max: float = 80.0  # student sampling starts at t_0 = atan(sigma_max)
    phase2_levels: list[int] = field(default_factory=list)  # phase2 student levels; [] = [0] (1 step) or [0, (S-1)//2]
    phase2_teacher_noise: str = "none"  # the teacher chain's sampling noise (none: a deterministic target)
    # write the teacher-initialised student without training (step 0): the reference of what distillation adds
    # (the teacher's own weights in the few-step consistency sampler / called once or twice as the phase-2 student)
    init_only: bool = False
    full: StudentConfig = field(default_factory=lambda: StudentConfig(run_dir="runs/maze/small/distill/full", steps=4,
                                                                      mid_times=[1.25, 0.8, 0.35]))
    phase1: StudentConfig = field(default_factory=lambda: StudentConfig(run_dir="runs/maze/small/distill/phase1", steps=2,
                                                                        mid_times=[0.8]))
    phase2: StudentConfig = field(default_factory=lambda: StudentConfig(run_dir="runs/maze/small/distill/phase2", steps=1))

    def student(self, target: str | None = None) -> StudentConfig:
        return getattr(self, target or self.target)

    def validate(self) -> None:
        if self.target not in DISTILL_TARGETS:
            raise ValueError(f"distill.target={self.target!r} is not one of {list(DISTILL_TARGETS)}")
        if self.mode not in DISTILL_MODES:
            raise ValueError(f"distill.mode={self.mode!r} is not one of {list(DISTILL_MODES)}")
        if self.jvp not in DISTILL_JVP:
            raise ValueError(f"distill.jvp={self.jvp!r} is not one of {list(DISTILL_JVP)}")
        if self.fd_size <= 0 or not 0 < self.delta < 1.5707963:
            raise ValueError(f"distill.fd_size={self.fd_size}, distill.delta={self.delta}: expected > 0 (delta < pi/2)")
        if self.p_std <= 0 or self.tangent_norm < 0 or self.scm_weight <= 0 or self.tangent_warmup < 0 or self.sigma_max <= 0:
            raise ValueError(f"distill: p_std={self.p_std}, tangent_norm={self.tangent_norm}, scm_weight={self.scm_weight}, "
                             f"tangent_warmup={self.tangent_warmup}, sigma_max={self.sigma_max}: expected p_std > 0, "
                             "tangent_norm >= 0, scm_weight > 0, tangent_warmup >= 0, sigma_max > 0")
        if self.phase2_teacher_noise not in ("none", "level"):
            raise ValueError(f"distill.phase2_teacher_noise={self.phase2_teacher_noise!r} is not one of ['none', 'level']")
        for name in DISTILL_TARGETS:
            st = self.student(name)
            st.optim.validate(f"distill.{name}.optim")
            if st.steps < 1:
                raise ValueError(f"distill.{name}.steps={st.steps}: expected >= 1")
        if self.phase2.steps not in (1, 2):
            raise ValueError(f"distill.phase2.steps={self.phase2.steps}: the phase-2 student takes 1 or 2 steps")
        from interpdiff.distill import consistency_times

        for name in ("full", "phase1"):
            st = self.student(name)
            try:
                consistency_times(st.steps, st.mid_times, self.sigma_max)
            except ValueError as e:
                raise ValueError(f"distill.{name}.steps={st.steps}, distill.{name}.mid_times={st.mid_times}: {e}") from None


@dataclass
class DemoConfig:
    """Which stages ``python -m maze.demo`` runs (each is skipped when its output exists and ``resume``)."""

    resume: bool = True
    stages: list[str] = field(
        default_factory=lambda: [
            "generate", "keyframes", "dphi", "selector", "phase1", "phase2", "baseline", "evaluate", "report"
        ]
    )


def load_maze_config(argv):
    """``--config A.yaml [--config B.yaml ...] [key.sub=value ...]`` -> ``maze.config.MazeConfig``.

    Several ``--config`` files are merged in order (e.g. part 1's ``configs/maze/small.yaml``
    then the model overlay ``configs/maze/small_model.yaml``), then the overrides; unknown keys
    and bad values raise ``interpdiff.config.ConfigError`` naming the file or override.
    """
    from interpdiff.config import parse_cli
    from maze.config import MazeConfig

    return parse_cli(MazeConfig, argv)
