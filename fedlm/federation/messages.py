"""The messages between the server and a silo, both ways: how values become Flower records and back.

    msg = train_request(arrays, round_config(...), node_id, round_no=1)       # server -> silo
    req = read_train_request(msg)                                             # the silo reads it
    reply = train_reply(msg, payload, metrics)                                # silo -> server
    update, metrics, why = read_update(reply, expected, max_norm=0.0)         # the server checks it

Message types: `query` (before round 1: check the silo's shards), `train` (one round's
local training; the reply is the update and numeric metrics, plus under cyclic weight
transfer the AdamW state passed on as the array record "optimizer"), and the four stages
`train.secagg_setup|keys|input|unmask` of secure aggregation, whose protocol messages
(dicts of bytes, str, numbers, lists, ndarrays) travel as a ConfigRecord "secagg" plus an
ArrayRecord "secagg-arrays" for the ndarrays.

The round's ConfigRecord "config" carries the run's resolved config as TOML, so every silo
builds the same model; "round" counts from 1, as rounds.jsonl does.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedlm.config import Config, build_config
from fedlm.errors import foreign_text
from fedlm.federation import codecs, secagg
from fedlm.federation.robust import check_update

Shapes = dict[str, tuple[int, ...]]


def error_reason(msg: Message) -> str:
    """The exception text from a Flower error reply ("<class 'X'>:<'text'>" -> text), as a silo may
    have written it to mislead: one printable line (`foreign_text`)."""
    reason = str(msg.error.reason)
    if ":<'" in reason and reason.endswith("'>"):
        reason = reason.split(":<'", 1)[1][:-2]
    return foreign_text(reason)


# ---------------------------------------------------------------------------------------
# before round 1: which silo a node serves, and are its shards usable


def query_request(node_id: int, *, tokenizer_sha256: str, config_text: str = "") -> Message:
    """Ask a node to check its silo's shards (and, with `config_text`, its own privacy budget)."""
    config = ConfigRecord({"tokenizer-sha256": tokenizer_sha256})
    if config_text:
        config["fedlm-config"] = config_text
    return Message(RecordDict({"config": config}), node_id, "query", group_id="connect")


def query_reply(msg: Message, *, silo: str, counts: dict[str, int | float]) -> Message:
    """A silo's answer to `query`: its name and token counts (no file names, no text)."""
    return Message(RecordDict({"silo": ConfigRecord({"silo": silo}), "metrics": MetricRecord(dict(counts))}),
                   reply_to=msg)


def replied_silo(reply: Message) -> str:
    """The silo named in a `query` reply."""
    return str(reply.content.config_records["silo"]["silo"])


def query_config(msg: Message) -> tuple[str, Config | None]:
    """(tokenizer sha256, the run's config or None) from a `query` message."""
    record = msg.content.config_records["config"]
    cfg = parse_config(str(record["fedlm-config"])) if "fedlm-config" in record else None
    return str(record["tokenizer-sha256"]), cfg


# ---------------------------------------------------------------------------------------
# a training round


def parse_config(text: str) -> Config:
    """The run's config from the TOML a round message carries."""
    return build_config(tomllib.loads(text), "federated run config")


def round_config(*, round_no: int, config_text: str, tokenizer_sha256: str, weight_ref: float, run_id: str,
                 privacy: dict[str, float] | None = None) -> ConfigRecord:
    """The ConfigRecord every silo of round `round_no` (from 1) receives."""
    return ConfigRecord({"round": round_no, "fedlm-config": config_text, "tokenizer-sha256": tokenizer_sha256,
                         "weight-ref": float(weight_ref), **(privacy or {}), "run-id": run_id})


def train_request(arrays: ArrayRecord, config: ConfigRecord, node_id: int, *, round_no: int,
                  stage: str = "", carry: dict[str, torch.Tensor] | None = None) -> Message:
    """A `train` message (or `train.STAGE`) with the global arrays, the round's config and, cyclic,
    the AdamW state the previous silo passed on."""
    content = RecordDict({"arrays": arrays, "config": config})
    if carry:
        content["optimizer"] = ArrayRecord(carry)
    return Message(content, node_id, f"train.{stage}" if stage else "train", group_id=str(round_no))


