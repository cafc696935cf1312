"""Interrupted shard writers: make_shards (a rewrite never leaves a mix of two sets) and
precompute_cache (a shard interrupted before its manifest is redone, not taken for a legacy one).
Kills are simulated by raising inside the N-th write."""

import errno
import os
import json
import tarfile

import numpy as np
import pytest
import torch

from interpdiff.video import make_shards as ms
from interpdiff.video.make_shards import MakeShardsConfig, make_shards

torch.set_num_threads(1)

LAT = [4, 5, 2, 3]
EMB = [6, 8]


def _cfg(out, n, per, seed, **kw):
    return MakeShardsConfig(out_dir=str(out), num_samples=n, samples_per_shard=per, latent_shape=LAT, embed_shape=EMB,
                            seed=seed, **kw)


def _files(d):
    """Every file under ``d`` (hidden ones and subfolders too) -> its tar members' bytes (a tar
    header holds the write time, so the members are compared, not the file bytes)."""
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file():
            try:
                with tarfile.open(p) as tf:
                    out[str(p.relative_to(d))] = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
            except tarfile.TarError:
                out[str(p.relative_to(d))] = p.read_bytes()
    return out


def _keys(d):
    keys = []
    for p in sorted(d.glob("shard_*.tar")):
        with tarfile.open(p) as tf:
            keys += sorted({n.split(".")[0] for n in tf.getnames()})
    return keys


