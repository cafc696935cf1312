"""rCM step-distillation training step (``distill_rcm.py``) of the Wan2.1 1.3B configs: step time,
peak memory, transformer passes per step, MFU and a time split.

    # CUDA (H100 / H200 / B200): random weights built from the 1.3B config (no download), batch 1,
    # the configs' checkpointing settings; every variant (3.4 minutes on one H200, 2026-11-26):
    python benchmarks/bench_distill.py --json benchmarks/bench_distill.json
    python benchmarks/bench_distill.py --variants full,phase2 --steps 3 --warmup 1
    python benchmarks/bench_distill.py --variants full --set distill.jvp_chunk=4096 model.checkpoint_policy=full
    python benchmarks/bench_distill.py --variants full,phase1 --set distill.jvp_attention=triton  # the fused JVP kernel
    # CPU check that everything runs (tiny preset, tiny latents, seconds):
    python benchmarks/bench_distill.py --tiny --steps 1 --warmup 0

Variants (``--variants``, comma list; each = a shipped config, ``--set`` overrides applied on top):

    full           configs/video/rcm_wan1.3b_full.yaml    sCM (JVP) + DMD, 21 x 60 x 104 latents (32,760 tokens)
    full_discrete  the same with distill.mode=discrete    discrete consistency (no JVP) + DMD
    phase1         configs/video/rcm_wan1.3b_phase1.yaml  sCM (JVP) + DMD, K = 6 keyframes (6 x 60 x 104, 9,360 tokens)
    phase2         configs/video/rcm_wan1.3b_phase2.yaml  regression of the 2-step refiner to the teacher's TACoS chain

One step = what ``interpdiff.training.train`` does per micro-batch for ``distill_rcm.py``: the
library's loss (``distill_wan.gaussian_target_loss`` for full / phase1,
``distill_wan.phase2_distill_loss`` for phase2, chosen as ``make_distill_spec`` does) under bf16
autocast, backward, gradient clipping, fused AdamW over both adapters, EMA update. The model is
assembled as ``build_distill_transformer`` does (attention backend, keyframe rope for phase1,
frozen mask channels for phase2, a frozen ``teacher`` adapter for phase1 / phase2 with the
student's LoRA settings, the ``student`` and ``fake_score`` adapters on top, then the adapter-aware
``distill_wan.enable_checkpointing``) except that the base and teacher weights are random. The negative prompt is
``distill.negative=zeros`` (same shape and cost as the encoded one). The step index passed to the
loss is ``max(dmd.start_step, tangent_warmup)``, so the DMD generator term is on and the tangent
warm-up is over: the steady-state step. Data loading is not timed (random latents on the device).

Passes per step are counted, not assumed: forward hooks on the transformer record every call
(batch size, token count, active adapter, grad mode, inside ``distill.jvp`` or not); the table
gives per-sample passes: ``fwd`` (no grad: teacher cond/uncond, fake score for DMD, the
stop-grad student target of discrete mode), ``grad`` (forwards with gradients, each followed by
its backward), ``jvp`` (``torch.func.jvp`` through the student, one forward-AD pass).

**MFU** = model FLOPs per step / step time / device bf16 dense peak (``bench_train.PEAK_BF16``,
or ``--peak-tflops``). Model FLOPs = sum over the recorded calls of the call's analytic forward
FLOPs (``bench_train.wan_forward_flops`` at the call's batch, tokens, text length and input
channels; the LoRA term only when an adapter is active) times:

* 1 for a forward without gradients;
* 3 for a forward with gradients (forward + 2 x for backward: ``bench_train``'s model-FLOPs
  convention, so the numbers compare with the phase-2 step; the recomputation of gradient
  checkpointing is not counted, nor is the saving from frozen base weights needing no weight
  gradient);
* for a JVP (forward-mode AD, ``distill.jvp=autograd``): 2 x the matmul FLOPs + 3 x the attention
  FLOPs. Forward-mode AD evaluates the primal and the tangent together: ``y = x W`` with a frozen
  ``W`` adds one product ``dx W`` (2 x); the two attention products have a tangent in both operands
  (``dS = dQ K^T + Q dK^T``, ``dO = dP V + P dV``), two more products each (3 x). Elementwise work
  (softmax and its tangent on the materialised ``chunk x L`` scores of the math attention) is not
  counted, although it is what makes the JVP slow. With ``distill.jvp=finite_difference`` the JVP
  is 3 plain forwards (1 x each).

  torch's own forward-AD rule for ``linear`` would do more: it also multiplies the weights' zero
  tangents (``x dW``), 3 matmuls per layer (torch 2.14.1, ``FlopCounterMode``, CPU). The library's
  ``distill_wan.jvp_constant_weights`` gives every ``nn.Linear`` a one-matmul tangent inside the JVP,
  so what runs is the 2 x counted here (the patch-embedding convolution, a small share, keeps
  torch's rule).

Time split (``parts_s``; CUDA events on the device, ``perf_counter`` on CPU; medians over the
timed steps): ``teacher`` (adapters off, cond + uncond, at x_t and at the DMD point, or the phase-2
chain), ``student`` (the student forward with gradients), ``student_sg`` (discrete mode's
stop-grad target), ``jvp`` (the whole ``distill.jvp`` call), ``fake_dmd`` (fake score at the DMD
point, no gradients), ``fake_score`` (its flow-matching forward with gradients), ``backward``,
``optimizer`` (clip + AdamW + EMA), ``other`` (the rest of the loss: time sampling, noise, masks
and the DP keyframe selection, float64 tangent math). The forward parts are GPU time between
events recorded at the transformer's call boundaries.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_train  # noqa: E402  (WAN21_T2V_1_3B, wan_forward_flops, device_peak)

from interpdiff import distill as D  # noqa: E402
from interpdiff.config import ConfigError, load_config  # noqa: E402
from interpdiff.io import code_version  # noqa: E402
from interpdiff.training import EMA, build_optimizer, trainable_named_parameters  # noqa: E402
from interpdiff.video import distill_wan as DW  # noqa: E402
from interpdiff.video import wan  # noqa: E402
from interpdiff.video.objectives import PHASE1_POLICIES, PHASE2_POLICIES, KeyframePolicy, base_dtype  # noqa: E402

CONFIGS = REPO / "configs" / "video"
# name -> (config file, overrides, what it is)
VARIANTS = {
    "full": ("rcm_wan1.3b_full.yaml", [], "full sequence, sCM (JVP) + DMD"),
    "full_discrete": ("rcm_wan1.3b_full.yaml", ["distill.mode=discrete"], "full sequence, discrete consistency + DMD"),
    "phase1": ("rcm_wan1.3b_phase1.yaml", [], "phase-1 keyframes, sCM (JVP) + DMD"),
    "phase2": ("rcm_wan1.3b_phase2.yaml", [], "phase-2 refiner, regression to the teacher chain"),
}
# the 1.3B configs at the tiny preset's size: same losses, checkpointing policy and CFG; the JVP's
# query chunking is exercised (54 tokens in chunks of 16); phase 2 as configs/video/tiny_cpu.yaml
TINY_OVERRIDES = ["model.path=tiny", "model.dtype=float32", "model.attention=sdpa", "model.lora.rank=4",
                  "model.lora.alpha=4.0", "data.latent_shape=[16,9,4,6]", "data.embed_shape=[16,32]",
                  "distill.jvp_chunk=16", "phase1.num_keyframes=3", "phase2.k_min=3", "phase2.n_levels=3"]
# no data and no teacher are read: random latents, random base weights
COMMON_OVERRIDES = ["data.shards=unused", "distill.negative=zeros"]


def parse_variants(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or not names:
        what = bad[0] if bad else spec
        raise SystemExit(f"bench_distill.py: unknown variant {what!r} in --variants; expected a comma list of "
                         f"{', '.join(VARIANTS)}")
    return names


@dataclass
class BenchDistillConfig(DW.DistillTrainConfig):
    """``DistillTrainConfig`` without the start-up checks that read files (teacher LoRA folder,
    shards, negative-prompt file): the benchmark builds random weights and random latents."""

    def validate(self) -> None:
        self.train.validate()
        try:
            self.model.lora.validate()
            self.distill.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.model.checkpoint_policy not in wan.CHECKPOINT_POLICIES:
            raise ConfigError(f"model.checkpoint_policy={self.model.checkpoint_policy!r} is not one of "
                              f"{list(wan.CHECKPOINT_POLICIES)}")


def variant_config(name: str, tiny: bool, extra: list[str]) -> DW.DistillTrainConfig:
    path, over, _ = VARIANTS[name]
    target = {"phase1": "phase1", "phase2": "phase2"}.get(name, "full")
    teacher = ["distill.teacher_lora=unused"] if target != "full" else []
    return load_config(BenchDistillConfig, CONFIGS / path,
                       COMMON_OVERRIDES + teacher + over + (TINY_OVERRIDES if tiny else []) + list(extra))


def build_model(cfg: DW.DistillTrainConfig, dev: torch.device, tiny: bool):
    """``build_distill_transformer`` with random base weights, then what ``train`` does before its
    loop (checkpointing, fp32 trainables). Returns ``(model, transformer config dict)``."""
    m, d = cfg.model, cfg.distill
    dtype = base_dtype(m)
    if tiny:
        tr = wan.load_transformer("tiny", dtype=dtype, seed=m.seed)
        mcfg = dict(wan.tiny_transformer_config())
    else:
        from diffusers import WanTransformer3DModel

        torch.manual_seed(m.seed)
        with torch.device(dev):  # cast as from_pretrained(torch_dtype=...) does: norms, rope, time embedder stay fp32
            tr = wan.freeze(wan._cast_keep_fp32(WanTransformer3DModel(**bench_train.WAN21_T2V_1_3B), dtype))
        mcfg = dict(bench_train.WAN21_T2V_1_3B)
    wan.set_attention_backend(tr, m.attention)
    if d.target == "phase1":
        wan.install_keyframe_rope(tr)
    if d.target == "phase2":
        wan.widen_patch_embedding(tr, DW.teacher_phase2_config(cfg, None).channels, trainable=False)
    if d.target != "full":  # the teacher LoRA: a frozen adapter under the others (DW.install_teacher), random here
        wan.add_lora(tr, m.lora, adapter_name=DW.TEACHER)
        for n, p in tr.named_parameters():
            if f".{DW.TEACHER}." in n:
                p.requires_grad_(False)
    DW.add_adapters(tr, m.lora, [DW.STUDENT] + ([DW.FAKE] if d.dmd.weight > 0 else []), m.seed)
    if cfg.train.gradient_checkpointing:
        DW.enable_checkpointing(tr, m.checkpoint_ratio, m.checkpoint_policy)
    for _, p in trainable_named_parameters(tr):
        p.data = p.data.float()
    tr.to(dev).train()
    return tr, mcfg


def loss_and_context(cfg: DW.DistillTrainConfig):
    """``make_distill_spec``'s loss: the same implementation, policy and context."""
    d = cfg.distill
    p2 = DW.teacher_phase2_config(cfg, None) if d.target == "phase2" else None
    policy = None
    if d.target == "phase1":
        p1 = cfg.phase1
        policy = KeyframePolicy(p1.index_policy, PHASE1_POLICIES, p1.dp_index_file, "phase1.index_policy",
                                p1.selector_ckpt, "phase1.selector_ckpt")
    elif d.target == "phase2":
        policy = KeyframePolicy(p2.policy_mix, PHASE2_POLICIES, p2.dp_mask_file, "phase2.policy_mix",
                                p2.selector_ckpt, "phase2.selector_ckpt")
    neg = DW.negative_embedding(cfg) if d.target != "phase2" else None
    ctx = DW.LossContext(cfg=cfg, policy=policy, neg_L_D=neg, p2=p2, seed=cfg.train.seed)
    return (DW.phase2_distill_loss if d.target == "phase2" else DW.gaussian_target_loss), ctx


