"""Config schema of the maze prototype (``configs/maze/small.yaml``, ``configs/maze/full.yaml``).

One top-level ``MazeConfig``; each entry point reads the whole file and uses its section:

- ``data``       -> ``python -m maze.generate``
- ``keyframes``  -> ``python -m maze.prepare_keyframes``
- ``dphi``       -> ``python -m maze.train_dphi``
- ``selector``   -> ``python -m maze.train_selector``
- ``phase1``, ``phase2``, ``baseline``, ``eval``, ``demo`` -> the model sections of
  ``maze.config_model`` (part 2 of the prototype).
- ``distill``    -> ``python -m maze.distill`` (step-distilled students, ``maze.config_model.MazeDistillConfig``)

Every entry point takes ``--config configs/maze/small.yaml`` plus ``section.key=value``
overrides; unknown keys fail at start-up (``interpdiff.config``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from interpdiff.masks import budget_schedule
from interpdiff.selection import SCHEDULES, check_budgets
from maze.config_model import BaselineConfig, DemoConfig, EvalConfig, MazeDistillConfig, Phase1Config, Phase2Config
from maze.mazes import MAZE_NAMES


@dataclass
class DataConfig:
    """PointMaze goal-reaching data (``maze.generate``).

    World units: ``goal_tol``, ``waypoint_tol``, ``goal_noise`` (fraction of a cell),
    ``agent_radius``; ``stop_speed`` in world units per second. The eval split uses seed ``seed + eval_seed_offset``.
    """

    root: str = "data/maze/small"
    mazes: list[str] = field(default_factory=lambda: list(MAZE_NAMES))
    T: int = 128
    n_train_per_maze: int = 1000
    n_eval_per_maze: int = 100
    seed: int = 0
    eval_seed_offset: int = 1_000_003
    flip_y: bool = True
    # waypoint controller (D4RL's maze2d controller: a = p (w - x) + d v, clipped to [-1, 1])
    p_gain: float = 10.0
    d_gain: float = -1.0
    action_noise: float = 0.1  # std of Gaussian action noise before clipping
    waypoint_tol: float = 0.2
    goal_tol: float = 0.1
    stop_speed: float = 0.3  # world units / s; a goal counts as reached once the agent is this slow
    goal_noise: float = 0.25
    max_segment_steps: int = 1500
    min_segment_steps: int = 24
    goals_per_episode: int = 25  # the env is reset to a random cell after this many goals
    agent_radius: float = 0.1

    def validate(self) -> None:
        bad = [m for m in self.mazes if m not in MAZE_NAMES]
        if bad or not self.mazes:
            raise ValueError(f"data.mazes={self.mazes}: unknown {bad}; expected a non-empty subset of {list(MAZE_NAMES)}")
        if self.T < 4:
            raise ValueError(f"data.T={self.T} must be >= 4")
        if self.n_train_per_maze < 1 or self.n_eval_per_maze < 1:
            raise ValueError("data.n_train_per_maze and data.n_eval_per_maze must be >= 1")
        if not 0 <= self.goal_noise < 0.5 - self.agent_radius:
            raise ValueError(f"data.goal_noise={self.goal_noise} must lie in [0, 0.5 - agent_radius)")


@dataclass
class KeyframesConfig:
    """DP keyframes (``maze.prepare_keyframes``); SNR weights of METHOD.md section 3.

    ``budgets`` empty -> ``budget_schedule(T, k_min, n_levels)`` (``[8, 16, 32, 64, 128]`` at T=128).
    ``dphi_ckpt`` empty -> ``kp_feat`` diffs are the true segment costs; else D_phi's predictions.
    """

    k_min: int = 8
    n_levels: int = 5
    budgets: list[int] = field(default_factory=list)
    t_steps: int = 16
    s_min: float = 0.1
    s_max: float = 10.0
    gamma: float = 1.0
    schedule: str = "flow"
    segment_cost_samples: Optional[int] = None
    dphi_ckpt: str = ""
    batch_size: int = 256
    backend: str = "auto"

    def resolved_budgets(self, T: int) -> list[int]:
        if self.budgets:
            return check_budgets(list(self.budgets), T, "keyframes.budgets")
        try:
            b = budget_schedule(T, self.k_min, self.n_levels)
        except ValueError as e:
            raise ValueError(f"keyframes.k_min={self.k_min}, keyframes.n_levels={self.n_levels} with data.T={T}: {e}; "
                             "or set keyframes.budgets explicitly") from None
        return check_budgets(b, T, "keyframes.budgets")

    def snr_kwargs(self) -> dict:
        return {"t_steps": self.t_steps, "s_min": self.s_min, "s_max": self.s_max, "gamma": self.gamma, "schedule": self.schedule}

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"keyframes.schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.backend not in ("auto", "torch", "triton"):
            raise ValueError(f"keyframes.backend={self.backend!r}, expected auto|torch|triton")


@dataclass
class NetConfig:
    """Sizes of a cond-only network (stored in its checkpoint metadata)."""

    d_model: int = 128
    enc_depth: int = 2
    heads: int = 4
    depth: int = 2  # blocks of the query decoder (self-attn + cross-attn to maze tokens + MLP)


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 100
    grad_clip: float = 1.0
    eval_every: int = 500
    log_every: int = 50
    seed: int = 0
    threads: int = 1
    device: str = "cpu"


@dataclass
class DPhiConfig:
    """Segment-cost predictor (``maze.train_dphi``).

    Regression target ``log(c[i, j] + eps)`` with ``eps = log_eps_rel * median positive cost``
    of the training set; ``pairs_per_sample`` random segments ``i < j`` per trajectory per step,
    half of them drawn from DP keyframe-adjacent pairs when keyframes exist.
    """

    run_dir: str = "runs/maze/small/dphi"
    net: NetConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pairs_per_sample: int = 64
    log_eps_rel: float = 1e-3
    eval_samples: int = 300


@dataclass
class SelectorConfig:
    """Level-conditioned keyframe selector (``maze.train_selector``).

    Loss: per-frame BCE of the level-s logits against the level-s DP mask (endpoints excluded),
    positives weighted by ``(T - K_s) / (K_s - 2)``, plus ``soft_label_sigma`` (frames) Gaussian
    label smoothing in time when > 0. Decoding (``maze.selector.decode_nested``; all 0 = plain
    top-k): ``nms_radius_scale`` suppresses frames closer than ``scale * (T-1)/(K_s-1)`` to a
    chosen keyframe, ``max_gap_scale`` caps the longest gap, ``gap_bonus`` adds
    ``gap_bonus * log(gap)`` to the logits. Defaults 0.6 / 0 / 1 were picked on the small eval
    split among a handful of settings (see the README numbers).
    """

    run_dir: str = "runs/maze/small/selector"
    net: NetConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    soft_label_sigma: float = 2.0
    nms_radius_scale: float = 0.6
    max_gap_scale: float = 0.0
    gap_bonus: float = 1.0
    eval_samples: int = 300


@dataclass
class MazeConfig:
    data: DataConfig = field(default_factory=DataConfig)
    keyframes: KeyframesConfig = field(default_factory=KeyframesConfig)
    dphi: DPhiConfig = field(default_factory=DPhiConfig)
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    phase1: Phase1Config = field(default_factory=Phase1Config)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    baseline: BaselineConfig = field(default_factory=BaselineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    distill: MazeDistillConfig = field(default_factory=MazeDistillConfig)  # maze.distill (step distillation)

    def validate(self) -> None:
        self.data.validate()
        self.keyframes.validate()
        self.keyframes.resolved_budgets(self.data.T)
        for sec in (self.phase1, self.phase2, self.baseline, self.eval, self.distill):
            v = getattr(sec, "validate", None)
            if callable(v):
                v()
