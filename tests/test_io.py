import os

import pytest
import torch

from interpdiff.io import CheckpointError, atomic_torch_save, atomic_write_text, load_checkpoint, save_checkpoint


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("cannot pickle")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "ck.pt"
    atomic_torch_save({"a": 1}, p)
    with pytest.raises(RuntimeError):
        atomic_torch_save({"a": Unpicklable()}, p)
    assert torch.load(p) == {"a": 1}
    assert [f.name for f in tmp_path.iterdir()] == ["ck.pt"]  # no temp file left behind
    atomic_write_text(tmp_path / "sub" / "x.txt", "hi")
    assert (tmp_path / "sub" / "x.txt").read_text() == "hi"


def test_checkpoint_round_trip_and_errors(tmp_path):
    p = save_checkpoint(tmp_path / "m.pt", {"w": torch.ones(2)}, {"d_model": 8})
    ck = load_checkpoint(p, required_meta=["d_model"])
    assert ck["meta"]["d_model"] == 8 and "code_version" in ck["meta"]
    assert torch.equal(ck["state"]["w"], torch.ones(2))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "none.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="lacks metadata keys \\['depth'\\]"):
        load_checkpoint(p, required_meta=["depth"])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"x": 1}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an interpdiff checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")


@pytest.mark.parametrize("umask,expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600), (0o027, 0o640)])
def test_atomic_write_mode_follows_umask(tmp_path, umask, expected):
    """An atomic write gets ``0o666 & ~umask`` like a plain ``open``, not mkstemp's 0o600 (reference:
    a file created with ``open`` under the same umask), also when it replaces an older file."""
    import os
    import stat

    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.bin", "wb") as f:
            f.write(b"x")
        ref = stat.S_IMODE(os.stat(tmp_path / "plain.bin").st_mode)
        atomic_write_text(tmp_path / "a.txt", "one")
        atomic_torch_save({"a": 1}, tmp_path / "a.txt")  # replace: the new file gets the mode too
        save_checkpoint(tmp_path / "ck" / "m.pt", {"w": torch.ones(1)}, {"d": 1})
    finally:
        os.umask(old)
    assert ref == expected
    assert stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode) == expected
    assert stat.S_IMODE(os.stat(tmp_path / "ck" / "m.pt").st_mode) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "ck", "plain.bin"]  # no temp left


def test_replace_dir_syncs_the_new_folder_before_the_rename_and_keeps_one_complete(tmp_path, monkeypatch):
    from interpdiff.video.wan import replace_dir

    dst = tmp_path / "lora"
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    src = tmp_path / ".tmp-lora"
    (src / "sub").mkdir(parents=True)
    (src / "a.safetensors").write_bytes(b"a" * 10)
    (src / "sub" / "b.json").write_text("{}")
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.fspath(b))), real_replace(a, b))[1])
    replace_dir(src, dst)
    assert sorted(p.name for p in dst.rglob("*")) == ["a.safetensors", "b.json", "sub"]
    assert not src.exists() and [p.name for p in tmp_path.iterdir()] == ["lora"]  # the old folder is gone
    i_pub = events.index(("replace", str(dst)))
    synced = {v for k, v in events[:i_pub] if k == "fsync"}
    assert {str(src / "a.safetensors"), str(src / "sub" / "b.json"), str(src / "sub"), str(src)} <= synced
    assert ("fsync", str(tmp_path)) in events[i_pub:]
