"""Text -> video: the two-phase sampler (phase-1 keyframes -> interpolation -> phase-2 levels) or,
with mode=full, the base Wan2.1 flow-matching sampler with CFG, on the same prompts.

    # tiny preset on CPU (random weights; writes playable mp4s of the requested frame count; 25 frames =
    # 7 latent frames hold the phase-2 levels of k_min=3 keyframes):
    python sample.py model_path=tiny 'prompts=[a dog runs on the beach]' num_frames=25 phase2.k_min=3 \
        height=32 width=48 phase1_steps=4 out_dir=samples/tiny

    # Wan2.1 1.3B, trained LoRAs (a checkpoint's trainable/ folder), prompts from a file:
    python sample.py model_path=Wan-AI/Wan2.1-T2V-1.3B-Diffusers \
        phase1_lora=runs/p1/checkpoints/step_00010000/trainable \
        phase2_lora=runs/p2/checkpoints/step_00010000/trainable \
        prompts_file=prompts.txt num_frames=81 height=480 width=832 phase1_steps=8 out_dir=samples/two_phase
    python sample.py model_path=Wan-AI/Wan2.1-T2V-1.3B-Diffusers mode=full full_steps=50 guidance=5 \
        prompts_file=prompts.txt out_dir=samples/full

    # distilled students (distill_rcm.py; a checkpoint's trainable_ema/student folder; CFG is distilled in):
    python sample.py model_path=Wan-AI/Wan2.1-T2V-1.3B-Diffusers mode=full \
        student_lora=runs/rcm_wan1.3b_full/checkpoints/step_00006000/trainable_ema/student prompts_file=prompts.txt
    python sample.py model_path=Wan-AI/Wan2.1-T2V-1.3B-Diffusers \
        phase1_student_lora=runs/rcm_wan1.3b_phase1/checkpoints/step_00006000/trainable_ema/student \
        phase2_student_lora=runs/rcm_wan1.3b_phase2/checkpoints/step_00004000/trainable_ema/student \
        prompts_file=prompts.txt out_dir=samples/two_phase_distilled

    # or all settings from a YAML (keys of interpdiff.video.pipeline.SampleConfig): --config my_sample.yaml

Prints the time of each stage (load, text_encoder, phase1, interpolate, phase2 | full, vae_decode)
and writes them to out_dir/times_{mode}.json.
"""

from __future__ import annotations

import sys

import torch

from interpdiff.config import ConfigError, parse_cli
from interpdiff.io import CheckpointError
from interpdiff.video.pipeline import SampleConfig, run_sampling
from interpdiff.video.wan import WanLoadError


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_cli(SampleConfig, sys.argv[1:] if argv is None else argv)
    torch.manual_seed(cfg.seed)
    return run_sampling(cfg)


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, CheckpointError, WanLoadError) as e:
        sys.exit(f"sample.py: error: {e}")
