"""Valuation's federation side: silos score models where their data is, and `federation.value =
"rounds"` rebuilds every coalition's model inside the run from each round's per-silo updates.

    scores = score_on_silos(link.grid, link.node_of, {"a": [m0, m1], "b": [m0, m1]}, config_text=text,
                            tokenizer_sha256=sha, max_tokens=4096, timeout=600.0)   # {silo: Scores}
    tracker = CoalitionModels.start(run)          # before the first round (rounds.py's hook)
    tracker.observe(result)                        # after each round's exchange
    tracker.finish(run.link, final_state)          # scores every coalition -> RUN/value_rounds.json

Scoring (message `evaluate.value`): the server sends models in wire names; the silo loads each
into the run's model, scores it on the start of its own validation split (never trained on; on
a chat silo, the answers of its held-out conversations) and replies with one bits-per-byte
number per model and how many tokens it scored. No text,
no token ids, no per-token losses leave the silo. Asked for its local-only baseline (the gain of
joining), the silo first trains the run's config on its own data alone (`local_config`) and
scores that model too: the model never leaves it, only its number does, which its scoring cap
counts and (record-level DP) its own ledger charges, or refuses alone (the reply says why).

In-run valuation (`CoalitionModels`): the server keeps every coalition's model, stepped each
round on that round's updates of its members; the empty coalition's model is the global model
before the first round, the grand one's the run's final model, so the Shapley values sum to
what the run gained. Every beneficiary silo scores all 2^n
models once, at the end. This shows every silo's update to the server each round, and to every
scoring silo the one-silo coalition models, from which that silo's summed updates follow:
`record_disclosure` states it in RUN/privacy.json.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import shutil
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedlm.config import Config, config_to_toml
from fedlm.data.shards import open_chat, open_split
from fedlm.data.tokenizer import load_tokenizer, token_byte_lengths
from fedlm.device import native_bf16
from fedlm.errors import UserError, foreign_text
from fedlm.evaluate import answer_nll, eval_windows, evaluate_tokens, held_out_questions
from fedlm.federation.messages import error_reason, parse_config
from fedlm.federation.robust import update_norm
from fedlm.federation.silo_privacy import (
    LOCAL_BASELINE_ROUND,
    BudgetSpent,
    SiloPrivacy,
    charge_scores,
)
from fedlm.federation.strategies import ServerAdamW, ServerOptimizer, make_server_optimizer
from fedlm.federation.task import (
    check_run,
    check_silo,
    expand_state,
    federated_train_config,
    silo_record_plan,
)
from fedlm.fileio import write_json
from fedlm.model import Transformer
from fedlm.modelio import ADAPTERS, WEIGHTS, read_safetensors
from fedlm.train import build_model, train

if TYPE_CHECKING:
    from fedlm.federation.exchanges import RoundResult
    from fedlm.federation.rounds import ServerRun

log = logging.getLogger("fedlm.federation")

State = dict[str, torch.Tensor]
CHUNK = 8  # models per scoring message: a silo holds at most this many at once
SCORE_BF16 = ("a silo whose CPU has bf16 units scores a train.precision = \"bf16\" run's models in bf16 weights: "
              "~3x faster than fp32, and its bits/byte within ~1% of fp32's (SmolLM2 LoRA, 333 answer tokens)")
ROUNDS_FILE = "value_rounds.json"


# ---------------------------------------------------------------------------------------
# scoring: the silo side


@dataclass
class Scores:
    """One silo's answer: bits per byte of each model sent, over `tokens` validation tokens; asked for its
    local-only baseline, that score first, or NaN and the silo's reason in `refused`."""

    bits_per_byte: list[float]
    tokens: int
    refused: str = ""


