"""A silo's own privacy policy: its secret noise, its own budget, and what it refuses.

    rules = SiloPrivacy(cfg, silo_dir, config_text=text, round_idx=r, arrays=global_arrays)
    rules.record_round(data.generator, plan)       # DP-SGD: secret sampling/noise; charged on its own ledger
    update = rules.noise_share(update, share_std=std, threshold=t, num_silos=n)   # client DP under SecAgg

The server runs the rounds, but it is one of the parties the silo's privacy protects against,
so a silo trusts nothing in the server's message that its privacy depends on:

- Noise and sampling come from the silo's own key (`fedlm.privacy.randomness`, kept in
  WS/silos/NAME/.secrets/), in a stream named by the run config, the round, a digest of the
  global weights received and the silo's shards: the same request on the same data gives the
  same release (a resumed round re-sends what it sent, nothing new); any other request gets
  independent noise.
- Its mode and budget: WS/silos/NAME/privacy.toml, when the silo writes one
  (`[privacy] mode = "client"`, `target_epsilon = 4`, `delta = 1e-5`), overrides the run's: a
  run that asks for another mode, or a larger ε or δ, is refused; without the file (or
  without `mode` in it) the silo follows the run config it is sent (and says so in the log).
- Whether its updates may leave it in clear: with `secure_aggregation = true` in the same
  file, a run without secure aggregation is refused (at its query, before round 1, and at
  every round), so neither a coordinator that turns it off nor a valuation that retrains a
  coalition too small for it gets this silo's update alone.
- How many models it scores for others: it counts them over all runs (`charge_scores`,
  WS/silos/NAME/.secrets/scored.json), and with `max_scored_models = N` in the same file it
  scores at most N. A score is one number about its validation split for weights
  the coordinator chose, so unbounded scoring is an oracle on that split, outside secure
  aggregation and DP.
- How much work a run may ask of it: `[work]` in the same file caps the tokens a training
  round trains on (`max_round_tokens`) and a whole run (`max_run_tokens`), the tokens one
  validation scores (`max_eval_tokens`) and the model's size (`max_parameters`); a run that asks more is refused before any of it is done
  (`fedlm.federation.task.check_work`). The coordinator writes the config, so without them it
  chooses how long the silo's machine works for it.
- Its ledger (WS/silos/NAME/.secrets/ledger.json) charges every distinct release (a round's
  update; under record-level DP, a valuation's local-only baseline, whose score leaves) with the
  noise the silo itself adds and the fewest survivors it allows (so against a peer, the
  worst case), and refuses a release that would pass its target. With a DP mode in
  privacy.toml the ledger spans all runs on this silo's data; without one, one run config.
- What all of it came to: `spent` (the `fedlm silo spent` command) reads these records back for
  the silo's admin, with every ledger's ε and all of them composed.
- Which secure sum holds its input: a release is unmasked inside one set of survivors only
  (`pin_secure_sum`, WS/silos/NAME/.secrets/secure_sums.json), so replaying a round with other
  silos does not give the coordinator two sums to subtract; with or without DP, for every
  secure round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from fedlm.config import Config, PrivacyConfig
from fedlm.errors import UserError
from fedlm.fileio import write_json
from fedlm.privacy.accounting import PrivacyLedger
from fedlm.privacy.client_dp import noise_like
from fedlm.privacy.dpsgd import RecordPlan
from fedlm.privacy.randomness import NoiseKey, party_key, reseed

MIN_SURVIVORS = 3
"""Never unmask a sum of fewer silos: with 2, each could take its own update off the sum
(or the next global model) and read the other's."""

log = logging.getLogger("fedlm.federation")

LOCAL_BASELINE_ROUND = -1
"""The round of a silo's local-only baseline (valuation's gain) in its release ids and ledger: no round of a run."""

POLICY_FILE = "privacy.toml"
LEDGER_FILE = Path(".secrets") / "ledger.json"
SCORED_FILE = Path(".secrets") / "scored.json"
SUMS_FILE = Path(".secrets") / "secure_sums.json"


def _read_book(path: Path, what: str) -> dict[str, Any]:
    """One of the silo's own records in .secrets/ (empty when there is none yet); UserError when corrupt."""
    try:
        return dict(json.loads(path.read_text())) if path.exists() else {}
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path} is corrupt ({e}); this silo cannot tell {what}") from None


