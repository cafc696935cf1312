"""Wan2.1 through diffusers: loading, the ``tiny`` preset, LoRA, phase-2 input widening, and
keyframe temporal rotary positions for phase-1.

Everything here uses the real classes (``diffusers.WanTransformer3DModel``,
``diffusers.AutoencoderKLWan``, ``transformers.UMT5EncoderModel``, ``T5TokenizerFast``, peft's
``LoraConfig``); the ``tiny`` preset only changes their sizes, so tests and CPU runs exercise the
same code paths as the 1.3B / 14B checkpoints.

Public API (shapes: ``lat_B_C_T_H_W`` latents in Wan layout, ``emb_B_L_D`` UMT5 output)::

    comps = load_wan("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")       # or a local folder, or "tiny"
    add_lora(comps.transformer, LoraSpec(rank=32, alpha=32))     # peft, diffusers adapter API
    widen_patch_embedding(comps.transformer, ("mask",))          # phase-2: + keyframe mask channel
    install_keyframe_rope(comps.transformer)                     # phase-1: true frame indices
    pred = wan_forward(comps.transformer, lat, timestep_B, emb,
                       frame_idx_B_K=idx, extra_B_E_T_H_W=None)  # one call for both phases
    save_lora(comps.transformer, "run/lora")                     # WanPipeline.load_lora_weights-able
    load_lora(fresh_transformer, "run/lora")                     # rebuilds widening, loads weights
    load_lora_weights_into(adapted_transformer, "run/lora")      # resume: values only, every tensor checked
    read_lora_meta("run/lora")                                   # the folder's interpdiff_lora.json
    unwrap_model(ddp_or_deepspeed_or_compiled)                   # the bare WanTransformer3DModel
    resolve_model_path(path, "transformer"); to_dtype("bf16")    # cheap checks before loading

Design choices (written down because the method spec is silent on them):

* **Widening** (``WidenedConv3d``) keeps the pretrained ``patch_embedding`` weight/bias under
  their original names and adds a separate zero-initialised ``extra_weight`` ``[D, E, pt, ph, pw]``
  for the E extra input channels. The forward is ``conv(x[:, :C], W, b) + conv(x[:, C:], W_extra)``:
  at initialisation the second term is exactly zero, so the widened model equals the base model
  bit for bit (a single conv over ``C+E`` channels would only be equal up to summation order).
  ``transformer.config.in_channels`` stays at the base value (the pipeline samples C-channel
  latents); the extra channels are described by ``transformer._interpdiff_widening``.
* **Saving**: the LoRA goes to ``pytorch_lora_weights.safetensors`` through
  ``WanPipeline.save_lora_weights`` (diffusers' own format, with the peft ``LoraConfig`` as adapter
  metadata so alpha != rank round-trips). ``WanPipeline.load_lora_weights`` only accepts keys that
  contain ``lora``, so the widening weights live beside it in ``interpdiff_extra.safetensors``,
  and ``interpdiff_lora.json`` records the LoRA spec, the widening (channel names, base in
  channels) and the code version; ``load_lora`` rebuilds everything from that folder alone.
* **Keyframe rotary positions**: ``KeyframeRotaryPosEmbed`` subclasses diffusers'
  ``WanRotaryPosEmbed`` and, when frame indices are set, gathers the temporal part of the same
  frequency table at those (post-patch) frame indices per sample; height/width parts are
  unchanged. The model calls ``self.rope(hidden_states)`` once per forward (outside the block
  loop, so gradient checkpointing is unaffected) and broadcasts ``[B, L, 1, Dh]`` against the
  ``[B, L, heads, Dh]`` queries/keys exactly as the diffusers ``[1, L, 1, Dh]`` output.
"""

from __future__ import annotations

import contextlib
import json
import math
import logging
import os
import shutil
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from interpdiff.io import atomic_write_bytes, atomic_write_text, code_version, fsync_dir, fsync_tree

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "LORA_WEIGHT_NAME",
    "EXTRA_WEIGHT_NAME",
    "META_NAME",
    "WIDENING_CHANNELS",
    "PHASE2_CHANNELS",
    "KP_FEAT_CHANNELS",
    "set_keyframe_features",
    "WanLoadError",
    "LoraSpec",
    "WanComponents",
    "tiny_transformer_config",
    "tiny_vae_config",
    "tiny_text_encoder_config",
    "build_tiny_transformer",
    "build_tiny_vae",
    "build_tiny_text_encoder",
    "build_tiny_tokenizer",
    "build_scheduler",
    "load_wan",
    "load_transformer",
    "load_vae",
    "load_text_encoder",
    "freeze",
    "to_dtype",
    "resolve_model_path",
    "unwrap_model",
    "read_lora_meta",
    "set_attention_backend",
    "set_gradient_checkpointing",
    "add_lora",
    "lora_parameters",
    "trainable_parameters",
    "lora_state_dict",
    "WidenedConv3d",
    "widen_patch_embedding",
    "widening_of",
    "extra_channels",
    "KeyframeRotaryPosEmbed",
    "install_keyframe_rope",
    "keyframe_positions",
    "wan_forward",
    "save_lora",
    "replace_dir",
    "LORA_RESUME_KEYS",
    "ARCH_RESUME_KEYS",
    "lora_fingerprint",
    "transformer_config_dict",
    "load_lora_weights_into",
    "load_lora",
    "load_lora_into_pipeline",
    "to_comfy_lora",
    "encode_prompts",
    "vae_encode",
    "vae_decode",
    "latent_norm",
    "make_pipeline",
]

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
"""Attention q/k/v/out of both self- (attn1) and cross-attention (attn2), and the FFN projections."""

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
EXTRA_WEIGHT_NAME = "interpdiff_extra.safetensors"
META_NAME = "interpdiff_lora.json"
META_FORMAT = "interpdiff-wan-lora"
META_VERSION = 1
PHASE2_CHANNELS = ("mask", "confidence")  # phase-2 planes over all T frames (extra_channels)
# phase-1 planes over the K keyframe latents: METHOD.md's kp_feat [left_gap, right_gap, t_norm,
# left_diff, right_diff], built inside wan_forward by the function set_keyframe_features installs
KP_FEAT_CHANNELS = ("kp_left_gap", "kp_right_gap", "kp_t", "kp_left_diff", "kp_right_diff")
WIDENING_CHANNELS = PHASE2_CHANNELS + KP_FEAT_CHANNELS

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


class WanLoadError(FileNotFoundError):
    """A model path / hub id / LoRA folder is missing or lacks an expected file."""


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"`` / ``"bfloat16"`` / ``"fp16"`` / ``"float16"`` / ``"fp32"`` / ``"float32"`` (or a
    ``torch.dtype``) -> ``torch.dtype``; anything else raises ``ValueError`` naming the value."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# Specs
# ---------------------------------------------------------------------------------------------


# a checkpoint's LoRA settings that a resumed run must share (dropout and init may change)
LORA_RESUME_KEYS = ("lora.rank", "lora.alpha", "lora.target_modules", "lora.use_rslora")
# the transformer's architecture in a checkpoint's transformer_config (other config keys may come and go
# with diffusers versions)
ARCH_RESUME_KEYS = tuple(f"transformer_config.{k}" for k in (
    "num_layers", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim", "ffn_dim",
    "patch_size"))


@dataclass
class LoraSpec:
    """LoRA hyper-parameters (peft ``LoraConfig``): ``W x + (alpha / rank) * B A x``.

    ``target_modules`` are module-name suffixes (peft's matching: ``name == t`` or
    ``name.endswith('.' + t)``); every entry must match at least one module. ``init='gaussian'``
    is peft's default for A with ``B = 0`` so the adapted model equals the base at step 0.
    """

    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    init: str = "gaussian"  # "gaussian" | "default" (kaiming A) | "pissa" ... any peft init_lora_weights value
    use_rslora: bool = False

    def validate(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"lora.rank must be > 0, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty; expected module-name suffixes like 'to_q'")

    def to_peft(self):
        from peft import LoraConfig

        self.validate()
        init = True if self.init == "default" else self.init
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(self.target_modules),
            init_lora_weights=init,
            use_rslora=self.use_rslora,
        )


