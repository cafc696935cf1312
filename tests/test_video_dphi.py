"""Wan-teacher segment costs, the video D_phi and train_dphi_teacher.py (tiny Wan preset, CPU).

References: a by-hand computation of the teacher cost (explicit per-frame interpolation, a
direct call of the diffusers transformer), a clip that is linear in time (interpolation is exact,
so its cost is zero), brute-force DP over index sets, and the masks' nesting / budget rules.
"""

import itertools
import math

import pytest
import torch

from interpdiff.config import ConfigError, from_dict
from interpdiff.interpolate import interpolate
from interpdiff.io import CheckpointError, save_checkpoint
from interpdiff.masks import budget_schedule
from interpdiff.selection import dp_select_reference, snr_weights
from interpdiff.video import wan
from interpdiff.video.dphi import (
    DphiSizes,
    TeacherCostConfig,
    VideoDphi,
    dp_cost_from_teacher,
    segment_masks,
    load_dphi,
    save_dphi,
    segment_pairs,
    teacher_costs,
)
from interpdiff.video.objectives import PHASE2_POLICIES, KeyframePolicy
from interpdiff.video.train_dphi import DphiTeacherConfig, run, stage_dphi


@pytest.fixture(scope="module")
def teacher():
    return wan.build_tiny_transformer(seed=3).eval()


def _clip(seed=0, T=7):
    g = torch.Generator().manual_seed(seed)
    cfg = wan.tiny_transformer_config()
    return torch.randn(cfg["in_channels"], T, 4, 6, generator=g), torch.randn(5, cfg["text_dim"], generator=g)


def test_teacher_cost_matches_hand_computation(teacher):
    x0, emb = _clip()
    cfg = TeacherCostConfig(t_steps=4, times=[1, 3])
    i, j = 1, 5
    rec = teacher_costs(teacher, x0, emb, cfg, torch.Generator().manual_seed(7), pairs_P_2=torch.tensor([[i, j]]))
    assert rec["cost"].shape == (2, 1) and rec["times"].tolist() == [1, 3]
    t, _ = snr_weights(4, schedule="flow")
    g = torch.Generator().manual_seed(7)
    for s, k in enumerate([1, 3]):
        sig = float(t[k])
        eps = torch.randn(x0.shape, generator=g)
        y = x0.clone()
        for u in range(i + 1, j):  # frame by frame
            a = (u - i) / (j - i)
            y[:, u] = (1 - a) * x0[:, i] + a * x0[:, j]

        def x0_hat(z):
            with torch.no_grad():
                v = teacher(hidden_states=z[None], timestep=torch.tensor([1000 * sig]),
                            encoder_hidden_states=emb[None], return_dict=False)[0][0]
            return z - sig * v

        d = x0_hat((1 - sig) * x0 + sig * eps) - x0_hat((1 - sig) * y + sig * eps)
        want = sum(float(d[:, u].pow(2).mean()) for u in range(i + 1, j))
        assert rec["cost"][s, 0].item() == pytest.approx(want, rel=1e-5)
        assert want > 0


def test_teacher_cost_sums_every_interior_frame_of_a_long_segment(teacher):
    """The video teacher does not sample a segment's frames (selection.segment_costs' docstring,
    METHOD.md's ``segment_cost_samples=16`` option): a segment with 17 interior frames (> 16) costs the
    sum over all 17 of the per-frame squared teacher difference, computed here frame by frame."""
    x0, emb = _clip(4, T=19)
    i, j = 0, 18
    rec = teacher_costs(teacher, x0, emb, TeacherCostConfig(t_steps=4, times=[2]), torch.Generator().manual_seed(5),
                        pairs_P_2=torch.tensor([[i, j]]))
    sig = float(snr_weights(4, schedule="flow")[0][2])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    y = x0.clone()
    for u in range(i + 1, j):
        a = (u - i) / (j - i)
        y[:, u] = (1 - a) * x0[:, i] + a * x0[:, j]
    with torch.no_grad():
        z = torch.stack([(1 - sig) * x0 + sig * eps, (1 - sig) * y + sig * eps])
        v = teacher(hidden_states=z, timestep=torch.full((2,), 1000 * sig),
                    encoder_hidden_states=emb[None].expand(2, -1, -1), return_dict=False)[0]
    d = (z[0] - sig * v[0]) - (z[1] - sig * v[1])
    per_frame = [float(d[:, u].pow(2).mean()) for u in range(i + 1, j)]
    assert len(per_frame) == 17 and min(per_frame) > 0
    assert rec["cost"][0, 0].item() == pytest.approx(sum(per_frame), rel=1e-4)


