"""train_phase1.py, train_phase2.py and sample.py on the tiny Wan preset with synthetic shards (CPU).

References: the loss of a run that overfits one batch must fall well below its start; a resumed
phase-2 run must end with the LoRA *and* the widened-channel weights of an uninterrupted run
(bit-exact on CPU fp32); sample.py's mp4 must decode (imageio/ffmpeg and decord) to the requested
frame count and size; bad inputs must stop with a message naming the culprit before the model is
built.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from interpdiff.config import ConfigError
from interpdiff.io import CheckpointError
from interpdiff.video import wan
from interpdiff.video.make_shards import MakeShardsConfig, make_shards

REPO = Path(__file__).resolve().parents[1]


from conftest import load_script as _load  # noqa: E402


train_phase1 = _load("train_phase1")
train_phase2 = _load("train_phase2")
sample = _load("sample")


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    make_shards(MakeShardsConfig(out_dir=str(out), num_samples=4, samples_per_shard=2, latent_shape=[16, 9, 4, 6],
                                 embed_shape=[16, 32], seed=0))
    return str(out / "shard_*.tar")


def _args(shards, run_dir, *extra):
    return [
        "--config", str(REPO / "configs/video/tiny_cpu.yaml"),
        f"data.shards={shards}", f"train.run_dir={run_dir}", "train.tracker=none", "train.log_every=1",
        "train.validate_every=0", *extra,
    ]  # fmt: skip


def _run(module, argv):
    _reset_accelerate()
    return module.main(argv)


def _mean(xs):
    return sum(xs) / len(xs)


def _overfit(module, shards, run_dir, lr, *extra):
    one = shards.replace("shard_*", "shard_000000")  # one shard of 2 samples = one batch, repeated
    return _run(module, _args(one, run_dir, "train.max_steps=40", "train.checkpoint_every=40", f"train.optim.lr={lr}",
                              "train.ema_decay=0", "train.optim.schedule=constant", "train.optim.warmup_steps=0", *extra))


def test_phase1_overfits_one_batch(shards, tmp_path):
    """Paired against a control run with lr ~ 0: both see the same flow times and noise at every
    step (seeded per sample and step), so the per-step losses differ only by what was learned.
    The tiny model cannot reach 0 (its 24-dim hidden state cannot carry the 64-dim patch noise),
    hence a margin rather than a floor."""
    res = _overfit(train_phase1, shards, tmp_path / "p1", 1e-2, "phase1.index_policy=uniform:1",
                   "train.validate_every=40", "validation.decode=true")
    ctl = _overfit(train_phase1, shards, tmp_path / "c1", 1e-9, "phase1.index_policy=uniform:1")
    L, C = res.losses, ctl.losses
    assert len(L) == 40 and L[0] == pytest.approx(C[0], rel=1e-6)
    assert _mean(L[-20:]) < 0.95 * _mean(C[-20:]), (L, C)
    assert _mean(L[-10:]) < 0.95 * _mean(L[:5])
    lora = tmp_path / "p1" / "checkpoints" / "step_00000040" / "trainable"
    meta = wan.read_lora_meta(lora)
    assert meta["keyframe_rope"] and meta["widening"] is None and meta["extra"]["phase"] == 1
    # validation with the (tiny) VAE: one mp4 per validation sample, 9 latent frames -> 33 frames
    import imageio.v2 as imageio

    vids = sorted((tmp_path / "p1" / "validation").glob("val_00000040_*.mp4"))
    assert len(vids) == 2 and len([f for f in imageio.get_reader(str(vids[0]))]) == 33
    # diffusers' LoRA format: transformer.-prefixed peft keys
    from safetensors.torch import load_file

    keys = list(load_file(str(lora / wan.LORA_WEIGHT_NAME)))
    assert keys and all(k.startswith("transformer.blocks.") and ".lora_" in k for k in keys)


def test_phase2_overfits_one_batch_and_validation(shards, tmp_path):
    res = _overfit(train_phase2, shards, tmp_path / "p2", 1e-2, "train.validate_every=40")
    ctl = _overfit(train_phase2, shards, tmp_path / "c2", 1e-9)
    L, C = res.losses, ctl.losses
    assert _mean(L[-20:]) < 0.85 * _mean(C[-20:]), (L, C)  # measured 0.75
    ck = tmp_path / "p2" / "checkpoints" / "step_00000040"
    meta = wan.read_lora_meta(ck / "trainable")
    assert meta["widening"]["channels"] == ["mask"] and meta["extra"]["phase2"]["k_min"] == 3
    assert (ck / "trainable" / wan.EXTRA_WEIGHT_NAME).is_file()
    assert (tmp_path / "p2" / "validation" / "val_00000040.png").is_file()
    assert (tmp_path / "p2" / "config.yaml").is_file()


def _trainables(run_dir, step):
    from safetensors.torch import load_file

    d = Path(run_dir) / "checkpoints" / f"step_{step:08d}" / "trainable"
    return load_file(str(d / wan.LORA_WEIGHT_NAME)), load_file(str(d / wan.EXTRA_WEIGHT_NAME))


def test_phase2_resume_equals_uninterrupted(shards, tmp_path):
    common = ["train.max_steps=4", "train.checkpoint_every=2", "train.optim.lr=1e-2", "train.batch_size=1"]
    full = _run(train_phase2, _args(shards, tmp_path / "full", *common))
    _run(train_phase2, _args(shards, tmp_path / "split", *common, "train.stop_at_step=2"))
    resumed = _run(train_phase2, _args(shards, tmp_path / "split", *common, "--resume", "latest"))
    assert resumed.state.step == 4 and resumed.losses == full.losses[2:]
    (la, ea), (lb, eb) = _trainables(tmp_path / "full", 4), _trainables(tmp_path / "split", 4)
    assert la.keys() == lb.keys()
    for k in la:
        assert torch.equal(la[k], lb[k]), k
    assert torch.equal(ea["patch_embedding.extra_weight"], eb["patch_embedding.extra_weight"])
    assert ea["patch_embedding.extra_weight"].abs().sum() > 0  # the widened channels did train


def test_resuming_a_phase1_run_with_train_phase2_is_refused_by_name(shards, tmp_path):
    common = ["train.max_steps=2", "train.checkpoint_every=2", "train.batch_size=1"]
    _run(train_phase1, _args(shards, tmp_path / "p1", *common))
    before = (tmp_path / "p1" / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match=r"(?s)phase = 1 in the checkpoint, 2 in this run.*widening"):
        _run(train_phase2, _args(shards, tmp_path / "p1", *common, "--resume", "latest"))
    with pytest.raises(CheckpointError, match=r"lora\.rank = 4 in the checkpoint, 8 in this run"):
        _run(train_phase1, _args(shards, tmp_path / "p1", *common, "model.lora.rank=8", "--resume", "latest"))
    assert (tmp_path / "p1" / "config.yaml").read_text() == before


def test_shards_for_another_text_encoder_width_are_named(tmp_path):
    """Shards with 64-wide text embeddings for a model whose text_dim is 32: with data.embed_shape
    declared the run stops at start-up; left open, every sample is skipped with the reason and the
    pass stops naming it (before: a matmul shape error inside the model)."""
    from interpdiff.video.data import NoGoodSampleError

    out = tmp_path / "wide"
    make_shards(MakeShardsConfig(out_dir=str(out), num_samples=2, samples_per_shard=2, latent_shape=[16, 9, 4, 6],
                                 embed_shape=[16, 64], seed=0))
    pattern = str(out / "shard_*.tar")
    with pytest.raises(ConfigError, match=r"data\.embed_shape=\[16, 64\]: the model's text embeddings are 32 wide"):
        _run(train_phase2, _args(pattern, tmp_path / "a", "train.max_steps=1", "data.embed_shape=[16,64]"))
    with pytest.raises(NoGoodSampleError, match=r"(?s)skipped all 2 samples.*embed has shape \(16, 64\).*32"):
        _run(train_phase2, _args(pattern, tmp_path / "b", "train.max_steps=1"))


def test_sample_two_phase_and_full_write_playable_mp4(shards, tmp_path):
    one = shards.replace("shard_*", "shard_000000")
    for mod, name in ((train_phase1, "p1"), (train_phase2, "p2")):
        _run(mod, _args(one, tmp_path / name, "train.max_steps=2", "train.checkpoint_every=2"))
    p1 = tmp_path / "p1" / "checkpoints" / "step_00000002" / "trainable"
    p2 = tmp_path / "p2" / "checkpoints" / "step_00000002" / "trainable"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog runs on the beach\n\na red car drives slowly\n")
    base = [f"prompts_file={prompts}", "num_frames=17", "height=32", "width=64", "phase1_steps=2", "full_steps=2",
            "model_path=tiny", "batch_size=2"]
    out = sample.main([*base, f"phase1_lora={p1}", f"phase2_lora={p2}", f"out_dir={tmp_path / 'two'}"])
    full = sample.main([*base, "mode=full", f"out_dir={tmp_path / 'full'}"])
    assert {"phase1", "interpolate", "phase2", "vae_decode"} <= set(out["times"])
    assert "full" in full["times"]
    import decord
    import imageio.v2 as imageio

    for path in out["videos"] + full["videos"]:
        frames = [f for f in imageio.get_reader(str(path))]  # list() would trust its len() = inf
        assert len(frames) == 17 and frames[0].shape == (32, 64, 3), (path, len(frames), frames[0].shape)
        vr = decord.VideoReader(str(path))
        assert len(vr) == 17 and tuple(vr.get_batch([0, 16]).shape) == (2, 32, 64, 3)
    assert len(out["videos"]) == 2 and "a_dog_runs" in out["videos"][0].name


# --- bad inputs: clear errors before the model is built -------------------------------------------


def test_missing_shard_pattern(tmp_path, no_model):
    with pytest.raises(ConfigError, match=r"data\.shards"):
        _run(train_phase2, ["--config", str(REPO / "configs/video/tiny_cpu.yaml"), f"train.run_dir={tmp_path}/r"])
    with pytest.raises(ConfigError, match=r"data\.shards.*no_such_dir"):
        _run(train_phase2, _args(str(tmp_path / "no_such_dir" / "shard_*.tar"), tmp_path / "r"))


def test_validation_reads_its_own_shards(shards, tmp_path, no_model):
    """``validation.shards`` = a held-out set: validation's batch comes from it (keys of the held-out
    samples); a pattern that matches nothing stops the run before the model is built, naming the key."""
    from interpdiff.config import parse_cli
    from interpdiff.video.objectives import VideoTrainConfig, make_validation_batches

    held = tmp_path / "held"
    make_shards(MakeShardsConfig(out_dir=str(held), num_samples=2, samples_per_shard=2, latent_shape=[16, 9, 4, 6],
                                 embed_shape=[16, 32], seed=3, start_index=7))
    cfg = parse_cli(VideoTrainConfig, _args(shards, tmp_path / "r", f"validation.shards={held}/shard_*.tar"))
    b = next(iter(make_validation_batches(cfg)(0, 0)))
    train_keys = {k for bb in make_validation_batches(parse_cli(VideoTrainConfig, _args(shards, tmp_path / "r")))(0, 0)
                  for k in bb["keys"]}
    assert set(b["keys"]) == {"sample_000000014", "sample_000000015"} and not set(b["keys"]) & train_keys
    # fewer held-out samples than validation.num_samples / the batch size, and more ranks than shards:
    # one partial batch, read whole (it used to raise StopIteration at the first validation)
    cfg = parse_cli(VideoTrainConfig, _args(shards, tmp_path / "r", f"validation.shards={held}/shard_*.tar",
                                            "validation.num_samples=5", "train.batch_size=4", "data.world_size=4",
                                            "data.rank=3"))
    assert len(next(iter(make_validation_batches(cfg)(0, 0)))["keys"]) == 2
    with pytest.raises(ConfigError, match=r"validation\.shards.*nowhere"):
        _run(train_phase2, _args(shards, tmp_path / "r", f"validation.shards={tmp_path}/nowhere/shard_*.tar"))


def test_unknown_config_key(shards, tmp_path, no_model):
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        _run(train_phase1, _args(shards, tmp_path / "r", "train.learning_rate=1e-4"))


@pytest.mark.parametrize("override,match", [
    ("phase2.sigma_min=0.5", r"phase2\.sigma_min=0\.5"),
    ("phase2.budgets=[3,3,9]", r"phase2\.budgets=\[3, 3, 9\]"),
    ("phase2.missing_weight=0", r"phase2\.missing_weight=0"),
    ("model.checkpoint_ratio=1.5", r"model\.checkpoint_ratio"),
    ("phase2.n_levels=1", r"phase2\.k_min=3, phase2\.n_levels=1.*one level is no refinement"),
    ("phase2.sigma_max=nan", r"phase2\.sigma_min=0\.01, phase2\.sigma_max=nan"),
    ("phase2.policy_mix=uniform:nan,dp:1", r"phase2\.policy_mix.*weight of 'uniform' is nan"),
    ("phase1.flow_density=lognormal", r"phase1\.flow_density='lognormal' is not one of"),
    ("phase1.flow_shift=0", r"phase1\.flow_shift must be a finite number > 0"),
    ("train.optim.min_lr_ratio=-1", r"train\.optim\.min_lr_ratio=-1\.0: expected in \[0, 1\]"),
    ("train.optim.grad_clip=nan", r"train\.optim\.grad_clip=nan"),
])
def test_bad_phase2_and_model_values_fail_at_startup(shards, tmp_path, no_model, override, match):
    with pytest.raises(ConfigError, match=match):
        _run(train_phase2, _args(shards, tmp_path / "r", override))
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("module,override,match", [
    ("phase2", "phase2.budgets=[3,6,8]", r"phase2\.budgets.*9"),
    ("phase2", "phase2.k_min=10", r"k_min"),
    ("phase1", "phase1.num_keyframes=12", r"phase1\.num_keyframes=12 exceeds the clip's T=9"),
])  # fmt: skip
def test_budgets_against_a_fixed_clip_length_fail_before_training(shards, tmp_path, module, override, match):
    """When the config fixes the clip length (data.latent_shape here: T = 9), level budgets and the
    keyframe count are checked against it before the first loss (the tiny model is built, no step
    runs, nothing is written)."""
    mod = train_phase1 if module == "phase1" else train_phase2
    with pytest.raises(ConfigError, match=match):
        _run(mod, _args(shards, tmp_path / "r", "data.latent_shape=[16,9,4,6]", override))
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_precomputed_masks_for_whole_clips_are_refused_with_crops(shards, tmp_path, no_model):
    """dp_precomputed masks are stored per whole clip: with data.crop_frames every sample would fall
    back to uniform masks, so the combination stops the run before training."""
    torch.save({"sample_000000000": torch.ones(3, 9, dtype=torch.bool)}, tmp_path / "dp.pt")
    with pytest.raises(ConfigError, match=r"phase2\.policy_mix: dp_precomputed masks are stored for whole clips; "
                                          r"with data\.crop_frames=5"):
        _run(train_phase2, _args(shards, tmp_path / "r", "phase2.policy_mix=dp_precomputed:1",
                                 f"phase2.dp_mask_file={tmp_path / 'dp.pt'}", "data.crop_frames=5"))


def test_a_damaged_precomputed_mask_file_is_named(shards, tmp_path, no_model):
    (tmp_path / "dp.pt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ConfigError, match=r"phase2\.policy_mix: the dp_precomputed file '.*dp\.pt' cannot be read as a torch file"):
        _run(train_phase2, _args(shards, tmp_path / "r", "phase2.policy_mix=dp_precomputed:1",
                                 f"phase2.dp_mask_file={tmp_path / 'dp.pt'}"))


def test_validation_decode_checks_the_vae_before_training(shards, tmp_path):
    """validation.decode loads the VAE at the first validation (step validate_every): a model folder
    without vae/ is reported at start-up, naming the folder, not thousands of steps later."""
    (tmp_path / "wan" / "transformer").mkdir(parents=True)
    with pytest.raises(wan.WanLoadError, match=r"wan.*vae"):
        _run(train_phase2, _args(shards, tmp_path / "r", f"model.path={tmp_path / 'wan'}", "validation.decode=true",
                                 "train.validate_every=10"))


def test_resume_path_without_checkpoint(shards, tmp_path, no_model):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        _run(train_phase2, _args(shards, tmp_path / "r", f"train.resume={tmp_path / 'empty'}"))
    with pytest.raises(CheckpointError, match="no such path"):
        _run(train_phase2, _args(shards, tmp_path / "r", f"train.resume={tmp_path / 'nope'}"))
    assert not (tmp_path / "r").exists()


def test_lora_target_matching_no_module(shards, tmp_path):
    with pytest.raises(ConfigError, match=r"target_modules.*to_qq"):
        _run(train_phase1, _args(shards, tmp_path / "r", "model.lora.target_modules=[to_q,to_qq]"))
    assert not (tmp_path / "r").exists()


def test_cli_prints_clear_message_and_exits_nonzero(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "train_phase2.py", "--config", "configs/video/tiny_cpu.yaml",
         f"data.shards={tmp_path}/missing_*.tar"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1
    assert "train_phase2.py: error: data.shards" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_sample_bad_inputs(tmp_path, no_model):
    with pytest.raises(ConfigError, match="4k\\+1"):
        sample.main(["prompts=[x]", "num_frames=16"])
    with pytest.raises(ConfigError, match="no prompt"):
        sample.main([f"out_dir={tmp_path}"])
    with pytest.raises(wan.WanLoadError, match="phase1_lora"):
        sample.main(["prompts=[x]", f"phase1_lora={tmp_path / 'nope'}", "num_frames=17", "height=32", "width=64"])
    (tmp_path / "blank.txt").write_text("\n  \n")
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    for f, match in [("blank.txt", r"blank\.txt' holds no prompt"), ("latin.txt", r"latin\.txt' is not UTF-8"),
                     ("", r"is a folder")]:
        with pytest.raises(ConfigError, match=match):
            sample.main([f"prompts_file={tmp_path / f}", f"out_dir={tmp_path}"])


def test_sample_refuses_a_phase1_lora_with_another_keyframe_count(tmp_path, no_model):
    tr = wan.build_tiny_transformer()
    wan.install_keyframe_rope(tr)
    wan.add_lora(tr, wan.LoraSpec(rank=2, alpha=2))
    wan.save_lora(tr, tmp_path / "p1", extra_meta={"phase": 1, "phase1": {"num_keyframes": 5}})
    with pytest.raises(ConfigError, match=r"num_keyframes=5.*level-0 budget is 3"):
        sample.main(["prompts=[x]", f"phase1_lora={tmp_path / 'p1'}", "num_frames=17", "height=32", "width=64",
                     "phase2.k_min=3", "phase2.n_levels=3", f"out_dir={tmp_path / 'out'}"])


@pytest.mark.parametrize("name", ["tiny_cpu", "wan1.3b_phase1", "wan1.3b_phase2", "wan14b_phase2"])
def test_shipped_configs_load(name):
    from interpdiff.config import load_config
    from interpdiff.video.objectives import VideoTrainConfig, phase2_budgets

    cfg = load_config(VideoTrainConfig, REPO / "configs" / "video" / f"{name}.yaml", ["data.shards=x.tar"])
    budgets = phase2_budgets(cfg.phase2, 21)
    assert budgets[-1] == 21 and budgets[0] == min(cfg.phase2.k_min, 21)
    assert cfg.phase1.num_keyframes == cfg.phase2.k_min  # level 0 of phase 2 = the phase-1 keyframes
    if name != "tiny_cpu":
        assert cfg.data.latent_shape == [16, 21, 60, 104] and cfg.train.gradient_checkpointing


def test_phase2_sampler_uses_training_conventions(monkeypatch):
    """Train/sample consistency (METHOD.md section 6): with a perfect restorer the sampler must
    (a) return the ground truth, (b) call the model at level s on ``I(x0, M_s)`` (the noise-free
    training corruption), with ``M_s`` (mask planes built from the current level's mask) and the
    training level timestep ``1000 (1 - K_s / T)``."""
    from interpdiff.interpolate import interpolate
    from interpdiff.masks import uniform_nested_masks
    from interpdiff.video import pipeline
    from interpdiff.video.objectives import Phase2Config, level_timestep

    g = torch.Generator().manual_seed(0)
    B, C, T, H, W = 2, 16, 9, 4, 6
    lat = torch.randn(B, C, T, H, W, generator=g)
    st = pipeline.Phase2Settings.from_phase2_config(Phase2Config(k_min=3, n_levels=3), T, noise="none")
    assert st.budgets == [3, 5, 9]
    masks = uniform_nested_masks(B, T, st.budgets)
    calls = []

    def perfect(model, x_s, mask_B_T, t_B, emb, p2, conf_B_T=None):
        calls.append((x_s.clone(), mask_B_T.clone(), t_B.clone(), list(p2.channels), conf_B_T))
        return lat.clone()

    monkeypatch.setattr(pipeline, "phase2_restore", perfect)
    out = pipeline.phase2_refine(None, interpolate(lat, masks[:, 0], time_dim=2), masks, torch.zeros(B, 4, 32), st,
                                 init_noise=False)
    torch.testing.assert_close(out, lat, rtol=0, atol=1e-5)
    assert len(calls) == len(st.budgets) - 1
    for s, (x_s, m, t, ch, conf) in enumerate(calls):
        assert torch.equal(m, masks[:, s]) and ch == ["mask"]
        assert torch.equal(conf, masks[:, s].float())  # anchor confidence of this level's mask
        torch.testing.assert_close(x_s, interpolate(lat, masks[:, s], time_dim=2), rtol=0, atol=1e-5)
        assert torch.equal(t, level_timestep(st.budgets, torch.full((B,), s), T))
        assert float(t[0]) == pytest.approx(1000 * (1 - st.budgets[s] / T))


def test_a_zero_loss_refiner_samples_exactly_whatever_it_outputs_on_keyframes(monkeypatch):
    """The velocity a refiner outputs on the keyframes of M_s is never trained (keyframe_weight 0),
    and TACoS interpolates from x0_hat at those keyframes: ``phase2_restore`` must return them
    exactly, or a refiner at zero training loss samples worse than the plain interpolation
    (measured before the fix: MSE 0.089 against 0.052)."""
    from interpdiff.interpolate import interpolate
    from interpdiff.masks import uniform_nested_masks
    from interpdiff.video import objectives as ob
    from interpdiff.video import pipeline

    B, C, T, H, W = 2, 16, 9, 4, 6
    x0 = torch.randn(B, C, T, H, W, generator=torch.Generator().manual_seed(1)).cumsum(2) * 0.3
    junk = torch.randn(B, C, T, H, W, generator=torch.Generator().manual_seed(5))

    def forward(model, x, t_B, emb, frame_idx_B_K=None, extra_B_E_T_H_W=None, **kw):
        m = extra_B_E_T_H_W[:, 0, :, 0, 0] > 0.5  # the mask plane: M_s
        v_exact = (x.float() - x0) / (t_B / 1000).view(-1, 1, 1, 1, 1)  # x0_hat = x0 on missing frames
        return torch.where(m[:, None, :, None, None], junk, v_exact)  # anything on keyframes

    monkeypatch.setattr(ob.wan, "wan_forward", forward)
    cfg = ob.VideoTrainConfig()
    cfg.phase2 = ob.Phase2Config(k_min=3, n_levels=3, policy_mix="uniform:1")
    policy = ob.KeyframePolicy(cfg.phase2.policy_mix, ob.PHASE2_POLICIES, "", "phase2.policy_mix")
    batch = {"lat": x0, "emb": torch.zeros(B, 4, 32), "keys": ["a", "b"]}
    assert max(float(ob.phase2_loss(None, batch, step, cfg, policy, 0)[0]) for step in range(4)) < 1e-10
    st = pipeline.Phase2Settings.from_phase2_config(cfg.phase2, T, noise="none")
    masks = uniform_nested_masks(B, T, st.budgets)
    x_start = interpolate(x0, masks[:, 0], time_dim=2)
    out = pipeline.phase2_refine(None, x_start, masks, torch.zeros(B, 4, 32), st, init_noise=False)
    assert float(((x_start - x0) ** 2).mean()) > 0.01  # the interpolation is off
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)  # the refiner, exact on missing frames, is exact


def test_phase2_training_corruption_and_loss(monkeypatch):
    """The training side of the same conventions: x_s = I(x0, M_s) + sigma_s eps (1 - M_s) with
    M_s a nested level mask, t = 1000 (1 - K_s / T), and the loss a per-sample weighted mean
    (missing frames only by default) checked against a hand computation."""
    from interpdiff.interpolate import interpolate
    from interpdiff.video import objectives as ob

    g = torch.Generator().manual_seed(1)
    B, C, T, H, W = 2, 16, 9, 4, 6
    x0 = torch.randn(B, C, T, H, W, generator=g)
    cfg = ob.VideoTrainConfig()
    cfg.phase2 = ob.Phase2Config(k_min=3, n_levels=3, policy_mix="uniform:1", sigma_max=0.1, sigma_min=0.05)
    policy = ob.KeyframePolicy(cfg.phase2.policy_mix, ob.PHASE2_POLICIES, "", "phase2.policy_mix")
    seen = {}
    pred = torch.randn(B, C, T, H, W, generator=g)

    def restore(model, x_s, mask_B_T, t_B, emb, p2, conf_B_T=None):
        seen.update(x_s=x_s, mask=mask_B_T, t=t_B)
        return pred

    monkeypatch.setattr(ob, "phase2_restore", restore)
    batch = {"lat": x0, "emb": torch.zeros(B, 4, 32), "keys": ["a", "b"]}
    loss, _ = ob.phase2_loss(None, batch, 7, cfg, policy, seed=0)
    m, t = seen["mask"], seen["t"]
    budgets = [3, 5, 9]
    sig = {3: 0.1, 5: 0.05}
    for b in range(B):
        k = int(m[b].sum())
        assert k in (3, 5) and m[b, 0] and m[b, -1]  # level 0 or 1 (never the full last level)
        assert float(t[b]) == pytest.approx(1000 * (1 - k / T))
        resid = seen["x_s"][b] - interpolate(x0[b : b + 1], m[b : b + 1], time_dim=2)[0]
        assert resid[:, m[b]].abs().max() == 0  # keyframes exact
        assert float(resid[:, ~m[b]].std()) == pytest.approx(sig[k], rel=0.15)  # noise only on missing frames
    per = [((pred[b] - x0[b]) ** 2)[:, ~m[b]].mean() for b in range(B)]
    torch.testing.assert_close(loss, torch.stack(per).mean(), rtol=1e-5, atol=0)
    assert budgets == ob.phase2_budgets(cfg.phase2, T)


@pytest.mark.parametrize("ratio,expect", [(1.0, [0, 1]), (0.5, [0]), (0.0, [])])
def test_selective_checkpointing_same_gradients(ratio, expect):
    """Checkpointing a fraction of the blocks recomputes exactly those blocks and leaves loss and
    gradients equal to the plain model's (reference: no checkpointing)."""
    from interpdiff.video.objectives import ModelConfig, Phase2Config, build_transformer, enable_checkpointing

    def grads(ratio_or_none):
        tr = build_transformer(ModelConfig(lora=wan.LoraSpec(rank=4, alpha=4, init="default")), 2, Phase2Config())
        tr.train()
        calls = []
        if ratio_or_none is not None:
            assert enable_checkpointing(tr, ratio_or_none) == expect
            for i, b in enumerate(tr.blocks):
                b.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))  # recompute may stop early
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 16, 3, 4, 6, generator=g)
        planes = torch.zeros(1, 1, 3, 4, 6)
        out = wan.wan_forward(tr, x, torch.tensor([500.0]), torch.randn(1, 4, 32, generator=g), extra_B_E_T_H_W=planes)
        out.square().mean().backward()
        return {n: p.grad.clone() for n, p in wan.trainable_parameters(tr)}, calls

    ref, _ = grads(None)
    got, calls = grads(ratio)
    assert sorted(calls) == sorted([0, 1] + expect)  # checkpointed blocks run twice (forward + recompute)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-7)


