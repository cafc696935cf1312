"""Video keyframe selector: one logit per latent frame from the condition only (METHOD.md section 3).

``VideoSelector(SelectorSizes, LevelRule)``::

    logits_B_T   = sel(emb_B_L_D, T, level_B)          # level_B = K_s / T
    logits_B_S_T = sel.level_logits(emb_B_L_D, T, budgets)   # every level, text encoded once
    mask_B_S_T   = sel.nested_masks(emb_B_L_D, T, budgets)   # nested, endpoints set (select_nested)

Inputs are what a sampler has before any frame exists: the UMT5 text embedding ``[B, L, D]``
(``D = 4096`` for Wan2.1, zero rows past the prompt = padding) and the clip length ``T`` in
latent frames. Architecture (a small transformer decoder over ``T`` time queries)::

    tokens_B_L_d = Linear(LayerNorm(emb))                        # padding rows masked out
    pooled_B_d   = masked mean of tokens_B_L_d
    q_B_T_d      = Linear([sin(t), fourier(t / (T-1))])           # position of frame t
                 + MLP(sin(T))                                    # clip length
                 + MLP(fourier(K_s / T))                          # level (budget fraction)
                 + MLP(pooled_B_d)                                # pooled-text bias (METHOD.md section 6)
    h_B_T_d      = depth x [self-attention over time, cross-attention to tokens (padding mask), FFN]
    logits_B_T   = Linear(LayerNorm(h))

The pooled bias is the lesson of METHOD.md section 6: a maze selector that saw its condition only
through cross-attention learned one condition-blind prior; adding the pooled condition to every
time query made it follow each maze. ``tests/test_video_selector.py`` checks that the decoded
indices follow a prompt-dependent labelling.

Levels: a ``LevelRule`` (``k_min``, ``n_levels`` or explicit ``budgets``, as ``phase2`` of the
video configs) gives the budgets ``K_0 < ... < K_S = T`` of a clip of ``T`` latent frames; the
selector is trained on those levels and refuses others (``check_budgets_for``), since a level
scalar it never saw has no trained meaning.

Decoding (``select_nested``): level 0 takes the endpoints and the top ``K_0 - 2`` interior
frames by the level-0 logits; level ``s`` keeps ``M_{s-1}`` and adds the top
``K_s - K_{s-1}`` new frames by the level-``s`` logits (``interpdiff.masks.selector_nested_masks``).

Checkpoints (``save_selector`` / ``load_selector``): one ``interpdiff.io`` checkpoint file
(atomic) with ``meta = {kind, sizes, levels, ...}``; the model is rebuilt from the metadata alone.
``load_selector`` also accepts a training run folder (``selector.pt``) or a training checkpoint
folder (``trainable_ema/selector.pt``, else ``trainable/selector.pt``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from interpdiff.io import CheckpointError, load_checkpoint, save_checkpoint
from interpdiff.masks import level_budgets, selector_nested_masks

SELECTOR_KIND = "video-selector"
SELECTOR_FILE = "selector.pt"
LOSSES = ("bce", "softmax")


@dataclass
class SelectorSizes:
    """Network sizes (stored in the checkpoint; ``load_selector`` rebuilds from them)."""

    text_dim: int = 4096  # UMT5-XXL output width (the tiny preset: 32)
    d_model: int = 256
    heads: int = 4
    depth: int = 2
    ffn_mult: int = 4
    n_freq: int = 8  # Fourier features of t/(T-1) and of the level K_s/T

    def validate(self) -> None:
        if min(self.text_dim, self.d_model, self.heads, self.depth, self.ffn_mult, self.n_freq) < 1:
            raise ValueError(f"selector sizes must be positive, got {dataclasses.asdict(self)}")
        if self.d_model % self.heads or self.d_model % 2:
            raise ValueError(f"selector d_model={self.d_model} must be even and divisible by heads={self.heads}")


@dataclass
class LevelRule:
    """Budgets of a clip of ``T`` latent frames: explicit ``budgets`` (last = T) or
    ``budget_schedule(T, min(k_min, T), n_levels)`` (the rule of ``phase2`` in the video configs)."""

    k_min: int = 6
    n_levels: int = 4
    budgets: list[int] = field(default_factory=list)

    def budgets_for(self, T: int) -> list[int]:
        return level_budgets(T, self.k_min, self.n_levels, self.budgets, "levels.budgets")

    def validate(self) -> None:
        if self.budgets:
            b = [int(x) for x in self.budgets]
            if len(b) < 2 or b[0] < 2 or any(y <= x for x, y in zip(b, b[1:])):
                raise ValueError(f"levels.budgets={b}: expected at least 2 strictly increasing budgets from >= 2")
        elif self.k_min < 2 or self.n_levels < 2:
            raise ValueError(f"levels.k_min={self.k_min}, levels.n_levels={self.n_levels}: expected k_min >= 2 and "
                             "n_levels >= 2")


def sinusoidal(x_N: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer sinusoidal features ``[N, dim]`` of integer-like positions ``x_N``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x_N.device, dtype=torch.float32) / half)
    args = x_N.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def fourier(u_N: torch.Tensor, n_freq: int) -> torch.Tensor:
    """``[u, sin(pi 2^k u), cos(pi 2^k u)]_{k < n_freq}`` of values in [0, 1]: ``[..., 1 + 2 n_freq]``
    for ``u`` of any shape (``[N]`` -> ``[N, 1 + 2 n_freq]``)."""
    freqs = math.pi * 2.0 ** torch.arange(n_freq, device=u_N.device, dtype=torch.float32)
    args = u_N.float()[..., None] * freqs
    return torch.cat([u_N.float()[..., None], torch.sin(args), torch.cos(args)], -1)


def _mlp(d_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.Linear(d, d))


def text_padding(emb_B_L_D: torch.Tensor) -> torch.Tensor:
    """Padding mask ``[B, L]`` (True = ignore): the all-zero rows of a zero-padded UMT5 output.
    A row that is all padding (empty prompt) keeps its first token, so attention stays defined."""
    pad = (emb_B_L_D == 0).all(-1)
    pad[:, 0] &= ~pad.all(1)
    return pad


class VideoSelector(nn.Module):
    """Level-conditioned keyframe selector for Wan latent clips (module docstring)."""

    def __init__(self, sizes: SelectorSizes, levels: LevelRule):
        super().__init__()
        sizes.validate()
        levels.validate()
        self.sizes, self.levels = sizes, levels
        d = sizes.d_model
        self.text_in = nn.Sequential(nn.LayerNorm(sizes.text_dim), nn.Linear(sizes.text_dim, d))
        self.pos_in = nn.Linear(d + 1 + 2 * sizes.n_freq, d)
        self.len_in = _mlp(d, d)
        self.level_in = _mlp(1 + 2 * sizes.n_freq, d)
        self.pool_in = _mlp(d, d)
        layer = nn.TransformerDecoderLayer(d, sizes.heads, sizes.ffn_mult * d, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerDecoder(layer, sizes.depth)
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 1))

    def encode_text(self, emb_B_L_D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (tokens ``[B, L, d]``, padding ``[B, L]``, pooled ``[B, d]``)."""
        if emb_B_L_D.dim() != 3 or emb_B_L_D.shape[-1] != self.sizes.text_dim:
            raise ValueError(f"VideoSelector: text embedding must be [B, L, {self.sizes.text_dim}], "
                             f"got {list(emb_B_L_D.shape)}")
        emb = emb_B_L_D.float()
        pad_B_L = text_padding(emb)
        tok = self.text_in(emb)  # (B, L, d)
        keep = (~pad_B_L).float()[..., None]
        pooled = (tok * keep).sum(1) / keep.sum(1).clamp_min(1.0)  # (B, d)
        return tok, pad_B_L, pooled

    def queries(self, T: int, level_B: torch.Tensor, pooled_B_d: torch.Tensor) -> torch.Tensor:
        """Time queries ``[B, T, d]``: frame position + clip length + level + pooled-text bias."""
        if T < 2:
            raise ValueError(f"VideoSelector: a clip needs T >= 2 latent frames, got {T}")
        dev = pooled_B_d.device
        d = self.sizes.d_model
        t = torch.arange(T, device=dev)
        pos = self.pos_in(torch.cat([sinusoidal(t, d), fourier(t / (T - 1), self.sizes.n_freq)], -1))  # (T, d)
        length = self.len_in(sinusoidal(torch.full((1,), T, device=dev), d))  # (1, d)
        level = self.level_in(fourier(level_B.to(dev).float(), self.sizes.n_freq))  # (B, d)
        return pos[None] + length[:, None] + level[:, None] + self.pool_in(pooled_B_d)[:, None]

    def forward(self, emb_B_L_D: torch.Tensor, T: int, level_B: torch.Tensor, enc=None) -> torch.Tensor:
        """Logits ``[B, T]`` at level ``level_B = K_s / T`` (``enc`` = a precomputed ``encode_text``)."""
        tok, pad, pooled = self.encode_text(emb_B_L_D) if enc is None else enc
        q = self.queries(T, level_B, pooled)  # (B, T, d)
        h = self.blocks(q, tok, memory_key_padding_mask=pad)  # (B, T, d)
        return self.head(h).squeeze(-1)

    def level_logits(self, emb_B_L_D: torch.Tensor, T: int, budgets: Sequence[int]) -> torch.Tensor:
        """Logits ``[B, S, T]`` for every budget (the text is encoded once)."""
        B, S = emb_B_L_D.shape[0], len(budgets)
        tok, pad, pooled = self.encode_text(emb_B_L_D)
        lv = torch.tensor([k / T for k in budgets], device=tok.device).repeat_interleave(B)  # (S*B,) level-major
        enc = (tok.repeat(S, 1, 1), pad.repeat(S, 1), pooled.repeat(S, 1))
        return self(None, T, lv, enc=enc).view(S, B, T).transpose(0, 1)

    def check_budgets_for(self, budgets: Sequence[int], T: int, what: str = "budgets") -> None:
        """Refuse budgets the selector was not trained on for a clip of ``T`` latent frames."""
        trained = self.levels.budgets_for(T)
        bad = [k for k in budgets if k not in trained]
        if bad:
            raise ValueError(f"{what}={list(budgets)}: the video selector was trained on the budgets {trained} for "
                             f"T={T} latent frames (levels {dataclasses.asdict(self.levels)}); {bad} are not "
                             "among them")

    @torch.no_grad()
    def nested_masks(self, emb_B_L_D: torch.Tensor, T: int, budgets: Sequence[int]) -> torch.Tensor:
        """Nested keyframe masks ``[B, S, T]`` (``select_nested`` of ``level_logits``), in fp32."""
        dev = emb_B_L_D.device
        with torch.autocast(dev.type, enabled=False):
            return select_nested(self.level_logits(emb_B_L_D.float(), T, budgets), budgets)


