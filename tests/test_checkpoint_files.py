"""Damaged files in a training checkpoint folder on resume (``interpdiff.training.load_checkpoint_dir``,
``interpdiff.io.file_problem``).

Fault injection: a truncated, overwritten or missing file that a rank reads (Accelerate's RNG
states, optimizer, scheduler, registered objects, the trainable weights, the DeepSpeed engine's
model states and ZeRO shards, the JSON files) stops the resume before anything is loaded, with an
error that names that file, what is wrong, and the older checkpoint to resume instead.
"""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

HINT = r"damaged; resume an older one with --resume .*step_00000002 train\.rewind=true"


def _damage(f, how: str) -> None:
    data = f.read_bytes()
    if how == "truncated":  # an interrupted copy or write
        f.write_bytes(data[: len(data) // 2])
    elif how == "zeroed":  # same size, zero-filled (a crash on some filesystems)
        f.write_bytes(b"\0" * len(data))
    elif how == "missing":
        f.unlink()
    else:
        raise ValueError(how)


def _two_checkpoints(tmp_path):
    from test_training import run_toy

    # trained toward max_steps=6 (the resume's): a damaged train_state.json is found by the load, not by the
    # LR-schedule note that reads it when max_steps changes
    run_toy(tmp_path / "run", max_steps=6, checkpoint_every=2, keep_last=2, stop_at_step=4)
    return tmp_path / "run" / "checkpoints" / "step_00000004"


@pytest.mark.parametrize("how", ["truncated", "zeroed", "missing", "other_content"])
def test_damaged_random_states_stop_the_resume_naming_the_file(tmp_path, how):
    """Accelerate's ``load_state`` ignores any failure reading ``random_states_{rank}.pkl`` (the run
    went on with other RNG states, no message): the resume is refused, the error names the file."""
    import torch

    from test_training import run_toy

    from interpdiff.io import CheckpointError

    ck = _two_checkpoints(tmp_path)
    f = ck / "random_states_0.pkl"
    if how == "other_content":  # a complete torch file, but not the RNG states
        torch.save({"step": 4}, f)
    else:
        _damage(f, how)
    what = {"truncated": "is not a complete zip archive", "zeroed": "is not a complete zip archive",
            "missing": r"is missing \(the checkpoint was written by 1 process\)",
            "other_content": r"lacks \['random_state', 'numpy_random_seed', 'torch_manual_seed'\]"}[how]
    with pytest.raises(CheckpointError, match=rf"(?s)cannot load checkpoint .*step_00000004: {re.escape(str(f))} "
                                              rf"{what}.*expected .*{HINT}"):
        run_toy(tmp_path / "run", max_steps=6, checkpoint_every=2, resume="latest")
    assert (tmp_path / "run" / "checkpoints" / "step_00000004").is_dir()  # nothing was rewound or rotated


def test_random_states_that_accelerate_fails_to_restore_are_refused(tmp_path, monkeypatch):
    """Right after ``load_state``: the RNG states must be the checkpoint's. Here the file is intact
    but Accelerate's own read of it fails (and Accelerate only logs that at info level)."""
    import accelerate.checkpointing

    from test_training import run_toy

    from interpdiff.io import CheckpointError

    import random

    import accelerate
    import torch

    ck = _two_checkpoints(tmp_path)
    real_load, real_load_state = accelerate.checkpointing.load, accelerate.Accelerator.load_state

    def load(f, *a, **k):
        if Path(f).name.startswith("random_states"):
            raise RuntimeError("simulated read error")
        return real_load(f, *a, **k)

    def load_state(self, *a, **k):
        # the toy draws nothing from the global RNGs (a real run does: model init, dropout), so the
        # fresh process would already hold the checkpoint's states: draw once to make them differ
        torch.rand(1), random.random()
        return real_load_state(self, *a, **k)

    monkeypatch.setattr(accelerate.checkpointing, "load", load)
    monkeypatch.setattr(accelerate.Accelerator, "load_state", load_state)
    with pytest.raises(CheckpointError, match=rf"(?s)did not restore the RNG states of {re.escape(str(ck))}/"
                                              r"random_states_0\.pkl.*--resume .*step_00000002 train\.rewind=true"):
        run_toy(tmp_path / "run", max_steps=6, checkpoint_every=2, resume="latest")


def test_intact_random_states_the_loader_refuses_are_a_warning(tmp_path, monkeypatch, capsys):
    """An intact RNG-state file that Accelerate's loader refuses here (numpy 1.x pickles under numpy 2
    and the weights-only allow-list) is not a damaged file: the resume goes on without them, says
    so, and does not then demand that they were restored."""
    import accelerate.utils

    from test_training import run_toy

    real = accelerate.utils.load

    def load(f, *a, **k):
        if Path(f).name.startswith("random_states"):
            import pickle

            raise pickle.UnpicklingError("Weights only load failed (simulated numpy.core global)")
        return real(f, *a, **k)

    ck = _two_checkpoints(tmp_path)
    monkeypatch.setattr(accelerate.utils, "load", load)
    run_toy(tmp_path / "run", max_steps=6, checkpoint_every=2, resume="latest")
    out = capsys.readouterr()
    assert f"{ck / 'random_states_0.pkl'} is intact but cannot be loaded here" in out.out + out.err


def test_only_a_timed_out_wait_is_blamed_on_another_rank():
    """``make_accelerator`` turns a process-group error into ``PeerRankError`` ("another rank did not
    get there") only for a wait that timed out; an NCCL / network error keeps its own type."""
    import torch.distributed as dist

    from interpdiff.training import _is_timeout

    assert _is_timeout(dist.DistStoreError("wait timeout after 600000ms, keys: /default_pg/0//cuda//0/1"))
    assert not _is_timeout(dist.DistBackendError("NCCL error in: ProcessGroupNCCL.cpp, unhandled system error"))
    assert not _is_timeout(dist.DistNetworkError("The client socket has failed to connect to [node0]:29500"))


@pytest.mark.parametrize("name,how", [("optimizer.bin", "truncated"), ("scheduler.bin", "zeroed"),
                                      ("custom_checkpoint_1.pkl", "truncated"), ("trainable/adapter.pt", "truncated"),
                                      ("train_state.json", "truncated"), ("data_state_rank0.json", "truncated")])
def test_a_damaged_file_is_named_before_anything_is_loaded(tmp_path, name, how):
    """Every file the rank reads is checked before ``load_state``: the error names it (the loaders'
    own errors named only the folder, or nothing for the JSON files the load itself does not read);
    the train state, EMA and weights in memory are not touched."""
    import accelerate

    from test_training import run_toy

    from interpdiff.io import CheckpointError

    ck = _two_checkpoints(tmp_path)
    _damage(ck / name, how)
    calls = []
    real = accelerate.Accelerator.load_state
    mp = pytest.MonkeyPatch()
    mp.setattr(accelerate.Accelerator, "load_state", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    try:
        # the data position keeps its own message ("unreadable data position"), now with the hint
        what = "unreadable data position" if name.startswith("data_state") else ""
        with pytest.raises(CheckpointError, match=rf"(?s){re.escape(str(ck / name))}:? {what}.*(expected|damaged)"
                                                  r".*--resume .*step_00000002 train\.rewind=true"):
            run_toy(tmp_path / "run", max_steps=6, checkpoint_every=2, resume="latest")
    finally:
        mp.undo()
    assert calls == []  # refused before Accelerate loaded anything


def test_damaged_train_state_with_a_changed_max_steps_is_named(tmp_path):
    """A resume that changes ``train.max_steps`` first prints the LR-schedule note, which reads the
    step from ``train_state.json``: a damaged one must still end in the load's error naming it
    (it was a raw JSONDecodeError)."""
    from test_training import run_toy

    from interpdiff.io import CheckpointError

    ck = _two_checkpoints(tmp_path)
    _damage(ck / "train_state.json", "truncated")
    with pytest.raises(CheckpointError, match=re.escape(str(ck / "train_state.json"))):
        run_toy(tmp_path / "run", max_steps=8, checkpoint_every=2, resume="latest")


def test_file_problem_checks_torch_safetensors_and_json_files(tmp_path):
    import torch
    from safetensors.torch import save_file

    from interpdiff.io import file_kind, file_problem

    t = tmp_path / "a.pt"
    torch.save({"w": torch.arange(1000.0)}, t)
    st = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(3, 4), "b": torch.zeros(5)}, str(st))
    j = tmp_path / "m.json"
    j.write_text(json.dumps({"step": 4}))
    assert [file_kind(p) for p in (t, st, j, tmp_path / "x.bin", tmp_path / "x.pkl", tmp_path / "x.txt")] == \
        ["torch", "safetensors", "json", "torch", "torch", None]
    assert [file_problem(t, "torch"), file_problem(st, "safetensors"), file_problem(j, "json")] == [None] * 3
    assert file_problem(tmp_path / "none.pt", "torch") == "is missing; expected a torch.save file"

    good = {p: p.read_bytes() for p in (t, st, j)}
    for cut in (0, 7, len(good[t]) // 2, len(good[t]) - 1):
        t.write_bytes(good[t][:cut])
        assert "is not a complete zip archive" in file_problem(t, "torch"), cut
    t.write_bytes(b"\0" * len(good[t]))
    assert "is not a complete zip archive" in file_problem(t, "torch")
    import zipfile

    with zipfile.ZipFile(t, "w") as z:  # a zip file, but not one torch.save wrote
        z.writestr("x.txt", "hello")
    assert "without a data.pkl record" in file_problem(t, "torch")

    for cut, what in ((5, "shorter than the 8-byte header length"), (20, "its header claims"),
                      (len(good[st]) - 4, "bytes of tensor data where its header describes")):
        st.write_bytes(good[st][:cut])
        assert what in file_problem(st, "safetensors"), (cut, file_problem(st, "safetensors"))
    st.write_bytes(good[st] + b"\0" * 8)  # safetensors refuses trailing bytes too
    assert "bytes of tensor data where its header describes" in file_problem(st, "safetensors")
    n = int.from_bytes(good[st][:8], "little")
    st.write_bytes(good[st][:8] + b"{" * n + good[st][8 + n:])
    assert "has an unreadable header" in file_problem(st, "safetensors")

    j.write_text('{"step": ')
    assert "is not valid JSON" in file_problem(j, "json")
    # a legacy (pre-zip) torch.save file loads with torch.load: not called damaged
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3)}, legacy, _use_new_zipfile_serialization=False)
    assert file_problem(legacy, "torch") is None
    # a header length of gigabytes is refused without reading (or allocating) it
    st.write_bytes((3 << 30).to_bytes(8, "little") + b"{}")
    assert "at most 100 MB expected" in file_problem(st, "safetensors")
    with pytest.raises(ValueError, match="kind='yaml'"):
        file_problem(j, "yaml")


