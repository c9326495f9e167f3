"""The server's rounds loop over a Flower `Grid`: the ServerApp's body, the same on both engines.

    summary = run_rounds(grid, cfg, Path("runs/fed"), resume=False, on_round=print)

Before round 1 every silo is asked to check its shards (errors name the silo). Then each
round: sample silos from (seed, round), send them the global weights, let the exchange
(`fedlm.federation.exchanges`: plain, cyclic, or secure aggregation) collect and check their
updates, apply the server optimiser to the aggregate (with "fedsgd" the updates are
gradients and it is the trainer's AdamW), write the round checkpoint atomically and one
line to rounds.jsonl: who took part, loss, tokens, bytes each way, who dropped and why.

Rounds are numbered from 1 in rounds.jsonl, in the logs, on the wire and for `on_round`.
A run stopped anywhere resumes from its last round checkpoint and ends bitwise-equal to an
uninterrupted run: every silo's data order is seeded from (seed, silo, round) and the
sample from (seed, round).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from fedlm.config import Config, config_to_toml
from fedlm.data.tokenizer import tokenizer_hash
from fedlm.errors import UserError
from fedlm.federation import secagg, trust
from fedlm.federation.dp_rounds import RoundPrivacy
from fedlm.federation.exchanges import Link, RoundResult, cyclic_round, plain_round, secagg_round
from fedlm.federation.messages import error_reason, query_request, replied_silo, round_config
from fedlm.federation.rundir import RoundCallback, load_round, save_round, write_summary
from fedlm.federation.strategies import (
    ServerAdamW,
    ServerOptimizer,
    make_server_optimizer,
    num_sampled,
    sample_silos,
)
from fedlm.federation.task import expand_state, federated_train_config, planned_tokens, wire_names
from fedlm.federation.validation import validate_silos
from fedlm.federation.valuation import CoalitionModels
from fedlm.fileio import append_jsonl, truncate_jsonl
from fedlm.model import Transformer
from fedlm.resolve import resolve_config, resolve_silos
from fedlm.train import build_model, save_run_model

log = logging.getLogger("fedlm.federation")


@dataclass
class ServerRun:
    """What the server holds through a run's rounds."""

    cfg: Config  # resolved
    run_dir: Path
    silos: list[str]
    model: Transformer  # the global model's shape (and its frozen LoRA base)
    global_state: dict[str, torch.Tensor]  # the arrays that travel
    optimizer: ServerOptimizer | ServerAdamW
    config_text: str  # the resolved config as TOML: every silo builds the same model
    tokenizer_sha256: str
    run_id: str  # names this run (the same after a resume) for silo state kept between rounds
    dp: RoundPrivacy | None
    start_state: dict[str, torch.Tensor]  # the arrays that travel, as round 1 got them
    link: Link | None = None  # set once the silos are connected
    rounds_done: int = 0
    value: CoalitionModels | None = None  # federation.value = "rounds"


def run_rounds(grid: Grid, cfg: Config, run_dir: Path, *, resume: bool = False,
               on_round: RoundCallback | None = None, validate: bool = True) -> dict[str, Any]:
    """Run the config's federated rounds over `grid`; writes the run directory, returns the summary.
    `validate`: each silo scores the starting and final weights at the end (RUN/validation.json)."""
    run = start_run(cfg, run_dir, resume=resume)
    run.link = connect(grid, run)
    rounds = run.cfg.federation.rounds
    first = run.rounds_done
    if run.cfg.federation.value == "rounds":
        run.value = CoalitionModels.start_run(run)
    for round_no in range(first + 1, rounds + 1):
        row = one_round(run, round_no)
        append_jsonl(run_dir / "rounds.jsonl", row)
        if on_round is not None:
            on_round(round_no, rounds, row)
    if validate:
        validate_silos(run.link, run_dir, start=run.start_state, final=run.global_state,
                       config=round_config(round_no=rounds, config_text=run.config_text, run_id=run.run_id,
                                           tokenizer_sha256=run.tokenizer_sha256, weight_ref=planned_tokens(run.cfg)))
    if run.value is not None:
        run.value.finish(run)
    run.model.load_state_dict(expand_state(run.model, run.global_state))
    save_run_model(run.model, run.cfg, run_dir / "model", tokenizer_path=Path(run.cfg.data.workspace) / "tokenizer.json")
    return write_summary(run_dir, run.cfg, run.silos, rounds_run=rounds - first)


