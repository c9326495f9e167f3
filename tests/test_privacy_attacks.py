"""Issue 19's attacks on fedlm's privacy, each run as a test against the real code paths: the
parties of a run (the server, a peer silo) trying to rebuild noise, replay DP-SGD, unmask a
silo, wrap the secure sum or read metrics in clear. The protocol-level attacks on secure
aggregation (t = 1, a second masked input, a second unmask, wrapped inputs) are in
test_secagg.py; ε against every party under dropouts in test_privacy_dp.py."""

from __future__ import annotations

import json
import logging
import math
import random
import re
import shutil
import stat
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedlm.config import Config, ModelConfig, PrivacyConfig
from fedlm.errors import UserError
from fedlm.federation import client_app as ca
from fedlm.federation.runner import run_federated
from fedlm.federation.silo_privacy import SiloPrivacy
from fedlm.model import Transformer
from fedlm.privacy.dpsgd import DPSGD, PoissonRecords, plan_record_dp, secret_generator
from fedlm.privacy.randomness import KEY_FILE, NoiseKey
from tests.test_federation import make_ws, rounds, tiny_cfg, weights


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ws(tmp_path_factory.mktemp("ws"))


def _dp(ws: Path, mode: str, rounds: int = 2, **fed: object) -> Config:
    cfg = tiny_cfg(ws, rounds=rounds, local_steps=1, **fed)
    cfg.privacy = PrivacyConfig(mode=mode, target_epsilon=8.0, delta=1e-3 if mode == "record" else 0.01)
    return cfg


