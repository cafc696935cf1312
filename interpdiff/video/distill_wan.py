"""rCM step distillation of the Wan2.1 models (``distill_rcm.py``): one base model, two adapters.

Targets (``distill.target``):

* ``full``: the base Wan full-sequence model (optionally + ``distill.teacher_lora``) -> a few-step
  full-sequence student: the "4-step rCM full-sequence model" of the milestone (METHOD.md).
* ``phase1``: the phase-1 keyframe model (base + the ``train_phase1.py`` LoRA, keyframe rotary
  positions at the true frame indices, indices from ``phase1.index_policy`` as in training)
  -> a few-step keyframe student.
* ``phase2``: the phase-2 refiner (base + the ``train_phase2.py`` LoRA + its mask channels) -> a
  1-2 step refiner. Its corruption is not Gaussian (interpolation + a little noise on missing
  frames), so there is no PF-ODE, no score and nothing for sCM's JVP or DMD to act on; "1-2
  steps" means: the student maps the level-0 state ``x_0 = I(x, M_0) + sigma_0 eps (1 - M_0)``
  (1 step), or ``x_0`` and the intermediate level ``m`` (2 steps), straight to the output of the
  teacher's full S-level TACoS chain (``corruption.refine``, no sampling noise by default, so the
  target is a deterministic function of ``x_0``): regression to the teacher chain, loss weighted
  like ``phase2_loss``. In the 2-step student the level-m input is the TACoS jump
  ``x_m = I(x0_hat, M_m) + I(x_0 - x0_hat, M_0) + (sigma_m / sigma_0) n_0 (1 - M_m)`` with
  ``n_0 = x_0 - I(x_0, M_0)`` the level-0 noise (``corruption.tacos_step``; the noise of ``x_m``
  is then that of the teacher's training input at level m): from the teacher chain's output in training,
  from the student's own level-0 prediction at sampling (the teacher chain's state at level m would
  differ from it once ``sigma_0 > 0``).

**Memory-friendly model layout.** One frozen base Wan transformer carries the teacher (its
LoRA, if any, as the frozen adapter ``teacher``, ``install_teacher``; phase-2 mask channels are
installed frozen) and two trained peft LoRA adapters: ``student`` and (with DMD) ``fake_score``,
both initialised as no-ops (B = 0) and applied on top of the teacher adapter, so student and
fake score start equal to the teacher. (The teacher LoRA was merged into the base weights
before: with a bf16 base that rounds every ``W + delta`` to bf16 and loses the small entries of
the LoRA, so the distilled teacher was not the trained one.) ``use_adapter(model, name)``
switches the active adapter by setting peft's per-layer ``_active_adapter`` /
``_disable_adapters`` flags directly (peft's own ``set_adapter`` / ``disable_adapter`` would
flip ``requires_grad`` of the other adapters and break the training loop's parameter list);
``None`` = the teacher alone. One optimizer over both adapters (the
shared ``interpdiff.training`` loop, ZeRO-compatible): the loss is the sum of the student terms
(sCM / discrete consistency, DMD generator) and the fake-score flow-matching term; each term's
graph reaches only its own adapter (tested). Gradient checkpointing recomputes a block in backward,
after the adapter context has been left, so ``enable_checkpointing`` here wraps every checkpointed
block with the adapter state of its forward.

Differences to rCM (NVlabs/rcm) written down: the student and the fake score are updated at the
same rate with the same learning rate (rCM updates the critic 4 of 5 iterations with its own
optimizer; the shared loop has one optimizer, so the TTUR is not reproduced); no backward
simulation for the DMD generator input (one consistency step from ``t_max``); the teacher CFG is
Wan's ``uncond + w (cond - uncond)`` (rCM's ``teacher_guidance`` g corresponds to ``w = g + 1``).

**Forward-mode AD through Wan on CPU** (measured on the tiny preset, torch 2.14.1, diffusers
0.42.1, peft 0.21.2; ``tests/test_distill.py``): diffusers' ``sdpa``/``native`` attention backend
dispatches on CPU to ``aten::_scaled_dot_product_flash_attention_for_cpu``, which has no
forward-AD rule (``NotImplementedError``); the math SDPA path (diffusers' ``_native_math``) has
one, as do the peft LoRA layers, the keyframe rope and the timestep embedding, and
``torch.func.jvp`` through the whole model agrees with a central finite difference (fp64). So
with ``distill.jvp=autograd`` the attention runs on the math kernel inside the JVP
(``jvp_attention``) and on the configured backend everywhere else. The math kernel materialises
the ``L x L`` score matrix (12 heads x 32,760^2 for the full 81 x 480 x 832 sequence, ~26 GB per
tensor in bf16, more with its tangent), so ``distill.jvp_chunk`` splits the queries into chunks
(an exact split: each query row's softmax is over all keys); rCM instead wrote a FlashAttention
JVP kernel. Whether SDPA's CUDA flash / cuDNN kernels have forward-AD rules was not checked (no
GPU here); the math route does not depend on it. ``distill.jvp=finite_difference`` needs no
forward-AD rule and keeps the fast kernels, but Wan's sinusoidal timestep embedding makes ``F``
oscillate in ``t`` on a ~1e-3 rad scale, so the step must be ~1e-4 (``distill.fd_size``), where
bf16 rounding of the forwards dominates the difference: a fallback, not the default. Nothing
here was run on a GPU: memory and step time of the 1.3B configs are unmeasured.

Validation (``make_distill_validation``, every ``train.validate_every`` steps): the 1-step
student against the teacher's ODE sample from the same noise (full / phase1), the phase-2 student
against the teacher chain; latent previews. Not done: rCM's adaptive sCM weighting ``w_psi(t)``, TTUR critic updates and DMD backward simulation (above);
ZeRO-3 (the unwrapped-module forwards of the teacher / JVP are only reasoned about for ZeRO-2).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from interpdiff import distill as D
from interpdiff.config import ConfigError, from_dict
from interpdiff.corruption import anchor_confidence, level_sigmas, randn_rows, refine, tacos_step
from interpdiff.flow import flow_match_target, flow_match_xt, shift_sigma
from interpdiff.interpolate import interpolate_corrupt
from interpdiff.io import CheckpointError
from interpdiff.masks import mask_to_indices
from interpdiff.training import TrainLoopConfig, TrainSpec, sample_generator
from interpdiff.video import wan
from interpdiff.video.data import LatentDataConfig
from interpdiff.video.objectives import (
    PHASE1_POLICIES,
    PHASE2_POLICIES,
    KeyframePolicy,
    ModelConfig,
    Phase1Config,
    Phase2Config,
    check_policy_mix,
    base_dtype,
    bind_embed_dim,
    ensure_keyframe_features,
    level_timestep,
    make_batches,
    phase2_budgets,
    phase2_restore,
)

log = logging.getLogger(__name__)

STUDENT = "student"
FAKE = "fake_score"
TEACHER = "teacher"  # the teacher LoRA, a frozen adapter active under the others (install_teacher)
TARGET_PHASE = {"full": None, "phase1": 1, "phase2": 2}


# --- config -----------------------------------------------------------------------------------


@dataclass
class DistillValidationConfig:
    """Every ``train.validate_every`` steps on the first batch (``make_distill_validation``)."""

    num_samples: int = 2
    teacher_steps: int = 16  # full / phase1: Euler steps of the teacher reference (CFG, shift)
    shift: float = 5.0


@dataclass
class DistillTrainConfig:
    """``distill_rcm.py``'s config: the video training sections plus ``distill``. For
    ``target=phase2`` the level budgets, sigmas and mask channels are those stored in the teacher
    LoRA's metadata (what it was trained with); ``phase2.policy_mix`` / ``dp_mask_file`` /
    ``selector_ckpt`` still come from this config. For ``target=phase1`` the keyframe count must
    equal the teacher's.

    ``validate`` checks the phase sections the target reads (nothing else reaches the run):
    ``phase1`` for ``target=phase1``; for ``target=phase2`` the phase-2 config the run will use
    (``teacher_phase2_config``: the teacher's budgets, sigmas and channels with this config's mask
    policy), so values the teacher's metadata replaces are not refused. Both against the clip
    length when the data section fixes it (``data.crop_frames`` or ``data.latent_shape``), as is
    ``distill.phase2_levels`` against the teacher's level count."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: LatentDataConfig = field(default_factory=LatentDataConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    phase1: Phase1Config = field(default_factory=Phase1Config)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    distill: D.DistillConfig = field(default_factory=D.DistillConfig)
    validation: DistillValidationConfig = field(default_factory=DistillValidationConfig)

    def validate(self) -> None:
        self.train.validate()
        try:
            self.data.validate()
            self.model.lora.validate()
            self.distill.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.model.compile:
            raise ConfigError("model.compile=true is not supported by distill_rcm.py (forward-mode AD and adapter "
                              "switching run outside compiled regions); set model.compile=false")
        if self.model.checkpoint_policy not in wan.CHECKPOINT_POLICIES:
            raise ConfigError(f"model.checkpoint_policy={self.model.checkpoint_policy!r} is not one of "
                              f"{list(wan.CHECKPOINT_POLICIES)}")
        if self.distill.mode == "scm" and self.distill.target != "phase2" and self.model.lora.dropout > 0:
            raise ConfigError(f"model.lora.dropout={self.model.lora.dropout} with distill.mode=scm: the student's forward and "
                              "its JVP would draw different dropout masks; set model.lora.dropout=0")
        T = self.data.crop_frames or (self.data.latent_shape[1] if self.data.latent_shape else -1)
        T = T if T > 0 else None  # the clip length, when the config fixes it
        if self.distill.target == "phase1":
            self.phase1.validate(T)  # policy mix (+ selector_ckpt), num_keyframes, flow settings
        meta = check_teacher(self)
        if self.distill.target == "phase2":
            check_phase2_section(self, meta, T)
        neg = self.distill.negative
        if neg not in ("encode", "zeros") and self.distill.teacher_guidance != 1.0 and not Path(neg).is_file():
            raise ConfigError(f"distill.negative={neg!r}: expected encode, zeros or an existing torch file holding "
                              "the negative prompt's UMT5 embedding [L, D]")


