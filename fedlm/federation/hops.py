"""Timestamps of a deployed message's hops: where a deployed round's seconds go (the federation bench reads them).

    FEDLM_HOP_TRACE=/tmp/hops.jsonl fedlm train fed.toml --set federation.engine=flower
    mark("server", "push", group="3", phase="start")

Off unless FEDLM_HOP_TRACE names a file; then every fedlm process of a deployed run on this
machine (the ServerApp, each SuperNode, its launcher and the launcher's children) appends
one JSON line per event: wall-clock time `t` (the processes differ; on one machine their
clocks agree), this process's CPU seconds `cpu`, `pid`, `who`, `event` and the fields given.
A message's path, with who marks it:

    server push (start, end) -> SuperNode "receiving" -> SuperNode "received" (content pulled)
    -> launcher "fork" -> client "start" ... client "end" -> SuperNode "sending" (reply stored)
    -> SuperNode "sent" (reply uploaded) -> server "reply" (reply pulled, content included)

The SuperNode's events come from Flower's own log records (it logs each of those steps);
`watch_supernode` turns them into lines. Each line is one `write` to a file opened for
appending, so lines from several processes do not interleave.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

ENV = "FEDLM_HOP_TRACE"


def tracing() -> bool:
    return bool(os.environ.get(ENV))


def mark(who: str, event: str, **fields: Any) -> None:
    """Append one event line to the trace file (nothing when tracing is off)."""
    path = os.environ.get(ENV)
    if not path:
        return
    line = {"t": time.time(), "cpu": time.process_time(), "pid": os.getpid(), "who": who, "event": event, **fields}
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


class _SuperNodeSteps(logging.Handler):
    """Flower's SuperNode log records -> hop events (its messages in flwr 1.42's start_client_internal)."""

    STEPS = {"Receiving: %s message (ID: %s)": "receiving", "Received successfully": "received",
             "Sending: %s message (ID: %s)": "sending", "Sent successfully": "sent"}

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.group = ""
        self.node = 0

    def emit(self, record: logging.LogRecord) -> None:
        fmt, args = str(record.msg), record.args if isinstance(record.args, tuple) else ()
        if fmt == "SuperNode ID: %s" and args:
            self.node = int(str(args[0]))
        elif fmt.startswith("[RUN %s"):
            self.group = str(args[1]) if len(args) == 2 else ""
        elif fmt in self.STEPS:
            mark("supernode", self.STEPS[fmt], node=self.node, group=self.group,
                 type=str(args[0]) if args else "")


def watch_supernode() -> None:
    """In a SuperNode's process: mark its steps while tracing is on."""
    if tracing():
        from flwr.common.logger import FLOWER_LOGGER

        FLOWER_LOGGER.addHandler(_SuperNodeSteps())
