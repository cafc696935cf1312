"""The one Accelerate training loop that phase 1, phase 2 (and later D_phi / rCM) share.

The phases differ in their loss, not in plumbing: an entry script builds a ``TrainSpec`` (the
model with its trainable parameters, a loss function, a data stream, how to save/load the
trainable weights, an optional validation) and calls ``train(cfg, spec)``. This module owns:

- **Accelerator** (``make_accelerator``): bf16 autocast on CUDA, fp32 on CPU
  (``mixed_precision=auto``), gradient accumulation, DDP or DeepSpeed ZeRO from the
  ``accelerate launch --config_file`` the user picks. CPU + DeepSpeed: see ``make_accelerator``.
  Under DeepSpeed the engine runs in fp32 mode and the loop autocasts to bf16 itself, exactly as
  on the DDP path: DeepSpeed's bf16 mode would cast the trainable weights (LoRA, widened input
  channels) and Wan's fp32 modules to bf16 (a JSON with ``bf16.enabled: true`` is refused).
- **Optimizer**: AdamW, fused on CUDA (``optim.kind=auto``), bitsandbytes 8-bit AdamW on request
  (``adamw_8bit``; a clear error when bitsandbytes is missing). LR: linear warmup then constant
  or cosine down to ``min_lr_ratio * lr``. Gradient clipping by global norm.
- **EMA** of the trainable weights (``ema_decay > 0``), ``decay_t = min(decay, (1+t)/(10+t))``.
- **Seeds**: the global RNGs get ``seed * world_size + rank`` (DiT). Per-sample randomness of the
  objectives (noise, flow times, masks, levels) does *not* use them: it comes from
  ``sample_generator(seed, step, key)``, a generator seeded by a hash of (seed, optimizer step,
  sample key). A sample's noise is thus the same whatever the world size, the per-device batch
  or the accumulation, so a 2-process run equals a 1-process run with the same global batch, and
  a resumed run equals an uninterrupted one without replaying any RNG stream.
- **Checkpoints** every ``checkpoint_every`` steps through ``Accelerator.save_state`` with
  registered pre-hooks: the save hook writes only the trainable weights (``spec.save_trainable``,
  LoRA in diffusers format + widened input channels; with an EMA also ``trainable_ema/``, the
  averaged weights in the same format, ready for sampling) and drops the full model from what
  Accelerate would write; the load hook loads them back. Optimizer, LR scheduler, grad scaler,
  RNG states (per rank), EMA and the ``TrainState`` (step, samples, data position) are saved by
  Accelerate (``register_for_checkpointing``). Under DeepSpeed the engine writes model +
  optimizer shards itself (frozen parameters excluded). Each checkpoint is written into
  ``checkpoints/.tmp-step_XXXXXXXX`` and renamed to ``checkpoints/step_XXXXXXXX`` by the main
  process after every rank has finished (a shared filesystem is assumed across nodes), so a
  folder under its final name is always complete; only the last ``keep_last`` are kept.
- **Resume**: ``resume=latest`` takes the newest complete checkpoint (and starts fresh when the
  run has none, so a preemptible job can always pass it); ``resume=PATH`` must be a checkpoint
  folder (a clear ``CheckpointError`` otherwise, raised before the model is built when the
  entry script calls ``resolve_resume`` first). The data position is restored by skipping the
  micro-batches already consumed in the current epoch of the (deterministic) data stream; each
  rank writes its own position (``data_state_rank{r}.json``: ranks read different shards, so in
  epoch mode their positions differ) and reads it back on resume with the same world size.
- **Logging**: TensorBoard by default (``tracker=wandb`` or ``none``), metrics also appended to
  ``metrics.csv`` / ``metrics.jsonl`` in the run folder, the loss all-reduced (mean over ranks and
  micro-batches; the logged value is the mean over the optimizer steps since the last log) before
  logging, a tqdm bar on the main process with loss, step time and samples/s. The per-step numbers
  (loss, sample count, the loss function's metrics, which may be device tensors) go through one
  all-reduce per optimizer step and stay on the device until a log or checkpoint step reads them
  in one transfer: the loop does not wait for the GPU between log steps. The resolved config is written to ``run_dir/config.yaml``.
- **Failures on one rank** (a damaged file only its node reads): the entry scripts run ``main``
  through ``run_main``, so the failed rank prints its error naming its rank, records it for the
  launcher and exits at once, without a collective, and the launcher stops the other ranks;
  ranks that wait for a peer (on another node, or one that never joined the process group) fail
  after ``train.dist_timeout_s`` (``make_accelerator``) instead of torch's 30 min on gloo (under NCCL
  the store wait is bounded so, NCCL's communicator set-up may block longer).
- **One-batch check** before the loop: forward + backward on the first batch, the loss must be
  finite and every trainable parameter must get a finite gradient (a LoRA target that is never
  used, a detached input or NaNs stop the run before the first optimizer step).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from interpdiff.config import ConfigError, save_config
from interpdiff.io import (CheckpointError, atomic_write_text, code_version, file_kind, file_problem, fsync_dir,
                           fsync_tree)

CKPT_PREFIX = "step_"
TMP_PREFIX = ".tmp-"
TRAINABLE_DIR = "trainable"
EMA_DIR = "trainable_ema"
MIXED_PRECISIONS = ("auto", "no", "bf16", "fp16")
OPTIMIZERS = ("auto", "adamw", "adamw_fused", "adamw_8bit")
SCHEDULES = ("constant", "cosine")
TRACKERS = ("tensorboard", "wandb", "none")


# --- configs ------------------------------------------------------------------------------------


@dataclass
class OptimConfig:
    kind: str = "auto"  # auto (fused AdamW on CUDA, foreach on CPU) | adamw | adamw_fused | adamw_8bit
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (after warmup)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr

    def validate(self) -> None:
        if self.kind not in OPTIMIZERS:
            raise ConfigError(f"train.optim.kind={self.kind!r} is not one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"train.optim.schedule={self.schedule!r} is not one of {SCHEDULES}")
        fin = math.isfinite
        checks = (
            ("lr", fin(self.lr) and self.lr > 0, "a finite number > 0"),
            ("beta1", fin(self.beta1) and 0 <= self.beta1 < 1, "in [0, 1)"),
            ("beta2", fin(self.beta2) and 0 <= self.beta2 < 1, "in [0, 1)"),
            ("eps", fin(self.eps) and self.eps > 0, "a finite number > 0"),
            ("weight_decay", fin(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0"),
            ("grad_clip", fin(self.grad_clip), "a finite number (<= 0 disables clipping)"),
            ("min_lr_ratio", fin(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "in [0, 1] (the cosine floor)"),
            ("warmup_steps", self.warmup_steps >= 0, "an integer >= 0"),
        )
        for key, ok, expected in checks:
            if not ok:
                raise ConfigError(f"train.optim.{key}={getattr(self, key)!r}: expected {expected}")


DATA_RESUME = ("next_epoch", "restart_epoch", "error")


@dataclass
class TrainLoopConfig:
    run_dir: str = "runs/debug"
    max_steps: int = 1000  # optimizer steps (defines the LR schedule)
    stop_at_step: int = 0  # >0: leave after this step (checkpointed) although max_steps is larger (time-limited jobs)
    batch_size: int = 1  # per device, per micro-batch
    grad_accum: int = 1
    mixed_precision: str = "auto"  # auto: bf16 on CUDA, no (fp32) on CPU
    seed: int = 0
    gradient_checkpointing: bool = True
    ema_decay: float = 0.0  # 0 disables the EMA
    checkpoint_every: int = 500
    keep_last: int = 3
    resume: str = ""  # "" | latest | path to a checkpoint folder
    # the saved data position belongs to another stream (data settings or world size changed), epoch
    # mode: next_epoch = skip the rest of that epoch, restart_epoch = read it again, error = stop
    data_resume: str = "next_epoch"
    log_every: int = 10
    tracker: str = "tensorboard"
    validate_every: int = 0  # 0 disables validation
    # one-batch forward/backward check before the loop (finite loss, a gradient for every trainable
    # tensor); under ZeRO-3 it runs on the unsharded model, before accelerate's prepare shards it
    check_batch: bool = True
    allow_tf32: bool = True
    # a new run (resume="") in a run_dir that holds checkpoints is refused (the two runs' checkpoints
    # would rotate each other out and metrics.csv would hold both); true deletes that run's outputs first
    overwrite: bool = False
    # resuming a checkpoint older than the run's newest is refused (training on would replace the newer
    # ones and drop their metrics rows); true moves the newer checkpoints and the metrics files to
    # checkpoints/rewound_<time>/ first
    rewind: bool = False
    deterministic: bool = False  # deterministic CUDA kernels (set_deterministic); slower, same bits run to run
    # an optimizer step whose loss or gradient norm is not finite is skipped (no update, no LR step,
    # no EMA); this many in a row stop the run, before a checkpoint could save non-finite weights
    max_nonfinite_steps: int = 10
    # seconds a rank waits for the others to form the process group or to join a collective before it
    # fails (torch's default is 30 min on gloo): a rank on another node that failed before the group
    # formed, or a peer lost without a closed connection, holds the rest that long. Work the main
    # process does while the others wait in a barrier (validation, a checkpoint's fsync and rotation)
    # and the spread of the ranks' start-up (model loading) must fit in it. Under DeepSpeed a longer
    # DEEPSPEED_TIMEOUT (minutes) in the environment wins. Guaranteed on gloo; with NCCL the wait for the
    # group's store is bounded by it, NCCL's own communicator set-up may block longer.
    dist_timeout_s: float = 600.0
    optim: OptimConfig = field(default_factory=OptimConfig)

    def validate(self) -> None:
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ConfigError(f"train.mixed_precision={self.mixed_precision!r} is not one of {MIXED_PRECISIONS}")
        if self.tracker not in TRACKERS:
            raise ConfigError(f"train.tracker={self.tracker!r} is not one of {TRACKERS}")
        for k in ("max_steps", "batch_size", "grad_accum", "keep_last", "log_every", "checkpoint_every"):
            if getattr(self, k) < 1:
                raise ConfigError(f"train.{k} must be >= 1, got {getattr(self, k)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"train.ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.data_resume not in DATA_RESUME:
            raise ConfigError(f"train.data_resume={self.data_resume!r} is not one of {DATA_RESUME}")
        for k in ("stop_at_step", "validate_every", "max_nonfinite_steps"):
            if getattr(self, k) < 0:
                raise ConfigError(f"train.{k} must be >= 0, got {getattr(self, k)}")
        if not (math.isfinite(self.dist_timeout_s) and self.dist_timeout_s > 0):
            raise ConfigError(f"train.dist_timeout_s must be a finite number of seconds > 0, got {self.dist_timeout_s}")
        if self.overwrite and self.resume:
            raise ConfigError(f"train.overwrite=true deletes the run's checkpoints, train.resume={self.resume!r} continues "
                              "from one: choose one")
        self.optim.validate()


# --- state objects saved with the checkpoint ----------------------------------------------------


@dataclass
class TrainState:
    """Counters restored on resume (saved through ``Accelerator.register_for_checkpointing``)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # passes over the data stream started
    batches_in_epoch: int = 0  # micro-batches this rank consumed in the current epoch (data position)
    samples_seen: int = 0  # global samples (all ranks) used for optimizer steps
    skipped_steps: int = 0  # optimizer steps skipped for a non-finite loss / gradient norm

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            if not hasattr(self, k):
                raise CheckpointError(f"train state: unknown field {k!r} in the checkpoint")
            setattr(self, k, v)


