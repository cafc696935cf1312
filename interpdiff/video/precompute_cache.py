"""Encode videos + prompts with the frozen Wan VAE and UMT5 into latent shards.

    python -m interpdiff.video.precompute_cache model=Wan-AI/Wan2.1-T2V-1.3B-Diffusers \
        videos=data/didemo/videos annotations=[data/didemo/train_data.json] out_dir=data/didemo_lat
    python -m interpdiff.video.precompute_cache model=tiny videos=VIDEOS out_dir=OUT \
        clip.num_frames=5 clip.height=32 clip.width=32 device=cpu       # CPU smoke run

Writes ``shard_000000.tar, ...`` in exactly the format of the Wan2.1-synthetic set
(``interpdiff.video.data``): ``{key}.latent.pt`` bf16 ``[16, 1+(F-1)/4, H/8, W/8]`` normalised
latents (VAE posterior mode, ``(z - mean) / std``), ``{key}.embed.pt`` bf16 ``[max_length, D]``
(UMT5 output, zero past the prompt, as ``WanPipeline`` builds it), ``{key}.prompt.txt``.

Shard ``s`` holds annotation items ``[s * samples_per_shard, (s+1) * samples_per_shard)`` of the
(deterministic) item list. Next to each shard, ``shard_NNNNNN.json`` (its manifest, final once
the shard is written) records what the shard was made from: the items of its range (key, video path relative
to ``videos``, prompt, moment) and the settings that determine the bytes of a sample (``model``,
``clip.*``, ``max_length``, ``text_dtype``, ``vae_dtype``, ``seed``, ``samples_per_shard``).

Resume: a shard on disk is kept only when its manifest equals what this run would write. Each
file is written to a temp name and renamed, and before a shard is (re)written its manifest is
replaced by one marked ``"complete": false``, replaced by the final manifest once the shard is in
place: a crash (kill, full disk) anywhere in between leaves an incomplete-marked manifest (with
the old shard, no shard or the new shard), and that shard is redone by the next run without
asking. Any other shard is stale and re-encoded: a changed ``max_items``,
annotation file, set of video names or ``samples_per_shard`` re-encodes exactly the shards whose
items changed (a video file replaced under the same name is not detected: file contents are not
hashed); a changed clip spec / model / text length re-encodes all of them. The run logs
which shards are stale and why (the differing settings by name, or the changed items) before it
starts, so an ``out_dir`` reused by mistake shows up at once. Shards past the new last shard (a
smaller item list) are removed by rank 0 with their manifests (or a manifest left alone); past-the-end
shards without a cache manifest (another data set in ``out_dir``) follow ``legacy_shards``
(``error``: stop and name them). Missing/unreadable videos are skipped and counted; the shard
then holds fewer samples. A shard is never replaced by nothing: when every video of a stale
shard is missing or unreadable now, the shard on disk is kept (with a warning) and redone once
they are back; and a run in which no video exists at all (an unmounted folder, a wrong
``videos=``) stops before it changes anything. ``cache_meta.json`` records
the config, the counts (``stale_shards``: shards re-encoded or removed) and the code version.

Several processes (``torchrun --nproc-per-node 8 -m interpdiff.video.precompute_cache ...``)
split the shards ``s % world_size == rank`` (rank/world from the arguments, torch.distributed or
``RANK``/``WORLD_SIZE``), each on ``cuda:LOCAL_RANK``, each writing ``cache_meta_rankNNN.json``;
no collective op is needed, so ranks may finish at different times.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from interpdiff.config import parse_cli, to_dict
from interpdiff.io import atomic_write_text, code_version
from interpdiff.video.data import dist_info, encode_latent_sample
from interpdiff.video.didemo import VIDEO_EXTS, ClipSpec, VideoClipDataset, collate_clips, load_annotations
from interpdiff.video.make_shards import write_shard

log = logging.getLogger(__name__)


@dataclass
class PrecomputeConfig:
    model: str = "???"  # diffusers folder / hub id / "tiny"
    videos: str = "???"  # folder of videos
    annotations: list[str] = field(default_factory=list)  # DiDeMo *_data.json / JSONL; [] = name.txt sidecars
    out_dir: str = "???"
    clip: ClipSpec = field(default_factory=ClipSpec)
    samples_per_shard: int = 64
    batch_size: int = 1  # videos per VAE call
    num_workers: int = 2  # decoding workers
    max_length: int = 512  # text tokens (Wan: 512)
    max_items: int = 0  # 0 = all
    device: str = "cuda"  # with several processes (torchrun / accelerate launch): cuda:LOCAL_RANK
    rank: int = -1  # -1: from torch.distributed / RANK env; shards s with s % world_size == rank are ours
    world_size: int = -1
    text_dtype: str = "bfloat16"
    vae_dtype: str = "float32"
    seed: int = 0
    # shards without any manifest (written by an older version: before manifests existed, or one that
    # crashed between the shard and its manifest; this version marks a shard being written, and
    # redoes it after a crash without asking): "error" = stop and say so; "adopt" = keep the shard when its keys are exactly
    # the expected items (its settings cannot be checked: only for a cache made with the same
    # settings) and write its manifest; "redo" = re-encode it
    legacy_shards: str = "error"

    def validate(self) -> None:
        self.clip.validate()
        if self.legacy_shards not in ("error", "adopt", "redo"):
            raise ValueError(f"legacy_shards={self.legacy_shards!r} is not one of ['error', 'adopt', 'redo']")
        if self.samples_per_shard < 1 or self.batch_size < 1:
            raise ValueError(f"samples_per_shard ({self.samples_per_shard}) and batch_size ({self.batch_size}) "
                             f"must be >= 1")


def _shard_path(out: Path, s: int) -> Path:
    return out / f"shard_{s:06d}.tar"


def _manifest_path(out: Path, s: int) -> Path:
    return out / f"shard_{s:06d}.json"


MANIFEST_FORMAT = "interpdiff-cache-shard"


def content_config(cfg: PrecomputeConfig) -> dict:
    """The settings that determine the bytes of a cached sample (besides its item)."""
    return {"model": cfg.model, "clip": to_dict(cfg.clip), "max_length": cfg.max_length, "text_dtype": cfg.text_dtype,
            "vae_dtype": cfg.vae_dtype, "seed": cfg.seed, "samples_per_shard": cfg.samples_per_shard,
            "frame_times": FRAME_TIMES}


# how clip frames are chosen (didemo.clip_frame_indices); a cache made by another rule is re-encoded.
# v2: first and last frame clip_seconds apart, by the container's timestamps (v1, unnamed: frames
# clip_seconds / num_frames apart at the average frame rate, which repeated a frame of 16 fps videos)
FRAME_TIMES = "v2-timestamps-first-to-last"


def shard_manifest(cfg: PrecomputeConfig, items: list, s: int) -> dict:
    """What shard ``s`` is made from (JSON-ready; compared as written/read back)."""
    root = Path(cfg.videos)
    lo, hi = s * cfg.samples_per_shard, min(len(items), (s + 1) * cfg.samples_per_shard)

    def rel(v: str) -> str:
        try:
            return str(Path(v).relative_to(root))
        except ValueError:
            return str(v)

    man = {"format": MANIFEST_FORMAT, "version": 1, "shard": s, "first_item": lo, "content": content_config(cfg),
           "items": [[it.key, rel(it.video), it.prompt, list(it.moment_s) if it.moment_s else None]
                     for it in items[lo:hi]]}
    return json.loads(json.dumps(man))


def _video_path(cfg: PrecomputeConfig, video: str) -> Path:
    """A manifest's video entry (relative to ``cfg.videos`` when under it) as a path."""
    p = Path(video)
    return p if p.is_absolute() else Path(cfg.videos) / p


