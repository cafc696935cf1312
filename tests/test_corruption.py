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


@pytest.mark.parametrize("layout", ["maze", "video"])
def test_oracle_with_level0_noise_walks_the_training_inputs(layout):
    """A perfect restorer started from the *noisy* level-0 input (as the video sampler starts) sees at
    every level exactly the training corruption ``I(x0, M_s) + sigma_s eps (1 - M_s)`` (same eps,
    rescaled), exact new keyframes, and returns ``x0``. Carrying the residual unscaled (literal TACoS)
    kept ``sigma_0 eps`` on every frame outside M_0 up to the output."""
    gen = torch.Generator().manual_seed(3)
    B, T = 3, 21
    budgets = [3, 6, 11, 21]
    if layout == "maze":
        x0, td = torch.rand(B, T, 2, generator=gen, dtype=torch.float64), 1
    else:
        x0, td = torch.randn(B, 4, T, 3, 5, generator=gen, dtype=torch.float64), 2
    masks = random_nested_masks(B, T, budgets, gen)
    sig = level_sigmas(len(budgets), 0.1, 0.01).double()
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)

    def corrupt64(s):  # the training input of level s, in fp64 (corrupt() computes in fp32)
        miss = (~masks[:, s]).double().view([B] + [T if d == td else 1 for d in range(1, x0.dim())])
        return interpolate(x0, masks[:, s], time_dim=td) + float(sig[s]) * eps * miss

    x_start = corrupt64(0)
    out, xs, _ = refine(lambda *a: x0, x_start, masks, time_dim=td, sigmas=sig, return_all=True)
    for s in range(len(budgets)):
        expect = corrupt64(s)
        torch.testing.assert_close(xs[s], expect, atol=1e-12, rtol=0)
    torch.testing.assert_close(out, x0, atol=1e-12, rtol=0)


def test_level_noise_replaces_the_carried_noise():
    """``noise="level"``: the frames missing at s+1 carry fresh noise of std sigma_{s+1} (not sigma_s
    plus it); keyframes of M_{s+1} are exact for a perfect restorer; the output is x0."""
    gen = torch.Generator().manual_seed(4)
    B, T = 64, 33
    budgets = [3, 9, 17, 33]
    x0 = torch.randn(B, 8, T, generator=gen, dtype=torch.float64)
    masks = uniform_nested_masks(B, T, budgets)
    sig = torch.tensor([0.5, 0.2, 0.05, 0.0], dtype=torch.float64)
    miss0 = (~masks[:, 0]).double()[:, None, :]
    x_start = interpolate(x0, masks[:, 0], time_dim=2) + 0.5 * torch.randn(x0.shape, generator=gen, dtype=torch.float64) * miss0
    out, xs, _ = refine(lambda *a: x0, x_start, masks, time_dim=2, sigmas=sig, noise="level", generator=gen,
                        return_all=True)
    for s in (1, 2):
        m = masks[:, s][:, None, :].expand_as(x0)
        d = xs[s] - interpolate(x0, masks[:, s], time_dim=2)
        assert torch.equal(d[m], torch.zeros_like(d[m]))
        assert float(d[~m].std()) == pytest.approx(float(sig[s]), rel=0.1)
    torch.testing.assert_close(out, x0, atol=1e-12, rtol=0)


