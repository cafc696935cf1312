"""The shard-set check: every verdict against the training loader itself (``LatentLoader`` run per
rank in epoch mode: which keys it yields, how many it skips, how many batches each rank gets) or
against the set as written by hand (which keys were copied where)."""

from __future__ import annotations

import json

import pytest
import torch

torch.set_num_threads(1)

from interpdiff.video import data as vdata  # noqa: E402
from interpdiff.video.check_shards import CheckShardsConfig, check, latent_digest, main  # noqa: E402
from interpdiff.video.make_shards import MakeShardsConfig, main as make_shards_main, synthetic_sample, write_shard  # noqa: E402

LAT = [4, 5, 2, 3]
EMB = [6, 8]


def _make(tmp_path, n=12, per=3):
    d = tmp_path / "shards"
    make_shards_main([f"out_dir={d}", f"num_samples={n}", f"samples_per_shard={per}",
                      f"latent_shape=[{','.join(map(str, LAT))}]", f"embed_shape=[{','.join(map(str, EMB))}]"])
    return d, MakeShardsConfig(out_dir=str(d), num_samples=n, samples_per_shard=per, latent_shape=LAT, embed_shape=EMB)


def _check(d, **kw):
    kw.setdefault("jobs", 1)
    return check(CheckShardsConfig(shards=str(d / "shard_*.tar"), **kw), progress=False)


def _loader_per_rank(d, world, workers, batch):
    """Keys, skips and batches of each rank, from the training loader itself (epoch 0)."""
    out = []
    for r in range(world):
        loader = vdata.LatentLoader(vdata.LatentDataConfig(
            shards=str(d / "shard_*.tar"), batch_size=batch, num_workers=workers, resampled=False, rank=r,
            world_size=world, shuffle_buffer=0, max_consecutive_skips=0))
        batches = list(loader)
        out.append({"keys": [k for b in batches for k in b.keys], "batches": len(batches), "skipped": loader.skipped})
    return out


def test_a_clean_set_passes_and_the_split_matches_the_loader(tmp_path):
    d, _ = _make(tmp_path, n=14, per=2)  # 7 shards
    rep = _check(d, world_size=3, num_workers=2, batch_size=2)
    assert rep["problems"] == [] and rep["samples"] == 14 and rep["shards"] == 7
    assert rep["latent_shapes"] == [{"shape": LAT, "dtype": "bfloat16", "count": 14}]
    assert rep["embed_shapes"] == [{"shape": EMB, "dtype": "bfloat16", "count": 14}]
    ref = _loader_per_rank(d, 3, 2, 2)
    split = rep["split"]["epochs"][0]
    assert [s["batches"] for s in split] == [r["batches"] for r in ref]
    # samples per rank: what the loader would yield with partial batches
    assert sum(s["samples"] for s in split) == 14
    for s, r in zip(split, ref):
        assert s["batches"] * 2 == len(r["keys"])


@pytest.mark.parametrize("world,workers,batch", [(2, 1, 2), (3, 2, 1), (2, 2, 3)])
def test_batches_per_rank_equal_the_loaders_over_two_epochs(tmp_path, world, workers, batch):
    d, _ = _make(tmp_path, n=17, per=3)  # 6 shards, the last one short
    rep = _check(d, world_size=world, num_workers=workers, batch_size=batch, epochs=2)
    for e in range(2):
        ref = []
        for r in range(world):
            loader = vdata.LatentLoader(vdata.LatentDataConfig(
                shards=str(d / "shard_*.tar"), batch_size=batch, num_workers=workers, resampled=False, rank=r,
                world_size=world, shuffle_buffer=0))
            loader.dataset.epoch = e
            ref.append(sum(1 for _ in loader))
        assert [s["batches"] for s in rep["split"]["epochs"][e]] == ref, e


def test_unreadable_and_truncated_samples_are_named_and_match_the_loaders_skips(tmp_path):
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
    ref = _loader_per_rank(d, 1, 0, 1)[0]
    assert rep["samples"] == len(ref["keys"])
    assert len(rep["unreadable"]) == ref["skipped"]
    assert rep["truncated_shards"] == [str(d / "shard_000001.tar")]
    text = "\n".join(e["error"] for e in rep["unreadable"])
    assert "sample_000000021" in text and "embed.pt" in text
    assert "sample_000000022.latent.pt: not a loadable torch tensor file" in text
    assert "sample_000000023" in text and "non-finite" in text
    assert {e["shard"] for e in rep["unreadable"]} == {str(d / "shard_000001.tar"), str(d / "shard_000002.tar")}
    assert any("unreadable" in p for p in rep["problems"]) and any("truncated" in p for p in rep["problems"])


