"""Maze samplers against independent references.

- a perfect phase-2 (returns the ground truth) through the real sampler reproduces the ground
  truth exactly, and sees at every level the anchor confidence of *that* level's mask (the
  train/sample mismatch of METHOD.md section 6);
- phase-1 / baseline Euler samplers with the exact velocity of a point-mass data distribution
  land on it (checks the flow-time convention and the endpoint clamp);
- keyframes of level 0 are never moved by the refiner;
- interpolation against ``np.interp`` per sample and coordinate.
"""

import numpy as np
import pytest
import torch
import torch.nn as nn

from interpdiff.corruption import anchor_confidence
from interpdiff.masks import check_nested, mask_to_indices, random_nested_masks, uniform_nested_masks
from maze.config_model import BackboneConfig
from maze.models import Refiner, from_z, to_z
from maze.sampler import (
    gather_keyframes, keyframe_features, policy_masks, refine_levels, sample_full, sample_keyframes, scatter_keyframes,
    two_phase,
)

torch.set_num_threads(1)
T, G = 32, 12
BUDGETS = [4, 8, 16, 32]


def smooth_paths(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, T)
    a = torch.rand(B, 2, 3, generator=g)
    x = 0.5 + 0.3 * torch.sin(2 * np.pi * (a[..., 0:1] * t + a[..., 1:2])) * a[..., 2:3]  # (B, 2, T)
    return x.transpose(1, 2).contiguous().float()


def cond_for(x0):
    B = x0.shape[0]
    occ = torch.zeros(B, G, G)
    occ[:, 0], occ[:, -1], occ[:, :, 0], occ[:, :, -1] = 1, 1, 1, 1
    return {"occ": occ, "sdf": torch.ones(B, G, G), "start": x0[:, 0], "goal": x0[:, -1]}


class PerfectRefiner(nn.Module):
    """Returns the ground truth; records (level, conf) of each call to check them."""

    def __init__(self, x0, T):
        super().__init__()
        self.x0, self.T, self.calls = x0, T, []

    def encode(self, cond):
        return None

    def forward(self, x_s, level_B, conf_B_T, cond, enc=None):
        self.calls.append((int(level_B[0]), conf_B_T.clone(), x_s.clone()))
        return self.x0.clone()


@pytest.mark.parametrize("confidence", ["mask", "tent"])
@pytest.mark.parametrize("policy", ["uniform", "random"])
def test_perfect_phase2_reproduces_ground_truth(policy, confidence):
    B = 5
    x0 = smooth_paths(B, T)
    g = torch.Generator().manual_seed(1)
    masks = uniform_nested_masks(B, T, BUDGETS) if policy == "uniform" else random_nested_masks(B, T, BUDGETS, g)
    ref = PerfectRefiner(x0, T)
    out = two_phase(None, ref, cond_for(x0), masks, None, 1, oracle_x0=x0, confidence=confidence, pos_clip=True)
    torch.testing.assert_close(out.refined, x0, atol=1e-6, rtol=0)
    # level s was called with the anchor confidence of M_s and its input was I(x0, M_s)
    assert [c[0] for c in ref.calls] == list(range(len(BUDGETS) - 1))
    for s, conf, x_s in ref.calls:
        torch.testing.assert_close(conf, anchor_confidence(masks[:, s], confidence))
        ref_interp = np.stack([
            np.stack([np.interp(np.arange(T), np.flatnonzero(masks[b, s]), x0[b, masks[b, s], d].numpy()) for d in range(2)], -1)
            for b in range(B)
        ])
        np.testing.assert_allclose(x_s.numpy(), ref_interp, atol=1e-6)


def test_level_noise_only_on_frames_missing_at_the_next_level():
    """Noise 'level' (sigma_1 of the training schedule) goes only on frames missing in M_1; the
    frames of M_1 are exact with a perfect restorer."""
    B = 3
    x0 = smooth_paths(B, T, seed=3)
    masks = uniform_nested_masks(B, T, BUDGETS)
    _, xs, _ = refine_levels(PerfectRefiner(x0, T), interpolate_ref(x0, masks[:, 0]), masks, cond_for(x0), 0.05, 0.01,
                             noise="level", generator=torch.Generator().manual_seed(0))
    m1 = masks[:, 1]
    torch.testing.assert_close(xs[1][m1], x0[m1], atol=1e-6, rtol=0)
    resid = (xs[1] - interpolate_ref(x0, m1))[~m1]
    assert 1e-3 < float(resid.abs().max()) < 0.5


def interpolate_ref(x, m):
    out = np.stack([
        np.stack([np.interp(np.arange(x.shape[1]), np.flatnonzero(m[b]), x[b, m[b], d].numpy()) for d in range(2)], -1)
        for b in range(x.shape[0])
    ])
    return torch.tensor(out, dtype=torch.float32)


class ExactVelocity(nn.Module):
    """Exact flow velocity of the point mass at ``target_z`` (per token): ``v = (z - z0) / sigma``."""

    def __init__(self, target_z, T, baseline=False):
        super().__init__()
        self.target_z, self.T, self.baseline = target_z, T, baseline

    def encode(self, cond):
        return None

    def forward(self, z, sigma_B, *args):
        return (z - self.target_z) / sigma_B.view(-1, 1, 1)


