"""`fedlm value RUN`: what each silo of a finished federated run contributed and gained -> RUN/value.json.

    body = value_run(Path("runs/fed"), method="exact", budget=1000.0)   # writes runs/fed/value.json
    console.print(value_table(body))          # and parts_table(body) when paid by the others

Every model is scored where the data is: each beneficiary silo loads it and returns one
bits-per-byte number on its own validation split (`fedlm.federation.valuation`), through the
same ClientApp as the run. The methods:

- exact: the run's config retrained on every coalition of silos (the grand coalition is the
  run itself unless `rounds`/`local_steps` reduce the budget, which the output then says),
  exact Shapley and leave-one-out;
- sampled: the same retraining, on the coalitions that random permutations of the silos visit
  (truncated once a coalition is within `truncation` of the grand utility), sampled until every
  silo's standard error is within `tolerance` of the grand utility's gain;
- rounds: the coalition models the run rebuilt from its per-round updates (federation.value =
  "rounds"), no retraining.

Retrained coalitions run under the run's secure aggregation and DP settings (secure aggregation
needs 3 silos a round: smaller coalitions run without it, and the output says so): in process
when the silos' data is on this machine, or, with `grid` (`fedlm value --superlink`: the
ServerApp of a Flower run, `fedlm.value.app`), on the silos' own SuperNodes, as the run itself
trained. Gain: each silo's own bits/byte with its local-only model (the run's
per-silo budget, trained by the silo alone, which keeps it) minus with the federated (and
personalised) model. Work goes to a temporary folder inside RUN, removed at the end;
value.json is written once, atomically. Each retrained coalition's scores are kept as it finishes
(`fedlm.value.kept`), so a call that stops goes on where it stopped when run again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from rich.table import Table

from fedlm.config import Config, config_to_toml, load_config
from fedlm.data.tokenizer import tokenizer_hash
from fedlm.errors import UserError
from fedlm.federation import secagg
from fedlm.federation.client_app import app as client_app
from fedlm.federation.grid import InProcessGrid
from fedlm.federation.outcome import dropouts
from fedlm.federation.rounds import connect_silos, run_rounds
from fedlm.federation.rundir import prepare_run_dir, read_rounds
from fedlm.federation.runner import run_federated
from fedlm.federation.strategies import num_sampled
from fedlm.federation.task import check_silo, wire_names
from fedlm.federation.valuation import (
    SCORE_BF16,
    State,
    coalition_key,
    read_rounds_value,
    score_on_silos,
)
from fedlm.fileio import write_json
from fedlm.modelio import ADAPTERS, WEIGHTS, read_safetensors
from fedlm.privacy.accounting import PrivacyLedger
from fedlm.resolve import resolve_config, resolve_silos
from fedlm.train import build_model
from fedlm.value.compute import (
    PAY_BY,
    Coalition,
    Game,
    contributions,
    flag_silos,
    over_seeds,
    pay_weights,
    payouts,
    peer_parts,
    value_to_others,
)
from fedlm.value.kept import Kept, fingerprint

if TYPE_CHECKING:
    from flwr.serverapp import Grid

METHODS = ("exact", "sampled", "rounds")
PERMUTATIONS = 2000  # sampled's cap on random orders (each costs only the coalitions it meets for the first time)
TOLERANCE = 0.01  # sampled stops once every silo's stderr is <= this × the grand utility's gain
Progress = Callable[[str], None]
UTILITY = ("drop in bits per byte from the starting model, each beneficiary silo scoring on its own "
           "validation split; the consortium's: token-weighted mean over the beneficiaries")


def check_budget(budget: float | None) -> Decimal | None:
    """The payout budget as an exact number of cents, or UserError."""
    if budget is None:
        return None
    try:
        cents = Decimal(str(budget))
    except InvalidOperation:
        raise UserError(f"--budget {budget!r}: not a number") from None
    if not cents.is_finite() or cents <= 0:
        raise UserError(f"--budget {budget}: must be an amount > 0")
    if cents != cents.quantize(Decimal("0.01")):
        raise UserError(f"--budget {budget}: payouts are in cents; give at most 2 decimals")
    return cents


def load_run(run_dir: Path, *, method: str | None = None, local: bool = True) -> tuple[Config, list[str]]:
    """The finished federated run's resolved config and silos, or UserError saying what RUN is instead.
    `local`: the silos' shards are on this machine (else they are the SuperNodes' of `--superlink`)."""
    path = run_dir / "config.toml"
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    if not path.is_file():
        raise UserError(f"{run_dir}: not a run directory (no config.toml); give the folder `fedlm train` wrote")
    cfg = load_config(path)
    if cfg.train.mode != "federated":
        raise UserError(f"{path}: train.mode = {cfg.train.mode!r}, not a federated run; value a run trained "
                        f"with train.mode = \"federated\"")
    if method == "rounds" and cfg.federation.secure_aggregation:
        raise UserError(f"{run_dir}: --method rounds needs each silo's update, which the run's secure aggregation "
                        "hid; use --method exact or sampled (they retrain under the same secure aggregation)")
    cfg = resolve_config(cfg)
    ws = Path(cfg.data.workspace)
    try:
        silos = resolve_silos(ws, cfg.data.silos, local=local)
    except UserError as e:
        raise UserError(f"{e}; a run whose silos are other machines is valued on their SuperNodes, as it trained: "
                        f"`fedlm value {run_dir} --superlink HOST:PORT --root-certificates CA`") from None
    if len(silos) < 2:
        raise UserError(f"{path}: the run has {len(silos)} silo; values need at least 2 silos")
    sha = tokenizer_hash(ws / "tokenizer.json")
    for silo in silos if local else ():  # the shards every method scores on (and retrains on)
        check_silo(ws / "silos" / silo, tokenizer_sha256=sha)
    unknown = [b for b in cfg.value.beneficiaries if b not in silos]
    if unknown:
        raise UserError(f"{path}: value.beneficiaries names {', '.join(unknown)}, not silos of the run "
                        f"({', '.join(silos)})")
    # the rounds log, not the checkpoint: `fedlm demo --assistant` deletes its runs' checkpoints when they finish
    done = max((int(r.get("round", 0)) for r in read_rounds(run_dir)), default=0)
    if done < cfg.federation.rounds or not (run_dir / "model").is_dir():
        then = (f"finish it with `fedlm train {path} --resume` first" if (run_dir / "checkpoint").is_dir()
                else "it has no checkpoint/ to resume from, so train it again")
        raise UserError(f"{run_dir}: the run is not finished ({done} of {cfg.federation.rounds} rounds); {then}")
    return cfg, silos


class Scorer:
    """The run's silos as valuation reaches them: it sends them models to score and coalitions to train.
    In process (one node each, the run's ClientApp) when `grid` is None; else over `grid`, the
    deployment engine's, to the silos' own SuperNodes."""

    def __init__(self, cfg: Config, silos: list[str], grid: Grid | None = None) -> None:
        self.cfg, self.silos, self.deployed = cfg, silos, grid is not None
        self.refused: dict[str, str] = {}  # silo -> why its own ledger refused its local-only baseline
        self.tokens: dict[str, int] = {}  # silo -> validation tokens it scores on (from its latest answer)
        ws = Path(cfg.data.workspace)
        self.sha = tokenizer_hash(ws / "tokenizer.json")
        if grid is None:
            self.node_of = {s: i + 1 for i, s in enumerate(silos)}
            grid = InProcessGrid(client_app, {i + 1: {"workspace": str(ws), "silo": s} for i, s in enumerate(silos)})
        else:
            self.node_of = connect_silos(grid, silos, tokenizer_sha256=self.sha, timeout=cfg.federation.round_timeout)
        self.grid = grid

    def __call__(self, models: dict[str, list[State]], *, local_baseline: bool = False) -> dict[str, list[float]]:
        """Each silo's bits/byte of its models (`local_baseline`: its local-only model's first, trained
        there: given the run's rounds' worth of time)."""
        fed = self.cfg.federation
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # in process, one thread per silo, as a federated run's silos (local baselines train)
        try:
            got = score_on_silos(self.grid, self.node_of, models, config_text=config_to_toml(self.cfg),
                                 tokenizer_sha256=self.sha, max_tokens=self.cfg.value.eval_tokens,
                                 timeout=fed.round_timeout * (fed.rounds + 1 if local_baseline else 1),
                                 local_baseline=local_baseline)
        finally:
            torch.set_num_threads(threads)
        # a silo sent nothing but its baseline to train, which it refused, scored nothing: keep its last count
        self.tokens.update({s: sc.tokens for s, sc in got.items() if sc.tokens})
        self.refused = {s: sc.refused for s, sc in got.items() if sc.refused}
        return {s: sc.bits_per_byte for s, sc in got.items()}

    def retrain(self, cfg: Config, out: Path) -> None:
        """Train `cfg` (a coalition's run) into `out` on the silos it names."""
        if not self.deployed:
            run_federated(cfg, out, validate=False)
            return
        prepare_run_dir(cfg, out, resume=False)
        run_rounds(self.grid, cfg, out, validate=False)

    def close(self) -> None:
        if not self.deployed:  # the deployment engine's grid is the ServerApp's
            self.grid.close()  # type: ignore[attr-defined]


def coalition_config(cfg: Config, coalition: Coalition, *, rounds: int, local_steps: int,
                     engine: Literal["inprocess", "flower"] = "inprocess") -> tuple[Config, str | None]:
    """The run's config on `coalition` alone (no valuation; in process unless `engine`); a note when secure
    aggregation cannot run on so few silos."""
    fed = cfg.federation
    secure, note = fed.secure_aggregation, None
    if secure:
        try:
            secagg.check_round_size(num_sampled(len(coalition), fed.fraction))
        except UserError:
            secure, note = False, "coalitions with fewer than 3 silos a round were retrained without secure aggregation"
    try:
        fed = dataclasses.replace(fed, engine=engine, value="none", rounds=rounds, local_steps=local_steps,
                                  min_silos=min(fed.min_silos, len(coalition)), secure_aggregation=secure,
                                  personalise_steps=0)
    except ValueError as e:  # e.g. --steps with fedsgd
        raise UserError(f"--rounds/--steps: {e}") from None
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, silos=sorted(coalition)), federation=fed), note


