"""Federated runs in one process: the in-process Grid, the rounds loop, drop-outs, resume, the wire.

Each test builds a throw-away workspace of three small silos and a model of a few thousand
parameters, so a 2-3 round run takes about a second.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from safetensors.torch import load_file

from fedlm.config import Config, build_config
from fedlm.data.shards import shard_silo
from fedlm.data.tokenizer import agree_tokenizer, load_tokenizer, tokenizer_hash
from fedlm.errors import UserError
from fedlm.federation import client_app as ca
from fedlm.federation import task
from fedlm.federation.grid import deserialise
from fedlm.federation.runner import run_federated
from fedlm.federation.strategies import cyclic_order
from fedlm.train import SiloBatches, build_model, local_update, lr_at, make_optimizer, train_step

CANARY = "zqxCANARYvw7731"
WORDS = {
    "a": "court appeal judge statute contract tort verdict law".split(),
    "b": "patient dose clinic symptom therapy nurse fever scan".split(),
    "c": "kernel thread socket buffer compiler cache pointer heap".split(),
}


def make_ws(ws: Path, silos: tuple[str, ...] = ("a", "b", "c"), *, canary: str | None = None,
            docs: int = 60) -> Path:
    """A workspace of small silos (docs.jsonl, agreed tokenizer, shards); `canary` goes in the first."""
    rng = random.Random(0)
    for s in silos:
        d = ws / "silos" / s
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "docs.jsonl", "w") as f:
            for i in range(docs):
                text = " ".join(rng.choice(WORDS[s]) for _ in range(80))
                if canary and s == silos[0] and i == 3:
                    text += f" {canary} "
                f.write(json.dumps({"text": text}) + "\n")
    agree_tokenizer(ws, vocab_size=512)
    for s in silos:
        shard_silo(ws, s)
    return ws


def tiny_cfg(ws: Path, **fed: object) -> Config:
    return build_config({
        "data": {"workspace": str(ws)},
        "model": {"preset": "custom", "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64,
                  "max_seq_len": 32},
        "train": {"batch_size": 4, "seq_len": 16, "mode": "federated", "warmup_steps": 2, "seed": 7},
        "federation": {"rounds": 3, "local_steps": 2, "round_timeout": 30.0, **fed},
    })


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ws(tmp_path_factory.mktemp("ws"), canary=CANARY)


def vocab(ws: Path) -> int:
    return load_tokenizer(ws / "tokenizer.json").get_vocab_size()


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoint" / "global.safetensors"))


def rounds(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]


class Stop(Exception):
    """Raised from on_round to stop a run after a round, as a crash would."""


def stop_after_1(r: int, total: int, row: dict) -> None:
    if r == 1:
        raise Stop


def decode(objs: dict[str, bytes]) -> Message:
    """A message as it crossed the in-process wire (the objects an on_wire tap saw)."""
    return deserialise(objs, next(oid for oid, b in objs.items() if b.startswith(b"Message")), "x")


def wrap(behave: dict[str, str], delay: float = 3.0) -> ClientApp:
    """A ClientApp that delegates to fedlm's, except per silo: "raise", "nan" or "slow" in train."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return ca.app(msg, context)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        how = behave.get(str(context.node_config["silo"]))
        if how == "raise":
            raise RuntimeError("disk on fire")
        if how == "slow":
            time.sleep(delay)
        reply = ca.app(msg, context)
        if how == "nan":
            arrays = reply.content.array_records["arrays"]
            name = next(iter(arrays))
            bad = arrays[name].numpy().copy()
            bad.flat[0] = np.nan
            from flwr.app import Array
            arrays[name] = Array(bad)
        return reply

    return app