class EMA:
    """Exponential moving average of named trainable parameters (fp32 shadow copies).

    ``shadow <- d * shadow + (1 - d) * p`` with ``d = min(decay, (1 + t) / (10 + t))`` at update
    ``t`` (a short warm-up so early weights are not frozen into the average).
    """

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], decay: float):
        self.decay = decay
        self.params = dict(named_params)
        self.shadow = {n: p.detach().float().clone() for n, p in self.params.items()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        names = list(self.params)
        # one multi-tensor kernel instead of a launch per LoRA matrix (hundreds for Wan 1.3B)
        torch._foreach_lerp_([self.shadow[n] for n in names], [self.params[n].detach().float() for n in names], 1 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": {n: t.cpu() for n, t in self.shadow.items()}}

    def load_state_dict(self, d: dict) -> None:
        missing = set(self.shadow) - set(d["shadow"])
        if missing:
            raise CheckpointError(f"EMA state lacks parameters {sorted(missing)[:5]} (model changed since the checkpoint?)")
        self.updates = int(d["updates"])
        for n in self.shadow:
            self.shadow[n].copy_(d["shadow"][n])

    @contextlib.contextmanager
    def swapped_in(self):
        """Temporarily load the EMA weights into the parameters (validation / export)."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.shadow[n].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])


# --- what an entry script hands to the loop -----------------------------------------------------


LossFn = Callable[[nn.Module, dict, int], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class TrainSpec:
    """The task-specific parts of a training run.

    ``loss_fn(model, batch, step) -> (loss, metrics)``: ``batch`` is already on the device,
    ``step`` is the optimizer step the micro-batch contributes to (seeds per-sample randomness).
    ``batches(epoch, skip)`` yields this rank's micro-batches of one epoch after skipping the
    first ``skip`` of them (resume: the data position; a deterministic stream replays exactly,
    an endless resampled stream may reseed instead). ``data_settings()`` describes the stream
    (see ``read_data_state``). ``save_trainable(model, folder)`` / ``load_trainable(model, folder)`` write
    and read the trainable weights only (LoRA + new channels). ``validate(model, step, folder,
    is_main)`` runs on the main process (on every rank under ZeRO-3, whose forwards need all of
    them; then only ``is_main`` should write). ``meta`` lands in ``meta.json`` of every checkpoint (model sizes to rebuild it).
    """

    model: nn.Module
    loss_fn: LossFn
    batches: Callable[[int, int], Iterable[dict]]
    save_trainable: Callable[[nn.Module, Path], None]
    load_trainable: Callable[[nn.Module, Path], None]
    validate: Callable[[nn.Module, int, Path, bool], None] | None = None
    batch_size: Callable[[dict], int] | None = None
    meta: dict = field(default_factory=dict)
    enable_gradient_checkpointing: Callable[[nn.Module], None] | None = None
    # what decides which micro-batches a data position refers to (shard list, seeds, workers, batch
    # size; ``LatentLoader.settings``): saved with each rank's position and compared on resume
    data_settings: Callable[[], dict] | None = None
    # ``meta`` keys a resumed checkpoint must agree on (the phase, the model and LoRA shapes, the
    # distillation target): a mismatch is refused naming the key, before anything is loaded
    resume_keys: tuple[str, ...] = ()


@dataclass
class TrainResult:
    state: TrainState
    run_dir: Path
    losses: list[float]  # all-reduced loss of each optimizer step
    accelerator: Any = None


# --- helpers ----------------------------------------------------------------------------------


def sample_seed(base_seed: int, step: int, key: str | int, salt: str = "") -> int:
    """63-bit seed from ``(base_seed, step, sample key, salt)`` (blake2b; stable across runs)."""
    h = hashlib.blake2b(f"{base_seed}/{step}/{key}/{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def sample_generator(base_seed: int, step: int, key: str | int, device="cpu", salt: str = "") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(sample_seed(base_seed, step, key, salt))
    return g


def per_sample_randn(shape_per_sample: tuple[int, ...], gens: list[torch.Generator], device, dtype=torch.float32):
    """``[B, *shape]`` standard normal with row ``b`` drawn from ``gens[b]``."""
    return torch.stack([torch.randn(shape_per_sample, generator=g, device=device, dtype=dtype) for g in gens])


def resume_flag_to_override(argv: list[str], key: str = "train.resume") -> list[str]:
    """``--resume X`` / ``--resume=X`` -> ``train.resume=X`` (the other arguments unchanged), so entry
    scripts accept ``--resume latest|PATH`` next to ``--config`` and ``key=value`` overrides."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--resume":
            if i + 1 >= len(argv):
                raise ConfigError("--resume needs a value: latest or a checkpoint folder")
            out.append(f"{key}={argv[i + 1]}")
            i += 2
            continue
        out.append(f"{key}={a.split('=', 1)[1]}" if a.startswith("--resume=") else a)
        i += 1
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_deterministic(enabled: bool = True) -> list[str]:
    """Deterministic CUDA for a run (``train.deterministic`` / ``sample.py deterministic=true``):
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS reads it when its first handle is created, so
    this must run before any CUDA matmul: the entry scripts call it before the model moves to
    the GPU), ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an op without a
    deterministic kernel warns instead of stopping the run) and cuDNN without autotuning.
    Returns what was set; a warning when cuBLAS may already have read the variable."""
    if not enabled:
        return []
    import warnings

    done = []
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            warnings.warn("set_deterministic: CUDA is already initialised; CUBLAS_WORKSPACE_CONFIG only takes effect "
                          "if no cuBLAS handle exists yet (set it in the environment to be sure)", stacklevel=2)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        done.append("CUBLAS_WORKSPACE_CONFIG=:4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    return done + ["torch.use_deterministic_algorithms(True, warn_only=True)", "cudnn.deterministic"]


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path | None:
    """``""`` -> None; ``latest`` -> newest complete checkpoint of ``run_dir`` (None if none);
    a path -> that checkpoint folder, checked. Raises ``CheckpointError`` naming the path."""
    if not resume:
        return None
    if resume == "latest":
        ckpts = list_checkpoints(Path(run_dir) / "checkpoints")
        return ckpts[-1] if ckpts else None
    p = Path(resume)
    if not p.exists():
        raise CheckpointError(
            f"resume={resume!r}: no such path (expected a checkpoint folder like "
            f"{str(Path(run_dir) / 'checkpoints' / 'step_00000100')!r} or 'latest')"
        )
    if p.is_dir() and not (p / "train_state.json").is_file():
        ckpts = list_checkpoints(p / "checkpoints") or list_checkpoints(p)
        if ckpts:  # a run folder or its checkpoints folder: take its newest checkpoint
            return ckpts[-1]
        raise CheckpointError(
            f"resume={resume!r}: {str(p)!r} holds no checkpoint (expected a folder with train_state.json written by "
            "interpdiff.training, or a run folder with checkpoints/step_*)"
        )
    if p.is_file():
        raise CheckpointError(f"resume={resume!r} is a file; expected a checkpoint folder (checkpoints/step_XXXXXXXX)")
    return p


# what a run writes into its folder besides config.yaml (train.overwrite=true removes them)
RUN_OUTPUTS = ("checkpoints", "metrics.csv", "metrics.jsonl", "validation", "logs")


def check_run_dir(cfg: TrainLoopConfig) -> None:
    """A new run (``resume=""``) in a folder with another run's checkpoints is a ``ConfigError``
    (unless ``overwrite``): it would rotate that run's checkpoints out or theirs its own, a later
    ``resume=latest`` could pick the other run's, and ``metrics.csv`` would hold both."""
    if cfg.resume or cfg.overwrite:
        return
    ckpts = list_checkpoints(Path(cfg.run_dir) / "checkpoints")
    if ckpts:
        raise ConfigError(
            f"train.run_dir={cfg.run_dir!r} holds the checkpoints of an earlier run ({len(ckpts)}, newest "
            f"{ckpts[-1].name}); starting a new run there would mix the two. Pass train.resume=latest (--resume "
            "latest) to continue it, train.overwrite=true to delete its checkpoints, metrics and validation outputs "
            "first, or another train.run_dir"
        )


def clear_run_outputs(run_dir: Path) -> list[str]:
    """Delete ``RUN_OUTPUTS`` under ``run_dir`` (``train.overwrite=true``); returns what was removed."""
    removed = []
    for name in RUN_OUTPUTS:
        p = Path(run_dir) / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


DELETING_PREFIX = ".del-"


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder without ever leaving a partial one under its ``step_`` name: it is
    renamed to a hidden ``.del-*`` name first (a kill during the delete leaves only that, which the
    next save removes)."""
    path = Path(path)
    hidden = path.with_name(f"{DELETING_PREFIX}{path.name}-{os.getpid()}-{os.urandom(4).hex()}")
    os.replace(path, hidden)
    fsync_dir(path.parent)
    shutil.rmtree(hidden, ignore_errors=True)


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoint folders ``step_XXXXXXXX`` sorted by step (temp folders ignored)."""
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith(CKPT_PREFIX) and (p / "train_state.json").is_file():
            try:
                out.append((int(p.name[len(CKPT_PREFIX) :]), p))
            except ValueError:
                continue
    return [p for _, p in sorted(out)]


def lr_lambda(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR multiplier: linear warmup over ``warmup_steps``, then constant or cosine to ``min_lr_ratio``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    prog = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW: ``auto`` = fused kernel on CUDA, foreach elsewhere; ``adamw_8bit`` needs bitsandbytes."""
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    kind = cfg.kind
    if kind == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("train.optim.kind=adamw_8bit needs the bitsandbytes package (pip install bitsandbytes)") from None
        return bnb.optim.AdamW8bit(params, **kw)
    if kind == "adamw_fused" and device.type != "cuda":
        raise ConfigError(f"train.optim.kind=adamw_fused needs a CUDA device, this run is on {device}")
    fused = kind == "adamw_fused" or (kind == "auto" and device.type == "cuda")
    return torch.optim.AdamW(params, fused=fused, **kw) if fused else torch.optim.AdamW(params, foreach=True, **kw)


def _deepspeed_requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(cfg: TrainLoopConfig, project_dir: Path):
    """Build the ``Accelerator`` for this process.

    CPU + DeepSpeed: ``accelerate launch`` with a DeepSpeed config runs torchrun and sets
    ``ACCELERATE_USE_DEEPSPEED=true``. ``AcceleratorState._prepare_backend`` then looks for an
    accelerator device (CUDA, XPU, NPU, ...) to pick a backend; on a CPU-only machine it finds
    none and leaves ``backend=None``. DeepSpeed's ``init_distributed`` still forms the process
    group, but ``AcceleratorState`` maps ``backend is None`` to ``DistributedType.NO`` with
    ``num_processes = 1``, so every rank believes it is alone (the "world size 1 on each rank"
    seen before). Passing ``cpu=True`` does not help either: it skips the DeepSpeed branch and
    gives MULTI_CPU. The fix is to name the backend: ``InitProcessGroupKwargs(backend="gloo")``
    makes ``_prepare_backend`` keep ``gloo``, DeepSpeed initialises with it, and the state reads
    the real world size and rank. DeepSpeed itself must use its CPU accelerator
    (``DS_ACCELERATOR=cpu``), which is set here when no CUDA device exists and the variable is
    unset. Without DeepSpeed on CPU (torchrun / ``accelerate launch`` multi-CPU) ``cpu=True``
    gives MULTI_CPU with gloo.

    The process group gets ``train.dist_timeout_s`` (``_process_group_kwargs``); a group that does
    not form within it (another rank failed before getting here) is a ``PeerRankError``.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cuda = torch.cuda.is_available()
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if cuda else "no"
    backend = None
    cpu = False
    if not cuda:
        if _deepspeed_requested():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            backend = "gloo"
        else:
            cpu = True
    timeout_s = cfg.dist_timeout_s
    if _deepspeed_requested() and os.environ.get("DEEPSPEED_TIMEOUT"):  # a cluster's longer DeepSpeed setting stays
        with contextlib.suppress(ValueError):
            timeout_s = max(timeout_s, 60.0 * float(os.environ["DEEPSPEED_TIMEOUT"]))
    kwargs_handlers = [_process_group_kwargs(timeout_s, backend)]
    log_with = None if cfg.tracker == "none" else cfg.tracker
    if cfg.tracker == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("train.tracker=wandb needs the wandb package (pip install wandb); or use tensorboard")
    # DeepSpeed's own bf16 mode casts *every* parameter of the module to bf16 (its keep-fp32 rule
    # only reads ``_keep_in_fp32_modules_strict``): the LoRA, the widened input channels and the
    # modules Wan keeps in fp32 (time embedder, norms, scale_shift_table) would train in bf16 and
    # differ from the DDP path and from sampling. So under DeepSpeed the Accelerator gets
    # mixed_precision="no" (the JSON's "bf16": {"enabled": "auto"} becomes false) and the loop
    # runs the same torch.autocast(bf16) the DDP path gets (``autocast_context``); the frozen base
    # is already bf16 and the trainable weights, gradients and optimizer states stay fp32.
    if _deepspeed_requested() and mp == "fp16":
        raise ConfigError("train.mixed_precision=fp16 with DeepSpeed: DeepSpeed's fp16 mode casts every parameter, the "
                          "trainable ones included, to fp16; use bf16 (the loop's own autocast, fp32 trainable weights)")
    ds_bf16 = _deepspeed_requested() and mp == "bf16"
    try:
        acc = Accelerator(
            gradient_accumulation_steps=cfg.grad_accum,
            mixed_precision="no" if ds_bf16 else mp,
            cpu=cpu,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir / "logs")),
            kwargs_handlers=kwargs_handlers,
            step_scheduler_with_optimizer=False,  # stepped once per optimizer step, whatever the world size
        )
    except _DIST_ERRORS as e:
        rank, world = _rank_and_world()
        # only a wait that timed out is another rank's absence; a backend or network error (NCCL set-up,
        # a wrong interface) is its own cause and keeps its traceback
        if world <= 1 or not _is_timeout(e):
            raise
        raise PeerRankError(
            f"rank {rank} of {world}: the process group did not form within train.dist_timeout_s="
            f"{cfg.dist_timeout_s:g} s: another rank did not get there. It failed before (start-up, model loading, "
            "resolving train.resume: its error is in its own output, on another node in that node's log) or is "
            f"still loading; raise train.dist_timeout_s if the ranks' start-up differs by more. ({type(e).__name__}: "
            f"{e})") from e
    acc.interpdiff_bf16_autocast = ds_bf16
    if _is_deepspeed(acc):
        ds_cfg = acc.state.deepspeed_plugin.deepspeed_config
        on = [k for k in ("bf16", "fp16") if str(ds_cfg.get(k, {}).get("enabled", False)).lower() == "true"]
        if on:
            raise ConfigError(
                f"the DeepSpeed config enables {on[0]} ({on[0]}.enabled = true): DeepSpeed would cast every parameter, "
                f"the trainable ones included, to {on[0]}. Use \"{on[0]}\": {{\"enabled\": \"auto\"}} (as in "
                "accelerate_configs/deepspeed/*.json); train.mixed_precision (auto = bf16 on CUDA) sets the autocast"
            )
    if _deepspeed_requested() and acc.num_processes == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(
            f"DeepSpeed run with WORLD_SIZE={os.environ['WORLD_SIZE']} but Accelerate sees 1 process "
            "(no distributed backend was picked; see interpdiff.training.make_accelerator)"
        )
    return acc


class PeerRankError(RuntimeError):
    """This rank stopped because another rank did not join the process group in time (it failed before,
    or is too slow): a consequence, the cause is in the other rank's output."""


# what torch.distributed raises when the group does not form in time (the store's wait timed out)
_DIST_ERRORS: tuple[type[BaseException], ...] = tuple(
    e for e in (getattr(torch.distributed, "DistError", None),) if e is not None)


def _is_timeout(e: BaseException) -> bool:
    """Whether a torch.distributed error is a wait that timed out (the store's ``DistStoreError`` or a
    message saying so), not a backend or network failure."""
    store_error = getattr(torch.distributed, "DistStoreError", None)
    return (store_error is not None and isinstance(e, store_error)) or "timeout" in str(e).lower() \
        or "timed out" in str(e).lower()


def _rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size from the launcher's environment (torchrun / ``accelerate
    launch`` set them before any process group exists); ``(0, 1)`` in a single process."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


def _process_group_kwargs(timeout_s: float, backend: str | None = None):
    """Accelerate's ``InitProcessGroupKwargs`` with ``timeout_s`` (and ``backend``), both always passed:
    its ``to_kwargs`` drops values equal to the class defaults (backend nccl, timeout 600 s), and the
    group would then get torch's or DeepSpeed's own default instead (30 min on gloo)."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    handler = InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s), **({"backend": backend} if backend else {}))
    explicit = {"timeout": handler.timeout, **({"backend": backend} if backend else {})}
    handler.to_kwargs = lambda: dict(explicit)
    return handler


def uses_bf16(acc) -> bool:
    """Whether the loop computes in bf16 autocast (Accelerate's mixed precision or, under
    DeepSpeed, the loop's own autocast; see ``make_accelerator``)."""
    return acc.mixed_precision == "bf16" or getattr(acc, "interpdiff_bf16_autocast", False)


def autocast_context(acc):
    """The forward's autocast: ``acc.autocast()``, or bf16 ``torch.autocast`` under DeepSpeed."""
    if getattr(acc, "interpdiff_bf16_autocast", False):
        return torch.autocast(acc.device.type, torch.bfloat16)
    return acc.autocast()


def _is_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def _zero_stage(acc) -> int:
    if not _is_deepspeed(acc):
        return 0
    return int(acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0))


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], acc):
    """Full values of (possibly ZeRO-3 partitioned) parameters inside the block."""
    if _zero_stage(acc) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def _move(batch: Any, device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_move(v, device) for v in batch)
    return batch