@dataclass
class _Split:
    """What a silo scores models on, read once per run config: the model to load weights into, the
    start of its validation split and the UTF-8 bytes of each token id."""

    model: Transformer
    tokens: np.ndarray  # the split's first max_tokens + 1 tokens (the targets after the first)
    token_bytes: np.ndarray
    seq_len: int
    rows: int  # windows a batch
    convs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
    """A chat silo's held-out conversations whose tokens fit max_tokens (at least one): scored on their
    answers only, what tuning trains on (the prompts are never trained on, and their bits per byte may
    rise while the answers' fall)."""

    def score(self) -> tuple[float, int]:
        """(bits per byte, tokens scored) of the loaded model."""
        if self.convs:
            nll, n_bytes = answer_nll(self.model, self.convs, self.token_bytes, batch_size=self.rows)
            return nll / math.log(2) / max(n_bytes, 1), sum(int(mask[1:].sum()) for _, mask, _ in self.convs)
        got = evaluate_tokens(self.model, self.tokens, self.token_bytes, seq_len=self.seq_len, batch_size=self.rows)
        return float(got["bits_per_byte"]), int(got["tokens"])


_SPLITS: dict[tuple[str, ...], _Split] = {}  # one per (silo, config, tokenizer, max_tokens, val file)
_SPLITS_LOCK = threading.Lock()  # in process, every silo's worker thread scores at once: one model each


def _split(path: Path, config_text: str, sha: str, max_tokens: int) -> _Split:
    """Silo `path`'s scoring inputs, loaded on its first message and kept (keyed by the val file's
    size and mtime too, so reshared shards are read again)."""
    check_silo(path, tokenizer_sha256=sha)
    stat = (path / "val.bin").stat()
    key = (str(path), config_text, sha, str(max_tokens), str(stat.st_size), str(stat.st_mtime_ns))
    with _SPLITS_LOCK:
        got = _SPLITS.get(key)
        if got is None:
            if len(_SPLITS) > 64:
                _SPLITS.clear()
            cfg = parse_config(config_text)
            model = build_model(cfg)
            if cfg.train.precision == "bf16" and native_bf16(torch.device("cpu")):  # SCORE_BF16
                # a copy: a LoRA model's frozen base IS the pretrained cache's, which casting in place would
                # turn to bf16 for every model built from it after (deepcopy keeps tied arrays tied)
                model = copy.deepcopy(model).to(torch.bfloat16)
            split = open_split(path, "val", expect_tokenizer_sha256=sha)
            tokens = np.array(split[: max_tokens + 1] if max_tokens > 0 else split)
            seq_len, rows = eval_windows(model)
            token_bytes = token_byte_lengths(load_tokenizer(path.parent.parent / "tokenizer.json"))
            chat = open_chat(path, "val")
            convs = held_out_questions(split, chat) if chat is not None else None
            if convs and max_tokens > 0:
                sizes = np.cumsum([ids.size for ids, _, _ in convs])
                convs = convs[: max(1, int(np.searchsorted(sizes, max_tokens, side="right")))]
            got = _SPLITS[key] = _Split(model, tokens, token_bytes, seq_len, rows, convs or None)
    return got


def local_config(cfg: Config, silo: str) -> Config:
    """Silo `silo` alone with the run's per-silo budget: the federated schedule's steps, its batch; under
    client-level DP without noise (it protects a silo inside a federation; alone, from nobody)."""
    tc = federated_train_config(cfg)
    tc = dataclasses.replace(tc, mode="centralised", checkpoint_every=tc.steps, log_every=max(1, tc.steps // 10))
    privacy = dataclasses.replace(cfg.privacy, mode="none") if cfg.privacy.mode == "client" else cfg.privacy
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, silos=[silo]), train=tc, privacy=privacy,
                               federation=dataclasses.replace(cfg.federation, value="none"))