def test_one_round_equals_fedavg_of_local_updates(ws: Path, tmp_path: Path) -> None:
    """Round 1's global weights = w0 + mean of the silos' local updates weighted by tokens (numpy)."""
    cfg = tiny_cfg(ws, rounds=1)
    run_federated(cfg, tmp_path / "run")
    got = weights(tmp_path / "run")

    # Reference: the foundation's trainer run by hand for each silo, averaged with numpy.
    ref_cfg = tiny_cfg(ws, rounds=1)
    sha = tokenizer_hash(ws / "tokenizer.json")
    model = build_model(ref_cfg)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    tc = task.federated_train_config(ref_cfg)
    updates, tokens = [], []
    torch.set_num_threads(1)
    for silo in ("a", "b", "c"):
        data = SiloBatches.open([ws / "silos" / silo], seed=0, tokenizer_sha256=sha)
        data.generator.manual_seed(task.round_seed(7, silo, 0))
        upd, m = local_update(build_model(ref_cfg), w0, data, tc, first_step=0, steps=2)
        updates.append(upd)
        tokens.append(m["num_tokens"])
    for name, value in got.items():
        ref = w0[name].numpy() + np.average(np.stack([u[name].numpy() for u in updates]), axis=0,
                                            weights=tokens)
        np.testing.assert_allclose(value.numpy(), ref, rtol=0, atol=1e-6)
    assert set(got) == set(task.wire_names(model))  # the tied head travels once


def test_cyclic_equals_one_optimizer_over_the_silos_in_turn(ws: Path, tmp_path: Path) -> None:
    """strategy = "cyclic": the silos train in the seeded order, each from the weights and AdamW state
    the previous one left, so the run equals one AdamW run over their batches in turn."""
    run_federated(tiny_cfg(ws, rounds=2, strategy="cyclic"), tmp_path / "run")
    got = weights(tmp_path / "run")
    orders = [cyclic_order(["a", "b", "c"], round_idx=r, seed=7) for r in range(2)]
    assert orders[0] != orders[1] and sorted(orders[0]) == ["a", "b", "c"]  # drawn afresh each round

    # Reference: one model and one AdamW, stepped through each silo's seeded batches in turn.
    cfg = tiny_cfg(ws, rounds=2, strategy="cyclic")
    sha = tokenizer_hash(ws / "tokenizer.json")
    model = build_model(cfg)
    tc = task.federated_train_config(cfg)
    optimizer = make_optimizer(model, tc)
    torch.set_num_threads(1)
    for r, order in enumerate(orders):
        for silo in order:
            data = SiloBatches.open([ws / "silos" / silo], seed=0, tokenizer_sha256=sha)
            data.generator.manual_seed(task.round_seed(7, silo, r))
            for i in range(2):
                train_step(model, optimizer, lambda d=data: d.next(tc.batch_size, tc.seq_len), lr=lr_at(2 * r + i, tc),
                           grad_accum=tc.grad_accum, grad_clip=tc.grad_clip, precision=tc.precision)
    ref = model.state_dict()
    for name, value in got.items():
        np.testing.assert_allclose(value.numpy(), ref[name].numpy(), rtol=0, atol=1e-5)
    row = rounds(tmp_path / "run")[1]
    assert row["completed"] and set(row["silos"]) == {"a", "b", "c"}
    assert row["overhead_seconds"] < row["seconds"]  # the silos' training times add up in a cyclic round

    # stopped after round 1 and resumed: the AdamW state passed on is in the round checkpoint
    with pytest.raises(Stop):
        run_federated(tiny_cfg(ws, rounds=2, strategy="cyclic"), tmp_path / "cut", on_round=stop_after_1)
    run_federated(tiny_cfg(ws, rounds=2, strategy="cyclic"), tmp_path / "cut", resume=True)
    cut = weights(tmp_path / "cut")
    assert all(torch.equal(got[k], cut[k]) for k in got)


