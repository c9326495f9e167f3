"""Federated runs: the server's rounds loop over a Flower `Grid`, on either engine.

    summary = run_federated(load_config("fed.toml"), Path("runs/fed"))               # in process
    summary = run_federated(cfg, Path("runs/fed"), resume=True)                       # after a stop
    summary = run_federated(cfg, out, superlink="10.0.0.5:9092", root_certificates=ca)  # engine flower

`run_rounds(grid, ...)` is the ServerApp's body, the same on both engines: ask every silo to
check its shards (errors name the silo, before any round), then per round sample silos, send
the global weights, wait at most `federation.round_timeout` seconds, drop silos that failed
or timed out and reject bad updates (NaN/Inf, wrong names or shapes, norm above
`federation.max_update_norm`), aggregate the rest if at least `federation.min_silos`
remain (or, with `federation.strategy = "cyclic"`, send the weights to the sampled silos one
after another, with the AdamW state each passes on), apply the server optimiser (with
"fedsgd" the updates are gradients and it is the trainer's AdamW), write the
round checkpoint atomically and one line to rounds.jsonl (who took part, loss, tokens, bytes
each way, who dropped and why).

A run directory holds config.toml, rounds.jsonl, checkpoint/ (global weights, server
optimiser state, round), model/ and summary.json. A run stopped anywhere resumes from its
last round checkpoint and ends bitwise-equal to an uninterrupted run: every silo's data
order is seeded from (seed, silo, round) and the sample from (seed, round).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from safetensors.torch import load_file, save_file

from fedlm.config import Config, config_to_toml, load_config, save_config
from fedlm.data.shards import list_silos
from fedlm.data.tokenizer import load_tokenizer, tokenizer_hash
from fedlm.errors import UserError
from fedlm.federation import codecs, secagg
from fedlm.federation.client_app import (
    expand_state,
    federated_train_config,
    from_records,
    to_records,
    wire_names,
)
from fedlm.federation.dp_rounds import RoundPrivacy
from fedlm.federation.grid import InProcessGrid, WireTap, wire_bytes
from fedlm.federation.robust import aggregate, check_update
from fedlm.federation.strategies import (
    ServerAdamW,
    ServerOptimizer,
    cyclic_order,
    make_server_optimizer,
    num_sampled,
    sample_silos,
)
from fedlm.fileio import append_jsonl, atomic_dir, truncate_jsonl, write_json
from fedlm.modelio import save_model
from fedlm.train import build_model

log = logging.getLogger("fedlm.federation")

RoundCallback = Callable[[int, int, dict[str, Any]], None]
"""Called after each completed round with (round, rounds, the rounds.jsonl row)."""

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
"""Set wherever Flower runs: no telemetry, no update check, no `uv sync` of a multi-GB torch."""


# ---------------------------------------------------------------------------------------
# the run directory


def prepare_run_dir(cfg: Config, out_dir: Path, *, resume: bool) -> None:
    """Check `out_dir` for a new run or a resume, and write the resolved config there."""
    ckpt = out_dir / "checkpoint"
    if resume:
        if not ckpt.exists():
            raise UserError(f"{out_dir}: no round checkpoint to resume from; run without --resume")
        saved = out_dir / "config.toml"
        if saved.exists() and load_config(saved) != cfg:
            raise UserError(
                f"{saved} differs from the config given to --resume; resume with `fedlm train {saved} --resume`"
            )
    elif ckpt.exists():
        raise UserError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.toml")


def save_round(ckpt_dir: Path, *, global_state: dict[str, torch.Tensor], optimizer: ServerOptimizer | ServerAdamW,
               round_idx: int) -> None:
    """Global weights, server optimiser state and the number of rounds done, replaced atomically."""
    with atomic_dir(ckpt_dir) as tmp:
        save_file({k: v.contiguous() for k, v in global_state.items()}, str(tmp / "global.safetensors"))
        save_file({k: v.contiguous() for k, v in optimizer.state_dict().items()},
                  str(tmp / "server_optimizer.safetensors"))
        write_json(tmp / "state.json", {"round": round_idx})


def load_round(ckpt_dir: Path, *, optimizer: ServerOptimizer | ServerAdamW) -> tuple[dict[str, torch.Tensor], int]:
    """Restore what save_round wrote; returns (global weights, rounds done)."""
    try:
        state = json.loads((ckpt_dir / "state.json").read_text())
        weights = load_file(str(ckpt_dir / "global.safetensors"))
        optimizer.load_state_dict(load_file(str(ckpt_dir / "server_optimizer.safetensors")))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"{ckpt_dir}: round checkpoint is missing or corrupt ({e}); start without --resume") from None
    return weights, int(state["round"])


def run_silos(cfg: Config) -> list[str]:
    """The silos a federated config trains on: data.silos, or every silo of the workspace."""
    workspace = Path(cfg.data.workspace)
    silos = list(cfg.data.silos) or list_silos(workspace)
    if not silos:
        raise UserError(
            f"{workspace}: no silos; list them in data.silos or prepare them with "
            f"`fedlm data prepare SRC --silo NAME --workspace {workspace}`"
        )
    return silos


# ---------------------------------------------------------------------------------------
# before round 1: which node serves which silo, and are its shards usable


def _reason(msg: Message) -> str:
    """The exception text from a Flower error reply ("<class 'X'>:<'text'>" -> text)."""
    reason = str(msg.error.reason)
    if ":<'" in reason and reason.endswith("'>"):
        return reason.split(":<'", 1)[1][:-2]
    return reason


def connect_silos(grid: Grid, silos: list[str], *, tokenizer_sha256: str, timeout: float,
                  config_text: str = "") -> dict[str, int]:
    """Wait (bounded) for the nodes, ask each to check its shards; {silo: node_id} or UserError."""
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < len(silos):
        if time.monotonic() > deadline:
            found = len(list(grid.get_node_ids()))
            raise UserError(
                f"only {found} of {len(silos)} silos' SuperNodes connected within {timeout:.0f} s; "
                f"start one per silo with `fedlm node --superlink HOST:PORT --workspace WS --silo NAME`"
            )
        time.sleep(0.5)
    nodes = list(grid.get_node_ids())
    config = ConfigRecord({"tokenizer-sha256": tokenizer_sha256})
    if config_text:  # lets each silo check its own privacy budget against its data before round 1
        config["fedlm-config"] = config_text
    msgs = [Message(RecordDict({"config": config}), node, "query", group_id="connect") for node in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())))
    node_of: dict[str, int] = {}
    for reply in replies:
        if reply.has_error():
            raise UserError(_reason(reply))
        name = str(reply.content.config_records["silo"]["silo"])
        if name in node_of:
            raise UserError(f"silo {name!r} is served by two SuperNodes; stop one of them")
        node_of[name] = reply.metadata.src_node_id
    missing = [s for s in silos if s not in node_of]
    if missing:
        raise UserError(
            f"silo {missing[0]!r} did not answer within {timeout:.0f} s (answered: {', '.join(sorted(node_of)) or 'none'}); "
            f"check its SuperNode (`fedlm node ... --silo {missing[0]}`) and its shards"
        )
    return {s: node_of[s] for s in silos}


# ---------------------------------------------------------------------------------------
# the rounds loop (the ServerApp's body on both engines)


def run_rounds(grid: Grid, cfg: Config, run_dir: Path, *, resume: bool = False,
               on_round: RoundCallback | None = None) -> dict[str, Any]:
    """Run the config's federated rounds over `grid`; writes the run directory, returns the summary."""
    fed = cfg.federation
    workspace = Path(cfg.data.workspace)
    tok_path = workspace / "tokenizer.json"
    tok_sha = tokenizer_hash(tok_path)
    silos = run_silos(cfg)
    if fed.min_silos > len(silos):
        raise UserError(f"federation.min_silos = {fed.min_silos} but the run has {len(silos)} silos; lower it")
    model = build_model(cfg, load_tokenizer(tok_path).get_vocab_size())
    names = wire_names(model)
    state = model.state_dict()
    global_state = {n: state[n].detach().clone() for n in names}
    expected = {n: tuple(t.shape) for n, t in global_state.items()}
    optimizer = make_server_optimizer(fed.strategy, tc=federated_train_config(cfg), shapes=expected,
                                      lr=fed.server_lr, beta1=fed.server_beta1, beta2=fed.server_beta2,
                                      tau=fed.server_tau)
    config_text = config_to_toml(cfg)  # vocab_size resolved: every silo builds the same model
    # names this run (the same after a resume) for silo state kept between rounds: top-k residuals
    run_id = hashlib.sha256(f"{config_text}{run_dir.resolve()}{run_dir.stat().st_ino}".encode()).hexdigest()[:16]

    ckpt_dir = run_dir / "checkpoint"
    rounds_path = run_dir / "rounds.jsonl"
    done = 0
    if resume:
        global_state, done = load_round(ckpt_dir, optimizer=optimizer)
        truncate_jsonl(rounds_path, key="round", upto=done)
    else:
        rounds_path.unlink(missing_ok=True)

    if fed.strategy == "cyclic":  # the weights pass from silo to silo: each update is seen alone
        clash = ("federation.secure_aggregation = true" if fed.secure_aggregation else
                 f"federation.aggregation = {fed.aggregation!r}" if fed.aggregation != "mean" else
                 f"privacy.mode = {cfg.privacy.mode!r}" if cfg.privacy.mode != "none" else None)
        if clash is not None:
            raise UserError(f"federation.strategy = \"cyclic\" sums the silos' updates made in turn and "
                            f"cannot be combined with {clash}, which works on a round's updates together; "
                            f"use strategy = \"fedavg\" for it")
    if fed.strategy == "fedsgd" and cfg.privacy.mode == "record":
        raise UserError("federation.strategy = \"fedsgd\" sends one gradient per round and cannot run "
                        "privacy.mode = \"record\" (DP-SGD's steps are the silo's own); use privacy.mode = "
                        "\"client\" (clipped gradients, noise on their sum) or strategy = \"fedavg\"")
    if fed.secure_aggregation:
        if fed.aggregation != "mean":
            raise UserError(f"federation.aggregation = {fed.aggregation!r} needs each silo's update, which "
                            "secure aggregation hides; use aggregation = \"mean\" or turn secure_aggregation off")
        per_round = num_sampled(len(silos), fed.fraction)
        if per_round < 2:
            raise UserError("federation.secure_aggregation needs at least 2 silos per round; raise federation.fraction")
        if per_round == 2:  # the server still sees only the sum
            log.warning("secure aggregation with 2 silos per round: each silo can subtract its own update from "
                        "the new global model and learn the other's; use 3 or more for privacy between silos")
    planned_tokens = fed.local_steps * cfg.train.grad_accum * cfg.train.batch_size * cfg.train.seq_len
    dp = RoundPrivacy.setup(cfg, silos, run_dir, resume=resume)  # refuses a budget that cannot fit
    node_of = connect_silos(grid, silos, tokenizer_sha256=tok_sha, timeout=fed.round_timeout,
                            config_text=config_text if dp is not None else "")
    t_run = time.perf_counter()
    last_loss = float("nan")
    for r in range(done, fed.rounds):
        t0 = time.perf_counter()
        sampled = sample_silos(silos, fraction=fed.fraction, round_idx=r, seed=cfg.train.seed)
        stopped: dict[str, str] = {}
        if dp is not None:  # a silo whose budget this round would overrun stops contributing
            sampled, stopped = dp.admit(sampled)
        config = ConfigRecord({"round": r, "fedlm-config": config_text, "tokenizer-sha256": tok_sha,
                               "weight-ref": float(planned_tokens), **(dp.config_entries() if dp else {})})
        config["run-id"] = run_id
        arrays = ArrayRecord(global_state)
        exchanged: Exchange = (None, {}, {}, {})
        if sampled and isinstance(optimizer, ServerOptimizer) and fed.strategy == "cyclic":
            exchanged = _cyclic_round(
                grid, r, sampled, node_of=node_of, arrays=arrays, config=config, expected=expected, cfg=cfg,
                carry=optimizer.carry)
        elif sampled:
            exchange = _secagg_round if fed.secure_aggregation else _plain_round
            exchanged = exchange(
                grid, r, sampled, node_of=node_of, arrays=arrays, config=config, expected=expected, cfg=cfg, dp=dp)
        agg, tokens_of, per_silo, dropped = exchanged
        dropped.update(stopped)
        if dp is not None and agg is not None:
            dp.spend(sorted(tokens_of), per_silo)
        for silo, why in sorted(dropped.items()):
            log.warning("round %d: silo %s dropped (%s)", r + 1, silo, why)
        completed = agg is not None
        if agg is not None:
            global_state = optimizer.apply(global_state, agg)
            tokens = sum(tokens_of.values())
            last_loss = sum(per_silo[s]["loss"] * n for s, n in tokens_of.items()) / tokens
        else:
            log.warning("round %d skipped: %d of the %d sampled silos sent usable updates, "
                        "federation.min_silos = %d", r + 1, len(tokens_of), len(sampled), fed.min_silos)
        save_round(ckpt_dir, global_state=global_state, optimizer=optimizer, round_idx=r + 1)
        seconds = time.perf_counter() - t0
        train_times = [per_silo[s].get("train_seconds", 0.0) for s in tokens_of]
        # the silos train side by side, or in turn under cyclic weight transfer
        slowest = sum(train_times) if fed.strategy == "cyclic" else max(train_times, default=0.0)
        row: dict[str, Any] = {
            "round": r + 1, "seconds": seconds, "completed": completed,
            "overhead_seconds": seconds - slowest if completed else None,
            "sampled": sampled, "silos": per_silo, "dropped": dropped,
            "loss": last_loss if completed else None,
        }
        if dp is not None:
            row["epsilon"] = dp.spent()
        append_jsonl(rounds_path, row)
        if on_round is not None:
            on_round(r + 1, fed.rounds, row)

    model.load_state_dict(expand_state(model, global_state))
    save_model(model, run_dir / "model", tokenizer_path=tok_path)
    summary = {
        "mode": "federated", "engine": fed.engine, "rounds": fed.rounds, "rounds_run": fed.rounds - done,
        "silos": silos, "strategy": fed.strategy, "loss": last_loss,
        "seconds": time.perf_counter() - t_run,
    }
    write_json(run_dir / "summary.json", summary)
    return summary