@dataclass
class TrainRequest:
    """What a silo reads from a `train` message."""

    cfg: Config
    config_text: str
    round_no: int  # from 1
    tokenizer_sha256: str
    run_id: str
    weight_ref: float  # the planned tokens per round: the most a silo's update weighs
    arrays: dict[str, torch.Tensor]  # the global weights, in wire names
    carry: dict[str, torch.Tensor] | None  # cyclic: the AdamW state passed on ({} for the first silo)
    dp_share_std: float | None  # client DP under secure aggregation: the std of this silo's noise share

    @property
    def round_idx(self) -> int:
        """The 0-based index that seeds the round's data order and schedule."""
        return self.round_no - 1


def read_train_request(msg: Message) -> TrainRequest:
    """The values in a `train` (or `train.secagg_input`) message."""
    record = msg.content.config_records["config"]
    text = str(record["fedlm-config"])
    cfg = parse_config(text)
    carry = None
    if cfg.federation.strategy == "cyclic":
        got = msg.content.array_records.get("optimizer")
        carry = got.to_torch_state_dict() if got is not None else {}
    return _train_request(record, cfg, text, msg.content.array_records["arrays"].to_torch_state_dict(), carry)


def _train_request(record: ConfigRecord, cfg: Config, text: str, arrays: dict[str, torch.Tensor],
                   carry: dict[str, torch.Tensor] | None) -> TrainRequest:
    return TrainRequest(
        cfg=cfg, config_text=text, round_no=int(record["round"]),  # type: ignore[arg-type]
        tokenizer_sha256=str(record["tokenizer-sha256"]), run_id=str(record.get("run-id", "")),
        weight_ref=float(record["weight-ref"]),  # type: ignore[arg-type]
        arrays=arrays, carry=carry,
        dp_share_std=float(record["dp-share-std"]) if "dp-share-std" in record else None,  # type: ignore[arg-type]
    )


def train_reply(msg: Message, payload: dict[str, torch.Tensor], metrics: dict[str, float],
                carry: dict[str, torch.Tensor] | None = None) -> Message:
    """A silo's `train` reply: the encoded update, numeric metrics and, cyclic, the AdamW state."""
    content = RecordDict({"arrays": ArrayRecord(payload), "metrics": MetricRecord(metrics)})  # type: ignore[arg-type]
    if carry is not None:
        content["optimizer"] = ArrayRecord(carry)
    return Message(content, reply_to=msg)


def read_metrics(content: RecordDict) -> dict[str, float]:
    """The numeric metrics in a reply (others are left out)."""
    if "metrics" not in content.metric_records:
        return {}
    return {k: float(v) for k, v in content.metric_records["metrics"].items() if isinstance(v, (int, float))}


def read_update(reply: Message, expected: Shapes, max_norm: float, *, codec: codecs.Codec = "none",
                extra: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict[str, float], str | None]:
    """The update and numeric metrics in a train reply, and why to reject it (None: accept).

    `extra`: the names of further array records the reply must hold (cyclic: "optimizer")."""
    content = reply.content
    if set(content.keys()) != {"arrays", "metrics", *extra} or "arrays" not in content.array_records \
            or "metrics" not in content.metric_records:
        return {}, {}, f"unexpected records {sorted(content.keys())}"
    metrics: dict[str, float] = {}
    for key, value in content.metric_records["metrics"].items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return {}, {}, f"non-numeric metric {key}"
        metrics[key] = float(value)
    tokens = metrics.get("num_tokens", float("nan"))
    if not (math.isfinite(tokens) and tokens > 0):
        return {}, metrics, f"num_tokens = {tokens}"
    metrics.setdefault("loss", float("nan"))
    payload = content.array_records["arrays"].to_torch_state_dict()
    try:  # the silo's codec undone (federation.compression); a malformed payload is rejected
        update = payload if codec == "none" else codecs.decode(payload, codec=codec, expected=expected)
    except ValueError as e:
        return {}, metrics, f"bad {codec} payload: {e}"
    return update, metrics, check_update(update, expected=expected, max_norm=max_norm)