def _fail_on_call(monkeypatch, module, name, n, exc):
    """``module.name`` raises ``exc`` on its ``n``-th call (the earlier calls run for real)."""
    real, calls = getattr(module, name), []

    def wrapped(*a, **k):
        calls.append(a)
        if len(calls) == n:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def test_make_shards_killed_mid_rewrite_keeps_the_old_set_and_the_rerun_writes_the_new_one(tmp_path, monkeypatch):
    """A set of 4 shards (2 per shard, seed 0) rewritten as 3 shards (3 per shard, seed 1), killed in
    the 2nd shard write: the old set must be byte-for-byte intact (the old code had moved the new
    shard_000000 into place already: old + new samples read together, some keys twice with other
    contents). The rerun then writes exactly the set a fresh folder gets, and no staging folder."""
    d = tmp_path / "d"
    make_shards(_cfg(d, 8, 2, seed=0))
    old = _files(d)
    assert sorted(old) == [f"shard_{s:06d}.tar" for s in range(4)]
    _fail_on_call(monkeypatch, ms, "write_shard", 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        make_shards(_cfg(d, 8, 3, seed=1))
    assert _files(d) == old
    monkeypatch.undo()
    make_shards(_cfg(d, 8, 3, seed=1))
    make_shards(_cfg(tmp_path / "ref", 8, 3, seed=1))
    assert _files(d) == _files(tmp_path / "ref")
    assert sorted(_files(d)) == [f"shard_{s:06d}.tar" for s in range(3)]
    assert _keys(d) == [f"sample_{i:09d}" for i in range(8)]


def test_make_shards_removes_a_staging_folder_left_by_a_killed_run(tmp_path):
    """A SIGKILL cannot clean up: the staging folder (with a half-written shard) stays, never read
    by the shard glob, and the next run removes it."""
    d = tmp_path / "d"
    make_shards(_cfg(d, 4, 2, seed=0))
    old = _files(d)
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    staging = d / f"{ms.STAGING}-{int(dead.stdout)}-abc123"  # its process has exited
    staging.mkdir()
    (staging / "shard_000000.tar").write_bytes(b"half a shard")
    running = d / f"{ms.STAGING}-{os.getpid()}-def456"  # another run writing into this folder right now
    running.mkdir()
    assert sorted(p.name for p in d.glob("shard_*.tar")) == ["shard_000000.tar", "shard_000001.tar"]
    make_shards(_cfg(d, 4, 2, seed=0))
    assert _files(d) == old and not staging.exists() and running.is_dir()


def test_make_shards_disk_full_names_the_shard_and_keeps_the_old_set(tmp_path, monkeypatch):
    """ENOSPC in the 2nd shard's write: an OSError naming that shard (and keeping its errno), the
    earlier set intact, no staging folder left taking space."""
    d = tmp_path / "d"
    make_shards(_cfg(d, 6, 2, seed=0))
    old = _files(d)
    _fail_on_call(monkeypatch, ms, "atomic_write_bytes", 2, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match=r"shard_000001\.tar.*No space left on device") as e:
        make_shards(_cfg(d, 6, 3, seed=2))
    assert e.value.errno == errno.ENOSPC
    assert _files(d) == old


def test_make_shards_append_interrupted_adds_nothing(tmp_path, monkeypatch):
    """start_index appends: killed in its 2nd shard, the set is the earlier one (no half-appended set)."""
    d = tmp_path / "d"
    make_shards(_cfg(d, 4, 2, seed=1))
    old = _files(d)
    _fail_on_call(monkeypatch, ms, "write_shard", 2, SystemExit(1))
    with pytest.raises(SystemExit):
        make_shards(_cfg(d, 4, 2, seed=1, start_index=2))
    assert _files(d) == old
    monkeypatch.undo()
    make_shards(_cfg(d, 4, 2, seed=1, start_index=2))
    assert _keys(d) == [f"sample_{i:09d}" for i in range(8)]


# ------------------------------------------------------------------------------ precompute_cache


def _ramp_video(path, n_frames=8, h=48, w=64):
    import imageio

    wr = imageio.get_writer(str(path), fps=8, codec="libx264", quality=10, macro_block_size=16)
    for i in range(n_frames):
        wr.append_data(np.full((h, w, 3), 3 * i, np.uint8))
    wr.close()


@pytest.fixture(scope="module")
def tiny_comps():
    from interpdiff.video import wan

    return wan.load_wan("tiny", components=("vae", "text_encoder", "tokenizer"))


def _videos(tmp_path):
    root = tmp_path / "v"
    root.mkdir()
    for n in "ab":
        _ramp_video(root / f"{n}.mp4")
        (root / f"{n}.txt").write_text(f"prompt {n}")
    return root


def _precompute(root, out, comps, **kw):
    from interpdiff.video import didemo
    from interpdiff.video.precompute_cache import PrecomputeConfig, precompute

    base = dict(model="tiny", videos=str(root), out_dir=str(out), samples_per_shard=1, device="cpu", num_workers=0,
                max_length=8, batch_size=1,
                clip=didemo.ClipSpec(num_frames=5, height=16, width=16, clip_seconds=0.5, time_crop="center"))
    base.update(kw)
    return precompute(PrecomputeConfig(**base), comps)


def test_precompute_killed_between_shard_and_manifest_redoes_the_shard(tmp_path, monkeypatch, tiny_comps):
    """Killed after shard_000001.tar is in place but before its manifest: the rerun must redo that
    shard on its own (the module doc's promise), not stop asking for legacy_shards=adopt/redo as for
    a shard of an older version. A shard with no manifest at all still gets that error."""
    from interpdiff.video import precompute_cache as pc

    root, out = _videos(tmp_path), tmp_path / "cache"
    real = pc.atomic_write_text

    def killed(path, text, *a, **k):
        if path.name == "shard_000001.json" and (out / "shard_000001.tar").is_file():
            raise KeyboardInterrupt  # the shard is written, its (final) manifest not
        return real(path, text, *a, **k)

    monkeypatch.setattr(pc, "atomic_write_text", killed)
    with pytest.raises(KeyboardInterrupt):
        _precompute(root, out, tiny_comps)
    monkeypatch.undo()
    assert (out / "shard_000001.tar").is_file() and (out / "shard_000000.json").is_file()
    c = _precompute(root, out, tiny_comps)  # legacy_shards="error" (the default)
    assert (c["skipped_shards"], c["stale_shards"], c["written"]) == (1, 1, 1)
    man = json.loads((out / "shard_000001.json").read_text())
    assert "complete" not in man and [i[0] for i in man["items"]] == ["b"]
    c = _precompute(root, out, tiny_comps)
    assert (c["skipped_shards"], c["stale_shards"], c["written"]) == (2, 0, 0)
    (out / "shard_000000.json").unlink()  # a genuinely legacy shard: the legacy_shards choice stays
    with pytest.raises(ValueError, match=r"shard_000000\.tar.*legacy_shards=adopt"):
        _precompute(root, out, tiny_comps)


def test_precompute_killed_while_rewriting_a_stale_shard_redoes_it(tmp_path, monkeypatch, tiny_comps):
    """A rerun with another setting killed inside its first shard write: whatever is on disk for
    shard 0 (old shard or none, manifest marked incomplete) is redone by the next run without asking;
    an incomplete manifest left past the last shard is removed with a smaller item list."""
    from interpdiff.video import precompute_cache as pc

    root, out = _videos(tmp_path), tmp_path / "cache"
    _precompute(root, out, tiny_comps)
    _fail_on_call(monkeypatch, pc, "write_shard", 1, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        _precompute(root, out, tiny_comps, max_length=6)
    monkeypatch.undo()
    c = _precompute(root, out, tiny_comps, max_length=6)  # shard 0: gone (redone), shard 1: stale (other setting)
    assert (c["stale_shards"], c["written"], c["skipped_shards"]) == (1, 2, 0)
    assert json.loads((out / "shard_000000.json").read_text())["content"]["max_length"] == 6
    _fail_on_call(monkeypatch, pc, "write_shard", 2, KeyboardInterrupt())  # shard 1's write, max_length=4
    with pytest.raises(KeyboardInterrupt):
        _precompute(root, out, tiny_comps, max_length=4)
    monkeypatch.undo()
    assert json.loads((out / "shard_000001.json").read_text())["complete"] is False
    c = _precompute(root, out, tiny_comps, max_length=4, max_items=1)
    assert c["stale_shards"] == 1 and sorted(p.name for p in out.glob("shard_*")) == ["shard_000000.json",
                                                                                     "shard_000000.tar"]


def test_precompute_disk_full_names_the_shard_and_the_rerun_redoes_it(tmp_path, monkeypatch, tiny_comps):
    from interpdiff.video import precompute_cache as pc

    root, out = _videos(tmp_path), tmp_path / "cache"
    _fail_on_call(monkeypatch, pc, "write_shard", 2, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match=r"shard_000001\.tar: No space left on device") as e:
        _precompute(root, out, tiny_comps)
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    c = _precompute(root, out, tiny_comps)
    assert (c["skipped_shards"], c["written"]) == (1, 1) and (out / "shard_000001.tar").is_file()
