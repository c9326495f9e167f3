"""Progress for long work: a bar with rate and ETA on a terminal; elsewhere (a log file, a pipe,
CI) a plain line every LINE_EVERY seconds, once the work has run that long, so a long job
written to a log says how far it is and short ones stay quiet."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

LOG_WIDTH = 160
"""Columns of output written to a log file or pipe (Rich's default there is 80, which wrapped every
long line and folded the tables' cells and headers); a terminal's own width, or COLUMNS, rules elsewhere."""
console = Console(stderr=True, width=None if sys.stderr.isatty() or "COLUMNS" in os.environ else LOG_WIDTH)
LINE_EVERY = 30.0
"""Seconds between progress lines when stderr is not a terminal (and before the first)."""


@contextmanager
def progress_bar(description: str, *, unit: str = "items") -> Iterator[Callable[..., None]]:
    """Yield `update(done, total, **fields)`; shows a bar with rate and ETA (bytes get a MB/s rate)."""
    rate = (
        TransferSpeedColumn()
        if unit == "bytes"
        else TextColumn("{task.fields[rate]}", style="progress.data.speed")
    )
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn() if unit != "bytes" else TextColumn(""),
        rate,
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    if not console.is_terminal:
        with _progress_lines(description, unit) as update:
            yield update
        return
    with Progress(*columns, console=console, transient=False) as p:
        task = p.add_task(description, total=None, rate="", info="")

        def update(done: int, total: int, info: str = "") -> None:
            speed = p.tasks[0].speed
            rate_text = f"{speed:,.1f} {unit}/s" if speed else ""
            p.update(task, completed=done, total=total, rate=rate_text, info=info)

        yield update


class _Lines:
    """Plain progress lines off a terminal: at most one every LINE_EVERY seconds, the first once the
    work has run that long."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def due(self) -> bool:
        """Whether a line is due now (and, if so, that one is being printed)."""
        now = time.monotonic()
        if now - self.last < LINE_EVERY:
            return False
        self.last = now
        return True

    def printed(self) -> bool:
        return self.last > self.start

    @staticmethod
    def print(text: str) -> None:
        console.print(text, highlight=False, soft_wrap=True)


@contextmanager
def _progress_lines(description: str, unit: str) -> Iterator[Callable[..., None]]:
    """`progress_bar` off a terminal: "DESCRIPTION: done/total unit (pct), elapsed, ETA" lines."""
    lines = _Lines()
    latest: tuple[int, int, str] | None = None

    def line(done: int, total: int, info: str) -> str:
        elapsed = lines.elapsed()
        of = f"/{total:,}" if total else ""
        pct = f" ({done / total:.0%})" if total else ""
        eta = f", ETA {elapsed * (total - done) / done:,.0f} s" if total and 0 < done < total else ""
        more = f" {info}" if info else ""
        return f"{description}: {done:,}{of} {unit}{pct}{more}, {elapsed:,.0f} s{eta}"

    def update(done: int, total: int, info: str = "") -> None:
        nonlocal latest
        latest = (done, total, info)
        if lines.due():
            lines.print(line(*latest))

    yield update
    if latest is not None and lines.printed():  # it printed along the way: say where it ended
        lines.print(line(*latest))


@contextmanager
def status(description: str) -> Iterator[Callable[[str], None]]:
    """Yield `say(message)` for long work without a count: a spinner with the latest message on a
    terminal; elsewhere "DESCRIPTION: message, elapsed" at most every LINE_EVERY seconds."""
    if console.is_terminal:
        with console.status(description) as spinner:
            yield lambda message: spinner.update(f"{description}: {message}")
        return
    lines = _Lines()

    def say(message: str) -> None:
        if lines.due():
            lines.print(f"{description}: {message}, {lines.elapsed():,.0f} s")

    yield say
