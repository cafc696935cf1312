import numpy as np
import pytest
import torch

from interpdiff.interpolate import interpolate, interpolate_corrupt, neighbours


def random_mask(B, T, k, gen):
    m = torch.zeros(B, T, dtype=torch.bool)
    m[:, 0] = m[:, -1] = True
    for b in range(B):
        n = int(torch.randint(0, k + 1, (1,), generator=gen))
        m[b, torch.randperm(T - 2, generator=gen)[:n] + 1] = True
    return m


def loop_reference(x, mask, time_dim):
    """Per-sample, per-channel np.interp: an implementation independent of the library's."""
    xn = np.moveaxis(x.double().numpy(), time_dim, 1)
    out = np.empty_like(xn)
    T = xn.shape[1]
    for b in range(xn.shape[0]):
        keys = np.nonzero(mask[b].numpy())[0]
        flat = xn[b].reshape(T, -1)
        o = out[b].reshape(T, -1)
        for c in range(flat.shape[1]):
            o[:, c] = np.interp(np.arange(T), keys, flat[keys, c])
        out[b] = o.reshape(xn[b].shape)
    return torch.from_numpy(np.moveaxis(out, 1, time_dim))


@pytest.mark.parametrize("shape,time_dim", [((4, 17, 3), 1), ((3, 5, 9, 3, 4), 2), ((2, 7, 2), 1)])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float64, 1e-12), (torch.bfloat16, 1e-2)])
def test_matches_loop_reference(shape, time_dim, dtype, atol):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(dtype)
    mask = random_mask(shape[0], shape[time_dim], 4, gen)
    got = interpolate(x, mask, time_dim=time_dim)
    assert got.dtype == dtype and got.shape == x.shape
    ref = loop_reference(x.float(), mask, time_dim)
    # bf16: the library accumulates in fp32 and rounds once, so within one bf16 ulp of |ref|
    tol = atol * (1 + ref.abs()) if dtype == torch.bfloat16 else atol
    assert torch.all((got.double() - ref).abs() <= tol), (got.double() - ref).abs().max()


def test_keyframes_kept_exactly_and_all_keyframes_identity():
    x = torch.randn(2, 9, 3)
    m = torch.ones(2, 9, dtype=torch.bool)
    assert torch.equal(interpolate(x, m), x)
    m2 = random_mask(2, 9, 3, torch.Generator().manual_seed(1))
    y = interpolate(x, m2)
    assert torch.equal(y[m2], x[m2])


def test_gradients_only_to_keyframes_and_gradcheck():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 11, 2, dtype=torch.float64, requires_grad=True)
    mask = random_mask(3, 11, 4, gen)
    assert torch.autograd.gradcheck(lambda v: interpolate(v, mask), (x,))
    interpolate(x, mask).sum().backward()
    assert torch.all(x.grad[~mask] == 0)
    # each keyframe collects the weights of the frames it interpolates; the weights sum to T per row
    assert torch.allclose(x.grad.sum(dim=1), torch.full((3, 2), 11.0, dtype=torch.float64))


def test_neighbours_hand_case():
    m = torch.tensor([[True, False, False, True, False, True]])
    left, right, w = neighbours(m)
    assert left.tolist() == [[0, 0, 0, 3, 3, 5]]
    assert right.tolist() == [[0, 3, 3, 3, 5, 5]]
    assert torch.allclose(w, torch.tensor([[0, 1 / 3, 2 / 3, 0, 0.5, 0]]))


def test_corrupt_adds_noise_only_on_missing_frames():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 10, 2, 2, generator=gen)
    mask = random_mask(2, 10, 3, gen)
    eps = torch.randn(x.shape, generator=gen)
    sigma = torch.tensor([0.5, 0.1])
    got = interpolate_corrupt(x, mask, sigma, eps, time_dim=2)
    miss = (~mask).float()[:, None, :, None, None]
    want = loop_reference(x, mask, 2).float() + sigma.view(2, 1, 1, 1, 1) * eps * miss
    assert torch.allclose(got, want, atol=1e-6)


def test_corrupt_refuses_bad_eps_on_every_backend():
    """An integer or mis-shaped eps is refused by the torch path as by the Triton one (it was cast)."""
    x = torch.randn(2, 6, 3)
    mask = torch.tensor([[True, False, True, False, False, True]] * 2)
    for eps in (torch.randint(0, 3, (2, 6, 3)), torch.randn(2, 6, 2)):
        with pytest.raises(ValueError, match="eps must be a float tensor of x's shape"):
            interpolate_corrupt(x, mask, 0.1, eps, backend="torch")


@pytest.mark.parametrize(
    "x,mask,msg",
    [
        (torch.randn(2, 5, 3), torch.tensor([[True, False, False, False, True], [False, True, False, False, True]]), "endpoint"),
        (torch.randn(2, 5, 3), torch.ones(2, 6, dtype=torch.bool), "shape"),
        (torch.randn(2, 5, 3), torch.ones(2, 5), "bool"),
        (torch.randint(0, 3, (2, 5, 3)), torch.ones(2, 5, dtype=torch.bool), "floating"),
    ],
)
def test_bad_inputs_raise_clear_errors(x, mask, msg):
    with pytest.raises(ValueError, match=msg):
        interpolate(x, mask)


def test_forced_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 4, 2)
    m = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        interpolate(x, m, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        interpolate(x, m, backend="cuda")


def test_check_values_false_still_checks_on_cpu():
    x = torch.randn(1, 5, 2)
    bad = torch.tensor([[True, False, True, False, False]])
    with pytest.raises(ValueError, match="endpoint"):
        interpolate(x, bad, check_values=False)  # only CUDA tensors skip the host-side check
    with pytest.raises(ValueError, match="endpoint"):
        interpolate_corrupt(x, bad, 0.1, torch.randn_like(x), check_values=False)