def _global(run_dir: Path) -> State:
    """A finished run's global arrays as they travel: its model/ holds them (a LoRA run's adapters, else
    every array), as its checkpoint/ did, which `fedlm demo --assistant` deletes."""
    model = run_dir / "model"
    return read_safetensors(model / ADAPTERS if (model / ADAPTERS).is_file() else model / WEIGHTS)


def _start(cfg: Config) -> State:
    model = build_model(cfg)
    state = model.state_dict()
    return {n: state[n].detach().clone() for n in wire_names(model)}


@dataclasses.dataclass
class PrivacySpent:
    """Under DP, every model valuation trains on a silo's data is another release of it: each retrained
    coalition's run (its RUN/privacy.json) and, under record-level DP, each silo's local-only baseline
    (the same DP-SGD plan as its part of the run). Their histories are composed with the run's by its
    own accountant (RDP composes across releases), so value.json says what each silo's ε now is."""

    ledger: PrivacyLedger | None  # the run's, growing; None: the run had no DP
    run: dict[str, float]  # each silo's ε by the run alone
    releases: dict[str, int]

    @classmethod
    def of_run(cls, run_dir: Path, cfg: Config) -> PrivacySpent:
        path = run_dir / "privacy.json"  # without DP it holds at most what in-run valuation disclosed
        if cfg.privacy.mode == "none" or not path.exists():
            return cls(None, {}, {})
        ledger = PrivacyLedger.from_json(json.loads(path.read_text()))
        return cls(ledger, ledger.spent(), dict.fromkeys(ledger.history, 1))

    def add_run(self, privacy: dict[str, Any] | None) -> None:
        """A retrained coalition's releases (its RUN/privacy.json; None: no round of it completed)."""
        if self.ledger is not None and privacy is not None:
            for silo, events in PrivacyLedger.from_json(privacy).history.items():
                self.ledger.history.setdefault(silo, []).extend(events)
                self.releases[silo] = self.releases.get(silo, 0) + 1

    def add_local_baselines(self, cfg: Config, silos: list[str]) -> None:
        """Under record-level DP each of `silos`' local-only baseline is DP-SGD on its own data at the run's per-silo
        budget: the noise multiplier and sampling rate of its plan in the run, for every step of the schedule."""
        if self.ledger is None or self.ledger.mode != "record":
            return
        steps = cfg.federation.rounds * cfg.federation.local_steps
        for silo, events in list(self.ledger.history.items()):
            if silo in self.run and silo in silos:
                z, q, _ = events[0]
                events.append((z, q, steps))
                self.releases[silo] += 1

    def to_json(self) -> dict[str, Any] | None:
        if self.ledger is None:
            return None
        return {"mode": self.ledger.mode, "delta": self.ledger.delta, "target_epsilon": self.ledger.target_epsilon,
                "silos": {s: {"epsilon_run": self.run.get(s), "epsilon_with_valuation": self.ledger.epsilon(s),
                              "releases": self.releases.get(s, 0)} for s in sorted(self.ledger.history)}}

    def note(self) -> str | None:
        if self.ledger is None:
            return None
        now = ", ".join(f"{s} {self.ledger.epsilon(s):.2f} ({self.releases.get(s, 0)} releases)"
                        for s in sorted(self.ledger.history))
        return (f"DP: every model this valuation trained on a silo's data is another release of it, composed with "
                f"the run's ({self.ledger.mode}-level, δ = {self.ledger.delta:g}; the run's target "
                f"ε = {self.ledger.target_epsilon:g}): each silo's ε is now {now} (value.json `privacy`)")


