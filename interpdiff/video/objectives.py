"""Phase-1 and phase-2 objectives for Wan2.1: one model specification, two losses.

Both phases use the same plumbing (``build_transformer``: load Wan, LoRA, attention backend;
``make_train_spec``: data stream, save/load of the trainable weights, validation) and differ
only in what they do with a batch of clean latents ``x0 = lat_B_C_T_H_W``:

**Phase 1 (keyframes)**, ``phase1_loss``: per sample, K latent-frame indices ``idx`` from the
index-policy mix (endpoints 0 and T-1 always included), keyframe latents ``x0_k = x0[:, :, idx]``
``[B, C, K, H, W]``, flow matching as Wan is trained::

    x_sigma = (1 - sigma) x0_k + sigma eps,   v_hat = F(x_sigma, 1000 sigma, text; rope at idx)
    loss    = mean (v_hat - (eps - x0_k))^2

The temporal rotary phase of keyframe k is that of its true frame ``idx[k]``
(``wan.keyframe_positions``), so the model sees the gaps between keyframes. The clip length is
conditioned the same way: the last keyframe is always frame ``T-1``, so its rotary position
carries T (Wan has no other length input; a separate length embedding would need new weights).

**Keyframe features** (``phase1.kp_feat=true``): METHOD.md's ``kp_feat`` per keyframe,
``[left_gap, right_gap, t_norm, left_diff, right_diff]`` (``keyframe_features``: gaps to the
neighbouring keyframes over T, ``t / (T-1)``, D_phi's predicted DP costs of the two neighbouring
segments from ``phase1.dphi_ckpt``, zeros without one), enter as five zero-initialised input
planes on the keyframe latents (the phase-2 widening, ``wan.KP_FEAT_CHANNELS``). ``wan_forward``
builds them from the keyframe indices it is given, through the function
``install_keyframe_features`` puts on the model, so training, the sampler and the phase-1
distillation (teacher and student) feed the same features; the LoRA folder records the widening
and ``extra.phase1.dphi_ckpt``. The gaps and ``t_norm`` repeat what the true-index rotary
positions carry; the D_phi costs are new information. Off by default (a phase-1 LoRA trained
without it loads as before). Under classifier-free guidance the unconditional rows get the costs
D_phi predicts for the negative prompt (each row's own text; training has no unconditional rows).

**Phase 2 (refiner)**, ``phase2_loss``: per sample, a level ``s`` uniform in ``0..S-2`` (the
last level has no missing frame), nested masks from the policy mix, and::

    x_s    = I(x0, M_s) + sigma_s eps (1 - M_s)          (interpdiff.interpolate.interpolate_corrupt)
    t_s    = 1000 * (1 - K_s / T)                         (level -> Wan timestep: the missing fraction)
    v_hat  = F([x_s, planes(M_s)], t_s, text)             (widened patch embedding, zero-init)
    x0_hat = x_s - (t_s / 1000) v_hat  on missing frames  (Wan's own x0 parametrisation)
    x0_hat = x_s                       on keyframes of M_s (they are known; see below)
    loss   = mean_b [ sum_w (x0_hat - x0)^2 / sum_w 1 ],  w = missing_weight on missing frames, keyframe_weight on keyframes

**Keyframes are returned exactly** (``phase2_restore``): the TACoS update
``x_{s+1} = x_s - D(x0_hat, s) + D(x0_hat, s+1)`` interpolates from ``x0_hat`` at the keyframes of
``M_s``, so a prediction there would move every frame of the gaps around it. The loss cannot
train one (the default ``keyframe_weight`` is 0, and any other weight only saw exact inputs), so
a refiner trained to a tiny loss still spread its untrained keyframe outputs over the sequence:
on a tiny Wan trained to loss 0.005 the oracle sampler's error was 5.6x that of the clamped
update. The maze prototype found the same (``maze.models``, ``missing_residual``). The keyframe
error is then 0, so ``keyframe_weight`` only scales the per-sample normaliser.

Using Wan's velocity->x0 map with the level's "missing fraction" as flow time means the
pretrained model starts as a plausible denoiser instead of an arbitrary regressor. The mask
planes are built from ``M_s`` (``interpdiff.corruption.anchor_confidence``) exactly as the sampler
(``interpdiff.video.pipeline.phase2_refine``) does.

**Per-sample randomness** (policy, indices, level, flow time, noise) comes from
``interpdiff.training.sample_generator(seed, step, key)`` on the CPU: independent of world size,
batch split, device type and resume.

Index/mask policies: ``uniform``, ``random`` (phase 1) / ``random_nested`` (phase 2), ``dp``
(online DP on the ground-truth interpolation cost of the sample's own latents,
``interpdiff.selection.segment_costs``: the maze-style teacher, exact and cheap at T <= 21),
``dp_precomputed`` (a file ``{key: bool [T] (phase 1) or [S, T] (phase 2)}``, e.g. DP on the
Wan-teacher cost), ``selector`` (the nested masks a trained video keyframe selector decodes from
the sample's text embedding and clip length, ``interpdiff.video.selector``; checkpoint from
``phase1.selector_ckpt`` / ``phase2.selector_ckpt``, loaded and checked before the model is
built; it runs in fp32 outside autocast, without gradients).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.utils.checkpoint

from interpdiff.config import ConfigError
from interpdiff.corruption import anchor_confidence, level_sigmas
from interpdiff.flow import DENSITIES, flow_match_target, flow_match_xt, sample_sigmas, x0_from_velocity
from interpdiff.interpolate import interpolate_corrupt
from interpdiff.masks import (
    check_nested,
    dp_nested_masks,
    level_budgets,
    mask_to_indices,
    parse_policy_mix,
    random_nested_masks,
    sample_policy,
    uniform_nested_masks,
)
from interpdiff.selection import dp_select, indices_to_mask, segment_costs
from interpdiff.training import TrainLoopConfig, TrainSpec, sample_generator
from interpdiff.video import wan
from interpdiff.video.data import LatentDataConfig

log = logging.getLogger(__name__)

PHASE1_POLICIES = ("uniform", "random", "dp", "dp_precomputed", "selector")
PHASE2_POLICIES = ("uniform", "random_nested", "dp", "dp_precomputed", "selector")


# --- configs ------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    path: str = "tiny"  # diffusers folder, hub id (Wan-AI/Wan2.1-T2V-1.3B-Diffusers) or tiny
    dtype: str = "auto"  # frozen base: auto = bf16 on CUDA, fp32 on CPU
    attention: str = "sdpa"
    lora: wan.LoraSpec = field(default_factory=wan.LoraSpec)
    init_lora: str = ""  # start from this LoRA folder (save_lora format) instead of a fresh adapter
    seed: int = 0  # tiny preset weights and the LoRA init
    compile: bool = False  # regional torch.compile of the repeated blocks (diffusers compile_repeated_blocks)
    checkpoint_ratio: float = 1.0  # with train.gradient_checkpointing: fraction of blocks recomputed
    # full: recompute whole blocks; attention: keep the attention kernels' outputs (selective
    # checkpointing); attention_ffn: also keep the FFN up-projection. With compile: true the
    # checkpoint sits inside the compiled blocks (wan.enable_checkpointing, placement "auto").
    checkpoint_policy: str = "full"


@dataclass
class Phase1Config:
    num_keyframes: int = 6  # K latent frames per sample (endpoints included)
    index_policy: str = "dp:0.7,uniform:0.2,random:0.1"  # METHOD.md section 4 default
    dp_index_file: str = ""  # for dp_precomputed: torch file {key: bool [T]}
    selector_ckpt: str = ""  # for selector: a file (or run folder) written by interpdiff.video.train_selector
    flow_density: str = "logit_normal"  # training flow-time density (interpdiff.flow.sample_sigmas)
    flow_shift: float = 1.0  # shift applied to training flow times
    logit_mean: float = 0.0
    logit_std: float = 1.0
    # METHOD.md's kp_feat as five zero-initialised input planes on the keyframe latents (widened patch
    # embedding): gaps to the neighbouring keyframes / T, t / (T-1), and D_phi's predicted DP costs
    # of the two neighbouring segments (dphi_ckpt: a train_dphi_teacher.py dphi.pt; "" = zeros)
    kp_feat: bool = False
    dphi_ckpt: str = ""

    def validate(self, T: int | None = None) -> None:
        """Raises ``ConfigError`` naming the key; ``T`` (latent frames, when the config fixes it)
        also checks ``num_keyframes <= T``."""
        check_policy_mix("phase1.index_policy", self.index_policy, PHASE1_POLICIES, "phase1.selector_ckpt", self.selector_ckpt)
        if self.dphi_ckpt and not self.kp_feat:
            raise ConfigError(f"phase1.dphi_ckpt={self.dphi_ckpt!r} is set but phase1.kp_feat is false (the D_phi "
                              "costs are keyframe features); set phase1.kp_feat=true or drop the checkpoint")
        if self.kp_feat and self.dphi_ckpt:
            from interpdiff.video.dphi import load_dphi

            try:
                load_dphi(self.dphi_ckpt)
            except Exception as e:  # CheckpointError naming the path
                raise ConfigError(f"phase1.dphi_ckpt: {e}") from None
        if self.num_keyframes < 2:
            raise ConfigError(f"phase1.num_keyframes must be >= 2 (both endpoints), got {self.num_keyframes}")
        if T is not None and self.num_keyframes > T:
            raise ConfigError(f"phase1.num_keyframes={self.num_keyframes} exceeds the clip's T={T} latent frames")
        if self.flow_density not in DENSITIES:
            raise ConfigError(f"phase1.flow_density={self.flow_density!r} is not one of {list(DENSITIES)}")
        if not (math.isfinite(self.flow_shift) and self.flow_shift > 0):
            raise ConfigError(f"phase1.flow_shift must be a finite number > 0, got {self.flow_shift}")
        if not (math.isfinite(self.logit_std) and self.logit_std > 0 and math.isfinite(self.logit_mean)):
            raise ConfigError(f"phase1.logit_mean={self.logit_mean}, phase1.logit_std={self.logit_std}: expected "
                              "finite numbers, logit_std > 0")


@dataclass
class Phase2Config:
    k_min: int = 6  # level-0 budget (phase-1 keyframes)
    n_levels: int = 4  # budgets = budget_schedule(T, k_min, n_levels), last = T
    budgets: list[int] = field(default_factory=list)  # explicit budgets (override k_min/n_levels)
    policy_mix: str = "uniform:0.3,random_nested:0.3,dp:0.4"
    dp_mask_file: str = ""  # for dp_precomputed: torch file {key: bool [S, T]}
    selector_ckpt: str = ""  # for selector: a file (or run folder) written by interpdiff.video.train_selector
    sigma_max: float = 0.1  # corruption noise on missing frames, level 0 ...
    sigma_min: float = 0.01  # ... down to the second-to-last level (last level: 0)
    channels: list[str] = field(default_factory=lambda: ["mask"])  # widened inputs: mask | confidence
    confidence: str = "mask"  # anchor_confidence kind for the 'confidence' channel: mask | tent
    missing_weight: float = 1.0
    keyframe_weight: float = 0.0

    def validate(self, T: int | None = None) -> None:
        """Raises ``ConfigError`` naming the key (training, distillation and sampling all check a
        phase-2 config here, before any model is loaded); ``T`` (latent frames, when known) also
        checks the budgets against it."""
        check_policy_mix("phase2.policy_mix", self.policy_mix, PHASE2_POLICIES, "phase2.selector_ckpt", self.selector_ckpt)
        bad = [c for c in self.channels if c not in wan.PHASE2_CHANNELS]
        if bad or not self.channels:
            raise ConfigError(f"phase2.channels={list(self.channels)}: expected a non-empty subset of {list(wan.PHASE2_CHANNELS)}")
        if self.confidence not in ("mask", "tent"):
            raise ConfigError(f"phase2.confidence={self.confidence!r} is not one of ['mask', 'tent']")
        if not (math.isfinite(self.sigma_max) and 0.0 <= self.sigma_min <= self.sigma_max):
            raise ConfigError(f"phase2.sigma_min={self.sigma_min}, phase2.sigma_max={self.sigma_max}: expected "
                              "finite 0 <= sigma_min <= sigma_max")
        w_m, w_k = self.missing_weight, self.keyframe_weight
        if not (math.isfinite(w_m) and math.isfinite(w_k)) or w_m < 0 or w_k < 0 or w_m + w_k == 0:
            raise ConfigError(f"phase2.missing_weight={w_m}, phase2.keyframe_weight={w_k}: expected finite "
                              "non-negative weights, not both zero")
        if self.budgets:
            b = [int(x) for x in self.budgets]
            if len(b) < 2 or b[0] < 2 or any(y <= x for x, y in zip(b, b[1:])):
                raise ConfigError(f"phase2.budgets={b}: expected at least 2 strictly increasing budgets from >= 2 "
                                  "(the last = the clip's latent frames T)")
        elif self.k_min < 2 or self.n_levels < 2:
            raise ConfigError(f"phase2.k_min={self.k_min}, phase2.n_levels={self.n_levels}: expected k_min >= 2 "
                              "(both endpoints) and n_levels >= 2 (one level is no refinement)")
        if T is not None:
            phase2_budgets(self, T)  # raises ConfigError naming phase2.budgets / k_min against T


@dataclass
class ValidationConfig:
    num_samples: int = 2  # latents of the first batch used for validation
    # held-out shard pattern for validation (epoch 0, not resampled); "" = the first batch of the
    # training stream (a training sample: fine for a smoke check, not for measuring generalisation)
    shards: str = ""
    phase1_steps: int = 8
    shift: float = 5.0
    decode: bool = False  # VAE-decode and write mp4 (needs the VAE); else latent preview PNGs
    fps: int = 16


@dataclass
class VideoTrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: LatentDataConfig = field(default_factory=LatentDataConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    phase1: Phase1Config = field(default_factory=Phase1Config)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def validate(self) -> None:
        self.train.validate()
        try:
            self.data.validate()
            self.model.lora.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.phase1.validate()  # the checks against the clip length T: make_train_spec (knows the phase)
        self.phase2.validate()
        if self.model.dtype not in ("auto", "bf16", "bfloat16", "fp32", "float32", "fp16", "float16"):
            raise ConfigError(f"model.dtype={self.model.dtype!r} is not one of auto, bf16, fp32, fp16")
        if not 0.0 <= self.model.checkpoint_ratio <= 1.0:
            raise ConfigError(f"model.checkpoint_ratio must lie in [0, 1], got {self.model.checkpoint_ratio}")
        if self.model.checkpoint_policy not in wan.CHECKPOINT_POLICIES:
            raise ConfigError(f"model.checkpoint_policy={self.model.checkpoint_policy!r} is not one of "
                              f"{list(wan.CHECKPOINT_POLICIES)}")
        try:
            wan.check_selective_checkpointing(self.model.checkpoint_policy, self.model.attention)
        except ValueError as e:
            raise ConfigError(str(e)) from None


def check_policy_mix(name: str, spec: str, allowed, ckpt_key: str, ckpt: str) -> None:
    try:
        mix = parse_policy_mix(spec, allowed)
    except ValueError as e:
        raise ConfigError(f"{name}: {e}") from None
    if "selector" in mix and not ckpt:
        raise ConfigError(_selector_unset(name, ckpt_key))


def base_dtype(cfg: ModelConfig) -> torch.dtype:
    if cfg.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return wan.to_dtype(cfg.dtype)


# --- one model specification -------------------------------------------------------------------


def keyframe_features(idx_B_K: torch.Tensor, emb_B_L_D: torch.Tensor, dphi=None, cost_cfg=None) -> torch.Tensor:
    """METHOD.md's ``kp_feat [B, K, 5]`` of sorted keyframe indices (the last one is ``T-1``):
    ``[left_gap, right_gap, t_norm, left_diff, right_diff]`` with gaps to the neighbouring
    keyframes over ``T`` (0 at the ends), ``t / (T-1)``, and D_phi's predicted DP cost of the
    segment to each neighbour (``VideoDphi.pair_costs``; 0 at the ends, for adjacent keyframes, as
    in ``cost_matrix``, and everywhere without ``dphi``). float32, on ``idx``'s device."""
    idx = idx_B_K.long()
    B, K = idx.shape
    T = int(idx[:, -1].max()) + 1
    f = idx.float()
    zero = torch.zeros(B, 1, device=idx.device)
    gaps = (f[:, 1:] - f[:, :-1]) / T
    left, right = torch.cat([zero, gaps], 1), torch.cat([gaps, zero], 1)
    diffs = torch.zeros(B, K - 1, device=idx.device)
    if dphi is not None and K > 1:
        diffs = dphi.pair_costs(emb_B_L_D, T, idx[:, :-1], idx[:, 1:], cost_cfg).float().to(idx.device)
        diffs = torch.where(idx[:, 1:] - idx[:, :-1] > 1, diffs, 0.0)  # adjacent keyframes: nothing to fill (cost_matrix's 0)
    return torch.stack([left, right, f / max(T - 1, 1), torch.cat([zero, diffs], 1), torch.cat([diffs, zero], 1)], -1)