def test_fedsgd_equals_the_centralised_step_on_the_pooled_batches(ws: Path, tmp_path: Path) -> None:
    """strategy = "fedsgd": each silo sends one batch's gradient and the server steps the trainer's
    AdamW on their mean, so the run equals one AdamW run on the silos' batches pooled, step by step."""
    cfg = tiny_cfg(ws, rounds=3, local_steps=1, strategy="fedsgd")
    run_federated(cfg, tmp_path / "run")
    got = weights(tmp_path / "run")

    # Reference: one model, one AdamW; each step's loss is the mean over the three silos' seeded batches.
    sha = tokenizer_hash(ws / "tokenizer.json")
    model = build_model(cfg)
    tc = task.federated_train_config(cfg)
    optimizer = make_optimizer(model, tc)
    torch.set_num_threads(1)
    for r in range(3):
        batches = []
        for silo in ("a", "b", "c"):
            data = SiloBatches.open([ws / "silos" / silo], seed=0, tokenizer_sha256=sha)
            data.generator.manual_seed(task.round_seed(7, silo, r))
            batches.append(data.next(tc.batch_size, tc.seq_len))
        pooled = (torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
        train_step(model, optimizer, lambda p=pooled: p, lr=lr_at(r, tc), grad_accum=1, grad_clip=tc.grad_clip,
                   precision=tc.precision)
    ref = model.state_dict()
    for name, value in got.items():  # the same gradient summed in another order: Adam's 1/√v magnifies
        np.testing.assert_allclose(value.numpy(), ref[name].numpy(), rtol=0, atol=1e-4)  # its last bits
    row = rounds(tmp_path / "run")[0]
    assert row["completed"] and row["silos"]["a"]["num_tokens"] == tc.batch_size * tc.seq_len

    # stopped after round 1 and resumed: AdamW's moments are in the round checkpoint
    with pytest.raises(Stop):
        run_federated(cfg, tmp_path / "cut", on_round=stop_after_1)
    run_federated(cfg, tmp_path / "cut", resume=True)
    cut = weights(tmp_path / "cut")
    assert all(torch.equal(got[k], cut[k]) for k in got)

    # under secure aggregation the server sees only the gradients' sum: the same run within quantisation
    run_federated(tiny_cfg(ws, rounds=3, local_steps=1, strategy="fedsgd", secure_aggregation=True,
                           max_update_norm=50.0), tmp_path / "secagg")
    masked = weights(tmp_path / "secagg")
    for name, value in got.items():  # the step is 50 / ((2^31 - 1) // 6); Adam's 1/√v magnifies it
        np.testing.assert_allclose(masked[name].numpy(), value.numpy(), rtol=0, atol=2e-3)


def test_fedsgd_refuses_local_steps_and_record_dp(ws: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="local_steps must be 1 with strategy = \"fedsgd\""):
        tiny_cfg(ws, local_steps=2, strategy="fedsgd")
    cfg = tiny_cfg(ws, rounds=1, local_steps=1, strategy="fedsgd")
    cfg.privacy.mode = "record"
    with pytest.raises(UserError, match="fedsgd.*privacy.mode = \"client\""):
        run_federated(cfg, tmp_path / "record")


@pytest.mark.slow
def test_cyclic_with_lora_passes_only_the_adapters_state(ws: Path, tmp_path: Path) -> None:
    """LoRA + cyclic: the adapters and their AdamW moments travel; every silo's turn is accepted."""
    cfg = tiny_cfg(ws, rounds=2, strategy="cyclic")
    cfg.lora.rank = 4
    messages: list[tuple[str, dict[str, bytes]]] = []
    run_federated(cfg, tmp_path / "run", on_wire=lambda way, node, objs: messages.append((way, objs)))
    assert all(r["completed"] and not r["dropped"] for r in rounds(tmp_path / "run"))
    adapters = {n for n in weights(tmp_path / "run") if ".lora_" in n}
    assert adapters and set(weights(tmp_path / "run")) == adapters
    ups = [decode(objs) for way, objs in messages if way == "up"]
    carried = [m.content.array_records["optimizer"] for m in ups if "optimizer" in m.content.array_records]
    assert len(carried) == 6 and all(set(c) == {"step"} | {f"{k}.{n}" for n in adapters
                                                              for k in ("exp_avg", "exp_avg_sq")} for c in carried)


def test_cyclic_skips_a_failed_silo_and_refuses_averaging_options(ws: Path, tmp_path: Path) -> None:
    """A silo that crashes is skipped (the next starts from the weights before it); secagg etc. are refused."""
    run_federated(tiny_cfg(ws, rounds=1, strategy="cyclic", min_silos=2), tmp_path / "run",
                  client_app=wrap({"b": "raise"}))
    row = rounds(tmp_path / "run")[0]
    assert row["completed"] and set(row["dropped"]) == {"b"} and "disk on fire" in row["dropped"]["b"]
    assert {"loss", "num_tokens"} <= set(row["silos"]["a"]) and {"loss", "num_tokens"} <= set(row["silos"]["c"])
    run_federated(tiny_cfg(ws, rounds=1, strategy="cyclic", min_silos=3), tmp_path / "skip",
                  client_app=wrap({"b": "raise"}))
    assert not rounds(tmp_path / "skip")[0]["completed"]
    for key, value in (("secure_aggregation", True), ("aggregation", "median")):
        with pytest.raises(UserError, match=f"cyclic.*combined with federation.{key}"):
            run_federated(tiny_cfg(ws, rounds=1, strategy="cyclic", **{key: value}), tmp_path / key)
    for mode in ("client", "record"):
        cfg = tiny_cfg(ws, rounds=1, strategy="cyclic")
        cfg.privacy.mode = mode
        with pytest.raises(UserError, match=f"cyclic.*combined with privacy.mode = '{mode}'"):
            run_federated(cfg, tmp_path / mode)


def test_same_seed_bitwise_equal_and_resume(ws: Path, tmp_path: Path) -> None:
    """Two runs with one seed give identical weights; a run stopped after round 1 and resumed too."""
    cfg = tiny_cfg(ws, strategy="fedadam", server_lr=0.01)
    run_federated(cfg, tmp_path / "full")

    with pytest.raises(Stop):
        run_federated(tiny_cfg(ws, strategy="fedadam", server_lr=0.01), tmp_path / "cut", on_round=stop_after_1)
    assert json.loads((tmp_path / "cut/checkpoint/state.json").read_text())["round"] == 1
    with pytest.raises(UserError, match="--resume"):
        run_federated(tiny_cfg(ws, strategy="fedadam", server_lr=0.01), tmp_path / "cut")
    summary = run_federated(tiny_cfg(ws, strategy="fedadam", server_lr=0.01), tmp_path / "cut", resume=True)
    assert summary["rounds_run"] == 2
    full, cut = weights(tmp_path / "full"), weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)
    assert [r["round"] for r in rounds(tmp_path / "cut")] == [1, 2, 3]
    # and the saved model holds the same weights
    model = load_file(str(next((tmp_path / "cut/model").glob("*.safetensors"))))
    assert torch.equal(model["tok_emb.weight"], full["tok_emb.weight"])
    # a third, uninterrupted run with the same seed
    run_federated(tiny_cfg(ws, strategy="fedadam", server_lr=0.01), tmp_path / "again")
    again = weights(tmp_path / "again")
    assert all(torch.equal(full[k], again[k]) for k in full)


