"""The shared training loop (interpdiff.training) on a toy task, in one process on CPU.

The toy: a frozen linear base plus a trainable adapter, a noisy-regression loss whose per-sample
noise comes from ``sample_generator(seed, step, key)``. Checked against independent references:
the LR schedule against hand-computed values, the EMA against a manual recursion, a resumed run
against an uninterrupted one (bit-exact on CPU fp32), gradient accumulation against a larger
batch, and the checkpoint folder layout (rotation, atomic temp folders, trainable-only weights).
``make_toy_spec`` is also used by ``test_distributed.py`` for the multi-process runs.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from interpdiff.config import ConfigError, load_config
from interpdiff.io import CheckpointError
from interpdiff.training import (
    EMA,
    OptimConfig,
    TrainLoopConfig,
    TrainSpec,
    list_checkpoints,
    lr_lambda,
    resolve_resume,
    sample_generator,
    sample_seed,
    train,
)

D = 8
N_SAMPLES = 24


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.base = nn.Linear(D, D)
        self.adapter = nn.Linear(D, D)
        with torch.no_grad():
            for p in list(self.base.parameters()) + list(self.adapter.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.base.requires_grad_(False)

    def forward(self, x_B_D):
        return self.base(x_B_D) + self.adapter(torch.tanh(x_B_D))


def make_toy_spec(batch_size: int, rank: int = 0, world: int = 1, seed: int = 0) -> TrainSpec:
    """Rank ``r``'s micro-batch ``i`` holds global positions ``[i*world*bs + r*bs, +bs)`` of a
    per-epoch permutation, so the union over ranks of one step's micro-batches does not depend
    on how the global batch is split."""
    X = torch.randn(N_SAMPLES, D, generator=torch.Generator().manual_seed(1))
    W_true = torch.randn(D, D, generator=torch.Generator().manual_seed(2))

    def batches(epoch, skip):
        order = torch.randperm(N_SAMPLES, generator=torch.Generator().manual_seed(100 + epoch))
        per = world * batch_size
        for i in range(skip, N_SAMPLES // per):
            idx = order[i * per + rank * batch_size : i * per + (rank + 1) * batch_size]
            yield {"x": X[idx], "key": idx}

    def loss_fn(model, batch, step):
        x = batch["x"]
        eps = torch.stack(
            [torch.randn(D, generator=sample_generator(seed, step, int(k))) for k in batch["key"].tolist()]
        ).to(x.device)
        pred = model(x + 0.1 * eps)
        loss = ((pred - x @ W_true) ** 2).mean()
        return loss, {"pred_norm": float(pred.detach().norm())}

    def save_trainable(model, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().cpu() for k, v in model.adapter.state_dict().items()}, folder / "adapter.pt")

    def load_trainable(model, folder: Path):
        sd = torch.load(folder / "adapter.pt")
        model.adapter.load_state_dict(sd)

    return TrainSpec(
        model=Toy(),
        loss_fn=loss_fn,
        batches=batches,
        save_trainable=save_trainable,
        load_trainable=load_trainable,
        meta={"model": "toy", "D": D},
    )


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run_toy(run_dir, **over):
    _reset_accelerate()
    base = dict(
        run_dir=str(run_dir),
        max_steps=6,
        batch_size=4,
        checkpoint_every=100,
        log_every=1,
        tracker="none",
        seed=3,
        ema_decay=0.9,
    )
    optim = dict(lr=0.05, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    optim.update(over.pop("optim", {}))
    base.update(over)
    cfg = load_config(TrainLoopConfig, None, [f"{k}={v}" for k, v in base.items()] + [f"optim.{k}={v}" for k, v in optim.items()])
    spec = make_toy_spec(cfg.batch_size, seed=cfg.seed)
    res = train(cfg, spec)
    return spec.model, res


def test_lr_schedule_matches_hand_computed():
    cfg = OptimConfig(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_lambda(s, cfg, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    # after warmup: 0.1 + 0.9 * 0.5 * (1 + cos(pi * (s - 4) / 10))
    assert lr_lambda(9, cfg, 14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_lambda(14, cfg, 14) == pytest.approx(0.1)
    assert lr_lambda(7, OptimConfig(warmup_steps=0, schedule="constant"), 14) == 1.0


def test_ema_matches_manual_recursion():
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    ema = EMA([("p", p)], decay=0.99)
    ref = p.detach().clone()
    for t, v in enumerate([3.0, -1.0, 0.5]):
        with torch.no_grad():
            p.fill_(v)
        ema.update()
        d = min(0.99, (1 + t) / (10 + t))
        ref = d * ref + (1 - d) * torch.full((2,), v)
    assert torch.allclose(ema.shadow["p"], ref)
    with ema.swapped_in():
        assert torch.allclose(p.detach(), ref)
    assert torch.equal(p.detach(), torch.full((2,), 0.5))


def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, 5, "a") == sample_seed(0, 5, "a")
    assert len({sample_seed(0, s, k) for s in range(4) for k in "abcd"}) == 16


def test_bad_config_and_resume_paths(tmp_path):
    with pytest.raises(ConfigError, match="no_such_key"):
        load_config(TrainLoopConfig, None, ["no_such_key=1"])
    with pytest.raises(ConfigError, match="optim.kind"):
        load_config(TrainLoopConfig, None, ["optim.kind=sgd"])
    with pytest.raises(CheckpointError, match="no such path"):
        resolve_resume(str(tmp_path / "missing"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        resolve_resume(str(tmp_path / "empty"), tmp_path)
    assert resolve_resume("latest", tmp_path / "fresh") is None
    assert resolve_resume("", tmp_path) is None


def test_loss_falls_checkpoint_layout_and_rotation(tmp_path):
    model, res = run_toy(tmp_path / "run", max_steps=12, checkpoint_every=4, keep_last=2, optim={"lr": 0.1})
    assert res.losses[-1] < 0.5 * res.losses[0], res.losses
    ckpts = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000008", "step_00000012"]
    names = {p.name for p in ckpts[-1].iterdir()}
    # trainable weights + optimizer/scheduler/RNG + EMA and train state; no full-model weights
    assert {"trainable", "optimizer.bin", "scheduler.bin", "meta.json", "train_state.json"} <= names, names
    assert not any(n.startswith("model") for n in names), names
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "run" / "checkpoints").iterdir())
    saved = torch.load(ckpts[-1] / "trainable" / "adapter.pt")
    assert torch.equal(saved["weight"], model.adapter.weight.detach())
    # trainable_ema/ holds the EMA shadow in the same format (and the live weights were restored)
    ema = torch.load(ckpts[-1] / "custom_checkpoint_1.pkl", weights_only=False)
    saved_ema = torch.load(ckpts[-1] / "trainable_ema" / "adapter.pt")
    assert torch.equal(saved_ema["weight"], ema["shadow"]["adapter.weight"])
    assert not torch.equal(saved_ema["weight"], saved["weight"])
    st = json.loads((ckpts[-1] / "train_state.json").read_text())
    assert st["step"] == 12 and st["samples_seen"] == 48
    meta = json.loads((ckpts[-1] / "meta.json").read_text())
    assert meta["model"] == "toy" and meta["step"] == 12
    rows = (tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,loss,lr") and len(rows) == 13


def test_logged_rows_average_the_steps_since_the_last_log(tmp_path):
    """metrics.csv: loss = mean of the per-step all-reduced losses since the previous row, the
    task metric likewise, samples_seen counted exactly (per-step values are read in one transfer
    at log/checkpoint steps, not synchronised every step)."""
    _, res = run_toy(tmp_path / "run", max_steps=7, log_every=3, checkpoint_every=5, ema_decay=0.0)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 6, 7]
    windows = [res.losses[0:3], res.losses[3:6], res.losses[6:7]]
    for r, w in zip(rows, windows):
        assert r["loss"] == pytest.approx(sum(w) / len(w), rel=1e-12)
        assert r["samples_seen"] == 4 * r["step"]
        assert r["pred_norm"] > 0
    st = json.loads((tmp_path / "run" / "checkpoints" / "step_00000005" / "train_state.json").read_text())
    assert st["samples_seen"] == 20


def test_resume_equals_uninterrupted(tmp_path):
    """Stop at step 3 (same schedule: ``stop_at_step``) (mid-epoch: 6 micro-batches per epoch with bs 2, accum 2), resume to 8
    (crosses an epoch boundary) == 8 uninterrupted steps, bit for bit on CPU fp32."""
    common = dict(batch_size=2, grad_accum=2, checkpoint_every=3)
    m_full, r_full = run_toy(tmp_path / "full", max_steps=8, **common)
    m_a, _ = run_toy(tmp_path / "split", max_steps=8, stop_at_step=3, **common)
    m_b, r_b = run_toy(tmp_path / "split", max_steps=8, resume="latest", **common)
    assert r_b.state.step == 8 and r_b.state.epoch == r_full.state.epoch
    for (n, p), (_, q) in zip(m_full.adapter.named_parameters(), m_b.adapter.named_parameters()):
        assert torch.equal(p, q), f"{n} differs after resume: max diff {(p - q).abs().max()}"
    assert r_full.losses[3:] == r_b.losses
    # the EMA was restored too: the final checkpoints' EMA shadows agree
    ema_full = torch.load(tmp_path / "full" / "checkpoints" / "step_00000008" / "custom_checkpoint_1.pkl", weights_only=False)
    ema_b = torch.load(tmp_path / "split" / "checkpoints" / "step_00000008" / "custom_checkpoint_1.pkl", weights_only=False)
    assert ema_full["updates"] == ema_b["updates"] == 8
    for k in ema_full["shadow"]:
        assert torch.equal(ema_full["shadow"][k], ema_b["shadow"][k])


def test_grad_accumulation_equals_larger_batch(tmp_path):
    m1, _ = run_toy(tmp_path / "a", max_steps=3, batch_size=4, grad_accum=1, ema_decay=0.0)
    m2, _ = run_toy(tmp_path / "b", max_steps=3, batch_size=2, grad_accum=2, ema_decay=0.0)
    for p, q in zip(m1.adapter.parameters(), m2.adapter.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_explicit_resume_path_without_checkpoint_fails_before_training(tmp_path):
    with pytest.raises(CheckpointError, match="no such path"):
        run_toy(tmp_path / "r", resume=str(tmp_path / "r" / "checkpoints" / "step_00000005"))
    assert not (tmp_path / "r").exists()


def test_bench_train_tiny_runs_and_flop_formula_matches_counter():
    """benchmarks/bench_train.py --tiny end to end; its analytic matmul FLOPs agree with
    torch's FlopCounterMode on the real module (attention is not counted on CPU)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    res = bench.main(["--tiny", "--steps", "1", "--warmup", "0", "--full-steps", "1", "--profile"])
    t = res["train_step"]
    assert t["step_s_median"] > 0 and math.isfinite(t["loss"])
    prof = t["profile"]  # CPU: aten operator self times stand in for the kernels
    assert prof["kernel_s"] > 0 and prof["kernel_s"] == pytest.approx(sum(prof["by_category_s"].values()))
    assert any(k["name"] == "aten::mm" or k["name"] == "aten::addmm" for k in prof["top_kernels"])
    for name, cat in [("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16", "attention"),
                      ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "gemm"), ("nvjet_tst_256x128", "gemm"),
                      ("triton_per_fused__to_copy_add_mul_native_layer_norm_3", "triton (inductor fusions, our kernels)"),
                      ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
                      ("void at::native::elementwise_kernel<128, 2>", "other")]:
        assert bench.kernel_category(name) == cat, name
    assert t["fwd_flop_analytic_matmul"] == pytest.approx(t["fwd_flop_counted"], rel=0.02)
    assert res["sampler"]["two_phase"]["phase2"] > 0 and res["sampler"]["full"]["full"] > 0
    # hand-computed: one block of the 1.3B model without LoRA, L = 21*30*52 tokens, 512 text tokens
    L, d, f, Lt = 21 * 30 * 52, 1536, 8960, 512
    one_block = 8 * L * d * d + 4 * L * L * d + 4 * L * d * d + 4 * Lt * d * d + 4 * L * Lt * d + 4 * L * d * f
    cfg = dict(bench.WAN21_T2V_1_3B, num_layers=1)
    embed = 2 * Lt * (4096 * d + d * d) + 2 * L * 64 * d * 2
    assert bench.wan_forward_flops(cfg, 21, 60, 104, 512) == pytest.approx(one_block + embed, rel=1e-12)


