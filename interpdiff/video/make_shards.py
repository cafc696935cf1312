"""Write synthetic shards in the Wan2.1-synthetic latent format (see ``interpdiff.video.data``).

    python -m interpdiff.video.make_shards out_dir=data/synth num_samples=64 samples_per_shard=16
    python -m interpdiff.video.make_shards out_dir=/tmp/tiny num_samples=8 samples_per_shard=4 \
        latent_shape=[16,5,4,6] embed_shape=[16,32]

Each sample: ``{key}.latent.pt`` bf16 ``latent_shape`` (default ``[16, 21, 60, 104]``),
``{key}.embed.pt`` bf16 ``embed_shape`` (default ``[512, 4096]``, zero past a random prompt
length, like UMT5 output), ``{key}.prompt.txt``. Latents are temporally smooth (linear
interpolation between a few random anchor frames plus small noise), so keyframe interpolation
has something to do; they are not meant to decode to real video. Shards are
``shard_000000.tar, ...``. Everything is seeded (``seed``): the same command writes the same bytes.

A rewrite does not leave a mix of two sets under the final names: the new shards are first written
to a hidden staging folder ``out_dir/.make_shards_staging-<pid>-<hex>/`` (same file system; one per run,
so runs appending different ranges to one folder do not meet), and only once every
one of them is written are they moved into place (``os.replace`` per file, which overwrites
existing shards of the same names); then shards of an earlier run numbered past the new set are
removed (they would be read with it), and the staging folder. A run killed (or failing, e.g. a
full disk) before the moves leaves the earlier set as it was; a staging folder left by a killed
run (whose process is gone) is removed by the next run. Only a kill during the moves themselves (milliseconds) can leave
part of each set (rerun the command). The staging needs the disk space of the new set
next to the old one. A write error (``OSError``, e.g. ``ENOSPC``) is re-raised naming the shard.
``start_index=k`` appends: the shards are numbered from ``k`` and hold samples
``k * samples_per_shard, ...`` (new keys and contents; the same bytes as one run writing every
shard, when the earlier run's last shard was full); no shard is removed then.
"""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from interpdiff.config import parse_cli
from interpdiff.io import atomic_write_bytes, fsync_dir
from interpdiff.video.data import encode_latent_sample

_WORDS = ("a man woman dog cat bird car walks runs jumps across through the beach street park field "
          "slowly quickly at sunset in the rain camera pans left right").split()


@dataclass
class MakeShardsConfig:
    out_dir: str = "???"
    num_samples: int = 64
    samples_per_shard: int = 16
    latent_shape: list[int] = field(default_factory=lambda: [16, 21, 60, 104])
    embed_shape: list[int] = field(default_factory=lambda: [512, 4096])
    anchors: int = 4  # random anchor frames per latent (smoothness)
    noise: float = 0.1
    seed: int = 0
    start_index: int = 0  # first shard index (to append to an existing set): shard start_index + s holds
    #                       samples (start_index + s) * samples_per_shard + j, so keys and contents are new

    def validate(self) -> None:
        if self.num_samples < 1 or self.samples_per_shard < 1:
            raise ValueError(f"num_samples ({self.num_samples}) and samples_per_shard ({self.samples_per_shard}) "
                             f"must be >= 1")
        if self.start_index < 0:
            raise ValueError(f"start_index must be >= 0, got {self.start_index}")
        if len(self.latent_shape) != 4 or min(self.latent_shape) < 1:
            raise ValueError(f"latent_shape must be [C, T, H, W] with positive sizes, got {self.latent_shape}")
        if len(self.embed_shape) != 2 or min(self.embed_shape) < 1:
            raise ValueError(f"embed_shape must be [L, D] with positive sizes, got {self.embed_shape}")