def install_keyframe_features(transformer, dphi_ckpt: str = "") -> None:
    """Give a phase-1 model widened with ``wan.KP_FEAT_CHANNELS`` its feature function
    (``keyframe_features`` with the D_phi of ``dphi_ckpt``, fp32, on the model's device at each
    call); ``wan_forward`` builds the planes from the keyframe indices it is given, so training,
    sampling and distillation feed the same features."""
    from interpdiff.video.dphi import load_dphi

    dphi, cost_cfg = load_dphi(dphi_ckpt) if dphi_ckpt else (None, None)
    text_dim = int(wan.unwrap_model(transformer).config.text_dim)
    if dphi is not None and dphi.sizes.text_dim != text_dim:
        raise ConfigError(f"D_phi {str(dphi_ckpt)!r} reads {dphi.sizes.text_dim}-wide text embeddings, the model's are "
                          f"{text_dim} wide (transformer config text_dim): a D_phi of another text encoder")

    def fn(idx_B_K, emb_B_L_D):
        if dphi is not None and next(dphi.parameters()).device != idx_B_K.device:
            dphi.to(idx_B_K.device)
        with torch.autocast(idx_B_K.device.type, enabled=False):  # fp32 features, whatever the caller's autocast
            return keyframe_features(idx_B_K, emb_B_L_D, dphi, cost_cfg)

    wan.set_keyframe_features(transformer, fn)


