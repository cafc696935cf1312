"""Phase-2 training step and sampler stage times of the Wan2.1 1.3B configuration.

    # CUDA (H100 / H200 / B200): random weights built from the 1.3B config (no download),
    # latent 21 x 60 x 104 (81 frames at 480 x 832), batch 1, gradient checkpointing on:
    python benchmarks/bench_train.py --json benchmarks/bench_train.json
    python benchmarks/bench_train.py --compile --attention flash      # variants
    # CPU check that everything runs (tiny preset, tiny latents):
    python benchmarks/bench_train.py --tiny

Training step = exactly what ``train_phase2.py`` does per micro-batch
(``interpdiff.video.objectives.phase2_loss``: policy masks, corruption through the interpolation
kernel, widened input, x0 loss) + backward + fused AdamW step, under bf16 autocast with
gradient checkpointing; timed over ``--steps`` after ``--warmup``.

MFU = 3 x forward FLOPs / step time / device bf16 dense peak. Forward FLOPs are counted
analytically (``wan_forward_flops``: matmuls and attention of every block, text embedder, patch
embedding, output projection, LoRA; elementwise ops ignored). ``--tiny`` cross-checks the formula
against ``torch.utils.flop_counter.FlopCounterMode`` on the real module. The 3x is the model-FLOPs
convention (forward + 2x backward); the recomputation of gradient checkpointing is not counted.

Sampler: ``two_phase_sample`` (phase-1 ``--phase1-steps`` with CFG on K keyframes, interpolation,
phase-2 levels) vs ``full_sample`` (``--full-steps`` with CFG on all frames) at the same size,
random weights (the cost does not depend on them), VAE decode excluded (same for both).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interpdiff.io import code_version  # noqa: E402
from interpdiff.video import wan  # noqa: E402
from interpdiff.video.objectives import (  # noqa: E402
    KeyframePolicy,
    PHASE2_POLICIES,
    Phase2Config,
    VideoTrainConfig,
    phase2_loss,
)

# transformer/config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers
WAN21_T2V_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)

# dense bf16 peak (no sparsity), FLOP/s
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "GH200": 989e12}


def device_peak(name: str) -> float | None:
    for k, v in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
        if k in name:
            return v
    return None


def wan_forward_flops(cfg: dict, T: int, H: int, W: int, text_len: int, lora_rank: int = 0,
                      lora_targets: tuple = wan.DEFAULT_LORA_TARGETS, extra_channels: int = 0,
                      split: bool = False):
    """Forward FLOPs (2 per multiply-add) of ``WanTransformer3DModel`` on latents ``[1, C, T, H, W]``.

    Per block, with ``L = T H W / (pt ph pw)`` tokens, ``d`` model dim, ``f`` FFN dim, ``Lt`` text tokens:
    self-attention projections ``4 * 2 L d^2`` + scores/values ``2 * 2 L^2 d``; cross-attention
    q/o ``2 * 2 L d^2``, k/v ``2 * 2 Lt d^2``, scores/values ``2 * 2 L Lt d``; FFN ``2 * 2 L d f``.
    Once: text embedder ``2 Lt (text_dim d + d^2)``, patch embedding ``2 L (C + E) pt ph pw d``,
    output ``2 L d C pt ph pw``. LoRA on a ``(in, out)`` linear over ``n`` tokens: ``2 n r (in + out)``.
    ``split=True`` returns ``(matmul FLOPs, attention FLOPs)`` instead of the total.
    """
    pt, ph, pw = cfg["patch_size"]
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f, C, Lt = cfg["ffn_dim"], cfg["in_channels"], text_len
    L = (T // pt) * (H // ph) * (W // pw)
    attn = cfg["num_layers"] * (2 * 2 * L * L * d + 2 * 2 * L * Lt * d)
    per_block = 4 * 2 * L * d * d
    per_block += 2 * 2 * L * d * d + 2 * 2 * Lt * d * d
    per_block += 2 * 2 * L * d * f
    if lora_rank:
        r = lora_rank
        shapes = {  # target suffix -> list of (tokens, in, out) in one block
            "to_q": [(L, d, d), (L, d, d)], "to_k": [(L, d, d), (Lt, d, d)], "to_v": [(L, d, d), (Lt, d, d)],
            "to_out.0": [(L, d, d), (L, d, d)], "ffn.net.0.proj": [(L, d, f)], "ffn.net.2": [(L, f, d)],
        }
        for t in lora_targets:
            for n, i, o in shapes.get(t, []):
                per_block += 2 * n * r * (i + o)
    total = cfg["num_layers"] * per_block
    total += 2 * Lt * (cfg["text_dim"] * d + d * d)
    total += 2 * L * (C + extra_channels) * pt * ph * pw * d + 2 * L * d * cfg["out_channels"] * pt * ph * pw
    return (float(total), float(attn)) if split else float(total + attn)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def build(args, dev, dtype):
    """Phase-2 transformer (widened, LoRA) with random weights, fp32 trainables."""
    from diffusers import WanTransformer3DModel

    if args.tiny:
        tr = wan.build_tiny_transformer(dtype=dtype)
        cfg = dict(wan.tiny_transformer_config())
    else:
        with torch.device(dev):
            tr = WanTransformer3DModel(**WAN21_T2V_1_3B).to(dtype)
        cfg = dict(WAN21_T2V_1_3B)
    wan.freeze(tr)
    wan.set_attention_backend(tr, args.attention)
    wan.widen_patch_embedding(tr, ("mask",))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        wan.add_lora(tr, wan.LoraSpec(rank=args.lora_rank, alpha=args.lora_rank))
    for _, p in wan.trainable_parameters(tr):
        p.data = p.data.float()
    if not args.no_ckpt:
        wan.enable_checkpointing(tr, args.ckpt_ratio, args.ckpt_policy, placement=_placement(args))
    tr.to(dev).train()
    if args.compile:
        tr.compile_repeated_blocks(fullgraph=True)
    return tr, cfg


def _placement(args) -> str:
    """The checkpoint placement of a run: as given, else inside the compiled blocks when compiling."""
    return getattr(args, "ckpt_placement", None) or ("inside" if args.compile else "outside")


def parse_variant(spec: str) -> dict:
    """``attention:policy[:ratio][:compile[:placement]]``, e.g. ``cudnn:attention``,
    ``sdpa:full:0.8``, ``cudnn:attention:1:compile``, ``cudnn:attention:0.7:compile:outside``
    (placement of the checkpoint relative to the compiled blocks, ``wan.enable_checkpointing``;
    default ``inside`` when compiled)."""
    parts = spec.split(":")
    ok = 2 <= len(parts) <= 5 and parts[1] in wan.CHECKPOINT_POLICIES + ("none",)
    ok = ok and (len(parts) < 4 or parts[3] in ("compile", "eager")) and (len(parts) < 5 or parts[4] in ("inside", "outside"))
    if not ok:
        raise SystemExit(f"bench_train.py: bad --variants entry {spec!r}; expected attention:policy[:ratio][:compile|eager"
                         f"[:inside|outside]] with policy one of {list(wan.CHECKPOINT_POLICIES) + ['none']}")
    compiled = len(parts) > 3 and parts[3] == "compile"
    return {"attention": parts[0], "ckpt_policy": parts[1], "ckpt_ratio": float(parts[2]) if len(parts) > 2 else 1.0,
            "compile": compiled, "placement": parts[4] if len(parts) > 4 else ("inside" if compiled else "outside")}


def bench_train_variants(args, dev, write) -> list[dict]:
    """Several training-step variants (a fresh optimizer each); an error in one is recorded, the
    rest still run. Variants that can share a model switch the attention kernel and the
    checkpointing in place: the eager ones, and the compiled ones with the checkpoint outside the
    compiled blocks. A compiled variant with the checkpoint inside the blocks is traced with its
    policy, so it gets a fresh model (and a fresh Dynamo cache)."""
    import gc

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tr = mcfg = kind = None
    out = []
    for spec in args.variants.split(","):
        v = parse_variant(spec)
        args.attention, args.ckpt_policy, args.ckpt_ratio = v["attention"], v["ckpt_policy"], v["ckpt_ratio"]
        args.no_ckpt = v["ckpt_policy"] == "none"
        args.ckpt_placement = v["placement"]
        want = ("compiled" if v["placement"] == "outside" or args.no_ckpt else "fresh") if v["compile"] else "eager"
        try:
            if tr is None or want == "fresh" or want != kind:
                tr = mcfg = None
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
                torch._dynamo.reset()
                args.compile = v["compile"]
                tr, mcfg = build(args, dev, dtype)
                kind = want
            else:
                wan.set_attention_backend(tr, args.attention)
                if args.no_ckpt:
                    wan.remove_block_checkpointing(tr)
                    wan.unwrap_model(tr).disable_gradient_checkpointing()
                else:
                    wan.enable_checkpointing(tr, args.ckpt_ratio, args.ckpt_policy, placement=v["placement"])
            r = bench_train_step(args, dev, (tr, mcfg))
        except Exception as e:  # noqa: BLE001 - a benchmark variant that cannot run is a result too
            r = {"error": f"{type(e).__name__}: {e}"[:2000]}
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        r["variant"] = spec
        out.append(r)
        print(_fmt_train(r), flush=True)
        write()
    del tr
    return out


def bench_train_step(args, dev, built=None) -> dict:
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    tr, mcfg = built if built is not None else build(args, dev, dtype)
    C, T, H, W = (16, 9, 4, 6) if args.tiny else (16, 21, 60, 104)
    Lt, Dt = (16, mcfg["text_dim"]) if args.tiny else (512, 4096)
    cfg = VideoTrainConfig()
    cfg.phase2 = Phase2Config(k_min=3 if args.tiny else 6, n_levels=3 if args.tiny else 4, policy_mix=args.policy_mix)
    policy = KeyframePolicy(cfg.phase2.policy_mix, PHASE2_POLICIES, "", "phase2.policy_mix")
    g = torch.Generator().manual_seed(0)
    batch = {"lat": torch.randn(args.batch, C, T, H, W, generator=g).to(dev, torch.bfloat16),
             "emb": (0.1 * torch.randn(args.batch, Lt, Dt, generator=g)).to(dev, torch.bfloat16),
             "keys": [f"bench_{i}" for i in range(args.batch)]}
    params = [p for _, p in wan.trainable_parameters(tr)]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda")
    ctx = (lambda: torch.autocast("cuda", torch.bfloat16)) if dev.type == "cuda" else (lambda: torch.autocast("cpu", enabled=False))
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def one_step(i):
        with ctx():
            loss, _ = phase2_loss(tr, batch, i, cfg, policy, seed=0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup + args.steps):
        _sync(dev)
        t0 = time.perf_counter()
        loss = one_step(i)
        _sync(dev)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    prof = profile_step(lambda: one_step(args.warmup + args.steps), dev, step) if getattr(args, "profile", False) else None
    fwd = wan_forward_flops(mcfg, T, H, W, Lt, args.lora_rank, extra_channels=1) * args.batch
    out = {
        "latent": [C, T, H, W], "batch": args.batch, "lora_rank": args.lora_rank,
        "grad_ckpt": 0.0 if args.no_ckpt else args.ckpt_ratio, "ckpt_policy": "none" if args.no_ckpt else args.ckpt_policy,
        "compile": args.compile, "attention": args.attention, "step_s_median": step, "step_s_all": times,
        "ckpt_placement": None if args.no_ckpt else _placement(args),
        "samples_per_s": args.batch / step, "fwd_tflop": fwd / 1e12, "loss": float(loss.detach()),
        "trainable_params": sum(p.numel() for p in params),
    }
    if prof is not None:
        out["profile"] = prof
    if dev.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        peak = args.peak_tflops * 1e12 if args.peak_tflops else device_peak(torch.cuda.get_device_name())
        if peak:
            out["device_peak_tflops"] = peak / 1e12
            out["mfu"] = 3 * fwd / step / peak
    if args.tiny and not args.compile:  # cross-check the analytic count on the real module (a dispatch mode: eager only)
        from torch.utils.flop_counter import FlopCounterMode

        from interpdiff.video.objectives import phase2_restore

        mask = torch.zeros(args.batch, T, dtype=torch.bool, device=dev)
        mask[:, [0, T - 1]] = True
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            phase2_restore(tr, batch["lat"].float(), mask, torch.full((args.batch,), 500.0, device=dev), batch["emb"], cfg.phase2)
        out["fwd_flop_counted"] = float(counter.get_total_flops())
        # FlopCounterMode has no formula for the CPU flash-attention op: compare the matmul part
        out["fwd_flop_analytic_matmul"], out["fwd_flop_analytic_attention"] = wan_forward_flops(
            mcfg, T, H, W, Lt, args.lora_rank, extra_channels=1, split=True)
    del opt
    if built is None:
        del tr
    return out


# kernel-name patterns per category, first match wins (attention before GEMM: cuDNN/flash
# attention kernels also carry "sm90"/"gemm"-like parts in their names)
KERNEL_CATEGORIES = (
    ("attention", ("flash", "fmha", "sdpa", "attn", "attention")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("gemm", ("gemm", "xmma", "cutlass", "nvjet", "wgmma", "cublas")),
    ("triton (inductor fusions, our kernels)", ("triton",)),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    for cat, pats in KERNEL_CATEGORIES:
        if any(p in low for p in pats):
            return cat
    return "other"


def profile_step(step_fn, dev, step_s: float) -> dict:
    """One more training step under ``torch.profiler``: device time per kernel category (attention,
    GEMM, inductor/Triton fusions, optimizer, other), the top kernels, and how much of the median
    unprofiled step the device is idle (``idle_s = step_s - kernel time``: host gaps, syncs).
    On CPU (``--tiny``) the CPU operator times stand in for the kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    _sync(dev)
    with profile(activities=acts) as prof:
        step_fn()
        _sync(dev)
    per_cat: dict[str, float] = {}
    kernels: list[tuple[str, float, int]] = []
    for e in prof.key_averages():
        if cuda:
            # the kernels themselves (device events); a CPU op's "self device time" repeats the
            # time of the kernels it launched, and runtime markers ("Command Buffer Full": the
            # host waiting for room in the launch queue) are not device work
            if getattr(e, "device_type", None) != DeviceType.CUDA or "Command Buffer Full" in e.key:
                continue
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0
        else:
            us = e.self_cpu_time_total if e.key.startswith("aten::") else 0
        if us <= 0:
            continue
        kernels.append((e.key, us / 1e6, e.count))
        cat = kernel_category(e.key)
        per_cat[cat] = per_cat.get(cat, 0.0) + us / 1e6
    busy = sum(per_cat.values())
    kernels.sort(key=lambda k: -k[1])
    return {
        "kernel_s": busy, "step_s": step_s, "idle_s": step_s - busy,
        "by_category_s": dict(sorted(per_cat.items(), key=lambda kv: -kv[1])),
        "top_kernels": [{"name": n[:160], "s": t, "calls": c} for n, t, c in kernels[:15]],
    }