def synthetic_sample(index: int, cfg: MakeShardsConfig) -> tuple[str, torch.Tensor, torch.Tensor, str]:
    """-> ``(key, lat_C_T_H_W bf16, emb_L_D bf16, prompt)`` for sample ``index`` (seeded)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + index)
    c, t, h, w = cfg.latent_shape
    k = max(2, min(cfg.anchors, t))
    anchor_t = torch.linspace(0, t - 1, k)
    anchors_K_C_H_W = torch.randn(k, c, h, w, generator=g)
    pos = torch.arange(t, dtype=torch.float32)
    right = torch.searchsorted(anchor_t, pos, right=True).clamp(1, k - 1)
    left = right - 1
    gap = (anchor_t[right] - anchor_t[left]).clamp_min(1e-12)  # T = 1: every anchor at frame 0 (0/0 otherwise)
    wgt = ((pos - anchor_t[left]) / gap).view(t, 1, 1, 1)
    lat_T_C_H_W = anchors_K_C_H_W[left] * (1 - wgt) + anchors_K_C_H_W[right] * wgt
    lat_T_C_H_W = lat_T_C_H_W + cfg.noise * torch.randn(t, c, h, w, generator=g)
    lat = lat_T_C_H_W.permute(1, 0, 2, 3).contiguous().to(torch.bfloat16)
    L, D = cfg.embed_shape
    n_tok = int(torch.randint(1, L + 1, (1,), generator=g))
    emb = torch.zeros(L, D, dtype=torch.bfloat16)
    emb[:n_tok] = (0.1 * torch.randn(n_tok, D, generator=g)).to(torch.bfloat16)
    rnd = random.Random(cfg.seed * 1_000_003 + index)
    prompt = " ".join(rnd.choice(_WORDS) for _ in range(rnd.randint(3, 12)))
    return f"sample_{index:09d}", lat, emb, prompt


def write_shard(path: Path, samples: list[dict]) -> Path:
    """Write webdataset samples (dicts of bytes) to ``path`` atomically."""
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf) as tw:
        for s in samples:
            tw.write(s)
    return atomic_write_bytes(path, buf.getvalue())


STAGING = ".make_shards_staging"  # hidden folder inside out_dir holding a set being written


def _alive(staging: Path) -> bool:
    """Whether the run that owns a staging folder (``<STAGING>-<pid>-<hex>``) is still running here."""
    m = re.fullmatch(re.escape(STAGING) + r"-(\d+)-[0-9a-f]+", staging.name)
    if not m:
        return False
    try:
        os.kill(int(m.group(1)), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_shards(cfg: MakeShardsConfig) -> list[Path]:
    """Write the set (module doc: staged, then moved into place); returns the final shard paths."""
    cfg.validate()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for left in out.glob(f"{STAGING}*"):  # left by a run killed before its moves: never part of the set
        if not _alive(left):  # (another run writing into this folder right now keeps its own)
            print(f"make_shards: removing {left} (left by an interrupted run)")
            shutil.rmtree(left, ignore_errors=True)
    staging = out / f"{STAGING}-{os.getpid()}-{os.urandom(3).hex()}"
    staging.mkdir()
    n_shards = -(-cfg.num_samples // cfg.samples_per_shard)
    first = cfg.start_index * cfg.samples_per_shard  # appended shards continue the sample numbering
    names = [f"shard_{cfg.start_index + s:06d}.tar" for s in range(n_shards)]
    try:
        for s, name in enumerate(names):
            lo = first + s * cfg.samples_per_shard
            hi = first + min(cfg.num_samples, (s + 1) * cfg.samples_per_shard)
            samples = [encode_latent_sample(*synthetic_sample(i, cfg)) for i in range(lo, hi)]
            try:
                write_shard(staging / name, samples)
            except OSError as e:
                msg = (f"make_shards: could not write shard {out / name} (staged as {staging / name}): "
                       f"{e.strerror or e}; the shards already in {out} are unchanged")
                raise (OSError(e.errno, msg) if e.errno is not None else OSError(msg)) from e
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # best effort (a SIGKILL leaves it to the next run)
        raise
    paths = []
    for name in names:  # every shard is written: move the set into place
        os.replace(staging / name, out / name)
        paths.append(out / name)
    fsync_dir(out)
    if cfg.start_index == 0:  # a new set: shards of an earlier, larger run would be read with it
        stale = sorted(p for p in out.glob("shard_*.tar")
                       if re.fullmatch(r"shard_\d{6,}\.tar", p.name) and int(p.name[6:-4]) >= n_shards)
        for p in stale:
            p.unlink()
        if stale:
            print(f"make_shards: removed {len(stale)} shards of an earlier run beyond this set ({stale[0].name} ... "
                  f"{stale[-1].name}); use start_index= to append instead")
    shutil.rmtree(staging, ignore_errors=True)
    return paths


def main(argv: list[str] | None = None) -> list[Path]:
    cfg = parse_cli(MakeShardsConfig, sys.argv[1:] if argv is None else argv)
    paths = make_shards(cfg)
    print(f"wrote {cfg.num_samples} samples in {len(paths)} shards to {cfg.out_dir}")
    return paths


if __name__ == "__main__":
    main()