@dataclass
class WanComponents:
    """The pieces of a Wan2.1 T2V model; ``None`` for the ones not requested."""

    transformer: object | None = None
    vae: object | None = None
    text_encoder: object | None = None
    tokenizer: object | None = None
    scheduler: object | None = None
    source: str = ""


# ---------------------------------------------------------------------------------------------
# Tiny preset: the real classes at toy sizes (no download)
# ---------------------------------------------------------------------------------------------


def tiny_transformer_config(**overrides) -> dict:
    """Keyword config of a tiny ``WanTransformer3DModel`` (real 1.3B: 12 heads x 128, ffn 8960,
    30 layers, text_dim 4096, freq_dim 256). Head dim 12 splits into rotary t/h/w = 4/4/4."""
    cfg = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )
    cfg.update(overrides)
    return cfg


def tiny_vae_config(**overrides) -> dict:
    """Keyword config of a tiny ``AutoencoderKLWan``: same strides as the real one (temporal 4,
    spatial 8, 16 latent channels, Wan's latent mean/std), base width 8 instead of 96."""
    cfg = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
               temperal_downsample=[False, True, True], dropout=0.0)
    cfg.update(overrides)
    return cfg


def tiny_text_encoder_config(vocab_size: int, **overrides) -> dict:
    """Keyword config of a tiny ``UMT5Config`` (real UMT5-XXL encoder: d_model 4096, 24 layers)."""
    cfg = dict(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
               feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
               pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    cfg.update(overrides)
    return cfg


_TINY_WORDS = (
    "a an the of in on at with and to is are man woman person people dog cat bird car horse ball "
    "walks runs jumps plays sits stands rides swims flies drives talks dances camera video scene "
    "beach street park room kitchen field water sky tree road red blue green white black small big "
    "slowly quickly left right up down"
).split()


def build_tiny_tokenizer():
    """A real ``T5TokenizerFast`` (Unigram model, T5 special ids pad=0, eos=1, unk=2) over a small
    English word list plus single letters, so any lowercase text tokenizes without download."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in _TINY_WORDS]
    vocab += [(c, -5.0) for c in string.ascii_lowercase + string.digits + ".,!?'-"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)


def _cast_keep_fp32(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast like ``from_pretrained(torch_dtype=dtype)`` does: modules named in the class's
    ``_keep_in_fp32_modules`` (rope, time embedder, norms, modulation tables) stay float32."""
    if dtype == torch.float32:
        return model
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if any(k in name.split(".") for k in keep) else dtype)
    for mod_name, mod in model.named_modules():
        for b_name, b in list(mod._buffers.items()):
            full = f"{mod_name}.{b_name}" if mod_name else b_name
            if b is not None and b.is_floating_point() and not any(k in full.split(".") for k in keep):
                mod._buffers[b_name] = b.to(dtype)
    return model


def build_tiny_transformer(seed: int = 0, dtype: str | torch.dtype = torch.float32, **overrides):
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**tiny_transformer_config(**overrides))
    return _cast_keep_fp32(model, to_dtype(dtype))


def build_tiny_vae(seed: int = 0, dtype: str | torch.dtype = torch.float32, **overrides):
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(**tiny_vae_config(**overrides))
    return _cast_keep_fp32(vae, to_dtype(dtype))


def build_tiny_text_encoder(seed: int = 0, dtype: str | torch.dtype = torch.float32, **overrides):
    """-> ``(UMT5EncoderModel, T5TokenizerFast)`` with ``d_model`` = the tiny transformer's text_dim."""
    from transformers import UMT5Config, UMT5EncoderModel

    tok = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = UMT5EncoderModel(UMT5Config(**tiny_text_encoder_config(len(tok), **overrides)))
    return enc.to(to_dtype(dtype)).eval(), tok