@dataclasses.dataclass
class Retrainer:
    """Retrains the run's config on a coalition and has the beneficiaries score the result."""

    cfg: Config
    run_dir: Path
    work: Path
    scorer: Scorer
    beneficiaries: list[str]
    rounds: int
    local_steps: int
    progress: Progress
    kept: Kept  # RUN/.value-progress.json: what earlier, stopped calls retrained
    notes: set[str] = dataclasses.field(default_factory=set)
    trained: int = 0
    total: int | None = None  # coalitions to retrain, where known (exact)
    reseeded: bool = False  # retraining under another seed than the run's (`--seeds`): the grand one too
    label: str = ""  # added to each progress line (which seed, under `--seeds`)
    spent: PrivacySpent | None = None  # under DP: each retrained run's releases
    game_id: str = ""  # `kept`'s key for this game (`fingerprint`)
    kept_scores: dict[str, Any] = dataclasses.field(default_factory=dict)  # coalition key -> kept entry
    run_scores: dict[str, float] | None = None  # the beneficiaries' scores of the run's own model, once scored

    @property
    def reduced(self) -> bool:
        """Whether coalitions retrain on less than the run's budget (then the grand one retrains too)."""
        return (self.rounds, self.local_steps) != (self.cfg.federation.rounds, self.cfg.federation.local_steps)

    @property
    def retrains_grand(self) -> bool:
        return self.reduced or self.reseeded

    def __call__(self, coalition: Coalition) -> dict[str, float]:
        key = coalition_key(coalition)
        if key in self.kept_scores:
            return self._resume(key)
        run_own = coalition == frozenset(self.scorer.silos) and not self.retrains_grand
        if run_own:
            state, privacy = _global(self.run_dir), None  # the run itself: the grand coalition at the run's budget
        else:
            state, privacy = self._retrain(coalition)
        scores = {j: v[0] for j, v in self.scorer(dict.fromkeys(self.beneficiaries, [state])).items()}
        self.kept.add(self.game_id, key, scores, privacy, retrained=not run_own)
        if run_own:
            self.run_scores = scores
        return scores

    def _resume(self, key: str) -> dict[str, float]:
        """The scores of a coalition model an earlier call of this valuation had scored before it stopped: it is
        neither retrained nor scored again, and its releases still count."""
        entry = self.kept_scores[key]
        if self.spent is not None:
            self.spent.add_run(entry["privacy"])
        if not entry["retrained"]:
            self.run_scores = dict(entry["bits_per_byte"])
        else:
            self.progress(f"coalition {key}: retrained by the stopped call, scores kept ({self.trained + 1}"
                          f"{f' of {self.total}' if self.total else ''}{self.label})")
            self.trained += 1
            self.kept.resumed += 1
        return dict(entry["bits_per_byte"])

    def _retrain(self, coalition: Coalition) -> tuple[State, dict[str, Any] | None]:
        """`coalition`'s retrained global arrays, and its releases (privacy.json; None without DP)."""
        cfg, note = coalition_config(self.cfg, coalition, rounds=self.rounds, local_steps=self.local_steps,
                                     engine=self.cfg.federation.engine if self.scorer.deployed else "inprocess")
        if note:
            self.notes.add(note)
        out = self.work / f"coalition-{coalition_key(coalition)}"
        of = f" of {self.total}" if self.total else ""
        self.progress(f"retraining coalition {coalition_key(coalition)} ({self.trained + 1}{of}{self.label})")
        # the beneficiaries score the model next: the run's own validation (every member scoring the
        # start and final weights) would be thrown away, and on SmolLM2 it cost 260 of 311 s of retraining
        try:
            self.scorer.retrain(cfg, out)
        except UserError as e:  # e.g. a silo refusing a coalition too small for secure aggregation
            raise UserError(f"retraining coalition {coalition_key(coalition)}"
                            f"{' (without secure aggregation: too few silos)' if note else ''}: {e}") from None
        path = out / "privacy.json"  # none when no round of it completed: nothing released
        privacy = json.loads(path.read_text()) if path.exists() else None
        if self.spent is not None:  # what it released, before anything can stop the valuation
            self.spent.add_run(privacy)
        _check_members(out, coalition)
        state = _global(out)
        shutil.rmtree(out, ignore_errors=True)
        self.trained += 1
        return state, privacy


