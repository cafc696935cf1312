"""Atomic writes and checkpoint files that rebuild their model from metadata alone.

Every file is written to a temporary name in the target folder, flushed, fsynced and renamed,
so a crash never leaves a half-written file under the final name and never clobbers the
previous version before the new one is complete. The file gets the mode an ordinary ``open``
would give it (``0o666 & ~umask``), not ``mkstemp``'s private ``0o600``, so shards, caches and
checkpoints are readable by whoever the umask allows.

A checkpoint file (``save_checkpoint``) is a ``torch.save`` dict::

    {"format": "interpdiff-ckpt", "version": 1, "meta": {...}, "state": {...}}

``meta`` carries what is needed to rebuild the model (sizes, config, step, code version);
``load_checkpoint`` checks the format and the required metadata keys and names the path and
what is missing on failure.
"""

from __future__ import annotations

import io
import os
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterable

import torch

CKPT_FORMAT = "interpdiff-ckpt"
CKPT_VERSION = 1


class CheckpointError(FileNotFoundError):
    """A checkpoint path is missing, unreadable, or lacks what the caller needs."""


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``/proc/self/status``
    on Linux >= 4.7); elsewhere set-and-restore (``os.umask`` has no read-only form)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # set-and-restore: our own threads never see the temporary value
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temp file in the same folder + fsync + ``os.replace``;
    the file's mode is ``0o666 & ~umask`` (as ``open(path, "wb")`` would create it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (a rename into it, a new file) durable. Best effort: file systems
    that cannot fsync a directory (some network mounts, Windows) are skipped silently."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> int:
    """fsync every regular file under ``root``, then every folder (deepest first), so a folder
    written by libraries that do not fsync (``torch.save``, DeepSpeed, safetensors) is on disk
    before it is renamed into place. Returns the number of files synced."""
    n = 0
    for here, dirs, files in os.walk(root, topdown=False):
        for name in files:
            p = os.path.join(here, name)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            n += 1
        fsync_dir(here)
    return n


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def code_version() -> str:
    """``git describe`` of this checkout (``+dirty`` when modified), or ``unknown``."""
    try:
        here = Path(__file__).resolve().parent.parent
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty=+dirty"], cwd=here, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def save_checkpoint(path: str | os.PathLike, state: dict, meta: dict) -> Path:
    meta = dict(meta)
    meta.setdefault("code_version", code_version())
    return atomic_torch_save({"format": CKPT_FORMAT, "version": CKPT_VERSION, "meta": meta, "state": state}, path)


def load_checkpoint(path: str | os.PathLike, required_meta: Iterable[str] = (), map_location="cpu") -> dict:
    """Load a checkpoint written by ``save_checkpoint``; clear errors for bad paths/contents."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist (expected a file written by save_checkpoint)")
    if p.is_dir():
        raise CheckpointError(f"checkpoint {str(p)!r} is a folder; expected a checkpoint file (e.g. {str(p / 'model.pt')!r})")
    try:
        ck = torch.load(p, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {str(p)!r} could not be read: {type(e).__name__}: {e}") from None
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"checkpoint {str(p)!r} is not an interpdiff checkpoint (missing format={CKPT_FORMAT!r})")
    missing = [k for k in required_meta if k not in ck.get("meta", {})]
    if missing:
        raise CheckpointError(f"checkpoint {str(p)!r} lacks metadata keys {missing}")
    return ck
