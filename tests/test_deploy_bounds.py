"""Every wait of a deployed run is bounded: a silo that does not answer is dropped at the timeout, and the run ends.

Real processes on 127.0.0.1: a SuperLink, three SuperNodes with fedlm's launcher, and `fedlm
train --superlink`. Two silos misbehave at the end-of-run validation exchange, each behind a
small HTTP relay of this test between its SuperNode and the SuperLink: b never receives the
validation message (the relay holds the SuperLink's answer), so it never answers; c sends its
reply's header and then its link goes silent, so the reply's content never arrives (Flower's
server side then retried the content for minutes past the timeout). Before that, the ServerApp
of a first run is killed, and `fedlm train` must notice at once rather than wait out its budget.
"""

from __future__ import annotations

import http.client
import http.server
import json
import os
import signal
import socketserver
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fedlm.config import config_to_toml
from fedlm.federation.deploy import (
    free_port,
    start_superlink,
    start_supernode,
    stop,
    wait_superlink,
)
from fedlm.runlock import live_run
from tests.test_federation import make_ws, tiny_cfg
from tests.test_lifecycle import CLI, _env, _rows_done, _wait_for

# federation.round_timeout: the healthy silo must answer within it on a loaded 2-core CI machine
# (at 20 s it once did not, under the full suite)
TIMEOUT = 45.0


class Relay(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """Forwards one SuperNode's HTTP requests to the SuperLink, but not all of them.

    mode "hold": the SuperLink's answer that hands out the validation message is never passed on
    (everything else is: the SuperNode stays alive and connected, it just never gets the message).
    mode "cut": once the SuperNode has sent its validation reply's header, nothing more goes through.
    A request that is not passed on is held open (the SuperNode's client times out and retries)."""

    daemon_threads = True

    def __init__(self, superlink_port: int, mode: str) -> None:
        self.superlink_port, self.mode = superlink_port, mode
        self.validation_at: float | None = None  # when the validation message or reply went by
        self.cut = threading.Event()
        super().__init__(("127.0.0.1", free_port()), _Forward)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Relay

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        relay = self.server
        if relay.cut.is_set():
            time.sleep(3600)  # held open; the daemon thread ends with the test process
        conn = http.client.HTTPConnection("127.0.0.1", relay.superlink_port, timeout=60)
        try:
            conn.request(self.command, self.path, body, {k: v for k, v in self.headers.items() if k.lower() != "host"})
            res = conn.getresponse()
            data = res.read()
        except OSError:  # the SuperLink stopped (the test's end)
            self.close_connection = True
            return
        if relay.mode == "hold" and self.path.endswith("/pull-messages") and b"evaluate" in data:
            relay.validation_at = time.monotonic()
            time.sleep(3600)
        if relay.mode == "cut" and self.path.endswith("/push-messages") and b"evaluate" in body:
            relay.validation_at = time.monotonic()
            relay.cut.set()  # the header went through; its content will not
        self.send_response(res.status)
        for key, value in res.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST


@pytest.mark.slow
def test_a_silo_that_never_answers_validation_is_dropped_at_the_timeout(tmp_path: Path) -> None:
    ws = make_ws(tmp_path / "ws")
    port = free_port()
    link = f"127.0.0.1:{port}"
    logs, homes = tmp_path / "logs", tmp_path / "homes"
    relays = {"b": Relay(port, "hold"), "c": Relay(port, "cut")}
    for relay in relays.values():
        threading.Thread(target=relay.serve_forever, daemon=True).start()
    procs = [start_superlink(port=port, log_path=logs / "superlink.log", flwr_home=homes / "link")]
    try:
        wait_superlink(link, insecure=True, proc=procs[0])
        for silo in ("a", "b", "c"):
            dial = relays[silo].address if silo in relays else link
            procs.append(start_supernode(dial, ws, silo, port=free_port(), log_path=logs / f"{silo}.log",
                                         flwr_home=homes / silo, insecure=True))
        cfg_path = tmp_path / "fed.toml"
        cmd = [*CLI, "train", str(cfg_path), "--superlink", link, "--insecure"]

        # the ServerApp dies after round 1: `fedlm train` says so at once, not after its budget
        cfg_path.write_text(config_to_toml(tiny_cfg(ws, engine="flower", rounds=3, round_timeout=TIMEOUT)))
        first = tmp_path / "killed"
        with open(tmp_path / "killed.log", "w") as log:
            train = subprocess.Popen([*cmd, "--out", str(first)], env=_env(), stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(train)
            _wait_for(lambda: _rows_done(first) >= 1 or train.poll() is not None, 300, "round 1")
            holder = live_run(first)
            assert holder is not None, (tmp_path / "killed.log").read_text()
            os.kill(int(holder["pid"]), signal.SIGKILL)
            killed = time.monotonic()
            assert train.wait(timeout=120) == 2
        assert time.monotonic() - killed < 30
        assert "ended without a summary after 1 rounds" in (tmp_path / "killed.log").read_text()

        # validation: b never gets the message, c's reply never arrives whole; both dropped at the timeout
        cfg_path.write_text(config_to_toml(tiny_cfg(ws, engine="flower", rounds=1, round_timeout=TIMEOUT)))
        out = tmp_path / "run"
        r = subprocess.run([*cmd, "--out", str(out)], env=_env(), capture_output=True, text=True, timeout=600)
        ended = time.monotonic()
        assert r.returncode == 0, r.stdout + r.stderr
        times = [relay.validation_at for relay in relays.values()]
        assert None not in times, times
        asked = min(t for t in times if t is not None)
        assert ended - asked < TIMEOUT + 30, f"validation ended {ended - asked:.0f} s after it was sent"
        record = json.loads((out / "validation.json").read_text())
        assert set(record["silos"]) == {"a"}, record
        assert record["missing"]["b"] == f"timeout: no reply within {TIMEOUT:g} s", record
        assert record["missing"]["c"].startswith("failed: reply incomplete"), record
        assert "silo b: not validated (timeout" in r.stderr + r.stdout
    finally:
        stop(procs)
        for relay in relays.values():
            relay.shutdown()
