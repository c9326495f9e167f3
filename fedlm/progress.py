"""Progress bars for long work: rate and ETA on a terminal, quiet elsewhere."""

from __future__ import annotations

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

console = Console(stderr=True)


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
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as p:
        task = p.add_task(description, total=None, rate="", info="")

        def update(done: int, total: int, info: str = "") -> None:
            speed = p.tasks[0].speed
            rate_text = f"{speed:,.1f} {unit}/s" if speed else ""
            p.update(task, completed=done, total=total, rate=rate_text, info=info)

        yield update
