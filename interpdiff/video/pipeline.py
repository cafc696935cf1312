"""Samplers: the two-phase pipeline (keyframes -> interpolation -> level-wise refinement) and the
base Wan2.1 flow-matching sampler with classifier-free guidance, over the same transformer class.

Two-phase, for latents ``[B, C, T, H, W]`` (``T = 1 + (frames - 1) / 4``)::

    emb            = UMT5(prompt)                                 (wan.encode_prompts)
    M_0 ⊂ ... ⊂ M_S = uniform nested masks, or the video keyframe selector's (keyframe_source)
    idx_B_K        = indices of M_0 (endpoints 0, T-1)
    key_B_C_K_H_W  = Euler flow sampler, N steps, shift s, rope at idx   (phase1_sample)
    x_0            = I(scatter(key), M_0) + sigma_0 eps (1 - M_0)  (level-0 input, as in training)
    x_{s+1}        = TACoS step with x0_hat = phase-2 model(x_s, M_s)    (phase2_refine: corruption.refine's loop)
    video          = VAE decode(x_S) -> mp4

The level-0 masks ``M_0`` and the later nested masks are uniform (``masks.uniform_nested_masks``,
``keyframe_source=uniform``) or decoded from the text embedding and the clip length by a trained
video keyframe selector (``keyframe_source=selector``, ``selector_ckpt``;
``interpdiff.video.selector``: level s keeps ``M_{s-1}`` and adds the top ``K_s - K_{s-1}`` frames
by the level-s logits), with the budgets read from the phase-2 LoRA's metadata (the phase-2
config it was trained with; the selector must have been trained on the same budgets), so the
sampler's corruption, level timesteps and mask planes are those of training
(``objectives.phase2_restore`` is shared). Optional sampling noise on the frames still missing is
tied to the training schedule ``sigma_s = level_sigmas(S, sigma_max, sigma_min)``, in units of it
(``phase2_noise_scale``, default 1): ``phase2_noise=level`` draws ``scale * sigma_{s+1}`` fresh
at each step, ``constant`` adds ``scale * sigma_0`` (the level-0 training sigma) at every step on
top of the deterministic update, ``none`` adds none (``corruption.sampling_noise_scale``).

Full (``--mode full``): Euler over ``sampling_sigmas(steps, shift)`` on all T frames, CFG
``v = v_uncond + g (v_cond - v_uncond)`` with the negative prompt's embedding (Wan's default
negative prompt when none is given). This is the same update rule diffusers'
``FlowMatchEulerDiscreteScheduler`` applies, written out so both modes share one transformer call;
on the same grid it equals ``WanPipeline`` step for step (tested). The grid is
``shift(linspace(1, 0, N + 1))``; diffusers' default grid spaces N points from 1 to ``shift(1e-3)``
instead, a small difference at few steps worth knowing when comparing with other numbers.

Distilled students (``distill_rcm.py``; ``student_lora`` for ``--mode full``, ``phase1_student_lora``
/ ``phase2_student_lora`` for two-phase): the base with the teacher LoRA (a frozen adapter) plus the student
LoRA (``distill_wan.load_student_transformer``); full / phase-1 sample with ``student_steps``
TrigFlow consistency steps (no CFG: distilled in), phase 2 runs the 1-2 step refiner
(``distill_wan.phase2_student_refine``). Without these keys nothing changes.

Seeds: in ``run_sampling`` every prompt has its own CPU generator, seeded ``prompt_seed(seed, i) =
(seed * 1_000_003 + i) mod 2**63`` with ``i`` its position among the prompts; all of that prompt's
noise (phase-1 / full initial noise, phase-2 level-0 and sampling noise, the students' noise) comes
from it and the batch is stacked, so a prompt's video does not depend on ``batch_size`` or on the
other prompts of its batch (up to floating-point differences of batched kernels on some devices).

Per-stage times are measured with ``torch.cuda.synchronize`` on CUDA (``StageTimer``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from interpdiff.corruption import (
    NOISE_MODES,
    anchor_confidence,
    level_sigmas,
    randn_rows,
    refine,
    sampling_noise_scale,
)
from interpdiff.flow import sampling_sigmas
from interpdiff.interpolate import interpolate
from interpdiff.masks import check_nested, mask_to_indices, uniform_nested_masks
from interpdiff.video import wan
from interpdiff.video.objectives import (
    ModelConfig,
    Phase2Config,
    base_dtype,
    build_transformer,
    dphi_file,
    ensure_keyframe_features,
    level_timestep,
    phase2_budgets,
    phase2_restore,
)

logger = logging.getLogger(__name__)

WAN_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)


class StageTimer:
    """Wall-clock seconds per named stage (CUDA-synchronised)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.times: dict[str, float] = {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def stage(self, name: str):
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0


def latent_frames(num_frames: int) -> int:
    """Pixel frames -> latent frames of the Wan VAE (temporal stride 4): ``1 + (F - 1) / 4``."""
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames={num_frames}: the Wan VAE needs 4k+1 frames (e.g. 81, 33, 17, 5)")
    return 1 + (num_frames - 1) // 4


PROMPT_SEED_STRIDE = 1_000_003


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt ``index`` (its 0-based position in ``prompts`` + ``prompts_file``) under the
    run seed ``seed``: ``(seed * 1_000_003 + index) mod 2**63``. Each prompt has its own generator, so
    its video depends on ``(seed, index)`` only, not on ``batch_size`` or on the other prompts of its
    batch, and prompt ``i + 1`` at seed ``s`` does not reuse the noise of prompt ``i`` at seed ``s + 1``
    (distinct for fewer than 1,000,003 prompts)."""
    return (int(seed) * PROMPT_SEED_STRIDE + int(index)) % (1 << 63)


def prompt_generators(seed: int, start: int, n: int) -> list[torch.Generator]:
    """CPU generators of prompts ``start .. start + n - 1`` (``prompt_seed``)."""
    return [torch.Generator().manual_seed(prompt_seed(seed, start + i)) for i in range(n)]


def _randn(shape, generator: torch.Generator | Sequence[torch.Generator] | None, device, dtype=torch.float32):
    """Standard normal ``shape``: one generator for the whole tensor, or one per batch row
    (``corruption.randn_rows``; CPU generators draw on the CPU)."""
    return randn_rows(shape, generator, device).to(dtype)


@torch.no_grad()
def euler_flow_sample(
    velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x_T: torch.Tensor,
    steps: int,
    shift: float,
) -> torch.Tensor:
    """``x <- x + (sigma_{i+1} - sigma_i) v(x, 1000 sigma_i)`` over ``sampling_sigmas(steps, shift)``."""
    sig = sampling_sigmas(steps, shift)
    x = x_T.float()
    B = x.shape[0]
    for i in range(steps):
        t_B = torch.full((B,), float(sig[i]) * 1000.0, device=x.device)
        v = velocity(x, t_B).float()
        x = x + (float(sig[i + 1]) - float(sig[i])) * v
    return x


def _cfg_velocity(transformer, emb, neg_emb, guidance: float, **fwd):
    """``v = v_u + g (v_c - v_u)`` (diffusers' ``WanPipeline`` rule). The conditional and the
    unconditional branch run as one forward over a doubled batch when the two embeddings have the
    same length (always for UMT5 padded to ``max_length``): one launch sequence instead of two,
    which matters for the short phase-1 keyframe sequences; otherwise two forwards."""
    frame_idx = fwd.get("frame_idx_B_K")

    def velocity(x, t_B):
        if guidance == 1.0 or neg_emb is None:
            return wan.wan_forward(transformer, x, t_B, emb, **fwd).float()
        if neg_emb.shape[1:] == emb.shape[1:]:
            fwd2 = dict(fwd)
            if frame_idx is not None:
                fwd2["frame_idx_B_K"] = torch.cat([frame_idx, frame_idx])
            v_c, v_u = wan.wan_forward(transformer, torch.cat([x, x]), torch.cat([t_B, t_B]),
                                       torch.cat([emb, neg_emb.to(emb.dtype)]), **fwd2).float().chunk(2)
        else:
            v_c = wan.wan_forward(transformer, x, t_B, emb, **fwd).float()
            v_u = wan.wan_forward(transformer, x, t_B, neg_emb, **fwd).float()
        return v_u + guidance * (v_c - v_u)

    return velocity


@torch.no_grad()
def phase1_sample(
    transformer,
    emb_B_L_D: torch.Tensor,
    idx_B_K: torch.Tensor,
    chw: tuple[int, int, int],
    steps: int,
    shift: float = 5.0,
    guidance: float = 1.0,
    neg_emb_B_L_D: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Keyframe latents ``[B, C, K, H, W]`` at true frame indices ``idx_B_K`` (rope positions).
    ``generator``: one for the batch, or one per row (``prompt_generators``)."""
    C, H, W = chw
    B, K = idx_B_K.shape
    x = _randn((B, C, K, H, W), generator, emb_B_L_D.device)
    vel = _cfg_velocity(transformer, emb_B_L_D, neg_emb_B_L_D, guidance, frame_idx_B_K=idx_B_K)
    return euler_flow_sample(vel, x, steps, shift)


def scatter_keyframes(key_B_C_K_H_W: torch.Tensor, idx_B_K: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (``I(x, M)`` ``[B, C, T, H, W]`` with the keyframes at ``idx``, ``mask_B_T``)."""
    B, C, K, H, W = key_B_C_K_H_W.shape
    x = key_B_C_K_H_W.new_zeros(B, C, T, H, W)
    x.scatter_(2, idx_B_K[:, None, :, None, None].expand(B, C, K, H, W), key_B_C_K_H_W)
    mask = torch.zeros(B, T, dtype=torch.bool, device=x.device)
    mask.scatter_(1, idx_B_K, True)
    return interpolate(x, mask, time_dim=2), mask


@dataclass
class Phase2Settings:
    """What the sampler needs from the phase-2 training config (stored in the LoRA metadata).

    ``noise`` / ``noise_scale`` are ``corruption.refine``'s: with ``noise='constant'`` the scale is
    the absolute std of the noise added at every step, so build it from the schedule
    (``corruption.sampling_noise_scale``, as ``sample.py`` does through ``_phase2_settings``);
    the default 1.0 there would be unit-variance noise against training sigmas of ~0.01-0.1."""

    budgets: list[int]
    sigma_max: float = 0.1
    sigma_min: float = 0.01
    channels: list[str] = field(default_factory=lambda: ["mask"])
    confidence: str = "mask"
    noise: str = "level"  # none | constant | level (sampling noise on missing frames)
    noise_scale: float = 1.0

    @classmethod
    def from_phase2_config(cls, p2, T: int, **kw) -> "Phase2Settings":
        return cls(budgets=phase2_budgets(p2, T), sigma_max=p2.sigma_max, sigma_min=p2.sigma_min,
                   channels=list(p2.channels), confidence=p2.confidence, **kw)


@torch.no_grad()
def phase2_refine(
    transformer,
    x_start_B_C_T_H_W: torch.Tensor,
    masks_B_S_T: torch.Tensor,
    emb_B_L_D: torch.Tensor,
    st: Phase2Settings,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    init_noise: bool = True,
) -> torch.Tensor:
    """Coarse-to-fine refinement from ``x_start = I(keyframes, M_0)`` (``corruption.refine``).

    ``generator`` may be one per batch row (``prompt_generators``): row b's level-0 noise is drawn on
    the CPU from ``generator[b]``, its sampling noise on the device from a device generator seeded
    from ``generator[b]`` (``corruption.randn_rows``). One generator (or ``None``) draws the batch."""
    B, C, T, H, W = x_start_B_C_T_H_W.shape
    S = masks_B_S_T.shape[1]
    sig = level_sigmas(S, st.sigma_max, st.sigma_min)
    p2 = Phase2Config(channels=list(st.channels), confidence=st.confidence)
    x = x_start_B_C_T_H_W.float()
    if init_noise and float(sig[0]) > 0:  # level-0 input as in training: noise on missing frames
        miss = (~masks_B_S_T[:, 0]).float()[:, None, :, None, None]
        x = x + float(sig[0]) * _randn(x.shape, generator, x.device) * miss

    # level timesteps computed once on the host and moved once (no per-level host->device copy)
    t_S_B = level_timestep(st.budgets, torch.arange(S), T)[:, None].expand(S, B).contiguous().to(x.device)

    def restorer(x_s, s, mask_s, conf_s):
        # conf_s = anchor_confidence(M_s) built by refine from this level's mask, as in training
        return phase2_restore(transformer, x_s, mask_s, t_S_B[s], emb_B_L_D, p2, conf_B_T=conf_s)

    # refine draws sampling noise on the tensor's device: device generators seeded from ``generator``
    dev_gen = None
    if st.noise != "none" and generator is not None:
        def device_gen(g):
            d = torch.Generator(device=x.device)
            d.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
            return d

        dev_gen = [device_gen(g) for g in generator] if isinstance(generator, (list, tuple)) else device_gen(generator)
    return refine(restorer, x, masks_B_S_T, time_dim=2, sigmas=sig, noise=st.noise, noise_scale=st.noise_scale,
                  confidence=st.confidence, generator=dev_gen)


@torch.no_grad()
def two_phase_sample(
    phase1_tr,
    phase2_tr,
    emb_B_L_D: torch.Tensor,
    T: int,
    hw: tuple[int, int],
    st: Phase2Settings,
    phase1_steps: int,
    shift: float = 5.0,
    guidance: float = 1.0,
    neg_emb_B_L_D: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    timer: StageTimer | None = None,
    idx_B_K: torch.Tensor | None = None,
    masks_B_S_T: torch.Tensor | None = None,
    phase1_fn: Callable | None = None,
    phase2_fn: Callable | None = None,
) -> dict:
    """Phase 1 -> interpolation -> phase 2. Returns ``{"latents", "keyframes", "interpolated", "idx",
    "masks"}``. ``masks_B_S_T``: nested keyframe masks for the budgets ``st.budgets`` (e.g. from the
    video keyframe selector); default uniform. ``phase1_fn(emb, idx_B_K, (C, H, W), generator) ->
    keyframes`` / ``phase2_fn(x_start, masks, emb, generator) -> latents`` replace the default
    samplers (distilled students, ``interpdiff.video.distill_wan``)."""
    timer = timer or StageTimer(emb_B_L_D.device)
    B = emb_B_L_D.shape[0]
    H, W = hw
    C = wan.unwrap_model(phase1_tr).config.in_channels
    if masks_B_S_T is None:
        masks = uniform_nested_masks(B, T, st.budgets, device=emb_B_L_D.device)
    else:
        masks = masks_B_S_T.to(emb_B_L_D.device)
        if tuple(masks.shape) != (B, len(st.budgets), T):
            raise ValueError(f"two_phase_sample: masks_B_S_T has shape {list(masks.shape)}, expected "
                             f"[{B}, {len(st.budgets)}, {T}] (budgets {st.budgets})")
        check_nested(masks, st.budgets)
    if idx_B_K is None:
        idx_B_K = mask_to_indices(masks[:, 0])
    with timer.stage("phase1"):
        if phase1_fn is not None:
            key = phase1_fn(emb_B_L_D, idx_B_K, (C, H, W), generator)
        else:
            key = phase1_sample(phase1_tr, emb_B_L_D, idx_B_K, (C, H, W), phase1_steps, shift, guidance, neg_emb_B_L_D,
                                generator)
    with timer.stage("interpolate"):
        x0, m0 = scatter_keyframes(key, idx_B_K, T)
    if not torch.equal(m0, masks[:, 0]):
        raise ValueError("two_phase_sample: keyframe indices differ from the level-0 mask")
    with timer.stage("phase2"):
        if phase2_fn is not None:
            out = phase2_fn(x0, masks, emb_B_L_D, generator)
        else:
            out = phase2_refine(phase2_tr, x0, masks, emb_B_L_D, st, generator)
    return {"latents": out, "keyframes": key, "interpolated": x0, "idx": idx_B_K, "masks": masks}


@torch.no_grad()
def full_sample(
    transformer,
    emb_B_L_D: torch.Tensor,
    shape_CTHW: tuple[int, int, int, int],
    steps: int,
    shift: float = 5.0,
    guidance: float = 5.0,
    neg_emb_B_L_D: torch.Tensor | None = None,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Base Wan2.1 flow-matching sampler with CFG on all frames -> latents ``[B, C, T, H, W]``.
    ``generator``: one for the batch, or one per row (``prompt_generators``)."""
    B = emb_B_L_D.shape[0]
    x = _randn((B, *shape_CTHW), generator, emb_B_L_D.device)
    return euler_flow_sample(_cfg_velocity(transformer, emb_B_L_D, neg_emb_B_L_D, guidance), x, steps, shift)


# --- output -------------------------------------------------------------------------------------


def video_to_uint8(video_B_3_F_H_W: torch.Tensor) -> np.ndarray:
    """``[-1, 1]`` pixels -> ``uint8 [B, F, H, W, 3]``."""
    v = ((video_B_3_F_H_W.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return v.permute(0, 2, 3, 4, 1).cpu().numpy()


def write_mp4(path: str | Path, frames_F_H_W_3: np.ndarray, fps: int = 16) -> Path:
    """H.264 mp4 through imageio-ffmpeg, written to a temp name then renamed."""
    import os
    import tempfile

    import imageio.v2 as imageio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    F, H, W, _ = frames_F_H_W_3.shape
    if H % 2 or W % 2:
        raise ValueError(f"write_mp4: H.264 (yuv420p) needs even height and width, got {H}x{W}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".mp4", dir=path.parent)
    os.close(fd)
    try:
        imageio.mimwrite(tmp, list(frames_F_H_W_3), fps=fps, codec="libx264", macro_block_size=1,
                         pixelformat="yuv420p")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def latent_preview(rows: Sequence[tuple[str, torch.Tensor]], path: str | Path) -> Path:
    """PNG grid: one row per ``(name, lat_C_T_H_W)``, one column per frame, channels 0-2 as RGB
    (each row min-max normalised). For tiny runs where decoding means nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from interpdiff.io import atomic_write_bytes

    T = max(r[1].shape[1] for r in rows)
    fig, axes = plt.subplots(len(rows), T, figsize=(1.2 * T, 1.3 * len(rows)), squeeze=False)
    for i, (name, lat) in enumerate(rows):
        x = lat[:3].float().cpu()
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-8)
        for t in range(T):
            ax = axes[i, t]
            ax.axis("off")
            if t < x.shape[1]:
                ax.imshow(x[:, t].permute(1, 2, 0).numpy(), interpolation="nearest")
            if t == 0:
                ax.set_title(name, fontsize=7, loc="left")
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


# --- validation during training ----------------------------------------------------------------


def validation_batch(held: dict, batches, num_samples: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lat float32, emb)`` of the first ``num_samples`` of the first batch of epoch 0, read once
    into ``held`` (the validators' fixed batch), moved to ``dev``."""
    if "batch" not in held:
        b = next(iter(batches(0, 0)))
        n = min(num_samples, b["lat"].shape[0])
        held["batch"] = {"lat": b["lat"][:n], "emb": b["emb"][:n]}
    return held["batch"]["lat"].to(dev).float(), held["batch"]["emb"].to(dev)


def make_validation(cfg, phase: int, batches) -> Callable:
    """``validate(model, step, folder, is_main)`` for ``TrainSpec``: on a fixed batch (the first of
    epoch 0), phase 1 samples keyframes at uniform indices and compares them with the true ones;
    phase 2 runs the oracle refinement (true keyframes at M_0, the sampler of ``phase2_refine``)
    and reports the refined vs interpolated error (the refined output should not be worse).
    Writes ``val_XXXXXXXX.png`` latent previews (or mp4s with ``validation.decode`` and a VAE) and
    appends the numbers to ``validation/metrics.jsonl``."""
    held: dict = {}
    vcfg = cfg.validation

    def validate(model, step: int, folder: Path, is_main: bool):
        dev = next(model.parameters()).device
        lat, emb = validation_batch(held, batches, vcfg.num_samples, dev)
        B, C, T, H, W = lat.shape
        g = torch.Generator().manual_seed(cfg.train.seed)
        ctx = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
        with ctx:
            if phase == 1:
                K = min(cfg.phase1.num_keyframes, T)
                idx = mask_to_indices(uniform_nested_masks(B, T, [K], device=dev)[:, 0])
                key = phase1_sample(model, emb, idx, (C, H, W), vcfg.phase1_steps, vcfg.shift, generator=g)
                true = torch.gather(lat, 2, idx[:, None, :, None, None].expand(B, C, K, H, W))
                metrics = {"step": step, "keyframe_mse": float(((key - true) ** 2).mean())}
                rows = [("true keyframes", true[0]), ("sampled keyframes", key[0])]
                video_lat = scatter_keyframes(key, idx, T)[0]
            else:
                # the sampler exactly as sample.py runs it (level-0 noise, sampling noise 'level')
                st = Phase2Settings.from_phase2_config(cfg.phase2, T, noise="level")
                masks = uniform_nested_masks(B, T, st.budgets, device=dev)
                x0 = interpolate(lat, masks[:, 0], time_dim=2)
                out = phase2_refine(model, x0, masks, emb, st, g, init_noise=True)
                metrics = {"step": step, "interp_mse": float(((x0 - lat) ** 2).mean()),
                           "refined_mse": float(((out - lat) ** 2).mean())}
                rows = [("ground truth", lat[0]), ("interpolated", x0[0]), ("refined", out[0])]
                video_lat = out
        if not is_main:
            return
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if vcfg.decode:
            if "vae" not in held:
                held["vae"] = wan.load_vae(cfg.model.path).to(dev)
            video = wan.vae_decode(held["vae"], video_lat)
            for i, v in enumerate(video_to_uint8(video)):
                write_mp4(folder / f"val_{step:08d}_{i}.mp4", v, fps=vcfg.fps)
        else:
            latent_preview(rows, folder / f"val_{step:08d}.png")

    return validate


# --- sample.py: config and driver ---------------------------------------------------------------

MODES = ("two_phase", "full")
KEYFRAME_SOURCES = ("uniform", "selector")


@dataclass
class SampleConfig:
    """``sample.py`` settings. LoRA folders are ``save_lora`` folders (a training checkpoint's
    ``trainable/``); an empty ``phase1_lora`` / ``phase2_lora`` runs the base weights with the
    phase's structure (keyframe rope / zero-initialised mask channels), e.g. for timing, with a
    warning naming the key (``warn_untrained_phases``)."""

    model_path: str = "tiny"
    dtype: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU (VAE always fp32)
    attention: str = "sdpa"
    mode: str = "two_phase"  # two_phase | full
    keyframe_source: str = "uniform"  # uniform | selector (nested masks from the video keyframe selector)
    selector_ckpt: str = ""  # keyframe_source=selector: file or run folder written by interpdiff.video.train_selector
    phase1_lora: str = ""
    phase2_lora: str = ""
    # a phase-1 LoRA trained with phase1.kp_feat and a D_phi: that D_phi's dphi.pt ("" = the path it records)
    phase1_dphi: str = ""
    prompts: list[str] = field(default_factory=list)
    prompts_file: str = ""  # one prompt per line (added after ``prompts``)
    negative_prompt: str = WAN_NEGATIVE_PROMPT
    num_frames: int = 81  # pixel frames, 4k+1
    height: int = 480
    width: int = 832
    phase1_steps: int = 8
    phase1_guidance: float = 5.0
    full_steps: int = 50
    guidance: float = 5.0  # CFG scale of --mode full, >= 1 (1 = no CFG; phase1_guidance likewise)
    shift: float = 5.0
    phase2_noise: str = "level"  # none | constant | level
    # sampling noise in units of the training sigmas (finite, >= 0): level -> scale * sigma_{s+1} fresh at each
    # step, constant -> scale * sigma_0 (the level-0 training sigma) added at every step; ignored by none
    phase2_noise_scale: float = 1.0
    seed: int = 0  # prompt i's noise comes from its own generator, seeded prompt_seed(seed, i) = seed * 1_000_003 + i
    deterministic: bool = False  # deterministic CUDA kernels (interpdiff.training.set_deterministic): same bits run to run
    batch_size: int = 1  # prompts per sampling batch (the videos do not depend on it)
    text_max_length: int = 512
    out_dir: str = "samples"
    fps: int = 16
    phase2: Phase2Config = field(default_factory=Phase2Config)  # used when phase2_lora is empty
    # distilled students (distill_rcm.py checkpoints' trainable/student or trainable_ema/student folders):
    student_lora: str = ""  # mode=full: the few-step full-sequence student (replaces the CFG Euler sampler)
    phase1_student_lora: str = ""  # two_phase: the few-step phase-1 student (replaces phase1_lora)
    phase2_student_lora: str = ""  # two_phase: the 1-2 step phase-2 student (replaces phase2_lora)
    student_steps: int = 0  # consistency steps of the full / phase-1 student (no CFG: distilled in); 0 = its distill.sampler
    student_mid_times: list[float] = field(default_factory=list)  # TrigFlow times after t_0; [] = the student's distill.sampler
    phase2_student_steps: int = 0  # 0 = the steps the phase-2 student was distilled for

    def validate(self) -> None:
        from interpdiff.config import ConfigError

        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r} is not one of {MODES}")
        try:
            latent_frames(self.num_frames)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.height < 16 or self.width < 16 or self.height % 16 or self.width % 16:
            raise ConfigError(f"height={self.height}, width={self.width}: both must be positive multiples of 16 "
                              "(VAE 8 x patch 2), e.g. 480, 832")
        if self.batch_size < 1 or self.phase1_steps < 1 or self.full_steps < 1:
            raise ConfigError("batch_size, phase1_steps and full_steps must be >= 1")
        if self.text_max_length < 1:
            raise ConfigError(f"text_max_length={self.text_max_length}: expected >= 1 UMT5 tokens (Wan uses 512)")
        if not self.shift > 0:
            raise ConfigError(f"shift={self.shift}: expected a timestep shift > 0 (Wan uses 5.0; 1 = no shift)")
        if self.fps < 1:
            raise ConfigError(f"fps={self.fps}: expected the mp4 frame rate, an integer >= 1 (Wan uses 16)")
        for key in ("guidance", "phase1_guidance"):
            v = getattr(self, key)
            if not v >= 1.0:  # also refuses nan
                raise ConfigError(f"{key}={v}: expected a CFG scale >= 1 (1 = no CFG: the conditional velocity only, "
                                  "the negative prompt is not encoded; diffusers' WanPipeline also runs no CFG at "
                                  "scale <= 1)")
        if self.keyframe_source not in KEYFRAME_SOURCES:
            raise ConfigError(f"keyframe_source={self.keyframe_source!r} is not one of {KEYFRAME_SOURCES}")
        if self.keyframe_source == "selector" and self.mode == "two_phase" and not self.selector_ckpt:
            raise ConfigError("keyframe_source=selector needs selector_ckpt (a selector file or run folder written by "
                              "python -m interpdiff.video.train_selector), which is not set")
        if self.phase2_noise not in NOISE_MODES:
            raise ConfigError(f"phase2_noise={self.phase2_noise!r} is not one of {', '.join(NOISE_MODES)}")
        if not (math.isfinite(self.phase2_noise_scale) and self.phase2_noise_scale >= 0):
            raise ConfigError(f"phase2_noise_scale={self.phase2_noise_scale}: expected a finite number >= 0 (the "
                              "sampling noise in units of the training sigmas: 1 = the training schedule, 0 = none)")
        if self.mode == "two_phase":
            # the settings used without phase-2 LoRA metadata (n_levels=1 would skip phase 2, a bad sigma or
            # confidence would fail after the models load); against the clip length in _phase2_settings
            self.phase2.validate()
        if self.student_steps < 0 or self.phase2_student_steps not in (0, 1, 2):
            raise ConfigError(f"student_steps={self.student_steps}, phase2_student_steps={self.phase2_student_steps}: "
                              "expected student_steps >= 0 (0: from the student) and phase2_student_steps in 0 (from the "
                              "student), 1, 2")
        if self.student_mid_times:
            # what holds whatever the student's sigma_max (t_0 = atan(sigma_max) < pi/2): the sampler's own check
            # (distill.consistency_times) with t_0 = pi/2; against the student's t_0 in check_sample_inputs
            from interpdiff.distill import consistency_times

            mids = [float(t) for t in self.student_mid_times]
            try:
                consistency_times(self.student_steps or len(mids) + 1, mids, sigma_max=math.inf)
            except ValueError as e:
                raise ConfigError(f"student_mid_times={mids} (student_steps={self.student_steps}): expected finite "
                                  "TrigFlow times in (0, pi/2), strictly decreasing, at least student_steps - 1 of "
                                  f"them ({e})") from None


def ignored_settings(cfg: SampleConfig) -> list[str]:
    """Settings the chosen mode does not read (a mistyped mode or a forgotten key is rarely what the
    user meant); ``run_sampling`` warns about each before anything loads."""
    ignored = []
    if cfg.selector_ckpt and (cfg.keyframe_source != "selector" or cfg.mode != "two_phase"):
        ignored.append("selector_ckpt (read with keyframe_source=selector in mode=two_phase)")
    if cfg.mode == "full" and (cfg.phase1_lora or cfg.phase2_lora or cfg.phase1_student_lora or cfg.phase2_student_lora):
        ignored.append("phase1_lora / phase2_lora / phase*_student_lora (mode=two_phase only)")
    if cfg.mode == "two_phase" and cfg.student_lora:
        ignored.append("student_lora (mode=full only; two_phase takes phase1_student_lora / phase2_student_lora)")
    if cfg.student_steps and not (cfg.student_lora if cfg.mode == "full" else cfg.phase1_student_lora):
        ignored.append("student_steps (read with student_lora in mode=full, phase1_student_lora in two_phase)")
    if cfg.phase2_student_steps and not (cfg.mode == "two_phase" and cfg.phase2_student_lora):
        ignored.append("phase2_student_steps (read with phase2_student_lora)")
    return ignored


def read_prompts(cfg: SampleConfig) -> list[str]:
    from interpdiff.config import ConfigError

    prompts = [p for p in cfg.prompts if p.strip()]
    if cfg.prompts_file:
        p = Path(cfg.prompts_file)
        if p.is_dir():
            raise ConfigError(f"prompts_file={cfg.prompts_file!r} is a folder (expected a text file, one prompt per line)")
        if not p.is_file():
            raise ConfigError(f"prompts_file={cfg.prompts_file!r} does not exist (expected a text file, one prompt per line)")
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ConfigError(f"prompts_file={cfg.prompts_file!r} is not UTF-8 text (byte {e.start}: {e.reason}); "
                              "save it as UTF-8") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise ConfigError(f"prompts_file={cfg.prompts_file!r} holds no prompt (empty or blank lines only)")
        prompts += from_file
    if not prompts:
        raise ConfigError("no prompt: set prompts=[...] or prompts_file=PATH")
    return prompts


def _slug(text: str, n: int = 40) -> str:
    import re

    return re.sub(r"[^a-zA-Z0-9]+", "_", text.lower()).strip("_")[:n] or "prompt"


def _phase2_settings(cfg: SampleConfig, T: int) -> Phase2Settings:
    """From the phase-2 LoRA's metadata (what it was trained with), else ``cfg.phase2``; the
    sampling noise ``phase2_noise_scale`` times that schedule (``corruption.sampling_noise_scale``)."""
    from interpdiff.config import from_dict

    p2 = cfg.phase2
    p2_lora = cfg.phase2_student_lora or cfg.phase2_lora
    if p2_lora:
        meta = wan.read_lora_meta(Path(p2_lora))
        stored = (meta.get("extra") or {}).get("phase2")
        if stored:
            p2 = from_dict(Phase2Config, stored)
        if meta.get("widening"):  # the input planes the LoRA's patch embedding was widened with
            p2 = dataclasses.replace(p2, channels=list(meta["widening"]["channels"]))
    st = Phase2Settings.from_phase2_config(p2, T, noise=cfg.phase2_noise)
    st.noise_scale = sampling_noise_scale(cfg.phase2_noise, cfg.phase2_noise_scale,
                                          level_sigmas(len(st.budgets), st.sigma_max, st.sigma_min))
    return st


def load_phase_transformer(cfg: SampleConfig, phase: int, device, st: Phase2Settings | None = None):
    """The phase's transformer as training built it (``objectives.build_transformer``: base, attention
    backend, keyframe rope / widened patch embedding with ``st.channels``), then the phase's LoRA
    (``wan.load_lora``: LoRA + stored widening weights), in eval mode on ``device``."""
    from interpdiff.config import ConfigError

    lora = cfg.phase1_lora if phase == 1 else cfg.phase2_lora
    p2 = Phase2Config(channels=list(st.channels), confidence=st.confidence) if phase == 2 else None
    tr = build_transformer(ModelConfig(path=cfg.model_path, dtype=cfg.dtype, attention=cfg.attention), phase, p2,
                           lora=False)
    if lora:
        meta = wan.load_lora(tr, lora)
        want = (meta.get("extra") or {}).get("phase")
        if want is not None and int(want) != phase:
            raise ConfigError(f"phase{phase}_lora={lora!r} was trained for phase {want}")
        ensure_keyframe_features(tr, meta, cfg.phase1_dphi)
    wan.freeze(tr)
    return tr.to(device)


# what each LoRA key of SampleConfig must hold: (the phase in its metadata's extra.phase, the distilled target)
LORA_KEYS = {"phase1_lora": (1, None), "phase2_lora": (2, None), "phase1_student_lora": (1, "phase1"),
             "phase2_student_lora": (2, "phase2"), "student_lora": (None, "full")}


def check_sample_inputs(cfg: SampleConfig) -> list[str]:
    """Everything that can fail cheaply, before any model is loaded: the prompts, each LoRA folder
    the mode uses (its weights file; the phase it was trained for, ``extra.phase``, so swapped
    phase-1 / phase-2 folders are refused here and not after the text encoder ran; a student's
    distilled target), the students' consistency times (``distill.consistency_times`` with the
    steps / times / sigma_max ``student_sampler_args`` gives the sampler), the model path."""
    from interpdiff.config import ConfigError
    from interpdiff.distill import consistency_times

    prompts = read_prompts(cfg)
    for name, (want_phase, want_target) in LORA_KEYS.items():
        path = getattr(cfg, name)
        if not path or (cfg.mode == "two_phase") == (name == "student_lora"):
            continue
        d = Path(path)
        if not (d / wan.LORA_WEIGHT_NAME).is_file():
            raise wan.WanLoadError(f"{name}={path!r}: no {wan.LORA_WEIGHT_NAME!r} there (expected a save_lora folder, "
                                   "e.g. runs/p1/checkpoints/step_00001000/trainable)")
        meta = wan.read_lora_meta(d)
        extra = meta.get("extra") or {}
        got = extra.get("phase")
        if want_phase is not None and got is not None and int(got) != want_phase:
            other = name.replace(f"phase{want_phase}", f"phase{int(got)}")  # the key of that phase
            hint = f" (swapped with {other}?)" if other in LORA_KEYS else ""
            raise ConfigError(f"{name}={path!r} was trained for phase {got}, but {name} takes a phase-{want_phase} "
                              f"LoRA{hint}")
        if want_target is not None:
            from interpdiff.video.distill_wan import read_student_meta

            try:
                read_student_meta(d)
            except wan.WanLoadError as e:
                raise wan.WanLoadError(f"{name}: {e}") from None
        if name == "phase1_lora" and (meta.get("widening") or {}).get("channels") == list(wan.KP_FEAT_CHANNELS):
            recorded = (extra.get("phase1") or {}).get("dphi_ckpt") or ""
            dphi = cfg.phase1_dphi or recorded
            if cfg.phase1_dphi and not recorded:
                raise ConfigError(f"phase1_dphi={cfg.phase1_dphi!r}: {name}={path!r} was trained without D_phi costs; "
                                  "leave it unset")
            if dphi and not dphi_file(dphi).is_file():
                raise ConfigError(f"{name}={path!r} takes D_phi keyframe costs (trained with {recorded!r}); {dphi!r} "
                                  "does not exist: pass the D_phi checkpoint as phase1_dphi=...")
        target = (extra.get("distill") or {}).get("target")
        if want_target is not None and target != want_target:
            raise ConfigError(f"{name}={path!r} is a distilled {target!r} student, expected {want_target!r}")
        if want_target in ("full", "phase1"):  # the few-step consistency sampler's times, with this student's
            a = student_sampler_args(cfg, meta)
            try:
                consistency_times(a["steps"], a["mid_times"], a["sigma_max"])
            except ValueError as e:
                raise ConfigError(f"student_steps={cfg.student_steps}, student_mid_times={list(cfg.student_mid_times)} "
                                  f"with {name}={path!r} (steps {a['steps']}, sigma_max {a['sigma_max']}): {e}"
                                  ) from None
    if cfg.model_path != "tiny":
        wan.resolve_model_path(cfg.model_path, "transformer")
    return prompts


def warn_untrained_phases(cfg: SampleConfig) -> list[str]:
    """Two-phase sampling with an empty ``phase1_lora`` / ``phase2_lora`` (and no student for that
    phase) runs the base model with the phase's untrained structure: allowed for timing runs, but
    its videos mean nothing, so one warning per phase names the key. Returns the keys warned about."""
    if cfg.mode != "two_phase":
        return []
    what = {"phase1_lora": "the base model's untrained keyframe model (no phase-1 LoRA; keyframe rope only)",
            "phase2_lora": "the base model's untrained refiner (no phase-2 LoRA; zero-initialised mask channels)"}
    out = []
    for name, student in (("phase1_lora", cfg.phase1_student_lora), ("phase2_lora", cfg.phase2_student_lora)):
        if not getattr(cfg, name) and not student:
            logger.warning("%s is empty: sampling with %s; the videos mean nothing (timing runs only). Set %s to "
                           "a trained LoRA folder (a training checkpoint's trainable/ or trainable_ema/).", name,
                           what[name], name)
            out.append(name)
    return out


def check_keyframe_count(cfg: SampleConfig, st: Phase2Settings) -> None:
    """Level 0 of phase 2 holds the phase-1 keyframes (METHOD.md: ``K_0 = K_min``), so the phase-1
    LoRA must have been trained for ``K_0 = budgets[0]`` keyframes; a mismatch is refused by name
    (the rope would accept any K, silently sampling a keyframe count the LoRA never saw)."""
    from interpdiff.config import ConfigError

    name = "phase1_student_lora" if cfg.phase1_student_lora else "phase1_lora"
    path = getattr(cfg, name)
    if not path:
        return
    stored = (wan.read_lora_meta(path).get("extra") or {}).get("phase1") or {}
    k = stored.get("num_keyframes")
    if k is not None and int(k) != st.budgets[0]:
        raise ConfigError(
            f"{name}={path!r} was trained with phase1.num_keyframes={k}, but the phase-2 level-0 "
            f"budget is {st.budgets[0]} (budgets {st.budgets}); train both phases with phase1.num_keyframes == "
            "phase2.k_min (or phase2.budgets[0])"
        )


def load_keyframe_selector(cfg: SampleConfig, st: Phase2Settings | None, T: int):
    """The video keyframe selector for ``keyframe_source=selector`` (``None`` otherwise), checked
    against the sampling budgets before any Wan model is loaded: a missing or invalid
    ``selector_ckpt`` is a ``CheckpointError`` naming it, untrained budgets a ``ConfigError``."""
    from interpdiff.config import ConfigError
    from interpdiff.io import CheckpointError
    from interpdiff.video.selector import load_selector

    if cfg.mode != "two_phase" or cfg.keyframe_source != "selector":
        return None
    try:
        sel = load_selector(cfg.selector_ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"selector_ckpt: {e}") from None
    try:
        sel.check_budgets_for(st.budgets, T, "phase-2 budgets (phase2_lora metadata or phase2.*)")
    except ValueError as e:
        raise ConfigError(f"selector_ckpt={cfg.selector_ckpt!r}: {e}") from None
    return sel


def load_students(cfg: SampleConfig, device, st: Phase2Settings | None) -> dict:
    """``{target: (transformer, lora metadata)}`` for the distilled students named in ``cfg``
    (``distill_wan.load_student_transformer``: base + teacher adapter + student LoRA)."""
    from interpdiff.video.distill_wan import load_student_transformer

    out = {}
    wanted = [("full", cfg.student_lora)] if cfg.mode == "full" else [("phase1", cfg.phase1_student_lora),
                                                                      ("phase2", cfg.phase2_student_lora)]
    for target, path in wanted:
        if path:
            tr, meta = load_student_transformer(cfg.model_path, path, cfg.dtype, cfg.attention, want_target=target,
                                                dphi_ckpt=cfg.phase1_dphi if target == "phase1" else "")
            out[target] = (tr.to(device), meta)
    return out


def student_sampler_args(cfg: SampleConfig, meta: dict) -> dict:
    """``steps``, ``mid_times`` and ``sigma_max`` of a full / phase-1 student's few-step sampler: the
    sample config's values where set, else those the student was distilled with (its ``distill.sampler``)."""
    sm = ((meta.get("extra") or {}).get("distill") or {}).get("sampler") or {}
    steps = cfg.student_steps or int(sm.get("steps", 4))
    mid = list(cfg.student_mid_times) or (list(sm.get("mid_times") or []) if steps == int(sm.get("steps", -1)) else [])
    return {"steps": steps, "mid_times": mid or None, "sigma_max": float(sm.get("sigma_max", 80.0))}


def student_samplers(cfg: SampleConfig, students: dict, st: Phase2Settings) -> dict:
    """``phase1_fn`` / ``phase2_fn`` for ``two_phase_sample`` from the loaded students (one generator,
    or one per batch row: ``run_sampling``'s per-prompt generators)."""
    from interpdiff.video.distill_wan import phase2_student_levels, phase2_student_refine, student_sample

    fns = {}
    if "phase1" in students:
        tr1, meta1 = students["phase1"]
        a1 = student_sampler_args(cfg, meta1)

        def phase1_fn(emb, idx, chw, generator):
            C, H, W = chw

            return student_sample(tr1, emb, (C, idx.shape[1], H, W), a1["steps"], a1["mid_times"], a1["sigma_max"],
                                  idx_B_K=idx, generator=generator)

        fns["phase1_fn"] = phase1_fn
    if "phase2" in students:
        tr2, meta = students["phase2"]
        dist = meta["extra"]["distill"]
        trained = int(dist["sampler"]["steps"])
        steps = cfg.phase2_student_steps or trained
        if steps > trained:
            from interpdiff.config import ConfigError

            raise ConfigError(f"phase2_student_steps={steps}: the phase-2 student in {cfg.phase2_student_lora!r} was distilled "
                              f"for {trained} step(s); its level-m input was never trained")
        levels = phase2_student_levels(len(st.budgets), steps, dist.get("phase2_levels") if steps == dist["sampler"]["steps"] else None)

        def phase2_fn(x_start, masks, emb, generator):
            return phase2_student_refine(tr2, x_start, masks, emb, st, levels, generator)

        fns["phase2_fn"] = phase2_fn
    return fns


def run_sampling(cfg: SampleConfig, log=print) -> dict:
    """Text -> latents -> mp4 for every prompt; returns ``{"videos": [paths], "times": {stage: s},
    "keyframes": [level-0 indices per video]}``."""
    prompts = check_sample_inputs(cfg)
    warn_untrained_phases(cfg)
    for what in ignored_settings(cfg):
        logging.getLogger(__name__).warning("mode=%s ignores %s", cfg.mode, what)
    if cfg.deterministic:
        from interpdiff.training import set_deterministic

        set_deterministic(True)  # before any model is on the GPU
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    T = latent_frames(cfg.num_frames)
    H, W = cfg.height // 8, cfg.width // 8
    timer = StageTimer(device)
    st = _phase2_settings(cfg, T) if cfg.mode == "two_phase" else None
    if st is not None:
        check_keyframe_count(cfg, st)
    selector = load_keyframe_selector(cfg, st, T)
    if selector is not None:
        selector = selector.to(device)
    dtype = base_dtype(ModelConfig(dtype=cfg.dtype))
    with timer.stage("load"):
        enc, tok = wan.load_text_encoder(cfg.model_path, dtype=dtype)
        enc = enc.to(device)
    with timer.stage("text_encoder"):
        # encoded batch_size prompts at a time and kept on the host (hundreds of prompts through
        # UMT5-XXL in one forward, or all their embeddings on the GPU, would run out of memory);
        # each prompt's embedding is padded to text_max_length, so it does not depend on its batch
        emb_all = torch.cat([wan.encode_prompts(enc, tok, prompts[i : i + cfg.batch_size],
                                                max_length=cfg.text_max_length).cpu()
                             for i in range(0, len(prompts), cfg.batch_size)])
        guid = cfg.phase1_guidance if cfg.mode == "two_phase" else cfg.guidance
        neg = wan.encode_prompts(enc, tok, [cfg.negative_prompt], max_length=cfg.text_max_length) if guid != 1.0 else None
    del enc
    with timer.stage("load"):
        students = load_students(cfg, device, st) if (cfg.student_lora or cfg.phase1_student_lora
                                                      or cfg.phase2_student_lora) else {}
        if cfg.mode == "two_phase":
            tr1 = students["phase1"][0] if "phase1" in students else load_phase_transformer(cfg, 1, device)
            tr2 = students["phase2"][0] if "phase2" in students else load_phase_transformer(cfg, 2, device, st)
        elif "full" in students:
            tr = students["full"][0]
        else:
            tr = wan.load_transformer(cfg.model_path, dtype=dtype).to(device).eval()
            wan.set_attention_backend(tr, cfg.attention)
        vae = wan.load_vae(cfg.model_path).to(device)
    out_dir = Path(cfg.out_dir)
    videos, keyframes = [], []
    ctx = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        emb = emb_all[start : start + len(chunk)].to(device)
        neg_b = neg.expand(len(chunk), -1, -1).to(device) if neg is not None else None
        g = prompt_generators(cfg.seed, start, len(chunk))  # one per prompt: prompt_seed(seed, index)
        with ctx:
            if cfg.mode == "two_phase":
                masks = None
                if selector is not None:
                    with timer.stage("selector"):
                        masks = selector.nested_masks(emb, T, st.budgets)
                res = two_phase_sample(tr1, tr2, emb, T, (H, W), st, cfg.phase1_steps, cfg.shift, cfg.phase1_guidance,
                                       neg_b, g, timer, masks_B_S_T=masks, **student_samplers(cfg, students, st))
                lat = res["latents"]
                keyframes += res["idx"].cpu().tolist()
            else:
                C = wan.unwrap_model(tr).config.in_channels
                with timer.stage("full"):
                    if "full" in students:
                        from interpdiff.video.distill_wan import student_sample

                        a = student_sampler_args(cfg, students["full"][1])
                        lat = student_sample(tr, emb, (C, T, H, W), a["steps"], a["mid_times"], a["sigma_max"],
                                             generator=g)
                    else:
                        lat = full_sample(tr, emb, (C, T, H, W), cfg.full_steps, cfg.shift, cfg.guidance, neg_b, g)
        with timer.stage("vae_decode"):
            video = wan.vae_decode(vae, lat)
        with timer.stage("write"):
            for i, frames in enumerate(video_to_uint8(video)):
                idx = start + i
                videos.append(write_mp4(out_dir / f"{idx:03d}_{cfg.mode}_{_slug(prompts[idx])}.mp4", frames, fps=cfg.fps))
    times = dict(timer.times)
    log("stage times (s): " + ", ".join(f"{k} {v:.3f}" for k, v in times.items()))
    from interpdiff.io import atomic_write_text

    atomic_write_text(out_dir / f"times_{cfg.mode}.json", json.dumps({"times": times, "videos": [str(v) for v in videos],
                                                                       "prompts": prompts, "T": T, "H": H, "W": W,
                                                                       "keyframe_source": cfg.keyframe_source,
                                                                       "keyframes": keyframes}, indent=1))
    return {"videos": videos, "times": times, "keyframes": keyframes}
