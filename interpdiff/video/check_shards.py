"""Check a latent shard set before a launch: every sample read, every rank's epoch replayed.

    python -m interpdiff.video.check_shards data.shards='data/wan_synth/shard_{000000..000999}.tar' \
        data.latent_shape=[16,21,60,104] data.embed_shape=[512,4096] data.num_workers=4 \
        data.resampled=false world_size=64 jobs=8 report=runs/data_check.json
    # or the data section of a training config and its train.batch_size (the batch the entry scripts
    # give the loader; the data section's own batch_size is ignored there), CLI keys on top:
    python -m interpdiff.video.check_shards --config configs/video/wan1.3b_phase2.yaml \
        data.shards=data/wan_synth world_size=64

The training loader (``interpdiff.video.data``) skips a bad sample and goes on, and it sees only
its own rank's shards, so some faults of a data set show up there late or never. This tool reads
the whole set once with the loader's own reader and decoder (the same verdict per sample) and
reports:

* **unreadable samples**: a member that does not load, a missing ``latent.pt`` / ``embed.pt`` /
  ``prompt.txt``, a wrong rank, shape or dtype, non-finite values, a non-UTF-8 prompt (each
  named with its shard and key), and **truncated shards** (local files: no end-of-archive marker;
  a URL stream cut between two members cannot be told from a shorter shard and is not checked);
* **duplicate keys**: a key stored more than once anywhere in the set, with the shards that hold
  it. The loader only notices a key read twice by one rank in one epoch; two copies on two ranks
  pass unseen, and the per-sample noise, masks and precomputed tables are keyed by the key;
* **duplicate samples**: the same latent and text embedding (bytes, shape, dtype) under different
  keys (a clip cached twice). The same latent with other text is listed as a warning only (several
  captions per clip is a valid layout);
* **kinds**: more than one latent or embedding shape/dtype in the set (each loader worker keeps the
  first kind it sees and skips the others; with ``data.crop_frames`` the latent length counts as
  cropped), listed by key and shard, and clips shorter than ``data.crop_frames`` (skipped);
* **runs of bad samples** as long as ``data.max_consecutive_skips`` inside one shard (a worker
  that meets one stops the run);
* **the epoch-mode split** (``data.resampled=false``) over ``world_size`` ranks: each
  (rank, worker) stream of the first ``epochs`` epochs is replayed exactly as the loader runs it
  (seeded shard order, seeded shuffle buffer, first-kind rule, crop check, consecutive-skip
  limit), giving samples, full batches and skips per rank, and whether the stream stops the run
  (``TooManySkipsError`` in a worker, ``NoGoodSampleError`` for a rank, or two epochs in a row
  without a batch, where the training loop gives up). One empty epoch is a warning: that rank
  moves on to its next epoch. A resampled stream draws shards at random and has no split.

It prints a summary and exits 0 when nothing is wrong, 1 when something is (each problem is
listed), 2 when the check itself could not run (a config error, no shard found), so a launch
script can gate on it. ``report=`` writes everything as JSON (atomically). Shards are read by
``jobs`` processes (0 = one per CPU, at most one per shard); URLs (``http://``, ``s3://``,
``pipe:``) are read with webdataset's streaming opener, like the loader.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch

from interpdiff.config import ConfigError, parse_cli
from interpdiff.io import atomic_write_text
from interpdiff.video.data import (LatentDataConfig, ShardSource, _is_url, _tar_members, decode_latent_sample,
                                   resolve_shards, stable_seed, stream_kinds)


@dataclass
class TrainBatch:
    batch_size: int = 0  # a training config's train.batch_size, which the entry scripts give the loader (0 = unset)


@dataclass
class CheckShardsConfig:
    # the loader settings, as in a training config's data section (shards, batch_size, num_workers,
    # resampled, shuffle_*, seed, crop_frames, latent_shape, embed_shape, partial_batches,
    # max_consecutive_skips); data.rank / data.world_size are not used
    data: LatentDataConfig = field(default_factory=LatentDataConfig)
    # the training entry scripts replace data.batch_size with train.batch_size; set, it wins here too
    train: TrainBatch = field(default_factory=TrainBatch)
    world_size: int = 1  # ranks of the epoch-mode split
    epochs: int = 2  # epochs replayed (the shard order is reshuffled per epoch)
    jobs: int = 0  # processes reading shards (0 = one per CPU)
    report: str = ""  # optional JSON report path
    show: int = 10  # entries of each list printed (the JSON report has all)

    def validate(self) -> None:
        self.data.validate()
        for name in ("world_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.jobs < 0 or self.show < 0 or self.train.batch_size < 0:
            raise ValueError(f"jobs ({self.jobs}), show ({self.show}) and train.batch_size ({self.train.batch_size}) "
                             f"must be >= 0")
        if self.report and os.path.isdir(self.report):
            raise ValueError(f"report={self.report!r} is a folder; expected a file path for the JSON report")

    def loader(self) -> LatentDataConfig:
        """The loader settings the training run uses: ``data`` with ``train.batch_size`` when set."""
        if self.train.batch_size > 0:
            return dataclasses.replace(self.data, batch_size=self.train.batch_size)
        return self.data


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def tensor_digest(t: torch.Tensor) -> str:
    """Content hash of a tensor: dtype, shape and bytes (16 hex digits)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _message(exn: BaseException, url: str) -> str:
    """One line; the shard is named by the report's ``shard`` field, not repeated here."""
    msg = " ".join(str(exn.args[0] if exn.args else exn).split())
    msg = msg.replace(f" in {url!r}", "").replace(f"{url}: ", "")
    return f"{type(exn).__name__}: {msg}"