def check_teacher(cfg: DistillTrainConfig) -> dict | None:
    """The teacher LoRA folder: required (and of the target's phase) for phase1 / phase2, optional
    for full. Returns its metadata (``None`` without one). Cheap: reads JSON only."""
    d = cfg.distill
    path = d.teacher_lora
    want = TARGET_PHASE[d.target]
    if not path:
        if want is None:
            return None
        raise ConfigError(f"distill.teacher_lora is not set: distill.target={d.target} needs the trained phase-{want} "
                          f"LoRA folder (e.g. runs/wan1.3b_phase{want}/checkpoints/step_00020000/trainable_ema)")
    p = Path(path)
    if not (p / wan.LORA_WEIGHT_NAME).is_file():
        raise CheckpointError(f"distill.teacher_lora={path!r}: no {wan.LORA_WEIGHT_NAME!r} there (expected a save_lora "
                              "folder: a training checkpoint's trainable/ or trainable_ema/)")
    try:
        meta = wan.read_lora_meta(p)
    except wan.WanLoadError as e:
        raise CheckpointError(f"distill.teacher_lora: {e}") from None
    got = (meta.get("extra") or {}).get("phase")
    if want is not None and got is not None and int(got) != want:
        raise ConfigError(f"distill.teacher_lora={path!r} was trained for phase {got}, distill.target={d.target} needs "
                          f"a phase-{want} LoRA")
    if want is None and (meta.get("widening") or meta.get("keyframe_rope")):
        raise ConfigError(f"distill.teacher_lora={path!r} is a phase-{got} LoRA (keyframe rope / mask channels); "
                          "distill.target=full needs a full-sequence LoRA or none")
    if want == 1:
        k = ((meta.get("extra") or {}).get("phase1") or {}).get("num_keyframes")
        if k is not None and int(k) != cfg.phase1.num_keyframes:
            raise ConfigError(f"phase1.num_keyframes={cfg.phase1.num_keyframes}, but distill.teacher_lora={path!r} was "
                              f"trained with {k} keyframes")
    return meta


def check_phase2_section(cfg: DistillTrainConfig, meta: dict | None, T: int | None) -> None:
    """``target=phase2``: this config's mask policy (``phase2.policy_mix`` with ``selector_ckpt``),
    then the phase-2 config the run uses (``teacher_phase2_config``: the teacher's budgets, sigmas
    and channels; against ``T`` when known) by ``Phase2Config.validate``, and
    ``distill.phase2_levels`` against the teacher's level count when that is known (explicit
    budgets, or ``T``). ``ConfigError`` naming the key (and the teacher folder for its values)."""
    check_policy_mix("phase2.policy_mix", cfg.phase2.policy_mix, PHASE2_POLICIES, "phase2.selector_ckpt",
               cfg.phase2.selector_ckpt)
    p2 = teacher_phase2_config(cfg, meta)
    try:
        p2.validate(T)
    except ConfigError as e:
        if not ((meta or {}).get("extra") or {}).get("phase2"):
            raise  # this config's phase2.* values
        where = f" (clip length T={T} from data.crop_frames / data.latent_shape)" if T else ""
        raise ConfigError(f"distill.teacher_lora={cfg.distill.teacher_lora!r}: the phase-2 settings stored with it "
                          f"(what it was trained with) do not fit{where}: {e}") from None
    if p2.budgets or T is not None:
        S = len(p2.budgets) if p2.budgets else len(phase2_budgets(p2, T))
        phase2_student_levels(S, cfg.distill.sampler.steps, cfg.distill.phase2_levels)