def _fmt_profile(p: dict) -> str:
    cats = ", ".join(f"{k} {v:.3f} s ({v / p['step_s']:.0%})" for k, v in p["by_category_s"].items())
    top = "\n".join(f"      {k['s'] * 1e3:8.1f} ms x{k['calls']:<4d} {k['name'][:110]}" for k in p["top_kernels"][:8])
    return (f"    profile: kernels {p['kernel_s']:.3f} s of the {p['step_s']:.3f} s step (idle {p['idle_s']:.3f} s): {cats}\n"
            f"    top kernels:\n{top}")


def bench_sampler(args, dev) -> dict:
    from diffusers import WanTransformer3DModel

    from interpdiff.video.pipeline import Phase2Settings, StageTimer, full_sample, two_phase_sample

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    C, T, H, W = (16, 9, 4, 6) if args.tiny else (16, 21, 60, 104)
    Lt, Dt = (16, 32) if args.tiny else (512, 4096)

    def make():
        if args.tiny:
            return wan.build_tiny_transformer(dtype=dtype).to(dev).eval()
        with torch.device(dev):
            return WanTransformer3DModel(**WAN21_T2V_1_3B).to(dtype).eval()

    g = torch.Generator().manual_seed(0)
    emb = (0.1 * torch.randn(1, Lt, Dt, generator=g)).to(dev, dtype)
    neg = torch.zeros_like(emb)
    p2 = Phase2Config(k_min=3 if args.tiny else 6, n_levels=3 if args.tiny else 4)
    st = Phase2Settings.from_phase2_config(p2, T, noise="none")
    tr1 = make()
    wan.install_keyframe_rope(tr1)
    tr2 = make()
    wan.widen_patch_embedding(tr2, ("mask",), trainable=False)
    for t in (tr1, tr2):
        wan.set_attention_backend(t, args.attention)
    ctx = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    res = {}
    with ctx:
        two_phase_sample(tr1, tr2, emb, T, (H, W), st, 1, guidance=args.guidance, neg_emb_B_L_D=neg, generator=g)  # warm-up
        timer = StageTimer(dev)
        two_phase_sample(tr1, tr2, emb, T, (H, W), st, args.phase1_steps, guidance=args.guidance, neg_emb_B_L_D=neg,
                         generator=g, timer=timer)
        res["two_phase"] = dict(timer.times, total=sum(timer.times.values()), phase1_steps=args.phase1_steps,
                                keyframes=st.budgets[0], budgets=st.budgets)
        del tr1
        timer = StageTimer(dev)
        with timer.stage("full"):
            full_sample(tr2_base(tr2), emb, (C, T, H, W), args.full_steps, guidance=args.guidance, neg_emb_B_L_D=neg,
                        generator=g)
        res["full"] = dict(timer.times, total=timer.times["full"], full_steps=args.full_steps)
    res["speedup_full_over_two_phase"] = res["full"]["total"] / res["two_phase"]["total"]
    return res