def test_resume_flag_to_override():
    from interpdiff.training import resume_flag_to_override

    assert resume_flag_to_override(["--config", "a.yaml", "--resume", "latest", "x=1"]) == ["--config", "a.yaml", "train.resume=latest", "x=1"]
    assert resume_flag_to_override(["--resume=runs/a/checkpoints/step_00000010"]) == ["train.resume=runs/a/checkpoints/step_00000010"]
    with pytest.raises(ConfigError, match="--resume needs a value"):
        resume_flag_to_override(["--resume"])


def test_data_state_per_rank_roundtrip_and_fallbacks(tmp_path):
    """Each rank's data position round-trips; an older checkpoint without the files keeps the
    (main-process) position already loaded; a corrupt file is a CheckpointError."""
    from interpdiff.training import TrainState, read_data_state, write_data_state

    settings = {"shards": 8, "num_workers": 2, "batch_size": 1, "resampled": False}
    for rank, (ep, pos) in enumerate([(3, 1), (2, 7)]):
        write_data_state(tmp_path, rank, 2, TrainState(step=9, epoch=ep, batches_in_epoch=pos), settings)
    st = TrainState(step=9, epoch=3, batches_in_epoch=1)  # what Accelerate restored: rank 0's
    assert read_data_state(tmp_path, 1, 2, st, dict(settings)) == "rank 1: epoch 2, batch 7"
    assert (st.epoch, st.batches_in_epoch, st.step) == (2, 7, 9)
    empty = tmp_path / "old"
    empty.mkdir()
    st = TrainState(epoch=3, batches_in_epoch=1)
    assert "no data_state_rank1.json" in read_data_state(empty, 1, 2, st)
    assert (st.epoch, st.batches_in_epoch) == (3, 1)
    (tmp_path / "data_state_rank0.json").write_text('{"epoch": 1}')
    with pytest.raises(CheckpointError, match="data_state_rank0.json"):
        read_data_state(tmp_path, 0, 2, TrainState())


