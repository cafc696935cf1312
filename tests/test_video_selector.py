"""Video keyframe selector (interpdiff.video.selector, interpdiff.video.train_selector) and its wiring
into the phase-1/phase-2 index policies and sample.py (CPU, tiny sizes).

References: nested decoding against a brute-force search over keyframe subsets; the losses
against hand-written formulas; condition-following against hand-made labels that depend on the
prompt (two prompt clusters with different keyframe placements, METHOD.md section 6: a
condition-blind selector cannot match both); checkpoint round trips against the saved model's
own outputs; the policy and sampler wiring against the same hand-made labels.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch

from interpdiff.config import ConfigError
from interpdiff.io import CheckpointError, save_checkpoint
from interpdiff.video import wan
from interpdiff.video.data import encode_latent_sample
from interpdiff.video.make_shards import write_shard
from interpdiff.video.selector import (
    LevelRule,
    SelectorSizes,
    VideoSelector,
    load_selector,
    save_selector,
    select_nested,
    selector_loss,
)

REPO = Path(__file__).resolve().parents[1]
T, L, D = 9, 16, 32  # latent frames, text tokens, text width (the tiny UMT5)
BUDGETS = [3, 5, 9]  # budget_schedule(9, 3, 3): the phase-2 rule of configs/video/tiny_cpu.yaml
LABELS = {  # per cluster: level-0 and level-1 keyframes (nested); level 2 = all frames
    "a": ([0, 2, 8], [0, 1, 2, 3, 8]),
    "b": ([0, 6, 8], [0, 5, 6, 7, 8]),
}
UNIFORM = ([0, 4, 8], [0, 2, 4, 6, 8])  # uniform_nested_masks(1, 9, [3, 5, 9]) levels 0 and 1


def _reset_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _mask(idx: list[int]) -> torch.Tensor:
    m = torch.zeros(T, dtype=torch.bool)
    m[idx] = True
    return m


def _label_stack(cluster: str) -> torch.Tensor:
    l0, l1 = LABELS[cluster]
    return torch.stack([_mask(l0), _mask(l1), torch.ones(T, dtype=torch.bool)])  # (S, T)


def _directions() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    return {c: torch.randn(D, generator=g) for c in LABELS}


def _embedding(cluster: str, g: torch.Generator) -> torch.Tensor:
    """Cluster direction + per-token noise on a random prompt length, zero rows after (UMT5 padding)."""
    n = int(torch.randint(3, L + 1, (1,), generator=g))
    emb = torch.zeros(L, D)
    emb[:n] = _directions()[cluster] + 0.7 * torch.randn(n, D, generator=g)
    return emb


def _cluster_of(emb_L_D: torch.Tensor) -> str:
    dirs = _directions()
    pooled = emb_L_D.float().sum(0)
    return max(dirs, key=lambda c: float(pooled @ dirs[c]))


@pytest.fixture(scope="module")
def cluster_data(tmp_path_factory):
    """32 samples in 4 shards, clusters alternating; labels file {key: bool [S, T]}."""
    out = tmp_path_factory.mktemp("cluster_shards")
    g = torch.Generator().manual_seed(0)
    table, samples = {}, []
    for i in range(32):
        c = "ab"[i % 2]
        key = f"s{i:04d}{c}"
        lat = torch.randn(16, T, 4, 6, generator=g).to(torch.bfloat16)
        samples.append(encode_latent_sample(key, lat, _embedding(c, g).to(torch.bfloat16), f"cluster {c}"))
        table[key] = _label_stack(c)
    for s in range(4):
        write_shard(out / f"shard_{s:06d}.tar", samples[8 * s : 8 * s + 8])
    torch.save(table, out / "dp_masks.pt")
    return {"shards": str(out / "shard_*.tar"), "labels": str(out / "dp_masks.pt"), "dir": out}


@pytest.fixture(scope="module")
def trained(cluster_data, tmp_path_factory):
    from interpdiff.video import train_selector

    run = tmp_path_factory.mktemp("selector_run")
    _reset_accelerate()
    res = train_selector.main([
        "--config", str(REPO / "configs/video/selector_tiny_cpu.yaml"), f"data.shards={cluster_data['shards']}",
        f"train.run_dir={run}", "train.tracker=none", "train.max_steps=120", "train.batch_size=8",
        "train.checkpoint_every=120", "train.validate_every=60", "train.log_every=20", "eval_batches=2",
        "labels.source=dp_precomputed", f"labels.file={cluster_data['labels']}",
    ])  # fmt: skip
    return {"run": run, "res": res, "path": run / "selector.pt"}


def _tiny_selector(seed: int = 0, **kw) -> VideoSelector:
    torch.manual_seed(seed)
    sizes = dict(text_dim=D, d_model=32, heads=4, depth=1, ffn_mult=2, n_freq=4)
    sizes.update(kw)
    return VideoSelector(SelectorSizes(**sizes), LevelRule(k_min=3, n_levels=3))


# --- decoding and losses --------------------------------------------------------------------------


def _brute_force_nested(logits_S_T: torch.Tensor, budgets: list[int]) -> list[set[int]]:
    """Level s: the previous level plus the (K_s - K_{s-1})-subset of the free frames with the largest
    sum of level-s logits (endpoints first), by enumeration."""
    n = logits_S_T.shape[1]
    have: set[int] = {0, n - 1}
    out = []
    for s, k in enumerate(budgets):
        free = [t for t in range(n) if t not in have]
        best = max(itertools.combinations(free, k - len(have)), key=lambda c: float(logits_S_T[s, list(c)].sum()))
        have = have | set(best)
        out.append(set(have))
    return out


@pytest.mark.parametrize("n,budgets", [(8, [3, 5, 8]), (10, [2, 4, 7, 10]), (7, [4, 6])])
def test_select_nested_matches_brute_force(n, budgets):
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(5, len(budgets), n, generator=g)
    masks = select_nested(logits, budgets)
    assert masks.shape == (5, len(budgets), n) and masks.dtype == torch.bool
    for b in range(5):
        ref = _brute_force_nested(logits[b], budgets)
        for s, k in enumerate(budgets):
            got = set(masks[b, s].nonzero().flatten().tolist())
            assert got == ref[s], (b, s, got, ref[s])
            assert len(got) == k and {0, n - 1} <= got  # exact budget, endpoints set
            if s:
                assert set(masks[b, s - 1].nonzero().flatten().tolist()) <= got  # nested
    # the list form (one [B, T] per level) decodes the same
    assert torch.equal(select_nested([logits[:, s] for s in range(len(budgets))], budgets), masks)


def test_losses_against_hand_formulas():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, T, generator=g)
    m = torch.stack([_mask([0, 2, 8]), _mask([0, 6, 8]), _mask([0, 4, 8])])
    K = 3
    bce, soft = [], []
    for b in range(3):
        terms, weights, logp = [], [], []
        z = logits[b, 1:-1]
        lse = math.log(sum(math.exp(float(v)) for v in z))
        for t in range(1, T - 1):
            p = 1 / (1 + math.exp(-float(logits[b, t])))
            y = float(m[b, t])
            w = (T - K) / (K - 2) if y else 1.0
            terms.append(-w * (y * math.log(p) + (1 - y) * math.log(1 - p)))
            weights.append(w)
            if y:
                logp.append(float(logits[b, t]) - lse)
        bce.append(sum(terms) / sum(weights))
        soft.append(-sum(logp) / (K - 2))
    assert float(selector_loss(logits, m, "bce")) == pytest.approx(sum(bce) / 3, rel=1e-5)
    assert float(selector_loss(logits, m, "softmax")) == pytest.approx(sum(soft) / 3, rel=1e-5)
    keep = torch.tensor([True, False, True])
    assert float(selector_loss(logits, m, "bce", keep)) == pytest.approx((bce[0] + bce[2]) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="nothing to learn"):
        selector_loss(logits, torch.stack([_mask([0, 8])] * 3))


def _bce_hand(logits_T: torch.Tensor, idx: list[int], K: int) -> float:
    """Balanced interior BCE of one row, written out term by term (test_losses_against_hand_formulas)."""
    terms, weights = [], []
    for t in range(1, T - 1):
        p = 1 / (1 + math.exp(-float(logits_T[t])))
        y = 1.0 if t in idx else 0.0
        w = (T - K) / (K - 2) if y else 1.0
        terms.append(-w * (y * math.log(p) + (1 - y) * math.log(1 - p)))
        weights.append(w)
    return sum(terms) / sum(weights)


def test_unlabelled_first_row_is_left_out_not_fatal(tmp_path):
    """dp_precomputed: a sample without a label gets an all-zero row. When it is row 0, the budget
    must still come from the level rule (not from row 0): the loss is the hand BCE of the labelled
    rows, the overlap skips the unlabelled row, a batch with no label gives a zero loss that still
    reaches every logit (DDP / ZeRO sync the same graph), and the training loss function counts it."""
    from interpdiff.video.train_selector import DPLabels, LabelConfig, SelectorTrainConfig, build_selector, \
        level_overlap, make_loss

    # the trainer's loss function with row 0's key missing from the labels file
    torch.save({"b": _label_stack("b")}, tmp_path / "dp.pt")
    cfg = SelectorTrainConfig(net=SelectorSizes(text_dim=D, d_model=32, heads=4, depth=1, ffn_mult=2, n_freq=4),
                              levels=LevelRule(budgets=BUDGETS),
                              labels=LabelConfig(source="dp_precomputed", file=str(tmp_path / "dp.pt")))
    labels = DPLabels(cfg.labels)
    loss_fn, model = make_loss(cfg, labels), build_selector(cfg)
    ge = torch.Generator().manual_seed(4)
    emb = torch.stack([_embedding("a", ge), _embedding("b", ge)])
    batch = {"lat": torch.zeros(2, 4, T, 2, 2), "emb": emb, "keys": ["a", "b"]}
    loss, info = loss_fn(model, batch, 0)
    s = BUDGETS.index(round(info["level"] * T))  # the level the step drew (K = 3 or 5; K = T trains nothing)
    with torch.no_grad():
        ref = _bce_hand(model(emb, T, torch.full((2,), BUDGETS[s] / T))[1], LABELS["b"][s][1:-1], BUDGETS[s])
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-5) and info["label_missing"] == 1.0
    loss, info = loss_fn(model, {**batch, "keys": ["a", "c"]}, 1)
    assert float(loss.detach()) == 0.0 and info["batch_unlabelled"] == 1.0 and info["label_missing"] == 3.0
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # selector_loss / level_overlap directly, row 0 unlabelled (all zero), K = 4
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, T, generator=g)
    m = torch.stack([torch.zeros(T, dtype=torch.bool), _mask([0, 2, 6, 8]), _mask([0, 3, 4, 8])])
    keep = torch.tensor([False, True, True])
    want = (_bce_hand(logits[1], [2, 6], 4) + _bce_hand(logits[2], [3, 4], 4)) / 2
    assert float(selector_loss(logits, m, "bce", keep, K=4)) == pytest.approx(want, rel=1e-5)
    assert float(selector_loss(logits, m, "bce", keep)) == pytest.approx(want, rel=1e-5)  # K from a kept row
    # overlap: top-2 interior logits of each labelled row against its keyframes, by hand; row 0 -> 0
    for b, idx in ((1, [2, 6]), (2, [3, 4])):
        top2 = sorted(range(1, T - 1), key=lambda t: -float(logits[b, t]))[:2]
        assert float(level_overlap(logits, m, 4, keep)[b]) == pytest.approx(len(set(top2) & set(idx)) / 2)
    assert float(level_overlap(logits, m, 4, keep)[0]) == 0.0
    # no labelled row: zero loss, gradient defined (all zeros) on every logit
    lg = logits.clone().requires_grad_(True)
    none = selector_loss(lg, torch.zeros(3, T, dtype=torch.bool), "softmax", torch.zeros(3, dtype=torch.bool), K=4)
    none.backward()
    assert float(none.detach()) == 0.0 and lg.grad is not None and torch.equal(lg.grad, torch.zeros(3, T))


def test_padding_rows_do_not_change_the_logits():
    """Zero rows past the prompt are padding: appending more of them leaves the logits unchanged."""
    sel = _tiny_selector().eval()
    g = torch.Generator().manual_seed(2)
    emb = torch.stack([_embedding("a", g), _embedding("b", g)])
    longer = torch.cat([emb, torch.zeros(2, 7, D)], 1)
    lv = torch.tensor([3 / T, 5 / T])
    torch.testing.assert_close(sel(emb, T, lv), sel(longer, T, lv), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(sel(torch.zeros(2, L, D), T, lv)).all()  # an all-padding prompt stays defined


# --- condition-following training ------------------------------------------------------------------


def _overlap(mask_T: torch.Tensor, ref: list[int]) -> float:
    got = set(mask_T.nonzero().flatten().tolist()) - {0, T - 1}
    want = set(ref) - {0, T - 1}
    return len(got & want) / len(want)


def test_selector_follows_the_prompt(trained):
    """On 40 new prompts (fresh noise and lengths) the decoded keyframes of each cluster match that
    cluster's labels, at both levels; uniform masks overlap 0 (level 0) and 1/3 (level 1), and a
    condition-blind selector (one set for all prompts) can average at most 1/2 at level 0."""
    sel = load_selector(trained["path"])
    g = torch.Generator().manual_seed(99)
    for c in LABELS:
        emb = torch.stack([_embedding(c, g) for _ in range(20)])
        masks = sel.nested_masks(emb, T, BUDGETS)
        for s in (0, 1):
            ov_sel = sum(_overlap(m, LABELS[c][s]) for m in masks[:, s]) / 20
            ov_uni = _overlap(_mask(UNIFORM[s]), LABELS[c][s])
            assert ov_sel >= 0.9 and ov_sel >= ov_uni + 0.5, (c, s, ov_sel, ov_uni)
        assert masks[:, 2].all()
    # per-prompt: the two clusters get different level-0 sets
    a = sel.nested_masks(torch.stack([_embedding("a", g) for _ in range(8)]), T, BUDGETS)[:, 0]
    b = sel.nested_masks(torch.stack([_embedding("b", g) for _ in range(8)]), T, BUDGETS)[:, 0]
    assert not any(torch.equal(x, y) for x in a for y in b)


def test_training_run_outputs(trained):
    run, res = trained["run"], trained["res"]
    assert (run / "config.yaml").is_file() and (run / "metrics.csv").is_file()
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"step", "loss", "overlap", "level"} <= set(header)
    L_ = res["losses"]
    assert len(L_) == 120 and sum(L_[-20:]) / 20 < 0.5 * sum(L_[:10]) / 10
    ev = res["eval"]
    assert ev["samples"] == 16 and ev["label_missing"] == 0 and ev["distinct_level0_dp"] == pytest.approx(2 / 16)
    for row in ev["levels"]:  # the run's own evaluation agrees with the reference check above
        assert row["overlap_selector"] > row["overlap_uniform"] + 0.5
    ck = run / "checkpoints" / "step_00000120"
    # a checkpoint folder and the run folder load as selectors, with the same weights as selector.pt
    ref = load_selector(trained["path"])
    for p in (ck, ck / "trainable" / "selector.pt", run):
        other = load_selector(p)
        for (n, x), (_, y) in zip(ref.state_dict().items(), other.state_dict().items()):
            assert torch.equal(x, y), (p, n)
    assert (run / "validation" / "metrics.jsonl").is_file()


# --- checkpoints -----------------------------------------------------------------------------------


def test_checkpoint_round_trip_rebuilds_identical_outputs(tmp_path):
    sel = _tiny_selector(seed=3, depth=2).eval()
    with torch.no_grad():  # weights unlike any fresh init, so a rebuilt default model cannot pass
        for p in sel.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = save_selector(tmp_path / "sub" / "sel.pt", sel, {"note": "x"})
    assert not list((tmp_path / "sub").glob("*.tmp"))  # atomic write leaves no temp file
    torch.manual_seed(1234)  # a different global RNG state must not matter
    back = load_selector(path)
    assert back.sizes == sel.sizes and back.levels == sel.levels and back.meta["note"] == "x"
    assert not any(p.requires_grad for p in back.parameters())
    g = torch.Generator().manual_seed(4)
    emb = torch.stack([_embedding("a", g), _embedding("b", g), _embedding("a", g)])
    with torch.no_grad():  # same attention path for both (PyTorch's MHA fast path needs no-grad inputs)
        assert torch.equal(sel.level_logits(emb, T, BUDGETS), back.level_logits(emb, T, BUDGETS))
    assert torch.equal(sel.nested_masks(emb, T, BUDGETS), back.nested_masks(emb, T, BUDGETS))


def test_missing_and_invalid_checkpoints_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pt.*does not exist"):
        load_selector(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="empty"):
        load_selector("")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=r"junk\.pt.*could not be read"):
        load_selector(tmp_path / "junk.pt")
    save_checkpoint(tmp_path / "maze.pt", {"model": {}}, {"kind": "maze-selector", "sizes": {}, "levels": {}})
    with pytest.raises(CheckpointError, match=r"maze\.pt.*'maze-selector'.*expected 'video-selector'"):
        load_selector(tmp_path / "maze.pt")
    sel = _tiny_selector()
    save_selector(tmp_path / "ok.pt", sel)
    ck = torch.load(tmp_path / "ok.pt", weights_only=False)
    ck["meta"]["sizes"]["d_model"] = 48
    torch.save(ck, tmp_path / "bad_sizes.pt")
    with pytest.raises(CheckpointError, match=r"bad_sizes\.pt.*do not fit the sizes"):
        load_selector(tmp_path / "bad_sizes.pt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match=r"empty_dir.*selector\.pt"):
        load_selector(tmp_path / "empty_dir")


# --- wiring: index policies, training entry scripts, sample.py --------------------------------------


from conftest import load_script as _load_script  # noqa: E402


def test_policies_use_the_selector(trained):
    """Phase-1 (K=3) and phase-2 (nested [3, 5, 9]) selector masks equal the cluster labels."""
    from interpdiff.video.objectives import PHASE1_POLICIES, PHASE2_POLICIES, KeyframePolicy

    p1 = KeyframePolicy("selector:1", PHASE1_POLICIES, "", "phase1.index_policy", str(trained["path"]))
    p2 = KeyframePolicy("selector:1", PHASE2_POLICIES, "", "phase2.policy_mix", str(trained["run"]))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(16, T, 2, 2)
    for c in LABELS:
        emb = _embedding(c, g)
        m1, name = p1.masks(x, "k", [3], g, emb_L_D=emb)
        assert name == "selector" and m1.shape == (1, T) and torch.equal(m1[0], _mask(LABELS[c][0]))
        m2, _ = p2.masks(x, "k", BUDGETS, g, emb_L_D=emb)
        assert torch.equal(m2, _label_stack(c))
    with pytest.raises(ConfigError, match=r"trained on the budgets \[3, 5, 9\].*\[4\]"):
        p1.masks(x, "k", [4], g, emb_L_D=emb)


def _p1_args(shards, run_dir, *extra):
    return ["--config", str(REPO / "configs/video/tiny_cpu.yaml"), f"data.shards={shards}", f"train.run_dir={run_dir}",
            "train.tracker=none", "train.validate_every=0", "train.log_every=1", *extra]


def test_phase1_training_step_with_selector_policy(trained, cluster_data, tmp_path, monkeypatch):
    """train_phase1.py with index_policy=selector:1: every sample's keyframe rope positions are its
    cluster's level-0 labels (not uniform [0, 4, 8]), and the step runs with a finite loss."""
    train_phase1 = _load_script("train_phase1")
    seen = []
    orig = wan.wan_forward

    def spy(model, x_t, t_B, emb, frame_idx_B_K=None, **kw):
        seen.extend(zip(emb.detach().cpu(), frame_idx_B_K.cpu().tolist()))
        return orig(model, x_t, t_B, emb, frame_idx_B_K=frame_idx_B_K, **kw)

    monkeypatch.setattr(wan, "wan_forward", spy)
    _reset_accelerate()
    res = train_phase1.main(_p1_args(cluster_data["shards"], tmp_path / "p1", "train.max_steps=1",
                                     "train.checkpoint_every=1", "phase1.index_policy=selector:1",
                                     f"phase1.selector_ckpt={trained['path']}"))
    assert len(res.losses) == 1 and math.isfinite(res.losses[0])
    assert len(seen) >= 4
    for emb, idx in seen:
        assert idx == LABELS[_cluster_of(emb)][0], (idx, _cluster_of(emb))