def test_linear_clip_costs_nothing(teacher):
    """Where x0 is linear in time, I(x0, {i, j}) == x0, so the teacher sees the same input."""
    x0, emb = _clip(1)
    T = x0.shape[1]
    ramp = x0[:, :1] + torch.arange(T).view(1, T, 1, 1) * 0.25 * x0[:, 1:2]
    cfg = TeacherCostConfig(t_steps=3, seg_batch=5)
    lin = teacher_costs(teacher, ramp, emb, cfg, torch.Generator().manual_seed(0))
    rnd = teacher_costs(teacher, x0, emb, cfg, torch.Generator().manual_seed(0))
    assert lin["pairs"].tolist() == segment_pairs(T).tolist() and len(lin["pairs"]) == (T - 1) * (T - 2) // 2
    assert lin["cost"].max() < 1e-9 * rnd["cost"].mean()
    assert (rnd["cost"] > 0).all()
    m = segment_masks(torch.tensor([[0, T - 1], [2, 5]]), T)
    assert m.tolist()[1] == [True, True, True, False, False, True, True][:T]
    torch.testing.assert_close(interpolate(ramp[None].expand(2, -1, -1, -1, -1), m, time_dim=2),
                               ramp[None].expand(2, -1, -1, -1, -1), rtol=1e-6, atol=1e-6)


def test_dp_cost_matrix_from_teacher_record(teacher):
    x0, emb = _clip(2, T=6)
    cfg = TeacherCostConfig(t_steps=3)
    rec = teacher_costs(teacher, x0, emb, cfg, torch.Generator().manual_seed(1))
    c = dp_cost_from_teacher(rec, cfg)
    _, w = snr_weights(3)
    for (i, j), col in zip(rec["pairs"].tolist(), rec["cost"].T):
        assert c[i, j].item() == pytest.approx(float((w / 2 * col.double()).sum()), rel=1e-6)
    assert all(c[i, i + 1] == 0 for i in range(5)) and torch.isinf(c[torch.ones(6, 6, dtype=torch.bool).tril()]).all()
    # a partial record (subset of pairs) cannot make a full DP matrix
    part = teacher_costs(teacher, x0, emb, TeacherCostConfig(t_steps=3, pairs_per_clip=3), torch.Generator().manual_seed(1))
    assert part["cost"].shape == (3, 3)
    with pytest.raises(ValueError, match="every pair"):
        dp_cost_from_teacher(part, cfg)


def _synthetic_records(n: int, T: int = 9, seed: int = 0) -> dict:
    """Costs from a known rule: grows with the gap, scaled by the prompt's cluster and by t."""
    g = torch.Generator().manual_seed(seed)
    cfg = TeacherCostConfig(t_steps=4)
    t, _, idx = cfg.grid()
    pairs = segment_pairs(T)
    gap = (pairs[:, 1] - pairs[:, 0]).float()
    recs = {}
    base = torch.randn(2, 32, generator=g)  # one direction per prompt cluster (LayerNorm keeps directions)
    for c in range(n):
        cluster = c % 2
        emb = torch.zeros(6, 32)
        emb[:4] = base[cluster] + torch.randn(4, 32, generator=g) * 0.1
        scale = 3.0 if cluster else 0.5
        cost = torch.stack([scale * gap ** 2 * (1 + float(t[k])) * 1e-3 for k in idx])
        recs[f"c{c}"] = {"key": f"c{c}", "pairs": pairs, "times": torch.tensor(idx), "cost": cost, "T": T,
                         "emb": emb}
    return recs


