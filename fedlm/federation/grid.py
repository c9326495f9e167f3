"""An in-process Flower `Grid`: delivers the ServerApp's messages to N silos in this process, without Ray.

    grid = InProcessGrid(client_app, {1: {"workspace": "ws", "silo": "a"}, 2: {...}})
    replies = grid.send_and_receive(messages, timeout=60.0)
    grid.close()

Flower 1.42 simulates only on Ray (slow to start, heavy in memory); this Grid hands each message to
the `ClientApp` of a virtual node instead, each on its own worker thread so silos train side
by side (one torch thread each). Every message crosses a real wire format on the way: it is
deflated into Flower's content-addressed objects and inflated again on the other side, as the
deployment engine does, so nothing is shared by reference and `on_wire` sees exactly the
bytes a SuperLink would carry. A ClientApp that raises becomes an error reply, worded as
Flower's `flwr-clientapp` words it; a late reply is dropped when the wait's timeout ends.

It leans on Flower internals (message metadata, `TaskIdentity`, object inflation): pin
`flwr==1.42.*` and keep `tests/test_federation.py` (the in-process engine) and
`tests/test_federation_deploy.py` (the same apps on the deployment engine) passing.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    no_object_id_recompute,
)
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

WireTap = Callable[[str, int, dict[str, bytes]], None]
"""Called with ("down" | "up", node_id, {object_id: bytes}) for every message on the wire."""

NodeConfig = Mapping[str, str | int | float | bool]


def serialise(message: Message) -> dict[str, bytes]:
    """The message as Flower's content-addressed objects: {object_id: deflated bytes}."""
    return serialise_all([message])[0][1]


def serialise_all(messages: list[Message]) -> list[tuple[str, dict[str, bytes]]]:
    """(root object id, `serialise`) of several messages at once: objects they share (a round's
    global weights sent to every silo) are hashed once."""
    # Flower re-hashes an object each time a parent asks for its id unless told not to (its own
    # push path does the same); the messages must not change while this runs
    out = []
    with no_object_id_recompute():
        for message in messages:
            objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
            message.__dict__[_WIRE_BYTES] = sum(len(b) for b in objects.values())
            out.append((message.object_id, objects))
    return out


_WIRE_BYTES = "_fedlm_wire_bytes"  # the size `serialise` found, kept on the message it measured


def wire_bytes(message: Message) -> int:
    """Bytes of the message's objects on the wire (identical objects counted once, as sent).

    A message this Grid sent or delivered was measured on its way: hashing a model's arrays
    again for the log would cost as much as sending them."""
    if _WIRE_BYTES not in message.__dict__:
        serialise(message)
    return int(message.__dict__[_WIRE_BYTES])


def deserialise(objects: dict[str, bytes], root_id: str, message_id: str) -> Message:
    """Inflate a message from `serialise`'s objects; Flower's `message_id` is set on arrival."""
    msg = inflate_object_from_contents(root_id, dict(objects), keep_object_contents=False)
    assert isinstance(msg, Message)
    msg.metadata.__dict__["_message_id"] = message_id
    msg.__dict__[_WIRE_BYTES] = sum(len(b) for b in objects.values())
    return msg


def _error_reply(message: Message, ex: BaseException) -> Message:
    """The reply Flower's `flwr-clientapp` sends when the ClientApp raises (same wording)."""
    reason = str(type(ex)) + ":<'" + str(ex) + "'>"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


class InProcessGrid(Grid):
    """A `Grid` whose nodes are `client_app` instances in this process, one per node config."""

    def __init__(
        self,
        client_app: ClientApp | Callable[[Message, Context], Message],
        nodes: Mapping[int, NodeConfig],
        *,
        run_id: int = 1,
        run_config: Mapping[str, str | int | float | bool] | None = None,
        on_wire: WireTap | None = None,
    ) -> None:
        if not nodes:
            raise ValueError("InProcessGrid needs at least one node")
        self._app = client_app
        self._run = Run.create_empty(run_id)
        self._contexts = {
            node_id: Context(
                run_id=run_id, node_id=node_id, node_config=dict(cfg), state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for node_id, cfg in nodes.items()
        }
        self._on_wire = on_wire
        # One worker per node: a node handles one message at a time, as a SuperNode does, so a
        # silo still busy with a timed-out round never runs two trainings at once.
        self._workers = {
            node_id: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"silo-{node_id}")
            for node_id in nodes
        }
        self._replies: dict[str, Message] = {}  # reply_to message_id -> reply
        self._pending: set[str] = set()
        self._cond = threading.Condition()
        # Messages built with `Message(content, dst_node_id, ...)` read the sender's identity here;
        # Flower's serverapp process sets it on start, so this Grid sets it for the server side.
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 0

    # -- Grid API --------------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(  # noqa: D401  (deprecated in Flower, kept for the ABC)
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        msgs = list(messages)
        for msg in msgs:
            if msg.metadata.dst_node_id not in self._contexts:
                raise ValueError(f"no node {msg.metadata.dst_node_id} in this grid")
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        ids: list[str] = []
        for msg, (root_id, objects) in zip(msgs, serialise_all(msgs), strict=True):
            node_id, message_id = msg.metadata.dst_node_id, msg.metadata.message_id
            if self._on_wire is not None:
                self._on_wire("down", node_id, objects)
            with self._cond:
                self._pending.add(message_id)
            self._workers[node_id].submit(self._deliver, node_id, objects, root_id, message_id)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self._cond:
            out = [self._replies.pop(i) for i in list(message_ids) if i in self._replies]
        return out

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send, then wait for every reply or until `timeout` seconds pass (None: no bound)."""
        wanted = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        got: list[Message] = []
        with self._cond:
            while True:
                for mid in [m for m in wanted if m in self._replies]:
                    got.append(self._replies.pop(mid))
                    wanted.discard(mid)
                if not wanted:
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cond.wait(left)
            # Replies that arrive after the wait are not wanted: forget them.
            self._pending.difference_update(wanted)
        return got

    # -- the silo side ---------------------------------------------------------------

    def _deliver(self, node_id: int, objects: dict[str, bytes], root_id: str, message_id: str) -> None:
        """Run the ClientApp on one message (a worker thread) and post its reply."""
        message = deserialise(objects, root_id, message_id)
        try:
            reply = self._app(message, self._contexts[node_id])
        except Exception as ex:  # noqa: BLE001  the silo's failure becomes its reply, as in Flower
            reply = _error_reply(message, ex)
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        [(root_id, up)] = serialise_all([reply])
        if self._on_wire is not None:
            self._on_wire("up", node_id, up)
        arrived = deserialise(up, root_id, reply.metadata.message_id)
        with self._cond:
            if message_id in self._pending:
                self._pending.discard(message_id)
                self._replies[message_id] = arrived
                self._cond.notify_all()

    def close(self) -> None:
        """Stop taking work; a silo still running finishes in the background and is ignored."""
        for worker in self._workers.values():
            worker.shutdown(wait=False, cancel_futures=True)