def test_data_state_of_another_stream_follows_data_resume(tmp_path):
    """A position counts micro-batches of one stream: with other data settings (here the worker
    count, which changes how the DataLoader interleaves batches) or another world size, an
    epoch-mode run does not resume mid-epoch at a position that now names other batches:
    ``next_epoch`` (default) starts the next epoch, ``restart_epoch`` the same one from its
    start, ``error`` stops naming the change. At an epoch boundary, or for a resampled stream
    (reseeded anyway), the position is kept."""
    from interpdiff.training import TrainState, read_data_state, write_data_state

    old = {"shards": 8, "num_workers": 2, "batch_size": 1, "resampled": False}
    new = dict(old, num_workers=1)
    write_data_state(tmp_path, 0, 2, TrainState(epoch=3, batches_in_epoch=5), old)
    write_data_state(tmp_path, 1, 2, TrainState(epoch=2, batches_in_epoch=0), old)

    st = TrainState()
    msg = read_data_state(tmp_path, 0, 2, st, new)
    assert (st.epoch, st.batches_in_epoch) == (4, 0) and "num_workers 2 -> 1" in msg and "epoch 4 from its start" in msg
    st = TrainState()
    read_data_state(tmp_path, 0, 2, st, new, "restart_epoch")
    assert (st.epoch, st.batches_in_epoch) == (3, 0)
    with pytest.raises(CheckpointError, match=r"data_state_rank0.json holds epoch 3, batch 5 of another data stream "
                                              r"\(num_workers 2 -> 1\).*train.data_resume=next_epoch"):
        read_data_state(tmp_path, 0, 2, TrainState(), new, "error")
    st = TrainState()
    msg = read_data_state(tmp_path, 1, 2, st, new, "error")  # at an epoch boundary: nothing to repeat or drop
    assert (st.epoch, st.batches_in_epoch) == (2, 0) and "num_workers 2 -> 1; at an epoch boundary" in msg
    # the world grew: rank 3 has no file and follows rank 0's (epoch 3 -> 4); rank 1 its own
    st = TrainState()
    assert "world_size 2 -> 4" in read_data_state(tmp_path, 3, 4, st, old)
    assert (st.epoch, st.batches_in_epoch) == (4, 0)
    # a resampled stream keeps its position (it is reseeded from it)
    rs = dict(old, resampled=True)
    write_data_state(tmp_path, 0, 2, TrainState(epoch=0, batches_in_epoch=40), rs)
    st = TrainState()
    assert "resampled, reseeded" in read_data_state(tmp_path, 0, 2, st, dict(rs, num_workers=4))
    assert (st.epoch, st.batches_in_epoch) == (0, 40)
    with pytest.raises(ConfigError, match="train.data_resume='later' is not one of"):
        TrainLoopConfig(data_resume="later").validate()