def _differ(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return any(not torch.equal(wa[k], wb[k]) for k in wa)


def test_central_noise_is_fresh_unless_insecure_noise_is_asked(ws: Path, tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Attack 1: central client-DP noise was seeded from (train.seed, round), which every silo
    holds. Now the same config on the same data gives other noise each run: nothing in the
    config, the messages or the run directory rebuilds it. The explicit opt-in reproduces bit
    for bit, and says loudly that the run has no privacy."""
    run_federated(_dp(ws, "client"), tmp_path / "r1")
    run_federated(_dp(ws, "client"), tmp_path / "r2")
    assert _differ(tmp_path / "r1", tmp_path / "r2")
    assert not list((tmp_path / "r1").rglob("*.key"))  # no key in the run directory
    insecure = _dp(ws, "client")
    insecure.privacy.insecure_reproducible_noise = True
    with caplog.at_level(logging.WARNING):
        run_federated(insecure, tmp_path / "i1")
        run_federated(insecure, tmp_path / "i2")
    assert not _differ(tmp_path / "i1", tmp_path / "i2")
    assert any("NO PRIVACY" in r.getMessage() for r in caplog.records)
    rec = json.loads((tmp_path / "i1" / "privacy.json").read_text())
    assert "no privacy" in rec["insecure_reproducible_noise"]


@pytest.mark.slow
def test_record_noise_needs_the_silos_own_key(ws: Path, tmp_path: Path) -> None:
    """Attack 2 on the federated path: DP-SGD's sampling and noise come from each silo's own key
    (owner-only, in its directory). Without the keys (anyone else) the run is another one; with
    them (the silo itself, e.g. resuming) the same request gives the same release."""
    run_federated(_dp(ws, "record", rounds=1), tmp_path / "r1")
    for silo in ("a", "b", "c"):
        key = ws / "silos" / silo / KEY_FILE
        assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes()) == 32
    shutil.copytree(ws / "silos", tmp_path / "keys-of-r1")
    for silo in ("a", "b", "c"):
        shutil.rmtree(ws / "silos" / silo / ".secrets")  # another party: fresh keys
    run_federated(_dp(ws, "record", rounds=1), tmp_path / "r2")
    assert _differ(tmp_path / "r1", tmp_path / "r2")
    for silo in ("a", "b", "c"):  # the silos' own keys back: their streams again
        shutil.rmtree(ws / "silos" / silo / ".secrets")
        shutil.copytree(tmp_path / "keys-of-r1" / silo / ".secrets", ws / "silos" / silo / ".secrets")
    run_federated(_dp(ws, "record", rounds=1), tmp_path / "r3")
    assert not _differ(tmp_path / "r1", tmp_path / "r3")


def test_a_key_made_by_many_threads_at_once_is_one_key(tmp_path: Path) -> None:
    """In one process several silos' threads may make a workspace's key at once (a valuation's local-only
    baselines under record-level DP did, and one failed renaming a temporary file another had taken):
    every thread gets the same key, and no temporary file is left."""
    from concurrent.futures import ThreadPoolExecutor

    barrier = threading.Barrier(8)

    def make(_: int) -> bytes:
        barrier.wait()
        return NoiseKey.local(tmp_path).words(1, "probe").tobytes()

    with ThreadPoolExecutor(8) as pool:
        got = set(pool.map(make, range(8)))
    assert len(got) == 1 and sorted(p.name for p in (tmp_path / ".secrets").iterdir()) == ["noise.key"]


def test_dpsgd_replay_cannot_tell_neighbouring_datasets_apart() -> None:
    """Attack 2 as in the audit: at target ε = 0.5 an adversary who holds the config replays
    DP-SGD on D and on D' (one record changed) and checks which replay matches the released
    weights bit for bit. Against config-seeded noise it wins every trial; against the silo's
    secret stream it never matches, so it is left guessing. Bounded: 8 trials of 2 steps."""
    t0 = time.perf_counter()
    cfg = ModelConfig(preset="custom", d_model=16, n_layers=1, n_heads=2, d_ff=32, vocab_size=40, max_seq_len=8)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 40, (161,), generator=gen).numpy().astype(np.uint16)  # 20 records of 8
    neighbour = tokens.copy()
    neighbour[8:17] = (neighbour[8:17] + 1) % 40  # record 1 differs
    pc = PrivacyConfig(mode="record", target_epsilon=0.5, delta=1e-3)
    plan = plan_record_dp(num_records=20, batch_size=4, steps=2, privacy=pc)

    def release(data: np.ndarray, key: NoiseKey, trial: int) -> dict[str, torch.Tensor]:
        model = Transformer(cfg, seed=1)
        g = secret_generator(key, "run", trial)
        records = PoissonRecords([data], seq_len=8, sample_rate=plan.sample_rate, generator=g)
        with DPSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), plan=plan, generator=g) as dp:
            for _ in range(2):
                dp.step(*records.next(), lr=0.1)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    wins = {"config-seeded": 0, "secret": 0}
    for trial in range(8):
        secret_bit = random.Random(trial).random() < 0.5
        data = neighbour if secret_bit else tokens
        for kind in wins:
            key = NoiseKey.insecure_from_seed(7, "silo a") if kind == "config-seeded" else NoiseKey.fresh()
            out = release(data, key, trial)
            replay_key = NoiseKey.insecure_from_seed(7, "silo a")  # all the adversary can build
            on_d, on_d2 = release(tokens, replay_key, trial), release(neighbour, replay_key, trial)
            if same(out, on_d2) != same(out, on_d):  # exactly one replay matched: a sure answer
                wins[kind] += same(out, on_d2) == secret_bit
    assert wins["config-seeded"] == 8  # the attack works when the noise can be rebuilt
    assert wins["secret"] == 0  # and never decides when it cannot
    assert time.perf_counter() - t0 < 120


def _tampering_app(tamper: dict[str, object]) -> ClientApp:
    """fedlm's ClientApp, except silo "a" forges its round-1 masked vector (tamper["how"])."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return ca.app(msg, context)

    def train(msg: Message, context: Context) -> Message:
        reply = ca.app(msg, context)
        kind = msg.metadata.message_type
        if kind == "train.secagg_input":
            tamper.setdefault("metric_keys", set()).update(  # type: ignore[union-attr]
                reply.content.metric_records["metrics"].keys())
            r = int(msg.content.config_records["config"]["round"])  # type: ignore[arg-type]
            if context.node_config["silo"] == "a" and r == 1:  # round 1 (the wire counts from 1)
                arrays = reply.content.array_records["secagg-arrays"]
                y = arrays["masked"].numpy()
                forged = (np.random.default_rng(0).integers(0, 2**32, y.size, dtype=np.uint32)
                          if tamper["how"] == "wrap" else y + np.uint32(2**28))
                arrays["masked"] = Array(forged)
        return reply

    app.train()(train)
    for action in ("secagg_setup", "secagg_keys", "secagg_input", "secagg_unmask"):
        app.train(action)(train)
    return app


@pytest.mark.parametrize("how", ["wrap", "huge"])
def test_a_forged_masked_input_is_refused_and_the_run_goes_on(ws: Path, tmp_path: Path, how: str,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    """Attack 7: a malicious silo wraps the modular sum (random uint32) or adds a large in-range
    offset. The server refuses that round's sum (out of range / over n × max_update_norm) and the
    run goes on: the next round, with the same silos behaving, completes. Attack 8 on the same
    run: under SecAgg no silo sends its loss or seconds in clear, and the round's row holds
    their secure means, the same for every silo."""
    tamper: dict[str, object] = {"how": how}
    cfg = tiny_cfg(ws, rounds=2, local_steps=1, secure_aggregation=True, max_update_norm=1.0)
    with caplog.at_level(logging.WARNING):
        run_federated(cfg, tmp_path / "run", client_app=_tampering_app(tamper))
    first, second = rounds(tmp_path / "run")
    why = "out of range" if how == "wrap" else "exceeds"
    assert any("round 1" in r.getMessage() and why in r.getMessage() for r in caplog.records)
    assert not first["completed"] and second["completed"]
    assert "loss" not in tamper["metric_keys"] and "train_seconds" not in tamper["metric_keys"]  # type: ignore[operator]
    losses = {row["loss"] for row in second["silos"].values()}
    assert len(losses) == 1 and abs(second["loss"] - losses.pop()) < 1e-3


def test_a_rejected_update_does_not_reveal_its_norm(ws: Path, tmp_path: Path) -> None:
    """Attack 8: the silo checks its update against max_update_norm before masking; the reason
    the server gets names the rule, not the norm."""
    cfg = tiny_cfg(ws, rounds=1, local_steps=1, secure_aggregation=True, max_update_norm=1e-9)
    run_federated(cfg, tmp_path / "run")
    row = rounds(tmp_path / "run")[0]
    assert not row["completed"] and set(row["dropped"]) == {"a", "b", "c"}
    for why in row["dropped"].values():
        assert "max_update_norm" in why and not re.search(r"\d\.\d|\de-", why)


def test_insecure_noise_is_refused_across_organisations(ws: Path, tmp_path: Path) -> None:
    """The deployed engine (Flower's ServerApp, one process per organisation) refuses
    reproducible noise: any silo could rebuild it from the config."""
    from fedlm.config import save_config
    from fedlm.federation import server_app

    cfg = _dp(ws, "client")
    cfg.privacy.insecure_reproducible_noise = True
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.toml")
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"run-dir": str(run_dir), "resume": False})
    with pytest.raises(UserError, match="insecure_reproducible_noise = true is refused on the deployed"):
        server_app.main(None, context)  # type: ignore[arg-type]  # refused before any message
    assert "refused" in json.loads((run_dir / "error.json").read_text())["error"]


def test_a_silo_enforces_its_own_mode_and_budget(ws: Path, tmp_path: Path) -> None:
    """Attack 6: the silo takes its mode and ε from its own privacy.toml and ledger, not from the
    server: a run that drops privacy or raises ε is refused; a share std too small for the
    silo's budget is refused by its ledger; the same request again is not charged twice."""
    silo = tmp_path / "silos" / "a"
    shutil.copytree(ws / "silos" / "a", silo, ignore=shutil.ignore_patterns(".secrets"))
    (silo / "privacy.toml").write_text('[privacy]\nmode = "client"\ntarget_epsilon = 2.0\ndelta = 0.01\n')
    arrays = {"w": torch.zeros(3)}

    def rules(cfg: Config, r: int = 0) -> SiloPrivacy:
        return SiloPrivacy(cfg, silo, config_text=repr(cfg), round_idx=r, arrays=arrays)

    with pytest.raises(UserError, match="privacy.mode = 'client', the run asks for 'none'"):
        rules(tiny_cfg(ws))
    greedy = _dp(ws, "client")  # target 8 > the silo's 2
    with pytest.raises(UserError, match="allows at most ε = 2"):
        rules(greedy)
    cfg = _dp(ws, "client")
    cfg.privacy.target_epsilon = 2.0
    update = {"w": torch.zeros(3)}
    with pytest.raises(UserError, match="its own ε"):  # a server asking for almost no noise
        rules(cfg).noise_share(update, share_std=1e-3, threshold=2, num_silos=3)
    first = rules(cfg).noise_share(update, share_std=3.0, threshold=2, num_silos=3)
    again = rules(cfg).noise_share(update, share_std=3.0, threshold=2, num_silos=3)
    assert torch.equal(first["w"], again["w"])  # the same release, charged once
    ledger = json.loads((silo / ".secrets" / "ledger.json").read_text())
    assert len(ledger["lifetime"]["releases"]) == 1
    spent = 1
    with pytest.raises(UserError, match="stops contributing"):
        for r in range(1, 100):
            rules(cfg, r).noise_share(update, share_std=3.0, threshold=2, num_silos=3)
            spent += 1
    assert 1 < spent < 100


def test_a_silo_that_requires_secure_aggregation_never_sends_an_update_in_clear(ws: Path, tmp_path: Path) -> None:
    """Attack 9: the coordinator chooses the run's config, so it could turn secure aggregation off,
    or ask for a plain update under a config that says it is on, or retrain a coalition too small
    for it (`fedlm value`), and read one silo's update. A silo whose privacy.toml says
    `secure_aggregation = true` refuses each before training; under secure aggregation the run
    goes on as before."""
    own = tmp_path / "ws"
    shutil.copytree(ws, own, ignore=shutil.ignore_patterns(".secrets"))
    (own / "silos" / "a" / "privacy.toml").write_text("[privacy]\nsecure_aggregation = true\n")

    with pytest.raises(UserError, match=r"silo 'a': its privacy.toml lets its updates leave it only inside a secure "
                                        r"sum .* asks for them in clear .*refused"):
        run_federated(tiny_cfg(own, rounds=1, local_steps=1), tmp_path / "clear")
    assert not (tmp_path / "clear" / "rounds.jsonl").exists()  # refused at the query, before round 1

    secure = tiny_cfg(own, rounds=1, local_steps=1, secure_aggregation=True)
    run_federated(secure, tmp_path / "secure")
    assert rounds(tmp_path / "secure")[0]["completed"]

    # a plain train message whose config claims secure aggregation: refused before training
    from flwr.app import ArrayRecord

    from fedlm.config import save_config
    from fedlm.federation.messages import round_config, train_request

    save_config(secure, tmp_path / "secure.toml")
    text = (tmp_path / "secure.toml").read_text()
    msg = train_request(ArrayRecord(weights(tmp_path / "secure")), round_config(
        round_no=2, config_text=text, tokenizer_sha256="-", weight_ref=1.0, run_id="x"), 1, round_no=2)
    context = Context(run_id=1, node_id=1, node_config={"workspace": str(own), "silo": "b"}, state=RecordDict(),
                      run_config={})
    with pytest.raises(UserError, match="silo 'b': an update in clear was asked for a run with "
                                        "federation.secure_aggregation = true; refused"):
        ca.train(msg, context)

    # valuing the secure run: its coalitions of 1 and 2 silos cannot be trained under secure aggregation
    from fedlm.value.run import value_run

    with pytest.raises(UserError, match="silo 'a': its privacy.toml lets its updates leave it only inside"):
        value_run(tmp_path / "secure")
    assert not (tmp_path / "secure" / "value.json").exists()


def test_a_silo_caps_how_many_models_it_scores(ws: Path, tmp_path: Path) -> None:
    """Attack 10: scoring is an oracle on a silo's validation split: the coordinator chooses the
    weights, the silo answers one bits-per-byte number for each, outside secure aggregation and
    DP. A silo whose privacy.toml sets max_scored_models scores at most that many models over
    all runs (the run's own final validation and its local-only baseline's score count too) and refuses
    a request that would pass it, counting nothing for it; valuation then stops with that line."""
    from flwr.app import ArrayRecord

    from fedlm.data.tokenizer import tokenizer_hash
    from fedlm.federation.valuation import _request, score_reply
    from fedlm.value.run import value_run

    own = tmp_path / "ws"
    shutil.copytree(ws, own, ignore=shutil.ignore_patterns(".secrets"))
    silo = own / "silos" / "a"
    (silo / "privacy.toml").write_text("[privacy]\nmax_scored_models = 10\n")
    run = tmp_path / "run"
    run_federated(tiny_cfg(own, rounds=1, local_steps=1), run)

    def scored(name: str) -> object:
        path = own / "silos" / name / ".secrets" / "scored.json"
        return json.loads(path.read_text())["scored"] if path.exists() else None

    assert scored("a") == scored("b") == 2  # the run's start and final weights; b, with no cap, counts them too
    state = ArrayRecord(weights(run))

    def ask(count: int, *, local_baseline: bool = False) -> Message:
        msg = _request(1, [state] * count, config_text=(run / "config.toml").read_text(),
                       tokenizer_sha256=tokenizer_hash(own / "tokenizer.json"), max_tokens=256,
                       local_baseline=local_baseline)
        return score_reply(msg, silo)

    with pytest.raises(UserError, match=r"silo 'a': scoring 9 more models would pass max_scored_models = 10 of "
                                        r"its privacy.toml \(2 scored so far\); refused"):
        ask(9)
    with pytest.raises(UserError, match="scoring 9 more models"):  # its own local-only model's score counts too
        ask(8, local_baseline=True)
    assert scored("a") == 2
    reply = ask(8)
    assert len([k for k in reply.content.metric_records["metrics"] if k.startswith("bpb-")]) == 8
    assert scored("a") == 10
    with pytest.raises(UserError, match="scoring 1 more models would pass max_scored_models = 10"):
        value_run(run)
    assert not (run / "value.json").exists()


@pytest.mark.parametrize("mode", ["none", "client"])
def test_a_round_replayed_with_other_silos_is_not_unmasked_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   mode: str) -> None:
    """Attack 11: a silo's update is a function of the run config, the round, the weights and its
    data, so a coordinator that runs the same round twice, the second time without silo d, gets two
    secure sums whose difference is d's update (so the README once claimed no single update was
    revealed; under client-level DP the same request gives the same noise share too). Each silo now
    unmasks a round's input inside one set of survivors only: the replay is refused at unmasking by
    every silo in it, and the first sum stands."""
    from fedlm.federation import rounds as rounds_mod

    ws = make_ws(tmp_path / "ws", docs=20)
    shutil.copytree(ws / "silos" / "c", ws / "silos" / "d")  # a fourth silo (its own name, so its own batches)
    real = rounds_mod.secagg_round
    sums = []

    def replaying(link, round_no, sampled, arrays, config, **kw):  # type: ignore[no-untyped-def]
        first = real(link, round_no, sampled, arrays, config, **kw)
        again = real(link, round_no, sampled, arrays, config, **kw)  # the same silos again: the same sum, allowed
        without_d = real(link, round_no, [s for s in sampled if s != "d"], arrays, config, **kw)
        sums.append((first, again, without_d))
        return first

    monkeypatch.setattr(rounds_mod, "secagg_round", replaying)
    cfg = tiny_cfg(ws, rounds=1, local_steps=1, secure_aggregation=True)
    if mode == "client":
        cfg.privacy = PrivacyConfig(mode="client", target_epsilon=8.0, delta=0.01)
    run_federated(cfg, tmp_path / "run")
    (first, again, without_d), = sums
    assert first.update is not None and again.update is not None
    assert all(torch.allclose(first.update[k], again.update[k]) for k in first.update)
    assert without_d.update is None
    assert sorted(without_d.dropped) == ["a", "b", "c"]
    for why in without_d.dropped.values():
        assert "already unmasked in a sum of a, b, c, d" in why and "refused" in why, why
    assert rounds(tmp_path / "run")[0]["completed"]



