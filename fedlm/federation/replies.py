"""Waiting for replies on the deployment engine without Flower's 3 s steps.

    run_rounds(quick_replies(grid), cfg, run_dir)      # in the ServerApp

Flower 1.42's `Grid.send_and_receive` on the deployment engine pulls the replies, then sleeps
3 s (hard-coded) before it pulls again, so every exchange of a round ends up to 3 s after its
last reply arrived. `quick_replies` gives the grid a `send_and_receive` that pulls every
`POLL_SECONDS` instead, through the grid's own `push_messages` / `pull_messages`; a pull is one
HTTP request to the SuperLink on the same machine.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

POLL_SECONDS = 0.1


def quick_replies(grid: Grid, *, poll: float = POLL_SECONDS) -> Grid:
    """`grid`, its `send_and_receive` polling every `poll` seconds (the same replies, sooner)."""

    def send_and_receive(messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        wanted = set(grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        got: list[Message] = []
        while wanted:
            replies = list(grid.pull_messages(wanted))
            got += replies
            wanted -= {m.metadata.reply_to_message_id for m in replies}
            if not wanted or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(poll)
        return got

    grid.send_and_receive = send_and_receive  # type: ignore[method-assign]
    return grid
