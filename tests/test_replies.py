"""The deployed grid's waits: one silo's stalled upload does not hold up another silo's reply.

A fake SuperLink (a `Grid`) behaves as Flower 1.42's does where it matters here: it hands out
a reply's header once, to the first pull that asks for it, and a pull fetches the content of
the replies it handed out one after another, retrying content that is not uploaded until
`pull_objects`' max_time, then giving Flower's "objects are unavailable" error reply.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator

import pytest
from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedlm.federation.replies import INCOMPLETE, deployed


class FakeSuperLink(Grid):
    """Replies from node n arrive `at[n]` seconds after the push; a node in `stalled` sends its
    header then, and its content never."""

    def __init__(self, at: dict[int, float], stalled: set[int]) -> None:
        self.at, self.stalled = at, stalled
        self.sent: dict[str, Message] = {}
        self.handed_out: set[str] = set()
        self.lock = threading.Lock()
        self.pushed = 0.0

    def get_node_ids(self) -> Iterable[int]:
        return list(self.at)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.pushed = time.monotonic()
        ids = []
        for msg in messages:
            mid = f"m{msg.metadata.dst_node_id}"
            msg.metadata.__dict__["_message_id"] = mid
            self.sent[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        now = time.monotonic() - self.pushed
        with self.lock:  # headers: each handed out once
            ready = [m for m in sorted(message_ids)
                     if m not in self.handed_out and now >= self.at[self.sent[m].metadata.dst_node_id]]
            self.handed_out.update(ready)
        max_time = inflatable_utils.pull_objects.__kwdefaults__["max_time"]  # type: ignore[index]
        out = []
        for mid in ready:  # content, one reply after another
            msg = self.sent[mid]
            if msg.metadata.dst_node_id in self.stalled:
                time.sleep(max_time)
                out.append(self._unavailable(msg))
            else:
                out.append(Message(RecordDict({"m": ConfigRecord({"silo": msg.metadata.dst_node_id})}), reply_to=msg))
        return out

    @staticmethod
    def _unavailable(msg: Message) -> Message:
        reply = Message(Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason="Reply message objects are unavailable."),
                        reply_to=msg)
        reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
        return reply

    # the rest of Flower's Grid, unused here
    def set_run(self, run: Run) -> None:
        raise NotImplementedError

    @property
    def run(self) -> Run:
        raise NotImplementedError

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        raise NotImplementedError


@pytest.fixture(autouse=True)
def _server_side() -> Iterator[None]:
    """Messages are built as the ServerApp builds them; Flower's pull defaults are put back after."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 0
    kw = inflatable_utils.pull_objects.__kwdefaults__
    assert kw is not None
    saved = dict(kw)
    yield
    kw.update(saved)


def _exchange(link: FakeSuperLink, timeout: float) -> tuple[dict[int, str], float]:
    grid = deployed(link)
    start = time.monotonic()
    replies = grid.send_and_receive([Message(RecordDict(), n, "evaluate") for n in link.at], timeout=timeout)
    took = time.monotonic() - start
    return {r.metadata.src_node_id: (str(r.error.reason) if r.has_error() else "ok") for r in replies}, took


def test_a_stalled_upload_does_not_hold_up_a_later_healthy_reply() -> None:
    # node 3's header comes first and its content never; node 1 answers a little later
    got, took = _exchange(FakeSuperLink({1: 0.3, 3: 0.0}, stalled={3}), timeout=1.5)
    assert got == {1: "ok", 3: INCOMPLETE}
    assert took < 1.5 + 1.0


def test_every_reply_that_came_is_kept_and_the_exchange_ends_when_the_last_comes() -> None:
    got, took = _exchange(FakeSuperLink({1: 0.0, 2: 0.2, 3: 0.4}, stalled=set()), timeout=30.0)
    assert got == {1: "ok", 2: "ok", 3: "ok"}
    assert took < 5.0