def test_keyframe_policies_against_references(tmp_path):
    """uniform = round(linspace); dp = brute-force best K-subset of the interpolation cost;
    dp_precomputed = the stored mask, and a key missing from the file falls back to uniform,
    counted (never fatal one by one)."""
    import itertools

    from interpdiff.interpolate import interpolate
    from interpdiff.video.objectives import PHASE1_POLICIES, KeyframePolicy

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, 2, 2, generator=g).cumsum(1)  # C, T, H, W
    T, K = 7, 4
    uni = KeyframePolicy("uniform:1", PHASE1_POLICIES, "", "p").masks(x, "k", [K], g)[0][0]
    assert uni.nonzero().flatten().tolist() == [0, 2, 4, 6]
    dp = KeyframePolicy("dp:1", PHASE1_POLICIES, "", "p").masks(x, "k", [K], g)[0][0]

    def err(mask):
        return float(((interpolate(x[None], mask[None], time_dim=2) - x[None]) ** 2).sum())

    best = min(err(torch.tensor([t in (0, T - 1) or t in c for t in range(T)]))
               for c in itertools.combinations(range(1, T - 1), K - 2))
    assert err(dp) == pytest.approx(best, rel=1e-5)
    stored = torch.tensor([True, False, False, True, False, True, True])
    torch.save({"known": stored}, tmp_path / "dp.pt")
    pol = KeyframePolicy("dp_precomputed:1", PHASE1_POLICIES, str(tmp_path / "dp.pt"), "p")
    m, name = pol.masks(x, "known", [K], g)
    assert torch.equal(m[0], stored) and name == "dp_precomputed"
    m, name = pol.masks(x, "unknown", [K], g)
    assert name == "uniform_fallback" and pol.fallbacks == 1 and torch.equal(m[0], uni)
    # a table written for another budget: a config mismatch, named up front (check_precomputed, run by
    # make_train_spec when T is known) and at the draw (never a silent per-sample fallback)
    pol.check_precomputed([K], T)
    with pytest.raises(ConfigError, match=r"dp\.pt', sample 'known': keyframe counts \[4\], expected the budgets \[3\]"):
        pol.check_precomputed([3], T)
    with pytest.raises(ConfigError, match=r"expected the budgets \[3\]"):
        pol.masks(x, "known", [3], g)
    with pytest.raises(ConfigError, match=r"sample 'known': Tensor torch.bool \[7\], expected bool \[9\]"):
        pol.check_precomputed([K], 9)
    with pytest.raises(ConfigError, match="no file is set"):
        KeyframePolicy("dp_precomputed:1", PHASE1_POLICIES, "", "phase1.index_policy")
    with pytest.raises(ConfigError, match="selector"):
        KeyframePolicy("selector:1", PHASE1_POLICIES, "", "phase1.index_policy")


