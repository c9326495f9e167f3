"""Flower's deployment engine: a SuperLink and SuperNodes as processes, and `flwr run` to submit.

    run_on_flower(cfg, Path("runs/fed"))          # SuperLink + one SuperNode per silo on 127.0.0.1
    run_on_flower(cfg, out, superlink="127.0.0.1:9093", root_certificates=Path("ca.pem"))  # on the coordinator
    run_node("10.0.0.5:9092", Path("ws"), "legal", root_certificates=Path("ca.pem"), key=Path("legal.key"))
    run_superlink(host="0.0.0.0", port=9092, control_port=9093, tls=ServerTls(ca, cert, key),
                  registry=Path("silos.json"))                                  # `fedlm superlink`

Everything Flower starts gets `FLOWER_ENV` (no telemetry, no update check, no `uv sync` of
the app's dependencies) and the venv's bin/ first on PATH (the SuperLink starts
`flower-superexec` by name). Each started process gets its own FLWR_HOME, so installed app
bundles never leak between runs. Readiness is checked before use and every wait is bounded;
a SuperLink that cannot be reached or whose TLS certificate does not verify is a `UserError`
naming the endpoint and the fix. Processes are stopped (SIGTERM, then SIGKILL) in `finally`,
and get SIGTERM from the kernel when the process that started them dies (even by SIGKILL).

Across organisations `fedlm superlink` exposes only Flower's Fleet API, through a proxy, to
silos whose keys the coordinator registered; see `trust` for the mechanism and why.

Each SuperNode runs in `--isolation process` beside fedlm's launcher (`warm_exec`), which
imports the client once and forks a process per message instead of Flower starting a fresh
interpreter for each. SuperNodes run as `python -m fedlm.federation.supernode`, Flower's own
command line with its fixed polls shortened (`polls`).

The ServerApp runs on the SuperLink's machine, holds the run folder's lock (`fedlm.runlock`)
and writes the run directory there; this module waits for its summary.json (or error.json),
replays rounds.jsonl to `on_round`, and stops the Flower run (`flwr stop`) when it is itself
stopped (Ctrl-C, SIGTERM) or gives up waiting.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fedlm.config import Config
from fedlm.errors import UserError
from fedlm.federation import trust, warm_exec
from fedlm.federation.outcome import amend_summary
from fedlm.federation.rundir import FLOWER_ENV, RoundCallback
from fedlm.federation.silo_privacy import describe_policy, requires_secure_aggregation, spent_line
from fedlm.fileio import write_json
from fedlm.resolve import resolve_silos
from fedlm.runlock import FLOWER_RUN, live_run

APP_DIR = Path(__file__).parent / "flwr_app"
BIN = Path(sys.executable).parent


@dataclass
class ServerTls:
    """The SuperLink's TLS files (PEM): CA certificate, server certificate, server key."""

    ca_certfile: Path
    certfile: Path
    keyfile: Path


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment for a Flower process: FLOWER_ENV, its own FLWR_HOME, the venv on PATH."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env.setdefault("FLWR_LOG_LEVEL", "WARNING")
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(cmd: list[str], *, log_path: Path, flwr_home: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    flwr_home.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=flower_env(flwr_home), start_new_session=True, preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    """In a started child (Linux): SIGTERM it when the process that started it dies, even by SIGKILL,
    so a killed `fedlm train` leaves no SuperLink running its run on."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_launcher(supernode: subprocess.Popen[bytes], *, port: int, flwr_home: Path,
                   log_path: Path | None = None) -> subprocess.Popen[bytes]:
    """Start fedlm's ClientApp launcher (`warm_exec`) beside a SuperNode in `--isolation process`;
    it exits within its poll interval when the SuperNode does."""
    cmd = warm_exec.command(f"127.0.0.1:{port}", supernode.pid)
    out = open(log_path, "ab") if log_path is not None else None  # noqa: SIM115  closed below
    try:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
                                stdin=subprocess.DEVNULL, env=flower_env(flwr_home),
                                start_new_session=True, preexec_fn=_die_with_parent)
    finally:
        if out is not None:
            out.close()


def stop(procs: Sequence[subprocess.Popen[bytes]], *, grace: float = 5.0) -> None:
    """SIGTERM each process group, then SIGKILL what is left after `grace` seconds."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=5)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a service manager, `kill`) stops a foreground command like Ctrl-C, so its
    `finally` stops the Flower process it started instead of leaving it orphaned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _name(p: subprocess.Popen[bytes]) -> str:
    args = p.args if isinstance(p.args, list) else [p.args]
    return Path(str(args[0])).name


def _tail(path: Path, lines: int = 3) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------
# SuperLink


def start_superlink(*, port: int, log_path: Path, flwr_home: Path, host: str = "127.0.0.1",
                    tls: ServerTls | None = None) -> subprocess.Popen[bytes]:
    """Start `flower-superlink` (Fleet, Control and Runtime APIs on one HTTP(S) port)."""
    return _start(superlink_command(host=host, port=port, tls=tls), log_path=log_path, flwr_home=flwr_home)


def superlink_command(*, host: str, port: int, tls: ServerTls | None) -> list[str]:
    """The `flower-superlink` command line: TLS files, or --insecure (loopback tests only)."""
    cmd = [str(BIN / "flower-superlink"), "--host", host, "--port", str(port),
           "--disable-runtime-dependency-installation"]
    if tls is None:
        return [*cmd, "--insecure"]
    return [*cmd, "--ssl-ca-certfile", str(tls.ca_certfile), "--ssl-certfile", str(tls.certfile),
            "--ssl-keyfile", str(tls.keyfile)]


def wait_superlink(address: str, *, root_certificates: Path | None = None, insecure: bool = False,
                   timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None,
                   log_path: Path | None = None) -> None:
    """Wait until the SuperLink at HOST:PORT answers GET /health; UserError naming the fix if not."""
    _check_tls_args(root_certificates, insecure)
    url = f"{'http' if insecure else 'https'}://{address}/health"
    verify: ssl.SSLContext | bool = False
    if not insecure:
        assert root_certificates is not None
        try:
            verify = ssl.create_default_context(cafile=str(root_certificates))
        except (OSError, ssl.SSLError) as e:
            raise UserError(f"--root-certificates {root_certificates}: not a readable PEM CA certificate ({e})") from None
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        if proc is not None and proc.poll() is not None:
            tail = _tail(log_path) if log_path else ""
            raise UserError(f"the SuperLink on {address} exited (code {proc.returncode}) before it was ready: {tail}")
        try:
            r = httpx.get(url, verify=verify, timeout=2.0)
            if r.status_code < 500:
                return
            last = f"HTTP {r.status_code}"
        except httpx.ConnectError as e:
            if isinstance(e.__cause__, ssl.SSLError) or "CERTIFICATE" in str(e).upper() or "SSL" in str(e).upper():
                raise UserError(
                    f"SuperLink {address}: its TLS certificate does not verify against "
                    f"{root_certificates} ({e}); pass the CA that signed the SuperLink's certificate"
                ) from None
            last = str(e)
        except httpx.HTTPError as e:
            last = str(e)
        if time.monotonic() > deadline:
            raise UserError(
                f"SuperLink {address} is unreachable after {timeout:.0f} s ({last}); start it "
                f"(`fedlm superlink --port PORT ...` on its machine) or fix the address and firewall"
            )
        time.sleep(0.25)


def _check_tls_args(root_certificates: Path | None, insecure: bool) -> None:
    if insecure and root_certificates is not None:
        raise UserError("pass either --root-certificates FILE or --insecure, not both")
    if not insecure and root_certificates is None:
        raise UserError("the SuperLink uses TLS: pass --root-certificates CA.pem (or --insecure for a test on loopback)")
    if root_certificates is not None and not Path(root_certificates).is_file():
        raise UserError(f"--root-certificates {root_certificates}: no such file")


def run_superlink(*, host: str, port: int, control_port: int, tls: ServerTls, registry: Path,
                  flwr_home: Path | None = None, ready_timeout: float = 30.0,
                  on_ready: Callable[[str, dict[str, int]], None] | None = None) -> int:
    """`fedlm superlink`: Flower on 127.0.0.1:`control_port` behind nginx on HOST:PORT (Fleet API only).

    Flower runs with SuperNode authentication; each silo of `registry` has its key registered
    through the loopback Control API, and {node id: silo} is written where the ServerApp reads it
    (see `trust`). Waits until either process exits or Ctrl-C; stops both.
    """
    for flag, path in (("--ssl-ca-certfile", tls.ca_certfile), ("--ssl-certfile", tls.certfile),
                       ("--ssl-keyfile", tls.keyfile)):
        if not Path(path).is_file():
            raise UserError(f"{flag} {path}: no such file")
    silos = trust.load_registry(registry)
    if not silos:
        raise UserError(f"{registry}: no silos registered; on each silo run `fedlm silo key KEY`, then here "
                        f"`fedlm silo add NAME KEY.pub --registry {registry}`")
    local = f"127.0.0.1:{control_port}"
    with tempfile.TemporaryDirectory(prefix="fedlm-superlink-") as tmp, _sigterm_as_interrupt():
        state = Path(tmp)
        home = flwr_home or state / "flwr"
        home.mkdir(parents=True, exist_ok=True)
        nodes_file = state / "nodes.json"
        env = {**flower_env(home), trust.NODES_ENV: str(nodes_file)}
        cmd = [*superlink_command(host="127.0.0.1", port=control_port, tls=tls), "--enable-supernode-auth"]
        procs = [subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)]
        try:
            _wait_local_superlink(local, tls, ready_timeout=ready_timeout, proc=procs[0])
            node_of = register_silos(silos, local, root_certificates=tls.ca_certfile, flwr_home=state / "cli")
            write_json(nodes_file, {str(node): silo for silo, node in node_of.items()})
            conf = state / "nginx.conf"
            conf.write_text(trust.proxy_config(host=host, port=port, upstream_port=control_port,
                                               certfile=Path(tls.certfile).resolve(),
                                               keyfile=Path(tls.keyfile).resolve(), state=state))
            procs.append(subprocess.Popen(trust.proxy_command(conf, state), stdin=subprocess.DEVNULL,
                                          start_new_session=True))
            near = _local_host(host)
            public = f"[{near}]:{port}" if ":" in near else f"{near}:{port}"
            wait_superlink(public, root_certificates=tls.ca_certfile, timeout=ready_timeout, proc=procs[1],
                           log_path=state / "proxy-error.log")
            if on_ready is not None:
                on_ready(local, node_of)
            while all(p.poll() is None for p in procs):
                time.sleep(0.5)
            return next(p.returncode for p in procs if p.returncode is not None) or 1
        except KeyboardInterrupt:
            return 0
        finally:
            stop(procs)


