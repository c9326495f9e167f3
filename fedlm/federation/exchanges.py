"""One round's exchange with the sampled silos, three ways: plain, cyclic, and under secure aggregation.

    link = Link(grid, node_of, expected, timeout=60.0, min_silos=2, max_update_norm=0.0, codec="none")
    result = plain_round(link, round_no, sampled, arrays, config, aggregation="mean", trim_fraction=0.1)
    if result.update is not None:
        global_state = optimizer.apply(global_state, result.update)

Each exchange sends the global arrays with the round's ConfigRecord, waits at most
`timeout` seconds per wait, drops silos that failed, timed out or sent an update that is
rejected (NaN/Inf, wrong names or shapes, norm above `max_update_norm`), and returns a
`RoundResult`: the aggregated update, or None when fewer than `min_silos` silos counted.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedlm.federation import codecs, secagg
from fedlm.federation.dp_rounds import RoundPrivacy
from fedlm.federation.grid import wire_bytes
from fedlm.federation.messages import (
    Shapes,
    error_reason,
    from_records,
    read_carry,
    read_metrics,
    read_update,
    to_records,
    train_request,
)
from fedlm.federation.robust import aggregate, check_update
from fedlm.federation.strategies import cyclic_order

log = logging.getLogger("fedlm.federation")

Update = dict[str, torch.Tensor]
Aggregation = Literal["mean", "trimmed_mean", "median"]  # federation.aggregation


@dataclass(frozen=True)
class Link:
    """Where a round's messages go and how the server judges the replies (the same every round)."""

    grid: Grid
    node_of: Mapping[str, int]  # silo -> node id
    expected: Shapes  # the arrays an update must hold: wire names and shapes
    timeout: float  # seconds per wait (federation.round_timeout)
    min_silos: int  # a round completes with at least this many counted silos
    max_update_norm: float  # reject an update above this L2 norm; 0: no bound
    codec: codecs.Codec  # federation.compression, undone on receipt

    def silo_of(self, node_id: int) -> str | None:
        return next((s for s, n in self.node_of.items() if n == node_id), None)


@dataclass
class RoundResult:
    """What a round's exchange produced."""

    update: Update | None  # the aggregated update; None when the round is skipped
    tokens: dict[str, float] = field(default_factory=dict)  # {counted silo: tokens}
    silos: dict[str, dict[str, float]] = field(default_factory=dict)  # per-silo row: bytes, metrics
    dropped: dict[str, str] = field(default_factory=dict)  # {silo: why}
    updates: dict[str, Update] = field(default_factory=dict)  # plain rounds: {counted silo: its update}


def _timeout(link: Link) -> str:
    return f"no reply within {link.timeout:g} s"


def _accept(reply: Message, row: dict[str, float], link: Link, *, extra: tuple[str, ...] = ()
            ) -> tuple[Update, float] | str:
    """A silo's train reply as (update, tokens), or why it is dropped; logs its bytes and metrics."""
    row["bytes_up"] = float(wire_bytes(reply))
    if reply.has_error():
        return f"failed: {error_reason(reply)}"
    update, metrics, why = read_update(reply, link.expected, link.max_update_norm, codec=link.codec, extra=extra)
    row.update(metrics)
    return f"rejected: {why}" if why is not None else (update, metrics["num_tokens"])


