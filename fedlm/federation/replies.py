"""The ServerApp's waits on the deployment engine: prompt, honest about dead silos, open to restarted ones.

    run_rounds(deployed(grid), cfg, run_dir)      # in the ServerApp

`deployed(grid)` gives Flower's grid a `send_and_receive` that

- sends each message's arrays packed into one Array and rebuilds the replies' (`packing`);
- pulls each message's reply on its own every `POLL_SECONDS`, backing off to `POLL_CAP_SECONDS`
  while none comes (on a long wait, to a share of the time waited): Flower 1.42's pulls, then
  sleeps 3 s (hard-coded), so each exchange ended up to 3 s after its last reply; and its pull of
  several replies fetches their content one after another, so one silo's stalled upload held the
  others' replies until the deadline;
- ends at the deadline whatever Flower's calls do: Flower hands out a reply as soon as its
  header arrives and then retries the missing content up to 500 times (minutes; past the
  exchange's timeout), and its HTTP calls retry a stalled SuperLink without end. Each push
  and pull here runs under the exchange's deadline: its content pull gives up at the
  deadline, and a call still blocked then is left behind (on a daemon thread) and the
  exchange ends without its replies;
- turns the SuperLink's node-unavailable reply (sent when a SuperNode misses its heartbeats;
  it comes from the SuperLink's own node id) and Flower's reply for content that did not
  arrive into error replies from the node that was asked, so the rounds loop drops that
  silo with the reason, not as a timeout;
- lets a silo whose SuperNode died rejoin: a restarted SuperNode registers under a new node
  id, and a message for a node that is no longer online goes to the new node that answers
  the run's connect query with the same silo name (its replies are given the old id back).

The connect query is the rounds loop's own: the first "query" messages it sends are kept and
re-sent to each node that appears later. A node serves the silo its reply names only where
that is the silo the coordinator registered its key for (`trust.registered_nodes`), as at
connect; on one machine, without a registry, the name it gives.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from flwr.app import Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid

from fedlm.federation import trust
from fedlm.federation.hops import mark
from fedlm.federation.packing import pack, unpack
from fedlm.federation.polls import PULL_GIVE_UP_SECONDS, Backoff

log = logging.getLogger("fedlm.federation")

POLL_SECONDS, POLL_CAP_SECONDS = 0.05, 0.25
"""Pull replies 50 ms after sending or after a reply came, backing off to 0.25 s while silos train."""
POLL_SHARE, POLL_CEILING_SECONDS = 0.05, 2.0
"""...and past 5 s of waiting, to 5% of the time waited (at most 2 s): each outstanding silo has its own
puller, so with many silos training for minutes the SuperLink is asked less often, and a reply is seen
at most 5% of its round's time late."""
PULL_GRACE_SECONDS = 2.0
"""A pull whose content retries end at the deadline returns within one retry after it: wait that long
for it, so a reply cut mid-upload is named as such rather than as no reply."""
UNAVAILABLE = "node unavailable: its SuperNode stopped sending heartbeats (stopped, killed or cut off)"
INCOMPLETE = "reply incomplete: its content did not arrive within the exchange's timeout (upload stalled or cut)"
T = TypeVar("T")