def _local_host(host: str) -> str:
    """Where this machine reaches a server bound to HOST (bind-all -> loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def _wait_local_superlink(local: str, tls: ServerTls, *, ready_timeout: float,
                          proc: subprocess.Popen[bytes]) -> None:
    """Wait for Flower on 127.0.0.1; its certificate must verify there (the ServerApp connects to it)."""
    try:
        wait_superlink(local, root_certificates=tls.ca_certfile, timeout=ready_timeout, proc=proc)
    except UserError as e:
        if "does not verify" not in str(e):
            raise
        raise UserError(
            f"the SuperLink on {local}: {tls.certfile} does not verify against {tls.ca_certfile} for "
            f"127.0.0.1; it must be signed by that CA and name 127.0.0.1 (the SuperLink's own ServerApp "
            f"connects there) and every address silos dial in its subjectAltName"
        ) from None


def register_silos(silos: dict[str, str], control: str, *, root_certificates: Path,
                   flwr_home: Path) -> dict[str, int]:
    """Register each silo's public key with `flwr supernode register` on the loopback Control API."""
    _write_connection(flwr_home, control, root_certificates=root_certificates, insecure=False)
    node_of: dict[str, int] = {}
    for silo, key in silos.items():
        key_file = flwr_home / f"{silo}.pub"
        key_file.write_text(key + "\n")
        cmd = [str(BIN / "flwr"), "supernode", "register", str(key_file), "fedlm", "--name", silo,
               "--format", "json"]
        out = subprocess.run(cmd, env=flower_env(flwr_home), capture_output=True, text=True, timeout=60)
        try:
            node_of[silo] = int(json.loads(out.stdout[out.stdout.index("{"):])["node-id"])
        except (ValueError, KeyError, TypeError):
            detail = (out.stderr or out.stdout).strip().replace("\n", " ")[-300:]
            raise UserError(f"registering silo {silo!r} with the SuperLink failed: {detail}") from None
    return node_of


