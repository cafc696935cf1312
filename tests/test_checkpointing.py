"""Gradient checkpointing policies of the Wan transformer (``wan.enable_checkpointing``).

Reference: the same tiny model without checkpointing. Both policies must give the same loss
and gradients; ``attention`` must run the attention kernel once per call (no recompute in
backward) while ``full`` runs it twice.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from interpdiff.video import wan


class _CountSDPA(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0
        self.ops = set(wan._sdpa_ops())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.ops:
            self.n += 1
        return func(*args, **(kwargs or {}))


def _model():
    tr = wan.build_tiny_transformer(dtype=torch.float32)
    # explicitly torch's SDPA: diffusers keeps the last backend set on any model as its active
    # default, so a test that set "math" before would otherwise change what runs here
    wan.set_attention_backend(tr, "sdpa")
    wan.freeze(tr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        wan.add_lora(tr, wan.LoraSpec(rank=4, alpha=4))
        for _, p in wan.trainable_parameters(tr):  # non-zero LoRA B so every gradient is non-trivial
            p.data.normal_(0, 0.05)
    return tr.train()


def _loss_and_grads(tr, mode=None):
    g = torch.Generator().manual_seed(0)
    cfg = wan.tiny_transformer_config()
    x = torch.randn(2, cfg["in_channels"], 5, 4, 6, generator=g)
    emb = torch.randn(2, 7, cfg["text_dim"], generator=g)
    t = torch.tensor([100.0, 700.0])
    ctx = mode if mode is not None else torch.enable_grad()
    with ctx:
        out = tr(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
        loss = (out ** 2).mean()
        loss.backward()
    grads = {n: p.grad.clone() for n, p in wan.trainable_parameters(tr)}
    return loss.detach(), grads


@pytest.mark.parametrize("policy,ratio", [("full", 1.0), ("attention", 1.0), ("attention", 0.5), ("attention_ffn", 1.0)])
def test_checkpointing_policies_match_no_checkpointing(policy, ratio):
    ref_loss, ref_grads = _loss_and_grads(_model())
    tr = _model()
    chosen = wan.enable_checkpointing(tr, ratio, policy)
    assert len(chosen) == round(ratio * len(tr.blocks))
    loss, grads = _loss_and_grads(tr)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-6, atol=1e-7, msg=n)


def test_attention_policy_does_not_recompute_attention():
    counts = {}
    for policy in (None, "full", "attention"):
        tr = _model()
        if policy:
            wan.enable_checkpointing(tr, 1.0, policy)
        mode = _CountSDPA()
        _loss_and_grads(tr, mode)
        counts[policy] = mode.n
    n_calls = 2 * len(_model().blocks)  # self- and cross-attention per block
    assert counts[None] == n_calls
    assert counts["full"] == 2 * n_calls  # forward + recompute in backward
    assert counts["attention"] == n_calls  # outputs kept: no recompute


class _CountFFN(TorchDispatchMode):
    """Counts the FFN up-projection matmuls (weight ``[dim, ffn_dim]``)."""

    def __init__(self, dim, ffn):
        super().__init__()
        self.n, self.shape = 0, (dim, ffn)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and tuple(args[-1].shape) == self.shape:
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_attention_ffn_policy_keeps_the_ffn_up_projection():
    cfg = wan.tiny_transformer_config()
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    assert cfg["ffn_dim"] != dim  # the weight shape identifies the up-projection
    counts = {}
    for policy in (None, "full", "attention_ffn"):
        tr = _model()
        if policy:
            wan.enable_checkpointing(tr, 1.0, policy)
        mode = _CountFFN(dim, cfg["ffn_dim"])
        _loss_and_grads(tr, mode)
        counts[policy] = mode.n
    n_blocks = len(_model().blocks)
    # without checkpointing: one up-projection per block (+ the down-projection's input gradient,
    # whose weight operand has the same shape); full recomputes it once more per block
    assert counts["full"] == counts[None] + n_blocks
    assert counts["attention_ffn"] == counts[None]  # kept: not recomputed


def test_bad_checkpointing_arguments():
    tr = _model()
    with pytest.raises(ValueError, match="checkpoint_policy='everything'"):
        wan.enable_checkpointing(tr, 1.0, "everything")
    with pytest.raises(ValueError, match=r"checkpoint_ratio must lie in \[0, 1\], got 1.5"):
        wan.enable_checkpointing(tr, 1.5)


def test_config_checkpoint_policy_is_validated_and_used(tmp_path):
    """``model.checkpoint_policy`` reaches the model through the training config, and a bad value
    stops at config time naming the key."""
    from interpdiff.config import ConfigError
    from interpdiff.video.objectives import VideoTrainConfig, enable_checkpointing

    cfg = VideoTrainConfig()
    cfg.model.checkpoint_policy = "attention"
    cfg.validate()
    tr = _model()
    chosen = enable_checkpointing(tr, 1.0, cfg.model.checkpoint_policy)
    mode = _CountSDPA()
    _loss_and_grads(tr, mode)
    assert len(chosen) == len(tr.blocks) and mode.n == 2 * len(tr.blocks)  # attention not recomputed
    with pytest.raises(ConfigError, match="checkpoint_policy='nope'"):
        enable_checkpointing(_model(), 1.0, "nope")
    cfg.model.checkpoint_policy = "nope"
    with pytest.raises(ConfigError, match="model.checkpoint_policy='nope' is not one of"):
        cfg.validate()


@pytest.mark.parametrize("policy", ["full", "attention"])
def test_inside_placement_eager_matches_and_is_undone(policy):
    """``placement="inside"`` (each chosen block's forward wrapped in the checkpoint) gives the
    uncheckpointed gradients, recomputes attention only under ``full``, and is removed by
    ``remove_block_checkpointing`` / a new ``enable_checkpointing`` call; ``auto`` picks it once
    the blocks are set up for ``torch.compile`` (nothing is traced by that)."""
    ref_loss, ref_grads = _loss_and_grads(_model())
    tr = _model()
    chosen = wan.enable_checkpointing(tr, 1.0, policy, placement="inside")
    assert not tr.gradient_checkpointing and all("forward" in b.__dict__ for b in tr.blocks)
    mode = _CountSDPA()
    loss, grads = _loss_and_grads(tr, mode)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-7, msg=n)
    assert mode.n == (4 if policy == "full" else 2) * len(chosen)
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    torch.utils.checkpoint.checkpoint = lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k)
    try:
        kw = dict(hidden_states=torch.zeros(1, 16, 5, 4, 6), timestep=torch.tensor([1.0]),
                  encoder_hidden_states=torch.zeros(1, 7, wan.tiny_transformer_config()["text_dim"]))
        with torch.no_grad():  # no checkpoint without grad
            tr(**kw)
        assert calls == []
        tr(**kw)
        assert len(calls) == len(chosen)
    finally:
        torch.utils.checkpoint.checkpoint = real_checkpoint
    wan.set_gradient_checkpointing(tr, False)  # also removes the inside wrappers
    assert not tr.gradient_checkpointing and not any("forward" in b.__dict__ for b in tr.blocks)
    wan.enable_checkpointing(tr, 1.0, policy, placement="inside")
    wan.set_gradient_checkpointing(tr, True)  # diffusers' switch replaces them: never checkpointed twice
    assert tr.gradient_checkpointing and not any("forward" in b.__dict__ for b in tr.blocks)
    tr.blocks[0].forward = lambda *a, **k: None  # a hook on the instance: not silently discarded
    with pytest.raises(ValueError, match="already has its own forward"):
        wan.enable_checkpointing(tr, 1.0, policy, placement="inside")
    del tr.blocks[0].forward
    wan.remove_block_checkpointing(tr)
    assert not any("forward" in b.__dict__ for b in tr.blocks)
    assert wan.enable_checkpointing(tr, 1.0, policy) and tr.gradient_checkpointing  # auto, eager: outside
    tr.compile_repeated_blocks(fullgraph=True)
    wan.enable_checkpointing(tr, 0.5, policy)  # auto, compiled: inside
    assert not tr.gradient_checkpointing and sum("forward" in b.__dict__ for b in tr.blocks) == round(0.5 * len(tr.blocks))
    assert wan.enable_checkpointing(tr, 0.0, policy) == [] and not any("forward" in b.__dict__ for b in tr.blocks)
    with pytest.raises(ValueError, match="placement='middle'"):
        wan.enable_checkpointing(tr, 1.0, policy, placement="middle")


@pytest.mark.slow
@pytest.mark.parametrize("placement", ["outside", "inside", "auto_after_compile"])
@pytest.mark.parametrize("policy", ["full", "attention", "attention_ffn"])
def test_checkpointing_policies_under_regional_compile(policy, placement):
    """``wan1.3b_phase2.yaml`` combines ``model.compile`` (diffusers' regional compile of the
    blocks) with selective checkpointing: the gradients must equal the eager, uncheckpointed
    model's for both placements (inductor on CPU here; the same code path compiles for CUDA).
    ``auto_after_compile`` is the training scripts' order: the blocks are compiled when the
    model is built, the loop enables checkpointing later (``auto`` -> inside)."""
    import torch._dynamo

    torch._dynamo.reset()
    ref_loss, ref = _loss_and_grads(_model())
    tr = _model()
    if placement == "auto_after_compile":
        tr.compile_repeated_blocks(fullgraph=True)
        wan.enable_checkpointing(tr, 1.0, policy)
        assert not tr.gradient_checkpointing and all("forward" in b.__dict__ for b in tr.blocks)
    else:
        wan.enable_checkpointing(tr, 1.0, policy, placement=placement)
        tr.compile_repeated_blocks(fullgraph=True)
    for _ in range(2):  # the first call compiles
        for p in tr.parameters():
            p.grad = None
        loss, grads = _loss_and_grads(tr)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
        for n in ref:
            torch.testing.assert_close(grads[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.slow
def test_inside_placement_under_compile_applies_the_policy():
    """Checkpoint inside the compiled blocks: the partitioner applies the policy to the traced
    graph. Counted with the profiler over the backward (no dispatch mode is involved, so the
    counts are the kernels that ran): ``full`` re-runs every attention call, ``attention`` none,
    and ``attention_ffn`` also keeps the FFN up-projection (one matmul fewer per block), which the
    outside placement cannot do under compile (inductor calls ``mm.out``)."""
    import torch._dynamo
    from torch.profiler import ProfilerActivity, profile

    cfg = wan.tiny_transformer_config()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg["in_channels"], 5, 4, 6, generator=g)
    emb = torch.randn(2, 7, cfg["text_dim"], generator=g)
    t = torch.tensor([100.0, 700.0])

    def backward_counts(policy, placement):
        torch._dynamo.reset()
        tr = _model()
        wan.enable_checkpointing(tr, 1.0, policy, placement=placement)
        tr.compile_repeated_blocks(fullgraph=True)
        for _ in range(2):  # the first step compiles
            out = tr(hidden_states=x, timestep=t, encoder_hidden_states=emb, return_dict=False)[0]
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                (out ** 2).mean().backward()
        c = {e.key: e.count for e in prof.key_averages()}
        sdpa = sum(v for k, v in c.items() if k.startswith("aten::_scaled_dot_product") and not k.endswith("backward"))
        return sdpa, c.get("aten::mm", 0) + c.get("aten::addmm", 0), len(tr.blocks)

    full, attn, ffn = (backward_counts(p, "inside") for p in ("full", "attention", "attention_ffn"))
    n_blocks = full[2]
    assert full[0] == 2 * n_blocks and attn[0] == 0 and ffn[0] == 0  # self + cross attention per block
    assert ffn[1] == attn[1] - n_blocks
    assert full[1] >= attn[1]