def _local_arrays(path: Path, config_text: str) -> State:
    """Train silo `path`'s local-only model here, on its own shards (the run's config, this workspace),
    and return its arrays as they travel; the run folder is removed after.

    Under record-level DP it is DP-SGD on the silo's data, so its score is another release of that
    data: the silo's own ledger charges it (`SiloPrivacy.charge`: the lifetime ledger under a DP
    policy in its privacy.toml, else the baseline config's own) before any step, with the plan of the
    silo's part of the run, and refuses it past the target (UserError). Its noise stream is named by
    that release, so the same request again trains the same model and releases nothing new."""
    run_cfg = parse_config(config_text)
    local = local_config(run_cfg, path.name)
    stream = None
    if run_cfg.privacy.mode == "record":
        rules = SiloPrivacy(run_cfg, path, config_text=config_to_toml(local), round_idx=LOCAL_BASELINE_ROUND, arrays={})
        plan = silo_record_plan(run_cfg, path, open_split(path, "train"))
        rules.charge((plan.noise_multiplier, plan.sample_rate, local.train.steps))
        stream = rules.release
    local = dataclasses.replace(local, data=dataclasses.replace(local.data, workspace=str(path.parent.parent)))
    out = Path(tempfile.mkdtemp(prefix=f"fedlm-local-{path.name}-"))
    try:
        train(local, out / "run", noise_stream=stream)
        model = out / "run" / "model"
        return read_safetensors(model / ADAPTERS if (model / ADAPTERS).is_file() else model / WEIGHTS)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def score_reply(msg: Message, path: Path) -> Message:
    """Score the models of an `evaluate.value` message on silo `path`'s validation split (as
    `evaluate_silo` does, with the split and tokenizer read once, not once per model); asked for
    ("local-baseline"), its local-only model first, trained here (metric "bpb-local"), or, where the
    silo's own ledger refuses that release, why not (config record "refused") beside the other scores."""
    record = msg.content.config_records["config"]
    text = str(record["fedlm-config"])
    models: list[State] = [dict(msg.content.array_records[f"model-{i}"].to_torch_state_dict())
                           for i in range(int(record["models"]))]  # type: ignore[arg-type]
    names = [f"bpb-{i}" for i in range(len(models))]
    local = bool(int(record.get("local-baseline", 0)))  # type: ignore[arg-type]
    check_run(parse_config(text), path)  # before anything is loaded, trained or counted
    charge_scores(path, len(models) + local)  # its local-only model's score is a number about its data too
    refused: dict[str, str] = {}
    if local:
        try:
            models, names = [_local_arrays(path, text), *models], ["bpb-local", *names]
        except BudgetSpent as e:
            refused["local-baseline"] = str(e)
            charge_scores(path, -1)  # not scored after all
    split = _split(path, text, str(record["tokenizer-sha256"]), int(record["max-tokens"]))  # type: ignore[arg-type]
    torch.set_num_threads(1)
    metrics: dict[str, float] = {}
    tokens = 0
    for name, arrays in zip(names, models, strict=True):
        split.model.load_state_dict(expand_state(split.model, arrays))
        metrics[name], tokens = split.score()
    metrics["tokens"] = float(tokens)
    content = RecordDict({"metrics": MetricRecord(metrics)})  # type: ignore[arg-type]
    if refused:
        content["refused"] = ConfigRecord(refused)  # type: ignore[arg-type]
    return Message(content, reply_to=msg)


# ---------------------------------------------------------------------------------------
# scoring: the server side


def _request(node: int, models: list[ArrayRecord], *, config_text: str, tokenizer_sha256: str, max_tokens: int,
             local_baseline: bool = False) -> Message:
    content = RecordDict({"config": ConfigRecord({"fedlm-config": config_text, "tokenizer-sha256": tokenizer_sha256,
                                                  "max-tokens": max_tokens, "models": len(models),
                                                  "local-baseline": int(local_baseline)})})
    for i, record in enumerate(models):
        content[f"model-{i}"] = record
    return Message(content, node, "evaluate.value", group_id="value")


def _read(reply: Message, count: int, silo: str, *, local_baseline: bool = False) -> tuple[list[float], int, str]:
    """A silo's scores: one per model sent, after its local-only model's when asked for (NaN where the silo
    refused to train it, and its reason)."""
    if reply.has_error():
        raise UserError(f"silo {silo!r} could not score the valuation's models: {error_reason(reply)}")
    m = reply.content.metric_records.get("metrics")
    why = reply.content.config_records.get("refused")
    refused = foreign_text(str(why.get("local-baseline", ""))) if why is not None and local_baseline else ""
    names = [*(["bpb-local"] if local_baseline and not refused else []), *(f"bpb-{i}" for i in range(count))]
    if m is None or set(m.keys()) != {*names, "tokens"}:
        raise UserError(f"silo {silo!r} sent a malformed valuation reply")
    values = [float(m[name]) for name in names]  # type: ignore[arg-type]
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise UserError(f"silo {silo!r} sent a bits-per-byte that is not a finite number >= 0")
    return ([math.nan] if refused else []) + values, int(m["tokens"]), refused  # type: ignore[arg-type]