def _check_members(out: Path, coalition: Coalition) -> None:
    """UserError when a member of `coalition` dropped out of a round of its retrained run `out`: the model
    is then another coalition's, and values computed from it would pay the wrong silos."""
    gone = dropouts(out)
    if gone:
        silo, rounds = next(iter(gone.items()))
        first, why = next(iter(rounds.items()))
        raise UserError(f"retraining coalition {coalition_key(coalition)}: silo {silo} dropped out of round"
                        f"{'s' if len(rounds) > 1 else ''} {', '.join(map(str, rounds))} (round {first}: {why}); its "
                        "model is not that coalition's, so no values were written: value the run once every silo "
                        "can train every round (one at its own privacy target cannot be retrained on)")


def exact_retrains(silos: int, *, reduced: bool) -> int:
    """Coalitions `exact` retrains: every non-empty one, but the grand one is the run itself at its budget."""
    return 2 ** silos - 1 - (not reduced)


def gains(cfg: Config, run_dir: Path, silos: list[str], scorer: Scorer, progress: Progress,
          local_models: dict[str, Path] | None, federated_bpb: dict[str, float] | None = None
          ) -> dict[str, dict[str, float | None]]:
    """Each silo's own bits/byte: local-only minus federated (and minus personalised), scored by itself.
    Each silo trains its local-only model itself, which never leaves it (`local_models`: run dirs of
    ones trained already, sent to be scored). The models travel as the coalitions' do, under the run's
    config: a LoRA run's as adapters (a few MB; merged, each SmolLM2 model is 0.5 GB, and three silos'
    scoring messages took 20 GB). `federated_bpb`: silos that scored the run's model already (the grand
    coalition's, in this valuation), which are not sent it again: each score counts against a silo's
    max_scored_models."""
    known = federated_bpb or {}
    federated = _global(run_dir)
    shapes = {n: t.shape for n, t in federated.items()}

    def arrays(path: Path) -> State:
        got = _global(path)
        if {n: t.shape for n, t in got.items()} != shapes:
            raise UserError(f"{path / 'model'}: its arrays are not those of the run's own model ({run_dir / 'model'}); "
                            "give models trained with the run's config (the same model and LoRA settings)")
        return got

    jobs: dict[str, list[State]] = {}
    for silo in silos:
        jobs[silo] = [arrays(local_models[silo])] if local_models else []
        if silo not in known:
            jobs[silo].append(federated)
        personal = run_dir / f"personalised-{silo}"
        if cfg.federation.personalise_steps and (personal / "model").is_dir():
            jobs[silo].append(arrays(personal))
    if not local_models:
        progress(f"each silo trains its local-only baseline ({', '.join(silos)}) and scores it")
    scores = scorer(jobs, local_baseline=not local_models)
    out: dict[str, dict[str, float | None]] = {}
    for silo, bpb in scores.items():
        if silo in known:
            bpb.insert(1, known[silo])
        local = None if math.isnan(bpb[0]) else bpb[0]  # NaN: the silo's own ledger refused to train it
        out[silo] = {"local_only_bpb": local, "federated_bpb": bpb[1],
                     "gain": None if local is None else local - bpb[1],
                     "gain_personalised": local - bpb[2] if local is not None and len(bpb) > 2 else None}
    return out


