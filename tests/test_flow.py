import math

import pytest
import torch

from interpdiff import flow


def test_flow_match_basics():
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(flow.flow_match_xt(x0, eps, 0.0), x0)
    assert torch.equal(flow.flow_match_xt(x0, eps, 1.0), eps)
    s = torch.tensor([0.1, 0.5, 0.9])
    xt = flow.flow_match_xt(x0, eps, s)
    assert torch.allclose(xt, (1 - s[:, None]) * x0 + s[:, None] * eps)
    v = flow.flow_match_target(x0, eps)
    assert torch.allclose(flow.x0_from_velocity(xt, v, s), x0, atol=1e-6)


def test_shift():
    s = torch.linspace(0, 1, 11)
    assert torch.allclose(flow.shift_sigma(s, 1.0), s)
    sh = flow.shift_sigma(s, 5.0)
    assert sh[0] == 0 and sh[-1] == 1 and torch.all(sh >= s)
    assert float(flow.shift_sigma(torch.tensor(0.5), 5.0)) == pytest.approx(2.5 / 3)
    grid = flow.sampling_sigmas(4, shift=3.0)
    assert grid.shape == (5,) and grid[0] == 1 and grid[-1] == 0 and torch.all(grid[1:] < grid[:-1])
    assert flow.sigma_to_timestep(0.25) == 250.0


def test_trigflow_round_trips_and_velocity():
    torch.manual_seed(0)
    x0, eps = torch.randn(5, 3), torch.randn(5, 3)
    sigma = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95])
    theta = flow.flow_to_trig_time(sigma)
    assert torch.allclose(flow.trig_to_flow_time(theta), sigma.double(), atol=1e-12)
    assert torch.all((theta > 0) & (theta < math.pi / 2))
    th = theta.float()[:, None]
    x_theta = torch.cos(th) * x0 + torch.sin(th) * eps  # TrigFlow point computed directly
    x_sigma = flow.flow_match_xt(x0, eps, sigma)
    assert torch.allclose(flow.flow_to_trig_x(x_sigma, sigma), x_theta, atol=1e-5)
    assert torch.allclose(flow.trig_to_flow_x(x_theta, theta), x_sigma, atol=1e-5)
    F = torch.cos(th) * eps - torch.sin(th) * x0  # d x_theta / d theta
    v = flow.flow_match_target(x0, eps)
    assert torch.allclose(flow.flow_velocity_to_trig(v, x_sigma, sigma), F, atol=1e-5)
    assert torch.allclose(flow.trig_velocity_to_flow(F, x_theta, theta), v, atol=1e-5)


def test_sample_sigmas():
    g = torch.Generator().manual_seed(0)
    for d in flow.DENSITIES:
        s = flow.sample_sigmas(1000, d, shift=3.0, generator=g)
        assert s.shape == (1000,) and torch.all((s >= 0) & (s <= 1))
    with pytest.raises(ValueError, match="density"):
        flow.sample_sigmas(3, "beta")


def test_trigflow_conversions_keep_float64_precision():
    """fp64 inputs stay fp64 through the conversions (times included), so the fp64 JVP checks of the
    distillation code are fp64-accurate; bf16/fp32 inputs still compute times in fp32."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=torch.float64)
    theta = flow.flow_to_trig_time(sigma)
    th = theta[:, None]
    x_theta = torch.cos(th) * x0 + torch.sin(th) * eps
    x_sigma = flow.flow_match_xt(x0, eps, sigma)
    F = torch.cos(th) * eps - torch.sin(th) * x0
    v = flow.flow_match_target(x0, eps)
    for got, want in ((flow.flow_to_trig_x(x_sigma, sigma), x_theta), (flow.trig_to_flow_x(x_theta, theta), x_sigma),
                      (flow.flow_velocity_to_trig(v, x_sigma, sigma), F), (flow.trig_velocity_to_flow(F, x_theta, theta), v)):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert flow.flow_velocity_to_trig(v.bfloat16(), x_sigma.bfloat16(), sigma).dtype == torch.float32