def dphi_file(path: str) -> Path:
    """A ``phase1.dphi_ckpt`` value as the file it names (a folder means its ``dphi.pt``)."""
    p = Path(path)
    return p / "dphi.pt" if p.is_dir() else p


def dphi_digest(path: str) -> str:
    """sha256 (16 hex digits) of the D_phi file: recorded with a kp_feat LoRA, so a retrained
    ``dphi.pt`` under the same name is noticed."""
    import hashlib

    return hashlib.sha256(dphi_file(path).read_bytes()).hexdigest()[:16] if path else ""


def ensure_keyframe_features(transformer, meta: dict, dphi_ckpt: str = "", key: str = "phase1_dphi") -> str:
    """After ``wan.load_lora`` of a phase-1 folder that records the keyframe-feature widening:
    install the feature function with the D_phi the LoRA was trained with
    (``extra.phase1.dphi_ckpt``), or ``dphi_ckpt`` when given (``key`` names where it came from in
    errors). Refuses a D_phi for a LoRA trained without one (its cost planes only ever held 0) and
    a missing file; warns when the file is not the one trained with (sha256). Returns the D_phi
    path used ("" for none)."""
    wid = wan.widening_of(transformer)
    if wid is None or tuple(wid["channels"]) != wan.KP_FEAT_CHANNELS:
        return ""
    recorded = ((meta.get("extra") or {}).get("phase1") or {}).get("dphi_ckpt") or ""
    if dphi_ckpt and not recorded:
        raise ConfigError(f"{key}={dphi_ckpt!r}: this phase-1 LoRA was trained without D_phi costs (phase1.dphi_ckpt "
                          "empty: those feature planes only ever held 0); leave it unset")
    path = dphi_ckpt or recorded
    if path and not dphi_file(path).is_file():
        raise ConfigError(f"this phase-1 LoRA takes D_phi keyframe costs (trained with phase1.dphi_ckpt={recorded!r}); "
                          f"{path!r} does not exist: pass the D_phi checkpoint as {key}=...")
    want = ((meta.get("extra") or {}).get("phase1_dphi_sha256")) or ""
    if path and want and dphi_digest(path) != want:
        log.warning("%s: D_phi %s (sha256 %s) is not the file this phase-1 LoRA was trained with (sha256 %s); its "
                    "keyframe cost features will differ from training", key, path, dphi_digest(path), want)
    install_keyframe_features(transformer, path)
    return path


