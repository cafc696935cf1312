"""interpdiff.video.wan against diffusers / peft themselves (tiny configs of the real classes, CPU).

References used: diffusers' own WanPipeline + load_lora_weights, diffusers' WanRotaryPosEmbed,
diffusers' converter for original-Wan (ComfyUI) LoRA keys, a hand-merged ``W + alpha/r B A``
copy of the base model, a single conv3d over concatenated weights, WanPipeline's prompt encoding.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

torch.set_num_threads(1)

from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel  # noqa: E402
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed  # noqa: E402
from transformers import UMT5EncoderModel  # noqa: E402

from interpdiff.video import wan  # noqa: E402


def _inputs(b=2, t=3, h=4, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(b, 16, t, h, w, generator=g)
    emb = torch.randn(b, 7, 32, generator=g)
    ts = torch.tensor([700.0, 150.0][:b] + [500.0] * max(0, b - 2))
    return lat, ts, emb


def _perturb_lora(model, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def _components():
    return wan.load_wan("tiny", dtype=torch.float32)


def _run_pipe(pipe, seed=0):
    out = pipe(prompt="a man walks on the beach", num_frames=5, height=32, width=32, num_inference_steps=2,
               guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(seed))
    return out.frames


# ------------------------------------------------------------------------------------- loading


def test_tiny_preset_builds_the_real_classes_frozen():
    c = wan.load_wan("tiny")
    assert isinstance(c.transformer, WanTransformer3DModel)
    assert isinstance(c.vae, AutoencoderKLWan)
    assert isinstance(c.text_encoder, UMT5EncoderModel)
    assert type(c.tokenizer).__name__.startswith("T5Tokenizer")
    for m in (c.transformer, c.vae, c.text_encoder):
        assert not any(p.requires_grad for p in m.parameters())
    # bf16 with diffusers' fp32 islands (rope, time embedder, modulation tables, norms)
    assert c.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert c.transformer.scale_shift_table.dtype == torch.float32
    assert c.text_encoder.dtype == torch.bfloat16
    # the tiny preset is seeded: two builds are identical
    c2 = wan.load_wan("tiny", components=("transformer",))
    for (n, a), (_, b) in zip(c.transformer.state_dict().items(), c2.transformer.state_dict().items()):
        assert torch.equal(a, b), n


def test_load_from_a_diffusers_folder_and_clear_errors(tmp_path):
    c = _components()
    pipe = wan.make_pipeline(c)
    pipe.save_pretrained(tmp_path / "wan")
    c2 = wan.load_wan(tmp_path / "wan", dtype=torch.float32)
    lat, ts, emb = _inputs()
    ref = wan.wan_forward(c.transformer, lat, ts, emb)
    assert torch.equal(wan.wan_forward(c2.transformer, lat, ts, emb), ref)
    assert c2.tokenizer("a dog runs").input_ids == c.tokenizer("a dog runs").input_ids

    with pytest.raises(wan.WanLoadError, match="does not exist"):
        wan.load_wan(tmp_path / "nope")
    (tmp_path / "wan" / "transformer" / "config.json").unlink()
    with pytest.raises(wan.WanLoadError, match=r"missing file .*transformer/config\.json"):
        wan.load_transformer(tmp_path / "wan")
    with pytest.raises(wan.WanLoadError, match="no 'text_encoder' subfolder"):
        wan.load_text_encoder(tmp_path)


def test_encode_prompts_matches_wan_pipeline():
    c = _components()
    pipe = wan.make_pipeline(c)
    prompts = ["a man walks on the beach", "red car"]
    ref = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=24)
    got = wan.encode_prompts(c.text_encoder, c.tokenizer, prompts, max_length=24)
    assert torch.equal(got, ref)
    assert got[1, 4:].abs().sum() == 0  # zero past "red car </s>" (+ letters)


def test_vae_encode_decode_shapes_and_normalisation():
    c = _components()
    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    lat = wan.vae_encode(c.vae, video)
    assert lat.shape == (1, 16, 2, 4, 4)  # 1 + (5-1)/4 frames, /8 spatially
    mean, std = wan.latent_norm(c.vae)
    raw = c.vae.encode(video).latent_dist.mode()
    torch.testing.assert_close(lat, (raw - mean) / std)
    out = wan.vae_decode(c.vae, lat)
    assert out.shape == (1, 3, 5, 32, 32) and out.abs().max() <= 1


# ------------------------------------------------------------------------------------- LoRA


def test_lora_targets_default_and_unmatched_error():
    c = _components()
    names = wan.add_lora(c.transformer, wan.LoraSpec(rank=4, alpha=4))
    n_layers = c.transformer.config.num_layers
    assert len(names) == n_layers * (2 * 4 + 2)  # attn1+attn2 q/k/v/out + 2 FFN projections
    assert all(p.requires_grad == ("lora_" in n) for n, p in c.transformer.named_parameters())
    c2 = _components()
    with pytest.raises(ValueError, match=r"\['to_qq'\] match no module"):
        wan.add_lora(c2.transformer, wan.LoraSpec(target_modules=["to_q", "to_qq"]))


def test_lora_equals_hand_merged_weights():
    c = _components()
    base = copy.deepcopy(c.transformer)
    rank, alpha = 4, 8.0
    wan.add_lora(c.transformer, wan.LoraSpec(rank=rank, alpha=alpha))
    lat, ts, emb = _inputs()
    assert torch.equal(wan.wan_forward(c.transformer, lat, ts, emb), wan.wan_forward(base, lat, ts, emb))  # B = 0
    _perturb_lora(c.transformer)
    sd = wan.lora_state_dict(c.transformer)
    with torch.no_grad():
        for key in [k for k in sd if k.endswith("lora_A.weight")]:
            mod = key[: -len(".lora_A.weight")]
            delta = (alpha / rank) * sd[mod + ".lora_B.weight"] @ sd[key]
            base.get_submodule(mod).weight += delta
    torch.testing.assert_close(wan.wan_forward(c.transformer, lat, ts, emb), wan.wan_forward(base, lat, ts, emb),
                               atol=1e-5, rtol=1e-5)


def test_saved_lora_loads_into_wan_pipeline_and_matches_training_model(tmp_path):
    c = _components()
    wan.add_lora(c.transformer, wan.LoraSpec(rank=4, alpha=8.0, dropout=0.1))
    _perturb_lora(c.transformer)
    c.transformer.eval()  # dropout off, as in the pipeline
    train_pipe = wan.make_pipeline(c)
    out_train = _run_pipe(train_pipe)
    wan.save_lora(c.transformer, tmp_path / "lora", comfy=True)
    assert {p.name for p in (tmp_path / "lora").iterdir()} == {
        wan.LORA_WEIGHT_NAME, wan.META_NAME, "lora_comfy.safetensors"}
    meta = json.loads((tmp_path / "lora" / wan.META_NAME).read_text())
    assert meta["lora"]["rank"] == 4 and meta["lora"]["alpha"] == 8.0 and meta["widening"] is None

    fresh = _components()
    pipe = wan.make_pipeline(fresh)
    out_base = _run_pipe(pipe)
    pipe.load_lora_weights(str(tmp_path / "lora"))  # diffusers' own loader, file name found by default
    # peft injects lora_dropout in train mode (dropout 0.1 stored in the adapter metadata): the
    # pipeline output is only deterministic after eval(); load_lora_into_pipeline does this.
    assert pipe.transformer.blocks[0].attn1.to_q.lora_dropout["default_0"].p == pytest.approx(0.1)
    pipe.transformer.eval()
    out_loaded = _run_pipe(pipe)
    assert not torch.allclose(out_base, out_train)
    torch.testing.assert_close(out_loaded, out_train, atol=1e-6, rtol=1e-6)
    pipe2 = wan.make_pipeline(_components())
    wan.load_lora_into_pipeline(pipe2, tmp_path / "lora")
    torch.testing.assert_close(_run_pipe(pipe2), out_train, atol=1e-6, rtol=1e-6)
    # keys are diffusers' transformer-prefixed peft keys
    sd = WanPipeline.lora_state_dict(str(tmp_path / "lora"))
    assert all(k.startswith("transformer.blocks.") and ".lora_" in k for k in sd)


@pytest.mark.parametrize("rslora", [False, True])
def test_comfy_export_converts_back_through_diffusers(tmp_path, rslora):
    """The kohya/ComfyUI export, read back by diffusers' converter, gives the trained model's output
    (rsLoRA: scale alpha / sqrt(rank), written as alpha * sqrt(rank) for the alpha / rank readers)."""
    from safetensors.torch import load_file

    c = _components()
    wan.add_lora(c.transformer, wan.LoraSpec(rank=4, alpha=2.0, use_rslora=rslora))
    _perturb_lora(c.transformer)
    out_train = _run_pipe(wan.make_pipeline(c))
    wan.save_lora(c.transformer, tmp_path / "lora", comfy=True)
    comfy = load_file(str(tmp_path / "lora" / "lora_comfy.safetensors"))
    assert "diffusion_model.blocks.0.self_attn.q.lora_down.weight" in comfy
    assert "diffusion_model.blocks.1.ffn.2.alpha" in comfy
    pipe = wan.make_pipeline(_components())
    pipe.load_lora_weights(comfy)  # diffusers detects the original-Wan format and converts it
    torch.testing.assert_close(_run_pipe(pipe), out_train, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- widening


@pytest.mark.parametrize("channels", [("mask",), ("mask", "confidence")])
def test_widened_model_equals_base_at_init_and_trains(channels):
    c = _components()
    base = copy.deepcopy(c.transformer)
    wan.add_lora(c.transformer, wan.LoraSpec(rank=4, alpha=4))
    wan.widen_patch_embedding(c.transformer, channels)
    lat, ts, emb = _inputs()
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]], dtype=torch.bool)
    conf = torch.rand(2, 3)
    extra = wan.extra_channels(mask, 4, 4, channels, confidence_B_T=conf)
    assert extra.shape == (2, len(channels), 3, 4, 4)
    out = wan.wan_forward(c.transformer, lat, ts, emb, extra_B_E_T_H_W=extra)
    assert torch.equal(out, wan.wan_forward(base, lat, ts, emb))  # exactly the base model
    out.square().mean().backward()
    g = c.transformer.patch_embedding.extra_weight.grad
    assert g is not None and g.abs().sum() > 0
    names = {n for n, _ in wan.trainable_parameters(c.transformer)}
    assert "patch_embedding.extra_weight" in names and "patch_embedding.weight" not in names
    with pytest.raises(ValueError, match="no extra_B_E_T_H_W"):
        wan.wan_forward(c.transformer, lat, ts, emb)


def test_widened_conv_equals_single_conv_over_concatenated_weights():
    c = _components()
    pe = wan.widen_patch_embedding(c.transformer, ("mask", "confidence"))
    with torch.no_grad():
        pe.extra_weight.normal_()
    x = torch.randn(2, 18, 3, 4, 6)
    ref = torch.nn.functional.conv3d(x, torch.cat([pe.weight, pe.extra_weight], 1), pe.bias, stride=pe.stride)
    torch.testing.assert_close(pe(x), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="expects 16\\+2 input channels"):
        pe(x[:, :17])


def test_widening_saved_with_lora_and_reloaded(tmp_path):
    c = _components()
    wan.widen_patch_embedding(c.transformer, ("mask",))  # widen first: add_lora must keep it trainable
    wan.add_lora(c.transformer, wan.LoraSpec(rank=4, alpha=4))
    assert c.transformer.patch_embedding.extra_weight.requires_grad
    _perturb_lora(c.transformer)
    with torch.no_grad():
        c.transformer.patch_embedding.extra_weight.normal_()
    lat, ts, emb = _inputs()
    extra = wan.extra_channels(torch.tensor([[1, 0, 1], [1, 0, 0]]), 4, 4)
    ref = wan.wan_forward(c.transformer, lat, ts, emb, extra_B_E_T_H_W=extra)
    wan.save_lora(c.transformer, tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / wan.META_NAME).read_text())["widening"] == {
        "channels": ["mask"], "base_in_channels": 16}
    fresh = _components().transformer
    meta = wan.load_lora(fresh, tmp_path / "lora", trainable=True)
    assert meta["widening"]["channels"] == ["mask"]
    torch.testing.assert_close(wan.wan_forward(fresh, lat, ts, emb, extra_B_E_T_H_W=extra), ref, atol=1e-6, rtol=1e-6)
    names = {n for n, _ in wan.trainable_parameters(fresh)}
    assert "patch_embedding.extra_weight" in names and any("lora_A" in n for n in names)
    with pytest.raises(wan.WanLoadError, match="interpdiff_lora.json"):
        (tmp_path / "lora" / wan.META_NAME).unlink()
        wan.load_lora(_components().transformer, tmp_path / "lora")


def _folder_bytes(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_save_lora_replaces_the_folder_as_a_whole(tmp_path, monkeypatch):
    """A crash while saving leaves the previous folder byte for byte (no mix of two saves, no temp
    folder); a completed save leaves only the new save's files (no stale ComfyUI export)."""
    tr = _components().transformer
    wan.widen_patch_embedding(tr, ("mask",))
    wan.add_lora(tr, wan.LoraSpec(rank=4, alpha=4))
    _perturb_lora(tr, seed=1)
    out = tmp_path / "ckpt" / "trainable"
    wan.save_lora(tr, out, comfy=True)
    first = _folder_bytes(out)
    assert set(first) == {wan.LORA_WEIGHT_NAME, wan.EXTRA_WEIGHT_NAME, wan.META_NAME, "lora_comfy.safetensors"}

    _perturb_lora(tr, seed=2)
    real = wan.atomic_write_text

    def crash(path, text):  # the metadata is the last file written: the weights are already new
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(wan, "atomic_write_text", crash)
    with pytest.raises(OSError, match="simulated"):
        wan.save_lora(tr, out)
    assert _folder_bytes(out) == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["trainable"]  # temp folder removed

    monkeypatch.setattr(wan, "atomic_write_text", real)
    wan.save_lora(tr, out)  # comfy=False now
    second = _folder_bytes(out)
    assert set(second) == {wan.LORA_WEIGHT_NAME, wan.EXTRA_WEIGHT_NAME, wan.META_NAME}
    assert second[wan.LORA_WEIGHT_NAME] != first[wan.LORA_WEIGHT_NAME]
    assert sorted(p.name for p in out.parent.iterdir()) == ["trainable"]
    fresh = _components().transformer
    wan.load_lora(fresh, out)
    sd_new = {k: v for k, v in wan.lora_state_dict(tr).items()}
    for k, v in wan.lora_state_dict(fresh).items():
        torch.testing.assert_close(v, sd_new[k], atol=0, rtol=0)