def test_resume_after_a_lost_checkpoint_logs_each_step_once(tmp_path):
    """A run preempted after logging steps 4-5 but checkpointed at 3 resumes from 3: the rows of
    steps 4-5 are dropped from metrics.csv / metrics.jsonl and logged again, so each file holds
    every step once, with the uninterrupted run's losses."""
    import csv
    import shutil

    common = dict(batch_size=2, grad_accum=2, checkpoint_every=3, log_every=1)
    _, r_full = run_toy(tmp_path / "full", max_steps=8, **common)
    run_toy(tmp_path / "cut", max_steps=8, stop_at_step=5, **common)
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_00000005")  # lost: the next start resumes from 3
    run_toy(tmp_path / "cut", max_steps=8, resume="latest", **common)
    rows = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == pytest.approx(r_full.losses, rel=1e-6)
    with open(tmp_path / "cut" / "metrics.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, 9))


def test_fp16_with_deepspeed_is_refused_before_anything_starts(tmp_path, monkeypatch):
    """DeepSpeed's fp16 mode would cast the trainable weights to fp16: refused in make_accelerator,
    before the Accelerator (and any process group) is created."""
    from interpdiff.training import TrainLoopConfig, make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="mixed_precision=fp16 with DeepSpeed"):
        make_accelerator(TrainLoopConfig(run_dir=str(tmp_path), mixed_precision="fp16"), tmp_path)