def score_on_silos(grid: Grid, node_of: Mapping[str, int], models: Mapping[str, list[State]], *,
                   config_text: str, tokenizer_sha256: str, max_tokens: int, timeout: float,
                   local_baseline: bool = False) -> dict[str, Scores]:
    """Each silo of `models` scores its list of models on its own validation split (all silos at
    once, CHUNK models per message); UserError naming a silo that fails or does not answer.
    `local_baseline`: each silo first trains and scores its local-only model, whose score comes
    first in its list (give `timeout` room for that training)."""
    out = {silo: Scores([], 0) for silo in models}
    longest = max((len(m) for m in models.values()), default=0)
    for start in range(0, max(longest, local_baseline), CHUNK):
        local = local_baseline and start == 0  # then every silo has its baseline to train, even with no model sent
        batch = {s: m[start:start + CHUNK] for s, m in models.items() if m[start:start + CHUNK] or local}
        records: dict[int, ArrayRecord] = {}  # one record per model: the silos' messages share it (hashed once)
        for state in (st for ms in batch.values() for st in ms):
            if id(state) not in records:
                records[id(state)] = ArrayRecord({k: v.contiguous() for k, v in state.items()})
        msgs = {s: _request(node_of[s], [records[id(st)] for st in ms], config_text=config_text,
                            tokenizer_sha256=tokenizer_sha256, max_tokens=max_tokens, local_baseline=local)
                for s, ms in batch.items()}
        replies = {r.metadata.src_node_id: r for r in grid.send_and_receive(list(msgs.values()), timeout=timeout)}
        for silo, ms in batch.items():
            reply = replies.get(node_of[silo])
            if reply is None:
                raise UserError(f"silo {silo!r} did not score the valuation's models within {timeout:g} s")
            values, out[silo].tokens, refused = _read(reply, len(ms), silo, local_baseline=local)
            out[silo].bits_per_byte += values
            out[silo].refused = out[silo].refused or refused
    return out


# ---------------------------------------------------------------------------------------
# in-run valuation: every coalition's model, stepped each round on its members' updates


def coalition_key(coalition: frozenset[str] | list[str] | tuple[str, ...]) -> str:
    """A coalition's name in value files: its silos sorted, joined by '+' ('' for none)."""
    return "+".join(sorted(coalition))


def _clip_rows(rows: State, count: int, max_norm: float) -> None:
    """Clip each coalition's aggregate (row block c of every array) to global norm `max_norm`, in place,
    as the run's ServerAdamW clips its one aggregate (torch's clip_grad_norm_ formula)."""
    sq = sum(t.view(count, -1).double().pow(2).sum(1) for t in rows.values())
    coef = (max_norm / (torch.as_tensor(sq).sqrt() + 1e-6)).clamp(max=1.0).float()
    for t in rows.values():
        t.view(count, -1).mul_(coef[:, None])