def _default_batch_size(batch: dict) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise ValueError("cannot infer the batch size: no tensor in the batch (pass TrainSpec.batch_size)")


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def check_one_batch(model: nn.Module, loss_fn: LossFn, batch: dict, step: int, autocast) -> float:
    """Forward + backward on one batch: finite loss, every trainable parameter gets a finite
    gradient. Gradients are cleared afterwards. Returns the loss."""
    named = trainable_named_parameters(model)
    if not named:
        raise RuntimeError("one-batch check: the model has no trainable parameter (requires_grad=False everywhere)")
    with autocast():
        loss, _ = loss_fn(model, batch, step)
    if loss.dim() != 0 or not torch.isfinite(loss):
        raise RuntimeError(f"one-batch check: the loss is {loss.detach().cpu().tolist()}, expected a finite scalar")
    loss.backward()
    none = [n for n, p in named if p.grad is None]
    bad = [n for n, p in named if p.grad is not None and not torch.isfinite(p.grad).all()]
    for _, p in named:
        p.grad = None
    if none:
        raise RuntimeError(
            f"one-batch check: {len(none)} trainable parameters get no gradient, e.g. {none[:4]} "
            "(unused LoRA target or detached input)"
        )
    if bad:
        raise RuntimeError(f"one-batch check: non-finite gradients in {bad[:4]}")
    return float(loss.detach())


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite losses / gradients (see ``TrainLoopConfig.max_nonfinite_steps``)."""


def check_finite_weights(acc, model: nn.Module, step: int) -> None:
    """Refuse to checkpoint non-finite trainable weights (checked on every rank, decided together):
    rotation would otherwise delete the last good checkpoints. ZeRO-3 placeholders (empty) pass."""
    bad = [n for n, p in trainable_named_parameters(model) if p.numel() and not bool(torch.isfinite(p).all())]
    n_bad = acc.reduce(torch.tensor([float(len(bad))], device=acc.device), reduction="sum")
    if float(n_bad) > 0:
        raise NonFiniteError(f"step {step}: {int(float(n_bad))} trainable tensor(s) hold non-finite values "
                             f"(this rank: {bad[:3]}); not saving a checkpoint (the earlier ones are kept)")


class MetricsWriter:
    """Append-only ``metrics.csv`` + ``metrics.jsonl`` in the run folder (main process only)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.csv_path = run_dir / "metrics.csv"
        self.jsonl_path = run_dir / "metrics.jsonl"
        self.fields: list[str] | None = None
        if enabled and self.csv_path.exists():
            with open(self.csv_path) as f:
                header = f.readline().strip()
                self.fields = header.split(",") if header else None

    def truncate_after(self, step: int) -> int:
        """Drop the rows logged after ``step`` (a resumed run logs those steps again); returns how
        many were dropped. Both files are rewritten atomically."""
        if not self.enabled:
            return 0
        dropped = 0
        if self.jsonl_path.exists():
            keep = []
            for line in self.jsonl_path.read_text().splitlines():
                try:
                    later = int(json.loads(line).get("step", 0)) > step
                except (ValueError, AttributeError):
                    later = False  # not a row of ours: keep it
                if later:
                    dropped += 1
                else:
                    keep.append(line)
            atomic_write_text(self.jsonl_path, "".join(x + "\n" for x in keep))
        if self.csv_path.exists():
            with open(self.csv_path, newline="") as f:
                rows = list(csv.reader(f))
            if rows and "step" in rows[0]:
                i = rows[0].index("step")
                body = [r for r in rows[1:] if not (len(r) > i and r[i].isdigit() and int(r[i]) > step)]
                buf = io.StringIO()
                csv.writer(buf).writerows([rows[0], *body])
                atomic_write_text(self.csv_path, buf.getvalue())
        return dropped

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.fields is None:
            self.fields = list(row)
            with open(self.csv_path, "w", newline="") as f:
                csv.writer(f).writerow(self.fields)
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in self.fields])


