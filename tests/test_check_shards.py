"""The shard-set check: every verdict against the training loader itself (``LatentLoader`` run per
rank in epoch mode: its good samples, batches, skips and the errors that stop it) or against the
set as written by hand (which keys were copied where, which samples are odd)."""

from __future__ import annotations

import json

import pytest
import torch

torch.set_num_threads(1)

from interpdiff.video import data as vdata  # noqa: E402
from interpdiff.video.check_shards import CheckShardsConfig, check, main, tensor_digest  # noqa: E402
from interpdiff.video.make_shards import MakeShardsConfig, main as make_shards_main, synthetic_sample, write_shard  # noqa: E402

LAT = [4, 5, 2, 3]
EMB = [6, 8]


def _make(tmp_path, n=12, per=3):
    d = tmp_path / "shards"
    make_shards_main([f"out_dir={d}", f"num_samples={n}", f"samples_per_shard={per}",
                      f"latent_shape=[{','.join(map(str, LAT))}]", f"embed_shape=[{','.join(map(str, EMB))}]"])
    return d, MakeShardsConfig(out_dir=str(d), num_samples=n, samples_per_shard=per, latent_shape=LAT, embed_shape=EMB)


def _data(d, **kw):
    base = dict(shards=str(d / "shard_*.tar"), resampled=False, num_workers=1, shuffle_buffer=0)
    base.update(kw)
    return vdata.LatentDataConfig(**base)


def _check(d, world_size=1, epochs=1, **kw):
    return check(CheckShardsConfig(data=_data(d, **kw), world_size=world_size, epochs=epochs, jobs=1), progress=False)


def _loader(d, world, epoch=0, **kw):
    """Per rank, from the training loader: batches, skips, good samples (a second pass with partial
    batches) and the error that stops it."""
    out = []
    for r in range(world):
        row = {}
        for partial in (False, True):
            loader = vdata.LatentLoader(_data(d, rank=r, world_size=world, **dict(kw, partial_batches=partial)))
            loader.dataset.epoch = epoch
            try:
                keys = [k for b in loader for k in b.keys]
            except (vdata.TooManySkipsError, RuntimeError) as e:  # NoGoodSampleError is a TooManySkipsError
                row["error"] = type(e).__name__
                break
            if partial:
                row["samples"] = len(keys)
            else:
                row["batches"] = len(keys) // kw.get("batch_size", 1)
                row["skipped"] = loader.skipped
        out.append(row)
    return out


def _replayed(split):
    return [{"error": s["stopped"].split(":")[0]} if s["stopped"] else
            {"batches": s["batches"], "skipped": s["skipped"], "samples": s["samples"]} for s in split]


def test_a_clean_set_passes(tmp_path):
    d, _ = _make(tmp_path, n=14, per=2)  # 7 shards
    rep = _check(d, world_size=3, num_workers=2, batch_size=2)
    assert rep["problems"] == [] and rep["warnings"] == [] and rep["samples"] == 14 and rep["shards"] == 7
    assert [(k["shape"], k["dtype"], k["count"]) for k in rep["latent_kinds"]] == [(LAT, "bfloat16", 14)]
    assert [(k["shape"], k["dtype"], k["count"]) for k in rep["embed_kinds"]] == [(EMB, "bfloat16", 14)]
    assert _replayed(rep["split"]["epochs"][0]) == _loader(d, 3, num_workers=2, batch_size=2)


@pytest.mark.parametrize("world,workers,batch,buf", [(2, 0, 2, 0), (3, 3, 2, 4), (2, 2, 3, 5), (1, 1, 4, 0)])
def test_the_split_is_the_loaders_over_two_epochs(tmp_path, world, workers, batch, buf):
    d, _ = _make(tmp_path, n=17, per=3)  # 6 shards, the last one short
    kw = dict(num_workers=workers, batch_size=batch, shuffle_buffer=buf, shuffle_initial=2)
    rep = _check(d, world_size=world, epochs=2, **kw)
    for e in range(2):
        assert _replayed(rep["split"]["epochs"][e]) == _loader(d, world, epoch=e, **kw), e