@dataclass
class CoalitionModels:
    """Every proper coalition's model through a run, rebuilt each round from that round's per-silo
    updates with the run's own server optimiser (the rounds hook; no retraining).

    Coalition S's model starts from the global model before the first round valued, and every
    round takes one step of its own server optimiser (a copy of the run's kind: FedAvg's η Δ,
    FedAdam/FedYogi's moments, fedsgd's clipped AdamW with the run's schedule) on the token-weighted
    mean of S's accepted updates of that round (zero when none of S counted): the run as if only
    S had sent updates, except that each update was computed at the run's global weights (Song
    et al. 2019's multi-round reconstruction; GTG-Shapley values each round's steps the same way).
    All coalitions are held as one array of stacked blocks, so a round is one optimiser step.
    """

    run_dir: Path
    silos: list[str]
    start: State  # the run's starting model (what utility is measured from)
    begin: State  # the global model when valuation began (the empty coalition's model)
    coalitions: list[frozenset[str]]  # the proper, non-empty coalitions: the blocks' order
    stacked: State  # name -> (len(coalitions) * shape[0], *shape[1:]): every coalition's model
    optimizer: ServerOptimizer | ServerAdamW  # the run's kind, over the stacked arrays
    first_round: int
    norms: dict[str, list[float]]  # each silo's update norm per round it counted in
    seconds: float = 0.0  # time the server spent on valuation during the rounds

    @classmethod
    def start_run(cls, run: ServerRun) -> CoalitionModels:
        """Valuation for `run` from its current global model (before its first round to run;
        `run.model` still holds the starting weights then)."""
        t0 = time.perf_counter()
        fed, silos = run.cfg.federation, list(run.silos)
        start = {n: t.detach().clone() for n, t in run.model.state_dict().items() if n in run.global_state}
        proper = [frozenset(c) for k in range(1, len(silos)) for c in combinations(silos, k)]
        count = len(proper)
        check_memory(run.global_state, count, fed.strategy)
        stacked = {n: t.repeat(count, *([1] * (t.dim() - 1))) for n, t in run.global_state.items()}
        tc = dataclasses.replace(federated_train_config(run.cfg), grad_clip=0.0)  # clipped per coalition here
        optimizer = make_server_optimizer(fed.strategy, tc=tc, shapes={n: tuple(t.shape) for n, t in stacked.items()},
                                          lr=fed.server_lr, beta1=fed.server_beta1, beta2=fed.server_beta2,
                                          tau=fed.server_tau)
        if run.rounds_done:  # resumed: the coalitions start from the run's optimiser state, as from its weights
            optimizer.load_state_dict({k: t.repeat(count, *([1] * (t.dim() - 1))) if t.dim() else t
                                       for k, t in run.optimizer.state_dict().items()})
        (run.run_dir / ROUNDS_FILE).unlink(missing_ok=True)  # an earlier run's, in this folder
        record_disclosure(run.run_dir)
        return cls(run.run_dir, silos, start, dict(run.global_state), proper, stacked, optimizer,
                   run.rounds_done + 1, {s: [] for s in silos}, time.perf_counter() - t0)

    def observe(self, result: RoundResult, cfg: Config) -> None:
        """Step every coalition on its members' accepted updates of this round."""
        t0 = time.perf_counter()
        updates, tokens = result.updates, result.tokens
        counted = sorted(updates)
        for silo in counted:
            self.norms[silo].append(update_norm(updates[silo]))
        if result.update is not None and counted:
            coef = torch.zeros(len(self.coalitions), len(counted))
            for c, members in enumerate(self.coalitions):
                total = sum(tokens[s] for s in counted if s in members)
                for k, s in enumerate(counted):
                    if s in members:
                        coef[c, k] = tokens[s] / total
            rows = {n: torch.einsum("ck,k...->c...", coef, torch.stack([updates[s][n].float() for s in counted]))
                    .reshape(self.stacked[n].shape) for n in self.stacked}
            if isinstance(self.optimizer, ServerAdamW) and cfg.train.grad_clip > 0:
                _clip_rows(rows, len(self.coalitions), cfg.train.grad_clip)
            self.stacked = self.optimizer.apply(self.stacked, rows)
        record_disclosure(self.run_dir)  # a DP ledger rewrites privacy.json every round
        self.seconds += time.perf_counter() - t0

    def models(self, final: State) -> dict[frozenset[str], State]:
        """Every coalition's model: the empty one's is `begin`, the grand one's the run's `final`."""
        count = len(self.coalitions)
        out: dict[frozenset[str], State] = {frozenset(): self.begin}
        for c, members in enumerate(self.coalitions):
            out[members] = {n: t.view(count, *self.begin[n].shape)[c] for n, t in self.stacked.items()}
        out[frozenset(self.silos)] = final
        return out

    def finish(self, run: ServerRun) -> None:
        """Every beneficiary scores the start model and every coalition's; writes RUN/value_rounds.json
        (bits per byte per coalition and silo)."""
        t0 = time.perf_counter()
        cfg, link = run.cfg, run.link
        assert link is not None, "connect the silos first"
        models = self.models(run.global_state)
        beneficiaries = cfg.value.beneficiaries or self.silos
        # valued from round 1, the empty coalition's model is the start model: scored once
        first = 0 if all(torch.equal(self.start[n], t) for n, t in self.begin.items()) else 1
        sent = [*([self.start] if first else []), *models.values()]
        scores = score_on_silos(link.grid, link.node_of, dict.fromkeys(beneficiaries, sent),
                                config_text=run.config_text, tokenizer_sha256=run.tokenizer_sha256,
                                max_tokens=cfg.value.eval_tokens, timeout=link.timeout)
        write_json(self.run_dir / ROUNDS_FILE, {
            "method": "rounds", "silos": self.silos, "rounds": [self.first_round, cfg.federation.rounds],
            "start_bits_per_byte": {s: sc.bits_per_byte[0] for s, sc in scores.items()},
            "tokens": {s: sc.tokens for s, sc in scores.items()},
            "bits_per_byte": {coalition_key(c): {s: sc.bits_per_byte[first + i] for s, sc in scores.items()}
                              for i, c in enumerate(models)},
            "update_norms": self.norms, "seconds": self.seconds + time.perf_counter() - t0,
            "round_seconds": self.seconds, "scoring_seconds": time.perf_counter() - t0,
        })
        self.stacked.clear()

