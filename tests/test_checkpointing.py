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


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["full", "attention", "attention_ffn"])
def test_checkpointing_policies_under_regional_compile(policy):
    """``wan1.3b_phase2.yaml`` combines ``model.compile`` (diffusers' regional compile of the
    blocks) with selective checkpointing: the gradients must equal the eager, uncheckpointed
    model's (inductor on CPU here; the same code path compiles for CUDA)."""
    import torch._dynamo

    torch._dynamo.reset()
    ref_loss, ref = _loss_and_grads(_model())
    tr = _model()
    wan.enable_checkpointing(tr, 1.0, policy)
    tr.compile_repeated_blocks(fullgraph=True)
    for _ in range(2):  # the first call compiles
        for p in tr.parameters():
            p.grad = None
        loss, grads = _loss_and_grads(tr)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
        for n in ref:
            torch.testing.assert_close(grads[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)