class _Recorder:
    """webdataset ``handler`` of the tar stage: records each error in stream order and goes on
    (the loader's counter skips them at the same points)."""

    def __init__(self, url: str, events: list):
        self.url, self.events = url, events
        self.truncated = False
        self.dup_keys: set[str] = set()

    def __call__(self, exn: BaseException) -> bool:
        from webdataset.tariterators import base_plus_ext

        msg = _message(exn, self.url)
        if "truncated tar shard" in msg or "unexpected end of data" in msg.lower():
            self.truncated = True
        if "duplicate file name in tar file" in msg:  # a key stored twice in a row: merged by group_by_keys
            key = base_plus_ext(str(exn.args[0]).split(":", 1)[0])[0]
            if key:
                self.dup_keys.add(key)
        self.events.append(["error", msg])
        return True


def scan_shard(url: str, latent_shape: list[int] | None = None, embed_shape: list[int] | None = None) -> dict:
    """Read one shard as the loader does. ``events`` is the stream in order: ``["error", message]``
    for what the tar stage skips, ``["sample", key, latent digest, embed digest, latent kind,
    embed kind, decode error]`` per sample (kinds ``[shape, dtype]``; the error is ``None`` or the
    message the loader's decoder would skip it with, and then the rest is ``None``)."""
    from webdataset.tariterators import group_by_keys

    events: list[list[Any]] = []
    rec = _Recorder(url, events)
    for raw in group_by_keys(_tar_members(iter([{"url": url}]), rec), handler=rec):
        key = raw.get("__key__", "?")
        try:
            s = decode_latent_sample(raw, latent_shape, embed_shape)
        except Exception as exn:  # the loader skips these; here each is named
            msg = _message(exn, url)
            if repr(key) not in msg and f"{key}." not in msg:
                msg = f"sample {key!r}: {msg}"
            events.append(["sample", key, None, None, None, None, msg])
            continue
        lat, emb = s["latent"], s["embed"]
        events.append(["sample", key, tensor_digest(lat), tensor_digest(emb),
                       [list(lat.shape), str(lat.dtype).removeprefix("torch.")],
                       [list(emb.shape), str(emb.dtype).removeprefix("torch.")], None])
    local = not _is_url(url) and os.path.isfile(url)
    return {"url": url, "bytes": os.path.getsize(url) if local else None, "events": events,
            "truncated": rec.truncated, "truncation_checked": local, "dup_keys": sorted(rec.dup_keys)}


def _scan_args(args: tuple) -> dict:
    return scan_shard(*args)


