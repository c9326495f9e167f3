"""Federation across machines as README's "Run across machines" tells it, each machine a folder.

The slow test runs that section's commands as written (the coordinator's address becomes
127.0.0.1, port 9092 a free port, `~/legal-texts` a folder of bundled text, and the training
command gets a tiny model): openssl certificates, per-silo DP counts, the tokenizer from the
counts, a TLS SuperLink, two SuperNodes, one round over TLS, evaluation on a silo. Its
global weights must equal, bit for bit, the same config run in process on the same shards.
The fast tests check the counts pair against the one-machine tokenizer and the bad input.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedlm.config import load_config
from fedlm.corpus import extract
from fedlm.data.tokenizer import tokenizer_hash
from fedlm.federation.deploy import free_port
from fedlm.federation.runner import FLOWER_ENV, run_federated
from fedlm.value.run import value_run
from tests.test_federation import make_ws

ROOT = Path(__file__).resolve().parents[1]
FEDLM = [sys.executable, "-m", "fedlm.cli"]
BIN = Path(sys.executable).parent
ENV = {**os.environ, **FLOWER_ENV, "OMP_NUM_THREADS": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1",
       "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
SILOS = ("legal", "medical")
TINY = ["model.preset=custom", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.d_ff=64",
        "model.max_seq_len=32", "train.batch_size=4", "train.seq_len=16", "federation.rounds=1",
        "federation.local_steps=2", "federation.round_timeout=90"]


def fedlm_here(capfd: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess[str]:
    """`fedlm ARGS` through the CLI's `main` in this process (no start-up cost), as a completed process."""
    from fedlm.cli import main

    capfd.readouterr()
    argv = sys.argv
    sys.argv = ["fedlm", *args]
    code: int | str | None = 0
    try:
        main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(args, int(code or 0), out, err)