def test_dphi_learns_teacher_costs_and_round_trips(tmp_path):
    recs = _synthetic_records(12)
    cfg = from_dict(DphiTeacherConfig, {
        "run_dir": str(tmp_path), "stages": ["dphi"], "device": "cpu", "costs": {"t_steps": 4},
        "net": {"text_dim": 32, "d_model": 16, "hidden": 64, "depth": 2, "t_ref": 9},
        "train": {"steps": 300, "lr": 3e-3, "clips_per_batch": 4, "entries_per_clip": 32, "holdout": 0.25},
        "masks": {"k_min": 3, "n_levels": 3},
    })
    model, summary = stage_dphi(cfg, tmp_path, recs, torch.device("cpu"))
    assert summary["holdout_spearman"] > 0.95
    # the DP on D_phi's costs picks keyframes nearly as good as the DP on the teacher's costs
    assert all(1.0 <= r < 1.1 for r in summary["dp_cost_ratio_dphi_over_teacher"].values())
    loaded, cost_cfg = load_dphi(tmp_path / "dphi.pt")
    emb = recs["c1"]["emb"][None]
    torch.testing.assert_close(loaded.cost_matrix(emb, 9, cost_cfg), model.cost_matrix(emb, 9, cost_cfg))
    # the two clusters differ by their text only: D_phi must tell them apart
    c0 = loaded.cost_matrix(recs["c0"]["emb"][None], 9, cost_cfg)[0, 0, 8]
    c1 = loaded.cost_matrix(recs["c1"]["emb"][None], 9, cost_cfg)[0, 0, 8]
    assert c1 > 3 * c0


def test_dphi_summary_reports_extrapolated_times_and_skipped_dp_ratio(tmp_path):
    """Records at grid indices [1, 2] of t_steps=4 (like costs.times of the Wan config): the DP sums all 4
    times, so D_phi extrapolates to indices 0 and 3. Their weight share, by hand from
    w_k = clip(((1 - t_k) / t_k)^2, 0.1, 10) at t_k = (k + 0.5) / 4, is reported, and the partial
    held-out records are counted as skipped by the DP-ratio check."""
    recs = _synthetic_records(8)
    for r in recs.values():
        r["times"], r["cost"] = r["times"][1:3].clone(), r["cost"][1:3].clone()
    cfg = from_dict(DphiTeacherConfig, {
        "run_dir": str(tmp_path), "stages": ["dphi"], "device": "cpu", "costs": {"t_steps": 4},
        "net": {"text_dim": 32, "d_model": 8, "hidden": 16, "depth": 1, "t_ref": 9},
        "train": {"steps": 2, "clips_per_batch": 2, "entries_per_clip": 4, "holdout": 0.25},
        "masks": {"k_min": 3, "n_levels": 3},
    })
    _, summary = stage_dphi(cfg, tmp_path, recs, torch.device("cpu"))
    w = [min(max(((1 - (k + 0.5) / 4) / ((k + 0.5) / 4)) ** 2, 0.1), 10.0) for k in range(4)]
    assert summary["times_trained"] == [1, 2] and summary["times_extrapolated"] == [0, 3]
    assert summary["weight_extrapolated"] == pytest.approx((w[0] + w[3]) / sum(w), rel=1e-9)
    assert summary["dp_ratio_skipped_partial"] == 2 and "dp_cost_ratio_dphi_over_teacher" not in summary


def test_dphi_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope.*does not exist"):
        load_dphi(tmp_path / "nope")
    save_checkpoint(tmp_path / "other.pt", {}, {"kind": "video-selector"})
    with pytest.raises(CheckpointError, match="not a 'video-dphi'"):
        load_dphi(tmp_path / "other.pt")
    m = VideoDphi(DphiSizes(text_dim=8, d_model=4, hidden=8, depth=1))
    save_dphi(tmp_path / "d.pt", m, TeacherCostConfig(t_steps=2))
    ck = torch.load(tmp_path / "d.pt", weights_only=False)
    ck["meta"]["sizes"]["hidden"] = 16  # weights no longer fit
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="cannot rebuild"):
        load_dphi(tmp_path / "bad.pt")


def test_spearman_handles_ties():
    from interpdiff.video.train_dphi import _spearman

    a = torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0, 3.0])
    assert _spearman(a, a + 0.0) == pytest.approx(1.0)
    assert _spearman(a, -a) == pytest.approx(-1.0)
    b = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])  # scipy.stats.spearmanr(a, b) = 0.9258200997725514
    assert _spearman(a, b) == pytest.approx(0.9258200997725514, rel=1e-9)


def _brute_dp(c: torch.Tensor, K: int) -> float:
    T = c.shape[0]
    best = math.inf
    for mid in itertools.combinations(range(1, T - 1), K - 2):
        idx = (0, *mid, T - 1)
        best = min(best, sum(float(c[a, b]) for a, b in zip(idx, idx[1:])))
    return best