def teacher_phase2_config(cfg: DistillTrainConfig, meta: dict | None) -> Phase2Config:
    """The phase-2 settings the teacher was trained with (budgets rule, sigmas, channels,
    weights), with this config's mask policy."""
    p2 = cfg.phase2
    stored = ((meta or {}).get("extra") or {}).get("phase2")
    if stored:
        p2 = dataclasses.replace(from_dict(Phase2Config, stored), policy_mix=cfg.phase2.policy_mix,
                                 dp_mask_file=cfg.phase2.dp_mask_file, selector_ckpt=cfg.phase2.selector_ckpt)
    if meta and meta.get("widening"):
        p2 = dataclasses.replace(p2, channels=list(meta["widening"]["channels"]))
    return p2


# --- model: teacher adapter, adapters, adapter switching ------------------------------------------


def install_teacher(transformer, lora_dir: str | Path, dphi_ckpt: str = "", dphi_key: str = "phase1.dphi_ckpt") -> dict:
    """Make the teacher ``base + LoRA`` without touching the base weights: install what the folder
    records (keyframe rope; widened patch embedding with its stored fp32 weights, frozen) and its
    LoRA as the frozen peft adapter ``teacher`` (fp32 weights, exactly as trained), which
    ``use_adapter`` keeps active under every other adapter. Merging ``scale * B @ A`` into a bf16
    base instead would round each entry of ``W + delta`` to bf16, whose step near typical
    weights (~1e-4 at |W| ~ 0.02) is the size of a trained LoRA's entries: small entries vanish
    and the distilled teacher is not the trained one. Returns the metadata."""
    meta = wan.load_lora(transformer, lora_dir, adapter_name=TEACHER, trainable=False)
    model = wan.unwrap_model(transformer)
    for n, p in model.named_parameters():
        if f".{TEACHER}." in n:
            p.requires_grad_(False)
    if meta.get("widening"):
        model.patch_embedding.extra_weight.requires_grad_(False)
    # a phase-1 teacher with keyframe features: its D_phi (or dphi_ckpt); meta["dphi_used"] says which
    meta["dphi_used"] = ensure_keyframe_features(transformer, meta, dphi_ckpt, dphi_key)
    _set_adapter_state(_tuner_layers(model), None)
    return meta


def _tuner_layers(model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in wan.unwrap_model(model).modules() if isinstance(m, BaseTunerLayer)]


def _set_adapter_state(layers, name: str | None) -> None:
    """Adapter ``name`` active (``None``: none), on top of the frozen ``teacher`` adapter in the
    layers that hold it (``install_teacher``)."""
    for m in layers:
        active = ([TEACHER] if TEACHER in getattr(m, "lora_A", {}) else []) + ([name] if name is not None else [])
        if active:
            m._active_adapter = active
            m._disable_adapters = False
        else:
            m._disable_adapters = True


@contextlib.contextmanager
def use_adapter(model, name: str | None):
    """Within the block the LoRA layers apply only adapter ``name`` (``None``: no adapter = the
    teacher). ``requires_grad`` of every adapter is left alone (see the module docstring)."""
    layers = _tuner_layers(model)
    with _restore_on_exit(layers):
        _set_adapter_state(layers, name)
        yield


def active_adapter(model) -> str | None:
    """The active trained adapter (``None``: the teacher alone)."""
    layers = _tuner_layers(model)
    if not layers or layers[0]._disable_adapters:
        return None
    rest = [a for a in layers[0]._active_adapter if a != TEACHER]
    return rest[0] if rest else None


def add_adapters(transformer, spec: wan.LoraSpec, names: list[str], seed: int) -> None:
    """peft adapters ``names`` (fresh, B = 0), all trainable, ``names[0]`` active."""
    for i, n in enumerate(names):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            wan.add_lora(transformer, spec, adapter_name=n)
    model = wan.unwrap_model(transformer)
    for pn, p in model.named_parameters():  # diffusers' add_adapter froze the earlier adapters
        if ".lora_" in pn and any(f".{n}." in pn for n in names):
            p.requires_grad_(True)
    _set_adapter_state(_tuner_layers(model), names[0])


def adapter_parameters(model, name: str) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in wan.unwrap_model(model).named_parameters() if ".lora_" in n and f".{name}." in n]


def build_distill_transformer(cfg: DistillTrainConfig, teacher_meta: dict | None):
    """Base Wan (+ keyframe rope for phase1) with the teacher LoRA as a frozen adapter, then the
    student (and fake-score) adapters. Raises ``ConfigError`` for a LoRA target that matches no module."""
    m = cfg.model
    dc = cfg.distill
    if dc.mode == "scm" and dc.jvp == "finite_difference" and base_dtype(m) in (torch.bfloat16, torch.float16):
        raise ConfigError(f"distill.jvp=finite_difference with a {base_dtype(m)} base (model.dtype={m.dtype!r}): the "
                          f"perturbation fd_size * dx is below the base's resolution once wan_forward casts the input "
                          f"(measured on the tiny Wan in bf16: tangent error 180 % at fd_size=1e-4, 24 % at 1e-3); use "
                          f"distill.jvp=autograd, or model.dtype=float32")
    tr = wan.load_transformer(m.path, dtype=base_dtype(m), seed=m.seed)
    wan.set_attention_backend(tr, m.attention)
    if cfg.distill.target == "phase1":
        wan.install_keyframe_rope(tr)
    if cfg.distill.teacher_lora:
        used = install_teacher(tr, cfg.distill.teacher_lora, cfg.phase1.dphi_ckpt)["dphi_used"]
        if cfg.distill.target == "phase1":  # the student's metadata records what it was really fed
            kp = wan.widening_of(tr) is not None and tuple(wan.widening_of(tr)["channels"]) == wan.KP_FEAT_CHANNELS
            if cfg.phase1.dphi_ckpt and not kp:
                raise ConfigError(f"phase1.dphi_ckpt={cfg.phase1.dphi_ckpt!r}: the teacher {cfg.distill.teacher_lora!r} "
                                  "was trained without keyframe features (phase1.kp_feat); leave it unset")
            cfg.phase1.kp_feat = kp  # the teacher decides (its widening); phase1.dphi_ckpt may point elsewhere
            cfg.phase1.dphi_ckpt = str(Path(used).resolve()) if used else ""
    if cfg.distill.target == "phase2" and wan.widening_of(tr) is None:
        raise ConfigError(f"distill.teacher_lora={cfg.distill.teacher_lora!r} records no mask channels (not a phase-2 LoRA)")
    names = [STUDENT] + ([FAKE] if cfg.distill.dmd.weight > 0 else [])
    try:
        add_adapters(tr, m.lora, names, m.seed)
    except ValueError as e:
        raise ConfigError(f"model.lora.target_modules: {e}") from None
    if m.init_lora:
        wan.load_lora_weights_into(tr, m.init_lora, adapter_name=STUDENT)
    return tr