def test_odd_kinds_and_short_clips_replay_like_the_loader(tmp_path):
    """A short clip first in a stream, a sample of another shape and one of another dtype: the
    loader's first-kind rule and crop check decide per worker; the replay must agree."""
    d, cfg = _make(tmp_path, n=6, per=3)
    key, lat, emb, prompt = synthetic_sample(30, cfg)
    short = vdata.encode_latent_sample("clip_short", lat[:, :2], emb, prompt)
    wide = vdata.encode_latent_sample("clip_wide", torch.zeros(4, 5, 2, 4, dtype=torch.bfloat16), emb, prompt)
    fp32 = vdata.encode_latent_sample("clip_fp32", lat.float(), emb, prompt)
    write_shard(d / "shard_000000.tar", [short, wide, vdata.encode_latent_sample(*synthetic_sample(0, cfg))])
    write_shard(d / "shard_000002.tar", [fp32, vdata.encode_latent_sample(*synthetic_sample(31, cfg))])
    kw = dict(num_workers=1, batch_size=1, crop_frames=3, shuffle_shards=False)
    rep = _check(d, world_size=1, **kw)
    ref = _loader(d, 1, **kw)
    assert _replayed(rep["split"]["epochs"][0]) == ref
    # the loader: clip_short is skipped (too short) and does not fix the kind; clip_wide does, so the
    # normal clips of that stream are skipped after it
    assert ref[0]["skipped"] > 2
    kinds = {(tuple(k["shape"]), k["dtype"]): [key for key, _ in k["samples"]] for k in rep["latent_kinds"]}
    assert kinds[((4, 3, 2, 4), "bfloat16")] == ["clip_wide"] and kinds[((4, 3, 2, 3), "float32")] == ["clip_fp32"]
    assert len(kinds) == 3  # T as cropped; the short clip is listed as short, not as a kind
    assert rep["shorter_than_crop"] == [{"key": "clip_short", "shard": str(d / "shard_000000.tar"), "frames": 2}]
    text = "\n".join(rep["problems"])
    assert "3 latent kinds (shape, dtype)" in text and "crop_frames=3" in text
    # the loader's own message for the odd dtype names both kinds
    with pytest.raises(vdata.TooManySkipsError):
        list(vdata.LatentLoader(_data(d, **dict(kw, max_consecutive_skips=3))))


def test_the_shuffle_buffer_decides_which_kind_comes_first_as_in_the_loader(tmp_path):
    """One fp32 latent among bf16 ones (same shape) and one of another shape: which kind fixes a
    stream depends on the seeded shuffle buffer, so the skips differ per seed; the replay must
    give the loader's count for each."""
    d, cfg = _make(tmp_path, n=6, per=6)
    _, lat, emb, prompt = synthetic_sample(40, cfg)
    write_shard(d / "shard_000001.tar", [vdata.encode_latent_sample("clip_fp32", lat.float(), emb, prompt),
                                         vdata.encode_latent_sample("clip_wide", torch.zeros(4, 5, 2, 4,
                                                                    dtype=torch.bfloat16), emb, prompt)])
    outcomes = set()
    for seed in range(6):
        kw = dict(shuffle_buffer=8, shuffle_initial=8, seed=seed, shuffle_shards=False)
        ref = _loader(d, 1, **kw)
        assert _replayed(_check(d, **kw)["split"]["epochs"][0]) == ref, seed
        outcomes.add(ref[0]["skipped"])
    assert len(outcomes) > 1  # the order mattered


def test_short_clip_first_no_longer_fixes_the_loaders_kind(tmp_path):
    d, cfg = _make(tmp_path, n=4, per=4)
    key, lat, emb, prompt = synthetic_sample(9, cfg)
    write_shard(d / "shard_000000.tar", [vdata.encode_latent_sample("clip_short", lat[:, :2], emb, prompt),
                                         *[vdata.encode_latent_sample(*synthetic_sample(i, cfg)) for i in range(4)]])
    loader = vdata.LatentLoader(_data(d, crop_frames=3))
    assert len([k for b in loader for k in b.keys]) == 4 and loader.skipped == 1
    rep = _check(d, crop_frames=3)
    assert _replayed(rep["split"]["epochs"][0]) == [{"batches": 4, "skipped": 1, "samples": 4}]