@pytest.fixture(scope="module")
def zero2_checkpoint(tmp_path_factory):
    """A 2-process DeepSpeed ZeRO-2 run (CPU, gloo: ``DS_ACCELERATOR=cpu``) of ``test_distributed``'s
    toy, stopped after its step-2 checkpoint."""
    from test_distributed import ACCELERATE, ARGS, REPO, SCRIPT, _env, _free_port, _run

    d = tmp_path_factory.mktemp("zero2")
    script = d / "toy_train.py"
    script.write_text(SCRIPT.format(tests=str(REPO / "tests")))
    env = _env()
    env["DS_ACCELERATOR"] = "cpu"
    base = [*ACCELERATE, "--config_file", str(REPO / "accelerate_configs" / "cpu_zero2_2proc.yaml")]
    args = [str(script), "batch_size=1", "grad_accum=2", "checkpoint_every=2", *ARGS]

    def launch(run, *extra, check=True, config=None):
        head = [*ACCELERATE, "--config_file", str(config)] if config else base
        cmd = [*head, "--main_process_port", str(_free_port()), *args, f"run_dir={run}", *extra]
        if check:
            return _run(cmd, env)
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)

    launch(d / "run", "stop_at_step=2")
    ck = d / "run" / "checkpoints" / "step_00000002"
    assert (ck / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").is_file()
    return ck, launch


@pytest.mark.slow
def test_deepspeed_resume_on_another_world_size_says_so(zero2_checkpoint, tmp_path):
    """A ZeRO checkpoint of 2 processes resumed by 1: the error says the process count changed
    (DeepSpeed needs the same count), not that a shard is damaged."""
    from test_distributed import ACCELERATE, REPO

    ck, launch = zero2_checkpoint
    run = tmp_path / "run"
    shutil.copytree(ck.parent.parent, run, ignore=shutil.ignore_patterns("final_rank*.pt"))
    cfg = (REPO / "accelerate_configs" / "cpu_zero2_2proc.yaml").read_text()
    one = tmp_path / "cpu_zero2_1proc.yaml"
    one.write_text(re.sub(r"(?m)^num_processes: *2", "num_processes: 1", cfg))
    assert "num_processes: 1" in one.read_text()
    out = launch(run, "resume=latest", check=False, config=one)
    assert out.returncode != 0
    assert re.search(r"it was written by 2 processes, this run has 1; DeepSpeed's ZeRO checkpoints resume on the "
                     r"same number of processes", out.stderr + out.stdout), (out.stderr + out.stdout)[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("name,how,rank", [
    ("pytorch_model/zero_pp_rank_1_mp_rank_00_optim_states.pt", "truncated", 1),  # read by rank 1 only
    ("pytorch_model/mp_rank_00_model_states.pt", "zeroed", None),  # ZeRO-2: read by every rank
])  # fmt: skip
def test_damaged_deepspeed_file_is_named_on_resume(zero2_checkpoint, tmp_path, name, how, rank):
    """A damaged file of the engine's folder: the resume fails and the error names that file (it
    named only the checkpoint folder); a ZeRO shard is checked by the rank that reads it."""
    ck, launch = zero2_checkpoint
    run = tmp_path / "run"
    shutil.copytree(ck.parent.parent, run, ignore=shutil.ignore_patterns("final_rank*.pt"))
    bad = run / "checkpoints" / ck.name / name
    _damage(bad, how)
    out = launch(run, "resume=latest", check=False)
    assert out.returncode != 0, out.stderr[-4000:]
    ranks = [rank] if rank is not None else [0, 1]
    for r in ranks:
        assert re.search(rf"\[rank{r}\]: interpdiff.io.CheckpointError: cannot load checkpoint \S+: "
                         rf"{re.escape(str(bad))} is not a complete zip archive .*expected a complete torch\.save "
                         r"file.*damaged; no older checkpoint is in that folder", out.stderr), out.stderr[-6000:]