def enable_checkpointing(transformer, ratio: float = 1.0, policy: str = "full") -> list[int]:
    """``wan.enable_checkpointing`` (same blocks, same policies) with the adapter state of each
    checkpointed block's forward restored for its recomputation in backward."""
    try:
        # outside: the adapter-restoring wrapper below replaces diffusers' checkpointing function
        chosen = wan.enable_checkpointing(transformer, ratio, policy, placement="outside")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if not chosen:
        return chosen
    m = wan.unwrap_model(transformer)
    ids = {id(m.blocks[i]) for i in chosen}
    kwargs = wan.checkpoint_kwargs(m, policy)

    def ckpt(module, *args):
        if id(module) not in ids:
            return module(*args)
        name = active_adapter(m)
        layers = _tuner_layers(module)

        def run(*a):
            with _restore_on_exit(layers):
                _set_adapter_state(layers, name)
                return module(*a)

        return torch.utils.checkpoint.checkpoint(run, *args, **kwargs)

    m.enable_gradient_checkpointing(gradient_checkpointing_func=ckpt)
    return chosen


@contextlib.contextmanager
def _restore_on_exit(layers):
    """Within the block the adapter flags of ``layers`` may change; they are restored on exit."""
    saved = [(m, m._active_adapter, m._disable_adapters) for m in layers]
    try:
        yield
    finally:
        for m, a, dis in saved:
            m._active_adapter = a
            m._disable_adapters = dis


def _chunked_math_attention(chunk: int, inner):
    """diffusers' ``_native_math`` attention over query chunks of ``chunk`` tokens: the same result,
    with at most ``heads x chunk x L`` attention scores (and their tangents) alive at once."""

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                  return_lse=False, _parallel_config=None):
        L = query.shape[1]  # (B, L, heads, head_dim)
        if chunk <= 0 or L <= chunk or attn_mask is not None or is_causal:
            return inner(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                         enable_gqa=enable_gqa, return_lse=return_lse, _parallel_config=_parallel_config)
        outs = [inner(q, key, value, dropout_p=dropout_p, scale=scale, enable_gqa=enable_gqa,
                      _parallel_config=_parallel_config) for q in query.split(chunk, dim=1)]
        return torch.cat(outs, dim=1)

    return attention


def _fused_jvp_attention(fallback):
    """The attention entry of ``jvp_attention(kernel="triton")``: ``kernels.attention_jvp`` (SDPA
    primal, fused forward-mode derivative) for what it supports (no mask, no dropout, no causal or
    GQA, query / key / value of one head count and head_dim in its table, one float dtype);
    ``fallback`` (the math SDPA) otherwise. Under autocast the three are cast to the autocast dtype
    first, as the SDPA of the math entry would be: from torch 2.12 autocast runs ``rms_norm`` in
    fp32 on CUDA, so Wan's normalised q / k come out fp32 next to a bf16 v."""
    from kernels.attention_jvp import HEAD_DIMS, attention_with_jvp

    from interpdiff._dispatch import use_triton

    floats = (torch.float32, torch.bfloat16, torch.float16)

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                  return_lse=False, _parallel_config=None):
        dev = query.device.type
        if torch.is_autocast_enabled(dev) and query.dtype in floats:
            dt = torch.get_autocast_dtype(dev)
            query, key, value = (t.to(dt) if t.dtype in floats else t for t in (query, key, value))
        same = (key.shape[2:] == query.shape[2:] and value.shape == key.shape
                and query.dtype == key.dtype == value.dtype and query.dtype in floats)
        if (attn_mask is not None or dropout_p or is_causal or enable_gqa or return_lse or _parallel_config is not None
                or query.shape[-1] not in HEAD_DIMS or not same):
            return fallback(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa, return_lse=return_lse, _parallel_config=_parallel_config)
        use_triton("triton", query, "distill.jvp_attention=triton")  # a clear error on CPU without the interpreter
        return attention_with_jvp(query, key, value, scale)

    return attention


@contextlib.contextmanager
def jvp_attention(transformer, enabled: bool = True, chunk: int = 0, kernel: str = "math"):
    """Within the block every attention processor of ``transformer`` uses diffusers' ``_native_math``
    backend entry, which is, by ``kernel`` (``distill.jvp_attention``):

    * ``"math"``: the math SDPA (it has forward-AD rules), split into query chunks of ``chunk``
      tokens when ``chunk > 0`` (the math kernel materialises the score matrix: at 32,760 tokens a
      chunk of 2,048 keeps it at 12 x 2,048 x 32,760 per call instead of 12 x 32,760^2);
    * ``"triton"``: torch's SDPA for the primal and the fused kernel of ``kernels.attention_jvp``
      for the tangent (nothing ``L x L`` in memory; ``chunk`` is not used by it).

    The configured backends (and diffusers' math entry) are restored on exit."""
    if not enabled:
        yield
        return
    if kernel not in ("math", "triton"):
        raise ValueError(f"jvp_attention: kernel={kernel!r} is not one of ['math', 'triton']")
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    name = AttentionBackendName._NATIVE_MATH
    procs = [mod.processor for mod in wan.unwrap_model(transformer).modules()
             if hasattr(mod, "processor") and hasattr(mod.processor, "_attention_backend")]
    saved = [p._attention_backend for p in procs]
    inner = _AttentionBackendRegistry._backends[name]
    for p in procs:
        p._attention_backend = name
    entry = _chunked_math_attention(chunk, inner) if chunk > 0 else inner
    if kernel == "triton":
        entry = _fused_jvp_attention(entry)
    _AttentionBackendRegistry._backends[name] = entry
    try:
        yield
    finally:
        _AttentionBackendRegistry._backends[name] = inner
        for p, b in zip(procs, saved):
            p._attention_backend = b


class _ConstantWeightLinear(torch.autograd.Function):
    """``F.linear`` whose forward-mode derivative treats ``weight`` and ``bias`` as constants.

    torch's forward-AD rule for ``linear`` also multiplies the weight's (zero) tangent, even for a
    weight that is not a dual tensor: 3 matmuls per JVP instead of 2 (measured with
    ``FlopCounterMode`` on CPU, for ``torch.func.jvp`` and ``torch.autograd.forward_ad`` alike). Here
    the tangent is ``linear(dx, weight)``: the same value, one matmul. Only for JVPs under no_grad
    (the stop-gradient student of sCM): it has no backward."""

    @staticmethod
    def forward(x, weight, bias):
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.weight = inputs[1]

    @staticmethod
    def jvp(ctx, dx, dweight, dbias):
        return torch.nn.functional.linear(dx, ctx.weight)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("_ConstantWeightLinear is for forward-mode JVPs without gradients only")


def _constant_weight_linear_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _ConstantWeightLinear.apply(x, module.weight, module.bias)


@contextlib.contextmanager
def jvp_constant_weights(transformer, enabled: bool = True):
    """Within the block every plain ``nn.Linear`` of ``transformer`` (the frozen base layers and the
    LoRA factors of peft, which wraps plain ``nn.Linear`` modules) computes its forward-mode tangent
    with one matmul instead of three (``_ConstantWeightLinear``). The JVP of sCM runs under no_grad
    with every weight constant, so the result is the same (tested against ``torch.func.jvp``); the
    plain forward methods are restored on exit. Modules that already carry an instance-level
    ``forward`` (hooks of other libraries) are left alone."""
    if not enabled:
        yield
        return
    mods = [m for m in wan.unwrap_model(transformer).modules() if type(m) is torch.nn.Linear and "forward" not in m.__dict__]
    for m in mods:
        m.forward = functools.partial(_constant_weight_linear_forward, m)
    try:
        yield
    finally:
        for m in mods:
            m.__dict__.pop("forward", None)