def _nan_at(spec: TrainSpec, bad: set[tuple[int, int]], drop: set[tuple[int, int]] = frozenset()) -> TrainSpec:
    """The toy stream with each micro-batch tagged by its ``(epoch, index)``: the loss is NaN (so every
    gradient is NaN) on the ``bad`` ones (a bad batch: a skipped step is drawn again with the next
    one), and the ``drop`` ones are left out of the stream (the reference run)."""
    inner_loss, inner_batches = spec.loss_fn, spec.batches

    def batches(epoch, skip):
        for i, b in enumerate(inner_batches(epoch, skip)):
            if (epoch, skip + i) not in drop:
                yield dict(b, pos=(epoch, skip + i))

    def loss_fn(model, batch, step):
        loss, extra = inner_loss(model, batch, step)
        return (loss * float("nan") if tuple(batch["pos"]) in bad else loss), extra

    spec.loss_fn, spec.batches = loss_fn, batches
    return spec


def test_nonfinite_step_is_skipped_and_a_run_of_them_stops_before_saving(tmp_path):
    """A NaN loss on the 4th micro-batch: that update, its LR step and its EMA update are skipped, so
    the run equals the same run without that batch (reference: a spec whose stream drops it);
    the weights and every checkpoint stay finite. ``max_nonfinite_steps`` NaN steps in a row stop
    the run with ``NonFiniteError`` and the checkpoints written before are intact."""
    from interpdiff.training import NonFiniteError

    def run(run_dir, bad, drop=frozenset(), **over):
        _reset_accelerate()
        base = dict(run_dir=str(run_dir), max_steps=6, batch_size=4, checkpoint_every=2, log_every=1, tracker="none",
                    seed=3, ema_decay=0.9, keep_last=5, **over)
        cfg = load_config(TrainLoopConfig, None, [f"{k}={v}" for k, v in base.items()] + ["optim.lr=0.05"])
        spec = _nan_at(make_toy_spec(cfg.batch_size, seed=cfg.seed), bad, drop)
        return spec.model, train(cfg, spec)

    model, res = run(tmp_path / "nan", {(0, 3)})
    ref_model, ref = run(tmp_path / "ref", set(), drop={(0, 3)})
    assert res.state.skipped_steps == 1 and res.state.step == 6
    assert torch.allclose(model.adapter.weight, ref_model.adapter.weight, atol=1e-6)
    for ck in (tmp_path / "nan" / "checkpoints").glob("step_*"):
        for name in ("trainable", "trainable_ema"):
            sd = torch.load(ck / name / "adapter.pt")
            assert all(torch.isfinite(v).all() for v in sd.values()), (ck, name)
    assert [r["skipped_steps"] for r in map(json.loads, (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines())][-1] == 1
    with pytest.raises(NonFiniteError, match="3 optimizer steps in a row"):
        run(tmp_path / "stop", {(0, 4), (0, 5), (1, 0)}, max_nonfinite_steps=3)
    ckpts = sorted(p.name for p in (tmp_path / "stop" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000002", "step_00000004"]


def test_check_finite_weights_refuses_to_save_nan():
    from accelerate import Accelerator

    from interpdiff.training import NonFiniteError, check_finite_weights

    _reset_accelerate()
    acc = Accelerator(cpu=True)
    m = Toy()
    check_finite_weights(acc, m, 1)
    with torch.no_grad():
        m.adapter.bias[2] = float("inf")
    with pytest.raises(NonFiniteError, match=r"step 7: 1 trainable tensor.*adapter.bias"):
        check_finite_weights(acc, m, 7)
    with torch.no_grad():
        m.base.weight[0, 0] = float("nan")  # frozen: not saved, not checked
        m.adapter.bias[2] = 0.0
    check_finite_weights(acc, m, 8)


def test_new_run_in_a_used_run_dir_is_refused_unless_overwrite(tmp_path):
    """A fresh run where another run left checkpoints would mix with it: refused, naming the
    folder and the ways out; ``overwrite=true`` deletes that run's outputs and starts over;
    ``resume=latest`` continues it."""
    run_toy(tmp_path, max_steps=4, checkpoint_every=2)
    assert (tmp_path / "metrics.csv").is_file()
    with pytest.raises(ConfigError, match=r"holds the checkpoints of an earlier run \(2, newest step_00000004\).*"
                                          r"train.resume=latest.*train.overwrite=true"):
        run_toy(tmp_path, max_steps=4, checkpoint_every=2)
    _, res = run_toy(tmp_path, max_steps=2, checkpoint_every=2, overwrite="true")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]
    assert [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    with pytest.raises(ConfigError, match="choose one"):
        TrainLoopConfig(overwrite=True, resume="latest").validate()


@pytest.mark.parametrize("key,value", [("lr", "nan"), ("lr", "0"), ("beta2", "1.5"), ("eps", "0"),
                                       ("weight_decay", "-0.1"), ("grad_clip", "nan"), ("min_lr_ratio", "-1"),
                                       ("min_lr_ratio", "5"), ("warmup_steps", "-1")])
def test_optimizer_settings_out_of_range_are_refused(key, value):
    with pytest.raises(ConfigError, match=f"train.optim.{key}"):
        load_config(TrainLoopConfig, None, [f"optim.{key}={value}"])


def test_set_deterministic_sets_cublas_and_torch_switches(monkeypatch):
    """deterministic=true: CUBLAS_WORKSPACE_CONFIG (METHOD.md: needed before any cuBLAS call) and
    torch's deterministic-algorithms switch in warn-only mode; false changes nothing."""
    from interpdiff.training import set_deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert set_deterministic(False) == [] and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    prev = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        done = set_deterministic(True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and done[0] == "CUBLAS_WORKSPACE_CONFIG=:4096:8"
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(prev[0])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev[1], prev[2]


def test_checkpoint_files_are_fsynced_before_the_folder_is_renamed(tmp_path, monkeypatch):
    """torch.save / Accelerate do not fsync: every file of a checkpoint is synced under its temp
    folder before the rename publishes it, and the rename itself is synced (the parent folder)
    before rotation may delete an older checkpoint."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", f"{os.fspath(src)} -> {os.fspath(dst)}"))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    run_toy(tmp_path / "run", max_steps=4, checkpoint_every=4, keep_last=1)
    root = (tmp_path / "run" / "checkpoints").resolve()
    final = root / "step_00000004"
    tmp = root / ".tmp-step_00000004"
    i_pub = next(i for i, (k, v) in enumerate(events) if k == "replace" and v == f"{tmp} -> {final}")
    synced = {v for k, v in events[:i_pub] if k == "fsync"}
    files = [p for p in final.rglob("*") if p.is_file()]
    assert len(files) >= 6, files
    # a file written by atomic_write_* is synced under its own temp name, then renamed into place
    renamed_in = {v.split(" -> ")[1]: v.split(" -> ")[0] for k, v in events[:i_pub] if k == "replace"}
    missing = [str(p) for p in files if str(tmp / p.relative_to(final)) not in synced
               and renamed_in.get(str(tmp / p.relative_to(final))) not in synced]
    assert not missing, f"not fsynced before the rename: {missing}"
    assert str(tmp) in synced and str(tmp / "trainable") in synced  # folder entries too
    assert ("fsync", str(root)) in events[i_pub + 1:]


def test_one_batch_check_out_of_memory_names_the_switch(tmp_path):
    _reset_accelerate()
    cfg = load_config(TrainLoopConfig, None, [f"run_dir={tmp_path / 'run'}", "max_steps=2", "batch_size=4",
                                              "tracker=none", "ema_decay=0"])
    spec = make_toy_spec(cfg.batch_size, seed=cfg.seed)

    def oom(model, batch, step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    spec.loss_fn = oom
    with pytest.raises(torch.OutOfMemoryError, match=r"train\.check_batch=false.*Tried to allocate 9\.00 GiB"):
        train(cfg, spec)
    assert list_checkpoints(tmp_path / "run" / "checkpoints") == []


def test_resume_of_another_kind_of_run_is_refused_before_loading_and_keeps_config_yaml(tmp_path):
    """``TrainSpec.resume_keys``: a checkpoint whose meta disagrees (another phase, another LoRA
    rank) is refused naming each key and both values; the run's config.yaml is not replaced by
    the failing run's config (it is written only once a resume has loaded)."""
    run = tmp_path / "run"

    def go(phase, rank, lr, resume=""):
        _reset_accelerate()
        over = [f"run_dir={run}", "max_steps=4", "batch_size=4", "tracker=none", "checkpoint_every=4",
                "ema_decay=0", f"optim.lr={lr}"] + ([f"resume={resume}"] if resume else [])
        cfg = load_config(TrainLoopConfig, None, over)
        spec = make_toy_spec(cfg.batch_size, seed=cfg.seed)
        spec.meta = {"phase": phase, "lora": {"rank": rank, "dropout": 0.0}}
        spec.resume_keys = ("phase", "lora.rank")
        return train(cfg, spec, full_config=cfg)

    go(1, 4, 0.01)
    first = (run / "config.yaml").read_text()
    assert "lr: 0.01" in first
    with pytest.raises(CheckpointError) as e:
        go(2, 8, 0.02, resume="latest")
    msg = str(e.value)
    assert "step_00000004" in msg and "phase = 1 in the checkpoint, 2 in this run" in msg
    assert "lora.rank = 4 in the checkpoint, 8 in this run" in msg
    assert (run / "config.yaml").read_text() == first
    # same kind of run (only an ignored key and the lr differ): resumes, then config.yaml is the new one
    _reset_accelerate()
    cfg = load_config(TrainLoopConfig, None, [f"run_dir={run}", "max_steps=6", "batch_size=4", "tracker=none",
                                              "checkpoint_every=100", "ema_decay=0", "optim.lr=0.03", "resume=latest"])
    spec = make_toy_spec(cfg.batch_size, seed=cfg.seed)
    spec.meta = {"phase": 1, "lora": {"rank": 4, "dropout": 0.1}}
    spec.resume_keys = ("phase", "lora.rank")
    res = train(cfg, spec, full_config=cfg)
    assert res.state.step == 6 and "lr: 0.03" in (run / "config.yaml").read_text()


def test_resume_with_more_steps_says_the_schedule_is_recomputed(tmp_path, capsys):
    run_toy(tmp_path / "run", max_steps=4, checkpoint_every=4, optim={"min_lr_ratio": 0.0})
    capsys.readouterr()
    run_toy(tmp_path / "run", max_steps=8, checkpoint_every=4, resume="latest", optim={"min_lr_ratio": 0.0})
    out = capsys.readouterr().out
    # warm-up 2 steps, cosine to 0: at step 4 of 4 the factor is 0; of 8 it is 0.5 * (1 + cos(pi * 2 / 6)) = 0.75
    assert "trained toward train.max_steps=4, this run to 8" in out and "lr factor 0 -> 0.75" in out, out


def test_rotation_never_leaves_a_partial_checkpoint_under_a_step_name(tmp_path, monkeypatch):
    """A kill in the middle of deleting a rotated-out checkpoint (here: rmtree stops after one file)
    must not leave a folder that ``list_checkpoints`` takes for complete: it is renamed first."""
    import shutil as _shutil

    import interpdiff.training as T

    real = _shutil.rmtree

    def killed(path, ignore_errors=False, **k):  # deletes one file, then "dies" (the error is swallowed)
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        if files:
            files[0].unlink()
        return None

    run_toy(tmp_path / "run", max_steps=4, checkpoint_every=2, keep_last=2)
    monkeypatch.setattr(T.shutil, "rmtree", killed)
    run_toy(tmp_path / "run", max_steps=6, checkpoint_every=2, keep_last=2, resume="latest")
    monkeypatch.setattr(T.shutil, "rmtree", real)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step_00000004", "step_00000006"]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == ["step_00000004", "step_00000006"]
    assert [p.name for p in root.iterdir() if p.name.startswith(".del-step_00000002")]  # left hidden by the "kill"
    run_toy(tmp_path / "run", max_steps=8, checkpoint_every=2, keep_last=2, resume="latest")
    assert not list(root.glob(".del-*"))  # removed by the next save


def test_resume_compares_lora_targets_as_a_set_and_skips_keys_older_checkpoints_lack(tmp_path):
    run = tmp_path / "run"

    def go(meta, steps):
        _reset_accelerate()
        cfg = load_config(TrainLoopConfig, None, [f"run_dir={run}", f"max_steps={steps}", "batch_size=4",
                                                  "tracker=none", "checkpoint_every=2", "ema_decay=0"]
                          + (["resume=latest"] if steps > 2 else []))
        spec = make_toy_spec(cfg.batch_size, seed=cfg.seed)
        spec.meta, spec.resume_keys = meta, ("lora.target_modules", "teacher_id")
        return train(cfg, spec)

    go({"lora": {"target_modules": ["to_q", "to_k"]}}, 2)  # no teacher_id recorded (older code)
    res = go({"lora": {"target_modules": ["to_k", "to_q"]}, "teacher_id": "abc"}, 4)
    assert res.state.step == 4
    with pytest.raises(CheckpointError, match=r"teacher_id = 'abc' in the checkpoint, 'def' in this run"):
        go({"lora": {"target_modules": ["to_k", "to_q"]}, "teacher_id": "def"}, 6)


def test_resuming_an_older_checkpoint_needs_rewind_which_keeps_the_newer_ones(tmp_path):
    run_toy(tmp_path / "run", max_steps=6, checkpoint_every=2, keep_last=3)
    root = tmp_path / "run" / "checkpoints"
    rows = (tmp_path / "run" / "metrics.csv").read_text()
    with pytest.raises(CheckpointError, match=r"holds newer checkpoints \(step_00000004, step_00000006\).*train\.rewind=true"):
        run_toy(tmp_path / "run", max_steps=6, checkpoint_every=2, keep_last=3, resume=str(root / "step_00000002"))
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002", "step_00000004", "step_00000006"]
    assert (tmp_path / "run" / "metrics.csv").read_text() == rows
    run_toy(tmp_path / "run", max_steps=4, checkpoint_every=2, keep_last=3, resume=str(root / "step_00000002"),
            rewind="true")
    (kept,) = root.glob("rewound_*")
    assert sorted(p.name for p in kept.iterdir()) == ["metrics.csv", "metrics.jsonl", "step_00000004", "step_00000006"]
    assert (kept / "metrics.csv").read_text() == rows
    assert (kept / "step_00000006" / "train_state.json").is_file()
    assert [p.name for p in list_checkpoints(root)] == ["step_00000002", "step_00000004"]


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_at_start(tmp_path):
    def go(*over, empty=False):
        _reset_accelerate()
        cfg = load_config(TrainLoopConfig, None, [f"run_dir={tmp_path / 'run'}", "max_steps=2", "batch_size=4",
                                                  "tracker=none", "checkpoint_every=2", *over])
        spec = make_toy_spec(cfg.batch_size, seed=cfg.seed)
        if empty:
            spec.batches = lambda epoch, skip: iter(())  # a data set that yields nothing
        return train(cfg, spec, full_config=cfg)

    go("optim.lr=0.01")
    before = (tmp_path / "run" / "config.yaml").read_text()
    assert "lr: 0.01" in before
    with pytest.raises(RuntimeError, match="yielded no batch"):
        go("optim.lr=0.02", "overwrite=true", empty=True)
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000002"]
    assert (tmp_path / "run" / "metrics.csv").is_file()
    assert (tmp_path / "run" / "config.yaml").read_text() == before
    go("optim.lr=0.02", "overwrite=true")  # a start that works does replace the run
    assert "lr: 0.02" in (tmp_path / "run" / "config.yaml").read_text()


def test_a_damaged_checkpoint_file_is_named_with_the_older_one_to_resume(tmp_path):
    run_toy(tmp_path / "run", max_steps=4, checkpoint_every=2, keep_last=2)
    root = tmp_path / "run" / "checkpoints"
    opt = root / "step_00000004" / "optimizer.bin"
    good = opt.read_bytes()
    opt.write_bytes(good[:40])
    with pytest.raises(CheckpointError, match=r"(?s)cannot load checkpoint .*step_00000004.*damaged; resume an older "
                                              r"one with --resume .*step_00000002 train\.rewind=true"):
        run_toy(tmp_path / "run", max_steps=6, checkpoint_every=2, resume="latest")
    # the advice works: the damaged newest is moved aside (after the older one loaded) and training goes on
    _, res = run_toy(tmp_path / "run", max_steps=6, checkpoint_every=2, resume=str(root / "step_00000002"), rewind="true")
    assert res.state.step == 6 and [p.name for p in root.glob("rewound_*/step_*")] == ["step_00000004"]
    opt = next(root.glob("rewound_*")) / "step_00000004" / "optimizer.bin"
    opt.unlink()
    with pytest.raises(CheckpointError, match=r"step_00000004.*(optimizer|No such file)"):
        run_toy(tmp_path / "other", max_steps=8, checkpoint_every=2, resume=str(opt.parent))


def test_a_failed_checkpoint_save_is_named_and_keeps_the_earlier_ones(tmp_path, monkeypatch):
    """Disk full inside torch.save (seen as "unexpected pos ... vs ..." from its zip writer)."""
    import accelerate

    run_toy(tmp_path / "run", max_steps=2, checkpoint_every=2)
    real = accelerate.Accelerator.save_state

    def full(self, output_dir=None, **kw):
        real(self, output_dir, **kw)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 25663 vs 25616")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full)
    with pytest.raises(CheckpointError, match=r"(?s)step 4 into .*\.tmp-step_00000004 failed.*disk looks full.*untouched"):
        run_toy(tmp_path / "run", max_steps=4, checkpoint_every=2, resume="latest")
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step_00000002"]