# --- checkpointing -----------------------------------------------------------------------------


def _register_hooks(acc, spec: TrainSpec, ema: EMA | None = None) -> None:
    """Save/load pre-hooks: trainable weights only, in the checkpoint's ``trainable/`` folder
    (and, with an EMA, its weights in the same format in ``trainable_ema/``, ready to sample)."""

    def save_hook(models, weights, output_dir):
        unwrapped = acc.unwrap_model(models[0]) if models else spec.model
        params = [p for _, p in trainable_named_parameters(unwrapped)]
        with gathered(params, acc):
            if acc.is_main_process:
                spec.save_trainable(unwrapped, Path(output_dir) / TRAINABLE_DIR)
                if ema is not None:
                    with ema.swapped_in():
                        spec.save_trainable(unwrapped, Path(output_dir) / EMA_DIR)
        weights.clear()  # the frozen base is rebuilt from its source, never saved per checkpoint

    def load_hook(models, input_dir):
        # Under DeepSpeed ``models`` is empty: the engine restores its own module and optimizer.
        while models:
            m = models.pop()
            spec.load_trainable(acc.unwrap_model(m), Path(input_dir) / TRAINABLE_DIR)

    acc.register_save_state_pre_hook(save_hook)
    acc.register_load_state_pre_hook(load_hook)


def save_checkpoint_dir(acc, spec: TrainSpec, state: TrainState, ckpt_root: Path, keep_last: int, cfg_meta: dict) -> Path:
    """Write ``ckpt_root/step_XXXXXXXX`` atomically (temp folder + rename) and rotate."""
    name = f"{CKPT_PREFIX}{state.step:08d}"
    final = ckpt_root / name
    tmp = ckpt_root / f"{TMP_PREFIX}{name}"
    if acc.is_main_process:
        for left in ckpt_root.glob(f"{TMP_PREFIX}*"):  # this step's, or partial saves a failure or kill left
            shutil.rmtree(left, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    kwargs = {"exclude_frozen_parameters": True} if _is_deepspeed(acc) else {}
    try:
        acc.save_state(str(tmp), **kwargs)
        write_data_state(tmp, acc.process_index, acc.num_processes, state,
                         spec.data_settings() if spec.data_settings is not None else None)
    except Exception as e:
        full = getattr(e, "errno", None) == 28 or "unexpected pos" in str(e) or "No space left" in str(e)
        raise CheckpointError(f"saving the checkpoint of step {state.step} into {tmp} failed "
                              f"({type(e).__name__}: {str(e)[:300]})" + ("; the disk looks full" if full else "")
                              + "; the earlier checkpoints are untouched (the partial folder is removed by the next "
                              "save)") from e
    acc.wait_for_everyone()
    if acc.is_local_main_process:
        # torch.save / DeepSpeed / safetensors do not fsync: flush this node's writes (page cache
        # is per node, so one process per node covers every rank's files) before the rename
        # makes the checkpoint visible and rotation deletes older ones
        try:
            fsync_tree(tmp)
        except OSError as e:
            raise CheckpointError(f"flushing the checkpoint of step {state.step} in {tmp} to disk failed ({e}); the "
                                  "earlier checkpoints are untouched") from e
    acc.wait_for_everyone()
    if acc.is_main_process:
        meta = dict(spec.meta, step=state.step, code_version=code_version(), **cfg_meta)
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1, default=str))
        atomic_write_text(tmp / "train_state.json", json.dumps(state.state_dict(), indent=1))
        if final.exists():  # same step saved twice (e.g. final save right after a periodic one)
            remove_checkpoint(final)
        os.replace(tmp, final)
        fsync_dir(ckpt_root)  # the rename is durable before any older checkpoint is deleted
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            remove_checkpoint(old)
        for left in ckpt_root.glob(f"{DELETING_PREFIX}*"):  # deletes interrupted by a kill
            shutil.rmtree(left, ignore_errors=True)
    acc.wait_for_everyone()
    return final