def select_nested(logits_by_level: torch.Tensor | Sequence[torch.Tensor], budgets: Sequence[int]) -> torch.Tensor:
    """Nested masks ``[B, S, T]`` from per-level logits ``[B, S, T]`` (or a list of S ``[B, T]``):
    endpoints always set; level 0 adds the top ``K_0 - 2`` interior frames by the level-0 logits;
    level s keeps level s-1 and adds the top ``K_s - K_{s-1}`` new frames by the level-s logits."""
    if not isinstance(logits_by_level, torch.Tensor):
        logits_by_level = torch.stack(list(logits_by_level), 1)
    if logits_by_level.dim() != 3:
        raise ValueError(f"select_nested: logits must be [B, S, T], got {list(logits_by_level.shape)}")
    return selector_nested_masks(logits_by_level.float(), budgets)


def selector_loss(logits_B_T: torch.Tensor, mask_B_T: torch.Tensor, kind: str = "bce",
                  weight_B: torch.Tensor | None = None, K: int | None = None) -> torch.Tensor:
    """Loss of the level-``s`` logits against the level-``s`` DP mask ``M_s`` (interior frames only;
    the endpoints are always keyframes). ``K = |M_s|``, the level budget, the same in every labelled
    row: pass it (the trainer passes ``budgets[s]``); when omitted it is read from the first kept row.

    ``bce``: per-frame binary cross-entropy, positives weighted ``(T - K) / (K - 2)`` so both
    classes weigh the same; ``softmax``: ``-mean_{t in M_s interior} log softmax_interior(logits)_t``
    (the K-2 keyframes share one distribution over the interior frames). ``weight_B`` (0/1)
    drops samples without a label (their rows may be anything, e.g. all zero); the result is the
    mean over the kept samples. With no kept sample the result is ``0 * logits.sum()``: zero, but
    still connected to every logit, so a distributed backward (DDP / ZeRO) syncs the same graph."""
    if kind not in LOSSES:
        raise ValueError(f"selector_loss: kind={kind!r} is not one of {LOSSES}")
    B, T = mask_B_T.shape
    kept_B = torch.ones(B, dtype=torch.bool) if weight_B is None else weight_B.detach().cpu() > 0
    if kept_B.shape != (B,):
        raise ValueError(f"selector_loss: weight_B must be [{B}], got {list(weight_B.shape)}")
    if not bool(kept_B.any()):
        return logits_B_T.float().sum() * 0.0
    if K is None:
        K = int(mask_B_T[int(kept_B.nonzero()[0])].sum())
    K = int(K)
    if K <= 2 or K >= T:
        raise ValueError(f"selector_loss: level budget K={K} leaves nothing to learn for T={T} (need 2 < K < T)")
    counts = mask_B_T.detach().sum(1).cpu()
    if bool((counts[kept_B] != K).any()):
        raise ValueError(f"selector_loss: kept rows hold {counts[kept_B].tolist()} keyframes; expected K={K} in each")
    y = mask_B_T.float()
    interior = torch.ones(T, dtype=torch.bool, device=logits_B_T.device)
    interior[0] = interior[-1] = False
    lg = logits_B_T.float()
    if kind == "bce":
        w = torch.where(mask_B_T, (T - K) / (K - 2), 1.0) * interior
        per = (F.binary_cross_entropy_with_logits(lg, y, reduction="none") * w).sum(1) / w.sum(1)
    else:  # softmax
        logp = torch.log_softmax(lg.masked_fill(~interior, -math.inf), dim=1)
        per = -(logp.masked_fill(~interior, 0.0) * y * interior).sum(1) / (K - 2)
    if weight_B is None:
        return per.mean()
    wb = weight_B.float().to(per.device)
    return (per * wb).sum() / wb.sum().clamp_min(1.0)


