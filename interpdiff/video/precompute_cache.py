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
(deterministic) item list, so a rerun knows which items a shard covers: shards already on disk
are skipped (resume after a crash; each shard is written to a temp name and renamed, so a shard
that exists is complete). Missing/unreadable videos are skipped and counted; the shard then holds
fewer samples. ``cache_meta.json`` records the config, the counts and the code version.

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
from interpdiff.video.didemo import ClipSpec, VideoClipDataset, collate_clips, load_annotations
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

    def validate(self) -> None:
        self.clip.validate()
        if self.samples_per_shard < 1 or self.batch_size < 1:
            raise ValueError(f"samples_per_shard ({self.samples_per_shard}) and batch_size ({self.batch_size}) "
                             f"must be >= 1")


def _shard_path(out: Path, s: int) -> Path:
    return out / f"shard_{s:06d}.tar"


def precompute(cfg: PrecomputeConfig, comps=None) -> dict:
    """Run the cache step; ``comps`` (a ``WanComponents`` with vae/text_encoder/tokenizer) may be
    passed to reuse loaded models. Returns this rank's counts ``{items (all), shards (this rank's),
    written, skipped_shards (already on disk), samples, skipped_videos}``."""
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
    todo = [s for s in mine if not _shard_path(out, s).is_file()]
    counts = {"items": len(items), "shards": len(mine), "written": 0, "skipped_shards": len(mine) - len(todo),
              "samples": 0, "skipped_videos": 0}
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
            for batch in loader:
                counts["skipped_videos"] += batch["n_skipped"]
                n = len(batch["keys"]) + batch["n_skipped"]
                if batch["video_B_3_F_H_W"] is not None:
                    lat = wan.vae_encode(vae, batch["video_B_3_F_H_W"].to(device)).to(torch.bfloat16).cpu()
                    emb = wan.encode_prompts(enc, tok, batch["prompts"], max_length=cfg.max_length)
                    emb = emb.to(torch.bfloat16).cpu()
                    for i, key in enumerate(batch["keys"]):
                        samples.append(encode_latent_sample(key, lat[i], emb[i], batch["prompts"][i]))
                bar.update(n)
            if samples:
                write_shard(_shard_path(out, s), samples)
            else:
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