def _refused(config_text: str, context: Context, *, run: Path, sha: str) -> str:
    """A forged run config sent to a silo's real `query` and `train` handlers: both refuse it, with the same
    line, which is returned."""
    from flwr.app import ArrayRecord

    from fedlm.federation.messages import query_request, round_config, train_request

    with pytest.raises(UserError) as query:
        ca.query(query_request(1, tokenizer_sha256=sha, config_text=config_text), context)
    msg = train_request(ArrayRecord(weights(run)), round_config(
        round_no=2, config_text=config_text, tokenizer_sha256=sha, weight_ref=1.0, run_id="x"), 1, round_no=2)
    with pytest.raises(UserError) as train:
        ca.train(msg, context)
    assert str(query.value) == str(train.value)
    return str(query.value)


def test_a_silo_starts_only_from_the_base_model_the_run_pins(ws: Path, tmp_path: Path) -> None:
    """Attack 12: the coordinator writes the run's config, so its train.init_from could name any path on
    a silo's machine: a model the silo tuned on its own data, for the run's updates and scores to
    describe; or files, to learn from the replies what is there. A run pins its base by digest
    (train.init_sha256, from the coordinator's own copy); a silo starts from nothing else, and its
    refusal reads the same whatever the path holds."""

    from fedlm.config import load_config, save_config
    from fedlm.data.tokenizer import tokenizer_hash
    from fedlm.modelio import save_model
    from fedlm.pretrained import model_digest
    from tests.test_federation import vocab
    from tests.test_lora import _base_model

    base = _base_model(ws, tmp_path / "base")  # the consortium's base: the coordinator has it too
    cfg = tiny_cfg(ws, rounds=1, local_steps=1)
    cfg.train.init_from, cfg.lora.rank, cfg.model.max_seq_len = str(base), 2, 64
    run_federated(cfg, tmp_path / "run")  # the pinned base: the run goes as before
    assert rounds(tmp_path / "run")[0]["completed"]
    pinned = load_config(tmp_path / "run" / "config.toml")
    assert pinned.train.init_sha256 == model_digest(base)

    private = tmp_path / "silo-a" / "tuned"  # on silo a's machine only: a model tuned on its own text
    torch.manual_seed(11)
    save_model(Transformer(ModelConfig(preset="tiny", vocab_size=vocab(ws), max_seq_len=64)), private,
               tokenizer_path=ws / "tokenizer.json")
    (tmp_path / "silo-a" / "notes.txt").write_text("a file of the silo's\n")
    sha = tokenizer_hash(ws / "tokenizer.json")
    context = Context(run_id=1, node_id=1, node_config={"workspace": str(ws), "silo": "a"}, state=RecordDict(),
                      run_config={})

    def config_text(init_from: str, init_sha256: str) -> str:
        forged = load_config(tmp_path / "run" / "config.toml")
        forged.train.init_from, forged.train.init_sha256 = init_from, init_sha256
        save_config(forged, tmp_path / "forged.toml")
        return (tmp_path / "forged.toml").read_text()

    def refusal(init_from: str, init_sha256: str = pinned.train.init_sha256) -> str:
        text = config_text(init_from, init_sha256)
        return _refused(text, context, run=tmp_path / "run", sha=sha).replace(repr(init_from), "PATH")

    # the silo's own model under the public base's pin, a file, a folder, nothing: one reply, no update
    replies = {refusal(str(p)) for p in [private, tmp_path / "silo-a" / "notes.txt", tmp_path / "silo-a",
                                         tmp_path / "silo-a" / "none"]}
    assert replies == {f"silo 'a': it has no model at train.init_from = PATH with the run's pinned sha256 "
                       f"{pinned.train.init_sha256[:12]}…; refused: install the coordinator's copy of the model "
                       "there (the same bytes; the silo's log says what it found)"}
    # the coordinator cannot pin the silo's model: it does not have it; and an unpinned base is refused
    assert "without pinning it (train.init_sha256" in refusal(str(private), init_sha256="")