def test_init_lora_starts_from_a_saved_adapter(shards, tmp_path):
    """model.init_lora: the new run's trainable weights start as the saved ones (LoRA + channels)."""
    from safetensors.torch import load_file

    from interpdiff.video.objectives import ModelConfig, Phase2Config, build_transformer

    _run(train_phase2, _args(shards, tmp_path / "a", "train.max_steps=2", "train.checkpoint_every=2"))
    src = tmp_path / "a" / "checkpoints" / "step_00000002" / "trainable"
    tr = build_transformer(ModelConfig(init_lora=str(src), lora=wan.LoraSpec(rank=4, alpha=4)), 2, Phase2Config())
    own = dict(tr.named_parameters())
    saved = load_file(str(src / wan.LORA_WEIGHT_NAME))
    for k, v in saved.items():
        name = k[len("transformer."):].replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(own[name].detach(), v) and own[name].requires_grad, k
    extra = load_file(str(src / wan.EXTRA_WEIGHT_NAME))["patch_embedding.extra_weight"]
    assert torch.equal(tr.patch_embedding.extra_weight.detach(), extra) and tr.patch_embedding.extra_weight.requires_grad
    # a LoRA of another shape or phase is refused by name (it used to load as saved while every
    # checkpoint of the run recorded the config's model.lora)
    with pytest.raises(ConfigError, match=r"lora\.rank = 4 in the folder, model\.lora\.rank = 8 in this config"):
        build_transformer(ModelConfig(init_lora=str(src), lora=wan.LoraSpec(rank=8, alpha=4)), 2, Phase2Config())
    with pytest.raises(ConfigError, match=r"target_modules = .* in the folder, model\.lora\.target_modules = \['to_q'\]"):
        build_transformer(ModelConfig(init_lora=str(src), lora=wan.LoraSpec(rank=4, alpha=4, target_modules=["to_q"])),
                          2, Phase2Config())
    with pytest.raises(ConfigError, match=r"it is a phase-2 LoRA, this is phase 1"):
        build_transformer(ModelConfig(init_lora=str(src), lora=wan.LoraSpec(rank=4, alpha=4)), 1)