def _as_json(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))  # meta.json's view of a value (tuples -> lists, paths -> str)


def check_resume_meta(path: Path, spec: TrainSpec) -> None:
    """Refuse to resume ``path`` when its ``meta.json`` disagrees with this run on any of
    ``spec.resume_keys`` (e.g. a phase-1 run resumed by ``train_phase2.py``, another LoRA rank,
    another distillation target): the message names each key with both values. A key the
    checkpoint does not record (written by older code) is not compared."""
    if not spec.resume_keys:
        return
    f = Path(path) / "meta.json"
    try:
        saved = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{f}: cannot read the checkpoint's metadata ({e})") from e
    missing = object()

    def get(d: Any, key: str) -> Any:  # dotted keys reach into dicts: "lora.rank"
        for part in key.split("."):
            if not isinstance(d, dict) or part not in d:
                return missing
            d = d[part]
        return d

    diff = []
    for k in spec.resume_keys:
        mine, theirs = get(_as_json(spec.meta), k), get(saved, k)
        if theirs is missing:  # written before the key was recorded: nothing to compare
            continue
        if k.endswith("target_modules") and isinstance(mine, list) and isinstance(theirs, list):
            mine, theirs = sorted(mine), sorted(theirs)  # a set of module-name suffixes: order is not a difference
        if theirs != mine:
            if isinstance(mine, dict) and isinstance(theirs, dict):
                sub = sorted(x for x in set(mine) | set(theirs) if mine.get(x) != theirs.get(x))
                diff.append(", ".join(f"{k}.{x} = {_short(theirs.get(x))} in the checkpoint, "
                                      f"{_short(mine.get(x))} in this run" for x in sub[:6]))
            else:
                diff.append(f"{k} = {_short(theirs)} in the checkpoint, {_short(None if mine is missing else mine)} "
                            "in this run")
    if diff:
        raise CheckpointError(f"cannot resume {path}: it was written by a different run:\n  " + "\n  ".join(diff)
                              + "\n(resume with the checkpoint's settings, or start a new train.run_dir)")


def _ckpt_step(path: Path) -> int:
    name = Path(path).name
    try:
        return int(name[len(CKPT_PREFIX):]) if name.startswith(CKPT_PREFIX) else -1
    except ValueError:
        return -1


def newer_checkpoints(run_dir: Path, resume_path: Path) -> list[Path]:
    """The checkpoints of ``run_dir`` with a later step than ``resume_path`` (which a run resumed
    from it would overwrite or rotate out)."""
    step = _ckpt_step(resume_path)
    if step < 0:
        try:
            step = int(json.loads((Path(resume_path) / "train_state.json").read_text())["step"])
        except (OSError, ValueError, KeyError):
            return []
    return [p for p in list_checkpoints(Path(run_dir) / "checkpoints") if _ckpt_step(p) > step]


def rewind_run(run_dir: Path, newer: list[Path]) -> Path:
    """``train.rewind``: move ``newer`` checkpoints to ``checkpoints/rewound_<time>/`` and copy the
    metrics files there (the resumed run truncates them after its step)."""
    dest = Path(run_dir) / "checkpoints" / time.strftime("rewound_%Y%m%d-%H%M%S")
    dest.mkdir(parents=True, exist_ok=False)
    for name in ("metrics.csv", "metrics.jsonl"):
        if (Path(run_dir) / name).is_file():
            shutil.copy2(Path(run_dir) / name, dest / name)
    for p in newer:
        os.replace(p, dest / p.name)
    fsync_tree(dest)
    fsync_dir(dest.parent)
    return dest