Exchange = tuple[dict[str, torch.Tensor] | None, dict[str, float], dict[str, dict[str, float]], dict[str, str]]
"""(aggregated update or None when the round is skipped, {counted silo: tokens}, per-silo log, dropped)."""


def _plain_round(grid: Grid, r: int, sampled: list[str], *, node_of: dict[str, int], arrays: ArrayRecord,
                 config: ConfigRecord, expected: dict[str, tuple[int, ...]], cfg: Config,
                 dp: RoundPrivacy | None = None) -> Exchange:
    """Send the global weights, collect and check the updates, aggregate the accepted ones."""
    fed = cfg.federation
    silo_of = {node: silo for silo, node in node_of.items()}
    msgs = [Message(RecordDict({"arrays": arrays, "config": config}), node_of[s], "train", group_id=str(r))
            for s in sampled]
    replies = list(grid.send_and_receive(msgs, timeout=fed.round_timeout))
    per_silo = {s: {"bytes_down": float(wire_bytes(m)), "bytes_up": 0.0} for s, m in zip(sampled, msgs, strict=True)}
    dropped: dict[str, str] = {}
    accepted: dict[str, tuple[dict[str, torch.Tensor], float]] = {}
    for reply in replies:
        silo = silo_of.get(reply.metadata.src_node_id)
        if silo is None or silo not in per_silo:
            continue
        got = _accept(reply, per_silo[silo], expected, fed.max_update_norm, codec=fed.compression)
        if isinstance(got, str):
            dropped[silo] = got
        else:
            accepted[silo] = got
    for silo in sampled:
        if silo not in dropped and silo not in accepted:
            dropped[silo] = f"timeout: no reply within {fed.round_timeout:g} s"
    tokens_of = {s: accepted[s][1] for s in sorted(accepted)}
    if len(accepted) < fed.min_silos:
        return None, tokens_of, per_silo, dropped
    order = sorted(accepted)  # a fixed order: the sum is bitwise the same on both engines
    if dp is not None and dp.plan is not None:  # client-level DP: clipped sum + central noise, unweighted
        return dp.noisy_mean([accepted[s][0] for s in order], round_idx=r), tokens_of, per_silo, dropped
    agg = aggregate([accepted[s][0] for s in order], [accepted[s][1] for s in order],
                    method=fed.aggregation, trim_fraction=fed.trim_fraction)
    return agg, tokens_of, per_silo, dropped


