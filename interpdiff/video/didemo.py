"""DiDeMo and any folder of videos with prompts: decord decoding into fixed-length pixel clips.

Annotations
    DiDeMo's ``train_data.json`` / ``val_data.json`` / ``test_data.json`` (LocalizingMoments
    release): a JSON list of ``{"video": "<flickr id>.mov", "description": str, "times":
    [[s, e], ...] (one pair per annotator, in 5-second segment units 0..5), "annotation_id",
    ...}``. Any other folder works with a JSON list / JSONL of ``{"video", "prompt" | "caption" |
    "description"}`` or, with no annotation file at all, ``name.mp4`` + a ``name.txt`` prompt.
    A video name whose file is missing is also tried with the other common extensions
    (DiDeMo lists ``.mov``/``.avi`` names; most downloads are ``.mp4``).

Clips (``ClipSpec``)
    ``num_frames = 4k+1`` frames (Wan's VAE: 81 frames -> 21 latents) evenly spaced over a
    ``clip_seconds`` window, first and last frame included (5 s, DiDeMo's segment length; 81
    frames 1/16 s apart span 5 s, Wan's 16 fps, so a 16 fps source gives 81 consecutive frames):
    frame ``i`` is the decoded frame whose presentation time is nearest to
    ``start + i * clip_seconds / (num_frames - 1)`` seconds. Times come from the container's
    timestamps, so a variable-frame-rate video (phones) is sampled at the right moments too.
    The window is placed by ``time_crop``: ``moment`` (DiDeMo: centred on the annotators'
    consensus moment, falls back to ``center`` without times), ``center`` or ``random``; it is
    clamped between the first and the last frame; a video shorter than the window is stretched
    over its whole length.
    Frames are resized (bilinear, antialiased) so that the target covers them, then cropped
    (``center`` or ``random``) to ``height x width``; pixels in ``[-1, 1]``, ``[3, F, H, W]``.

Missing or unreadable videos are skipped and counted: ``VideoClipDataset[i]`` returns ``None``
for them and ``collate_clips`` drops the ``None`` entries and reports how many it dropped, so
the count is right with DataLoader workers too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = ["ClipSpec", "VideoItem", "load_annotations", "VideoClipDataset", "collate_clips", "clip_frame_indices",
           "resize_crop", "decode_clip", "VIDEO_EXTS"]

VIDEO_EXTS = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".3gp", ".mpg", ".mpeg", ".wmv", ".flv")
DIDEMO_SEGMENT_S = 5.0


@dataclass
class ClipSpec:
    num_frames: int = 81  # 4k+1
    height: int = 480
    width: int = 832
    clip_seconds: float = 5.0
    time_crop: str = "moment"  # moment | center | random
    space_crop: str = "center"  # center | random

    def validate(self) -> None:
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(f"clip num_frames must be 4k+1 (Wan VAE temporal stride 4), got {self.num_frames}")
        if self.height % 16 or self.width % 16 or self.height <= 0 or self.width <= 0:
            raise ValueError(f"clip height/width must be positive multiples of 16 (VAE 8 x patch 2), "
                             f"got {self.height}x{self.width}")
        if self.clip_seconds <= 0:
            raise ValueError(f"clip_seconds must be > 0, got {self.clip_seconds}")
        if self.time_crop not in ("moment", "center", "random"):
            raise ValueError(f"time_crop {self.time_crop!r} is not one of moment, center, random")
        if self.space_crop not in ("center", "random"):
            raise ValueError(f"space_crop {self.space_crop!r} is not one of center, random")


@dataclass
class VideoItem:
    key: str  # unique, no '.' or '/': usable as a webdataset key
    video: str  # path (resolved lazily; may not exist)
    prompt: str
    moment_s: tuple[float, float] | None = None  # annotated span in seconds


def _sanitize(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", s)


def _resolve_video(root: Path, name: str) -> Path:
    p = root / name
    if p.is_file():
        return p
    stem = p.with_suffix("") if p.suffix.lower() in VIDEO_EXTS else p
    for ext in VIDEO_EXTS + tuple(e.upper() for e in VIDEO_EXTS):
        q = stem.with_name(stem.name + ext)
        if q.is_file():
            return q
    return p  # missing: reported (and skipped) when decoded


def _consensus_moment(times) -> tuple[float, float] | None:
    """DiDeMo ``times`` (list of ``[start_seg, end_seg]``, inclusive 5-s segments) -> seconds
    span of the most common pair (ties: the first seen)."""
    if not times:
        return None
    pairs = [tuple(int(v) for v in t) for t in times if isinstance(t, (list, tuple)) and len(t) == 2]
    if not pairs:
        return None
    (s, e), _ = Counter(pairs).most_common(1)[0]
    s, e = min(s, e), max(s, e)
    return s * DIDEMO_SEGMENT_S, (e + 1) * DIDEMO_SEGMENT_S


def _read_text(p: Path, what: str) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {str(p)!r} is not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None


def load_annotations(video_root: str | os.PathLike, annotation_files: Sequence[str | os.PathLike] = ()) -> list[VideoItem]:
    """Items from DiDeMo-style JSON / JSONL annotation files, or from ``*.txt`` prompt sidecars of
    the videos in ``video_root`` when no file is given. Raises ``FileNotFoundError``/``ValueError``
    naming the file and the entry that is malformed.

    Keys are the (sanitised) ``annotation_id`` or video stem; a key already handed out gets the
    first free suffix ``_1``, ``_2``, ... (checked against every key so far, so two captions of
    ``clip.mp4`` and a video ``clip_1.mp4`` give ``clip``, ``clip_1``, ``clip_1_1``)."""
    root = Path(video_root)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder {str(root)!r} does not exist")
    items: list[VideoItem] = []
    used: set[str] = set()  # every key handed out (a suffixed key may equal another item's base)
    next_n: dict[str, int] = {}  # per base: the suffix to try first (keeps repeated bases O(1))

    def add(video: str, prompt: str, moment, ann_id=None):
        base = _sanitize(str(ann_id)) if ann_id is not None else _sanitize(Path(video).stem)
        key, n = base, next_n.get(base, 0)
        if n or key in used:
            n = max(n, 1)
            while f"{base}_{n}" in used:
                n += 1
            key = f"{base}_{n}"
        next_n[base] = n + 1
        used.add(key)
        items.append(VideoItem(key=key, video=str(_resolve_video(root, video)), prompt=prompt.strip(),
                               moment_s=moment))

    if not annotation_files:
        vids = sorted(p for p in root.iterdir() if p.suffix.lower() in VIDEO_EXTS)
        for v in vids:
            txt = v.with_suffix(".txt")
            if not txt.is_file():
                log.warning("video %s has no prompt file %s; skipped", v, txt)
                continue
            prompt = _read_text(txt, "prompt file")
            if not prompt.strip():
                log.warning("prompt file %s is empty; video %s skipped", txt, v)
                continue
            add(v.name, prompt, None)
        if not items:
            raise FileNotFoundError(f"no video with a .txt prompt beside it in {str(root)!r} and no annotation file given")
        return items

    for f in annotation_files:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"annotation file {str(p)!r} does not exist (expected e.g. DiDeMo train_data.json)")
        text = _read_text(p, "annotation file")
        if p.suffix == ".jsonl":
            entries = []
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"annotation file {str(p)!r} line {lineno} is not valid JSON: {e.msg} "
                                     f"(column {e.colno})") from None
        else:
            try:
                entries = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"annotation file {str(p)!r} is not valid JSON: {e}") from None
        if isinstance(entries, dict):  # {"video": prompt} mapping
            entries = [{"video": k, "prompt": v} for k, v in entries.items()]
        if not isinstance(entries, list):
            raise ValueError(f"annotation file {str(p)!r}: expected a list of entries, got {type(entries).__name__}")
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or "video" not in e:
                raise ValueError(f"annotation file {str(p)!r} entry {i}: expected a dict with a 'video' key, got {e!r}"[:300])
            prompt = e.get("prompt", e.get("caption", e.get("description")))
            if isinstance(prompt, list):
                prompt = " ".join(map(str, prompt))
            if not prompt:
                raise ValueError(f"annotation file {str(p)!r} entry {i}: no 'prompt'/'caption'/'description'")
            try:
                moment = _consensus_moment(e.get("times"))
            except (TypeError, ValueError):
                raise ValueError(f"annotation file {str(p)!r} entry {i}: bad 'times' {e.get('times')!r} (expected "
                                 "[[start_segment, end_segment], ...] of integers)"[:300]) from None
            add(str(e["video"]), str(prompt), moment, e.get("annotation_id"))
    if not items:
        raise ValueError(f"annotation files {[str(f) for f in annotation_files]} hold no entry (expected a list of "
                         f"{{'video', 'prompt' | 'caption' | 'description'}} entries)")
    return items


def clip_frame_indices(num_video_frames: int, fps: float, spec: ClipSpec, moment_s: tuple[float, float] | None,
                       rng: random.Random, timestamps: Sequence[float] | None = None, path: str = "") -> list[int]:
    """Indices of the ``spec.num_frames`` decoded frames of one clip (see the module docstring).
    ``timestamps``: each frame's presentation time in seconds (default ``i / fps``)."""
    import numpy as np

    where = f"video {path!r}: " if path else ""
    if timestamps is None:
        if num_video_frames <= 0 or not fps or fps <= 0 or not math.isfinite(fps):
            raise ValueError(f"{where}{num_video_frames} frames at {fps} fps (expected frames and a positive frame rate)")
        ts = np.arange(num_video_frames, dtype=np.float64) / fps
    else:
        ts = np.asarray(timestamps, dtype=np.float64)
        if ts.ndim != 1 or len(ts) != num_video_frames or num_video_frames <= 0 or not np.isfinite(ts).all():
            raise ValueError(f"{where}{num_video_frames} frames with {len(ts)} usable timestamps")
        if (np.diff(ts) < 0).any():  # out-of-order presentation times (broken container): use the frame order
            ts = np.maximum.accumulate(ts)
    ts = ts - ts[0]
    span = float(ts[-1])  # first to last frame
    clip = min(spec.clip_seconds, span)
    free = span - clip
    mode = spec.time_crop
    if mode == "moment" and moment_s is None:
        mode = "center"
    if mode == "moment":
        start = 0.5 * (moment_s[0] + moment_s[1]) - 0.5 * clip
    elif mode == "center":
        start = 0.5 * free
    else:
        start = rng.uniform(0.0, free)
    start = min(max(start, 0.0), free)
    if len(ts) == 1:
        return [0] * spec.num_frames
    step = clip / (spec.num_frames - 1) if spec.num_frames > 1 else 0.0
    want = start + step * np.arange(spec.num_frames)
    right = np.clip(np.searchsorted(ts, want), 1, len(ts) - 1)  # ts[right - 1] < want <= ts[right]
    left = right - 1
    nearest = np.where(ts[right] - want < want - ts[left], right, left)  # ties: the earlier frame
    return [int(j) for j in nearest]