def test_a_silos_error_reply_cannot_rewrite_the_coordinators_terminal(ws: Path, tmp_path: Path) -> None:
    """Attack 13: a silo writes its own error replies, and the coordinator prints them (the run's
    error, server.log, a dropped silo's reason). Raw, terminal escapes in one could rewrite the
    coordinator's screen, fake a line or set its clipboard, and a megabyte of text could flood it.
    The coordinator shows a silo's reason as one printable line, cut at MAX_FOREIGN_CHARS."""
    from fedlm.errors import MAX_FOREIGN_CHARS

    evil = "\x1b]52;c;ZXZpbA==\x07\x1b[2K\rround 1 completed\u202e" + "x" * 10_000
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        if context.node_config["silo"] == "b":
            raise UserError(evil)
        return ca.app(msg, context)

    with pytest.raises(UserError) as e:
        run_federated(tiny_cfg(ws, rounds=1, local_steps=1), tmp_path / "run", client_app=app)
    shown = str(e.value)
    assert shown.isprintable() and len(shown) < MAX_FOREIGN_CHARS + 100
    assert shown.startswith(r"\x1b]52;c;ZXZpbA==\x07\x1b[2K\rround 1 completed\u202exxx")
    assert shown.endswith(f"… ({len(evil) - MAX_FOREIGN_CHARS} more characters)")