def _note_schedule_change(acc, path: Path, cfg: TrainLoopConfig) -> None:
    """The LR schedule is a function of ``train.max_steps``: say so when a resume changes it."""
    try:
        old = json.loads((Path(path) / "meta.json").read_text()).get("max_steps")
    except (OSError, ValueError):
        return
    if old is None or int(old) == cfg.max_steps or cfg.optim.schedule == "constant":
        return
    try:  # only for the message: a damaged train_state.json is named by load_checkpoint_dir, which runs next
        step = int(json.loads((Path(path) / "train_state.json").read_text()).get("step", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        step = 0
    acc.print(f"[train] note: the checkpoint was trained toward train.max_steps={old}, this run to {cfg.max_steps}: "
              f"the {cfg.optim.schedule} LR schedule is recomputed (at step {step}: lr factor "
              f"{lr_lambda(step, cfg.optim, int(old)):.3g} -> {lr_lambda(step, cfg.optim, cfg.max_steps):.3g})")


def _short(v: Any, n: int = 120) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


def _older_hint(path: Path) -> str:
    """What to do about a damaged checkpoint: resume the newest older one (with ``train.rewind``)."""
    older = [p.name for p in list_checkpoints(Path(path).parent) if p.name < Path(path).name]
    return (f"; resume an older one with --resume {Path(path).parent / older[-1]} train.rewind=true" if older
            else "; no older checkpoint is in that folder")


def _damaged(path: Path, f: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"cannot load checkpoint {path}: {f} {problem}: a file of it is missing or damaged"
                           f"{_older_hint(path)}")


RNG_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")  # what Accelerate restores on every device


def _saved_world_size(path: Path) -> int | None:
    """How many processes wrote checkpoint ``path``: from rank 0's data position, else from the
    per-rank RNG files Accelerate wrote; ``None`` when neither is there."""
    try:
        return int(json.loads((path / DATA_STATE_FILE.format(rank=0)).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    ranks = [int(r) for r in (f.stem.rsplit("_", 1)[1] for f in path.glob("random_states_*.pkl")) if r.isdigit()]
    return max(ranks) + 1 if ranks else None


def _check_random_states(acc, path: Path) -> tuple[Path, dict | None]:
    """Load this rank's ``random_states_{rank}.pkl`` as Accelerate will (small: the RNG states) and
    refuse a damaged or missing one: Accelerate's ``load_state`` ignores any failure there and the
    run would go on with other RNG states. Missing is fine only for a rank the checkpoint's run did
    not have (the world grew: that rank keeps its fresh seed, ``read_data_state`` reports the change)."""
    from accelerate.utils import RNG_STATE_NAME
    from accelerate.utils import load as accelerate_load

    f = path / f"{RNG_STATE_NAME}_{acc.process_index}.pkl"
    expected = f"expected the RNG states Accelerate's save_state wrote for rank {acc.process_index}"
    if not f.exists():
        saved = _saved_world_size(path)
        if saved is not None and acc.process_index >= saved:
            return f, None
        run = f"{saved} process{'es' if saved != 1 else ''}" if saved else "an unknown number of processes"
        raise _damaged(path, f, f"is missing (the checkpoint was written by {run}); {expected}")
    try:
        states = accelerate_load(f)  # the loader (and allow-list) Accelerate's load_state uses
    except Exception as e:
        problem = file_problem(f, "torch")
        if problem:
            raise _damaged(path, f, problem) from e
        # intact, but Accelerate's loader refuses its contents (e.g. numpy 1.x RNG state pickles under
        # numpy 2 and the weights-only allow-list): Accelerate would skip it too; say so, go on
        acc.print(f"[train] warning: {f} is intact but cannot be loaded here ({type(e).__name__}: {str(e)[:200]}); "
                  "the RNG states are not restored, the resumed run will not repeat the uninterrupted one")
        return f, None
    missing = [k for k in RNG_KEYS if k not in states] if isinstance(states, dict) else list(RNG_KEYS)
    if missing:
        keys = f" with keys {sorted(map(str, states))[:8]}" if isinstance(states, dict) else ""
        raise _damaged(path, f, f"lacks {missing} (holds a {type(states).__name__}{keys}); {expected}")
    return f, states


def _deepspeed_files(acc, path: Path) -> list[Path]:
    """The engine files this rank's ``engine.load_checkpoint`` reads: the model states (ZeRO-1/2: the
    shared ``mp_rank_00_model_states.pt``; ZeRO-3: this rank's own) and this rank's ZeRO optimizer
    shard (all shards with ``zero.elastic_checkpoint``), named by the engine's own helpers."""
    from accelerate.utils import MODEL_NAME

    out: list[Path] = []
    for i, engine in enumerate(acc._models):
        tag = MODEL_NAME if i == 0 else f"{MODEL_NAME}_{i}"  # the ckpt_id Accelerate's load_state passes
        try:
            out.append(Path(engine._get_ckpt_name(str(path), tag)))
            if engine.zero_optimization() and not engine.zero_nvme_offload_optimizer() \
                    and not engine.load_universal_checkpoint():
                if engine.zero_elastic_checkpoint():
                    out += sorted((path / tag).glob("*zero_pp_rank_*_optim_states.pt"))
                else:
                    own = Path(engine._get_zero_ckpt_name(str(path), tag))
                    # DeepSpeed falls back to the old name pattern when the new one is absent
                    legacy = own.with_name(own.name.replace("_optim_states.pt", "optim_states.pt"))
                    out.append(legacy if not own.exists() and legacy.exists() else own)
        except (AttributeError, TypeError):  # a DeepSpeed without these helpers: every engine file of the folder
            out += sorted((path / tag).glob("*.pt"))
    return out


def _numbered(path: Path, name: str, n: int) -> list[tuple[Path, str]]:
    """Accelerate's names for the ``n`` optimizers / schedulers of a save: ``name.bin``, ``name_1.bin``, ..."""
    return [(path / (f"{name}.bin" if i == 0 else f"{name}_{i}.bin"), "torch") for i in range(n)]


def _files_this_rank_reads(acc, path: Path) -> list[tuple[Path, str]]:
    """(file, kind) for each file ``acc.load_state`` (with the hooks of ``_register_hooks``) reads on
    this rank, in the order Accelerate reads them; the RNG states and the data position are checked
    on their own."""
    from accelerate.utils import OPTIMIZER_NAME, SCALER_NAME, SCHEDULER_NAME, DeepSpeedSchedulerWrapper

    files: list[tuple[Path, str]] = []
    ds = _is_deepspeed(acc)
    saved = _saved_world_size(path)
    elastic = ds and any(getattr(e, "zero_elastic_checkpoint", lambda: False)() for e in acc._models)
    if ds and not elastic and saved is not None and saved != acc.num_processes:  # ZeRO shards: one per rank
        raise CheckpointError(f"cannot load checkpoint {path}: it was written by {saved} process"
                              f"{'es' if saved != 1 else ''}, this run has {acc.num_processes}; DeepSpeed's ZeRO "
                              "checkpoints resume on the same number of processes (or convert it with DeepSpeed's "
                              "zero_to_fp32 / universal checkpoint tools)")
    if ds:  # the engine restores module + optimizer (+ its LR schedule); the load hook reads nothing
        files += [(f, "torch") for f in _deepspeed_files(acc, path)]
    else:
        if acc._models:  # the load hook: spec.load_trainable reads the trainable weights on every rank
            t = path / TRAINABLE_DIR
            if not t.is_dir():
                raise _damaged(path, t, "is missing; expected the trainable weights (spec.save_trainable)")
            files += [(f, file_kind(f)) for f in sorted(t.rglob("*")) if f.is_file() and file_kind(f)]
        files += _numbered(path, OPTIMIZER_NAME, len(acc._optimizers))
    scheds = [s for s in acc._schedulers if not (ds and isinstance(s, DeepSpeedSchedulerWrapper))]
    files += _numbered(path, SCHEDULER_NAME, len(scheds))
    if acc.scaler is not None:
        files.append((path / SCALER_NAME, "torch"))
    files += [(path / f"custom_checkpoint_{i}.pkl", "torch") for i in range(len(acc._custom_objects))]
    files += [(path / n, "json") for n in ("meta.json", "train_state.json") if (path / n).exists()]
    return files


def check_checkpoint_files(acc, path: Path) -> tuple[Path, dict | None]:
    """Check every file this rank will read from checkpoint ``path`` before anything is loaded (a
    damaged one would otherwise surface as a loader error naming only the folder, or, for the RNG
    states, not at all); a ``CheckpointError`` names the file, what is wrong and the older
    checkpoint to resume. Returns this rank's RNG-state file and its (loaded) states."""
    path = Path(path)
    for f, kind in _files_this_rank_reads(acc, path):
        problem = file_problem(f, kind)
        if problem:
            raise _damaged(path, f, problem)
    rng = _check_random_states(acc, path)
    f = path / DATA_STATE_FILE.format(rank=acc.process_index)  # the file read_data_state will read
    src = f if f.is_file() else path / DATA_STATE_FILE.format(rank=0)
    if src.is_file():
        try:
            _read_position(src)
        except CheckpointError as e:
            raise CheckpointError(f"{e}{_older_hint(path)}") from e
    return rng


def load_checkpoint_dir(acc, path: Path) -> None:
    """``acc.load_state`` of a checkpoint folder. Every file this rank reads is checked first
    (``check_checkpoint_files``: the error names the file); any later failure is a
    ``CheckpointError`` naming the folder, the cause and the older checkpoints to fall back on."""
    rng_file, rng = check_checkpoint_files(acc, path)
    kwargs = {"load_module_strict": False} if _is_deepspeed(acc) else {}
    try:
        acc.load_state(str(path), **kwargs)
    except CheckpointError:
        raise
    except Exception as e:
        import pickle

        damaged = isinstance(e, (OSError, EOFError, pickle.UnpicklingError)) or any(
            s in str(e) for s in ("PytorchStreamReader", "zip archive", "header", "Number of custom checkpoints"))
        what = f"a file of it is missing or damaged{_older_hint(path)}" if damaged else "see the cause above"
        raise CheckpointError(f"cannot load checkpoint {path} ({type(e).__name__}: {str(e)[:400]}): {what}") from e
    # Accelerate swallows any failure while restoring the RNG states: make sure it did restore them
    if rng is not None and not (torch.equal(torch.get_rng_state(), rng["torch_manual_seed"])
                                and random.getstate() == rng["random_state"]):
        raise CheckpointError(f"cannot load checkpoint {path}: Accelerate did not restore the RNG states of {rng_file} "
                              f"(the resumed run would not repeat the uninterrupted one){_older_hint(path)}")


DATA_STATE_FILE = "data_state_rank{rank}.json"


def write_data_state(folder: Path, rank: int, world: int, state: TrainState, settings: dict | None = None) -> None:
    """This rank's data position (``epoch``, ``batches_in_epoch``) and the stream's ``settings``.
    Accelerate saves the registered ``TrainState`` from the main process only, but ranks read
    different shards and, in epoch mode, consume different numbers of micro-batches per epoch:
    each rank keeps its own position."""
    d = {"rank": rank, "world_size": world, "epoch": state.epoch, "batches_in_epoch": state.batches_in_epoch,
         "settings": settings}
    atomic_write_text(Path(folder) / DATA_STATE_FILE.format(rank=rank), json.dumps(d))


def _read_position(f: Path) -> dict:
    try:
        d = json.loads(f.read_text())
        return {"epoch": int(d["epoch"]), "batches_in_epoch": int(d["batches_in_epoch"]),
                "world_size": int(d["world_size"]), "settings": d.get("settings")}
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f}: unreadable data position ({e}); expected keys epoch, batches_in_epoch, world_size") from e


def read_data_state(folder: Path, rank: int, world: int, state: TrainState, settings: dict | None = None,
                    policy: str = "next_epoch") -> str:
    """Restore this rank's data position from ``write_data_state``'s file; returns what was done.

    A position is a count of micro-batches into an epoch, so it names the same batches only for the
    same stream: the same world size and the same ``settings`` (shard list, seeds, shuffles,
    workers, batch size). When they match, the position is restored exactly. When they differ
    (or this rank has no file because the world grew: then rank 0's file is read), an epoch-mode
    stream cannot continue where it stopped without repeating or dropping samples silently, so
    ``policy`` decides, and the returned message names the changes: ``next_epoch`` starts the next
    epoch (the rest of the interrupted one is not read), ``restart_epoch`` reads the interrupted
    epoch again from its start, ``error`` raises ``CheckpointError``. A resampled stream is
    reseeded from its position anyway: its own position is kept. A checkpoint without any file
    (older runs) keeps the main-process position Accelerate restored."""
    f = Path(folder) / DATA_STATE_FILE.format(rank=rank)
    src = f
    if not f.is_file():
        src = Path(folder) / DATA_STATE_FILE.format(rank=0)
        if rank == 0 or not src.is_file():
            return f"no {f.name}: main-process data position"
    d = _read_position(src)
    changes = []
    if d["world_size"] != world:
        changes.append(f"world_size {d['world_size']} -> {world}")
    saved = d["settings"]
    if settings is not None and saved is not None:
        changes += [f"{k} {saved.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(settings) | set(saved))
                    if saved.get(k) != settings.get(k)]
    epoch, pos = d["epoch"], d["batches_in_epoch"]
    resampled = bool((settings or saved or {}).get("resampled", False))
    if not changes or resampled or (pos == 0 and src == f):
        if src != f:  # a resampled stream, world grown: reseed from rank 0's position
            state.epoch, state.batches_in_epoch = epoch, pos
            return f"rank {rank}: no {f.name}, rank 0's position (epoch {epoch}, batch {pos}; {', '.join(changes)})"
        state.epoch, state.batches_in_epoch = epoch, pos
        why = "resampled, reseeded" if resampled else "at an epoch boundary"
        note = f" (stream changed: {', '.join(changes)}; {why})" if changes else ""
        return f"rank {rank}: epoch {epoch}, batch {pos}{note}"
    what = f"{src.name} holds epoch {epoch}, batch {pos} of another data stream ({'; '.join(changes)})"
    if policy == "error":
        raise CheckpointError(f"{what}: resuming at that position would repeat or drop samples. Restore the "
                              f"settings, or set train.data_resume=next_epoch (skip the rest of epoch {epoch}) or "
                              f"restart_epoch (read epoch {epoch} again from its start)")
    if policy == "restart_epoch":
        state.epoch, state.batches_in_epoch = epoch, 0
        return f"rank {rank}: {what}; train.data_resume=restart_epoch: epoch {epoch} from its start"
    if policy != "next_epoch":
        raise ValueError(f"read_data_state: policy={policy!r} is not one of {DATA_RESUME}")
    state.epoch, state.batches_in_epoch = epoch + 1, 0
    return f"rank {rank}: {what}; train.data_resume=next_epoch: epoch {epoch + 1} from its start"


# --- the loop ----------------------------------------------------------------------------------


def _micro_batches(spec: TrainSpec, state: TrainState) -> Iterator[dict]:
    """Endless stream of this rank's micro-batches, starting at the saved data position."""
    skip = state.batches_in_epoch
    empty_epochs = 0
    while True:
        n = 0
        for batch in spec.batches(state.epoch, skip):
            n += 1
            state.batches_in_epoch = skip + n
            yield batch
        if n > 0:
            empty_epochs = 0
        elif skip == 0:
            empty_epochs += 1
            if empty_epochs > 1:
                raise RuntimeError(f"the data stream yielded no batch in epochs {state.epoch - 1} and {state.epoch}: "
                                   "empty shards, or fewer samples on this rank than the batch size (the data "
                                   "loader's warnings name any skipped samples)")
        skip = 0
        state.epoch += 1
        state.batches_in_epoch = 0


def train(cfg: TrainLoopConfig, spec: TrainSpec, full_config: Any = None) -> TrainResult:
    """Run (or resume) a training run; see the module docstring. Returns the final state."""
    from tqdm.auto import tqdm

    run_dir = Path(cfg.run_dir)
    resume_path = resolve_resume(cfg.resume, run_dir)  # raises before any heavy work
    check_run_dir(cfg)
    set_deterministic(cfg.deterministic)  # before the model's first cuBLAS call
    acc = make_accelerator(cfg, run_dir)
    if acc.num_processes > 1 and cfg.resume:
        # every rank loads what the main process resolved (a stale directory listing on one node of a
        # shared filesystem must not make ranks load different steps)
        from accelerate.utils import broadcast_object_list

        mine = str(resume_path) if resume_path is not None else None
        main_path = broadcast_object_list([mine])[0]
        if main_path != mine:
            raise CheckpointError(f"train.resume={cfg.resume!r}: rank {acc.process_index} resolved {resume_path}, "
                                  f"the main process {main_path} (a shared filesystem that differs between nodes?)")
    device = acc.device
    seed_everything(cfg.seed * acc.num_processes + acc.process_index)
    if device.type == "cuda" and cfg.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    newer: list[Path] = []
    if resume_path is not None:
        check_resume_meta(resume_path, spec)
        _note_schedule_change(acc, resume_path, cfg)
        newer = newer_checkpoints(run_dir, resume_path)
        if newer and not cfg.rewind:
            raise CheckpointError(
                f"train.resume={cfg.resume!r}: {run_dir / 'checkpoints'} holds newer checkpoints "
                f"({', '.join(p.name for p in newer)}); training on from {Path(resume_path).name} would replace them "
                "and drop their metrics rows. Resume the newest (--resume latest), or pass train.rewind=true to move "
                "them and the metrics files to checkpoints/rewound_<time>/ once this one has loaded")
        acc.wait_for_everyone()

    if cfg.ema_decay > 0 and _zero_stage(acc) == 3:
        raise ConfigError("train.ema_decay > 0 is not supported with ZeRO-3 (parameters are partitioned); use ZeRO-2")
    model = spec.model
    if cfg.gradient_checkpointing and spec.enable_gradient_checkpointing is not None:
        spec.enable_gradient_checkpointing(model)
    named = trainable_named_parameters(model)
    if not named:
        raise RuntimeError("train: the model has no trainable parameter")
    # trainable weights in fp32 (autocast computes in bf16); frozen ones keep their dtype
    for _, p in named:
        p.data = p.data.float()
    model.to(device)
    state = TrainState()
    ema = EMA(named, cfg.ema_decay) if cfg.ema_decay > 0 else None

    n_samples = spec.batch_size or _default_batch_size
    stream = _micro_batches(spec, state)
    first_batch = None
    if cfg.check_batch and resume_path is None:
        first_batch = _move(next(stream), device)
        bf16 = uses_bf16(acc)
        try:
            loss0 = check_one_batch(
                model, spec.loss_fn, first_batch, 0, lambda: torch.autocast(device.type, torch.bfloat16, enabled=bf16)
            )
        except torch.OutOfMemoryError as e:
            where = ("the whole model on every GPU: ZeRO-3 shards it only in accelerate's prepare, after this check"
                     if _zero_stage(acc) == 3 else "the same memory as a training step")
            raise torch.OutOfMemoryError(
                f"one-batch check (train.check_batch=true) ran out of device memory before training started; it "
                f"needs {where}. Lower the batch or clip size, or skip the check with train.check_batch=false. "
                f"({e})") from e
        acc.print(f"[train] one-batch check passed: loss {loss0:.5f}, {len(named)} trainable tensors")
    if acc.is_main_process and resume_path is None:
        # only now, with the model built and (train.check_batch) a batch read and checked: a run that
        # fails at start-up leaves the outputs train.overwrite would replace, and the old config.yaml
        if cfg.overwrite:
            removed = clear_run_outputs(run_dir)
            if removed:
                acc.print(f"[train] train.overwrite=true: removed {', '.join(removed)} from {run_dir}")
        if full_config is not None:  # a resumed run writes it once the load succeeded
            save_config(full_config, run_dir)
    acc.wait_for_everyone()

    optimizer = build_optimizer([p for _, p in named], cfg.optim, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, cfg.optim, cfg.max_steps))
    if _is_deepspeed(acc):
        ds_cfg = acc.state.deepspeed_plugin.deepspeed_config
        ds_cfg["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds_cfg["gradient_clipping"] = max(cfg.optim.grad_clip, 0.0)  # the engine clips; ours is skipped
    model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
    _register_hooks(acc, spec, ema)
    acc.register_for_checkpointing(state)
    if ema is not None:
        acc.register_for_checkpointing(ema)
    if resume_path is not None:
        load_checkpoint_dir(acc, resume_path)
        how = read_data_state(resume_path, acc.process_index, acc.num_processes, state,
                              spec.data_settings() if spec.data_settings is not None else None, cfg.data_resume)
        if newer and acc.is_main_process:  # train.rewind (checked above): only now that the older one loaded
            kept = rewind_run(run_dir, newer)
            acc.print(f"[train] train.rewind=true: moved {', '.join(p.name for p in newer)} and the metrics files to {kept}")
        acc.wait_for_everyone()
        acc.print(f"[train] resumed from {resume_path} at step {state.step} (epoch {state.epoch}, batch "
                  f"{state.batches_in_epoch} on the main process; data position: {how})")
        if "another data stream" in how and not acc.is_main_process:
            print(f"[train] rank {acc.process_index}: {how}", flush=True)
        stream = _micro_batches(spec, state)
        first_batch = None
        if acc.is_main_process and full_config is not None:
            save_config(full_config, run_dir)
    elif cfg.resume == "latest":
        acc.print(f"[train] resume=latest: no checkpoint under {run_dir / 'checkpoints'}, starting a new run")

    if acc.is_main_process and cfg.tracker != "none":
        acc.init_trackers("train", config=_flat_config(full_config))
    metrics = MetricsWriter(run_dir, acc.is_main_process)
    if resume_path is not None:
        n_drop = metrics.truncate_after(state.step)
        if n_drop:
            acc.print(f"[train] metrics: dropped {n_drop} rows logged after step {state.step} (they are logged again)")
    ckpt_root = run_dir / "checkpoints"
    unwrapped = acc.unwrap_model(model)
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not acc.is_main_process, desc="train", dynamic_ncols=True)

    losses: list[float] = []
    clip_params = [p for _, p in trainable_named_parameters(unwrapped)]  # same objects every step
    loss_sum = torch.zeros((), device=device)
    n_micro = 0
    extra_sums: dict[str, Any] = {}
    samples_since = 0
    # Per-step numbers stay on the device until a log / checkpoint / the end needs them: the loop
    # never waits for the GPU in between, so the host prepares the next batch while it computes.
    pending: list[tuple[list[str], torch.Tensor]] = []
    since_log: list[tuple[float, int, dict[str, float]]] = []  # (loss, global samples, metrics) per step

    def flush() -> None:
        """Copy the pending per-step vectors to the host in one transfer (one sync)."""
        if not pending:
            return
        flat = torch.cat([v for _, v in pending]).double().cpu().tolist()
        i = 0
        for names, v in pending:
            row = flat[i : i + v.numel()]
            i += v.numel()
            step_loss = row[0] / acc.num_processes
            losses.append(step_loss)
            n = int(round(row[1]))
            state.samples_seen += n
            since_log.append((step_loss, n, {k: x / acc.num_processes for k, x in zip(names, row[2:])}))
        pending.clear()

    t_last = time.perf_counter()
    steps_since = 0
    model.train()
    end_step = min(cfg.max_steps, cfg.stop_at_step) if cfg.stop_at_step > 0 else cfg.max_steps
    ds = _is_deepspeed(acc)
    nonfinite_run = 0  # consecutive skipped steps
    while state.step < end_step:
        batch = first_batch if first_batch is not None else _move(next(stream), device)
        first_batch = None
        skip = False
        grad_norm = None
        with acc.accumulate(model):
            with autocast_context(acc):
                loss, extra = spec.loss_fn(model, batch, state.step)
            if ds:
                # the engine applies the update inside its step, where it cannot be skipped: a non-finite
                # loss on any rank stops the run here, before that step (weights and checkpoints stay finite)
                bad = acc.reduce((~torch.isfinite(loss.detach().float())).float().reshape(1), reduction="sum")
                if float(bad) > 0:
                    raise NonFiniteError(f"step {state.step + 1}: non-finite loss on {int(float(bad))} rank(s) under "
                                         "DeepSpeed; stopped before the update (the last checkpoint is intact: resume "
                                         "from it, e.g. with a lower train.optim.lr)")
            acc.backward(loss)
            if acc.sync_gradients and not ds:
                # the global norm of the (all-reduced, so identical on every rank) gradients: clipping
                # and the finiteness check in one pass; one host sync per optimizer step
                grad_norm = acc.clip_grad_norm_(clip_params, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
                skip = not bool(torch.isfinite(grad_norm))
            if not skip:
                optimizer.step()
                if acc.sync_gradients:
                    scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().float()
        n_micro += 1
        for k, v in extra.items():  # floats or (device) tensors; tensors are not synchronised here
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            extra_sums[k] = extra_sums.get(k, 0.0) + v
        samples_since += n_samples(batch)
        if not acc.sync_gradients:
            continue
        if skip:  # no update, no LR step, no EMA; the step is drawn again with the next batch
            state.skipped_steps += 1
            nonfinite_run += 1
            acc.print(f"[train] step {state.step + 1}: non-finite gradient norm ({float(grad_norm)}), loss "
                      f"{float(loss_sum / n_micro):.4g} on this rank: update skipped ({nonfinite_run} in a row, "
                      f"{state.skipped_steps} in all)")
            if nonfinite_run >= max(1, cfg.max_nonfinite_steps):
                raise NonFiniteError(f"{nonfinite_run} optimizer steps in a row had a non-finite loss or gradient "
                                     f"(train.max_nonfinite_steps={cfg.max_nonfinite_steps}); stopped at step "
                                     f"{state.step} without saving (the last checkpoint is intact)")
            loss_sum = torch.zeros((), device=device)
            n_micro = 0
            extra_sums = {}
            samples_since = 0
            continue
        nonfinite_run = 0
        if grad_norm is not None:
            extra_sums["grad_norm"] = grad_norm.detach().float() * n_micro  # logged as the mean over micro-batches
        # --- one optimizer step done ---
        state.step += 1
        steps_since += 1
        if ema is not None:
            ema.update()
        # loss, samples and the task's metrics (each averaged over micro-batches) summed over ranks
        # in one all-reduce; loss and metrics are divided by the world size in flush() (the mean)
        names = sorted(extra_sums)
        vec = torch.stack(
            [loss_sum / n_micro, torch.full((), float(samples_since), device=device)]
            + [torch.as_tensor(extra_sums[k], device=device).float() / n_micro for k in names]
        )
        pending.append((names, acc.reduce(vec, reduction="sum")))
        bar.update(1)
        loss_sum = torch.zeros((), device=device)
        n_micro = 0
        extra_sums = {}
        samples_since = 0
        if state.step % cfg.log_every == 0 or state.step == end_step:
            flush()
            dt = (time.perf_counter() - t_last) / max(1, steps_since)
            n_log = max(1, len(since_log))
            keys = sorted({k for _, _, ex in since_log for k in ex})
            row = {
                "step": state.step,
                "loss": sum(x for x, _, _ in since_log) / n_log,  # mean over the steps since the last log
                "lr": scheduler.get_last_lr()[0],
                "step_time_s": dt,
                "samples_per_s": sum(n for _, n, _ in since_log) / max(dt * max(1, steps_since), 1e-9),
                "samples_seen": state.samples_seen,
                "skipped_steps": state.skipped_steps,
                **{k: sum(ex.get(k, 0.0) for _, _, ex in since_log) / n_log for k in keys},
            }
            metrics.write(row)
            if cfg.tracker != "none":
                acc.log({k: v for k, v in row.items() if k != "step"}, step=state.step)
            bar.set_postfix(loss=f"{row['loss']:.4f}", step_s=f"{dt:.2f}", sps=f"{row['samples_per_s']:.1f}")
            since_log.clear()
            t_last = time.perf_counter()
            steps_since = 0
        t_pause = time.perf_counter()
        if state.step % cfg.checkpoint_every == 0 or state.step == end_step:
            flush()  # train_state.json carries samples_seen
            check_finite_weights(acc, unwrapped, state.step)
            save_checkpoint_dir(acc, spec, state, ckpt_root, cfg.keep_last,
                                {"world_size": acc.num_processes, "max_steps": cfg.max_steps})
        if spec.validate is not None and cfg.validate_every > 0 and state.step % cfg.validate_every == 0:
            # ZeRO-3 forwards need every rank; otherwise only the main process validates
            if acc.is_main_process or _zero_stage(acc) == 3:
                model.eval()
                with contextlib.ExitStack() as stack:
                    if ema is not None:
                        stack.enter_context(ema.swapped_in())
                    spec.validate(unwrapped, state.step, run_dir / "validation", acc.is_main_process)
                model.train()
            acc.wait_for_everyone()
        t_last += time.perf_counter() - t_pause  # step time and samples/s exclude checkpoints and validation
    flush()
    bar.close()
    acc.wait_for_everyone()
    # not acc.end_training(): it also destroys the process group, which the caller may still need
    # (a final export, a barrier) and whose absence made every rank fail in the barrier above
    for tracker in acc.trackers:
        tracker.finish()
    return TrainResult(state=state, run_dir=run_dir, losses=losses, accelerator=acc)


def finish_distributed() -> None:
    """Destroy the process group at the end of an entry script (``train`` leaves it up for the
    caller's exports and barriers); a no-op in a single process. On success only: every rank must
    call it (``run_main``)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


EXIT_WATCHDOG_S = 60.0  # run_main: a failed rank's interpreter shutdown may take this long, then it is ended


def run_main(prog: str, main: Callable[[], Any], user_errors: tuple[type[BaseException], ...] = (),
             exit_watchdog_s: float = EXIT_WATCHDOG_S) -> None:
    """Run an entry script's ``main()`` as one rank of a (possibly multi-process) launch.

    Success: ``finish_distributed()`` on every rank. Failure on one rank (a damaged file only its node
    reads, a data error): it must end at once and say so, because the launcher stops the other ranks
    only once a process has *exited*. So this rank prints its error naming the rank (``user_errors``,
    e.g. ``ConfigError``: one line ``prog: error: [rank r/w] ...``; anything else also with its traceback),
    records it for the launcher (torchrun's "Root Cause" summary reads ``TORCHELASTIC_ERROR_FILE``) and
    exits with code 1 without touching the process group: a barrier, ``end_training`` or
    ``destroy_process_group`` on the error path would wait for ranks that are still training. A
    watchdog (``faulthandler``, a native thread that runs until the very end of interpreter shutdown)
    dumps every thread's stack and ends the process with code 1 if the shutdown blocks for
    ``exit_watchdog_s`` (a non-daemon thread, an atexit handler, a backend destructor waiting for
    peers); only in a launched multi-process run, where the other ranks wait for this exit (it would
    also end a caller that catches the exit). Ranks on other nodes fail in their next collective when
    the connection closes, or after ``train.dist_timeout_s``."""
    rank, world = _rank_and_world()
    where = f"[rank {rank}/{world}] " if world > 1 else ""
    try:
        main()
    except SystemExit as e:  # main's own exit (argparse, a script's sys.exit): unchanged, but guarded
        if e.code not in (None, 0) and world > 1:
            _arm_exit_watchdog(exit_watchdog_s)
        raise
    except BaseException as e:
        if world > 1:
            _arm_exit_watchdog(exit_watchdog_s)
        if isinstance(e, Exception):
            _record_for_launcher(e)
        if isinstance(e, (*user_errors, PeerRankError)):
            sys.exit(f"{prog}: error: {where}{e}")
        if world > 1:  # the traceback follows (from the interpreter; prefixed [rankN] once the group exists)
            print(f"{prog}: error: {where}{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    finish_distributed()


def _arm_exit_watchdog(seconds: float) -> None:
    """End this (failed) process with code 1 after ``seconds``, whatever blocks its shutdown."""
    import faulthandler

    if seconds <= 0:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        faulthandler.dump_traceback_later(seconds, exit=True, file=sys.__stderr__ or sys.stderr)
    except (AttributeError, OSError, ValueError):  # no file descriptor to write to (stderr replaced): no watchdog
        pass


def _record_for_launcher(e: BaseException) -> None:
    """Write ``e`` to the error file torchrun hands each worker (what ``@record`` does), so the launcher's
    summary names this rank's error instead of "error_file: <N/A>"; nothing outside torchrun."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return
    try:
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(e)
    except Exception as err:  # reporting must never hide the error itself
        print(f"[train] could not record the error for the launcher ({type(err).__name__}: {err})", file=sys.stderr)


def _flat_config(cfg: Any) -> dict:
    """Scalars of a (nested) config for the tracker's hyper-parameter table."""
    if cfg is None:
        return {}
    from interpdiff.config import to_dict

    d = to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    out: dict = {}

    def rec(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                rec(f"{prefix}{k}.", x)
        elif isinstance(v, (int, float, str, bool)):
            out[prefix[:-1]] = v
        else:
            out[prefix[:-1]] = str(v)

    rec("", d)
    return out