def test_sampler_rebuilds_the_phase2_model_from_the_lora_folder(tmp_path):
    """The sampler's phase-2 model = the training model: widening channels read from the LoRA
    folder (even without the phase-2 settings in its metadata), same outputs on the same inputs."""
    from interpdiff.video import pipeline
    from interpdiff.video.objectives import ModelConfig, Phase2Config, build_transformer, phase2_restore

    p2 = Phase2Config(channels=["mask", "confidence"], confidence="tent", k_min=3, n_levels=3)
    tr = build_transformer(ModelConfig(lora=wan.LoraSpec(rank=2, alpha=2)), 2, p2)
    with torch.no_grad():
        for n, p in wan.trainable_parameters(tr):
            p.normal_(0, 0.1)
    wan.save_lora(tr, tmp_path / "p2", extra_meta={"phase": 2})  # no "phase2" settings stored
    cfg = pipeline.SampleConfig(phase2_lora=str(tmp_path / "p2"), prompts=["x"])
    st = pipeline._phase2_settings(cfg, 9)
    assert st.channels == ["mask", "confidence"]
    st.confidence = "tent"
    tr_s = pipeline.load_phase_transformer(cfg, 2, "cpu", st)
    assert not any(p.requires_grad for p in tr_s.parameters()) and not tr_s.training
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 9, 4, 6, generator=g)
    emb = torch.randn(2, 5, 32, generator=g)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[:, [0, 3, 8]] = True
    t = torch.tensor([600.0, 300.0])
    tr.eval()
    with torch.no_grad():
        ref = phase2_restore(tr, x, mask, t, emb, p2)
        out = phase2_restore(tr_s, x, mask, t, emb, Phase2Config(channels=st.channels, confidence=st.confidence))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_phase1_training_flow_matching_conventions(monkeypatch):
    """Phase-1 loss against a hand computation: the model sees x_t = (1 - s) x0[idx] + s eps on the
    K keyframes only, timestep 1000 s, rotary positions at the true indices idx (uniform policy:
    round(linspace(0, T-1, K))), and the loss is mean (v - (eps - x0[idx]))^2. The latents are the
    frame index (x0[:, :, t] = t), so a wrong gather shows up as a shifted recovered eps."""
    from interpdiff.masks import uniform_indices
    from interpdiff.video import objectives as ob

    B, C, T, H, W, K = 2, 16, 9, 4, 6, 4
    x0 = torch.arange(T, dtype=torch.float32).view(1, 1, T, 1, 1).expand(B, C, T, H, W).to(torch.bfloat16)
    cfg = ob.VideoTrainConfig()
    cfg.phase1 = ob.Phase1Config(num_keyframes=K, index_policy="uniform:1")
    policy = ob.KeyframePolicy(cfg.phase1.index_policy, ob.PHASE1_POLICIES, "", "phase1.index_policy")
    seen = {}
    v = torch.randn(B, C, K, H, W, generator=torch.Generator().manual_seed(0))

    def fake_forward(model, x_t, t_B, emb, frame_idx_B_K=None, **kw):
        seen.update(x_t=x_t.clone(), t=t_B.clone(), idx=frame_idx_B_K.clone())
        return v

    monkeypatch.setattr(ob.wan, "wan_forward", fake_forward)
    loss, _ = ob.phase1_loss(None, {"lat": x0, "emb": torch.zeros(B, 4, 32), "keys": ["a", "b"]}, 3, cfg, policy, seed=0)
    idx = uniform_indices(T, K)
    assert torch.equal(seen["idx"], idx.expand(B, K))
    sigma = seen["t"] / 1000.0
    assert seen["x_t"].shape == (B, C, K, H, W) and bool(((sigma > 0) & (sigma < 1)).all())
    x0_k = idx.float().view(1, 1, K, 1, 1).expand(B, C, K, H, W)
    s = sigma.view(B, 1, 1, 1, 1)
    eps = (seen["x_t"] - (1 - s) * x0_k) / s
    assert abs(float(eps.mean())) < 0.1 and abs(float(eps.std()) - 1) < 0.1
    torch.testing.assert_close(loss, ((v - (eps - x0_k)) ** 2).mean(), rtol=1e-4, atol=1e-5)