def test_silos_that_leave_out_their_noise_shares_are_planned_for(tmp_path: Path) -> None:
    """Attack 14: under secure aggregation with client-level DP the noise on the sum is the silos'
    own shares, and no one can check that a silo added its share. Silos that leave theirs out
    (alone, or colluding with whoever reads the sum) lower the noise every other silo's ε counts on.
    With privacy.dishonest_silos = d the shares are sized so that the honest others' shares alone
    carry the planned noise; the run's ledger charges that; a silo can hold a run to its own d, and
    a d that would leave an update with no honest share is refused before round 1."""
    from fedlm.federation.secagg import min_survivors
    from fedlm.privacy.accounting import client_epsilon
    from fedlm.privacy.client_dp import plan_client_dp

    def plan(d: int, per_round: int = 5):  # type: ignore[no-untyped-def]
        pc = PrivacyConfig(mode="client", target_epsilon=4.0, delta=1e-3, clip=0.5, dishonest_silos=d)
        return plan_client_dp(num_silos=per_round, participations={"a": 6}, per_round=per_round, distributed=True,
                              privacy=pc, min_survivors=min_survivors(per_round))

    trusting, wary = plan(0), plan(1)
    m = wary.min_survivors
    assert m == 3 and wary.noise_multiplier == trusting.noise_multiplier
    # what a peer really faces at the fewest survivors when one of the others adds no share
    honest = m - 1 - 1
    faced = {name: p.share_std * math.sqrt(honest) / p.clip for name, p in (("trusting", trusting), ("wary", wary))}
    assert faced["wary"] == pytest.approx(wary.noise_multiplier)  # as planned
    assert client_epsilon([faced["wary"]] * 6, delta=1e-3) <= 4.0 * (1 + 1e-9)
    assert client_epsilon([faced["trusting"]] * 6, delta=1e-3) > 4.0 * 1.5  # the attack on the plan without d
    assert wary.against_peer(m) == pytest.approx(wary.noise_multiplier)
    with pytest.raises(UserError, match=r"privacy.dishonest_silos = 2: a round may end with 3 survivors"):
        plan(2, per_round=4)

    # a silo that assumes one dishonest peer charges the trusting run's share at what it is worth to it
    ws = make_ws(tmp_path / "ws", docs=12)
    for extra in ("d", "e"):  # five silos (their own names, so their own batches)
        shutil.copytree(ws / "silos" / "c", ws / "silos" / extra)
    silo = ws / "silos" / "a"
    (silo / "privacy.toml").write_text("[privacy]\ndishonest_silos = 1\n")
    cfg = tiny_cfg(ws, rounds=6, local_steps=1, secure_aggregation=True)
    cfg.privacy = PrivacyConfig(mode="client", target_epsilon=4.0, delta=1e-3, clip=0.5)
    update = {"w": torch.zeros(3)}

    def share(c: Config, std: float, r: int = 0) -> None:
        SiloPrivacy(c, silo, config_text=repr(c), round_idx=r, arrays=update).noise_share(
            update, share_std=std, threshold=3, num_silos=5)

    with pytest.raises(UserError, match="its own ε"):  # six rounds at half the variance do not fit in 4
        for r in range(6):
            share(cfg, trusting.share_std, r)
    cfg.privacy.dishonest_silos = 1
    for r in range(6):  # the wary plan's shares fit the silo's own reading
        share(cfg, wary.share_std, 100 + r)

    # and a run of it: the plan and privacy.json say what was assumed, ε within the target
    run_federated(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "privacy.json").read_text())
    assert record["dishonest_silos"] == 1 and record["epsilon_is_against"].endswith("with the shares of one other silo left out")
    assert all(row["completed"] for row in rounds(tmp_path / "run"))