def build_scheduler(shift: float = 5.0):
    """Flow-matching Euler scheduler with Wan's shift ``sigma' = s sigma / (1 + (s-1) sigma)``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_SUBFOLDER_FILES = {
    "transformer": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": (),  # tokenizer.json or spiece.model: checked below
    "scheduler": ("scheduler_config.json",),
}


def _check_local(path: Path, sub: str) -> None:
    folder = path / sub
    if not folder.is_dir():
        raise WanLoadError(
            f"Wan model folder {str(path)!r} has no {sub!r} subfolder (expected a diffusers-format folder with "
            f"transformer/, vae/, text_encoder/, tokenizer/, e.g. a download of Wan-AI/Wan2.1-T2V-1.3B-Diffusers)"
        )
    for f in _SUBFOLDER_FILES[sub]:
        if not (folder / f).is_file():
            raise WanLoadError(f"Wan model folder {str(path)!r}: missing file {str(folder / f)!r}")
    if sub in ("transformer", "vae", "text_encoder"):
        weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")]
        if not weights:
            raise WanLoadError(
                f"Wan model folder {str(path)!r}: no weights in {str(folder)!r} "
                f"(expected *.safetensors or diffusion_pytorch_model.safetensors.index.json)"
            )
    if sub == "tokenizer":
        if not any((folder / f).is_file() for f in ("tokenizer.json", "spiece.model", "tokenizer_config.json")):
            raise WanLoadError(
                f"Wan model folder {str(path)!r}: missing tokenizer files in {str(folder)!r} "
                f"(expected tokenizer.json or spiece.model)"
            )


def resolve_model_path(path: str | os.PathLike, sub: str) -> str:
    """Check a Wan model source for the ``sub`` component before anything is loaded.

    A local folder must be a diffusers-format folder with ``sub/`` holding its config and weights
    (tokenizer files for ``tokenizer``); a string shaped like a hub id (``owner/name``) is returned
    unchanged (``from_pretrained`` resolves it). Returns the string to pass to ``from_pretrained``;
    raises ``WanLoadError`` naming the path and the missing file otherwise.
    """
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise WanLoadError(f"Wan model path {str(p)!r} is a file; expected a diffusers-format folder or a hub id")
        _check_local(p, sub)
        return str(p)
    s = str(path)
    looks_like_hub = s.count("/") == 1 and not s.startswith((".", "/", "~"))
    if not looks_like_hub:
        raise WanLoadError(
            f"Wan model path {s!r} does not exist (expected a local diffusers-format folder, a hub id like "
            f"'Wan-AI/Wan2.1-T2V-1.3B-Diffusers', or 'tiny')"
        )
    return s


def _from_pretrained(cls, path: str | os.PathLike, sub: str, **kwargs):
    src = resolve_model_path(path, sub)
    try:
        return cls.from_pretrained(src, subfolder=sub, **kwargs)
    except (OSError, ValueError, EnvironmentError) as e:
        raise WanLoadError(f"could not load {cls.__name__} from {src!r} (subfolder {sub!r}): {e}") from None


def freeze(module: nn.Module) -> nn.Module:
    """``requires_grad_(False)`` and ``eval()``; returns the module."""
    module.requires_grad_(False)
    module.eval()
    return module


def load_transformer(path: str | os.PathLike, dtype: str | torch.dtype = torch.bfloat16, seed: int = 0):
    """``WanTransformer3DModel`` from ``path/transformer`` (or the ``tiny`` preset), frozen."""
    if str(path) == "tiny":
        return freeze(build_tiny_transformer(seed=seed, dtype=dtype))
    from diffusers import WanTransformer3DModel

    return freeze(_from_pretrained(WanTransformer3DModel, path, "transformer", torch_dtype=to_dtype(dtype)))


def load_vae(path: str | os.PathLike, dtype: str | torch.dtype = torch.float32, seed: int = 0):
    """``AutoencoderKLWan`` from ``path/vae`` (diffusers recommends fp32 for the Wan VAE), frozen."""
    if str(path) == "tiny":
        return freeze(build_tiny_vae(seed=seed + 1, dtype=dtype))
    from diffusers import AutoencoderKLWan

    return freeze(_from_pretrained(AutoencoderKLWan, path, "vae", torch_dtype=to_dtype(dtype)))


def load_text_encoder(path: str | os.PathLike, dtype: str | torch.dtype = torch.bfloat16, seed: int = 0):
    """-> ``(UMT5EncoderModel, tokenizer)`` from ``path/text_encoder`` and ``path/tokenizer``, frozen."""
    if str(path) == "tiny":
        enc, tok = build_tiny_text_encoder(seed=seed + 2, dtype=dtype)
        return freeze(enc), tok
    from transformers import AutoTokenizer, UMT5EncoderModel

    enc = _from_pretrained(UMT5EncoderModel, path, "text_encoder", dtype=to_dtype(dtype))
    src = resolve_model_path(path, "tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(src, subfolder="tokenizer")
    except (OSError, ValueError) as e:
        raise WanLoadError(f"could not load the tokenizer from {src!r} (subfolder 'tokenizer'): {e}") from None
    return freeze(enc), tok


def load_wan(
    path: str | os.PathLike,
    components: Sequence[str] = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    dtype: str | torch.dtype = torch.bfloat16,
    vae_dtype: str | torch.dtype = torch.float32,
    seed: int = 0,
) -> WanComponents:
    """Load the requested Wan2.1 components, frozen, from a diffusers folder / hub id / ``"tiny"``.

    ``transformer`` and ``text_encoder`` in ``dtype`` (bf16 by default), the VAE in ``vae_dtype``.
    The tiny preset is seeded (``seed``) so two calls build identical models.
    """
    known = {"transformer", "vae", "text_encoder", "tokenizer", "scheduler"}
    bad = [c for c in components if c not in known]
    if bad:
        raise ValueError(f"load_wan: unknown components {bad}; expected a subset of {sorted(known)}")
    out = WanComponents(source=str(path))
    if "transformer" in components:
        out.transformer = load_transformer(path, dtype, seed)
    if "vae" in components:
        out.vae = load_vae(path, vae_dtype, seed)
    if "text_encoder" in components or "tokenizer" in components:
        enc, tok = load_text_encoder(path, dtype, seed)
        out.text_encoder = enc if "text_encoder" in components else None
        out.tokenizer = tok
    if "scheduler" in components:
        if str(path) == "tiny":
            out.scheduler = build_scheduler()
        else:
            from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

            src = resolve_model_path(path, "scheduler")
            try:
                out.scheduler = UniPCMultistepScheduler.from_pretrained(src, subfolder="scheduler")
            except (OSError, ValueError):
                out.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(src, subfolder="scheduler")
    return out


def make_pipeline(comps: WanComponents):
    """A ``diffusers.WanPipeline`` over the given components (all five must be loaded)."""
    from diffusers import WanPipeline

    missing = [k for k in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(comps, k) is None]
    if missing:
        raise ValueError(f"make_pipeline: components {missing} were not loaded")
    return WanPipeline(tokenizer=comps.tokenizer, text_encoder=comps.text_encoder, vae=comps.vae,
                       scheduler=comps.scheduler, transformer=comps.transformer)


# ---------------------------------------------------------------------------------------------
# Attention backend, gradient checkpointing
# ---------------------------------------------------------------------------------------------

_BACKEND_ALIASES = {"sdpa": "native", "torch": "native", "native": "native", "xformers": "xformers",
                    "flash": "flash", "flex": "flex", "sage": "sage", "math": "_native_math",
                    "cudnn": "_native_cudnn", "sdpa_flash": "_native_flash", "sdpa_efficient": "_native_efficient"}


def set_attention_backend(transformer, backend: str = "sdpa") -> str:
    """Select the attention kernel through diffusers' attention dispatcher.

    ``sdpa`` (alias ``native``) = ``torch.nn.functional.scaled_dot_product_attention`` (default,
    torch picks the kernel); ``cudnn`` / ``sdpa_flash`` / ``sdpa_efficient`` force SDPA's cuDNN,
    FlashAttention-2 or memory-efficient kernel (CUDA); ``xformers`` needs the xformers package; ``flash``/``sage``/``flex`` and any other
    ``diffusers.models.attention_dispatch.AttentionBackendName`` value are passed through.
    Returns the dispatcher name that was set.
    """
    name = _BACKEND_ALIASES.get(backend.lower(), backend.lower())
    if name == "xformers":
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise ValueError("attention backend 'xformers' requested but the xformers package is not installed; "
                             "use 'sdpa' or install xformers")
    try:
        transformer.set_attention_backend(name)
    except (ValueError, RuntimeError, ImportError) as e:
        raise ValueError(f"attention backend {backend!r} (dispatcher name {name!r}) is not usable here: {e}") from None
    return name


def set_gradient_checkpointing(transformer, enabled: bool = True) -> None:
    """Recompute each ``WanTransformerBlock`` in backward (diffusers' checkpointing switch); any
    ``placement="inside"`` wrappers of ``enable_checkpointing`` are removed first, so a block is
    never checkpointed twice nor left checkpointed when this turns checkpointing off."""
    remove_block_checkpointing(transformer)
    m = unwrap_model(transformer)
    if enabled:
        m.enable_gradient_checkpointing()
    else:
        m.disable_gradient_checkpointing()


CHECKPOINT_POLICIES = ("full", "attention", "attention_ffn")
# attention backends that run torch's fused SDPA kernels, whose outputs the selective policies save
# (math decomposes into plain matmuls; xformers / flash / sage / flex call their own ops)
SAC_BACKENDS = ("native", "_native_cudnn", "_native_flash", "_native_efficient")


def check_selective_checkpointing(policy: str, backend: str) -> None:
    """``ValueError`` when ``policy`` saves attention outputs but ``backend`` (an alias or dispatcher
    name) runs no fused SDPA kernel: nothing would be saved and every block fully recomputed."""
    name = _BACKEND_ALIASES.get(str(backend).lower(), str(backend).lower())
    if policy in ("attention", "attention_ffn") and name not in SAC_BACKENDS:
        raise ValueError(
            f"model.checkpoint_policy={policy!r} keeps the outputs of torch's fused attention kernels, but attention "
            f"backend {backend!r} ({name}) does not run them: nothing would be kept. Use attention=sdpa | cudnn | "
            "sdpa_flash | sdpa_efficient with it, or checkpoint_policy=full")


def _live_attention_backend(m) -> str:
    for blk in getattr(m, "blocks", []):
        proc = getattr(getattr(blk, "attn1", None), "processor", None)
        if proc is not None:
            b = getattr(proc, "_attention_backend", None)  # None (default: native) or an AttentionBackendName
            return str(getattr(b, "value", b) or "native")
    return "native"


def _sdpa_ops() -> list:
    """The aten attention kernels ``F.scaled_dot_product_attention`` dispatches to (those this
    torch build has)."""
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_flash_attention_forward", "_efficient_attention_forward")
    return [getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n)]


def _save_ops_policy(sdpa_ops: set, dim: int, ffn_dim: int):
    """SAC policy: save the attention kernels' outputs and the ``[*, dim] @ [dim, ffn_dim]``
    matmuls (the FFN up-projection), recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy

    mm = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default}

    def policy(ctx, op, *args, **kwargs):
        if op in sdpa_ops:
            return CheckpointPolicy.MUST_SAVE
        if op in mm:
            w = args[-1]
            if isinstance(w, torch.Tensor) and w.dim() == 2 and tuple(w.shape) == (dim, ffn_dim):
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return policy


CHECKPOINT_PLACEMENTS = ("auto", "outside", "inside")


def blocks_compiled(m) -> bool:
    """Whether the transformer blocks are set up for ``torch.compile`` (``nn.Module.compile``, as
    diffusers' ``compile_repeated_blocks`` does)."""
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in getattr(m, "blocks", []))


def _is_checkpoint_forward(f) -> bool:
    """Whether ``f`` (a block's instance ``forward``) is the wrapper of ``_wrap_block_forward``."""
    return getattr(getattr(f, "__func__", None), "_interpdiff_checkpoint", False)


def _wrap_block_forward(block, ckpt_kwargs: dict) -> None:
    """``block.forward`` = its class forward under ``torch.utils.checkpoint`` (when grad is on)."""
    import types

    own = block.__dict__.get("forward")
    if own is not None and not _is_checkpoint_forward(own):
        raise ValueError(f"checkpoint placement='inside': block {type(block).__name__} already has its own forward "
                         "(a hook installed on the instance); use placement='outside'")
    orig = type(block).forward

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(orig, self, *args, **ckpt_kwargs, **kwargs)
        return orig(self, *args, **kwargs)

    forward._interpdiff_checkpoint = True
    block.forward = types.MethodType(forward, block)