def test_load_lora_refuses_a_description_of_another_save(tmp_path):
    """``interpdiff_lora.json`` and the weights file of two different saves (a copied-over weights
    file) are refused naming both files and what differs; one save's folder loads."""
    src = _components().transformer
    wan.add_lora(src, wan.LoraSpec(rank=4, alpha=4))
    wan.save_lora(src, tmp_path / "r4")
    other = _components().transformer
    wan.add_lora(other, wan.LoraSpec(rank=8, alpha=16, target_modules=["to_q", "to_k"]))
    wan.save_lora(other, tmp_path / "r8")
    wan.load_lora(_components().transformer, tmp_path / "r4")
    (tmp_path / "r4" / wan.META_NAME).write_bytes((tmp_path / "r8" / wan.META_NAME).read_bytes())
    with pytest.raises(wan.WanLoadError, match=r"interpdiff_lora.json and pytorch_lora_weights.safetensors describe "
                                               r"different adapters \(rank: 8 in interpdiff_lora.json, 4 in .*alpha: 16.0"):
        wan.load_lora(_components().transformer, tmp_path / "r4")


def test_load_lora_weights_into_checks_every_tensor(tmp_path):
    """Resume copies exactly the stored values; a folder of another rank or with fewer targets is
    refused with the file named (never half loaded)."""
    src = _components().transformer
    wan.add_lora(src, wan.LoraSpec(rank=4, alpha=4))
    _perturb_lora(src, seed=3)
    wan.save_lora(src, tmp_path / "r4")
    dst = _components().transformer
    wan.add_lora(dst, wan.LoraSpec(rank=4, alpha=4))
    assert wan.load_lora_weights_into(dst, tmp_path / "r4") == len(wan.lora_parameters(dst))
    ref = dict(src.named_parameters())
    for n, p in dst.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, ref[n]), n
    other = _components().transformer
    wan.add_lora(other, wan.LoraSpec(rank=8, alpha=8))
    with pytest.raises(ValueError, match="r4.*shape"):
        wan.load_lora_weights_into(other, tmp_path / "r4")
    fewer = _components().transformer
    wan.add_lora(fewer, wan.LoraSpec(rank=4, alpha=4, target_modules=["to_q"]))
    wan.save_lora(fewer, tmp_path / "q_only")
    with pytest.raises(ValueError, match="not stored"):
        wan.load_lora_weights_into(dst, tmp_path / "q_only")
    with pytest.raises(wan.WanLoadError, match="lacks"):
        wan.load_lora_weights_into(dst, tmp_path / "nowhere")