def _write_book(path: Path, book: dict[str, Any]) -> None:
    """Keep one of the silo's own records, owner-only, atomically."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_json(path, book)


def release_id(config_text: str, round_idx: int, arrays: dict[str, torch.Tensor], silo_dir: Path) -> str:
    """What a silo's contribution to a round is a function of: the run config, the round, the global
    weights received and its shards (new shards under the same request give another release)."""
    data = silo_dir / "train.bin"  # the data too: new shards under the same request get fresh noise
    data_id = f"{data.stat().st_size}.{data.stat().st_mtime_ns}" if data.exists() else "-"
    run = hashlib.sha256(config_text.encode()).hexdigest()[:16]
    return f"{run}/{round_idx}/{weights_digest(arrays)}/{data_id}"


def pin_secure_sum(silo_dir: Path, release: str, survivors: list[str]) -> None:
    """Let this silo's masked input for `release` be unmasked inside one secure sum only: the first
    set of survivors it unmasked for is kept (WS/silos/NAME/.secrets/secure_sums.json), and another
    set is refused. The same request gives the same input, so two sums of different silos that
    both hold it differ by the other silos' inputs alone: a coordinator replaying a round with a
    silo left out, or claimed dropped, would read that silo's update from the difference."""
    path = silo_dir / SUMS_FILE
    book = _read_book(path, "which sums it took part in")
    want, got = sorted(survivors), book.get(release)
    if got is not None and got != want:
        raise UserError(f"silo {silo_dir.name!r}: this round's update (the same run config, round and weights) was "
                        f"already unmasked in a sum of {', '.join(got)}; unmasking it in a sum of {', '.join(want)} "
                        f"would let the coordinator take one from the other; refused")
    if got is None:
        book[release] = want
        _write_book(path, book)