def test_a_key_on_two_ranks_is_found_though_the_loader_cannot_see_it(tmp_path):
    d, cfg = _make(tmp_path, n=4, per=2)
    copy = vdata.encode_latent_sample(*synthetic_sample(0, cfg))  # sample 0 again, in a third shard
    write_shard(d / "shard_000002.tar", [copy, vdata.encode_latent_sample(*synthetic_sample(9, cfg))])
    # the loader: with 2 ranks and the copies on different ranks, no rank reads the key twice
    urls = vdata.resolve_shards(str(d / "shard_*.tar"))
    ranks_of = {u: r for r in range(2) for u in vdata.ShardSource(urls, r, 2, resampled=False).shards_for(0, 1)}
    rep = _check(d, world_size=2, num_workers=1)
    assert rep["duplicate_keys"] == {"sample_000000000": [str(d / "shard_000000.tar"), str(d / "shard_000002.tar")]}
    assert rep["duplicate_contents"] == []  # same key, same bytes: one key, so no content duplicate
    assert any("keys stored more than once" in p for p in rep["problems"])
    if ranks_of[str(d / "shard_000000.tar")] != ranks_of[str(d / "shard_000002.tar")]:
        per_rank = _loader_per_rank(d, 2, 1, 1)
        assert all(len(r["keys"]) == len(set(r["keys"])) for r in per_rank)


def test_the_same_latent_under_two_keys_and_shape_mixes(tmp_path):
    d, cfg = _make(tmp_path, n=4, per=2)
    _, lat, emb, prompt = synthetic_sample(1, cfg)
    twin = vdata.encode_latent_sample("clip_copy", lat, emb, prompt)
    odd = vdata.encode_latent_sample("clip_odd", torch.zeros(4, 3, 2, 3, dtype=torch.bfloat16),
                                     torch.zeros(6, 8, dtype=torch.bfloat16), "short clip")
    write_shard(d / "shard_000002.tar", [twin, odd])
    rep = _check(d, crop_frames=4)
    assert rep["duplicate_contents"] == [["clip_copy", "sample_000000001"]]
    assert rep["duplicate_keys"] == {}
    assert {(tuple(s["shape"]), s["count"]) for s in rep["latent_shapes"]} == {(tuple(LAT), 5), ((4, 3, 2, 3), 1)}
    assert rep["shorter_than_crop"] == [f"clip_odd (3 frames) in {d / 'shard_000002.tar'}"]
    assert any("latent stored" in p or "latents stored" in p for p in rep["problems"])
    assert any("shapes/dtypes" in p for p in rep["problems"]) and any("crop_frames=4" in p for p in rep["problems"])
    # with the shape declared the odd clip is unreadable instead, as in the loader
    rep = _check(d, latent_shape=LAT)
    assert rep["samples"] == 5 and "expected [4, 5, 2, 3]" in rep["unreadable"][0]["error"]


def test_latent_digest_sees_dtype_shape_and_every_bit():
    x = torch.randn(2, 3, 4).to(torch.bfloat16)
    assert latent_digest(x) == latent_digest(x.clone())
    y = x.clone()
    y.view(torch.int16).view(-1)[5] ^= 1  # one mantissa bit
    assert latent_digest(y) != latent_digest(x)
    assert latent_digest(x.reshape(3, 2, 4)) != latent_digest(x)
    assert latent_digest(x.view(torch.float16)) != latent_digest(x)
    assert latent_digest(x.transpose(0, 1)) == latent_digest(x.transpose(0, 1).contiguous())


def test_a_rank_without_a_full_batch_is_a_problem(tmp_path):
    d, _ = _make(tmp_path, n=6, per=3)  # 2 shards of 3
    ok = _check(d, world_size=2, num_workers=1, batch_size=3)
    assert ok["problems"] == []
    rep = _check(d, world_size=2, num_workers=2, batch_size=3)  # one shard per rank -> worker 1 idle, 3 per rank: ok
    assert rep["problems"] == []
    rep = _check(d, world_size=2, num_workers=1, batch_size=4)
    assert [s["batches"] for s in rep["split"]["epochs"][0]] == [0, 0]
    assert [r["batches"] for r in _loader_per_rank(d, 2, 1, 4)] == [0, 0]
    assert any("get no full batch of 4" in p for p in rep["problems"])


def test_processes_give_the_same_report_and_bad_configs_are_named(tmp_path):
    d, _ = _make(tmp_path, n=9, per=2)
    one = _check(d, world_size=2)
    two = _check(d, world_size=2, jobs=2)
    assert one == two
    with pytest.raises(ValueError, match="5 shards cannot be split over world_size=6"):
        _check(d, world_size=6)
    with pytest.raises(ValueError, match="latent_shape must be"):
        _check(d, latent_shape=[4, 5])
    with pytest.raises(FileNotFoundError, match="match no shard"):
        check(CheckShardsConfig(shards=str(tmp_path / "nowhere_*.tar")), progress=False)


def test_cli_exit_status_and_json_report(tmp_path, capsys):
    d, cfg = _make(tmp_path, n=4, per=2)
    out = tmp_path / "rep" / "check.json"
    assert main([f"shards={d}", "jobs=1", f"report={out}"]) == 0
    assert "OK: no problem found" in capsys.readouterr().out
    assert json.loads(out.read_text())["samples"] == 4
    write_shard(d / "shard_000002.tar", [vdata.encode_latent_sample(*synthetic_sample(3, cfg))])
    assert main([f"shards={d}", "jobs=1", f"report={out}", "show=0"]) == 1
    text = capsys.readouterr().out
    assert "duplicate keys (1):" in text and "PROBLEMS:" in text and "1 keys stored more than once" in text
    assert json.loads(out.read_text())["duplicate_keys"]["sample_000000003"]
