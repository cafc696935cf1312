"""Check a latent shard set before a launch: every sample read, every rank's share counted.

    python -m interpdiff.video.check_shards shards='data/wan_synth/shard_{000000..000999}.tar' \
        latent_shape=[16,21,60,104] embed_shape=[512,4096] crop_frames=21 \
        world_size=64 num_workers=4 batch_size=1 jobs=8 report=runs/data_check.json

The training loader (``interpdiff.video.data``) skips a bad sample and goes on, and it sees only
its own rank's shards, so some faults of a data set show up there late or never. This tool reads
the whole set once with the loader's own reader and decoder (the same verdict per sample) and
reports:

* **unreadable samples**: a member that does not load, a missing ``latent.pt`` / ``embed.pt`` /
  ``prompt.txt``, a wrong rank, shape or dtype, non-finite values, a non-UTF-8 prompt (each
  named with its shard and key), and **truncated shards** (no end-of-archive marker);
* **duplicate keys**: a key stored more than once anywhere in the set, with the shards that hold
  it. The loader only notices a key read twice by one rank in one epoch; two copies on two ranks
  pass unseen, and the per-sample noise, masks and precomputed tables are keyed by the key;
* **duplicate contents**: identical latents (shape, dtype and bytes) stored under different keys
  (the same clip cached twice);
* **shape mix**: more than one latent or embedding shape (the loader keeps the first shape each
  worker sees and skips the others), and clips shorter than ``crop_frames`` (skipped too);
* **the epoch-mode split** over ``world_size`` ranks x ``num_workers`` workers for the first
  ``epochs`` epochs (the loader's own seeded shard order): good samples and full batches per
  rank. A rank with no batch in an epoch stops the run (it has nothing to train on); unequal
  counts only mean that ranks start their next epoch at different steps.

It prints a summary and exits 0 when nothing is wrong, 1 when something is (each problem is
listed), so it can gate a launch script. ``report=`` writes everything as JSON (atomically).
Shards are read by ``jobs`` processes (0 = one per CPU, at most one per shard); URLs
(``http://``, ``s3://``, ``pipe:``) are read with webdataset's streaming opener, like the loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from interpdiff.config import parse_cli
from interpdiff.io import atomic_write_text
from interpdiff.video.data import (LatentDataConfig, ShardSource, _is_url, _tar_members, decode_latent_sample,
                                   resolve_shards)


@dataclass
class CheckShardsConfig:
    shards: str = "???"  # glob / brace pattern / comma or '::' separated list / URLs (as data.shards)
    latent_shape: list[int] | None = None  # expected [C, T, H, W] (-1 = any), as data.latent_shape
    embed_shape: list[int] | None = None  # expected [L, D], as data.embed_shape
    crop_frames: int = 0  # latent frames the training crops (0 = all): shorter clips are reported
    world_size: int = 1  # the epoch-mode split to report: ranks ...
    num_workers: int = 2  # ... x loader workers per rank (data.num_workers)
    batch_size: int = 1  # data.batch_size (partial batches are dropped, as data.partial_batches=false)
    seed: int = 0  # data.seed
    shuffle_shards: bool = True  # data.shuffle_shards
    epochs: int = 1  # epochs whose split is reported (the shard order is reshuffled per epoch)
    jobs: int = 0  # processes reading shards (0 = one per CPU)
    report: str = ""  # optional JSON report path
    show: int = 10  # problems of each kind printed in full (the JSON report has all)

    def validate(self) -> None:
        LatentDataConfig(shards=self.shards, batch_size=self.batch_size, num_workers=self.num_workers,
                         crop_frames=self.crop_frames, latent_shape=self.latent_shape,
                         embed_shape=self.embed_shape).validate()
        for name in ("world_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.jobs < 0 or self.show < 0:
            raise ValueError(f"jobs ({self.jobs}) and show ({self.show}) must be >= 0")


def latent_digest(t) -> str:
    """Content hash of a tensor: dtype, shape and bytes (16 hex digits)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _Recorder:
    """webdataset ``handler``: keeps every error message and goes on (the loader's skip policy)."""

    def __init__(self, url: str):
        self.url = url
        self.errors: list[str] = []
        self.truncated = False

    def __call__(self, exn: BaseException) -> bool:
        msg = " ".join(str(exn.args[0] if exn.args else exn).split())
        if "truncated tar shard" in msg or "unexpected end of data" in msg.lower():
            self.truncated = True
        self.errors.append(f"{type(exn).__name__}: {msg[:300]}")
        return True