def _rounds_game(run_dir: Path, silos: list[str]) -> tuple[Game, dict[str, Any]]:
    saved = read_rounds_value(run_dir)
    if sorted(saved["silos"]) != sorted(silos):
        raise UserError(f"{run_dir}/value_rounds.json values silos {saved['silos']}, the run has {silos}")
    table = {frozenset(k.split("+")) if k else frozenset(): v for k, v in saved["bits_per_byte"].items()}
    beneficiaries = sorted(saved["tokens"])
    game = Game(list(silos), beneficiaries, {s: int(n) for s, n in saved["tokens"].items()},
                {s: float(x) for s, x in saved["start_bits_per_byte"].items()}, table.__getitem__)
    return game, saved


def value_run(run_dir: Path, *, method: str | None = None, budget: float | None = None, rounds: int = 0,
              local_steps: int = 0, permutations: int = PERMUTATIONS, tolerance: float = TOLERANCE,
              truncation: float = 0.0, seed: int = 0, seeds: int = 1, local_models: dict[str, Path] | None = None,
              pay_by: str = "shapley", progress: Progress | None = None, grid: Grid | None = None) -> dict[str, Any]:
    """Value the silos of the finished federated run `run_dir`; writes RUN/value.json and returns it.

    `method` None: "rounds" when the run valued itself, else "exact". `rounds`/`local_steps` > 0
    retrain the coalitions with that reduced budget (exact and sampled). sampled: random orders
    until every silo's stderr is <= `tolerance` × the grand utility's gain (0: exactly
    `permutations`, otherwise the cap), each cut short within `truncation` × that gain of it.
    `local_models` gives each silo's local-only model (run dirs) instead of each silo training its own.
    `grid`: the silos are the SuperNodes of this deployment engine's grid (the ServerApp of
    `fedlm value --superlink`), not this machine's workspace.
    `pay_by` "others": shares from the other beneficiaries' scores alone (`compute.peer_parts`), not Shapley values.
    `seeds` > 1 (exact, sampled): every coalition, the grand one included, is retrained under train.seed, +1,
    ... (sampled: the coalitions each seed's own orders visit), and the values are the mean over those seeds,
    with the standard error of that mean as `stderr`."""
    t0 = time.perf_counter()
    cents = check_budget(budget)
    _check_names(method, pay_by)
    cfg, silos = load_run(run_dir, method=method, local=grid is None)
    fed = cfg.federation
    method = method or ("rounds" if (run_dir / "value_rounds.json").exists() else "exact")
    _check_options(cfg, silos, method, rounds=rounds, local_steps=local_steps, permutations=permutations,
                   tolerance=tolerance, truncation=truncation, seeds=seeds, pay_by=pay_by)
    say = progress or (lambda _: None)
    rounds, local_steps = rounds or fed.rounds, local_steps or fed.local_steps
    beneficiaries = cfg.value.beneficiaries or silos
    work = Path(tempfile.mkdtemp(prefix=".value-", dir=run_dir))
    scorer = Scorer(cfg, silos, grid)
    notes: list[str] = []
    spent = PrivacySpent.of_run(run_dir, cfg)
    kept = Kept.open(run_dir)
    with kept.said_on_stop(), _closing(scorer, work):
        if method == "rounds":
            game, saved = _rounds_game(run_dir, silos)
            norms, trained = saved.get("update_norms"), 0
            notes.append(f"coalition models rebuilt inside the run from rounds {saved['rounds'][0]}-{saved['rounds'][1]}'s "
                         "per-silo updates (no retraining): an approximation of retraining each coalition")
            body = contributions(game, method="exact")
        else:
            norms = None
            game, body, trained, notes, run_bpb = _retrained(
                cfg, run_dir, work, scorer, beneficiaries, rounds=rounds, local_steps=local_steps, seeds=seeds,
                say=say, method=method, permutations=permutations, seed=seed, truncation=truncation,
                tolerance=tolerance, spent=spent, kept=kept)
        flags = flag_silos(game, body, update_norms=norms)
        gained = gains(cfg, run_dir, silos, scorer, say, local_models, None if method == "rounds" else run_bpb)
        if not local_models:  # each silo trained its local-only baseline, or its own ledger refused it
            spent.add_local_baselines(cfg, [s for s in silos if s not in scorer.refused])
            notes += [f"no gain for silo {s}: {why}" for s, why in sorted(scorer.refused.items())]
    notes += _closing_notes(cfg, spent, local_trained=not local_models, pay_by=pay_by)
    out = _value_json(method, game, body, flags, gained, notes, budget=cents, trained=trained,
                      seconds=time.perf_counter() - t0, pay_by=pay_by, privacy=spent.to_json())
    if any(math.isnan(v) for v in body["shapley"].values()):
        raise UserError(f"{run_dir}: a silo's value is not a number (a model diverged); nothing was written")
    write_json(run_dir / "value.json", out)
    kept.remove()
    return out