def test_unwrap_model_strips_compile_and_module_wrappers():
    tr = wan.build_tiny_transformer()

    class Engine(torch.nn.Module):  # DDP / DeepSpeed engines expose the model as .module
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert wan.unwrap_model(Engine(torch.compile(tr))) is tr
    assert wan.unwrap_model(tr) is tr
    assert wan.to_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="'int8'"):
        wan.to_dtype("int8")


# ------------------------------------------------------------------------------------- rotary


def _base_rope(rope_like, frames, h, w):
    base = WanRotaryPosEmbed(rope_like.attention_head_dim, rope_like.patch_size, rope_like.max_seq_len)
    return base(torch.zeros(1, 16, frames, h, w))


def test_keyframe_rope_contiguous_equals_diffusers_exactly():
    c = _components()
    lat, ts, emb = _inputs(b=2, t=3, h=4, w=6)
    ref_out = wan.wan_forward(c.transformer, lat, ts, emb)
    rope = wan.install_keyframe_rope(c.transformer)
    ref_cos, ref_sin = _base_rope(rope, 3, 4, 6)
    idx = torch.arange(3).expand(2, 3)
    rope.frame_indices_B_K = idx
    cos, sin = rope(lat)
    rope.frame_indices_B_K = None
    assert cos.shape == (2, 3 * 2 * 3, 1, 12)
    assert torch.equal(cos, ref_cos.expand_as(cos)) and torch.equal(sin, ref_sin.expand_as(sin))
    assert torch.equal(wan.wan_forward(c.transformer, lat, ts, emb, frame_idx_B_K=idx), ref_out)
    assert torch.equal(wan.wan_forward(c.transformer, lat, ts, emb), ref_out)  # unset again after the call