def resize_crop(frames_F_H_W_3: torch.Tensor, height: int, width: int, mode: str, rng: random.Random) -> torch.Tensor:
    """uint8 ``[F, h, w, 3]`` -> float ``[3, F, height, width]`` in ``[-1, 1]``: scale by
    ``max(height/h, width/w)`` (cover), bilinear antialiased, then crop ``center``/``random``.
    Frames go to float ``chunk`` at a time (every step is per frame): a 1080p clip of 81 frames
    would otherwise be a 2 GB float32 tensor per loader worker before the resize."""
    chunk = 8
    Fn, h, w, _ = frames_F_H_W_3.shape
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    if mode == "random":
        top, left = rng.randint(0, nh - height), rng.randint(0, nw - width)
    else:
        top, left = (nh - height) // 2, (nw - width) // 2
    out = torch.empty(3, Fn, height, width)
    for i in range(0, Fn, chunk):
        x = frames_F_H_W_3[i : i + chunk].permute(0, 3, 1, 2).float()  # f, 3, h, w
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        x = x[:, :, top : top + height, left : left + width]
        out[:, i : i + chunk] = (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3)
    return out


def decode_clip(path: str, spec: ClipSpec, moment_s=None, rng: random.Random | None = None) -> torch.Tensor:
    """Decode one clip with decord -> ``[3, F, H, W]`` in ``[-1, 1]``. Raises on a bad file."""
    import decord

    rng = rng or random.Random(0)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video {path!r} does not exist")
    vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    n = len(vr)
    try:
        ts = vr.get_frame_timestamp(range(n))[:, 0] if n > 0 else None
    except Exception:  # no usable timestamps: the average frame rate
        ts = None
    idx = clip_frame_indices(n, float(vr.get_avg_fps()), spec, moment_s, rng, timestamps=ts, path=path)
    try:
        frames = torch.from_numpy(vr.get_batch(idx).asnumpy())
    except Exception as e:
        if "DECORDArrayCopyFromTo" in str(e):  # decord 0.6 copies frames narrower than ~64 px with a bad stride
            raise ValueError(f"video {path!r}: decord cannot decode frames this small (a decord bug with frames "
                             f"under about 64 pixels wide; real videos are not affected): re-encode it larger") from None
        raise
    return resize_crop(frames, spec.height, spec.width, spec.space_crop, rng)