# ---------------------------------------------------------------------------------------
# SuperNodes (one per silo)


def supernode_command(superlink: str, workspace: Path, silo: str, *, port: int,
                      root_certificates: Path | None = None, insecure: bool = False,
                      key: Path | None = None, peers: Path | None = None) -> list[str]:
    """The `flower-supernode` command that serves `silo` of `workspace` to `superlink`, signing with `key`.

    The ClientApp gets `key` too (it signs the silo's SecAgg round keys with it) and `peers`, the
    silo's own copy of the registry that it checks the other silos' round keys against."""
    node_config = f'workspace="{Path(workspace).resolve()}" silo="{silo}"'
    for name, path in (("key", key), ("peers", peers)):
        if path is not None:
            node_config += f' {name}="{Path(path).resolve()}"'
    cmd = [sys.executable, "-m", "fedlm.federation.supernode", "--superlink", superlink, "--port", str(port),
           "--node-config", node_config, "--isolation", "process"]  # ClientApps: start_launcher
    if key is not None:
        cmd += ["--auth-supernode-private-key", str(Path(key).resolve())]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(root_certificates)]
    return cmd


def _check_silo_dir(workspace: Path, silo: str) -> None:
    path = Path(workspace) / "silos" / silo
    if not path.is_dir():
        raise UserError(f"silo {silo!r}: no directory {path}; prepare and shard it with `fedlm data ...` first")