def test_keyframe_rope_with_gaps_equals_longer_sequence_gathered():
    c = _components()
    rope = wan.install_keyframe_rope(c.transformer)
    h, w = 4, 6
    idx = torch.tensor([[0, 5, 20], [0, 1, 2]])
    long_cos, long_sin = _base_rope(rope, 21, h, w)  # diffusers' rope of a 21-frame latent
    per_frame = (h // 2) * (w // 2)
    rope.frame_indices_B_K = idx
    cos, sin = rope(torch.zeros(2, 16, 3, h, w))
    rope.frame_indices_B_K = None
    for b in range(2):
        rows = torch.cat([torch.arange(f * per_frame, (f + 1) * per_frame) for f in idx[b].tolist()])
        assert torch.equal(cos[b], long_cos[0, rows]) and torch.equal(sin[b], long_sin[0, rows])

    lat, ts, emb = _inputs(b=2, t=3, h=h, w=w)
    base_out = wan.wan_forward(c.transformer, lat, ts, emb)
    out = wan.wan_forward(c.transformer, lat, ts, emb, frame_idx_B_K=idx)
    assert torch.equal(out[1], base_out[1])  # contiguous sample unchanged, per-sample positions
    assert (out[0] - base_out[0]).abs().max() > 1e-3  # gapped sample sees other temporal phases
    with pytest.raises(ValueError, match=r"\[B=2, K=3\]"):
        wan.wan_forward(c.transformer, lat, ts, emb, frame_idx_B_K=idx[:, :2])


def test_keyframe_rope_survives_lora_and_checkpointing(tmp_path):
    c = _components()
    wan.install_keyframe_rope(c.transformer)
    wan.add_lora(c.transformer, wan.LoraSpec(rank=2, alpha=2))
    _perturb_lora(c.transformer)
    lat, ts, emb = _inputs()
    idx = torch.tensor([[0, 3, 7], [0, 2, 9]])

    def run():
        c.transformer.zero_grad()
        out = wan.wan_forward(c.transformer, lat, ts, emb, frame_idx_B_K=idx)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in wan.lora_parameters(c.transformer)]

    c.transformer.train()
    out0, g0 = run()
    wan.set_gradient_checkpointing(c.transformer, True)
    assert c.transformer.gradient_checkpointing
    out1, g1 = run()
    torch.testing.assert_close(out1, out0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b)
    # the LoRA folder records the keyframe rope; load_lora re-installs it on a plain model
    c.transformer.eval()
    wan.save_lora(c.transformer, tmp_path / "lora")
    fresh = _components().transformer
    assert json.loads((tmp_path / "lora" / wan.META_NAME).read_text())["keyframe_rope"] is True
    wan.load_lora(fresh, tmp_path / "lora")
    assert isinstance(fresh.rope, wan.KeyframeRotaryPosEmbed)
    torch.testing.assert_close(wan.wan_forward(fresh, lat, ts, emb, frame_idx_B_K=idx), out0, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------- attention


def test_attention_backend_switch():
    c = _components()
    lat, ts, emb = _inputs()
    assert wan.set_attention_backend(c.transformer, "sdpa") == "native"
    ref = wan.wan_forward(c.transformer, lat, ts, emb)
    wan.set_attention_backend(c.transformer, "math")
    torch.testing.assert_close(wan.wan_forward(c.transformer, lat, ts, emb), ref, atol=1e-5, rtol=1e-5)
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(ValueError, match="xformers"):
            wan.set_attention_backend(c.transformer, "xformers")
    with pytest.raises(ValueError, match="bogus"):
        wan.set_attention_backend(c.transformer, "bogus")


def test_bf16_model_trains_fp32_adapter_and_widening(tmp_path):
    c = wan.load_wan("tiny", components=("transformer",))  # bf16, as for the real checkpoints
    wan.widen_patch_embedding(c.transformer, ("mask", "confidence"))
    wan.add_lora(c.transformer, wan.LoraSpec(rank=4, alpha=4))
    params = wan.trainable_parameters(c.transformer)
    assert params and {p.dtype for _, p in params} == {torch.float32}
    assert c.transformer.blocks[0].attn1.to_q.base_layer.weight.dtype == torch.bfloat16
    lat, ts, emb = _inputs()
    mask = torch.tensor([[1, 0, 1], [1, 1, 1]])
    extra = wan.extra_channels(mask, 4, 4, ("mask", "confidence"), confidence_B_T=torch.rand(2, 3))
    c.transformer.train()
    out = wan.wan_forward(c.transformer, lat, ts, emb, extra_B_E_T_H_W=extra)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in params)
    _perturb_lora(c.transformer)
    with torch.no_grad():
        c.transformer.patch_embedding.extra_weight.normal_()
    c.transformer.eval()
    ref = wan.wan_forward(c.transformer, lat, ts, emb, extra_B_E_T_H_W=extra)
    wan.save_lora(c.transformer, tmp_path / "lora")
    fresh = wan.load_wan("tiny", components=("transformer",)).transformer
    wan.load_lora(fresh, tmp_path / "lora", trainable=True)
    assert {p.dtype for _, p in wan.trainable_parameters(fresh)} == {torch.float32}
    assert torch.equal(wan.wan_forward(fresh, lat, ts, emb, extra_B_E_T_H_W=extra), ref)


