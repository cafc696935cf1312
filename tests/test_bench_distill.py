"""benchmarks/bench_distill.py: the CPU smoke runs (slow) and its argument checks (fast)."""

from __future__ import annotations

import importlib.util
import json
import math
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_distill", REPO / "benchmarks" / "bench_distill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# per-sample transformer passes of one steady-state step, read off the losses' code and the configs'
# comments: teacher cond + uncond at x_t and at the DMD point (4), the DMD fake score (1), discrete
# mode's stop-grad student target (1); with gradients the student on [x_t, x_G] (2) and the fake
# score's flow matching (1); phase 2: the teacher chain over S levels (S - 1) and the student (1)
def expected_passes(variant: str, phase2_levels: int) -> dict:
    return {"full": {"fwd": 5, "grad": 3, "jvp": 1}, "full_discrete": {"fwd": 6, "grad": 3, "jvp": 0},
            "phase1": {"fwd": 5, "grad": 3, "jvp": 1},
            "phase2": {"fwd": phase2_levels - 1, "grad": 1, "jvp": 0}}[variant]


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_tiny_smoke_every_variant(bench, tmp_path):
    out = tmp_path / "bench.json"
    bench.main(["--tiny", "--steps", "1", "--warmup", "0", "--json", str(out), "--peak-tflops", "1"])
    res = json.loads(out.read_text())
    assert res["machine"]["tiny"] and res["machine"]["steps"] == 1
    assert set(res["variants"]) == set(bench.VARIANTS)
    for name, r in res["variants"].items():
        assert "error" not in r, (name, r.get("traceback"))
        for key in ("step_s_median", "samples_per_s", "model_tflop_per_step", "achieved_tflops", "mfu", "peak_rss_gb",
                    "build_s"):
            assert _finite_positive(r[key]), (name, key, r[key])
        assert math.isfinite(r["loss"]) and len(r["step_s_all"]) == 1
        assert r["passes"] == expected_passes(name, 3), name  # tiny phase 2: k_min=3, n_levels=3
        assert r["parts_s"]["backward"] > 0 and r["parts_s"]["student"] > 0
        assert all(math.isfinite(v) and v >= 0 for v in r["parts_s"].values())
        assert sum(r["parts_s"].values()) <= 1.5 * r["step_s_median"]
        assert (r["parts_s"]["jvp"] > 0) == (r["passes"]["jvp"] > 0)
    assert res["variants"]["phase1"]["tokens"] == [3 * 2 * 3]  # K = 3 keyframes of 4 x 6 latents, 2 x 2 patches
    assert res["variants"]["full"]["tokens"] == [9 * 2 * 3]


@pytest.mark.slow
def test_real_size_path_with_one_block_on_cpu(bench, monkeypatch):
    """The non-tiny branch (1.3B config, bf16 base with fp32 norms, the shipped 1.3B YAMLs with their
    checkpointing) with one transformer block and small latents, so that it runs on CPU."""
    monkeypatch.setattr(bench.bench_train, "WAN21_T2V_1_3B", dict(bench.bench_train.WAN21_T2V_1_3B, num_layers=1))
    args = types.SimpleNamespace(tiny=False, steps=1, warmup=0, peak_tflops=1.0,
                                 set=["model.attention=sdpa", "model.dtype=bfloat16", "data.latent_shape=[16,9,2,4]",
                                      "data.embed_shape=[8,4096]", "distill.jvp_chunk=8"])
    for name in ("full", "phase2"):
        r = bench.bench_variant(name, args, torch.device("cpu"))
        assert r["passes"] == expected_passes(name, 4), name  # 1.3B phase 2: budgets [6, 7, 8, 9] at T = 9
        assert r["ckpt_policy"] == "attention" and r["grad_ckpt"] and r["lora_rank"] == 64
        assert math.isfinite(r["loss"]) and _finite_positive(r["mfu"])
    # one block: forward FLOPs as bench_train counts them, one JVP = 2x matmul + 3x attention
    cfg = bench.bench_train.WAN21_T2V_1_3B
    r = bench.bench_variant("full", _with(args, set=args.set + ["distill.dmd.weight=0"]), torch.device("cpu"))
    mm0, at0 = bench.bench_train.wan_forward_flops(cfg, 9, 2, 4, 8, split=True)
    mm1, at1 = bench.bench_train.wan_forward_flops(cfg, 9, 2, 4, 8, lora_rank=64, split=True)
    # no DMD: teacher cond + uncond (no LoRA), student with gradients (LoRA), JVP through the student
    assert r["passes"] == {"fwd": 2, "grad": 1, "jvp": 1}
    assert r["model_tflop_per_step"] * 1e12 == pytest.approx(2 * (mm0 + at0) + 3 * (mm1 + at1) + 2 * mm1 + 3 * at1,
                                                               rel=1e-9)


def _with(args, **kw):
    return types.SimpleNamespace(**{**vars(args), **kw})


def test_unknown_variant_is_a_clear_error(bench):
    with pytest.raises(SystemExit, match=r"unknown variant 'phase3'.*full, full_discrete, phase1, phase2"):
        bench.main(["--tiny", "--variants", "full,phase3"])
    with pytest.raises(SystemExit, match=r"unknown variant"):
        bench.main(["--tiny", "--variants", ","])


def test_bad_override_names_the_key(bench):
    with pytest.raises(SystemExit, match=r"variant full: .*distill\.no_such_key"):
        bench.main(["--tiny", "--variants", "full", "--set", "distill.no_such_key=1"])