# --- instrumentation ------------------------------------------------------------------------------


class Clock:
    """Stamps on the device's timeline: CUDA events, or ``perf_counter`` on CPU (synchronous)."""

    def __init__(self, dev: torch.device):
        self.cuda = dev.type == "cuda"

    def stamp(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


class PassRecorder:
    """Forward hooks on the transformer + a wrapper around ``interpdiff.distill.jvp``: every call's
    category, batch and shapes, and the device time of each part of the step."""

    FWD_PARTS = ("teacher", "student", "student_sg", "jvp", "fake_dmd", "fake_score")

    def __init__(self, model, clock: Clock):
        self.model, self.clock = model, clock
        self.in_jvp = False
        self.calls: list[dict] = []
        self.spans: list[tuple[str, object, object]] = []
        self._open: list[tuple[str, object]] = []
        self._handles = []
        self._orig_jvp = None

    def reset(self):
        self.calls, self.spans, self._open = [], [], []

    def _category(self) -> tuple[str, bool]:
        if self.in_jvp:
            return "jvp", False
        grad = torch.is_grad_enabled()
        name = DW.active_adapter(self.model)
        if name is None:
            return "teacher", grad
        if name == DW.STUDENT:
            return ("student" if grad else "student_sg"), grad
        return ("fake_score" if grad else "fake_dmd"), grad

    def _pre(self, module, args, kwargs):
        cat, grad = self._category()
        x = kwargs.get("hidden_states", args[0] if args else None)
        e = kwargs.get("encoder_hidden_states")
        B, Cin, T, H, W = x.shape
        self.calls.append({"part": cat, "grad": grad, "batch": B, "in_channels": Cin, "frames": T, "H": H, "W": W,
                           "text_len": e.shape[1] if e is not None else 0,
                           "lora": DW.active_adapter(self.model) is not None})
        self._open.append((cat, self.clock.stamp() if cat != "jvp" else None))

    def _post(self, module, args, kwargs, out):
        cat, start = self._open.pop()
        if start is not None:
            self.spans.append((cat, start, self.clock.stamp()))

    def _jvp(self, *args, **kwargs):
        a = self.clock.stamp()
        self.in_jvp = True
        try:
            return self._orig_jvp(*args, **kwargs)
        finally:
            self.in_jvp = False
            self.spans.append(("jvp", a, self.clock.stamp()))

    def __enter__(self):
        base = wan.unwrap_model(self.model)
        self._handles = [base.register_forward_pre_hook(self._pre, with_kwargs=True),
                         base.register_forward_hook(self._post, with_kwargs=True)]
        self._orig_jvp = D.jvp
        D.jvp = self._jvp  # distill_wan calls D.jvp(...) through the module
        return self

    def __exit__(self, *exc):
        D.jvp = self._orig_jvp
        for h in self._handles:
            h.remove()

    def part_seconds(self) -> dict[str, float]:
        out = {p: 0.0 for p in self.FWD_PARTS}
        for cat, a, b in self.spans:
            out[cat] = out.get(cat, 0.0) + self.clock.seconds(a, b)
        return out


def passes_and_flops(calls: list[dict], mcfg: dict, cfg: DW.DistillTrainConfig) -> dict:
    """Per-sample pass counts and model FLOPs of one step (see the module docstring)."""
    lora = cfg.model.lora
    pt, ph, pw = mcfg["patch_size"]
    passes = {"fwd": 0, "grad": 0, "jvp": 0}
    calls_by_part: dict[str, int] = {}
    samples_by_part: dict[str, int] = {}
    total = 0.0
    for c in calls:
        mm, attn = bench_train.wan_forward_flops(
            mcfg, c["frames"], c["H"], c["W"], c["text_len"], lora.rank if c["lora"] else 0,
            tuple(lora.target_modules), extra_channels=c["in_channels"] - mcfg["in_channels"], split=True)
        B = c["batch"]
        if c["part"] == "jvp" and cfg.distill.jvp == "autograd":
            passes["jvp"] += B
            total += B * (2 * mm + 3 * attn)
        elif c["grad"]:
            passes["grad"] += B
            total += B * 3 * (mm + attn)
        else:
            passes["fwd"] += B
            total += B * (mm + attn)
        calls_by_part[c["part"]] = calls_by_part.get(c["part"], 0) + 1
        samples_by_part[c["part"]] = samples_by_part.get(c["part"], 0) + B
    tokens = sorted({c["frames"] // pt * (c["H"] // ph) * (c["W"] // pw) for c in calls})
    return {"passes": passes, "calls_by_part": calls_by_part, "samples_by_part": samples_by_part,
            "model_flop_per_step": total, "tokens": tokens}


# --- one variant ----------------------------------------------------------------------------------


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench_variant(name: str, args, dev: torch.device) -> dict:
    cfg = variant_config(name, args.tiny, args.set)
    d = cfg.distill
    path, over, what = VARIANTS[name]
    out = {"variant": name, "what": what, "config": path, "overrides": over + list(args.set),
           "target": d.target, "mode": d.mode if d.target != "phase2" else "regression", "jvp": d.jvp,
           "jvp_chunk": d.jvp_chunk, "jvp_attention": d.jvp_attention, "dmd": d.dmd.weight > 0, "teacher_guidance": d.teacher_guidance,
           "attention": cfg.model.attention, "grad_ckpt": cfg.train.gradient_checkpointing,
           "ckpt_policy": cfg.model.checkpoint_policy, "ckpt_ratio": cfg.model.checkpoint_ratio,
           "lora_rank": cfg.model.lora.rank, "batch": cfg.train.batch_size}
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.train.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.train.allow_tf32
    torch.manual_seed(cfg.train.seed)
    t0 = time.perf_counter()
    model, mcfg = build_model(cfg, dev, args.tiny)
    loss_impl, ctx = loss_and_context(cfg)
    named = trainable_named_parameters(model)
    params = [p for _, p in named]
    opt = build_optimizer(params, cfg.train.optim, dev)
    ema = EMA(named, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
    C, T, H, W = cfg.data.latent_shape
    Lt, Dt = cfg.data.embed_shape
    B = cfg.train.batch_size
    g = torch.Generator().manual_seed(0)
    batch = {"lat": torch.randn(B, C, T, H, W, generator=g).to(dev),
             "emb": (0.1 * torch.randn(B, Lt, Dt, generator=g)).to(dev),
             "keys": [f"bench{i:04d}" for i in range(B)], "prompts": ["benchmark"] * B}
    out["latent"] = [C, T, H, W]
    out["trainable_params_m"] = sum(p.numel() for p in params) / 1e6
    _sync(dev)
    out["build_s"] = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        out["model_mem_gb"] = torch.cuda.memory_allocated() / 1e9
        torch.cuda.reset_peak_memory_stats()
    # the steady state: DMD generator term on, tangent warm-up over (see the module docstring)
    step0 = 0 if d.target == "phase2" else max(d.dmd.start_step, d.tangent_warmup)
    out["loss_step_index"] = step0
    amp = torch.autocast("cuda", torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    clock = Clock(dev)
    times, parts, losses = [], [], []
    with PassRecorder(model, clock) as rec:
        for i in range(args.warmup + args.steps):
            rec.reset()
            _sync(dev)
            w0 = time.perf_counter()
            s0 = clock.stamp()
            with amp:
                loss, _ = loss_impl(model, batch, step0 + i, ctx)
            s1 = clock.stamp()
            loss.backward()
            s2 = clock.stamp()
            if cfg.train.optim.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update()
            s3 = clock.stamp()
            _sync(dev)
            wall = time.perf_counter() - w0
            losses.append(float(loss.detach()))
            if i < args.warmup:
                continue
            p = rec.part_seconds()
            p["other"] = max(0.0, clock.seconds(s0, s1) - sum(p.values()))
            p["backward"] = clock.seconds(s1, s2)
            p["optimizer"] = clock.seconds(s2, s3)
            times.append(wall)
            parts.append(p)
        counted = passes_and_flops(rec.calls, mcfg, cfg)
    step = statistics.median(times)
    out.update(counted)
    out.update(step_s_median=step, step_s_all=times, samples_per_s=B / step, loss=losses[-1],
               parts_s={k: statistics.median(p[k] for p in parts) for k in parts[0]})
    out["model_tflop_per_step"] = counted["model_flop_per_step"] / 1e12
    out["achieved_tflops"] = counted["model_flop_per_step"] / step / 1e12
    if dev.type == "cuda":
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 1e9
    else:  # process-wide high-water mark (includes earlier variants and the interpreter)
        out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    peak = args.peak_tflops * 1e12 if args.peak_tflops else (bench_train.device_peak(torch.cuda.get_device_name())
                                                            if dev.type == "cuda" else None)
    if peak:
        out["device_peak_tflops"] = peak / 1e12
        out["mfu"] = counted["model_flop_per_step"] / step / peak
    del model, opt, ema, rec
    return out


# --- report ---------------------------------------------------------------------------------------


def _fmt(r: dict) -> str:
    if "error" in r:
        return f"  {r['variant']:<14} ERROR {r['error'][:400]}"
    p = r["passes"]
    mem = f"{r['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in r else f"rss {r.get('peak_rss_gb', 0):.2f} GB"
    mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
    head = (f"  {r['variant']:<14} {r['step_s_median']:8.3f} s  {mem:>10}  "
            f"fwd {p['fwd']} grad {p['grad']} jvp {p['jvp']}"
            f"  {r['model_tflop_per_step']:9.4g} TFLOP  MFU {mfu}  tokens {r['tokens']}")
    parts = ", ".join(f"{k} {v:.3f}" for k, v in r["parts_s"].items() if v > 0)
    return head + f"\n      {r['what']}; ckpt {r['ckpt_policy']}@{r['ckpt_ratio']}, attn {r['attention']}, " \
                  f"jvp {r['jvp']} chunk {r['jvp_chunk']} attention {r.get('jvp_attention', 'math')}\n      parts (s): {parts}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=None,
                    help="timed steps per variant (the median is reported; default 3, with --tiny 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1)")
    ap.add_argument("--json", default="", help="write the results here (after every variant)")
    ap.add_argument("--tiny", action="store_true", help="CPU check: tiny preset and latents (seconds)")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides for every variant, e.g. distill.jvp_chunk=4096 model.checkpoint_policy=full")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="override the device's bf16 dense peak (TFLOP/s)")
    args = ap.parse_args(argv)
    names = parse_variants(args.variants)
    for n in names:  # bad --set keys fail before any model is built
        try:
            variant_config(n, args.tiny, args.set)
        except ConfigError as e:
            sys.exit(f"bench_distill.py: variant {n}: {e}")
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("bench_distill.py: the 1.3B benchmark needs CUDA; use --tiny on CPU")
    if args.tiny:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    args.steps = args.steps if args.steps is not None else (2 if args.tiny else 3)
    args.warmup = args.warmup if args.warmup is not None else 1
    if args.steps < 1 or args.warmup < 0:
        sys.exit(f"bench_distill.py: --steps must be >= 1 and --warmup >= 0, got {args.steps} / {args.warmup}")
    info = {
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": os.environ.get("INTERPDIFF_COMMIT") or code_version(), "tiny": args.tiny,
        "steps": args.steps, "warmup": args.warmup,
        "mfu_convention": "no-grad forward 1x, forward with gradients 3x, JVP 2x matmul + 3x attention FLOPs "
                          "(analytic forward FLOPs per call; see the script's docstring)",
    }
    res = {"machine": info, "variants": {}}

    def write():
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))

    print(f"device {info['device']} | torch {info['torch']} | commit {info['commit']} | {info['date']}", flush=True)
    print(f"distill train step, median of {args.steps} after {args.warmup} warm-up; passes per sample: fwd (no grad) / "
          "grad (forward + backward) / jvp", flush=True)
    for n in names:
        try:
            r = bench_variant(n, args, dev)
        except Exception as e:  # an OOM in one variant leaves the others' numbers
            r = {"variant": n, "what": VARIANTS[n][2], "error": f"{type(e).__name__}: {e}",
                 "traceback": traceback.format_exc()[-3000:]}
        res["variants"][n] = r
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        print(_fmt(r), flush=True)
        if "traceback" in r:
            print(r["traceback"][-1500:], flush=True)
        write()
    return res


if __name__ == "__main__":
    main()