def test_real_1p3b_config_on_meta_device_lora_targets_and_widening():
    """The defaults fit the real Wan2.1-T2V-1.3B layout (built on the meta device: no memory)."""
    with torch.device("meta"):
        m = WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30,
                                  text_dim=4096, freq_dim=256)
    assert abs(sum(p.numel() for p in m.parameters()) / 1e9 - 1.419) < 0.001
    names = wan.add_lora(m, wan.LoraSpec(rank=32, alpha=32), trainable_dtype=None)
    assert len(names) == 30 * 10
    # rank-32 LoRA: per block 8 attention projections 1536->1536 and FFN 1536->8960->1536
    per_block = 8 * 32 * (1536 + 1536) + 2 * 32 * (1536 + 8960)
    assert sum(p.numel() for n, p in m.named_parameters() if "lora_" in n) == 30 * per_block
    pe = wan.widen_patch_embedding(m, ("mask", "confidence"))
    assert tuple(pe.extra_weight.shape) == (1536, 2, 1, 2, 2)


def test_keyframe_rope_at_real_size_matches_diffusers():
    """Head dim 128 (t/h/w = 44/42/42), latent 21 x 60 x 104 (32,760 tokens), K = 6 keyframes."""
    rope = wan.KeyframeRotaryPosEmbed(128, (1, 2, 2), 1024)
    idx = torch.tensor([[0, 3, 7, 12, 16, 20]])
    rope.frame_indices_B_K = idx
    cos, sin = rope(torch.zeros(1, 16, 6, 60, 104))
    ref_cos, ref_sin = WanRotaryPosEmbed(128, (1, 2, 2), 1024)(torch.zeros(1, 16, 21, 60, 104))
    per_frame = 30 * 52
    rows = torch.cat([torch.arange(f * per_frame, (f + 1) * per_frame) for f in idx[0].tolist()])
    assert torch.equal(cos[0], ref_cos[0, rows]) and torch.equal(sin[0], ref_sin[0, rows])


