import pytest
import torch

from interpdiff.corruption import anchor_confidence, corrupt, level_sigmas, refine, tacos_step
from interpdiff.interpolate import interpolate
from interpdiff.masks import random_nested_masks, uniform_nested_masks


@pytest.mark.parametrize("layout", ["maze", "video"])
@pytest.mark.parametrize("policy", ["uniform", "random"])
def test_perfect_restorer_reaches_x0_exactly(layout, policy):
    gen = torch.Generator().manual_seed(0)
    B, T = 4, 21
    budgets = [3, 6, 11, 21]
    if layout == "maze":
        x0, td = torch.rand(B, T, 2, generator=gen), 1
    else:
        x0, td = torch.randn(B, 4, T, 3, 5, generator=gen), 2
    masks = uniform_nested_masks(B, T, budgets) if policy == "uniform" else random_nested_masks(B, T, budgets, gen)
    seen = []

    def perfect(x_s, s, mask_s, conf_s):
        # the anchor confidence handed to the restorer is built from this level's own mask
        assert torch.equal(conf_s, anchor_confidence(masks[:, s]))
        seen.append(s)
        return x0

    x_start = interpolate(x0, masks[:, 0], time_dim=td)
    out, xs, _ = refine(perfect, x_start, masks, time_dim=td, return_all=True)
    assert seen == [0, 1, 2]
    assert torch.equal(out, x0)
    for s in range(len(budgets)):  # each intermediate level equals I(x0, M_s)
        assert torch.allclose(xs[s], interpolate(x0, masks[:, s], time_dim=td), atol=1e-6)


def test_corrupt_noise_only_on_missing_frames():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(3, 16, 2, generator=gen)
    m = random_nested_masks(3, 16, [5], gen)[:, 0]
    xs = corrupt(x0, m, 0.2, generator=gen)
    base = interpolate(x0, m)
    assert torch.equal(xs[m], x0[m])
    assert (xs[~m] - base[~m]).abs().min() > 0
    assert (xs[~m] - base[~m]).std() == pytest.approx(0.2, rel=0.35)


def test_tacos_step_noise_clip_and_nesting_check():
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(2, 9, 2, generator=gen)
    masks = uniform_nested_masks(2, 9, [3, 5, 9])
    x_s = interpolate(x0, masks[:, 0])
    x_hat = x0 + 0.5  # pushes values above 1
    nxt = tacos_step(x_s, x_hat, masks[:, 0], masks[:, 1], noise="level", sigma_next=0.3, generator=gen, clip=(0, 1))
    assert torch.equal(nxt[masks[:, 0]], x_s[masks[:, 0]].clamp(0, 1))  # anchors of M_s kept
    assert nxt.max() <= 1 and nxt.min() >= 0
    det = tacos_step(x_s, x_hat, masks[:, 0], masks[:, 1])
    noisy = tacos_step(x_s, x_hat, masks[:, 0], masks[:, 1], noise="level", sigma_next=0.3, generator=gen)
    diff = (noisy - det).abs().sum(-1)
    assert torch.all(diff[masks[:, 1]] == 0) and torch.all(diff[~masks[:, 1]] > 0)
    with pytest.raises(ValueError, match="nested"):
        tacos_step(x_s, x_hat, masks[:, 1], masks[:, 0])
    with pytest.raises(ValueError, match="noise"):
        tacos_step(x_s, x_hat, masks[:, 0], masks[:, 1], noise="gauss")


def test_level_sigmas_and_confidence():
    s = level_sigmas(5, 0.2, 0.02)
    assert s.shape == (5,) and s[-1] == 0
    assert torch.all(s[:-1][1:] < s[:-1][:-1])
    assert s[0] == pytest.approx(0.2) and s[-2] == pytest.approx(0.02)
    m = torch.tensor([[True, False, False, False, True]])
    assert anchor_confidence(m).tolist() == [[1, 0, 0, 0, 1]]
    assert torch.allclose(anchor_confidence(m, "tent"), torch.tensor([[1, 0.5, 0, 0.5, 1]]))