def plain_round(link: Link, round_no: int, sampled: list[str], arrays: ArrayRecord, config: ConfigRecord, *,
                aggregation: Aggregation, trim_fraction: float, dp: RoundPrivacy | None = None) -> RoundResult:
    """Send the global weights, collect and check the updates, aggregate the accepted ones."""
    msgs = [train_request(arrays, config, link.node_of[s], round_no=round_no) for s in sampled]
    replies = list(link.grid.send_and_receive(msgs, timeout=link.timeout))
    out = RoundResult(None, silos={s: {"bytes_down": float(wire_bytes(m)), "bytes_up": 0.0}
                                   for s, m in zip(sampled, msgs, strict=True)})
    accepted: dict[str, tuple[Update, float]] = {}
    for reply in replies:
        silo = link.silo_of(reply.metadata.src_node_id)
        if silo is None or silo not in out.silos:
            continue
        got = _accept(reply, out.silos[silo], link)
        if isinstance(got, str):
            out.dropped[silo] = got
        else:  # a silo's weight is at most the tokens the plan gives it per round (it reports its own)
            accepted[silo] = (got[0], min(got[1], float(config["weight-ref"])))  # type: ignore[arg-type]
    for silo in sampled:
        if silo not in out.dropped and silo not in accepted:
            out.dropped[silo] = f"timeout: {_timeout(link)}"
    out.tokens = {s: accepted[s][1] for s in sorted(accepted)}
    if len(accepted) < link.min_silos:
        return out
    order = sorted(accepted)  # a fixed order: the sum is bitwise the same on both engines
    out.updates = {s: accepted[s][0] for s in order}
    if dp is not None and dp.plan is not None:  # client-level DP: clipped sum + central noise, unweighted
        out.update = dp.noisy_mean([accepted[s][0] for s in order], round_idx=round_no - 1)
    else:
        out.update = aggregate([accepted[s][0] for s in order], [accepted[s][1] for s in order],
                               method=aggregation, trim_fraction=trim_fraction)
    return out


def cyclic_round(link: Link, round_no: int, sampled: list[str], arrays: ArrayRecord, config: ConfigRecord, *,
                 seed: int, carry: dict[str, torch.Tensor]) -> RoundResult:
    """Cyclic weight transfer: the sampled silos train in turn, each from the weights and the
    AdamW state (`carry`, updated in place) the last one left: one optimizer's run over the
    silos' data.

    The turn order is drawn from (seed, round). A silo that fails, times out (each turn waits
    at most `link.timeout` seconds) or sends a rejected update is skipped: the next silo
    starts from the weights and state before it. The round's update is the sum of the
    accepted silos' updates, so with server_lr = 1 the new global model is the last silo's.
    """
    start = arrays.to_torch_state_dict()
    state, passed = dict(start), dict(carry)  # committed to `carry` only if the round completes
    out = RoundResult(None)
    for silo in cyclic_order(sampled, round_idx=round_no - 1, seed=seed):
        msg = train_request(ArrayRecord(state), config, link.node_of[silo], round_no=round_no, carry=passed)
        replies = list(link.grid.send_and_receive([msg], timeout=link.timeout))
        out.silos[silo] = {"bytes_down": float(wire_bytes(msg)), "bytes_up": 0.0}
        if not replies:
            out.dropped[silo] = f"timeout: {_timeout(link)}"
            continue
        got = _accept(replies[0], out.silos[silo], link, extra=("optimizer",))
        if isinstance(got, str):
            out.dropped[silo] = got
            continue
        passed_on, why = read_carry(replies[0], link.expected)
        if why is not None:
            out.dropped[silo] = f"rejected: {why}"
            continue
        update, out.tokens[silo] = got
        state = {name: state[name] + update[name] for name in state}
        passed = passed_on
    if len(out.tokens) < link.min_silos:
        return out
    carry.clear()
    carry.update(passed)
    out.update = {name: state[name] - start[name] for name in start}
    return out


