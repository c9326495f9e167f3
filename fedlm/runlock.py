"""One live run per run folder: an exclusive lock on RUN/.lock, held by the process that writes the run.

    with hold(run_dir, engine="flower", flower_run=12):   # the server process, for the run's life
        ...
    refuse_if_live(run_dir)                               # before starting or resuming a run

The lock is `flock` on RUN/.lock: the kernel drops it when its holder dies in any way (SIGKILL
included), so a lock never outlives its run and no stale-lock clean-up is needed. The file
holds who has it (pid, host, engine, the Flower run id and SuperLink), so the refusal can
name the live run. On a deployed run the holder is the ServerApp process on the SuperLink's
machine; `fedlm train` records the SuperLink and run id in RUN/flower-run.json when it submits.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fedlm.errors import UserError

LOCK = ".lock"
FLOWER_RUN = "flower-run.json"  # {"run_id", "superlink"}: the Flower run that `fedlm train` submitted


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def live_run(run_dir: Path) -> dict[str, Any] | None:
    """Who holds RUN/.lock (what it wrote there), or None when no live process does."""
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if _try_lock(fd):
            return None
        try:
            info = json.loads(path.read_text(encoding="utf-8") or "{}")
        except (OSError, json.JSONDecodeError):
            info = {}
        with contextlib.suppress(OSError, json.JSONDecodeError):
            info.update(json.loads((Path(run_dir) / FLOWER_RUN).read_text(encoding="utf-8")))
        return dict(info)
    finally:
        os.close(fd)  # closing drops a lock this probe took


def describe(run_dir: Path, info: dict[str, Any]) -> str:
    """One line naming the live run in `run_dir` and what to do."""
    who = f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
    if info.get("run_id") is not None:
        link = info.get("superlink", "its SuperLink")
        return (f"{run_dir} is being written by live Flower run {info['run_id']} on SuperLink {link} ({who}); "
                f"wait for it to end, or stop it with `flwr stop {info['run_id']}`, then --resume")
    return f"{run_dir} is being written by a live run ({who}); wait for it to end or stop it, then --resume"


def refuse_if_live(run_dir: Path) -> None:
    """UserError naming the live run when another process holds `run_dir`'s lock."""
    info = live_run(run_dir)
    if info is not None:
        raise UserError(describe(run_dir, info))


def exit_with_parent(poll: float = 0.5) -> None:
    """End this process when the one that started it is gone (a daemon thread watches).

    The ServerApp holds the lock; when its SuperLink dies (killed with the `fedlm train` that
    started it) Flower's own exit path retries the dead SuperLink for minutes while the lock is
    held. The run cannot go on without its SuperLink, and a cut checkpoint swap is repaired
    on resume, so the process exits at once and the kernel drops the lock."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os._exit(3)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


@contextlib.contextmanager
def hold(run_dir: Path, **info: Any) -> Iterator[None]:
    """Hold `run_dir`'s lock while the block runs (UserError naming the holder if it is taken)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if not _try_lock(fd):
            refuse_if_live(run_dir)
            raise UserError(f"{run_dir}: another process holds {run_dir / LOCK}")  # it ended meanwhile
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), **info}).encode())
        os.fsync(fd)
        yield
    finally:
        os.close(fd)