@contextlib.contextmanager
def _closing(scorer: Scorer, work: Path) -> Iterator[None]:
    """Close the silos' grid and remove the valuation's work folder, however it ends."""
    try:
        yield
    finally:
        scorer.close()
        shutil.rmtree(work, ignore_errors=True)


def _check_names(method: str | None, pay_by: str) -> None:
    if method is not None and method not in METHODS:
        raise UserError(f"--method {method!r}: use one of {', '.join(METHODS)}")
    if pay_by not in PAY_BY:
        raise UserError(f"--pay-by {pay_by!r}: use one of {', '.join(PAY_BY)}")


def _check_options(cfg: Config, silos: list[str], method: str, *, rounds: int, local_steps: int, permutations: int,
                   tolerance: float, truncation: float, seeds: int, pay_by: str) -> None:
    """UserError for options that do not fit `method` or the run, before anything is trained."""
    if pay_by == "others" and len(cfg.value.beneficiaries or silos) < 2:
        raise UserError(f"--pay-by others needs at least 2 beneficiaries (value.beneficiaries = "
                        f"{cfg.value.beneficiaries}): a silo's value to the others is measured on their splits")
    if method != "rounds" and (rounds < 0 or local_steps < 0):
        raise UserError("--rounds and --local-steps must be >= 0 (0: the run's own)")
    if method == "sampled" and permutations < 2:
        raise UserError("--permutations must be >= 2 (a standard error needs two)")
    if method == "sampled" and not (0 <= tolerance < 1 and 0 <= truncation < 1):
        raise UserError("--tolerance and --truncation are fractions of the grand utility's gain: give 0 <= x < 1")
    if seeds < 1 or (seeds > 1 and method == "rounds"):
        raise UserError(f"--seeds {seeds}: give a count >= 1, and more than 1 only with --method exact or sampled "
                        "(rounds retrains nothing: its values are of the run's one seed)")