def test_nan_update_rejected_and_logged(ws: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "fedlm.federation")
    run_federated(tiny_cfg(ws, rounds=1, min_silos=2), tmp_path / "run", client_app=wrap({"b": "nan"}))
    row = rounds(tmp_path / "run")[0]
    assert row["completed"] and row["dropped"]["b"].startswith("rejected: non-finite")
    assert "silo b dropped (rejected: non-finite" in caplog.text
    assert all(torch.isfinite(t).all() for t in weights(tmp_path / "run").values())


def test_crash_dropped_round_completes_or_skips(ws: Path, tmp_path: Path) -> None:
    """A silo that raises is dropped; >= min_silos left completes the round, fewer skip it."""
    run_federated(tiny_cfg(ws, rounds=1, min_silos=2), tmp_path / "ok", client_app=wrap({"c": "raise"}))
    row = rounds(tmp_path / "ok")[0]
    assert row["completed"] and set(row["dropped"]) == {"c"} and "disk on fire" in row["dropped"]["c"]
    assert set(row["silos"]["a"]) >= {"loss", "num_tokens", "train_seconds", "bytes_up", "bytes_down"}

    run_federated(tiny_cfg(ws, rounds=1, min_silos=3), tmp_path / "skip", client_app=wrap({"c": "raise"}))
    assert not rounds(tmp_path / "skip")[0]["completed"]
    cfg = tiny_cfg(ws, rounds=1)
    w0 = build_model(cfg).state_dict()
    assert all(torch.equal(w0[k], v) for k, v in weights(tmp_path / "skip").items())


def test_timeout_drops_the_slow_silo(ws: Path, tmp_path: Path) -> None:
    t0 = time.monotonic()
    run_federated(tiny_cfg(ws, rounds=1, min_silos=2, round_timeout=1.5), tmp_path / "run",
                  client_app=wrap({"a": "slow"}, delay=4.0))
    assert time.monotonic() - t0 < 4.0  # bounded by the timeout, not by the slow silo
    row = rounds(tmp_path / "run")[0]
    assert row["completed"] and row["dropped"]["a"].startswith("timeout")