def remove_block_checkpointing(transformer) -> None:
    """Undo ``placement="inside"`` checkpointing (the blocks' class ``forward`` again)."""
    for b in getattr(unwrap_model(transformer), "blocks", []):
        if _is_checkpoint_forward(b.__dict__.get("forward")):
            del b.__dict__["forward"]


def checkpoint_kwargs(m, policy: str) -> dict:
    """``torch.utils.checkpoint`` keyword arguments of ``policy`` for the bare transformer ``m``
    (non-reentrant; the selective policies add their ``context_fn``)."""
    kwargs: dict = {"use_reentrant": False}
    if policy in ("attention", "attention_ffn"):
        import functools

        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        saved = _sdpa_ops()
        if policy == "attention_ffn":
            cfg = m.config
            saved = _save_ops_policy(set(saved), cfg.num_attention_heads * cfg.attention_head_dim, cfg.ffn_dim)
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, saved)
    return kwargs


def enable_checkpointing(transformer, ratio: float = 1.0, policy: str = "full", placement: str = "auto") -> list[int]:
    """Gradient checkpointing of ``round(ratio * n_blocks)`` transformer blocks, spread evenly.

    ``ratio=1``: every block (diffusers' default); ``0.5``: every other block. Recomputing fewer
    blocks trades activation memory (about 2 GB per 1.3B block at 32,760 tokens in bf16) for the
    extra forward. ``policy``:

    * ``full``: recompute the whole block in backward;
    * ``attention``: selective checkpointing: keep the outputs of the attention kernels
      (``scaled_dot_product_attention``: output + log-sum-exp, ``L x d`` per call, about 0.1 GB
      per 1.3B block at 32,760 tokens) and recompute the rest. At Wan2.1 video lengths the
      self-attention is most of the forward FLOPs (69 % for 1.3B at 21 x 60 x 104), so this
      removes most of the recompute for a few GB.
    * ``attention_ffn``: also keep the output of the FFN up-projection (the largest matmul,
      ``L x ffn_dim``, about 0.6 GB per 1.3B block at 32,760 tokens in bf16), matched as the
      ``mm``/``addmm`` whose weight is ``[dim, ffn_dim]``.

    ``placement``: where the checkpoint sits relative to ``torch.compile`` of the blocks.

    * ``outside``: diffusers' ``gradient_checkpointing_func`` wraps each block call, so a compiled
      block runs inside the checkpoint. The selective policies then act on the ops the compiled
      code dispatches at run time, through a Python dispatch mode, in the forward and again in the
      recompute: the attention kernels (called as ``.default`` ops) are kept, but inductor calls
      matmuls as ``mm.out`` into its own buffers, so ``attention_ffn`` keeps nothing more than
      ``attention`` (measured on CPU: same recompute counts; on the H200: same peak memory).
    * ``inside``: each chosen block's own ``forward`` is wrapped in the checkpoint, so when the
      block is compiled, Dynamo traces the checkpoint as a higher-order op and the policy is
      applied to the traced graph by the min-cut partitioner: no dispatch mode at run time, the
      recompute is fused into the compiled backward, and ``attention_ffn`` keeps the FFN
      up-projection. Set it before the compiled blocks first run (their graph is traced then);
      a block already traced is recompiled on its next call when Dynamo's guards see the new
      ``forward`` (checked on CPU: switching policy, ratio and placement in place gives the
      expected recompute counts).
    * ``auto`` (default): ``inside`` when the blocks are set up for ``torch.compile``
      (``compile_repeated_blocks`` was called), else ``outside``.

    Returns the checkpointed block indices.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"model.checkpoint_ratio must lie in [0, 1], got {ratio}")
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"model.checkpoint_policy={policy!r} is not one of {list(CHECKPOINT_POLICIES)}")
    if placement not in CHECKPOINT_PLACEMENTS:
        raise ValueError(f"checkpoint placement={placement!r} is not one of {list(CHECKPOINT_PLACEMENTS)}")
    m = unwrap_model(transformer)
    check_selective_checkpointing(policy, _live_attention_backend(m))
    remove_block_checkpointing(m)
    n = len(m.blocks)
    k = round(ratio * n)
    if k == 0:
        m.disable_gradient_checkpointing()
        return []
    if placement == "auto":
        placement = "inside" if blocks_compiled(m) else "outside"
    chosen = sorted({min(n - 1, int(i * n / k)) for i in range(k)})
    ids = {id(m.blocks[i]) for i in chosen}
    kwargs = checkpoint_kwargs(m, policy)
    if placement == "inside":
        m.disable_gradient_checkpointing()
        for i in chosen:
            _wrap_block_forward(m.blocks[i], kwargs)
        return chosen

    def ckpt(module, *args):
        if id(module) in ids:
            return torch.utils.checkpoint.checkpoint(module.__call__, *args, **kwargs)
        return module(*args)

    m.enable_gradient_checkpointing(gradient_checkpointing_func=ckpt)
    return chosen


# ---------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------


def unwrap_model(model):
    """The bare ``WanTransformer3DModel`` under DDP (``.module``), DeepSpeed engine (``.module``)
    and ``torch.compile`` (``._orig_mod``) wrappers, in any nesting; other modules unchanged."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(getattr(model, "module"), nn.Module):
            model = model.module
        else:
            return model


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def add_lora(transformer, spec: LoraSpec | None = None, adapter_name: str = "default",
             trainable_dtype: torch.dtype | None = torch.float32) -> list[str]:
    """Attach a peft LoRA adapter (``transformer.add_adapter``); returns the adapted module names.

    Raises ``ValueError`` naming any target in ``spec.target_modules`` that matches no module.
    Only the LoRA A/B weights (and widening weights, if any) get ``requires_grad=True`` (peft
    freezes the rest). ``trainable_dtype`` (fp32 by default, ``None`` = leave) upcasts the
    trainable weights of a bf16 model, as diffusers' ``cast_training_params`` does, so the
    optimizer updates fp32 master weights; peft casts activations to the LoRA weight dtype.
    """
    spec = spec or LoraSpec()
    spec.validate()
    model = unwrap_model(transformer)
    names = [n for n, _ in model.named_modules()]
    unmatched = [t for t in spec.target_modules if not any(_matches(n, t) for n in names)]
    if unmatched:
        linear_suffixes = sorted({n.split("blocks.0.", 1)[1] for n, m in model.named_modules()
                                  if n.startswith("blocks.0.") and isinstance(m, nn.Linear)})
        raise ValueError(
            f"LoRA target modules {unmatched} match no module of {type(model).__name__}; "
            f"linear layers of a block are {linear_suffixes}"
        )
    pe = model.patch_embedding
    extra_trainable = isinstance(pe, WidenedConv3d) and pe.extra_weight.requires_grad
    model.add_adapter(spec.to_peft(), adapter_name=adapter_name)  # peft freezes every non-LoRA weight ...
    if extra_trainable:
        pe.extra_weight.requires_grad_(True)  # ... so the widening weights are re-enabled
    model.train(model.training)  # peft creates its lora_dropout modules in train mode; follow the model
    if trainable_dtype is not None:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(trainable_dtype)
    adapted = sorted({n.rsplit(".lora_A", 1)[0] for n, _ in model.named_modules() if n.endswith(".lora_A")})
    return adapted


def lora_parameters(transformer) -> list[nn.Parameter]:
    return [p for n, p in unwrap_model(transformer).named_parameters() if "lora_" in n]


def trainable_parameters(transformer) -> list[tuple[str, nn.Parameter]]:
    """Named parameters with ``requires_grad``: the LoRA A/B and the widening ``extra_weight``."""
    return [(n, p) for n, p in unwrap_model(transformer).named_parameters() if p.requires_grad]


