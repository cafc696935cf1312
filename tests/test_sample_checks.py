"""sample.py's start-up checks and phase-2 sampling noise (CPU, no model loads).

References: the phase-2 sampling noise is measured (per-element std on the missing frames, an
oracle restorer) against the training sigmas of ``corruption.level_sigmas``; bad values and
swapped / wrong LoRA folders must stop with a ``ConfigError`` naming the key before the text
encoder or a transformer loads (the ``no_model`` fixture fails the test otherwise).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch

from interpdiff.config import ConfigError
from interpdiff.corruption import level_sigmas
from interpdiff.interpolate import interpolate
from interpdiff.masks import uniform_nested_masks
from interpdiff.video import pipeline, wan
from interpdiff.video.objectives import Phase2Config
from interpdiff.video.pipeline import SampleConfig

REPO = Path(__file__).resolve().parents[1]


from conftest import load_script as _load  # noqa: E402


sample = _load("sample")

# 25 pixel frames = T 7 latent frames; budgets of phase2.k_min=3 on T=7 (the tiny docstring example)
TINY = ["prompts=[x]", "num_frames=25", "phase2.k_min=3", "height=32", "width=64"]


# --- finding: phase2_noise=constant added unit-variance noise ----------------------------------------


def _oracle_run(monkeypatch, noise: str, scale: float, seed: int = 3):
    """``phase2_refine`` with the settings ``sample.py`` builds (``_phase2_settings``) and the true
    ``x0`` as restorer; returns ``(x0, masks, sigmas, [x_s handed to the restorer], output)``."""
    T = 17
    cfg = SampleConfig(prompts=["x"], phase2_noise=noise, phase2_noise_scale=scale, num_frames=4 * (T - 1) + 1,
                       phase2=Phase2Config(k_min=3, n_levels=4))
    cfg.validate()
    st = pipeline._phase2_settings(cfg, T)
    S = len(st.budgets)
    assert S == 4
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, T, 8, 8, generator=g)
    masks = uniform_nested_masks(2, T, st.budgets)
    seen = []

    def oracle(model, x_s, mask_B_T, t_B, emb, p2, conf_B_T=None):
        seen.append(x_s.clone())
        return x0

    monkeypatch.setattr(pipeline, "phase2_restore", oracle)
    x_start = interpolate(x0, masks[:, 0], time_dim=2)
    out = pipeline.phase2_refine(None, x_start, masks, torch.zeros(2, 4, 32), st, torch.Generator().manual_seed(seed))
    return x0, masks, level_sigmas(S, 0.1, 0.01), seen, out


def _noise_part(x_s, x0, mask_B_T):
    """``x_s - I(x0, M_s)`` on the frames missing in ``M_s`` (flattened)."""
    r = x_s - interpolate(x0, mask_B_T, time_dim=2)
    return r.permute(0, 2, 1, 3, 4)[~mask_B_T]


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("noise", ["none", "level", "constant"])
def test_phase2_sampling_noise_follows_the_training_sigmas(monkeypatch, noise, scale):
    """Per-element std of the sampling noise on missing frames (oracle restorer, 2 x 4 x 8 x 8 values per
    frame): ``none`` walks the training inputs (``sigma_s``), ``level`` draws ``scale * sigma_s``
    fresh, ``constant`` adds ``scale * sigma_0`` per step on top of the carried noise (rescaled by
    ``sigma_{s+1} / sigma_s``); every mode ends at the truth. Before the fix ``constant`` added
    std 1 (``Phase2Settings.noise_scale`` fixed at 1.0), ten times the largest training sigma."""
    x0, masks, sig, seen, out = _oracle_run(monkeypatch, noise, scale)
    S = len(sig)
    assert len(seen) == S - 1
    r = [_noise_part(seen[s], x0, masks[:, s]) for s in range(S - 1)]
    assert r[0].std().item() == pytest.approx(float(sig[0]), rel=0.05)  # level-0 input, as in training
    for s in range(1, S - 1):
        if noise == "none":
            assert r[s].std().item() == pytest.approx(float(sig[s]), rel=0.05)
        elif noise == "level":
            assert r[s].std().item() == pytest.approx(scale * float(sig[s]), rel=0.05)
        else:
            # fresh part of step s-1 -> s: the noise minus the carried part, on the frames missing at level s
            rho = float(sig[s]) / float(sig[s - 1])
            full = lambda k: seen[k] - interpolate(x0, masks[:, k], time_dim=2)  # noqa: E731
            fresh = (full(s) - rho * full(s - 1)).permute(0, 2, 1, 3, 4)[~masks[:, s]]
            assert fresh.std().item() == pytest.approx(scale * float(sig[0]), rel=0.05)
            assert r[s].std().item() < 2 * float(sig[0])  # on the training scale
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)  # the last level has no missing frame


def test_phase2_noise_scale_zero_is_deterministic(monkeypatch):
    """``phase2_noise_scale=0``: ``constant`` equals ``none`` exactly; ``level`` replaces the carried
    noise by ``0 * sigma``: the noise-free interpolations ``I(x0, M_s)`` after level 0."""
    ref = _oracle_run(monkeypatch, "none", 1.0)[3]
    const = _oracle_run(monkeypatch, "constant", 0.0)[3]
    for a, b in zip(const, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x0, masks, _, level, _ = _oracle_run(monkeypatch, "level", 0.0)
    for s in range(1, len(level)):
        torch.testing.assert_close(level[s], interpolate(x0, masks[:, s], time_dim=2), rtol=0, atol=1e-6)


# --- finding: nested phase2.* keys and student_mid_times were not checked -------------------------


@pytest.mark.parametrize("kw,match", [
    ({"phase2": Phase2Config(n_levels=1)}, r"phase2\.k_min=6, phase2\.n_levels=1"),
    ({"phase2": Phase2Config(sigma_max=-1.0)}, r"phase2\.sigma_min=0\.01, phase2\.sigma_max=-1"),
    ({"phase2": Phase2Config(sigma_max=math.nan)}, r"phase2\.sigma_max=nan"),
    ({"phase2": Phase2Config(confidence="bogus")}, r"phase2\.confidence='bogus'"),
    ({"phase2": Phase2Config(channels=["depth"])}, r"phase2\.channels"),
    ({"phase2_noise_scale": math.nan}, r"phase2_noise_scale=nan.*finite"),
    ({"phase2_noise_scale": math.inf}, r"phase2_noise_scale=inf.*finite"),
    ({"phase2_noise_scale": -0.5}, r"phase2_noise_scale=-0\.5"),
    ({"student_mid_times": [math.nan]}, r"student_mid_times=\[nan\]"),
    ({"student_mid_times": [1.6]}, r"student_mid_times=\[1\.6\]"),  # >= pi/2: above any t_0 = atan(sigma_max)
    ({"student_mid_times": [0.5, 0.9]}, r"student_mid_times=\[0\.5, 0\.9\]"),  # not decreasing
    ({"student_mid_times": [1.0, 0.0]}, r"student_mid_times"),  # t = 0 is the data, no step there
    ({"student_mid_times": [1.2], "student_steps": 3}, r"student_mid_times=\[1\.2\] \(student_steps=3\)"),
])  # fmt: skip
def test_sample_config_validate_names_the_bad_key(kw, match):
    with pytest.raises(ConfigError, match=match):
        SampleConfig(prompts=["x"], **kw).validate()


def test_sample_config_accepts_good_values():
    SampleConfig(prompts=["x"]).validate()
    SampleConfig(prompts=["x"], phase2_noise="constant", phase2_noise_scale=0.0).validate()
    SampleConfig(prompts=["x"], student_mid_times=[1.5, 1.0], student_steps=3).validate()
    SampleConfig(prompts=["x"], phase2=Phase2Config(budgets=[3, 5, 7])).validate()


@pytest.mark.parametrize("override,match", [
    ("phase2.n_levels=1", r"phase2\.n_levels=1"),
    ("phase2.sigma_max=-1", r"phase2\.sigma_max=-1"),
    ("phase2.confidence=bogus", r"phase2\.confidence='bogus'"),
    ("phase2_noise_scale=nan", r"phase2_noise_scale=nan"),
    ("student_mid_times=[1.6]", r"student_mid_times=\[1\.6\]"),
])  # fmt: skip
def test_sample_py_refuses_bad_nested_keys_before_models_load(tmp_path, no_model, override, match):
    with pytest.raises(ConfigError, match=match):
        sample.main([*TINY, override, f"out_dir={tmp_path}"])


# --- findings: empty LoRA keys warn; swapped / wrong LoRA folders are refused up front ---------------


def test_empty_phase_loras_warn_once_per_phase_before_anything_loads(tmp_path, no_model, caplog):
    """The run stops at the text encoder (``no_model``): by then each empty phase key has been named once."""
    with caplog.at_level(logging.WARNING, logger="interpdiff.video.pipeline"):
        with pytest.raises(AssertionError, match="model was loaded"):
            sample.main([*TINY, f"out_dir={tmp_path}"])
    msgs = [r.getMessage() for r in caplog.records if r.name == "interpdiff.video.pipeline"]
    for key in ("phase1_lora", "phase2_lora"):
        hits = [m for m in msgs if m.startswith(f"{key} is empty")]
        assert len(hits) == 1 and "untrained" in hits[0] and "timing runs only" in hits[0], msgs
    assert pipeline.warn_untrained_phases(SampleConfig(phase1_lora="p1", phase2_student_lora="s2")) == []
    assert pipeline.warn_untrained_phases(SampleConfig(phase1_lora="p1")) == ["phase2_lora"]
    assert pipeline.warn_untrained_phases(SampleConfig(mode="full")) == []  # the pretrained base is the model


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A phase-1 and a phase-2 LoRA folder as train_phase1/2.py write them (K = 3 keyframes, budgets of
    k_min=3 on T=7), and a distilled full-sequence student (distill_rcm.py's metadata, sigma_max 40)."""
    out = tmp_path_factory.mktemp("loras")
    t1 = wan.build_tiny_transformer()
    wan.install_keyframe_rope(t1)
    wan.add_lora(t1, wan.LoraSpec(rank=2, alpha=2))
    wan.save_lora(t1, out / "p1", extra_meta={"phase": 1, "phase1": {"num_keyframes": 3}})
    t2 = wan.build_tiny_transformer()
    wan.widen_patch_embedding(t2, ("mask",))
    wan.add_lora(t2, wan.LoraSpec(rank=2, alpha=2))
    wan.save_lora(t2, out / "p2", extra_meta={"phase": 2})
    tf = wan.build_tiny_transformer()
    wan.add_lora(tf, wan.LoraSpec(rank=2, alpha=2), adapter_name="student")
    wan.save_lora(tf, out / "full", adapter_name="student", extra_meta={
        "phase": None, "distill": {"target": "full", "adapter": "student", "teacher_lora": "", "phase2_levels": [],
                                   "sampler": {"steps": 2, "mid_times": [1.4], "sigma_max": 40.0}}})
    return {"p1": out / "p1", "p2": out / "p2", "full": out / "full"}