def _cyclic_round(grid: Grid, r: int, sampled: list[str], *, node_of: dict[str, int], arrays: ArrayRecord,
                  config: ConfigRecord, expected: dict[str, tuple[int, ...]], cfg: Config,
                  carry: dict[str, torch.Tensor]) -> Exchange:
    """Cyclic weight transfer: the sampled silos train in turn, each from the weights and the
    AdamW state (`carry`, updated in place) the last one left: one optimizer's run over the
    silos' data.

    The turn order is drawn from (seed, round). A silo that fails, times out (each turn waits
    at most `federation.round_timeout` seconds) or sends a rejected update is skipped: the
    next silo starts from the weights and state before it. The round's update is the sum of
    the accepted silos' updates, so with server_lr = 1 the new global model is the last silo's.
    """
    fed = cfg.federation
    start = arrays.to_torch_state_dict()
    state, passed = dict(start), dict(carry)  # committed to `carry` only if the round completes
    per_silo: dict[str, dict[str, float]] = {}
    dropped: dict[str, str] = {}
    tokens_of: dict[str, float] = {}
    for silo in cyclic_order(sampled, round_idx=r, seed=cfg.train.seed):
        content = RecordDict({"arrays": ArrayRecord(state), "config": config})
        if passed:
            content["optimizer"] = ArrayRecord(passed)
        msg = Message(content, node_of[silo], "train", group_id=str(r))
        replies = list(grid.send_and_receive([msg], timeout=fed.round_timeout))
        per_silo[silo] = {"bytes_down": float(wire_bytes(msg)), "bytes_up": 0.0}
        if not replies:
            dropped[silo] = f"timeout: no reply within {fed.round_timeout:g} s"
            continue
        got = _accept(replies[0], per_silo[silo], expected, fed.max_update_norm, codec=fed.compression,
                      extra=("optimizer",))
        if isinstance(got, str):
            dropped[silo] = got
            continue
        passed_on = replies[0].content.array_records["optimizer"].to_torch_state_dict()
        why = _check_carry(passed_on, expected)
        if why is not None:
            dropped[silo] = f"rejected: {why}"
            continue
        update, tokens_of[silo] = got
        state = {name: state[name] + update[name] for name in state}
        passed = passed_on
    if len(tokens_of) < fed.min_silos:
        return None, tokens_of, per_silo, dropped
    carry.clear()
    carry.update(passed)
    return {name: state[name] - start[name] for name in start}, tokens_of, per_silo, dropped


