"""Multi-process runs of the shared loop on CPU (gloo): DDP via torchrun, DeepSpeed ZeRO-2 via
``accelerate launch``.

Reference: a one-process run with the same global batch. The toy task (``test_training``)
keys each sample's noise on (seed, step, sample id), so 2 processes x batch 2 see exactly the
samples and noise of 1 process x batch 4; with gradients averaged across ranks the weights after
N steps must agree to fp32 rounding (the all-reduce sums in another order).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TORCHRUN = [PY, "-m", "torch.distributed.run"]
ACCELERATE = [PY, "-m", "accelerate.commands.launch"]

SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from interpdiff.config import parse_cli
    from interpdiff.training import TrainLoopConfig, train
    from test_training import make_toy_spec

    cfg = parse_cli(TrainLoopConfig, sys.argv[1:])
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    spec = make_toy_spec(cfg.batch_size, rank=rank, world=world, seed=cfg.seed)
    res = train(cfg, spec)
    acc = res.accelerator
    acc.wait_for_everyone()  # the process group outlives train() (a caller may export, gather, ...)
    report = {{"rank": rank, "num_processes": acc.num_processes, "process_index": acc.process_index,
              "distributed_type": acc.distributed_type.value, "losses": res.losses,
              "dtypes": {{n: str(p.dtype) for n, p in spec.model.named_parameters()}}}}
    torch.save({{"adapter": {{k: v.detach().cpu().float() for k, v in spec.model.adapter.state_dict().items()}},
                "report": report}}, os.path.join(cfg.run_dir, f"final_rank{{rank}}.pt"))
    from interpdiff.training import finish_distributed
    finish_distributed()  # what the entry scripts do last
    assert not torch.distributed.is_initialized()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(k, None)
    return env


def _run(cmd, env, timeout=300):
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"command failed ({out.returncode}): {' '.join(cmd)}\n--- stdout\n{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-6000:]}")
    return out


ARGS = ["max_steps=4", "tracker=none", "log_every=1", "checkpoint_every=100", "seed=5", "optim.lr=0.05", "optim.kind=adamw",
        "optim.warmup_steps=2", "optim.schedule=cosine", "ema_decay=0.9"]


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    p = tmp_path_factory.mktemp("dist") / "toy_train.py"
    p.write_text(SCRIPT.format(tests=str(REPO / "tests")))
    return p


@pytest.fixture(scope="module")
def one_process(script, tmp_path_factory):
    run = tmp_path_factory.mktemp("one")
    _run([PY, str(script), f"run_dir={run}", "batch_size=4", *ARGS], _env())
    return torch.load(run / "final_rank0.pt")


def _check_equal(one, runs):
    for r in runs:
        assert r["report"]["num_processes"] == 2, r["report"]
        for k, v in one["adapter"].items():
            torch.testing.assert_close(r["adapter"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
        # logged loss is the all-reduced mean: equal to the one-process batch mean
        assert r["report"]["losses"] == pytest.approx(one["report"]["losses"], rel=1e-5)
    assert {r["report"]["process_index"] for r in runs} == {0, 1}


def test_two_process_ddp_equals_one_process(script, one_process, tmp_path):
    """Also with a tracker and a final checkpoint, as every shipped video config has: the run ends
    with exit code 0 on both ranks (accelerate's end_training destroyed the process group under a
    later barrier)."""
    run = tmp_path / "ddp"
    cmd = [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(_free_port()), str(script), f"run_dir={run}", "batch_size=2",
           *ARGS, "tracker=tensorboard", "checkpoint_every=4"]
    _run(cmd, _env())
    assert list((run / "logs").rglob("events.out.tfevents.*")), sorted(p.name for p in run.rglob("*"))
    assert (run / "checkpoints" / "step_00000004" / "meta.json").exists()
    runs = [torch.load(run / f"final_rank{r}.pt") for r in range(2)]
    assert runs[0]["report"]["distributed_type"] == "MULTI_CPU"
    _check_equal(one_process, runs)
    # weights changed at all (the test cannot pass with a no-op optimizer)
    assert not torch.allclose(runs[0]["adapter"]["weight"], _toy_initial_adapter())


@pytest.mark.slow
def test_accelerate_launch_deepspeed_zero2_cpu_equals_one_process(script, one_process, tmp_path):
    """``accelerate launch`` + DeepSpeed ZeRO-2 on 2 CPU processes with gradient accumulation
    (the engine accumulates and steps the LR schedule): world size 2 on each rank
    (the gloo fix in ``make_accelerator``), same weights as the one-process run, and a
    checkpoint written by the engine (trainable weights + ZeRO shards, frozen base excluded)."""
    run = tmp_path / "ds"
    env = _env()
    env["DS_ACCELERATOR"] = "cpu"
    cmd = [
        *ACCELERATE,
        "--config_file", str(REPO / "accelerate_configs" / "cpu_zero2_2proc.yaml"),
        "--main_process_port", str(_free_port()),
        str(script), f"run_dir={run}", "batch_size=1", "grad_accum=2", *ARGS,
    ]  # fmt: skip  (2 ranks x batch 1 x 2 accumulation steps = the one-process batch of 4)
    _run(cmd, env)
    runs = [torch.load(run / f"final_rank{r}.pt") for r in range(2)]
    assert runs[0]["report"]["distributed_type"] == "DEEPSPEED"
    _check_equal(one_process, runs)
    ck = run / "checkpoints" / "step_00000004"
    assert (ck / "trainable" / "adapter.pt").is_file()
    assert (ck / "pytorch_model").is_dir()  # the engine's folder (model states + ZeRO optimizer shards)



@pytest.mark.slow
def test_accelerate_deepspeed_bf16_keeps_trainable_weights_fp32(script, tmp_path):
    """ZeRO-2 with ``mixed_precision=bf16``: DeepSpeed's own bf16 mode would cast every parameter
    (the trainable adapter and the fp32 base included) to bf16; the loop keeps DeepSpeed in fp32 and
    autocasts itself, so every parameter keeps its dtype and the weights follow the one-process bf16
    autocast run (same samples and noise; sums in another order, bf16 matmuls)."""
    args = [*ARGS, "mixed_precision=bf16", "max_steps=2", "ema_decay=0"]
    one = tmp_path / "one"
    _run([PY, str(script), f"run_dir={one}", "batch_size=4", *args], _env())
    ref = torch.load(one / "final_rank0.pt")
    env = _env()
    env["DS_ACCELERATOR"] = "cpu"
    run = tmp_path / "ds_bf16"
    _run([*ACCELERATE, "--config_file", str(REPO / "accelerate_configs" / "cpu_zero2_2proc.yaml"),
          "--main_process_port", str(_free_port()), str(script), f"run_dir={run}", "batch_size=1", "grad_accum=2",
          *args], env)
    runs = [torch.load(run / f"final_rank{r}.pt") for r in range(2)]
    assert runs[0]["report"]["distributed_type"] == "DEEPSPEED"
    for r in runs:
        assert set(r["report"]["dtypes"].values()) == {"torch.float32"}, r["report"]["dtypes"]
        for k, v in ref["adapter"].items():
            torch.testing.assert_close(r["adapter"][k], v, rtol=0, atol=2e-3, msg=lambda m: f"{k}: {m}")
    start = _toy_initial_adapter()
    assert (ref["adapter"]["weight"] - start).abs().max() > 0.02  # it trained (the tolerance is below the update)


@pytest.mark.slow
def test_accelerate_deepspeed_zero2_resume_equals_uninterrupted(script, one_process, tmp_path):
    """ZeRO-2 run stopped after step 2 and resumed (engine module + optimizer shards, LR schedule,
    EMA, RNG, data position) ends with the weights of the uninterrupted one-process run."""
    run = tmp_path / "ds_resume"
    env = _env()
    env["DS_ACCELERATOR"] = "cpu"
    base = [*ACCELERATE, "--config_file", str(REPO / "accelerate_configs" / "cpu_zero2_2proc.yaml")]
    args = [str(script), f"run_dir={run}", "batch_size=1", "grad_accum=2", "checkpoint_every=2", *ARGS]
    _run([*base, "--main_process_port", str(_free_port()), *args, "stop_at_step=2"], env)
    assert (run / "checkpoints" / "step_00000002" / "pytorch_model").is_dir()
    _run([*base, "--main_process_port", str(_free_port()), *args, "resume=latest"], env)
    runs = [torch.load(run / f"final_rank{r}.pt") for r in range(2)]
    for r in runs:
        for k, v in one_process["adapter"].items():
            torch.testing.assert_close(r["adapter"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
        assert r["report"]["losses"] == pytest.approx(one_process["report"]["losses"][2:], rel=1e-5)



@pytest.mark.slow
def test_accelerate_deepspeed_zero3_cpu_equals_one_process(script, one_process, tmp_path):
    """ZeRO-3 (partitioned parameters) on 2 CPU processes: the trainable weights gathered into the
    checkpoint equal the one-process run's; an EMA is refused with a clear message."""
    env = _env()
    env["DS_ACCELERATOR"] = "cpu"
    base = [*ACCELERATE, "--config_file", str(REPO / "accelerate_configs" / "cpu_zero3_2proc.yaml")]
    run = tmp_path / "z3"
    out = subprocess.run([*base, "--main_process_port", str(_free_port()), str(script), f"run_dir={run}_ema",
                          "batch_size=2", *ARGS], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "not supported with ZeRO-3" in out.stderr
    _run([*base, "--main_process_port", str(_free_port()), str(script), f"run_dir={run}", "batch_size=2", *ARGS,
          "ema_decay=0"], env)
    got = torch.load(run / "checkpoints" / "step_00000004" / "trainable" / "adapter.pt")
    for k, v in one_process["adapter"].items():
        torch.testing.assert_close(got[k].float(), v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert (run / "checkpoints" / "step_00000004" / "pytorch_model").is_dir()


UNEVEN_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from interpdiff.config import parse_cli
    from interpdiff.training import TrainLoopConfig, train
    from test_training import make_toy_spec

    cfg = parse_cli(TrainLoopConfig, sys.argv[1:])
    rank = int(os.environ.get("RANK", 0))
    spec = make_toy_spec(cfg.batch_size, seed=cfg.seed)
    X = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    seen = []

    def batches(epoch, skip):  # epoch mode, rank r holds 3 + 2 r micro-batches per epoch
        for i in range(skip, 3 + 2 * rank):
            seen.append([epoch, i])
            k = torch.tensor([(epoch * 7 + i) % 64])
            yield {{"x": X[k], "key": k}}

    spec.batches = batches
    train(cfg, spec)
    with open(os.path.join(cfg.run_dir, f"seen_rank{{rank}}_{{len(os.listdir(cfg.run_dir))}}.json"), "w") as f:
        json.dump(seen, f)
    """
)


@pytest.mark.slow
def test_ddp_resume_restores_each_ranks_data_position(tmp_path):
    """Epoch-mode streams of different lengths per rank (3 and 5 micro-batches per epoch): a run
    stopped at step 4 and resumed reads, on every rank, the micro-batches the uninterrupted run
    reads after step 4. (Accelerate saves the registered TrainState from the main process only;
    with its data position rank 1 replayed or skipped batches.)"""
    script = tmp_path / "uneven.py"
    script.write_text(UNEVEN_SCRIPT.format(tests=str(REPO / "tests")))
    args = ["batch_size=1", "max_steps=9", "tracker=none", "log_every=1", "checkpoint_every=4", "seed=3",
            "optim.lr=0.01", "ema_decay=0"]

    def launch(run, *extra):
        _run([*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(_free_port()), str(script),
              f"run_dir={run}", *args, *extra], _env())

    full, part = tmp_path / "full", tmp_path / "part"
    launch(full)
    launch(part, "stop_at_step=4")
    for f in part.glob("seen_rank*.json"):
        f.rename(f.with_name("first_" + f.name))
    launch(part, "resume=latest")
    import json

    for rank in (0, 1):
        (ref,) = [json.loads(f.read_text()) for f in full.glob(f"seen_rank{rank}_*.json")]
        (resumed,) = [json.loads(f.read_text()) for f in part.glob(f"seen_rank{rank}_*.json")]
        assert len(ref) == 9 and resumed == ref[4:], (rank, ref, resumed)
    for rank in (0, 1):
        state = json.loads((part / "checkpoints" / "step_00000004" / f"data_state_rank{rank}.json").read_text())
        assert [state["epoch"], state["batches_in_epoch"]] == [[1, 1], [0, 4]][rank]


def _toy_initial_adapter() -> torch.Tensor:
    sys.path.insert(0, str(REPO / "tests"))
    from test_training import Toy

    return Toy().adapter.weight.detach()


# --- the real entry script (tiny Wan preset) ---------------------------------------------------------


@pytest.fixture(scope="module")
def one_sample_shards(tmp_path_factory):
    """8 shards of 1 sample: rank r of 2 reads shards r, r+2, ..., so 2 ranks x batch 1 see the
    same samples per step as 1 rank x batch 2 (shards 2i, 2i+1)."""
    from interpdiff.video.make_shards import MakeShardsConfig, make_shards

    out = tmp_path_factory.mktemp("wan_shards")
    make_shards(MakeShardsConfig(out_dir=str(out), num_samples=8, samples_per_shard=1, latent_shape=[16, 9, 4, 6],
                                 embed_shape=[16, 32], seed=1))
    return str(out / "shard_*.tar")


def _wan_args(shards, run, bs):
    return ["--config", "configs/video/tiny_cpu.yaml", f"data.shards={shards}", f"train.run_dir={run}",
            f"train.batch_size={bs}", "train.max_steps=3", "train.checkpoint_every=3", "train.tracker=none",
            "train.validate_every=0", "train.optim.lr=1e-2", "train.optim.kind=adamw"]


def _lora(run):
    from safetensors.torch import load_file

    d = Path(run) / "checkpoints" / "step_00000003" / "trainable"
    return {**load_file(str(d / "pytorch_lora_weights.safetensors")), **load_file(str(d / "interpdiff_extra.safetensors"))}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate_zero2"])
def test_train_phase2_two_processes_equal_one(one_sample_shards, tmp_path, launcher):
    env = _env()
    _run([PY, "train_phase2.py", *_wan_args(one_sample_shards, tmp_path / "one", 2)], env)
    if launcher == "torchrun":
        cmd = [*TORCHRUN, "--nproc_per_node", "2", "--master_port", str(_free_port())]
    else:
        env["DS_ACCELERATOR"] = "cpu"
        cmd = [*ACCELERATE, "--config_file", "accelerate_configs/cpu_zero2_2proc.yaml", "--main_process_port", str(_free_port())]
    _run([*cmd, "train_phase2.py", *_wan_args(one_sample_shards, tmp_path / "two", 1)], env)
    a, b = _lora(tmp_path / "one"), _lora(tmp_path / "two")
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        # Adam moves each weight by up to lr = 1e-2 per step whatever the gradient's size, so fp32
        # rounding of tiny gradients (summed in another order by the all-reduce) shows up at
        # ~1e-5 absolute: atol 5e-5 is 0.2% of the 3 steps' maximal movement
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-5, msg=lambda m: f"{k}: {m}")
        moved += int(a[k].abs().sum() > 0)
    assert moved == len(a)  # every LoRA B and the extra channels left zero
    rows_one = (tmp_path / "one" / "metrics.csv").read_text().splitlines()
    rows_two = (tmp_path / "two" / "metrics.csv").read_text().splitlines()
    loss = lambda rows: [float(r.split(",")[1]) for r in rows[1:]]  # noqa: E731
    assert loss(rows_two) == pytest.approx(loss(rows_one), rel=1e-5)


@pytest.mark.parametrize(
    "name,dist,procs,machines,stage",
    [
        ("8xB200.yaml", "DEEPSPEED", 8, 1, 2),
        ("multinode_2x8_zero3.yaml", "DEEPSPEED", 16, 2, 3),
        ("1xgpu.yaml", "NO", 1, 1, None),
        ("cpu.yaml", "NO", 1, 1, None),
        ("cpu_zero2_2proc.yaml", "DEEPSPEED", 2, 1, 2),
        ("cpu_zero3_2proc.yaml", "DEEPSPEED", 2, 1, 3),
    ],
)
def test_accelerate_configs_parse(name, dist, procs, machines, stage):
    """Each launch config loads with Accelerate's own reader and points at a DeepSpeed JSON of the
    stated ZeRO stage whose 'auto' entries Accelerate can fill for a Wan model (no hidden_size)."""
    import json

    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(REPO / "accelerate_configs" / name))
    assert cfg.distributed_type.value == dist and cfg.num_processes == procs and cfg.num_machines == machines
    if stage is None:
        return
    assert cfg.mixed_precision in (None, "no")  # must not sit next to a deepspeed_config_file (Accelerate refuses)
    ds = json.loads((REPO / cfg.deepspeed_config["deepspeed_config_file"]).read_text())
    assert ds["zero_optimization"]["stage"] == stage
    hidden_keys = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
    assert all(ds["zero_optimization"].get(k) != "auto" for k in hidden_keys)
    for f in ("zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json"):
        d = json.loads((REPO / "accelerate_configs" / "deepspeed" / f).read_text())
        # never enabled outright: DeepSpeed's own bf16/fp16 casts the trainable weights too (make_accelerator)
        assert all(d.get(k, {}).get("enabled", "auto") == "auto" for k in ("bf16", "fp16")), f


@pytest.mark.slow
def test_train_phase2_zero3_bf16_base_fp32_trainables(one_sample_shards, tmp_path):
    """ZeRO-3 on 2 CPU processes with the real entry script, a bf16 base and bf16 autocast: DeepSpeed
    runs in fp32 mode over mixed-dtype parameters (frozen bf16 base, fp32 LoRA and mask channels),
    trains, and the checkpoint holds fp32 trainable weights with a LoRA that moved off zero."""
    from safetensors.torch import load_file

    env = _env()
    env["DS_ACCELERATOR"] = "cpu"
    run = tmp_path / "z3"
    _run([*ACCELERATE, "--config_file", str(REPO / "accelerate_configs" / "cpu_zero3_2proc.yaml"),
          "--main_process_port", str(_free_port()), "train_phase2.py", *_wan_args(one_sample_shards, run, 1),
          "model.dtype=bf16", "train.mixed_precision=bf16", "train.ema_decay=0"], env)
    d = run / "checkpoints" / "step_00000003" / "trainable"
    lora, extra = load_file(str(d / "pytorch_lora_weights.safetensors")), load_file(str(d / "interpdiff_extra.safetensors"))
    assert {v.dtype for v in [*lora.values(), *extra.values()]} == {torch.float32}
    assert max(float(v.abs().max()) for k, v in lora.items() if "lora_B" in k) > 0