# ---------------------------------------------------------------------------------------------
# The loader, replayed
# ---------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def replay_worker(events_by_shard: list[list], data: LatentDataConfig, rank: int, worker: int, epoch: int) -> dict:
    """One (rank, worker) pass of ``LatentShardDataset`` in epoch mode, on recorded events: the same
    skip points, shuffle buffer (same seed), crop check, first-kind rule and consecutive-skip limit.
    Returns ``{"samples", "skipped", "stopped"}`` (``stopped``: the error that ends the run, or None)."""
    import webdataset as wds

    n = {"skipped": 0, "run": 0, "good": 0}
    last = [""]

    def skip(msg: str) -> None:
        n["skipped"] += 1
        n["run"] += 1
        last[0] = msg
        if data.max_consecutive_skips > 0 and n["run"] >= data.max_consecutive_skips:
            raise _Stop(f"TooManySkipsError: worker {worker} skipped {n['run']} samples in a row "
                        f"(data.max_consecutive_skips={data.max_consecutive_skips}); last: {msg}")

    def stream():
        for events in events_by_shard:
            for ev in events:
                if ev[0] == "error":
                    skip(ev[1])
                else:
                    yield ev

    it = stream()
    if data.shuffle_buffer > 1:
        rng = random.Random(stable_seed(data.seed, rank, worker, epoch, 0, "shuffle"))
        it = wds.shuffle(data.shuffle_buffer, initial=min(data.shuffle_initial, data.shuffle_buffer), rng=rng)(it)
    ref: dict[str, tuple] = {}
    try:
        for _, key, _, _, lat_kind, emb_kind, err in it:
            if err is not None:
                skip(err)
                continue
            if data.crop_frames > lat_kind[0][1]:
                skip(f"sample {key!r}: crop of {data.crop_frames} latent frames requested but the sample has only "
                     f"{lat_kind[0][1]}")
                continue
            kinds = stream_kinds(*lat_kind, *emb_kind, data.crop_frames)
            bad = [k for k, v in kinds.items() if ref.setdefault(k, v) != v]
            if bad:
                skip(f"sample {key!r}: {bad[0]} {list(kinds[bad[0]][0])} {kinds[bad[0]][1]} differs from this "
                     f"stream's first")
                continue
            n["run"] = 0
            n["good"] += 1
    except _Stop as e:
        return {"samples": n["good"], "skipped": n["skipped"], "stopped": str(e), "last": last[0]}
    return {"samples": n["good"], "skipped": n["skipped"], "stopped": None, "last": last[0]}