def build_transformer(cfg: ModelConfig, phase: int, p2: Phase2Config | None = None, lora: bool = True,
                      p1: Phase1Config | None = None):
    """Frozen Wan transformer + (phase 1) keyframe rotary positions, and with ``p1.kp_feat`` the
    patch embedding widened with ``wan.KP_FEAT_CHANNELS`` (``install_keyframe_features``), or
    (phase 2) the widened patch embedding, + a trainable LoRA (fresh, or ``cfg.init_lora``).
    Raises ``ValueError`` naming a LoRA target that matches no module before anything is moved to
    a GPU."""
    tr = wan.load_transformer(cfg.path, dtype=base_dtype(cfg), seed=cfg.seed)
    wan.set_attention_backend(tr, cfg.attention)
    if phase == 1:
        wan.install_keyframe_rope(tr)
        if p1 is not None and p1.kp_feat:
            wan.widen_patch_embedding(tr, wan.KP_FEAT_CHANNELS, trainable=True)
            install_keyframe_features(tr, p1.dphi_ckpt)
    elif phase == 2:
        wan.widen_patch_embedding(tr, tuple((p2 or Phase2Config()).channels), trainable=True)
    else:
        raise ValueError(f"build_transformer: phase must be 1 or 2, got {phase}")
    if lora:
        if cfg.init_lora:
            check_init_lora(cfg, phase, p1)
            wan.load_lora(tr, cfg.init_lora, trainable=True)
        else:
            # peft draws the LoRA A init from the global RNG: seed it so every run (and rank) of
            # the same config starts from the same adapter, whatever ran before in the process
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                wan.add_lora(tr, cfg.lora)
    if cfg.compile:
        tr.compile_repeated_blocks(fullgraph=True)
    return tr


def check_init_lora(cfg: ModelConfig, phase: int, p1: Phase1Config | None = None) -> None:
    """``model.init_lora`` must be a LoRA of this phase with this config's ``model.lora`` shape (it
    is loaded as it was saved, and every checkpoint of the run records ``model.lora``)."""
    try:
        meta = wan.read_lora_meta(cfg.init_lora)
    except wan.WanLoadError as e:
        raise ConfigError(f"model.init_lora: {e}") from None
    saved, mine = meta.get("lora") or {}, dataclasses.asdict(cfg.lora)
    diff = []
    for k in ("rank", "alpha", "use_rslora", "target_modules"):
        a, b = saved.get(k), mine.get(k)
        if k == "target_modules":
            a, b = sorted(a or []), sorted(b or [])
        elif k == "alpha" and a is not None:
            a, b = float(a), float(b)
        if k in saved and a != b:
            diff.append(f"lora.{k} = {a} in the folder, model.lora.{k} = {b} in this config")
    their_phase = (meta.get("extra") or {}).get("phase")
    if their_phase is not None and their_phase != phase:
        diff.append(f"it is a phase-{their_phase} LoRA, this is phase {phase}")
    if phase == 1:
        theirs = bool(meta.get("widening")) and tuple(meta["widening"].get("channels") or ()) == wan.KP_FEAT_CHANNELS
        mine = bool(p1 is not None and p1.kp_feat)
        if theirs != mine:
            diff.append(f"it was trained with phase1.kp_feat={str(theirs).lower()}, this run has "
                        f"phase1.kp_feat={str(mine).lower()}")
    if diff:
        raise ConfigError(f"model.init_lora={cfg.init_lora!r} does not fit this run: " + "; ".join(diff)
                          + " (set model.lora to the folder's settings, or start from a fresh adapter)")