COPIES = {"fedsgd": 5, "fedadam": 4, "fedyogi": 4}
"""Arrays per coalition model the server holds (the weights, a round's aggregate, the optimiser's
state: AdamW's gradient and two moments, FedAdam/FedYogi's two moments); other strategies: 2."""


def check_memory(state: State, count: int, strategy: str) -> None:
    """UserError before round 1 when `count` coalition models of `state`'s arrays would not fit in
    the memory this machine has available (2^n - 2 of them: it doubles with every silo)."""
    need = count * sum(t.numel() * 4 for t in state.values()) * COPIES.get(strategy, 2)  # fp32
    available = psutil.virtual_memory().available
    if need > available:
        raise UserError(f"federation.value = \"rounds\" would keep {count} coalition models on the server "
                        f"({need / 2**30:.1f} GiB with the {strategy} optimiser's state), more than the "
                        f"{available / 2**30:.1f} GiB this machine has available; set federation.value = \"none\" "
                        f"and value the finished run with `fedlm value RUN --method sampled` (one coalition "
                        f"retrained at a time), or train LoRA adapters (`[lora]`), whose coalition models are small")


def record_disclosure(run_dir: Path) -> None:
    """Say in RUN/privacy.json who saw what because of in-run valuation (kept beside any DP ledger)."""
    path = run_dir / "privacy.json"
    try:
        record = json.loads(path.read_text()) if path.exists() else {"mode": "none"}
    except (OSError, ValueError):
        record = {"mode": "none"}
    if "valuation" in record:
        return
    record["valuation"] = {
        "method": "rounds (federation.value)",
        "server_saw": "every silo's individual update, every round (as without secure aggregation)",
        "silos_saw": "every coalition's model, including each one-silo coalition's: from the start model and "
                     "a one-silo model, any scoring silo can compute that silo's updates summed over the run",
        "silos_sent": "one bits-per-byte number per model on their own validation split, and its token count",
    }
    write_json(path, record)


def read_rounds_value(run_dir: Path) -> dict[str, Any]:
    """RUN/value_rounds.json, or UserError saying how to get one."""
    path = run_dir / ROUNDS_FILE
    if not path.exists():
        raise UserError(f"{run_dir}: no in-run valuation ({ROUNDS_FILE}); the run had federation.value = \"none\": "
                        f"use --method exact or sampled, or train with --set federation.value=\"rounds\"")
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({e}); value the run with --method exact or sampled") from None