# --- sample.py: per-prompt seeds, batched text encoding, the docstring example, bad values -------------

_TINY_SAMPLE = ["model_path=tiny", "num_frames=25", "phase2.k_min=3", "height=32", "width=48", "phase1_steps=2",
                "full_steps=2", "text_max_length=16"]


def _sample_capture(monkeypatch, argv):
    """sample.main(argv) -> (final latents [N, C, T, H, W] in prompt order, initial noises handed to
    the Euler sampler (phase-1 keyframes or full), the embeddings each sampling batch got, the batch
    sizes the text encoder was called with)."""
    from interpdiff.video import pipeline

    lats, inits, embs, enc_sizes = [], [], [], []
    dec, euler, tps, enc = wan.vae_decode, pipeline.euler_flow_sample, pipeline.two_phase_sample, wan.encode_prompts

    def vae_decode(vae, lat):
        lats.append(lat.detach().clone())
        return dec(vae, lat)

    def euler_flow_sample(velocity, x_T, steps, shift):
        inits.append(x_T.detach().clone())
        return euler(velocity, x_T, steps, shift)

    def two_phase_sample(p1, p2, emb, *a, **k):
        embs.append(emb.detach().clone())
        return tps(p1, p2, emb, *a, **k)

    def encode_prompts(e, t, prompts, *a, **k):
        enc_sizes.append(len(prompts))
        return enc(e, t, prompts, *a, **k)

    monkeypatch.setattr(wan, "vae_decode", vae_decode)
    monkeypatch.setattr(pipeline, "euler_flow_sample", euler_flow_sample)
    monkeypatch.setattr(pipeline, "two_phase_sample", two_phase_sample)
    monkeypatch.setattr(wan, "encode_prompts", encode_prompts)
    sample.main(argv)
    monkeypatch.undo()
    return torch.cat(lats), inits, embs, enc_sizes