def test_train_dphi_teacher_end_to_end_masks_feed_phase2(tmp_path, capsys):
    from interpdiff.video.make_shards import main as make_shards

    make_shards([f"out_dir={tmp_path / 'data'}", "num_samples=6", "samples_per_shard=3",
                 "latent_shape=[16,7,4,6]", "embed_shape=[8,32]"])
    shards = str(tmp_path / "data" / "shard_*.tar")
    base = ["--config", "configs/video/dphi_teacher_tiny_cpu.yaml", f"data.shards={shards}",
            f"run_dir={tmp_path / 'run'}", "num_clips=6", "costs.t_steps=2", "train.steps=30", "train.log_every=10"]
    from train_dphi_teacher import main

    res = main(base + ["masks.source=teacher"])
    assert res["masks"]["clips"] == 6
    out = capsys.readouterr().out  # the judged numbers reach the console, not only result.json
    assert f"held-out Spearman {res['dphi']['holdout_spearman']:.3f}" in out and "by K: K=" in out, out
    masks = torch.load(tmp_path / "run" / "dp_masks.pt")
    index = torch.load(tmp_path / "run" / "dp_index.pt")
    recs = torch.load(tmp_path / "run" / "teacher_costs.pt", weights_only=False)
    budgets = budget_schedule(7, 3, 3)
    cost_cfg = TeacherCostConfig(t_steps=2)
    for key, m in masks.items():
        assert m.shape == (3, 7) and m.dtype == torch.bool
        assert m.sum(1).tolist() == budgets and m[:, 0].all() and m[:, -1].all()
        assert (m[:-1] <= m[1:]).all()  # nested
        assert torch.equal(index[key], m[0])
        c = dp_cost_from_teacher(recs[key], cost_cfg)
        idx = m[0].nonzero().flatten()
        assert float(c[idx[:-1], idx[1:]].sum()) == pytest.approx(_brute_dp(c, budgets[0]), rel=1e-6)
        assert torch.equal(idx, dp_select_reference(c[None], budgets[0])[0][0])
    # the file is what phase 2's dp_precomputed policy reads
    pol = KeyframePolicy("dp_precomputed:1.0", PHASE2_POLICIES, str(tmp_path / "run" / "dp_masks.pt"), "phase2.policy_mix")
    key = next(iter(masks))
    got, name = pol.masks(torch.zeros(16, 7, 4, 6), key, budgets, torch.Generator().manual_seed(0))
    assert name == "dp_precomputed" and torch.equal(got, masks[key]) and pol.fallbacks == 0
    # stage masks alone with D_phi (costs and dphi reused from the run folder)
    res = main(base + ["stages=[dphi,masks]", "masks.source=dphi"])
    assert res["masks"]["clips"] == 6 and "holdout_spearman" in res["dphi"]
    # the stored costs hold grid indices of t_steps=2: another grid (or teacher) must not reuse them
    with pytest.raises(ConfigError, match=r"teacher_costs.pt: its 6 clips were computed with other settings: "
                                          r"costs.t_steps=4 \(records: 2\)"):
        main(base[:-3] + ["costs.t_steps=4", "train.steps=30", "train.log_every=10", "stages=[costs]"])