# --- negative prompt embedding ------------------------------------------------------------------


def negative_embedding(cfg: DistillTrainConfig) -> torch.Tensor | None:
    """``[L, D]`` embedding of the negative prompt for the teacher's CFG (``None`` without CFG)."""
    d = cfg.distill
    if d.teacher_guidance == 1.0:
        return None
    L, Dm = (cfg.data.embed_shape or [512, 4096])[:2]
    if d.negative == "zeros":
        return torch.zeros(L, Dm)
    if d.negative == "encode":
        from interpdiff.video.pipeline import WAN_NEGATIVE_PROMPT

        enc, tok = wan.load_text_encoder(cfg.model.path, dtype=torch.float32 if cfg.model.path == "tiny" else base_dtype(cfg.model))
        with torch.no_grad():
            emb = wan.encode_prompts(enc, tok, [WAN_NEGATIVE_PROMPT], max_length=L)[0].float().cpu()
        del enc
        return emb
    t = torch.load(d.negative, map_location="cpu", weights_only=True)
    if not isinstance(t, torch.Tensor) or t.dim() != 2:
        raise ConfigError(f"distill.negative={d.negative!r}: expected a tensor [L, D], got "
                          f"{type(t).__name__} {list(getattr(t, 'shape', []))}")
    return t.float()


# --- losses ---------------------------------------------------------------------------------------


@dataclass
class LossContext:
    cfg: DistillTrainConfig
    policy: KeyframePolicy | None
    neg_L_D: torch.Tensor | None
    p2: Phase2Config | None
    seed: int


def _keys(batch: dict) -> list[str]:
    return [str(k) for k in batch["keys"]]


def _velocity(model, emb, idx):
    def v(x, t_B):
        return wan.wan_forward(model, x, t_B, emb, frame_idx_B_K=idx).float()

    return v


def _teacher_F(model, x_t, t_B, emb, neg, idx, scale):
    """Teacher TrigFlow velocity with CFG (adapters off, no gradient)."""
    base = wan.unwrap_model(model)
    with torch.no_grad(), use_adapter(base, None):
        Fc = D.trig_model(_velocity(base, emb, idx))(x_t, t_B)
        Fu = None
        if neg is not None and scale != 1.0:
            Fu = D.trig_model(_velocity(base, neg.to(emb.device, emb.dtype).expand(emb.shape[0], -1, -1), idx))(x_t, t_B)
    return D.cfg(Fc, Fu, scale)


def gaussian_target_loss(model, batch: dict, step: int, ctx: LossContext):
    """sCM (or discrete consistency) + optional DMD for ``full`` / ``phase1`` (module docstrings)."""
    cfg, dc = ctx.cfg, ctx.cfg.distill
    x0 = batch["lat"]
    emb = batch["emb"]
    B, C, T, H, W = x0.shape
    dev = x0.device
    idx = None
    keys = _keys(batch)
    gens = [sample_generator(ctx.seed, step, k) for k in keys]
    if dc.target == "phase1":
        K = cfg.phase1.num_keyframes
        if K > T:
            raise ValueError(f"phase1.num_keyframes={K} exceeds the clip's {T} latent frames")
        rows = [mask_to_indices(ctx.policy.masks(x0[b].detach(), k, [K], g, emb_L_D=emb[b])[0]) for b, (k, g) in
                enumerate(zip(keys, gens))]
        idx = torch.cat(rows).to(dev)
        x0 = torch.gather(x0, 2, idx[:, None, :, None, None].expand(B, C, K, H, W))
    x0 = x0.float()
    n_frames = x0.shape[2]
    scale = math.sqrt(n_frames) if dc.scale_by_frames else 1.0
    t_B = torch.cat([D.sample_trig_times(1, dc.p_mean, dc.p_std, scale, g) for g in gens]).float().to(dev)
    shape = tuple(x0.shape[1:])
    eps = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)
    x_t = D.trig_noise(x0, eps, t_B)
    F_T = _teacher_F(model, x_t, t_B, emb, ctx.neg_L_D, idx, dc.teacher_guidance)
    base = wan.unwrap_model(model)
    metrics: dict = {"t_mean": t_B.mean().detach()}

    dmd = dc.dmd.weight > 0
    gen_on = dmd and step >= dc.dmd.start_step
    if dmd:
        t_max = math.atan(dc.dmd.sigma_max)
        tG_B = torch.full((B,), t_max, device=dev)
        eps_G = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)
        x_G = math.sin(t_max) * eps_G

    # the student forward with gradients: the consistency input (+ the DMD generator input, one batch)
    if gen_on:
        idx2 = None if idx is None else torch.cat([idx, idx])
        F_all = D.trig_model(_velocity(model, torch.cat([emb, emb]), idx2))(torch.cat([x_t, x_G]), torch.cat([t_B, tG_B]))
        F_theta, F_G = F_all[:B], F_all[B:]
    else:
        F_theta = D.trig_model(_velocity(model, emb, idx))(x_t, t_B)

    F_student_sg = D.trig_model(_velocity(base, emb, idx))  # same weights, called under no_grad
    if dc.mode == "scm":
        cs = (torch.cos(t_B) * torch.sin(t_B))
        with jvp_attention(base, dc.jvp == "autograd", dc.jvp_chunk, dc.jvp_attention), jvp_constant_weights(base, dc.jvp == "autograd"), \
                use_adapter(base, STUDENT):
            _, jv = D.jvp(F_student_sg, x_t, t_B, D._bc(cs, x_t) * F_T, cs, dc.jvp, dc.fd_size)
        # the stop-gradient copy is F_theta itself (as rCM): the JVP's own primal comes from another
        # attention kernel (math, chunked) and differs from F_theta in bf16; that difference would be
        # trained into the student next to g
        F_sg = F_theta.detach()
        r = D.tangent_warmup(step, dc.tangent_warmup)
        g_raw = D.scm_tangent(x_t, t_B, F_sg, F_T, jv, r, norm_c=0.0)
        g = D.normalise_tangent(g_raw, dc.tangent_norm) if dc.tangent_norm > 0 else g_raw
        loss_B = dc.scm_weight * D.scm_loss(F_theta, F_sg, g)
        # the loss value is scm_weight * ||g_normalised||^2 (F_sg = F_theta.detach()); the raw tangent's
        # RMS is the progress signal (0 at the teacher's exact consistency function)
        metrics.update(loss_scm=loss_B.mean().detach(), tangent_rms=g_raw.pow(2).mean().sqrt().float().detach(),
                       tangent_r=r)
    else:
        delta_B = torch.minimum(torch.full_like(t_B, dc.delta), t_B)
        x_prev = D.trig_ddim_step(x_t, F_T, delta_B)
        t_prev = t_B - delta_B
        with torch.no_grad(), use_adapter(base, STUDENT):
            f_target = D.consistency_fn(x_prev, t_prev, F_student_sg(x_prev, t_prev))
        f_theta = D.consistency_fn(x_t, t_B, F_theta)
        # normalised like sCM's tangent and weighted by scm_weight: the same balance against DMD as mode=scm
        loss_B = dc.scm_weight * D.normalised_discrete_loss(f_theta, f_target, delta_B, dc.tangent_norm or 0.1)
        metrics.update(loss_discrete=loss_B.mean().detach())

    if dmd:
        if gen_on:
            x0_G = D.consistency_fn(x_G, tG_B, F_G)
        else:
            with torch.no_grad():
                x0_G = D.consistency_fn(x_G, tG_B, D.trig_model(_velocity(base, emb, idx))(x_G, tG_B))
        if gen_on:
            tD_B = torch.cat([D.sample_shifted_trig_times(1, dc.dmd.shift, g) for g in gens]).float().to(dev)
            eps_D = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)
            x_D = D.trig_noise(x0_G.detach(), eps_D, tD_B)
            with torch.no_grad(), use_adapter(base, FAKE):
                x0_fake = D.consistency_fn(x_D, tD_B, D.trig_model(_velocity(base, emb, idx))(x_D, tD_B))
            x0_real = D.consistency_fn(x_D, tD_B, _teacher_F(model, x_D, tD_B, emb, ctx.neg_L_D, idx, dc.teacher_guidance))
            l_dmd = dc.dmd.weight * D.dmd_generator_loss(x0_G, x0_fake, x0_real)
            loss_B = loss_B + l_dmd
            metrics["loss_dmd"] = l_dmd.mean().detach()
        else:
            metrics["loss_dmd"] = 0.0  # same CSV columns from the first step on
        # fake score: flow matching on detached student samples, through the fake adapter only
        u = torch.cat([torch.rand(1, generator=g) for g in gens])
        sig_B = shift_sigma(u, dc.dmd.shift).to(dev)
        eps_F = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(dev)
        xg = x0_G.detach()
        x_f = flow_match_xt(xg, eps_F, sig_B)
        with use_adapter(model, FAKE):
            v_fake = wan.wan_forward(model, x_f, sig_B * 1000.0, emb, frame_idx_B_K=idx).float()
        l_fake = dc.dmd.fake_weight * ((v_fake - flow_match_target(xg, eps_F)) ** 2).flatten(1).mean(1)
        loss_B = loss_B + l_fake.double()
        metrics["loss_fake"] = l_fake.mean().detach()
    return loss_B.mean().float(), metrics


