"""One rank of a multi-process launch fails (a damaged or incomplete file that only its node reads):
the whole launch must end promptly with a non-zero exit code and that rank's error in the output,
not leave the other ranks waiting in a barrier or in the process group's rendezvous for the
group's timeout (30 min on gloo by default).

Two ways the healthy ranks used to wait that long (``interpdiff.training.run_main``,
``train.dist_timeout_s``):

- the failed process does not exit: its interpreter waits at shutdown for a thread that never ends
  (a tracker or writer thread); the launcher stops the others only once a process has exited, and
  the healthy rank's collective sees no closed connection;
- one launcher per node: a rank that fails before the process group forms (resolving
  ``--resume`` against an incomplete node-local copy) exits, its node's launcher stops, and the
  ranks of the other node wait in the group's rendezvous, which no launcher watches.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import textwrap
import time

import pytest

from test_distributed import PY, REPO, TORCHRUN, _env, _free_port

DRIVER = textwrap.dedent(
    """
    import os, sys, threading
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from interpdiff.config import ConfigError, parse_cli
    from interpdiff.io import CheckpointError
    from interpdiff.training import TrainLoopConfig, run_main, train
    from test_training import make_toy_spec


    def main():
        cfg = parse_cli(TrainLoopConfig, sys.argv[1:])
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if os.environ.get("STUCK_THREAD_RANK") == str(rank):
            # a non-daemon thread that never ends (a tracker upload, a log writer): the interpreter
            # waits for it at shutdown, so without a watchdog this rank would never exit
            threading.Thread(target=threading.Event().wait, name="stuck-writer").start()
        train(cfg, make_toy_spec(cfg.batch_size, rank=rank, world=world, seed=cfg.seed))


    run_main("toy_train.py", main, (ConfigError, CheckpointError), exit_watchdog_s=5)
    """
)

TOY_ARGS = ["batch_size=2", "max_steps=4", "tracker=none", "log_every=1", "checkpoint_every=2", "seed=5", "ema_decay=0"]


def _launch(cmds: list[list[str]], env: dict, limit_s: float) -> tuple[list[subprocess.CompletedProcess], float]:
    """Start the launchers together (one per emulated node), wait up to ``limit_s`` for all of them,
    kill what is left (the launcher and its workers: one session each) and fail on a hang."""
    procs = [subprocess.Popen(c, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for c in cmds]
    t0 = time.monotonic()
    outs, hung = [], []
    for c, p in zip(cmds, procs):
        try:
            out, err = p.communicate(timeout=max(1.0, limit_s - (time.monotonic() - t0)))
        except subprocess.TimeoutExpired:
            hung.append(" ".join(c[-6:]))
            os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
        outs.append(subprocess.CompletedProcess(c, p.returncode, out, err))
    elapsed = time.monotonic() - t0
    if hung:
        tails = "\n".join(f"--- launcher {i}\n{o.stdout[-1500:]}\n{o.stderr[-3000:]}" for i, o in enumerate(outs))
        raise AssertionError(f"the launch did not end within {limit_s:.0f} s (still running: {hung})\n{tails}")
    return outs, elapsed


def _check_ok(cmd: list[str], env: dict) -> None:
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


def test_rank_failing_on_resume_ends_the_launch(tmp_path):
    """torchrun, 2 processes: a 2-rank run checkpoints at step 2; resumed, only rank 1 reads its
    damaged data position (``data_state_rank1.json``) and fails, with a thread that never ends. The
    launch exits non-zero within seconds; rank 1's error names itself and the file, in the worker's
    output and in the launcher's "Root Cause" summary."""
    driver = tmp_path / "toy_train.py"
    driver.write_text(DRIVER.format(tests=str(REPO / "tests")))
    run = tmp_path / "run"
    base = [*TORCHRUN, "--nproc_per_node", "2"]
    _check_ok([*base, "--master_port", str(_free_port()), str(driver), f"run_dir={run}", *TOY_ARGS, "stop_at_step=2"],
              _env())
    bad = run / "checkpoints" / "step_00000002" / "data_state_rank1.json"
    bad.write_text(bad.read_text()[:20])  # truncated: only rank 1 reads it
    env = _env()
    env["STUCK_THREAD_RANK"] = "1"
    (out,), elapsed = _launch([[*base, "--master_port", str(_free_port()), str(driver), f"run_dir={run}", *TOY_ARGS,
                                "resume=latest"]], env, limit_s=90)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-4000:]
    assert elapsed < 60, f"{elapsed:.0f} s\n{text[-4000:]}"
    assert f"toy_train.py: error: [rank 1/2] {bad}: unreadable data position" in out.stderr, out.stderr[-4000:]
    assert "Timeout (0:00:05)!" in out.stderr  # the watchdog ended rank 1 (its stuck thread held the shutdown)
    root = out.stderr[out.stderr.index("Root Cause"):]  # torchrun's summary reads the error file rank 1 wrote
    assert re.search(r"rank\s*: 1 ", root) and "data_state_rank1.json" in root, root


@pytest.mark.slow
def test_rank_failing_before_the_process_group_forms_ends_a_multinode_launch(tmp_path):
    """Two launchers of one process each (two nodes, static rendezvous), the real ``train_phase2.py``
    resumed from a node-local checkpoint copy: node 1's copy lacks ``train_state.json`` (an
    interrupted copy), so rank 1 fails resolving ``--resume``, before the process group exists. Its
    launcher stops; rank 0 (node 0, complete copy) loads the model and waits for rank 1 in the
    group's rendezvous: ``train.dist_timeout_s=20`` ends that wait with an error that points at the
    other rank, where the default is 10 min (30 min on gloo before)."""
    from test_distributed import _wan_args

    from interpdiff.video.make_shards import MakeShardsConfig, make_shards

    shards = tmp_path / "shards"
    make_shards(MakeShardsConfig(out_dir=str(shards), num_samples=4, samples_per_shard=1, latent_shape=[16, 9, 4, 6],
                                 embed_shape=[16, 32], seed=1))
    glob = str(shards / "shard_*.tar")
    first = tmp_path / "first"
    args = [a for a in _wan_args(glob, first, 1) if not a.startswith(("train.max_steps", "train.checkpoint_every"))]
    _check_ok([PY, "train_phase2.py", *args, "train.max_steps=1", "train.checkpoint_every=1"], _env())
    ckpt = first / "checkpoints" / "step_00000001"
    local = {n: tmp_path / f"node{n}_local" / "step_00000001" for n in (0, 1)}  # each node's own disk
    for dst in local.values():
        shutil.copytree(ckpt, dst)
    (local[1] / "train_state.json").unlink()

    port = _free_port()
    run = tmp_path / "run"
    cmds = [[*TORCHRUN, "--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
             "--master_port", str(port), "train_phase2.py", *_wan_args(glob, run, 1), "train.dist_timeout_s=20",
             "--resume", str(local[n])] for n in (0, 1)]
    (node0, node1), elapsed = _launch(cmds, _env(), limit_s=90)
    assert node0.returncode != 0 and node1.returncode != 0, (node0.returncode, node1.returncode)
    assert elapsed < 90
    assert f"train_phase2.py: error: [rank 1/2] resume={str(local[1])!r}" in node1.stderr, node1.stderr[-4000:]
    assert "holds no checkpoint" in node1.stderr
    assert ("train_phase2.py: error: [rank 0/2] rank 0 of 2: the process group did not form within "
            "train.dist_timeout_s=20 s") in node0.stderr, node0.stderr[-4000:]
