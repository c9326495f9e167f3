"""Identity and weight across organisations: the coordinator's registry, silo keys, the weight cap.

The attacks on a real SuperLink behind the real proxy (a silo's `flwr ls/run/supernode register`,
nodes with no key, a wrong key or another silo's identity) run in tests/test_multimachine.py,
beside the README's deployment that they attack.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlm.errors import UserError
from fedlm.federation import client_app as ca
from fedlm.federation import trust
from fedlm.federation.runner import run_federated
from tests.test_federation import make_ws, rounds, tiny_cfg, weights
from tests.test_multimachine import _one_line_error, fedlm_here


def test_registry_binds_one_key_to_one_silo(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """`fedlm silo key` makes a private key only its owner reads; `fedlm silo add` binds a name to a key once."""
    os.chdir(tmp_path)
    for silo in ("legal", "medical"):
        assert fedlm_here(capfd, "silo", "key", f"{silo}.key").returncode == 0
    assert stat.S_IMODE((tmp_path / "legal.key").stat().st_mode) == 0o600
    assert (tmp_path / "legal.key.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    _one_line_error(fedlm_here(capfd, "silo", "key", "legal.key"), "legal.key exists")

    assert fedlm_here(capfd, "silo", "add", "legal", "legal.key.pub").returncode == 0
    _one_line_error(fedlm_here(capfd, "silo", "add", "legal", "medical.key.pub"), "'legal' is already registered")
    _one_line_error(fedlm_here(capfd, "silo", "add", "other", "legal.key.pub"), "already registered for silo 'legal'")
    _one_line_error(fedlm_here(capfd, "silo", "add", "../x", "medical.key.pub"), "silo name '../x'")
    _one_line_error(fedlm_here(capfd, "silo", "add", "medical", "legal.key"), "legal.key: not an OpenSSH public key")
    (tmp_path / "rsa.pub").write_text("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQC7 x\n")
    _one_line_error(fedlm_here(capfd, "silo", "add", "medical", "rsa.pub"), "rsa.pub")
    assert fedlm_here(capfd, "silo", "add", "medical", "medical.key.pub").returncode == 0
    assert sorted(trust.load_registry(tmp_path / "silos.json")) == ["legal", "medical"]
    assert fedlm_here(capfd, "silo", "remove", "legal").returncode == 0
    _one_line_error(fedlm_here(capfd, "silo", "remove", "legal"), "no silo 'legal'")
    assert sorted(trust.load_registry(tmp_path / "silos.json")) == ["medical"]


def test_identity_comes_from_the_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a registry a node's silo is the registered one; nodes of no configured silo get no work."""
    registry = {11: "legal", 12: "medical", 13: "spare"}
    assert trust.silos_waiting([11], ["legal", "medical"], registry) == "silo 'medical' has no SuperNode online"
    assert trust.silos_waiting([11, 12, 13, 99], ["legal", "medical"], registry) == ""
    with pytest.raises(UserError, match="silo 'clinic' has no registered key.*fedlm silo add clinic"):
        trust.silos_waiting([11, 12], ["legal", "clinic"], registry)
    work, idle = trust.working_nodes([13, 12, 99, 11], ["legal", "medical"], registry)
    assert work == [11, 12]
    assert idle == {13: "registered for silo 'spare', which this run does not train",
                    99: "not registered for any silo"}
    # one machine, no registry: nodes name their silos and all are asked
    assert trust.working_nodes([5, 4], ["a"], None) == ([4, 5], {})
    assert trust.silos_waiting([5], ["a", "b"], None) == "only 1 of 2 silos' SuperNodes connected"

    path = tmp_path / "nodes.json"
    path.write_text(json.dumps({"11": "legal"}))
    monkeypatch.setenv(trust.NODES_ENV, str(path))
    assert trust.registered_nodes() == {11: "legal"}
    monkeypatch.delenv(trust.NODES_ENV)
    assert trust.registered_nodes() is None


def test_proxy_forwards_only_fleet_paths(tmp_path: Path) -> None:
    """The nginx config passes the normalised Fleet path and /health, and refuses the rest."""
    conf = trust.proxy_config(host="0.0.0.0", port=9092, upstream_port=9093, certfile=Path("/c.pem"),
                              keyfile=Path("/k.pem"), state=tmp_path)
    assert "listen 0.0.0.0:9092 ssl;" in conf
    assert "location ~ ^/v1/fleet/[a-z-]+$" in conf and "proxy_pass https://127.0.0.1:9093$uri;" in conf
    assert "location / { return 403; }" in conf
    assert "/v1/control" not in conf and "/v1/runtime" not in conf