class DeployedGrid:
    """State kept beside a Flower grid: the connect query, each node's silo, node-id aliases."""

    def __init__(self, grid: Grid, *, poll: float = POLL_SECONDS) -> None:
        self.grid, self.poll = grid, poll
        self.query: RecordDict | None = None  # the connect query's content, re-sent to new nodes
        self.silo_of: dict[int, str] = {}  # node id -> silo, from query replies
        self.alias: dict[int, int] = {}  # the node id the rounds loop knows -> the node now serving it
        self.registry = trust.registered_nodes()  # across organisations: {node id: its registered silo}

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        msgs = list(messages)
        if self.query is None and msgs and msgs[0].metadata.message_type == "query":
            self.query = msgs[0].content
        deadline = None if timeout is None else time.monotonic() + timeout
        asked: dict[int, int] = {}  # the node a message goes to -> the id the caller used
        for msg in msgs:
            known = msg.metadata.dst_node_id
            node = self.alias.get(known, known)
            if msg.metadata.message_type != "query" and node not in set(self.grid.get_node_ids()):
                node = self._rejoin(known, deadline) or node
            msg.metadata.dst_node_id = node
            asked[node] = known
            if msg.has_content():
                msg.content = pack(msg.content)
        replies = self._exchange(msgs, deadline)
        for reply in replies:
            _unpack(reply)
            self._own(reply, asked)
        return replies

    def _exchange(self, msgs: list[Message], deadline: float | None) -> list[Message]:
        """Push, then wait for each message's reply on its own puller until the deadline (`_await_reply`).

        An error reply Flower made (from the SuperLink's node id) is made to come from the node asked."""
        group, kind = (msgs[0].metadata.group_id, msgs[0].metadata.message_type) if msgs else ("", "")
        mark("server", "push", phase="start", group=group, type=kind)
        pushed = _within(deadline, lambda: list(self.grid.push_messages(msgs)))
        mark("server", "push", phase="end", group=group, type=kind)
        if pushed is None:  # the SuperLink did not take them in time: no silo was asked
            return []
        node_of = {i: m.metadata.dst_node_id for m, i in zip(msgs, pushed, strict=True) if i}
        got = [_unavailable(m) for m, i in zip(msgs, pushed, strict=True) if not i]  # refused: offline
        arrived: queue.SimpleQueue[list[Message] | BaseException] = queue.SimpleQueue()
        for message_id in node_of:
            threading.Thread(target=_await_reply, args=(self.grid, message_id, deadline, self.poll, arrived),
                             name="flower-pull", daemon=True).start()
        for _ in node_of:
            left = None if deadline is None else max(0.0, deadline + PULL_GRACE_SECONDS - time.monotonic())
            try:
                replies = arrived.get(timeout=left)
            except queue.Empty:  # a pull still blocked in Flower's calls: left behind
                break
            if isinstance(replies, BaseException):
                raise replies
            for reply in replies:
                mark("server", "reply", node=reply.metadata.src_node_id, group=group, type=kind)
                if reply.has_error() and reply.metadata.src_node_id == SUPERLINK_NODE_ID:  # made by Flower
                    reply.metadata.__dict__["_src_node_id"] = node_of.get(reply.metadata.reply_to_message_id, 0)
                    reply.error = Error(code=reply.error.code, reason=_flower_reason(reply.error))
            got += replies
        return got

    def _own(self, reply: Message, asked: dict[int, int]) -> None:
        """Give a reply the node id the caller knows; learn a node's silo from a query reply."""
        meta = reply.metadata
        node = meta.src_node_id
        if not reply.has_error() and meta.message_type == "query" and "silo" in reply.content.config_records:
            claimed = str(reply.content.config_records["silo"]["silo"])
            if self.registry is None or self.registry.get(node) == claimed:  # as connect_silos judges
                self.silo_of[node] = claimed
        if node in asked:
            meta.__dict__["_src_node_id"] = asked[node]

    def _rejoin(self, known: int, deadline: float | None) -> int | None:
        """A new online node serving the silo of `known` (which is offline), or None."""
        silo = self.silo_of.get(known)
        if silo is None or self.query is None:
            return None
        new = [n for n in self.grid.get_node_ids() if n not in self.silo_of]
        if new:
            asks = [Message(self.query.copy(), n, "query", group_id="rejoin") for n in new]
            wait = None if deadline is None else time.monotonic() + max(1.0, deadline - time.monotonic())
            for reply in self._exchange(asks, wait):
                self._own(reply, {})
        node = next((n for n, s in self.silo_of.items() if s == silo and n not in (known, *self.alias.values())
                     and n in set(self.grid.get_node_ids())), None)
        if node is not None:
            self.alias[known] = node
            log.warning("silo %s rejoined as node %d (was node %d)", silo, node, known)
        return node