def weights_digest(arrays: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the global arrays received (names, shapes and bytes)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        t = arrays[name].detach().contiguous().reshape(-1)
        h.update(f"{name}/{tuple(arrays[name].shape)}/{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class SiloPolicy:
    """A silo's privacy.toml."""

    mode: str | None  # None: the run's DP settings, whatever they are
    target_epsilon: float  # 0 without a DP mode
    delta: float
    secure_aggregation: bool  # its updates leave it only inside a secure sum
    max_scored_models: int | None  # None: no cap
    dishonest_silos: int = 0  # its noise share is charged as if this many others left theirs out
    work: dict[str, int] = field(default_factory=dict)  # [work]: the WORK_LIMITS it sets


WORK_LIMITS = {
    "max_round_tokens": ("tokens a training round trains on", "federation.local_steps × train.grad_accum × "
                         "train.batch_size × train.seq_len; under record-level DP the expected batch"),
    "max_run_tokens": ("tokens a whole run trains on", "federation.rounds × the round's tokens; a valuation's "
                       "local-only baseline trains them in one request"),
    "max_eval_tokens": ("tokens one validation of a model scores", "train.eval_batches × train.batch_size × "
                        "train.seq_len"),
    "max_parameters": ("parameters in the model it builds", "adapters included"),
}
"""What a silo's `[work]` table may cap, each a whole number ≥ 1: (what is counted, how a config sets it)."""

_PRIVACY_KEYS = ("mode", "target_epsilon", "delta", "secure_aggregation", "max_scored_models", "dishonest_silos")


def _known(table: dict[str, Any], keys: Any, where: str) -> None:
    """A misspelt key would leave the silo unprotected without a word: refuse any key not in `keys`."""
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise ValueError(f"unknown {where} {', '.join(map(repr, unknown))}")


def _work(table: Any) -> dict[str, int]:
    """The [work] table's limits."""
    if not isinstance(table, dict):
        raise TypeError("[work] is not a table")
    _known(table, WORK_LIMITS, "key in [work]:")
    for key, n in table.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise TypeError(f"{key} = {n!r} is not a whole number ≥ 1")
    return dict(table)


def _policy(silo_dir: Path) -> SiloPolicy | None:
    """The silo's privacy.toml, or None without one."""
    path = silo_dir / POLICY_FILE
    if not path.exists():
        return None
    try:
        doc = tomllib.loads(path.read_text())
        _known(doc, ("privacy", "work"), "table")
        local = doc.get("privacy", {})
        _known(local, _PRIVACY_KEYS, "key in [privacy]:")
        mode = str(local["mode"]) if "mode" in local else None
        dp = mode not in (None, "none")
        target, delta = (float(local["target_epsilon"]), float(local["delta"])) if dp else (0.0, 0.0)
        secure, cap = local.get("secure_aggregation", False), local.get("max_scored_models")
        if not isinstance(secure, bool):
            raise TypeError(f"secure_aggregation = {secure!r} is not true or false")
        dishonest = local.get("dishonest_silos", 0)
        for key, n in (("max_scored_models", cap), ("dishonest_silos", dishonest)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
                raise TypeError(f"{key} = {n!r} is not a whole number ≥ 0")
        work = _work(doc.get("work", {}))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: [privacy] takes mode (with target_epsilon and delta unless it is \"none\"), "
                        f"secure_aggregation = true or false, max_scored_models = N and dishonest_silos = N; "
                        f"[work] takes {', '.join(f'{k} = N' for k in WORK_LIMITS)} ({e})") from None
    return SiloPolicy(mode, target, delta, secure, cap, dishonest, work)


def describe_policy(silo_dir: Path) -> str:
    """One line saying what the silo holds runs to (UserError when its privacy.toml is malformed)."""
    policy = _policy(silo_dir)
    if policy is None:
        return (f"silo {silo_dir.name}: no {POLICY_FILE}: it follows each run's config (DP, secure aggregation) "
                f"as the coordinator sets it")
    dp = ("the run's DP settings" if policy.mode is None else "privacy.mode = 'none' (no DP)" if policy.mode == "none"
          else f"privacy.mode = {policy.mode!r}, ε ≤ {policy.target_epsilon:g} over all runs, δ ≤ {policy.delta:g}")
    rules = [dp,
             "updates only inside a secure sum" if policy.secure_aggregation else "updates in clear allowed",
             "no cap on models scored" if policy.max_scored_models is None else
             f"at most {policy.max_scored_models} models scored over all runs"]
    if policy.dishonest_silos:
        rules.append(f"its noise share counted as if {policy.dishonest_silos} other silos left theirs out")
    rules += [f"{key} = {n:,}" for key, n in policy.work.items()]
    return f"silo {silo_dir.name}: its {POLICY_FILE} holds every run to: {'; '.join(rules)}"


def requires_secure_aggregation(silo_dir: Path) -> bool:
    """Whether the silo's privacy.toml lets its updates leave it only inside a secure sum."""
    policy = _policy(silo_dir)
    return policy is not None and policy.secure_aggregation


def work_limits(silo_dir: Path) -> dict[str, int]:
    """The caps the silo's privacy.toml `[work]` sets on what one request may ask of it (WORK_LIMITS)."""
    policy = _policy(silo_dir)
    return policy.work if policy is not None else {}


def charge_scores(silo_dir: Path, count: int) -> None:
    """Count `count` models about to be scored for the coordinator (WS/silos/NAME/.secrets/scored.json, over all
    runs), or refuse them all, counting nothing, where that would pass the silo's max_scored_models (a
    negative count gives back models counted but not scored)."""
    policy = _policy(silo_dir)
    cap = None if policy is None else policy.max_scored_models
    path = silo_dir / SCORED_FILE
    book = _read_book(path, "how many models it has scored")
    done = book.get("scored", 0)
    if not isinstance(done, int):
        raise UserError(f"{path} is corrupt (scored = {done!r}); this silo cannot tell how many models it has scored")
    if cap is not None and done + count > cap:
        raise UserError(f"silo {silo_dir.name!r}: scoring {count} more models would pass max_scored_models = "
                        f"{cap} of its {POLICY_FILE} ({done} scored so far); refused: each score "
                        f"is a number about its validation split for weights the coordinator chose")
    _write_book(path, {"scored": done + count})


def spent(silo_dir: Path) -> dict[str, Any]:
    """What runs have taken from this silo, from its own records (`fedlm silo spent`): each ledger's DP
    releases and ε (`lifetime` under a DP policy, else one per run config, by the config's hash), all of
    them composed per DP mode (`total`: what every run on this data spent together, at the largest δ
    any of them used), the models it has scored for coordinators, and the secure sums it took part in."""
    book = _read_book(silo_dir / LEDGER_FILE, "what it has spent")
    policy = _policy(silo_dir)
    if "lifetime" in book and "mode" not in book["lifetime"] and policy is not None and policy.mode not in (None, "none"):
        book["lifetime"].update(mode=policy.mode, delta=policy.delta, target_epsilon=policy.target_epsilon)  # an older
        # fedlm's: its lifetime ledger is the policy's
    ledgers: dict[str, dict[str, Any]] = {}
    pooled: dict[str, PrivacyLedger] = {}
    for key, mine in sorted(book.items()):
        try:
            events = [(float(z), float(q), int(n)) for z, q, n in mine["releases"].values()]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{silo_dir / LEDGER_FILE} is corrupt (ledger {key!r}: {e!r}); this silo cannot tell "
                            "what it has spent") from None
        row: dict[str, Any] = {"releases": len(events), "mode": mine.get("mode"), "delta": mine.get("delta"),
                               "target_epsilon": mine.get("target_epsilon"), "epsilon": None}
        if row["mode"] in ("record", "client"):  # ledgers written before fedlm kept these cannot be accounted
            own = PrivacyLedger(mode=row["mode"], target_epsilon=row["target_epsilon"], delta=row["delta"],
                                accountant=mine.get("accountant", "rdp"), clip=1.0, history={"me": events})
            row["epsilon"] = own.epsilon("me")
            total = pooled.setdefault(row["mode"], PrivacyLedger(mode=row["mode"], target_epsilon=math.inf, delta=0.0,
                                                                 accountant="rdp", clip=1.0))
            total.delta = max(total.delta, row["delta"])
            total.history.setdefault("me", []).extend(events)
        ledgers[key] = row
    return {
        "silo": silo_dir.name, "policy": describe_policy(silo_dir), "ledgers": ledgers,
        "total": {mode: {"epsilon": led.epsilon("me"), "delta": led.delta, "releases": len(led.history["me"])}
                  for mode, led in sorted(pooled.items())},
        "scored": int(_read_book(silo_dir / SCORED_FILE, "how many models it has scored").get("scored", 0)),
        "max_scored_models": None if policy is None else policy.max_scored_models,
        "secure_sums": len(_read_book(silo_dir / SUMS_FILE, "which sums it took part in")),
    }


def spent_line(silo_dir: Path) -> str:
    """`spent` in one line, for `fedlm node` to print as it starts."""
    got = spent(silo_dir)
    dp = "; ".join(f"{mode}-level ε {row['epsilon']:.2f} at δ = {row['delta']:g} over all runs"
                   for mode, row in got["total"].items()) or "no DP release recorded"
    return (f"silo {got['silo']} so far: {dp}; {got['scored']:,} models scored; {got['secure_sums']:,} secure sums "
            f"(`fedlm silo spent` for each run)")


def own_privacy(cfg: Config, silo_dir: Path) -> tuple[PrivacyConfig, bool]:
    """The silo's privacy settings: its privacy.toml checked against the run's (or the run's alone)."""
    policy = _policy(silo_dir)
    run = cfg.privacy
    if policy is None:
        return run, False
    mode, target, delta = policy.mode, policy.target_epsilon, policy.delta
    name = silo_dir.name
    if policy.secure_aggregation and not cfg.federation.secure_aggregation:
        raise UserError(f"silo {name!r}: its {POLICY_FILE} lets its updates leave it only inside a secure sum "
                        f"(secure_aggregation = true); the run asks for them in clear "
                        f"(federation.secure_aggregation = false); refused: set federation.secure_aggregation = "
                        f"true (3 or more silos a round) to train with this silo")
    if policy.dishonest_silos > run.dishonest_silos:  # it assumes more silos may leave out their shares
        run = replace(run, dishonest_silos=policy.dishonest_silos)
    if mode is None:  # no DP policy: the run's settings, and a ledger per run config
        return run, False
    if run.mode != mode:
        raise UserError(f"silo {name!r}: its {POLICY_FILE} says privacy.mode = {mode!r}, the run asks for "
                        f"{run.mode!r}; refused")
    if mode != "none" and (run.target_epsilon > target or run.delta > delta):
        raise UserError(f"silo {name!r}: the run asks for ε = {run.target_epsilon:g}, δ = {run.delta:g}; its "
                        f"{POLICY_FILE} allows at most ε = {target:g}, δ = {delta:g}; refused")
    return (run if mode == "none" else replace(run, target_epsilon=target, delta=delta)), True


class BudgetSpent(UserError):
    """A release the silo's own ledger refuses: it would pass its target ε."""


class SiloPrivacy:
    """One silo's privacy for one release: a round's update, or its local-only baseline (see the module doc)."""

    def __init__(self, cfg: Config, silo_dir: Path, *, config_text: str, round_idx: int,
                 arrays: dict[str, torch.Tensor]) -> None:
        self.cfg, self.dir, self.round = cfg, silo_dir, round_idx
        self.privacy, self.lifetime = own_privacy(cfg, silo_dir)
        self.run = hashlib.sha256(config_text.encode()).hexdigest()[:16]
        self.release = release_id(config_text, round_idx, arrays, silo_dir) if cfg.privacy.mode != "none" else ""

    def _key(self) -> NoiseKey:
        return party_key(insecure=self.cfg.privacy.insecure_reproducible_noise, seed=self.cfg.train.seed,
                         who=f"silo {self.dir.name}", owner_dir=self.dir)

    def generator(self, purpose: str) -> torch.Generator:
        """The silo's secret stream for `purpose` in this release."""
        return self._key().torch_generator(purpose, self.release)

    def record_round(self, generator: torch.Generator, plan: RecordPlan) -> None:
        """DP-SGD: charge this round's steps, then set `generator` (Poisson sampling, noise) to the secret stream."""
        steps = self.cfg.federation.local_steps
        self.charge((plan.noise_multiplier, plan.sample_rate, steps))
        reseed(generator, self._key().words(624, "dpsgd", self.release))

    def noise_share(self, update: dict[str, torch.Tensor], *, share_std: float, threshold: int,
                    num_silos: int) -> dict[str, torch.Tensor]:
        """Client DP under SecAgg: update + N(0, share_std²), charged for a peer at the fewest survivors,
        `privacy.dishonest_silos` of whom (the run's, or more by the silo's own policy) added no share."""
        fewest = max(threshold, MIN_SURVIVORS, num_silos // 2 + 1)
        honest = fewest - 1 - self.privacy.dishonest_silos
        if honest < 1:
            raise UserError(f"silo {self.dir.name!r}: with dishonest_silos = {self.privacy.dishonest_silos} a round of "
                            f"{fewest} survivors could leave its update with no honest noise share; refused")
        z_peer = share_std * math.sqrt(honest) / self.privacy.clip
        if not (math.isfinite(z_peer) and z_peer > 0):
            raise UserError(f"silo {self.dir.name!r}: the server asked for a noise share std {share_std}; refused")
        self.charge((z_peer, 1.0, 1))
        noise = noise_like(update, std=share_std, generator=self.generator("client-dp-share"))
        return {k: update[k].float() + noise[k] for k in update}

    def charge(self, entry: tuple[float, float, int]) -> None:
        """Record this release on the silo's own ledger, or refuse it past the silo's own target."""
        pc = self.privacy
        path = self.dir / LEDGER_FILE
        book = _read_book(path, "what it has spent")
        key = "lifetime" if self.lifetime else self.run
        mine = book.get(key, {"releases": {}})
        if self.release in mine["releases"]:
            return  # the same request again: the same streams, so the same release, nothing new
        ledger = PrivacyLedger(mode="client" if pc.mode == "client" else "record", target_epsilon=pc.target_epsilon,
                               delta=pc.delta, accountant=pc.accountant, clip=pc.clip)
        ledger.history["me"] = [(float(z), float(q), int(n)) for z, q, n in mine["releases"].values()]
        exceed, eps = ledger.would_exceed("me", entry)
        if exceed:
            what = "its local-only baseline" if self.round == LOCAL_BASELINE_ROUND else "this round"
            raise BudgetSpent(f"silo {self.dir.name!r}: {what} would take its own ε to {eps:.3f} > "
                              f"{pc.target_epsilon:g}; it stops contributing")
        mine["releases"][self.release] = list(entry)
        mine.update(mode=ledger.mode, delta=pc.delta, target_epsilon=pc.target_epsilon, accountant=pc.accountant)
        book[key] = mine
        _write_book(path, book)
        if not self.lifetime and len(mine["releases"]) == 1:
            log.info("silo %s follows the run's privacy settings (no %s in its directory)", self.dir.name,
                     POLICY_FILE)


def expected_clip_range(cfg: Config, share_std: float) -> float:
    """The SecAgg clip range a silo's own config implies (the server must send this one)."""
    base = cfg.federation.max_update_norm if cfg.federation.max_update_norm > 0 else 1.0
    if cfg.privacy.mode == "client":
        return base if share_std <= 0 else cfg.privacy.clip + 8 * share_std
    return base