def lora_state_dict(transformer, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """peft state dict of the adapter, keys like ``blocks.0.attn1.to_q.lora_A.weight`` (no prefix)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unwrap_model(transformer), adapter_name=adapter_name)


def _lora_spec_of(model, adapter_name: str) -> dict:
    cfg = model.peft_config[adapter_name]
    return {"rank": int(cfg.r), "alpha": float(cfg.lora_alpha), "dropout": float(cfg.lora_dropout),
            "target_modules": sorted(cfg.target_modules), "use_rslora": bool(cfg.use_rslora)}


# ---------------------------------------------------------------------------------------------
# Phase-2 input widening
# ---------------------------------------------------------------------------------------------


class WidenedConv3d(nn.Conv3d):
    """The Wan patch embedding with ``extra_channels`` additional, zero-initialised input channels.

    ``y = conv3d(x[:, :C], weight, bias) + conv3d(x[:, C:], extra_weight)`` with
    ``weight [D, C, pt, ph, pw]`` the pretrained (frozen) kernel and ``extra_weight
    [D, E, pt, ph, pw]`` (trainable, zeros at init). Input ``[B, C+E, T, H, W]``.
    """

    def __init__(self, base: nn.Conv3d, channel_names: Sequence[str]):
        super().__init__(base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
                         base.dilation, base.groups, base.bias is not None, base.padding_mode,
                         device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.channel_names = tuple(channel_names)
        self.base_in_channels = base.in_channels
        e = len(self.channel_names)
        self.extra_weight = nn.Parameter(torch.zeros(base.out_channels, e, *base.kernel_size,
                                                     dtype=base.weight.dtype, device=base.weight.device))

    def forward(self, x_B_Cin_T_H_W: torch.Tensor) -> torch.Tensor:
        c, e = self.base_in_channels, self.extra_weight.shape[1]
        if x_B_Cin_T_H_W.shape[1] != c + e:
            raise ValueError(
                f"widened patch embedding expects {c}+{e} input channels (latent + {list(self.channel_names)}), "
                f"got {x_B_Cin_T_H_W.shape[1]}"
            )
        base = self._conv_forward(x_B_Cin_T_H_W[:, :c], self.weight, self.bias)
        extra = F.conv3d(x_B_Cin_T_H_W[:, c:].to(self.extra_weight.dtype), self.extra_weight, None,
                         self.stride, self.padding, self.dilation, self.groups)
        return base + extra.to(base.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", extra_channels={list(self.channel_names)}"


def widen_patch_embedding(transformer, channel_names: Sequence[str] = ("mask",), trainable: bool = True) -> WidenedConv3d:
    """Replace ``transformer.patch_embedding`` with a ``WidenedConv3d`` taking ``len(channel_names)``
    extra input channels (names from ``("mask", "confidence")``); the new weights start at zero so
    the model output is unchanged until they train. Idempotent for the same names."""
    channel_names = tuple(channel_names)
    if not channel_names:
        raise ValueError("widen_patch_embedding: channel_names is empty")
    bad = [c for c in channel_names if c not in WIDENING_CHANNELS]
    if bad or len(set(channel_names)) != len(channel_names):
        raise ValueError(f"widen_patch_embedding: channel names {list(channel_names)} must be distinct values "
                         f"from {list(WIDENING_CHANNELS)}")
    model = unwrap_model(transformer)
    pe = model.patch_embedding
    if isinstance(pe, WidenedConv3d):
        if pe.channel_names != channel_names:
            raise ValueError(f"patch_embedding is already widened with {list(pe.channel_names)}, "
                             f"cannot widen again with {list(channel_names)}")
        return pe
    if not isinstance(pe, nn.Conv3d):
        raise TypeError(f"expected transformer.patch_embedding to be nn.Conv3d, got {type(pe).__name__}")
    new = WidenedConv3d(pe, channel_names)
    new.extra_weight.requires_grad_(trainable)
    model.patch_embedding = new
    model._interpdiff_widening = {"channels": list(channel_names), "base_in_channels": int(pe.in_channels)}
    return new


def widening_of(transformer) -> dict | None:
    """``{"channels": [...], "base_in_channels": C}`` when widened, else ``None``."""
    pe = unwrap_model(transformer).patch_embedding
    if isinstance(pe, WidenedConv3d):
        return {"channels": list(pe.channel_names), "base_in_channels": int(pe.base_in_channels)}
    return None


def extra_channels(
    mask_B_T: torch.Tensor,
    height: int,
    width: int,
    channel_names: Sequence[str] = ("mask",),
    confidence_B_T: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-frame conditioning planes ``[B, E, T, H, W]`` for the widened patch embedding.

    ``mask`` = 1 on keyframes, 0 elsewhere; ``confidence`` = the caller's anchor confidence
    (``interpdiff.corruption.anchor_confidence``), required when named. Constant over H, W.
    """
    planes = []
    for name in channel_names:
        if name == "mask":
            planes.append(mask_B_T.to(dtype))
        elif name == "confidence":
            if confidence_B_T is None:
                raise ValueError("extra_channels: 'confidence' requested but confidence_B_T is None")
            if confidence_B_T.shape != mask_B_T.shape:
                raise ValueError(f"confidence_B_T shape {tuple(confidence_B_T.shape)} != mask_B_T {tuple(mask_B_T.shape)}")
            planes.append(confidence_B_T.to(dtype))
        else:
            raise ValueError(f"unknown extra channel {name!r}; expected one of {list(WIDENING_CHANNELS)}")
    p_B_E_T = torch.stack(planes, dim=1)
    return p_B_E_T[..., None, None].expand(*p_B_E_T.shape, height, width)


def set_keyframe_features(transformer, fn) -> None:
    """Install ``fn(frame_idx_B_K, emb_B_L_D) -> kp_feat [B, K, 5]``, which ``wan_forward`` calls for
    a phase-1 model widened with ``KP_FEAT_CHANNELS`` (a plain attribute: not a module, not saved)."""
    object.__setattr__(unwrap_model(transformer), "_interpdiff_kp_fn", fn)


# ---------------------------------------------------------------------------------------------
# Keyframe temporal rotary positions (phase-1)
# ---------------------------------------------------------------------------------------------


def _rope_base_cls():
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    return WanRotaryPosEmbed


class KeyframeRotaryPosEmbed(_rope_base_cls()):
    """diffusers' ``WanRotaryPosEmbed`` whose temporal phase can be set per sample.

    With ``frame_indices_B_K`` unset it is the parent unchanged (``[1, L, 1, Dh]`` cos/sin).
    With it set (``[B, K]`` long, post-patch latent frame indices, one per frame of the input,
    ``K == T / p_t``), token ``(k, h, w)`` of sample ``b`` gets the temporal rows
    ``freqs[frame_indices_B_K[b, k]]`` of the very same frequency table, so the result equals the
    parent evaluated on a ``max(idx)+1``-frame input and gathered at those frames
    (``[B, L, 1, Dh]``; L = K * H/p_h * W/p_w in (t, h, w) order).
    """

    frame_indices_B_K: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor):
        idx_B_K = self.frame_indices_B_K
        if idx_B_K is None:
            return super().forward(hidden_states)
        batch, _, num_frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.patch_size
        ppf, pph, ppw = num_frames // p_t, height // p_h, width // p_w
        if idx_B_K.ndim != 2 or idx_B_K.shape[1] != ppf or idx_B_K.shape[0] not in (1, batch):
            raise ValueError(
                f"keyframe indices must be [B={batch}, K={ppf}] (one per latent frame after patching), "
                f"got {tuple(idx_B_K.shape)}"
            )
        if idx_B_K.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"keyframe indices must be an integer tensor, got {idx_B_K.dtype}")
        if idx_B_K.device.type == "cpu":
            if int(idx_B_K.min()) < 0 or int(idx_B_K.max()) >= self.max_seq_len:
                raise ValueError(f"keyframe indices must lie in [0, {self.max_seq_len}) (rope_max_seq_len), got "
                                 f"min {int(idx_B_K.min())}, max {int(idx_B_K.max())}")
        else:  # checked on the device, without a host sync in every forward
            torch._assert_async(((idx_B_K >= 0) & (idx_B_K < self.max_seq_len)).all(),
                                f"keyframe indices must lie in [0, {self.max_seq_len}) (rope_max_seq_len)")
        idx_B_K = idx_B_K.to(self.freqs_cos.device).long().expand(batch, ppf)
        split = [self.t_dim, self.h_dim, self.w_dim]
        outs = []
        for table in (self.freqs_cos, self.freqs_sin):
            t_tab, h_tab, w_tab = table.split(split, dim=1)
            f_t = t_tab[idx_B_K].view(batch, ppf, 1, 1, -1).expand(batch, ppf, pph, ppw, -1)
            f_h = h_tab[:pph].view(1, 1, pph, 1, -1).expand(batch, ppf, pph, ppw, -1)
            f_w = w_tab[:ppw].view(1, 1, 1, ppw, -1).expand(batch, ppf, pph, ppw, -1)
            outs.append(torch.cat([f_t, f_h, f_w], dim=-1).reshape(batch, ppf * pph * ppw, 1, -1))
        return outs[0], outs[1]