def _retrained(cfg: Config, run_dir: Path, work: Path, scorer: Scorer, beneficiaries: list[str], *, rounds: int,
               local_steps: int, seeds: int, say: Progress, method: str, spent: PrivacySpent, kept: Kept,
               **sampling: Any) -> tuple[Game, dict[str, Any], int, list[str], dict[str, float] | None]:
    """exact or sampled: each seed's coalitions retrained and valued (`contributions`, with `sampling`'s
    keywords); the first seed's game, the body (over the seeds: their mean), the coalitions trained, notes,
    and the beneficiaries' scores of the run's own model where a game scored it (as its grand coalition's)."""
    silos, fed = list(scorer.silos), cfg.federation
    trained, notes, run_bpb = 0, list[str](), None
    games: list[Game] = []
    bodies: list[dict[str, Any]] = []
    for k in range(seeds):  # each seed's game is the run's config under train.seed + k
        cfg_k = cfg if k == 0 else dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + k))
        retrain = Retrainer(cfg_k, run_dir, work, scorer, beneficiaries, rounds, local_steps, say, kept,
                            reseeded=k > 0, label=f", seed {k + 1} of {seeds}" if seeds > 1 else "", spent=spent)
        retrain.total = exact_retrains(len(silos), reduced=retrain.retrains_grand) if method == "exact" else None
        start = {j: v[0] for j, v in scorer({j: [_start(cfg_k)] for j in beneficiaries}).items()}
        retrain.game_id = fingerprint(cfg_k, rounds=rounds, local_steps=local_steps, beneficiaries=beneficiaries)
        retrain.kept_scores = kept.game(retrain.game_id, start, dict(scorer.tokens))
        game = Game(silos, list(beneficiaries), dict(scorer.tokens), start, retrain)
        game.seen[frozenset()] = dict(game.start)  # the empty coalition's model is the start: scored once
        games.append(game)
        bodies.append(contributions(game, method=method, **{**sampling, "seed": sampling["seed"] + k}))
        trained += retrain.trained
        run_bpb = run_bpb or retrain.run_scores
        notes += sorted(retrain.notes - set(notes))
    body = bodies[0] if seeds == 1 else over_seeds(bodies)
    if seeds > 1:  # over_seeds' values of each seed, with the scores they came from, for an audit
        body["seeds"] = [{"seed": cfg.train.seed + k, "shapley": phi, "stderr": b["stderr"],
                          **({"permutations": b["permutations"]} if "permutations" in b else {}), **_estimate(b),
                          "start_bits_per_byte": dict(g.start), "coalition_bits_per_byte": _scores(g)}
                         for k, (g, phi, b) in enumerate(zip(games, body["seeds"], bodies, strict=True))]
    if kept.resumed:
        notes.append(f"resumed: {kept.resumed} of the {trained} coalitions were retrained by an earlier call of "
                     f"this valuation that stopped, and their scores kept ({kept.path.name} in the run)")
    if method == "sampled":
        for k, b in enumerate(bodies):
            note = _sampling_note(b, tolerance=sampling["tolerance"], truncation=sampling["truncation"],
                                  estimate="`sampled_estimate`" if seeds == 1 else f"`seeds[{k}].sampled_estimate`")
            notes.append(note if seeds == 1 else f"train.seed {cfg.train.seed + k}: {note}")
    if retrain.reduced:
        notes.append(f"reduced budget: coalitions retrained for {rounds} rounds of {local_steps} local steps "
                     f"(the run had {fed.rounds} of {fed.local_steps})")
    if seeds == 1 and not any(body["stderr"].values()):  # exact, or sampled that met every coalition
        notes.append("one training seed: a stderr of 0 means no sampling error, not that another seed "
                     "would give these values; --seeds K retrains under K seeds and measures it")
    if seeds > 1:
        which = "every coalition" if method == "exact" else "the coalitions each seed's orders visited"
        notes.append(f"{seeds} seeds: {which} retrained under train.seed {cfg.train.seed} to "
                     f"{cfg.train.seed + seeds - 1}; the values are their mean and `stderr` its standard "
                     "error over the seeds (`seeds` holds each seed's values and the scores they came from)")
    return games[0], body, trained, notes, run_bpb


def _value_json(method: str, game: Game, body: dict[str, Any], flags: dict[str, dict[str, Any]],
                gained: dict[str, dict[str, float | None]], notes: list[str], *, budget: Decimal | None, trained: int,
                seconds: float, pay_by: str = "shapley", privacy: dict[str, Any] | None = None) -> dict[str, Any]:
    """RUN/value.json's body (issue 17's keys, plus the scores it was computed from)."""
    share, pay = payouts(pay_weights(game, body, flags, pay_by), budget=float(budget) if budget is not None else None)
    unpaid = None if budget is None else float(budget - sum(Decimal(str(x)) for x in pay.values()))
    if unpaid:  # only paid by Shapley: paid by the others, a beneficiary whose split no one helped splits equally
        notes = [*notes, f"none of the budget ({budget:.2f}) is paid (`unpaid`): no silo has a Shapley value > 0 without "
                 "being flagged, so no silo's data added to the others' splits, and there is no contribution to pay "
                 "for; --pay-by others pays the budget out by what each silo's data added to each other silo's split"]
    return {
        "method": method, "utility": UTILITY, "beneficiaries": list(game.beneficiaries),
        "eval_tokens": dict(game.tokens), "baseline_utility": body["baseline_utility"],
        "grand_utility": body["grand_utility"],
        "silos": {s: {"shapley": body["shapley"][s], "stderr": body["stderr"][s],
                      "leave_one_out": body["leave_one_out"][s],
                      "value_to_others": value_to_others(game, body["matrix"], s), **gained[s], "share": share[s],
                      "payout": pay[s],
                      "flag": flags[s]["flag"] if s in flags else None,
                      "why": flags[s]["why"] if s in flags else None} for s in game.silos},
        "matrix": body["matrix"], "coalitions_trained": trained, "coalitions_scored": body["coalitions_scored"],
        "start_bits_per_byte": dict(game.start),
        "coalition_bits_per_byte": _scores(game),
        "budget": float(budget) if budget is not None else None, "unpaid": unpaid, "pay_by": pay_by, "notes": notes,
        **({"parts": peer_parts(game, body["matrix"])} if pay_by == "others" else {}),
        "permutations": body.get("permutations"), "seconds": seconds, "privacy": privacy,
        **_estimate(body),
        **({"seeds": body["seeds"]} if "seeds" in body else {}),
    }


def _estimate(body: dict[str, Any]) -> dict[str, Any]:
    """{"sampled_estimate": per silo} when `body` is sampled's and reports exact values in its place, else {}."""
    if "sampled_shapley" not in body:
        return {}
    return {"sampled_estimate": {s: {"shapley": v, "stderr": body["sampled_stderr"][s]}
                                 for s, v in body["sampled_shapley"].items()}}


