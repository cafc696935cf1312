"""rCM step distillation (sCM consistency with a JVP + DMD score regulariser, TrigFlow time) of the
full-sequence Wan model, the phase-1 keyframe model or the phase-2 refiner.

    distill.target=full    base Wan (full sequence)        -> few-step baseline (the milestone's 4-step rCM model)
    distill.target=phase1  base + phase-1 LoRA (teacher)   -> few-step keyframe student
    distill.target=phase2  base + phase-2 LoRA (teacher)   -> 1-2 step refiner (regression to the teacher's TACoS chain)

One base model carries the teacher (its LoRA as a frozen adapter) and, on top of it, the student adapter
and (with DMD) the fake-score adapter;
the math is in interpdiff.distill, the Wan glue in interpdiff.video.distill_wan.

    # CPU, tiny preset (synthetic shards first):
    python -m interpdiff.video.make_shards out_dir=data/tiny num_samples=16 samples_per_shard=4 \
        latent_shape=[16,9,4,6] embed_shape=[16,32]
    python distill_rcm.py --config configs/video/rcm_tiny_cpu.yaml data.shards='data/tiny/shard_*.tar'

    # one node, 8 GPUs, DeepSpeed ZeRO-2, bf16 (phase-1 teacher from train_phase1.py):
    accelerate launch --config_file accelerate_configs/8xB200.yaml distill_rcm.py \
        --config configs/video/rcm_wan1.3b_phase1.yaml data.shards='/data/wan_synth/shard_{000000..000999}.tar' \
        distill.teacher_lora=runs/wan1.3b_phase1/checkpoints/step_00020000/trainable_ema
    # the full-sequence baseline and the phase-2 refiner: configs/video/rcm_wan1.3b_full.yaml, rcm_wan1.3b_phase2.yaml

    # resume the newest checkpoint of the run folder (or a given one):
    ... --resume latest            ... --resume runs/rcm_p1/checkpoints/step_00002000

Writes ``train.run_dir``: config.yaml, metrics.csv/jsonl, logs/, checkpoints/step_XXXXXXXX/
(trainable/student = the student LoRA in diffusers format, the file sample.py takes;
trainable/fake_score; trainable_ema/ the same with EMA weights).
"""

from __future__ import annotations

import sys

from interpdiff.config import ConfigError, parse_cli
from interpdiff.io import CheckpointError
from interpdiff.training import resolve_resume, resume_flag_to_override, train
from interpdiff.video.distill_wan import DistillTrainConfig, make_distill_spec
from interpdiff.video.wan import WanLoadError


def main(argv: list[str] | None = None):
    cfg = parse_cli(DistillTrainConfig, resume_flag_to_override(sys.argv[1:] if argv is None else argv))
    resolve_resume(cfg.train.resume, cfg.train.run_dir)  # a bad resume path fails before the model loads
    spec = make_distill_spec(cfg)
    return train(cfg.train, spec, full_config=cfg)


if __name__ == "__main__":
    from interpdiff.training import run_main
    from interpdiff.video.data import TooManySkipsError

    # finish_distributed() on success; a failed rank reports its error with its rank and exits at once,
    # without a collective, so the launcher stops the others (interpdiff.training.run_main)
    run_main("distill_rcm.py", main, (ConfigError, CheckpointError, WanLoadError, TooManySkipsError))