def tr2_base(tr2):
    """The base model for ``--mode full``: the phase-2 transformer with its (zero) extra channels
    removed is the base Wan model; reuse it to save memory."""
    pe = tr2.patch_embedding
    if isinstance(pe, wan.WidenedConv3d):
        base = torch.nn.Conv3d(pe.base_in_channels, pe.out_channels, pe.kernel_size, pe.stride, device=pe.weight.device,
                               dtype=pe.weight.dtype)
        base.weight, base.bias = pe.weight, pe.bias
        tr2.patch_embedding = base
    return tr2


def _fmt_train(t: dict) -> str:
    if "error" in t:
        return f"  {t.get('variant', '')}: ERROR {t['error'][:300]}"
    head = (f"  {t.get('variant') or 'step'}: latent {t['latent']} batch {t['batch']} lora r{t['lora_rank']} "
            f"ckpt {t['ckpt_policy']}@{t['grad_ckpt']} ({t.get('ckpt_placement')}) compile {t['compile']} attn {t['attention']}\n")
    return head + (f"    step {t['step_s_median']:.3f} s | {t['samples_per_s']:.3f} samples/s | fwd {t['fwd_tflop']:.2f} TFLOP"
                   + (f" | peak mem {t['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in t else "")
                   + (f" | MFU {100 * t['mfu']:.1f}% of {t['device_peak_tflops']:.0f} TFLOP/s" if "mfu" in t else "")
                   + ("\n" + _fmt_profile(t["profile"]) if "profile" in t else ""))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU check: tiny preset and latents")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--attention", default="sdpa", help="sdpa (torch picks), cudnn, sdpa_flash, flash, xformers, ...")
    ap.add_argument("--compile", action="store_true", help="regional torch.compile of the transformer blocks")
    ap.add_argument("--no-ckpt", action="store_true", help="gradient checkpointing off")
    ap.add_argument("--ckpt-ratio", type=float, default=1.0, help="fraction of blocks recomputed (1 = all)")
    ap.add_argument("--ckpt-placement", default=None, choices=("inside", "outside"),
                    help="checkpoint inside the compiled blocks (default with --compile) or around them")
    ap.add_argument("--ckpt-policy", default="full", choices=wan.CHECKPOINT_POLICIES,
                    help="full: recompute whole blocks; attention: keep the attention outputs (selective)")
    ap.add_argument("--variants", default="",
                    help="comma list attention:policy[:ratio][:compile] timed on one model, e.g. "
                         "sdpa:full,cudnn:full,cudnn:attention (overrides --attention/--ckpt-*)")
    ap.add_argument("--policy-mix", default="uniform:0.3,random_nested:0.3,dp:0.4")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="override the device's bf16 dense peak")
    ap.add_argument("--profile", action="store_true",
                    help="one more step under torch.profiler: device time by kernel category and idle time")
    ap.add_argument("--no-sampler", action="store_true")
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--sampler-attention", default="", help="attention kernel for the sampler (default --attention)")
    ap.add_argument("--phase1-steps", type=int, default=8)
    ap.add_argument("--full-steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("bench_train.py: the 1.3B benchmark needs CUDA; use --tiny on CPU")
    if args.variants:
        for spec in args.variants.split(","):
            parse_variant(spec)
    if args.tiny:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    args.steps = args.steps or (3 if args.tiny else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
    if args.tiny:
        args.full_steps = min(args.full_steps, 4)
        args.phase1_steps = min(args.phase1_steps, 2)
        args.lora_rank = min(args.lora_rank, 4)
    info = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": os.environ.get("INTERPDIFF_COMMIT") or code_version(), "tiny": args.tiny,
    }
    res = {"machine": info}

    def write():
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))

    print(f"device {info['device']} | torch {info['torch']} | commit {info['commit']} | {info['date']}", flush=True)
    if not args.no_train:
        print("phase-2 train step:", flush=True)
        if args.variants:
            res["train_variants"] = []
            res["train_variants"] = bench_train_variants(args, dev, write)
            ok = [v for v in res["train_variants"] if "error" not in v]
            if ok:
                res["train_step"] = min(ok, key=lambda v: v["step_s_median"])
        else:
            res["train_step"] = bench_train_step(args, dev)
            print(_fmt_train(res["train_step"]), flush=True)
        t = res.get("train_step", {})
        if "fwd_flop_counted" in t:
            print(f"  FLOP check (tiny, CPU): analytic matmul {t['fwd_flop_analytic_matmul']:.4g} vs FlopCounterMode "
                  f"{t['fwd_flop_counted']:.4g} (SDPA not counted on CPU; analytic attention {t['fwd_flop_analytic_attention']:.4g})")
        write()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if not args.no_sampler:
        if args.sampler_attention:
            args.attention = args.sampler_attention
        elif "train_step" in res and "attention" in res["train_step"]:
            args.attention = res["train_step"]["attention"]  # the fastest variant's kernel
        res["sampler"] = bench_sampler(args, dev)
        s = res["sampler"]
        print(f"sampler stage times (s), attention {args.attention}:")
        print("  two-phase: " + ", ".join(f"{k} {v:.3f}" for k, v in s["two_phase"].items() if isinstance(v, float)))
        print("  full     : " + ", ".join(f"{k} {v:.3f}" for k, v in s["full"].items() if isinstance(v, float)))
        print(f"  full / two-phase = {s['speedup_full_over_two_phase']:.2f}x", flush=True)
        write()
    return res


if __name__ == "__main__":
    main()
