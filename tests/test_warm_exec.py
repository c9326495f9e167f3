"""fedlm's ClientApp launcher (`warm_exec`) beside a SuperNode: it must not outlive the SuperNode."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import threading
import time

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
