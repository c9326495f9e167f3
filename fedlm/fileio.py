"""Atomic writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o644)  # mkstemp makes it owner-only; outputs are ordinary files
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def append_jsonl(path: str | Path, obj: Any) -> None:
    """Append one JSON line (a log: a torn last line is the only possible damage)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_jsonl(path: str | Path, *, key: str, upto: int) -> None:
    """Keep the log lines whose `key` is <= upto (a resume rewrites the rest); drop a torn last line."""
    path = Path(path)
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)[key] <= upto:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    write_text(path, "".join(line + "\n" for line in keep))


def fsync_dir(path: str | Path) -> None:
    """Make a directory's entries (a rename, a new file) durable, as fsync does a file's bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def _old_name(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.old-{pid}")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success it replaces `path` as a whole.

    The swap is two renames (path -> .NAME.old-PID, temp -> path); a kill between them leaves
    no `path` but a complete old copy, which `recover_dir` puts back. Everything is fsynced
    before the swap and the parent after it, so a power cut cannot leave a renamed but empty file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; outputs are ordinary directories
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if path.exists():
            old = _old_name(path, os.getpid())
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_dir(path: str | Path) -> bool:
    """Repair what a killed `atomic_dir` swap left beside `path`; True if `path` exists after.

    With `path` gone, its newest `.NAME.old-PID` (the complete previous version) is renamed
    back. Then the stray temporaries and old copies of earlier kills are removed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return False
    olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not path.exists() and olds:
        os.replace(olds.pop(), path)
        fsync_dir(path.parent)
    for stray in [*olds, *path.parent.glob(f".{path.name}.*.tmp")]:
        if stray.is_dir():
            shutil.rmtree(stray, ignore_errors=True)
        else:
            stray.unlink(missing_ok=True)
    return path.exists()


def recover_strays(folder: str | Path) -> None:
    """`recover_dir` for everything in `folder` that a killed atomic write left behind: the
    temporaries of `atomic_path` and `atomic_dir` and the old copies of a cut swap. Call it
    only while no other process writes there (a run holds its folder's lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        m = re.fullmatch(r"\.(.+?)\.(old-\d+|[^.]+\.tmp)", entry.name)
        if m:
            recover_dir(folder / m.group(1))
