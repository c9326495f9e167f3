"""fedlm's ClientApp launcher (`warm_exec`) beside a SuperNode: it must not outlive the SuperNode."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fedlm.federation import warm_exec


class _NoTask(http.server.BaseHTTPRequestHandler):
    """A SuperNode's Runtime API with nothing to do: every AcquireTask gets an empty response."""

    asked = threading.Event()

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
        type(self).asked.set()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
def test_launcher_exits_when_its_supernode_is_killed() -> None:
    """The launcher polls its SuperNode; when the SuperNode dies by SIGKILL (its port closes, nothing
    stops the launcher), the launcher notices its `--parent-pid` is gone and exits, instead of
    retrying the closed port for ever (12 idle launchers outlived a full test suite)."""
    parent = subprocess.Popen(["sleep", "600"])  # stands for the SuperNode process
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoTask)
    _NoTask.asked.clear()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    launcher = subprocess.Popen(warm_exec.command(f"127.0.0.1:{httpd.server_address[1]}", parent.pid),
                                start_new_session=True)
    try:
        assert _NoTask.asked.wait(120), "the launcher never polled its Runtime API"
        httpd.shutdown()  # a SuperNode shutting down closes its Runtime API first,
        httpd.server_close()
        time.sleep(2)  # (the launcher asks the closed port meanwhile)
        parent.kill()  # and then exits
        parent.wait(timeout=10)
        assert launcher.wait(timeout=30) == 0  # TimeoutExpired: it outlived its SuperNode
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait(timeout=10)
        if parent.poll() is None:
            parent.kill()
        httpd.server_close()


def _fab(files: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def test_a_silo_runs_only_fedlms_own_apps(tmp_path: Path) -> None:
    """The launcher's child installs a task's bundle only when its files are exactly those of an app
    this fedlm ships, as `flwr run` builds it; any other bundle is refused before Flower installs
    (and would import) it: the coordinator cannot run its own code on a silo."""
    from flwr.cli.build import build_fab_from_disk

    allowed = warm_exec.own_apps()
    assert len(allowed) == 2  # training and valuation
    installed: list[bytes] = []
    install = warm_exec.only_own_apps(lambda fab, **kw: installed.append(fab) or tmp_path, allowed)
    ours = build_fab_from_disk(Path(warm_exec.__file__).parent / "flwr_app")
    assert install(ours, skip_prompt=True) == tmp_path and installed == [ours]
    # recompressed by another zlib: the same files, so the same app
    assert install(_fab(warm_exec.fab_files(ours)), skip_prompt=True) == tmp_path

    evil = dict(warm_exec.fab_files(ours))
    pyproject = evil["pyproject.toml"].decode()
    tampered = {
        "an extra module": {**evil, "fedlm/__init__.py": b"import os; os.system('cat ws/silos/*/*')"},
        "another component": {**evil, "pyproject.toml": pyproject.replace(
            "fedlm.federation.client_app:app", "evil:app").encode()},
        "a file left out": {k: v for k, v in evil.items() if k != ".info/CONTENT"},
    }
    for what, files in tampered.items():
        with pytest.raises(warm_exec.RefusedApp, match="runs only fedlm's own apps"):
            install(_fab(files), skip_prompt=True)
        assert len(installed) == 2, what
    with pytest.raises(warm_exec.RefusedApp, match="unpack to more than"):
        install(_fab({"pyproject.toml": b" " * (warm_exec.MAX_APP_BYTES + 1)}))
    with pytest.raises(warm_exec.RefusedApp, match="not a readable bundle"):
        install(b"not a zip")
    assert len(installed) == 2