def test_sample_noise_is_per_prompt_not_per_batch(tmp_path, monkeypatch):
    """Reference: prompt i's noise comes from its own generator seeded seed * 1_000_003 + i (the
    documented contract), so (a) a prompt's latents are those of the batch_size=1 run whatever
    batch it is in (up to float rounding of batched kernels), (b) the same text at two positions
    gets different noise, (c) prompt i + 1 at seed s is not prompt i at seed s + 1 (the old
    per-batch generator seed + start made those equal), (d) each row's phase-1 / full initial noise
    is torch.randn from exactly that seed."""
    p = "prompts=[a dog runs,a cat sits,a dog runs]"
    one, init1, _, _ = _sample_capture(monkeypatch, [*_TINY_SAMPLE, p, "batch_size=1", f"out_dir={tmp_path / 'b1'}"])
    two, _, embs, sizes = _sample_capture(monkeypatch, [*_TINY_SAMPLE, p, "batch_size=2", f"out_dir={tmp_path / 'b2'}"])
    assert one.shape[0] == two.shape[0] == 3
    torch.testing.assert_close(two, one, rtol=0, atol=1e-4)  # measured 3e-6 (batched CPU matmuls)
    far = 0.1 * float(one.std())
    assert float((one[0] - one[2]).abs().max()) > far  # same text, prompt 0 vs prompt 2
    shifted, _, _, _ = _sample_capture(monkeypatch, [*_TINY_SAMPLE, "prompts=[a dog runs]", "seed=2",
                                                     f"out_dir={tmp_path / 's2'}"])
    assert float((shifted[0] - one[2]).abs().max()) > far  # old code: bit-equal (both seeded 2)
    C, K, H, W = 16, 3, 4, 6
    for i, x in enumerate(init1):  # batch_size=1: one phase-1 initial noise per prompt
        torch.testing.assert_close(x[0], torch.randn((C, K, H, W), generator=torch.Generator().manual_seed(i)),
                                   rtol=0, atol=0)
    # item 4: the text encoder sees at most batch_size prompts at a time, and each batch gets the
    # embeddings of one encoder call over all prompts (padded to text_max_length: batch-independent)
    assert sizes[:2] == [2, 1] and max(sizes) <= 2
    enc, tok = wan.load_text_encoder("tiny", dtype=torch.float32)
    ref = wan.encode_prompts(enc, tok, ["a dog runs", "a cat sits", "a dog runs"], max_length=16)
    torch.testing.assert_close(torch.cat(embs), ref, rtol=0, atol=1e-5)
    # full mode: per-prompt initial noise stacked into the batch, seed 1 -> 1_000_003 + i
    _, initf, _, _ = _sample_capture(monkeypatch, [*_TINY_SAMPLE, "prompts=[a dog runs,a cat sits]", "mode=full",
                                                   "batch_size=2", "seed=1", f"out_dir={tmp_path / 'full'}"])
    assert len(initf) == 1 and initf[0].shape == (2, C, 7, H, W)
    for i in range(2):
        ref_i = torch.randn((C, 7, H, W), generator=torch.Generator().manual_seed(1_000_003 + i))
        torch.testing.assert_close(initf[0][i], ref_i, rtol=0, atol=0)


def test_sample_docstring_tiny_example_runs(tmp_path):
    """The tiny command in sample.py's docstring must run as written (out_dir redirected)."""
    import re
    import shlex

    doc = sample.__doc__.replace("\\\n", " ")
    line = next(ln for ln in doc.splitlines() if "python sample.py model_path=tiny" in ln)
    argv = shlex.split(line.split("python sample.py", 1)[1])
    argv = [a for a in argv if not a.startswith("out_dir=")] + [f"out_dir={tmp_path}", "text_max_length=16"]
    out = sample.main(argv)
    frames = int(re.search(r"num_frames=(\d+)", line).group(1))
    import imageio.v2 as imageio

    assert len(out["videos"]) == 1 and len([f for f in imageio.get_reader(str(out["videos"][0]))]) == frames