def _flower_reason(error: Error) -> str:
    """The reason a silo is dropped for an error reply Flower made in its place."""
    if error.code == ErrorCode.NODE_UNAVAILABLE:
        return UNAVAILABLE
    if error.code == ErrorCode.MESSAGE_UNAVAILABLE and "objects are unavailable" in str(error.reason):
        return INCOMPLETE  # HttpGrid.pull_messages: the content pull gave up
    return str(error.reason)


def _await_reply(grid: Grid, message_id: str, deadline: float | None, poll: float,
                 out: queue.SimpleQueue[list[Message] | BaseException]) -> None:
    """Pull the reply to one message every `poll` seconds, backing off to `POLL_CAP_SECONDS` (and on a long
    wait to `POLL_SHARE` of it), until it comes or the deadline passes; put what came (maybe nothing) or
    the exception on `out`, once.

    One puller per message, because Flower's pull fetches the content of the replies it hands out one
    after another, retrying what is not uploaded yet until the deadline: a single pull for all the
    silos would hold a healthy silo's reply behind another's stalled upload, and the exchange could
    end with neither (the SuperLink hands out a reply once, to the first pull that asks for it)."""
    backoff = Backoff(poll, max(poll, POLL_CAP_SECONDS), share=POLL_SHARE, ceiling=POLL_CEILING_SECONDS)
    try:
        while True:
            replies = _pull(grid, message_id, deadline)
            if replies or (deadline is not None and time.monotonic() >= deadline):
                out.put(replies)
                return
            backoff.wait()
    except BaseException as e:  # noqa: BLE001  raised in the exchange's thread
        out.put(e)


def _pull(grid: Grid, message_id: str, deadline: float | None) -> list[Message]:
    """Flower's pull of the reply to `message_id` ([] while none came), its retries for content not yet
    uploaded ending at the deadline (it reads them from `pull_objects`' keyword defaults: every caller in
    Flower 1.42 leaves them)."""
    from flwr.supercore.inflatable import inflatable_utils

    kw = inflatable_utils.pull_objects.__kwdefaults__
    assert kw is not None and "max_time" in kw, "flwr's pull_objects has no max_time: fedlm needs flwr 1.42"
    kw["max_time"] = PULL_GIVE_UP_SECONDS if deadline is None else max(0.0, deadline - time.monotonic())
    return list(grid.pull_messages([message_id]))


def _within(deadline: float | None, call: Callable[[], T]) -> T | None:
    """`call()`, or None when it has not returned by the deadline (it then goes on, abandoned, on a
    daemon thread that cannot hold up the process's exit); its exception is raised here."""
    if deadline is None:
        return call()
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(call())
        except BaseException as e:  # noqa: BLE001  raised in the caller's thread below
            err.append(e)

    worker = threading.Thread(target=run, name="flower-call", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    if err:
        raise err[0]
    return out[0] if out else None


def _unpack(reply: Message) -> None:
    """Rebuild a reply's packed arrays (`packing`); a reply whose packing does not fit becomes an error."""
    if reply.has_error() or not reply.has_content():
        return
    try:
        reply.content = unpack(reply.content)
    except ValueError as e:
        reply.__dict__["_content"] = None  # Flower's setters refuse to turn a reply into an error
        reply.__dict__["_error"] = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"unreadable reply: {e}")


def _unavailable(msg: Message) -> Message:
    """The reply for a message the SuperLink would not take (its node is offline)."""
    reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=UNAVAILABLE), reply_to=msg)
    reply.metadata.__dict__["_src_node_id"] = msg.metadata.dst_node_id
    return reply


def deployed(grid: Grid, *, poll: float = POLL_SECONDS) -> Grid:
    """`grid` with `DeployedGrid.send_and_receive` (see the module docstring)."""
    grid.send_and_receive = DeployedGrid(grid, poll=poll).send_and_receive  # type: ignore[method-assign]
    return grid