def epoch_split(shards: list[str], events: dict[str, list], cfg: CheckShardsConfig, epoch: int) -> list[dict]:
    """Per rank of one epoch: shards, good samples, full batches, skips and what stops the run."""
    d = cfg.loader()
    workers = max(d.num_workers, 1)  # num_workers=0 reads in the main process: one stream
    out = []
    for rank in range(cfg.world_size):
        src = ShardSource(shards, rank, cfg.world_size, resampled=False, seed=d.seed, shuffle_shards=d.shuffle_shards)
        src.epoch = epoch
        per = [replay_worker([events[u] for u in src.shards_for(w, workers)], d, rank, w, epoch)
               for w in range(workers)]
        stopped = next((p["stopped"] for p in per if p["stopped"]), None)
        good, skipped = sum(p["samples"] for p in per), sum(p["skipped"] for p in per)
        if stopped is None and good == 0 and skipped > 0:
            last = next((p["last"] for p in per if p["last"]), "")
            stopped = f"NoGoodSampleError: all {skipped} samples of the pass skipped; last: {last}"
        full = sum(p["samples"] // d.batch_size for p in per)
        partial = sum(1 for p in per if p["samples"] % d.batch_size) if d.partial_batches else 0
        out.append({"rank": rank, "shards": len(src.shards_for(0, 1)), "samples": good, "skipped": skipped,
                    "batches": full + partial, "stopped": stopped})
    return out


# ---------------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------------


def check(cfg: CheckShardsConfig, progress: bool = True) -> dict:
    """Scan the set and return the report (see the module docstring): ``report["problems"]`` and
    ``report["warnings"]`` list the findings, one line each."""
    cfg.validate()
    shards = resolve_shards(cfg.data.shards)
    if not cfg.data.resampled and cfg.world_size > len(shards):
        raise ValueError(f"{len(shards)} shards cannot be split over world_size={cfg.world_size} ranks in epoch "
                         f"mode (each rank needs at least one); the training loader refuses this too "
                         f"(use more shards or data.resampled=true)")
    jobs = min(cfg.jobs or os.cpu_count() or 1, len(shards))
    args = [(u, cfg.data.latent_shape, cfg.data.embed_shape) for u in shards]
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


def _longest_bad_run(events: list) -> int:
    best = run = 0
    for ev in events:
        run = run + 1 if ev[0] == "error" or ev[-1] is not None else 0
        best = max(best, run)
    return best


def summarize(shards: list[str], results: list[dict], cfg: CheckShardsConfig) -> dict:
    d = cfg.loader()
    problems: list[str] = []
    warnings: list[str] = []
    where: dict[str, list[str]] = defaultdict(list)  # key -> shard per stored copy
    by_content: dict[tuple, list[str]] = defaultdict(list)  # (latent, embed digest) -> keys
    by_latent: dict[str, set[tuple]] = defaultdict(set)  # latent digest -> (embed digest, key)
    kinds: dict[str, dict[tuple, list]] = {"latent": defaultdict(list), "embed": defaultdict(list)}
    short: list[dict] = []
    unreadable: list[dict] = []
    long_runs: list[dict] = []
    for r in results:
        url = r["url"]
        for key in r["dup_keys"]:
            where[key].append(url)  # the merged copy (the first one is counted below)
        for ev in r["events"]:
            if ev[0] == "error":
                unreadable.append({"shard": url, "error": ev[1]})
                continue
            _, key, dlat, demb, lat_kind, emb_kind, err = ev
            if err is not None:
                unreadable.append({"shard": url, "error": err})
                continue
            where[key].append(url)
            by_content[(dlat, demb)].append(key)
            by_latent[dlat].add((demb, key))
            if d.crop_frames > lat_kind[0][1]:
                short.append({"key": key, "shard": url, "frames": lat_kind[0][1]})
                continue
            for name, kind in stream_kinds(*lat_kind, *emb_kind, d.crop_frames).items():
                kinds[name][kind].append([key, url])
        run = _longest_bad_run(r["events"])
        if d.max_consecutive_skips > 0 and run >= d.max_consecutive_skips:
            long_runs.append({"shard": url, "run": run})
    samples = sum(len(v) for v in kinds["latent"].values()) + len(short)
    truncated = [r["url"] for r in results if r["truncated"]]
    unchecked = [r["url"] for r in results if not r["truncation_checked"]]
    empty = [r["url"] for r in results if not any(ev[0] == "sample" and ev[-1] is None for ev in r["events"])]
    dup_keys = {k: v for k, v in where.items() if len(v) > 1}
    dup_samples = sorted(sorted(set(keys)) for keys in by_content.values() if len(set(keys)) > 1)
    shared_latent = sorted(sorted(k for _, k in v) for v in by_latent.values() if len({e for e, _ in v}) > 1)
    kind_rows = {name: [{"shape": list(s), "dtype": t, "count": len(v), "samples": v}
                        for (s, t), v in sorted(table.items(), key=lambda kv: -len(kv[1]))]
                 for name, table in kinds.items()}

    if unreadable:
        problems.append(f"{len(unreadable)} samples or members unreadable in {len({e['shard'] for e in unreadable})} "
                        f"shards (the loader skips them)")
    if truncated:
        problems.append(f"{len(truncated)} truncated shards (their last samples are missing)")
    if empty:
        problems.append(f"{len(empty)} shards hold no good sample")
    if dup_keys:
        problems.append(f"{len(dup_keys)} keys stored more than once (keys must be unique across the set)")
    if dup_samples:
        problems.append(f"{len(dup_samples)} samples stored under more than one key (same latent and text)")
    if shared_latent:
        warnings.append(f"{len(shared_latent)} latents stored with different text under several keys (several "
                        f"captions per clip?)")
    for name, rows in kind_rows.items():
        if len(rows) > 1:
            problems.append(f"{len(rows)} {name} kinds (shape, dtype) in one set; each loader worker keeps the first "
                            f"it meets and skips the others ({sum(r['count'] for r in rows[1:])} samples outside the "
                            f"most common; set data.{name}_shape to pick a shape)")
    if short:
        problems.append(f"{len(short)} clips shorter than data.crop_frames={d.crop_frames} (the loader skips them)")
    if long_runs:
        msg = (f"{len(long_runs)} shards hold a run of >= data.max_consecutive_skips={d.max_consecutive_skips} bad "
               f"samples in storage order: a worker that meets it in a row stops the run (the shuffle buffer can "
               f"break up samples that fail to decode, not unreadable members)")
        # epoch mode: the replay below says whether the checked epochs stop; a resampled stream may meet it any time
        (problems if d.resampled else warnings).append(msg)
    if unchecked:
        warnings.append(f"{len(unchecked)} URL shards: a stream cut between two members reads as a shorter shard "
                        f"(truncation is only checked for local files)")
    splits = [] if d.resampled else [epoch_split(shards, {r["url"]: r["events"] for r in results}, cfg, e)
                                     for e in range(cfg.epochs)]
    for e, split in enumerate(splits):
        for s in split:
            if s["stopped"]:
                problems.append(f"epoch {e}, rank {s['rank']}: the loader stops the run: {s['stopped']}")
            elif s["batches"] == 0:
                before = e > 0 and splits[e - 1][s["rank"]]["batches"] == 0 and not splits[e - 1][s["rank"]]["stopped"]
                msg = (f"epoch {e}, rank {s['rank']}: no batch of {d.batch_size} ({s['samples']} good samples over "
                       f"{max(d.num_workers, 1)} workers)")
                if before:
                    problems.append(f"{msg}, the second epoch in a row: the training loop stops there; use fewer "
                                    f"ranks/workers, a smaller batch, more shards or data.resampled=true")
                else:
                    warnings.append(f"{msg}: that rank goes on to its next epoch")
    return {
        "shards": len(shards),
        "bytes": sum(r["bytes"] or 0 for r in results),
        "bytes_unknown_shards": sum(r["bytes"] is None for r in results),
        "samples": samples,
        "crop_frames": d.crop_frames,
        "unreadable": unreadable,
        "truncated_shards": truncated,
        "empty_shards": empty,
        "duplicate_keys": dup_keys,
        "duplicate_samples": dup_samples,
        "shared_latents": shared_latent,
        "latent_kinds": kind_rows["latent"],
        "embed_kinds": kind_rows["embed"],
        "shorter_than_crop": short,
        "long_bad_runs": long_runs,
        "split": None if d.resampled else {"world_size": cfg.world_size, "num_workers": d.num_workers,
                                           "batch_size": d.batch_size, "seed": d.seed, "epochs": splits},
        "problems": problems,
        "warnings": warnings,
    }


def format_report(rep: dict, show: int = 10) -> str:
    size = f"{rep['bytes'] / 1e9:.2f} GB" + (f" (+ {rep['bytes_unknown_shards']} URL shards of unknown size)"
                                               if rep["bytes_unknown_shards"] else "")
    lines = [f"{rep['shards']} shards, {size}, {rep['samples']} good samples"]
    for name in ("latent_kinds", "embed_kinds"):
        kinds = ", ".join(f"{k['shape']} {k['dtype']} x{k['count']}" for k in rep[name])
        crop = f" (T as cropped to {rep['crop_frames']})" if name == "latent_kinds" and rep["crop_frames"] else ""
        lines.append(f"  {name.replace('_', ' ')}{crop}: {kinds or '-'}")
    sp = rep["split"]
    if sp is None:
        lines.append("  resampled stream: no per-rank split (each rank and worker draws shards at random)")
    else:
        for e, split in enumerate(sp["epochs"]):
            b, s = [x["batches"] for x in split], [x["samples"] for x in split]
            lines.append(f"  epoch {e} over {sp['world_size']} ranks x {max(sp['num_workers'], 1)} workers, batch "
                         f"{sp['batch_size']}: good samples per rank {min(s)}-{max(s)}, batches per rank "
                         f"{min(b)}-{max(b)}")

    def short(text: str, n: int = 300) -> str:
        return text if len(text) <= n else text[: n - 3] + "..."

    def listed(title: str, items: list[str]) -> None:
        if items:
            lines.append(f"{title} ({len(items)}):")
            lines.extend(f"  {short(x)}" for x in items[:show])
            if len(items) > show:
                lines.append(f"  ... {len(items) - show} more (report= writes all)")

    listed("unreadable", [f"{e['shard']}: {e['error']}" for e in rep["unreadable"]])
    listed("truncated shards", rep["truncated_shards"])
    listed("shards with no good sample", rep["empty_shards"])
    listed("duplicate keys", [f"{k}: {len(v)} copies in {sorted(set(v))}" for k, v in rep["duplicate_keys"].items()])
    listed("one sample under several keys", [", ".join(keys) for keys in rep["duplicate_samples"]])
    listed("one latent, other text, under several keys", [", ".join(keys) for keys in rep["shared_latents"]])
    for name in ("latent_kinds", "embed_kinds"):
        listed(f"{name.split('_')[0]}s outside the most common kind",
               [f"{key} in {shard}: {k['shape']} {k['dtype']}" for k in rep[name][1:] for key, shard in k["samples"]])
    listed("shorter than crop_frames", [f"{s['key']} ({s['frames']} frames) in {s['shard']}"
                                        for s in rep["shorter_than_crop"]])
    listed("runs of bad samples", [f"{r['shard']}: {r['run']} in a row" for r in rep["long_bad_runs"]])
    if rep["warnings"]:
        lines.append("WARNINGS:")
        lines.extend(f"  - {short(w)}" for w in rep["warnings"][: max(show, 1) * 4])
    if rep["problems"]:
        lines.append("PROBLEMS:")
        lines.extend(f"  - {short(p)}" for p in rep["problems"][: max(show, 1) * 4])
    else:
        lines.append("OK: no problem found")
    return "\n".join(lines)


_OWN_KEYS = ("data", "world_size", "epochs", "jobs", "report", "show")


def _training_data_section(loaded):
    """What this tool reads of a YAML file: its own keys. Of a training config (a file with a
    ``train`` or ``model`` section) that is the ``data`` section without ``data.batch_size``, which
    the entry scripts replace, and ``train.batch_size``, which they use."""
    from omegaconf import DictConfig, OmegaConf

    for name in ("data", "train"):
        if name in loaded and not isinstance(loaded[name], DictConfig):
            raise ConfigError(f"the {name} section must be a mapping of keys, got {loaded[name]!r}")
    out = {k: loaded[k] for k in _OWN_KEYS if k in loaded}
    if "train" in loaded or "model" in loaded:
        if "data" in out and "batch_size" in out["data"]:
            data = OmegaConf.to_container(out["data"], resolve=False)
            data.pop("batch_size")
            out["data"] = data
        if "train" in loaded and "batch_size" in loaded["train"]:
            out["train"] = {"batch_size": loaded["train"]["batch_size"]}
    return OmegaConf.create(out)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 nothing wrong, 1 problems found, 2 the check could not run."""
    try:
        cfg = parse_cli(CheckShardsConfig, sys.argv[1:] if argv is None else argv, select=_training_data_section)
        rep = check(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"check_shards: {e}", file=sys.stderr)
        return 2
    print(format_report(rep, cfg.show))
    if cfg.report:
        rep = dict(rep, config=dataclasses.asdict(cfg))
        try:
            atomic_write_text(cfg.report, json.dumps(rep, indent=1))
        except OSError as e:
            print(f"check_shards: cannot write report={cfg.report!r}: {e}", file=sys.stderr)
            return 2
        print(f"report written to {cfg.report}")
    return 1 if rep["problems"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except BaseException:  # a crash is not "problems found"
        import traceback

        traceback.print_exc()
        sys.exit(2)