def _same_items(a: list, b: list) -> bool:
    """Manifest items equal, up to a video file's extension: a name listed as ``x.mov`` resolves to
    the ``x.mp4`` on disk, and back to ``x.mov`` while the file is missing (an unmounted folder),
    which must not make every shard look stale."""
    def norm(items):
        out = []
        for it in items or []:
            it = list(it)
            if len(it) > 1 and isinstance(it[1], str) and Path(it[1]).suffix.lower() in VIDEO_EXTS:
                it[1] = str(Path(it[1]).with_suffix(""))
            out.append(it)
        return out

    return norm(a) == norm(b)


def _file_stamp(p: Path) -> list | None:
    try:
        st = p.stat()
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_cache_manifest(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _tar_keys(path: Path) -> list[str]:
    """Sample keys of a shard in member order (``{key}.latent.pt`` / ``.embed.pt`` / ``.prompt.txt``)."""
    import tarfile

    keys: list[str] = []
    try:
        with tarfile.open(path) as tf:
            for name in tf.getnames():
                k = name.split(".", 1)[0]
                if not keys or keys[-1] != k:
                    keys.append(k)
    except (OSError, tarfile.TarError):
        return []
    return keys


def stale_reason(out: Path, s: int, expected: dict, videos_root: str | Path = "") -> str | None:
    """``None`` when shard ``s`` on disk matches ``expected`` (and none of the videos it had to
    skip is there now, see ``_retry_reason``; relative paths are under ``videos_root``), else why
    it does not."""
    if not _shard_path(out, s).is_file():
        return "missing"
    mp = _manifest_path(out, s)
    try:
        got = json.loads(mp.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no manifest {mp.name} (written by an older version, before manifests or interrupted before the manifest)"
    except (OSError, ValueError) as e:
        return f"unreadable manifest {mp.name}: {type(e).__name__}: {e}"
    if not isinstance(got, dict) or got.get("format") != MANIFEST_FORMAT:
        return f"{mp.name} is not a cache shard manifest"
    if got.get("complete") is False:
        return f"interrupted while it was written ({mp.name} is marked incomplete)"
    skipped = got.pop("skipped", None) or []
    if {k: v for k, v in got.items() if k != "items"} == {k: v for k, v in expected.items() if k != "items"} \
            and _same_items(got.get("items"), expected["items"]):
        return _retry_reason(Path(videos_root), skipped, mp)
    old_c, new_c = _flatten(got.get("content") or {}), _flatten(expected["content"])
    diff = [f"{k}: {old_c.get(k)!r} -> {new_c.get(k)!r}" for k in sorted(set(old_c) | set(new_c))
            if old_c.get(k) != new_c.get(k)]
    if diff:
        return "settings differ (" + ", ".join(diff) + ")"
    old_i, new_i = got.get("items") or [], expected["items"]
    if not _same_items(old_i, new_i):
        old_k, new_k = [i[0] for i in old_i], [i[0] for i in new_i]
        if old_k != new_k:
            return f"items differ: keys {old_k[:4]}{'...' if len(old_k) > 4 else ''} ({len(old_k)}) -> " \
                   f"{new_k[:4]}{'...' if len(new_k) > 4 else ''} ({len(new_k)})"
        changed = [n for n, (a, b) in enumerate(zip(old_i, new_i)) if a != b]
        return f"items differ: video/prompt/moment of {[new_k[n] for n in changed[:4]]}"
    return "manifest differs"


def _retry_reason(root: Path, skipped: list, manifest: Path) -> str | None:
    """Why a current shard should still be re-encoded: one of the videos it had to skip (missing
    or unreadable when it was written; ``[key, video, was_missing, [size, mtime_ns]]`` entries of
    its manifest) is there now, or is another file now (size or modification time changed: a
    copy that kept the source's old time counts too). A video that is still the same unreadable
    file does not make the shard redo on every run. (Entries of older manifests have no stamp:
    newer than the manifest counts then.)"""
    from interpdiff.video.didemo import _resolve_video

    written = manifest.stat().st_mtime
    for entry in skipped:
        key, video, was_missing = entry[:3]
        stamp = entry[3] if len(entry) > 3 else None
        p = Path(video) if Path(video).is_absolute() else root / video
        p = _resolve_video(p.parent, p.name)  # x.mov listed, x.mp4 arrived
        if not p.is_file():
            continue
        if was_missing:
            return f"video {key!r} ({p}) was missing when the shard was written and is there now"
        now = _file_stamp(p)
        if (now != stamp) if stamp is not None else (p.stat().st_mtime > written):
            return f"video {key!r} ({p}) was unreadable when the shard was written and has changed since"
    return None


def precompute(cfg: PrecomputeConfig, comps=None) -> dict:
    """Run the cache step; ``comps`` (a ``WanComponents`` with vae/text_encoder/tokenizer) may be
    passed to reuse loaded models. Returns this rank's counts ``{items (all), shards (this rank's),
    written, skipped_shards (already on disk and current), stale_shards (re-encoded or removed:
    made from other items/settings), samples, skipped_videos}``."""
    from tqdm.auto import tqdm

    from interpdiff.video import wan

    cfg.validate()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = load_annotations(cfg.videos, cfg.annotations)
    if cfg.max_items > 0:
        items = items[: cfg.max_items]
    n_shards = -(-len(items) // cfg.samples_per_shard)
    rank, world = dist_info(cfg.rank, cfg.world_size)
    mine = [s for s in range(n_shards) if s % world == rank]
    manifests = {s: shard_manifest(cfg, items, s) for s in mine}
    reasons = {s: stale_reason(out, s, manifests[s], cfg.videos) for s in mine}
    legacy = [s for s in mine if (reasons[s] or "").startswith("no manifest")]
    if legacy and cfg.legacy_shards == "error":
        raise ValueError(
            f"{out}: {len(legacy)} shard(s) without a manifest (e.g. {_shard_path(out, legacy[0]).name}), written by an "
            "older version (before manifests, or interrupted before the manifest); their settings cannot be checked. Pass "
            "legacy_shards=adopt to keep those whose keys are the expected items (same settings as this run), or "
            "legacy_shards=redo to re-encode them")
    if cfg.legacy_shards == "adopt":
        for s in legacy:
            keys = _tar_keys(_shard_path(out, s))
            if keys == [it[0] for it in manifests[s]["items"]]:  # every item is there: none was skipped
                atomic_write_text(_manifest_path(out, s), json.dumps(dict(manifests[s], skipped=[]), indent=1))
                reasons[s] = None
                log.warning("adopted %s (keys match the items; settings assumed to be this run's)", _shard_path(out, s).name)
            else:
                reasons[s] = f"no manifest, and its keys {keys[:4]} are not the expected items"
    todo = [s for s in mine if reasons[s] is not None]
    if todo and not any(Path(it.video).is_file() for it in items):
        raise FileNotFoundError(
            f"none of the {len(items)} videos exists under videos={cfg.videos!r} (e.g. {items[0].video!r}); is the "
            f"folder mounted and the path right? Nothing was changed in {out}")
    stale = [s for s in todo if reasons[s] != "missing"]
    for s in stale:
        log.warning("shard %d on disk is stale and will be re-encoded: %s", s, reasons[s])
    if stale:
        log.warning("%d of this rank's %d shards in %s were made from other items/settings; re-encoding them",
                    len(stale), len(mine), out)
    extra = []
    if rank == 0:  # shards past the last one (a smaller item list / larger shards): not part of this cache
        for p in [*out.glob("shard_*.tar"), *out.glob("shard_*.json")]:  # a manifest alone: an interrupted write
            num = p.stem[len("shard_"):]
            if num.isdigit() and int(num) >= n_shards:
                extra.append(int(num))
        extra = sorted(set(extra))
        foreign = [s for s in extra if _shard_path(out, s).is_file() and not _is_cache_manifest(_manifest_path(out, s))]
        if foreign and cfg.legacy_shards == "error":
            raise ValueError(
                f"{out}: {len(foreign)} shard(s) past the last shard {n_shards - 1} of {len(items)} items have no cache "
                f"manifest (e.g. {_shard_path(out, foreign[0]).name}): another data set, or a cache of an older version. "
                f"They would be removed; use another out_dir, or pass legacy_shards=redo to remove them")
        for s in extra:
            log.warning("removing %s (+ manifest): past the last shard %d of %d items", _shard_path(out, s),
                        n_shards - 1, len(items))
            _shard_path(out, s).unlink(missing_ok=True)
            _manifest_path(out, s).unlink(missing_ok=True)
    counts = {"items": len(items), "shards": len(mine), "written": 0, "skipped_shards": len(mine) - len(todo),
              "stale_shards": len(stale) + len(extra), "samples": 0, "skipped_videos": 0}
    if todo:
        if cfg.device == "cuda" and torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        else:
            device = torch.device(cfg.device if cfg.device != "cuda" else "cpu")
        if comps is None:
            comps = wan.load_wan(cfg.model, components=("vae", "text_encoder", "tokenizer"), dtype=cfg.text_dtype,
                                 vae_dtype=cfg.vae_dtype)
        vae, enc, tok = comps.vae.to(device), comps.text_encoder.to(device), comps.tokenizer
        ds = VideoClipDataset(items, cfg.clip, seed=cfg.seed)
        bar = tqdm(total=sum(min(cfg.samples_per_shard, len(items) - s * cfg.samples_per_shard) for s in todo),
                   desc="precompute_cache", unit="video")
        for s in todo:
            lo, hi = s * cfg.samples_per_shard, min(len(items), (s + 1) * cfg.samples_per_shard)
            sub = torch.utils.data.Subset(ds, range(lo, hi))
            loader = torch.utils.data.DataLoader(sub, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                                                 collate_fn=collate_clips)
            samples = []
            written: set[str] = set()  # keys encoded into this shard
            for batch in loader:
                written.update(batch["keys"])
                counts["skipped_videos"] += batch["n_skipped"]
                n = len(batch["keys"]) + batch["n_skipped"]
                if batch["video_B_3_F_H_W"] is not None:
                    lat = wan.vae_encode(vae, batch["video_B_3_F_H_W"].to(device)).to(torch.bfloat16).cpu()
                    emb = wan.encode_prompts(enc, tok, batch["prompts"], max_length=cfg.max_length)
                    emb = emb.to(torch.bfloat16).cpu()
                    for i, key in enumerate(batch["keys"]):
                        samples.append(encode_latent_sample(key, lat[i], emb[i], batch["prompts"][i]))
                bar.update(n)
            # the manifest is marked incomplete first (atomically replacing the old one), then the old shard
            # goes: a crash before the final manifest leaves a shard (old, new or none) whose manifest says
            # incomplete, redone by the next run; never a shard without a manifest (a legacy shard) or an
            # old shard under a current manifest
            if samples:
                atomic_write_text(_manifest_path(out, s), json.dumps(dict(manifests[s], complete=False), indent=1))
                _shard_path(out, s).unlink(missing_ok=True)
                try:
                    write_shard(_shard_path(out, s), samples)
                except OSError as e:  # e.g. a full disk: name the shard (its manifest says incomplete: redone next run)
                    msg = f"precompute_cache: could not write {_shard_path(out, s)}: {e.strerror or e}"
                    raise (OSError(e.errno, msg) if e.errno is not None else OSError(msg)) from e
                skipped = [[it[0], it[1], not v.is_file(), _file_stamp(v)]
                           for it in manifests[s]["items"] if it[0] not in written for v in [_video_path(cfg, it[1])]]
                atomic_write_text(_manifest_path(out, s), json.dumps(dict(manifests[s], skipped=skipped), indent=1))
            elif _shard_path(out, s).is_file():  # never trade a shard on disk for nothing
                log.warning("shard %d: every video of its items is missing/unreadable now; the shard on disk (%s) is "
                            "kept as it was (its manifest says what it holds) and redone once the videos are back",
                            s, reasons[s])
            else:
                _manifest_path(out, s).unlink(missing_ok=True)
                log.warning("shard %d: every video was missing/unreadable; no shard written", s)
            counts["written"] += 1 if samples else 0
            counts["samples"] += len(samples)
        bar.close()
    meta = {"config": to_dict(cfg), "counts": counts, "rank": rank, "world_size": world, "code_version": code_version()}
    name = "cache_meta.json" if world == 1 else f"cache_meta_rank{rank:03d}.json"
    atomic_write_text(out / name, json.dumps(meta, indent=2))
    log.info("precompute_cache: %s", counts)
    return counts


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = parse_cli(PrecomputeConfig, sys.argv[1:] if argv is None else argv)
    counts = precompute(cfg)
    print(json.dumps(counts))
    return counts


if __name__ == "__main__":
    main()