def test_what_crosses_the_wire(ws: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                               capfd: pytest.CaptureFixture[str]) -> None:
    """Replies hold only the model's arrays (names, shapes) and numeric metrics; the canary is nowhere."""
    caplog.set_level(logging.DEBUG)
    wire: list[tuple[str, int, dict[str, bytes]]] = []
    cfg = tiny_cfg(ws, rounds=2)
    run_federated(cfg, tmp_path / "run", on_wire=lambda d, n, objs: wire.append((d, n, objs)))
    model = build_model(tiny_cfg(ws))
    expected = {n: tuple(model.state_dict()[n].shape) for n in task.wire_names(model)}
    ups = [objs for d, _, objs in wire if d == "up"]
    assert len(ups) == 3 + 3 * 2 + 3  # one check, two train replies and one validation per silo
    canary = CANARY.encode()
    for d, _, objs in wire:
        assert not any(canary in b for b in objs.values()), f"canary in a {d} message"
    trains = 0
    for objs in ups:
        msg = decode(objs)
        assert not msg.has_error()
        if msg.metadata.message_type == "train":
            trains += 1
            assert set(msg.content.keys()) == {"arrays", "metrics"}
            arrays = msg.content.array_records["arrays"]
            assert {k: tuple(a.shape) for k, a in arrays.items()} == expected
            metrics = dict(msg.content.metric_records["metrics"])
            assert set(metrics) == {"loss", "num_tokens", "train_seconds"}
            assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in metrics.values())
        elif msg.metadata.message_type == "evaluate":  # after the last round: two validation losses only
            assert set(msg.content.keys()) == {"metrics"}
            assert set(msg.content.metric_records["metrics"]) == {"val_loss_start", "val_loss_final"}
        else:  # the pre-round check: the silo's name and token counts
            assert msg.metadata.message_type == "query"
            assert set(msg.content.keys()) == {"silo", "metrics"}
            assert all(isinstance(v, (int, float)) for v in msg.content.metric_records["metrics"].values())
    assert trains == 6
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert canary not in path.read_bytes(), f"canary in {path}"
    out, err = capfd.readouterr()
    assert CANARY not in caplog.text + out + err
    for row in rounds(tmp_path / "run"):
        for silo in "abc":
            param_bytes = 4 * sum(math.prod(s) for s in expected.values())
            assert row["silos"][silo]["bytes_down"] > param_bytes
            assert row["silos"][silo]["bytes_up"] > param_bytes


