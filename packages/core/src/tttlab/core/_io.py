"""Atomic writes: a temporary file in the destination's directory, fsync, then ``os.replace``.

A reader (or a run killed mid-write) sees either the old file or the complete new one, never a part.
The temporary file lives next to the destination so that the rename never crosses a file system; it is
removed when the write fails.  The new file gets the usual ``0o666 & ~umask`` permissions (``mkstemp``
would leave it ``0o600``), and the directory is fsync'ed after the rename where the OS allows it.

A process killed during the write (SIGKILL, the OOM killer, a power cut) cannot remove its temporary file.
Its name, ``.<name>.tttlab-<host>-<pid>-<random>.tmp``, says which host and process wrote it, so
:func:`remove_stale_temps` (called when a run directory or a cache folder is opened) deletes the ones whose
writer is gone: same host (hash of the host name), no such process, and untouched for ``min_age_s``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_log = logging.getLogger(__name__)
_TEMP_RE = re.compile(r"^\..+\.tttlab-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[^/]*\.tmp$")


def _host_tag() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):  # another user's process, or not checkable: keep
        return True
    return True


def remove_stale_temps(folder, min_age_s: float = 60.0) -> list[Path]:
    """Delete the temporary files in ``folder`` (not below it) left by killed atomic writes of this host.

    A file is removed only when its name carries this host's tag, the process that created it no longer
    exists, and it has not been modified for ``min_age_s`` seconds (so a writer in another PID namespace
    that shares the host name is not cut off mid-write).  Other files, and temporary files of other hosts
    on a shared file system, are left alone.  Returns the removed paths; a missing folder is no error.
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return removed
    host, now = _host_tag(), time.time()
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None or m["host"] != host or _pid_alive(int(m["pid"])):
            continue
        try:
            if not entry.is_file(follow_symlinks=False) or now - entry.stat().st_mtime < min_age_s:
                continue
            os.unlink(entry.path)
        except OSError:  # removed by someone else meanwhile, or not ours to remove
            continue
        removed.append(Path(entry.path))
        _log.info("removed %s, left by a killed write (process %s)", entry.path, m["pid"])
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse directory fsync
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path``, on error it is removed.

    Write the content to the yielded path (with any library: ``np.save``, ``torch.save``, ``savefig``...).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.tttlab-{_host_tag()}-{os.getpid()}-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; return ``path``."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write_bytes takes bytes, got {type(data).__name__}")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; return ``path``."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON (sorted keys; numpy scalars/arrays and paths converted) atomically.

    Non-finite floats (e.g. the ``inf`` inner losses of attention baselines) are written as JSON's common
    extension ``NaN`` / ``Infinity``, which Python's ``json`` reads back.
    """
    return atomic_write_text(path, dumps(obj, indent=indent) + "\n")


def dumps(obj: Any, indent: int | None = None) -> str:
    """``json.dumps`` that also takes numpy scalars/arrays, paths, sets and dataclasses."""
    return json.dumps(obj, indent=indent, sort_keys=True, default=_json_default)


def atomic_save_npy(path, array) -> Path:
    """``numpy.save`` to ``path`` atomically (no ``.npy`` is appended)."""
    import numpy as np

    with atomic_path(path, suffix=".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, np.asarray(array), allow_pickle=False)
    return Path(path)


def _json_default(obj):
    import dataclasses

    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=str)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


__all__ = [
    "atomic_path",
    "atomic_save_npy",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "dumps",
]


#: files whose content changes computed numbers (code and its configs); others (README, data) do not
FINGERPRINT_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".toml")


def source_fingerprint(top: str) -> str:
    """Hash of the names and bytes of the code/config files of the installed package (or module) ``top``.

    Found with :func:`importlib.util.find_spec`, which locates the files without executing them (the core
    imports no subpackage and no framework).  ``""`` when ``top`` cannot be found.  Used as a cache key
    part wherever a cached result must not outlive the code that computed it (compare's run parts and
    trained models, the benchmark's generated domains).
    """
    import hashlib
    import importlib.util

    try:
        ms = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return ""
    if ms is None:
        return ""
    h = hashlib.sha256()
    locations = list(ms.submodule_search_locations or [])
    if locations:
        for loc in sorted(locations):
            root = Path(loc)
            for f in sorted(root.rglob("*")):
                if f.suffix in FINGERPRINT_SUFFIXES and f.is_file() and "__pycache__" not in f.parts:
                    h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    elif ms.origin and Path(ms.origin).is_file():
        h.update(Path(ms.origin).read_bytes())
    else:
        return ""
    return h.hexdigest()[:16]


#: The only globals a dataset pickle may name: numpy arrays and scalars (under numpy 1's and numpy 2's module
#: paths), dtypes, and ``_codecs.encode`` (how protocol 2 stores ``bytes``).  CIFAR-10's python batches and
#: MNIST's ``mnist.pkl.gz`` need nothing else.
SAFE_PICKLE_GLOBALS = frozenset(
    {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
)


def load_data_pickle(f, encoding: str = "ASCII"):
    """``pickle.load`` of a data file that may only hold containers, numbers, strings, bytes and numpy arrays:
    any other global (a class or function that unpickling would call) raises ``pickle.UnpicklingError``
    before anything runs, so a dataset file cannot execute code."""
    import pickle

    class _DataUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) in SAFE_PICKLE_GLOBALS:
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"refused global {module}.{name}: a data file holds arrays only")

    return _DataUnpickler(f, encoding=encoding).load()