def test_selector_policy_config_errors_before_model_load(cluster_data, trained, tmp_path, no_model):
    train_phase1 = _load_script("train_phase1")
    train_phase2 = _load_script("train_phase2")
    sh = cluster_data["shards"]
    with pytest.raises(ConfigError, match=r"phase1\.index_policy.*phase1\.selector_ckpt.*not set"):
        _reset_accelerate()
        train_phase1.main(_p1_args(sh, tmp_path / "r", "phase1.index_policy=uniform:0.5,selector:0.5"))
    with pytest.raises(CheckpointError, match=r"phase2\.selector_ckpt.*missing\.pt.*does not exist"):
        _reset_accelerate()
        train_phase2.main(_p1_args(sh, tmp_path / "r", "phase2.policy_mix=selector:1",
                                   f"phase2.selector_ckpt={tmp_path / 'missing.pt'}"))
    # budgets the selector was not trained on, known from the config (fixed clip length): before the model
    with pytest.raises(ConfigError, match=r"trained on the budgets \[3, 5, 9\]"):
        _reset_accelerate()
        train_phase1.main(_p1_args(sh, tmp_path / "r", "phase1.index_policy=selector:1", "phase1.num_keyframes=4",
                                   "phase2.k_min=4", "data.latent_shape=[16,9,4,6]",
                                   f"phase1.selector_ckpt={trained['path']}"))
    assert not (tmp_path / "r").exists()