def _closing_notes(cfg: Config, spent: PrivacySpent, *, local_trained: bool, pay_by: str) -> list[str]:
    """The notes on what the valuation spent and how it scored and paid."""
    notes = [n for n in (spent.note(),) if n]
    if local_trained and cfg.privacy.mode == "client":
        notes.append("each silo's local-only baseline trained without DP noise: client-level DP protects a silo inside "
                     "the federation, not from itself; the model stays with the silo, and its one score left it "
                     "outside DP")
    if cfg.train.precision == "bf16":
        notes.append(SCORE_BF16)
    if pay_by == "others":
        notes.append("paid by the other silos: each beneficiary hands an equal part of the budget to the other silos, "
                     "in proportion to how much each one's data helped its own split by its own scores, so nothing a "
                     "silo reports moves its own pay; a flagged silo keeps what the beneficiaries it helped hand it")
    return notes


def _sampling_note(body: dict[str, Any], *, tolerance: float, truncation: float,
                   estimate: str = "`sampled_estimate`") -> str:
    """What sampled's standard errors mean, and whether the stopping rule was met."""
    if body["complete"]:
        n = len(body["shapley"])
        return (f"sampled: {body['permutations']} random orders of the silos met every one of the {2 ** n} coalitions "
                f"of the {n} silos, so the values are their exact Shapley values (stderr 0; the sampling estimate "
                f"is {estimate})")
    rule = (f"until every silo's stderr was <= {tolerance:g} × the grand utility's gain" if tolerance > 0
            else "a fixed number of orders")
    met = "" if body["converged"] else " (not reached: the permutation cap stopped it; raise --permutations)"
    cut = (f"; each order cut short within {truncation:g} × that gain of it, a bias of at most that per silo "
           "that the stderr does not include" if truncation > 0 else "")
    return f"sampled: {body['permutations']} random orders of the silos, {rule}{met}{cut}"


def _scores(game: Game) -> dict[str, dict[str, float]]:
    """Every scored coalition's bits/byte per beneficiary, smallest coalitions first."""
    return {coalition_key(c): dict(v) for c, v in sorted(game.seen.items(), key=_size)}


def _size(item: tuple[Coalition, dict[str, float]]) -> tuple[int, str]:
    return len(item[0]), coalition_key(item[0])


def value_table(body: dict[str, Any]) -> Table:
    """The contribution and gain table of a value.json body (bits/byte; higher is better)."""
    table = Table(title=f"value of each silo ({body['method']}; bits/byte gained, higher is better)")
    for col in ("silo", "shapley", "± stderr", "leave-one-out", "gain (vs local-only)", "share", "payout", "flag"):
        table.add_column(col, justify="left" if col in ("silo", "flag") else "right")

    def f(x: float | None, spec: str = "+.4f") -> str:
        return "–" if x is None else format(x, spec)

    for silo, v in body["silos"].items():
        table.add_row(silo, f(v["shapley"]), f(v["stderr"], ".4f"), f(v["leave_one_out"]), f(v["gain"]),
                      f(v["share"], ".1%"), f(v["payout"], ",.2f"), v["flag"] or "")
    return table


def parts_table(body: dict[str, Any]) -> Table | None:
    """Paid by the others (`--pay-by others`): the fraction of its part each beneficiary hands each other
    silo, by its own scores, and the share that makes; None otherwise."""
    parts = body.get("parts")
    if not parts:
        return None
    table = Table(title="how each beneficiary split its equal part of the budget (by its own scores)")
    for col in ("silo", *(f"from {j}" for j in parts), "share"):
        table.add_column(col, justify="left" if col == "silo" else "right")
    for silo, v in body["silos"].items():
        table.add_row(silo, *(format(p[silo], ".1%") if silo in p else "–" for p in parts.values()),
                      format(v["share"], ".1%"))
    return table


def summary_lines(body: dict[str, Any]) -> list[str]:
    """The lines printed under the table: utilities, notes and why each flagged silo is not paid."""
    lines = [f"grand utility {body['grand_utility']:+.4f} bits/byte over the starting model "
             f"(baseline {body['baseline_utility']:+.4f}); the Shapley values sum to the difference"]
    lines += [f"silo {s}: {v['flag']}: {v['why']}" + _flag_pay(body, v) for s, v in body["silos"].items() if v["flag"]]
    lines += [f"note: {n}" for n in body["notes"]]
    return lines


def _flag_pay(body: dict[str, Any], v: dict[str, Any]) -> str:
    """What a flagged silo is paid, after its flag's reason."""
    if not body["budget"]:
        return ""
    if body.get("pay_by") != "others" or not v["payout"]:
        return "; paid 0"
    return f"; paid {v['payout']:,.2f} by the beneficiaries its data helped (--pay-by others does not zero flags)"


__all__ = ["METHODS", "parts_table", "summary_lines", "value_run", "value_table"]