def test_a_silos_weight_is_capped_at_the_plan(tmp_path: Path) -> None:
    """A silo claiming 1e9 tokens weighs what the plan gives it: the same weights as when it tells the truth."""
    ws = make_ws(tmp_path / "ws", docs=30)
    liar = ClientApp()

    @liar.query()
    def query(msg: Message, context: Context) -> Message:
        return ca.app(msg, context)

    @liar.train()
    def train(msg: Message, context: Context) -> Message:
        reply = ca.app(msg, context)
        if context.node_config["silo"] == "b":
            reply.content.metric_records["metrics"]["num_tokens"] = 1e9
        return reply

    run_federated(tiny_cfg(ws, rounds=1), tmp_path / "honest")
    run_federated(tiny_cfg(ws, rounds=1), tmp_path / "liar", client_app=liar)
    assert rounds(tmp_path / "liar")[0]["silos"]["b"]["num_tokens"] == 1e9  # logged as claimed
    honest, lied = weights(tmp_path / "honest"), weights(tmp_path / "liar")
    assert all((honest[k] == lied[k]).all() for k in honest)


def test_nodes_of_no_configured_silo_get_no_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Before round 1: extra nodes (unknown, failing, registered elsewhere, lying) are logged, not fatal."""
    from fedlm.data.tokenizer import tokenizer_hash
    from fedlm.federation.grid import InProcessGrid
    from fedlm.federation.rounds import connect_silos

    ws = make_ws(tmp_path / "ws", silos=("a", "b"), docs=20)
    sha = tokenizer_hash(ws / "tokenizer.json")

    def connect(claims: dict[int, str]) -> dict[str, int]:
        grid = InProcessGrid(ca.app, {n: {"workspace": str(ws), "silo": s} for n, s in claims.items()})
        try:
            return connect_silos(grid, ["a", "b"], tokenizer_sha256=sha, timeout=30)
        finally:
            grid.close()

    # one machine, no registry: a node of an unknown silo (its shards missing) does not stop the run
    with caplog.at_level("WARNING", logger="fedlm"):
        assert connect({1: "a", 2: "b", 3: "ghost"}) == {"a": 1, "b": 2}
    assert "gets no work" in caplog.text and "ghost" in caplog.text

    registry = tmp_path / "nodes.json"
    registry.write_text(json.dumps({"1": "a", "2": "b", "3": "spare"}))
    monkeypatch.setenv(trust.NODES_ENV, str(registry))
    caplog.clear()
    with caplog.at_level("INFO", logger="fedlm"):  # 3: another registered silo; 5: no registration
        assert connect({1: "a", 2: "b", 3: "a", 5: "b"}) == {"a": 1, "b": 2}
    idle = {r.getMessage(): r.levelname for r in caplog.records if "gets no work" in r.getMessage()}
    assert idle == {"SuperNode 3 gets no work: registered for silo 'spare', which this run does not train": "INFO",
                    "SuperNode 5 gets no work: not registered for any silo": "WARNING"}  # only 5 is news
    # node 2 is registered for b but claims a: the registry decides, so it gets no work and b is missing
    with pytest.raises(UserError, match="silo 'b' did not answer"):
        connect({1: "a", 2: "a"})


# ---------------------------------------------------------------------------------------
# secure aggregation across organisations: round keys bound to node keys, no weight to inflate


def _run_nodes(ws: Path, out: Path, extra: dict[str, dict[str, str]], app: ClientApp | None = None,
               **fed: object) -> dict:
    """A 1-round SecAgg run in process whose nodes get `extra` node config per silo (as `fedlm node` sets it)."""
    from fedlm.federation.grid import InProcessGrid
    from fedlm.federation.rounds import run_rounds
    from fedlm.federation.rundir import prepare_run_dir
    from fedlm.resolve import resolve_config

    cfg = resolve_config(tiny_cfg(ws, rounds=1, secure_aggregation=True, **fed))
    prepare_run_dir(cfg, out, resume=False)
    nodes = {i + 1: {"workspace": str(ws), "silo": s, **extra.get(s, {})} for i, s in enumerate("abc")}
    grid = InProcessGrid(app or ca.app, nodes)
    try:
        return run_rounds(grid, cfg, out)
    finally:
        grid.close()


def test_secagg_round_keys_are_signed_with_the_registered_node_keys(tmp_path: Path) -> None:
    """Each silo signs its round keys with the key `fedlm silo key` made and checks the others' against
    its own copy of silos.json (`fedlm node --key K --peers silos.json`). With the real registry the round
    completes; a silo whose registry holds another key for b (as when the coordinator swaps b's round
    keys: the signature no longer matches) refuses, and so does a silo with a key but no registry."""
    ws = make_ws(tmp_path / "ws", docs=30)
    for registry, names in ((tmp_path / "silos.json", "abc"), (tmp_path / "forged.json", "ac")):
        for s in names:
            key = tmp_path / f"{s}.key"
            if not key.exists():
                trust.make_silo_key(key)
            trust.add_silo(registry, s, tmp_path / f"{s}.key.pub")
    trust.make_silo_key(tmp_path / "other.key")
    trust.add_silo(tmp_path / "forged.json", "b", tmp_path / "other.key.pub")
    nodes = {s: {"key": str(tmp_path / f"{s}.key"), "peers": str(tmp_path / "silos.json")} for s in "abc"}
    _run_nodes(ws, tmp_path / "bound", nodes)
    assert rounds(tmp_path / "bound")[0]["completed"]

    forged = {**nodes, "a": {**nodes["a"], "peers": str(tmp_path / "forged.json")}}
    _run_nodes(ws, tmp_path / "forged", forged)
    row = rounds(tmp_path / "forged")[0]
    assert not row["completed"]
    assert "round keys of 'b' are not signed by its registered key" in row["dropped"]["a"]
    no_peers = {**nodes, "c": {"key": nodes["c"]["key"]}}
    _run_nodes(ws, tmp_path / "no-peers", no_peers)
    assert "start `fedlm node` with --peers silos.json" in rounds(tmp_path / "no-peers")[0]["dropped"]["c"]


def test_a_silo_cannot_weigh_itself_up_inside_secure_aggregation(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Silo b reports 1 token in clear (so a reported weight would shrink the divisor) while masking its
    full update: every silo weighs the plan's tokens under SecAgg, so the new global model is bitwise the
    honest run's. Masking 1000 × its update instead is refused by the sum's norm bound: the round is skipped."""
    from fedlm.federation import secagg

    ws = make_ws(tmp_path / "ws", docs=30)
    masked = secagg.client_masked_input
    scale = {"b": 1.0}

    def inflated(state: dict, request: dict, update: object, **kw: object) -> tuple[dict, dict]:
        return masked(state, request, update * scale.get(state["silo"], 1.0), **kw)  # type: ignore[operator]

    liar = ClientApp()

    @liar.query()
    def query(msg: Message, context: Context) -> Message:
        return ca.app(msg, context)

    @liar.train()
    def train(msg: Message, context: Context) -> Message:
        reply = ca.app(msg, context)
        if context.node_config["silo"] == "b" and "metrics" in reply.content.metric_records:
            reply.content.metric_records["metrics"]["num_tokens"] = 1.0
        return reply

    for action in ("secagg_setup", "secagg_keys", "secagg_input", "secagg_unmask"):
        liar.train(action)(train)
    _run_nodes(ws, tmp_path / "honest", {}, max_update_norm=5.0)
    monkeypatch.setattr(secagg, "client_masked_input", inflated)
    _run_nodes(ws, tmp_path / "liar", {}, liar, max_update_norm=5.0)
    assert rounds(tmp_path / "liar")[0]["silos"]["b"]["num_tokens"] == 1.0  # logged as claimed, not used
    honest, lied = weights(tmp_path / "honest"), weights(tmp_path / "liar")
    assert all(torch.equal(honest[k], lied[k]) for k in honest)

    scale["b"] = 1000.0
    _run_nodes(ws, tmp_path / "inflated", {}, liar, max_update_norm=5.0)
    row = rounds(tmp_path / "inflated")[0]
    assert row["completed"] is False and row["dropped"] == {}


def test_fedlm_node_checks_its_registry_copy_before_connecting(tmp_path: Path) -> None:
    """`fedlm node --peers silos.json`: a copy that lacks this silo, or binds another key to it, is
    refused with one line before the SuperNode starts (it would refuse every SecAgg round)."""
    from fedlm.federation.deploy import run_node

    (tmp_path / "ws" / "silos" / "legal").mkdir(parents=True)
    for name in ("legal", "other"):
        trust.make_silo_key(tmp_path / f"{name}.key")
    trust.add_silo(tmp_path / "lacks.json", "medical", tmp_path / "other.key.pub")
    trust.add_silo(tmp_path / "wrong.json", "legal", tmp_path / "other.key.pub")
    for registry, why in (("lacks.json", "silo 'legal' is not in it"), ("wrong.json", "is not")):
        with pytest.raises(UserError, match=why):
            run_node("127.0.0.1:1", tmp_path / "ws", "legal", root_certificates=tmp_path / "ca.pem",
                     key=tmp_path / "legal.key", peers=tmp_path / registry, ready_timeout=0.1)