def test_sample_with_selector_keyframes(trained, tmp_path, monkeypatch):
    """sample.py keyframe_source=selector: the phase-1 keyframes of each prompt are the selector's
    level-0 set, i.e. its cluster's labels (prompt embeddings replaced by cluster embeddings)."""
    sample = _load_script("sample")
    g = torch.Generator().manual_seed(5)
    emb = torch.stack([_embedding("a", g), _embedding("b", g)])

    def fake_encode(enc, tok, prompts, max_length=512, dtype=None):
        assert len(prompts) == 2
        return emb

    monkeypatch.setattr(wan, "encode_prompts", fake_encode)
    out = sample.main(["prompts=[first,second]", "num_frames=33", "height=32", "width=48", "phase1_steps=1",
                       "phase1_guidance=1", "batch_size=2", "phase2.k_min=3", "phase2.n_levels=3",
                       "keyframe_source=selector", f"selector_ckpt={trained['path']}", f"out_dir={tmp_path / 'out'}"])
    assert out["keyframes"] == [LABELS["a"][0], LABELS["b"][0]]
    assert "selector" in out["times"] and len(out["videos"]) == 2


def test_sample_selector_bad_inputs(trained, tmp_path, no_model):
    sample = _load_script("sample")
    base = ["prompts=[x]", "num_frames=33", "height=32", "width=48", f"out_dir={tmp_path / 'o'}",
            "keyframe_source=selector"]
    with pytest.raises(ConfigError, match="keyframe_source=selector needs selector_ckpt"):
        sample.main(base)
    with pytest.raises(CheckpointError, match=r"selector_ckpt.*nope\.pt"):
        sample.main([*base, f"selector_ckpt={tmp_path / 'nope.pt'}"])
    with pytest.raises(ConfigError, match=r"\[4, 6, 9\]: the video selector was trained on the budgets \[3, 5, 9\]"):
        sample.main([*base, f"selector_ckpt={trained['path']}", "phase2.k_min=4", "phase2.n_levels=3"])
    with pytest.raises(ConfigError, match="keyframe_source='learned'"):
        sample.main(["prompts=[x]", "keyframe_source=learned"])