def test_masks_stage_refuses_a_dphi_trained_on_another_cost_grid(tmp_path):
    """Stage masks alone loads run_dir/dphi.pt: its DP cost is defined by the grid D_phi was trained on
    (t_steps, s_min, s_max, gamma in the checkpoint). A config with another grid is a ConfigError that
    names every differing key with both values (before anything is written); with the checkpoint's
    grid (``costs.times`` may differ: it does not enter the matrix) the masks are the brute-force DP
    of the hand-built sum ``sum_k w_k / 2 * D_phi(t_k)`` on that grid."""
    from interpdiff.video.make_shards import main as make_shards

    make_shards([f"out_dir={tmp_path / 'data'}", "num_samples=3", "samples_per_shard=3",
                 "latent_shape=[16,7,4,6]", "embed_shape=[8,32]"])
    net = {"text_dim": 32, "d_model": 8, "hidden": 16, "depth": 2, "t_ref": 7}
    torch.manual_seed(0)
    model = VideoDphi(DphiSizes(**net), floor=1e-4)
    (tmp_path / "run").mkdir()
    save_dphi(tmp_path / "run" / "dphi.pt", model, TeacherCostConfig(t_steps=4, s_max=5.0))

    def cfg(costs):
        return from_dict(DphiTeacherConfig, {
            "run_dir": str(tmp_path / "run"), "stages": ["masks"], "device": "cpu", "net": net, "costs": costs,
            "data": {"shards": str(tmp_path / "data" / "shard_*.tar"), "latent_shape": [16, -1, -1, -1]},
            "masks": {"k_min": 3, "n_levels": 3}})

    both = r"costs\.t_steps=16 \(checkpoint: 4\).*costs\.s_max=10\.0 \(checkpoint: 5\.0\)"
    with pytest.raises(ConfigError, match=both):
        run(cfg({}))
    with pytest.raises(ConfigError, match=r"costs\.gamma=2\.0 \(checkpoint: 1\.0\)") as e:
        run(cfg({"t_steps": 4, "s_max": 5.0, "gamma": 2.0}))
    assert "costs.t_steps" not in str(e.value) and not (tmp_path / "run" / "config.yaml").exists()
    res = run(cfg({"t_steps": 4, "s_max": 5.0, "times": [1]}))
    assert res["masks"]["clips"] == 3
    masks = torch.load(tmp_path / "run" / "dp_masks.pt")
    t_k, w_k = snr_weights(4, 0.1, 5.0, 1.0, "flow")
    from interpdiff.video.data import LatentDataConfig, LatentLoader

    loader = LatentLoader(LatentDataConfig(shards=str(tmp_path / "data" / "shard_*.tar"), batch_size=1, num_workers=0,
                                           resampled=False, shuffle_buffer=0, shuffle_shards=False,
                                           partial_batches=True, latent_shape=[16, -1, -1, -1]))
    seen = 0
    with torch.no_grad():
        for b in loader:
            key, emb = b.keys[0], b.emb_B_L_D[:1].float()
            c = torch.full((7, 7), math.inf)
            for i in range(6):
                c[i, i + 1] = 0.0
                for j in range(i + 2, 7):
                    c[i, j] = sum(float(w_k[k]) / 2 * float(model.predict_cost(
                        model.pooled(emb), 7, torch.tensor([[float(i)]]), torch.tensor([[float(j)]]),
                        torch.tensor([[float(t_k[k])]]))) for k in range(4))
            idx = masks[key][0].nonzero().flatten()
            assert float(c[idx[:-1], idx[1:]].sum()) == pytest.approx(_brute_dp(c, 3), rel=1e-5)
            seen += 1
    assert seen == 3


def test_bad_config_is_a_clear_error(tmp_path):
    from train_dphi_teacher import main

    with pytest.raises(ConfigError, match="stages="):
        main(["--config", "configs/video/dphi_teacher_tiny_cpu.yaml", "data.shards=x", "stages=[cost]"])
    with pytest.raises(ConfigError, match="data.shards"):
        main(["--config", "configs/video/dphi_teacher_tiny_cpu.yaml", f"data.shards={tmp_path}/none_*.tar",
              f"run_dir={tmp_path / 'r'}"])
    with pytest.raises(ConfigError, match="no teacher costs"):
        main(["--config", "configs/video/dphi_teacher_tiny_cpu.yaml", "data.shards=x", "stages=[dphi]",
              f"run_dir={tmp_path / 'r2'}"])


def test_trimmed_embeddings_pool_like_the_padded_ones():
    """teacher_costs.pt stores embeddings without their zero padding; padded back to any length in a
    batch, D_phi's pooled text equals the pooled full-length embedding."""
    from interpdiff.video.dphi import DphiSizes, VideoDphi
    from interpdiff.video.train_dphi import pad_stack, trim_padding

    g = torch.Generator().manual_seed(0)
    full = torch.zeros(3, 40, 16)
    for b, n in enumerate([5, 17, 0]):  # the last prompt embeds to all zeros
        full[b, :n] = torch.randn(n, 16, generator=g)
    full[1, 3] = 0  # a zero row inside the prompt stays
    trimmed = [trim_padding(e) for e in full]
    assert [t.shape[0] for t in trimmed] == [5, 17, 1]
    model = VideoDphi(DphiSizes(text_dim=16, d_model=8, hidden=16, depth=1))
    torch.testing.assert_close(model.pooled(pad_stack(trimmed)), model.pooled(full), rtol=1e-6, atol=1e-6)