def scan_shard(url: str, latent_shape: list[int] | None = None, embed_shape: list[int] | None = None) -> dict:
    """Read one shard as the loader does. Returns ``{"url", "bytes", "samples", "errors",
    "truncated"}``; ``samples`` holds ``[key, latent digest, latent shape, latent dtype, embed shape,
    embed dtype]`` per good sample, ``errors`` one message per skipped sample or member."""
    from webdataset.tariterators import group_by_keys

    rec = _Recorder(url)
    samples: list[list[Any]] = []
    for raw in group_by_keys(_tar_members(iter([{"url": url}]), rec), handler=rec):
        try:
            s = decode_latent_sample(raw, latent_shape, embed_shape)
        except Exception as exn:  # the loader skips these; here each is named
            rec(exn)
            continue
        lat, emb = s["latent"], s["embed"]
        samples.append([s["key"], latent_digest(lat), list(lat.shape), str(lat.dtype).removeprefix("torch."),
                        list(emb.shape), str(emb.dtype).removeprefix("torch.")])
    size = os.path.getsize(url) if not _is_url(url) and os.path.isfile(url) else None
    return {"url": url, "bytes": size, "samples": samples, "errors": rec.errors, "truncated": rec.truncated}


def _scan_args(args: tuple) -> dict:
    return scan_shard(*args)


