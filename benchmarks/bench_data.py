"""Latent-shard loader throughput at real Wan2.1 sizes (samples/s, MB/s).

    .venv/bin/python benchmarks/bench_data.py                       # 96 samples (~800 MB), workers 0 and 2
    .venv/bin/python benchmarks/bench_data.py num_samples=64 workers=[0,2,4] json_out=bench_data.json

Generates ``num_samples`` synthetic samples in the Wan2.1-synthetic format (latent bf16
``16x21x60x104`` = 4.2 MB + embed bf16 ``512x4096`` = 4.2 MB per sample) with ``make_shards`` into
a temporary folder (deleted afterwards), reads every file once to put it in the page cache, then
times one full epoch per setting:

* ``raw tar bytes``: ``tarfile`` streaming (``r|``) read of every member, no decoding;
* ``tarfile + torch.load``: a plain loop that also deserialises the tensors (no webdataset);
* ``wds.WebDataset + load``: webdataset's own streaming reader + ``torch.load`` (no shuffle);
* ``LatentLoader wN``: the training loader (seekable local tar reader, webdataset grouping,
  shuffle buffer, decode, shape checks, collation) with N DataLoader workers, batch size
  ``batch_size``.

Ratios are against ``tarfile + torch.load`` measured in the same run. Numbers are for hot page
cache on this machine; cold network/disk streaming is bounded by the storage instead.
"""

from __future__ import annotations

import io
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from interpdiff.config import parse_cli  # noqa: E402
from interpdiff.io import code_version  # noqa: E402
from interpdiff.video.data import LatentDataConfig, LatentLoader  # noqa: E402
from interpdiff.video.make_shards import MakeShardsConfig, make_shards  # noqa: E402


@dataclass
class BenchDataConfig:
    num_samples: int = 96
    samples_per_shard: int = 8
    latent_shape: list[int] = field(default_factory=lambda: [16, 21, 60, 104])
    embed_shape: list[int] = field(default_factory=lambda: [512, 4096])
    workers: list[int] = field(default_factory=lambda: [0, 2])
    batch_size: int = 1
    shuffle_buffer: int = 16
    repeats: int = 2  # epochs per setting; the best is reported
    tmp_dir: str = ""  # where shards go ("" = system temp)
    json_out: str = ""
    torch_threads: int = 1


def _epoch_raw(paths: list[Path], load: bool) -> tuple[int, int]:
    n, nbytes = 0, 0
    for p in paths:
        with tarfile.open(p, mode="r|") as tf:
            for m in tf:
                data = tf.extractfile(m).read()
                nbytes += len(data)
                if m.name.endswith(".pt"):
                    if load:
                        torch.load(io.BytesIO(data), weights_only=True)
                    if m.name.endswith(".latent.pt"):
                        n += 1
    return n, nbytes


def _epoch_wds(pattern: str) -> tuple[int, int]:
    """Plain webdataset: WebDataset(streaming tar reader) + torch.load of both tensors."""
    import webdataset as wds

    n, nbytes = 0, 0
    for s in wds.WebDataset(pattern, shardshuffle=False, empty_check=False):
        for k in ("latent.pt", "embed.pt"):
            nbytes += len(s[k])
            torch.load(io.BytesIO(s[k]), weights_only=True)
        n += 1
    return n, nbytes


def _epoch_loader(cfg: LatentDataConfig) -> tuple[int, int]:
    loader = LatentLoader(cfg)
    n, nbytes = 0, 0
    for b in loader:
        n += b.lat_B_C_T_H_W.shape[0]
        nbytes += b.lat_B_C_T_H_W.numel() * b.lat_B_C_T_H_W.element_size()
        nbytes += b.emb_B_L_D.numel() * b.emb_B_L_D.element_size()
    if loader.skipped:
        raise RuntimeError(f"loader skipped {loader.skipped} samples during the benchmark")
    return n, nbytes


def _best(fn, repeats: int) -> dict:
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        n, nbytes = fn()
        dt = time.perf_counter() - t0
        if best is None or dt < best["seconds"]:
            best = {"samples": n, "bytes": nbytes, "seconds": dt}
    best["samples_per_s"] = best["samples"] / best["seconds"]
    best["MB_per_s"] = best["bytes"] / best["seconds"] / 1e6
    return best


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(BenchDataConfig, sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(cfg.torch_threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_", dir=cfg.tmp_dir or None))
    try:
        t0 = time.perf_counter()
        paths = make_shards(MakeShardsConfig(out_dir=str(tmp), num_samples=cfg.num_samples,
                                             samples_per_shard=cfg.samples_per_shard, latent_shape=cfg.latent_shape,
                                             embed_shape=cfg.embed_shape))
        gen_s = time.perf_counter() - t0
        total_bytes = sum(p.stat().st_size for p in paths)
        for p in paths:  # page cache warm-up
            p.read_bytes()
        results: dict[str, dict] = {}
        results["raw tar bytes"] = _best(lambda: _epoch_raw(paths, load=False), cfg.repeats)
        results["tarfile + torch.load"] = _best(lambda: _epoch_raw(paths, load=True), cfg.repeats)
        results["wds.WebDataset + load"] = _best(
            lambda: _epoch_wds(str(tmp / f"shard_{{000000..{len(paths) - 1:06d}}}.tar")), cfg.repeats)
        for w in cfg.workers:
            dcfg = LatentDataConfig(shards=str(tmp / "shard_*.tar"), batch_size=cfg.batch_size, num_workers=w,
                                    resampled=False, shuffle_buffer=cfg.shuffle_buffer,
                                    shuffle_initial=min(4, cfg.shuffle_buffer), partial_batches=True,
                                    latent_shape=cfg.latent_shape, embed_shape=cfg.embed_shape)
            results[f"LatentLoader w{w}"] = _best(lambda: _epoch_loader(dcfg), cfg.repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base = results["tarfile + torch.load"]["samples_per_s"]
    for r in results.values():
        r["ratio_vs_tarfile_load"] = r["samples_per_s"] / base
    report = {
        "benchmark": "bench_data",
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": cfg.torch_threads,
                    "loadavg_1min": os.getloadavg()[0]},
        "code_version": code_version(),
        "shapes": {"latent": cfg.latent_shape, "embed": cfg.embed_shape, "dtype": "bfloat16"},
        "num_samples": cfg.num_samples,
        "samples_per_shard": cfg.samples_per_shard,
        "dataset_MB": total_bytes / 1e6,
        "generate_seconds": gen_s,
        "batch_size": cfg.batch_size,
        "shuffle_buffer": cfg.shuffle_buffer,
        "results": results,
    }
    print(f"bench_data  {report['date_utc']} UTC  {report['machine']['processor']}  cpus={os.cpu_count()}  "
          f"load {os.getloadavg()[0]:.1f}  torch {torch.__version__}  code {report['code_version']}")
    print(f"{cfg.num_samples} samples, latent {cfg.latent_shape} + embed {cfg.embed_shape} bf16, "
          f"{total_bytes / 1e6:.0f} MB in {len(paths)} shards (hot page cache), batch {cfg.batch_size}")
    print(f"{'setting':<24}{'samples/s':>12}{'MB/s':>10}{'seconds':>10}{'x tarfile+load':>16}")
    for name, r in results.items():
        print(f"{name:<24}{r['samples_per_s']:>12.1f}{r['MB_per_s']:>10.0f}{r['seconds']:>10.2f}"
              f"{r['ratio_vs_tarfile_load']:>16.2f}")
    print(json.dumps(report))
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