def install_keyframe_rope(transformer) -> KeyframeRotaryPosEmbed:
    """Swap ``transformer.rope`` for a ``KeyframeRotaryPosEmbed`` sharing its frequency buffers."""
    model = unwrap_model(transformer)
    old = model.rope
    if isinstance(old, KeyframeRotaryPosEmbed):
        return old
    new = KeyframeRotaryPosEmbed.__new__(KeyframeRotaryPosEmbed)
    nn.Module.__init__(new)
    for k in ("attention_head_dim", "patch_size", "max_seq_len", "t_dim", "h_dim", "w_dim"):
        setattr(new, k, getattr(old, k))
    new.register_buffer("freqs_cos", old.freqs_cos, persistent=False)
    new.register_buffer("freqs_sin", old.freqs_sin, persistent=False)
    model.rope = new
    return new


def _find_keyframe_rope(transformer) -> KeyframeRotaryPosEmbed:
    model = unwrap_model(transformer)
    rope = getattr(model, "rope", None)
    if isinstance(rope, KeyframeRotaryPosEmbed):
        return rope
    for m in model.modules():
        if isinstance(m, KeyframeRotaryPosEmbed):
            return m
    raise ValueError("the transformer has no KeyframeRotaryPosEmbed; call install_keyframe_rope(transformer) first")


@contextlib.contextmanager
def keyframe_positions(transformer, frame_idx_B_K: torch.Tensor | None) -> Iterator[None]:
    """Within the block, the transformer's temporal rotary phase of latent frame k of sample b is
    that of frame ``frame_idx_B_K[b, k]``. ``None`` leaves the default (0..T-1) positions."""
    if frame_idx_B_K is None:
        yield
        return
    rope = _find_keyframe_rope(transformer)
    prev = rope.frame_indices_B_K
    rope.frame_indices_B_K = frame_idx_B_K
    try:
        yield
    finally:
        rope.frame_indices_B_K = prev


def wan_forward(
    transformer,
    lat_B_C_T_H_W: torch.Tensor,
    timestep_B: torch.Tensor,
    emb_B_L_D: torch.Tensor,
    frame_idx_B_K: torch.Tensor | None = None,
    extra_B_E_T_H_W: torch.Tensor | None = None,
    attention_kwargs: dict | None = None,
) -> torch.Tensor:
    """One transformer call for both phases -> velocity (or x0, per the caller's objective)
    ``[B, C, T, H, W]``.

    ``timestep_B`` is Wan's ``sigma * 1000`` (float). Phase-1 passes ``frame_idx_B_K`` (true
    latent frame indices of the K keyframes, needs ``install_keyframe_rope``); phase-2 passes
    ``extra_B_E_T_H_W`` (needs ``widen_patch_embedding``), concatenated after the latent channels.
    Inputs are cast to the transformer's parameter dtype; the output keeps that dtype.
    """
    model = unwrap_model(transformer)
    dtype = model.patch_embedding.weight.dtype
    x = lat_B_C_T_H_W.to(dtype)
    widening = widening_of(model)
    if extra_B_E_T_H_W is None and frame_idx_B_K is not None and widening is not None \
            and tuple(widening["channels"]) == KP_FEAT_CHANNELS:
        fn = getattr(model, "_interpdiff_kp_fn", None)
        if fn is None:
            raise ValueError("the patch embedding is widened with the keyframe features (phase1.kp_feat) but no "
                             "feature function is installed: call set_keyframe_features(transformer, fn) "
                             "(objectives.install_keyframe_features)")
        kp_B_K_5 = fn(frame_idx_B_K, emb_B_L_D)
        B, _, K, H, W = x.shape
        if tuple(kp_B_K_5.shape) != (B, K, len(KP_FEAT_CHANNELS)):
            raise ValueError(f"keyframe features {tuple(kp_B_K_5.shape)}, expected {(B, K, len(KP_FEAT_CHANNELS))}")
        extra_B_E_T_H_W = kp_B_K_5.to(x.device).permute(0, 2, 1)[..., None, None].expand(B, -1, K, H, W)
    if extra_B_E_T_H_W is not None:
        if widening_of(model) is None:
            raise ValueError("extra input channels given but the patch embedding is not widened; "
                             "call widen_patch_embedding(transformer, names) first")
        if extra_B_E_T_H_W.shape[0] != x.shape[0] or extra_B_E_T_H_W.shape[2:] != x.shape[2:]:
            raise ValueError(f"extra channels {tuple(extra_B_E_T_H_W.shape)} do not match latents {tuple(x.shape)} "
                             f"in B/T/H/W")
        x = torch.cat([x, extra_B_E_T_H_W.to(dtype)], dim=1)
    elif widening_of(model) is not None:
        raise ValueError(f"the patch embedding is widened with {widening_of(model)['channels']} but no "
                         f"extra_B_E_T_H_W was given")
    with keyframe_positions(model, frame_idx_B_K):
        out = transformer(hidden_states=x, timestep=timestep_B, encoder_hidden_states=emb_B_L_D.to(dtype),
                          attention_kwargs=attention_kwargs, return_dict=False)[0]
    return out


# ---------------------------------------------------------------------------------------------
# Save / load LoRA (+ widening)
# ---------------------------------------------------------------------------------------------