def test_tacos_step_keeps_the_tacos_correction():
    """Without sigmas the step is the literal TACoS update ``x_s - D(x0_hat, s) + D(x0_hat, s+1)``
    (restorer errors at the anchors included) except on the new keyframes of M_{s+1}, which take
    ``D(x0_hat, s+1) + I(x_s - x0_hat, M_s)`` (no noise part); with sigmas the part of ``x_s`` that is not
    piecewise linear between its anchors is rescaled by sigma_{s+1} / sigma_s, per sample."""
    gen = torch.Generator().manual_seed(5)
    B, T = 4, 17
    x0 = torch.randn(B, T, 3, generator=gen, dtype=torch.float64)
    masks = random_nested_masks(B, T, [4, 9, 17], gen)
    m0, m1 = masks[:, 0], masks[:, 1]
    x_s = corrupt(x0, m0, 0.3, time_dim=1, generator=gen)
    x_hat = x0 + 0.2 * torch.randn(x0.shape, generator=gen, dtype=torch.float64)  # wrong at the anchors too
    literal = x_s - interpolate(x_hat, m0) + interpolate(x_hat, m1)
    got = tacos_step(x_s, x_hat, m0, m1)
    new_key = m1 & ~m0
    n_s = x_s - interpolate(x_s, m0)
    torch.testing.assert_close(got[~new_key], literal[~new_key], atol=1e-12, rtol=0)
    torch.testing.assert_close(got[new_key], (literal - n_s)[new_key], atol=1e-12, rtol=0)
    sig_s = torch.tensor([0.3, 0.3, 0.6, 0.0], dtype=torch.float64)
    sig_n = torch.tensor([0.1, 0.3, 0.2, 0.0], dtype=torch.float64)
    scaled = tacos_step(x_s, x_hat, m0, m1, sigma_next=sig_n, sigma_s=sig_s)
    rho = torch.tensor([1 / 3, 1.0, 1 / 3, 1.0], dtype=torch.float64)[:, None, None]  # sigma_s = 0: unscaled
    expect = torch.where(m1[..., None], got, got - n_s + rho * n_s)
    torch.testing.assert_close(scaled, expect, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="sigma_s"):
        tacos_step(x_s, x_hat, m0, m1, sigma_next=0.1, sigma_s=torch.ones(3))
    # no schedule (sigma_s not given): plain TACoS whatever the noise mode (level adds 0 noise here)
    torch.testing.assert_close(tacos_step(x_s, x_hat, m0, m1, noise="level"), got, atol=0, rtol=0)


@pytest.mark.parametrize("layout", ["maze", "video"])
def test_constant_sampling_noise_tied_to_sigma_0(layout):
    """``sampling_noise_scale('constant', c, sigmas)`` makes ``refine`` add noise of std ``c * sigma_0``
    (the level-0 training sigma) per step on the missing frames: measured as the difference of the
    first step's output to the noise-free run (oracle restorer, same start) against ``level_sigmas``.
    ``level`` keeps ``c`` (``tacos_step`` multiplies it by ``sigma_{s+1}``)."""
    import math

    from interpdiff.corruption import sampling_noise_scale

    gen = torch.Generator().manual_seed(0)
    T, budgets = 33, [3, 9, 17, 33]
    if layout == "maze":
        x0, td = torch.rand(80, T, 2, generator=gen), 1
    else:
        x0, td = torch.randn(4, 4, T, 6, 6, generator=gen), 2
    B = x0.shape[0]
    masks = uniform_nested_masks(B, T, budgets)
    sig = level_sigmas(len(budgets), 0.1, 0.01)
    x_start = corrupt(x0, masks[:, 0], float(sig[0]), time_dim=td, generator=gen)
    c = 0.5
    scale = sampling_noise_scale("constant", c, sig)
    assert scale == pytest.approx(c * float(sig[0])) and sampling_noise_scale("level", c, sig) == c
    _, xs_none, _ = refine(lambda x, s, m, conf: x0, x_start, masks, time_dim=td, sigmas=sig, noise="none",
                           return_all=True)
    _, xs_const, _ = refine(lambda x, s, m, conf: x0, x_start, masks, time_dim=td, sigmas=sig, noise="constant",
                            noise_scale=scale, generator=torch.Generator().manual_seed(1), return_all=True)
    added = (xs_const[1] - xs_none[1]).movedim(td, 1)[~masks[:, 1]]
    assert added.numel() > 3000 and added.std().item() == pytest.approx(c * float(sig[0]), rel=0.05)
    assert not (xs_const[1] - xs_none[1]).movedim(td, 1)[masks[:, 1]].any()  # none on the keyframes of M_1
    for bad in (math.nan, math.inf, -0.1):
        with pytest.raises(ValueError, match="scale"):
            sampling_noise_scale("constant", bad, sig)
    with pytest.raises(ValueError, match="noise='loud'"):
        sampling_noise_scale("loud", 1.0, sig)