def read_carry(reply: Message, expected: Shapes) -> tuple[dict[str, torch.Tensor], str | None]:
    """A cyclic silo's AdamW state to pass on, and why it cannot be (None: it can)."""
    state = reply.content.array_records["optimizer"].to_torch_state_dict()
    if "step" not in state:
        return state, "optimizer state without a step"
    for key, t in state.items():
        kind, _, name = key.partition(".")
        if key != "step" and (kind not in ("exp_avg", "exp_avg_sq") or expected.get(name) != tuple(t.shape)):
            return state, f"optimizer state {key} does not fit the model"
        if not torch.isfinite(t).all():
            return state, f"non-finite optimizer state {key}"
    return state, None


# ---------------------------------------------------------------------------------------
# after the last round: the starting and the final weights on each silo's validation split


def evaluate_request(start: ArrayRecord, final: ArrayRecord, config: ConfigRecord, node_id: int) -> Message:
    """Ask a silo for the validation loss of the run's starting and final global weights."""
    return Message(RecordDict({"start": start, "final": final, "config": config}), node_id, "evaluate",
                   group_id="validate")


def read_evaluate_request(msg: Message) -> tuple[TrainRequest, dict[str, torch.Tensor]]:
    """(the round fields and the final weights as `arrays`, the starting weights) of an `evaluate` message."""
    content = msg.content
    record = content.config_records["config"]
    text = str(record["fedlm-config"])
    req = _train_request(record, parse_config(text), text, content.array_records["final"].to_torch_state_dict(), None)
    return req, content.array_records["start"].to_torch_state_dict()


def evaluate_reply(msg: Message, *, start: float, final: float, verdict_only: bool) -> Message:
    """A silo's validation numbers; under secure aggregation only whether the final weights are worse
    (the server learns no per-silo loss there, as it learns none in the rounds)."""
    judged = math.isfinite(start) and math.isfinite(final)
    values = {"worse": float(final > start) if judged else math.nan} if verdict_only else \
        {"val_loss_start": start, "val_loss_final": final}
    return Message(RecordDict({"metrics": MetricRecord(values)}), reply_to=msg)  # type: ignore[arg-type]


def read_validation(reply: Message) -> dict[str, float] | str:
    """A silo's validation numbers from its `evaluate` reply, or why there are none."""
    if reply.has_error():
        return f"failed: {error_reason(reply)}"
    got = read_metrics(reply.content)
    keys = set(got)
    if keys not in ({"worse"}, {"val_loss_start", "val_loss_final"}) or set(reply.content.keys()) != {"metrics"}:
        return f"unexpected validation reply {sorted(keys)}"
    if not all(math.isfinite(v) for v in got.values()):
        return "no validation windows (its val split is shorter than train.seq_len)"
    return got


# ---------------------------------------------------------------------------------------
# secure aggregation's protocol messages


def to_records(msg: secagg.Msg) -> RecordDict:
    """A secagg message as Flower records."""
    arrays = {k: Array(np.ascontiguousarray(v)) for k, v in msg.items() if isinstance(v, np.ndarray)}
    rest = {k: v for k, v in msg.items() if not isinstance(v, np.ndarray)}
    out = RecordDict({"secagg": ConfigRecord(rest)})
    if arrays:
        out["secagg-arrays"] = ArrayRecord(arrays)
    return out


def from_records(content: RecordDict) -> secagg.Msg:
    """The secagg message in a message's content (inverse of `to_records`)."""
    msg: secagg.Msg = dict(content.config_records["secagg"])
    if "secagg-arrays" in content.array_records:
        msg.update({k: a.numpy() for k, a in content.array_records["secagg-arrays"].items()})
    return msg