def save_lora(
    transformer,
    out_dir: str | os.PathLike,
    adapter_name: str = "default",
    comfy: bool = False,
    extra_meta: dict | None = None,
    is_main_process: bool = True,
) -> Path:
    """Write the adapter to the folder ``out_dir``, replaced as a whole:

    * ``pytorch_lora_weights.safetensors``: diffusers format (``transformer.``-prefixed peft keys,
      LoraConfig as adapter metadata), loadable by ``WanPipeline.load_lora_weights(out_dir)``;
    * ``interpdiff_extra.safetensors``: ``patch_embedding.extra_weight`` when widened;
    * ``interpdiff_lora.json``: LoRA spec, widening, code version, ``extra_meta``;
    * with ``comfy=True`` also ``lora_comfy.safetensors`` (``diffusion_model.*`` kohya/ComfyUI keys).

    Atomicity: every file is written into a temp folder beside ``out_dir`` (same parent, so the
    same filesystem) which then takes ``out_dir``'s name (``replace_dir``). A crash leaves either
    the previous folder or the new one under that name, never a mix of the two saves (e.g. new
    LoRA weights with the old widening or metadata), and no file of an earlier save survives
    (a stale ``lora_comfy.safetensors`` or ``interpdiff_extra.safetensors``).
    """
    from diffusers import WanPipeline
    from safetensors.torch import save as st_save

    out = Path(out_dir)
    if not is_main_process:
        return out
    model = unwrap_model(transformer)
    if adapter_name not in getattr(model, "peft_config", {}):
        raise ValueError(f"save_lora: the transformer has no LoRA adapter {adapter_name!r} (call add_lora first)")
    sd = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model, adapter_name).items()}
    peft_meta = model.peft_config[adapter_name].to_dict()
    for k, v in list(peft_meta.items()):
        if isinstance(v, set):
            peft_meta[k] = sorted(v)
    spec = _lora_spec_of(model, adapter_name)
    widening = widening_of(model)
    meta = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "lora": spec,
        "widening": widening,
        "keyframe_rope": isinstance(getattr(model, "rope", None), KeyframeRotaryPosEmbed),
        "transformer_config": transformer_config_dict(model),
        "code_version": code_version(),
        "extra": extra_meta or {},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".tmp-{out.name}-"))
    try:
        WanPipeline.save_lora_weights(str(tmp), transformer_lora_layers=sd, transformer_lora_adapter_metadata=peft_meta,
                                      safe_serialization=True, weight_name=LORA_WEIGHT_NAME)
        if widening is not None:
            w = model.patch_embedding.extra_weight.detach().to("cpu").contiguous()
            atomic_write_bytes(tmp / EXTRA_WEIGHT_NAME, st_save({"patch_embedding.extra_weight": w},
                                                                metadata={"format": "pt"}))
        if comfy:
            atomic_write_bytes(tmp / "lora_comfy.safetensors",
                               st_save(to_comfy_lora(sd, alpha=comfy_alpha(spec)), metadata={"format": "pt"}))
        atomic_write_text(tmp / META_NAME, json.dumps(meta, indent=2, default=str))
        os.chmod(tmp, 0o755)  # mkdtemp creates 0o700
        replace_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Give the complete folder ``src`` the name ``dst`` (same filesystem), replacing any folder there.

    POSIX ``rename`` cannot replace a non-empty folder, so an existing ``dst`` is first renamed
    aside (``.old-<name>-*``), ``src`` is renamed to ``dst``, then the old one is removed. Under the
    name ``dst`` there is always a complete folder (old or new); only a crash between the two
    renames leaves no ``dst``, with the previous folder intact under its ``.old-`` name.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and not dst.is_dir():
        raise NotADirectoryError(f"replace_dir: {str(dst)!r} exists and is not a folder")
    fsync_tree(src)  # diffusers' save_lora_weights does not fsync: the data is on disk before the rename
    if not dst.exists():
        os.replace(src, dst)
        fsync_dir(dst.parent)
        return
    old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".old-{dst.name}-"))
    os.replace(dst, old / dst.name)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def transformer_config_dict(transformer) -> dict:
    """The transformer's diffusers config as plain JSON values (tuples -> lists, private keys
    dropped): what a checkpoint stores to rebuild or check the base model."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(unwrap_model(transformer).config).items()
            if not k.startswith("_")}


def lora_fingerprint(lora_dir: str | os.PathLike) -> str:
    """sha256 of a ``save_lora`` folder's weight files (LoRA + widened channels): what a LoRA *is*,
    whatever path it is given by. ``""`` when the folder has no weights file."""
    import hashlib

    d = Path(lora_dir)
    h = hashlib.sha256()
    found = False
    for name in (LORA_WEIGHT_NAME, EXTRA_WEIGHT_NAME):
        if (d / name).is_file():
            found = True
            h.update(name.encode())
            with open(d / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest() if found else ""


def read_lora_meta(lora_dir: str | os.PathLike) -> dict:
    """The ``interpdiff_lora.json`` description of a ``save_lora`` folder (LoRA spec, widening,
    keyframe rope, transformer config, code version, ``extra``: the phase's training settings).
    Raises ``WanLoadError`` naming the folder when the file is missing, not JSON, or not ours."""
    lora_dir = Path(lora_dir)
    p = lora_dir / META_NAME
    if not p.is_file():
        raise WanLoadError(f"LoRA folder {str(lora_dir)!r} has no {META_NAME!r} (expected a folder written by save_lora)")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise WanLoadError(f"{str(p)!r} is not valid JSON: {e}") from None
    if meta.get("format") != META_FORMAT:
        raise WanLoadError(f"{str(p)!r} is not an interpdiff LoRA description (format {meta.get('format')!r})")
    return meta


def load_lora(transformer, lora_dir: str | os.PathLike, adapter_name: str = "default", trainable: bool = False,
              lora_dtype: torch.dtype | None = torch.float32) -> dict:
    """Rebuild what ``save_lora`` wrote on a base transformer: widening (+ its weights), keyframe
    rope when it was installed, then the LoRA through diffusers' ``load_lora_adapter``.

    ``trainable=True`` turns ``requires_grad`` on for the LoRA and widening weights (resume).
    ``lora_dtype`` (fp32 by default, as ``add_lora`` trains them) is the dtype the LoRA and
    widening weights are kept in, with the stored values copied exactly (diffusers' loader
    creates them in the model's dtype, which would round fp32 weights to bf16); ``None`` keeps
    diffusers' behaviour. Returns the stored metadata.
    """
    from diffusers import WanPipeline
    from safetensors.torch import load_file

    d = Path(lora_dir)
    if not d.is_dir():
        raise WanLoadError(f"LoRA folder {str(d)!r} does not exist (expected a folder written by save_lora)")
    if not (d / LORA_WEIGHT_NAME).is_file():
        raise WanLoadError(f"LoRA folder {str(d)!r} lacks {LORA_WEIGHT_NAME!r}")
    meta = read_lora_meta(d)
    model = unwrap_model(transformer)
    cfg = meta.get("transformer_config", {})
    for key in ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels"):
        if key in cfg and key in model.config and cfg[key] != model.config[key]:
            raise ValueError(f"LoRA {str(d)!r} was trained on a transformer with {key}={cfg[key]}, "
                             f"this one has {key}={model.config[key]}")
    widening = meta.get("widening")
    if widening:
        pe = widen_patch_embedding(model, widening["channels"], trainable=trainable)
        if not (d / EXTRA_WEIGHT_NAME).is_file():
            raise WanLoadError(f"LoRA folder {str(d)!r} records a widening {widening['channels']} but lacks "
                               f"{EXTRA_WEIGHT_NAME!r}")
        w = load_file(str(d / EXTRA_WEIGHT_NAME))["patch_embedding.extra_weight"]
        if w.shape != pe.extra_weight.shape:
            raise ValueError(f"{str(d / EXTRA_WEIGHT_NAME)!r}: extra_weight shape {tuple(w.shape)} != "
                             f"expected {tuple(pe.extra_weight.shape)}")
        with torch.no_grad():
            pe.extra_weight.copy_(w.to(pe.extra_weight))
    if meta.get("keyframe_rope"):
        install_keyframe_rope(model)
    sd, lmeta = WanPipeline.lora_state_dict(str(d), weight_name=LORA_WEIGHT_NAME, return_lora_metadata=True)
    WanPipeline.load_lora_into_transformer(dict(sd), transformer=model, adapter_name=adapter_name, metadata=lmeta)
    _check_lora_spec(d, meta, _lora_spec_of(model, adapter_name))
    model.train(model.training)  # injected lora_dropout modules start in train mode; follow the model
    if widening:
        model.patch_embedding.extra_weight.requires_grad_(trainable)  # peft froze it while injecting
    if lora_dtype is not None:
        load_lora_weights_into(model, d, adapter_name, dtype=lora_dtype)
    if trainable:
        for n, p in model.named_parameters():
            if "lora_" in n and f".{adapter_name}." in n + ".":
                p.requires_grad_(True)
    return meta


def _check_lora_spec(d: Path, meta: dict, built: dict) -> None:
    """The adapter diffusers built from the weights file (its shapes and embedded LoraConfig) must
    be the one ``interpdiff_lora.json`` describes: files of two different saves in one folder (a
    copied-over weights file) would otherwise sample with the other run's phase settings."""
    stored = meta.get("lora") or {}
    diff = {k: (stored[k], built[k]) for k in ("rank", "alpha", "use_rslora", "target_modules")
            if k in stored and (sorted(stored[k]) if k == "target_modules" else stored[k])
            != (sorted(built[k]) if k == "target_modules" else built[k])}
    if diff:
        what = "; ".join(f"{k}: {a!r} in {META_NAME}, {b!r} in {LORA_WEIGHT_NAME}" for k, (a, b) in diff.items())
        raise WanLoadError(f"LoRA folder {str(d)!r}: {META_NAME} and {LORA_WEIGHT_NAME} describe different adapters "
                           f"({what}): the files come from different saves; use a folder written by one save_lora")


def load_lora_weights_into(transformer, lora_dir: str | os.PathLike, adapter_name: str = "default",
                           dtype: torch.dtype | None = None) -> int:
    """Copy the values a ``save_lora`` folder stores into a transformer that already carries the
    same adapter (and widening): the one loader behind ``load_lora`` and checkpoint resume.

    Every stored key (``transformer.blocks.0.attn1.to_q.lora_A.weight``) must name a parameter
    (``blocks.0.attn1.to_q.lora_A.<adapter_name>.weight``) and every LoRA parameter of that adapter
    must be stored, so a checkpoint of another rank/targets is refused instead of half loaded.
    Values are copied exactly into the parameter's dtype, or into ``dtype`` when given (the
    parameter is re-created in it). ``requires_grad`` is left as it is. Returns the number of
    tensors loaded. Raises ``WanLoadError`` for a missing file, ``ValueError`` for a mismatch.
    """
    from safetensors.torch import load_file

    d = Path(lora_dir)
    lora_file = d / LORA_WEIGHT_NAME
    if not lora_file.is_file():
        raise WanLoadError(f"LoRA folder {str(d)!r} lacks {LORA_WEIGHT_NAME!r}")
    model = unwrap_model(transformer)
    params = dict(model.named_parameters())
    sd = load_file(str(lora_file))
    loaded: set[str] = set()

    def put(name: str, value: torch.Tensor) -> None:
        p = params[name]
        if tuple(value.shape) != tuple(p.shape):
            raise ValueError(f"{str(d)!r}: {name!r} has shape {tuple(value.shape)} stored, {tuple(p.shape)} in the model")
        if dtype is not None:
            p.data = value.to(device=p.device, dtype=dtype).clone()
        else:
            with torch.no_grad():
                p.copy_(value.to(p.device, p.dtype))
        loaded.add(name)

    for k, v in sd.items():
        name = k[len("transformer."):] if k.startswith("transformer.") else k
        for ab in (".lora_A.", ".lora_B."):  # peft state-dict keys drop the adapter name
            name = name.replace(ab, f"{ab}{adapter_name}.")
        if name not in params:
            raise ValueError(f"{str(lora_file)!r}: key {k!r} has no parameter {name!r} in the model "
                             f"(other LoRA targets, or not adapter {adapter_name!r}?)")
        put(name, v)
    own = {n for n in params if (".lora_A." in n or ".lora_B." in n) and f".{adapter_name}." in n}
    if own - loaded:
        raise ValueError(f"{str(lora_file)!r} holds {len(loaded)} LoRA tensors, adapter {adapter_name!r} of the model "
                         f"has {len(own)}; not stored: {sorted(own - loaded)[:3]}")
    if widening_of(model) is not None:
        extra = d / EXTRA_WEIGHT_NAME
        if not extra.is_file():
            raise WanLoadError(f"LoRA folder {str(d)!r} lacks {EXTRA_WEIGHT_NAME!r} (the model's patch embedding is widened)")
        put("patch_embedding.extra_weight", load_file(str(extra))["patch_embedding.extra_weight"])
    return len(loaded)


def load_lora_into_pipeline(pipe, lora_dir: str | os.PathLike, adapter_name: str = "default") -> dict:
    """``pipe.load_lora_weights`` plus the widening/rope that the folder records, and the
    transformer put back in eval mode: peft injects ``lora_dropout`` modules in train mode, so
    after a bare ``load_lora_weights`` a LoRA trained with dropout > 0 would drop activations at
    inference (``pipe.transformer.eval()`` fixes that; this function does it)."""
    d = Path(lora_dir)
    meta = read_lora_meta(d)
    if meta.get("widening"):
        load_lora(pipe.transformer, d, adapter_name)
    else:
        if meta.get("keyframe_rope"):
            install_keyframe_rope(pipe.transformer)
        pipe.load_lora_weights(str(d), weight_name=LORA_WEIGHT_NAME, adapter_name=adapter_name)
    pipe.transformer.eval()
    return meta


_COMFY_MAP = [
    ("attn1.to_q", "self_attn.q"), ("attn1.to_k", "self_attn.k"), ("attn1.to_v", "self_attn.v"),
    ("attn1.to_out.0", "self_attn.o"), ("attn2.to_q", "cross_attn.q"), ("attn2.to_k", "cross_attn.k"),
    ("attn2.to_v", "cross_attn.v"), ("attn2.to_out.0", "cross_attn.o"), ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
]


def comfy_alpha(spec: dict) -> float:
    """The ``alpha`` to write for kohya/ComfyUI, which scale by ``alpha / rank``: peft's rsLoRA trains
    with ``alpha / sqrt(rank)``, so its alpha is written as ``alpha * sqrt(rank)``."""
    if spec.get("use_rslora"):
        return float(spec["alpha"]) * math.sqrt(int(spec["rank"]))
    return float(spec["alpha"])


def to_comfy_lora(sd: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """diffusers/peft Wan LoRA keys -> original-Wan kohya/ComfyUI keys
    (``diffusion_model.blocks.{i}.self_attn.q.lora_down.weight`` / ``lora_up.weight`` / ``alpha``).

    The scale ``alpha / rank`` is carried by the ``alpha`` entries, which is how ComfyUI and
    diffusers' ``_convert_non_diffusers_wan_lora_to_diffusers`` read it. Keys outside the blocks'
    attention/FFN projections raise ``ValueError`` (no equivalent in that format).
    """
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        key = k[len("transformer."):] if k.startswith("transformer.") else k
        if not key.startswith("blocks."):
            raise ValueError(f"to_comfy_lora: key {k!r} has no kohya/ComfyUI equivalent")
        _, i, rest = key.split(".", 2)
        for ours, theirs in _COMFY_MAP:
            for ab, du in (("lora_A.weight", "lora_down.weight"), ("lora_B.weight", "lora_up.weight")):
                if rest == f"{ours}.{ab}":
                    out[f"diffusion_model.blocks.{i}.{theirs}.{du}"] = v
                    if ab == "lora_A.weight":
                        out[f"diffusion_model.blocks.{i}.{theirs}.alpha"] = torch.tensor(float(alpha))
                    break
            else:
                continue
            break
        else:
            raise ValueError(f"to_comfy_lora: key {k!r} has no kohya/ComfyUI equivalent")
    return out


# ---------------------------------------------------------------------------------------------
# Frozen encoders
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: Sequence[str], max_length: int = 512,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """UMT5 last hidden state ``emb_B_L_D``, ``L = max_length``, rows past each prompt's length
    zeroed: the same rule as ``WanPipeline._get_t5_prompt_embeds`` (prompts cleaned the same way)."""
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    prompts = [prompt_clean(p) for p in prompts]
    tok = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    hid_B_L_D = text_encoder(ids, mask).last_hidden_state
    seq_lens = mask.gt(0).sum(dim=1)
    keep_B_L = torch.arange(max_length, device=device)[None, :] < seq_lens[:, None]
    out = hid_B_L_D * keep_B_L[..., None].to(hid_B_L_D.dtype)
    return out.to(dtype) if dtype is not None else out


def latent_norm(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(mean_1_C_1_1_1, std_1_C_1_1_1)`` from the VAE config."""
    c = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, c, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, c, 1, 1, 1)
    return mean, std


@torch.no_grad()
def vae_encode(vae, video_B_3_F_H_W: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Pixels in ``[-1, 1]`` -> normalised latents ``(z - mean) / std``, ``[B, 16, 1+(F-1)/4, H/8, W/8]``
    (posterior mode by default, as Wan training code does)."""
    dev, dt = next(vae.parameters()).device, next(vae.parameters()).dtype
    dist = vae.encode(video_B_3_F_H_W.to(dev, dt)).latent_dist
    z = dist.sample(generator) if sample else dist.mode()
    mean, std = latent_norm(vae)
    return ((z.float() - mean.to(dev)) / std.to(dev))


@torch.no_grad()
def vae_decode(vae, lat_B_C_T_H_W: torch.Tensor) -> torch.Tensor:
    """Normalised latents -> pixels in ``[-1, 1]`` (clamped), ``[B, 3, F, H, W]``."""
    dev, dt = next(vae.parameters()).device, next(vae.parameters()).dtype
    mean, std = latent_norm(vae)
    z = lat_B_C_T_H_W.float().to(dev) * std.to(dev) + mean.to(dev)
    return vae.decode(z.to(dt)).sample.clamp(-1, 1)
