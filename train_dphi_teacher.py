"""Wan-teacher segment costs -> the video segment-cost predictor D_phi -> DP keyframe masks.

METHOD.md section 3: the DP keyframe cost of a video is a KL proxy between the frozen
full-sequence Wan2.1 denoiser on the true latents and on "keyframes + interpolation", summed
over 16 noise levels with SNR weights. Computing it for every segment of every clip costs
thousands of teacher forwards per clip, so D_phi learns it from a subset (pairs and noise levels
per clip) and predicts full cost matrices for the DP. Stages (``interpdiff.video.train_dphi``):

    costs  teacher costs of num_clips clips          -> run_dir/teacher_costs.pt
    dphi   D_phi regression (held-out Spearman,      -> run_dir/dphi.pt, metrics.csv, summary.json
           DP cost ratio vs the teacher's own DP)
    masks  nested per-level DP masks for every clip   -> run_dir/dp_masks.pt {key: bool [S, T]}
                                                          run_dir/dp_index.pt {key: bool [T]}

The mask files are what ``phase2.dp_mask_file`` / ``phase1.dp_index_file`` (policy
``dp_precomputed``) and the selector's ``labels.file`` read.

    # CPU, tiny preset (synthetic shards first):
    python -m interpdiff.video.make_shards out_dir=data/tiny num_samples=16 samples_per_shard=4 \
        latent_shape=[16,9,4,6] embed_shape=[16,32]
    python train_dphi_teacher.py --config configs/video/dphi_teacher_tiny_cpu.yaml data.shards='data/tiny/shard_*.tar'

    # Wan2.1-1.3B teacher on one GPU: 32 random pairs x 4 noise levels per clip for 2,000 clips
    python train_dphi_teacher.py --config configs/video/dphi_teacher_wan1.3b.yaml \
        data.shards='/data/wan_synth/shard_{000000..000099}.tar' masks.shards='/data/wan_synth/shard_{000000..000999}.tar'
"""

from __future__ import annotations

import logging
import sys

from interpdiff.config import ConfigError, parse_cli
from interpdiff.io import CheckpointError
from interpdiff.video.train_dphi import DphiTeacherConfig, run
from interpdiff.video.wan import WanLoadError


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = parse_cli(DphiTeacherConfig, sys.argv[1:] if argv is None else argv)
    return run(cfg)


if __name__ == "__main__":
    from interpdiff.training import run_main

    run_main("train_dphi_teacher.py", main, (ConfigError, CheckpointError, WanLoadError))