def test_a_silo_bounds_the_work_a_run_may_ask_of_it(ws: Path, tmp_path: Path) -> None:
    """Attack 15: the coordinator writes the run config, so it chooses how long a silo's machine trains
    (local steps, batch, sequence length, a DP batch of the whole split), how long it scores (validation
    batches drawn with replacement, so without end) and how large a from-scratch model it builds. A silo
    whose privacy.toml has a [work] table refuses a run that asks more, at its query and at every
    request, before it builds, trains or scores anything; a run within the limits goes as before."""
    from flwr.app import ArrayRecord

    from fedlm.config import load_config, save_config
    from fedlm.data.tokenizer import tokenizer_hash
    from fedlm.federation import task
    from fedlm.federation.silo_privacy import describe_policy
    from fedlm.federation.valuation import _request, score_reply
    from fedlm.resolve import resolve_config

    own = tmp_path / "ws"
    shutil.copytree(ws, own, ignore=shutil.ignore_patterns(".secrets"))
    silo = own / "silos" / "a"
    cfg = tiny_cfg(own, rounds=1, local_steps=2)
    asked = task.work_asked(resolve_config(cfg), silo)  # as the silo receives it
    assert asked["max_round_tokens"] == 2 * 4 * 16 and asked["max_eval_tokens"] == 20 * 4 * 16
    assert asked["max_run_tokens"] == 1 * 2 * 4 * 16
    (silo / "privacy.toml").write_text("[privacy]\nmax_scored_models = 100\n[work]\n" + "".join(
        f"{key} = {n}\n" for key, n in asked.items()))  # exactly what the run asks
    assert "max_round_tokens = 128; max_run_tokens = 128; max_eval_tokens = 1,280" in describe_policy(silo)
    run_federated(cfg, tmp_path / "run")
    assert rounds(tmp_path / "run")[0]["completed"]

    sha = tokenizer_hash(own / "tokenizer.json")
    context = Context(run_id=1, node_id=1, node_config={"workspace": str(own), "silo": "a"}, state=RecordDict(),
                      run_config={})

    def forged(**changes: dict[str, object]) -> str:
        c = load_config(tmp_path / "run" / "config.toml")
        for section, values in changes.items():
            for key, value in values.items():
                setattr(getattr(c, section), key, value)
        save_config(c, tmp_path / "forged.toml")
        return (tmp_path / "forged.toml").read_text()

    def refusal(text: str) -> str:
        why = _refused(text, context, run=tmp_path / "run", sha=sha)
        assert not any(text in key for key in task._MODELS)  # refused before a model was built
        return why

    assert refusal(forged(federation={"local_steps": 10**6})) == (
        "silo 'a': the run asks 64,000,000 tokens a training round trains on (federation.local_steps × "
        "train.grad_accum × train.batch_size × train.seq_len; under record-level DP the expected batch); its "
        "privacy.toml allows max_round_tokens = 128; refused: ask for less, or have the silo raise its limit")
    assert "asks 12,800,000 tokens one validation of a model scores" in refusal(forged(train={"eval_batches": 200_000}))
    assert "asks 128,000,000 tokens a whole run trains on" in refusal(forged(federation={"rounds": 10**6}))
    assert "parameters in the model it builds (adapters included); its privacy.toml allows max_parameters" in refusal(
        forged(model={"d_model": 64, "d_ff": 128}))
    dp = PrivacyConfig(mode="record", target_epsilon=8.0, delta=1e-3, sample_rate=1.0)  # every record, each step
    assert "allows max_round_tokens = 128" in refusal(forged(privacy={k: getattr(dp, k) for k in
                                                                      ("mode", "target_epsilon", "delta", "sample_rate")}))

    # scoring for a valuation: refused before its local-only model (every round's steps at once) is
    # trained or a score is counted
    text = forged(federation={"rounds": 10**6})
    msg = _request(1, [ArrayRecord(weights(tmp_path / "run"))], config_text=text, tokenizer_sha256=sha,
                   max_tokens=256, local_baseline=True)
    scored = json.loads((silo / ".secrets" / "scored.json").read_text())
    with pytest.raises(UserError, match="max_run_tokens = 128"):
        score_reply(msg, silo)
    assert json.loads((silo / ".secrets" / "scored.json").read_text()) == scored

    # a misspelt limit would leave the silo unbounded without a word: the policy is refused instead
    (silo / "privacy.toml").write_text("[work]\nmax_round_token = 128\n")
    with pytest.raises(UserError, match=r"privacy.toml: .*\[work\] takes max_round_tokens = N, max_run_tokens = N, "
                                        r"max_eval_tokens = N, max_parameters = N \(unknown key in \[work\]: 'max_round_token'\)"):
        describe_policy(silo)
    (silo / "privacy.toml").write_text("[wrok]\nmax_round_tokens = 128\n")
    with pytest.raises(UserError, match=r"unknown table 'wrok'"):
        describe_policy(silo)