def start_run(cfg: Config, run_dir: Path, *, resume: bool) -> ServerRun:
    """The server's state before round 1, or after the rounds a resumed run has done."""
    cfg = resolve_config(cfg)
    fed = cfg.federation
    silos = resolve_silos(Path(cfg.data.workspace), cfg.data.silos, local=False)
    check_silo_count(cfg, len(silos))
    model = build_model(cfg)
    state = model.state_dict()
    global_state = {n: state[n].detach().clone() for n in wire_names(model)}
    optimizer = make_server_optimizer(fed.strategy, tc=federated_train_config(cfg),
                                      shapes={n: tuple(t.shape) for n, t in global_state.items()},
                                      lr=fed.server_lr, beta1=fed.server_beta1, beta2=fed.server_beta2,
                                      tau=fed.server_tau)
    text = config_to_toml(cfg)
    run_id = hashlib.sha256(f"{text}{run_dir.resolve()}{run_dir.stat().st_ino}".encode()).hexdigest()[:16]
    run = ServerRun(cfg=cfg, run_dir=run_dir, silos=silos, model=model, global_state=global_state,
                    start_state=dict(global_state), optimizer=optimizer, config_text=text,
                    tokenizer_sha256=tokenizer_hash(Path(cfg.data.workspace) / "tokenizer.json"),
                    run_id=run_id, dp=None)
    rounds_path = run_dir / "rounds.jsonl"
    if resume:
        run.global_state, run.rounds_done = load_round(run_dir / "checkpoint", optimizer=optimizer)
        truncate_jsonl(rounds_path, key="round", upto=run.rounds_done)
    else:
        rounds_path.unlink(missing_ok=True)
    run.dp = RoundPrivacy.setup(cfg, silos, run_dir, resume=resume)  # refuses a budget that cannot fit
    return run


def check_silo_count(cfg: Config, num_silos: int) -> None:
    """Refuse what the number of silos makes impossible (the checks that depend on the workspace;
    those on the config alone are `Config.validate`'s)."""
    fed = cfg.federation
    if fed.min_silos > num_silos:
        raise UserError(f"federation.min_silos = {fed.min_silos} but the run has {num_silos} silos; lower it")
    if fed.secure_aggregation:
        secagg.check_round_size(num_sampled(num_silos, fed.fraction))


def connect(grid: Grid, run: ServerRun) -> Link:
    """Connect the run's silos (`connect_silos`) and fix how rounds reach and judge them."""
    fed = run.cfg.federation
    node_of = connect_silos(grid, run.silos, tokenizer_sha256=run.tokenizer_sha256, timeout=fed.round_timeout,
                            config_text=run.config_text)
    return Link(grid, node_of, {n: tuple(t.shape) for n, t in run.global_state.items()}, timeout=fed.round_timeout,
                min_silos=fed.min_silos, max_update_norm=fed.max_update_norm, codec=fed.compression)


def connect_silos(grid: Grid, silos: list[str], *, tokenizer_sha256: str, timeout: float,
                  config_text: str = "") -> dict[str, int]:
    """Wait (bounded) for the silos' nodes, ask each to check its shards; {silo: node_id} or UserError.

    `config_text` lets each silo check the run against its own privacy policy (and its DP budget
    against its data) before round 1.
    Across organisations a node's silo is the one the coordinator registered its key for
    (`trust.registered_nodes`), not the name it claims; a node serving no configured silo gets
    no work and is logged, and does not stop the run."""
    registry = trust.registered_nodes()  # None: one machine, every node started by this user
    deadline = time.monotonic() + timeout
    while waiting := trust.silos_waiting(grid.get_node_ids(), silos, registry):
        if time.monotonic() > deadline:
            raise UserError(
                f"{waiting} within {timeout:.0f} s; start one per silo with "
                f"`fedlm node --superlink HOST:PORT --workspace WS --silo NAME --key KEY ...`"
            )
        time.sleep(0.5)
    nodes, idle = trust.working_nodes(grid.get_node_ids(), silos, registry)
    for node, why in idle.items():  # a registered silo outside this run (a coalition's, say) is no news
        log.log(logging.INFO if registry and node in registry else logging.WARNING,
                "SuperNode %d gets no work: %s", node, why)
    msgs = [query_request(node, tokenizer_sha256=tokenizer_sha256, config_text=config_text) for node in nodes]
    replies = list(grid.send_and_receive(msgs, timeout=max(1.0, deadline - time.monotonic())))
    node_of: dict[str, int] = {}
    failed: dict[str, str] = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        claimed = None if reply.has_error() else replied_silo(reply)
        name = claimed if registry is None else registry[node]
        if reply.has_error():
            failed[name or f"SuperNode {node}"] = error_reason(reply)
        elif claimed != name or name not in silos:
            log.warning("SuperNode %d gets no work: it serves silo %r, %s", node, claimed,
                        f"but is registered for {name!r}" if claimed != name else "which this run does not train")
        elif name in node_of:  # only without a registry: the coordinator binds one key to one silo
            raise UserError(f"silo {name!r} is served by two SuperNodes; stop one of them")
        else:
            node_of[name] = node
    missing = [s for s in silos if s not in node_of]
    if missing:  # one reason, once: a node that failed without naming its silo may well be the missing one
        unnamed = [why for name, why in failed.items() if registry is None and name not in silos]
        raise UserError(failed.get(missing[0]) or next(iter(unnamed), None) or
            f"silo {missing[0]!r} did not answer within {timeout:.0f} s (answered: {', '.join(sorted(node_of)) or 'none'}); "
            f"check its SuperNode (`fedlm node ... --silo {missing[0]}`) and its shards"
        )
    for name, why in failed.items():
        if name not in silos:
            log.warning("%s gets no work: %s", name, why)
    return {s: node_of[s] for s in silos}


