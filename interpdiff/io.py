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
import json
import os
import subprocess
import tempfile
import threading
import zipfile
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


# --- cheap structural checks of checkpoint files (before a loader reads them) ------------------

FILE_KINDS = ("torch", "safetensors", "json")
_KIND_BY_SUFFIX = {".pt": "torch", ".pth": "torch", ".bin": "torch", ".pkl": "torch", ".safetensors": "safetensors",
                   ".json": "json"}


def file_kind(path: str | os.PathLike) -> str | None:
    """The check ``file_problem`` applies to a file by its suffix (``None``: not one it knows)."""
    return _KIND_BY_SUFFIX.get(Path(path).suffix.lower())


def file_problem(path: str | os.PathLike, kind: str) -> str | None:
    """What is wrong with checkpoint file ``path`` of ``kind`` (``torch``, ``safetensors``,
    ``json``), as a phrase that follows the file's name and says what was expected; ``None`` when it
    looks intact. Cheap: reads the zip central directory of a ``torch.save`` file, the header of a
    safetensors file, the whole of a JSON file (small), never the tensor data.

    ``torch.save`` writes a zip archive (``archive/data.pkl`` + one record per storage) whose central
    directory sits at the end of the file: a truncated, zero-filled or overwritten file loses it, so
    checking it (and that every record lies before it) finds such damage without reading the data,
    which can be gigabytes of optimizer state that the loader reads right after anyway. A bit flip
    inside the data is not found (torch does not check CRCs either)."""
    p = Path(path)
    if kind not in FILE_KINDS:
        raise ValueError(f"file_problem: kind={kind!r} is not one of {FILE_KINDS}")
    if not p.is_file():
        what = {"torch": "a torch.save file", "safetensors": "a safetensors file", "json": "a JSON file"}[kind]
        return f"is {'missing' if not p.exists() else 'not a regular file'}; expected {what}"
    try:
        size = p.stat().st_size
        if kind == "json":
            try:
                json.loads(p.read_text(encoding="utf-8"))
            except ValueError as e:
                return f"is not valid JSON ({e}); expected the JSON document the checkpoint save wrote"
            return None
        if kind == "safetensors":
            return _safetensors_problem(p, size)
        return _torch_zip_problem(p, size)
    except OSError as e:
        return f"cannot be read ({type(e).__name__}: {e})"


def _torch_zip_problem(p: Path, size: int) -> str | None:
    expected = "expected a complete torch.save file (a zip archive)"
    with open(p, "rb") as f:
        if f.read(1) == b"\x80" and not zipfile.is_zipfile(p):  # a legacy (pre-zip) torch.save pickle: no
            return None  # directory to check (DeepSpeed's checkpoint_serialization=false writes these)
    try:
        with zipfile.ZipFile(p) as z:
            infos = z.infolist()
            start_dir = getattr(z, "start_dir", size)
    except (zipfile.BadZipFile, ValueError, EOFError) as e:
        return f"is not a complete zip archive ({size} bytes; {e}): truncated or overwritten; {expected}"
    if not any(i.filename == "data.pkl" or i.filename.endswith("/data.pkl") for i in infos):
        return f"is a zip archive without a data.pkl record; {expected}"
    end = max(i.header_offset + i.compress_size for i in infos)
    if end > start_dir:
        return (f"has zip records that run past its central directory (to byte {end}, directory at {start_dir}): "
                f"damaged; {expected}")
    return None


def _safetensors_problem(p: Path, size: int) -> str | None:
    expected = "expected a complete safetensors file (8-byte header length, JSON header, tensor data)"
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"is truncated ({size} bytes, shorter than the 8-byte header length); {expected}"
        n = int.from_bytes(head, "little")
        if n > 100_000_000:  # as the safetensors library: a header is JSON, never this large
            return f"has a header length of {n} bytes (at most 100 MB expected): damaged; {expected}"
        if n > size - 8:
            return f"is truncated or damaged (its header claims {n} bytes, the file has {size}); {expected}"
        try:
            header = json.loads(f.read(n).decode("utf-8"))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            return f"has an unreadable header ({type(e).__name__}: {e}); {expected}"
    data = size - 8 - n
    if max(ends, default=0) != data:
        return (f"holds {data} bytes of tensor data where its header describes {max(ends, default=0)}: "
                f"truncated or damaged; {expected}")
    return None