def _one_line_error(r: subprocess.CompletedProcess[str], *needles: str, flower_log: bool = False) -> str:
    """Exit 2 and one error line holding `needles` (after Flower's own log lines if `flower_log`)."""
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    if flower_log:
        lines = [line for line in lines if "error" in line.lower()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------
# fast: the counts pair and bad input


def test_counts_files_give_the_one_machine_tokenizer(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Exact counts released per silo and summed elsewhere = the tokenizer trained on one machine."""
    ws = make_ws(tmp_path / "ws", silos=("a", "b"), docs=20)  # its tokenizer: agree_tokenizer, exact
    files = []
    for silo in ("b", "a"):  # order of the files must not matter
        out = tmp_path / f"counts-{silo}.json"
        r = fedlm_here(capfd, "data", "counts", "--workspace", str(ws), "--silo", silo, "--out", str(out))
        assert r.returncode == 0, r.stderr
        files += ["--counts", str(out)]
        assert "text" not in out.read_text()  # pre-tokens, not documents
    r = fedlm_here(capfd, "data", "tokenizer", "--workspace", str(tmp_path / "coord"), "--vocab-size", "512", *files)
    assert r.returncode == 0, r.stderr
    assert tokenizer_hash(tmp_path / "coord/tokenizer.json") == tokenizer_hash(ws / "tokenizer.json")
    record = json.loads((tmp_path / "coord/tokenizer_privacy.json").read_text())
    assert record["mode"] == "exact" and sorted(record["silos"]) == ["a", "b"]

    dp = tmp_path / "dp.json"
    r = fedlm_here(capfd, "data", "counts", "--workspace", str(ws), "--silo", "a", "--epsilon", "8", "--out", str(dp))
    assert r.returncode == 0, r.stderr
    released = json.loads(dp.read_text())
    assert released["privacy"]["epsilon"] == 8 and released["privacy"]["delta"] == 1e-6
    threshold = released["privacy"]["threshold"]
    assert all(n >= 1 and n >= round(threshold) - 1 for n in released["counts"].values())

    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    _one_line_error(fedlm_here(capfd, "data", "tokenizer", "--workspace", str(tmp_path / "c2"), "--counts", str(bad)),
                    str(bad), "fedlm data counts")
    _one_line_error(fedlm_here(capfd, "data", "tokenizer", "--workspace", str(tmp_path / "c2"), *files, *files[:2]),
                    "given twice")
    _one_line_error(fedlm_here(capfd, "data", "counts", "--workspace", str(ws), "--silo", "nope", "--out", str(bad)),
                    "'nope'", "fedlm data prepare")


def test_superlink_flags_need_the_flower_engine(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "fed.toml"
    cfg.write_text('[data]\nworkspace = "ws"\n[train]\nmode = "federated"\n')
    _one_line_error(fedlm_here(capfd, "train", str(cfg), "--superlink", "127.0.0.1:9", "--insecure"),
                    "federation.engine=flower")
    _one_line_error(fedlm_here(capfd, "train", str(cfg), "--set", "federation.engine=flower", "--insecure"),
                    "--superlink")
    _one_line_error(fedlm_here(capfd, "superlink", "--port", "9", "--ssl-ca-certfile", "a", "--ssl-certfile", "b",
                               "--ssl-keyfile", "c"), "--ssl-ca-certfile a: no such file")
    tls = [a for f in ("ca-certfile", "certfile", "keyfile") for a in (f"--ssl-{f}", str(cfg))]
    _one_line_error(fedlm_here(capfd, "superlink", "--port", "9", *tls, "--registry", str(tmp_path / "none.json")),
                    "none.json: no silos registered", "fedlm silo add NAME KEY.pub")
    node = ["node", "--superlink", "127.0.0.1:9", "--workspace", str(tmp_path), "--silo", "legal",
            "--root-certificates", str(cfg), "--key", str(tmp_path / "legal.key")]
    _one_line_error(fedlm_here(capfd, *node), "silo 'legal'", "fedlm data")
    (tmp_path / "silos/legal").mkdir(parents=True)
    (tmp_path / "silos/legal/privacy.toml").write_text('[privacy]\nmode = "none"\nmax_scored_models = -1\n')
    _one_line_error(fedlm_here(capfd, *node), "privacy.toml: [privacy] takes mode", "max_scored_models = -1")
    (tmp_path / "silos/legal/privacy.toml").write_text('[privacy]\nmode = "none"\nsecure_aggregation = true\n'
                                                      '[work]\nmax_round_tokens = 4096\n')
    _one_line_error(fedlm_here(capfd, *node), "requires secure aggregation", "--peers silos.json")
    r = fedlm_here(capfd, *node, "--peers", str(tmp_path / "silos.json"))
    _one_line_error(r, "legal.key: no such file", "fedlm silo key")
    assert r.stdout.splitlines()[-2:] == [
        "silo legal: its privacy.toml holds every run to: privacy.mode = 'none' (no DP); updates only inside a secure "
        "sum; no cap on models scored; max_round_tokens = 4,096",
        "silo legal so far: no DP release recorded; 0 models scored; 0 secure sums (`fedlm silo spent` for each run)"]


@pytest.mark.slow
def test_unreachable_superlink_fails_before_any_round(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """`fedlm train --superlink` at a closed port: exit 2 naming the endpoint, no round logged."""
    ws = make_ws(tmp_path / "ws", silos=("a", "b"), docs=20)
    cfg = tmp_path / "fed.toml"
    cfg.write_text(f'[data]\nworkspace = "{ws}"\n[train]\nmode = "federated"\n')
    address = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    r = fedlm_here(capfd, "train", str(cfg), "--set", "federation.engine=flower", "--superlink", address,
                   "--insecure", "--out", str(tmp_path / "run"))
    _one_line_error(r, f"SuperLink {address} is unreachable", "fedlm superlink")
    assert time.monotonic() - t0 < 30
    assert not (tmp_path / "run/rounds.jsonl").exists()


def _ca_and_server_cert(dir: Path, *, names: list[str]) -> tuple[Path, Path, Path]:
    """A CA (cryptography) and a server certificate it signs, for the DNS names/IPs in `names`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), True).sign(ca_key, hashes.SHA256()))
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), False).sign(ca_key, hashes.SHA256()))
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (dir / "server.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (dir / "server.key").write_bytes(pem_key(key))
    return dir / "ca.pem", dir / "server.pem", dir / "server.key"


@pytest.mark.slow
def test_superlink_certificate_must_name_loopback(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A certificate without 127.0.0.1: `fedlm superlink` stops at start with the fix, not a hung run."""
    ca, cert, key = _ca_and_server_cert(tmp_path, names=["coordinator.example.org"])
    registry = tmp_path / "silos.json"
    assert fedlm_here(capfd, "silo", "key", str(tmp_path / "legal.key")).returncode == 0
    assert fedlm_here(capfd, "silo", "add", "legal", str(tmp_path / "legal.key.pub"), "--registry",
                      str(registry)).returncode == 0
    port = free_port()
    r = fedlm_here(capfd, "superlink", "--host", "0.0.0.0", "--port", str(free_port()), "--control-port", str(port),
                   "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                   "--registry", str(registry))
    line = _one_line_error(r, f"127.0.0.1:{port}", "name 127.0.0.1", flower_log=True)
    assert line.startswith("error:"), line


# ---------------------------------------------------------------------------------------
# slow: the README section, run


def readme_blocks() -> list[tuple[str, str]]:
    """(language, body) of each fenced block of README's "Run across machines", in order."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Run across machines")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end > 0 else len(text)]
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w+)\n(.*?)```", section, re.S)]


def _texts(dest: Path) -> dict[str, Path]:
    """A little of the bundled legal and medical text, as a silo's raw files."""
    raw = extract(dest / "raw", list(SILOS))
    out = {}
    for silo in SILOS:
        folder = dest / f"{silo}-texts"
        folder.mkdir(parents=True)
        if silo == "legal":
            for path in sorted(raw[silo].rglob("*.txt"))[:12]:
                shutil.copy(path, folder / path.name)
        else:
            src = next(raw[silo].rglob("*.jsonl"))
            with open(src) as f:
                (folder / src.name).write_text("".join(line for _, line in zip(range(60), f, strict=False)))
        out[silo] = folder
    return out


class Machines:
    """Folders standing for machines; runs README lines in them, keeps the long-running ones."""

    def __init__(self, root: Path, port: int, control_port: int, texts: dict[str, Path]) -> None:
        self.root, self.port, self.control_port, self.texts = root, port, control_port, texts
        self.background: list[tuple[subprocess.Popen[bytes], Path]] = []

    def dir(self, machine: str) -> Path:
        path = self.root / machine
        path.mkdir(parents=True, exist_ok=True)
        return path

    def substitute(self, body: str, silo: str | None) -> str:
        if silo is not None:
            body = body.replace("legal", silo).replace(f"~/{silo}-texts", str(self.texts[silo]))
        return (body.replace("coordinator.example.org", "127.0.0.1").replace("9092", str(self.port))
                .replace("9093", str(self.control_port)))

    def run_block(self, body: str, machine: str, *, silo: str | None = None,
                  extra: dict[str, list[str]] | None = None) -> str:
        """Run the block's commands in order (their stdout is returned); `fedlm superlink` and
        `fedlm node` start in the background. `extra` appends arguments to a fedlm command."""
        script: list[str] = []
        out = ""
        for line in self.substitute(body, silo).splitlines():
            line = line.split(" #")[0].strip()
            if not line or line.startswith("#"):
                continue
            args = shlex.split(line)
            if args[0] == "fedlm":
                command = args[1]
                args = [*FEDLM, *args[1:], *(extra or {}).get(command, [])]
                line = shlex.join(args)
                if command in ("superlink", "node"):
                    out += self._flush(script, machine)
                    self.start(args, machine, name=f"{command}-{silo or machine}")
                    continue
            script.append(line)
        return out + self._flush(script, machine)

    def _flush(self, script: list[str], machine: str) -> str:
        if not script:
            return ""
        r = subprocess.run(["bash", "-ec", "\n".join(script)], cwd=self.dir(machine), env=ENV,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (script, r.stdout[-2000:], r.stderr[-2000:])
        script.clear()
        return r.stdout

    def start(self, args: list[str], machine: str, *, name: str) -> Path:
        log = self.root / f"{name}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(args, cwd=self.dir(machine), env=ENV, stdout=f, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.background.append((proc, log))
        return log

    def wait_for(self, log: Path, text: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while text not in log.read_text(errors="replace"):
            proc = next(p for p, lg in self.background if lg == log)
            assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
            time.sleep(0.2)

    def stop_all(self) -> None:
        """SIGTERM (fedlm stops its Flower process), then SIGKILL what is left."""
        for proc, _ in self.background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in self.background:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)


EVIL_APP = {
    "pyproject.toml": """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "evil"
version = "0.1.0"
description = "a silo's own app"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "evil_app:server"
clientapp = "evil_app:client"
""",
    "evil_app.py": """from pathlib import Path

Path({marker!r}).write_text("ran")  # wherever this module is imported: the coordinator or a silo

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

server = ServerApp()
client = ClientApp()
""",
}


COORDINATOR_APP = {
    "pyproject.toml": EVIL_APP["pyproject.toml"].replace('name = "evil"', 'name = "coordinators"').replace(
        '"evil_app:server"', '"evil_server:server"').replace('"evil_app:client"', '"evil_client:client"'),
    "evil_server.py": """import json
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.serverapp import ServerApp

server = ServerApp()


@server.main()
def main(grid, context):
    nodes = sorted(grid.get_node_ids())
    replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes],
                                    timeout=90)
    out = [r.error.reason if r.has_error() else "content" for r in replies]
    Path({replies_file!r}).write_text(json.dumps({"nodes": nodes, "replies": out}))
""",
    "evil_client.py": """from pathlib import Path

Path({marker!r}).write_text("ran")  # imported only where the ClientApp is loaded: on a silo

from flwr.clientapp import ClientApp

client = ClientApp()


@client.query()
def steal(msg, context):
    raise SystemExit("this silo ran the coordinator's code")
""",
}


def coordinator_attack(machines: Machines, root: Path) -> dict[str, object]:
    """The coordinator, which may start runs (from 127.0.0.1), runs an app of its own instead of fedlm's:
    its ClientApp would run on every silo and could read its text. Every silo must refuse it before
    installing it: the ClientApp module is imported nowhere, and each node's reply is the refusal."""
    coord = machines.dir("coordinator")
    root.mkdir(parents=True)
    marker, replies = root / "COORDINATOR-APP-RAN-ON-A-SILO", root / "replies.json"
    app = root / "coordinators"
    app.mkdir()
    for name, text in COORDINATOR_APP.items():
        (app / name).write_text(text.replace("{marker!r}", repr(str(marker))).replace(
            "{replies_file!r}", repr(str(replies))))
    home = root / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "c"\n\n[superlink.c]\naddress = "127.0.0.1:'
                                      f'{machines.control_port}"\nroot-certificates = "{coord / "certs/ca.pem"}"\n')
    r = subprocess.run([str(BIN / "flwr"), "run", app.name, "c", "--format", "json"], env={**ENV, "FLWR_HOME": str(home)},
                       capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 0 and '"success": true' in r.stdout, (r.stdout, r.stderr)  # the coordinator may start it
    deadline = time.monotonic() + 180
    while not replies.exists():
        assert time.monotonic() < deadline, "the coordinator's app got no replies"
        time.sleep(1)
    got = json.loads(replies.read_text())
    assert len(got["nodes"]) == 3 and len(got["replies"]) == 3, got  # legal, medical, spare
    for reason in got["replies"]:
        assert "runs only fedlm's own apps" in reason, got
    assert not marker.exists()
    return {"the coordinator's own app on the silos": "refused by every silo before installing it"}


def _http_status(address: str, ca: Path, method: str, path: str) -> int:
    """The status of one raw HTTPS request (the path sent as is, not normalised by a client library)."""
    import http.client
    import ssl

    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), context=ssl.create_default_context(cafile=str(ca)),
                                       timeout=10)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None,
                     headers={"content-type": "application/protobuf"})
        return conn.getresponse().status
    finally:
        conn.close()


def _fleet_status(address: str, ca: Path, call: str, *, sign_with: Path, claim: Path, node_id: int = 0) -> int:
    """Call the Fleet API as Flower's SuperNode does, signing with one key and claiming another's public key."""
    import httpx
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )
    from flwr.proto.fleet_pb2 import ActivateNodeRequest, PullMessagesRequest
    from flwr.proto.node_pb2 import Node
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    private = load_ssh_private_key(sign_with.read_bytes(), None)
    public = load_ssh_public_key(claim.read_bytes())
    auth = NodeAuthHttpInterceptor(private, public)  # type: ignore[arg-type]
    with FleetHttpClient.from_server_address(address, False, str(ca), interceptors=[auth]) as client:
        try:
            if call == "activate":
                client.ActivateNode(ActivateNodeRequest(public_key=public_key_to_bytes(public),  # type: ignore[arg-type]
                                                        heartbeat_interval=30))
            else:
                client.PullMessages(PullMessagesRequest(node=Node(node_id=node_id)))
        except httpx.HTTPStatusError as e:
            return e.response.status_code
    return 200


def attack(machines: Machines, root: Path, address: str, node_ids: dict[str, int]) -> tuple[Path, dict[str, object]]:
    """The silo "legal", holding what the README gives it (ca.pem, legal.key, the address), and strangers
    try the Control, Runtime and Fleet APIs; every attempt must be refused. Returns the file the
    silo's own app would write wherever it ran (checked after the run) and each attempt's outcome."""
    legal, coord = machines.dir("legal"), machines.dir("coordinator")
    ca, key = legal / "ca.pem", legal / "legal.key"
    root.mkdir(parents=True)
    marker = root / "EVIL-APP-RAN"
    app = root / "evil"
    app.mkdir()
    for name, text in EVIL_APP.items():
        (app / name).write_text(text.replace("{marker!r}", repr(str(marker))))
    home = root / "flwr"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "c"\n\n[superlink.c]\naddress = "{address}"\n'
                                      f'root-certificates = "{ca}"\n')
    from fedlm.federation.trust import make_silo_key
    make_silo_key(root / "own.key")  # a key of its own, which it tries to register
    env = {**ENV, "FLWR_HOME": str(home)}
    flwr = str(BIN / "flwr")
    tries = {"flwr ls": [flwr, "ls", "c", "--format", "json"],
             "flwr stop": [flwr, "stop", "1", "c", "--format", "json"],
             "flwr supernode register": [flwr, "supernode", "register", str(root / "own.key.pub"), "c",
                                         "--format", "json"],
             "flwr run (its own app)": [flwr, "run", app.name, "c", "--format", "json"]}
    with ThreadPoolExecutor(len(tries)) as pool:
        done = dict(zip(tries, pool.map(lambda cmd: subprocess.run(cmd, env=env, capture_output=True, text=True,
                                                                     timeout=120, cwd=root), tries.values()),
                        strict=True))
    outcomes: dict[str, object] = {}
    for what, r in done.items():
        refused = r.returncode != 0 or '"success": false' in r.stdout
        assert refused and ("403" in r.stdout + r.stderr or "unavailable" in r.stdout), (what, r.stdout, r.stderr)
        outcomes[what] = "refused (403)"

    for method, path in (("POST", "/v1/control/list-runs"), ("POST", "/v1/control/register-node"),
                         ("POST", "/v1/runtime/get-nodes"), ("POST", "/v1/fleet/../control/list-runs"),
                         ("POST", "/v1/fleet/%2e%2e/control/list-runs"), ("POST", "/v1/fleet//../control/start-run"),
                         ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/v1/fleet/get-run")):
        outcomes[f"{method} {path}"] = status = _http_status(address, ca, method, path)
        assert status == 403, (method, path)
    assert _http_status(address, ca, "GET", "/health") == 200

    # the Fleet API as another silo: its public key with a signature made by legal's key; legal's
    # own valid signature asking for medical's messages
    medical_pub = coord / "medical.key.pub"
    outcomes["activate as medical, signed by legal"] = _fleet_status(address, ca, "activate", sign_with=key,
                                                                     claim=medical_pub)
    outcomes["pull medical's messages, signed by legal"] = _fleet_status(
        address, ca, "pull", sign_with=key, claim=legal / "legal.key.pub", node_id=node_ids["medical"])
    assert outcomes["activate as medical, signed by legal"] == outcomes["pull medical's messages, signed by legal"] == 401

    # SuperNodes: Flower's own with no key (it makes a fresh one) claiming medical; `fedlm node` with a
    # key the coordinator never registered, claiming legal (it must stop with one line, not hang)
    cmd = [str(BIN / "flower-supernode"), "--superlink", address, "--root-certificates", str(ca), "--port",
           str(free_port()), "--node-config", f'workspace="{legal / "ws"}" silo="medical"']
    log = machines.start(cmd, "legal", name="stranger-no-key")
    r = subprocess.run([*FEDLM, "node", "--superlink", address, "--workspace", "ws", "--silo", "legal",
                        "--root-certificates", str(ca), "--key", str(root / "own.key")], cwd=legal, env=ENV,
                       capture_output=True, text=True, timeout=120)
    _one_line_error(r, "refused this SuperNode", "own.key is not registered", "fedlm silo add legal")
    deadline = time.monotonic() + 60
    while "[code: 2001]" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
        time.sleep(0.5)
    for proc, started in machines.background:
        if started == log:  # refused for good: stop it now, it only holds memory
            os.killpg(proc.pid, signal.SIGTERM)
    outcomes.update({"SuperNode, no key, as medical": "[code: 2001]",
                     "`fedlm node`, unregistered key, as legal": "[code: 2004], exit 2"})
    return marker, outcomes


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="the README makes certificates with openssl")
@pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                    reason="`fedlm superlink` puts nginx in front of Flower (make setup installs it)")
def test_readme_run_across_machines(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The README's deployment, run; while it runs, a silo and strangers attack it (see `attack`)."""
    blocks = readme_blocks()
    sh = [body for lang, body in blocks if lang == "sh"]
    toml = [body for lang, body in blocks if lang == "toml"]
    assert len(sh) == 8 and len(toml) == 1, [b[:40] for _, b in blocks]
    certs, counts, link, node, train, evaluate, personalise, value = sh
    assert sh[0].startswith("# on the coordinator") and "openssl" in certs
    machines = Machines(tmp_path / "m", free_port(), free_port(), _texts(tmp_path))
    coord = machines.dir("coordinator")
    address = f"127.0.0.1:{machines.port}"
    def on_silos(body: str) -> list[str]:  # the silos' machines work at the same time
        with ThreadPoolExecutor(len(SILOS)) as pool:
            return list(pool.map(lambda silo: machines.run_block(body, silo, silo=silo), SILOS))

    try:
        machines.run_block(certs, "coordinator")
        for silo in SILOS:
            shutil.copy(coord / "certs/ca.pem", machines.dir(silo) / "ca.pem")
        on_silos(counts)
        for silo in SILOS:
            for name in (f"counts-{silo}.json", f"{silo}.key.pub"):
                shutil.copy(machines.dir(silo) / name, coord)
        # a third registered silo that this run does not train: its node must get no work
        spare = machines.dir("spare")
        assert fedlm_here(capfd, "silo", "key", str(spare / "spare.key")).returncode == 0
        assert fedlm_here(capfd, "silo", "add", "spare", str(spare / "spare.key.pub"), "--registry",
                          str(coord / "silos.json")).returncode == 0
        machines.run_block(link, "coordinator")
        for silo in SILOS:
            (machines.dir(silo) / "ws").mkdir(exist_ok=True)
            shutil.copy(coord / "ws/tokenizer.json", machines.dir(silo) / "ws/tokenizer.json")
        on_silos(node)  # shards, then starts the SuperNode (it waits for the SuperLink)
        link_log = tmp_path / "m/superlink-coordinator.log"
        machines.wait_for(link_log, "SuperLink ready", timeout=90)
        node_ids = {m[0]: int(m[1]) for m in re.findall(r"(\w+) \(node (\d+)\)", link_log.read_text())}
        assert sorted(node_ids) == ["legal", "medical", "spare"], link_log.read_text()

        shutil.copytree(machines.dir("legal") / "ws", spare / "ws")
        shutil.move(spare / "ws/silos/legal", spare / "ws/silos/spare")
        machines.start([*FEDLM, "node", "--superlink", address, "--workspace", "ws", "--silo", "spare",
                        "--root-certificates", str(coord / "certs/ca.pem"), "--key", "spare.key"], "spare",
                       name="node-spare")
        marker, outcomes = attack(machines, tmp_path / "attacks", address, node_ids)

        # A SuperNode that trusts another CA: exit 2 naming the SuperLink and the fix, at once.
        (tmp_path / "other").mkdir()
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=x",
                        "-keyout", "k.pem", "-out", "other-ca.pem"], cwd=tmp_path / "other", check=True,
                       capture_output=True)
        r = fedlm_here(capfd, "node", "--superlink", address, "--workspace", str(machines.dir("legal") / "ws"),
                       "--silo", "legal", "--root-certificates", str(tmp_path / "other/other-ca.pem"),
                       "--key", str(machines.dir("legal") / "legal.key"))
        _one_line_error(r, f"SuperLink {address}: its TLS certificate does not verify", "pass the CA that signed")

        (coord / "fed.toml").write_text(toml[0])
        t0 = time.monotonic()
        trained = machines.run_block(train, "coordinator", extra={"train": [
            a for kv in [*TINY, "federation.personalise_steps=3"] for a in ("--set", kv)]})
        seconds = time.monotonic() - t0
        run = coord / "runs/fed"
        rows = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rows] == [1] and rows[0]["completed"] and not rows[0]["dropped"]
        assert sorted(rows[0]["silos"]) == sorted(SILOS)
        print(f"\nround over TLS on loopback: {rows[0]['seconds']:.1f} s; `fedlm train` in all: {seconds:.1f} s")
        print("attacks refused:", json.dumps(outcomes, indent=1))
        assert f"SuperNode {node_ids['spare']} gets no work: registered for silo 'spare'" in \
            (run / "server.log").read_text()
        assert not marker.exists()  # the silo's own app ran nowhere
        spare_log = tmp_path / "m/node-spare.log"
        assert "Traceback" not in spare_log.read_text(errors="replace")

        for silo in SILOS:
            shutil.copytree(run / "model", machines.dir(silo) / "model")
        for out in on_silos(evaluate):
            result = json.loads(out.strip().splitlines()[-1])
            assert result["tokens"] > 0 and math.isfinite(result["bits_per_byte"])
        # personalised where the data is: the coordinator, which has none, says how instead of failing
        assert "personalise on each silo's machine (federation.personalise_steps = 3)" in " ".join(trained.split())
        assert not list(run.glob("personalised-*"))
        for silo in SILOS:
            (machines.dir(silo) / "runs/fed").mkdir(parents=True)
            shutil.copy(run / "config.toml", machines.dir(silo) / "runs/fed")
            shutil.copytree(run / "model", machines.dir(silo) / "runs/fed/model")
        on_silos(personalise)
        for silo in SILOS:
            assert (machines.dir(silo) / f"runs/fed/personalised-{silo}/model").is_dir()

        # valued on the silos' machines: the coordinator holds no silo's data, and in process it says so
        with contextlib.chdir(coord):
            r = fedlm_here(capfd, "value", "runs/fed", "--budget", "100")
        _one_line_error(r, "not found in", "--superlink HOST:PORT")
        machines.run_block(value, "coordinator")
        valued = json.loads((run / "value.json").read_text())
        assert valued["coalitions_trained"] == 2 and not list(run.glob(".value*"))
        for silo in SILOS:  # each silo's own count of what it scored: the run's validation, the start and every
            # coalition's model (the grand one's, the run's own, once for its value and its gain) and its baseline's
            r = fedlm_here(capfd, "silo", "spent", "--workspace", str(machines.dir(silo) / "ws"), "--silo", silo, "--json")
            own = json.loads(r.stdout)
            assert r.returncode == 0 and own["scored"] == 2 + 2 ** 2 + 1 and own["ledgers"] == {}, r.stdout
        # bad input found by the valuation's ServerApp comes back as one line, and value.json is kept
        with contextlib.chdir(coord):
            r = fedlm_here(capfd, "value", "runs/fed", "--method", "rounds", "--superlink", "127.0.0.1:"
                           f"{machines.control_port}", "--root-certificates", "certs/ca.pem")
        _one_line_error(r, "no in-run valuation", "--method exact or sampled")
        assert json.loads((run / "value.json").read_text()) == valued and not list(run.glob(".value*"))
        assert not (coord / "ws/silos").exists()  # nothing of a silo's came to the coordinator to value it
        print("coordinator's attack:", coordinator_attack(machines, tmp_path / "coordinator-attack"))
    finally:
        machines.stop_all()

    # The same config on the same shards, in process: bitwise the same global model.
    pooled = tmp_path / "pooled"
    (pooled / "silos").mkdir(parents=True)
    shutil.copy(coord / "ws/tokenizer.json", pooled)
    for silo in SILOS:
        shutil.copytree(machines.dir(silo) / "ws/silos" / silo, pooled / "silos" / silo)
    cfg = load_config(coord / "fed.toml", [*TINY, f"data.workspace={pooled}"])
    run_federated(cfg, tmp_path / "inprocess")
    a = load_file(str(tmp_path / "inprocess/checkpoint/global.safetensors"))
    b = load_file(str(run / "checkpoint/global.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ...and valued in process on those shards: the same values, gains and payouts as on the silos' machines
    pooled_value = value_run(tmp_path / "inprocess", budget=100)
    for silo in SILOS:
        for key in ("shapley", "leave_one_out", "gain", "local_only_bpb", "federated_bpb"):
            assert pooled_value["silos"][silo][key] == pytest.approx(valued["silos"][silo][key], rel=1e-5, abs=1e-7)
        assert pooled_value["silos"][silo]["payout"] == valued["silos"][silo]["payout"]