def test_bad_input_before_round_one(tmp_path: Path) -> None:
    ws = make_ws(tmp_path / "ws", docs=30)
    # a silo with no shards
    (ws / "silos" / "d").mkdir()
    (ws / "silos" / "d" / "docs.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(UserError, match="'d'"):
        run_federated(tiny_cfg(ws, rounds=1), tmp_path / "r1")
    assert not (tmp_path / "r1" / "rounds.jsonl").exists()
    import shutil
    shutil.rmtree(ws / "silos" / "d")
    # a tokenizer mismatch: silo b's shards claim another tokenizer
    meta_path = ws / "silos" / "b" / "meta.json"
    good = meta_path.read_text()
    meta = json.loads(good)
    meta["tokenizer_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="'b'.*tokenizer"):
        run_federated(tiny_cfg(ws, rounds=1), tmp_path / "r2")
    meta_path.write_text(good)
    # corrupted shards: silo c's train.bin cut short
    train_bin = ws / "silos" / "c" / "train.bin"
    train_bin.write_bytes(train_bin.read_bytes()[:101])
    with pytest.raises(UserError, match="'c'"):
        run_federated(tiny_cfg(ws, rounds=1), tmp_path / "r3")
    assert not (tmp_path / "r3" / "rounds.jsonl").exists()


def test_secure_aggregation_with_two_silos_per_round_is_refused(ws: Path, tmp_path: Path) -> None:
    """With 2 silos a round, each can take its own update off the aggregate: the run refuses."""
    with pytest.raises(UserError, match="at least 3 silos per round, the run samples 2"):
        run_federated(tiny_cfg(ws, rounds=1, fraction=0.6, secure_aggregation=True), tmp_path / "two")


def test_secure_aggregation_equals_fedavg_and_refuses_two_survivors(ws: Path, tmp_path: Path) -> None:
    """SecAgg rounds give plain FedAvg's weights within the quantisation error. When one silo of
    three drops after sharing its keys, the sum of the other two would let each read the
    other's update off the new global model (issue 19, attack 5): the round is refused and the
    global model stays as it was."""
    run_federated(tiny_cfg(ws, rounds=1), tmp_path / "plain")
    run_federated(tiny_cfg(ws, rounds=1, secure_aggregation=True), tmp_path / "secagg")
    plain, sec = weights(tmp_path / "plain"), weights(tmp_path / "secagg")
    # 3 silos, 32 bits, clip 1.0: step = 1 / ((2**31 - 1) // 6) ≈ 2.8e-9, far below fp32 rounding of w
    for k in plain:
        np.testing.assert_allclose(sec[k].numpy(), plain[k].numpy(), rtol=1e-6, atol=1e-7)
    row = rounds(tmp_path / "secagg")[0]
    assert row["completed"] and not row["dropped"] and row["silos"]["a"]["num_tokens"] == 128

    def drop_c_after_keys(msg: Message, context: Context) -> Message:
        if context.node_config["silo"] == "c" and msg.metadata.message_type in ("train", "train.secagg_input"):
            raise RuntimeError("link down")
        return ca.app(msg, context)

    run_federated(tiny_cfg(ws, rounds=1, min_silos=2, secure_aggregation=True), tmp_path / "secagg-ab",
                  client_app=drop_c_after_keys)
    row = rounds(tmp_path / "secagg-ab")[0]
    assert not row["completed"] and set(row["dropped"]) == {"c"} and "secagg_input" in row["dropped"]["c"]
    start = weights(tmp_path / "secagg-ab")
    fresh = build_model(tiny_cfg(ws, rounds=1)).state_dict()
    assert all(torch.equal(start[k], fresh[k]) for k in start)


def test_resume_summary_counts_the_whole_run_and_names_a_changed_key(ws: Path, tmp_path: Path) -> None:
    """After a stop and a resume, summary.json describes the whole run (every round, all its seconds,
    the last round's loss), and --resume with a changed config names the key that differs."""
    with pytest.raises(Stop):
        run_federated(tiny_cfg(ws), tmp_path / "cut", on_round=stop_after_1)
    with pytest.raises(UserError, match="changes federation.server_lr from 1.0 to 0.5; resume with `fedlm train"):
        run_federated(tiny_cfg(ws, server_lr=0.5), tmp_path / "cut", resume=True)
    summary = run_federated(tiny_cfg(ws), tmp_path / "cut", resume=True)
    rows = rounds(tmp_path / "cut")
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert summary["rounds"] == 3 and summary["rounds_completed"] == 3 and summary["rounds_run"] == 2
    assert summary["seconds"] == pytest.approx(sum(r["seconds"] for r in rows))  # round 1's too
    assert summary["loss"] == rows[-1]["loss"]
    assert json.loads((tmp_path / "cut" / "summary.json").read_text()) == summary


def test_rounds_are_numbered_from_1_on_the_wire_and_in_the_log(ws: Path, tmp_path: Path) -> None:
    """One convention: the round a silo is sent is the round rounds.jsonl and on_round name."""
    sent: list[int] = []
    seen: list[int] = []

    def tap(way: str, node: int, objs: dict[str, bytes]) -> None:
        msg = decode(objs)
        if way == "down" and msg.metadata.message_type == "train":
            sent.append(int(msg.content.config_records["config"]["round"]))  # type: ignore[arg-type]
            assert msg.metadata.group_id == str(sent[-1])

    run_federated(tiny_cfg(ws, rounds=2), tmp_path / "run", on_wire=tap, on_round=lambda r, n, row: seen.append(r))
    assert sorted(set(sent)) == seen == [r["round"] for r in rounds(tmp_path / "run")] == [1, 2]


def test_silo_task_and_run_directory_import_without_flower() -> None:
    """The silo's work (`task`) and the run directory (`rundir`) are plain PyTorch, as in Flower's
    examples: the Flower apps wrap them, and nothing the server needs lives in the client app."""
    import subprocess
    import sys

    code = ("import sys, fedlm.federation.task, fedlm.federation.rundir, fedlm.resolve; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'flwr'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
    rounds_src = (Path(__file__).parents[1] / "fedlm" / "federation" / "rounds.py").read_text()
    assert "client_app" not in rounds_src