def one_round(run: ServerRun, round_no: int) -> dict[str, Any]:
    """Round `round_no` (from 1): sample, exchange, apply, checkpoint; returns its rounds.jsonl row."""
    cfg, dp = run.cfg, run.dp
    t0 = time.perf_counter()
    sampled = sample_silos(run.silos, fraction=cfg.federation.fraction, round_idx=round_no - 1, seed=cfg.train.seed)
    stopped: dict[str, str] = {}
    if dp is not None:  # a silo whose budget this round would overrun stops contributing
        sampled, stopped = dp.admit(sampled)
    result = exchange(run, round_no, sampled)
    result.dropped.update(stopped)
    if dp is not None and result.update is not None:
        dp.spend(sorted(result.tokens), result.silos)
    for silo, why in sorted(result.dropped.items()):
        log.warning("round %d: silo %s dropped (%s)", round_no, silo, why)
    if result.update is not None:
        run.global_state = run.optimizer.apply(run.global_state, result.update)
    else:
        log.warning("round %d skipped: %d of the %d sampled silos sent usable updates, "
                    "federation.min_silos = %d", round_no, len(result.tokens), len(sampled), cfg.federation.min_silos)
    if run.value is not None:
        run.value.observe(result, cfg)
    save_round(run.run_dir / "checkpoint", global_state=run.global_state, optimizer=run.optimizer,
               rounds_done=round_no)
    run.rounds_done = round_no
    return round_row(run, round_no, sampled, result, seconds=time.perf_counter() - t0)


def exchange(run: ServerRun, round_no: int, sampled: list[str]) -> RoundResult:
    """The round's exchange with the sampled silos, by strategy and secure aggregation."""
    cfg, dp, link = run.cfg, run.dp, run.link
    assert link is not None, "connect the silos first"
    if not sampled:
        return RoundResult(None)
    fed = cfg.federation
    weight_ref = float(planned_tokens(cfg))
    config = round_config(round_no=round_no, config_text=run.config_text, tokenizer_sha256=run.tokenizer_sha256,
                          weight_ref=weight_ref, run_id=run.run_id, privacy=dp.config_entries() if dp else None)
    arrays = ArrayRecord(run.global_state)
    if isinstance(run.optimizer, ServerOptimizer) and fed.strategy == "cyclic":
        return cyclic_round(link, round_no, sampled, arrays, config, seed=cfg.train.seed, carry=run.optimizer.carry)
    if fed.secure_aggregation:
        return secagg_round(link, round_no, sampled, arrays, config, weight_ref=weight_ref, dp=dp)
    return plain_round(link, round_no, sampled, arrays, config, aggregation=fed.aggregation,
                       trim_fraction=fed.trim_fraction, dp=dp)


def round_row(run: ServerRun, round_no: int, sampled: list[str], result: RoundResult, *,
              seconds: float) -> dict[str, Any]:
    """The round's rounds.jsonl row."""
    completed = result.update is not None
    train_times = [result.silos[s].get("train_seconds", 0.0) for s in result.tokens]
    # the silos train side by side, or in turn under cyclic weight transfer
    slowest = sum(train_times) if run.cfg.federation.strategy == "cyclic" else max(train_times, default=0.0)
    loss = None
    if completed:
        tokens = sum(result.tokens.values())
        loss = sum(result.silos[s]["loss"] * n for s, n in result.tokens.items()) / tokens
    row: dict[str, Any] = {
        "round": round_no, "seconds": seconds, "completed": completed,
        "overhead_seconds": seconds - slowest if completed else None,
        "sampled": sampled, "silos": result.silos, "dropped": result.dropped, "loss": loss,
    }
    if run.dp is not None:
        row["epsilon"] = run.dp.spent()
    return row