def test_keyframe_rope_rejects_out_of_range_indices():
    """Indices past the rotary table (or negative) are an error naming rope_max_seq_len, not a
    silent wrap-around of the gather (checked on the host for CPU tensors, on the device with
    ``torch._assert_async`` otherwise, so CUDA forwards do not synchronise)."""
    tr = wan.build_tiny_transformer(rope_max_seq_len=16)
    rope = wan.install_keyframe_rope(tr)
    x = torch.zeros(1, 16, 2, 4, 4)
    with wan.keyframe_positions(tr, torch.tensor([[0, 15]])):
        rope(x)
    for bad in ([[0, 16]], [[-1, 3]]):
        with wan.keyframe_positions(tr, torch.tensor(bad)):
            with pytest.raises(ValueError, match=r"\[0, 16\).*rope_max_seq_len"):
                rope(x)


def test_full_mode_sampler_equals_wan_pipeline_with_cfg():
    """``pipeline.full_sample`` (the ``--mode full`` baseline) == diffusers' ``WanPipeline`` with
    its flow-matching Euler scheduler (shift 5) on the same grid, CFG scale 5 with negative prompt
    embeddings: same timesteps (1000 sigma), same guidance formula, same update."""
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler

    from interpdiff.video import pipeline

    c = _components()
    steps, shift, guidance = 3, 5.0, 5.0
    c.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    orig = c.scheduler.set_timesteps

    def same_grid(num_inference_steps=None, device=None, **kw):  # our grid: shift(linspace(1, 0, N + 1))
        return orig(sigmas=np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1], device=device)

    c.scheduler.set_timesteps = same_grid
    pipe = wan.make_pipeline(c)
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(1, 7, 32, generator=g)
    neg = torch.randn(1, 7, 32, generator=g)
    shape = (16, 2, 4, 4)  # 5 frames at 32 x 32
    ours = pipeline.full_sample(c.transformer, emb, shape, steps, shift, guidance, neg, torch.Generator().manual_seed(9))
    x_T = torch.randn((1, *shape), generator=torch.Generator().manual_seed(9))
    ref = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, latents=x_T.clone(), num_frames=5, height=32, width=32,
               num_inference_steps=steps, guidance_scale=guidance, output_type="latent").frames
    torch.testing.assert_close(ours, ref.float(), rtol=1e-5, atol=1e-5)
    no_cfg = pipeline.full_sample(c.transformer, emb, shape, steps, shift, 1.0, neg, torch.Generator().manual_seed(9))
    assert (no_cfg - ours).abs().max() > 1e-3  # guidance matters (the check above is not vacuous)