def phase2_student_levels(S: int, steps: int, levels: list[int] | None = None) -> list[int]:
    """``interpdiff.distill.phase2_student_levels`` with its errors as ``ConfigError``."""
    try:
        return D.phase2_student_levels(S, steps, levels)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def phase2_distill_loss(model, batch: dict, step: int, ctx: LossContext):
    """Regression of the 1-2 step student to the teacher's full TACoS chain (module docstring)."""
    cfg, dc, p2 = ctx.cfg, ctx.cfg.distill, ctx.p2
    x0 = batch["lat"].float()
    emb = batch["emb"]
    B, C, T, H, W = x0.shape
    dev = x0.device
    budgets = phase2_budgets(p2, T)
    S = len(budgets)
    levels = phase2_student_levels(S, dc.sampler.steps, dc.phase2_levels)
    sig = level_sigmas(S, p2.sigma_max, p2.sigma_min)
    keys = _keys(batch)
    masks, lv, eps = [], [], []
    for b, k in enumerate(keys):
        g = sample_generator(ctx.seed, step, k)
        m, _ = ctx.policy.masks(batch["lat"][b].detach(), k, budgets, g, emb_L_D=emb[b])
        masks.append(m)
        lv.append(levels[int(torch.randint(0, len(levels), (1,), generator=g))])
        eps.append(torch.randn((C, T, H, W), generator=g))
    masks_B_S_T = torch.stack(masks).to(dev)
    eps = torch.stack(eps).to(dev)
    x_start = interpolate_corrupt(x0, masks_B_S_T[:, 0], float(sig[0]), eps, time_dim=2, check_values=False)
    t_S_B = level_timestep(budgets, torch.arange(S), T)[:, None].expand(S, B).contiguous().to(dev)
    base = wan.unwrap_model(model)

    def teacher(x_s, s, mask_s, conf_s):
        return phase2_restore(base, x_s, mask_s, t_S_B[s], emb, p2, conf_B_T=conf_s)

    gen = None
    if dc.phase2_teacher_noise != "none":
        gen = torch.Generator(device=dev)
        gen.manual_seed(sample_generator(ctx.seed, step, keys[0], salt="teacher_chain").initial_seed())
    with torch.no_grad(), use_adapter(base, None):
        target, xs, _ = refine(teacher, x_start, masks_B_S_T, time_dim=2, sigmas=sig, noise=dc.phase2_teacher_noise,
                               confidence=p2.confidence, generator=gen, return_all=True)
    s_B = torch.tensor(lv, device=dev)
    ar = torch.arange(B, device=dev)
    mask_in = masks_B_S_T[ar, s_B]
    # the input at level s is built as the sampler builds it (phase2_student_refine): the TACoS jump from
    # x_start by the (teacher's) prediction, its noise rescaled from sigma_first to sigma_s (corruption.tacos_step);
    # at the first level it is x_start. (The teacher chain's own state at level s differs from it once sigma_0 > 0.)
    x_in = tacos_step(x_start, target, masks_B_S_T[:, levels[0]], mask_in, time_dim=2,
                      sigma_next=sig.to(dev)[s_B], sigma_s=float(sig[levels[0]]))
    t_in = t_S_B[s_B, ar]
    x0_hat = phase2_restore(model, x_in, mask_in, t_in, emb, p2)
    w_B_T = torch.where(mask_in, p2.keyframe_weight, p2.missing_weight).float()
    w = w_B_T[:, None, :, None, None]
    denom = (w_B_T.sum(1) * C * H * W).clamp_min(1e-8)
    loss = ((((x0_hat - target) ** 2) * w).sum(dim=(1, 2, 3, 4)) / denom).mean()
    with torch.no_grad():
        start_err = ((((x_start - target) ** 2) * w).sum(dim=(1, 2, 3, 4)) / denom).mean()
    return loss, {"level_mean": s_B.float().mean(), "start_vs_teacher_mse": start_err}


# --- validation ---------------------------------------------------------------------------------


