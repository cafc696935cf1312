"""Phase 1: keyframe flow matching (Wan2.1 LoRA on K latent frames at their true rotary positions).

Launch (each key of configs/video/*.yaml can be overridden as key.sub=value):

    # CPU, tiny preset (synthetic shards first):
    python -m interpdiff.video.make_shards out_dir=data/tiny num_samples=16 samples_per_shard=4 \
        latent_shape=[16,9,4,6] embed_shape=[16,32]
    python train_phase1.py --config configs/video/tiny_cpu.yaml data.shards='data/tiny/shard_*.tar'

    # one node, 8 GPUs, DeepSpeed ZeRO-2, bf16:
    accelerate launch --config_file accelerate_configs/8xB200.yaml train_phase1.py \
        --config configs/video/wan1.3b_phase1.yaml data.shards='/data/wan_synth/shard_{000000..000999}.tar'

    # resume the newest checkpoint of the run folder (or a given one):
    ... --resume latest            ... --resume runs/p1/checkpoints/step_00002000

Writes ``train.run_dir``: config.yaml, metrics.csv/jsonl, logs/ (TensorBoard),
checkpoints/step_XXXXXXXX/ (trainable/ = LoRA in diffusers format), validation/.
"""

from __future__ import annotations

import sys

from interpdiff.config import ConfigError, parse_cli
from interpdiff.io import CheckpointError
from interpdiff.training import resolve_resume, resume_flag_to_override, train
from interpdiff.video.objectives import VideoTrainConfig, make_train_spec
from interpdiff.video.wan import WanLoadError


def main(argv: list[str] | None = None):
    cfg = parse_cli(VideoTrainConfig, resume_flag_to_override(sys.argv[1:] if argv is None else argv))
    resolve_resume(cfg.train.resume, cfg.train.run_dir)  # a bad resume path fails before the model loads
    spec = make_train_spec(cfg, phase=1)
    return train(cfg.train, spec, full_config=cfg)


if __name__ == "__main__":
    from interpdiff.training import run_main
    from interpdiff.video.data import TooManySkipsError

    # finish_distributed() on success; a failed rank reports its error with its rank and exits at once,
    # without a collective, so the launcher stops the others (interpdiff.training.run_main)
    run_main("train_phase1.py", main, (ConfigError, CheckpointError, WanLoadError, TooManySkipsError))