def test_shipped_selector_config_fits_the_tiny_preset():
    """configs/video/selector_tiny_cpu.yaml serves tiny_cpu.yaml: the same level budgets and the tiny
    UMT5 width; unknown keys and bad values stop with the key's name."""
    from interpdiff.config import load_config
    from interpdiff.video.objectives import VideoTrainConfig, phase2_budgets
    from interpdiff.video.train_selector import SelectorTrainConfig

    sel = load_config(SelectorTrainConfig, REPO / "configs/video/selector_tiny_cpu.yaml", ["data.shards=x.tar"])
    tiny = load_config(VideoTrainConfig, REPO / "configs/video/tiny_cpu.yaml", ["data.shards=x.tar"])
    for t in (9, 13, 21):
        assert sel.levels.budgets_for(t) == phase2_budgets(tiny.phase2, t)
    assert sel.net.text_dim == wan.tiny_transformer_config()["text_dim"]
    with pytest.raises(ConfigError, match="labels.file"):
        load_config(SelectorTrainConfig, REPO / "configs/video/selector_tiny_cpu.yaml",
                    ["data.shards=x.tar", "labels.source=dp_precomputed"])
    with pytest.raises(ConfigError, match="net.width"):
        load_config(SelectorTrainConfig, REPO / "configs/video/selector_tiny_cpu.yaml",
                    ["data.shards=x.tar", "net.width=3"])


