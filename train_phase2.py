"""Phase 2: interpolation-level refiner (Wan2.1 LoRA + zero-initialised mask input channels).

Per batch: a level s, nested masks from phase2.policy_mix, x_s = I(x0, M_s) + sigma_s eps (1 - M_s),
the mask planes of M_s as extra input channels, the level through the timestep embedding, loss on
the clean latents (see interpdiff.video.objectives).

Launch (each key of configs/video/*.yaml can be overridden as key.sub=value):

    # CPU, tiny preset (synthetic shards first):
    python -m interpdiff.video.make_shards out_dir=data/tiny num_samples=16 samples_per_shard=4 \
        latent_shape=[16,9,4,6] embed_shape=[16,32]
    python train_phase2.py --config configs/video/tiny_cpu.yaml data.shards='data/tiny/shard_*.tar' train.run_dir=runs/tiny_p2

    # one node, 8 GPUs, DeepSpeed ZeRO-2, bf16:
    accelerate launch --config_file accelerate_configs/8xB200.yaml train_phase2.py \
        --config configs/video/wan1.3b_phase2.yaml data.shards='/data/wan_synth/shard_{000000..000999}.tar'

    # 14B on 2 nodes x 8 GPUs, ZeRO-3 (same command on both nodes; --machine_rank 0 / 1, the main
    # address is node 0's IP; see accelerate_configs/multinode_2x8_zero3.yaml):
    accelerate launch --config_file accelerate_configs/multinode_2x8_zero3.yaml --machine_rank 0 \
        --main_process_ip 10.0.0.1 --main_process_port 29500 train_phase2.py \
        --config configs/video/wan14b_phase2.yaml data.shards='/data/wan_synth/shard_{000000..000999}.tar'

    # DeepSpeed ZeRO-2 on 2 CPU processes (checks the DeepSpeed path without a GPU):
    DS_ACCELERATOR=cpu accelerate launch --config_file accelerate_configs/cpu_zero2_2proc.yaml train_phase2.py \
        --config configs/video/tiny_cpu.yaml data.shards='data/tiny/shard_*.tar' train.run_dir=runs/tiny_p2_ds

    # resume the newest checkpoint of the run folder (or a given one):
    ... --resume latest            ... --resume runs/p2/checkpoints/step_00002000

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
    spec = make_train_spec(cfg, phase=2)
    return train(cfg.train, spec, full_config=cfg)


if __name__ == "__main__":
    from interpdiff.training import run_main
    from interpdiff.video.data import TooManySkipsError

    # finish_distributed() on success; a failed rank reports its error with its rank and exits at once,
    # without a collective, so the launcher stops the others (interpdiff.training.run_main)
    run_main("train_phase2.py", main, (ConfigError, CheckpointError, WanLoadError, TooManySkipsError))