def secagg_round(link: Link, round_no: int, sampled: list[str], arrays: ArrayRecord, config: ConfigRecord, *,
                 weight_ref: float, dp: RoundPrivacy | None = None) -> RoundResult:
    """The same exchange under secure aggregation: four message stages; the server sees only the sum.

    Every counted silo weighs the same, the tokens the plan gives it per round (`weight_ref`):
    each masks its update unweighted and the server divides the unmasked sum by the number of
    survivors. The weight is public and fixed because the server cannot check a weight applied
    inside the mask: a silo that reported few tokens but masked at full weight (or the reverse)
    would shrink the divisor and scale up every update. A silo can still mask a larger update
    than it trained; that is bounded by the sum's norm check below (its update's norm at most
    (2·survivors − 1)·`max_update_norm`), not verified. A silo that drops after sharing its
    keys is recovered from the others' shares, but a round is only applied with at least 3
    masked inputs (and the threshold). Updates are checked by the silos themselves (NaN/Inf,
    norm bound) before masking; the server refuses a sum that is out of range or over the
    silos' norm bound (a forged input). Loss and seconds arrive only as a secure sum: each
    counted silo's row holds the round's means.
    """
    out = RoundResult(None, silos={s: {"bytes_down": 0.0, "bytes_up": 0.0} for s in sampled})
    clip = link.max_update_norm if link.max_update_norm > 0 else 1.0
    if dp is not None:  # client DP: each value is a clipped update plus a noise share
        clip = dp.secagg_clip_range(clip)
    dim = sum(math.prod(shape) for shape in link.expected.values())
    server = secagg.SecAggServer(sampled, dim=dim + len(secagg.METRICS), clip_range=clip)  # + the secure metrics
    try:
        total = _secagg_stages(link, round_no, server, out, arrays=arrays, config=config)
    except secagg.SecAggError as e:
        log.warning("round %d: secure aggregation failed: %s", round_no, e)
        return out
    out.tokens = dict.fromkeys(server.u3, weight_ref)  # the plan's, whatever a silo reports
    weight_sum = float(len(server.u3))
    if len(server.u3) < max(link.min_silos, dp.min_contributors() if dp else 0) or not weight_sum > 0:
        return out
    total, means = secagg.split_metrics(total, dim, weight_sum=weight_sum, clip_range=clip)
    per_silo = dp.plan.clip if dp is not None and dp.plan is not None else link.max_update_norm or math.inf
    why = secagg.check_sum_norm(total, secagg.sum_norm_bound(
        weight_sum=weight_sum, max_norm=per_silo, noise_std=dp.sum_noise_std(len(server.u3)) if dp else 0.0,
        dim=dim, error_bound=len(server.u3) * server.step))
    if why is not None:
        log.warning("round %d: %s; the round is refused", round_no, why)
        return out
    for s in server.u3:  # the server never learns one silo's loss or seconds: each row holds the round's means
        out.silos[s].update(means)
    agg = secagg.unflatten(total / weight_sum, link.expected)
    why = check_update(agg, expected=link.expected, max_norm=0.0)
    if why is not None:
        log.warning("round %d: the securely aggregated update is unusable (%s)", round_no, why)
        return out
    out.update = agg
    return out


def _secagg_stages(link: Link, round_no: int, server: secagg.SecAggServer, out: RoundResult, *,
                   arrays: ArrayRecord, config: ConfigRecord) -> np.ndarray:
    """The protocol's four stages over the grid; the unmasked sum (SecAggError if it cannot finish)."""
    replies = _stage(link, round_no, "secagg_setup", {s: to_records(server.setup_request()) for s in out.silos},
                     out)  # out.silos: the sampled silos
    keys = server.receive_setup(replies)
    replies = _stage(link, round_no, "secagg_keys", {s: to_records(keys) for s in server.u1}, out)
    inbox = server.receive_share_keys(replies)
    requests = {}
    for s in server.u2:
        requests[s] = to_records(inbox[s])
        requests[s]["arrays"], requests[s]["config"] = arrays, config
    replies = _stage(link, round_no, "secagg_input", requests, out)
    unmask = server.receive_masked_inputs(replies)
    replies = _stage(link, round_no, "secagg_unmask", {s: to_records(unmask) for s in server.u3}, out)
    return server.receive_unmask(replies)


def _stage(link: Link, round_no: int, action: str, requests: dict[str, RecordDict], out: RoundResult
           ) -> dict[str, secagg.Msg]:
    """Send one stage's requests; the protocol messages of the silos that answered in time."""
    msgs = {s: Message(rd, link.node_of[s], f"train.{action}", group_id=str(round_no)) for s, rd in requests.items()}
    replies = list(link.grid.send_and_receive(list(msgs.values()), timeout=link.timeout))
    for s, m in msgs.items():
        out.silos[s]["bytes_down"] += wire_bytes(m)  # after sending: the grid measured it
    got: dict[str, secagg.Msg] = {}
    for reply in replies:
        silo = link.silo_of(reply.metadata.src_node_id)
        if silo is None or silo not in msgs:
            continue
        out.silos[silo]["bytes_up"] += wire_bytes(reply)
        if reply.has_error():
            out.dropped[silo] = f"failed at {action}: {error_reason(reply)}"
            continue
        got[silo] = from_records(reply.content)
        out.silos[silo].update(read_metrics(reply.content))
    for s in msgs:
        if s not in got and s not in out.dropped:
            out.dropped[s] = f"timeout at {action}: {_timeout(link)}"
    return got