def test_clips_of_any_length_batch_together_once_cropped(tmp_path):
    d, cfg = _make(tmp_path, n=2, per=2)
    clips = []
    for i, t in enumerate((5, 7, 6, 8)):
        key, lat, emb, prompt = synthetic_sample(50 + i, cfg)
        clips.append(vdata.encode_latent_sample(f"clip_T{t}", torch.cat([lat, lat], dim=1)[:, :t],
                                                emb, prompt))
    write_shard(d / "shard_000000.tar", clips)  # (the make_shards clips are T=5 too)
    kw = dict(crop_frames=3, latent_shape=[4, -1, 2, 3], batch_size=2)
    ref = _loader(d, 1, **kw)
    assert ref == [{"batches": 2, "skipped": 0, "samples": 4}]
    rep = _check(d, **kw)
    assert _replayed(rep["split"]["epochs"][0]) == ref and rep["problems"] == []
    assert [(k["shape"], k["count"]) for k in rep["latent_kinds"]] == [([4, 3, 2, 3], 4)]


def test_a_run_of_bad_samples_stops_the_loader_and_the_replay(tmp_path):
    d, cfg = _make(tmp_path, n=6, per=3)
    prompt_only = [{"__key__": f"bad_{i}", "prompt.txt": b"x"} for i in range(5)]
    write_shard(d / "shard_000001.tar", [vdata.encode_latent_sample(*synthetic_sample(3, cfg)), *prompt_only,
                                         vdata.encode_latent_sample(*synthetic_sample(4, cfg))])
    write_shard(d / "shard_000002.tar", [*prompt_only[:4], vdata.encode_latent_sample(*synthetic_sample(7, cfg)),
                                         *prompt_only[:4]])  # two runs of 4, a good sample between them
    for limit, stops in ((5, True), (6, False)):
        kw = dict(max_consecutive_skips=limit)
        rep = _check(d, **kw)
        ref = _loader(d, 1, **kw)
        assert _replayed(rep["split"]["epochs"][0]) == ref
        assert ("error" in ref[0]) == stops
        assert bool(rep["long_bad_runs"]) == stops
        assert any("TooManySkipsError" in p for p in rep["problems"]) == stops