@pytest.mark.parametrize("override,match", [
    ("width=0", r"width=0"),
    ("height=-16", r"height=-16"),
    ("text_max_length=0", r"text_max_length=0"),
    ("shift=0", r"shift=0"),
    ("shift=-1", r"shift=-1"),
    ("fps=0", r"fps=0"),
    ("guidance=-2", r"guidance=-2"),
    ("guidance=0.5", r"guidance=0\.5.*>= 1"),
    ("phase1_guidance=0", r"phase1_guidance=0"),
    ("guidance=nan", r"guidance=nan"),
])  # fmt: skip
def test_sample_bad_values_fail_before_models_load(tmp_path, no_model, override, match):
    with pytest.raises(ConfigError, match=match):
        sample.main(["prompts=[x]", "num_frames=25", "phase2.k_min=3", "height=32", "width=64", override,
                     f"out_dir={tmp_path}"])
    from interpdiff.video.pipeline import SampleConfig

    SampleConfig(prompts=["x"], guidance=1.0, phase1_guidance=1.0).validate()  # 1 = no CFG, accepted


@pytest.mark.parametrize("noise", ["level", "constant", "none"])
def test_phase2_refine_per_row_generators_match_corruption_refine(monkeypatch, noise):
    """Reference: ``corruption.refine`` (the shared TACoS loop) with the level-0 noise and the device
    generator built as documented. One generator: the batch equals refine's output exactly; one
    generator per row: row b equals the single-row run with generator b (noise per prompt)."""
    from interpdiff.corruption import level_sigmas, refine
    from interpdiff.masks import uniform_nested_masks
    from interpdiff.video import pipeline
    from interpdiff.video.objectives import Phase2Config

    B, C, T, H, W = 2, 3, 9, 2, 2
    st = pipeline.Phase2Settings.from_phase2_config(Phase2Config(k_min=3, n_levels=3), T, noise=noise, noise_scale=0.7)
    masks = uniform_nested_masks(B, T, st.budgets)
    x_start = torch.randn(B, C, T, H, W, generator=torch.Generator().manual_seed(5))
    emb = torch.zeros(B, 4, 32)

    def fake_restore(model, x_s, mask_B_T, t_B, emb, p2, conf_B_T=None):  # any smooth x0_hat
        return 0.5 * x_s.flip(2) + 0.01 * t_B.view(-1, 1, 1, 1, 1)

    monkeypatch.setattr(pipeline, "phase2_restore", fake_restore)
    got = pipeline.phase2_refine(None, x_start, masks, emb, st, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    sig = level_sigmas(len(st.budgets), st.sigma_max, st.sigma_min)
    x = x_start + float(sig[0]) * torch.randn(x_start.shape, generator=g) * (~masks[:, 0]).float()[:, None, :, None, None]
    dev = None
    if noise != "none":
        dev = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
    t_S = [1000 * (1 - k / T) for k in st.budgets]
    ref = refine(lambda xs, s, m, c: fake_restore(None, xs, m, torch.full((B,), t_S[s]), emb, None), x, masks, time_dim=2,
                 sigmas=sig, noise=noise, noise_scale=st.noise_scale, confidence=st.confidence, generator=dev)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)  # t_S in float64 here
    gens = [torch.Generator().manual_seed(21), torch.Generator().manual_seed(22)]
    rows = pipeline.phase2_refine(None, x_start, masks, emb, st, gens)
    for b, seed in enumerate((21, 22)):
        one = pipeline.phase2_refine(None, x_start[b : b + 1], masks[b : b + 1], emb[b : b + 1], st,
                                     torch.Generator().manual_seed(seed))
        torch.testing.assert_close(rows[b : b + 1], one, rtol=0, atol=0)


def _tiny_dphi(path):
    from interpdiff.video.dphi import DphiSizes, TeacherCostConfig, VideoDphi, save_dphi

    torch.manual_seed(3)
    d = VideoDphi(DphiSizes(text_dim=32, d_model=8, hidden=16, depth=2, n_freq=2, t_ref=9))
    with torch.no_grad():
        d.mlp[-1].bias.fill_(-2.0)  # costs ~ e^-2: finite, sample-dependent through the text
    save_dphi(path, d, TeacherCostConfig())
    return d


def test_keyframe_features_match_the_maze_definition_with_dphi_costs(tmp_path):
    """kp_feat [left_gap, right_gap, t_norm, left_diff, right_diff] at the keyframes, against the
    maze's kp_features on the same mask with D_phi's full predicted cost matrix as pair costs."""
    from interpdiff.video.dphi import TeacherCostConfig
    from interpdiff.video.objectives import keyframe_features
    from maze.prepare_keyframes import kp_features, matrix_pair_cost

    d = _tiny_dphi(tmp_path / "dphi.pt")
    idx = torch.tensor([[0, 2, 3, 7, 8], [0, 1, 5, 6, 8]])
    emb = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(2, 9, dtype=torch.bool).scatter_(1, idx, True)
    cost = d.cost_matrix(emb, 9, TeacherCostConfig())
    ref = kp_features(mask, matrix_pair_cost(cost)).gather(1, idx[..., None].expand(-1, -1, 5))
    got = keyframe_features(idx, emb, d, TeacherCostConfig())
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    assert got[..., 3:].abs().sum() > 0 and not torch.equal(got[0, :, 3:], got[1, :, 3:])
    no_dphi = keyframe_features(idx, emb)
    torch.testing.assert_close(no_dphi[..., :3], ref[..., :3])
    assert float(no_dphi[..., 3:].abs().sum()) == 0.0