def start_supernode(superlink: str, workspace: Path, silo: str, *, port: int, log_path: Path,
                    flwr_home: Path, root_certificates: Path | None = None,
                    insecure: bool = False) -> subprocess.Popen[bytes]:
    """Start one silo's SuperNode (it registers with the SuperLink by itself)."""
    _check_silo_dir(workspace, silo)
    cmd = supernode_command(superlink, workspace, silo, port=port,
                            root_certificates=root_certificates, insecure=insecure)
    proc = _start(cmd, log_path=log_path, flwr_home=flwr_home)
    start_launcher(proc, port=port, log_path=log_path, flwr_home=flwr_home)
    return proc


def run_node(superlink: str, workspace: Path, silo: str, *, root_certificates: Path, key: Path,
             peers: Path | None = None, port: int | None = None, ready_timeout: float = 30.0) -> int:
    """`fedlm node`: check the SuperLink, the silo, its policy and its key, then run its SuperNode until it
    exits or Ctrl-C."""
    _check_silo_dir(workspace, silo)
    print(describe_policy(Path(workspace) / "silos" / silo), flush=True)  # a malformed privacy.toml stops it here
    print(spent_line(Path(workspace) / "silos" / silo), flush=True)
    if peers is None and requires_secure_aggregation(Path(workspace) / "silos" / silo):
        raise UserError(f"silo {silo!r}: its privacy.toml requires secure aggregation, which across machines needs "
                        "the silo's own copy of the silo registry to check its peers' round keys: add "
                        "--peers silos.json (from the coordinator; compare the key fingerprints with the other silos)")
    if not Path(key).is_file():
        raise UserError(f"--key {key}: no such file; make it with `fedlm silo key {key}` and have the "
                        f"coordinator register {key}.pub for silo {silo!r}")
    if peers is not None:
        registry = trust.pinned_keys(peers)
        if silo not in registry:
            raise UserError(f"--peers {peers}: silo {silo!r} is not in it; get the coordinator's current silos.json")
        if trust.load_signing_key(key).public_key().public_numbers() != registry[silo].public_numbers():
            raise UserError(f"--peers {peers}: the key registered for {silo!r} is not {key}'s; "
                            "this registry is not the coordinator's, or the key is not the registered one")
    wait_superlink(superlink, root_certificates=root_certificates, timeout=ready_timeout)
    flwr_home = Path(workspace) / "silos" / silo / ".flwr"
    cmd = supernode_command(superlink, workspace, silo, port=port or free_port(),
                            root_certificates=root_certificates, key=key, peers=peers)
    flwr_home.mkdir(parents=True, exist_ok=True)
    with _sigterm_as_interrupt():
        proc = subprocess.Popen(cmd, env=flower_env(flwr_home), start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        start_launcher(proc, port=int(cmd[cmd.index("--port") + 1]), flwr_home=flwr_home)
        try:
            assert proc.stdout is not None
            for raw in proc.stdout:  # Flower's log, passed on; a refusal ends the command
                sys.stdout.buffer.write(raw)
                sys.stdout.flush()
                if any(code in raw for code in REFUSED):
                    raise UserError(
                        f"the SuperLink {superlink} refused this SuperNode: the key {key} is not registered; "
                        f"send {key}.pub to the coordinator, who runs `fedlm silo add {silo} KEY.pub` and "
                        f"restarts `fedlm superlink`")
            return proc.wait()
        except KeyboardInterrupt:
            return 0
        finally:
            stop([proc])


SERVERAPP_GRACE_S = 5.0
"""How long after the ServerApp let go of the run folder its summary.json or error.json may still appear."""

REFUSED = (b"[code: 2001]", b"[code: 2004]")
"""Flower's error codes for a SuperNode whose key is not registered (2001: registration through the
Fleet API is off, 2004: activation of an unknown key); the SuperNode logs it and then hangs."""


# ---------------------------------------------------------------------------------------
# submitting and following a run


def _write_connection(flwr_home: Path, superlink: str, *, root_certificates: Path | None,
                      insecure: bool) -> None:
    lines = ["[superlink]", 'default = "fedlm"', "", "[superlink.fedlm]", f'address = "{superlink}"']
    if insecure:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{Path(str(root_certificates)).resolve()}"')
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n")


def submit_run(superlink: str, run_config: dict[str, Any], *, flwr_home: Path,
               root_certificates: Path | None = None, insecure: bool = False,
               app_dir: Path = APP_DIR, timeout: float = 60.0) -> int:
    """`flwr run APP_DIR` against `superlink`; returns the run id."""
    _write_connection(flwr_home, superlink, root_certificates=root_certificates, insecure=insecure)
    pairs = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    cmd = [str(BIN / "flwr"), "run", str(app_dir), "fedlm", "--format", "json", "--run-config", pairs]
    try:
        out = subprocess.run(cmd, env=flower_env(flwr_home), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"`flwr run` against SuperLink {superlink} did not answer in {timeout:.0f} s") from None
    try:
        payload = json.loads(out.stdout[out.stdout.index("{"):])
        return int(payload["run-id"])
    except (IndexError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        detail = (out.stderr or out.stdout).strip().replace("\n", " ")[-300:]
        raise UserError(f"`{shlex.join(cmd)}` failed against SuperLink {superlink}: {detail}") from None


def stop_run(superlink: str, run_id: int, *, flwr_home: Path) -> None:
    """`flwr stop RUN_ID` (best effort: used when a run must not keep waiting)."""
    subprocess.run([str(BIN / "flwr"), "stop", str(run_id), "fedlm"], env=flower_env(flwr_home),
                   capture_output=True, timeout=30)


def follow_run(run_dir: Path, *, timeout: float, on_round: RoundCallback | None = None,
               procs: Sequence[subprocess.Popen[bytes]] = (), rounds: int = 0) -> dict[str, Any]:
    """Wait (bounded) for the ServerApp's summary.json or error.json; replay new rounds to `on_round`."""
    def row(r: dict[str, Any]) -> None:
        if on_round is not None:
            on_round(int(r["round"]), rounds, r)

    return follow(run_dir, timeout=timeout, log="rounds.jsonl", on_row=row, done="summary.json", error="error.json",
                  procs=procs, what=lambda seen: f"the ServerApp of this run ended without a summary after {seen} "
                                                 f"rounds (crashed or stopped); see the logs beside {run_dir}, then --resume")


def follow(run_dir: Path, *, timeout: float, log: str, on_row: Callable[[dict[str, Any]], None], done: str,
           error: str, procs: Sequence[subprocess.Popen[bytes]] = (), what: Callable[[int], str]) -> dict[str, Any]:
    """Wait (bounded) for a ServerApp job's RUN/`done` (returned) or RUN/`error` (its one line raised as
    UserError); replay the new lines of RUN/`log` to `on_row` meanwhile.

    The ServerApp holds the run folder's lock (`fedlm.runlock`) while it runs; when it lets go
    with neither file written, it died (a crash, the kernel's OOM killer, Flower ending the run),
    and waiting on would only end at `timeout`: UserError `what(lines seen)`."""
    deadline = time.monotonic() + timeout
    seen = 0
    log_path = run_dir / log
    held, gone = False, None  # the ServerApp took the lock; when it was seen let go
    while True:
        if log_path.exists():
            for line in log_path.read_text().splitlines()[seen:]:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line being written: read it next time
                seen += 1
                on_row(row)
        if (run_dir / error).exists():
            raise UserError(json.loads((run_dir / error).read_text())["error"])
        if (run_dir / done).exists():
            return dict(json.loads((run_dir / done).read_text()))
        for p in procs:
            if p.poll() is not None:
                raise UserError(f"a Flower process ({_name(p)}) exited with code {p.returncode} mid-run")
        if live_run(run_dir) is not None:
            held, gone = True, None
        elif held:
            gone = gone or time.monotonic()
            if time.monotonic() - gone > SERVERAPP_GRACE_S:  # the error file is written after the lock is let go
                raise UserError(what(seen))
        if time.monotonic() > deadline:
            raise UserError(f"the ServerApp did not finish within {timeout:.0f} s; see the logs beside {run_dir}")
        time.sleep(0.5)


def run_budget(cfg: Config) -> float:
    """Seconds a deployed run of `cfg` may take before it counts as hung: each exchange waits at most
    round_timeout (connect, the rounds, validation, valuation's scoring), plus per round the
    server's own work and the ServerApp's start."""
    fed = cfg.federation
    return fed.round_timeout * (fed.rounds + 3) + 60.0 * (fed.rounds + 2)


def run_on_flower(cfg: Config, out_dir: Path, *, resume: bool = False, on_round: RoundCallback | None = None,
                  superlink: str | None = None, root_certificates: Path | None = None,
                  insecure: bool = False, logs_dir: Path | None = None,
                  connect_timeout: float = 10.0) -> dict[str, Any]:
    """Run a prepared run directory on the deployment engine (see module docstring).

    With `superlink` the run directory must be readable and writable by the SuperLink's
    machine at the same path (run this on that machine): the ServerApp reads config.toml
    there and writes rounds, checkpoints and the model beside it. SIGTERM and Ctrl-C stop the
    Flower run (`flwr stop`) before the command ends; the Flower processes started here die
    with this one even when it is killed. Flower's homes live in RUN/.flower (removed at the
    end, and at the start after a kill); the processes' logs in RUN/flower-logs.
    """
    out_dir = out_dir.resolve()
    for stale in ("summary.json", "error.json", FLOWER_RUN):
        (out_dir / stale).unlink(missing_ok=True)
    home = out_dir / ".flower"
    shutil.rmtree(home, ignore_errors=True)
    logs = logs_dir or out_dir / "flower-logs"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with _sigterm_as_interrupt():
            if superlink is None:  # a federation on this machine: loopback, no TLS needed
                insecure, root_certificates = True, None
                superlink, procs = _local_federation(cfg, home, logs)
            else:  # a running SuperLink (`fedlm superlink`): it should answer at once
                wait_superlink(superlink, root_certificates=root_certificates, insecure=insecure,
                               timeout=connect_timeout)
            run_id = submit_run(superlink, {"run-dir": str(out_dir), "resume": resume}, flwr_home=home / "cli",
                                root_certificates=root_certificates, insecure=insecure)
            write_json(out_dir / FLOWER_RUN, {"run_id": run_id, "superlink": superlink})
            try:
                summary = follow_run(out_dir, timeout=run_budget(cfg), on_round=on_round, procs=procs,
                                     rounds=cfg.federation.rounds)
            except BaseException:
                stop_run(superlink, run_id, flwr_home=home / "cli")
                raise
            return amend_summary(out_dir, summary)
    finally:
        stop(procs)
        shutil.rmtree(home, ignore_errors=True)


def _local_federation(cfg: Config, home: Path, logs: Path) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """A SuperLink and one SuperNode per silo on 127.0.0.1; (its address, the processes)."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        port = free_port()
        superlink = f"127.0.0.1:{port}"
        link = start_superlink(port=port, log_path=logs / "superlink.log", flwr_home=home / "superlink")
        procs.append(link)
        wait_superlink(superlink, insecure=True, proc=link, log_path=logs / "superlink.log")
        workspace = Path(cfg.data.workspace)
        for silo in resolve_silos(workspace, cfg.data.silos):
            procs.append(start_supernode(superlink, workspace, silo, port=free_port(),
                                         log_path=logs / f"supernode-{silo}.log",
                                         flwr_home=home / f"node-{silo}", insecure=True))
        return superlink, procs
    except BaseException:
        stop(procs)
        raise