def test_unreadable_and_truncated_samples_are_named(tmp_path):
    d, cfg = _make(tmp_path, n=6, per=3)
    good = vdata.encode_latent_sample(*synthetic_sample(20, cfg))
    no_embed = vdata.encode_latent_sample(*synthetic_sample(21, cfg))
    del no_embed["embed.pt"]
    garbage = vdata.encode_latent_sample(*synthetic_sample(22, cfg))
    garbage["latent.pt"] = b"not a torch file"
    key, lat, emb, prompt = synthetic_sample(23, cfg)
    lat.view(-1)[0] = float("nan")
    nan = vdata.encode_latent_sample(key, lat, emb, prompt)
    write_shard(d / "shard_000002.tar", [good, no_embed, garbage, nan])
    raw = (d / "shard_000001.tar").read_bytes()
    (d / "shard_000001.tar").write_bytes(raw[: len(raw) // 2])  # cut inside a member
    rep = _check(d)
    ref = _loader(d, 1)
    assert _replayed(rep["split"]["epochs"][0]) == ref and len(rep["unreadable"]) == ref[0]["skipped"]
    assert rep["truncated_shards"] == [str(d / "shard_000001.tar")]
    errors = {e["error"] for e in rep["unreadable"] if e["shard"].endswith("shard_000002.tar")}
    assert any("sample_000000021" in e and "embed.pt" in e for e in errors)
    assert any("sample_000000022.latent.pt: not a loadable torch tensor file" in e for e in errors)
    assert any("sample_000000023" in e and "non-finite" in e for e in errors)
    assert not any(str(d) in e for e in errors)  # the shard is the entry's own field, not repeated
    assert any("unreadable" in p for p in rep["problems"]) and any("truncated" in p for p in rep["problems"])


def test_keys_stored_twice_anywhere_are_found(tmp_path):
    d, cfg = _make(tmp_path, n=4, per=2)
    s0 = vdata.encode_latent_sample(*synthetic_sample(0, cfg))
    s9 = vdata.encode_latent_sample(*synthetic_sample(9, cfg))
    write_shard(d / "shard_000002.tar", [s0, s9, s9])  # sample 0 again (another shard), sample 9 twice in a row
    urls = vdata.resolve_shards(str(d / "shard_*.tar"))
    rank_of = {u: r for r in range(3) for u in vdata.ShardSource(urls, r, 3, resampled=False).shards_for(0, 1)}
    assert rank_of[str(d / "shard_000000.tar")] != rank_of[str(d / "shard_000002.tar")]  # the loader cannot see it
    rep = _check(d, world_size=3)
    assert rep["duplicate_keys"] == {"sample_000000000": [str(d / "shard_000000.tar"), str(d / "shard_000002.tar")],
                                     "sample_000000009": [str(d / "shard_000002.tar")] * 2}
    assert rep["duplicate_samples"] == []  # copies under the same key are duplicate keys, not samples
    assert any("2 keys stored more than once" in p for p in rep["problems"])


def test_one_sample_under_two_keys_is_a_problem_other_text_a_warning(tmp_path):
    d, cfg = _make(tmp_path, n=4, per=2)
    _, lat, emb, prompt = synthetic_sample(1, cfg)
    _, _, other_emb, _ = synthetic_sample(2, cfg)
    write_shard(d / "shard_000002.tar", [vdata.encode_latent_sample("copy_of_1", lat, emb, prompt),
                                         vdata.encode_latent_sample("caption_2_of_1", lat, other_emb, "another")])
    rep = _check(d)
    assert rep["duplicate_samples"] == [["copy_of_1", "sample_000000001"]]
    assert rep["shared_latents"] == [["caption_2_of_1", "copy_of_1", "sample_000000001"]]
    assert any("1 samples stored under more than one key" in p for p in rep["problems"])
    assert any("different text" in w for w in rep["warnings"]) and not any("different text" in p for p in rep["problems"])


def test_tensor_digest_sees_dtype_shape_and_every_bit():
    x = torch.randn(2, 3, 4).to(torch.bfloat16)
    assert tensor_digest(x) == tensor_digest(x.clone())
    y = x.clone()
    y.view(torch.int16).view(-1)[5] ^= 1  # one mantissa bit
    assert tensor_digest(y) != tensor_digest(x)
    assert tensor_digest(x.reshape(3, 2, 4)) != tensor_digest(x)
    assert tensor_digest(x.view(torch.float16)) != tensor_digest(x)
    assert tensor_digest(x.transpose(0, 1)) == tensor_digest(x.transpose(0, 1).contiguous())


def test_empty_epochs_warn_once_and_stop_the_second_time(tmp_path):
    d, _ = _make(tmp_path, n=6, per=3)  # 2 shards of 3
    assert _check(d, world_size=2, epochs=2, batch_size=3)["problems"] == []
    rep = _check(d, world_size=2, epochs=2, batch_size=4)
    assert [r["batches"] for r in _loader(d, 2, batch_size=4)] == [0, 0]
    assert [s["batches"] for e in rep["split"]["epochs"] for s in e] == [0, 0, 0, 0]
    assert len(rep["warnings"]) == 2 and all("goes on to its next epoch" in w for w in rep["warnings"])
    assert len(rep["problems"]) == 2 and all("the second epoch in a row" in p for p in rep["problems"])
    assert _check(d, world_size=2, epochs=1, batch_size=4)["problems"] == []  # one epoch: a warning only


def test_processes_give_the_same_report_and_bad_configs_are_named(tmp_path, capsys):
    d, _ = _make(tmp_path, n=9, per=2)
    one = _check(d, world_size=2)
    two = check(CheckShardsConfig(data=_data(d), world_size=2, epochs=1, jobs=2), progress=False)
    assert one == two
    with pytest.raises(ValueError, match="5 shards cannot be split over world_size=6"):
        _check(d, world_size=6)
    assert _check(d, world_size=6, resampled=True)["split"] is None  # a resampled stream has no split
    with pytest.raises(ValueError, match="latent_shape must be"):
        _check(d, latent_shape=[4, 5])
    assert main([f"data.shards={tmp_path}/nowhere_*.tar"]) == 2
    assert "match no shard" in capsys.readouterr().err


def test_cli_takes_a_training_configs_data_section_and_writes_json(tmp_path, capsys):
    d, cfg = _make(tmp_path, n=8, per=2)
    out = tmp_path / "rep" / "check.json"
    args = ["--config", "configs/video/tiny_cpu.yaml", f"data.shards={d}", "data.latent_shape=null", "jobs=1",
            f"report={out}"]
    assert main(args) == 0
    assert "OK: no problem found" in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["samples"] == 8 and rep["config"]["train"]["batch_size"] == 2  # train.batch_size of the YAML
    assert rep["config"]["data"]["num_workers"] == 0 and rep["split"]["batch_size"] == 2
    write_shard(d / "shard_000004.tar", [vdata.encode_latent_sample(*synthetic_sample(3, cfg))])
    assert main(args + ["show=0"]) == 1
    text = capsys.readouterr().out
    assert "duplicate keys (1):" in text and "PROBLEMS:" in text and "1 keys stored more than once" in text
    assert json.loads(out.read_text())["duplicate_keys"]["sample_000000003"]


def test_url_shards_are_read_and_their_truncation_is_said_to_be_unchecked(tmp_path):
    d, _ = _make(tmp_path, n=4, per=2)
    spec = ",".join(f"pipe:cat {p}" for p in sorted(d.glob("*.tar")))
    rep = check(CheckShardsConfig(data=vdata.LatentDataConfig(shards=spec, resampled=False), jobs=1, epochs=1),
                progress=False)
    assert rep["samples"] == 4 and rep["problems"] == [] and rep["bytes_unknown_shards"] == 2
    assert any("truncation is only checked for local files" in w for w in rep["warnings"])


def test_a_training_config_gives_the_batch_the_entry_scripts_use(tmp_path, capsys):
    d, _ = _make(tmp_path, n=8, per=2)
    shards = f"data.shards={d}"
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    (cfg_dir / "train_bs2.yaml").write_text("train:\n  batch_size: 2\n")
    (cfg_dir / "data_bs4.yaml").write_text("model:\n  path: tiny\ndata:\n  batch_size: 4\n  resampled: false\n")
    (cfg_dir / "check_bs3.yaml").write_text("data:\n  batch_size: 3\n  resampled: false\nworld_size: 2\n")
    (cfg_dir / "bad_train.yaml").write_text("train: 5\n")
    (cfg_dir / "null_data.yaml").write_text("data:\n")
    from interpdiff.config import parse_cli
    from interpdiff.video.check_shards import _training_data_section

    def batch(*files, extra=()):
        argv = [a for f in files for a in ("--config", str(cfg_dir / f))] + [shards, *extra]
        return parse_cli(CheckShardsConfig, argv, select=_training_data_section).loader().batch_size

    # the entry scripts: data.batch_size is replaced by train.batch_size (default 1)
    assert batch("data_bs4.yaml") == 1
    assert batch("train_bs2.yaml", "data_bs4.yaml") == 2
    assert batch("check_bs3.yaml") == 3  # a check's own file keeps data.batch_size
    assert batch("check_bs3.yaml", extra=["train.batch_size=5"]) == 5
    for bad, what in (("bad_train.yaml", "train section must be a mapping"), ("null_data.yaml", "data section")):
        assert main(["--config", str(cfg_dir / bad), shards]) == 2
        assert what in capsys.readouterr().err
    assert main([shards, "data.resampled=false", f"report={tmp_path}"]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_url_shards_end_each_shard_even_after_a_read_error(tmp_path):
    """A URL stream that fails inside a shard used to leave that shard's last good sample pending
    until the next shard's first member, so the skip order (and a consecutive-skip stop) differed
    from the same files read locally; now both orders agree with the replay."""
    import io
    import tarfile

    d, cfg = _make(tmp_path, n=2, per=2)
    s0, s1 = (vdata.encode_latent_sample(*synthetic_sample(i, cfg)) for i in (60, 61))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in [("x.prompt.txt", b"x")] + [(f"{smp['__key__']}.{k}", v) for smp in (s0, s1)
                                                      for k, v in smp.items() if not k.startswith("__")]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        cut = next(m for m in tf.getmembers() if m.name == "sample_000000061.latent.pt").offset_data + 100
    (d / "shard_000000.tar").write_bytes(raw[:cut])  # x (incomplete), s0, then s1 cut inside its latent
    (d / "shard_000001.tar").write_bytes(b"this is not a tar file" * 40)
    write_shard(d / "shard_000002.tar", [vdata.encode_latent_sample(*synthetic_sample(62, cfg))])
    paths = [str(d / f"shard_{i:06d}.tar") for i in range(3)]
    for spec in (",".join(paths), ",".join(f"pipe:cat {p}" for p in paths)):
        for limit in (0, 3, 4, 5):
            kw = dict(shards=spec, num_workers=0, shuffle_shards=False, max_consecutive_skips=limit)
            rep = check(CheckShardsConfig(data=_data(d, **kw), jobs=1, epochs=1), progress=False)
            ref = _loader(d, 1, **kw)
            assert _replayed(rep["split"]["epochs"][0]) == ref, (spec[:4], limit)