def test_label_sources(tmp_path):
    """``dp``: a clip that is linear on [0, 3] and on [3, 8] has zero interpolation error with the
    keyframes {0, 3, 8} only, so the level-0 (K=3) DP label is {0, 3, 8}. ``dp_precomputed``: a stored
    mask is used as is; a missing key or a stack with wrong budgets is left out and counted."""
    from interpdiff.video.train_selector import DPLabels, LabelConfig

    t = torch.arange(T, dtype=torch.float32)
    prof = torch.where(t <= 3, t, 3 - 2.0 * (t - 3))  # kink at frame 3
    lat = prof.view(1, 1, T, 1, 1) * torch.randn(2, 4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    masks, have = DPLabels(LabelConfig(source="dp"))({"lat": lat, "keys": ["x", "y"]}, BUDGETS)
    assert have.all() and masks.shape == (2, 3, T)
    assert all(r.nonzero().flatten().tolist() == [0, 3, 8] for r in masks[:, 0])
    wrong = _label_stack("a").clone()
    wrong[1, 4] = True  # level 1 would hold 6 keyframes, not 5
    torch.save({"k1": _label_stack("b"), "k2": wrong}, tmp_path / "dp.pt")
    lab = DPLabels(LabelConfig(source="dp_precomputed", file=str(tmp_path / "dp.pt")))
    masks, have = lab({"lat": lat[:1].expand(3, -1, -1, -1, -1), "keys": ["k1", "k2", "k3"]}, BUDGETS)
    assert have.tolist() == [True, False, False] and lab.missing == 2 and torch.equal(masks[0], _label_stack("b"))
    with pytest.raises(ConfigError, match=r"labels\.file=.*nope\.pt.*does not exist"):
        DPLabels(LabelConfig(source="dp_precomputed", file=str(tmp_path / "nope.pt")))


def test_selector_training_resume_equals_uninterrupted(cluster_data, tmp_path):
    """A run stopped at step 3 and resumed (--resume latest) ends at step 6 with the weights (and EMA
    weights) of an uninterrupted 6-step run: the selector's own save/load hooks restore it exactly."""
    from interpdiff.video import train_selector

    def run(run_dir, *extra):
        _reset_accelerate()
        return train_selector.main([
            "--config", str(REPO / "configs/video/selector_tiny_cpu.yaml"), f"data.shards={cluster_data['shards']}",
            f"train.run_dir={run_dir}", "train.tracker=none", "train.max_steps=6", "train.batch_size=8",
            "train.checkpoint_every=3", "train.validate_every=0", "train.ema_decay=0.9", "eval_batches=0",
            "labels.source=dp_precomputed", f"labels.file={cluster_data['labels']}", *extra,
        ])  # fmt: skip

    run(tmp_path / "full")
    run(tmp_path / "part", "train.stop_at_step=3")
    run(tmp_path / "part", "--resume", "latest")
    for sub in ("trainable", "trainable_ema"):
        a = load_selector(tmp_path / "full" / "checkpoints" / "step_00000006" / sub / "selector.pt").state_dict()
        b = load_selector(tmp_path / "part" / "checkpoints" / "step_00000006" / sub / "selector.pt").state_dict()
        for n in a:
            assert torch.equal(a[n], b[n]), (sub, n)