def test_phase1_keyframe_features_train_save_and_sample(shards, tmp_path, capsys):
    """phase1.kp_feat=true: the widened phase-1 model starts as the plain one (zero-initialised
    planes), the planes' weights train, the LoRA folder records the widening and the D_phi, and the
    sampler rebuilds a model with the same outputs; without the D_phi it names the key."""
    import shutil

    from interpdiff.video import pipeline
    from interpdiff.video.objectives import ModelConfig, Phase1Config, build_transformer

    _tiny_dphi(tmp_path / "dphi.pt")
    p1 = Phase1Config(kp_feat=True, dphi_ckpt=str(tmp_path / "dphi.pt"))
    spec = ModelConfig(lora=wan.LoraSpec(rank=2, alpha=2))
    plain, widened = build_transformer(spec, 1), build_transformer(spec, 1, p1=p1)
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 16, 4, 4, 6, generator=g), torch.randn(2, 5, 32, generator=g)
    idx, t = torch.tensor([[0, 3, 5, 8], [0, 2, 6, 8]]), torch.tensor([500.0, 250.0])
    with torch.no_grad():
        ref = wan.wan_forward(plain, x, t, emb, frame_idx_B_K=idx)
        torch.testing.assert_close(wan.wan_forward(widened, x, t, emb, frame_idx_B_K=idx), ref, rtol=0, atol=0)

    res = _run(train_phase1, _args(shards, tmp_path / "run", "train.max_steps=3", "train.checkpoint_every=3",
                                   "phase1.kp_feat=true", f"phase1.dphi_ckpt={tmp_path / 'dphi.pt'}",
                                   "train.optim.lr=1e-2"))
    assert res.state.step == 3
    lora = tmp_path / "run" / "checkpoints" / "step_00000003" / "trainable"
    meta = wan.read_lora_meta(lora)
    assert meta["widening"]["channels"] == list(wan.KP_FEAT_CHANNELS)
    assert meta["extra"]["phase1"]["dphi_ckpt"] == str(tmp_path / "dphi.pt")
    cfg = pipeline.SampleConfig(phase1_lora=str(lora), prompts=["x"])
    tr_s = pipeline.load_phase_transformer(cfg, 1, "cpu")
    assert float(wan.unwrap_model(tr_s).patch_embedding.extra_weight.abs().sum()) > 0  # the planes trained
    with torch.no_grad():
        out = wan.wan_forward(tr_s, x, t, emb, frame_idx_B_K=idx)
        wan.set_keyframe_features(tr_s, lambda i, e: torch.zeros(i.shape[0], i.shape[1], 5))
        assert not torch.allclose(wan.wan_forward(tr_s, x, t, emb, frame_idx_B_K=idx), out)  # the features matter
    # the distillation teacher (a frozen adapter on a fresh base) gets the same features
    from interpdiff.video.distill_wan import install_teacher

    teacher = wan.load_transformer("tiny", dtype=torch.float32)
    install_teacher(teacher, lora)
    with torch.no_grad():
        torch.testing.assert_close(wan.wan_forward(teacher, x, t, emb, frame_idx_B_K=idx), out, rtol=1e-5, atol=1e-6)
    shutil.move(tmp_path / "dphi.pt", tmp_path / "elsewhere.pt")
    with pytest.raises(ConfigError, match="phase1_dphi"):
        pipeline.load_phase_transformer(cfg, 1, "cpu")
    with pytest.raises(ConfigError, match="does not exist: pass the D_phi checkpoint as phase1_dphi"):
        pipeline.check_sample_inputs(cfg)  # before any model is loaded
    pipeline.check_sample_inputs(dataclasses.replace(cfg, phase1_dphi=str(tmp_path / "elsewhere.pt")))
    tr_o = pipeline.load_phase_transformer(dataclasses.replace(cfg, phase1_dphi=str(tmp_path / "elsewhere.pt")), 1, "cpu")
    with torch.no_grad():
        torch.testing.assert_close(wan.wan_forward(tr_o, x, t, emb, frame_idx_B_K=idx), out, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="phase1.dphi_ckpt"):
        Phase1Config(kp_feat=True, dphi_ckpt=str(tmp_path / "nope.pt")).validate()


def test_keyframe_feature_runs_record_and_check_their_dphi(shards, tmp_path, monkeypatch, caplog):
    """The D_phi of a kp_feat run is recorded as an absolute path with its sha256: a sampler in
    another folder finds it, a retrained file under the same name is warned about, a resume with
    another D_phi is refused, a D_phi for a LoRA trained without one is refused, and so are a
    model.init_lora of the other kind and a D_phi of another text width."""
    import logging

    from interpdiff.video import pipeline
    from interpdiff.video.distill_wan import install_teacher
    from interpdiff.video.dphi import DphiSizes, TeacherCostConfig, VideoDphi, save_dphi
    from interpdiff.video.objectives import ModelConfig, Phase1Config, build_transformer

    _tiny_dphi(tmp_path / "dphi.pt")
    monkeypatch.chdir(tmp_path)
    common = ["train.checkpoint_every=2", "phase1.kp_feat=true"]
    _run(train_phase1, _args(shards, tmp_path / "run", "train.max_steps=2", *common, "phase1.dphi_ckpt=dphi.pt"))
    lora = tmp_path / "run" / "checkpoints" / "step_00000002" / "trainable"
    meta = wan.read_lora_meta(lora)
    assert meta["extra"]["phase1"]["dphi_ckpt"] == str(tmp_path / "dphi.pt") and meta["extra"]["phase1_dphi_sha256"]
    monkeypatch.chdir(REPO)
    cfg = pipeline.SampleConfig(phase1_lora=str(lora), prompts=["x"])
    pipeline.load_phase_transformer(cfg, 1, "cpu")  # found from another folder
    _tiny_dphi(tmp_path / "other.pt")  # the same weights as dphi.pt
    d2 = torch.load(tmp_path / "other.pt", weights_only=False)
    d2["state"]["mlp.0.bias"] = d2["state"]["mlp.0.bias"] + 1.0  # another D_phi under the old name
    torch.save(d2, tmp_path / "dphi.pt")
    with caplog.at_level(logging.WARNING, logger="interpdiff.video.objectives"):
        pipeline.load_phase_transformer(cfg, 1, "cpu")
    assert "is not the file this phase-1 LoRA was trained with" in caplog.text
    with pytest.raises(CheckpointError, match="keyframe_dphi"):  # the retrained file: another D_phi
        _run(train_phase1, _args(shards, tmp_path / "run", "train.max_steps=4", *common,
                                 f"phase1.dphi_ckpt={tmp_path / 'dphi.pt'}", "--resume", "latest"))
    # a LoRA trained without D_phi costs takes none
    _run(train_phase1, _args(shards, tmp_path / "zeros", "train.max_steps=2", *common))
    zeros = tmp_path / "zeros" / "checkpoints" / "step_00000002" / "trainable"
    with pytest.raises(ConfigError, match="phase1_dphi=.*trained without D_phi costs"):
        pipeline.load_phase_transformer(dataclasses.replace(cfg, phase1_lora=str(zeros),
                                                            phase1_dphi=str(tmp_path / "other.pt")), 1, "cpu")
    # the distillation teacher takes an override for a moved D_phi
    (tmp_path / "dphi.pt").rename(tmp_path / "moved.pt")
    with pytest.raises(ConfigError, match="phase1.dphi_ckpt=..."):
        install_teacher(wan.load_transformer("tiny", dtype=torch.float32), lora)
    assert install_teacher(wan.load_transformer("tiny", dtype=torch.float32), lora,
                           str(tmp_path / "moved.pt"))["dphi_used"] == str(tmp_path / "moved.pt")
    # init_lora of the other kind, a D_phi of another text width
    with pytest.raises(ConfigError, match="phase1.kp_feat=true, this run has phase1.kp_feat=false"):
        build_transformer(ModelConfig(init_lora=str(zeros)), 1, p1=Phase1Config())
    wide = VideoDphi(DphiSizes(text_dim=64, d_model=8, hidden=16, depth=1, n_freq=2, t_ref=9))
    save_dphi(tmp_path / "wide.pt", wide, TeacherCostConfig())
    with pytest.raises(ConfigError, match="64-wide text embeddings, the model's are 32 wide"):
        build_transformer(ModelConfig(), 1, p1=Phase1Config(kp_feat=True, dphi_ckpt=str(tmp_path / "wide.pt")))
