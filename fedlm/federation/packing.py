"""A deployed message's arrays travel as one: each ArrayRecord packed into a single Array, rebuilt on receipt.

    msg.content = pack(msg.content)        # the server before sending (`replies.DeployedGrid`)
    msg.content = unpack(msg.content)      # on receipt; ValueError naming what does not fit
    ClientApp(mods=[packed_replies])       # a silo: unpack the request, pack the reply the same way

Flower 1.42 moves every Array of a message as an object of its own, one HTTP request per
object on each hop (server -> SuperLink -> SuperNode -> client process, and back), each
waited for and handled by FastAPI on a small machine's shared cores. A model's ~40 tensors
made ~80 requests per message per hop; packed, a message is a handful of objects and the
bytes are the same. Nothing changes above the transport: the Arrays are rebuilt byte for
byte (dtype, shape, stype, data), so every check of an update runs on what the silo sent.

A packed record KEY becomes an ArrayRecord KEY holding one Array (the Arrays' data, end to
end) and a ConfigRecord KEY + INDEX_SUFFIX holding their names, dtypes, shapes, stypes and
lengths as JSON. A message without the index is left as it is (the in-process engine never
packs). The index comes from the other side, a silo or the server, so `unpack` checks it
against the data before rebuilding anything.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp.typing import ClientAppCallable

INDEX_SUFFIX = ".fedlm-packed"
PACKED_STYPE = "fedlm.packed"


def is_packed(content: RecordDict) -> bool:
    return any(key.endswith(INDEX_SUFFIX) for key in content.config_records)


def pack(content: RecordDict) -> RecordDict:
    """`content` with each ArrayRecord of two or more Arrays packed into one (other records as they are)."""
    out = RecordDict()
    for key, record in content.items():
        if not isinstance(record, ArrayRecord) or len(record) < 2:
            out[key] = record
            continue
        arrays = list(record.items())
        index = [[name, a.dtype, list(a.shape), a.stype, len(a.data)] for name, a in arrays]
        blob = b"".join(a.data for _, a in arrays)
        out[key] = ArrayRecord({"packed": Array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)})
        out[key + INDEX_SUFFIX] = ConfigRecord({"index": json.dumps(index)})
    return out


def unpack(content: RecordDict) -> RecordDict:
    """`content` with every packed record rebuilt; ValueError when an index does not fit its data."""
    if not is_packed(content):
        return content
    out = RecordDict()
    for key, record in content.items():
        if key.endswith(INDEX_SUFFIX):
            continue
        index = content.config_records.get(key + INDEX_SUFFIX)
        out[key] = record if index is None else _rebuild(key, record, index)
    if any(key[: -len(INDEX_SUFFIX)] not in content.array_records
           for key in content.config_records if key.endswith(INDEX_SUFFIX)):
        raise ValueError("packed arrays: an index without its arrays")
    return out


def _rebuild(key: str, record: Any, index: ConfigRecord) -> ArrayRecord:
    """The ArrayRecord `record` packs, after checking `index` against it."""
    if not isinstance(record, ArrayRecord) or list(record.keys()) != ["packed"]:
        raise ValueError(f"packed arrays {key!r}: not one packed Array")
    packed = record["packed"]
    try:
        entries = json.loads(str(index["index"]))
        rows = [(str(n), str(d), tuple(int(x) for x in s), str(t), int(size)) for n, d, s, t, size in entries]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"packed arrays {key!r}: unreadable index ({e})") from None
    if packed.stype != PACKED_STYPE or len({r[0] for r in rows}) != len(rows) or any(r[4] < 0 for r in rows) \
            or sum(r[4] for r in rows) != len(packed.data):
        raise ValueError(f"packed arrays {key!r}: the index does not fit the data")
    arrays, at = {}, 0
    for name, dtype, shape, stype, size in rows:
        arrays[name] = Array(dtype=dtype, shape=shape, stype=stype, data=packed.data[at:at + size])
        at += size
    return ArrayRecord(arrays)


def packed_replies(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: a packed request is unpacked for the handler and its reply packed."""
    if not msg.has_content() or not is_packed(msg.content):
        return call_next(msg, context)
    msg.content = unpack(msg.content)
    reply = call_next(msg, context)
    if reply.has_content():
        reply.content = pack(reply.content)
    return reply