def _accept(reply: Message, log_row: dict[str, float], expected: dict[str, tuple[int, ...]], max_norm: float,
            *, codec: codecs.Codec, extra: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], float] | str:
    """A silo's train reply as (update, tokens), or why it is dropped; logs its bytes and metrics."""
    log_row["bytes_up"] = float(wire_bytes(reply))
    if reply.has_error():
        return f"failed: {_reason(reply)}"
    update, metrics, why = _read_update(reply, expected, max_norm, codec=codec, extra=extra)
    log_row.update(metrics)
    return f"rejected: {why}" if why is not None else (update, metrics["num_tokens"])


def _check_carry(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why a cyclic silo's optimizer state cannot be passed on (None: it can)."""
    if "step" not in state:
        return "optimizer state without a step"
    for key, t in state.items():
        kind, _, name = key.partition(".")
        if key != "step" and (kind not in ("exp_avg", "exp_avg_sq") or expected.get(name) != tuple(t.shape)):
            return f"optimizer state {key} does not fit the model"
        if not torch.isfinite(t).all():
            return f"non-finite optimizer state {key}"
    return None


def _secagg_round(grid: Grid, r: int, sampled: list[str], *, node_of: dict[str, int], arrays: ArrayRecord,
                  config: ConfigRecord, expected: dict[str, tuple[int, ...]], cfg: Config,
                  dp: RoundPrivacy | None = None) -> Exchange:
    """The same exchange under secure aggregation: four message stages; the server sees only the sum.

    Each silo masks weight × update with weight = its tokens / the planned tokens per round
    (public numbers), so the server divides the unmasked sum by the survivors' weights: the
    token-weighted mean, within the quantisation error. A silo that drops after sharing its
    keys is recovered from the others' shares. Updates are checked by the silos themselves
    (NaN/Inf, norm bound) before masking; the server checks the aggregate.
    """
    fed = cfg.federation
    silo_of = {node: silo for silo, node in node_of.items()}
    per_silo: dict[str, dict[str, float]] = {s: {"bytes_down": 0.0, "bytes_up": 0.0} for s in sampled}
    dropped: dict[str, str] = {}

    def stage(action: str, requests: dict[str, RecordDict]) -> dict[str, secagg.Msg]:
        msgs = {s: Message(rd, node_of[s], f"train.{action}", group_id=str(r)) for s, rd in requests.items()}
        replies = list(grid.send_and_receive(list(msgs.values()), timeout=fed.round_timeout))
        for s, m in msgs.items():
            per_silo[s]["bytes_down"] += wire_bytes(m)  # after sending: the grid measured it
        got: dict[str, secagg.Msg] = {}
        for reply in replies:
            silo = silo_of.get(reply.metadata.src_node_id)
            if silo is None or silo not in msgs:
                continue
            per_silo[silo]["bytes_up"] += wire_bytes(reply)
            if reply.has_error():
                dropped[silo] = f"failed at {action}: {_reason(reply)}"
                continue
            got[silo] = from_records(reply.content)
            if "metrics" in reply.content.metric_records:
                per_silo[silo].update({k: float(v) for k, v in reply.content.metric_records["metrics"].items()
                                       if isinstance(v, (int, float))})
        for s in msgs:
            if s not in got and s not in dropped:
                dropped[s] = f"timeout at {action}: no reply within {fed.round_timeout:g} s"
        return got

    clip = fed.max_update_norm if fed.max_update_norm > 0 else 1.0
    if dp is not None:  # client DP: each value is a clipped update plus a noise share
        clip = dp.secagg_clip_range(clip)
    dim = sum(math.prod(shape) for shape in expected.values())
    server = secagg.SecAggServer(sampled, dim=dim, clip_range=clip)
    tokens_of: dict[str, float] = {}
    try:
        replies = stage("secagg_setup", {s: to_records(server.setup_request()) for s in sampled})
        keys = server.receive_setup(replies)
        replies = stage("secagg_keys", {s: to_records(keys) for s in server.u1})
        inbox = server.receive_share_keys(replies)
        requests = {}
        for s in server.u2:
            requests[s] = to_records(inbox[s])
            requests[s]["arrays"], requests[s]["config"] = arrays, config
        replies = stage("secagg_input", requests)
        unmask = server.receive_masked_inputs(replies)
        replies = stage("secagg_unmask", {s: to_records(unmask) for s in server.u3})
        total = server.receive_unmask(replies)
    except secagg.SecAggError as e:
        log.warning("round %d: secure aggregation failed: %s", r + 1, e)
        return None, tokens_of, per_silo, dropped
    ref = float(config["weight-ref"])  # type: ignore[arg-type]
    tokens_of = {s: per_silo[s].get("num_tokens", float("nan")) for s in server.u3}
    weight_sum = sum(n / ref for n in tokens_of.values())
    if dp is not None and dp.plan is not None:  # client DP: the silos sent weight 1 (unweighted sum)
        weight_sum = float(len(server.u3))
    if len(server.u3) < fed.min_silos or not weight_sum > 0:
        return None, tokens_of, per_silo, dropped
    agg = secagg.unflatten(total / weight_sum, expected)
    why = check_update(agg, expected=expected, max_norm=0.0)
    if why is not None:
        log.warning("round %d: the securely aggregated update is unusable (%s)", r + 1, why)
        return None, tokens_of, per_silo, dropped
    return agg, tokens_of, per_silo, dropped


def _read_update(reply: Message, expected: dict[str, tuple[int, ...]], max_norm: float, *,
                 codec: codecs.Codec = "none", extra: tuple[str, ...] = ()
                 ) -> tuple[dict[str, torch.Tensor], dict[str, float], str | None]:
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


# ---------------------------------------------------------------------------------------
# the entry point for `fedlm train` with train.mode = "federated"


def run_federated(
    cfg: Config, out_dir: Path, *, resume: bool = False, on_round: RoundCallback | None = None,
    superlink: str | None = None, root_certificates: Path | None = None, insecure: bool = False,
    client_app: ClientApp | Callable[[Message, Context], Message] | None = None, on_wire: WireTap | None = None,
) -> dict[str, Any]:
    """Run a federated config on its engine; writes `out_dir` and returns the summary.

    engine "inprocess": every silo of `cfg.data.workspace` trains in this process (one torch
    thread each). engine "flower": starts a SuperLink and one SuperNode per silo on 127.0.0.1,
    or uses the running SuperLink `superlink` (HOST:PORT, with `root_certificates` or
    `insecure`), and submits the run with `flwr run`. `client_app` and `on_wire` are for
    tests (a silo that misbehaves; a tap on every message) and apply in process only.
    """
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)
    prepare_run_dir(cfg, out_dir, resume=resume)
    if cfg.federation.engine == "flower":
        # deploy starts processes: imported only when used
        from fedlm.federation.deploy import run_on_flower

        return run_on_flower(cfg, out_dir, resume=resume, on_round=on_round, superlink=superlink,
                             root_certificates=root_certificates, insecure=insecure)
    from fedlm.federation.client_app import app as default_app

    workspace = Path(cfg.data.workspace)
    silos = run_silos(cfg)
    nodes = {i + 1: {"workspace": str(workspace), "silo": s} for i, s in enumerate(silos)}
    grid = InProcessGrid(client_app or default_app, nodes, on_wire=on_wire)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_rounds(grid, cfg, out_dir, resume=resume, on_round=on_round)
    finally:
        grid.close()
        torch.set_num_threads(threads)