def test_phase1_sampler_lands_on_point_mass_and_clamps_endpoints():
    B, K = 4, 6
    x0 = smooth_paths(B, T, seed=5)
    idx = mask_to_indices(uniform_nested_masks(B, T, [K])[:, 0])
    target = gather_keyframes(x0, idx)
    tz = to_z(target).clone()
    tz[:, 0] += 0.3  # the model "wants" other endpoints: the clamp must win
    kp = sample_keyframes(ExactVelocity(tz, T), cond_for(x0), idx, torch.zeros(B, K, 5), steps=4,
                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(kp[:, 1:], target[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(kp[:, 0], x0[:, 0], atol=0, rtol=0)
    torch.testing.assert_close(kp[:, -1], x0[:, -1], atol=0, rtol=0)


def test_baseline_sampler_lands_on_point_mass():
    B = 3
    x0 = smooth_paths(B, T, seed=6)
    out = sample_full(ExactVelocity(to_z(x0), T, baseline=True), cond_for(x0), steps=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_untrained_refiner_keeps_keyframes_and_interpolation():
    """Zero-initialised residual: R returns its input, so refined == interp; keyframes stay fixed
    even after the output layer is perturbed."""
    torch.manual_seed(0)
    B = 4
    x0 = smooth_paths(B, T, seed=7)
    sizes = BackboneConfig(d_model=32, depth=1, heads=4, enc_depth=0, patch=4)
    ref = Refiner(sizes, T, G, len(BUDGETS)).eval()
    masks = uniform_nested_masks(B, T, BUDGETS)
    out = two_phase(None, ref, cond_for(x0), masks, None, 1, oracle_x0=x0)
    torch.testing.assert_close(out.refined, out.interp, atol=1e-6, rtol=0)
    with torch.no_grad():
        ref.backbone.out.weight.normal_(0, 0.5)
    out = two_phase(None, ref, cond_for(x0), masks, None, 1, oracle_x0=x0, pos_clip=True)
    m0 = masks[:, 0]
    torch.testing.assert_close(out.refined[m0], x0[m0], atol=1e-6, rtol=0)
    assert (out.refined - out.interp).abs().max() > 1e-3
    assert out.refined.min() >= 0 and out.refined.max() <= 1


def test_scatter_gather_and_kp_features():
    B = 3
    x0 = smooth_paths(B, T)
    m = random_nested_masks(B, T, [6], torch.Generator().manual_seed(2))[:, 0]
    idx = mask_to_indices(m)
    full = scatter_keyframes(gather_keyframes(x0, idx), idx, T)
    torch.testing.assert_close(full[m], x0[m])
    assert (full[~m] == 0).all()
    f = keyframe_features(m, None)
    # hand reference for one row: gaps to neighbouring keyframes / T, t/(T-1), zero costs
    t = np.flatnonzero(m[0])
    left = np.r_[0, np.diff(t)] / T
    right = np.r_[np.diff(t), 0] / T
    np.testing.assert_allclose(f[0, t, 0].numpy(), left, atol=1e-6)
    np.testing.assert_allclose(f[0, t, 1].numpy(), right, atol=1e-6)
    np.testing.assert_allclose(f[0, t, 2].numpy(), t / (T - 1), atol=1e-6)
    assert (f[..., 3:] == 0).all() and (f[~m] == 0).all()


def test_policy_masks_nested_and_dp_budget_check():
    B = 4
    g = torch.Generator().manual_seed(0)
    for pol in ("uniform", "random", "random_nested"):
        check_nested(policy_masks(pol, B, T, BUDGETS, generator=g), BUDGETS)
    dp = uniform_nested_masks(B, T, BUDGETS)
    assert policy_masks("dp_precomputed", B, T, BUDGETS, batch={"kp_mask": dp}) is dp
    with pytest.raises(ValueError, match="budgets"):
        policy_masks("dp", B, T, [4, 8, 12, 32], batch={"kp_mask": dp})
    with pytest.raises(ValueError, match="prepare_keyframes"):
        policy_masks("dp", B, T, BUDGETS, batch={})
    with pytest.raises(ValueError, match="selector"):
        policy_masks("selector", B, T, BUDGETS)


@pytest.mark.parametrize("output", ["missing_residual", "residual"])
def test_missing_residual_refiner_step_takes_its_prediction(output):
    """TACoS keeps every level piecewise linear on its own mask (np.interp reference), whatever the
    refiner returns. With ``x0_hat = x_s`` on the keyframes of M_s (``missing_residual``) and no
    sampling noise the step is exactly ``x_{s+1} = I(x0_hat, M_{s+1})``: the frames that become
    keyframes take the refiner's prediction, the quantity the loss trains. Under the legacy
    all-frames residual the unconstrained keyframe outputs enter them as well
    (``x0_hat - I(x0_hat - x_s, M_s)``), so that identity fails for random weights."""
    torch.manual_seed(0)
    B = 4
    x0 = smooth_paths(B, T, seed=11)
    sizes = BackboneConfig(d_model=32, depth=1, heads=4, enc_depth=0, patch=4)
    ref = Refiner(sizes, T, G, len(BUDGETS), output=output).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
        ref.backbone.out.weight.mul_(0.1)  # corrections of a few percent of the unit square
    masks = random_nested_masks(B, T, BUDGETS, torch.Generator().manual_seed(4))
    out = two_phase(None, ref, cond_for(x0), masks, None, 1, oracle_x0=x0, pos_clip=False)
    for s, x_s in enumerate(out.levels[:-1]):
        assert float((x_s - interpolate_ref(x_s, masks[:, s])).abs().max()) < 1e-5
    dev = [float((out.levels[s + 1] - interpolate_ref(xh, masks[:, s + 1])).abs().max()) for s, xh in enumerate(out.x0_hats)]
    if output == "missing_residual":
        assert max(dev) < 1e-5, dev
        for s, xh in enumerate(out.x0_hats):  # x0_hat equals its input exactly on M_s
            m = masks[:, s]
            assert torch.equal(xh[m], out.levels[s][m])
    else:
        assert max(dev) > 1e-3, dev
    assert (out.refined - out.interp).abs().max() > 1e-3  # the refiner did change the missing frames
