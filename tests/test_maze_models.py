"""Maze networks: checkpoint round trips (sizes from metadata), clear errors, config sections,
the shared training loop (loss goes down, resume continues)."""

import pytest
import torch
import torch.nn as nn

from interpdiff.config import ConfigError, load_config
from interpdiff.io import CheckpointError, load_checkpoint, save_checkpoint
from maze.config import MazeConfig
from maze.config_model import BackboneConfig, OptimConfig, load_maze_config
from maze.models import (
    FullSequenceDenoiser, KeypointDenoiser, Refiner, build_model, load_model, save_model, train_loop,
)

torch.set_num_threads(1)
T, G = 32, 12


def cond(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    occ = (torch.rand(B, G, G, generator=g) > 0.8).float()
    return {"occ": occ, "sdf": torch.randn(B, G, G, generator=g), "start": torch.rand(B, 2, generator=g),
            "goal": torch.rand(B, 2, generator=g)}


def run(model, seed=0):
    B = 3
    g = torch.Generator().manual_seed(seed)
    c = cond(B, seed)
    if isinstance(model, KeypointDenoiser):
        idx = torch.sort(torch.randperm(T, generator=g)[:5]).values.expand(B, 5)
        return model(torch.randn(B, 5, 2, generator=g), torch.rand(B, generator=g), idx, torch.rand(B, 5, 5, generator=g),
                     idx == 0, c)
    if isinstance(model, FullSequenceDenoiser):
        known = torch.zeros(B, T, dtype=torch.bool)
        return model(torch.randn(B, T, 2, generator=g), torch.rand(B, generator=g), known, c)
    return model(torch.rand(B, T, 2, generator=g), torch.tensor([0, 1, 2]), (torch.rand(B, T, generator=g) > 0.5).float(), c)


def perturb(model):
    """Zero-initialised outputs would make every model compare equal: randomise all weights."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


SIZES = [
    BackboneConfig(d_model=32, depth=2, heads=4, enc_depth=1, cond_mode="cross", patch=1),
    BackboneConfig(d_model=48, depth=1, heads=3, enc_depth=0, cond_mode="prefix", patch=4),
]


@pytest.mark.parametrize("sizes", SIZES, ids=["cross", "prefix-patch4"])
@pytest.mark.parametrize("kind", ["phase1", "phase2", "baseline"])
def test_checkpoint_round_trip_rebuilds_same_model(tmp_path, kind, sizes):
    torch.manual_seed(0)
    if kind == "phase1":
        sizes = BackboneConfig(**{**vars(sizes), "patch": 1})
        model = KeypointDenoiser(sizes, T, G)
    elif kind == "phase2":
        model = Refiner(sizes, T, G, n_levels=4)
    else:
        model = FullSequenceDenoiser(sizes, T, G)
    perturb(model).eval()
    path = save_model(tmp_path / "model.pt", model, extra_meta={"budgets": [4, 8, 16, 32]})
    loaded, meta = load_model(path, kind)  # sizes come from the file, not from the caller
    assert meta["sizes"] == vars(sizes) and meta["T"] == T and meta["G"] == G
    assert type(loaded) is type(model)
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    assert sd0.keys() == sd1.keys() and all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    with torch.no_grad():
        torch.testing.assert_close(run(loaded), run(model), atol=0, rtol=0)


def test_ema_weights_preferred_and_model_weights_on_request(tmp_path):
    torch.manual_seed(0)
    m = perturb(Refiner(SIZES[0], T, G, 3))
    ema = perturb(Refiner(SIZES[0], T, G, 3))
    save_model(tmp_path / "m.pt", m, ema)
    a, _ = load_model(tmp_path / "m.pt", "phase2")
    b, _ = load_model(tmp_path / "m.pt", "phase2", use_ema=False)
    assert torch.equal(a.level_emb.weight, ema.level_emb.weight)
    assert torch.equal(b.level_emb.weight, m.level_emb.weight)


def test_missing_wrong_kind_and_invalid_checkpoints_name_the_path(tmp_path):
    missing = tmp_path / "nope" / "model.pt"
    with pytest.raises(CheckpointError, match="nope/model.pt.*does not exist"):
        load_model(missing, "phase1")
    with pytest.raises(CheckpointError, match="is a folder.*model.pt"):
        load_model(tmp_path, "phase1")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pt.*could not be read"):
        load_model(bad, "phase1")
    m = Refiner(SIZES[0], T, G, 3)
    save_model(tmp_path / "r.pt", m)
    with pytest.raises(CheckpointError, match="r.pt.*'phase2' model; expected 'phase1'"):
        load_model(tmp_path / "r.pt", "phase1")
    # sizes in the metadata that do not fit the weights
    ck = load_checkpoint(tmp_path / "r.pt")
    ck["meta"]["sizes"]["d_model"] = 64
    ck["meta"]["sizes"]["heads"] = 4
    save_checkpoint(tmp_path / "r2.pt", ck["state"], ck["meta"])
    with pytest.raises(CheckpointError, match="r2.pt.*do not fit"):
        load_model(tmp_path / "r2.pt", "phase2")
    with pytest.raises(CheckpointError, match="kind"):
        build_model({"kind": "video"})


def test_refiner_starts_as_identity_and_patch_must_divide_T():
    torch.manual_seed(0)
    r = Refiner(SIZES[1], T, G, 3)
    x = torch.rand(3, T, 2)
    out = r(x, torch.zeros(3), torch.zeros(3, T), cond(3))
    torch.testing.assert_close(out, x, atol=0, rtol=0)
    with pytest.raises(ValueError, match="multiple of patch=4"):
        FullSequenceDenoiser(SIZES[1], 30, G)(torch.rand(2, 30, 2), torch.rand(2), torch.zeros(2, 30, dtype=torch.bool), cond(2))
    with pytest.raises(ValueError, match="patch must be 1"):
        KeypointDenoiser(SIZES[1], T, G)


def test_config_sections_validate_with_key_names(tmp_path):
    with pytest.raises(ValueError, match="phase2.model.cond_mode='side'"):
        load_config(MazeConfig, None, ["phase2.model.cond_mode=side"])
    with pytest.raises(ValueError, match="phase1.model.d_model=100 must be divisible by phase1.model.heads=6"):
        load_config(MazeConfig, None, ["phase1.model.d_model=100"])
    with pytest.raises(ValueError, match="unknown policy 'dpp'"):
        load_config(MazeConfig, None, ["phase1.policy_mix=dpp:1"])
    with pytest.raises(ConfigError, match="phase2.sigmax"):
        load_config(MazeConfig, None, ["phase2.sigmax=1"])
    # two files merged in order, the overlay naming its own bad key
    a = tmp_path / "a.yaml"
    a.write_text("data:\n  T: 64\nphase1:\n  sample_steps: 3\n")
    b = tmp_path / "b.yaml"
    b.write_text("phase1:\n  sample_steps: 5\n  model: {d_model: 32, heads: 4}\n")
    cfg = load_maze_config(["--config", str(a), "--config", str(b), "phase2.sigma_max=0.05"])
    assert (cfg.data.T, cfg.phase1.sample_steps, cfg.phase1.model.d_model, cfg.phase2.sigma_max) == (64, 5, 32, 0.05)
    b.write_text("phase1:\n  sampel_steps: 5\n")
    with pytest.raises(ConfigError, match="b.yaml.*sampel_steps"):
        load_maze_config(["--config", str(a), "--config", str(b)])


def test_train_loop_learns_and_resumes(tmp_path):
    """A tiny refiner fits a fixed batch (loss falls 5x); a second call resumes at the saved step."""
    torch.manual_seed(0)
    r = Refiner(BackboneConfig(d_model=32, depth=1, heads=4, enc_depth=0, patch=4), T, G, 2)
    x = torch.rand(8, T, 2)
    target = (x + 0.05 * torch.sin(torch.arange(T) / 3.0)[None, :, None]).clamp(0, 1)
    c = cond(8)

    def loss_fn(model, step):
        return ((model(x, torch.zeros(8), torch.zeros(8, T), c) - target) ** 2).mean() * 100, {}

    oc = OptimConfig(steps=60, batch_size=8, lr=3e-3, warmup=5, ema=0.0, log_every=10, ckpt_every=30)
    rows = train_loop(r, loss_fn, oc, tmp_path / "model.pt", {}, "test")
    assert rows[-1]["loss"] < rows[0]["loss"] / 5
    assert load_checkpoint(tmp_path / "model.pt")["meta"]["step"] == 60
    assert (tmp_path / "model_metrics.csv").read_text().startswith("step,loss,lr,seconds")
    oc2 = OptimConfig(**{**vars(oc), "steps": 70})
    r2 = Refiner(BackboneConfig(d_model=32, depth=1, heads=4, enc_depth=0, patch=4), T, G, 2)
    rows2 = train_loop(r2, loss_fn, oc2, tmp_path / "model.pt", {}, "test")
    assert [row["step"] for row in rows2] == [10, 20, 30, 40, 50, 60, 70]  # 6 old rows + 1 new
    assert rows2[-1]["loss"] < rows[0]["loss"] / 5  # continued from the trained weights


def test_train_loop_never_overwrites_another_model_nor_relabels_a_longer_run(tmp_path):
    """A model.pt of other sizes is refused naming both and stays byte for byte; asking for fewer
    steps than the file holds leaves it as it is (it was re-saved labelled with the smaller step
    count); on_start (config.yaml in the trainers) runs only once the check passed."""
    x, c = torch.rand(4, T, 2), cond(4)

    def loss_fn(model, step):
        return ((model(x, torch.zeros(4), torch.zeros(4, T), c) - x) ** 2).mean(), {}

    def refiner(d):
        torch.manual_seed(0)
        return Refiner(BackboneConfig(d_model=d, depth=1, heads=4, enc_depth=0, patch=4), T, G, 2)

    oc = OptimConfig(steps=4, batch_size=4, lr=1e-3, warmup=1, ema=0.0, log_every=2, ckpt_every=100)
    path = tmp_path / "model.pt"
    train_loop(refiner(32), loss_fn, oc, path, {}, "test")
    before = path.read_bytes()
    started = []
    with pytest.raises(CheckpointError, match=r"(?s)model\.pt.*d_model.*32.*in the file.*16.*in this run.*Not overwriting"):
        train_loop(refiner(16), loss_fn, oc, path, {}, "test", on_start=lambda: started.append(1))
    assert path.read_bytes() == before and not started
    rows = train_loop(refiner(32), loss_fn, OptimConfig(**{**vars(oc), "steps": 2}), path, {}, "test",
                      on_start=lambda: started.append(1))
    assert path.read_bytes() == before and started == [1] and [r["step"] for r in rows] == [2, 4]
    assert load_checkpoint(path)["meta"]["step"] == 4


def test_train_loop_trains_over_a_step0_export(tmp_path):
    """maze.distill's init_only writes the student at step 0 without a train state: a later training
    run in that folder starts from scratch over it (not refused as another model)."""
    x, c = torch.rand(4, T, 2), cond(4)
    torch.manual_seed(0)
    r = Refiner(BackboneConfig(d_model=32, depth=1, heads=4, enc_depth=0, patch=4), T, G, 2)
    save_model(tmp_path / "model.pt", r, r, {"step": 0})
    oc = OptimConfig(steps=2, batch_size=4, lr=1e-3, warmup=1, ema=0.0, log_every=1, ckpt_every=100)
    rows = train_loop(r, lambda m, s: (((m(x, torch.zeros(4), torch.zeros(4, T), c) - x) ** 2).mean(), {}), oc,
                      tmp_path / "model.pt", {}, "test")
    assert [row["step"] for row in rows] == [1, 2] and load_checkpoint(tmp_path / "model.pt")["meta"]["step"] == 2


def test_fit_refuses_the_resume_state_of_another_model(tmp_path):
    from maze.common import fit
    from maze.config import TrainConfig

    x = torch.rand(8, 3)

    def run(width, started):
        torch.manual_seed(0)
        m = nn.Linear(3, width)
        return fit(m, lambda g: (((m(x) - 1) ** 2).mean(), {}), TrainConfig(steps=2, eval_every=2, log_every=1), tmp_path,
                   {"kind": "toy", "sizes": {"width": width}}, on_start=lambda: started.append(width))

    started = []
    run(4, started)
    last = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match=r"last\.pt.*sizes = \{'width': 4\} in the file, \{'width': 5\} in this run"):
        run(5, started)
    assert started == [4] and (tmp_path / "last.pt").read_bytes() == last
    # a sizes entry that is a setting of use (the selector's decoding) may change on a rerun
    from maze.common import fit

    torch.manual_seed(0)
    m = nn.Linear(3, 4)
    fit(m, lambda g: (((m(x) - 1) ** 2).mean(), {}), TrainConfig(steps=2, eval_every=2, log_every=1), tmp_path,
        {"kind": "toy", "sizes": {"width": 4, "decode": 0.3}}, sizes_not_compared=("decode",))


@pytest.mark.parametrize("confidence", ["mask", "tent"])
def test_missing_residual_refiner_returns_keyframes_exactly(confidence):
    """``output=missing_residual``: x0_hat == x_s bit for bit on the keyframes of M_s for random
    weights (mask and tent confidence); the legacy ``residual`` form moves them."""
    from interpdiff.corruption import anchor_confidence
    from interpdiff.masks import random_nested_masks

    torch.manual_seed(0)
    B = 4
    m = random_nested_masks(B, T, [6], torch.Generator().manual_seed(3))[:, 0]
    conf = anchor_confidence(m, confidence)
    x = torch.rand(B, T, 2)
    outs = {}
    for output in ("missing_residual", "residual"):
        torch.manual_seed(1)
        r = perturb(Refiner(SIZES[1], T, G, 3, output=output)).eval()
        with torch.no_grad():
            outs[output] = r(x, torch.tensor([0, 1, 2, 0]), conf, cond(B))
    new, old = outs["missing_residual"], outs["residual"]
    assert torch.equal(new[m], x[m])
    assert (new[~m] - x[~m]).abs().max() > 1e-2
    torch.testing.assert_close(new[~m], old[~m], atol=0, rtol=0)  # same weights, same correction where missing
    assert (old[m] - x[m]).abs().max() > 1e-2


def test_phase2_checkpoint_output_field_round_trip_and_legacy(tmp_path):
    """The output form is stored and restored; a checkpoint written before the field existed loads as
    the legacy all-frames residual (what it was trained with); an unknown form is a clear error."""
    torch.manual_seed(0)
    r = perturb(Refiner(SIZES[0], T, G, 3, output="residual")).eval()
    save_model(tmp_path / "a.pt", r)
    a, meta = load_model(tmp_path / "a.pt", "phase2")
    assert meta["output"] == "residual" and a.output == "residual"
    b, _ = load_model(save_model(tmp_path / "b.pt", perturb(Refiner(SIZES[0], T, G, 3))), "phase2")
    assert b.output == "missing_residual"
    ck = load_checkpoint(tmp_path / "a.pt")
    del ck["meta"]["output"]
    save_checkpoint(tmp_path / "old.pt", ck["state"], ck["meta"])
    old, _ = load_model(tmp_path / "old.pt", "phase2")
    assert old.output == "residual"
    with torch.no_grad():
        torch.testing.assert_close(run(old), run(r), atol=0, rtol=0)
    ck["meta"]["output"] = "delta"
    save_checkpoint(tmp_path / "bad.pt", ck["state"], ck["meta"])
    with pytest.raises(CheckpointError, match="output='delta'"):
        load_model(tmp_path / "bad.pt", "phase2")
    with pytest.raises(ValueError, match="phase2.output='delta'"):
        load_config(MazeConfig, None, ["phase2.output=delta"])


def test_sdf_at_and_wall_penalty_hand_cases():
    """Bilinear SDF: the grid value at a cell centre, the mean of two centres on the face between them;
    the penalty is ((margin - sdf) * 2 / G)^2 below the margin, 0 above, and its gradient pushes a point
    out of the wall."""
    from maze.mazes import sdf_from_occupancy
    from maze.models import WALL_MARGIN_CELLS, sdf_at, wall_penalty

    occ = torch.zeros(G, G)
    occ[:, 0] = occ[:, -1] = occ[0] = occ[-1] = 1
    occ[5, 3:9] = 1  # a horizontal wall row
    sdf = torch.tensor(sdf_from_occupancy(occ.numpy().astype(bool)))[None]
    ctr = lambda r, c: [(c + 0.5) / G, (r + 0.5) / G]  # noqa: E731  (u, v) of cell (row, col)
    pts = torch.tensor([[ctr(3, 5), ctr(4, 5), ctr(5, 5), [(5 + 0.5) / G, 5.0 / G]]])  # last: face between rows 4 and 5
    got = sdf_at(sdf, pts)[0]
    torch.testing.assert_close(got[:3], sdf[0, [3, 4, 5], [5, 5, 5]], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[3], (sdf[0, 4, 5] + sdf[0, 5, 5]) / 2, atol=1e-6, rtol=0)
    assert float(sdf[0, 4, 5]) == 0.5 and abs(float(got[3])) < 1e-6
    pen = wall_penalty(pts, sdf)[0]
    assert float(pen[0]) == 0 and float(pen[1]) == 0  # 1.5 and 0.5 cells from the wall: clear of the margin
    torch.testing.assert_close(pen[2], torch.tensor(((WALL_MARGIN_CELLS + 0.5) * 2 / G) ** 2), atol=1e-7, rtol=0)
    torch.testing.assert_close(pen[3], torch.tensor((WALL_MARGIN_CELLS * 2 / G) ** 2), atol=1e-7, rtol=0)
    p = pts[:, 3:4].clone().requires_grad_(True)  # on the wall's face (row 5 is wall, v grows with the row)
    wall_penalty(p, sdf).sum().backward()
    assert float(p.grad[0, 0, 1]) > 0 and abs(float(p.grad[0, 0, 0])) < 1e-6  # descent moves v down, away from the wall


def test_phase2_loss_level_weight_and_wall_term_hand_case():
    """phase2_loss against a hand computation: an identity refiner (zero output) on a 2-sample batch."""
    from interpdiff.corruption import corrupt
    from interpdiff.masks import uniform_nested_masks
    from maze.models import wall_penalty
    from maze.train_phase2 import phase2_loss

    torch.manual_seed(0)
    B, S = 2, 3
    r = Refiner(SIZES[1], T, G, S).eval()  # zero-initialised: x0_hat = x_s
    x0 = torch.rand(B, T, 2) * 0.8 + 0.1
    c = cond(B)
    batch = {"pos": x0, **c}
    masks = uniform_nested_masks(B, T, [4, 8, T])
    sig = torch.tensor([0.04, 0.01, 0.0])
    for lw, ww in (("none", 0.0), ("inv_sigma2", 0.0), ("inv_sigma2", 2.0)):
        g = torch.Generator().manual_seed(5)
        got = phase2_loss(r, batch, masks, sig, "mask", g, lw, ww)
        g = torch.Generator().manual_seed(5)  # the same draws by hand: levels, then the corruption noise
        s = torch.randint(0, S - 1, (B,), generator=g)
        m = masks[torch.arange(B), s]
        x_s = corrupt(x0, m, sig[s], generator=g)
        per = (((x_s - x0) * 2) ** 2).sum(-1) * (~m)  # (B, T) squared error in z on missing frames
        wts = torch.ones(B) if lw == "none" else (1 / sig[s] ** 2) / (1 / sig[:2] ** 2).mean()
        want = (per * wts[:, None]).sum() / ((~m).sum() * 2)
        if ww:
            want = want + ww * (wall_penalty(x_s, c["sdf"]) * (~m)).sum() / (~m).sum()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="phase2.level_weight='snr'"):
        load_config(MazeConfig, None, ["phase2.level_weight=snr"])
    with pytest.raises(ValueError, match="phase1.wall_weight=-1"):
        load_config(MazeConfig, None, ["phase1.wall_weight=-1"])


def test_flow_wall_penalty_reads_the_clean_prediction():
    """With the exact velocity of ``interpdiff.flow`` (v = eps - z0 at z_sigma), the penalty is that of
    the clean points z0, weighted by (1 - sigma)^2 and averaged over the free (not clamped) points."""
    from interpdiff.flow import flow_match_target, flow_match_xt
    from maze.models import flow_wall_penalty, from_z, wall_penalty

    g = torch.Generator().manual_seed(0)
    B, L = 3, 6
    c = cond(B)
    z0 = torch.rand(B, L, 2, generator=g) * 2 - 1
    eps = torch.randn(B, L, 2, generator=g)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    free = torch.ones(B, L, dtype=torch.bool)
    free[:, 0] = False
    zt = flow_match_xt(z0, eps, sigma)
    got = flow_wall_penalty(zt, flow_match_target(z0, eps), sigma, free, c["sdf"])
    pen = wall_penalty(from_z(z0), c["sdf"])
    want = (pen * free * (1 - sigma[:, None]) ** 2).sum() / free.sum()
    assert float(pen[free].sum()) > 0  # random walls: some points are penalised
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kind", ["phase1", "baseline"])
def test_path_prior_input_round_trip_and_old_sizes(tmp_path, kind):
    """``path_prior=True``: the prior of ``maze.encoders.path_prior`` (with the stored time warp) is an
    input: it changes the output, its time warp survives a checkpoint round trip, and sizes written
    before the key existed rebuild a model without it."""
    from maze.encoders import path_prior
    from maze.models import path_prior_features

    torch.manual_seed(0)
    sizes = BackboneConfig(d_model=32, depth=1, heads=4, enc_depth=0, patch=1, path_prior=True)
    cls = KeypointDenoiser if kind == "phase1" else FullSequenceDenoiser
    m = perturb(cls(sizes, T, G)).eval()
    with torch.no_grad():
        m.arc_frac.copy_(torch.linspace(0, 1, T) ** 2)
    c = cond(3)
    pr = path_prior_features(m, c)
    ref = path_prior(c["occ"], c["start"], c["goal"], T, arc_frac_T=torch.linspace(0, 1, T) ** 2)
    torch.testing.assert_close(pr[..., :2], (ref[..., :2] - 0.5) * 2)
    torch.testing.assert_close(pr[..., 2:], ref[..., 2:])
    loaded, meta = load_model(save_model(tmp_path / "m.pt", m), kind)
    assert meta["sizes"]["path_prior"] is True and torch.equal(loaded.arc_frac, m.arc_frac)
    with torch.no_grad():
        torch.testing.assert_close(run(loaded), run(m), atol=0, rtol=0)
        bb, _ = m.encode(c)
        other = (bb, torch.zeros_like(pr))
        if kind == "phase1":
            idx = torch.tensor([[0, 5, 9, T - 1]]).expand(3, 4)
            args = (torch.randn(3, 4, 2), torch.rand(3), idx, torch.rand(3, 4, 5), idx == 0, c)
        else:
            args = (torch.randn(3, T, 2), torch.rand(3), torch.zeros(3, T, dtype=torch.bool), c)
        assert (m(*args) - m(*args, enc=other)).abs().max() > 1e-3  # the prior is read
    old = perturb(cls(BackboneConfig(d_model=32, depth=1, heads=4, enc_depth=0, patch=1), T, G))
    ck = load_checkpoint(save_model(tmp_path / "o.pt", old))
    del ck["meta"]["sizes"]["path_prior"]
    save_checkpoint(tmp_path / "o2.pt", ck["state"], ck["meta"])
    o2, _ = load_model(tmp_path / "o2.pt", kind)
    assert o2.backbone.sizes.path_prior is False and not hasattr(o2, "arc_frac")
    with pytest.raises(ValueError, match="path_prior"):
        Refiner(sizes, T, G, 3)


def test_shipped_maze_model_overlays_validate():
    """Every shipped overlay merges and validates; the result overlay uses the forms issue 5 reports
    (missing-frame refiner reading the local wall geometry, uniform indices, no D_phi features, path prior on
    phase-1 and baseline alike)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs" / "maze"
    for base, overlays in (("small", ["small_model", "small_result"]), ("full", ["full_model"])):
        files = [root / f"{base}.yaml"] + [root / f"{o}.yaml" for o in overlays]
        cfg = load_maze_config([a for f in files for a in ("--config", str(f))])
    cfg = load_maze_config([a for f in ("small", "small_model", "small_result") for a in ("--config", str(root / f"{f}.yaml"))])
    assert cfg.phase2.output == "missing_residual" and cfg.eval.index_source == "uniform" and cfg.phase1.feat_diffs == "none"
    assert cfg.phase1.model.path_prior and cfg.baseline.model.path_prior and cfg.phase2.model.wall_feat
    assert cfg.phase1.wall_weight == cfg.baseline.wall_weight and cfg.phase1.optim.steps == cfg.baseline.optim.steps


def test_wall_features_match_exact_wall_distance_and_point_away_from_walls():
    """``wall_features``: the signed distance equals ``maze.mazes.wall_distance`` (an independent numpy
    box-distance reference) in free space, is <= 0 inside wall cells, and its direction is the one in
    which the distance grows at unit rate (checked by a finite step) for points with one nearest wall;
    a hand case: a point 0.25 cells below a horizontal wall row reads 0.25 and points down (v decreasing)."""
    import numpy as np

    from maze.mazes import wall_distance
    from maze.models import WALL_FEAT_RANGE, wall_features

    c = cond(4, seed=3)
    x = torch.rand(4, 64, 2, generator=torch.Generator().manual_seed(1))
    f = wall_features(c["occ"], x)
    assert f.shape == (4, 64, 3)
    ref = np.stack([wall_distance(x[i].numpy(), c["occ"][i].numpy()) for i in range(4)]) * G
    free = ref > 0
    np.testing.assert_allclose(f[..., 0].numpy()[free], np.minimum(ref[free], WALL_FEAT_RANGE), atol=1e-5)
    assert (f[..., 0].numpy()[~free] <= 0).all() and (~free).any() and free.any()
    n = f[..., 1:] / f[..., 1:].norm(dim=-1, keepdim=True).clamp_min(1e-12)
    eps = 1e-4
    ref2 = np.stack([wall_distance((x + eps * n)[i].numpy(), c["occ"][i].numpy()) for i in range(4)]) * G
    near = free & (ref < 1.0)
    rate = (ref2 - ref)[near] / (eps * G)
    assert np.median(rate) > 0.999 and (rate > 0.99).mean() > 0.8  # corridor midpoints (two nearest walls) excepted
    assert (f[..., 1:].norm(dim=-1).numpy()[free & (ref >= WALL_FEAT_RANGE)] < 1e-6).all()  # far points: no direction

    occ = torch.zeros(1, G, G)
    occ[0, 5, :] = 1  # row 5 is wall: v in [5/G, 6/G]
    p = torch.tensor([[[(3 + 0.5) / G, 4.75 / G]]])
    got = wall_features(occ, p)[0, 0]
    torch.testing.assert_close(got, torch.tensor([0.25, 0.0, -(1 - 0.25 / WALL_FEAT_RANGE)]), atol=1e-5, rtol=0)
    inside = wall_features(occ, torch.tensor([[[(3 + 0.5) / G, 5.4 / G]]]))[0, 0]
    torch.testing.assert_close(inside[0], torch.tensor(-0.4), atol=1e-5, rtol=0)
    assert float(inside[2]) < 0  # nearest free side of the wall row is v < 5/G


def test_refiner_wall_feat_reads_the_walls_round_trips_and_is_refiner_only(tmp_path):
    torch.manual_seed(0)
    sizes = BackboneConfig(d_model=32, depth=1, heads=4, enc_depth=0, patch=4, wall_feat=True)
    m = perturb(Refiner(sizes, T, G, n_levels=3)).eval()
    loaded, meta = load_model(save_model(tmp_path / "r.pt", m, extra_meta={"budgets": [4, 8, 32]}), "phase2")
    assert meta["sizes"]["wall_feat"] is True
    with torch.no_grad():
        torch.testing.assert_close(run(loaded), run(m), atol=0, rtol=0)
        c, c2 = cond(3), cond(3)
        c2["occ"] = 1 - c2["occ"]  # same everything else, other walls: the output must change
        x, lv, conf = torch.rand(3, T, 2), torch.tensor([0, 1, 2]), torch.zeros(3, T)
        enc = m.encode(c)  # same maze tokens for both calls: only the wall features differ
        assert (m(x, lv, conf, c, enc) - m(x, lv, conf, c2, enc)).abs().max() > 1e-3
    for cls in (KeypointDenoiser, FullSequenceDenoiser):
        with pytest.raises(ValueError, match="wall_feat"):
            cls(BackboneConfig(d_model=32, depth=1, heads=4, enc_depth=0, patch=1, wall_feat=True), T, G)
    old = perturb(Refiner(BackboneConfig(d_model=32, depth=1, heads=4, enc_depth=0, patch=4), T, G, n_levels=3))
    ck = load_checkpoint(save_model(tmp_path / "o.pt", old, extra_meta={"budgets": [4, 8, 32]}))
    del ck["meta"]["sizes"]["wall_feat"]
    save_checkpoint(tmp_path / "o2.pt", ck["state"], ck["meta"])
    o2, _ = load_model(tmp_path / "o2.pt", "phase2")
    assert o2.backbone.sizes.wall_feat is False


@pytest.mark.parametrize("module,override,match", [
    ("maze.train_phase1", "keyframes.k_min=1", "maze.train_phase1: error: keyframes.k_min=1, keyframes.n_levels=5 with data.T=128"),
    ("maze.demo", "demo.stages=[phase3]", "maze.demo: error: demo.stages: unknown ['phase3']"),
    ("maze.train_dphi", "dphi.train.step=10", "maze.train_dphi: error: override 'dphi.train.step=10': unknown config key"),
])
def test_maze_entry_points_print_config_errors_as_one_line(module, override, match):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", module, "--config", "configs/maze/small.yaml", override], cwd=repo,
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(repo)))
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(match), out.stderr[-2000:]