def enable_checkpointing(transformer, ratio: float = 1.0, policy: str = "full") -> list[int]:
    """Gradient checkpointing of ``round(ratio * n_blocks)`` transformer blocks, spread evenly,
    recomputing whole blocks (``policy="full"``) or all but the attention kernels' outputs
    (``"attention"``); see ``wan.enable_checkpointing``. Returns the checkpointed block indices."""
    try:
        return wan.enable_checkpointing(transformer, ratio, policy)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def model_meta(cfg: VideoTrainConfig, phase: int, transformer) -> dict:
    """What a checkpoint needs to rebuild the model: base source, transformer config, LoRA, widening."""
    m = wan.unwrap_model(transformer)
    return {
        "phase": phase,
        "model_path": cfg.model.path,
        "transformer_config": wan.transformer_config_dict(m),
        "lora": dataclasses.asdict(cfg.model.lora),
        "widening": wan.widening_of(m),
        "keyframe_dphi": dphi_digest(cfg.phase1.dphi_ckpt) if (phase == 1 and cfg.phase1.kp_feat) else "",
        "phase2_budgets_rule": {"k_min": cfg.phase2.k_min, "n_levels": cfg.phase2.n_levels, "budgets": list(cfg.phase2.budgets)},
    }


# --- per-sample index / mask policies ----------------------------------------------------------


def _load_precomputed(path: str, what: str) -> dict:
    if not path:
        raise ConfigError(f"{what}: the policy mix uses dp_precomputed but no file is set")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what}={path!r} does not exist (expected a torch file {{sample key: bool mask}})")
    try:
        d = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{what}: the dp_precomputed file {path!r} cannot be read as a torch file "
                          f"({type(e).__name__}: {str(e)[:200]}); expected {{sample key: bool mask}} as written by "
                          "train_dphi_teacher.py") from None
    if not isinstance(d, dict) or not d:
        raise ConfigError(f"{what}={path!r}: expected a non-empty dict {{sample key: bool mask}}")
    return d


def _selector_unset(what: str, ckpt_key: str) -> str:
    return (f"{what}: policy 'selector' needs {ckpt_key} (a selector file or run folder written by "
            "python -m interpdiff.video.train_selector), which is not set")


def _load_policy_selector(path: str, what: str, ckpt_key: str):
    from interpdiff.io import CheckpointError
    from interpdiff.video.selector import load_selector

    if not path:
        raise ConfigError(_selector_unset(what, ckpt_key))
    try:
        return load_selector(path)
    except CheckpointError as e:
        raise CheckpointError(f"{ckpt_key}: {e}") from None