# --- checkpoints ---------------------------------------------------------------------------------


def selector_meta(sel: VideoSelector, extra: dict | None = None) -> dict:
    return {"kind": SELECTOR_KIND, "sizes": dataclasses.asdict(sel.sizes), "levels": dataclasses.asdict(sel.levels),
            **(extra or {})}


def save_selector(path: str | os.PathLike, sel: VideoSelector, extra_meta: dict | None = None) -> Path:
    """Write ``{meta: {kind, sizes, levels, ...}, state: {model}}`` atomically (``interpdiff.io``)."""
    state = {"model": {k: v.detach().cpu() for k, v in sel.state_dict().items()}}
    return save_checkpoint(path, state, selector_meta(sel, extra_meta))


def resolve_selector_path(path: str | os.PathLike) -> Path:
    """A selector file, or a folder holding one: ``selector.pt`` (run folder), or a training checkpoint
    folder's ``trainable_ema/selector.pt`` (EMA weights) / ``trainable/selector.pt``."""
    p = Path(path)
    if not p.is_dir():
        return p
    tried = [p / SELECTOR_FILE, p / "trainable_ema" / SELECTOR_FILE, p / "trainable" / SELECTOR_FILE]
    for c in tried:
        if c.is_file():
            return c
    raise CheckpointError(f"selector checkpoint {str(p)!r} is a folder without a selector file (looked for "
                          f"{[str(c) for c in tried]}; expected a file written by interpdiff.video.train_selector)")