class VideoClipDataset(torch.utils.data.Dataset):
    """Map-style: item ``i`` -> ``{"key", "prompt", "video_3_F_H_W", "path"}`` or ``None`` when the
    video is missing/unreadable (counted in ``self.skipped`` of this process and logged)."""

    def __init__(self, items: Sequence[VideoItem], spec: ClipSpec, seed: int = 0):
        spec.validate()
        self.items = list(items)
        self.spec = spec
        self.seed = seed
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict | None:
        it = self.items[i]
        rng = random.Random(self.seed * 1_000_003 + i)
        try:
            video = decode_clip(it.video, self.spec, it.moment_s, rng)
        except Exception as e:  # decord raises its own DECORDError; any failure = skip this video
            self.skipped += 1
            log.warning("skipping video %s (%s): %s: %s", it.video, it.key, type(e).__name__, str(e)[:200])
            return None
        return {"key": it.key, "prompt": it.prompt, "video_3_F_H_W": video, "path": it.video}


def collate_clips(samples: list[dict | None]) -> dict:
    """Stack the good samples: ``{"video_B_3_F_H_W", "prompts", "keys", "n_skipped"}`` (``video``
    is ``None`` when every sample of the batch was bad)."""
    good = [s for s in samples if s is not None]
    return {
        "video_B_3_F_H_W": torch.stack([s["video_3_F_H_W"] for s in good]) if good else None,
        "prompts": [s["prompt"] for s in good],
        "keys": [s["key"] for s in good],
        "n_skipped": len(samples) - len(good),
    }