def test_phase1_cfg_batched_equals_two_forwards():
    """Phase-1 CFG runs the conditional and unconditional branches as one doubled batch (with the
    keyframe indices repeated); the result equals two separate forwards per step."""
    from interpdiff.video import pipeline

    tr = wan.build_tiny_transformer()
    wan.install_keyframe_rope(tr)
    g = torch.Generator().manual_seed(4)
    emb, neg = torch.randn(2, 7, 32, generator=g), torch.randn(2, 7, 32, generator=g)
    idx = torch.tensor([[0, 3, 8], [0, 5, 8]])
    out = pipeline.phase1_sample(tr, emb, idx, (16, 4, 4), steps=2, shift=5.0, guidance=3.0, neg_emb_B_L_D=neg,
                                 generator=torch.Generator().manual_seed(1))

    def vel(x, t):
        v_c = wan.wan_forward(tr, x, t, emb, frame_idx_B_K=idx)
        v_u = wan.wan_forward(tr, x, t, neg, frame_idx_B_K=idx)
        return v_u + 3.0 * (v_c - v_u)

    x_T = torch.randn((2, 16, 3, 4, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = pipeline.euler_flow_sample(vel, x_T, 2, 5.0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_selective_checkpointing_refuses_backends_without_fused_sdpa():
    """The attention policies keep the outputs of torch's fused SDPA kernels: with the math backend
    (plain matmuls) nothing would be kept, so both the live model and the config check refuse it;
    the default backend is accepted."""
    from interpdiff.config import ConfigError, parse_cli
    from interpdiff.video.objectives import VideoTrainConfig

    tr = wan.build_tiny_transformer()
    assert wan.enable_checkpointing(tr, 1.0, "attention")  # native: fine
    wan.set_attention_backend(tr, "math")
    with pytest.raises(ValueError, match=r"checkpoint_policy='attention'.*'_native_math'"):
        wan.enable_checkpointing(tr, 1.0, "attention")
    assert wan.enable_checkpointing(tr, 1.0, "full")
    base = ["--config", "configs/video/tiny_cpu.yaml", "data.shards=/x/*.tar", "model.checkpoint_policy=attention_ffn"]
    with pytest.raises(ConfigError, match=r"attention backend 'xformers'"):
        parse_cli(VideoTrainConfig, [*base, "model.attention=xformers"])
    parse_cli(VideoTrainConfig, [*base, "model.attention=cudnn"])
