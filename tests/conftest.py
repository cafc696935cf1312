import contextlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """A top-level entry script (``train_phase2``, ``sample``, ...) as a module, without running it."""
    spec = importlib.util.spec_from_file_location(name, REPO / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

@contextlib.contextmanager
def interpret_mode(flag: bool):
    """``TRITON_INTERPRET`` (and triton's knob, if pinned) set to ``flag`` inside; restored after.
    ``@triton.jit`` reads it when a kernel module is imported, so import kernel modules inside."""
    import triton

    knobs = getattr(getattr(triton, "knobs", None), "runtime", None)
    pinned = knobs.__dict__.pop("interpret", None) if knobs is not None else None
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if flag else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
        if pinned is not None:
            knobs.__dict__["interpret"] = pinned


torch.set_num_threads(int(os.environ.get("INTERPDIFF_TEST_THREADS", "1")))  # tiny ops: 1 thread is fastest, and 2 threads on a busy 2-core machine slow some tests 10x


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def no_model(monkeypatch):
    """Bad-input tests: loading the Wan transformer or the text encoder fails the test (the error must
    come first)."""
    from interpdiff.video import wan

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the bad input was detected")

    monkeypatch.setattr(wan, "load_transformer", boom)
    monkeypatch.setattr(wan, "load_text_encoder", boom)
