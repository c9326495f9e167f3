"""Flower's deployment engine: real SuperLink and SuperNode processes on 127.0.0.1, and their errors.

The slow test runs the same federated config in process and on a real SuperLink with three
SuperNodes and checks the global weights are bitwise equal.
"""

from __future__ import annotations

import dataclasses
import datetime
import http.server
import itertools
import json
import ssl
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from unittest import mock

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from safetensors.torch import load_file

from fedlm.config import Config
from fedlm.errors import UserError
from fedlm.federation.deploy import free_port, supernode_command, wait_superlink
from fedlm.federation.runner import run_federated
from tests.test_federation import make_ws, rounds, tiny_cfg


def _self_signed(dir: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (it is its own CA) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    import ipaddress
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = dir / f"{name}.pem", dir / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


def test_unreachable_superlink_names_the_endpoint() -> None:
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match=f"SuperLink {address} is unreachable"):
        wait_superlink(address, insecure=True, timeout=1.0)


def test_tls_certificate_that_does_not_match(tmp_path: Path) -> None:
    """A SuperLink whose certificate is not signed by the given CA: an error naming both, and the fix."""
    server_cert, server_key = _self_signed(tmp_path, "server")
    other_ca, _ = _self_signed(tmp_path, "other")
    httpd = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(server_cert, server_key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    address = f"127.0.0.1:{httpd.server_address[1]}"
    try:
        wait_superlink(address, root_certificates=server_cert, timeout=5.0)  # the right CA: ready
        with pytest.raises(UserError, match=f"SuperLink {address}: its TLS certificate does not verify"):
            wait_superlink(address, root_certificates=other_ca, timeout=5.0)
    finally:
        httpd.shutdown()
        httpd.server_close()
    with pytest.raises(UserError, match="either --root-certificates FILE or --insecure"):
        wait_superlink(address, root_certificates=server_cert, insecure=True)
    with pytest.raises(UserError, match="no such file"):
        wait_superlink(address, root_certificates=tmp_path / "missing.pem")


def test_supernode_command_carries_the_silo(tmp_path: Path) -> None:
    cmd = supernode_command("10.0.0.5:9092", tmp_path, "legal", port=9101, root_certificates=tmp_path / "ca.pem")
    assert cmd[cmd.index("--node-config") + 1] == f'workspace="{tmp_path.resolve()}" silo="legal"'
    assert cmd[1:3] == ["-m", "fedlm.federation.supernode"]  # Flower's SuperNode with its polls shortened
    signed = supernode_command("h:1", tmp_path, "legal", port=1, insecure=True, key=tmp_path / "k",
                               peers=tmp_path / "silos.json")  # the ClientApp signs and checks SecAgg round keys
    assert signed[signed.index("--node-config") + 1].endswith(
        f'key="{(tmp_path / "k").resolve()}" peers="{(tmp_path / "silos.json").resolve()}"')
    assert cmd[cmd.index("--root-certificates") + 1] == str(tmp_path / "ca.pem")
    assert "--insecure" not in cmd


def test_flowers_fixed_polls_are_found_and_shortened() -> None:
    """`polls` patches Flower 1.42's SuperNode loop and object-pull retries; in a fresh process (the
    patch is process-wide), each still finds what it patches and the SuperNode's 3 s idle sleep is
    capped. A Flower whose code moved fails here, not as a slow round."""
    code = textwrap.dedent("""
        import time
        from flwr.supercore.inflatable import inflatable_utils
        from flwr.supernode import start_client_internal as loop
        from fedlm.federation import polls
        polls.shorten_supernode_polls()
        polls.shorten_object_pull_retries()
        t = time.monotonic()
        loop.time.sleep(3)
        assert time.monotonic() - t < 1.0
        assert loop.time.monotonic is time.monotonic
        kw = inflatable_utils.pull_objects.__kwdefaults__
        assert (kw["initial_backoff"], kw["backoff_cap"]) == (polls.PULL_RETRY_SECONDS, polls.PULL_RETRY_CAP_SECONDS)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    from fedlm.federation.polls import Backoff

    waits: list[float] = []
    backoff = Backoff(0.05, 0.25)
    with mock.patch("fedlm.federation.polls.time.sleep", waits.append):
        for _ in range(5):
            backoff.wait()
        backoff.reset()
        backoff.wait()
    assert waits == [0.05, 0.1, 0.2, 0.25, 0.25, 0.05]  # prompt after activity, cheap while a silo trains
    waits.clear()  # a reply's puller: past 5 s of waiting, a poll every 5% of the time waited, at most 2 s
    stretching = Backoff(0.05, 0.25, share=0.05, ceiling=2.0)
    with mock.patch("fedlm.federation.polls.time.sleep", waits.append):
        while sum(waits) < 120:
            stretching.wait()
    assert waits[:5] == [0.05, 0.1, 0.2, 0.25, 0.25] and max(waits) == 2.0
    waited = list(itertools.accumulate(waits))
    assert all(w <= max(0.25, 0.05 * t) + 1e-9 for w, t in zip(waits[1:], waited[:-1], strict=True))
    assert len(waits) < 120 / 0.25 / 3  # a third of the polls of a fixed 0.25 s over two minutes


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fedavg", "cyclic", "fedsgd"])
def test_flower_engine_bitwise_equal_to_in_process(tmp_path: Path, strategy: str) -> None:
    """A real SuperLink + three SuperNodes on 127.0.0.1, 2 rounds: same global weights as in process
    (cyclic: the AdamW state passed from silo to silo crosses Flower's wire too; fedsgd: the
    ServerApp's AdamW steps as the in-process server's)."""
    ws = make_ws(tmp_path / "ws")
    steps = 1 if strategy == "fedsgd" else 2
    run_federated(tiny_cfg(ws, rounds=2, strategy=strategy, local_steps=steps), tmp_path / "inprocess")
    seen: list[int] = []
    summary = run_federated(tiny_cfg(ws, rounds=2, engine="flower", strategy=strategy, local_steps=steps),
                            tmp_path / "flower", on_round=lambda r, n, row: seen.append(r))
    assert summary["engine"] == "flower" and seen == [1, 2]
    a = load_file(str(tmp_path / "inprocess/checkpoint/global.safetensors"))
    b = load_file(str(tmp_path / "flower/checkpoint/global.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # each silo's validation of the starting and final weights crossed Flower's wire too
    validation = [json.loads((tmp_path / run / "validation.json").read_text()) for run in ("inprocess", "flower")]
    assert validation[0] == validation[1] and set(validation[1]["silos"]) == {"a", "b", "c"}
    for row in rounds(tmp_path / "flower"):
        assert row["completed"] and not row["dropped"]
        assert all(s["bytes_up"] > 0 and s["bytes_down"] > 0 for s in row["silos"].values())


@pytest.mark.slow
def _baseline_refused_across_processes(cfg: Config, ws: Path, run: Path, superlink: str) -> None:
    """Record-level DP; silo c's lifetime ε first fits the run and one coalition: the valuation stops at c's
    next coalition, keeping what it retrained, and c's admin raises the target to fit the run and the 3
    coalitions c is retrained in, not its local-only baseline. The same valuation again goes on where it
    stopped, and c refuses the baseline alone: its reason crosses Flower to the valuation's notes."""
    from fedlm.config import PrivacyConfig
    from fedlm.data.shards import open_split
    from fedlm.federation.task import silo_record_plan
    from fedlm.privacy.accounting import record_epsilon
    from fedlm.value.deployed import value_on_flower

    dp = dataclasses.replace(cfg, privacy=PrivacyConfig(mode="record", target_epsilon=8.0, delta=1e-3))
    c = ws / "silos" / "c"
    plan = silo_record_plan(dp, c, open_split(c, "train"))
    eps = [record_epsilon(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                          steps=k * plan.steps, delta=1e-3) for k in range(6)]

    def fits(releases: int) -> None:
        target = (eps[releases] + eps[releases + 1]) / 2
        (c / "privacy.toml").write_text(f'[privacy]\nmode = "record"\ntarget_epsilon = {target}\ndelta = 1e-3\n')

    try:
        fits(2)
        run_federated(dp, run, superlink=superlink, insecure=True)
        with pytest.raises(UserError, match=r"silo c dropped out of round 1 .* \(the [1-9] coalitions retrained so far "
                                            r"are kept in .*: the same command again goes on from there\)"):
            value_on_flower(run, {"method": "exact"}, superlink=superlink, root_certificates=None, insecure=True)
        fits(4)
        valued = value_on_flower(run, {"method": "exact"}, superlink=superlink, root_certificates=None, insecure=True)
    finally:
        (c / "privacy.toml").unlink()
    assert any(n.startswith("resumed: ") for n in valued["notes"]) and not list(run.glob(".value*"))
    assert valued["silos"]["c"]["gain"] is None and all(isinstance(valued["silos"][s]["gain"], float) for s in "ab")
    assert any(n.startswith("no gain for silo c: silo 'c': its local-only baseline would take its own ε to")
               for n in valued["notes"]), valued["notes"]


def test_deployed_valuation_under_secure_aggregation(tmp_path: Path) -> None:
    """`fedlm value --superlink` of a secure-aggregation run on three real SuperNodes: the pairs and
    single silos (too few for a secure sum) retrain in clear, as in process, and the output says so;
    the values equal in-process valuation of the same run bit for bit. Then silo "a" requires
    secure aggregation in its privacy.toml: the valuation stops at the first coalition it would
    have to train in clear, with one line naming it, and the earlier value.json is kept."""
    from fedlm.federation.deploy import _local_federation, stop
    from fedlm.value.deployed import value_on_flower
    from fedlm.value.run import value_run

    ws = make_ws(tmp_path / "ws")
    cfg = tiny_cfg(ws, rounds=1, local_steps=1, engine="flower", secure_aggregation=True)
    superlink, procs = _local_federation(cfg, tmp_path / "home", tmp_path / "logs")
    try:
        run = tmp_path / "run"
        run_federated(cfg, run, superlink=superlink, insecure=True)
        assert rounds(run)[0]["completed"]
        deployed = value_on_flower(run, {"method": "exact"}, superlink=superlink, root_certificates=None,
                                   insecure=True)
        assert deployed["coalitions_trained"] == 6
        assert any("without secure aggregation" in note for note in deployed["notes"])
        _baseline_refused_across_processes(cfg, ws, tmp_path / "run-dp", superlink)
        (ws / "silos" / "a" / "privacy.toml").write_text('[privacy]\nmode = "none"\nsecure_aggregation = true\n')
        kept = (run / "value.json").read_text()
        with pytest.raises(UserError, match=r"retraining coalition a\S* \(without secure aggregation: too few silos\): "
                                            r"silo 'a': its privacy.toml lets its updates leave it only inside"):
            value_on_flower(run, {"method": "exact"}, superlink=superlink, root_certificates=None, insecure=True)
        assert (run / "value.json").read_text() == kept and not list(run.glob(".value*"))
        # attack 15 across real processes: a silo refuses a run that asks more work than its [work] allows
        (ws / "silos" / "b" / "privacy.toml").write_text("[work]\nmax_round_tokens = 63\n")
        with pytest.raises(UserError, match=r"silo 'b': the run asks 64 tokens a training round trains on .*allows "
                                            r"max_round_tokens = 63; refused"):
            run_federated(cfg, tmp_path / "run-busy", superlink=superlink, insecure=True)
        assert not (tmp_path / "run-busy" / "rounds.jsonl").exists()
    finally:
        stop(procs)
    (ws / "silos" / "b" / "privacy.toml").unlink()
    (ws / "silos" / "a" / "privacy.toml").unlink()
    in_process = value_run(run)
    for silo in ("a", "b", "c"):
        for key in ("shapley", "leave_one_out", "gain"):
            assert in_process["silos"][silo][key] == deployed["silos"][silo][key], (silo, key)
