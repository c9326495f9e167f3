"""The ClientApp launcher beside a SuperNode: fedlm's client imported once, one forked process per message.

    python -m fedlm.federation.warm_exec --runtime-api-address 127.0.0.1:PORT --parent-pid PID

Flower's own launcher (`flower-superexec`, started by a SuperNode in `--isolation subprocess`)
starts a new `flwr-clientapp` process for every message, and each spends seconds importing
torch and fedlm before a fraction of a second of training. A SuperNode in `--isolation
process` leaves the launching to another process: this one. It imports the client once, asks
the SuperNode's Runtime API for a task (`--poll` seconds after the last one, backing off while
none comes), and forks a child per task that
runs Flower's own `run_clientapp` with the task's token. Each message still runs in a process
of its own (nothing survives between messages, as under Flower's launcher); only the imports
are shared, copied at the fork. The parent never runs torch, so no thread pool is forked.

It runs only fedlm's own Flower apps. Whoever starts a run on the SuperLink chooses its app
bundle (FAB), and Flower would install and import whatever code the bundle holds, on every silo,
where it could read the silo's text. So before Flower installs a task's bundle, the child
compares it, file by file, with the apps this silo's installed fedlm ships, as Flower's own
`flwr run` builds them (`own_apps`), and refuses anything else with an error reply: the
coordinator's choices end at fedlm's app and its run config. (Flower's `--trusted-entities`
verifies bundles signed through Flower Hub, which a consortium offline cannot use.)

It exits when the SuperNode (`--parent-pid`) is gone, and stops its children on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from fedlm.federation.hops import mark
from fedlm.federation.polls import Backoff, shorten_object_pull_retries

POLL_SECONDS, POLL_CAP_SECONDS = 0.05, 0.4
"""Ask for a task 50 ms after the last one, backing off to 0.4 s (Flower's launcher: every 1 s)."""


def command(runtime_api_address: str, parent_pid: int, *, root_certificates: Path | None = None) -> list[str]:
    """The command line that starts this launcher for the SuperNode `parent_pid`."""
    cmd = [sys.executable, "-m", "fedlm.federation.warm_exec", "--runtime-api-address", runtime_api_address,
           "--parent-pid", str(parent_pid)]
    return cmd + (["--root-certificates", str(root_certificates)] if root_certificates else ["--insecure"])


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


MAX_APP_BYTES = 1 << 20
"""A bundle whose files unpack to more than this is refused unread (fedlm's are a few KB)."""


class RefusedApp(Exception):
    """The run's app bundle is not one of fedlm's own."""


def fab_files(fab: bytes) -> dict[str, bytes]:
    """A Flower app bundle's files and their bytes (compression aside, what Flower installs)."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as z:
            if sum(i.file_size for i in z.infolist()) > MAX_APP_BYTES:
                raise RefusedApp(f"its files unpack to more than {MAX_APP_BYTES} bytes")
            return {name: z.read(name) for name in z.namelist()}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise RefusedApp(f"not a readable bundle ({e})") from None


def own_apps() -> list[dict[str, bytes]]:
    """The files of every Flower app this fedlm ships (`fedlm/*/flwr_app`), built as `flwr run` builds them."""
    from flwr.cli.build import build_fab_from_disk

    package = Path(__file__).resolve().parents[1]
    return [fab_files(build_fab_from_disk(p.parent)) for p in sorted(package.glob("*/flwr_app/pyproject.toml"))]


def only_own_apps(install: Callable[..., Path], allowed: list[dict[str, bytes]]) -> Callable[..., Path]:
    """Flower's `install_from_fab`, refusing a bundle whose files are not exactly one of `allowed`."""

    def checked(fab_file: bytes, *args: object, **kwargs: object) -> Path:
        files = fab_files(fab_file)
        if files not in allowed:
            raise RefusedApp("this silo runs only fedlm's own apps, as its installed fedlm builds them; the run's "
                             f"app bundle ({', '.join(sorted(files))}) is another (a different fedlm version, or "
                             "not fedlm's app): refused before installing it")
        return install(fab_file, *args, **kwargs)

    return checked


def _run_task(address: str, token: str, insecure: bool, certificates: bytes | None, node_pid: int,
              allowed: list[dict[str, bytes]]) -> None:
    """In the forked child: Flower's ClientApp process body for one task (only for fedlm's own apps), then exit."""
    code = 1
    mark("client", "start", node_pid=node_pid)
    try:
        from flwr.supernode.runtime import run_clientapp as flower

        flower.install_from_fab = only_own_apps(flower.install_from_fab, allowed)
        flower.run_clientapp(runtime_api_address=address, token=token, insecure=insecure, certificates=certificates,
                      parent_pid=None, runtime_dependency_install=False)
        code = 0
    except SystemExit as e:  # Flower's exit path: flwr_exit raises SystemExit with its code
        code = e.code if isinstance(e.code, int) else 1
    finally:
        mark("client", "end", node_pid=node_pid, code=code)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _preload() -> list[dict[str, bytes]]:
    """Import what every ClientApp message needs, so each child starts with it: fedlm's client, and
    torch._dynamo, which torch imports lazily on the first optimizer built (seconds here). Returns
    the apps the children may run (`own_apps`)."""
    import threading

    import torch

    import fedlm.federation.client_app  # noqa: F401

    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    shorten_object_pull_retries()  # the child pulls the message from its SuperNode, which may still be fetching it
    allowed = own_apps()
    assert threading.active_count() == 1, "a thread started before fork: the children would not get it"
    return allowed


def serve(address: str, *, parent_pid: int, insecure: bool, root_certificates: Path | None,
          poll: float = POLL_SECONDS) -> None:
    """Acquire ClientApp tasks from the SuperNode at `address` and fork one child per task."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    allowed = _preload()

    certificates = None if root_certificates is None else root_certificates.read_bytes()
    # No retry invoker: Flower's retries a closed port for ever, and a SuperNode closes its Runtime API
    # before it exits, so the launcher would never look at its parent again. The loop below retries.
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")])
    children: set[int] = set()

    def stop(signum: int, frame: object) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    backoff = Backoff(poll, max(poll, POLL_CAP_SECONDS))  # the next task comes soon after one ends
    while _alive(parent_pid):
        for pid in list(children):
            try:
                done = os.waitpid(pid, os.WNOHANG)[0] == pid
            except ChildProcessError:
                done = True
            if done:
                children.discard(pid)
                backoff.reset()
        try:
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        except Exception:  # noqa: BLE001  the SuperNode is starting or stopping: ask again
            time.sleep(0.5)
            continue
        if res.HasField("task") and res.token:
            mark("launcher", "fork", node_pid=parent_pid)
            pid = os.fork()
            if pid == 0:
                _run_task(address, res.token, insecure, certificates, parent_pid, allowed)
            children.add(pid)
            backoff.reset()
            continue  # a round sends one message per node, but ask again at once
        backoff.wait()
    stop(signal.SIGTERM, None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api-address", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--root-certificates", type=Path)
    parser.add_argument("--poll", type=float, default=POLL_SECONDS)
    args = parser.parse_args(argv)
    serve(args.runtime_api_address, parent_pid=args.parent_pid, insecure=args.insecure,
          root_certificates=args.root_certificates, poll=args.poll)


if __name__ == "__main__":
    main()