class KeyframePolicy:
    """Per-sample keyframe masks for phase 1 (``budgets=[K]``) or nested stacks for phase 2.

    ``selector_ckpt`` (config key ``selector_key``) is loaded when the mix holds ``selector``; its
    masks need the sample's text embedding (``masks(..., emb_L_D=...)``)."""

    def __init__(self, mix: str, allowed: Sequence[str], precomputed: str, what: str, selector_ckpt: str = "",
                 selector_key: str = "selector_ckpt"):
        self.mix = parse_policy_mix(mix, allowed)
        self.what = what
        self.selector_key = selector_key
        self.selector = _load_policy_selector(selector_ckpt, what, selector_key) if "selector" in self.mix else None
        self.table = _load_precomputed(precomputed, what) if "dp_precomputed" in self.mix else None
        self.precomputed = precomputed
        self.fallbacks = 0

    def check_precomputed(self, budgets: Sequence[int], T: int) -> None:
        """Every stored mask against the budgets and the clip length (when the config fixes T): a
        table written for other budgets (another ``k_min``/``n_levels``) or clip length would
        otherwise fail at the step that first draws it, or fall back to ``uniform`` sample by
        sample. Raises ``ConfigError`` naming the file, a sample key and what differs."""
        if self.table is None:
            return
        want = (T,) if len(budgets) == 1 else (len(budgets), T)
        for key, m in self.table.items():
            problem = None
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or tuple(m.shape) != want:
                problem = (f"{type(m).__name__} {getattr(m, 'dtype', '')} {list(getattr(m, 'shape', []))}, expected "
                           f"bool {list(want)}")
            elif m.view(len(budgets), T).sum(1).tolist() != list(budgets):
                problem = f"keyframe counts {m.view(len(budgets), T).sum(1).tolist()}, expected the budgets {list(budgets)}"
            if problem:
                raise ConfigError(f"{self.what}: dp_precomputed file {self.precomputed!r}, sample {key!r}: {problem} "
                                  f"(written for other budgets or another clip length? rebuild it with "
                                  f"train_dphi_teacher.py's masks stage for these settings)")

    def check_selector_budgets(self, budgets: Sequence[int], T: int) -> None:
        """The selector refuses budgets it was not trained on (``VideoSelector.check_budgets_for``)."""
        if self.selector is not None:
            try:
                self.selector.check_budgets_for(budgets, T, f"{self.what} (selector {self.selector_key})")
            except ValueError as e:
                raise ConfigError(str(e)) from None

    def masks(self, x0_C_T_H_W: torch.Tensor, key: str, budgets: list[int], g: torch.Generator,
              emb_L_D: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
        """-> (nested masks ``[S, T]`` bool on CPU, policy name)."""
        T = x0_C_T_H_W.shape[1]
        policy = sample_policy(self.mix, generator=g)
        if policy == "uniform":
            m = uniform_nested_masks(1, T, budgets)[0]
        elif policy in ("random", "random_nested"):
            m = random_nested_masks(1, T, budgets, generator=g)[0]
        elif policy == "dp":
            cost = segment_costs(x0_C_T_H_W[None].float(), time_dim=2).cpu()  # on x0's device; DP on CPU
            if len(budgets) == 1:
                idx, _ = dp_select(cost, budgets[0], backend="torch")
                m = indices_to_mask(idx, T)
            else:
                m = dp_nested_masks(cost, budgets, backend="torch")[0]
        elif policy == "dp_precomputed":
            stored = self.table.get(key)
            want = (T,) if len(budgets) == 1 else (len(budgets), T)
            if stored is None or tuple(stored.shape) != want or stored.dtype != torch.bool:
                self.fallbacks += 1  # counted, reported in the metrics; uniform instead
                if self.fallbacks <= 5 or self.fallbacks % 100 == 0:
                    why = "no entry" if stored is None else f"mask {stored.dtype} {list(stored.shape)}, expected bool {list(want)}"
                    log.warning("%s: dp_precomputed fallback #%d to uniform masks: sample %r in %s: %s", self.what,
                                self.fallbacks, key, self.precomputed, why)
                m = uniform_nested_masks(1, T, budgets)[0]
                policy = "uniform_fallback"
            elif stored.view(len(budgets), T).sum(1).tolist() != list(budgets):
                self.check_precomputed(budgets, T)  # raises, naming the file and the sample
            else:
                m = stored.view(len(budgets), T)
        elif policy == "selector":
            if emb_L_D is None:
                raise ValueError(f"{self.what}: policy 'selector' needs the sample's text embedding (emb_L_D)")
            self.check_selector_budgets(budgets, T)
            sel = self.selector.to(emb_L_D.device)
            m = sel.nested_masks(emb_L_D[None], T, budgets)[0].cpu()
        else:  # pragma: no cover - parse_policy_mix restricts the names
            raise ValueError(policy)
        m = m.view(len(budgets), T)
        check_nested(m[None], budgets)
        return m, policy


# --- losses ------------------------------------------------------------------------------------


def _h2d(t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host tensor -> ``device``. On CUDA through pinned memory with ``non_blocking``: a copy from
    pageable memory waits for the GPU stream to drain, which would stall the host (and its
    preparation of the next batch) behind the previous step's backward every micro-batch."""
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _keys(batch: dict) -> list[str]:
    return [str(k) for k in batch["keys"]]


def phase1_loss(model, batch: dict, step: int, cfg: VideoTrainConfig, policy: KeyframePolicy, seed: int):
    """Flow-matching loss on K keyframe latents with true-index rotary positions (module docstring)."""
    p1 = cfg.phase1
    x0 = batch["lat"]  # (B, C, T, H, W)
    emb = batch["emb"]  # (B, L, D)
    B, C, T, H, W = x0.shape
    K = p1.num_keyframes
    if K > T:
        raise ValueError(f"phase1.num_keyframes={K} exceeds the clip's {T} latent frames")
    idx_rows, sig_rows, eps_rows, names = [], [], [], []
    for b, key in enumerate(_keys(batch)):
        g = sample_generator(seed, step, key)
        m, name = policy.masks(x0[b].detach(), key, [K], g, emb_L_D=emb[b])
        idx_rows.append(mask_to_indices(m))
        sig_rows.append(sample_sigmas(1, p1.flow_density, p1.flow_shift, p1.logit_mean, p1.logit_std, generator=g))
        eps_rows.append(torch.randn((C, K, H, W), generator=g))
        names.append(name)
    idx_B_K = _h2d(torch.cat(idx_rows), x0.device)
    sigma_B = _h2d(torch.cat(sig_rows), x0.device)
    eps = _h2d(torch.stack(eps_rows), x0.device, torch.float32)
    gather = idx_B_K[:, None, :, None, None].expand(B, C, K, H, W)
    x0_k = torch.gather(x0, 2, gather).float()  # (B, C, K, H, W); gather first, upcast only K frames
    x_t = flow_match_xt(x0_k, eps, sigma_B)
    v_hat = wan.wan_forward(model, x_t, sigma_B * 1000.0, emb, frame_idx_B_K=idx_B_K)
    loss = torch.mean((v_hat.float() - flow_match_target(x0_k, eps)) ** 2)
    # device tensors: the training loop reads them at log steps only (no host sync per step)
    metrics = {"sigma_mean": sigma_B.mean().detach(), "policy_fallbacks": float(policy.fallbacks)}
    return loss, metrics


def phase2_budgets(cfg: Phase2Config, T: int) -> list[int]:
    try:
        return level_budgets(T, cfg.k_min, cfg.n_levels, cfg.budgets, "phase2.budgets")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def level_timestep(budgets: Sequence[int], s: torch.Tensor | int, T: int) -> torch.Tensor:
    """Wan timestep of level ``s``: ``1000 * (1 - K_s / T)`` (the fraction of missing frames)."""
    k = torch.as_tensor(list(budgets), dtype=torch.float32)[torch.as_tensor(s)]
    return 1000.0 * (1.0 - k / T)


def phase2_planes(mask_B_T: torch.Tensor, H: int, W: int, p2: Phase2Config, dtype=torch.float32,
                  conf_B_T: torch.Tensor | None = None) -> torch.Tensor:
    """Extra input planes ``[B, E, T, H, W]`` from a level's mask ``M_s``: ``mask`` = ``M_s``,
    ``confidence`` = ``anchor_confidence(M_s, p2.confidence)`` (or ``conf_B_T`` when the caller
    already built it from the same mask, as ``corruption.refine`` does). Training and sampling
    both come through here."""
    if "confidence" in p2.channels and conf_B_T is None:
        conf_B_T = anchor_confidence(mask_B_T, p2.confidence)
    return wan.extra_channels(mask_B_T, H, W, tuple(p2.channels), conf_B_T if "confidence" in p2.channels else None,
                              dtype=dtype)


def phase2_restore(model, x_s, mask_B_T, t_B, emb, p2: Phase2Config, conf_B_T: torch.Tensor | None = None):
    """``x0_hat = x_s - (t / 1000) * F([x_s, planes(M_s)], t, text)`` (``flow.x0_from_velocity``
    with the level's flow time ``t / 1000``) on the missing frames of ``M_s`` and ``x_s`` itself on
    its keyframes (module docstring), in float32. Training, sampling and distillation all come
    through here."""
    H, W = x_s.shape[-2:]
    planes = phase2_planes(mask_B_T, H, W, p2, dtype=x_s.dtype, conf_B_T=conf_B_T)
    v_hat = wan.wan_forward(model, x_s, t_B, emb, extra_B_E_T_H_W=planes)
    x_s = x_s.float()
    x0_hat = x0_from_velocity(x_s, v_hat.float(), t_B.float() / 1000.0)
    return torch.where(mask_B_T.to(x_s.device)[:, None, :, None, None], x_s, x0_hat)


def phase2_loss(model, batch: dict, step: int, cfg: VideoTrainConfig, policy: KeyframePolicy, seed: int):
    """Level-wise refiner loss on the clean latents (module docstring)."""
    p2 = cfg.phase2
    x0 = batch["lat"]
    emb = batch["emb"]
    B, C, T, H, W = x0.shape
    budgets = phase2_budgets(p2, T)
    S = len(budgets)
    if S < 2:
        raise ConfigError(f"phase2: need at least 2 levels, budgets are {budgets}")
    sig = level_sigmas(S, p2.sigma_max, p2.sigma_min)
    mask_rows, s_rows, eps_rows = [], [], []
    for b, key in enumerate(_keys(batch)):
        g = sample_generator(seed, step, key)
        masks, _ = policy.masks(x0[b].detach(), key, budgets, g, emb_L_D=emb[b])
        s = int(torch.randint(0, S - 1, (1,), generator=g))
        mask_rows.append(masks[s])
        s_rows.append(s)
        eps_rows.append(torch.randn((C, T, H, W), generator=g))
    mask_B_T = _h2d(torch.stack(mask_rows), x0.device)
    s_B = torch.tensor(s_rows)
    sigma_B = _h2d(sig[s_B], x0.device)
    eps = _h2d(torch.stack(eps_rows), x0.device, torch.float32)
    x0f = x0.float()  # one fp32 copy of the clean latents for the corruption, the loss and the metric
    x_s = interpolate_corrupt(x0f, mask_B_T, sigma_B, eps, time_dim=2, check_values=False)  # Triton on CUDA, no host sync
    t_B = _h2d(level_timestep(budgets, s_B, T), x0.device)
    x0_hat = phase2_restore(model, x_s, mask_B_T, t_B, emb, p2)
    # per-sample weighted mean, then the batch mean: a sample's weight does not depend on how many
    # frames the other samples of its micro-batch miss, so the loss is the same for any batch split
    w_B_T = torch.where(mask_B_T, p2.keyframe_weight, p2.missing_weight).float()
    w = w_B_T[:, None, :, None, None]
    denom_B = (w_B_T.sum(1) * C * H * W).clamp_min(1e-8)
    err = (x0_hat - x0f) ** 2
    loss = ((err * w).sum(dim=(1, 2, 3, 4)) / denom_B).mean()
    with torch.no_grad():
        interp_err = ((((x_s - x0f) ** 2) * w).sum(dim=(1, 2, 3, 4)) / denom_B).mean()
    metrics = {"level_mean": float(s_B.float().mean()), "corrupt_mse": interp_err, "policy_fallbacks": float(policy.fallbacks)}
    return loss, metrics


# --- training spec ------------------------------------------------------------------------------


def batch_to_dict(b) -> dict:
    return {"lat": b.lat_B_C_T_H_W, "emb": b.emb_B_L_D, "keys": list(b.keys), "prompts": list(b.prompts)}


def make_batches(cfg: VideoTrainConfig):
    """``batches(epoch, skip)`` over a ``LatentLoader`` (resolves the shard pattern now: a missing
    pattern fails here, before the model is built). Epoch mode skips exactly (reads and drops);
    resampled mode reseeds its stream with the samples consumed (no replay, not bit-exact)."""
    from interpdiff.video.data import LatentLoader, resolve_shards

    data_cfg = dataclasses.replace(cfg.data, batch_size=cfg.train.batch_size)
    try:
        urls = resolve_shards(data_cfg.shards)
    except FileNotFoundError as e:
        raise ConfigError(f"data.shards: {e}") from None
    model = getattr(cfg, "model", None)  # the selector's config has no model section
    if model is not None:
        check_cache_model(urls, model.path)
    loader = LatentLoader(data_cfg)

    def batches(epoch: int, skip: int):
        n = skip * data_cfg.batch_size
        loader.load_state_dict({"epoch": epoch, "samples_seen": n, "samples_in_epoch": n})
        for b in loader:
            yield batch_to_dict(b)

    return batches, loader


def bind_embed_dim(loader, embed_shape: Sequence[int] | None, transformer) -> None:
    """Check ``data.embed_shape`` against the transformer's ``text_dim`` and, where the config
    leaves the width open, make the loader check every sample's embedding width against it: a
    shard set encoded for another text encoder is then skipped sample by sample with the reason
    (and a pass that keeps none stops naming it) instead of failing inside the model."""
    text_dim = int(wan.unwrap_model(transformer).config.text_dim)
    if embed_shape and embed_shape[-1] not in (-1, text_dim):
        raise ConfigError(f"data.embed_shape={list(embed_shape)}: the model's text embeddings are {text_dim} wide "
                          "(transformer config text_dim); the shards must hold [L, text_dim] embeddings")
    if not embed_shape or embed_shape[-1] == -1:
        ds = loader.dataset
        ds.cfg = dataclasses.replace(ds.cfg, embed_shape=[embed_shape[0] if embed_shape else -1, text_dim])


def check_cache_model(urls: Sequence[str], model_path: str) -> str | None:
    """Warn when the shards were encoded by ``precompute_cache`` with another model than
    ``model.path`` (their manifests ``shard_*.json`` record it): latents of another VAE, or text
    embeddings of another encoder, would train silently on the wrong distribution. Only a warning
    (a local folder and a hub id can name the same weights); returns its text, or ``None``."""
    import json

    first_per_folder: dict[str, str] = {}  # one manifest per cache folder (a run may mix several caches)
    for u in urls:
        if "://" not in u:
            first_per_folder.setdefault(str(Path(u).parent), u)
    bad = []
    for u in first_per_folder.values():
        man = Path(u).with_suffix(".json")
        if not man.is_file():
            continue
        try:
            enc = (json.loads(man.read_text()).get("content") or {}).get("model")
        except (OSError, ValueError):
            continue
        if enc and str(enc) != str(model_path) and Path(str(enc)).name != Path(str(model_path)).name:
            bad.append(f"{man} says {enc!r}")
    if not bad:
        return None
    msg = (f"data.shards: the latents and text embeddings were encoded with another model than model.path="
           f"{model_path!r} ({'; '.join(bad[:4])}); check that they are the same weights (another VAE or text encoder "
           "gives another latent distribution)")
    log.warning(msg)
    return msg


def make_validation_batches(cfg: VideoTrainConfig):
    """Validation's own loader (the training stream is untouched): ``validation.shards`` read once in
    order, or, when empty, the training shards (their first batch).

    Held-out shards are read whole by every rank (no shard split: validation needs one batch, and a
    held-out set may have fewer shards than ranks), as one possibly partial batch of
    ``validation.num_samples``; that batch is read now, so an empty or unreadable set stops the run
    before training, naming ``validation.shards``."""
    if not cfg.validation.shards:
        return make_batches(cfg)[0]
    from interpdiff.video.data import LatentLoader, resolve_shards

    data = dataclasses.replace(cfg.data, shards=cfg.validation.shards, resampled=False, partial_batches=True,
                               rank=0, world_size=1, batch_size=max(1, cfg.validation.num_samples), num_workers=0)
    try:
        resolve_shards(data.shards)
        first = next(iter(LatentLoader(data)), None)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"validation.shards={cfg.validation.shards!r}: {e}") from None
    if first is None:
        raise ConfigError(f"validation.shards={cfg.validation.shards!r}: the shards hold no readable sample")
    batch = batch_to_dict(first)

    def batches(epoch: int, skip: int):
        yield batch

    return batches


def make_train_spec(cfg: VideoTrainConfig, phase: int) -> TrainSpec:
    """Everything ``interpdiff.training.train`` needs for phase 1 or 2 (cheap checks first)."""
    if cfg.phase1.dphi_ckpt:  # recorded with every checkpoint: absolute, so a sampler elsewhere finds it
        cfg.phase1.dphi_ckpt = str(Path(cfg.phase1.dphi_ckpt).resolve())
    batches, loader = make_batches(cfg)
    val_batches = make_validation_batches(cfg)
    if phase == 1:
        policy = KeyframePolicy(cfg.phase1.index_policy, PHASE1_POLICIES, cfg.phase1.dp_index_file,
                                "phase1.index_policy", cfg.phase1.selector_ckpt, "phase1.selector_ckpt")
    else:
        policy = KeyframePolicy(cfg.phase2.policy_mix, PHASE2_POLICIES, cfg.phase2.dp_mask_file, "phase2.policy_mix",
                                cfg.phase2.selector_ckpt, "phase2.selector_ckpt")
    T_known = cfg.data.crop_frames or (cfg.data.latent_shape[1] if cfg.data.latent_shape else -1)
    if policy.table is not None and cfg.data.crop_frames > 0:
        raise ConfigError(f"{policy.what}: dp_precomputed masks are stored for whole clips; with data.crop_frames="
                          f"{cfg.data.crop_frames} every sample would fall back to uniform masks (set crop_frames=0, or "
                          "compute masks for the crops)")
    if cfg.validation.decode and cfg.train.validate_every > 0 and cfg.model.path != "tiny":
        wan.resolve_model_path(cfg.model.path, "vae")  # validation loads the VAE at its first run: check it now
    if T_known > 0:  # the clip length is fixed by the config: budgets against it now, not at the first loss
        (cfg.phase1 if phase == 1 else cfg.phase2).validate(T_known)
        policy.check_precomputed([cfg.phase1.num_keyframes] if phase == 1 else phase2_budgets(cfg.phase2, T_known),
                                 T_known)
    if policy.selector is not None and T_known > 0:
        policy.check_selector_budgets([cfg.phase1.num_keyframes] if phase == 1 else phase2_budgets(cfg.phase2, T_known),
                                      T_known)
    try:
        transformer = build_transformer(cfg.model, phase, cfg.phase2, p1=cfg.phase1)
    except ValueError as e:
        if "LoRA target" in str(e):
            raise ConfigError(f"model.lora.target_modules: {e}") from None
        raise
    bind_embed_dim(loader, cfg.data.embed_shape, transformer)
    seed = cfg.train.seed
    loss_impl = phase1_loss if phase == 1 else phase2_loss

    def loss_fn(model, batch, step):
        return loss_impl(model, batch, step, cfg, policy, seed)

    def save_trainable(model, folder: Path):
        wan.save_lora(model, folder, extra_meta=lora_extra_meta(cfg, phase))

    def load_trainable(model, folder: Path):
        _load_trainable_into(model, folder)

    from interpdiff.video.pipeline import make_validation

    return TrainSpec(
        model=transformer,
        loss_fn=loss_fn,
        batches=batches,
        save_trainable=save_trainable,
        load_trainable=load_trainable,
        validate=make_validation(cfg, phase, val_batches),
        batch_size=lambda b: int(b["lat"].shape[0]),
        meta=model_meta(cfg, phase, transformer),
        resume_keys=("phase", "widening", "keyframe_dphi", *wan.ARCH_RESUME_KEYS, *wan.LORA_RESUME_KEYS),
        enable_gradient_checkpointing=lambda m: enable_checkpointing(m, cfg.model.checkpoint_ratio,
                                                                     cfg.model.checkpoint_policy),
        data_settings=loader.settings,
    )


def lora_extra_meta(cfg: VideoTrainConfig, phase: int) -> dict:
    """Stored in the LoRA's ``interpdiff_lora.json`` so a sampler rebuilds the phase's settings
    (budgets rule, level sigmas, mask channels; keyframe count) from the checkpoint alone."""
    p1 = cfg.phase1
    return {"phase": phase, "phase1": dataclasses.asdict(p1), "phase2": dataclasses.asdict(cfg.phase2),
            "phase1_dphi_sha256": dphi_digest(p1.dphi_ckpt) if (phase == 1 and p1.kp_feat) else ""}


def _load_trainable_into(model, folder: Path) -> None:
    """Copy the LoRA (+ widening) weights saved by ``save_lora`` into an already adapted model
    (``wan.load_lora_weights_into``); a missing or mismatching file is a ``CheckpointError``."""
    from interpdiff.io import CheckpointError

    try:
        wan.load_lora_weights_into(model, folder)
    except (wan.WanLoadError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(folder)!r}: {e}") from None
