"""A deployed message's arrays packed into one Array: rebuilt byte for byte, and a bad index is refused."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.task_identity import TaskIdentity

from fedlm.federation.packing import INDEX_SUFFIX, pack, packed_replies, unpack
from fedlm.federation.replies import _unpack


@pytest.fixture(autouse=True)
def _task_identity() -> Iterator[None]:
    """Messages are made inside a Flower task (as `grid.InProcessGrid` sets it up)."""
    saved = {k: TaskIdentity.__dict__[k] for k in ("_run_id", "_node_id", "_task_id") if k in TaskIdentity.__dict__}
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 0
    yield
    for key, value in saved.items():
        setattr(TaskIdentity, key, value)


def _content() -> RecordDict:
    g = torch.Generator().manual_seed(0)
    state = {f"layers.{i}.w": torch.randn(3 + i, 5, generator=g) for i in range(40)}
    state["q"] = torch.randint(-128, 127, (7,), dtype=torch.int8, generator=g)
    return RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"loss": 1.5}),
                       "config": ConfigRecord({"a": "b"}), "one": ArrayRecord({"x": Array(torch.ones(2).numpy())})})


def _fields(record: ArrayRecord) -> list[tuple[str, str, tuple[int, ...], str, bytes]]:
    return [(name, a.dtype, tuple(a.shape), a.stype, a.data) for name, a in record.items()]


def test_pack_then_unpack_gives_the_same_arrays_in_far_fewer_objects() -> None:
    content = _content()
    packed = pack(content)
    assert list(packed.array_records["arrays"].keys()) == ["packed"]
    assert packed.array_records["one"] is content.array_records["one"]  # one Array: left as it is
    back = unpack(packed)
    assert list(back.keys()) == list(content.keys())
    for key in ("arrays", "one"):
        assert _fields(back.array_records[key]) == _fields(content.array_records[key])
    assert back.metric_records["metrics"]["loss"] == 1.5 and back.config_records["config"]["a"] == "b"
    sent = [len(get_all_nested_objects(Message(c, 1, "train"))) for c in (content, packed)]
    assert sent[1] * 5 < sent[0], sent  # each Array and its chunk are objects of their own
    assert unpack(content) is content  # nothing packed: nothing to do (the in-process engine)


@pytest.mark.parametrize("spoil", ["short", "garbage", "duplicate", "orphan"])
def test_an_index_that_does_not_fit_is_refused(spoil: str) -> None:
    packed = pack(_content())
    key = "arrays" + INDEX_SUFFIX
    index = json.loads(str(packed.config_records[key]["index"]))
    if spoil == "short":
        index[0][4] -= 1
    elif spoil == "duplicate":
        index[1][0] = index[0][0]
    packed[key] = ConfigRecord({"index": "[[" if spoil == "garbage" else json.dumps(index)})
    if spoil == "orphan":
        packed["other" + INDEX_SUFFIX] = ConfigRecord({"index": "[]"})
    with pytest.raises(ValueError, match="packed arrays"):
        unpack(packed)


def test_the_silo_unpacks_the_request_and_packs_its_reply() -> None:
    seen: list[RecordDict] = []

    def handler(msg: Message, context: Context) -> Message:
        seen.append(msg.content)
        return Message(RecordDict({"arrays": msg.content.array_records["arrays"]}), reply_to=msg)

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    for content in (_content(), pack(_content())):
        request = Message(content, 1, "train")
        request.metadata.__dict__["_message_id"] = request.object_id
        reply = packed_replies(request, ctx, handler)
        assert _fields(seen[-1].array_records["arrays"]) == _fields(_content().array_records["arrays"])
        assert (list(reply.content.array_records["arrays"].keys()) == ["packed"]) == (content is not seen[0])


def test_a_reply_whose_index_does_not_fit_becomes_the_silos_error() -> None:
    request = Message(RecordDict(), 1, "train")
    request.metadata.__dict__["_message_id"] = request.object_id
    bad = pack(_content())
    bad["arrays" + INDEX_SUFFIX] = ConfigRecord({"index": "[]"})
    reply = Message(bad, reply_to=request)
    _unpack(reply)
    assert reply.has_error() and "unreadable reply: packed arrays" in str(reply.error.reason)