def make_distill_validation(cfg: DistillTrainConfig, ctx: LossContext, batches):
    """``TrainSpec.validate``: on the first batch's conditions (and, for phase 2, latents):

    * full / phase1: the teacher's Euler sample (``validation.teacher_steps``, CFG, shift) from noise
      ``eps`` and the student's 1-step consistency sample from the same ``eps`` (what consistency
      distillation makes equal; the teacher starts at flow time 1, the student at
      ``t_0 = atan(sigma_max)``, so the gap has a small floor): ``gap_1step`` = their MSE; the
      N-step student sample (``distill.sampler``) for the preview; sample stds (collapse shows).
      Phase 1 at uniform keyframe indices.
    * phase2: the teacher chain and the student (levels of ``distill.sampler.steps``) from the same
      level-0 input (true keyframes, level-0 noise): MSE student vs teacher, and both vs the truth.

    Appends to ``validation/metrics.jsonl`` and writes ``val_XXXXXXXX.png`` latent previews."""
    from interpdiff.masks import uniform_nested_masks
    from interpdiff.video.pipeline import (Phase2Settings, _cfg_velocity, euler_flow_sample, latent_preview, phase2_refine,
                                          validation_batch)

    held: dict = {}
    vc, d = cfg.validation, cfg.distill

    def validate(model, step: int, folder: Path, is_main: bool):
        dev = next(model.parameters()).device
        lat, emb = validation_batch(held, batches, vc.num_samples, dev)
        B, C, T, H, W = lat.shape
        g = torch.Generator().manual_seed(cfg.train.seed)
        amp = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
        with torch.no_grad(), amp:
            if d.target in ("full", "phase1"):
                idx = None
                n = T
                if d.target == "phase1":
                    n = min(cfg.phase1.num_keyframes, T)
                    idx = mask_to_indices(uniform_nested_masks(B, T, [n], device=dev)[:, 0])
                eps = torch.randn((B, C, n, H, W), generator=g).to(dev)
                neg = None if ctx.neg_L_D is None else ctx.neg_L_D.to(dev, emb.dtype).expand(B, -1, -1)
                with use_adapter(model, None):
                    teacher = euler_flow_sample(_cfg_velocity(model, emb, neg, d.teacher_guidance, frame_idx_B_K=idx),
                                                eps, vc.teacher_steps, vc.shift)
                with use_adapter(model, STUDENT):
                    F = D.trig_model(_velocity(model, emb, idx))
                    one = D.consistency_sample(F, eps, D.consistency_times(1, None, d.sampler.sigma_max))
                    many = student_sample(model, emb, (C, n, H, W), d.sampler.steps, d.sampler.mid_times,
                                          d.sampler.sigma_max, idx, generator=g)
                metrics = {"step": step, "gap_1step": float(((one - teacher) ** 2).mean()),
                           "teacher_std": float(teacher.std()), "student_1step_std": float(one.std()),
                           f"student_{d.sampler.steps}step_std": float(many.std())}
                rows = [("teacher", teacher[0]), ("student 1 step", one[0]), (f"student {d.sampler.steps} steps", many[0])]
            else:
                p2 = ctx.p2
                st = Phase2Settings.from_phase2_config(p2, T, noise="none")
                levels = phase2_student_levels(len(st.budgets), d.sampler.steps, d.phase2_levels)
                masks = uniform_nested_masks(B, T, st.budgets, device=dev)
                sig0 = float(level_sigmas(len(st.budgets), p2.sigma_max, p2.sigma_min)[0])
                eps = torch.randn(lat.shape, generator=g).to(dev)
                x_start = interpolate_corrupt(lat, masks[:, 0], sig0, eps, time_dim=2, check_values=False)
                with use_adapter(model, None):
                    teacher = phase2_refine(model, x_start, masks, emb, st, init_noise=False)
                with use_adapter(model, STUDENT):
                    student = phase2_student_refine(model, x_start, masks, emb, st, levels, init_noise=False)
                metrics = {"step": step, "student_vs_teacher_mse": float(((student - teacher) ** 2).mean()),
                           "student_mse": float(((student - lat) ** 2).mean()),
                           "teacher_mse": float(((teacher - lat) ** 2).mean()),
                           "interp_mse": float(((x_start - lat) ** 2).mean())}
                rows = [("ground truth", lat[0]), ("level-0 input", x_start[0]), ("teacher chain", teacher[0]),
                        (f"student {len(levels)} step", student[0])]
        if not is_main:
            return
        folder.mkdir(parents=True, exist_ok=True)
        import json

        with open(folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
        latent_preview(rows, folder / f"val_{step:08d}.png")

    return validate


# --- training spec ------------------------------------------------------------------------------


# The phase-2 jump a 2-step student is trained on and sampled with (corruption.tacos_step): since
# 2026-11-26 the noise part is rescaled to the next level's sigma. Students written before carry no
# such key and were trained on the unscaled jump.
TACOS_RULE = "noise_rescaled"


def distill_meta(cfg: DistillTrainConfig, p2: Phase2Config | None) -> dict:
    """What a sampler needs to rebuild the student (stored as ``extra`` in its LoRA folder)."""
    d = cfg.distill
    phase = TARGET_PHASE[d.target]
    out = {"phase": phase, "distill": {"target": d.target, "teacher_lora": str(Path(d.teacher_lora).resolve()) if d.teacher_lora else "",
                                       "mode": d.mode, "sampler": dataclasses.asdict(d.sampler),
                                       "phase2_levels": list(d.phase2_levels), "adapter": STUDENT,
                                       "tacos_rule": TACOS_RULE}}
    if phase == 1:
        out["phase1"] = dataclasses.asdict(cfg.phase1)
    if phase == 2:
        out["phase2"] = dataclasses.asdict(p2)
    return out


def make_distill_spec(cfg: DistillTrainConfig) -> TrainSpec:
    """Everything ``interpdiff.training.train`` needs (cheap checks first, then the model)."""
    batches, loader = make_batches(cfg)  # a missing shard pattern fails here
    meta = check_teacher(cfg)
    d = cfg.distill
    p2 = teacher_phase2_config(cfg, meta) if d.target == "phase2" else None
    policy = None
    if d.target == "phase1":
        policy = KeyframePolicy(cfg.phase1.index_policy, PHASE1_POLICIES, cfg.phase1.dp_index_file, "phase1.index_policy",
                                cfg.phase1.selector_ckpt, "phase1.selector_ckpt")
    elif d.target == "phase2":
        policy = KeyframePolicy(p2.policy_mix, PHASE2_POLICIES, p2.dp_mask_file, "phase2.policy_mix",
                                p2.selector_ckpt, "phase2.selector_ckpt")
    neg = negative_embedding(cfg) if d.target != "phase2" else None
    transformer = build_distill_transformer(cfg, meta)
    bind_embed_dim(loader, cfg.data.embed_shape, transformer)
    ctx = LossContext(cfg=cfg, policy=policy, neg_L_D=neg, p2=p2, seed=cfg.train.seed)
    loss_impl = phase2_distill_loss if d.target == "phase2" else gaussian_target_loss
    adapters = [STUDENT] + ([FAKE] if d.dmd.weight > 0 else [])
    extra = distill_meta(cfg, p2)

    def loss_fn(model, batch, step):
        return loss_impl(model, batch, step, ctx)

    def save_trainable(model, folder: Path):
        for name in adapters:
            wan.save_lora(model, Path(folder) / name, adapter_name=name,
                          extra_meta=extra if name == STUDENT else {"distill": {"adapter": name}})

    def load_trainable(model, folder: Path):
        for name in adapters:
            try:
                wan.load_lora_weights_into(model, Path(folder) / name, adapter_name=name)
            except (wan.WanLoadError, ValueError) as e:
                raise CheckpointError(f"checkpoint {str(folder)!r} (adapter {name!r}): {e}") from None

    return TrainSpec(
        model=transformer,
        loss_fn=loss_fn,
        batches=batches,
        save_trainable=save_trainable,
        load_trainable=load_trainable,
        validate=make_distill_validation(cfg, ctx, make_batches(cfg)[0]),  # its own loader
        batch_size=lambda b: int(b["lat"].shape[0]),
        meta={"distill_target": d.target, "model_path": cfg.model.path, "adapters": adapters,
              "transformer_config": wan.transformer_config_dict(transformer), "lora": dataclasses.asdict(cfg.model.lora),
              "teacher_lora": d.teacher_lora, "teacher_id": wan.lora_fingerprint(d.teacher_lora) if d.teacher_lora else ""},
        # the teacher by its weights (a moved folder or another spelling of its path is the same teacher)
        resume_keys=("distill_target", "teacher_id", "adapters", *wan.ARCH_RESUME_KEYS, *wan.LORA_RESUME_KEYS),
        enable_gradient_checkpointing=lambda m: enable_checkpointing(m, cfg.model.checkpoint_ratio, cfg.model.checkpoint_policy),
        data_settings=loader.settings,
    )


# --- samplers for the distilled students ---------------------------------------------------------


def read_student_meta(lora_dir: str | Path) -> dict:
    """The ``extra.distill`` record of a student folder written by ``distill_rcm.py`` (a
    checkpoint's ``trainable/student`` or ``trainable_ema/student``); ``WanLoadError`` otherwise."""
    meta = wan.read_lora_meta(lora_dir)
    dist = (meta.get("extra") or {}).get("distill")
    if not dist or dist.get("adapter") != STUDENT:
        raise wan.WanLoadError(f"{str(lora_dir)!r} is not a distilled student (expected the trainable/student folder of a "
                               "distill_rcm.py checkpoint)")
    return meta


def load_student_transformer(model_path: str, lora_dir: str | Path, dtype: str = "auto", attention: str = "sdpa",
                             want_target: str | None = None, dphi_ckpt: str = ""):
    """Base Wan + the teacher LoRA as a frozen adapter (path recorded in the student's metadata) + the student
    LoRA (``wan.load_lora``: also its keyframe rope / mask channels), frozen, eval mode."""
    meta = read_student_meta(lora_dir)
    dist = meta["extra"]["distill"]
    if want_target is not None and dist["target"] != want_target:
        raise ConfigError(f"{str(lora_dir)!r} is a distilled {dist['target']!r} student, expected {want_target!r}")
    if dist["target"] == "phase2" and int(dist["sampler"]["steps"]) > 1 and dist.get("tacos_rule") != TACOS_RULE:
        log.warning("%s: a 2-step phase-2 student written before the TACoS noise rescaling (no tacos_rule=%r in its "
                    "metadata): it was trained on the unscaled level-m jump and now sees the rescaled one; redistil it",
                    lora_dir, TACOS_RULE)
    tr = wan.load_transformer(model_path, dtype=base_dtype(ModelConfig(dtype=dtype)))
    wan.set_attention_backend(tr, attention)
    teacher = dist.get("teacher_lora") or ""
    if teacher:
        if not (Path(teacher) / wan.LORA_WEIGHT_NAME).is_file():
            raise wan.WanLoadError(f"the student {str(lora_dir)!r} was distilled from the teacher LoRA {teacher!r}, which is "
                                   f"missing (expected {wan.LORA_WEIGHT_NAME!r} there)")
        install_teacher(tr, teacher, dphi_ckpt, "phase1_dphi")
    wan.load_lora(tr, lora_dir, adapter_name=STUDENT)
    _set_adapter_state(_tuner_layers(tr), STUDENT)  # on top of the teacher, as in training
    wan.freeze(tr)
    return tr, meta


def student_sample(transformer, emb_B_L_D: torch.Tensor, shape_CTHW: tuple[int, int, int, int], steps: int,
                   mid_times: list[float] | None = None, sigma_max: float = 80.0,
                   idx_B_K: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Few-step consistency sampling of a distilled ``full`` (``idx_B_K=None``) or ``phase1``
    (keyframes at ``idx_B_K``) student -> latents ``[B, C, T, H, W]`` (``distill.consistency_sample``)."""
    B = emb_B_L_D.shape[0]
    dev = emb_B_L_D.device
    times = D.consistency_times(steps, mid_times, sigma_max)

    def randn():  # one generator, or one per batch row (corruption.randn_rows)
        return randn_rows((B, *shape_CTHW), generator, dev)

    F = D.trig_model(_velocity(transformer, emb_B_L_D, idx_B_K))
    return D.consistency_sample(F, randn(), times, randn)


@torch.no_grad()
def phase2_student_refine(transformer, x_start_B_C_T_H_W: torch.Tensor, masks_B_S_T: torch.Tensor,
                          emb_B_L_D: torch.Tensor, st, levels: list[int], generator: torch.Generator | None = None,
                          init_noise: bool = True) -> torch.Tensor:
    """The 1-2 step phase-2 student: level-0 input as in ``pipeline.phase2_refine`` (noise
    ``sigma_0`` on missing frames), the student at each of ``levels`` with a TACoS jump between
    them (noise rescaled to the next level's sigma, ``corruption.tacos_step``), the last
    prediction with the current level's keyframes clamped."""
    B, C, T, H, W = x_start_B_C_T_H_W.shape
    S = masks_B_S_T.shape[1]
    sig = level_sigmas(S, st.sigma_max, st.sigma_min)
    p2 = Phase2Config(channels=list(st.channels), confidence=st.confidence)
    x = x_start_B_C_T_H_W.float()
    if init_noise and float(sig[0]) > 0:
        miss = (~masks_B_S_T[:, 0]).float()[:, None, :, None, None]
        x = x + float(sig[0]) * randn_rows(x.shape, generator, x.device) * miss
    t_S_B = level_timestep(st.budgets, torch.arange(S), T)[:, None].expand(S, B).contiguous().to(x.device)
    for i, s in enumerate(levels):
        m = masks_B_S_T[:, s]
        x0_hat = phase2_restore(transformer, x, m, t_S_B[s], emb_B_L_D, p2,
                                conf_B_T=anchor_confidence(m, st.confidence))
        if i + 1 < len(levels):
            x = tacos_step(x, x0_hat, m, masks_B_S_T[:, levels[i + 1]], time_dim=2,
                           sigma_next=float(sig[levels[i + 1]]), sigma_s=float(sig[s]))
        else:
            x = torch.where(m[:, None, :, None, None], x, x0_hat.float())
    return x