def test_swapped_phase_loras_are_refused_before_the_text_encoder(tmp_path, no_model, loras):
    with pytest.raises(ConfigError, match=r"phase1_lora=.*p2.* was trained for phase 2, but phase1_lora takes a "
                                          r"phase-1 LoRA \(swapped with phase2_lora\?\)"):
        sample.main([*TINY, f"phase1_lora={loras['p2']}", f"phase2_lora={loras['p1']}", f"out_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"phase2_lora=.*p1.* was trained for phase 1, but phase2_lora takes a "
                                          r"phase-2 LoRA"):
        sample.main([*TINY, f"phase2_lora={loras['p1']}", f"out_dir={tmp_path}"])
    # the right way round passes the checks (and stops at the text encoder: no_model)
    with pytest.raises(AssertionError, match="model was loaded"):
        sample.main([*TINY, f"phase1_lora={loras['p1']}", f"phase2_lora={loras['p2']}", f"out_dir={tmp_path}"])


def test_student_folders_are_checked_before_the_text_encoder(tmp_path, no_model, loras):
    full = ["mode=full", f"student_lora={loras['full']}", f"out_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=r"phase1_student_lora=.* is a distilled 'full' student, expected 'phase1'"):
        sample.main([*TINY, f"phase1_student_lora={loras['full']}", f"out_dir={tmp_path}"])
    with pytest.raises(wan.WanLoadError, match=r"phase1_student_lora: .* is not a distilled student"):
        sample.main([*TINY, f"phase1_student_lora={loras['p1']}", f"out_dir={tmp_path}"])
    # 1.55 rad passes validate() (< pi/2) but not this student's t_0 = atan(40) = 1.546 (its distill.sampler)
    assert math.atan(40.0) < 1.55 < math.pi / 2
    with pytest.raises(ConfigError, match=r"student_mid_times=\[1\.55\] with student_lora=.*sigma_max 40\.0.*decrease"):
        sample.main([*TINY, *full, "student_mid_times=[1.55]"])
    with pytest.raises(ConfigError, match=r"student_steps=5.*5 steps need 4 intermediate times"):
        sample.main([*TINY, *full, "student_steps=5"])  # the default times hold 3
    with pytest.raises(AssertionError, match="model was loaded"):
        sample.main([*TINY, *full, "student_mid_times=[1.5]"])


def test_settings_the_mode_ignores_are_listed():
    """A setting the chosen mode does not read (usually a mistyped mode or a forgotten key) is
    reported by ``ignored_settings`` (run_sampling warns about each before anything loads)."""
    from interpdiff.video.pipeline import SampleConfig, ignored_settings

    assert ignored_settings(SampleConfig(prompts=["x"])) == []
    got = ignored_settings(SampleConfig(prompts=["x"], mode="full", selector_ckpt="s.pt", phase2_lora="p2",
                                        student_steps=4))
    assert [g.split(" ")[0] for g in got] == ["selector_ckpt", "phase1_lora", "student_steps"]
    got = ignored_settings(SampleConfig(prompts=["x"], student_lora="st", phase2_student_steps=1))
    assert [g.split(" ")[0] for g in got] == ["student_lora", "phase2_student_steps"]