def epoch_split(shards: list[str], good: dict[str, int], cfg: CheckShardsConfig, epoch: int) -> list[dict]:
    """Per rank of the epoch-mode split: shards, good samples and full batches (the loader's order)."""
    out = []
    for rank in range(cfg.world_size):
        src = ShardSource(shards, rank, cfg.world_size, resampled=False, seed=cfg.seed,
                          shuffle_shards=cfg.shuffle_shards)
        src.epoch = epoch
        per_worker = [sum(good.get(u, 0) for u in src.shards_for(w, max(cfg.num_workers, 1)))
                      for w in range(max(cfg.num_workers, 1))]
        out.append({"rank": rank, "shards": len(src.shards_for(0, 1)), "samples": sum(per_worker),
                    "batches": sum(n // cfg.batch_size for n in per_worker)})
    return out


def check(cfg: CheckShardsConfig, progress: bool = True) -> dict:
    """Scan the set and return the report (see the module docstring); ``report["problems"]`` lists
    what is wrong, one line each."""
    cfg.validate()
    shards = resolve_shards(cfg.shards)
    if cfg.world_size > len(shards):
        raise ValueError(f"{len(shards)} shards cannot be split over world_size={cfg.world_size} ranks in epoch "
                         f"mode (each rank needs at least one); the training loader refuses this too "
                         f"(use more shards or data.resampled=true)")
    jobs = min(cfg.jobs or os.cpu_count() or 1, len(shards))
    args = [(u, cfg.latent_shape, cfg.embed_shape) for u in shards]
    if jobs > 1:
        import multiprocessing as mp

        with mp.get_context("fork" if os.name == "posix" else "spawn").Pool(jobs) as pool:
            results = _collect(pool.imap(_scan_args, args), len(shards), progress)
    else:
        results = _collect(map(_scan_args, args), len(shards), progress)
    return summarize(shards, results, cfg)


def _collect(it, n: int, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    return list(tqdm(it, total=n, desc="check_shards", unit="shard", disable=not progress, file=sys.stderr))


def summarize(shards: list[str], results: list[dict], cfg: CheckShardsConfig) -> dict:
    problems: list[str] = []
    where: dict[str, list[str]] = defaultdict(list)  # key -> shards (one entry per copy)
    by_digest: dict[str, set[str]] = defaultdict(set)
    lat_shapes: Counter = Counter()
    emb_shapes: Counter = Counter()
    short: list[str] = []
    good: dict[str, int] = {}
    errors: list[dict] = []
    for r in results:
        good[r["url"]] = len(r["samples"])
        for e in r["errors"]:
            errors.append({"shard": r["url"], "error": e})
        for key, digest, lshape, ldtype, eshape, edtype in r["samples"]:
            where[key].append(r["url"])
            by_digest[digest].add(key)
            lat_shapes[(tuple(lshape), ldtype)] += 1
            emb_shapes[(tuple(eshape), edtype)] += 1
            if cfg.crop_frames > lshape[1]:
                short.append(f"{key} ({lshape[1]} frames) in {r['url']}")
    truncated = [r["url"] for r in results if r["truncated"]]
    empty = [r["url"] for r in results if not r["samples"]]
    dup_keys = {k: v for k, v in where.items() if len(v) > 1}
    dup_content = sorted(sorted(keys) for keys in by_digest.values() if len(keys) > 1)
    n_good = sum(good.values())

    if errors:
        problems.append(f"{len(errors)} samples or members unreadable in {len({e['shard'] for e in errors})} shards "
                        f"(the loader skips them)")
    if truncated:
        problems.append(f"{len(truncated)} truncated shards (their last samples are missing)")
    if empty:
        problems.append(f"{len(empty)} shards hold no good sample")
    if dup_keys:
        problems.append(f"{len(dup_keys)} keys stored more than once (keys must be unique across the set)")
    if dup_content:
        problems.append(f"{len(dup_content)} latents stored under more than one key (the same clip twice)")
    if len(lat_shapes) > 1 or len(emb_shapes) > 1:
        problems.append(f"{len(lat_shapes)} latent and {len(emb_shapes)} embedding shapes/dtypes in one set (each "
                        f"loader worker keeps the first it sees and skips the others; set data.latent_shape / "
                        f"data.embed_shape to pick one)")
    if short:
        problems.append(f"{len(short)} clips shorter than crop_frames={cfg.crop_frames} (the loader skips them)")
    splits = [epoch_split(shards, good, cfg, e) for e in range(cfg.epochs)]
    for e, split in enumerate(splits):
        idle = [d["rank"] for d in split if d["batches"] == 0]
        if idle:
            problems.append(f"epoch {e}: ranks {idle[:16]}{' ...' if len(idle) > 16 else ''} get no full batch of "
                            f"{cfg.batch_size} (world_size={cfg.world_size}, num_workers={cfg.num_workers}): "
                            f"training stops there; use fewer ranks/workers, more shards or data.resampled=true")
    return {
        "shards": len(shards),
        "bytes": sum(r["bytes"] or 0 for r in results),
        "samples": n_good,
        "unreadable": errors,
        "truncated_shards": truncated,
        "empty_shards": empty,
        "duplicate_keys": dup_keys,
        "duplicate_contents": dup_content,
        "latent_shapes": [{"shape": list(s), "dtype": d, "count": c} for (s, d), c in lat_shapes.most_common()],
        "embed_shapes": [{"shape": list(s), "dtype": d, "count": c} for (s, d), c in emb_shapes.most_common()],
        "shorter_than_crop": short,
        "split": {"world_size": cfg.world_size, "num_workers": cfg.num_workers, "batch_size": cfg.batch_size,
                  "seed": cfg.seed, "epochs": splits},
        "problems": problems,
    }


def format_report(rep: dict, show: int = 10) -> str:
    lines = [f"{rep['shards']} shards, {rep['bytes'] / 1e9:.2f} GB, {rep['samples']} good samples"]
    for name in ("latent_shapes", "embed_shapes"):
        shapes = ", ".join(f"{s['shape']} {s['dtype']} x{s['count']}" for s in rep[name])
        lines.append(f"  {name.replace('_', ' ')}: {shapes or '-'}")
    sp = rep["split"]
    for e, split in enumerate(sp["epochs"]):
        b = [d["batches"] for d in split]
        s = [d["samples"] for d in split]
        lines.append(f"  epoch {e} over {sp['world_size']} ranks x {sp['num_workers']} workers, batch {sp['batch_size']}:"
                     f" samples per rank {min(s)}-{max(s)}, full batches per rank {min(b)}-{max(b)}")

    def listed(title: str, items: list[str]) -> None:
        if items:
            lines.append(f"{title} ({len(items)}):")
            lines.extend(f"  {x}" for x in items[:show])
            if len(items) > show:
                lines.append(f"  ... {len(items) - show} more (report= writes all)")

    listed("unreadable", [f"{e['shard']}: {e['error']}" for e in rep["unreadable"]])
    listed("truncated shards", rep["truncated_shards"])
    listed("shards with no good sample", rep["empty_shards"])
    listed("duplicate keys", [f"{k}: {len(v)} copies in {sorted(set(v))}" for k, v in rep["duplicate_keys"].items()])
    listed("identical latents under several keys", [", ".join(keys) for keys in rep["duplicate_contents"]])
    listed("shorter than crop_frames", rep["shorter_than_crop"])
    if rep["problems"]:
        lines.append("PROBLEMS:")
        lines.extend(f"  - {p}" for p in rep["problems"])
    else:
        lines.append("OK: no problem found")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_cli(CheckShardsConfig, sys.argv[1:] if argv is None else argv)
    rep = check(cfg)
    print(format_report(rep, cfg.show))
    if cfg.report:
        atomic_write_text(cfg.report, json.dumps(rep, indent=1))
        print(f"report written to {cfg.report}")
    return 1 if rep["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