def load_selector(path: str | os.PathLike, map_location="cpu") -> VideoSelector:
    """Rebuild a ``VideoSelector`` from a checkpoint alone (sizes and levels from its metadata), in
    eval mode with frozen weights. ``CheckpointError`` names the path when it is missing, not a
    checkpoint, of another kind, or when its weights do not fit its sizes."""
    if not str(path):
        raise CheckpointError("selector checkpoint path is empty (expected a file written by "
                              "interpdiff.video.train_selector, e.g. runs/selector/selector.pt)")
    p = resolve_selector_path(path)
    ck = load_checkpoint(p, required_meta=("kind", "sizes", "levels"), map_location=map_location)
    meta = ck["meta"]
    if meta["kind"] != SELECTOR_KIND:
        raise CheckpointError(f"checkpoint {str(p)!r} holds a {meta['kind']!r} model; expected {SELECTOR_KIND!r} "
                              "(written by interpdiff.video.train_selector)")
    try:
        sel = VideoSelector(SelectorSizes(**meta["sizes"]), LevelRule(**meta["levels"]))
        sel.load_state_dict(ck["state"]["model"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {str(p)!r}: the weights do not fit the sizes in its metadata: "
                              f"{type(e).__name__}: {e}") from None
    sel.meta = meta
    sel.requires_grad_(False)
    return sel.eval()


__all__ = [
    "SELECTOR_KIND", "SELECTOR_FILE", "SelectorSizes", "LevelRule", "VideoSelector", "select_nested",
    "selector_loss", "save_selector", "load_selector", "resolve_selector_path", "text_padding",
]
